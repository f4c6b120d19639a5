import BlockCore
import BlockGraph
import Synchronization

// The optional driver capabilities (BlockGraph/Capabilities.swift) qcow2
// offers. Most members are the existing operations (check, bitmaps,
// snapshots, compressed writes, make-empty); what is here adapts them to
// the generic types.

extension Qcow2Image: Checkable, PersistentBitmaps, Emptiable {
    /// qcow2_supports_persistent_dirty_bitmap: version 3 images only.
    public var supportsPersistentBitmaps: Bool { version >= 3 }
}

extension Qcow2Image: DriverInfoProvider {
    /// qcow2_get_info: cluster size and the dirty bit, read under the
    /// metadata lock.
    public func driverInfo() async -> BlockDriverInfo {
        await lock.withLock {
            BlockDriverInfo(clusterSize: geo.clusterSize, isDirty: header.isDirty,
                            supportsZeroClusters: geo.version >= 3)
        }
    }
}

extension Qcow2Image: ImageInfoProvider {
    /// qcow2_get_specific_info: version-dependent members as QEMU 7.2
    /// fills them (v2 images have no lazy-refcounts, corrupt or
    /// extended-l2); bitmaps as the on-disk directory lists them, only
    /// while the autoclear "bitmaps" bit is set.
    public func specificInfo() async -> ImageInfoSpecific? {
        let h = await currentHeader()
        let compression = CompressionType(rawValue: h.compressionType)?.name ?? "zlib"
        if h.version == 2 {
            return .qcow2(ImageInfoSpecificQcow2(compat: "0.10", refcountBits: h.refcountBits,
                                                 compressionType: compression))
        }
        let list = await bitmapList()
        let bitmaps = list.map { b in
            var flags: [String] = []
            if b.inUse { flags.append("in-use") }
            if b.isAuto { flags.append("auto") }
            return ImageInfoSpecificQcow2.Bitmap(name: b.name, granularity: b.granularity, flags: flags)
        }
        let encrypt: String? = h.cryptMethod == 1 ? "aes" : h.cryptMethod == 2 ? "luks" : nil
        return .qcow2(ImageInfoSpecificQcow2(compat: "1.1", lazyRefcounts: h.lazyRefcounts,
                                             bitmaps: bitmaps.isEmpty ? nil : bitmaps, refcountBits: h.refcountBits,
                                             encryptFormat: encrypt, corrupt: h.isCorrupt, extendedL2: h.extendedL2,
                                             compressionType: compression))
    }

    /// Whether the header names an encryption method.
    public func isEncrypted() async -> Bool {
        await currentHeader().cryptMethod != 0
    }
}

extension Qcow2Image: InternalSnapshots {
    /// The snapshot table as `SnapshotInfo`s, in table order.
    public func listSnapshots() async -> [SnapshotInfo] {
        await snapshotList().map { sn in
            SnapshotInfo(id: sn.id, name: sn.name, vmStateSize: sn.vmStateSize, dateSec: sn.dateSec,
                         dateNsec: sn.dateNsec, vmClockNsec: sn.vmClockNsec, icount: sn.icount)
        }
    }

    /// `createSnapshot(name:...)` with the fields of `info` (a nil icount
    /// is stored as "none").
    public func createSnapshot(_ info: SnapshotInfo) async throws(BlockError) {
        try await createSnapshot(name: info.name, dateSec: info.dateSec, dateNsec: info.dateNsec,
                                 vmClockNsec: info.vmClockNsec, icount: info.icount ?? UInt64.max)
    }

    /// Reads the snapshot's L1 table now; its L2 tables as the view needs them.
    public func snapshotView(_ snapshot: SnapshotInfo) async throws(BlockError) -> any SnapshotView {
        let table = await snapshotList()
        guard let sn = table.first(where: { $0.id == snapshot.id && $0.name == snapshot.name }) else {
            throw BlockError(.notFound, errno: 2, "Can't find snapshot")
        }
        return Qcow2SnapshotView(image: self, l1: try await snapshotL1(sn))
    }
}

/// A snapshot's mapping through its own L1 table (`snapshotBlockStatus`),
/// with the L2 tables read so far cached.
final class Qcow2SnapshotView: SnapshotView {
    let image: Qcow2Image
    let l1: [UInt64]
    /// L2 tables by host offset; taken out for the duration of a call
    /// (calls run one at a time).
    private let tables = Mutex<[Int64: [UInt8]]>([:])

    init(image: Qcow2Image, l1: [UInt64]) {
        self.image = image
        self.l1 = l1
    }

    func blockStatus(at offset: Int64, length: Int64) async throws(BlockError) -> BlockStatus {
        var cache = tables.withLock { t in
            let taken = t
            t = [:]
            return taken
        }
        defer { tables.withLock { $0 = cache } }
        return try await image.snapshotBlockStatus(l1: l1, tables: &cache, at: offset, length: length)
    }
}
