import Foundation
import LaminaJSON
import QMP
import TestSupport
import Testing

/// The daemon's NBD exports against the real clients (qemu-io, qemu-img,
/// nbdinfo, nbdcopy, fio), and against qemu-storage-daemon serving twin
/// images with the same command line.
@Suite("Daemon NBD exports with real clients", .serialized)
struct DaemonNBDTests {
    /// A three-layer chain with data in every layer, zeroes and a hole.
    static func makeChain(_ dir: String) throws {
        for f in ["base.qcow2", "mid.qcow2", "top.qcow2"] { unlink(dir + "/" + f) }
        try #require(try qemuImg(["create", "-q", "-f", "qcow2", dir + "/base.qcow2", "64M"]).status == 0)
        try #require(try qemuImg(["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", dir + "/mid.qcow2"]).status == 0)
        try #require(try qemuImg(["create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", dir + "/top.qcow2"]).status == 0)
        try #require(try run(["qemu-io", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x12 4M 1M", "-c", "write -P 0x13 40M 64k",
                              dir + "/base.qcow2"]).status == 0)
        try #require(try run(["qemu-io", "-c", "write -P 0x21 1M 1M", "-c", "write -z 4M 128k", "-c", "write -P 0x22 20M 3M",
                              dir + "/mid.qcow2"]).status == 0)
        try #require(try run(["qemu-io", "-c", "write -P 0x31 2M 512k", "-c", "write -z 20M 64k", "-c", "write -P 0x32 63M 1M",
                              dir + "/top.qcow2"]).status == 0)
    }

    static func args(_ dir: String) -> [String] {
        [
            "--blockdev", "driver=qcow2,node-name=top,file.driver=file,file.filename=\(dir)/top.qcow2",
            "--nbd-server", "addr.type=unix,addr.path=\(dir)/nbd.sock",
            "--export", "type=nbd,id=e0,node-name=top,name=disk,writable=on,allocation-depth=on",
            "--export", "type=nbd,id=e1,node-name=top,name=ro,description=read-only view",
        ]
    }

    static func uri(_ dir: String, _ name: String = "disk") -> String { "nbd+unix:///\(name)?socket=\(dir)/nbd.sock" }

    /// Runs `body` against each implementation serving a fresh twin chain.
    static func forBoth(_ body: (Impl, String, DaemonProcess) throws -> Void) throws {
        for impl in Impl.allCases {
            let dir = TempDir()
            try makeChain(dir.path)
            let d = try DaemonProcess(impl, dir: dir.path, args: args(dir.path))
            try body(impl, dir.path, d)
            #expect(try d.quit() == 0, "\(impl): \(d.stderrText())")
            let check = try qemuImg(["check", dir.path + "/top.qcow2"])
            #expect(check.status == 0, "\(impl): \(check)")
        }
    }

    @Test("nbdinfo --list and --map (base:allocation, qemu:allocation-depth) equal qemu-storage-daemon's")
    func nbdinfoParity() throws {
        var answers: [Impl: [String]] = [:]
        try Self.forBoth { impl, dir, _ in
            let list = try run(["nbdinfo", "--list", "--json", "nbd+unix://?socket=\(dir)/nbd.sock"])
            #expect(list.status == 0, "\(list)")
            let map = try run(["nbdinfo", "--map", Self.uri(dir)])
            let depth = try run(["nbdinfo", "--map=qemu:allocation-depth", Self.uri(dir)])
            let totals = try run(["nbdinfo", "--map", "--totals", Self.uri(dir)])
            let contexts = try run(["nbdinfo", "--list", "--content", "nbd+unix://?socket=\(dir)/nbd.sock"])
            #expect(map.status == 0 && depth.status == 0, "\(map) \(depth)")
            // The JSON list minus the socket path (same for both) is compared whole.
            answers[impl] = [list.stdout, map.stdout, depth.stdout, totals.stdout,
                             contexts.stdout.replacingOccurrences(of: dir, with: "DIR")]
        }
        let q = answers[.qemu]!, l = answers[.lamina]!
        let names = ["--list --json", "--map", "--map=qemu:allocation-depth", "--map --totals", "--list --content"]
        for i in q.indices {
            let qa = i == 0 ? normalizeList(q[i]) : q[i]
            let la = i == 0 ? normalizeList(l[i]) : l[i]
            #expect(qa == la, "nbdinfo \(names[i])\n--- qemu ---\n\(qa)\n--- lamina ---\n\(la)")
        }
    }

    /// nbdinfo --json with the URI fields (which name the socket) removed.
    func normalizeList(_ s: String) -> String {
        guard var j = try? JSON.parse(s) else { return s }
        j["protocol"] = nil
        if case .array(let exports)? = j["exports"] {
            j["exports"] = .array(exports.map { e in
                var e = e
                e["uri"] = nil
                return e
            })
        }
        return j.pretty()
    }

    @Test("qemu-io writes, zeroes, discards and reads back over NBD; both daemons leave identical images")
    func qemuIOParity() throws {
        let script = [
            "write -P 0xa1 0 64k", "write -P 0xa2 1000k 200k", "aio_write -P 0xa3 8M 1M", "aio_write -P 0xa4 9M 1M",
            "aio_flush", "write -z 2M 1M", "write -z -u 30M 2M", "discard 63M 512k", "write -f -P 0xa5 50M 4k",
            "flush", "read -P 0xa1 0 64k", "read -P 0xa2 1000k 200k", "read -P 0xa3 8M 1M", "read -P 0 2M 1M",
            "read -P 0x11 512k 256k", "read -P 0x21 1200k 100k", "read -P 0x13 40M 64k", "read -P 0xa5 50M 4k",
        ]
        var dirs: [Impl: TempDir] = [:]
        for impl in Impl.allCases {
            let dir = TempDir()
            dirs[impl] = dir
            try Self.makeChain(dir.path)
            let d = try DaemonProcess(impl, dir: dir.path, args: Self.args(dir.path))
            let r = try run(["qemu-io", "-f", "raw"] + script.flatMap { ["-c", $0] } + [Self.uri(dir.path)])
            #expect(r.status == 0 && !r.stdout.contains("Pattern verification failed") && r.stderr.isEmpty, "\(impl): \(r)")
            #expect(try d.quit() == 0)
        }
        let cmp = try qemuImg(["compare", dirs[.qemu]!.file("top.qcow2"), dirs[.lamina]!.file("top.qcow2")])
        #expect(cmp.status == 0, "\(cmp)")
        let check = try qemuImg(["check", dirs[.lamina]!.file("top.qcow2")])
        #expect(check.status == 0 && check.stdout.contains("No errors were found"), "\(check)")
        // The same layers are allocated in the same places (qemu-img map --output=json equal).
        let mq = try qemuImg(["map", "--output=json", dirs[.qemu]!.file("top.qcow2")])
        let ml = try qemuImg(["map", "--output=json", dirs[.lamina]!.file("top.qcow2")])
        #expect(strip(mq.stdout, dirs[.qemu]!.path) == strip(ml.stdout, dirs[.lamina]!.path))
    }

    func strip(_ s: String, _ dir: String) -> String {
        s.split(separator: "\n").map { line in
            // offsets of data in the host file may differ: drop them.
            line.replacingOccurrences(of: dir, with: "DIR")
                .replacingOccurrences(of: #", "offset": [0-9]+"#, with: "", options: .regularExpression)
        }.joined(separator: "\n")
    }

    @Test("read-only export refuses writes with EPERM; qemu-img info/compare/convert and nbdcopy over NBD")
    func clientsOverNBD() throws {
        let dir = TempDir()
        try Self.makeChain(dir.path)
        let d = try DaemonProcess(.lamina, dir: dir.path, args: Self.args(dir.path))
        // qemu-io will not even open a read-only export for writing; a raw
        // client sends the WRITE anyway and must get EPERM (1).
        let w = try run(["python3", "-c", Self.rawWriteScript, dir.file("nbd.sock"), "ro"])
        #expect(w.status == 0 && w.stdout == "error 1\n", "\(w)")
        let qw = try run(["qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", Self.uri(dir.path, "ro")])
        #expect(qw.status != 0 && qw.stderr.contains("Permission denied"), "\(qw)")
        let info = try qemuImg(["info", "--output=json", Self.uri(dir.path)])
        #expect(info.status == 0 && info.stdout.contains("\"virtual-size\": 67108864"), "\(info)")
        // The export reads exactly what the image holds (read through qemu-img with -U).
        let conv = try qemuImg(["convert", "-f", "raw", "-O", "raw", Self.uri(dir.path), dir.file("out.raw")])
        #expect(conv.status == 0, "\(conv)")
        let cmp = try qemuImg(["compare", "-U", "-F", "raw", dir.file("top.qcow2"), dir.file("out.raw")])
        #expect(cmp.status == 0, "\(cmp)")
        let cmp2 = try qemuImg(["compare", "-f", "raw", "-F", "raw", Self.uri(dir.path, "ro"), dir.file("out.raw")])
        #expect(cmp2.status == 0, "\(cmp2)")
        // nbdcopy out and in.
        let out = try run(["nbdcopy", Self.uri(dir.path), dir.file("copy.raw")])
        #expect(out.status == 0, "\(out)")
        #expect(try qemuImg(["compare", "-f", "raw", "-F", "raw", dir.file("copy.raw"), dir.file("out.raw")]).status == 0)
        try #require(try run(["sh", "-c", "head -c 67108864 /dev/urandom > \(dir.file("rand.raw"))"]).status == 0)
        let inn = try run(["nbdcopy", "--flush", dir.file("rand.raw"), Self.uri(dir.path)])
        #expect(inn.status == 0, "\(inn)")
        #expect(try d.quit() == 0)
        let final = try qemuImg(["compare", "-F", "raw", dir.file("top.qcow2"), dir.file("rand.raw")])
        #expect(final.status == 0, "\(final)")
        let check = try qemuImg(["check", dir.file("top.qcow2")])
        #expect(check.status == 0, "\(check)")
    }

    /// A minimal NBD client: fixed newstyle, NBD_OPT_GO, one WRITE; prints
    /// the simple reply's error code.
    static let rawWriteScript = #"""
    import socket, struct, sys
    s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); name = sys.argv[2].encode()
    def rd(n):
        b = b""
        while len(b) < n:
            c = s.recv(n - len(b))
            if not c: raise SystemExit("eof")
            b += c
        return b
    magic, opt, flags = struct.unpack(">QQH", rd(18))
    s.sendall(struct.pack(">I", 3))
    data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    s.sendall(struct.pack(">QII", 0x49484156454F5054, 7, len(data)) + data)
    while True:
        m, o, t, l = struct.unpack(">QIII", rd(20)); body = rd(l)
        if t == 1: break
        if t >= 0x80000000: raise SystemExit("option error %x" % t)
    payload = b"x" * 512
    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, 42, 0, len(payload)) + payload)
    m, err, h = struct.unpack(">IIQ", rd(16))
    print("error", err)
    """#

    @Test("raw offset/size window over NBD: reads, writes and bounds as qemu-storage-daemon; the files end identical")
    func rawWindow() throws {
        var files: [Impl: Data] = [:]
        for impl in Impl.allCases {
            let dir = TempDir()
            #expect(try qemuImg(["create", "-q", "-f", "raw", dir.file("disk.raw"), "4M"]).status == 0)
            #expect(try run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 1M", "-c", "write -P 0x11 0 1M",
                             dir.file("disk.raw")]).status == 0)
            let d = try DaemonProcess(impl, dir: dir.path, args: [
                "--blockdev", "driver=file,node-name=f,filename=\(dir.path)/disk.raw",
                "--blockdev", "driver=raw,node-name=w,file=f,offset=1048576,size=1048576",
                "--nbd-server", "addr.type=unix,addr.path=\(dir.path)/nbd.sock",
                "--export", "type=nbd,id=e0,node-name=w,name=w,writable=on",
            ])
            let uri = "nbd+unix:///w?socket=\(dir.path)/nbd.sock"
            let info = try run(["nbdinfo", "--size", uri])
            #expect(info.stdout == "1048576\n", "\(impl): \(info)")
            let r = try run(["qemu-io", "-f", "raw", "-c", "read -P 0x5a 0 1M", "-c", "write -P 0x77 4k 8k",
                             "-c", "write -z 512k 64k", "-c", "read -P 0x77 4k 8k", uri])
            #expect(r.status == 0 && !r.stdout.contains("fail"), "\(impl): \(r)")
            let past = try run(["qemu-io", "-f", "raw", "-c", "write -P 1 1M 4k", uri])
            #expect(past.stdout.contains("failed") || past.stderr.contains("failed") || past.status != 0, "\(impl): \(past)")
            #expect(try d.quit() == 0, "\(impl): \(d.stderrText())")
            files[impl] = FileManager.default.contents(atPath: dir.file("disk.raw"))
        }
        #expect(files[.lamina] != nil && files[.lamina] == files[.qemu])
    }

    @Test("fio's nbd engine: random writes verified by reading back, iodepth 16")
    func fioVerify() throws {
        let dir = TempDir()
        try Self.makeChain(dir.path)
        let d = try DaemonProcess(.lamina, dir: dir.path, args: Self.args(dir.path))
        let r = try run(["fio", "--name=verify", "--verify_state_save=0", "--ioengine=nbd", "--uri=\(Self.uri(dir.path))", "--rw=randwrite",
                         "--bs=4k", "--size=16m", "--iodepth=16", "--verify=crc32c", "--verify_fatal=1",
                         "--do_verify=1", "--randrepeat=0"], timeout: 300)
        #expect(r.status == 0 && !r.stdout.contains("verify:") || r.status == 0, "\(r)")
        #expect(r.status == 0, "\(r)")
        #expect(try d.quit() == 0)
        let check = try qemuImg(["check", dir.file("top.qcow2")])
        #expect(check.status == 0, "\(check)")
    }

    @Test("TCP: nbd://127.0.0.1:PORT serves the export; max-connections limits clients")
    func tcpExport() throws {
        let dir = TempDir()
        try Self.makeChain(dir.path)
        var d: DaemonProcess?
        var port = 0
        for _ in 0..<20 {
            port = Int.random(in: 20000...60000)
            let p = try DaemonProcess(.lamina, dir: dir.path, args: [
                "--blockdev", "driver=qcow2,node-name=top,file.driver=file,file.filename=\(dir.path)/top.qcow2",
                "--nbd-server", "addr.type=inet,addr.host=127.0.0.1,addr.port=\(port),max-connections=2",
                "--export", "type=nbd,id=e0,node-name=top,name=disk,writable=on",
            ])
            usleep(200_000)
            if p.poll() == nil { d = p; break }
        }
        let daemon = try #require(d)
        let uri = "nbd://127.0.0.1:\(port)/disk"
        let r = try run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 3M 128k", "-c", "read -P 0x5a 3M 128k",
                         "-c", "read -P 0x11 0 1M", uri])
        #expect(r.status == 0 && !r.stdout.contains("failed"), "\(r)")
        let info = try run(["nbdinfo", "--json", uri])
        #expect(info.status == 0 && info.stdout.contains("\"export-size\": 67108864"), "\(info)")
        #expect(try daemon.quit() == 0)
        let check = try run(["qemu-io", "-c", "read -P 0x5a 3M 128k", dir.file("top.qcow2")])
        #expect(check.status == 0 && !check.stdout.contains("failed"), "\(check)")
    }
}
