import BlockCore
import BlockGraph

/// Read-only views of an internal snapshot's mapping (for `measure -l`,
/// QEMU's bdrv_snapshot_load_tmp): the snapshot's L1 table and the status
/// of a guest range through it.
extension Qcow2Image {
    /// The snapshot's L1 table as stored.
    public func snapshotL1(_ sn: Qcow2Snapshot) async throws(BlockError) -> [UInt64] {
        var l1 = [UInt64](repeating: 0, count: Int(sn.l1Size))
        if sn.l1Size > 0 {
            try await Qcow2Image.readTable(file, Int64(sn.l1TableOffset), &l1, what: "snapshot L1 table")
        }
        return l1
    }

    /// This layer's status of `[offset, offset+length)` as the snapshot with
    /// L1 table `l1` maps it (at least one byte, at most one L2 table).
    /// `tables` caches the L2 tables read so far.
    public func snapshotBlockStatus(l1: [UInt64], tables: inout [Int64: [UInt8]], at offset: Int64,
                                    length: Int64) async throws(BlockError) -> BlockStatus {
        let cs = Int64(geo.clusterSize)
        let tableSpan = cs * Int64(geo.l2Entries)
        let end = min(offset + length, (offset / tableSpan + 1) * tableSpan)
        let l1i = geo.l1Index(offset)
        let l2Off = l1i < l1.count ? Int64(l1[l1i] & Qcow2.l1OffsetMask) : 0
        if l2Off == 0 { return BlockStatus(flags: [], length: end - offset) }
        if tables[l2Off] == nil {
            var t = [UInt8](repeating: 0, count: geo.clusterSize)
            try await Qcow2Image.readBytes(file, &t, l2Off)
            tables[l2Off] = t
        }
        let table = tables[l2Off]!
        let unit = Int64(geo.subclusterSize)
        return try await mergedStatus(from: offset, to: end) { g throws(BlockError) in
            let idx = geo.l2Index(g)
            let entry = table.be64(idx * geo.l2EntrySize)
            let bitmap = geo.extendedL2 ? table.be64(idx * geo.l2EntrySize + 8) : 0
            let inCluster = geo.offsetInCluster(g)
            let sc = Int(inCluster / unit)
            let raw = geo.version >= 3 || geo.extendedL2 ? entry : entry & ~Qcow2.oflagZero
            switch geo.subclusterKind(entry: raw, bitmap: bitmap, sc: sc) {
            case .normal(let h):
                return ([.data, .offsetValid, .recurse], h + (inCluster - Int64(sc) * unit))
            case .zeroAlloc, .zeroPlain:
                return ([.zero], 0)
            case .unallocatedAlloc, .unallocated:
                return ([], 0)
            case .compressed:
                return ([.data, .compressed], 0)
            case .invalid:
                throw BlockError(.corrupt, errno: 5, "Invalid cluster entry found in snapshot L2 table \(hex(l2Off))")
            }
        }
    }
}
