import BlockCore
import BlockDrivers
import BlockGraph
import Foundation
import Testing

/// The same random sequence of writes, write-zeroes and discards applied
/// through Lamina (in process) and through qemu-io to twin images must give
/// identical content and clean checks.
@Suite("randomized differential against qemu-io")
struct DifferentialTests {
    struct Config: CustomStringConvertible, Sendable {
        var options: String
        var backing: Bool
        var seed: UInt64
        var description: String { "\(options)\(backing ? " +backing" : "") seed \(seed)" }
    }

    static let configs: [Config] = [
        Config(options: "cluster_size=65536", backing: false, seed: 1),
        Config(options: "cluster_size=65536", backing: true, seed: 2),
        Config(options: "cluster_size=4096,compat=0.10", backing: false, seed: 3),
        Config(options: "cluster_size=4096,compat=0.10", backing: true, seed: 4),
        Config(options: "cluster_size=512", backing: true, seed: 5),
        Config(options: "cluster_size=65536,extended_l2=on", backing: true, seed: 6),
        Config(options: "cluster_size=2M", backing: false, seed: 7),
        Config(options: "cluster_size=65536,lazy_refcounts=on", backing: false, seed: 8),
        Config(options: "cluster_size=16384,refcount_bits=1", backing: true, seed: 9),
    ]

    @Test("twin images stay identical", arguments: configs)
    func twins(config: Config) async throws {
        let dir = TempDir()
        let size: Int64 = 6 << 20
        var createArgs = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", config.options]
        if config.backing {
            let base = dir.file("base.qcow2")
            _ = try run(["qemu-img", "create", "-q", "-f", "qcow2", base, "5M"])
            _ = try run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xbb 0 5M", base])
            createArgs += ["-b", base, "-F", "qcow2"]
        }
        let a = dir.file("lamina.qcow2")
        let b = dir.file("qemu.qcow2")
        for img in [a, b] {
            let r = try run(createArgs + [img, String(size)])
            #expect(r.status == 0, "\(r.stderr)")
        }
        var rng = SeededRandom(seed: config.seed &* 0x9e37_79b9)
        var qemuCmds: [String] = []
        let node = try await openRW(a)
        for i in 0..<250 {
            let align: Int64 = Bool.random(using: &rng) ? 512 : 65536
            let off = Int64.random(in: 0..<(size / align), using: &rng) * align
            let maxLen = min(size - off, 300 * 1024)
            var len = Int64.random(in: 1...max(1, maxLen / 512), using: &rng) * 512
            len = min(len, size - off)
            let kind = Int.random(in: 0..<10, using: &rng)
            if kind < 6 {
                let pat = UInt8(truncatingIfNeeded: i + 1)
                let buf = AlignedBuffer(count: Int(len))
                memset(buf.pointer, Int32(pat), Int(len))
                try await node.write(at: off, from: UnsafeRawBufferPointer(buf.bytes))
                qemuCmds.append("write -P \(pat) \(off) \(len)")
            } else if kind < 8 {
                let unmap = kind == 7
                try await node.writeZeroes(at: off, length: len, flags: unmap ? [.mayUnmap] : [])
                qemuCmds.append("write -z\(unmap ? " -u" : "") \(off) \(len)")
            } else {
                try await node.discard(at: off, length: len)
                qemuCmds.append("discard \(off) \(len)")
            }
        }
        try await node.close()
        // qemu-io in batches (argument lists stay short).
        for chunk in stride(from: 0, to: qemuCmds.count, by: 50) {
            var args = ["qemu-io", "-f", "qcow2"]
            for c in qemuCmds[chunk..<min(chunk + 50, qemuCmds.count)] { args += ["-c", c] }
            args.append(b)
            let r = try run(args)
            #expect(r.status == 0, "\(r.stderr)")
        }
        let cmp = try run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", a, b])
        #expect(cmp.status == 0, "\(config): \(cmp.stdout)\(cmp.stderr)")
        for img in [a, b] {
            let chk = try run(["qemu-img", "check", img])
            #expect(chk.status == 0, "\(img): \(chk.stdout)\(chk.stderr)")
        }
    }
}
