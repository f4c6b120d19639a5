import BlockCore
import BlockIO

/// Where the bytes of a write come from: caller memory, or a range of a
/// host file (so a copy can stay inside the kernel, copy_file_range).
///
/// Ownership: a `.memory` payload borrows the caller's buffer for the
/// duration of the call; a `.host` payload refers to a file the caller keeps
/// open and unchanged until the call returns.
public enum WritePayload: @unchecked Sendable {
    case memory(UnsafeRawBufferPointer)
    case host(HostFile, offset: Int64, count: Int)

    public var count: Int {
        switch self {
        case .memory(let b): return b.count
        case .host(_, _, let c): return c
        }
    }

    public func slice(_ from: Int, _ length: Int) -> WritePayload {
        precondition(from >= 0 && length >= 0 && from + length <= count)
        switch self {
        case .memory(let b): return .memory(UnsafeRawBufferPointer(rebasing: b[from..<(from + length)]))
        case .host(let f, let o, _): return .host(f, offset: o + Int64(from), count: length)
        }
    }

    /// Copies the payload into `dst` (same length).
    public func copy(into dst: UnsafeMutableRawBufferPointer) throws(BlockError) {
        precondition(dst.count == count)
        switch self {
        case .memory(let b): dst.copyMemory(from: b)
        case .host(let f, let o, _): try f.read(dst, at: o)
        }
    }

    /// Writes the payload to `node` at `offset`.
    public func write(to node: BlockNode, at offset: Int64, flags: WriteFlags = []) async throws(BlockError) {
        switch self {
        case .memory(let b):
            try await node.write(at: offset, from: b, flags: flags)
        case .host(let f, let o, let c):
            try await node.copyIn(at: offset, from: f, sourceOffset: o, length: c, flags: flags)
        }
    }
}

extension BlockNode {
    /// Writes `length` bytes read from `host` at `sourceOffset`; drivers that
    /// can copy inside the kernel do, the others get a bounce buffer.
    public func copyIn(at offset: Int64, from host: HostFile, sourceOffset: Int64, length: Int,
                       flags: WriteFlags = []) async throws(BlockError) {
        if length == 0 { return }
        if readOnly { throw BlockError(.permissionDenied, errno: 1, "Block node is read-only") }
        if try await driver.copyIn(at: offset, from: host, sourceOffset: sourceOffset, length: length, flags: flags) {
            return
        }
        let chunk = min(length, 1 << 21)
        let buf = AlignedBuffer(count: chunk)
        var done = 0
        while done < length {
            let n = min(chunk, length - done)
            try host.read(buf.slice(0, n), at: sourceOffset + Int64(done))
            try await write(at: offset + Int64(done), from: UnsafeRawBufferPointer(buf.slice(0, n)), flags: flags)
            done += n
        }
    }
}
