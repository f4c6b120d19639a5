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
