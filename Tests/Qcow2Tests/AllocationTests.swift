import BlockCore
import BlockDrivers
import BlockGraph
import BlockIO
import Foundation
import Qcow2
import Testing

@Suite("allocation, refcount growth and concurrency")
struct AllocationTests {
    @Test("refcount table growth with small clusters and narrow refcounts", arguments: [(512, 16), (512, 1), (1024, 64), (4096, 2)])
    func refcountGrowth(clusterSize: Int, refcountBits: Int) async throws {
        let dir = TempDir()
        let q = dir.file("g.qcow2")
        var o = Qcow2CreateOptions()
        o.size = 48 << 20
        o.clusterSize = clusterSize
        o.refcountBits = refcountBits
        try await ImageCreator.createQcow2(path: q, options: o)
        let n = try await openRW(q)
        let chunk = AlignedBuffer(count: 1 << 20)
        for i in 0..<48 {
            fill(chunk, pattern: UInt8(i + 1))
            try await n.write(at: Int64(i) << 20, from: UnsafeRawBufferPointer(chunk.bytes))
        }
        try await n.close()
        let check = try run(["qemu-img", "check", q])
        #expect(check.status == 0, "\(check.stdout)\(check.stderr)")
        // Content: each MiB holds its pattern.
        let r = try await openRO(q)
        for i in [0, 17, 47] {
            try await r.read(at: Int64(i) << 20, into: chunk.bytes)
            #expect(chunk.bytes.allSatisfy { $0 == UInt8(i + 1) })
        }
        try await r.close()
    }

    @Test("concurrent overlapping writers leave a consistent image")
    func concurrentWriters() async throws {
        let dir = TempDir()
        let q = dir.file("c.qcow2")
        let base = dir.file("b.qcow2")
        _ = try run(["qemu-img", "create", "-f", "qcow2", base, "8M"])
        _ = try run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x99 0 8M", base])
        _ = try run(["qemu-img", "create", "-f", "qcow2", "-b", base, "-F", "qcow2", q])
        let node = try await openRW(q)
        let pool = IOThreadPoolBox.shared
        // Eight tasks write 4 KiB blocks; every block belongs to one task, but
        // tasks share clusters, so allocations race on the same clusters.
        try await withThrowingTaskGroup(of: Void.self) { group in
            for t in 0..<8 {
                group.addTask(executorPreference: pool[t]) {
                    let buf = AlignedBuffer(count: 4096)
                    memset(buf.pointer, Int32(t + 1), 4096)
                    for blk in stride(from: t, to: 2048, by: 8) {
                        try await node.write(at: Int64(blk) * 4096, from: UnsafeRawBufferPointer(buf.bytes))
                    }
                }
            }
            try await group.waitForAll()
        }
        let all = AlignedBuffer(count: 8 << 20)
        try await node.read(at: 0, into: all.bytes)
        for blk in 0..<2048 {
            let expected = UInt8(blk % 8 + 1)
            #expect(all.slice(blk * 4096, 4096).allSatisfy { $0 == expected }, "block \(blk)")
        }
        try await node.close()
        let check = try run(["qemu-img", "check", q])
        #expect(check.status == 0, "\(check.stdout)\(check.stderr)")
    }
}
