#if canImport(Glibc)
import Glibc
#endif
import BlockCore
import BlockDrivers
import BlockGraph
import CLaminaSys
import LaminaJSON
import NBDServer
import QMP
import Qcow2
import ServerKit
import Synchronization

/// qemu-storage-daemon's main: processes the options in order, then
/// serves until `quit` or SIGTERM/SIGINT, and shuts down cleanly (exit 0).
@ControlActor
public final class DaemonMain {
    let prog: String
    let loops = DaemonLoops(threads: 1)
    let daemon: Daemon
    let qmp: QMPServer
    private var chardevs: [String: ChardevSpec] = [:]
    private var pidfile: String?
    private let done = AsyncEvent()

    public init(prog: String) {
        self.prog = prog
        BlockDiagnostics.programName.withLock { $0 = prog }
        daemon = Daemon(loops: loops)
        qmp = QMPServer(group: loops.group, dispatcher: DaemonDispatcher(daemon: daemon), version: daemon.versionJSON)
        let q = qmp
        daemon.eventSink = { name, data in q.emit(event: name, data: data) }
        let ev = done
        daemon.onQuit = { ev.signal() }
        // QEMU reports dropped NBD clients on stderr (error_report).
        daemon.nbd.errorReporter = { message in FileHandleStderr.write("\(prog): \(message)\n") }
    }

    /// NBD replies of up to 32 MiB are allocated per request on an I/O
    /// thread and freed on the loop after the send; keep them in the heap.
    public nonisolated static func tuneAllocator() {
        lamina_keep_large_buffers_in_heap(33 << 20)
    }

    /// Handles the informational options before anything starts (and
    /// before --daemonize forks). Returns an exit code to stop with.
    public nonisolated static func early(_ prog: String, _ options: [DaemonOption]) -> Int32? {
        if options.contains(.help) {
            print(DaemonCommandLine.usage, terminator: "")
            return 0
        }
        if options.contains(.version) {
            print("lamina-storage-daemon version \(laminaVersion) (QEMU 7.2 compatible)")
            return 0
        }
        return nil
    }

    func fail(_ option: String, _ arg: String, _ message: String) -> UsageError {
        UsageError(message: "--\(option) \(arg): \(message)")
    }

    /// Runs every option; throws the first failure (QSD exits at once).
    public func process(_ options: [DaemonOption]) async throws(UsageError) {
        for o in options {
            switch o {
            case .blockdev(let arg):
                let bo: BlockdevOptions
                do throws(QMPError) {
                    let a = try QAPIInput.fromOption(arg, impliedKey: "driver")
                    bo = try BlockdevOptions.parse(a)
                    try a.finish()
                } catch {
                    throw fail("blockdev", arg, error.desc)
                }
                do throws(BlockError) {
                    try await daemon.blockdevAdd(bo)
                } catch {
                    // On the command line QEMU prints the error's hint lines too.
                    throw fail("blockdev", arg, error.message)
                }
            case .chardev(let arg):
                let c: ChardevSpec
                do throws(UsageError) {
                    c = try ChardevSpec.parse(arg)
                } catch {
                    throw fail("chardev", arg, error.message)
                }
                for w in c.warnings { FileHandleStderr.write("\(prog): --chardev \(arg): warning: \(w)\n") }
                if chardevs[c.id] != nil {
                    throw UsageError(message: "--chardev \(arg): attempt to add duplicate property 'id' to object (type 'chardev')")
                }
                chardevs[c.id] = c
            case .monitor(let arg):
                try await startMonitor(arg)
            case .nbdServer(let arg):
                do throws(QMPError) {
                    let a = try QAPIInput.fromOption(arg)
                    let addr = try a.object("addr") { (s: QAPIInput) throws(QMPError) in try ExportCommands.parseFlatAddress(s) }
                    if a.has("tls-creds") || a.has("tls-authz") || a.has("tls-hostname") {
                        throw QMPError("TLS is not supported by Lamina's NBD server")
                    }
                    let max = try a.optionalInteger("max-connections", as: UInt32.self) ?? 0
                    try a.finish()
                    try await daemon.nbdServerStart(addr, maxConnections: Int(max))
                } catch {
                    throw fail("nbd-server", arg, error.desc)
                }
            case .export(let arg):
                do throws(QMPError) {
                    let a = try QAPIInput.fromOption(arg, impliedKey: "type")
                    let eo = try ExportCommands.parseExport(a)
                    try a.finish()
                    try await Commands.qmp { () async throws(BlockError) in try await daemon.exports.add(eo) }
                } catch {
                    throw fail("export", arg, error.desc)
                }
            case .object(let arg):
                throw fail("object", arg, "objects (--object) are not supported by Lamina")
            case .pidfile(let path):
                pidfile = path
            case .trace:
                FileHandleStderr.write("\(prog): warning: tracing is not available in Lamina; --trace ignored\n")
            case .quickstart:
                try await quickstart()
            case .daemonize, .help, .version:
                break
            }
        }
        if let p = pidfile {
            try writePidfile(p)
        }
    }

    private func startMonitor(_ arg: String) async throws(UsageError) {
        var chardev = ""
        var pretty = false
        var id: String?
        do throws(QMPError) {
            let a = try QAPIInput.fromOption(arg, impliedKey: "chardev")
            id = try a.optionalString("id")
            let mode = try a.optionalEnumValue("mode", allowed: ["readline", "control"]) ?? "control"
            pretty = try a.optionalBool("pretty") ?? false
            chardev = try a.string("chardev")
            try a.finish()
            if mode != "control" { throw QMPError("Only QMP monitors (mode=control) are supported") }
        } catch {
            throw fail("monitor", arg, error.desc)
        }
        guard let c = chardevs[chardev] else {
            throw fail("monitor", arg, "chardev \"\(chardev)\" not found")
        }
        do {
            try await qmp.listen(on: c.address, monitorID: id ?? c.id, style: pretty ? .pretty : .compact)
        } catch {
            throw fail("monitor", arg, "Failed to listen on \(c.address): \(error)")
        }
    }

    private func writePidfile(_ path: String) throws(UsageError) {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        if fd < 0 {
            throw UsageError(message: "Cannot write pid file: \(String(cString: strerror(errno)))")
        }
        let text = "\(getpid())\n"
        _ = text.withCString { write(fd, $0, strlen($0)) }
        close(fd)
    }

    /// Serves until quit; returns after the clean shutdown.
    public func serve() async {
        await done.wait()
        await qmp.close()
        if let p = pidfile { unlink(p) }
    }

    /// SIGTERM/SIGINT: the same clean shutdown as quit.
    public func requestQuit() async {
        await daemon.quit()
    }

    // MARK: - Quick start

    /// --quickstart: a scratch 1 GiB qcow2 exported writable over NBD, a
    /// QMP socket, and instructions for both.
    private func quickstart() async throws(UsageError) {
        var template = Array("/tmp/lamina-XXXXXX".utf8CString)
        guard let p = mkdtemp(&template) else {
            throw UsageError(message: "--quickstart: cannot create a directory: \(String(cString: strerror(errno)))")
        }
        let dir = String(cString: p)
        let image = dir + "/scratch.qcow2"
        let nbdSock = dir + "/nbd.sock"
        let qmpSock = dir + "/qmp.sock"
        var co = Qcow2CreateOptions()
        co.size = 1 << 30
        do throws(BlockError) {
            try await ImageCreator.createQcow2(path: image, options: co)
        } catch {
            throw UsageError(message: "--quickstart: \(error.message)")
        }
        try await process([
            .blockdev("driver=qcow2,node-name=scratch,file.driver=file,file.filename=\(image.replacingCommas())"),
            .chardev("socket,id=qmp0,path=\(qmpSock.replacingCommas()),server=on,wait=off"),
            .monitor("chardev=qmp0"),
            .nbdServer("addr.type=unix,addr.path=\(nbdSock.replacingCommas())"),
            .export("type=nbd,id=scratch,node-name=scratch,name=scratch,writable=on,allocation-depth=on"),
        ])
        print("""
            lamina-storage-daemon \(laminaVersion) is serving a scratch disk.

              image:   \(image)  (qcow2, 1 GiB, node-name 'scratch')
              NBD:     nbd+unix:///scratch?socket=\(nbdSock)
              QMP:     \(qmpSock)

            Try, from another terminal:
              qemu-io -f raw -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' 'nbd+unix:///scratch?socket=\(nbdSock)'
              nbdinfo --map 'nbd+unix:///scratch?socket=\(nbdSock)'
              qemu-img info 'nbd+unix:///scratch?socket=\(nbdSock)'
              python3 -m qemu.qmp.qmp_shell \(qmpSock)     # then: query-block-exports

            Stop with Ctrl-C or the QMP command 'quit' (both close the image cleanly).

            """)
        fflush(nil)
    }
}

extension String {
    /// QEMU option syntax: a comma in a value is written ",,".
    func replacingCommas() -> String {
        var s = ""
        for c in self { s += c == "," ? ",," : String(c) }
        return s
    }
}
