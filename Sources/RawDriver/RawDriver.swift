import BlockCore
import BlockGraph
import BlockIO

/// The `raw` format driver: the guest sees the file's bytes unchanged.
public final class RawDriver: BlockDriver, Sendable {
    /// The edge to the file (the node whose bytes the guest sees).
    public let fileChild: BlockChild
    public var file: BlockNode { fileChild.node }
    /// The format was probed, not given: like QEMU, refuse writes that would
    /// make the first sector look like another image format.
    public let probed: Bool
    /// The window of the file the guest sees (QEMU's raw `offset` and
    /// `size` options); `size` nil: up to the end of the file.
    public let offset: Int64
    public let size: Int64?

    public init(file: BlockNode, probed: Bool = false) {
        // Without a window raw is almost a filter (QEMU's raw_open).
        self.fileChild = BlockChild(name: "file", role: [.filtered, .primary], node: file)
        self.probed = probed
        self.offset = 0
        self.size = nil
    }

    /// A window: QEMU's checks and messages (raw_apply_options).
    public init(file: BlockNode, offset: Int64, size: Int64?) throws(BlockError) {
        let real = (file.length + 511) / 512 * 512
        if offset > real {
            throw BlockError.invalid("Offset (\(offset)) cannot be greater than size of the containing file (\(real))")
        }
        if let size {
            if size > real - offset {
                throw BlockError.invalid("The sum of offset (\(offset)) and size (\(size)) has to be smaller or equal to the  actual size of the containing file (\(real))")
            }
            if size % 512 != 0 {
                throw BlockError.invalid("Specified size is not multiple of 512")
            }
        }
        self.fileChild = BlockChild(name: "file", role: [.data, .primary], node: file)
        self.probed = false
        self.offset = offset
        self.size = size
    }

    public func reopenForWriting() async throws(BlockError) { try await file.reopenReadWrite() }

    public var formatName: String { "raw" }
    /// QEMU counts in 512-byte sectors: a raw image's size rounds up.
    public var length: Int64 {
        let real = (file.length + 511) / 512 * 512
        return size ?? (real - offset)
    }
    public var requestAlignment: Int { file.driver.requestAlignment }
    public var memoryAlignment: Int { file.driver.memoryAlignment }
    public var children: [BlockChild] { [fileChild] }

    /// QEMU's raw_child_perm: the default for the role, but write and
    /// resize only when raw's own users want them.
    public func childPermissions(for child: BlockChild, node: BlockNode, perm: BlockPermissions,
                                 shared: BlockPermissions) -> (BlockPermissions, BlockPermissions) {
        let (dp, s) = defaultChildPermissions(role: child.role, writable: !node.readOnly, perm: perm, shared: shared)
        var p = dp
        p.subtract([.write, .resize])
        p.formUnion(perm.intersection([.write, .resize]))
        return (p, s)
    }

    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws(BlockError) {
        let file = self.file
        file.debugEvent(.readAio)
        try await file.read(at: self.offset + offset, into: buffer)
    }

    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws(BlockError) {
        if probed && offset < 512 && offset + Int64(buffer.count) > 0 {
            // What would the first sector look like after this write?
            let sector = AlignedBuffer(count: 512, zeroed: true)
            try await file.read(at: 0, into: sector.bytes)
            let from = Int(offset)
            let n = min(buffer.count, 512 - from)
            sector.slice(from, n).copyMemory(from: UnsafeRawBufferPointer(rebasing: buffer[0..<n]))
            let p = UnsafeRawPointer(sector.pointer)
            if p.loadBE32(0) == 0x5146_49fb {
                throw BlockError(.permissionDenied, errno: 1, "Operation not permitted")
            }
        }
        let file = self.file
        file.debugEvent(.writeAio)
        try await file.write(at: self.offset + offset, from: buffer, flags: flags)
    }

    public func writeZeroes(at offset: Int64, length: Int64, flags: WriteFlags) async throws(BlockError) {
        try await file.writeZeroes(at: self.offset + offset, length: length, flags: flags)
    }

    public func copyIn(at offset: Int64, from host: HostFile, sourceOffset: Int64, length: Int,
                       flags: WriteFlags) async throws(BlockError) -> Bool {
        if probed && offset < 512 { return false }
        file.debugEvent(.writeAio)
        try await file.copyIn(at: self.offset + offset, from: host, sourceOffset: sourceOffset, length: length, flags: flags)
        return true
    }

    public func discard(at offset: Int64, length: Int64) async throws(BlockError) {
        try await file.discard(at: self.offset + offset, length: length)
    }

    /// QEMU's flush of a raw node: `flush_to_os` and `flush_to_disk` to
    /// the file node (raw has nothing of its own to write back), then the
    /// file flushed.
    public func flush() async throws(BlockError) {
        let file = self.file
        file.debugEvent(.flushToOS)
        file.debugEvent(.flushToDisk)
        try await file.flush()
    }

    public func blockStatus(at offset: Int64, length: Int64) async throws(BlockError) -> BlockStatus {
        var st = try await file.blockStatus(at: self.offset + offset, length: length)
        st.flags.remove(.allocated)
        st.flags.remove(.eof)
        st.flags.insert(.offsetValid)
        st.hostOffset = self.offset + offset
        st.hostNode = file
        return st
    }

    public func truncate(to length: Int64, preallocation: Preallocation) async throws(BlockError) {
        if size != nil {
            throw BlockError(.notSupported, errno: 95, "Cannot resize fixed-size raw disks")
        }
        try await file.truncate(to: offset + length, preallocation: preallocation)
    }

    public func close() async throws(BlockError) { try await file.close() }
}
