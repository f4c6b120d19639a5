import BlockCore
import ServerKit

/// One extent of a metadata context reply (NBD_REPLY_TYPE_BLOCK_STATUS).
public struct NBDExtent: Sendable, Equatable {
    public var length: UInt32
    public var flags: UInt32
    public init(length: UInt32, flags: UInt32) {
        self.length = length
        self.flags = flags
    }
}

/// The metadata contexts a backend can be asked about (NBD_CMD_BLOCK_STATUS).
/// Which ones an export offers is decided by its `NBDExportConfig`.
public enum NBDMetaContextKind: Sendable, Equatable, Hashable {
    /// "base:allocation": flags NBD_STATE_HOLE (1), NBD_STATE_ZERO (2).
    case baseAllocation
    /// "qemu:allocation-depth": 0 unallocated, 1 this layer, N the Nth layer.
    case allocationDepth
    /// "qemu:dirty-bitmap:NAME": flag 1 = dirty.
    case dirtyBitmap(String)
}

/// What an NBD export serves: the block layer side of an export, written
/// so that the NBD server needs nothing else (the daemon adapts a
/// `BlockNode`; tests use an in-memory backend).
///
/// Threading: every I/O method is called from a task whose executor
/// preference is `executor` (the export's home loop), so a backend whose I/O
/// is synchronous on that thread answers without a thread hop. Requests of
/// one connection run concurrently (up to 16) and may overlap; the backend
/// serialises what it must.
///
/// Buffers passed in are owned by the server and valid only for the
/// duration of the call; they are never larger than 32 MiB. Offsets and
/// lengths are already checked against the size the export was created with.
///
/// Errors: throw `BlockError`; its errno is translated to the NBD error by
/// QEMU's table (`NBDError(_:)`).
public protocol NBDBackend: AnyObject, Sendable {
    /// The size in bytes. Read once, when the export is added (QEMU forbids
    /// resizing an exported node); exported rounded down to 512 bytes.
    var size: Int64 { get }
    /// The loop on which requests for this backend run.
    var executor: EventLoopExecutor { get }
    /// Where NBD_CMD_READ for [offset, offset+length) runs. Default:
    /// `executor`. A backend whose reads are thread-safe may spread them
    /// over I/O threads so that several reads are in flight while the loop
    /// sends replies (QEMU's thread pool for a connection's preads).
    func readExecutor(offset: Int64, length: Int) -> any TaskExecutor
    /// Whether concurrent connections see a consistent view with one flush
    /// (NBD_FLAG_CAN_MULTI_CONN is advertised only if this is true and the
    /// server's max-connections is not 1, QEMU 7.2's rule).
    var canMultiConn: Bool { get }
    /// The node's request alignment (NBD_INFO_BLOCK_SIZE minimum when the
    /// client asks for block sizes). Default 1.
    var requestAlignment: UInt32 { get }
    /// The node's maximum transfer (NBD_INFO_BLOCK_SIZE maximum is the
    /// smaller of this and 32 MiB). Default: unlimited.
    var maxTransfer: UInt32 { get }

    func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws(BlockError)
    func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, fua: Bool) async throws(BlockError)
    /// NBD_CMD_WRITE_ZEROES; `mayTrim` is the inverse of NBD_CMD_FLAG_NO_HOLE.
    /// With `fastZero` (NBD_CMD_FLAG_FAST_ZERO, always advertised on
    /// writable exports as QEMU does) the backend must fail with ENOTSUP
    /// instead of falling back to a slow write.
    func writeZeroes(at offset: Int64, length: Int64, mayTrim: Bool, fastZero: Bool, fua: Bool) async throws(BlockError)
    /// NBD_CMD_TRIM (advisory; a backend may do nothing). `fua`: flush after.
    func trim(at offset: Int64, length: Int64, fua: Bool) async throws(BlockError)
    func flush() async throws(BlockError)
    /// NBD_CMD_CACHE: prefetch (may be a no-op).
    func cache(at offset: Int64, length: Int64) async throws(BlockError)
    /// Extents covering at least the first byte of [offset, offset+length),
    /// never beyond it, for one context. The server calls again for the
    /// rest and merges equal neighbours.
    func blockStatus(_ context: NBDMetaContextKind, at offset: Int64, length: Int64) async throws(BlockError) -> [NBDExtent]
    /// For sparse structured reads: whether [offset, offset+length) starts
    /// with a run that reads as zeroes, and how long the run (zero or data)
    /// is (at least 1 byte, at most `length`). Backends that cannot tell
    /// return (false, length).
    func zeroRun(at offset: Int64, length: Int64) async throws(BlockError) -> (isZero: Bool, length: Int64)
}

extension NBDBackend {
    public func readExecutor(offset: Int64, length: Int) -> any TaskExecutor { executor }
    public var requestAlignment: UInt32 { 1 }
    public var maxTransfer: UInt32 { UInt32.max }
}
