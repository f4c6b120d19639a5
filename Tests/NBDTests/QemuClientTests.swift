import Foundation
import NBDServer
import TestSupport
import Testing

/// QEMU's own NBD client (qemu-io, qemu-img) against the server, over UNIX
/// and TCP.
@Suite(.serialized, .timeLimit(.minutes(2)))
struct QemuClientTests {
    @Test(arguments: [false, true])
    func qemuIOPatterns(tcp: Bool) async throws {
        try await withServer(tcp: tcp) { f in
            let backend = try f.addMemoryExport("disk")
            let uri = tcp ? f.tcpURI("disk") : f.uri("disk")
            let w = try await run(["qemu-io", "-f", "raw",
                                   "-c", "write -P 0x5a 0 64k",
                                   "-c", "write -P 0xa5 1M 4k",
                                   "-c", "write -f -P 0x11 2M 8k",
                                   "-c", "write -z 1M 2k",
                                   "-c", "write -z -u 16M 64k",
                                   "-c", "write -z -n 17M 64k",
                                   "-c", "discard 4M 1M",
                                   "-c", "flush",
                                   "-c", "aio_write -P 0x21 8M 4k",
                                   "-c", "aio_write -P 0x22 8392704 4k",
                                   "-c", "aio_write -P 0x23 8396800 4k",
                                   "-c", "aio_flush", uri])
            #expect(w.status == 0, "\(w)")
            #expect(!w.stderr.contains("error") && !w.stdout.contains("error"), "\(w)")
            let r = try await run(["qemu-io", "-f", "raw", "-r",
                                   "-c", "read -P 0x5a 0 64k",
                                   "-c", "read -P 0 1M 2k",
                                   "-c", "read -P 0xa5 1050624 2k",
                                   "-c", "read -P 0x11 2M 8k",
                                   "-c", "read -P 0 4M 1M",
                                   "-c", "read -P 0x21 8M 4k",
                                   "-c", "read -P 0x22 8392704 4k",
                                   "-c", "read -P 0x23 8396800 4k",
                                   "-c", "read -P 0 16M 128k", uri])
            #expect(r.status == 0, "\(r)")
            #expect(!r.stdout.contains("Pattern verification failed") && !r.stdout.contains("error"), "\(r)")
            #expect(backend.bytes(0, 4) == [0x5a, 0x5a, 0x5a, 0x5a])
            #expect(backend.flushCount >= 2)
            #expect(!backend.isAllocated(page: 1024))  // 4 MiB: discarded
        }
    }

    @Test func readOnlyExportRefusesWrites() async throws {
        try await withServer { f in
            try f.addMemoryExport("ro", writable: false)
            // QEMU's client sees NBD_FLAG_READ_ONLY and refuses a writable open.
            let w = try await run(["qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", f.uri("ro")])
            #expect(w.status != 0)
            #expect(w.stderr.contains("Could not open image: Permission denied"), "\(w)")
            let r = try await run(["qemu-io", "-f", "raw", "-r", "-c", "read -P 0 0 4k", f.uri("ro")])
            #expect(r.status == 0, "\(r)")
        }
    }

    @Test func qemuImgInfoConvertCompare() async throws {
        try await withServer { f in
            let backend = try f.addMemoryExport("disk", size: 32 << 20)
            backend.fill(0, 1 << 20, with: 0x42)
            backend.fill(5 << 20, 12345, with: 0x17)
            let info = try await run(["qemu-img", "info", "--output=json", f.uri("disk")])
            #expect(info.status == 0, "\(info)")
            #expect(info.stdout.contains("\"virtual-size\": 33554432"), "\(info)")
            let copy = f.dir.file("copy.raw")
            let c = try await run(["qemu-img", "convert", "-f", "raw", "-O", "raw", f.uri("disk"), copy])
            #expect(c.status == 0, "\(c)")
            let cmp = try await run(["qemu-img", "compare", "-f", "raw", "-F", "raw", f.uri("disk"), copy])
            #expect(cmp.status == 0, "\(cmp)")
            #expect(cmp.stdout.contains("Images are identical"), "\(cmp)")
            // And back: a qcow2 written into the export through convert -n.
            let src = f.dir.file("src.qcow2")
            _ = try await run(["qemu-img", "create", "-f", "qcow2", src, "32M"])
            _ = try await run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x66 3M 200k", src])
            let back = try await run(["qemu-img", "convert", "-n", "-f", "qcow2", "-O", "raw", src, f.uri("disk")])
            #expect(back.status == 0, "\(back)")
            let cmp2 = try await run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", src, f.uri("disk")])
            #expect(cmp2.status == 0, "\(cmp2)")
        }
    }
}
