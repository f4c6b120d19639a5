import BlockCore

/// qcow2 on-disk constants (docs/interop/qcow2.txt).
public enum Qcow2 {
    public static let magic: UInt32 = 0x5146_49fb  // "QFI\xfb"
    public static let minClusterBits = 9
    public static let maxClusterBits = 21
    public static let v2HeaderLength = 72
    public static let v3HeaderLength = 112  // with compression type + padding

    // L1/L2 entry bits
    public static let oflagCopied: UInt64 = 1 << 63
    public static let oflagCompressed: UInt64 = 1 << 62
    public static let oflagZero: UInt64 = 1
    public static let l1OffsetMask: UInt64 = 0x00ff_ffff_ffff_fe00
    public static let l2OffsetMask: UInt64 = 0x00ff_ffff_ffff_fe00
    public static let refTableOffsetMask: UInt64 = 0xffff_ffff_ffff_fe00
    public static let l1ReservedMask: UInt64 = 0x7f00_0000_0000_01ff
    public static let l2ReservedMask: UInt64 = 0x3f00_0000_0000_01fe

    // Header extension types
    public static let extEnd: UInt32 = 0
    public static let extBackingFormat: UInt32 = 0xE279_2ACA
    public static let extFeatureTable: UInt32 = 0x6803_f857
    public static let extBitmaps: UInt32 = 0x2385_2875
    public static let extCrypto: UInt32 = 0x0537_be77
    public static let extDataFile: UInt32 = 0x4441_5441

    // Feature bits
    public static let incompatDirty: UInt64 = 1 << 0
    public static let incompatCorrupt: UInt64 = 1 << 1
    public static let incompatDataFile: UInt64 = 1 << 2
    public static let incompatCompression: UInt64 = 1 << 3
    public static let incompatExtendedL2: UInt64 = 1 << 4
    public static let incompatKnown: UInt64 = 0x1f
    /// Bits this implementation can open (the external data file bit is
    /// known, but such images are refused with QEMU's message).
    public static let incompatSupported: UInt64 = incompatDirty | incompatCorrupt | incompatDataFile | incompatCompression | incompatExtendedL2
    public static let compatLazyRefcounts: UInt64 = 1 << 0
    public static let autoclearBitmaps: UInt64 = 1 << 0
    public static let autoclearDataFileRaw: UInt64 = 1 << 1
    public static let autoclearKnown: UInt64 = 0x3

    public static let maxRefTableBytes: Int64 = 8 * 1024 * 1024
    public static let maxL1Bytes: Int64 = 32 * 1024 * 1024
    public static let maxSnapshots = 65536
    public static let snapshotHeaderSize = 40
}

public enum CompressionType: UInt8, Sendable {
    case zlib = 0
    case zstd = 1
    public var name: String { self == .zlib ? "zlib" : "zstd" }
}

/// One header extension as stored (type + payload), kept verbatim so that
/// unknown extensions survive a header rewrite.
public struct HeaderExtension: Sendable, Equatable {
    public var type: UInt32
    public var data: [UInt8]
    public init(type: UInt32, data: [UInt8]) {
        self.type = type
        self.data = data
    }
}

public struct FeatureName: Sendable, Equatable {
    public enum Kind: UInt8, Sendable { case incompatible = 0, compatible = 1, autoclear = 2 }
    public var kind: UInt8
    public var bit: UInt8
    public var name: String
}

public struct BitmapsExtension: Sendable, Equatable {
    public var count: UInt32
    public var directorySize: UInt64
    public var directoryOffset: UInt64
}

/// The qcow2 header, versions 2 and 3, with its extensions.
public struct Qcow2Header: Sendable, Equatable {
    public var version: UInt32 = 3
    public var backingFileOffset: UInt64 = 0
    public var backingFileSize: UInt32 = 0
    public var clusterBits: UInt32 = 16
    public var size: UInt64 = 0
    public var cryptMethod: UInt32 = 0
    public var l1Size: UInt32 = 0
    public var l1TableOffset: UInt64 = 0
    public var refcountTableOffset: UInt64 = 0
    public var refcountTableClusters: UInt32 = 0
    public var nbSnapshots: UInt32 = 0
    public var snapshotsOffset: UInt64 = 0
    public var incompatibleFeatures: UInt64 = 0
    public var compatibleFeatures: UInt64 = 0
    public var autoclearFeatures: UInt64 = 0
    public var refcountOrder: UInt32 = 4
    public var headerLength: UInt32 = UInt32(Qcow2.v3HeaderLength)
    public var compressionType: UInt8 = 0
    /// Bytes between the known header fields and `headerLength` (future fields), kept verbatim.
    public var unknownHeaderFields: [UInt8] = []

    public var extensions: [HeaderExtension] = []
    public var backingFile: String?

    public init() {}

    public var clusterSize: Int { 1 << Int(clusterBits) }
    public var refcountBits: Int { 1 << Int(refcountOrder) }
    public var extendedL2: Bool { incompatibleFeatures & Qcow2.incompatExtendedL2 != 0 }
    public var isDirty: Bool { incompatibleFeatures & Qcow2.incompatDirty != 0 }
    public var isCorrupt: Bool { incompatibleFeatures & Qcow2.incompatCorrupt != 0 }
    public var lazyRefcounts: Bool { compatibleFeatures & Qcow2.compatLazyRefcounts != 0 }

    public var backingFormat: String? {
        get {
            guard let e = extensions.first(where: { $0.type == Qcow2.extBackingFormat }) else { return nil }
            return String(decoding: e.data.prefix { $0 != 0 }, as: UTF8.self)
        }
        set {
            extensions.removeAll { $0.type == Qcow2.extBackingFormat }
            if let v = newValue {
                extensions.insert(HeaderExtension(type: Qcow2.extBackingFormat, data: Array(v.utf8)), at: 0)
            }
        }
    }

    public var featureNames: [FeatureName] {
        guard let e = extensions.first(where: { $0.type == Qcow2.extFeatureTable }) else { return [] }
        var out: [FeatureName] = []
        var i = 0
        while i + 48 <= e.data.count {
            let nameBytes = e.data[(i + 2)..<(i + 48)].prefix { $0 != 0 }
            out.append(FeatureName(kind: e.data[i], bit: e.data[i + 1], name: String(decoding: nameBytes, as: UTF8.self)))
            i += 48
        }
        return out
    }

    public var bitmaps: BitmapsExtension? {
        guard let e = extensions.first(where: { $0.type == Qcow2.extBitmaps }), e.data.count >= 24 else { return nil }
        return BitmapsExtension(count: e.data.be32(0), directorySize: e.data.be64(8), directoryOffset: e.data.be64(16))
    }

    /// The feature-name table QEMU writes into every new image.
    public static func standardFeatureTable() -> HeaderExtension {
        let features: [(UInt8, UInt8, String)] = [
            (0, 0, "dirty bit"),
            (0, 1, "corrupt bit"),
            (0, 2, "external data file"),
            (0, 3, "compression type"),
            (0, 4, "extended L2 entries"),
            (1, 0, "lazy refcounts"),
            (2, 0, "bitmaps"),
            (2, 1, "raw external data"),
        ]
        var data: [UInt8] = []
        for (kind, bit, name) in features {
            var entry = [UInt8](repeating: 0, count: 48)
            entry[0] = kind
            entry[1] = bit
            for (j, b) in name.utf8.enumerated() where j < 46 { entry[2 + j] = b }
            data += entry
        }
        return HeaderExtension(type: Qcow2.extFeatureTable, data: data)
    }

    // MARK: - Parsing

    /// Parses the first cluster of an image. Validates only what is needed to
    /// read the structure; `Qcow2Image` validates the rest with QEMU's messages.
    public static func parse(_ b: [UInt8]) throws(BlockError) -> Qcow2Header {
        if b.count < 512 || b.be32(0) != Qcow2.magic {
            throw BlockError.invalid("Image is not in qcow2 format")
        }
        var h = Qcow2Header()
        h.version = b.be32(4)
        if h.version < 2 || h.version > 3 {
            throw BlockError(.notSupported, errno: 95, "Unsupported qcow2 version \(h.version)")
        }
        h.backingFileOffset = b.be64(8)
        h.backingFileSize = b.be32(16)
        h.clusterBits = b.be32(20)
        h.size = b.be64(24)
        h.cryptMethod = b.be32(32)
        h.l1Size = b.be32(36)
        h.l1TableOffset = b.be64(40)
        h.refcountTableOffset = b.be64(48)
        h.refcountTableClusters = b.be32(56)
        h.nbSnapshots = b.be32(60)
        h.snapshotsOffset = b.be64(64)
        if h.clusterBits < Qcow2.minClusterBits || h.clusterBits > Qcow2.maxClusterBits {
            throw BlockError.invalid("Unsupported cluster size: 2^\(h.clusterBits)")
        }
        let clusterSize = 1 << Int(h.clusterBits)
        if h.version == 2 {
            h.refcountOrder = 4
            h.headerLength = UInt32(Qcow2.v2HeaderLength)
        } else {
            if b.count < 104 { throw BlockError.invalid("qcow2 header too short") }
            h.incompatibleFeatures = b.be64(72)
            h.compatibleFeatures = b.be64(80)
            h.autoclearFeatures = b.be64(88)
            h.refcountOrder = b.be32(96)
            h.headerLength = b.be32(100)
            if h.headerLength < 104 { throw BlockError.invalid("qcow2 header too short") }
        }
        if Int(h.headerLength) > clusterSize {
            throw BlockError.invalid("qcow2 header exceeds cluster size")
        }
        if h.headerLength > 104 && b.count > 104 {
            h.compressionType = b[104]
        }
        if h.headerLength > UInt32(Qcow2.v3HeaderLength) {
            let end = min(Int(h.headerLength), b.count)
            h.unknownHeaderFields = Array(b[Qcow2.v3HeaderLength..<end])
        }
        if h.backingFileOffset > UInt64(clusterSize) {
            throw BlockError.invalid("Invalid backing file offset")
        }
        // Header extensions: from the end of the header to the backing file
        // name (or the end of the first cluster).
        let extEnd = h.backingFileOffset != 0 ? Int(h.backingFileOffset) : clusterSize
        var off = Int(h.headerLength)
        while off + 8 <= min(extEnd, b.count) {
            let type = b.be32(off)
            let len = Int(b.be32(off + 4))
            off += 8
            if type == Qcow2.extEnd { break }
            if off + len > min(extEnd, b.count) {
                throw BlockError.invalid("Invalid extension length")
            }
            let data = Array(b[off..<(off + len)])
            if type == Qcow2.extBackingFormat && len > 15 {
                throw BlockError.invalid("ERROR: ext_backing_format: len=\(len) too large (>=16)")
            }
            h.extensions.append(HeaderExtension(type: type, data: data))
            off += (len + 7) & ~7
        }
        if h.backingFileOffset != 0 {
            let len = Int(h.backingFileSize)
            if len > min(1023, clusterSize - Int(h.backingFileOffset)) {
                throw BlockError.invalid("Backing file name too long")
            }
            let start = Int(h.backingFileOffset)
            guard start + len <= b.count else { throw BlockError.invalid("Backing file name too long") }
            h.backingFile = String(decoding: b[start..<(start + len)], as: UTF8.self)
        }
        return h
    }

    // MARK: - Serialisation

    /// Serialises the header, its extensions and the backing file name into
    /// the bytes of the first cluster. Fails if they do not fit.
    public func serialize() throws(BlockError) -> [UInt8] {
        let v3Length = Qcow2.v3HeaderLength + unknownHeaderFields.count
        var b = [UInt8](repeating: 0, count: version == 2 ? Qcow2.v2HeaderLength : v3Length)
        b.putBE32(Qcow2.magic, 0)
        b.putBE32(version, 4)
        b.putBE32(clusterBits, 20)
        b.putBE64(size, 24)
        b.putBE32(cryptMethod, 32)
        b.putBE32(l1Size, 36)
        b.putBE64(l1TableOffset, 40)
        b.putBE64(refcountTableOffset, 48)
        b.putBE32(refcountTableClusters, 56)
        b.putBE32(nbSnapshots, 60)
        b.putBE64(snapshotsOffset, 64)
        if version >= 3 {
            b.putBE64(incompatibleFeatures, 72)
            b.putBE64(compatibleFeatures, 80)
            b.putBE64(autoclearFeatures, 88)
            b.putBE32(refcountOrder, 96)
            b.putBE32(UInt32(b.count), 100)
            if b.count > 104 { b[104] = compressionType }
            for (i, v) in unknownHeaderFields.enumerated() { b[Qcow2.v3HeaderLength + i] = v }
        }
        // Extensions in QEMU's order: backing format, crypto, data file,
        // feature table (v3 only), bitmaps, then unknown ones as read.
        let rank: (UInt32) -> Int = { t in
            switch t {
            case Qcow2.extBackingFormat: return 0
            case Qcow2.extCrypto: return 1
            case Qcow2.extDataFile: return 2
            case Qcow2.extFeatureTable: return 3
            case Qcow2.extBitmaps: return 4
            default: return 5
            }
        }
        // QEMU leaves the feature name table out of v2 images and of images
        // with clusters of 4 KiB or less.
        let ordered = extensions.enumerated()
            .filter { (version >= 3 && clusterSize > 4096) || $0.element.type != Qcow2.extFeatureTable }
            .sorted { (rank($0.element.type), $0.offset) < (rank($1.element.type), $1.offset) }
            .map(\.element)
        for e in ordered {
            b.appendBE32(e.type)
            b.appendBE32(UInt32(e.data.count))
            b += e.data
            let pad = (8 - e.data.count % 8) % 8
            b += [UInt8](repeating: 0, count: pad)
        }
        b.appendBE32(Qcow2.extEnd)
        b.appendBE32(0)
        if let backing = backingFile {
            let bytes = Array(backing.utf8)
            b.putBE64(UInt64(b.count), 8)
            b.putBE32(UInt32(bytes.count), 16)
            b += bytes
        }
        if b.count > clusterSize {
            throw BlockError.invalid("Cannot fit the qcow2 header and its extensions into one cluster")
        }
        return b
    }

    /// Human names of the given incompatible bits for "Unsupported qcow2 feature(s)".
    public func describeIncompatible(_ bits: UInt64) -> String {
        let table = featureNames
        var parts: [String] = []
        var remaining = bits
        for bit in 0..<64 where bits & (1 << UInt64(bit)) != 0 {
            if let f = table.first(where: { $0.kind == 0 && Int($0.bit) == bit }) {
                parts.append(f.name)
                remaining &= ~(1 << UInt64(bit))
            }
        }
        if remaining != 0 {
            parts.append("Unknown incompatible feature: " + String(remaining, radix: 16))
        }
        return parts.joined(separator: ", ")
    }
}
