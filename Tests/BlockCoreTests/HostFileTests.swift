import BlockCore
import BlockIO
import Foundation
import Testing

/// A scratch directory removed when released.
final class ScratchDir: @unchecked Sendable {
    let path: String
    init() {
        path = FileManager.default.temporaryDirectory.path + "/lamina-core-" + UUID().uuidString
        try! FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }
    func file(_ name: String) -> String { path + "/" + name }
    deinit { try? FileManager.default.removeItem(atPath: path) }
}

private func pattern(_ count: Int, seed: UInt8) -> [UInt8] {
    (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ Int(seed)) | 1 }
}

@Suite("HostFile")
struct HostFileTests {
    func makeFile(_ dir: ScratchDir, _ name: String = "f.img") throws -> HostFile {
        try HostFile.open(dir.file(name), .init(readOnly: false, create: true))
    }

    @Test("write/read round trip at unaligned offsets")
    func roundTrip() throws {
        let dir = ScratchDir()
        let f = try makeFile(dir)
        defer { f.close() }
        let data = pattern(10_000, seed: 7)
        try data.withUnsafeBytes { try f.write($0, at: 12_345) }
        #expect(try f.size() == 12_345 + 10_000)
        var back = [UInt8](repeating: 0, count: 10_000)
        try back.withUnsafeMutableBytes { try f.read($0, at: 12_345) }
        #expect(back == data)
        // A sub-range.
        var mid = [UInt8](repeating: 0, count: 333)
        try mid.withUnsafeMutableBytes { try f.read($0, at: 12_345 + 4_000) }
        #expect(mid == Array(data[4_000..<4_333]))
        // The gap before the data reads as zeroes.
        var gap = [UInt8](repeating: 0xAA, count: 12_345)
        try gap.withUnsafeMutableBytes { try f.read($0, at: 0) }
        #expect(gap.allSatisfy { $0 == 0 })
        // Zero-length I/O is a no-op.
        try f.write(UnsafeRawBufferPointer(start: nil, count: 0), at: 1 << 40)
        try f.read(UnsafeMutableRawBufferPointer(start: nil, count: 0), at: 1 << 40)
        #expect(try f.size() == 22_345)
    }

    @Test("reads past end-of-file zero-fill; readPartial reports the short count")
    func readPastEOF() throws {
        let dir = ScratchDir()
        let f = try makeFile(dir)
        defer { f.close() }
        let data = pattern(1000, seed: 3)
        try data.withUnsafeBytes { try f.write($0, at: 0) }
        var buf = [UInt8](repeating: 0xAA, count: 600)
        try buf.withUnsafeMutableBytes { try f.read($0, at: 700) }
        #expect(Array(buf[0..<300]) == Array(data[700..<1000]))
        #expect(buf[300...].allSatisfy { $0 == 0 })
        // Entirely past EOF.
        buf = [UInt8](repeating: 0xAA, count: 600)
        try buf.withUnsafeMutableBytes { try f.read($0, at: 5000) }
        #expect(buf.allSatisfy { $0 == 0 })
        // readPartial
        buf = [UInt8](repeating: 0xAA, count: 600)
        let n = try buf.withUnsafeMutableBytes { try f.readPartial($0, at: 700) }
        #expect(n == 300)
        #expect(try buf.withUnsafeMutableBytes { try f.readPartial($0, at: 2000) } == 0)
        #expect(try f.size() == 1000)
    }

    @Test("truncate grows with zeroes and shrinks")
    func truncate() throws {
        let dir = ScratchDir()
        let f = try makeFile(dir)
        defer { f.close() }
        let data = pattern(4096, seed: 1)
        try data.withUnsafeBytes { try f.write($0, at: 0) }
        try f.truncate(to: 1 << 20)
        #expect(try f.size() == 1 << 20)
        var tail = [UInt8](repeating: 0xAA, count: 8192)
        try tail.withUnsafeMutableBytes { try f.read($0, at: 4096) }
        #expect(tail.allSatisfy { $0 == 0 })
        try f.truncate(to: 100)
        #expect(try f.size() == 100)
        var head = [UInt8](repeating: 0xAA, count: 200)
        try head.withUnsafeMutableBytes { try f.read($0, at: 0) }
        #expect(Array(head[0..<100]) == Array(data[0..<100]))
        #expect(head[100...].allSatisfy { $0 == 0 })
    }

    @Test("punch hole reads back as zeroes, keeps the size and frees blocks")
    func punchHole() throws {
        let dir = ScratchDir()
        let f = try makeFile(dir)
        defer { f.close() }
        let size = 1 << 20
        let data = pattern(size, seed: 9)
        try data.withUnsafeBytes { try f.write($0, at: 0) }
        try f.fullSync()
        let before = try f.allocatedSize()
        do throws(BlockError) {
            try f.punchHole(offset: 256 << 10, length: 128 << 10)
        } catch {
            if error.kind == .notSupported { return }  // host file system without hole punching
            throw error
        }
        // Also an unaligned range: the partial blocks are zeroed.
        try f.punchHole(offset: 700_001, length: 5_000)
        #expect(try f.size() == Int64(size))
        var back = [UInt8](repeating: 0, count: size)
        try back.withUnsafeMutableBytes { try f.read($0, at: 0) }
        #expect(Array(back[0..<(256 << 10)]) == Array(data[0..<(256 << 10)]))
        #expect(back[(256 << 10)..<(384 << 10)].allSatisfy { $0 == 0 })
        #expect(Array(back[(384 << 10)..<700_001]) == Array(data[(384 << 10)..<700_001]))
        #expect(back[700_001..<705_001].allSatisfy { $0 == 0 })
        #expect(Array(back[705_001...]) == Array(data[705_001...]))
        #expect(try f.allocatedSize() < before)
    }

    @Test("zeroRange reads back as zeroes")
    func zeroRange() throws {
        let dir = ScratchDir()
        let f = try makeFile(dir)
        defer { f.close() }
        let data = pattern(65_536, seed: 5)
        try data.withUnsafeBytes { try f.write($0, at: 0) }
        do throws(BlockError) {
            try f.zeroRange(offset: 4096, length: 8192)
        } catch {
            if error.kind == .notSupported { return }
            throw error
        }
        var back = [UInt8](repeating: 0, count: 65_536)
        try back.withUnsafeMutableBytes { try f.read($0, at: 0) }
        #expect(Array(back[0..<4096]) == Array(data[0..<4096]))
        #expect(back[4096..<12_288].allSatisfy { $0 == 0 })
        #expect(Array(back[12_288...]) == Array(data[12_288...]))
    }

    @Test("seekData / seekHole on a sparse file")
    func seekDataHole() throws {
        let dir = ScratchDir()
        let f = try makeFile(dir)
        defer { f.close() }
        let mib: Int64 = 1 << 20
        try f.truncate(to: 4 * mib)
        let chunk = pattern(65_536, seed: 2)
        try chunk.withUnsafeBytes { try f.write($0, at: mib) }
        try chunk.withUnsafeBytes { try f.write($0, at: 3 * mib) }
        try f.fullSync()
        let first = try f.seekData(0)
        if first == 0 {
            // The file system does not report holes: everything is data.
            #expect(try f.seekHole(0) == 4 * mib)
            return
        }
        #expect(first == mib)
        #expect(try f.seekHole(0) == 0)
        #expect(try f.seekHole(mib) == mib + 65_536)
        #expect(try f.seekData(mib + 65_536) == 3 * mib)
        #expect(try f.seekData(mib + 100) == mib + 100)
        #expect(try f.seekHole(3 * mib) == 3 * mib + 65_536)
        // Only a hole after the last data: no more data.
        #expect(try f.seekData(3 * mib + 65_536) == nil)
        // At or past EOF: ENXIO for both.
        #expect(try f.seekData(4 * mib) == nil)
        #expect(try f.seekHole(4 * mib) == nil)
        #expect(try f.seekData(10 * mib) == nil)
    }

    @Test("open errors are phrased like QEMU's file driver")
    func openErrors() throws {
        let dir = ScratchDir()
        let missing = dir.file("missing.img")
        #expect {
            _ = try HostFile.open(missing, .init())
        } throws: { e in
            let b = e as! BlockError
            return b.kind == .notFound && b.message == "Could not open '\(missing)': No such file or directory"
        }
        #expect {
            _ = try HostFile.open(dir.path, .init())
        } throws: { e in
            let b = e as! BlockError
            return b.errno == EISDIR && b.message == "'file' driver requires '\(dir.path)' to be a regular file"
        }
        // Exclusive create of an existing file fails.
        let f = try makeFile(dir, "x.img")
        f.close()
        #expect(throws: BlockError.self) {
            _ = try HostFile.open(dir.file("x.img"), .init(readOnly: false, create: true, exclusive: true))
        }
    }

    @Test("read-only handles refuse writes; close is idempotent")
    func readOnly() throws {
        let dir = ScratchDir()
        let w = try makeFile(dir)
        try [UInt8](repeating: 1, count: 512).withUnsafeBytes { try w.write($0, at: 0) }
        w.close()
        w.close()
        let r = try HostFile.open(dir.file("f.img"), .init())
        defer { r.close() }
        #expect(r.readOnly)
        #expect(r.requestAlignment == 1)
        #expect(throws: BlockError.self) {
            try [UInt8](repeating: 2, count: 512).withUnsafeBytes { try r.write($0, at: 0) }
        }
        var back = [UInt8](repeating: 0, count: 512)
        try back.withUnsafeMutableBytes { try r.read($0, at: 0) }
        #expect(back.allSatisfy { $0 == 1 })
    }

    @Test("copyIn copies between files inside the kernel and zero-fills past the source's end")
    func copyIn() throws {
        let dir = ScratchDir()
        let src = try makeFile(dir, "src")
        let dst = try makeFile(dir, "dst")
        defer { src.close(); dst.close() }
        let data = pattern(100_000, seed: 4)
        try data.withUnsafeBytes { try src.write($0, at: 0) }
        try [UInt8](repeating: 0xCC, count: 200_000).withUnsafeBytes { try dst.write($0, at: 0) }
        let ok = try dst.copyIn(from: src, sourceOffset: 90_000, at: 1000, length: 20_000)
        if !ok { return }  // not supported between these files
        var back = [UInt8](repeating: 0, count: 22_000)
        try back.withUnsafeMutableBytes { try dst.read($0, at: 0) }
        #expect(back[0..<1000].allSatisfy { $0 == 0xCC })
        #expect(Array(back[1000..<11_000]) == Array(data[90_000..<100_000]))
        #expect(back[11_000..<21_000].allSatisfy { $0 == 0 })
        #expect(back[21_000...].allSatisfy { $0 == 0xCC })
    }
}
