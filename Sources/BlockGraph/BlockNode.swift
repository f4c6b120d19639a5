import BlockCore
import Synchronization

/// A node of the block graph (QEMU's BlockDriverState): a driver plus the
/// generic request layer — validation, alignment (bounce and
/// read-modify-write for O_DIRECT), serialisation of read-modify-write
/// cycles and the backing-chain helpers.
public final class BlockNode: Sendable {
    public let driver: any BlockDriver
    /// The file name the node was opened from (what `qemu-img info` calls "image").
    public let filename: String
    /// Read-only (QEMU's bdrv_is_read_only); a live snapshot reopens the
    /// old active layer read-only.
    public var readOnly: Bool { readOnlyBox.load(ordering: .acquiring) }
    private let readOnlyBox: Atomic<Bool>
    /// The node's discard and detect-zeroes options (QEMU's BDRV_O_UNMAP
    /// and detect_zeroes), applied by the generic layer.
    public let policy: NodePolicy
    private let nodeNameBox: Mutex<String>
    private let rmw = RMWTracker()
    /// References (QEMU's bdrv_ref): the creator holds one; every extra
    /// parent or owner that shares the node takes another with `retain()`.
    private let refs = Atomic<Int>(1)

    public init(driver: any BlockDriver, filename: String, readOnly: Bool, nodeName: String = "",
                policy: NodePolicy = NodePolicy()) {
        self.driver = driver
        self.filename = filename
        self.readOnlyBox = Atomic(readOnly)
        self.policy = policy
        self.nodeNameBox = Mutex(nodeName)
    }

    public var nodeName: String {
        get { nodeNameBox.withLock { $0 } }
    }

    public func setNodeName(_ name: String) { nodeNameBox.withLock { $0 = name } }

    /// QEMU's bdrv_reopen_set_read_only(bs, true): flushes, then refuses
    /// writes from now on. (The caller makes sure none is in flight.)
    public func reopenReadOnly() async throws(BlockError) {
        if readOnly { return }
        try await flush()
        try await driver.settleForReadOnly()
        readOnlyBox.store(true, ordering: .releasing)
    }

    /// QEMU's bdrv_reopen_set_read_only(bs, false): the node (and the
    /// children it writes) accept writes again.
    public func reopenReadWrite() async throws(BlockError) {
        if !readOnly { return }
        try await driver.reopenForWriting()
        readOnlyBox.store(false, ordering: .releasing)
    }

    // MARK: - Dirty tracking

    /// Bitmaps that every write, write-zeroes and discard through this
    /// node marks (QEMU's bdrv_set_dirty; jobs and, later, user bitmaps).
    private let bitmaps = Mutex<[DirtyBitmap]>([])
    private let bitmapCount = Atomic<Int>(0)

    public func addDirtyBitmap(_ b: DirtyBitmap) {
        bitmaps.withLock {
            $0.append(b)
            bitmapCount.store($0.count, ordering: .releasing)
        }
    }

    public func removeDirtyBitmap(_ b: DirtyBitmap) {
        bitmaps.withLock {
            $0.removeAll { $0 === b }
            bitmapCount.store($0.count, ordering: .releasing)
        }
    }

    @inline(__always)
    private func markDirty(_ offset: Int64, _ length: Int64) {
        if bitmapCount.load(ordering: .acquiring) == 0 { return }
        for b in bitmaps.withLock({ $0 }) { b.mark(offset, length) }
    }

    public var formatName: String { driver.formatName }
    public var length: Int64 { driver.length }
    public var children: [BlockChild] { driver.children }

    public var backing: BlockNode? {
        children.first { $0.role == .backing }?.node
    }

    public var file: BlockNode? {
        children.first { $0.role == .file }?.node
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

    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws(BlockError) {
        try check(offset, Int64(buffer.count), write: false)
        if buffer.count == 0 { return }
        if needsAlignment(offset, buffer.count, buffer.baseAddress) {
            try await alignedRead(offset, buffer)
            return
        }
        try await driver.read(at: offset, into: buffer)
    }

    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags = []) async throws(BlockError) {
        try check(offset, Int64(buffer.count), write: true)
        if buffer.count == 0 { return }
        defer { markDirty(offset, Int64(buffer.count)) }
        if policy.detectZeroes != .off, !flags.contains(.copyOnRead), let base = buffer.baseAddress,
           isZeroMemory(base, buffer.count) {
            var zflags = flags
            if policy.detectZeroes == .unmap { zflags.insert(.mayUnmap) }
            try await writeZeroes(at: offset, length: Int64(buffer.count), flags: zflags)
            return
        }
        if needsAlignment(offset, buffer.count, buffer.baseAddress) {
            try await alignedWrite(offset, buffer, flags)
            return
        }
        if driver.requestAlignment > 1 {
            let token = await rmw.begin(offset, Int64(buffer.count), serialising: false)
            defer { rmw.end(token) }
            try await driver.write(at: offset, from: buffer, flags: flags)
        } else {
            try await driver.write(at: offset, from: buffer, flags: flags)
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
            let headEnd = min(alignUp(offset, a), offset + length)
            let tailStart = max(alignDown(offset + length, a), headEnd)
            if headEnd > offset { try await writeZeroBuffer(offset, headEnd - offset, flags) }
            if tailStart > headEnd { try await driver.writeZeroes(at: headEnd, length: tailStart - headEnd, flags: flags) }
            if offset + length > tailStart { try await writeZeroBuffer(tailStart, offset + length - tailStart, flags) }
            return
        }
        try await driver.writeZeroes(at: offset, length: length, flags: flags)
    }

    private func writeZeroBuffer(_ offset: Int64, _ length: Int64, _ flags: WriteFlags) async throws(BlockError) {
        let buf = AlignedBuffer(count: Int(length), zeroed: true)
        try await write(at: offset, from: UnsafeRawBufferPointer(buf.bytes), flags: flags)
    }

    public func discard(at offset: Int64, length: Int64) async throws(BlockError) {
        try check(offset, length, write: true)
        if length == 0 || !policy.discardUnmap { return }
        defer { markDirty(offset, length) }
        try await driver.discard(at: offset, length: length)
    }

    public func flush() async throws(BlockError) {
        if readOnly { return }
        try await driver.flush()
    }

    /// Starts writeback without waiting (see `BlockDriver.startWriteback`).
    public func startWriteback() async {
        if readOnly { return }
        await driver.startWriteback()
    }

    public func truncate(to length: Int64, preallocation: Preallocation = .off) async throws(BlockError) {
        if readOnly { throw BlockError(.permissionDenied, errno: 1, "Block node is read-only") }
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
                node = n.backing
                continue
            }
            let st = try await n.blockStatus(at: offset, length: remaining)
            if st.flags.contains(.allocated) { return (true, st.length) }
            remaining = min(remaining, st.length)
            node = n.backing
        }
        return (false, remaining)
    }

    /// Takes one more reference: the node stays open until every holder
    /// has called `close()`.
    public func retain() { refs.add(1, ordering: .relaxed) }

    /// True once the last reference was closed.
    public var isClosed: Bool { refs.load(ordering: .acquiring) <= 0 }

    /// Drops one reference; the last one flushes and closes the driver
    /// (which drops its references to its children).
    public func close() async throws(BlockError) {
        let left = refs.subtract(1, ordering: .acquiringAndReleasing).newValue
        guard left == 0 else { return }
        try await driver.close()
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
        let token = await rmw.begin(start, Int64(len), serialising: isRMW)
        defer { rmw.end(token) }
        if isRMW {
            try await driver.read(at: start, into: bounce.bytes)
        }
        bounce.slice(Int(offset - start), buffer.count).copyMemory(from: buffer)
        try await driver.write(at: start, from: UnsafeRawBufferPointer(bounce.bytes), flags: flags)
    }
}

/// QAPI BlockdevDetectZeroesOptions.
public enum DetectZeroes: String, Sendable, CaseIterable {
    case off, on, unmap
}

/// Per-node request policy set by the node's options.
public struct NodePolicy: Sendable, Equatable {
    /// discard=unmap (true) or ignore (false): whether discard requests and
    /// the may-unmap hint of write-zeroes reach the driver.
    public var discardUnmap: Bool
    public var detectZeroes: DetectZeroes
    /// The default keeps discards (what qemu-img's own opens do).
    public init(discardUnmap: Bool = true, detectZeroes: DetectZeroes = .off) {
        self.discardUnmap = discardUnmap
        self.detectZeroes = detectZeroes
    }
}

/// Tracks in-flight writes of a node with request alignment > 1 so that a
/// read-modify-write cycle never overlaps another write (QEMU's serialising
/// requests).
final class RMWTracker: Sendable {
    struct Entry {
        var id: UInt64
        var start: Int64
        var end: Int64
        var serialising: Bool
        var done: AsyncEvent
    }

    private let state = Mutex<(next: UInt64, entries: [Entry])>((1, []))

    /// Registers a request, first waiting for overlapping requests that
    /// conflict (a serialising request waits for all overlapping ones; any
    /// request waits for overlapping serialising ones).
    func begin(_ start: Int64, _ length: Int64, serialising: Bool) async -> UInt64 {
        let end = start + length
        while true {
            let result = state.withLock { s -> (UInt64?, AsyncEvent?) in
                for e in s.entries where e.start < end && start < e.end && (serialising || e.serialising) {
                    return (nil, e.done)
                }
                let id = s.next
                s.next += 1
                s.entries.append(Entry(id: id, start: start, end: end, serialising: serialising, done: AsyncEvent()))
                return (id, nil)
            }
            if let id = result.0 { return id }
            await result.1!.wait()
        }
    }

    func end(_ id: UInt64) {
        let ev = state.withLock { s -> AsyncEvent? in
            guard let i = s.entries.firstIndex(where: { $0.id == id }) else { return nil }
            return s.entries.remove(at: i).done
        }
        ev?.signal()
    }
}
