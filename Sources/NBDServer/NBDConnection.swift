import NBDProtocol
import NIOCore

/// One client connection: negotiation, then the transmission phase.
///
/// Runs on the channel's event loop (every method here). Requests are
/// decoded on the loop, validated by `NBDSession.admit`, then served by
/// tasks preferring the backend's executor (`NBDRequestRunner`); their
/// replies come back to `requestDone` on this loop and are written whole.
///
/// Back-pressure: while `maxInFlight` requests are in flight (counted from
/// header to reply, like QEMU's `nb_requests`), or while the socket's write
/// buffer is above its high watermark, no request is decoded and the
/// socket is not read. Input is kept as the last read's buffer (write
/// payloads are sliced from it without copying); only a header split
/// across reads is copied, into `partialHeader`.
final class NBDConnection: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    /// A request whose payload is still arriving.
    enum Payload {
        /// WRITE: bytes gathered into a buffer of the request's length.
        case collect(NBDRequest, ByteBuffer, remaining: Int)
        /// A rejected request's payload, read and dropped before the error reply.
        case discard(NBDRequest, remaining: Int, error: NBDError, message: String)
    }

    let server: NBDServer
    let maxInFlight: Int
    var context: ChannelHandlerContext?
    var handshake: NBDHandshake? = NBDHandshake()
    /// Set once negotiation succeeded; shared with request tasks.
    var runner: NBDRequestRunner?
    var attached: AttachedExport?
    var input: ByteBuffer?
    var partialHeader: [UInt8] = []
    var payload: Payload?
    var inFlight = 0
    var readHeld = false
    /// NBD_CMD_DISC received: finish what is in flight, then close.
    var disconnectRequested = false
    /// Closing (or closed): input is ignored, replies dropped.
    var closing = false
    var channelInactive = false
    var flushScheduled = false

    init(server: NBDServer) {
        self.server = server
        self.maxInFlight = server.maxRequestsPerConnection
    }

    /// The channel's identity: the key the server's connection table
    /// uses, so removing an export in hard mode finds its clients' sockets.
    private(set) var clientID = ObjectIdentifier(NBDConnection.self)

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        clientID = ObjectIdentifier(context.channel)
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
        runner = nil
    }

    func channelActive(context: ChannelHandlerContext) {
        var greeting = context.channel.allocator.buffer(capacity: NBDHandshake.greeting.count)
        greeting.writeBytes(NBDHandshake.greeting)
        context.writeAndFlush(wrapOutboundOut(greeting), promise: nil)
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        channelInactive = true
        closing = true
        input = nil
        payload = nil
        detachIfFinished()
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if !closing { server.report("Disconnect client, due to: \(error)") }
        closing = true
        context.close(promise: nil)
    }

    // MARK: Input

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var buffer = unwrapInboundIn(data)
        if closing || disconnectRequested { return }
        if payload != nil {
            feedPayload(&buffer)
            if buffer.readableBytes == 0 { return }
        }
        if var existing = input, existing.readableBytes > 0 {
            // Rare: a read arrived while decoded input was still pending.
            input = nil
            var merged = context.channel.allocator.buffer(capacity: existing.readableBytes + buffer.readableBytes)
            merged.writeBuffer(&existing)
            merged.writeBuffer(&buffer)
            input = merged
        } else {
            input = buffer
        }
        process()
    }

    func read(context: ChannelHandlerContext) {
        if shouldHoldReads {
            readHeld = true
        } else {
            context.read()
        }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable {
            process()
            resumeReadsIfPossible()
        }
        context.fireChannelWritabilityChanged()
    }

    var shouldHoldReads: Bool {
        if closing || disconnectRequested { return true }
        guard handshake == nil, payload == nil else { return false }
        if inFlight >= maxInFlight { return true }
        if let context, !context.channel.isWritable { return true }
        return (input?.readableBytes ?? 0) >= NBDRequest.size
    }

    func resumeReadsIfPossible() {
        guard readHeld, !shouldHoldReads, let context else { return }
        readHeld = false
        context.read()
    }

    /// Decodes as much buffered input as the current state allows.
    func process() {
        guard let context else { return }
        while !closing {
            if handshake != nil {
                if !negotiate(context) { return }
                continue
            }
            guard payload == nil, !disconnectRequested, inFlight < maxInFlight, context.channel.isWritable,
                  let request = nextHeader() else { return }
            handle(request)
        }
    }

    /// Returns the next complete request header, or nil (saving a partial one).
    func nextHeader() -> NBDRequest? {
        guard var buffer = input, buffer.readableBytes > 0 else {
            input = nil
            return nil
        }
        if partialHeader.isEmpty && buffer.readableBytes >= NBDRequest.size {
            let request = buffer.withUnsafeReadableBytes { NBDRequest(decoding: $0) }
            buffer.moveReaderIndex(forwardBy: NBDRequest.size)
            input = buffer
            return request
        }
        let take = min(NBDRequest.size - partialHeader.count, buffer.readableBytes)
        partialHeader += buffer.readBytes(length: take)!
        input = buffer.readableBytes > 0 ? buffer : nil
        guard partialHeader.count == NBDRequest.size else { return nil }
        let request = partialHeader.withUnsafeBytes { NBDRequest(decoding: $0) }
        partialHeader.removeAll(keepingCapacity: true)
        return request
    }

    /// Feeds buffered bytes to the handshake. Returns false when it needs more.
    func negotiate(_ context: ChannelHandlerContext) -> Bool {
        guard var machine = handshake, var buffer = input, buffer.readableBytes > 0 else { return false }
        var directory = ConnectionDirectory(server: server, client: clientID)
        let step = buffer.withUnsafeReadableBytes { machine.receive($0, directory: &directory) }
        buffer.moveReaderIndex(forwardBy: step.consumed)
        input = buffer
        handshake = machine
        if !step.output.isEmpty {
            var out = context.channel.allocator.buffer(capacity: step.output.count)
            out.writeBytes(step.output)
            context.writeAndFlush(wrapOutboundOut(out), promise: nil)
        }
        switch step.outcome {
        case .needMoreInput:
            return false
        case .close(let reason):
            if let reason { server.report(reason) }
            closeAfterPendingWrites()
            return false
        case .transmission(let session):
            handshake = nil
            guard let export = directory.attached else {
                closeAfterPendingWrites()
                return false
            }
            attached = export
            runner = NBDRequestRunner(session: session, backend: export.backend, allocator: context.channel.allocator,
                                      connection: NIOLoopBound(self, eventLoop: context.eventLoop))
            return true
        }
    }

    func handle(_ request: NBDRequest) {
        guard let runner else { return }
        switch runner.session.admit(request) {
        case .disconnect:
            disconnectRequested = true
            input = nil
            finishIfDisconnecting()
        case .serve(let length):
            inFlight += 1
            if length == 0 {
                runner.start(request, payload: nil)
            } else {
                beginPayload(.collect(request, ByteBuffer(), remaining: Int(length)))
            }
        case .reject(let error, let message, let length, let thenClose):
            if thenClose {
                writeReply(runner.errorReply(request, error, message))
                server.report("Disconnect client, due to: Request handling failed in intermediate state")
                closeAfterPendingWrites()
            } else if length > 0 {
                inFlight += 1
                beginPayload(.discard(request, remaining: Int(length), error: error, message: message))
            } else {
                writeReply(runner.errorReply(request, error, message))
                scheduleFlush()
            }
        }
    }
}
