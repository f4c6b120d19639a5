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

/// The metadata contexts a backend can answer (NBD_CMD_BLOCK_STATUS).
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
/// Threading: every method is called from a task whose executor preference
/// is `executor` (the export's home loop), so a backend whose I/O is
/// synchronous on that thread answers without a thread hop. Buffers passed
/// in are owned by the caller and valid only for the duration of the call.
public protocol NBDBackend: AnyObject, Sendable {
    /// The export size in bytes (may change: NBD clients see it at handshake).
    var size: Int64 { get }
    /// The loop on which requests for this backend should run.
    var executor: EventLoopExecutor { get }
    /// Whether TRIM may be advertised (NBD_FLAG_SEND_TRIM).
    var supportsTrim: Bool { get }
    /// Whether the backend can tell cheaply that a zero write would be slow
    /// (NBD_FLAG_SEND_FAST_ZERO); if true `writeZeroes(fastZero: true)` may
    /// fail with `BlockError.Kind.notSupported` instead of writing.
    var supportsFastZero: Bool { get }
    /// Whether concurrent connections see a consistent view with one flush
    /// (NBD_FLAG_CAN_MULTI_CONN).
    var canMultiConn: Bool { get }
    /// The metadata contexts this export offers.
    var metaContexts: [NBDMetaContextKind] { get }

    func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws(BlockError)
    func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, fua: Bool) async throws(BlockError)
    /// NBD_CMD_WRITE_ZEROES; `mayTrim` is the inverse of NBD_CMD_FLAG_NO_HOLE.
    func writeZeroes(at offset: Int64, length: Int64, mayTrim: Bool, fastZero: Bool, fua: Bool) async throws(BlockError)
    func trim(at offset: Int64, length: Int64, fua: Bool) async throws(BlockError)
    func flush() async throws(BlockError)
    /// NBD_CMD_CACHE: prefetch (may be a no-op).
    func cache(at offset: Int64, length: Int64) async throws(BlockError)
    /// Extents covering at least the first byte of [offset, offset+length),
    /// never beyond it, for one context.
    func blockStatus(_ context: NBDMetaContextKind, at offset: Int64, length: Int64) async throws(BlockError) -> [NBDExtent]
    /// For sparse structured reads: whether [offset, offset+length) starts
    /// with a run that reads as zeroes, and how long the run (zero or data)
    /// is. Backends that cannot tell return (false, length).
    func zeroRun(at offset: Int64, length: Int64) async throws(BlockError) -> (isZero: Bool, length: Int64)
}
