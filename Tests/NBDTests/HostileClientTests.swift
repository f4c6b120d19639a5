import Foundation
import NBDProtocol
import NBDServer
import TestSupport
import Testing

/// Clients that misbehave, over raw sockets. After each, the server must
/// still serve a well-behaved client and the data must be intact.
@Suite(.timeLimit(.minutes(2)))
struct HostileClientTests {
    /// A normal client can still connect, read back `pattern` at 0 and
    /// see the rest of the first page untouched by partial writes.
    func expectHealthy(_ f: ServerFixture, _ pattern: UInt8 = 0x5a) throws {
        let c = try RawClient(unixPath: f.socketPath)
        let go = c.open("disk")
        #expect(go.last?.type == NBDOptionReply.ack)
        c.request(NBDCommand.read, flags: NBDCommandFlags.dontFragment, cookie: 77, length: 4096)
        guard case .chunk(let flags, let type, 77, let payload) = c.reply() else {
            Issue.record("no read reply")
            return
        }
        #expect(flags == NBDReplyType.flagDone && type == NBDReplyType.offsetData)
        #expect(payload.dropFirst(8).allSatisfy { $0 == pattern })
    }

    func prepared(_ f: ServerFixture) throws -> MemoryBackend {
        let b = try f.addMemoryExport("disk", size: 1 << 20)
        b.fill(0, 4096, with: 0x5a)
        return b
    }

    @Test func badRequestMagicGetsErrorThenClose() async throws {
        try await withServer { f in
            _ = try prepared(f)
            let c = try RawClient(unixPath: f.socketPath)
            c.open("disk")
            c.send([0x12, 0x34, 0x56, 0x78, 0, 0, 0, 0] + Array("COOKIE!!".utf8) + [UInt8](repeating: 0, count: 12))
            let r = c.reply()
            #expect(RawClient.chunkError(r).map { "\($0.0) \($0.1)" } == "22 invalid magic (got 0x12345678)")
            if case .chunk(_, _, let cookie, _) = r { #expect(cookie == 0x434f_4f4b_4945_2121) }
            #expect(c.isClosed())
            try expectHealthy(f)
        }
    }

    @Test func unknownOptionsAndHugeOptionLength() async throws {
        try await withServer { f in
            _ = try prepared(f)
            let c = try RawClient(unixPath: f.socketPath)
            _ = c.greet()
            c.option(99, [1, 2, 3])
            #expect(c.optionReplies().map(\.text) == ["Unsupported option 99 (<unknown>)"])
            c.option(11)
            #expect(c.optionReplies().map(\.type) == [NBDOptionReply.errUnsupported])
            var big = NBDByteWriter()
            big.u64(NBDMagic.option)
            big.u32(NBDOption.go)
            big.u32(100_000_000)
            c.send(big.bytes)
            #expect(c.isClosed())
            #expect(await eventually { f.messages.all.contains("option negotiation failed: len (100000000 ) is larger than max len (33554432)") })
            try expectHealthy(f)
        }
    }

    @Test func oversizedAndOutOfRangeRequests() async throws {
        try await withServer { f in
            let b = try prepared(f)
            let c = try RawClient(unixPath: f.socketPath)
            c.open("disk")
            c.request(NBDCommand.read, cookie: 1, length: 64 << 20)
            #expect(RawClient.chunkError(c.reply())?.1 == "len (67108864 ) is larger than max len (33554432)")
            c.request(NBDCommand.read, cookie: 2, offset: (1 << 20) - 512, length: 1024)
            #expect(RawClient.chunkError(c.reply())?.1 == "operation past EOF; From: 1048064, Len: 1024, Size: 1048576")
            // A write past the end: its payload is consumed, the stream stays in sync.
            c.request(NBDCommand.write, cookie: 3, offset: 1 << 20, length: 512, payload: [UInt8](repeating: 9, count: 512))
            #expect(RawClient.chunkError(c.reply())?.0 == NBDError.einval.rawValue)
            c.request(NBDCommand.flush, cookie: 4)
            #expect(c.reply() == .simple(error: 0, cookie: 4))
            // An oversized write cannot be skipped: error reply, then disconnect.
            c.request(NBDCommand.write, cookie: 5, length: 64 << 20)
            #expect(RawClient.chunkError(c.reply())?.1 == "len (67108864 ) is larger than max len (33554432)")
            #expect(c.isClosed())
            #expect(b.writeCount == 0)
            try expectHealthy(f)
        }
    }

    @Test func disconnectInsideWritePayloadWritesNothing() async throws {
        try await withServer { f in
            let b = try prepared(f)
            let writesBefore = b.writeCount
            let c = try RawClient(unixPath: f.socketPath)
            c.open("disk")
            c.request(NBDCommand.write, cookie: 1, length: 4096, payload: [UInt8](repeating: 0xee, count: 3000))
            c.shutdownWrite()
            #expect(c.isClosed())
            #expect(b.writeCount == writesBefore)
            #expect(b.bytes(0, 4096).allSatisfy { $0 == 0x5a })
            try expectHealthy(f)
        }
    }

    @Test func tenThousandPipelinedRequests() async throws {
        try await withServer { f in
            let b = try prepared(f)
            let c = try RawClient(unixPath: f.socketPath)
            c.open("disk", structured: false)
            var stream: [UInt8] = []
            let count = 10_000
            for i in 0..<count {
                let offset = UInt64(4096 + (i % 200) * 512)
                if i % 2 == 0 {
                    stream += NBDRequest(type: NBDCommand.write, cookie: UInt64(i), offset: offset, length: 512).bytes
                    stream += [UInt8](repeating: UInt8(truncatingIfNeeded: i % 200), count: 512)
                } else {
                    stream += NBDRequest(type: NBDCommand.flush, cookie: UInt64(i), offset: 0, length: 0).bytes
                }
            }
            let fd = c.fd
            let all = stream
            let sender = Thread {
                var sent = 0
                while sent < all.count {
                    let n = all.withUnsafeBytes { send(fd, $0.baseAddress! + sent, all.count - sent, Int32(MSG_NOSIGNAL)) }
                    if n <= 0 { return }
                    sent += n
                }
            }
            sender.start()
            var seen = Set<UInt64>()
            for _ in 0..<count {
                guard case .simple(0, let cookie) = c.reply() else { Issue.record("bad reply after \(seen.count)"); break }
                seen.insert(cookie)
            }
            #expect(seen.count == count)
            #expect(b.writeCount == count / 2)
            #expect(b.bytes(4096 + 512 * 8, 512).allSatisfy { $0 == 8 })
            try expectHealthy(f)
        }
    }

    /// EPERM with QEMU's message (QEMU 7.2 itself sends EINVAL; the NBD
    /// specification and Lamina say EPERM).
    @Test func readOnlyExportRejectsWritesWithEPERM() async throws {
        try await withServer { f in
            let b = try f.addMemoryExport("disk", size: 1 << 20, writable: false)
            b.fill(0, 4096, with: 0x5a)
            let c = try RawClient(unixPath: f.socketPath)
            c.open("disk")
            c.request(NBDCommand.write, cookie: 1, length: 512, payload: [UInt8](repeating: 1, count: 512))
            #expect(RawClient.chunkError(c.reply()).map { "\($0.0) \($0.1)" } == "1 Export is read-only")
            for type in [NBDCommand.trim, NBDCommand.writeZeroes] {
                c.request(type, cookie: 2, length: 512)
                #expect(RawClient.chunkError(c.reply()).map { "\($0.0) \($0.1)" } == "1 Export is read-only")
            }
            try expectHealthy(f)
        }
    }

    @Test func disconnectFinishesInFlightRequests() async throws {
        try await withServer { f in
            _ = try prepared(f)
            let c = try RawClient(unixPath: f.socketPath)
            c.open("disk", structured: false)
            c.send(NBDRequest(type: NBDCommand.read, cookie: 5, offset: 0, length: 4096).bytes
                   + NBDRequest(type: NBDCommand.disconnect, cookie: 6, offset: 0, length: 0).bytes
                   + NBDRequest(type: NBDCommand.read, cookie: 7, offset: 0, length: 4096).bytes)
            #expect(c.reply() == .simple(error: 0, cookie: 5))
            #expect(c.recv(4096).allSatisfy { $0 == 0x5a })
            #expect(c.isClosed())
            try expectHealthy(f)
        }
    }

    /// A read that must not be fragmented gets an error chunk; a sparse
    /// structured read failing half-way drops the client, as QEMU 7.2
    /// does (it has sent part of the reply already).
    @Test func backendErrorsMapToNBDErrors() async throws {
        try await withServer { f in
            let b = try prepared(f)
            b.failReads(in: 8192..<12288)
            let c = try RawClient(unixPath: f.socketPath)
            c.open("disk")
            b.fill(8192, 4096, with: 1)
            c.request(NBDCommand.read, flags: NBDCommandFlags.dontFragment, cookie: 1, offset: 8192, length: 512)
            #expect(RawClient.chunkError(c.reply()).map { "\($0.0) \($0.1)" } == "5 reading from file failed")
            c.request(NBDCommand.read, cookie: 2, offset: 8192, length: 512)
            #expect(c.isClosed())
            #expect(f.messages.all.contains(
                "Disconnect client, due to: Failed to send reply: reading from file failed: Input/output error"))
            b.failReads(in: nil)
            try expectHealthy(f)
        }
    }
}
