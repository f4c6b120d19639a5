#if canImport(Glibc)
import Glibc
#endif
import NIOCore

/// Where a server listens (QAPI SocketAddress, reduced to what the daemon
/// serves on: UNIX paths and TCP host/port).
public enum ListenAddress: Sendable, Equatable, CustomStringConvertible {
    case unix(path: String)
    case inet(host: String, port: String)

    public var description: String {
        switch self {
        case .unix(let path): return "unix:\(path)"
        case .inet(let host, let port): return host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
        }
    }

    /// Resolves to NIO socket addresses (inet may resolve to several).
    public func resolve() throws -> [SocketAddress] {
        switch self {
        case .unix(let path):
            return [try SocketAddress(unixDomainSocketPath: path)]
        case .inet(let host, let port):
            guard let p = Int(port), (0...65535).contains(p) else {
                throw ListenError("Invalid port '\(port)'")
            }
            let h = host.isEmpty ? "0.0.0.0" : host
            return [try SocketAddress.makeAddressResolvingHost(h, port: p)]
        }
    }
}

public struct ListenError: Error, CustomStringConvertible, Sendable {
    public var description: String
    public init(_ d: String) { description = d }
}

/// Removes a stale UNIX socket file before binding (QEMU unlinks it too).
public func unlinkSocketPath(_ address: ListenAddress) {
    if case .unix(let path) = address {
        var st = stat()
        if lstat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFSOCK {
            unlink(path)
        }
    }
}
