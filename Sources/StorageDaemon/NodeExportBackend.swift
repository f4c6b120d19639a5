#if canImport(Glibc)
import Glibc
#endif
import BlockCore
import BlockGraph
import BlockIO
import NBDServer
import ServerKit
import Synchronization

/// Serves an NBD export from a block node through its block backend
/// (QEMU's NBD export on a BlockBackend). Requests run on the node's home
/// loop (`executor`) and enter the backend's gate (drained sections hold
/// them); the node's generic layer does validation, alignment and
/// serialisation.
final class NodeExportBackend: NBDBackend, Sendable {
    let blk: BlockBackend
    let executor: EventLoopExecutor
    let writable: Bool
    let allocationDepth: Bool
    private let nextReader = Atomic<Int>(0)
    static let pooledReadMinimum = 64 * 1024

    /// Persistent dirty bitmaps served as `qemu:dirty-bitmap:NAME`.
    let bitmaps: [String: DirtyBitmap]

    init(blk: BlockBackend, loop: EventLoopExecutor, writable: Bool, allocationDepth: Bool,
         bitmaps: [String: DirtyBitmap] = [:]) {
        self.blk = blk
        self.bitmaps = bitmaps
        self.executor = loop
        self.writable = writable
        self.allocationDepth = allocationDepth
    }

    /// The node requests go to now.
    var node: BlockNode { blk.node }

    private func request<T>(_ body: (BlockNode) async throws(BlockError) -> T) async throws(BlockError) -> T {
        try await blk.request(body)
    }

    /// Reads are thread-safe in every driver (they may run on any I/O
    /// thread), so a connection's big reads are spread over the home
    /// context's workers: the loop keeps sending replies while several
    /// preads are in flight. Small reads stay on the loop: a thread hop
    /// would cost them more latency (iodepth 1) than it gains.
    func readExecutor(offset: Int64, length: Int) -> any TaskExecutor {
        guard length >= Self.pooledReadMinimum, let ctx = node.context, ctx.workers != nil else { return executor }
        return ctx.worker(nextReader.wrappingAdd(1, ordering: .relaxed).oldValue & Int.max)
    }

    var size: Int64 { node.length }
    /// QEMU's blk_get_request_alignment: the node's.
    var requestAlignment: UInt32 { UInt32(clamping: max(1, node.driver.requestAlignment)) }
    /// QEMU's blk_get_max_transfer: the node's limit (none: INT_MAX),
    /// rounded down to the request alignment.
    var maxTransfer: UInt32 {
        let a = Int64(requestAlignment)
        let m = node.limits.maxTransfer > 0 ? min(node.limits.maxTransfer, Int64(Int32.max)) : Int64(Int32.max)
        return UInt32(alignDown(m, a))
    }
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

    /// FUA is the node's business (QEMU's BDRV_REQ_FUA): every driver
    /// makes a FUA write durable, natively or by flushing itself.
    func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, fua: Bool) async throws(BlockError) {
        try await request { (node) async throws(BlockError) in
            try await node.write(at: offset, from: buffer, flags: fua ? [.fua] : [])
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
