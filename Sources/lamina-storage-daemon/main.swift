#if canImport(Glibc)
import Glibc
#endif
import Dispatch
import BlockCore
import StorageDaemon

// lamina-storage-daemon: qemu-storage-daemon's command line and behaviour.
// Option errors print "<prog>: <message>" and exit 1; a clean shutdown
// (quit, SIGTERM, SIGINT) exits 0.

// NBD replies are built in buffers of up to 32 MiB, allocated on an I/O
// thread and freed on the loop after the send. Above glibc's default
// mmap threshold each one would be a fresh mapping whose pages the kernel
// must fault in and zero on every request; keep them in the heap instead.
DaemonMain.tuneAllocator()

@ControlActor
func runDaemon(_ options: [DaemonOption], notify: Int32) async -> Int32 {
    let main = DaemonMain(prog: prog)
    do throws(UsageError) {
        try await main.process(options)
    } catch {
        FileHandleStderr.write("\(prog): \(error.message)\n")
        await main.requestQuit()
        await main.serve()
        if notify >= 0 {
            var status: UInt8 = 1
            _ = write(notify, &status, 1)
        }
        return 1
    }
    if notify >= 0 {
        // Start-up complete: release the parent, detach from the terminal.
        var status: UInt8 = 0
        _ = write(notify, &status, 1)
        close(notify)
        let devnull = open("/dev/null", O_RDWR)
        if devnull >= 0 {
            dup2(devnull, 0)
            dup2(devnull, 1)
            dup2(devnull, 2)
            close(devnull)
        }
    }
    var sources: [any DispatchSourceSignal] = []
    for sig in [SIGTERM, SIGINT, SIGHUP] {
        let src = DispatchSource.makeSignalSource(signal: sig, queue: .global())
        // @Sendable: not isolated to ControlActor (dispatch runs it on its own queue).
        src.setEventHandler { @Sendable in Task { @ControlActor in await main.requestQuit() } }
        src.resume()
        sources.append(src)
    }
    await main.serve()
    _ = sources
    return 0
}

let prog = "lamina-storage-daemon"
let args = Array(CommandLine.arguments.dropFirst())

let options: [DaemonOption]
do {
    options = try DaemonCommandLine.parse(args)
} catch {
    // getopt's messages name the program as invoked (argv[0]), like QEMU's.
    let name = error.fromGetopt ? CommandLine.arguments.first ?? prog : prog
    FileHandleStderr.write("\(name): \(error.message)\n")
    exit(1)
}
if let code = DaemonMain.early(prog, options) {
    exit(code)
}

// --daemonize: fork before any thread exists; the parent waits for the
// child's start-up result on a pipe and exits with it.
var notifyFD: Int32 = -1
if options.contains(.daemonize) {
    var fds: [Int32] = [0, 0]
    guard pipe(&fds) == 0 else {
        FileHandleStderr.write("\(prog): cannot create pipe: \(String(cString: strerror(errno)))\n")
        exit(1)
    }
    let pid = fork()
    if pid < 0 {
        FileHandleStderr.write("\(prog): fork failed: \(String(cString: strerror(errno)))\n")
        exit(1)
    }
    if pid > 0 {
        close(fds[1])
        var status: UInt8 = 1
        let n = read(fds[0], &status, 1)
        exit(n == 1 ? Int32(status) : 1)
    }
    close(fds[0])
    notifyFD = fds[1]
    setsid()
}

signal(SIGPIPE, SIG_IGN)
signal(SIGTERM, SIG_IGN)
signal(SIGINT, SIG_IGN)
signal(SIGHUP, SIG_IGN)

let startupFD = notifyFD
let code: Int32 = await runDaemon(options, notify: startupFD)
exit(code)

