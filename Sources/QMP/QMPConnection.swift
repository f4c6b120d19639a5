import LaminaJSON
import NIOCore
import ServerKit
import Synchronization

/// Whether a connection receives events, readable from any thread: the
/// fan-out decides at emit time (as QEMU does under its monitor lock), not
/// when the write reaches the connection's loop.
final class QMPEventGate: Sendable {
    private let on = Atomic<Bool>(false)
    var isOpen: Bool { on.load(ordering: .acquiring) }
    func set(_ v: Bool) { on.store(v, ordering: .releasing) }
}

/// One monitor connection: runs a `QMPSession` over a NIO channel.
///
/// Thread: every method runs on the channel's event loop (NIO's rule for
/// handlers); commands run in Tasks and hop back with `NIOLoopBound`.
///
/// Flow control follows QEMU: while a command executes, the connection
/// stops reading (QEMU suspends the monitor while a request is queued),
/// so a client can pipeline requests but cannot make the daemon buffer
/// unbounded input. With OOB enabled it keeps reading up to 8 queued
/// requests so `exec-oob` can overtake. A connection that is not yet
/// activated (another client holds the monitor) reads nothing and gets
/// no greeting, like a client waiting in QEMU's listen backlog.
final class QMPConnectionHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private static let maxQueuedWithOOB = 8

    private var session: QMPSession
    private let info: QMPMonitorInfo
    private let style: QMPOutputStyle
    private let dispatcher: any QMPDispatcher
    /// Called once when the channel goes inactive.
    private let onClose: @Sendable (UInt64) -> Void

    private var context: ChannelHandlerContext?
    private var bound: NIOLoopBound<QMPConnectionHandler>?
    private(set) var activated = false
    private var closed = false
    private var queue: [QMPInput] = []
    private var queueHead = 0
    private var running = false
    private var readPending = false
    private var activateWhenActive = false
    let eventGate = QMPEventGate()

    init(session: QMPSession, info: QMPMonitorInfo, style: QMPOutputStyle, dispatcher: any QMPDispatcher,
         onClose: @escaping @Sendable (UInt64) -> Void) {
        self.session = session
        self.info = info
        self.style = style
        self.dispatcher = dispatcher
        self.onClose = onClose
    }

    /// A loop-bound reference for other threads (valid after handlerAdded).
    var loopBound: NIOLoopBound<QMPConnectionHandler>? { bound }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        self.bound = NIOLoopBound(self, eventLoop: context.eventLoop)
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
    }

    /// Starts the QMP conversation: greeting, then reading. Before the
    /// channel is active this is remembered and done on channelActive.
    func activate() {
        guard !activated, !closed, let context else { return }
        guard context.channel.isActive else {
            activateWhenActive = true
            return
        }
        activated = true
        write(session.greeting, flush: true)
        resumeReadingIfAllowed()
    }

    /// Sends an event if negotiation is complete.
    func sendEvent(_ line: [UInt8]) {
        guard activated, !closed, session.mode == .command, let context else { return }
        context.writeAndFlush(wrapOutboundOut(context.channel.allocator.buffer(bytes: line)), promise: nil)
    }

    var outputStyle: QMPOutputStyle { style }

    /// Negotiation complete (for tests and event fan-out).
    var negotiated: Bool { activated && session.mode == .command }

    // MARK: Inbound

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let buffer = unwrapInboundIn(data)
        let inputs = buffer.withUnsafeReadableBytes { session.receive($0) }
        for input in inputs {
            if session.isOutOfBand(input) {
                runOutOfBand(input)
            } else {
                queue.append(input)
            }
        }
        pump()
    }

    func channelActive(context: ChannelHandlerContext) {
        context.fireChannelActive()
        if activateWhenActive {
            activateWhenActive = false
            activate()
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        closed = true
        eventGate.set(false)
        queue.removeAll()
        queueHead = 0
        onClose(info.connectionID)
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }

    // MARK: Outbound

    func read(context: ChannelHandlerContext) {
        if readAllowed { context.read() } else { readPending = true }
    }

    private var pendingCount: Int { queue.count - queueHead }

    private var readAllowed: Bool {
        guard activated, !closed else { return false }
        if session.oobEnabled { return pendingCount < QMPConnectionHandler.maxQueuedWithOOB }
        return !running && pendingCount == 0
    }

    private func resumeReadingIfAllowed() {
        if readPending && readAllowed, let context {
            readPending = false
            context.read()
        }
    }

    // MARK: Processing

    /// Handles queued inputs in order until one needs the dispatcher.
    private func pump() {
        var wrote = false
        while !running && !closed && queueHead < queue.count {
            let input = queue[queueHead]
            queueHead += 1
            let step = session.step(for: input)
            eventGate.set(negotiated)
            switch step {
            case .respond(let json):
                write(json, flush: false)
                wrote = true
            case .execute(let request):
                running = true
                dispatch(request)
            }
        }
        if queueHead == queue.count {
            queue.removeAll(keepingCapacity: queue.count < 64)
            queueHead = 0
        }
        if wrote { context?.flush() }
        resumeReadingIfAllowed()
    }

    private func dispatch(_ request: QMPRequest) {
        startCommand(request, inBand: true)
    }

    private func runOutOfBand(_ input: QMPInput) {
        let step = session.step(for: input)
        eventGate.set(negotiated)
        switch step {
        case .respond(let json):
            write(json, flush: true)
        case .execute(let request):
            startCommand(request, inBand: false)
        }
    }

    /// Runs the command in a Task; the response is encoded there too (a
    /// large result never occupies the event loop), then written here.
    private func startCommand(_ request: QMPRequest, inBand: Bool) {
        guard let bound else { return }
        let dispatcher = self.dispatcher
        let info = self.info
        let style = self.style
        // Start on the connection's own event loop rather than the shared
        // cooperative pool: a command that does not hop elsewhere (the
        // daemon's hop to its control actor) never waits for a pool thread.
        Task(executorPreference: EventLoopExecutor(bound.eventLoop)) {
            let reply = await dispatcher.dispatch(request.command, arguments: request.arguments, monitor: info)
            let line = QMPSession.response(to: request, result: reply.result).qmpLine(style)
            bound.eventLoop.execute {
                bound.value.finished(line, reply.afterSend, inBand: inBand)
            }
        }
    }

    private func finished(_ line: [UInt8], _ afterSend: (@Sendable () -> Void)?, inBand: Bool) {
        if closed || context == nil {
            afterSend?()
        } else {
            let promise = context!.eventLoop.makePromise(of: Void.self)
            if let afterSend {
                promise.futureResult.whenComplete { _ in afterSend() }
            }
            writeLine(line, flush: true, promise: promise)
        }
        if inBand {
            running = false
            pump()
        }
    }

    private func write(_ json: JSON, flush: Bool, promise: EventLoopPromise<Void>? = nil) {
        writeLine(json.qmpLine(style), flush: flush, promise: promise)
    }

    private func writeLine(_ line: [UInt8], flush: Bool, promise: EventLoopPromise<Void>? = nil) {
        guard let context, !closed else {
            promise?.succeed(())
            return
        }
        let buffer = context.channel.allocator.buffer(bytes: line)
        if flush {
            context.writeAndFlush(wrapOutboundOut(buffer), promise: promise)
        } else {
            context.write(wrapOutboundOut(buffer), promise: promise)
        }
    }
}
