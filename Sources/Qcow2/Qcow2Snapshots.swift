import BlockCore
import BlockGraph

/// One entry of the internal snapshot table.
public struct Qcow2Snapshot: Sendable, Equatable {
    public var l1TableOffset: UInt64
    public var l1Size: UInt32
    public var id: String
    public var name: String
    public var dateSec: UInt32
    public var dateNsec: UInt32
    public var vmClockNsec: UInt64
    public var vmStateSize: UInt64
    public var diskSize: UInt64?
    public var icount: UInt64?
    public var extraData: [UInt8]
}

extension Qcow2Image {
    /// Reads and validates the snapshot table (QEMU qcow2_read_snapshots).
    func readSnapshotTable() async throws(BlockError) -> [Qcow2Snapshot] {
        let n = Int(header.nbSnapshots)
        guard n > 0 else { return [] }
        var off = Int64(header.snapshotsOffset)
        var out: [Qcow2Snapshot] = []
        let maxTable: Int64 = 64 << 20
        let start = off
        for i in 0..<n {
            off = alignUp(off, 8)
            var fixed = [UInt8](repeating: 0, count: 40)
            try await Qcow2Image.readBytes(file, &fixed, off)
            off += 40
            let idLen = Int(fixed.be16(12))
            let nameLen = Int(fixed.be16(14))
            let extraLen = Int(fixed.be32(36))
            if extraLen > 1024 {
                throw BlockError.invalid("Too much extra metadata in snapshot table entry \(i)\n"
                                         + "You can force-remove this extra metadata with qemu-img check -r all")
            }
            var extra = [UInt8](repeating: 0, count: extraLen)
            if extraLen > 0 { try await Qcow2Image.readBytes(file, &extra, off) }
            off += Int64(extraLen)
            var idBytes = [UInt8](repeating: 0, count: idLen)
            if idLen > 0 { try await Qcow2Image.readBytes(file, &idBytes, off) }
            off += Int64(idLen)
            var nameBytes = [UInt8](repeating: 0, count: nameLen)
            if nameLen > 0 { try await Qcow2Image.readBytes(file, &nameBytes, off) }
            off += Int64(nameLen)
            if off - start > maxTable {
                throw BlockError.invalid("Snapshot table is too big\n"
                                         + "You can force-remove all \(n - i) overhanging snapshots with qemu-img check -r all")
            }
            var sn = Qcow2Snapshot(l1TableOffset: fixed.be64(0), l1Size: fixed.be32(8),
                                   id: String(decoding: idBytes, as: UTF8.self), name: String(decoding: nameBytes, as: UTF8.self),
                                   dateSec: fixed.be32(16), dateNsec: fixed.be32(20), vmClockNsec: fixed.be64(24),
                                   vmStateSize: UInt64(fixed.be32(32)), diskSize: nil, icount: nil, extraData: extra)
            if extraLen >= 8 { sn.vmStateSize = extra.be64(0) }
            if extraLen >= 16 { sn.diskSize = extra.be64(8) }
            if extraLen >= 24 { sn.icount = extra.be64(16) }
            // Like QEMU, a snapshot's L1 table is validated only when the
            // snapshot is applied or deleted (validateSnapshotL1).
            out.append(sn)
        }
        snapshotTableBytes = Int(off - start)
        return out
    }

    public func snapshotList() async -> [Qcow2Snapshot] {
        await lock.withLock { snapshots }
    }
}
