import BlockCore

// Optional driver capabilities (QEMU's optional BlockDriver callbacks),
// each a small protocol a driver adopts next to `BlockDriver`. Callers ask
// for a capability (`node.driver as? any InternalSnapshots`), never for a
// concrete driver type; a driver without it gives the caller QEMU's
// "not supported" answer for that operation.
//
// Threading: unless a member says otherwise, members are nonisolated and
// may be called from any task; async members take the driver's own locks.
// Mutating members assume the node is not being written by anyone else
// (the tools hold the image alone; the daemon calls them from the control
// actor as QEMU calls them under its big lock).

/// QEMU's bdrv_get_info: fixed facts about the image format.
public protocol DriverInfoProvider: BlockDriver {
    /// The answer now (the dirty flag can change while the image is written).
    func driverInfo() async -> BlockDriverInfo
}

/// QEMU's bdrv_get_specific_info and bdrv_is_encrypted: what `qemu-img
/// info` and query-named-block-nodes print beyond the generic fields.
public protocol ImageInfoProvider: BlockDriver {
    /// The format-specific part of image info (nil: none to show).
    func specificInfo() async -> ImageInfoSpecific?
    /// Whether the image data is encrypted.
    func isEncrypted() async -> Bool
}

/// Internal snapshots (QEMU's bdrv_snapshot_* callbacks, as `qemu-img
/// snapshot`, `convert -l` and `measure -l` use them).
///
/// Errors carry the driver's errno; the callers add QEMU's wording.
public protocol InternalSnapshots: BlockDriver {
    /// The snapshot table, in table order (bdrv_snapshot_list).
    func listSnapshots() async -> [SnapshotInfo]
    /// Takes a snapshot of the active state (bdrv_snapshot_create): name,
    /// dates, VM clock and icount come from `info`; the driver picks the
    /// id. Requires a writable image.
    func createSnapshot(_ info: SnapshotInfo) async throws(BlockError)
    /// Makes the snapshot `idOrName` (matched by id first, then by name)
    /// the active state (bdrv_snapshot_goto). Not found: errno ENOENT.
    /// Requires a writable image.
    func applySnapshot(_ idOrName: String) async throws(BlockError)
    /// Deletes the snapshot with this id and name (bdrv_snapshot_delete).
    /// Requires a writable image.
    func deleteSnapshot(id: String, name: String) async throws(BlockError)
    /// Makes a snapshot the state reads see, in memory only
    /// (bdrv_snapshot_load_tmp, for `convert -l`). The image must be
    /// read-only; with both `id` and `name` both must match; not found:
    /// errno ENOENT.
    func loadSnapshotTemporarily(id: String?, name: String?) async throws(BlockError)
    /// A read-only view of a snapshot's mapping, without loading it (for
    /// `measure -l`). `snapshot` is an entry `listSnapshots()` returned;
    /// the first entry with its id and name is the one viewed.
    func snapshotView(_ snapshot: SnapshotInfo) async throws(BlockError) -> any SnapshotView
}

/// The mapping of one internal snapshot, read-only.
public protocol SnapshotView: Sendable {
    /// This layer's status of `[offset, offset+length)` as the snapshot
    /// maps it (at least one byte; `allocated` is not set: the caller
    /// decides what data and zero mean for it). Offsets past the
    /// snapshot's tables read as unallocated. Calls may run one at a time
    /// only.
    func blockStatus(at offset: Int64, length: Int64) async throws(BlockError) -> BlockStatus
}

/// Persistent dirty bitmaps stored in the image (QEMU's
/// bdrv_supports_persistent_dirty_bitmap, bdrv_co_can_store_new_dirty_bitmap,
/// bdrv_co_remove_persistent_dirty_bitmap, and the block-dirty-bitmap-*
/// operations on the bitmaps the driver loaded at open). Changes are
/// written back when the image is closed cleanly.
public protocol PersistentBitmaps: BlockDriver {
    /// Whether this image can hold persistent bitmaps at all (qcow2: v3).
    var supportsPersistentBitmaps: Bool { get }
    /// QEMU's bdrv_get_default_bitmap_granularity for this image.
    var defaultBitmapGranularity: Int64 { get }
    /// The bitmaps, in the image's order.
    func persistentBitmaps() async -> [PersistentBitmapInfo]
    /// The bitmaps and their live bits (nil: inconsistent), without
    /// waiting for a lock: callable from code that cannot suspend (export
    /// setup on the control actor).
    func persistentBitmapsNow() -> [(PersistentBitmapInfo, DirtyBitmap?)]
    /// Throws, with QEMU's reason (without the "Can't make bitmap ...
    /// persistent" prefix), when a new bitmap of this name and granularity
    /// could not be stored. Changes nothing.
    func canStoreNewBitmap(name: String, granularity: Int64) async throws(BlockError)
    /// Adds an empty bitmap. The caller checked `canStoreNewBitmap` and
    /// that the name is free; `granularity` is a power of two.
    func addBitmap(name: String, granularity: Int64, enabled: Bool) async
    /// Removes a bitmap. Unknown name: errno ENOENT, QEMU's message.
    func removeBitmap(name: String) async throws(BlockError)
    /// Sets whether writes mark the bitmap. Unknown names are ignored.
    func setBitmapEnabled(name: String, _ enabled: Bool) async
    /// The live bits of a consistent bitmap (nil: unknown or inconsistent).
    func bitmapBits(name: String) async -> DirtyBitmap?
    /// Clears every bit. Unknown or inconsistent names are ignored.
    func clearBitmap(name: String) async
    /// ORs `source` (same size and granularity) into the bitmap. Unknown
    /// or inconsistent names are ignored.
    func mergeIntoBitmap(name: String, from source: DirtyBitmap) async
}

/// QEMU's bdrv_check: consistency check and repair of the image metadata.
public protocol Checkable: BlockDriver {
    /// Checks, repairing what `repair` allows (the image must then be
    /// writable). A failure that stopped the check is returned in the
    /// error, with the diagnostics gathered until then.
    func check(repair: ImageRepairMode) async -> (ImageCheckResult, BlockError?)
}

/// QEMU's bdrv_amend_options: changes creation options of an existing image.
public protocol Amendable: BlockDriver {
    /// Applies `options` (names and values as the format's amend option
    /// list spells them, already syntax-checked, in that list's order),
    /// reporting `progress(done, total)` in the driver's work units (QEMU's
    /// BlockDriverAmendStatusCB). `node` is the node wrapping this driver,
    /// the only user of the image; a size change goes through it. Refuses
    /// with QEMU's messages, where QEMU refuses, before changing anything.
    func amend(_ options: [(name: String, value: String)], node: BlockNode,
               progress: (Int64, Int64) -> Void) async throws(BlockError)
}

/// QEMU's bdrv_make_empty: drops every allocation of the image, so reads
/// fall through to the backing file (after a commit).
public protocol Emptiable: BlockDriver {
    /// Requires a writable image that no one else is using.
    func makeEmpty() async throws(BlockError)
}

public extension BlockNode {
    /// QEMU's bdrv_get_info for this node: its driver's answer; a filter
    /// without one answers for its filtered child; nil: none.
    func driverInfo() async -> BlockDriverInfo? {
        if let d = driver as? any DriverInfoProvider { return await d.driverInfo() }
        if let c = filteredChild { return await c.node.driverInfo() }
        return nil
    }
}
