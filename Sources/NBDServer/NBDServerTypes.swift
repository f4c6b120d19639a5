#if canImport(Glibc)
import Glibc
#endif
import BlockCore
import ServerKit

/// Configuration of one export (QAPI BlockExportOptionsNbd, reduced to what
/// the server itself needs; bitmap lookup is the daemon's job).
public struct NBDExportConfig: Sendable {
    /// Export name as clients ask for it (unique, ≤ 4096 bytes).
    public var name: String
    /// NBD_INFO_DESCRIPTION / LIST text, sent only when set (≤ 4096 bytes).
    public var description: String?
    public var backend: any NBDBackend
    public var writable: Bool
    /// Offer `qemu:allocation-depth`.
    public var allocationDepth: Bool
    /// Offer `qemu:dirty-bitmap:NAME` for each, in this order.
    public var bitmaps: [String]

    public init(name: String, description: String? = nil, backend: any NBDBackend, writable: Bool = false,
                allocationDepth: Bool = false, bitmaps: [String] = []) {
        self.name = name
        self.description = description
        self.backend = backend
        self.writable = writable
        self.allocationDepth = allocationDepth
        self.bitmaps = bitmaps
    }
}

/// QAPI BlockExportRemoveMode.
public enum NBDExportRemoveMode: Sendable {
    /// Refuse while clients are connected.
    case safe
    /// Disconnect the clients.
    case hard
}

/// QEMU's texts for the server's control errors (all GenericError in QMP).
enum NBDServerErrors {
    static var alreadyRunning: BlockError { BlockError(.busy, errno: EBUSY, "NBD server already running") }
    static var notRunning: BlockError { BlockError.invalid("NBD server not running") }
    static func exists(_ name: String) -> BlockError {
        BlockError(.busy, errno: EEXIST, "NBD server already has export named '\(name)'")
    }
    static func notFound(_ name: String) -> BlockError {
        BlockError(.notFound, errno: ENOENT, "Export '\(name)' is not found")
    }
    /// QEMU adds the hint "Use mode='hard' to force client disconnect".
    static func inUse(_ name: String) -> BlockError {
        BlockError(.busy, errno: EBUSY, "export '\(name)' still in use")
    }

    /// A failed bind, phrased as QEMU's util/qemu-sockets.c phrases it.
    static func bindFailed(_ address: ListenAddress, errno code: Int32) -> BlockError {
        switch address {
        case .unix(let path):
            return BlockError.posix(code, "Failed to bind socket to \(path)")
        case .inet:
            return BlockError.posix(code, code == EADDRINUSE ? "Failed to find an available port" : "Failed to bind socket")
        }
    }
}
