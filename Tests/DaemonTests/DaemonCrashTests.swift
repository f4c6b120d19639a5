import Foundation
import LaminaJSON
import QMP
import TestSupport
import Testing

/// kill -9 of the daemon while an NBD client writes to a qcow2 export:
/// qemu-img check must find no corruption, and data the client saw
/// flushed must be there.
@Suite("Daemon killed mid-write", .serialized)
struct DaemonCrashTests {
    @Test("kill -9 during fio random writes over NBD: no corruption, flushed data intact", arguments: [
        (seed: 1, killAfterMs: 150, opts: "cluster_size=65536"),
        (seed: 2, killAfterMs: 400, opts: "cluster_size=4096,lazy_refcounts=on"),
        (seed: 3, killAfterMs: 800, opts: "cluster_size=65536,extended_l2=on"),
        (seed: 4, killAfterMs: 250, opts: "cluster_size=2097152"),
    ])
    func killDuringWrites(seed: Int, killAfterMs: Int, opts: String) throws {
        let dir = TempDir()
        try #require(try qemuImg(["create", "-q", "-f", "qcow2", dir.file("base.qcow2"), "64M"]).status == 0)
        try #require(try run(["qemu-io", "-c", "write -P 0x33 0 64M", dir.file("base.qcow2")]).status == 0)
        try #require(try qemuImg(["create", "-q", "-f", "qcow2", "-o", opts, "-b", "base.qcow2", "-F", "qcow2",
                                  dir.file("top.qcow2")]).status == 0)
        let d = try DaemonProcess(.lamina, dir: dir.path, args: [
            "--blockdev", "driver=qcow2,node-name=top,file.driver=file,file.filename=\(dir.path)/top.qcow2",
            "--nbd-server", "addr.type=unix,addr.path=\(dir.path)/nbd.sock",
            "--export", "type=nbd,id=e0,node-name=top,name=disk,writable=on",
        ])
        let uri = "nbd+unix:///disk?socket=\(dir.path)/nbd.sock"
        for _ in 0..<2000 where !FileManager.default.fileExists(atPath: dir.file("nbd.sock")) { usleep(10_000) }
        // Flushed before the crash: must survive it.
        let pre = try run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 4M", "-c", "write -z 6M 1M",
                           "-c", "flush", uri])
        #expect(pre.status == 0 && !pre.stdout.contains("fail"), "\(pre)")
        // Random writes elsewhere, then the daemon dies at some instant.
        let fio = try ChildProcess(["fio", "--name=crash", "--verify_state_save=0", "--ioengine=nbd", "--uri=\(uri)",
                                    "--rw=randwrite", "--bs=4k", "--iodepth=16", "--offset=8M", "--size=56M",
                                    "--time_based", "--runtime=20", "--randseed=\(seed)"],
                                   stderrPath: dir.file("fio.err"))
        usleep(useconds_t(killAfterMs * 1000))
        d.signal(SIGKILL)
        _ = d.wait()
        _ = fio.wait(timeout: 30)
        let check = try qemuImg(["check", "--output=json", dir.file("top.qcow2")])
        // 0: clean; 3: leaked clusters only (allowed after a crash).
        #expect(check.status == 0 || check.status == 3, "\(check)")
        #expect(!check.stdout.contains("\"corruptions\": ") || check.stdout.contains("\"corruptions\": 0"), "\(check)")
        let read = try run(["qemu-io", "-c", "read -P 0x5a 0 4M", "-c", "read -P 0 6M 1M", "-c", "read -P 0x33 7M 1M",
                            dir.file("top.qcow2")])
        #expect(read.status == 0 && !read.stdout.contains("fail"), "\(read)")
        // Repair leaves a clean image that the daemon opens again.
        let repair = try qemuImg(["check", "-r", "leaks", dir.file("top.qcow2")])
        #expect(repair.status == 0, "\(repair)")
        let d2 = try DaemonProcess(.lamina, dir: dir.path, args: [
            "--blockdev", "driver=qcow2,node-name=top,file.driver=file,file.filename=\(dir.path)/top.qcow2",
        ])
        #expect(try d2.quit() == 0, "\(d2.stderrText())")
    }
}

/// kill -9 of the daemon while a block job runs (and the guest writes):
/// every image passes qemu-img check (leaks allowed), and the active
/// layer's guest view, through whatever chain its header names now, holds
/// the original data plus every write the client saw flushed.
@Suite("Daemon killed mid-job", .serialized)
struct DaemonJobCrashTests {
    static let m = 1 << 20

    @Test("kill -9 during stream, commit and active commit: no corruption, the chain reads as before plus the flushed writes", arguments: [
        (job: "stream", killAfterMs: 200), (job: "stream", killAfterMs: 900),
        (job: "commit", killAfterMs: 200), (job: "commit", killAfterMs: 900),
        (job: "active", killAfterMs: 300), (job: "active", killAfterMs: 1500),
    ])
    func killDuringJob(job: String, killAfterMs: Int) throws {
        let dir = TempDir()
        // a <- b <- c <- d, 32 MiB, each layer with its own data.
        let layers: [(String, String)] = [("a", "write -P 0x11 0 32M"), ("b", "write -P 0x22 4M 8M"),
                                          ("c", "write -P 0x33 10M 8M"), ("d", "write -P 0x44 20M 2M")]
        var prev: String?
        for (l, w) in layers {
            var args = ["create", "-q", "-f", "qcow2"]
            if let p = prev { args += ["-b", "\(p).qcow2", "-F", "qcow2"] }
            try #require(try qemuImg(args + [dir.file("\(l).qcow2"), "32M"]).status == 0)
            try #require(try run(["qemu-io", "-c", w, dir.file("\(l).qcow2")]).status == 0)
            prev = l
        }
        let d = try DaemonProcess(.lamina, dir: dir.path, args: [
            "--blockdev", "driver=qcow2,node-name=node-D,file.driver=file,file.filename=\(dir.path)/d.qcow2",
            "--nbd-server", "addr.type=unix,addr.path=\(dir.path)/nbd.sock",
            "--export", "type=nbd,id=e0,node-name=node-D,name=disk,writable=on",
        ])
        let uri = "nbd+unix:///disk?socket=\(dir.path)/nbd.sock"
        let c = try d.qmp()
        let speed: JSON = .int(Int64(24 * Self.m))
        switch job {
        case "stream":
            try c.call("block-stream", ["device": "node-D", "job-id": "j", "speed": speed])
        case "commit":
            try c.call("block-commit", ["device": "node-D", "job-id": "j", "top": .string(dir.file("c.qcow2")),
                                        "base": .string(dir.file("a.qcow2")), "speed": speed])
        default:
            try c.call("block-commit", ["device": "node-D", "job-id": "j", "speed": speed])
        }
        // The guest writes and flushes while the job runs: these must survive.
        let pre = try run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 6M 1M", "-c", "write -P 0x5b 21M 64k",
                           "-c", "flush", uri])
        #expect(pre.status == 0 && !pre.stdout.contains("fail"), "\(pre)")
        usleep(useconds_t(killAfterMs * 1000))
        d.signal(SIGKILL)
        _ = d.wait()
        for l in ["a", "b", "c", "d"] {
            let check = try qemuImg(["check", dir.file("\(l).qcow2")])
            // 0: clean; 3: leaked clusters only (allowed after a crash).
            #expect(check.status == 0 || check.status == 3, "\(job) \(killAfterMs) ms: \(l).qcow2: \(check)")
        }
        // The guest view: a, then b, c, d on top, then the flushed writes.
        let read = try run(["qemu-io", "-r", "-f", "qcow2",
                            "-c", "read -P 0x11 0 4M", "-c", "read -P 0x22 4M 2M", "-c", "read -P 0x5a 6M 1M",
                            "-c", "read -P 0x22 7M 3M", "-c", "read -P 0x33 10M 8M", "-c", "read -P 0x11 18M 2M",
                            "-c", "read -P 0x44 20M 1M", "-c", "read -P 0x5b 21M 64k",
                            "-c", "read -P 0x44 \(21 * Self.m + 65536) \(Self.m - 65536)", "-c", "read -P 0x11 22M 10M",
                            dir.file("d.qcow2")])
        #expect(read.status == 0 && !read.stdout.contains("fail") && !read.stderr.contains("rror"),
                "\(job) \(killAfterMs) ms: \(read)")
    }
}
