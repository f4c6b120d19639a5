#if canImport(Glibc)
import Glibc
#endif
import BlockCore
import NBDProtocol
import NIOCore

/// What serving a READ produced.
enum NBDReadOutcome {
    case reply(ByteBuffer)
    /// QEMU 7.2 drops the connection when reading data for a sparse
    /// structured reply fails (its reply is then half sent); the reason is
    /// what it reports ("Failed to send reply: reading from file failed: ...").
    case disconnect(String)
}

/// NBD_CMD_READ and NBD_CMD_BLOCK_STATUS: replies that carry data. Data is
/// read by the backend straight into the reply buffer, behind its header.
extension NBDRequestRunner {
    func read(_ r: NBDRequest) async -> NBDReadOutcome {
        let offset = Int64(r.offset)
        let length = Int(r.length)
        // QEMU flushes before a read that carries FUA.
        if r.has(NBDCommandFlags.fua) {
            do { try await backend.flush() } catch { return .reply(errorReply(r, NBDError(error), "flush failed")) }
        }
        if !session.structured {
            var out = allocator.buffer(capacity: NBDReplyCodec.simpleHeaderSize + length)
            out.writeWithUnsafeMutableBytes(minimumWritableBytes: NBDReplyCodec.simpleHeaderSize) {
                NBDReplyCodec.simpleHeader(into: $0, cookie: r.cookie, error: .success)
                return NBDReplyCodec.simpleHeaderSize
            }
            do {
                if length > 0 {
                    try await out.writeStably(count: length) { (p) async throws(BlockError) in
                        try await backend.read(at: offset, into: p)
                    }
                }
            } catch {
                return .reply(simpleReply(r, NBDError(error)))
            }
            return .reply(out)
        }
        if length == 0 {
            var out = allocator.buffer(capacity: NBDReplyCodec.chunkHeaderSize)
            out.writeWithUnsafeMutableBytes(minimumWritableBytes: NBDReplyCodec.chunkHeaderSize) {
                NBDReplyCodec.chunkHeader(into: $0, flags: NBDReplyType.flagDone, type: NBDReplyType.none,
                                          cookie: r.cookie, length: 0)
                return NBDReplyCodec.chunkHeaderSize
            }
            return .reply(out)
        }
        let sparse = !r.has(NBDCommandFlags.dontFragment)
        var runs: [(zero: Bool, length: Int)] = []
        if !sparse {
            runs.append((false, length))
        } else {
            do {
                runs = try await zeroRuns(offset: offset, length: length)
            } catch {
                let code = error.errno != 0 ? error.errno : EIO
                return .reply(errorReply(r, NBDError(error), "unable to check for holes: " + errnoString(code)))
            }
        }
        var total = 0
        for run in runs {
            total += run.zero ? NBDReplyCodec.holeChunkSize : NBDReplyCodec.dataChunkPrefixSize + run.length
        }
        var out = allocator.buffer(capacity: total)
        var position = offset
        for (i, run) in runs.enumerated() {
            let done = i == runs.count - 1
            if run.zero {
                out.writeWithUnsafeMutableBytes(minimumWritableBytes: NBDReplyCodec.holeChunkSize) {
                    NBDReplyCodec.holeChunk(into: $0, done: done, cookie: r.cookie, offset: UInt64(position),
                                            length: UInt32(run.length))
                    return NBDReplyCodec.holeChunkSize
                }
            } else {
                out.writeWithUnsafeMutableBytes(minimumWritableBytes: NBDReplyCodec.dataChunkPrefixSize) {
                    NBDReplyCodec.dataChunkPrefix(into: $0, done: done, cookie: r.cookie, offset: UInt64(position),
                                                  dataLength: UInt32(run.length))
                    return NBDReplyCodec.dataChunkPrefixSize
                }
                do {
                    let at = position
                    try await out.writeStably(count: run.length) { (p) async throws(BlockError) in
                        try await backend.read(at: at, into: p)
                    }
                } catch {
                    if sparse {
                        let code = error.errno != 0 ? error.errno : EIO
                        return .disconnect("Failed to send reply: reading from file failed: " + errnoString(code))
                    }
                    return .reply(errorReply(r, NBDError(error), "reading from file failed"))
                }
            }
            position += Int64(run.length)
        }
        return .reply(out)
    }

    /// Splits [offset, offset+length) into alternating zero/data runs.
    func zeroRuns(offset: Int64, length: Int) async throws(BlockError) -> [(zero: Bool, length: Int)] {
        var runs: [(zero: Bool, length: Int)] = []
        var done = 0
        while done < length {
            let (zero, n64) = try await backend.zeroRun(at: offset + Int64(done), length: Int64(length - done))
            guard n64 > 0 else { throw BlockError.io("zeroRun returned an empty run") }
            let n = Int(min(n64, Int64(length - done)))
            if let last = runs.last, last.zero == zero {
                runs[runs.count - 1].length += n
            } else {
                runs.append((zero, n))
            }
            done += n
        }
        return runs
    }

    func blockStatus(_ r: NBDRequest) async -> ByteBuffer {
        let contexts = session.meta.contexts(of: session.export)
        let capacity = r.has(NBDCommandFlags.reqOne) ? 1 : NBDLimits.maxBlockStatusExtents
        var out = allocator.buffer(capacity: contexts.count * (NBDReplyCodec.blockStatusPrefixSize + 8))
        for (i, context) in contexts.enumerated() {
            let kind: NBDMetaContextKind
            switch context.id {
            case NBDMetaContextID.baseAllocation: kind = .baseAllocation
            case NBDMetaContextID.allocationDepth: kind = .allocationDepth
            default: kind = .dirtyBitmap(session.export.bitmaps[Int(context.id - NBDMetaContextID.dirtyBitmapBase)])
            }
            var extents = NBDExtentCollector(capacity: capacity)
            do {
                try await collect(kind, offset: Int64(r.offset), length: Int64(r.length), into: &extents)
            } catch {
                appendErrorChunk(&out, r, NBDError(error), "can't get block status")
                return out
            }
            let size = NBDReplyCodec.blockStatusPrefixSize + 8 * extents.count
            out.writeWithUnsafeMutableBytes(minimumWritableBytes: size) {
                NBDReplyCodec.blockStatusPrefix(into: $0, done: i == contexts.count - 1, cookie: r.cookie,
                                                contextID: context.id, extentCount: extents.count)
                extents.encode(into: UnsafeMutableRawBufferPointer(rebasing: $0[NBDReplyCodec.blockStatusPrefixSize...]))
                return size
            }
        }
        return out
    }

    /// Asks the backend until the range is covered or the collector is full.
    func collect(_ kind: NBDMetaContextKind, offset: Int64, length: Int64,
                 into extents: inout NBDExtentCollector) async throws(BlockError) {
        var position = offset
        var left = length
        while left > 0 {
            let answer = try await backend.blockStatus(kind, at: position, length: left)
            guard !answer.isEmpty else { throw BlockError.io("block status returned no extent") }
            for e in answer {
                let n = min(Int64(e.length), left)
                guard n > 0 else { throw BlockError.io("block status returned an empty extent") }
                if !extents.add(length: UInt32(n), flags: e.flags) { return }
                position += n
                left -= n
                if left == 0 { return }
            }
        }
    }
}
