import BlockCore
import BlockGraph
import BlockIO
import Synchronization

/// The `file` protocol driver: a host file or block device.
///
/// Reads past the end of the file return zeroes and writes past it extend
/// the file (the node is "growable" for its format parent). Block status
/// comes from SEEK_DATA/SEEK_HOLE.
public final class FileDriver: HostBackedDriver, @unchecked Sendable {
    public let host: HostFile
    public let noFlush: Bool
    /// discard=unmap: punch holes for discard / unmapping write-zeroes.
    public let unmap: Bool
    private let size: Atomic<Int64>
    /// End of the data (original size or last written byte), when the file
    /// was extended ahead of writes by `reserveSpace`.
    private let dataEnd: Atomic<Int64>
    private let reserved = Atomic<Bool>(false)
    /// The image-lock state currently held on the host file.
    private let lockState = Mutex<ImageLock?>(nil)

    public var formatName: String { "file" }
    /// Like QEMU, the node's length counts whole 512-byte sectors.
    public var length: Int64 { (size.load(ordering: .relaxed) + 511) / 512 * 512 }
    /// The host file's exact size.
    public var exactSize: Int64 { size.load(ordering: .relaxed) }
    public var requestAlignment: Int { host.requestAlignment }
    public var memoryAlignment: Int { host.direct ? max(host.requestAlignment, 512) : 1 }
    public var growable: Bool { true }
    public var children: [BlockChild] { [] }

    public init(host: HostFile, noFlush: Bool = false, unmap: Bool = false) throws(BlockError) {
        self.host = host
        self.noFlush = noFlush
        self.unmap = unmap
        let s = try host.size()
        self.size = Atomic(s)
        self.dataEnd = Atomic(s)
    }

    public func reserveSpace(upTo length: Int64) async throws(BlockError) {
        guard !host.isBlockDevice, !host.readOnly, length > size.load(ordering: .relaxed) else { return }
        try host.truncate(to: length)
        reserved.store(true, ordering: .relaxed)
        grow(to: length)
    }

    public func releaseUnusedSpace() async throws(BlockError) {
        guard reserved.load(ordering: .relaxed) else { return }
        let end = dataEnd.load(ordering: .relaxed)
        if end < size.load(ordering: .relaxed) {
            try host.truncate(to: end)
            size.store(end, ordering: .relaxed)
        }
        reserved.store(false, ordering: .relaxed)
    }

    private func noteData(_ end: Int64) {
        var cur = dataEnd.load(ordering: .relaxed)
        while end > cur {
            let (done, orig) = dataEnd.compareExchange(expected: cur, desired: end, ordering: .relaxed)
            if done { return }
            cur = orig
        }
    }

    /// Opens `path` as a file node and takes QEMU-compatible image locks
    /// for `lock` (nil: no locking, like QEMU's locking=off).
    public static func open(_ path: String, readOnly: Bool, direct: Bool = false, noFlush: Bool = false,
                            unmap: Bool = false, lock: ImageLock? = nil,
                            policy: NodePolicy = NodePolicy()) throws(BlockError) -> BlockNode {
        let h = try HostFile.open(path, .init(readOnly: readOnly, direct: direct))
        if let l = lock {
            do throws(BlockError) {
                try l.apply(to: h)
            } catch {
                h.close()
                throw error
            }
        }
        let d = try FileDriver(host: h, noFlush: noFlush, unmap: unmap)
        d.lockState.withLock { $0 = lock }
        return BlockNode(driver: d, filename: path, readOnly: readOnly, policy: policy)
    }

    public func allocatedBytes() throws(BlockError) -> Int64 { try host.allocatedSize() }

    public func startWriteback() async {
        if !noFlush { host.startWriteback() }
    }

    /// Reopen read-write: a writable descriptor, with the image locks held
    /// before taken again on it.
    public func reopenForWriting() async throws(BlockError) {
        guard host.readOnly else { return }
        try host.reopen(readOnly: false)
        try lockState.withLock { (cur: inout ImageLock?) throws(BlockError) in
            if let l = cur { try l.apply(to: host) }
        }
    }

    /// The lock held now (nil: locking is off for this file).
    public var currentLock: ImageLock? { lockState.withLock { $0 } }

    /// Changes the image-lock bytes held (QEMU's permission update on the
    /// file node); a no-op when locking is off. Throws QEMU's "Failed to get
    /// ... lock" when another process conflicts, keeping the old state.
    public func updateLock(_ new: ImageLock) throws(BlockError) {
        try lockState.withLock { (cur: inout ImageLock?) throws(BlockError) in
            guard let old = cur, old != new else { return }
            try new.replace(old, on: host)
            cur = new
        }
    }

    /// The permission update applies the node's users' permissions as
    /// image locks (QEMU's raw_check_perm / raw_set_perm).
    public func setPermissions(_ perm: BlockPermissions, shared: BlockPermissions) throws(BlockError) -> (@Sendable () -> Void)? {
        guard let old = currentLock else { return nil }
        let new = ImageLock(perm: perm, shared: shared)
        if old == new { return nil }
        try updateLock(new)
        return { [self] in try? self.updateLock(old) }
    }

    private func grow(to end: Int64) {
        var cur = size.load(ordering: .relaxed)
        while end > cur {
            let (exchanged, original) = size.compareExchange(expected: cur, desired: end, ordering: .relaxed)
            if exchanged { return }
            cur = original
        }
    }

    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws(BlockError) {
        try host.read(buffer, at: offset)
    }

    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws(BlockError) {
        try host.write(buffer, at: offset)
        grow(to: offset + Int64(buffer.count))
        noteData(offset + Int64(buffer.count))
        if flags.contains(.fua) && !noFlush { try host.dataSync() }
    }

    public func copyIn(at offset: Int64, from source: HostFile, sourceOffset: Int64, length: Int,
                       flags: WriteFlags) async throws(BlockError) -> Bool {
        guard try host.copyIn(from: source, sourceOffset: sourceOffset, at: offset, length: length) else { return false }
        grow(to: offset + Int64(length))
        noteData(offset + Int64(length))
        if flags.contains(.fua) && !noFlush { try host.dataSync() }
        return true
    }

    public func writeZeroes(at offset: Int64, length: Int64, flags: WriteFlags) async throws(BlockError) {
        let end = offset + length
        let cur = exactSize
        // Entirely past the end: extending the file is enough.
        if offset >= cur && !host.isBlockDevice {
            try host.truncate(to: end)
            grow(to: end)
            noteData(end)
            return
        }
        if flags.contains(.mayUnmap) && unmap {
            do throws(BlockError) {
                try host.punchHole(offset: offset, length: length)
                if end > cur {
                    try host.truncate(to: end)
                    grow(to: end)
                }
                return
            } catch {}
        }
        do throws(BlockError) {
            try host.zeroRange(offset: offset, length: length)
            grow(to: end)
            noteData(end)
            return
        } catch {
            if flags.contains(.noFallback) { throw BlockError.unsupported("Zero range not supported") }
        }
        let chunk = Int(min(length, 1 << 20))
        let zeros = AlignedBuffer(count: chunk, zeroed: true)
        var done: Int64 = 0
        while done < length {
            let n = Int(min(Int64(chunk), length - done))
            try host.write(UnsafeRawBufferPointer(zeros.slice(0, n)), at: offset + done)
            done += Int64(n)
        }
        grow(to: end)
        noteData(end)
    }

    public func discard(at offset: Int64, length: Int64) async throws(BlockError) {
        guard unmap else { return }
        try? host.punchHole(offset: offset, length: length)
    }

    public func flush() async throws(BlockError) {
        if noFlush || host.readOnly { return }
        try host.dataSync()
    }

    public func blockStatus(at offset: Int64, length: Int64) async throws(BlockError) -> BlockStatus {
        let end = min(offset + length, self.length)
        guard offset < end else { return BlockStatus(flags: [.eof], length: 0) }
        // Data or hole at `offset`?
        let data: Int64?
        do throws(BlockError) {
            data = try host.seekData(offset)
        } catch {
            return BlockStatus(flags: [.data, .offsetValid], length: end - offset, hostOffset: offset)
        }
        guard let d = data else {
            // Only a hole until EOF.
            return BlockStatus(flags: [.zero, .offsetValid], length: end - offset, hostOffset: offset)
        }
        if d > offset {
            return BlockStatus(flags: [.zero, .offsetValid], length: min(d, end) - offset, hostOffset: offset)
        }
        let hole = (try? host.seekHole(offset)) ?? nil
        let dataEnd = min(hole ?? end, end)
        return BlockStatus(flags: [.data, .offsetValid], length: max(dataEnd - offset, 1), hostOffset: offset)
    }

    public func truncate(to length: Int64, preallocation: Preallocation) async throws(BlockError) {
        let old = exactSize
        if host.isBlockDevice {
            if length > old { throw BlockError.unsupported("Cannot grow device files") }
            return
        }
        switch preallocation {
        case .off, .metadata:
            try host.truncate(to: length)
        case .falloc:
            if length > old {
                do throws(BlockError) {
                    try host.fallocate(mode: 0, offset: old, length: length - old)
                } catch {
                    throw error.prefixed("Could not preallocate new data: ")
                }
            }
            try host.truncate(to: length)
        case .full:
            if length > old {
                let chunk = 1 << 20
                let zeros = AlignedBuffer(count: chunk, zeroed: true)
                var at = old
                while at < length {
                    let n = Int(min(Int64(chunk), length - at))
                    try host.write(UnsafeRawBufferPointer(zeros.slice(0, n)), at: at)
                    at += Int64(n)
                }
            }
            try host.truncate(to: length)
        }
        size.store(length, ordering: .relaxed)
        dataEnd.store(length, ordering: .relaxed)
        reserved.store(false, ordering: .relaxed)
    }

    public func close() async throws(BlockError) {
        try? await releaseUnusedSpace()
        host.close()
    }
}
