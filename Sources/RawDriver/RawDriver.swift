import BlockCore
import BlockGraph

/// The `raw` format driver: the guest sees the file's bytes unchanged.
public final class RawDriver: BlockDriver, Sendable {
    public let file: BlockNode

    public init(file: BlockNode) { self.file = file }

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
        try await file.write(at: offset, from: buffer, flags: flags)
    }

    public func writeZeroes(at offset: Int64, length: Int64, flags: WriteFlags) async throws(BlockError) {
        try await file.writeZeroes(at: offset, length: length, flags: flags)
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
