import BlockCore
import BlockGraph
import BlockIO

/// The `raw` format driver: the guest sees the file's bytes unchanged.
public final class RawDriver: BlockDriver, Sendable {
    public let file: BlockNode
    /// The format was probed, not given: like QEMU, refuse writes that would
    /// make the first sector look like another image format.
    public let probed: Bool

    public init(file: BlockNode, probed: Bool = false) {
        self.file = file
        self.probed = probed
    }

    public var formatName: String { "raw" }
    /// QEMU counts in 512-byte sectors: a raw image's size rounds up.
    public var length: Int64 { (file.length + 511) / 512 * 512 }
    public var requestAlignment: Int { file.driver.requestAlignment }
    public var memoryAlignment: Int { file.driver.memoryAlignment }
    public var children: [BlockChild] { [BlockChild(role: .file, node: file)] }

    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws(BlockError) {
        try await file.read(at: offset, into: buffer)
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
        try await file.write(at: offset, from: buffer, flags: flags)
    }

    public func writeZeroes(at offset: Int64, length: Int64, flags: WriteFlags) async throws(BlockError) {
        try await file.writeZeroes(at: offset, length: length, flags: flags)
    }

    public func copyIn(at offset: Int64, from host: HostFile, sourceOffset: Int64, length: Int,
                       flags: WriteFlags) async throws(BlockError) -> Bool {
        if probed && offset < 512 { return false }
        try await file.copyIn(at: offset, from: host, sourceOffset: sourceOffset, length: length, flags: flags)
        return true
    }

    public func discard(at offset: Int64, length: Int64) async throws(BlockError) {
        try await file.discard(at: offset, length: length)
    }

    public func flush() async throws(BlockError) { try await file.flush() }

    public func blockStatus(at offset: Int64, length: Int64) async throws(BlockError) -> BlockStatus {
        var st = try await file.blockStatus(at: offset, length: length)
        st.flags.remove(.allocated)
        st.flags.remove(.eof)
        st.flags.insert(.offsetValid)
        st.hostOffset = offset
        st.hostNode = file
        return st
    }

    public func truncate(to length: Int64, preallocation: Preallocation) async throws(BlockError) {
        try await file.truncate(to: length, preallocation: preallocation)
    }

    public func close() async throws(BlockError) { try await file.close() }
}
