import BlockCore
import BlockGraph
import BlockIO
import Synchronization
import Testing

/// An in-memory driver that enforces the generic layer's promises
/// (alignment, range, writability) and records every request. Reads and
/// writes suspend before touching memory so that unserialised
/// read-modify-write cycles would interleave and lose data.
final class MemDriver: BlockDriver, @unchecked Sendable {
    struct Request: Equatable {
        var op: String
        var offset: Int64
        var length: Int64
    }

    private struct State {
        var data: [UInt8]
        var log: [Request] = []
        var violations: [String] = []
    }

    let formatName = "mem"
    let requestAlignment: Int
    let memoryAlignment: Int
    let children: [BlockChild] = []
    let yields: Bool
    private let size: Int64
    private let state: Mutex<State>

    var length: Int64 { size }

    init(size: Int64, requestAlignment: Int = 1, memoryAlignment: Int = 1, yields: Bool = true, fill: UInt8 = 0) {
        self.size = size
        self.requestAlignment = requestAlignment
        self.memoryAlignment = memoryAlignment
        self.yields = yields
        state = Mutex(State(data: [UInt8](repeating: fill, count: Int(size))))
    }

    var log: [Request] { state.withLock { $0.log } }
    var violations: [String] { state.withLock { $0.violations } }
    func clearLog() { state.withLock { $0.log = [] } }
    func contents() -> [UInt8] { state.withLock { $0.data } }

    private func validate(_ op: String, _ offset: Int64, _ length: Int64, _ base: UnsafeRawPointer?) {
        state.withLock { s in
            s.log.append(Request(op: op, offset: offset, length: length))
            let a = Int64(requestAlignment)
            if offset % a != 0 || length % a != 0 { s.violations.append("\(op) unaligned \(offset)+\(length)") }
            if offset < 0 || length <= 0 || offset + length > size { s.violations.append("\(op) out of range \(offset)+\(length)") }
            if let b = base, Int(bitPattern: b) % memoryAlignment != 0 { s.violations.append("\(op) misaligned buffer") }
        }
    }

    func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws(BlockError) {
        validate("read", offset, Int64(buffer.count), UnsafeRawPointer(buffer.baseAddress))
        if yields { await Task.yield() }
        state.withLock { s in
            s.data.withUnsafeBytes { d in
                buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: d[Int(offset)..<(Int(offset) + buffer.count)]))
            }
        }
    }

    func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws(BlockError) {
        validate("write", offset, Int64(buffer.count), buffer.baseAddress)
        if yields { await Task.yield() }
        state.withLock { s in
            s.data.withUnsafeMutableBytes { d in
                UnsafeMutableRawBufferPointer(rebasing: d[Int(offset)..<(Int(offset) + buffer.count)]).copyMemory(from: buffer)
            }
        }
    }

    func writeZeroes(at offset: Int64, length: Int64, flags: WriteFlags) async throws(BlockError) {
        validate("zero", offset, length, nil)
        state.withLock { s in
            for i in Int(offset)..<Int(offset + length) { s.data[i] = 0 }
        }
    }

    func discard(at offset: Int64, length: Int64) async throws(BlockError) {
        validate("discard", offset, length, nil)
    }

    func flush() async throws(BlockError) {
        state.withLock { $0.log.append(Request(op: "flush", offset: 0, length: 0)) }
    }

    func blockStatus(at offset: Int64, length: Int64) async throws(BlockError) -> BlockStatus {
        BlockStatus(flags: [.data], length: length)
    }

    func close() async throws(BlockError) {}
}

private func buffer(_ data: [UInt8]) -> AlignedBuffer {
    let b = AlignedBuffer(count: data.count)
    data.withUnsafeBytes { b.bytes.copyMemory(from: $0) }
    return b
}

private func nodeRead(_ node: BlockNode, _ offset: Int64, _ count: Int) async throws(BlockError) -> [UInt8] {
    let b = AlignedBuffer(count: count)
    try await node.read(at: offset, into: b.bytes)
    return Array(b.bytes)
}

private func nodeWrite(_ node: BlockNode, _ offset: Int64, _ data: [UInt8]) async throws(BlockError) {
    let b = buffer(data)
    try await node.write(at: offset, from: UnsafeRawBufferPointer(b.bytes))
}

private func driverWrite(_ d: MemDriver, _ offset: Int64, _ data: [UInt8]) async throws(BlockError) {
    let b = buffer(data)
    try await d.write(at: offset, from: UnsafeRawBufferPointer(b.bytes), flags: [])
}

private func bytes(_ count: Int, seed: Int) -> [UInt8] {
    (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ seed &* 13) | 0x01 }
}

@Suite("BlockNode generic layer")
struct BlockNodeTests {
    @Test("out-of-range and invalid requests throw outOfRange and never reach the driver")
    func outOfRange() async throws {
        let d = MemDriver(size: 65_536)
        let node = BlockNode(driver: d, filename: "mem", readOnly: false)
        let cases: [(Int64, String)] = [(65_536 - 512, "tail"), (65_536, "at end"), (1 << 40, "far"), (-1, "negative"),
                                        (Int64.max - 100, "overflow")]
        for (off, what) in cases {
            do throws(BlockError) {
                _ = try await nodeRead(node, off, 1024)
                Issue.record("read \(what) did not throw")
            } catch {
                #expect(error.kind == .outOfRange, "read \(what)")
            }
            do throws(BlockError) {
                try await nodeWrite(node, off, [UInt8](repeating: 1, count: 1024))
                Issue.record("write \(what) did not throw")
            } catch {
                #expect(error.kind == .outOfRange, "write \(what)")
            }
            await #expect(throws: BlockError.self) { try await node.writeZeroes(at: off, length: 1024) }
            await #expect(throws: BlockError.self) { try await node.discard(at: off, length: 1024) }
        }
        await #expect(throws: BlockError.self) { try await node.writeZeroes(at: 0, length: -1) }
        #expect(d.log.isEmpty)
        // Zero-length requests at the very end are fine and do not reach the driver.
        try await node.read(at: 65_536, into: UnsafeMutableRawBufferPointer(start: nil, count: 0))
        try await node.writeZeroes(at: 65_536, length: 0)
        #expect(d.log.isEmpty)
        // The last byte is readable.
        _ = try await nodeRead(node, 65_535, 1)
        #expect(d.violations.isEmpty)
    }

    @Test("writes to a read-only node throw permissionDenied; flush is a no-op")
    func readOnly() async throws {
        let d = MemDriver(size: 65_536)
        let node = BlockNode(driver: d, filename: "mem", readOnly: true)
        do throws(BlockError) {
            try await nodeWrite(node, 0, [UInt8](repeating: 1, count: 512))
            Issue.record("write did not throw")
        } catch {
            #expect(error.kind == .permissionDenied)
        }
        for op in 0..<3 {
            do throws(BlockError) {
                switch op {
                case 0: try await node.writeZeroes(at: 0, length: 512)
                case 1: try await node.discard(at: 0, length: 512)
                default: try await node.truncate(to: 1024)
                }
                Issue.record("op \(op) did not throw")
            } catch {
                #expect(error.kind == .permissionDenied, "op \(op)")
            }
        }
        try await node.flush()
        #expect(d.log.isEmpty)
        // Reads still work.
        let r = try await nodeRead(node, 512, 512)
        #expect(r.allSatisfy { $0 == 0 })
    }

    @Test("unaligned reads are widened to the driver's request alignment",
          arguments: [(0, 1), (1, 1), (100, 5000), (4095, 2), (4096, 4096), (8000, 9000), (0, 65_536), (65_535, 1)])
    func alignedReads(offset: Int, count: Int) async throws {
        let size = 65_536
        let d = MemDriver(size: Int64(size), requestAlignment: 4096)
        let node = BlockNode(driver: d, filename: "mem", readOnly: false)
        // Seed the driver directly.
        let content = bytes(size, seed: 3)
        try await driverWrite(d, 0, content)
        d.clearLog()
        let out = try await nodeRead(node, Int64(offset), count)
        #expect(out == Array(content[offset..<(offset + count)]))
        #expect(d.violations.isEmpty, "\(d.violations)")
        let start = Int64(offset) / 4096 * 4096
        let end = (Int64(offset + count) + 4095) / 4096 * 4096
        #expect(d.log == [MemDriver.Request(op: "read", offset: start, length: end - start)])
    }

    @Test("unaligned writes do read-modify-write of whole aligned blocks and keep the neighbours",
          arguments: [(0, 1), (1, 1), (100, 5000), (4095, 2), (4096, 4096), (8000, 9000), (65_535, 1), (12_288, 8192)])
    func alignedWrites(offset: Int, count: Int) async throws {
        let size = 65_536
        let d = MemDriver(size: Int64(size), requestAlignment: 4096)
        let node = BlockNode(driver: d, filename: "mem", readOnly: false)
        var expected = bytes(size, seed: 5)
        try await driverWrite(d, 0, expected)
        d.clearLog()
        let data = [UInt8](repeating: 0xE7, count: count)
        try await nodeWrite(node, Int64(offset), data)
        expected.replaceSubrange(offset..<(offset + count), with: data)
        #expect(d.contents() == expected)
        #expect(d.violations.isEmpty, "\(d.violations)")
        let start = Int64(offset) / 4096 * 4096
        let end = (Int64(offset + count) + 4095) / 4096 * 4096
        let aligned = start == Int64(offset) && end == Int64(offset + count)
        let log = d.log
        #expect(log.last == MemDriver.Request(op: "write", offset: start, length: end - start))
        // Read-modify-write only when the request was not aligned.
        #expect(log.count == (aligned ? 1 : 2))
        if !aligned { #expect(log.first == MemDriver.Request(op: "read", offset: start, length: end - start)) }
    }

    @Test("misaligned buffer addresses are bounced for drivers with a memory alignment")
    func memoryAlignment() async throws {
        let d = MemDriver(size: 8192, requestAlignment: 512, memoryAlignment: 512)
        let node = BlockNode(driver: d, filename: "mem", readOnly: false)
        let raw = AlignedBuffer(count: 4096 + 1)
        let misaligned = UnsafeMutableRawBufferPointer(start: raw.pointer + 1, count: 1024)
        for i in 0..<1024 { misaligned[i] = UInt8(truncatingIfNeeded: i) | 1 }
        try await node.write(at: 512, from: UnsafeRawBufferPointer(misaligned))
        misaligned.zeroFill()
        try await node.read(at: 512, into: misaligned)
        #expect((0..<1024).allSatisfy { misaligned[$0] == UInt8(truncatingIfNeeded: $0) | 1 })
        #expect(d.violations.isEmpty, "\(d.violations)")
        let c = d.contents()
        #expect(c[0..<512].allSatisfy { $0 == 0 } && c[1536...].allSatisfy { $0 == 0 })
        withExtendedLifetime(raw) {}
    }

    @Test("unaligned writeZeroes: head/tail by buffer writes, aligned middle by the driver")
    func unalignedZeroes() async throws {
        let size = 65_536
        let d = MemDriver(size: Int64(size), requestAlignment: 4096, fill: 0xAB)
        let node = BlockNode(driver: d, filename: "mem", readOnly: false)
        try await node.writeZeroes(at: 1000, length: 20_000)
        let c = d.contents()
        #expect(c[0..<1000].allSatisfy { $0 == 0xAB })
        #expect(c[1000..<21_000].allSatisfy { $0 == 0 })
        #expect(c[21_000...].allSatisfy { $0 == 0xAB })
        #expect(d.violations.isEmpty, "\(d.violations)")
        #expect(d.log.contains(MemDriver.Request(op: "zero", offset: 4096, length: 16_384)))
        // Entirely inside one block.
        try await node.writeZeroes(at: 30_000, length: 10)
        let c2 = d.contents()
        #expect(c2[29_999] == 0xAB && c2[30_010] == 0xAB && c2[30_000..<30_010].allSatisfy { $0 == 0 })
        #expect(d.violations.isEmpty, "\(d.violations)")
    }

    @Test("concurrent unaligned writes into the same 4 KiB block from many tasks lose nothing")
    func concurrentRMWSameBlock() async throws {
        let d = MemDriver(size: 16_384, requestAlignment: 4096)
        let node = BlockNode(driver: d, filename: "mem", readOnly: false)
        let pool = IOThreadPool(count: 4, name: "rmw-test")
        defer { pool.shutdown() }
        // 64 tasks, each owning 64 bytes of block 1 (bytes 4096..<8192).
        let tasks = 64
        try await withThrowingTaskGroup(of: Void.self) { group in
            for t in 0..<tasks {
                group.addTask(executorPreference: pool[t]) {
                    try await nodeWrite(node, 4096 + Int64(t * 64), [UInt8](repeating: UInt8(t + 1), count: 64))
                }
            }
            try await group.waitForAll()
        }
        let c = d.contents()
        for t in 0..<tasks {
            let slice = c[(4096 + t * 64)..<(4096 + t * 64 + 64)]
            #expect(slice.allSatisfy { $0 == UInt8(t + 1) }, "task \(t)'s bytes were lost")
        }
        #expect(c[0..<4096].allSatisfy { $0 == 0 } && c[8192...].allSatisfy { $0 == 0 })
        #expect(d.violations.isEmpty, "\(d.violations)")
    }

    @Test("concurrent unaligned writes straddling block boundaries, mixed with aligned writes, lose nothing")
    func concurrentRMWStraddling() async throws {
        let size = 8 * 4096
        let d = MemDriver(size: Int64(size), requestAlignment: 4096)
        let node = BlockNode(driver: d, filename: "mem", readOnly: false)
        let pool = IOThreadPool(count: 4, name: "rmw-test2")
        defer { pool.shutdown() }
        // Pieces of 1000 bytes tile blocks 0..<4 (several straddle a
        // boundary); blocks 4..<8 get whole-block aligned writes at the same time.
        let pieces = 4 * 4096 / 1000
        try await withThrowingTaskGroup(of: Void.self) { group in
            for p in 0..<pieces {
                group.addTask(executorPreference: pool[p]) {
                    try await nodeWrite(node, Int64(p * 1000), [UInt8](repeating: UInt8(p + 1), count: 1000))
                }
            }
            for blk in 4..<8 {
                group.addTask(executorPreference: pool[blk]) {
                    let buf = AlignedBuffer(count: 4096)
                    buf.bytes.initializeMemory(as: UInt8.self, repeating: UInt8(200 + blk))
                    try await node.write(at: Int64(blk * 4096), from: UnsafeRawBufferPointer(buf.bytes))
                }
            }
            try await group.waitForAll()
        }
        let c = d.contents()
        for p in 0..<pieces {
            #expect(c[(p * 1000)..<(p * 1000 + 1000)].allSatisfy { $0 == UInt8(p + 1) }, "piece \(p)")
        }
        #expect(c[(pieces * 1000)..<(4 * 4096)].allSatisfy { $0 == 0 })
        for blk in 4..<8 {
            #expect(c[(blk * 4096)..<((blk + 1) * 4096)].allSatisfy { $0 == UInt8(200 + blk) }, "block \(blk)")
        }
        #expect(d.violations.isEmpty, "\(d.violations)")
    }

    @Test("blockStatus marks data as allocated, clamps the length and flags EOF")
    func blockStatus() async throws {
        let d = MemDriver(size: 65_536)
        let node = BlockNode(driver: d, filename: "mem", readOnly: false)
        let st = try await node.blockStatus(at: 0, length: 1 << 30)
        #expect(st.flags.contains(.data) && st.flags.contains(.allocated) && st.flags.contains(.eof))
        #expect(st.length == 65_536)
        let mid = try await node.blockStatus(at: 1024, length: 1024)
        #expect(mid.length == 1024 && !mid.flags.contains(.eof))
        let past = try await node.blockStatus(at: 65_536, length: 10)
        #expect(past.flags == [.eof] && past.length == 0)
    }
}
