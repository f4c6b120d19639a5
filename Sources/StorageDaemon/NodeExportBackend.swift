#if canImport(Glibc)
import Glibc
#endif
import BlockCore
import BlockGraph
import BlockIO
import NBDServer
import ServerKit
import Synchronization

/// Serves an NBD export from a block node (QEMU's NBD export on a
/// BlockBackend). Requests run on the node's home loop (`executor`); the
/// node's generic layer does validation, alignment and serialisation.
final class NodeExportBackend: NBDBackend, Sendable {
    let executor: EventLoopExecutor
    let writable: Bool
    let allocationDepth: Bool

    private struct Gate {
        var node: BlockNode
        var inFlight = 0
        /// Drained sections open (they nest); requests wait while > 0.
        var pauseCount = 0
        var paused: Bool { pauseCount > 0 }
        var waitingToEnter: [CheckedContinuation<Void, Never>] = []
        var drained: [CheckedContinuation<Void, Never>] = []
    }
    private let gate: Mutex<Gate>

    /// Threads that run reads (nil: reads run on `executor` too).
    private let readPool: IOThreadPool?
    private let nextReader = Atomic<Int>(0)
    static let pooledReadMinimum = 64 * 1024

    /// Persistent dirty bitmaps served as `qemu:dirty-bitmap:NAME`.
    let bitmaps: [String: DirtyBitmap]

    init(node: BlockNode, executor: EventLoopExecutor, readPool: IOThreadPool? = nil, writable: Bool,
         allocationDepth: Bool, bitmaps: [String: DirtyBitmap] = [:]) {
        self.bitmaps = bitmaps
        self.gate = Mutex(Gate(node: node))
        self.executor = executor
        self.readPool = readPool
        self.writable = writable
        self.allocationDepth = allocationDepth
    }

    /// The node requests go to now.
    var node: BlockNode { gate.withLock { $0.node } }

    /// Every request enters (waiting while the export is being moved to
    /// another node) and leaves; `body` runs on the node current at entry.
    private func request<T>(_ body: (BlockNode) async throws(BlockError) -> T) async throws(BlockError) -> T {
        var entered: BlockNode? = gate.withLock { g in
            if g.paused { return nil }
            g.inFlight += 1
            return g.node
        }
        while entered == nil {
            await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
                let resumeNow = gate.withLock { g -> Bool in
                    if !g.paused { return true }
                    g.waitingToEnter.append(c)
                    return false
                }
                if resumeNow { c.resume() }
            }
            entered = gate.withLock { g in
                if g.paused { return nil }
                g.inFlight += 1
                return g.node
            }
        }
        defer {
            let done = gate.withLock { g -> [CheckedContinuation<Void, Never>] in
                g.inFlight -= 1
                if g.inFlight == 0 && !g.drained.isEmpty {
                    defer { g.drained = [] }
                    return g.drained
                }
                return []
            }
            done.forEach { $0.resume() }
        }
        return try await body(entered!)
    }

    /// Opens a drained section (QEMU's bdrv_drained_begin for this
    /// export's requests): new requests wait, and this returns once the
    /// requests in flight have finished. Sections nest.
    func pause() async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            let now = gate.withLock { g -> Bool in
                g.pauseCount += 1
                if g.inFlight == 0 { return true }
                g.drained.append(c)
                return false
            }
            if now { c.resume() }
        }
    }

    /// Closes a drained section; with `newNode`, requests go there from now
    /// on (QEMU's bdrv_replace_node for the export's BlockBackend).
    func resume(to newNode: BlockNode? = nil) {
        let waiters = gate.withLock { g -> [CheckedContinuation<Void, Never>] in
            if let n = newNode { g.node = n }
            g.pauseCount -= 1
            if g.paused { return [] }
            defer { g.waitingToEnter = [] }
            return g.waitingToEnter
        }
        waiters.forEach { $0.resume() }
    }

    /// Moves the export to `newNode` in a drained section: requests in
    /// flight finish on the old node, later ones go to the new node.
    func retarget(to newNode: BlockNode) async {
        await pause()
        resume(to: newNode)
    }

    /// Reads are thread-safe in every driver (they may run on any I/O
    /// thread), so a connection's reads are spread over the pool: the
    /// loop keeps sending replies while several preads are in flight.
    /// Small reads stay on the loop: a thread hop would cost them more
    /// latency (iodepth 1) than it gains.
    func readExecutor(offset: Int64, length: Int) -> any TaskExecutor {
        guard let readPool, length >= Self.pooledReadMinimum else { return executor }
        return readPool[nextReader.wrappingAdd(1, ordering: .relaxed).oldValue & Int.max]
    }

    var size: Int64 { node.length }
    var supportsTrim: Bool { true }
    var supportsFastZero: Bool { true }
    /// One node serves every connection, and a flush flushes it for all of
    /// them: consistent across connections.
    var canMultiConn: Bool { true }
    var metaContexts: [NBDMetaContextKind] {
        allocationDepth ? [.baseAllocation, .allocationDepth] : [.baseAllocation]
    }

    func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws(BlockError) {
        try await request { (node) async throws(BlockError) in try await node.read(at: offset, into: buffer) }
    }

    func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, fua: Bool) async throws(BlockError) {
        try await request { (node) async throws(BlockError) in
            try await node.write(at: offset, from: buffer, flags: fua ? [.fua] : [])
            if fua { try await node.flush() }
        }
    }

    func writeZeroes(at offset: Int64, length: Int64, mayTrim: Bool, fastZero: Bool, fua: Bool) async throws(BlockError) {
        var flags: WriteFlags = mayTrim ? [.mayUnmap] : []
        if fua { flags.insert(.fua) }
        // FAST_ZERO is QEMU's BDRV_REQ_NO_FALLBACK: drivers refuse with
        // ENOTSUP rather than write explicit zeroes.
        if fastZero { flags.insert(.noFallback) }
        let f = flags
        try await request { (node) async throws(BlockError) in
            try await node.writeZeroes(at: offset, length: length, flags: f)
            if fua { try await node.flush() }
        }
    }

    func trim(at offset: Int64, length: Int64, fua: Bool) async throws(BlockError) {
        try await request { (node) async throws(BlockError) in
            try await node.discard(at: offset, length: length)
            if fua { try await node.flush() }
        }
    }

    func flush() async throws(BlockError) {
        try await request { (node) async throws(BlockError) in try await node.flush() }
    }

    func cache(at offset: Int64, length: Int64) async throws(BlockError) {
        // Prefetch: read through the chain into the page cache, in chunks.
        let node = self.node
        let chunk: Int64 = 1 << 20
        let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(min(chunk, length)), alignment: 4096)
        defer { buf.deallocate() }
        var off = offset
        let end = offset + length
        while off < end {
            let n = Int(min(chunk, end - off))
            try await node.read(at: off, into: UnsafeMutableRawBufferPointer(rebasing: buf[0..<n]))
            off += Int64(n)
        }
    }

    func blockStatus(_ context: NBDMetaContextKind, at offset: Int64, length: Int64) async throws(BlockError) -> [NBDExtent] {
        let maxLen = min(length, Int64(UInt32.max) & ~511)
        let node = self.node
        switch context {
        case .baseAllocation:
            let st = try await node.blockStatusAbove(base: nil, at: offset, length: maxLen)
            var flags: UInt32 = 0
            if !st.status.flags.contains(.data) { flags |= 1 }  // NBD_STATE_HOLE
            if st.status.flags.contains(.zero) { flags |= 2 }   // NBD_STATE_ZERO
            return [NBDExtent(length: UInt32(clamping: max(1, min(st.status.length, maxLen))), flags: flags)]
        case .allocationDepth:
            let st = try await node.blockStatusAbove(base: nil, at: offset, length: maxLen)
            let depth: UInt32 = st.status.flags.contains(.allocated) ? UInt32(st.depth + 1) : 0
            return [NBDExtent(length: UInt32(clamping: max(1, min(st.status.length, maxLen))), flags: depth)]
        case .dirtyBitmap(let name):
            guard let b = bitmaps[name] else { return [NBDExtent(length: UInt32(clamping: maxLen), flags: 0)] }
            // One extent: the dirty run at `offset`, or the clean run up to the next dirty one.
            if let (start, len) = b.nextDirtyRun(from: offset, maxLength: maxLen + b.granularity) {
                if start <= offset {
                    return [NBDExtent(length: UInt32(clamping: max(1, min(start + len - offset, maxLen))), flags: 1)]
                }
                return [NBDExtent(length: UInt32(clamping: max(1, min(start - offset, maxLen))), flags: 0)]
            }
            return [NBDExtent(length: UInt32(clamping: maxLen), flags: 0)]
        }
    }

    func zeroRun(at offset: Int64, length: Int64) async throws(BlockError) -> (isZero: Bool, length: Int64) {
        let node = self.node
        let st = try await node.blockStatusAbove(base: nil, at: offset, length: length)
        let n = max(1, min(st.status.length, length))
        return (st.status.flags.contains(.zero), n)
    }
}
