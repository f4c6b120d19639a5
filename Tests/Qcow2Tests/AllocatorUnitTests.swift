import BlockCore
import BlockDrivers
import BlockGraph
import Foundation
import Testing
@testable import Qcow2

// MARK: - Helpers (in-process only)

/// Reads `count` bytes of a file at `offset`.
private func peek(_ path: String, _ offset: UInt64, _ count: Int) throws -> [UInt8] {
    let fh = try #require(FileHandle(forReadingAtPath: path))
    defer { try? fh.close() }
    try fh.seek(toOffset: offset)
    return [UInt8](try fh.read(upToCount: count) ?? Data())
}

/// Overwrites bytes of a file at `offset`.
private func poke(_ path: String, _ offset: UInt64, _ bytes: [UInt8]) throws {
    let fh = try #require(FileHandle(forUpdatingAtPath: path))
    defer { try? fh.close() }
    try fh.seek(toOffset: offset)
    try fh.write(contentsOf: Data(bytes))
}

private func peek64(_ path: String, _ offset: UInt64) throws -> UInt64 {
    try peek(path, offset, 8).be64(0)
}

private func poke64(_ path: String, _ offset: UInt64, _ v: UInt64) throws {
    var b = [UInt8](repeating: 0, count: 8)
    b.putBE64(v, 0)
    try poke(path, offset, b)
}

private func fileSize(_ path: String) throws -> Int64 {
    let a = try FileManager.default.attributesOfItem(atPath: path)
    return (a[.size] as! NSNumber).int64Value
}

private func create(_ path: String, size: Int64, clusterSize: Int = 65536, refcountBits: Int = 16,
                    version: UInt32 = 3, preallocation: Preallocation = .off) async throws {
    var o = Qcow2CreateOptions()
    o.size = size
    o.clusterSize = clusterSize
    o.refcountBits = refcountBits
    o.version = version
    o.preallocation = preallocation
    try await ImageCreator.createQcow2(path: path, options: o)
}

private func image(_ node: BlockNode) throws -> Qcow2Image {
    try #require(node.driver as? Qcow2Image)
}

/// Opens read-only, runs check, closes; expects a clean result.
private func expectClean(_ path: String, sourceLocation: SourceLocation = #_sourceLocation) async throws -> ImageCheckResult {
    let node = try await openRO(path)
    let img = try image(node)
    let (res, err) = await img.check()
    try await node.close()
    #expect(err == nil, "check failed: \(String(describing: err))", sourceLocation: sourceLocation)
    #expect(res.corruptions == 0, "\(res.messages)", sourceLocation: sourceLocation)
    #expect(res.leaks == 0, "\(res.messages)", sourceLocation: sourceLocation)
    #expect(res.checkErrors == 0, "\(res.messages)", sourceLocation: sourceLocation)
    return res
}

private func patterned(_ count: Int, _ tag: Int) -> AlignedBuffer {
    let b = AlignedBuffer(count: count)
    for i in stride(from: 0, to: count, by: 8) {
        b.pointer.storeBytes(of: UInt64(tag) << 32 | UInt64(i), toByteOffset: i, as: UInt64.self)
    }
    return b
}

/// Compares `count` bytes of `a` at `offset` with the start of `b` (both
/// buffers stay alive for the comparison).
private func same(_ a: AlignedBuffer, _ offset: Int, _ b: AlignedBuffer, _ count: Int) -> Bool {
    withExtendedLifetime((a, b)) { memcmp(a.pointer + offset, b.pointer, count) == 0 }
}

private func errorOf(_ body: () async throws -> Void) async -> (any Error)? {
    do {
        try await body()
        return nil
    } catch {
        return error
    }
}

@Suite("qcow2 allocator and open-time checks (in process)")
struct AllocatorUnitTests {
    @Test("N clusters written, closed, reopened: check reports no corruption and no leak",
          arguments: [(512, 16), (4096, 1), (65536, 16), (65536, 64), (16384, 2)])
    func writeCloseCheck(clusterSize: Int, refcountBits: Int) async throws {
        let dir = TempDir()
        let q = dir.file("w.qcow2")
        let cs = Int64(clusterSize)
        let l2Span = cs * cs / 8
        try await create(q, size: max(64 << 20, l2Span * 4), clusterSize: clusterSize, refcountBits: refcountBits)
        // Scattered guest clusters: a contiguous run, singles, some in other L2 tables.
        var clusters: [Int64] = Array(0..<20) + [33, 35, 100, 101, 250]
        clusters += [l2Span / cs + 1, 2 * l2Span / cs + 7, 3 * l2Span / cs]
        clusters = Array(Set(clusters)).sorted()
        let node = try await openRW(q)
        for c in clusters {
            let b = patterned(clusterSize, Int(c) + 1)
            try await node.write(at: c * cs, from: UnsafeRawBufferPointer(b.bytes))
        }
        // A partial-cluster write too (copy-on-write of the untouched part as zeroes).
        let small = patterned(100, 999)
        try await node.write(at: 400 * cs + 7, from: UnsafeRawBufferPointer(small.bytes))
        try await node.close()

        let res = try await expectClean(q)
        #expect(res.allocatedClusters == Int64(clusters.count + 1))
        // Content survives.
        let r = try await openRO(q)
        let got = AlignedBuffer(count: clusterSize)
        for c in clusters {
            try await r.read(at: c * cs, into: got.bytes)
            #expect(same(got, 0, patterned(clusterSize, Int(c) + 1), clusterSize), "cluster \(c)")
        }
        try await r.read(at: 400 * cs, into: got.bytes)
        #expect(got.slice(0, 7).isAllZero && got.slice(107, clusterSize - 107).isAllZero)
        #expect(same(got, 7, small, 100))
        try await r.close()
    }

    @Test("concurrent writers to distinct clusters, then close and reopen: check is clean")
    func concurrentWritesCheck() async throws {
        let dir = TempDir()
        let q = dir.file("cw.qcow2")
        try await create(q, size: 32 << 20, clusterSize: 4096)
        let node = try await openRW(q)
        try await withThrowingTaskGroup(of: Void.self) { group in
            for t in 0..<8 {
                group.addTask {
                    for k in 0..<32 {
                        let c = Int64(k * 8 + t) * 3  // interleaved, with gaps
                        let b = patterned(4096, Int(c))
                        try await node.write(at: c * 4096, from: UnsafeRawBufferPointer(b.bytes))
                    }
                }
            }
            try await group.waitForAll()
        }
        try await node.close()
        let res = try await expectClean(q)
        #expect(res.allocatedClusters == 256)
    }

    @Test("discarded clusters are reused after a flush: the file does not grow")
    func discardReuse() async throws {
        let dir = TempDir()
        let q = dir.file("d.qcow2")
        let cs = 65536
        try await create(q, size: 64 << 20)
        var node = try await openRW(q)
        for i in 0..<64 {
            let b = patterned(cs, i + 1)
            try await node.write(at: Int64(i * cs), from: UnsafeRawBufferPointer(b.bytes))
        }
        try await node.close()
        let sizeAfterFirst = try fileSize(q)
        _ = try await expectClean(q)

        node = try await openRW(q)
        try await node.discard(at: 0, length: Int64(64 * cs))
        try await node.flush()
        // New data elsewhere in the guest (same L2 table): must land in the freed clusters.
        for i in 0..<64 {
            let b = patterned(cs, 1000 + i)
            try await node.write(at: Int64((128 + i) * cs), from: UnsafeRawBufferPointer(b.bytes))
        }
        try await node.close()
        let sizeAfterSecond = try fileSize(q)
        #expect(sizeAfterSecond <= sizeAfterFirst, "file grew from \(sizeAfterFirst) to \(sizeAfterSecond)")
        let res = try await expectClean(q)
        #expect(res.allocatedClusters == 64)

        let r = try await openRO(q)
        let got = AlignedBuffer(count: 64 * cs)
        try await r.read(at: 0, into: got.bytes)
        #expect(got.bytes.isAllZero)
        try await r.read(at: Int64(128 * cs), into: got.bytes)
        for i in 0..<64 {
            #expect(same(got, i * cs, patterned(cs, 1000 + i), cs), "cluster \(i)")
        }
        try await r.close()
    }

    /// QEMU lowers its free-cluster index when a cluster is freed, so the
    /// next allocation reuses it: four rounds of "write 128 clusters,
    /// discard them, flush" leave a file of about 128 data clusters.
    @Test("discard + flush + rewrite in one session reuses the freed clusters (file stays near one round's size)")
    func discardRewriteSameSession() async throws {
        let dir = TempDir()
        let q = dir.file("ds.qcow2")
        let cs = 4096
        try await create(q, size: 16 << 20, clusterSize: cs)
        let node = try await openRW(q)
        for round in 0..<4 {
            for i in 0..<128 {
                let b = patterned(cs, round * 1000 + i)
                try await node.write(at: Int64(i * cs), from: UnsafeRawBufferPointer(b.bytes))
            }
            try await node.flush()
            try await node.discard(at: 0, length: Int64(128 * cs))
            try await node.flush()
        }
        let b = patterned(cs, 7)
        try await node.write(at: 0, from: UnsafeRawBufferPointer(b.bytes))
        try await node.close()
        let res = try await expectClean(q)
        #expect(res.allocatedClusters == 1)
        // Metadata (header, refcount table and block, L1, L2) plus one
        // round of data, with slack; four rounds' worth means no reuse.
        let size = try fileSize(q)
        let bound = Int64((16 + 128 + 64) * cs)
        #expect(size <= bound, "file is \(size) bytes (\(size / Int64(cs)) clusters) after 4 rounds of write/discard/flush; expected <= \(bound)")
    }

    @Test("refcount table growth with 512-byte clusters and refcount_bits=1; image checks clean")
    func refcountTableGrowth() async throws {
        let dir = TempDir()
        let q = dir.file("r.qcow2")
        // One 512-byte refcount table cluster holds 64 block offsets; each
        // 1-bit block covers 4096 clusters: 128 MiB of host clusters. Metadata
        // preallocation of 136 MiB allocates more than that without writing data.
        try await create(q, size: 136 << 20, clusterSize: 512, refcountBits: 1, preallocation: .metadata)
        let rtClusters = try peek(q, 56, 4).be32(0)
        #expect(rtClusters > 1, "refcount table did not grow")
        let res = try await expectClean(q)
        #expect(res.allocatedClusters == (136 << 20) / 512)

        // Allocate again through writes after the growth: discard a range,
        // flush, write elsewhere... (fully preallocated, so rewrite in place
        // and into discarded clusters).
        let node = try await openRW(q)
        try await node.discard(at: 1 << 20, length: 1 << 20)
        try await node.flush()
        let b = patterned(1 << 20, 5)
        try await node.write(at: 1 << 20, from: UnsafeRawBufferPointer(b.bytes))
        try await node.write(at: 100 << 20, from: UnsafeRawBufferPointer(b.bytes))
        try await node.close()
        _ = try await expectClean(q)
        let r = try await openRO(q)
        let got = AlignedBuffer(count: 1 << 20)
        try await r.read(at: 100 << 20, into: got.bytes)
        #expect(same(got, 0, b, 1 << 20))
        try await r.read(at: 1 << 20, into: got.bytes)
        #expect(same(got, 0, b, 1 << 20))
        try await r.close()
    }

    @Test("refcount table growth through guest writes (512-byte clusters, 16-bit refcounts)")
    func refcountTableGrowthByWrites() async throws {
        let dir = TempDir()
        let q = dir.file("rw.qcow2")
        // 16-bit refcounts: a block covers 256 clusters, the first table
        // cluster 64 blocks = 8 MiB of host clusters.
        try await create(q, size: 16 << 20, clusterSize: 512, refcountBits: 16)
        let node = try await openRW(q)
        let chunk = patterned(1 << 20, 1)
        for i in 0..<12 {
            try await node.write(at: Int64(i) << 20, from: UnsafeRawBufferPointer(chunk.bytes))
        }
        try await node.close()
        #expect(try peek(q, 56, 4).be32(0) > 1, "refcount table did not grow")
        _ = try await expectClean(q)
    }

    @Test("an image with the corrupt bit set cannot be opened read/write; read-only nodes refuse writes")
    func corruptBitRefusesWrites() async throws {
        let dir = TempDir()
        let q = dir.file("c.qcow2")
        try await create(q, size: 8 << 20)
        let incompat = try peek64(q, 72)
        try poke64(q, 72, incompat | Qcow2.incompatCorrupt)
        let e = await errorOf { _ = try await openRW(q) }
        let be = try #require(e as? BlockError)
        #expect(be.message == "qcow2: Image is corrupt; cannot be opened read/write")
        #expect(be.kind == .permissionDenied)
        // Read-only is allowed; writing through it is not.
        let r = try await openRO(q)
        let b = patterned(512, 1)
        let we = await errorOf { try await r.write(at: 0, from: UnsafeRawBufferPointer(b.bytes)) }
        #expect((we as? BlockError)?.kind == .permissionDenied)
        try await r.close()
        // The file was not changed by any of this.
        #expect(try peek64(q, 72) == incompat | Qcow2.incompatCorrupt)
    }

    @Test("a corruption found while writing sets the corrupt bit; later writes are refused")
    func corruptionDuringWrite() async throws {
        let dir = TempDir()
        let q = dir.file("cw.qcow2")
        try await create(q, size: 8 << 20)
        var node = try await openRW(q)
        let b = patterned(65536, 3)
        try await node.write(at: 0, from: UnsafeRawBufferPointer(b.bytes))
        try await node.close()
        // Point guest cluster 0 at the L1 table's cluster (offset 0 would
        // read as "unallocated").
        let l1Offset = try peek64(q, 40)
        let l2Offset = try peek64(q, l1Offset) & Qcow2.l1OffsetMask
        #expect(l2Offset != 0)
        let entry = try peek64(q, l2Offset)
        #expect(entry & Qcow2.l2OffsetMask != 0)
        try poke64(q, l2Offset, Qcow2.oflagCopied | l1Offset)

        node = try await openRW(q)
        let e1 = await errorOf { try await node.write(at: 0, from: UnsafeRawBufferPointer(b.bytes)) }
        let be1 = try #require(e1 as? BlockError)
        #expect(be1.kind == .corrupt)
        #expect(be1.message.contains("Preventing invalid write on metadata"), "\(be1.message)")
        // Any further write, even to a healthy cluster, is refused.
        let e2 = await errorOf { try await node.write(at: 1 << 20, from: UnsafeRawBufferPointer(b.bytes)) }
        let be2 = try #require(e2 as? BlockError)
        #expect(be2.kind == .corrupt)
        #expect(be2.message == "qcow2: Image is corrupt; cannot be written to")
        try? await node.close()
        // The corrupt bit reached the file.
        #expect(try peek64(q, 72) & Qcow2.incompatCorrupt != 0)
        let e3 = await errorOf { _ = try await openRW(q) }
        #expect((e3 as? BlockError)?.message == "qcow2: Image is corrupt; cannot be opened read/write")
    }

    @Test("unknown incompatible feature bits refuse the open with QEMU's message",
          arguments: [(UInt64(1) << 5, "20", 65536), (UInt64(1) << 63, "8000000000000000", 65536),
                      ((UInt64(1) << 5) | (UInt64(1) << 9), "220", 4096)])
    func unknownIncompatible(bits: UInt64, hex: String, clusterSize: Int) async throws {
        let dir = TempDir()
        let q = dir.file("u.qcow2")
        try await create(q, size: 8 << 20, clusterSize: clusterSize)
        try poke64(q, 72, try peek64(q, 72) | bits)
        for readOnly in [true, false] {
            let e = await errorOf { _ = readOnly ? try await openRO(q) : try await openRW(q) }
            let be = try #require(e as? BlockError)
            #expect(be.message == "Unsupported qcow2 feature(s): Unknown incompatible feature: \(hex)")
            #expect(be.kind == .unsupportedFeature)
        }
    }

    @Test("a known incompatible bit next to an unknown one: only the unsupported bits are listed")
    func knownPlusUnknown() async throws {
        let dir = TempDir()
        let q = dir.file("k.qcow2")
        try await create(q, size: 8 << 20)
        // Dirty (known and supported) plus bit 7 (unknown).
        try poke64(q, 72, try peek64(q, 72) | Qcow2.incompatDirty | (1 << 7))
        let e = await errorOf { _ = try await openRO(q) }
        #expect((e as? BlockError)?.message == "Unsupported qcow2 feature(s): Unknown incompatible feature: 80")
    }

    /// QEMU (qcow2_do_open) accepts the external-data-file bit and then
    /// fails with "'data-file' is required for this image" when no data
    /// file is given; Lamina has that check too, after the feature check.
    @Test("external data file bit without a data file: QEMU's \"'data-file' is required for this image\"")
    func dataFileBit() async throws {
        let dir = TempDir()
        let q = dir.file("df.qcow2")
        try await create(q, size: 8 << 20)
        try poke64(q, 72, try peek64(q, 72) | Qcow2.incompatDataFile)
        let e = await errorOf { _ = try await openRO(q) }
        #expect((e as? BlockError)?.message == "'data-file' is required for this image")
    }
}
