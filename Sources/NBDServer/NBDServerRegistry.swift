import NBDProtocol
import NIOCore
import Synchronization

/// An export as a connection sees it once attached.
struct AttachedExport: Sendable {
    let info: NBDExportInfo
    let backend: any NBDBackend
}

/// One export known to the server. Mutated only under `NBDServer.state`.
struct ExportRecord {
    let info: NBDExportInfo
    let backend: any NBDBackend
    /// Connections that joined it (GO / EXPORT_NAME) and have not yet
    /// finished (closed and with no request in flight).
    var clients: Set<ObjectIdentifier> = []
    /// Removed: invisible to new clients, alive until its last client ends.
    var removed = false
}

/// Everything the server shares between the control API (any thread) and
/// its connections (event loops). Low-rate: no request touches it.
struct ServerState: ~Copyable {
    var listener: (any Channel)?
    var starting = false
    var maxConnections = 0
    /// Every accepted connection, negotiated or not (QEMU counts both).
    var connections: [ObjectIdentifier: any Channel] = [:]
    var acceptPaused = false
    var exports: [UInt64: ExportRecord] = [:]
    /// Ids of the exports clients can find, in the order they were added.
    var visible: [UInt64] = []
    var nextExportID: UInt64 = 1
    var onExportClosed: @Sendable (String) -> Void = { _ in }
    var errorReporter: (@Sendable (String) -> Void)?

    func visibleExport(named name: [UInt8]) -> UInt64? {
        visible.first { exports[$0]?.info.name.utf8.elementsEqual(name) == true }
    }
}

extension NBDServer {
    // MARK: Connection bookkeeping (called from event loops)

    /// A connection was accepted. Returns true when the listener must stop
    /// accepting (max-connections reached).
    func connectionAccepted(_ channel: any Channel) -> Bool {
        state.withLock { s in
            s.connections[ObjectIdentifier(channel)] = channel
            if s.maxConnections > 0 && s.connections.count >= s.maxConnections && !s.acceptPaused {
                s.acceptPaused = true
                return true
            }
            return false
        }
    }

    /// A connection's socket closed: frees its max-connections slot.
    func connectionClosed(_ channel: any Channel) {
        let resume: (any Channel)? = state.withLock { s in
            s.connections[ObjectIdentifier(channel)] = nil
            if s.acceptPaused && (s.maxConnections == 0 || s.connections.count < s.maxConnections) {
                s.acceptPaused = false
                return s.listener
            }
            return nil
        }
        resume?.setOption(ChannelOptions.autoRead, value: true).whenComplete { _ in }
    }

    /// Joins a visible export (GO / EXPORT_NAME).
    func attach(named name: [UInt8], client: ObjectIdentifier) -> AttachedExport? {
        state.withLock { s in
            guard let id = s.visibleExport(named: name), var rec = s.exports[id] else { return nil }
            rec.clients.insert(client)
            s.exports[id] = rec
            return AttachedExport(info: rec.info, backend: rec.backend)
        }
    }

    /// A client of `exportID` is completely finished (socket closed, no
    /// request in flight). Reports a removed export's end after its last one.
    func detach(exportID: UInt64, client: ObjectIdentifier) {
        let closed: (String, @Sendable (String) -> Void)? = state.withLock { s in
            guard var rec = s.exports[exportID] else { return nil }
            rec.clients.remove(client)
            if rec.removed && rec.clients.isEmpty {
                s.exports[exportID] = nil
                return (rec.info.name, s.onExportClosed)
            }
            s.exports[exportID] = rec
            return nil
        }
        if let (name, callback) = closed { callback(name) }
    }

    func report(_ message: String) {
        let reporter = state.withLock { $0.errorReporter }
        reporter?(message)
    }

    func listVisible() -> [NBDExportInfo] {
        state.withLock { s in s.visible.compactMap { s.exports[$0]?.info } }
    }

    func lookupVisible(named name: [UInt8]) -> NBDExportInfo? {
        state.withLock { s in s.visibleExport(named: name).flatMap { s.exports[$0]?.info } }
    }
}

/// The export directory one connection's handshake sees.
struct ConnectionDirectory: NBDExportDirectory {
    let server: NBDServer
    let client: ObjectIdentifier
    private(set) var attached: AttachedExport?

    init(server: NBDServer, client: ObjectIdentifier) {
        self.server = server
        self.client = client
    }

    func listExports() -> [NBDExportInfo] { server.listVisible() }

    func lookupExport(named name: [UInt8]) -> NBDExportInfo? { server.lookupVisible(named: name) }

    mutating func attachExport(named name: [UInt8]) -> NBDExportInfo? {
        attached = server.attach(named: name, client: client)
        return attached?.info
    }
}
