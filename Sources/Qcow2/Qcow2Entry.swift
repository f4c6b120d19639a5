import BlockCore

/// What one guest cluster (or subcluster) maps to, decoded from its L2 entry
/// (QEMU's QCow2ClusterType / QCow2SubclusterType).
enum SubclusterKind: Equatable {
    /// Not allocated here: read from the backing file (or zeroes).
    case unallocated
    /// Not allocated here, but a host cluster is (extended L2 only).
    case unallocatedAlloc(host: Int64)
    /// Reads as zeroes, no host cluster.
    case zeroPlain
    /// Reads as zeroes, host cluster preallocated at `host`.
    case zeroAlloc(host: Int64)
    /// Data at `host` (the subcluster's own offset).
    case normal(host: Int64)
    /// Compressed cluster; `entry` is the raw L2 entry.
    case compressed(entry: UInt64)
    /// Contradictory bits.
    case invalid
}

/// Geometry of an open image; every value derives from the header.
struct Qcow2Geometry: Sendable {
    let clusterBits: Int
    let clusterSize: Int
    let l2EntrySize: Int  // 8, or 16 with extended L2 entries
    let l2Entries: Int  // entries per L2 table
    let l2Bits: Int
    let extendedL2: Bool
    let subclusterSize: Int
    let subclusterBits: Int
    let subclustersPerCluster: Int
    let refcountOrder: Int
    let refcountBits: Int
    let refblockEntries: Int  // refcounts per refcount block
    let refblockBits: Int
    let csizeShift: Int  // compressed descriptor: where the sector count starts
    let csizeMask: UInt64
    let compressedOffsetMask: UInt64
    let version: Int

    init(header h: Qcow2Header) {
        clusterBits = Int(h.clusterBits)
        clusterSize = 1 << clusterBits
        extendedL2 = h.extendedL2
        l2EntrySize = extendedL2 ? 16 : 8
        l2Entries = clusterSize / l2EntrySize
        l2Bits = clusterBits - (extendedL2 ? 4 : 3)
        subclustersPerCluster = extendedL2 ? 32 : 1
        subclusterSize = clusterSize / subclustersPerCluster
        subclusterBits = clusterBits - (extendedL2 ? 5 : 0)
        refcountOrder = Int(h.refcountOrder)
        refcountBits = 1 << refcountOrder
        refblockBits = clusterBits + 3 - refcountOrder
        refblockEntries = 1 << refblockBits
        csizeShift = 62 - (clusterBits - 8)
        csizeMask = (UInt64(1) << UInt64(clusterBits - 8)) - 1
        compressedOffsetMask = (UInt64(1) << UInt64(csizeShift)) - 1
        version = Int(h.version)
    }

    @inline(__always) func clusterIndex(_ offset: Int64) -> Int64 { offset >> Int64(clusterBits) }
    @inline(__always) func offsetInCluster(_ offset: Int64) -> Int64 { offset & Int64(clusterSize - 1) }
    @inline(__always) func l1Index(_ guest: Int64) -> Int { Int(guest >> Int64(clusterBits + l2Bits)) }
    @inline(__always) func l2Index(_ guest: Int64) -> Int { Int((guest >> Int64(clusterBits)) & Int64(l2Entries - 1)) }

    /// Number of L1 entries needed to map `size` bytes.
    func l1EntriesFor(size: Int64) -> Int64 {
        let perL1 = Int64(clusterSize) * Int64(l2Entries)
        return divRoundUp(size, perL1)
    }

    /// Host byte range of a compressed cluster: (offset, length in bytes).
    func compressedRange(_ entry: UInt64) -> (Int64, Int) {
        let off = Int64(entry & compressedOffsetMask)
        let sectors = Int((entry >> UInt64(csizeShift)) & csizeMask) + 1
        let len = sectors * 512 - Int(off & 511)
        return (off, len)
    }

    /// The L2 entry for compressed data of `length` bytes at host `offset`.
    func compressedEntry(host offset: Int64, length: Int) -> UInt64 {
        let sectors = UInt64((offset + Int64(length) - 1) / 512 - offset / 512)
        return Qcow2.oflagCompressed | UInt64(offset) | (sectors << UInt64(csizeShift))
    }

    /// Decodes subcluster `sc` of a cluster given its L2 entry and bitmap.
    func subclusterKind(entry: UInt64, bitmap: UInt64, sc: Int) -> SubclusterKind {
        if entry & Qcow2.oflagCompressed != 0 {
            return .compressed(entry: entry)
        }
        let host = Int64(entry & Qcow2.l2OffsetMask)
        if !extendedL2 {
            if entry & Qcow2.oflagZero != 0 {
                return host != 0 ? .zeroAlloc(host: host) : .zeroPlain
            }
            return host != 0 ? .normal(host: host) : .unallocated
        }
        // QEMU judges the whole cluster first: contradictory bits anywhere
        // make every subcluster invalid.
        if host != 0 && (bitmap >> 32) & bitmap & 0xffff_ffff != 0 { return .invalid }
        if host == 0 && bitmap & 0xffff_ffff != 0 { return .invalid }
        let alloc = (bitmap >> UInt64(sc)) & 1 != 0
        let zero = (bitmap >> UInt64(32 + sc)) & 1 != 0
        let scHost = host + Int64(sc * subclusterSize)
        switch (alloc, zero) {
        case (true, true): return .invalid
        case (true, false): return host != 0 ? .normal(host: scHost) : .invalid
        case (false, true): return host != 0 ? .zeroAlloc(host: scHost) : .zeroPlain
        case (false, false): return host != 0 ? .unallocatedAlloc(host: scHost) : .unallocated
        }
    }
}

/// L2 table access helpers over a cached table buffer (big-endian entries).
extension AlignedBuffer {
    @inline(__always) func l2Entry(_ i: Int, _ g: Qcow2Geometry) -> UInt64 {
        UnsafeRawPointer(pointer).loadBE64(i * g.l2EntrySize)
    }
    @inline(__always) func l2Bitmap(_ i: Int, _ g: Qcow2Geometry) -> UInt64 {
        g.extendedL2 ? UnsafeRawPointer(pointer).loadBE64(i * 16 + 8) : 0
    }
    @inline(__always) func setL2Entry(_ i: Int, _ g: Qcow2Geometry, _ v: UInt64) {
        pointer.storeBE64(v, i * g.l2EntrySize)
    }
    @inline(__always) func setL2Bitmap(_ i: Int, _ g: Qcow2Geometry, _ v: UInt64) {
        if g.extendedL2 { pointer.storeBE64(v, i * 16 + 8) }
    }
    @inline(__always) func be64(_ i: Int) -> UInt64 { UnsafeRawPointer(pointer).loadBE64(i * 8) }
    @inline(__always) func setBE64(_ i: Int, _ v: UInt64) { pointer.storeBE64(v, i * 8) }
}

/// Refcount entry access for every refcount_order (0...6). Orders below 3
/// pack several entries per byte, least significant bits first.
enum RefcountCodec {
    static func get(_ buf: UnsafeMutableRawPointer, _ index: Int, order: Int) -> UInt64 {
        switch order {
        case 0: return UInt64((buf.load(fromByteOffset: index / 8, as: UInt8.self) >> UInt8(index % 8)) & 1)
        case 1: return UInt64((buf.load(fromByteOffset: index / 4, as: UInt8.self) >> UInt8(2 * (index % 4))) & 3)
        case 2: return UInt64((buf.load(fromByteOffset: index / 2, as: UInt8.self) >> UInt8(4 * (index % 2))) & 0xf)
        case 3: return UInt64(buf.load(fromByteOffset: index, as: UInt8.self))
        case 4: return UInt64(UnsafeRawPointer(buf).loadBE16(index * 2))
        case 5: return UInt64(UnsafeRawPointer(buf).loadBE32(index * 4))
        default: return UnsafeRawPointer(buf).loadBE64(index * 8)
        }
    }

    static func set(_ buf: UnsafeMutableRawPointer, _ index: Int, order: Int, _ value: UInt64) {
        switch order {
        case 0, 1, 2:
            let bits = 1 << order
            let perByte = 8 / bits
            let shift = UInt8(bits * (index % perByte))
            let mask = UInt8((1 << bits) - 1) << shift
            let old = buf.load(fromByteOffset: index / perByte, as: UInt8.self)
            let new = (old & ~mask) | ((UInt8(truncatingIfNeeded: value) << shift) & mask)
            buf.storeBytes(of: new, toByteOffset: index / perByte, as: UInt8.self)
        case 3: buf.storeBytes(of: UInt8(truncatingIfNeeded: value), toByteOffset: index, as: UInt8.self)
        case 4: buf.storeBE16(UInt16(truncatingIfNeeded: value), index * 2)
        case 5: buf.storeBE32(UInt32(truncatingIfNeeded: value), index * 4)
        default: buf.storeBE64(value, index * 8)
        }
    }

    /// Byte range of the block that holds entry `index`.
    static func byteRange(_ index: Int, order: Int) -> Range<Int> {
        if order < 3 {
            let perByte = 8 >> order
            return (index / perByte)..<(index / perByte + 1)
        }
        let w = 1 << (order - 3)
        return (index * w)..<(index * w + w)
    }

    static func maxValue(order: Int) -> UInt64 {
        order == 6 ? UInt64.max : (UInt64(1) << UInt64(1 << order)) - 1
    }
}
