import BlockCore
import Testing
@testable import Qcow2

private func geometry(clusterBits: Int, extendedL2: Bool = false, refcountOrder: Int = 4) -> Qcow2Geometry {
    var h = Qcow2Header()
    h.clusterBits = UInt32(clusterBits)
    h.refcountOrder = UInt32(refcountOrder)
    if extendedL2 { h.incompatibleFeatures |= Qcow2.incompatExtendedL2 }
    return Qcow2Geometry(header: h)
}

@Suite("Qcow2Geometry")
struct GeometryTests {
    @Test("derived sizes", arguments: [9, 12, 14, 16, 21])
    func derived(bits: Int) {
        let g = geometry(clusterBits: bits)
        #expect(g.clusterSize == 1 << bits)
        #expect(g.l2EntrySize == 8 && g.l2Entries == (1 << bits) / 8 && g.l2Bits == bits - 3)
        #expect(g.subclustersPerCluster == 1 && g.subclusterSize == g.clusterSize)
        #expect(g.refblockEntries == (1 << bits) * 8 / 16)
        #expect(g.csizeShift == 62 - (bits - 8))
        #expect(g.csizeMask == (UInt64(1) << UInt64(bits - 8)) - 1)
        if bits >= 14 {
            let x = geometry(clusterBits: bits, extendedL2: true, refcountOrder: 0)
            #expect(x.l2EntrySize == 16 && x.l2Entries == (1 << bits) / 16 && x.l2Bits == bits - 4)
            #expect(x.subclustersPerCluster == 32 && x.subclusterSize == (1 << bits) / 32 && x.subclusterBits == bits - 5)
            #expect(x.refblockEntries == (1 << bits) * 8)
        }
    }

    @Test("l1/l2 index math", arguments: [(9, false), (12, false), (16, false), (16, true), (21, false), (21, true)])
    func indexMath(bits: Int, ext: Bool) {
        let g = geometry(clusterBits: bits, extendedL2: ext)
        let cs = Int64(g.clusterSize)
        let span = cs * Int64(g.l2Entries)  // bytes one L2 table maps
        for guest: Int64 in [0, 1, cs - 1, cs, cs + 17, span - 1, span, span + cs * 3 + 5, span * 7 + cs * Int64(g.l2Entries - 1),
                             (1 << 40) + 12_345, (1 << 50) - 1] {
            #expect(g.l1Index(guest) == Int(guest / span), "guest \(guest)")
            #expect(g.l2Index(guest) == Int((guest % span) / cs), "guest \(guest)")
            #expect(g.clusterIndex(guest) == guest / cs)
            #expect(g.offsetInCluster(guest) == guest % cs)
            // Recompose.
            #expect(Int64(g.l1Index(guest)) * span + Int64(g.l2Index(guest)) * cs + g.offsetInCluster(guest) == guest)
        }
        #expect(g.l1EntriesFor(size: 0) == 0)
        #expect(g.l1EntriesFor(size: 1) == 1)
        #expect(g.l1EntriesFor(size: span) == 1)
        #expect(g.l1EntriesFor(size: span + 1) == 2)
        #expect(g.l1EntriesFor(size: Int64.max) == divRoundUp(Int64.max, span))
    }

    @Test("QEMU's numbers for 64 KiB clusters")
    func qemu64k() {
        let g = geometry(clusterBits: 16)
        #expect(g.l2Entries == 8192)
        #expect(g.l1Index(512 << 20) == 1)  // one L2 table maps 512 MiB
        #expect(g.l1Index((512 << 20) - 1) == 0)
        #expect(g.l2Index((512 << 20) - 1) == 8191)
        #expect(g.l1EntriesFor(size: 1 << 30) == 2)
        // Compressed descriptor: csize_shift 54, csize_mask 0xff.
        #expect(g.csizeShift == 54 && g.csizeMask == 0xFF)
        let e = g.compressedEntry(host: 0x50000, length: 1000)
        #expect(e == Qcow2.oflagCompressed | 0x50000 | (1 << 54))
        let (off, len) = g.compressedRange(e)
        #expect(off == 0x50000 && len == 1024)
    }

    @Test("compressedEntry/compressedRange round trip", arguments: [9, 12, 16, 18, 21])
    func compressedRoundTrip(bits: Int) {
        let g = geometry(clusterBits: bits)
        let cs = g.clusterSize
        let offsets: [Int64] = [Int64(cs) * 3, Int64(cs) * 3 + 17, Int64(cs) * 5 + 511, Int64(cs) * 5 + 512,
                                (1 << 36) + 1234, Int64(g.compressedOffsetMask & ~0xFFFF) - Int64(cs) + 100]
        let lengths = [1, 2, 100, 511, 512, 513, 1000, cs / 2, cs - 1, cs].filter { $0 <= cs && $0 >= 1 }
        for o in offsets {
            for l in lengths {
                let e = g.compressedEntry(host: o, length: l)
                #expect(e & Qcow2.oflagCompressed != 0)
                #expect(e & Qcow2.oflagCopied == 0)
                let (off, len) = g.compressedRange(e)
                #expect(off == o, "bits \(bits) offset \(o) length \(l)")
                // Whole 512-byte sectors from the sector holding the first byte.
                #expect(len >= l && len - l < 512, "bits \(bits) offset \(o) length \(l): \(len)")
                #expect((off + Int64(len)) % 512 == 0)
                // And it is what SubclusterKind reports.
                #expect(g.subclusterKind(entry: e, bitmap: 0, sc: 0) == .compressed(entry: e))
            }
        }
    }

    @Test("subclusterKind without extended L2")
    func kindsStandard() {
        let g = geometry(clusterBits: 16)
        let host: UInt64 = 0x7_0000
        #expect(g.subclusterKind(entry: 0, bitmap: 0, sc: 0) == .unallocated)
        #expect(g.subclusterKind(entry: host, bitmap: 0, sc: 0) == .normal(host: 0x7_0000))
        #expect(g.subclusterKind(entry: host | Qcow2.oflagCopied, bitmap: 0, sc: 0) == .normal(host: 0x7_0000))
        #expect(g.subclusterKind(entry: Qcow2.oflagZero, bitmap: 0, sc: 0) == .zeroPlain)
        #expect(g.subclusterKind(entry: host | Qcow2.oflagZero, bitmap: 0, sc: 0) == .zeroAlloc(host: 0x7_0000))
        #expect(g.subclusterKind(entry: host | Qcow2.oflagZero | Qcow2.oflagCopied, bitmap: 0, sc: 0) == .zeroAlloc(host: 0x7_0000))
        let c = Qcow2.oflagCompressed | 0x12345
        #expect(g.subclusterKind(entry: c, bitmap: 0, sc: 0) == .compressed(entry: c))
        #expect(g.subclusterKind(entry: c | Qcow2.oflagZero, bitmap: 0, sc: 0) == .compressed(entry: c | Qcow2.oflagZero))
    }

    @Test("subclusterKind with extended L2: per-subcluster alloc/zero bits")
    func kindsExtended() {
        let g = geometry(clusterBits: 16, extendedL2: true)
        let scs = Int64(g.subclusterSize)  // 2 KiB
        let host: UInt64 = 0x30_0000
        let entry = host | Qcow2.oflagCopied
        func alloc(_ sc: Int) -> UInt64 { 1 << UInt64(sc) }
        func zero(_ sc: Int) -> UInt64 { 1 << UInt64(32 + sc) }
        for sc in [0, 1, 5, 31] {
            // Host cluster present.
            #expect(g.subclusterKind(entry: entry, bitmap: alloc(sc), sc: sc) == .normal(host: Int64(host) + Int64(sc) * scs))
            #expect(g.subclusterKind(entry: entry, bitmap: zero(sc), sc: sc) == .zeroAlloc(host: Int64(host) + Int64(sc) * scs))
            #expect(g.subclusterKind(entry: entry, bitmap: 0, sc: sc) == .unallocatedAlloc(host: Int64(host) + Int64(sc) * scs))
            #expect(g.subclusterKind(entry: entry, bitmap: alloc(sc) | zero(sc), sc: sc) == .invalid)
            // No host cluster.
            #expect(g.subclusterKind(entry: 0, bitmap: 0, sc: sc) == .unallocated)
            #expect(g.subclusterKind(entry: 0, bitmap: zero(sc), sc: sc) == .zeroPlain)
            #expect(g.subclusterKind(entry: 0, bitmap: alloc(sc), sc: sc) == .invalid)
            #expect(g.subclusterKind(entry: 0, bitmap: alloc(sc) | zero(sc), sc: sc) == .invalid)
            // Compressed wins.
            let c = Qcow2.oflagCompressed | 0x4_0000
            #expect(g.subclusterKind(entry: c, bitmap: 0, sc: sc) == .compressed(entry: c))
        }
        // Bits of other subclusters do not change a valid subcluster's kind.
        let mixed = alloc(0) | zero(1) | alloc(7) | zero(31)
        #expect(g.subclusterKind(entry: entry, bitmap: mixed, sc: 0) == .normal(host: Int64(host)))
        #expect(g.subclusterKind(entry: entry, bitmap: mixed, sc: 1) == .zeroAlloc(host: Int64(host) + scs))
        #expect(g.subclusterKind(entry: entry, bitmap: mixed, sc: 2) == .unallocatedAlloc(host: Int64(host) + 2 * scs))
        #expect(g.subclusterKind(entry: entry, bitmap: mixed, sc: 31) == .zeroAlloc(host: Int64(host) + 31 * scs))
        #expect(g.subclusterKind(entry: 0, bitmap: zero(3) | zero(4), sc: 4) == .zeroPlain)
        #expect(g.subclusterKind(entry: 0, bitmap: zero(3) | zero(4), sc: 5) == .unallocated)
    }

    /// QEMU (qcow2_get_subcluster_type) judges the whole bitmap: a normal
    /// cluster with any subcluster both allocated and zero, or an
    /// unallocated cluster with any allocation bit, is INVALID for every
    /// subcluster, so reading a "good" subcluster of such a cluster fails.
    @Test("subclusterKind with extended L2: a corrupt bitmap makes every subcluster invalid (QEMU)")
    func kindsExtendedWholeBitmap() {
        let g = geometry(clusterBits: 16, extendedL2: true)
        let entry: UInt64 = 0x30_0000 | Qcow2.oflagCopied
        // Subcluster 3 is both allocated and zero; subcluster 0 looks fine on its own.
        let badNormal: UInt64 = (1 << 0) | (1 << 3) | (1 << (32 + 3))
        #expect(g.subclusterKind(entry: entry, bitmap: badNormal, sc: 0) == .invalid)
        #expect(g.subclusterKind(entry: entry, bitmap: badNormal, sc: 1) == .invalid)
        // No host cluster, but subcluster 9 claims to be allocated.
        let badUnalloc: UInt64 = (1 << 9) | (1 << (32 + 2))
        #expect(g.subclusterKind(entry: 0, bitmap: badUnalloc, sc: 0) == .invalid)
        #expect(g.subclusterKind(entry: 0, bitmap: badUnalloc, sc: 2) == .invalid)
    }
}
