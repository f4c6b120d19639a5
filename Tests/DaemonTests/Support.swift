import Foundation
import LaminaJSON
import QMP
import TestSupport
import Testing

/// Runs a command (PATH lookup unless it contains '/') with a timeout.
@discardableResult
func run(_ args: [String], cwd: String? = nil, timeout: TimeInterval = 120, stdin: String? = nil) throws -> ProcessResult {
    let r = try runProcess(args, cwd: cwd, stdin: stdin.map { Array($0.utf8) }, timeout: timeout)
    if r.timedOut { Issue.record("timed out after \(timeout)s: \(args.joined(separator: " "))") }
    return r
}

let productsDirectory: String = {
    for b in Bundle.allBundles where b.bundlePath.hasSuffix(".xctest") {
        return b.bundleURL.deletingLastPathComponent().path
    }
    return URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().path
}()

let laminaDaemon = productsDirectory + "/lamina-storage-daemon"

/// A temporary directory (short path: UNIX socket paths are limited to 108 bytes).
final class TempDir: @unchecked Sendable {
    let path: String
    init() {
        var t = Array("/tmp/ld-XXXXXX".utf8CString)
        path = String(cString: mkdtemp(&t)!)
    }
    func file(_ name: String) -> String { path + "/" + name }
    deinit { try? FileManager.default.removeItem(atPath: path) }
}

/// Which implementation a test runs against.
enum Impl: String, CaseIterable, CustomStringConvertible {
    case qemu, lamina
    var binary: String { self == .qemu ? "/usr/bin/qemu-storage-daemon" : laminaDaemon }
    var description: String { rawValue }
}

/// A running storage daemon (ours or QEMU's) with a QMP monitor at
/// `qmpPath`; killed when released if still running. Spawned with
/// posix_spawn and reaped with waitpid (no Foundation.Process), stderr
/// captured in a file.
final class DaemonProcess: @unchecked Sendable {
    let impl: Impl
    let pid: pid_t
    let qmpPath: String
    let stderrPath: String
    private(set) var exitStatus: Int32?

    /// Starts `impl` with a monitor on `dir/qmp-<impl>.sock` plus `args`;
    /// `binary` replaces the executable `impl` names (the block-job tests
    /// let a stand-in play Lamina).
    init(_ impl: Impl, dir: String, args: [String] = [], monitor: Bool = true, binary: String? = nil) throws {
        self.impl = impl
        qmpPath = dir + "/qmp-\(impl).sock"
        stderrPath = dir + "/stderr-\(impl)-\(UInt32.random(in: 0...UInt32.max)).log"
        var all = [binary ?? impl.binary]
        if monitor {
            all += ["--chardev", "socket,id=m0,path=\(qmpPath),server=on,wait=off", "--monitor", "chardev=m0"]
        }
        all += args
        // Ready means the pid file exists: both daemons write it after every
        // socket, node and export of the command line exists.
        var readyFile = dir + "/ready-\(impl)-\(UInt32.random(in: 0...UInt32.max)).pid"
        if let i = args.firstIndex(of: "--pidfile"), i + 1 < args.count {
            readyFile = args[i + 1]
        } else {
            all += ["--pidfile", readyFile]
        }
        pid = try spawn(all, stderrPath: stderrPath)
        let deadline = Date().addingTimeInterval(20)
        while !FileManager.default.fileExists(atPath: readyFile) {
            if poll() != nil || Date() > deadline {
                throw QMPClientError("\(impl) did not start: \(stderrText())")
            }
            usleep(10_000)
        }
    }

    /// A negotiated QMP client.
    func qmp() throws -> QMPClient {
        let c = try QMPClient(unixPath: qmpPath, timeout: 30)
        try c.negotiate()
        return c
    }

    /// The exit status if the process has exited (reaps it).
    func poll() -> Int32? {
        if let s = exitStatus { return s }
        var st: Int32 = 0
        let r = waitpid(pid, &st, WNOHANG)
        if r == pid {
            exitStatus = (st & 0x7f) == 0 ? (st >> 8) & 0xff : 128 + (st & 0x7f)
        }
        return exitStatus
    }

    /// Waits for exit (after quit or a signal); returns the status.
    @discardableResult
    func wait(timeout: TimeInterval = 30) -> Int32 {
        let deadline = Date().addingTimeInterval(timeout)
        while poll() == nil {
            if Date() > deadline {
                Issue.record("\(impl) did not exit within \(timeout)s")
                kill(pid, SIGKILL)
                var st: Int32 = 0
                waitpid(pid, &st, 0)
                exitStatus = -1
                break
            }
            usleep(10_000)
        }
        return exitStatus ?? -1
    }

    func stderrText() -> String {
        (try? String(contentsOfFile: stderrPath, encoding: .utf8)) ?? ""
    }

    /// quit over QMP (on `client`, or a new connection: QEMU's monitor
    /// socket serves one client at a time), then wait; returns the exit status.
    @discardableResult
    func quit(_ client: QMPClient? = nil) throws -> Int32 {
        let c = try client ?? { () throws -> QMPClient in
            let n = try QMPClient(unixPath: qmpPath, timeout: 30)
            try n.negotiate()
            return n
        }()
        _ = try c.execute("quit")
        return wait()
    }

    func signal(_ sig: Int32) { kill(pid, sig) }

    deinit {
        if poll() == nil {
            kill(pid, SIGKILL)
            var st: Int32 = 0
            waitpid(pid, &st, 0)
        }
    }
}

/// posix_spawn with stdin/stdout from /dev/null and stderr to a file.
func spawn(_ args: [String], stderrPath: String) throws -> pid_t {
    try spawnChild(args, stderrPath: stderrPath)
}

/// The error part of a QMP response, or nil for a success.
func errorOf(_ r: JSON) -> (cls: String, desc: String)? {
    guard let e = r["error"] else { return nil }
    return (e["class"]?.stringValue ?? "", e["desc"]?.stringValue ?? "")
}

/// Keeps only the fields that do not depend on the implementation, for
/// comparing QMP answers of QEMU and Lamina.
func stripVolatile(_ j: JSON) -> JSON {
    switch j {
    case .object(let m):
        return .object(m.filter { $0.0 != "timestamp" }.map { ($0.0, stripVolatile($0.1)) })
    case .array(let a):
        return .array(a.map(stripVolatile))
    default:
        return j
    }
}

func qemuImg(_ args: [String]) throws -> ProcessResult { try run(["qemu-img"] + args) }
