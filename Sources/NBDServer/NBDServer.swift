import BlockCore
import NBDProtocol
import NIOCore
import NIOPosix
import ServerKit
import Synchronization

/// The NBD server of the storage daemon (QEMU's `nbd-server-start` plus
/// NBD exports), speaking fixed-newstyle NBD as QEMU 7.2 does.
///
/// Control methods may be called from any thread or task; the daemon calls
/// them from its QMP handlers. Connections are accepted and served on the
/// main loop of `loops`; each request runs as a task preferring its
/// backend's executor, so when the export lives on the main loop a request
/// never changes thread.
///
/// Lifecycle: `start` → (`addExport`/`removeExport`)* → `stop`; one listener
/// at a time. Exports outlive `stop` (the caller removes them, as QEMU's
/// `nbd-server-stop` does through the export layer).
public final class NBDServer: Sendable {
    public let loops: DaemonLoops
    /// Requests one connection may have in flight before the server stops
    /// reading its socket (QEMU: 16).
    public let maxRequestsPerConnection: Int
    let state: Mutex<ServerState>

    public init(loops: DaemonLoops, maxRequestsPerConnection: Int = NBDLimits.maxRequestsPerClient) {
        precondition(maxRequestsPerConnection > 0)
        self.loops = loops
        self.maxRequestsPerConnection = maxRequestsPerConnection
        self.state = Mutex(ServerState())
    }

    /// Called (on a loop thread, without locks held) once a removed export's
    /// last client is gone: the daemon emits BLOCK_EXPORT_DELETED then.
    public var onExportClosed: @Sendable (String) -> Void {
        get { state.withLock { $0.onExportClosed } }
        set { state.withLock { $0.onExportClosed = newValue } }
    }

    /// Receives QEMU's diagnostics for dropped clients ("option negotiation
    /// failed: ...", "Disconnect client, due to: ..."); QEMU prints them on stderr.
    public var errorReporter: (@Sendable (String) -> Void)? {
        get { state.withLock { $0.errorReporter } }
        set { state.withLock { $0.errorReporter = newValue } }
    }

    public var isRunning: Bool { state.withLock { $0.listener != nil } }

    /// The bound address (useful with TCP port 0).
    public var localAddress: SocketAddress? { state.withLock { $0.listener?.localAddress } }

    /// Starts listening. `maxConnections` 0 means unlimited; when that many
    /// clients are connected, the server stops accepting (new clients wait
    /// in the backlog), as QEMU 7.2 does.
    public func start(address: ListenAddress, maxConnections: Int = 0) async throws(BlockError) {
        precondition(maxConnections >= 0)
        try state.withLock { (s) throws(BlockError) in
            if s.listener != nil || s.starting { throw NBDServerErrors.alreadyRunning }
            s.starting = true
            s.maxConnections = maxConnections
        }
        let target: SocketAddress
        do {
            guard let first = try address.resolve().first else { throw ListenError("no address for \(address)") }
            target = first
        } catch {
            state.withLock { $0.starting = false }
            throw BlockError.invalid("\(error)")
        }
        unlinkSocketPath(address)
        do {
            let loop = loops.main.eventLoop
            let channel = try await ServerBootstrap(group: loop, childGroup: loop)
                .serverChannelOption(ChannelOptions.backlog, value: 128)
                .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
                .serverChannelOption(ChannelOptions.maxMessagesPerRead, value: maxConnections > 0 ? 1 : 4)
                .serverChannelInitializer { [self] ch in
                    ch.eventLoop.makeCompletedFuture {
                        try ch.pipeline.syncOperations.addHandler(AcceptLimiter(server: self))
                    }
                }
                .childChannelOption(ChannelOptions.maxMessagesPerRead, value: 1)
                .childChannelOption(ChannelOptions.recvAllocator,
                                    value: AdaptiveRecvByteBufferAllocator(minimum: 1024, initial: 65536, maximum: 1 << 20))
                .childChannelOption(ChannelOptions.writeBufferWaterMark,
                                    value: ChannelOptions.Types.WriteBufferWaterMark(low: 1 << 20, high: 4 << 20))
                .childChannelInitializer { [self] ch in
                    ch.eventLoop.makeCompletedFuture {
                        try ch.pipeline.syncOperations.addHandler(NBDConnection(server: self))
                    }
                }
                .bind(to: target).get()
            state.withLock { s in
                s.listener = channel
                s.starting = false
            }
        } catch {
            state.withLock { $0.starting = false }
            if let io = error as? IOError { throw NBDServerErrors.bindFailed(address, errno: io.errnoCode) }
            throw BlockError.invalid("Failed to listen on \(address): \(error)")
        }
    }

    /// Closes the listener and every client connection (requests in flight
    /// still complete against their backends).
    public func stop() async {
        let (listener, clients): ((any Channel)?, [any Channel]) = state.withLock { s in
            let l = s.listener
            s.listener = nil
            s.acceptPaused = false
            return (l, Array(s.connections.values))
        }
        if let listener { try? await listener.close() }
        for c in clients {
            c.close(promise: nil)
            try? await c.closeFuture.get()
        }
    }

    /// Adds an export (QEMU `nbd_export_create` checks and flags). Clients
    /// can join it as soon as this returns.
    @discardableResult
    public func addExport(_ config: NBDExportConfig) throws(BlockError) -> NBDExportInfo {
        let running = isRunning
        if !running { throw NBDServerErrors.notRunning }
        if config.name.utf8.count > NBDLimits.maxString {
            throw BlockError.invalid("export name '\(config.name)' too long")
        }
        if let d = config.description, d.utf8.count > NBDLimits.maxString {
            throw BlockError.invalid("description '\(d)' too long")
        }
        let backend = config.backend
        let size = UInt64(max(0, backend.size)) & ~511
        return try state.withLock { (s) throws(BlockError) in
            if s.listener == nil { throw NBDServerErrors.notRunning }
            if s.visibleExport(named: Array(config.name.utf8)) != nil { throw NBDServerErrors.exists(config.name) }
            let flags = NBDTransmissionFlags.qemu(writable: config.writable,
                                                  multiConn: backend.canMultiConn && s.maxConnections != 1)
            let info = NBDExportInfo(id: s.nextExportID, name: config.name, description: config.description,
                                     size: size, flags: flags, requestAlignment: max(1, backend.requestAlignment),
                                     maximumBlockSize: min(backend.maxTransfer, NBDLimits.maxBuffer),
                                     allocationDepth: config.allocationDepth, bitmaps: config.bitmaps)
            s.nextExportID += 1
            s.exports[info.id] = ExportRecord(info: info, backend: backend)
            s.visible.append(info.id)
            return info
        }
    }

    /// Removes an export: new clients no longer find it, at once. `.safe`
    /// refuses while clients are connected; `.hard` disconnects them.
    /// `onExportClosed` follows when its last client is gone (immediately
    /// if there is none).
    public func removeExport(name: String, mode: NBDExportRemoveMode) throws(BlockError) {
        typealias Outcome = (toClose: [any Channel], closedNow: (@Sendable (String) -> Void)?)
        let result: Outcome = try state.withLock { (s) throws(BlockError) -> Outcome in
            guard let id = s.visibleExport(named: Array(name.utf8)), var rec = s.exports[id] else {
                throw NBDServerErrors.notFound(name)
            }
            if mode == .safe && !rec.clients.isEmpty { throw NBDServerErrors.inUse(name) }
            s.visible.removeAll { $0 == id }
            if rec.clients.isEmpty {
                s.exports[id] = nil
                return ([], s.onExportClosed)
            }
            rec.removed = true
            s.exports[id] = rec
            return (rec.clients.compactMap { s.connections[$0] }, nil)
        }
        for c in result.toClose { c.close(promise: nil) }
        result.closedNow?(name)
    }

    /// Names of the exports clients can find, in the order they were added.
    public func exportNames() -> [String] {
        state.withLock { s in s.visible.compactMap { s.exports[$0]?.info.name } }
    }

    /// Clients still attached to exports named `name`, including a removed
    /// one whose clients have not finished yet (0 once `onExportClosed` ran).
    public func clientCount(export name: String) -> Int {
        state.withLock { s in s.exports.values.reduce(0) { $0 + ($1.info.name == name ? $1.clients.count : 0) } }
    }
}

/// First handler of the listening channel: counts accepted connections
/// and stops accepting at max-connections (QEMU's `nbd_update_server_watch`).
final class AcceptLimiter: ChannelInboundHandler {
    typealias InboundIn = any Channel
    typealias InboundOut = any Channel
    let server: NBDServer

    init(server: NBDServer) { self.server = server }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let child = unwrapInboundIn(data)
        if server.connectionAccepted(child) {
            context.channel.setOption(ChannelOptions.autoRead, value: false).whenComplete { _ in }
        }
        let server = self.server
        child.closeFuture.whenComplete { _ in server.connectionClosed(child) }
        context.fireChannelRead(data)
    }
}
