import BlockCore
import BlockGraph

/// The `null-co` driver: writes vanish, reads return zeroes (QEMU leaves
/// the buffer untouched unless read-zeroes=on; Lamina always clears it so
/// no daemon memory ever reaches a client).
public final class NullDriver: BlockDriver, Sendable {
    public let length: Int64
    public let readZeroes: Bool
    public let latencyNs: Int64

    public init(size: Int64 = 1 << 30, readZeroes: Bool = false, latencyNs: Int64 = 0) {
        self.length = size
        self.readZeroes = readZeroes
        self.latencyNs = latencyNs
    }

    public func reopenForWriting() async throws(BlockError) {}

    public var formatName: String { "null-co" }
    public var children: [BlockChild] { [] }

    private func delay() async {
        if latencyNs > 0 { try? await Task.sleep(for: .nanoseconds(latencyNs)) }
    }

    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws(BlockError) {
        await delay()
        if let b = buffer.baseAddress { b.initializeMemory(as: UInt8.self, repeating: 0, count: buffer.count) }
    }

    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws(BlockError) {
        await delay()
    }

    public func writeZeroes(at offset: Int64, length: Int64, flags: WriteFlags) async throws(BlockError) {
        await delay()
    }

    public func discard(at offset: Int64, length: Int64) async throws(BlockError) {}
    public func flush() async throws(BlockError) {}

    public func blockStatus(at offset: Int64, length: Int64) async throws(BlockError) -> BlockStatus {
        BlockStatus(flags: readZeroes ? [.offsetValid, .zero] : [.offsetValid], length: length, hostOffset: offset)
    }

    public func close() async throws(BlockError) {}
}
