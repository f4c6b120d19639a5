#if canImport(Glibc)
import Glibc
#endif
import CLaminaSys
import Foundation

/// What a finished child process left behind.
public struct ProcessResult: CustomStringConvertible, Sendable {
    public var status: Int32
    public var stdout: String
    public var stderr: String
    /// The deadline passed and the child was killed.
    public var timedOut = false
    public var description: String { "rc=\(status)\(timedOut ? " (timed out)" : "")\n--- stdout ---\n\(stdout)--- stderr ---\n\(stderr)" }

    public init(status: Int32, stdout: String, stderr: String, timedOut: Bool = false) {
        self.status = status
        self.stdout = stdout
        self.stderr = stderr
        self.timedOut = timedOut
    }
}

public struct SpawnError: Error, CustomStringConvertible {
    public let description: String
    public init(_ d: String) { description = d }
}

/// Runs a program (PATH lookup unless it contains '/') and captures its
/// output, with LC_ALL=C. Built on posix_spawn, pipes opened close-on-exec
/// (a child never inherits another test's pipes) and waitpid: Foundation's
/// Process sometimes never notices a child's exit here. Returns when the
/// child has exited and its output ended (or, if a grandchild keeps the
/// pipes open, when the child has exited and nothing more is pending). On
/// `timeout` the child is killed with SIGKILL and `timedOut` is set.
public func runProcess(_ args: [String], cwd: String? = nil, environment extra: [String: String] = [:],
                       stdin input: [UInt8]? = nil, timeout: Double = 120) throws -> ProcessResult {
    precondition(!args.isEmpty)
    var argv = args
    if let cwd { argv = ["/usr/bin/env", "-C", cwd] + argv }
    var env = ProcessInfo.processInfo.environment
    env["LC_ALL"] = "C"
    for (k, v) in extra { env[k] = v }

    var outP: [Int32] = [-1, -1], errP: [Int32] = [-1, -1], inP: [Int32] = [-1, -1]
    // (pipe2 is not visible from Swift's Glibc; set FD_CLOEXEC at once.)
    guard pipe(&outP) == 0, pipe(&errP) == 0, pipe(&inP) == 0 else {
        throw SpawnError("pipe: \(String(cString: strerror(errno)))")
    }
    for fd in outP + errP + inP { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
    var fa = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&fa)
    defer { posix_spawn_file_actions_destroy(&fa) }
    if input != nil {
        posix_spawn_file_actions_adddup2(&fa, inP[0], 0)
    } else {
        posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0)
    }
    posix_spawn_file_actions_adddup2(&fa, outP[1], 1)
    posix_spawn_file_actions_adddup2(&fa, errP[1], 2)
    _ = lamina_spawn_closefrom(&fa, 3)
    let cargs: [UnsafeMutablePointer<CChar>?] = argv.map { strdup($0) } + [nil]
    let cenv: [UnsafeMutablePointer<CChar>?] = env.map { strdup("\($0.key)=\($0.value)") } + [nil]
    defer {
        for a in cargs { free(a) }
        for e in cenv { free(e) }
    }
    var pid: pid_t = 0
    let rc = posix_spawnp(&pid, argv[0], &fa, nil, cargs, cenv)
    close(outP[1])
    close(errP[1])
    close(inP[0])
    guard rc == 0 else {
        close(outP[0]); close(errP[0]); close(inP[1])
        throw SpawnError("cannot run \(argv[0]): \(String(cString: strerror(rc)))")
    }
    // stdin is written by a helper thread so a child that does not read
    // it cannot deadlock us.
    let inFD = inP[1]
    if let input {
        Thread.detachNewThread {
            var off = 0
            while off < input.count {
                let n = input.withUnsafeBytes { write(inFD, $0.baseAddress! + off, input.count - off) }
                if n <= 0 { break }
                off += n
            }
            close(inFD)
        }
    } else {
        close(inFD)
    }

    var out: [UInt8] = [], err: [UInt8] = []
    var open = [true, true]
    let fds = [outP[0], errP[0]]
    var buf = [UInt8](repeating: 0, count: 65536)
    let deadline = Date().addingTimeInterval(timeout)
    var status: Int32?
    var timedOut = false

    func reap(_ flags: Int32) -> Int32? {
        var st: Int32 = 0
        let r = waitpid(pid, &st, flags)
        guard r == pid else { return nil }
        return (st & 0x7f) == 0 ? (st >> 8) & 0xff : 128 + (st & 0x7f)
    }
    func readSome(waitMS: Int32) -> Bool {
        var pfds = (0..<2).filter { open[$0] }.map { pollfd(fd: fds[$0], events: Int16(POLLIN), revents: 0) }
        if pfds.isEmpty { return false }
        let n = poll(&pfds, nfds_t(pfds.count), waitMS)
        if n <= 0 { return false }
        for p in pfds where p.revents != 0 {
            let i = p.fd == fds[0] ? 0 : 1
            let r = buf.withUnsafeMutableBytes { read(p.fd, $0.baseAddress!, $0.count) }
            if r > 0 {
                if i == 0 { out += buf.prefix(r) } else { err += buf.prefix(r) }
            } else if r == 0 || (errno != EINTR && errno != EAGAIN) {
                open[i] = false
            }
        }
        return true
    }

    while open[0] || open[1] {
        if Date() > deadline {
            kill(pid, SIGKILL)
            timedOut = true
            break
        }
        _ = readSome(waitMS: 50)
        if status == nil, let s = reap(WNOHANG) {
            status = s
            // The child is gone; take what is pending, do not wait for
            // grandchildren that may hold the pipes.
            while readSome(waitMS: 20) {}
            break
        }
    }
    close(fds[0])
    close(fds[1])
    if status == nil { status = reap(0) }
    return ProcessResult(status: timedOut ? -1 : (status ?? -1), stdout: String(decoding: out, as: UTF8.self),
                         stderr: String(decoding: err, as: UTF8.self), timedOut: timedOut)
}

/// A long-running child (a daemon under test): spawned with posix_spawn,
/// stdin/stdout on /dev/null, stderr to `stderrPath` (or /dev/null),
/// reaped with waitpid; SIGKILLed and reaped when released if still running.
public final class ChildProcess: @unchecked Sendable {
    public let pid: pid_t
    public private(set) var exitStatus: Int32?

    public init(_ args: [String], stderrPath: String? = nil, stdoutPath: String? = nil) throws {
        pid = try spawnChild(args, stderrPath: stderrPath, stdoutPath: stdoutPath)
    }

    /// The exit status (128 + signal for a signal) once exited; reaps.
    public func poll() -> Int32? {
        if let s = exitStatus { return s }
        var st: Int32 = 0
        if waitpid(pid, &st, WNOHANG) == pid {
            exitStatus = (st & 0x7f) == 0 ? (st >> 8) & 0xff : 128 + (st & 0x7f)
        }
        return exitStatus
    }

    /// Waits up to `timeout` seconds; nil if still running then (the
    /// caller decides whether that is a failure; the child is killed).
    public func wait(timeout: Double = 30) -> Int32? {
        let deadline = Date().addingTimeInterval(timeout)
        while poll() == nil {
            if Date() > deadline {
                kill(pid, SIGKILL)
                var st: Int32 = 0
                waitpid(pid, &st, 0)
                exitStatus = -1
                return nil
            }
            usleep(5_000)
        }
        return exitStatus
    }

    public func signal(_ sig: Int32) { if exitStatus == nil { kill(pid, sig) } }

    /// SIGTERM, then wait (SIGKILL after `timeout`).
    @discardableResult
    public func terminate(timeout: Double = 10) -> Int32? {
        signal(SIGTERM)
        return wait(timeout: timeout)
    }

    deinit {
        if poll() == nil {
            kill(pid, SIGKILL)
            var st: Int32 = 0
            waitpid(pid, &st, 0)
        }
    }
}

/// posix_spawn (PATH lookup) with stdin from /dev/null, stdout and stderr
/// to files (or /dev/null), and no other descriptor of the test process
/// (other tests' sockets and pipes stay out of the child). The caller reaps.
public func spawnChild(_ args: [String], stderrPath: String? = nil, stdoutPath: String? = nil) throws -> pid_t {
    var fa = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&fa)
    defer { posix_spawn_file_actions_destroy(&fa) }
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0)
    posix_spawn_file_actions_addopen(&fa, 1, stdoutPath ?? "/dev/null", O_WRONLY | O_CREAT | O_TRUNC, 0o644)
    posix_spawn_file_actions_addopen(&fa, 2, stderrPath ?? "/dev/null", O_WRONLY | O_CREAT | O_TRUNC, 0o644)
    _ = lamina_spawn_closefrom(&fa, 3)
    let cargs: [UnsafeMutablePointer<CChar>?] = args.map { strdup($0) } + [nil]
    defer { for a in cargs { free(a) } }
    var p: pid_t = 0
    let rc = posix_spawnp(&p, args[0], &fa, nil, cargs, environ)
    guard rc == 0 else { throw SpawnError("cannot run \(args[0]): \(String(cString: strerror(rc)))") }
    return p
}
