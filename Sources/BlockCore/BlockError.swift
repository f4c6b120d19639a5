#if canImport(Glibc)
import Glibc
#endif

/// The one error type of the block layer: a stable kind, the POSIX errno the
/// failure corresponds to (used at the NBD/QMP/exit-code boundary), and a
/// human message already phrased the way QEMU phrases it.
///
/// Peer and user mistakes throw a `BlockError`; programmer mistakes trap.
public struct BlockError: Error, Sendable, CustomStringConvertible, Equatable {
    public enum Kind: Sendable, Equatable {
        /// The host I/O failed (EIO, ENOSPC, ...): see `errno`.
        case io
        /// Bad argument from the caller (user, client, option string).
        case invalidArgument
        /// The operation is valid but this node / format cannot do it.
        case notSupported
        /// Write to a read-only node, or permission denied by the host.
        case permissionDenied
        /// The image's metadata is inconsistent; QEMU would "signal corruption".
        case corrupt
        /// The image uses a feature we refuse (unknown incompatible bits ...).
        case unsupportedFeature
        /// A file or node that does not exist.
        case notFound
        /// Someone else holds a conflicting lock or permission.
        case busy
        /// Request outside the node.
        case outOfRange
        /// The operation was cancelled.
        case cancelled
    }

    public var kind: Kind
    public var errno: Int32
    public var message: String

    public init(_ kind: Kind, errno: Int32, _ message: String) {
        self.kind = kind
        self.errno = errno
        self.message = message
    }

    public var description: String { message }

    /// QEMU prefixes errors as they travel outwards: "Could not open 'x': <inner>".
    public func prefixed(_ prefix: String) -> BlockError {
        var copy = self
        copy.message = prefix + message
        return copy
    }

    @inline(never)
    public static func posix(_ errno: Int32, _ context: String? = nil) -> BlockError {
        let kind: Kind
        switch errno {
        case ENOENT: kind = .notFound
        case EACCES, EPERM, EROFS: kind = .permissionDenied
        case EINVAL: kind = .invalidArgument
        case ENOTSUP: kind = .notSupported
        case EAGAIN: kind = .busy
        default: kind = .io
        }
        let text = errnoString(errno)
        return BlockError(kind, errno: errno, context.map { "\($0): \(text)" } ?? text)
    }

    @inline(never)
    public static func invalid(_ message: String) -> BlockError {
        BlockError(.invalidArgument, errno: EINVAL, message)
    }

    @inline(never)
    public static func corrupt(_ message: String) -> BlockError {
        BlockError(.corrupt, errno: EIO, message)
    }

    @inline(never)
    public static func unsupported(_ message: String) -> BlockError {
        BlockError(.notSupported, errno: ENOTSUP, message)
    }

    @inline(never)
    public static func io(_ message: String, errno: Int32 = EIO) -> BlockError {
        BlockError(.io, errno: errno, message)
    }
}

/// `strerror` as glibc spells it ("No such file or directory").
public func errnoString(_ code: Int32) -> String {
    String(cString: strerror(code))
}
