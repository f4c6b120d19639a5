import BlockCore
import Testing
@testable import Qcow2

/// Pads serialized header bytes to a whole cluster, as they sit on disk.
private func cluster(_ b: [UInt8], _ size: Int) -> [UInt8] {
    b + [UInt8](repeating: 0, count: max(0, size - b.count))
}

private func parseError(_ bytes: [UInt8]) -> BlockError? {
    do throws(BlockError) {
        _ = try Qcow2Header.parse(bytes)
        return nil
    } catch {
        return error
    }
}

@Suite("Qcow2Header parse/serialize")
struct HeaderUnitTests {
    static let unknownExt = HeaderExtension(type: 0x1234_5678, data: [1, 2, 3, 4, 5])  // not a multiple of 8

    static func sampleV3(clusterBits: UInt32 = 16) -> Qcow2Header {
        var h = Qcow2Header()
        h.version = 3
        h.clusterBits = clusterBits
        h.size = 1 << 30
        h.l1Size = 2
        h.l1TableOffset = 3 << clusterBits
        h.refcountTableOffset = 1 << clusterBits
        h.refcountTableClusters = 1
        h.nbSnapshots = 0
        h.snapshotsOffset = 0
        h.compatibleFeatures = Qcow2.compatLazyRefcounts
        h.autoclearFeatures = 0
        h.refcountOrder = 4
        h.headerLength = UInt32(Qcow2.v3HeaderLength)
        h.extensions = [Qcow2Header.standardFeatureTable(), unknownExt]
        h.backingFormat = "qcow2"
        h.backingFile = "base image.qcow2"
        return h
    }

    @Test("v3 round trip keeps fields, extensions (unknown ones verbatim) and the backing file name")
    func v3RoundTrip() throws {
        let h = Self.sampleV3()
        let bytes = try h.serialize()
        #expect(bytes.be32(0) == Qcow2.magic)
        #expect(bytes.be32(4) == 3)
        #expect(bytes.be32(100) == 112)  // header_length
        // Extensions start right after the header, backing format first.
        #expect(bytes.be32(112) == Qcow2.extBackingFormat)
        #expect(bytes.be32(116) == 5)
        let p = try Qcow2Header.parse(cluster(bytes, 65536))
        #expect(p.version == 3)
        #expect(p.clusterBits == 16)
        #expect(p.size == h.size)
        #expect(p.l1Size == h.l1Size && p.l1TableOffset == h.l1TableOffset)
        #expect(p.refcountTableOffset == h.refcountTableOffset && p.refcountTableClusters == 1)
        #expect(p.compatibleFeatures == Qcow2.compatLazyRefcounts)
        #expect(p.refcountOrder == 4 && p.headerLength == 112)
        #expect(p.backingFile == "base image.qcow2")
        #expect(p.backingFormat == "qcow2")
        #expect(p.extensions.map(\.type) == [Qcow2.extBackingFormat, Qcow2.extFeatureTable, 0x1234_5678])
        #expect(p.extensions.first { $0.type == 0x1234_5678 } == Self.unknownExt)
        #expect(p.extensions.first { $0.type == Qcow2.extFeatureTable } == Qcow2Header.standardFeatureTable())
        #expect(p.featureNames.count == 8)
        #expect(p.featureNames.first == FeatureName(kind: 0, bit: 0, name: "dirty bit"))
        // Backing file name sits at the end, where the header says.
        #expect(Int(p.backingFileOffset) == bytes.count - 16 && p.backingFileSize == 16)
        #expect(Array(bytes[Int(p.backingFileOffset)...]) == Array("base image.qcow2".utf8))
        // A second round trip is a fixpoint, byte for byte.
        let again = try p.serialize()
        #expect(again == bytes)
        #expect(try Qcow2Header.parse(cluster(again, 65536)) == p)
    }

    @Test("v3 with extra header fields, compression type and no backing file")
    func v3LongHeader() throws {
        var h = Self.sampleV3()
        h.backingFile = nil
        h.backingFormat = nil
        h.incompatibleFeatures = Qcow2.incompatCompression | Qcow2.incompatExtendedL2
        h.compressionType = CompressionType.zstd.rawValue
        h.unknownHeaderFields = [9, 8, 7, 6, 5, 4, 3, 2]
        h.autoclearFeatures = Qcow2.autoclearBitmaps
        let bytes = try h.serialize()
        #expect(bytes.be32(100) == 120)
        #expect(bytes[104] == 1)
        #expect(bytes.be64(8) == 0 && bytes.be32(16) == 0)  // no backing file
        let p = try Qcow2Header.parse(cluster(bytes, 65536))
        #expect(p.headerLength == 120)
        #expect(p.compressionType == 1)
        #expect(p.unknownHeaderFields == [9, 8, 7, 6, 5, 4, 3, 2])
        #expect(p.incompatibleFeatures == Qcow2.incompatCompression | Qcow2.incompatExtendedL2)
        #expect(p.extendedL2)
        #expect(p.autoclearFeatures == Qcow2.autoclearBitmaps)
        #expect(p.backingFile == nil)
        #expect(p.extensions == [Qcow2Header.standardFeatureTable(), Self.unknownExt])
        #expect(try p.serialize() == bytes)
    }

    @Test("extensions are written in QEMU's order whatever order they were given in")
    func extensionOrder() throws {
        var h = Self.sampleV3()
        h.backingFormat = nil
        let bitmaps = HeaderExtension(type: Qcow2.extBitmaps, data: [UInt8](repeating: 0, count: 24))
        let other = HeaderExtension(type: 0xAAAA_0001, data: [0xFF])
        h.extensions = [other, bitmaps, Self.unknownExt, Qcow2Header.standardFeatureTable()]
        h.backingFormat = "raw"
        let p = try Qcow2Header.parse(cluster(try h.serialize(), 65536))
        #expect(p.extensions.map(\.type) == [Qcow2.extBackingFormat, Qcow2.extFeatureTable, Qcow2.extBitmaps, 0xAAAA_0001, 0x1234_5678])
        #expect(p.extensions[3] == other)
        #expect(p.bitmaps == BitmapsExtension(count: 0, directorySize: 0, directoryOffset: 0))
    }

    @Test("v2 round trip: 72-byte header, no feature table, other extensions kept")
    func v2RoundTrip() throws {
        var h = Self.sampleV3()
        h.version = 2
        h.compatibleFeatures = 0
        h.headerLength = UInt32(Qcow2.v2HeaderLength)
        let bytes = try h.serialize()
        #expect(bytes.be32(4) == 2)
        #expect(bytes.be32(72) == Qcow2.extBackingFormat)  // extensions right after 72 bytes
        let p = try Qcow2Header.parse(cluster(bytes, 65536))
        #expect(p.version == 2)
        #expect(p.headerLength == 72)
        #expect(p.refcountOrder == 4)
        #expect(p.incompatibleFeatures == 0 && p.compatibleFeatures == 0 && p.autoclearFeatures == 0)
        #expect(p.extensions.map(\.type) == [Qcow2.extBackingFormat, 0x1234_5678])
        #expect(!p.extensions.contains { $0.type == Qcow2.extFeatureTable })
        #expect(p.featureNames.isEmpty)
        #expect(p.backingFile == "base image.qcow2")
        #expect(p.size == h.size && p.l1TableOffset == h.l1TableOffset)
        #expect(try p.serialize() == bytes)
    }

    @Test("feature table omitted for clusters of 4 KiB or less, kept above", arguments: [9, 12, 13, 16, 21])
    func featureTableByClusterSize(bits: Int) throws {
        let h = Self.sampleV3(clusterBits: UInt32(bits))
        let bytes = try h.serialize()
        let p = try Qcow2Header.parse(cluster(bytes, 1 << bits))
        let hasTable = p.extensions.contains { $0.type == Qcow2.extFeatureTable }
        #expect(hasTable == (bits > 12))
        // The other extensions are there either way.
        #expect(p.extensions.contains(Self.unknownExt))
        #expect(p.backingFormat == "qcow2" && p.backingFile == "base image.qcow2")
    }

    @Test("serialize fails when the header does not fit in one cluster")
    func tooBig() {
        var h = Self.sampleV3(clusterBits: 9)
        h.extensions.append(HeaderExtension(type: 0x7777_0000, data: [UInt8](repeating: 1, count: 400)))
        #expect(throws: BlockError.self) { _ = try h.serialize() }
    }

    // MARK: - Parse errors with QEMU's messages

    static func validBytes() throws -> [UInt8] {
        cluster(try sampleV3().serialize(), 65536)
    }

    @Test("bad magic or a short buffer: \"Image is not in qcow2 format\"")
    func badMagic() throws {
        var b = try Self.validBytes()
        b.putBE32(0x5146_49FA, 0)
        #expect(parseError(b)?.message == "Image is not in qcow2 format")
        #expect(parseError(Array(try Self.validBytes()[0..<511]))?.message == "Image is not in qcow2 format")
        #expect(parseError([UInt8](repeating: 0, count: 4096))?.message == "Image is not in qcow2 format")
    }

    @Test("unsupported versions", arguments: [UInt32(0), 1, 4, 0xFFFF_FFFF])
    func badVersion(v: UInt32) throws {
        var b = try Self.validBytes()
        b.putBE32(v, 4)
        let e = parseError(b)
        #expect(e?.message == "Unsupported qcow2 version \(v)")
        #expect(e?.kind == .notSupported)
    }

    @Test("cluster_bits out of range", arguments: [UInt32(0), 8, 22, 63])
    func badClusterBits(bits: UInt32) throws {
        var b = try Self.validBytes()
        b.putBE32(bits, 20)
        #expect(parseError(b)?.message == "Unsupported cluster size: 2^\(bits)")
    }

    @Test("header_length below 104: \"qcow2 header too short\"", arguments: [UInt32(0), 72, 80, 103])
    func shortHeader(len: UInt32) throws {
        var b = try Self.validBytes()
        b.putBE32(len, 100)
        #expect(parseError(b)?.message == "qcow2 header too short")
    }

    @Test("header_length larger than the cluster")
    func headerPastCluster() throws {
        var b = cluster(try Self.sampleV3(clusterBits: 9).serialize(), 512)
        b.putBE32(1024, 100)
        #expect(parseError(b)?.message == "qcow2 header exceeds cluster size")
    }

    @Test("describeIncompatible names known bits and lists unknown ones in hex")
    func describeIncompatible() {
        let h = Self.sampleV3()
        #expect(h.describeIncompatible(Qcow2.incompatDirty) == "dirty bit")
        #expect(h.describeIncompatible(Qcow2.incompatDataFile | Qcow2.incompatCorrupt) == "corrupt bit, external data file")
        #expect(h.describeIncompatible(1 << 5) == "Unknown incompatible feature: 20")
        #expect(h.describeIncompatible((1 << 5) | (1 << 40) | Qcow2.incompatDirty) == "dirty bit, Unknown incompatible feature: 10000000020")
        var noTable = h
        noTable.extensions = []
        #expect(noTable.describeIncompatible(Qcow2.incompatDirty) == "Unknown incompatible feature: 1")
    }
}
