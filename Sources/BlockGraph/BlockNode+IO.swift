import BlockCore
import Synchronization

/// The generic request layer (QEMU's block/io.c): every request passes
/// here before its driver sees it — validation, tracking (for drained
/// sections and serialisation), alignment for O_DIRECT with serialised
/// read-modify-write, detect-zeroes, and dirty-bitmap marking.
extension BlockNode {
    // MARK: - Dirty tracking

    /// Bitmaps that every write, write-zeroes and discard through this
    /// node marks (QEMU's bdrv_set_dirty; jobs and, later, user bitmaps).
    public func addDirtyBitmap(_ b: DirtyBitmap) {
        dirtyBitmaps.withLock { $0.append(b) }
    }

    public func removeDirtyBitmap(_ b: DirtyBitmap) {
        dirtyBitmaps.withLock { $0.removeAll { $0 === b } }
    }

    @inline(__always)
    func markDirty(_ offset: Int64, _ length: Int64) {
        dirtyBitmaps.forEach { $0.mark(offset, length) }
    }

    // MARK: - Validation

    @inline(__always)
    private func check(_ offset: Int64, _ length: Int64, write: Bool) throws(BlockError) {
        if offset < 0 || length < 0 || offset > Int64.max - length {
            throw BlockError(.outOfRange, errno: 22, "Invalid request offset \(offset) length \(length)")
        }
        if write && readOnly {
            throw BlockError(.permissionDenied, errno: 1, "Block node is read-only")
        }
        if offset + length > driver.length && !driver.growable {
            throw BlockError(.outOfRange, errno: 5, "Request past the end of the node (offset \(offset), length \(length), size \(driver.length))")
        }
    }

    private func needsAlignment(_ offset: Int64, _ count: Int, _ base: UnsafeRawPointer?) -> Bool {
        let a = driver.requestAlignment
        let m = driver.memoryAlignment
        if a <= 1 && m <= 1 { return false }
        if offset % Int64(a) != 0 || count % a != 0 { return true }
        if let b = base, Int(bitPattern: b) % m != 0 { return true }
        return false
    }

    // MARK: - I/O

    /// Calls `body` for consecutive pieces of [offset, offset+length) of at
    /// most `max` bytes (0: one piece), QEMU's splitting by the limits.
    /// With `align` > 1 the limit is rounded down to it (as QEMU's) and
    /// pieces end on its multiples, so that each piece padded to the
    /// alignment still fits in the limit.
    @inline(__always)
    private func split(_ offset: Int64, _ length: Int64, _ max: Int64, align: Int64 = 1,
                       _ body: (Int64, Int64) async throws(BlockError) -> Void) async throws(BlockError) {
        if max <= 0 || (length <= max && (align <= 1 || alignUp(offset + length, align) - alignDown(offset, align) <= max)) {
            try await body(offset, length)
            return
        }
        let m = align > 1 ? Swift.max(alignDown(max, align), align) : max
        var done: Int64 = 0
        while done < length {
            let o = offset + done
            let n = Swift.min(align > 1 ? alignDown(o, align) + m - o : m, length - done)
            try await body(o, n)
            done += n
        }
    }

    /// Reads `buffer.count` bytes at `offset`. With `.copyOnRead`, what the
    /// node reads from its backing chain is also written into it (QEMU's
    /// BDRV_REQ_COPY_ON_READ).
    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer, flags: ReadFlags = []) async throws(BlockError) {
        try check(offset, Int64(buffer.count), write: false)
        if buffer.count == 0 { return }
        if flags.contains(.copyOnRead) && !readOnly {
            try await copyOnRead(offset, Int64(buffer.count), into: buffer)
            return
        }
        try await split(offset, Int64(buffer.count), limits.maxTransfer, align: Int64(driver.requestAlignment)) { (o, n) async throws(BlockError) in
            let piece = UnsafeMutableRawBufferPointer(rebasing: buffer[Int(o - offset)..<Int(o - offset + n)])
            let token = await requests.begin(o, n, serialising: false)
            defer { requests.end(token) }
            if needsAlignment(o, piece.count, piece.baseAddress) {
                try await alignedRead(o, piece)
            } else {
                try await driver.read(at: o, into: piece)
            }
        }
    }

    /// QEMU's BDRV_REQ_PREFETCH with copy-on-read: populates the node
    /// from its backing chain without returning the data (block-stream).
    public func prefetch(at offset: Int64, length: Int64) async throws(BlockError) {
        try check(offset, length, write: false)
        if length == 0 || readOnly { return }
        if let p = driver as? any PrefetchingDriver {
            try await p.prefetch(at: offset, length: length)
        } else if let c = filteredChild {
            try await c.node.prefetch(at: offset, length: length)
        } else {
            try await copyOnRead(offset, length, into: nil)
        }
    }

    /// QEMU's bdrv_co_do_copy_on_readv: the clusters covering the request
    /// are serialised against every other request; runs this layer does
    /// not allocate are read (through the backing chain) into a bounce
    /// buffer and written into the layer unchanged, allocated runs are read
    /// as they are. No dirty bitmap is marked: the data does not change.
    private func copyOnRead(_ offset: Int64, _ length: Int64,
                            into buffer: UnsafeMutableRawBufferPointer?) async throws(BlockError) {
        let cs = Int64(max(await driverInfo()?.clusterSize ?? 1, driver.requestAlignment, 1))
        let size = driver.length
        let start = alignDown(offset, cs)
        let end = Swift.min(alignUp(offset + length, cs), Swift.max(size, offset + length))
        let token = await requests.begin(start, end - start, serialising: true)
        defer { requests.end(token) }
        let maxIO = limits.maxTransfer > 0 ? Swift.min(limits.maxTransfer, Self.maxBounce) : Self.maxBounce
        var bounce: AlignedBuffer?
        var pos = start
        while pos < end {
            let st = try await blockStatus(at: pos, length: Swift.min(end - pos, maxIO))
            if st.length <= 0 { break }
            let n = Swift.min(st.length, end - pos)
            let lo = Swift.max(pos, offset), hi = Swift.min(pos + n, offset + length)
            if st.flags.contains(.allocated) {
                if let buffer, hi > lo {
                    let dst = UnsafeMutableRawBufferPointer(rebasing: buffer[Int(lo - offset)..<Int(hi - offset)])
                    try await driver.read(at: lo, into: dst)
                }
            } else {
                if bounce == nil { bounce = AlignedBuffer(count: Int(Swift.min(maxIO, end - start))) }
                let b = bounce!.slice(0, Int(n))
                try await driver.read(at: pos, into: b)
                debugEvent(.corWrite)
                if isZeroMemory(UnsafeRawPointer(b.baseAddress!), b.count) && pos % cs == 0 && n % cs == 0 {
                    try await driver.writeZeroes(at: pos, length: n, flags: [])
                } else {
                    try await driver.write(at: pos, from: UnsafeRawBufferPointer(b), flags: [])
                }
                if let buffer, hi > lo {
                    UnsafeMutableRawBufferPointer(rebasing: buffer[Int(lo - offset)..<Int(hi - offset)])
                        .copyMemory(from: UnsafeRawBufferPointer(bounce!.slice(Int(lo - pos), Int(hi - lo))))
                }
            }
            pos += n
        }
    }

    /// QEMU's MAX_BOUNCE_BUFFER.
    static let maxBounce: Int64 = 16 << 20

    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags = []) async throws(BlockError) {
        try check(offset, Int64(buffer.count), write: true)
        if buffer.count == 0 { return }
        if flags.contains(.compressed) && !driver.supportedWriteFlags.contains(.compressed) {
            throw BlockError.unsupported("Compression is not supported for this drive")
        }
        defer { markDirty(offset, Int64(buffer.count)) }
        if policy.detectZeroes != .off, let base = buffer.baseAddress, isZeroMemory(base, buffer.count) {
            var zflags = flags
            if policy.detectZeroes == .unmap { zflags.insert(.mayUnmap) }
            try await writeZeroes(at: offset, length: Int64(buffer.count), flags: zflags)
            return
        }
        try await split(offset, Int64(buffer.count), limits.maxTransfer, align: Int64(driver.requestAlignment)) { (o, n) async throws(BlockError) in
            let piece = UnsafeRawBufferPointer(rebasing: buffer[Int(o - offset)..<Int(o - offset + n)])
            if needsAlignment(o, piece.count, piece.baseAddress) {
                try await alignedWrite(o, piece, flags)
                return
            }
            let token = await requests.begin(o, n, serialising: false)
            defer { requests.end(token) }
            // QEMU's bdrv_aligned_pwritev events, on the node itself.
            debugEvent(.pwritev)
            defer { debugEvent(.pwritevDone) }
            try await driver.write(at: o, from: piece, flags: flags)
        }
    }

    public func writeZeroes(at offset: Int64, length: Int64, flags: WriteFlags = []) async throws(BlockError) {
        try check(offset, length, write: true)
        if length == 0 { return }
        defer { markDirty(offset, length) }
        var flags = flags
        if !policy.discardUnmap { flags.remove(.mayUnmap) }
        let a = Int64(driver.requestAlignment)
        if a > 1 && (offset % a != 0 || length % a != 0) {
            if flags.contains(.noFallback) { throw BlockError.unsupported("Unaligned zero write needs a fallback") }
            // Zero the unaligned head and tail with explicit writes.
            let headEnd = Swift.min(alignUp(offset, a), offset + length)
            let tailStart = Swift.max(alignDown(offset + length, a), headEnd)
            if headEnd > offset { try await writeZeroBuffer(offset, headEnd - offset, flags) }
            if tailStart > headEnd { try await driverWriteZeroes(headEnd, tailStart - headEnd, flags) }
            if offset + length > tailStart { try await writeZeroBuffer(tailStart, offset + length - tailStart, flags) }
            return
        }
        try await driverWriteZeroes(offset, length, flags)
    }

    private func driverWriteZeroes(_ offset: Int64, _ length: Int64, _ flags: WriteFlags) async throws(BlockError) {
        debugEvent(.pwritevZero)
        defer { debugEvent(.pwritevDone) }
        try await split(offset, length, limits.maxWriteZeroes) { (o, n) async throws(BlockError) in
            let token = await requests.begin(o, n, serialising: false)
            defer { requests.end(token) }
            try await driver.writeZeroes(at: o, length: n, flags: flags)
        }
    }

    private func writeZeroBuffer(_ offset: Int64, _ length: Int64, _ flags: WriteFlags) async throws(BlockError) {
        let buf = AlignedBuffer(count: Int(length), zeroed: true)
        try await write(at: offset, from: UnsafeRawBufferPointer(buf.bytes), flags: flags)
    }

    public func discard(at offset: Int64, length: Int64) async throws(BlockError) {
        try check(offset, length, write: true)
        if length == 0 || !policy.discardUnmap { return }
        defer { markDirty(offset, length) }
        try await split(offset, length, limits.maxDiscard) { (o, n) async throws(BlockError) in
            let token = await requests.begin(o, n, serialising: false)
            defer { requests.end(token) }
            try await driver.discard(at: o, length: n)
        }
    }

    /// QEMU's bdrv_debug_event on this node (a parent driver's event;
    /// only blkdebug does something with it).
    @inline(__always)
    public func debugEvent(_ event: BlkdebugEvent) {
        driver.debugEvent(event)
    }

    public func flush() async throws(BlockError) {
        if readOnly { return }
        requests.enterUntracked()
        defer { requests.leaveUntracked() }
        try await driver.flush()
    }

    /// Starts writeback without waiting (see `BlockDriver.startWriteback`).
    public func startWriteback() async {
        if readOnly { return }
        await driver.startWriteback()
    }

    public func truncate(to length: Int64, preallocation: Preallocation = .off) async throws(BlockError) {
        if readOnly { throw BlockError(.permissionDenied, errno: 1, "Block node is read-only") }
        requests.enterUntracked()
        defer { requests.leaveUntracked() }
        try await driver.truncate(to: length, preallocation: preallocation)
    }

    /// This layer's status (QEMU `bdrv_co_block_status`, want_zero=true):
    /// `allocated` is derived here from data|zero; a `recurse` answer is
    /// refined by asking the host node whether the range is a hole.
    public func blockStatus(at offset: Int64, length: Int64) async throws(BlockError) -> BlockStatus {
        let size = driver.length
        if offset >= size {
            return BlockStatus(flags: [.eof], length: 0)
        }
        let want = min(length, size - offset)
        if filteredChild != nil {
            // A filter answers what its filtered child answers (its driver
            // asks the child; blkdebug may fail the request first).
            return try await driver.blockStatus(at: offset, length: want)
        }
        var st = try await driver.blockStatus(at: offset, length: want)
        if st.length > want { st.length = want }
        if st.length <= 0 { st.length = min(want, 1) }
        if !st.flags.isDisjoint(with: [.data, .zero]) { st.flags.insert(.allocated) }
        if st.flags.contains(.recurse), st.flags.contains(.offsetValid), let host = st.hostNode {
            st.flags.remove(.recurse)
            if !st.flags.contains(.zero) {
                let hs = try await host.blockStatus(at: st.hostOffset, length: st.length)
                if hs.flags.contains(.eof) && hs.length == 0 {
                    // Past the end of the host file: reads as zeroes.
                    st.flags.insert(.zero)
                } else {
                    if hs.length < st.length { st.length = hs.length }
                    if hs.flags.contains(.zero) { st.flags.insert(.zero) }
                }
            }
        }
        st.flags.remove(.recurse)
        if !st.flags.contains(.allocated) && driver.supportsBacking {
            // Unallocated: zeroes unless a backing node provides the data.
            if let b = backing {
                if offset >= b.length { st.flags.insert(.zero) }
            } else {
                st.flags.insert(.zero)
            }
        }
        if offset + st.length >= size { st.flags.insert(.eof) }
        return st
    }

    /// Whether `[offset, offset+length)` is allocated in this node or any
    /// backing node above `base` (exclusive). Returns the answer and how many
    /// bytes it covers.
    public func isAllocatedAbove(base: BlockNode?, at offset: Int64, length: Int64) async throws(BlockError) -> (Bool, Int64) {
        var node: BlockNode? = self
        var remaining = length
        while let n = node, n !== base {
            if offset >= n.length {
                node = n.filterOrBacking
                continue
            }
            let st = try await n.blockStatus(at: offset, length: remaining)
            if st.flags.contains(.allocated) { return (true, st.length) }
            remaining = min(remaining, st.length)
            node = n.filterOrBacking
        }
        return (false, remaining)
    }

    public func reserveSpace(upTo length: Int64) async throws(BlockError) {
        if readOnly { return }
        try await driver.reserveSpace(upTo: length)
    }

    public func releaseUnusedSpace() async throws(BlockError) {
        if readOnly { return }
        try await driver.releaseUnusedSpace()
    }

    // MARK: - Alignment (O_DIRECT)

    private func alignedRange(_ offset: Int64, _ count: Int) -> (Int64, Int) {
        let a = Int64(driver.requestAlignment)
        let start = alignDown(offset, a)
        let end = alignUp(offset + Int64(count), a)
        return (start, Int(end - start))
    }

    private func alignedRead(_ offset: Int64, _ buffer: UnsafeMutableRawBufferPointer) async throws(BlockError) {
        let (start, len) = alignedRange(offset, buffer.count)
        let bounce = AlignedBuffer(count: len, alignment: max(driver.memoryAlignment, 4096))
        // Reads of the padding past the end of a non-growable node are not allowed.
        try await driver.read(at: start, into: bounce.bytes)
        buffer.copyMemory(from: UnsafeRawBufferPointer(bounce.slice(Int(offset - start), buffer.count)))
    }

    private func alignedWrite(_ offset: Int64, _ buffer: UnsafeRawBufferPointer, _ flags: WriteFlags) async throws(BlockError) {
        let (start, len) = alignedRange(offset, buffer.count)
        let bounce = AlignedBuffer(count: len, alignment: max(driver.memoryAlignment, 4096))
        let isRMW = start != offset || len != buffer.count
        let token = await requests.begin(start, Int64(len), serialising: isRMW)
        defer { requests.end(token) }
        if isRMW {
            // QEMU's padding events around the read of the head and tail.
            let head = start != offset, tail = start + Int64(len) != offset + Int64(buffer.count)
            if head { debugEvent(.pwritevRmwHead) }
            if tail { debugEvent(.pwritevRmwTail) }
            try await driver.read(at: start, into: bounce.bytes)
            if head { debugEvent(.pwritevRmwAfterHead) }
            if tail { debugEvent(.pwritevRmwAfterTail) }
        }
        bounce.slice(Int(offset - start), buffer.count).copyMemory(from: buffer)
        debugEvent(.pwritev)
        defer { debugEvent(.pwritevDone) }
        try await driver.write(at: start, from: UnsafeRawBufferPointer(bounce.bytes), flags: flags)
    }
}

/// The dirty bitmaps a node marks: a lock-free emptiness check keeps the
/// write path at one atomic load when there are none.
final class DirtyBitmapList: Sendable {
    private let list = Mutex<[DirtyBitmap]>([])
    private let count = Atomic<Int>(0)

    func withLock<T>(_ body: (inout [DirtyBitmap]) -> T) -> T {
        list.withLock { l in
            defer { count.store(l.count, ordering: .releasing) }
            return body(&l)
        }
    }

    @inline(__always)
    func forEach(_ body: (DirtyBitmap) -> Void) {
        if count.load(ordering: .acquiring) == 0 { return }
        for b in list.withLock({ $0 }) { body(b) }
    }
}

/// QEMU's tracked requests: every request of a node is registered while
/// it runs, so that drained sections can wait for them and serialising
/// requests (read-modify-write, copy-on-read) never overlap another
/// request. A serialising request waits for every overlapping request; any
/// request waits for overlapping serialising ones.
final class RequestTracker: Sendable {
    private struct Entry {
        var id: UInt64
        var start: Int64
        var end: Int64
        var serialising: Bool
        var waiters: [UnsafeContinuation<Void, Never>] = []
    }

    private struct State {
        var next: UInt64 = 1
        var entries: [Entry] = []
        var serialisingCount = 0
        /// Requests in flight, tracked or not (flush, truncate).
        var inFlight = 0
        var idleWaiters: [UnsafeContinuation<Void, Never>] = []

        mutating func takeIdleWaiters() -> [UnsafeContinuation<Void, Never>] {
            guard inFlight == 0, !idleWaiters.isEmpty else { return [] }
            defer { idleWaiters = [] }
            return idleWaiters
        }
    }

    private let state = Mutex(State())

    /// Registers a request, first waiting for overlapping requests that
    /// conflict with it. Returns the token for `end`.
    func begin(_ start: Int64, _ length: Int64, serialising: Bool) async -> UInt64 {
        let end = start + length
        while true {
            // The common case (nothing serialising anywhere) takes the lock once.
            let id = state.withLock { s -> UInt64? in
                if s.serialisingCount > 0 || serialising {
                    for e in s.entries where e.start < end && start < e.end && (serialising || e.serialising) {
                        return nil
                    }
                }
                let id = s.next
                s.next += 1
                s.entries.append(Entry(id: id, start: start, end: end, serialising: serialising))
                if serialising { s.serialisingCount += 1 }
                s.inFlight += 1
                return id
            }
            if let id { return id }
            await withUnsafeContinuation { (c: UnsafeContinuation<Void, Never>) in
                let resumeNow = state.withLock { s -> Bool in
                    guard let i = s.entries.firstIndex(where: {
                        $0.start < end && start < $0.end && (serialising || $0.serialising)
                    }) else { return true }
                    s.entries[i].waiters.append(c)
                    return false
                }
                if resumeNow { c.resume() }
            }
        }
    }

    func end(_ id: UInt64) {
        let (waiters, idle) = state.withLock { s -> ([UnsafeContinuation<Void, Never>], [UnsafeContinuation<Void, Never>]) in
            guard let i = s.entries.lastIndex(where: { $0.id == id }) else { return ([], []) }
            let e = s.entries.remove(at: i)
            if e.serialising { s.serialisingCount -= 1 }
            s.inFlight -= 1
            return (e.waiters, s.takeIdleWaiters())
        }
        for w in waiters { w.resume() }
        for w in idle { w.resume() }
    }

    func enterUntracked() { state.withLock { $0.inFlight += 1 } }

    func leaveUntracked() {
        let idle = state.withLock { s -> [UnsafeContinuation<Void, Never>] in
            s.inFlight -= 1
            return s.takeIdleWaiters()
        }
        for w in idle { w.resume() }
    }

    var inFlight: Int { state.withLock { $0.inFlight } }

    /// Returns once no request is in flight (new ones may start after).
    func waitIdle() async {
        await withUnsafeContinuation { (c: UnsafeContinuation<Void, Never>) in
            let now = state.withLock { s -> Bool in
                if s.inFlight == 0 { return true }
                s.idleWaiters.append(c)
                return false
            }
            if now { c.resume() }
        }
    }
}
