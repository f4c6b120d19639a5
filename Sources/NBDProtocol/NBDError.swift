#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import BlockCore

/// An error value on the wire (the NBD protocol's own numbering, which is
/// Linux's for the values it defines).
public struct NBDError: RawRepresentable, Sendable, Hashable, CustomStringConvertible {
    public var rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    public static let success = NBDError(rawValue: 0)
    public static let eperm = NBDError(rawValue: 1)
    public static let eio = NBDError(rawValue: 5)
    public static let enomem = NBDError(rawValue: 12)
    public static let einval = NBDError(rawValue: 22)
    public static let enospc = NBDError(rawValue: 28)
    public static let eoverflow = NBDError(rawValue: 75)
    public static let enotsup = NBDError(rawValue: 95)
    public static let eshutdown = NBDError(rawValue: 108)

    /// `nbd_err_lookup`.
    public var description: String {
        switch self {
        case .success: return "success"
        case .eperm: return "EPERM"
        case .eio: return "EIO"
        case .enomem: return "ENOMEM"
        case .einval: return "EINVAL"
        case .enospc: return "ENOSPC"
        case .eoverflow: return "EOVERFLOW"
        case .enotsup: return "ENOTSUP"
        case .eshutdown: return "ESHUTDOWN"
        default: return "<unknown>"
        }
    }

    /// The translation table at the boundary: QEMU's
    /// `system_errno_to_nbd_errno` (anything unlisted becomes EINVAL).
    public init(errno code: Int32) {
        switch code {
        case 0: self = .success
        case EPERM, EROFS: self = .eperm
        case EIO: self = .eio
        case ENOMEM: self = .enomem
        case EDQUOT, EFBIG, ENOSPC: self = .enospc
        case EOVERFLOW: self = .eoverflow
        case ENOTSUP, EOPNOTSUPP: self = .enotsup
        case ESHUTDOWN: self = .eshutdown
        default: self = .einval
        }
    }

    /// A block-layer error on the wire: its errno through the table above,
    /// or, for an error that carries no errno, the errno its kind stands for.
    public init(_ error: BlockError) {
        if error.errno != 0 {
            self.init(errno: error.errno)
            return
        }
        switch error.kind {
        case .io, .corrupt: self = .eio
        case .permissionDenied: self = .eperm
        case .notSupported, .unsupportedFeature: self = .enotsup
        case .cancelled: self = .eshutdown
        case .invalidArgument, .outOfRange, .notFound, .busy: self = .einval
        }
    }
}
