import BlockCore
import BlockDrivers
import BlockGraph
import Foundation
import Qcow2
import Testing

@Suite("qcow2 engine against qemu-img")
struct EngineTests {
    @Test("random writes, zeroes and discards match a raw twin; check is clean",
          arguments: [(65536, UInt32(3)), (512, UInt32(3)), (4096, UInt32(2)), (2 << 20, UInt32(3))])
    func randomOps(clusterSize: Int, version: UInt32) async throws {
        let dir = TempDir()
        let q = dir.file("a.qcow2")
        let r = dir.file("a.raw")
        let size: Int64 = clusterSize >= 1 << 20 ? 64 << 20 : 4 << 20
        var o = Qcow2CreateOptions()
        o.size = size
        o.clusterSize = clusterSize
        o.version = version
        try await ImageCreator.createQcow2(path: q, options: o)
        try await ImageCreator.createRaw(path: r, size: size, preallocation: .off)
        let qn = try await openRW(q)
        let rn = try await openRW(r, format: "raw")
        var rng = SeededRandom(seed: UInt64(clusterSize) &* 31 &+ UInt64(version))
        for step in 0..<300 {
            let off = Int64.random(in: 0..<size, using: &rng) & ~511
            let len = min(Int64.random(in: 1...(Int64(clusterSize) * 3), using: &rng), size - off)
            let op = Int.random(in: 0..<10, using: &rng)
            if op < 7 {
                let buf = AlignedBuffer(count: Int(len))
                fill(buf, pattern: UInt8(truncatingIfNeeded: step + 1))
                try await qn.write(at: off, from: UnsafeRawBufferPointer(buf.bytes))
                try await rn.write(at: off, from: UnsafeRawBufferPointer(buf.bytes))
            } else if op < 9 {
                try await qn.writeZeroes(at: off, length: len, flags: op == 7 ? [.mayUnmap] : [])
                try await rn.writeZeroes(at: off, length: len)
            } else {
                // Discard reads back as zeroes here (no backing file, v3), so
                // mirror it as zeroes in the raw twin only where whole clusters go.
                let cs = Int64(clusterSize)
                let s = alignUp(off, cs)
                let e = alignDown(off + len, cs)
                if version >= 3 && e > s {
                    try await qn.discard(at: s, length: e - s)
                    try await rn.writeZeroes(at: s, length: e - s)
                }
            }
        }
        // Read back and compare in memory.
        let a = AlignedBuffer(count: Int(size))
        let b = AlignedBuffer(count: Int(size))
        try await qn.read(at: 0, into: a.bytes)
        try await rn.read(at: 0, into: b.bytes)
        #expect(memcmp(a.pointer, b.pointer, Int(size)) == 0)
        try await qn.close()
        try await rn.close()
        let check = try run(["qemu-img", "check", q])
        #expect(check.status == 0, "\(check.stdout)\(check.stderr)")
        let cmp = try run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", q, r])
        #expect(cmp.status == 0, "\(cmp.stdout)\(cmp.stderr)")
    }
}
