#if canImport(Glibc)
import Glibc
#endif
import LaminaJSON
import NIOCore
import NIOPosix
import ServerKit
import Synchronization

/// QMP monitors on SwiftNIO: one listener per `listen(on:)` (each
/// `--monitor` of the daemon), each serving one client at a time like a
/// QEMU socket chardev with `server=on` (a second client stays in the
/// listen backlog, without greeting, until the first disconnects).
///
/// Thread-safety: all methods may be called from any thread. Commands go
/// to the `QMPDispatcher`; events go to every connection that completed
/// capabilities negotiation. Output to a slow client is buffered per
/// connection and never blocks other monitors.
public final class QMPServer: Sendable {
    private let group: any EventLoopGroup
    private let dispatcher: any QMPDispatcher
    private let configuration: QMPSession.Configuration

    private struct State {
        var listeners: [Listener] = []
        var connections: [UInt64: (NIOLoopBound<QMPConnectionHandler>, QMPEventGate)] = [:]
        var channels: [UInt64: any Channel] = [:]
        var nextConnectionID: UInt64 = 1
        var closed = false
    }

    private let state = Mutex(State())

    /// - Parameters:
    ///   - group: the event loops the sockets use (e.g. `DaemonLoops.group`).
    ///   - version: the greeting's version object (`query-version`'s value).
    ///   - offerOOB: offer the "oob" capability (qemu-storage-daemon does).
    public init(group: any EventLoopGroup, dispatcher: any QMPDispatcher, version: JSON, offerOOB: Bool = true) {
        self.group = group
        self.dispatcher = dispatcher
        self.configuration = QMPSession.Configuration(
            version: version, offerOOB: offerOOB, commands: Set(dispatcher.commandNames),
            oobCommands: Set(dispatcher.outOfBandCommandNames))
    }

    /// Starts a monitor listening on `address`. A stale UNIX socket file is
    /// replaced; the file is removed again by `close()`. Returns the bound
    /// address (the real port when `port` was "0").
    @discardableResult
    public func listen(on address: ListenAddress, monitorID: String? = nil, style: QMPOutputStyle = .compact) async throws -> ListenAddress {
        let listener = Listener(address: address, monitorID: monitorID, style: style)
        unlinkSocketPath(address)
        guard let socketAddress = try address.resolve().first else {
            throw ListenError("Cannot resolve \(address)")
        }
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 16)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { [self] channel in
                channel.eventLoop.makeCompletedFuture {
                    try self.setUp(channel, listener)
                }
            }
        let channel = try await bootstrap.bind(to: socketAddress).get()
        listener.serverChannel.withLock { $0 = channel }
        let alreadyClosed = state.withLock { s -> Bool in
            if !s.closed { s.listeners.append(listener) }
            return s.closed
        }
        if alreadyClosed {
            try? await channel.close()
            throw ListenError("QMP server closed")
        }
        if case .inet(let host, _) = address, let port = channel.localAddress?.port {
            return .inet(host: host, port: String(port))
        }
        return address
    }

    /// Called on the child's event loop while the channel is set up.
    private func setUp(_ channel: any Channel, _ listener: Listener) throws {
        let id = state.withLock { s -> UInt64 in
            defer { s.nextConnectionID += 1 }
            return s.nextConnectionID
        }
        let info = QMPMonitorInfo(monitorID: listener.monitorID, address: listener.address, connectionID: id)
        let handler = QMPConnectionHandler(
            session: QMPSession(configuration), info: info, style: listener.style, dispatcher: dispatcher,
            onClose: { [weak self] id in self?.connectionClosed(id, listener) })
        try channel.pipeline.syncOperations.addHandler(handler)
        guard let bound = handler.loopBound else { return }
        state.withLock { s in
            s.connections[id] = (bound, handler.eventGate)
            s.channels[id] = channel
        }
        if listener.arrive(id, bound) {
            handler.activate()
        }
    }

    private func connectionClosed(_ id: UInt64, _ listener: Listener) {
        state.withLock { s in
            s.connections[id] = nil
            s.channels[id] = nil
        }
        if let next = listener.depart(id) {
            next.eventLoop.execute { next.value.activate() }
        }
    }

    /// Sends `{"timestamp": {...}, "event": name, "data": data}` to every
    /// negotiated connection (`data` omitted when nil), like QEMU's
    /// monitor_qapi_event_emit.
    public func emit(event: String, data: JSON?) {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        var members: [(String, JSON)] = [
            ("event", .string(event)),
            ("timestamp", ["seconds": .int(Int64(ts.tv_sec)), "microseconds": .int(Int64(ts.tv_nsec / 1000))]),
        ]
        if let data { members.append(("data", data)) }
        let message = JSON.object(members)
        let compact = message.qmpLine(.compact)
        let pretty = message.qmpLine(.pretty)
        let targets = state.withLock { Array($0.connections.values) }
        for (bound, gate) in targets where gate.isOpen {
            bound.eventLoop.execute {
                let handler = bound.value
                handler.sendEvent(handler.outputStyle == .pretty ? pretty : compact)
            }
        }
    }

    /// Number of connections that completed negotiation (tests).
    public func negotiatedConnectionCount() async -> Int {
        let targets = state.withLock { Array($0.connections.values) }
        var n = 0
        for (bound, _) in targets {
            let ok = try? await bound.eventLoop.submit { bound.value.negotiated }.get()
            if ok == true { n += 1 }
        }
        return n
    }

    /// Stops listening, closes every connection and removes the UNIX
    /// socket files this server created. Idempotent.
    public func close() async {
        let (listeners, channels) = state.withLock { s -> ([Listener], [any Channel]) in
            s.closed = true
            defer { s.listeners.removeAll() }
            return (s.listeners, Array(s.channels.values))
        }
        for l in listeners {
            if let ch = l.serverChannel.withLock({ $0 }) { try? await ch.close() }
            if case .unix(let path) = l.address { unlink(path) }
        }
        for ch in channels { try? await ch.close() }
    }
}

/// One listening monitor and its single-client gate.
private final class Listener: Sendable {
    let address: ListenAddress
    let monitorID: String?
    let style: QMPOutputStyle
    let serverChannel = Mutex<(any Channel)?>(nil)
    private let gate = Mutex<(active: UInt64?, waiting: [(UInt64, NIOLoopBound<QMPConnectionHandler>)])>((nil, []))

    init(address: ListenAddress, monitorID: String?, style: QMPOutputStyle) {
        self.address = address
        self.monitorID = monitorID
        self.style = style
    }

    /// A client connected; true when it may start now.
    func arrive(_ id: UInt64, _ bound: NIOLoopBound<QMPConnectionHandler>) -> Bool {
        let start = gate.withLock { g -> Bool in
            if g.active == nil { g.active = id; return true }
            g.waiting.append((id, bound))
            return false
        }
        setAccepting(false)
        return start
    }

    /// A client left; returns the next one to start, if any.
    func depart(_ id: UInt64) -> NIOLoopBound<QMPConnectionHandler>? {
        let next = gate.withLock { g -> NIOLoopBound<QMPConnectionHandler>? in
            if g.active == id {
                g.active = nil
                if !g.waiting.isEmpty {
                    let (nid, nb) = g.waiting.removeFirst()
                    g.active = nid
                    return nb
                }
            } else {
                g.waiting.removeAll { $0.0 == id }
            }
            return nil
        }
        if next == nil && gate.withLock({ $0.active == nil }) { setAccepting(true) }
        return next
    }

    /// Keeps further clients in the kernel's backlog while one is served.
    private func setAccepting(_ on: Bool) {
        if let ch = serverChannel.withLock({ $0 }) {
            ch.setOption(.autoRead, value: on).whenComplete { _ in
                if on { ch.read() }
            }
        }
    }
}
