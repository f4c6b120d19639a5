#if canImport(Glibc)
import Glibc
#endif
import BlockCore
import NBDServer
import ServerKit
import Synchronization

/// A sparse in-memory disk for tests and benchmarks: 4 KiB pages, each
/// allocated or a hole (reads as zeroes). `base:allocation` reports holes as
/// HOLE|ZERO; `qemu:allocation-depth` reports 1 for allocated pages and
/// `backingDepth(offset)` for holes (0 = unallocated, 2 = "from a backing
/// file"), so tests control it. Bitmaps record pages written since creation.
///
/// Thread-safety: all state behind one Mutex (tests may run connections on
/// several loops).
final class MemoryBackend: NBDBackend, @unchecked Sendable {
    static let page = 4096
    let size: Int64
    let executor: EventLoopExecutor
    let canMultiConn: Bool
    let requestAlignment: UInt32
    let backingDepth: @Sendable (Int64) -> UInt32

    struct State {
        var allocated: [Bool]
        var dirty: [String: Set<Int>]
        var flushes = 0
        var writes = 0
        var failReads: Range<Int64>?
    }

    let memory: UnsafeMutableRawPointer
    let state: Mutex<State>

    init(size: Int64, executor: EventLoopExecutor, canMultiConn: Bool = true, requestAlignment: UInt32 = 1,
         bitmaps: [String] = [], backingDepth: @escaping @Sendable (Int64) -> UInt32 = { _ in 0 }) {
        self.size = size
        self.executor = executor
        self.canMultiConn = canMultiConn
        self.requestAlignment = requestAlignment
        self.backingDepth = backingDepth
        let pages = Int((size + Int64(Self.page) - 1) / Int64(Self.page))
        memory = UnsafeMutableRawPointer.allocate(byteCount: pages * Self.page, alignment: 4096)
        memset(memory, 0, pages * Self.page)
        var dirty: [String: Set<Int>] = [:]
        for b in bitmaps { dirty[b] = [] }
        state = Mutex(State(allocated: Array(repeating: false, count: pages), dirty: dirty))
    }

    deinit { memory.deallocate() }

    var flushCount: Int { state.withLock { $0.flushes } }
    var writeCount: Int { state.withLock { $0.writes } }

    /// Fill [offset, offset+count) with `byte`, allocating its pages.
    func fill(_ offset: Int64, _ count: Int, with byte: UInt8) {
        state.withLock { s in
            memset(memory + Int(offset), Int32(byte), count)
            markAllocated(&s, offset, Int64(count))
        }
    }

    func failReads(in range: Range<Int64>?) { state.withLock { $0.failReads = range } }

    func bytes(_ offset: Int64, _ count: Int) -> [UInt8] {
        state.withLock { _ in Array(UnsafeRawBufferPointer(start: memory + Int(offset), count: count)) }
    }

    func isAllocated(page: Int) -> Bool { state.withLock { $0.allocated[page] } }

    private func markAllocated(_ s: inout State, _ offset: Int64, _ length: Int64) {
        guard length > 0 else { return }
        let first = Int(offset / Int64(Self.page)), last = Int((offset + length - 1) / Int64(Self.page))
        for p in first...last {
            s.allocated[p] = true
            for k in s.dirty.keys { s.dirty[k]!.insert(p) }
        }
    }

    func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws(BlockError) {
        try state.withLock { (s) throws(BlockError) in
            if let bad = s.failReads, bad.overlaps(offset..<(offset + Int64(buffer.count))) {
                throw BlockError.posix(EIO)
            }
            buffer.copyMemory(from: UnsafeRawBufferPointer(start: memory + Int(offset), count: buffer.count))
        }
    }

    func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, fua: Bool) async throws(BlockError) {
        state.withLock { s in
            (memory + Int(offset)).copyMemory(from: buffer.baseAddress!, byteCount: buffer.count)
            markAllocated(&s, offset, Int64(buffer.count))
            s.writes += 1
            if fua { s.flushes += 1 }
        }
    }

    func writeZeroes(at offset: Int64, length: Int64, mayTrim: Bool, fastZero: Bool, fua: Bool) async throws(BlockError) {
        state.withLock { s in
            memset(memory + Int(offset), 0, Int(length))
            if mayTrim { deallocate(&s, offset, length) }
            markPartial(&s, offset, length, allocateAll: !mayTrim)
        }
    }

    func trim(at offset: Int64, length: Int64, fua: Bool) async throws(BlockError) {
        state.withLock { s in
            memset(memory + Int(offset), 0, Int(length))
            deallocate(&s, offset, length)
        }
    }

    /// Pages entirely inside the range become holes.
    private func deallocate(_ s: inout State, _ offset: Int64, _ length: Int64) {
        let p = Int64(Self.page)
        var first = (offset + p - 1) / p
        let end = (offset + length) / p
        while first < end {
            s.allocated[Int(first)] = false
            first += 1
        }
    }

    /// Pages partly covered (or all, when not trimming) stay/become data.
    private func markPartial(_ s: inout State, _ offset: Int64, _ length: Int64, allocateAll: Bool) {
        guard length > 0 else { return }
        if allocateAll { markAllocated(&s, offset, length); return }
        let p = Int64(Self.page)
        if offset % p != 0 { markAllocated(&s, offset, 1) }
        if (offset + length) % p != 0 { markAllocated(&s, offset + length - 1, 1) }
    }

    func flush() async throws(BlockError) { state.withLock { $0.flushes += 1 } }

    func cache(at offset: Int64, length: Int64) async throws(BlockError) {}

    func blockStatus(_ context: NBDMetaContextKind, at offset: Int64, length: Int64) async throws(BlockError) -> [NBDExtent] {
        state.withLock { s in
            var out: [NBDExtent] = []
            var pos = offset
            let end = offset + length
            while pos < end && out.count < 64 {
                let page = Int(pos / Int64(Self.page))
                let next = min(end, Int64(page + 1) * Int64(Self.page))
                let flags: UInt32
                switch context {
                case .baseAllocation: flags = s.allocated[page] ? 0 : 3
                case .allocationDepth: flags = s.allocated[page] ? 1 : backingDepth(pos)
                case .dirtyBitmap(let name): flags = s.dirty[name]?.contains(page) == true ? 1 : 0
                }
                out.append(NBDExtent(length: UInt32(next - pos), flags: flags))
                pos = next
            }
            return out
        }
    }

    func zeroRun(at offset: Int64, length: Int64) async throws(BlockError) -> (isZero: Bool, length: Int64) {
        state.withLock { s in
            let p = Int64(Self.page)
            let zero = !s.allocated[Int(offset / p)]
            var pos = offset
            let end = offset + length
            while pos < end && s.allocated[Int(pos / p)] != zero {
                pos = min(end, (pos / p + 1) * p)
            }
            return (zero, pos - offset)
        }
    }
}
