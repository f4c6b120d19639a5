import Foundation
import LaminaJSON
import QMP
import TestSupport
import Testing

/// qemu-storage-daemon's command line, process life cycle and image
/// locking, compared with the real qemu-storage-daemon.
@Suite("Daemon command line, life cycle and locking", .serialized)
struct DaemonCLITests {
    /// Runs a daemon command line that must fail at start-up; returns
    /// (status, stderr with the program name replaced).
    func startFailure(_ impl: Impl, _ args: [String]) throws -> (Int32, String) {
        let r = try run([impl.binary] + args, timeout: 30)
        let name = impl == .qemu ? "qemu-storage-daemon" : "lamina-storage-daemon"
        return (r.status, r.stderr.replacingOccurrences(of: impl.binary + ":", with: "ARGV0:")
                    .replacingOccurrences(of: name + ":", with: "PROG:"))
    }

    @Test("option and start-up errors: same exit status and message as qemu-storage-daemon")
    func startupErrors() throws {
        let dir = TempDir()
        #expect(try qemuImg(["create", "-q", "-f", "qcow2", dir.file("a.qcow2"), "1M"]).status == 0)
        let cases: [[String]] = [
            ["--bogus"],
            ["extra"],
            ["--blockdev", "driver=nope,node-name=x"],
            ["--blockdev", "driver=file,node-name=x,filename=\(dir.path)/missing"],
            ["--blockdev", "driver=file,filename=\(dir.path)/a.qcow2"],
            ["--blockdev", "driver=file,node-name=x,filename=\(dir.path)/a.qcow2,read-only=maybe"],
            ["--blockdev", "driver=file,node-name=x,filename=\(dir.path)/a.qcow2,bogus=1"],
            ["--blockdev", "{\"driver\": \"file\", \"node-name\": \"x\"}"],
            ["--blockdev", "{\"driver\": \"file\""],
            ["--blockdev", "driver=file,node-name=x,filename=\(dir.path)/a.qcow2",
             "--blockdev", "driver=file,node-name=x,filename=\(dir.path)/a.qcow2"],
            ["--export", "type=nbd,id=e0,node-name=x"],
            ["--nbd-server", "addr.type=unix"],
            ["--nbd-server", "addr.type=unix,addr.path=\(dir.path)/n.sock,max-connections=-1"],
            ["--nbd-server", "addr.type=unix,addr.path=\(dir.path)/n.sock", "--export", "type=nbd,id=e0,node-name=x"],
            ["--blockdev", "driver=null-co,node-name=n0", "--nbd-server", "addr.type=unix,addr.path=\(dir.path)/n.sock",
             "--export", "type=nbd,id=e0,node-name=n0,writable=perhaps"],
            ["--blockdev", "driver=qcow2,node-name=q,file.driver=file,file.filename=\(dir.path)/a.qcow2,backing.driver=bogus"],
            ["--monitor", "chardev=nothere"],
            ["--chardev", "socket,id=m,path=\(dir.path)/q.sock,bogus=1"],
            ["--chardev", "socket,id=m,path=\(dir.path)/q.sock,server=maybe"],
        ]
        for args in cases {
            let (qs, qe) = try startFailure(.qemu, args)
            let (ls, le) = try startFailure(.lamina, args)
            #expect(qs == ls, "exit status for \(args): qemu \(qs) lamina \(ls)")
            #expect(qe == le, "stderr for \(args)\nqemu:   \(qe)\nlamina: \(le)")
        }
    }

    @Test("-h and -V exit 0; --help prints the options")
    func helpAndVersion() throws {
        let h = try run([laminaDaemon, "-h"])
        #expect(h.status == 0 && h.stdout.contains("--blockdev") && h.stdout.contains("--nbd-server"), "\(h)")
        let v = try run([laminaDaemon, "-V"])
        #expect(v.status == 0 && v.stdout.contains("version"), "\(v)")
        let v2 = try run([laminaDaemon, "--version"])
        #expect(v2.status == 0, "\(v2)")
    }

    @Test("--pidfile, SIGTERM and SIGINT shut down cleanly (exit 0, image clean, pidfile removed)")
    func signalsAndPidfile() throws {
        for sig in [SIGTERM, SIGINT] {
            let dir = TempDir()
            #expect(try qemuImg(["create", "-q", "-f", "qcow2", dir.file("a.qcow2"), "16M"]).status == 0)
            let d = try DaemonProcess(.lamina, dir: dir.path, args: [
                "--blockdev", "driver=qcow2,node-name=q,file.driver=file,file.filename=\(dir.path)/a.qcow2",
                "--nbd-server", "addr.type=unix,addr.path=\(dir.path)/n.sock",
                "--export", "type=nbd,id=e0,node-name=q,writable=on",
                "--pidfile", dir.file("pid"),
            ])
            // The pid file is the documented readiness signal: written after
            // the sockets exist.
            for _ in 0..<2000 where !FileManager.default.fileExists(atPath: dir.file("pid")) { usleep(10_000) }
            let pidText = try String(contentsOfFile: dir.file("pid"), encoding: .utf8)
            #expect(pidText == "\(d.pid)\n")
            let w = try run(["qemu-io", "-f", "raw", "-c", "write -P 0x77 0 1M", "nbd+unix:///q?socket=\(dir.path)/n.sock"])
            #expect(w.status == 0, "\(w)")
            d.signal(sig)
            #expect(d.wait() == 0, "\(d.stderrText())")
            #expect(!FileManager.default.fileExists(atPath: dir.file("pid")))
            let check = try qemuImg(["check", dir.file("a.qcow2")])
            #expect(check.status == 0, "\(check)")
            let info = try qemuImg(["info", "--output=json", dir.file("a.qcow2")])
            #expect(info.stdout.contains("\"dirty-flag\": false"), "\(info)")
            let r = try run(["qemu-io", "-c", "read -P 0x77 0 1M", dir.file("a.qcow2")])
            #expect(r.status == 0 && !r.stdout.contains("failed"), "\(r)")
        }
    }

    @Test("--daemonize: the parent exits 0 once the sockets are ready; the daemon keeps serving")
    func daemonize() throws {
        let dir = TempDir()
        let r = try run([laminaDaemon, "--daemonize", "--pidfile", dir.file("pid"),
                         "--chardev", "socket,id=m,path=\(dir.path)/qmp.sock,server=on,wait=off", "--monitor", "chardev=m",
                         "--blockdev", "driver=null-co,node-name=n0"], timeout: 30)
        #expect(r.status == 0, "\(r)")
        // Ready when the parent exited: the monitor answers at once.
        #expect(FileManager.default.fileExists(atPath: dir.file("qmp.sock")))
        let pid = Int32(try String(contentsOfFile: dir.file("pid"), encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines))!
        let c = try QMPClient(unixPath: dir.file("qmp.sock"), timeout: 20)
        try c.negotiate()
        let nodes = try c.call("query-named-block-nodes")
        #expect(nodes[0]?["node-name"]?.stringValue == "n0")
        _ = try c.execute("quit")
        var gone = false
        for _ in 0..<500 where !gone {
            gone = kill(pid, 0) != 0
            usleep(10_000)
        }
        #expect(gone)
        // A start-up failure is reported by the parent's exit status.
        let bad = try run([laminaDaemon, "--daemonize", "--blockdev", "driver=nope,node-name=x"], timeout: 30)
        #expect(bad.status == 1 && bad.stderr.contains("does not accept value 'nope'"), "\(bad)")
    }

    @Test("image locking: qemu-img/qemu-io and Lamina refuse an image the other holds for writing")
    func lockingInterop() throws {
        let dir = TempDir()
        #expect(try qemuImg(["create", "-q", "-f", "qcow2", dir.file("a.qcow2"), "16M"]).status == 0)
        #expect(try qemuImg(["create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", dir.file("b.qcow2")]).status == 0)
        let add = #"{"driver": "qcow2", "node-name": "q", "file": {"driver": "file", "filename": "\#(dir.path)/b.qcow2"}}"#
        // Lamina holds b (writable) and its backing a (read-only).
        let l = try DaemonProcess(.lamina, dir: dir.path)
        let lc = try l.qmp()
        try lc.call("blockdev-add", try JSON.parse(add))
        let w = try run(["qemu-io", "-c", "write 0 4k", dir.file("b.qcow2")])
        #expect(w.status != 0 && w.stderr.contains("Failed to get \"write\" lock"), "\(w)")
        let wa = try run(["qemu-io", "-c", "write 0 4k", dir.file("a.qcow2")])
        #expect(wa.status != 0 && wa.stderr.contains("Failed to get \"write\" lock"), "backing file must be protected: \(wa)")
        let ro = try run(["qemu-img", "info", "-U", dir.file("b.qcow2")])
        #expect(ro.status == 0, "\(ro)")
        // QEMU's daemon cannot take it either, with the message Lamina gives the other way round.
        let q = try DaemonProcess(.qemu, dir: dir.path)
        let qc = try q.qmp()
        let qr = try qc.execute("blockdev-add", try JSON.parse(add))
        #expect(errorOf(qr)?.desc == "Failed to get \"write\" lock", "\(qr)")
        #expect(try l.quit(lc) == 0)
        // Now QEMU holds it and Lamina is refused.
        let qr2 = try qc.execute("blockdev-add", try JSON.parse(add))
        #expect(qr2["return"] != nil, "\(qr2)")
        let l2 = try DaemonProcess(.lamina, dir: dir.path)
        let lc2 = try l2.qmp()
        let lr = try lc2.execute("blockdev-add", try JSON.parse(add))
        #expect(errorOf(lr)?.cls == "GenericError" && errorOf(lr)?.desc == "Failed to get \"write\" lock", "\(lr)")
        // Lamina's failed attempt leaves nothing behind.
        let nodes = try lc2.call("query-named-block-nodes")
        #expect(nodes.arrayValue?.isEmpty == true, "\(nodes)")
        #expect(try l2.quit(lc2) == 0)
        #expect(try q.quit(qc) == 0)
    }

    @Test("--quickstart: a scratch qcow2 served over NBD and a QMP socket, as printed; quit leaves a clean image")
    func quickstart() throws {
        let dir = TempDir()
        let d = try ChildProcess([laminaDaemon, "--quickstart"], stderrPath: dir.file("err"), stdoutPath: dir.file("out"))
        var text = ""
        for _ in 0..<3000 where !text.contains("Stop with") {
            text = (try? String(contentsOfFile: dir.file("out"), encoding: .utf8)) ?? ""
            if !text.contains("Stop with") { usleep(10_000) }
        }
        func field(_ label: String) -> String? {
            text.split(separator: "\n").first { $0.trimmingCharacters(in: .whitespaces).hasPrefix(label) }
                .map { $0.trimmingCharacters(in: .whitespaces).dropFirst(label.count).trimmingCharacters(in: .whitespaces) }
        }
        let uri = try #require(field("NBD:"), "\(text)")
        let qmpPath = try #require(field("QMP:"), "\(text)")
        let image = try #require(field("image:")?.split(separator: " ").first.map(String.init), "\(text)")
        defer { try? FileManager.default.removeItem(atPath: (image as NSString).deletingLastPathComponent) }
        #expect(uri.hasPrefix("nbd+unix:///scratch?socket=/tmp/lamina-"))
        let io = try run(["qemu-io", "-f", "raw", "-c", "write -P 0xab 0 1M", "-c", "read -P 0xab 0 1M", uri])
        #expect(io.status == 0 && !io.stdout.contains("fail"), "\(io)")
        let info = try run(["nbdinfo", "--json", uri])
        #expect(info.stdout.contains("\"export-size\": 1073741824"), "\(info)")
        let c = try QMPClient(unixPath: qmpPath)
        try c.negotiate()
        #expect(try c.call("query-block-exports")[0]?["id"] == "scratch")
        _ = try c.execute("quit")
        #expect(d.wait(timeout: 30) == 0)
        let check = try qemuImg(["check", image])
        #expect(check.status == 0, "\(check)")
        let r = try run(["qemu-io", "-c", "read -P 0xab 0 1M", image])
        #expect(r.status == 0 && !r.stdout.contains("fail"), "\(r)")
    }
}
