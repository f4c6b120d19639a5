import BlockCore
import BlockDrivers
import BlockGraph
import BlockIO
import Foundation
import Qcow2
import Testing

/// The amend operations on one open image, with guest writes between them:
/// the geometry (refcount width, version) changes under a live image.
@Suite("qcow2 amend engine")
struct AmendEngineTests {
    static func write(_ n: BlockNode, _ offset: Int64, _ length: Int, _ pattern: UInt8) async throws {
        let b = AlignedBuffer(count: length)
        fill(b, pattern: pattern)
        try await n.write(at: offset, from: UnsafeRawBufferPointer(b.bytes))
    }

    static func expectPattern(_ n: BlockNode, _ offset: Int64, _ length: Int, _ pattern: UInt8,
                              sourceLocation: SourceLocation = #_sourceLocation) async throws {
        let b = AlignedBuffer(count: length)
        try await n.read(at: offset, into: b.bytes)
        #expect(b.bytes.allSatisfy { $0 == pattern }, "at \(offset)", sourceLocation: sourceLocation)
    }

    /// `live`: guest writes ran since the last amend step, so the unused
    /// part of the write reserve shows up as leaks until close.
    static func expectClean(_ img: Qcow2Image, _ label: String, live: Bool = false,
                            sourceLocation: SourceLocation = #_sourceLocation) async {
        let (res, err) = await img.check()
        #expect(err == nil && res.corruptions == 0 && (live || res.leaks == 0) && res.checkErrors == 0,
                "\(label): \(res.messages) \(String(describing: err))", sourceLocation: sourceLocation)
    }

    @Test("refcount width changes back and forth with writes between", arguments: [512, 65536])
    func refcountWidths(clusterSize: Int) async throws {
        let dir = TempDir()
        let path = dir.file("a.qcow2")
        var o = Qcow2CreateOptions()
        o.size = 8 << 20
        o.clusterSize = clusterSize
        try await ImageCreator.createQcow2(path: path, options: o)
        let n = try await openRW(path)
        let img = try #require(n.driver as? Qcow2Image)
        try await Self.write(n, 0, 1 << 20, 1)
        var pattern: UInt8 = 2
        for order in [0, 6, 3, 1, 5, 2, 4] {
            try await img.amendChangeRefcountOrder(order) { _, _ in }
            await Self.expectClean(img, "order \(order)")
            try await Self.write(n, Int64(pattern) << 19, 1 << 19, pattern)
            try await n.flush()
            await Self.expectClean(img, "order \(order) + write", live: true)
            pattern += 1
        }
        try await Self.expectPattern(n, 0, 1 << 19, 1)
        for p in UInt8(2)..<pattern {
            try await Self.expectPattern(n, Int64(p) << 19, 1 << 19, p)
        }
        try await n.close()
        let check = try run(["qemu-img", "check", path])
        #expect(check.status == 0, "\(check.stdout)\(check.stderr)")
    }

    @Test("refcount that does not fit is refused before anything changes")
    func refusedWidth() async throws {
        let dir = TempDir()
        let path = dir.file("a.qcow2")
        var o = Qcow2CreateOptions()
        o.size = 4 << 20
        try await ImageCreator.createQcow2(path: path, options: o)
        // A snapshot makes refcounts 2.
        let w = try run(["qemu-io", "-c", "write 0 1M", path])
        let s = try run(["qemu-img", "snapshot", "-c", "s", path])
        #expect(w.status == 0 && s.status == 0)
        let before = FileManager.default.contents(atPath: path)?.prefix(4 << 20)
        let n = try await openRW(path)
        let img = try #require(n.driver as? Qcow2Image)
        let problem = try await img.amendRefcountWidthProblem(order: 0)
        #expect(problem?.message.hasPrefix("Cannot decrease refcount entry width to 1 bits: Cluster at offset") == true)
        await #expect(throws: BlockError.self) { try await img.amendChangeRefcountOrder(0) { _, _ in } }
        try await n.close()
        #expect(FileManager.default.contents(atPath: path)?.prefix(4 << 20) == before)
        let check = try run(["qemu-img", "check", path])
        #expect(check.status == 0, "\(check.stdout)\(check.stderr)")
    }

    @Test("downgrade, write, upgrade, write on one open image")
    func versionRoundTrip() async throws {
        let dir = TempDir()
        let path = dir.file("a.qcow2")
        var o = Qcow2CreateOptions()
        o.size = 4 << 20
        try await ImageCreator.createQcow2(path: path, options: o)
        let n = try await openRW(path)
        let img = try #require(n.driver as? Qcow2Image)
        try await Self.write(n, 0, 256 << 10, 7)
        try await n.write(at: 1 << 20, from: UnsafeRawBufferPointer(AlignedBuffer(count: 1 << 16, zeroed: true).bytes),
                          flags: [])
        try await img.amendCheckDowngrade(size: n.length, refcountOrder: 4)
        try await img.amendDowngrade { _, _ in }
        #expect(img.version == 2)
        await Self.expectClean(img, "v2")
        try await Self.write(n, 2 << 20, 128 << 10, 8)
        try await img.amendUpgrade { _, _ in }
        #expect(img.version == 3)
        try await img.amendSetLazyRefcounts(true)
        try await Self.write(n, 3 << 20, 128 << 10, 9)
        try await n.flush()
        await Self.expectClean(img, "v3", live: true)
        try await Self.expectPattern(n, 0, 256 << 10, 7)
        try await Self.expectPattern(n, 2 << 20, 128 << 10, 8)
        try await Self.expectPattern(n, 3 << 20, 128 << 10, 9)
        try await n.close()
        let check = try run(["qemu-img", "check", path])
        #expect(check.status == 0, "\(check.stdout)\(check.stderr)")
        let info = try run(["qemu-img", "info", path])
        #expect(info.stdout.contains("compat: 1.1") && info.stdout.contains("lazy refcounts: true"), "\(info.stdout)")
    }
}
