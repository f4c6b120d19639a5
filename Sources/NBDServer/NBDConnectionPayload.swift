import NBDProtocol
import NIOCore

/// Payload collection, reply output and the end of a connection.
extension NBDConnection {
    /// Starts reading a request's payload from the buffered input. A WRITE
    /// payload that is already complete in the input is sliced (no copy);
    /// otherwise it is gathered into a buffer of its exact size.
    func beginPayload(_ pending: Payload) {
        precondition(payload == nil)
        var buffer = input ?? ByteBuffer()
        input = nil
        switch pending {
        case .collect(let request, _, let remaining):
            if buffer.readableBytes >= remaining, let slice = buffer.readSlice(length: remaining) {
                input = buffer
                runner?.start(request, payload: slice)
                return
            }
            var gathered = context!.channel.allocator.buffer(capacity: remaining)
            gathered.writeBuffer(&buffer)
            payload = .collect(request, gathered, remaining: remaining - gathered.readableBytes)
        case .discard:
            payload = pending
            feedPayload(&buffer)
            if buffer.readableBytes > 0 { input = buffer }
        }
    }

    /// Moves bytes from `buffer` into the pending payload; completes it
    /// (dispatch or error reply) when it is whole.
    func feedPayload(_ buffer: inout ByteBuffer) {
        guard let pending = payload else { return }
        payload = nil  // keeps a gathering buffer uniquely referenced
        switch pending {
        case .collect(let request, var gathered, let remaining):
            let n = min(remaining, buffer.readableBytes)
            if var part = buffer.readSlice(length: n) { gathered.writeBuffer(&part) }
            if n == remaining {
                runner?.start(request, payload: gathered)
            } else {
                payload = .collect(request, gathered, remaining: remaining - n)
            }
        case .discard(let request, let remaining, let error, let message):
            let n = min(remaining, buffer.readableBytes)
            buffer.moveReaderIndex(forwardBy: n)
            if n == remaining {
                if let runner { requestDone(runner.errorReply(request, error, message)) }
            } else {
                payload = .discard(request, remaining: remaining - n, error: error, message: message)
            }
        }
    }

    // MARK: Output

    /// A request finished (on this loop): writes its reply, then lets the
    /// next requests in.
    func requestDone(_ reply: ByteBuffer) {
        inFlight -= 1
        if !closing {
            writeReply(reply)
            if inFlight == 0 { flushNow() } else { scheduleFlush() }
        }
        if finishIfDisconnecting() { return }
        detachIfFinished()
        process()
        resumeReadsIfPossible()
    }

    /// A request ended the connection (QEMU 7.2's sparse read failing
    /// half-way): reported like QEMU ("Disconnect client, due to: ..."),
    /// then the socket is closed once what was written before is sent;
    /// the failed request gets no reply and later replies are dropped.
    func requestFailedFatally(_ reason: String) {
        inFlight -= 1
        if !closing {
            server.report("Disconnect client, due to: \(reason)")
            closeAfterPendingWrites()
        }
        detachIfFinished()
    }

    func writeReply(_ reply: ByteBuffer) {
        context?.write(wrapOutboundOut(reply), promise: nil)
    }

    /// Coalesces the flushes of replies completed in the same loop turn.
    func scheduleFlush() {
        guard !flushScheduled, let context else { return }
        flushScheduled = true
        context.eventLoop.assumeIsolated().execute { [self] in
            self.flushNow()
        }
    }

    func flushNow() {
        flushScheduled = false
        context?.flush()
    }

    // MARK: Ending

    /// NBD_CMD_DISC: once nothing is in flight, flush and close. Returns
    /// true when the close was started.
    @discardableResult
    func finishIfDisconnecting() -> Bool {
        guard disconnectRequested, inFlight == 0, !closing else { return false }
        closeAfterPendingWrites()
        return true
    }

    /// Closes once everything written so far is on the wire (NIO's close
    /// would drop pending writes).
    func closeAfterPendingWrites() {
        guard !closing, let context else { return }
        closing = true
        input = nil
        payload = nil
        let done = context.eventLoop.makePromise(of: Void.self)
        context.writeAndFlush(wrapOutboundOut(context.channel.allocator.buffer(capacity: 0)), promise: done)
        done.futureResult.assumeIsolated().whenComplete { [self] _ in
            self.context?.close(promise: nil)
        }
    }

    /// The client's end: its socket is closed and no request is in flight
    /// (QEMU keeps the export referenced until then).
    func detachIfFinished() {
        guard channelInactive, inFlight == 0 else { return }
        runner = nil
        if let export = attached {
            attached = nil
            server.detach(exportID: export.info.id, client: clientID)
        }
    }
}
