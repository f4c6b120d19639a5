import BlockCore
import BlockDrivers
import BlockGraph
import Foundation
import Qcow2
import Testing

/// Internal snapshots inside one open session: the in-memory state (L1,
/// cached L2 tables, allocator, snapshot list) stays consistent with the
/// file while guest writes, snapshot creation, apply and delete
/// interleave; qemu-img then finds the image clean and every snapshot
/// intact.
@Suite("qcow2 internal snapshots in one session")
struct SnapshotEngineTests {
    @Test("random writes interleaved with create / apply / delete",
          arguments: [(65536, false), (512, false), (16384, true), (2 << 20, false)])
    func interleaved(clusterSize: Int, extendedL2: Bool) async throws {
        let dir = TempDir()
        let path = dir.file("s.qcow2")
        let size: Int64 = clusterSize >= 1 << 20 ? 32 << 20 : 4 << 20
        var o = Qcow2CreateOptions()
        o.size = size
        o.clusterSize = clusterSize
        o.extendedL2 = extendedL2
        try await ImageCreator.createQcow2(path: path, options: o)
        let node = try await openRW(path)
        let q = try #require(node.driver as? Qcow2Image)
        var model = [UInt8](repeating: 0, count: Int(size))
        var saved: [String: [UInt8]] = [:]
        var rng = SeededRandom(seed: UInt64(clusterSize) &+ (extendedL2 ? 7 : 0))
        var counter = 0

        func same() async throws -> Bool {
            let b = AlignedBuffer(count: Int(size))
            try await node.read(at: 0, into: b.bytes)
            return model.withUnsafeBytes { memcmp($0.baseAddress!, b.pointer, Int(size)) == 0 }
        }

        for step in 0..<160 {
            let op = Int.random(in: 0..<20, using: &rng)
            if op < 13 {
                let off = Int64.random(in: 0..<size, using: &rng) & ~511
                let len = min(Int64.random(in: 1...(Int64(clusterSize) * 2), using: &rng), size - off)
                let len512 = max(512, len & ~511)
                let n = min(len512, size - off)
                let buf = AlignedBuffer(count: Int(n))
                let pattern = UInt8(truncatingIfNeeded: step + 1)
                memset(buf.pointer, Int32(pattern), Int(n))
                if op < 11 {
                    try await node.write(at: off, from: UnsafeRawBufferPointer(buf.bytes))
                    model.withUnsafeMutableBytes { _ = memset($0.baseAddress! + Int(off), Int32(pattern), Int(n)) }
                } else {
                    try await node.writeZeroes(at: off, length: n, flags: op == 11 ? [.mayUnmap] : [])
                    model.withUnsafeMutableBytes { _ = memset($0.baseAddress! + Int(off), 0, Int(n)) }
                }
            } else if op < 16 {
                counter += 1
                let name = "s\(counter)"
                try await q.createSnapshot(name: name, dateSec: 1, dateNsec: 0)
                saved[name] = model
            } else if op < 18 {
                guard let name = saved.keys.sorted().randomElement(using: &rng) else { continue }
                try await q.applySnapshot(name)
                model = saved[name]!
            } else {
                guard let name = saved.keys.sorted().randomElement(using: &rng) else { continue }
                let sn = try #require(await q.snapshotList().first { $0.name == name })
                try await q.deleteSnapshot(id: sn.id, name: sn.name)
                saved[name] = nil
            }
            if step % 10 == 0 || op >= 13 {
                #expect(try await same(), "step \(step): content differs")
            }
        }
        #expect(try await same())
        try await node.close()

        let check = try run(["qemu-img", "check", path])
        #expect(check.status == 0 && check.stdout.contains("No errors were found") && !check.stdout.contains("leaked"),
                "\(check.stdout)\(check.stderr)")
        let active = dir.file("active.raw")
        #expect(try run(["qemu-img", "convert", "-O", "raw", path, active]).status == 0)
        #expect(try Data(contentsOf: URL(fileURLWithPath: active)) == Data(model), "active content after reopen")
        for (name, content) in saved {
            let out = dir.file("\(name).raw")
            let c = try run(["qemu-img", "convert", "-l", "snapshot.name=\(name)", "-O", "raw", path, out])
            #expect(c.status == 0, "\(c.stderr)")
            #expect(try Data(contentsOf: URL(fileURLWithPath: out)) == Data(content), "snapshot \(name)")
        }
    }
}
