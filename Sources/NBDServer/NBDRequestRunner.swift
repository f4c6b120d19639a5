import BlockCore
import NBDProtocol
import NIOCore

/// Serves admitted requests of one connection against its backend and
/// builds each reply as one buffer.
///
/// Immutable and Sendable: shared by the connection (on its loop) and by
/// the request tasks (on the backend's executor). `connection` may only be
/// touched on the connection's loop.
final class NBDRequestRunner: Sendable {
    let session: NBDSession
    let backend: any NBDBackend
    let allocator: ByteBufferAllocator
    let connection: NIOLoopBound<NBDConnection>

    init(session: NBDSession, backend: any NBDBackend, allocator: ByteBufferAllocator,
         connection: NIOLoopBound<NBDConnection>) {
        self.session = session
        self.backend = backend
        self.allocator = allocator
        self.connection = connection
    }

    /// Starts serving `request` (with its WRITE payload) in a task on the
    /// backend's executor; the reply is handed to the connection on its loop.
    func start(_ request: NBDRequest, payload: ByteBuffer?) {
        let executor: any TaskExecutor = request.type == NBDCommand.read
            ? backend.readExecutor(offset: Int64(request.offset), length: Int(request.length))
            : backend.executor
        Task(executorPreference: executor) { [self] in
            let reply: ByteBuffer
            if request.type == NBDCommand.read {
                switch await self.read(request) {
                case .reply(let b): reply = b
                case .disconnect(let reason):
                    self.onLoop { $0.requestFailedFatally(reason) }
                    return
                }
            } else {
                reply = await self.serve(request, payload: payload)
            }
            self.onLoop { $0.requestDone(reply) }
        }
    }

    /// Runs `body` with the connection on its loop.
    private func onLoop(_ body: @escaping @Sendable (NBDConnection) -> Void) {
        let loop = connection.eventLoop
        if loop.inEventLoop {
            body(connection.value)
        } else {
            loop.execute { body(self.connection.value) }
        }
    }

    /// Runs one command but READ (see `read`). Errors become error
    /// replies, never thrown.
    func serve(_ r: NBDRequest, payload: ByteBuffer?) async -> ByteBuffer {
        let offset = Int64(r.offset)
        let length = Int64(r.length)
        let fua = r.has(NBDCommandFlags.fua)
        do {
            switch r.type {
            case NBDCommand.read:
                preconditionFailure("reads are served by read(_:)")
            case NBDCommand.write:
                if let payload, payload.readableBytes > 0 {
                    try await payload.withStableReadableBytes { (bytes) async throws(BlockError) in
                        try await backend.write(at: offset, from: bytes, fua: fua)
                    }
                }
            case NBDCommand.writeZeroes:
                if length > 0 {
                    try await backend.writeZeroes(at: offset, length: length, mayTrim: !r.has(NBDCommandFlags.noHole),
                                                  fastZero: r.has(NBDCommandFlags.fastZero), fua: fua)
                }
            case NBDCommand.trim:
                if length > 0 { try await backend.trim(at: offset, length: length, fua: fua) }
            case NBDCommand.flush:
                try await backend.flush()
            case NBDCommand.cache:
                if length > 0 { try await backend.cache(at: offset, length: length) }
            case NBDCommand.blockStatus:
                return await blockStatus(r)
            default:
                preconditionFailure("request type \(r.type) was admitted")
            }
        } catch {
            return errorReply(r, NBDError(error), Self.failureText(r.type))
        }
        return simpleReply(r, .success)
    }

    /// QEMU's messages for a failed command.
    static func failureText(_ type: UInt16) -> String {
        switch type {
        case NBDCommand.write, NBDCommand.writeZeroes: return "writing to file failed"
        case NBDCommand.trim: return "discard failed"
        case NBDCommand.flush: return "flush failed"
        case NBDCommand.cache: return "caching data failed"
        default: return "reading from file failed"
        }
    }

    // MARK: Reply builders

    func simpleReply(_ r: NBDRequest, _ error: NBDError) -> ByteBuffer {
        var out = allocator.buffer(capacity: NBDReplyCodec.simpleHeaderSize)
        out.writeWithUnsafeMutableBytes(minimumWritableBytes: NBDReplyCodec.simpleHeaderSize) {
            NBDReplyCodec.simpleHeader(into: $0, cookie: r.cookie, error: error)
            return NBDReplyCodec.simpleHeaderSize
        }
        return out
    }

    /// An error: structured ERROR chunk when negotiated, else a simple reply.
    func errorReply(_ r: NBDRequest, _ error: NBDError, _ message: String) -> ByteBuffer {
        guard session.structured else { return simpleReply(r, error) }
        var out = allocator.buffer(capacity: NBDReplyCodec.errorChunkSize(messageLength: message.utf8.count))
        appendErrorChunk(&out, r, error, message)
        return out
    }

    func appendErrorChunk(_ out: inout ByteBuffer, _ r: NBDRequest, _ error: NBDError, _ message: String) {
        let size = NBDReplyCodec.errorChunkSize(messageLength: message.utf8.count)
        out.writeWithUnsafeMutableBytes(minimumWritableBytes: size) {
            NBDReplyCodec.errorChunk(into: $0, cookie: r.cookie, error: error, message: message.utf8)
            return size
        }
    }
}

extension ByteBuffer {
    /// Runs `body` with the address of the readable bytes across suspension
    /// points. Sound because `self` is an immutable copy for the whole call:
    /// nothing can write to (and so move or free) the storage meanwhile.
    func withStableReadableBytes<T, E: Error>(
        _ body: (UnsafeRawBufferPointer) async throws(E) -> T
    ) async throws(E) -> T {
        let bytes = withUnsafeReadableBytes { $0 }
        defer { withExtendedLifetime(self) {} }
        return try await body(bytes)
    }

    /// Lets `body` fill the next `count` writable bytes across suspension
    /// points, then commits them. The caller owns `self` exclusively
    /// (inout) for the whole call, so the storage cannot move.
    mutating func writeStably<E: Error>(
        count: Int, _ body: (UnsafeMutableRawBufferPointer) async throws(E) -> Void
    ) async throws(E) {
        reserveCapacity(minimumWritableBytes: count)
        let target = withUnsafeMutableWritableBytes { UnsafeMutableRawBufferPointer(rebasing: $0.prefix(count)) }
        try await body(target)
        moveWriterIndex(forwardBy: count)
    }
}
