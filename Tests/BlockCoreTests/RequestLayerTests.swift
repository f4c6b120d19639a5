import BlockCore
import BlockGraph
import BlockIO
import Synchronization
import Testing

/// A gate a test opens: `wait()` suspends until `open()`.
final class TestGate: Sendable {
    private let state = Mutex<(open: Bool, waiters: [UnsafeContinuation<Void, Never>], arrived: Int)>((false, [], 0))

    func wait() async {
        await withUnsafeContinuation { (c: UnsafeContinuation<Void, Never>) in
            let now = state.withLock { s -> Bool in
                s.arrived += 1
                if s.open { return true }
                s.waiters.append(c)
                return false
            }
            if now { c.resume() }
        }
    }

    var arrived: Int { state.withLock { $0.arrived } }

    func open() {
        let w = state.withLock { s -> [UnsafeContinuation<Void, Never>] in
            s.open = true
            defer { s.waiters = [] }
            return s.waiters
        }
        w.forEach { $0.resume() }
    }
}

/// A format driver with a backing file and 4 KiB clusters: unallocated
/// clusters read from the backing node; writes allocate. Reads of the
/// backing can be held at a gate (to catch a copy-on-read half-way).
final class OverlayDriver: BackingDriver, DriverInfoProvider, @unchecked Sendable {
    static let cluster = 4096
    let size: Int64
    private let backingBox = Mutex<BlockChild?>(nil)
    private let state: Mutex<(data: [UInt8], allocated: [Bool], writes: [(Int64, Int64)])>
    let backingGate = Mutex<TestGate?>(nil)

    init(size: Int64) {
        self.size = size
        state = Mutex(([UInt8](repeating: 0, count: Int(size)),
                       [Bool](repeating: false, count: Int(size) / Self.cluster), []))
    }

    var formatName: String { "overlay" }
    var length: Int64 { size }
    var supportsBacking: Bool { true }
    var children: [BlockChild] { backingBox.withLock { $0.map { [$0] } ?? [] } }
    var backingFileName: String? { nil }
    var backingFormat: String? { nil }
    func setBackingChild(_ child: BlockChild?) { backingBox.withLock { $0 = child } }
    func changeBackingFile(_ name: String?, format: String?) async throws(BlockError) {}
    func backingChangeErrno(_ name: String?, format: String?) async -> Int32 { 0 }
    func driverInfo() async -> BlockDriverInfo {
        BlockDriverInfo(clusterSize: Self.cluster, isDirty: false, supportsZeroClusters: true)
    }

    var writes: [(Int64, Int64)] { state.withLock { $0.writes } }
    func bytes(_ offset: Int, _ count: Int) -> [UInt8] { state.withLock { Array($0.data[offset..<(offset + count)]) } }
    func isAllocated(_ cluster: Int) -> Bool { state.withLock { $0.allocated[cluster] } }

    func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws(BlockError) {
        var pos = offset
        while pos < offset + Int64(buffer.count) {
            let c = Int(pos) / Self.cluster
            let end = min(Int64(c + 1) * Int64(Self.cluster), offset + Int64(buffer.count))
            let dst = UnsafeMutableRawBufferPointer(rebasing: buffer[Int(pos - offset)..<Int(end - offset)])
            if state.withLock({ $0.allocated[c] }) {
                state.withLock { s in s.data.withUnsafeBytes { dst.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[Int(pos)..<Int(end)])) } }
            } else if let b = backingBox.withLock({ $0?.node }) {
                if let g = backingGate.withLock({ $0 }) { await g.wait() }
                try await b.read(at: pos, into: dst)
            } else {
                dst.initializeMemory(as: UInt8.self, repeating: 0)
            }
            pos = end
        }
    }

    func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws(BlockError) {
        await Task.yield()
        state.withLock { s in
            s.writes.append((offset, Int64(buffer.count)))
            s.data.withUnsafeMutableBytes {
                UnsafeMutableRawBufferPointer(rebasing: $0[Int(offset)..<(Int(offset) + buffer.count)]).copyMemory(from: buffer)
            }
            for c in (Int(offset) / Self.cluster)...((Int(offset) + buffer.count - 1) / Self.cluster) { s.allocated[c] = true }
        }
    }

    func writeZeroes(at offset: Int64, length: Int64, flags: WriteFlags) async throws(BlockError) {
        let z = AlignedBuffer(count: Int(length), zeroed: true)
        try await write(at: offset, from: UnsafeRawBufferPointer(z.bytes), flags: flags)
    }

    func discard(at offset: Int64, length: Int64) async throws(BlockError) {}
    func flush() async throws(BlockError) {}

    func blockStatus(at offset: Int64, length: Int64) async throws(BlockError) -> BlockStatus {
        let c0 = Int(offset) / Self.cluster
        let allocated = state.withLock { $0.allocated[c0] }
        var c = c0 + 1
        while Int64(c * Self.cluster) < offset + length && state.withLock({ $0.allocated[c] }) == allocated { c += 1 }
        let n = min(Int64(c * Self.cluster), offset + length) - offset
        return BlockStatus(flags: allocated ? [.data] : [], length: n)
    }

    func close() async throws(BlockError) {}
}

private func filled(_ node: BlockNode, _ offset: Int64, _ count: Int, _ byte: UInt8) async throws(BlockError) {
    let b = AlignedBuffer(count: count)
    b.bytes.initializeMemory(as: UInt8.self, repeating: byte)
    try await node.write(at: offset, from: UnsafeRawBufferPointer(b.bytes))
}

@Suite("Generic request layer: serialisation, copy-on-read, limits")
struct RequestLayerTests {
    func chain() async throws -> (BlockNode, OverlayDriver, MemDriver) {
        let mem = MemDriver(size: 64 << 10, yields: false, fill: 0xbb)
        let base = BlockNode(driver: mem, filename: "base", readOnly: true)
        let d = OverlayDriver(size: 64 << 10)
        let top = BlockNode(driver: d, filename: "top", readOnly: false)
        top.setBacking(base)
        return (top, d, mem)
    }

    @Test("copy-on-read copies the clusters the layer does not allocate, whole clusters, and leaves allocated ones")
    func copyOnRead() async throws {
        let (top, d, _) = try await chain()
        try await filled(top, 8192, 4096, 0xaa)
        let out = AlignedBuffer(count: 6000)
        try await top.read(at: 6000, into: out.bytes, flags: [.copyOnRead])
        // 6000..<12000: clusters 1 (copied, whole) and 2 (allocated).
        #expect(Array(out.bytes[0..<(8192 - 6000)]).allSatisfy { $0 == 0xbb })
        #expect(Array(out.bytes[(8192 - 6000)..<6000]).allSatisfy { $0 == 0xaa })
        #expect(d.isAllocated(1) && !d.isAllocated(0) && !d.isAllocated(3))
        #expect(d.bytes(4096, 4096).allSatisfy { $0 == 0xbb } && d.bytes(8192, 4096).allSatisfy { $0 == 0xaa })
        // A prefetch of the rest copies without returning data.
        try await top.prefetch(at: 0, length: 64 << 10)
        #expect((0..<16).allSatisfy { d.isAllocated($0) })
        #expect(d.bytes(8192, 4096).allSatisfy { $0 == 0xaa })
    }

    @Test("a guest write to a cluster being copied-on-read waits for the copy: the guest's data wins")
    func corSerialisesWrites() async throws {
        let (top, d, _) = try await chain()
        let gate = TestGate()
        d.backingGate.withLock { $0 = gate }
        let cor = Task {
            let b = AlignedBuffer(count: 512)
            try await top.read(at: 100, into: b.bytes, flags: [.copyOnRead])
        }
        // The copy is half-way: it has read nothing from the backing yet.
        while gate.arrived == 0 { await Task.yield() }
        let write = Task { try await filled(top, 1000, 100, 0xcc) }
        for _ in 0..<200 { await Task.yield() }
        #expect(d.writes.isEmpty, "the guest write went ahead of the copy-on-read of its cluster")
        gate.open()
        try await cor.value
        try await write.value
        #expect(d.bytes(1000, 100).allSatisfy { $0 == 0xcc })
        #expect(d.bytes(0, 1000).allSatisfy { $0 == 0xbb })
        #expect(d.writes.count == 2 && d.writes[0] == (0, 4096))
    }

    @Test("a write elsewhere does not wait for a copy-on-read")
    func corLetsOthersPass() async throws {
        let (top, d, _) = try await chain()
        let gate = TestGate()
        d.backingGate.withLock { $0 = gate }
        let cor = Task {
            let b = AlignedBuffer(count: 512)
            try await top.read(at: 100, into: b.bytes, flags: [.copyOnRead])
        }
        while gate.arrived == 0 { await Task.yield() }
        try await filled(top, 20000, 100, 0xcc)
        #expect(d.writes.count == 1)
        gate.open()
        try await cor.value
    }

    @Test("requests are split by the limits of the node and of its data children")
    func limits() async throws {
        final class Limited: BlockDriver, @unchecked Sendable {
            let inner: MemDriver
            init(_ m: MemDriver) { inner = m }
            var formatName: String { "limited" }
            var length: Int64 { inner.length }
            var children: [BlockChild] { [] }
            var limits: BlockLimits { BlockLimits(maxTransfer: 8192, maxWriteZeroes: 16384, maxDiscard: 4096) }
            func read(at o: Int64, into b: UnsafeMutableRawBufferPointer) async throws(BlockError) { try await inner.read(at: o, into: b) }
            func write(at o: Int64, from b: UnsafeRawBufferPointer, flags: WriteFlags) async throws(BlockError) {
                try await inner.write(at: o, from: b, flags: flags)
            }
            func writeZeroes(at o: Int64, length: Int64, flags: WriteFlags) async throws(BlockError) {
                try await inner.writeZeroes(at: o, length: length, flags: flags)
            }
            func discard(at o: Int64, length: Int64) async throws(BlockError) { try await inner.discard(at: o, length: length) }
            func flush() async throws(BlockError) {}
            func blockStatus(at o: Int64, length: Int64) async throws(BlockError) -> BlockStatus { BlockStatus(flags: [.data], length: length) }
            func close() async throws(BlockError) {}
        }
        let mem = MemDriver(size: 64 << 10)
        let node = BlockNode(driver: Limited(mem), filename: "l", readOnly: false)
        try await filled(node, 1000, 20000, 1)
        let b = AlignedBuffer(count: 30000)
        try await node.read(at: 0, into: b.bytes)
        try await node.writeZeroes(at: 0, length: 40000)
        try await node.discard(at: 0, length: 10000)
        let log = mem.log
        #expect(log.filter { $0.op == "write" }.map(\.length) == [8192, 8192, 3616])
        #expect(log.filter { $0.op == "read" }.map(\.length) == [8192, 8192, 8192, 5424])
        #expect(log.filter { $0.op == "zero" }.map(\.length) == [16384, 16384, 7232])
        #expect(log.filter { $0.op == "discard" }.map(\.length) == [4096, 4096, 1808])
        // A node over it inherits the child's limits (QEMU's bdrv_refresh_limits).
        let d = OverlayDriver(size: 64 << 10)
        let top = BlockNode(driver: d, filename: "t", readOnly: false)
        top.setBacking(node)
        #expect(top.limits.maxTransfer == 8192)
    }

    @Test("every write, zero write and discard marks the node's dirty bitmaps; copy-on-read does not")
    func dirtyBitmaps() async throws {
        let (top, _, _) = try await chain()
        let bm = DirtyBitmap(size: 64 << 10, granularity: 4096)
        top.addDirtyBitmap(bm)
        let b = AlignedBuffer(count: 100)
        try await top.read(at: 40000, into: b.bytes, flags: [.copyOnRead])
        #expect(bm.isClean)
        try await filled(top, 5000, 10, 1)
        try await top.writeZeroes(at: 16384, length: 4096)
        try await top.discard(at: 32768, length: 100)
        #expect(bm.dirtyBytes == 3 * 4096)
        top.removeDirtyBitmap(bm)
        try await filled(top, 50000, 10, 1)
        #expect(bm.dirtyBytes == 3 * 4096)
    }
}
