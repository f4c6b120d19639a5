import BlockCore
import BlockIO

/// What a driver reports for a range, for this layer only (QEMU's
/// `bdrv_co_block_status`): return `allocated == false` (and no data/zero) to
/// defer to the backing layer.
public struct BlockStatus: Sendable, Equatable {
    public struct Flags: OptionSet, Sendable, Hashable {
        public let rawValue: UInt8
        public init(rawValue: UInt8) { self.rawValue = rawValue }
        /// Reading returns data from this layer (or a lower one if not `allocated`).
        public static let data = Flags(rawValue: 1 << 0)
        /// Reading returns zeroes.
        public static let zero = Flags(rawValue: 1 << 1)
        /// `hostOffset` is valid: the bytes live at that offset of `hostNode`.
        public static let offsetValid = Flags(rawValue: 1 << 2)
        /// The range is allocated in this layer (set by the generic layer for data|zero).
        public static let allocated = Flags(rawValue: 1 << 3)
        /// The range lies at or past the end of the node.
        public static let eof = Flags(rawValue: 1 << 4)
        /// Ask the protocol layer (hostNode) whether the host range is a hole.
        public static let recurse = Flags(rawValue: 1 << 5)
        /// The data is stored compressed (offset not directly usable).
        public static let compressed = Flags(rawValue: 1 << 6)
    }

    public var flags: Flags
    /// Bytes from the queried offset with this same status (> 0 unless at EOF).
    public var length: Int64
    public var hostOffset: Int64
    /// The node `hostOffset` refers to (the protocol child), if any.
    public var hostNode: BlockNode?

    public init(flags: Flags, length: Int64, hostOffset: Int64 = 0, hostNode: BlockNode? = nil) {
        self.flags = flags
        self.length = length
        self.hostOffset = hostOffset
        self.hostNode = hostNode
    }

    public static func == (a: BlockStatus, b: BlockStatus) -> Bool {
        a.flags == b.flags && a.length == b.length && a.hostOffset == b.hostOffset && a.hostNode === b.hostNode
    }
}

public struct WriteFlags: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// Force unit access: durable before the call returns.
    public static let fua = WriteFlags(rawValue: 1 << 0)
    /// write-zeroes may deallocate (NBD's absence of NO_HOLE; QEMU's BDRV_REQ_MAY_UNMAP).
    public static let mayUnmap = WriteFlags(rawValue: 1 << 1)
    /// write-zeroes must be fast or fail with notSupported (NBD FAST_ZERO).
    public static let noFallback = WriteFlags(rawValue: 1 << 2)
    /// QEMU's BDRV_REQ_WRITE_COMPRESSED: whole clusters (the image's last
    /// may be partial), not allocated yet, written compressed. Only
    /// drivers whose `supportedWriteFlags` contain it get it.
    public static let compressed = WriteFlags(rawValue: 1 << 3)
}

/// Flags of a read (QEMU's BdrvRequestFlags for reads).
public struct ReadFlags: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// QEMU's BDRV_REQ_COPY_ON_READ: what the node reads from its backing
    /// chain is written into the node, atomically with other requests
    /// (the generic layer serialises the clusters it covers).
    public static let copyOnRead = ReadFlags(rawValue: 1 << 0)
}

/// A driver's transfer limits (QEMU's BlockLimits); 0 means no limit. The
/// generic layer splits requests to honour them; a node also honours the
/// limits of the children that hold its data.
public struct BlockLimits: Sendable, Equatable {
    public var maxTransfer: Int64 = 0
    public var maxWriteZeroes: Int64 = 0
    public var maxDiscard: Int64 = 0
    public init(maxTransfer: Int64 = 0, maxWriteZeroes: Int64 = 0, maxDiscard: Int64 = 0) {
        self.maxTransfer = maxTransfer
        self.maxWriteZeroes = maxWriteZeroes
        self.maxDiscard = maxDiscard
    }

    /// QEMU's bdrv_merge_limits: the stricter of each.
    public func merged(with o: BlockLimits) -> BlockLimits {
        func m(_ a: Int64, _ b: Int64) -> Int64 { a == 0 ? b : (b == 0 ? a : min(a, b)) }
        return BlockLimits(maxTransfer: m(maxTransfer, o.maxTransfer), maxWriteZeroes: m(maxWriteZeroes, o.maxWriteZeroes),
                           maxDiscard: m(maxDiscard, o.maxDiscard))
    }
}

/// QAPI BlkdebugEvent: points in drivers where the blkdebug filter below
/// them can inject errors (QEMU's BLKDBG_EVENT).
public enum BlkdebugEvent: String, Sendable, CaseIterable {
    case l1Update = "l1_update", l1GrowAllocTable = "l1_grow_alloc_table", l1GrowWriteTable = "l1_grow_write_table"
    case l1GrowActivateTable = "l1_grow_activate_table", l2Load = "l2_load", l2Update = "l2_update"
    case l2UpdateCompressed = "l2_update_compressed", l2AllocCowRead = "l2_alloc_cow_read", l2AllocWrite = "l2_alloc_write"
    case readAio = "read_aio", readBackingAio = "read_backing_aio", readCompressed = "read_compressed", writeAio = "write_aio"
    case writeCompressed = "write_compressed", vmstateLoad = "vmstate_load", vmstateSave = "vmstate_save", cowRead = "cow_read"
    case cowWrite = "cow_write", reftableLoad = "reftable_load", reftableGrow = "reftable_grow", reftableUpdate = "reftable_update"
    case refblockLoad = "refblock_load", refblockUpdate = "refblock_update", refblockUpdatePart = "refblock_update_part"
    case refblockAlloc = "refblock_alloc", refblockAllocHookup = "refblock_alloc_hookup", refblockAllocWrite = "refblock_alloc_write"
    case refblockAllocWriteBlocks = "refblock_alloc_write_blocks", refblockAllocWriteTable = "refblock_alloc_write_table"
    case refblockAllocSwitchTable = "refblock_alloc_switch_table", clusterAlloc = "cluster_alloc"
    case clusterAllocBytes = "cluster_alloc_bytes", clusterFree = "cluster_free", flushToOS = "flush_to_os"
    case flushToDisk = "flush_to_disk", pwritevRmwHead = "pwritev_rmw_head", pwritevRmwAfterHead = "pwritev_rmw_after_head"
    case pwritevRmwTail = "pwritev_rmw_tail", pwritevRmwAfterTail = "pwritev_rmw_after_tail", pwritev = "pwritev"
    case pwritevZero = "pwritev_zero", pwritevDone = "pwritev_done", emptyImagePrepare = "empty_image_prepare"
    case l1ShrinkWriteTable = "l1_shrink_write_table", l1ShrinkFreeL2Clusters = "l1_shrink_free_l2_clusters"
    case corWrite = "cor_write", clusterAllocSpace = "cluster_alloc_space", none
}

/// The driver contract (QEMU's `BlockDriver`), one for protocol, format and
/// filter drivers.
///
/// The generic layer (`BlockNode`) guarantees before any call: the range is
/// inside the node (writes of growable protocol nodes excepted), offset and
/// length are multiples of `requestAlignment`, the node is writable for
/// writing calls, and zero-length requests never arrive. Buffers belong to
/// the caller and are valid only until the call returns.
///
/// Threading: I/O methods are nonisolated async and run on the caller's
/// executor (an `IOThread`); they may block briefly in host syscalls.
public protocol BlockDriver: AnyObject, Sendable {
    /// "file", "raw", "qcow2", ...
    var formatName: String { get }
    /// Current virtual size in bytes.
    var length: Int64 { get }
    /// Offsets and lengths must be multiples of this (1 for most drivers).
    var requestAlignment: Int { get }
    /// Buffers must start at addresses aligned to this.
    var memoryAlignment: Int { get }
    /// Protocol drivers whose writes may extend the node (host files).
    var growable: Bool { get }
    /// The edges to the children the driver uses, in the order they were
    /// attached (file before backing). The driver reaches its children
    /// only through these edges (their node can be replaced).
    var children: [BlockChild] { get }
    /// A filter passes everything to its filtered child (QEMU's is_filter).
    var isFilter: Bool { get }
    /// Format drivers with a backing file (qcow2): unallocated ranges read
    /// from the backing node, or as zeroes without one.
    var supportsBacking: Bool { get }

    func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws(BlockError)
    func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws(BlockError)
    func writeZeroes(at offset: Int64, length: Int64, flags: WriteFlags) async throws(BlockError)
    func discard(at offset: Int64, length: Int64) async throws(BlockError)
    func flush() async throws(BlockError)
    /// Status of this layer only, starting at `offset`, for at most `length` bytes.
    /// Filters answer for their filtered child (its node's status), the
    /// generic layer returns that answer unchanged.
    func blockStatus(at offset: Int64, length: Int64) async throws(BlockError) -> BlockStatus
    /// Writes bytes taken from a host file, if the driver can do it without
    /// a bounce buffer; false means "not supported here, use a buffer". Same
    /// preconditions as `write`.
    func copyIn(at offset: Int64, from host: HostFile, sourceOffset: Int64, length: Int,
                flags: WriteFlags) async throws(BlockError) -> Bool
    /// Protocol drivers: make the node at least `length` long ahead of
    /// writes that will fill it (writes inside a file are cheaper for the
    /// host than writes that extend it). No-op elsewhere.
    func reserveSpace(upTo length: Int64) async throws(BlockError)
    /// Undoes `reserveSpace` past the last byte actually written.
    func releaseUnusedSpace() async throws(BlockError)
    /// Changes the size (growing or shrinking); a grown range is
    /// preallocated as `preallocation` says.
    func truncate(to length: Int64, preallocation: Preallocation) async throws(BlockError)
    /// Flushes and releases everything. No I/O may follow.
    func close() async throws(BlockError)
    /// Reopen read-only: write now what a clean close would write; no
    /// write follows (nor any at close). Default: nothing to do.
    func settleForReadOnly() async throws(BlockError)
    /// Reopen read-write (QEMU's bdrv_reopen_set_read_only(bs, false)):
    /// children first, then whatever the driver needs to write again.
    func reopenForWriting() async throws(BlockError)
    /// Starts writeback of data written so far, without waiting (a hint
    /// that a flush will follow). Default: pass it to the file child.
    func startWriteback() async

    /// Called once the node wrapping the driver exists (its child edges are
    /// attached). Default: nothing.
    func attached(to node: BlockNode)
    /// QEMU's bdrv_child_perm: the permissions this driver takes on
    /// `child` and shares with others, given what the node's own users
    /// take (`perm`) and share (`shared`). Default: by the child's role
    /// (QEMU's bdrv_default_perms).
    func childPermissions(for child: BlockChild, node: BlockNode, perm: BlockPermissions,
                          shared: BlockPermissions) -> (BlockPermissions, BlockPermissions)
    /// QEMU's bdrv_check_perm/bdrv_set_perm for the node itself: what its
    /// users take and share now. Protocol drivers apply it (image locks);
    /// throw, changing nothing, when it cannot be granted. Returns how to
    /// restore the previous state (nil: nothing changed). Default: nothing.
    func setPermissions(_ perm: BlockPermissions, shared: BlockPermissions) throws(BlockError) -> (@Sendable () -> Void)?
    /// Write flags the driver handles beyond fua/mayUnmap/noFallback
    /// (QEMU's supported_write_flags). Default: none.
    var supportedWriteFlags: WriteFlags { get }
    /// The driver's own transfer limits. Default: none.
    var limits: BlockLimits { get }
    /// QEMU's bdrv_debug_event, called by a parent driver on this child at
    /// the points `BlkdebugEvent` names. Default: nothing (only blkdebug acts).
    func debugEvent(_ event: BlkdebugEvent)
    /// Filters: forget the filtered child (QEMU's detach of the subchain
    /// when a filter is dropped); `children` no longer lists it.
    func removeChild(_ child: BlockChild)
}

public extension BlockDriver {
    func startWriteback() async {
        if let f = children.first(where: { $0.name == "file" })?.node { await f.startWriteback() }
    }
    var isFilter: Bool { false }
    var limits: BlockLimits { BlockLimits() }
    var supportedWriteFlags: WriteFlags { [] }
    func debugEvent(_ event: BlkdebugEvent) {}
    func attached(to node: BlockNode) {}
    func removeChild(_ child: BlockChild) {
        preconditionFailure("\(formatName) cannot drop its child '\(child.name)'")
    }
    func childPermissions(for child: BlockChild, node: BlockNode, perm: BlockPermissions,
                          shared: BlockPermissions) -> (BlockPermissions, BlockPermissions) {
        defaultChildPermissions(role: child.role, writable: !node.readOnly, perm: perm, shared: shared)
    }
    func setPermissions(_ perm: BlockPermissions, shared: BlockPermissions) throws(BlockError) -> (@Sendable () -> Void)? {
        nil
    }
    func settleForReadOnly() async throws(BlockError) {}
    func reopenForWriting() async throws(BlockError) {
        throw BlockError(.notSupported, errno: 95, "Driver '\(formatName)' cannot be reopened read-write")
    }
    var requestAlignment: Int { 1 }
    var memoryAlignment: Int { 1 }
    var growable: Bool { false }
    var supportsBacking: Bool { false }
    func reserveSpace(upTo length: Int64) async throws(BlockError) {}
    func releaseUnusedSpace() async throws(BlockError) {}
    func copyIn(at offset: Int64, from host: HostFile, sourceOffset: Int64, length: Int,
                flags: WriteFlags) async throws(BlockError) -> Bool { false }
    func truncate(to length: Int64, preallocation: Preallocation) async throws(BlockError) {
        throw .unsupported("Image format driver does not support resize")
    }
}

/// Format drivers with a backing file (qcow2): the backing edge is set by
/// the generic layer (`BlockNode.setBacking`), the name in the header by
/// `changeBackingFile`.
public protocol BackingDriver: BlockDriver {
    /// The backing file name the image header records (nil: none).
    var backingFileName: String? { get }
    /// The backing format the header records.
    var backingFormat: String? { get }
    /// Installs the backing edge (nil: none). Only `BlockNode.setBacking` calls it.
    func setBackingChild(_ child: BlockChild?)
    /// QEMU's bdrv_change_backing_file: rewrites the header's backing file
    /// name and format (nil: no backing file).
    func changeBackingFile(_ name: String?, format: String?) async throws(BlockError)
    /// The errno `changeBackingFile(name, format:)` would fail with (0: it
    /// would succeed), so a caller can refuse before changing anything.
    /// Changes nothing.
    func backingChangeErrno(_ name: String?, format: String?) async -> Int32
}

/// Filters that decide what a prefetch (QEMU's BDRV_REQ_PREFETCH) does
/// with their child (copy-on-read: copy what the chain holds).
public protocol PrefetchingDriver: BlockDriver {
    func prefetch(at offset: Int64, length: Int64) async throws(BlockError)
}

/// Drivers that sit directly on a host file and can say how much of it is
/// really allocated (for "disk size" and preallocation detection).
public protocol HostBackedDriver: BlockDriver {
    func allocatedBytes() throws(BlockError) -> Int64
}

/// QEMU's PreallocMode.
public enum Preallocation: String, Sendable, CaseIterable {
    case off, metadata, falloc, full
}
