import BlockCore
import BlockGraph

extension BlockCopy {
    /// QEMU's bdrv_get_default_bitmap_granularity: the target's cluster
    /// size, at least 4 KiB and at most 64 KiB (64 KiB when unknown).
    public static func defaultGranularity(of node: BlockNode) async -> Int64 {
        guard let cs = await node.driverInfo()?.clusterSize, cs > 0 else { return 65536 }
        return min(65536, max(4096, Int64(cs)))
    }

    /// QEMU's mirror_iteration: how a dirty range of `source` goes to the
    /// target, decided by the source chain's block status at `granularity`:
    /// data is copied in steps of at most `maxIO`; whole granules the
    /// chain reads as zeroes are written as zeroes, unallocated ones are
    /// discarded; a piece smaller than a granule is copied.
    public static func mirrorPlan(source: BlockNode, granularity: Int64, maxIO: Int64) -> Plan {
        { (offset, length) throws(BlockError) in
            let st = try await source.blockStatusAbove(base: nil, at: offset, length: length)
            let f = st.status.flags
            var io = max(st.status.length, 1)
            var method = CopyMethod.copy
            if f.contains(.data) { io = min(io, maxIO) }
            io -= io % granularity
            if io < granularity {
                io = granularity
            } else if !f.contains(.data) {
                method = f.contains(.zero) ? .zero : .discard
            }
            return CopyStep(offset: offset, length: min(io, length), method: method)
        }
    }

    /// Marks in `bitmap` what `top` and the layers above `base` allocate,
    /// widened to whole granules (QEMU's mirror_dirty_init for a commit).
    public static func markAllocated(_ bitmap: DirtyBitmap, top: BlockNode, above base: BlockNode?,
                                     cancelled: () -> Bool = { false }) async throws(BlockError) {
        let len = top.length
        var offset: Int64 = 0
        while offset < len {
            if cancelled() { return }
            let (allocated, n0) = try await top.isAllocatedAbove(base: base, at: offset, length: len - offset)
            let n = n0 > 0 ? n0 : len - offset
            if allocated { bitmap.mark(offset, n) }
            offset += n
        }
    }
}
