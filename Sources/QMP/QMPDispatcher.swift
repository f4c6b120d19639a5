import LaminaJSON
import ServerKit

/// Which monitor a command arrived on.
public struct QMPMonitorInfo: Sendable, Equatable {
    /// The monitor's id (`--monitor id=...`), if any.
    public var monitorID: String?
    /// The address the monitor listens on.
    public var address: ListenAddress
    /// Unique per accepted connection within one `QMPServer`.
    public var connectionID: UInt64

    public init(monitorID: String?, address: ListenAddress, connectionID: UInt64) {
        self.monitorID = monitorID
        self.address = address
        self.connectionID = connectionID
    }
}

/// A command's outcome.
public struct QMPReply: Sendable {
    /// The `return` value, or the error.
    public var result: Result<JSON, QMPError>
    /// Runs once, after the reply's bytes were handed to the socket and
    /// flushed (or at once if the client is gone): `quit` uses it to shut
    /// the daemon down only after the client saw `{"return": {}}`.
    public var afterSend: (@Sendable () -> Void)?

    public init(_ result: Result<JSON, QMPError>, afterSend: (@Sendable () -> Void)? = nil) {
        self.result = result
        self.afterSend = afterSend
    }

    public static func success(_ value: JSON = .emptyObject, afterSend: (@Sendable () -> Void)? = nil) -> QMPReply {
        QMPReply(.success(value), afterSend: afterSend)
    }

    public static func failure(_ error: QMPError) -> QMPReply {
        QMPReply(.failure(error))
    }
}

/// The daemon's command handlers, as seen by `QMPServer`.
///
/// Contract:
/// - `commandNames` lists every command the dispatcher implements. The
///   session answers CommandNotFound for any other name without calling
///   `dispatch`. `qmp_capabilities` is implemented by `QMPSession` and
///   never reaches the dispatcher; the dispatcher implements
///   `query-commands` itself (include "qmp_capabilities" and
///   "query-commands" in its answer; QEMU lists commands in reverse
///   registration order).
/// - `dispatch` is called with a validated request: `arguments` is an
///   object (empty when the request had none). Read it with `QAPIInput`.
/// - Commands of one monitor connection are dispatched one at a time, in
///   order; commands of different connections may run concurrently (a
///   dispatcher that needs QEMU's global ordering serialises them itself,
///   e.g. on a global actor). `dispatch` runs on the Swift concurrency
///   pool, never on a socket's event loop.
public protocol QMPDispatcher: Sendable {
    var commandNames: [String] { get }
    /// Commands allowed with `exec-oob` (QEMU's allow-oob); default none.
    var outOfBandCommandNames: [String] { get }
    func dispatch(_ command: String, arguments: JSON, monitor: QMPMonitorInfo) async -> QMPReply
}

extension QMPDispatcher {
    public var outOfBandCommandNames: [String] { [] }
}

/// The output form of a monitor (`--monitor pretty=on`).
public enum QMPOutputStyle: Sendable, Equatable {
    case compact
    /// QEMU's pretty printer: four-space indent, one member per line.
    case pretty
}

extension JSON {
    /// One QMP line as QEMU sends it: the value, then CR LF (QEMU's monitor
    /// turns every LF into CR LF, including those of the pretty form).
    public func qmpLine(_ style: QMPOutputStyle = .compact) -> [UInt8] {
        var out: [UInt8] = []
        switch style {
        case .compact:
            writeCompact(into: &out)
        case .pretty:
            for b in pretty().utf8 {
                if b == 0x0A { out.append(0x0D) }
                out.append(b)
            }
        }
        out.append(0x0D)
        out.append(0x0A)
        return out
    }
}
