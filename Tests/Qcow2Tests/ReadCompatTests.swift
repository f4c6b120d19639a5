import BlockCore
import BlockDrivers
import BlockGraph
import Foundation
import Testing

/// Images made by the real qemu-img / qemu-io read back identically through Lamina.
@Suite("qemu-made images read through Lamina")
struct ReadCompatTests {
    /// Reads the whole guest content through Lamina and compares it with
    /// `qemu-img convert -O raw` of the same image.
    static func assertSameContent(_ image: String, _ dir: TempDir, sourceLocation: SourceLocation = #_sourceLocation) async throws {
        let ref = dir.file("ref-\(UUID().uuidString).raw")
        let conv = try run(["qemu-img", "convert", "-O", "raw", image, ref])
        #expect(conv.status == 0, "\(conv.stderr)", sourceLocation: sourceLocation)
        let node = try await openRO(image)
        let size = Int(node.length)
        let mine = AlignedBuffer(count: size)
        // Read in odd-sized pieces to exercise partial clusters.
        var off = 0
        var step = 1
        while off < size {
            let n = min(size - off, 4096 * step + 512)
            try await node.read(at: Int64(off), into: mine.slice(off, n))
            off += n
            step = step % 37 + 1
        }
        try await node.close()
        let theirs = try Data(contentsOf: URL(fileURLWithPath: ref))
        #expect(theirs.count == size, sourceLocation: sourceLocation)
        let same = theirs.withUnsafeBytes { memcmp($0.baseAddress!, mine.pointer, min(size, theirs.count)) == 0 }
        #expect(same, "content of \(image) differs", sourceLocation: sourceLocation)
    }

    static func qemuIO(_ image: String, _ cmds: [String], format: String = "qcow2") throws {
        var args = ["qemu-io", "-f", format]
        for c in cmds { args += ["-c", c] }
        args.append(image)
        let r = try run(args)
        #expect(r.status == 0 && !r.stdout.contains("error") && !r.stderr.contains("error"), "\(args): \(r.stdout)\(r.stderr)")
    }

    static let pattern = [
        "write -P 0x11 0 4k", "write -P 0x22 70k 10k", "write -z 200k 64k", "write -P 0x33 300k 200k",
        "write -P 0x44 1000k 1k", "discard 300k 128k", "write -P 0x55 2040k 8k",
    ]

    @Test("every cluster size and compat level", arguments: [512, 1024, 4096, 65536, 1 << 20, 2 << 20], ["0.10", "1.1"])
    func clusterSizes(clusterSize: Int, compat: String) async throws {
        let dir = TempDir()
        let img = dir.file("c.qcow2")
        let c = try run(["qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=\(clusterSize),compat=\(compat)", img, "3M"])
        #expect(c.status == 0, "\(c.stderr)")
        try Self.qemuIO(img, Self.pattern)
        try await Self.assertSameContent(img, dir)
    }

    @Test("compressed clusters", arguments: ["zlib", "zstd"])
    func compressed(type: String) async throws {
        let dir = TempDir()
        let src = dir.file("src.qcow2")
        let img = dir.file("z.qcow2")
        _ = try run(["qemu-img", "create", "-f", "qcow2", src, "4M"])
        try Self.qemuIO(src, ["write -P 0x61 0 1M", "write -P 0x62 1536k 512k", "write -P 0x63 3M 4k"])
        let conv = try run(["qemu-img", "convert", "-c", "-O", "qcow2", "-o", "compression_type=\(type)", src, img])
        #expect(conv.status == 0, "\(conv.stderr)")
        // Also compressed writes through qemu-io with several cluster sizes.
        try await Self.assertSameContent(img, dir)
        for cs in [4096, 65536, 1 << 20] {
            let img2 = dir.file("z\(cs).qcow2")
            _ = try run(["qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=\(cs),compression_type=\(type)", img2, "8M"])
            try Self.qemuIO(img2, ["write -c -P 0x71 0 \(cs)", "write -c -P 0x72 \(2 * cs) \(cs)", "write -P 0x73 \(4 * cs) 512"])
            try await Self.assertSameContent(img2, dir)
        }
    }

    @Test("extended L2 entries with partial subcluster writes", arguments: [16384, 65536, 2 << 20])
    func extendedL2(clusterSize: Int) async throws {
        let dir = TempDir()
        let base = dir.file("base.qcow2")
        let img = dir.file("e.qcow2")
        _ = try run(["qemu-img", "create", "-f", "qcow2", base, "6M"])
        try Self.qemuIO(base, ["write -P 0xb1 0 6M"])
        _ = try run(["qemu-img", "create", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=\(clusterSize)",
                     "-b", base, "-F", "qcow2", img])
        let sc = clusterSize / 32
        try Self.qemuIO(img, ["write -P 0xe1 0 \(sc)", "write -P 0xe2 \(3 * sc + 100) 700", "write -z \(8 * sc) \(2 * sc)",
                              "discard \(clusterSize) \(clusterSize)", "write -P 0xe3 \(2 * clusterSize + 5 * sc) \(sc * 3)"])
        try await Self.assertSameContent(img, dir)
    }

    @Test("backing chain of depth 20 with data in every layer")
    func deepChain() async throws {
        let dir = TempDir()
        var prev: String?
        for i in 0..<20 {
            let img = dir.file("l\(i).qcow2")
            var args = ["qemu-img", "create", "-f", "qcow2"]
            if let p = prev { args += ["-b", "l\(i - 1).qcow2", "-F", "qcow2"] ; _ = p }
            args += [img, "4M"]
            let c = try run(args)
            #expect(c.status == 0, "\(c.stderr)")
            try Self.qemuIO(img, ["write -P \(i + 1) \(i * 150)k 100k", "write -z \((i * 37) % 3000)k 10k"])
            prev = img
        }
        try await Self.assertSameContent(prev!, dir)
    }

    @Test("a raw backing file shorter than the overlay")
    func shortBacking() async throws {
        let dir = TempDir()
        let base = dir.file("b.raw")
        let top = dir.file("t.qcow2")
        _ = try run(["qemu-img", "create", "-f", "raw", base, "1M"])
        try Self.qemuIO(base, ["write -P 0x5a 0 1M"], format: "raw")
        _ = try run(["qemu-img", "create", "-f", "qcow2", "-b", base, "-F", "raw", top, "3M"])
        try Self.qemuIO(top, ["write -P 0x5b 900k 300k"])
        try await Self.assertSameContent(top, dir)
    }
}
