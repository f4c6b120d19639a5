import BlockCore
import BlockDrivers
import BlockGraph
import FileDriver
import Testing
@testable import Qcow2

private func table(_ tag: UInt8) -> AlignedBuffer {
    let b = AlignedBuffer(count: 512)
    b.bytes[0] = tag
    return b
}

@Suite("MetadataCache")
struct MetadataCacheTests {
    @Test("least recently used entry is evicted first")
    func lruOrder() {
        let c = MetadataCache(tableSize: 512, capacity: 3)
        c.insert(0x1000, table(1))
        c.insert(0x2000, table(2))
        c.insert(0x3000, table(3))
        #expect(c.count == 3)
        c.insert(0x4000, table(4))  // evicts 0x1000
        #expect(c.count == 3)
        #expect(c.lookup(0x1000) == nil)
        #expect(c.lookup(0x2000)?.bytes[0] == 2)
        #expect(c.lookup(0x3000)?.bytes[0] == 3)
        #expect(c.lookup(0x4000)?.bytes[0] == 4)
    }

    @Test("lookup refreshes recency")
    func lookupRefreshes() {
        let c = MetadataCache(tableSize: 512, capacity: 3)
        c.insert(0x1000, table(1))
        c.insert(0x2000, table(2))
        c.insert(0x3000, table(3))
        #expect(c.lookup(0x1000) != nil)  // 0x2000 is now the oldest
        c.insert(0x4000, table(4))
        #expect(c.lookup(0x2000) == nil)
        #expect(c.lookup(0x1000) != nil)
        // Now 0x3000 is the oldest.
        c.insert(0x5000, table(5))
        #expect(c.lookup(0x3000) == nil)
        #expect(c.lookup(0x4000) != nil && c.lookup(0x5000) != nil && c.lookup(0x1000) != nil)
        #expect(c.count == 3)
    }

    @Test("re-inserting an offset replaces the buffer without growing the cache")
    func reinsert() {
        let c = MetadataCache(tableSize: 512, capacity: 2)
        c.insert(0x1000, table(1))
        c.insert(0x2000, table(2))
        c.insert(0x1000, table(9))  // now most recent
        #expect(c.count == 2)
        #expect(c.lookup(0x1000)?.bytes[0] == 9)
        c.insert(0x3000, table(3))  // evicts 0x2000
        #expect(c.lookup(0x2000) == nil)
        #expect(c.lookup(0x1000)?.bytes[0] == 9)
    }

    @Test("capacity is at least 2")
    func minimumCapacity() {
        let c = MetadataCache(tableSize: 512, capacity: 0)
        #expect(c.capacity == 2)
        c.insert(1 << 20, table(1))
        c.insert(2 << 20, table(2))
        c.insert(3 << 20, table(3))
        #expect(c.count == 2)
    }

    @Test("dirty entries are never evicted; dirtyEntries and markClean; capacity respected once clean")
    func dirtyEntries() {
        let c = MetadataCache(tableSize: 512, capacity: 2)
        c.insert(0x1000, table(1))
        c.markDirty(0x1000, 8..<16)
        c.markDirty(0x1000, 100..<108)  // widens the range
        c.insert(0x2000, table(2))
        c.markDirty(0x2000, 0..<8)
        #expect(c.dirtyCount == 2)
        // Both are dirty: inserting more never evicts them.
        c.insert(0x3000, table(3))
        c.insert(0x4000, table(4))
        #expect(c.lookup(0x1000)?.bytes[0] == 1)
        #expect(c.lookup(0x2000)?.bytes[0] == 2)
        #expect(c.lookup(0x3000) == nil)
        let d = c.dirtyEntries()
        #expect(d.map(\.0) == [0x1000, 0x2000])  // sorted by offset
        #expect(d.map(\.2) == [8..<108, 0..<8])
        #expect(d[0].1.bytes[0] == 1)
        // Cleaning lets the cache shrink back to its capacity.
        c.markClean(0x1000)
        #expect(c.dirtyCount == 1)
        #expect(c.count == 2)
        #expect(c.dirtyEntries().map(\.0) == [0x2000])
        c.markClean(0x2000)
        #expect(c.dirtyCount == 0)
        #expect(c.dirtyEntries().isEmpty)
        #expect(c.count == 2)
        c.insert(0x5000, table(5))
        c.insert(0x6000, table(6))
        #expect(c.count == 2)
        #expect(c.lookup(0x5000) != nil && c.lookup(0x6000) != nil)
    }

    /// The qcow2 code inserts a table and then marks it dirty
    /// (`l2TableForWriteLocked` + `markDirty`, which traps on an uncached
    /// offset), so a fresh insertion must survive even when every other
    /// entry is dirty: the cache should go over capacity instead.
    @Test("a newly inserted table is kept (and can be marked dirty) when every other entry is dirty")
    func insertWhenAllDirty() {
        let c = MetadataCache(tableSize: 512, capacity: 2)
        c.insert(0x1000, table(1))
        c.markDirty(0x1000, 0..<8)
        c.insert(0x2000, table(2))
        c.markDirty(0x2000, 0..<8)
        c.insert(0x3000, table(3))
        #expect(c.lookup(0x3000)?.bytes[0] == 3, "the just-inserted table was evicted at once")
        #expect(c.lookup(0x1000) != nil && c.lookup(0x2000) != nil)
    }

    @Test("many dirty entries survive heavy insertion; the cache shrinks back after cleaning")
    func dirtyUnderPressure() {
        let c = MetadataCache(tableSize: 512, capacity: 8)
        // Fewer dirty entries than the capacity, so each insertion has a clean victim.
        for i in 0..<6 {
            c.insert(Int64(i) * 512, table(UInt8(i)))
            c.markDirty(Int64(i) * 512, 0..<512)
        }
        for i in 6..<100 { c.insert(Int64(i) * 512, table(UInt8(i))) }
        for i in 0..<6 { #expect(c.lookup(Int64(i) * 512)?.bytes[0] == UInt8(i)) }
        #expect(c.dirtyCount == 6)
        #expect(c.count == 8)
        // The two clean survivors are the most recently inserted.
        #expect(c.lookup(98 * 512) != nil && c.lookup(99 * 512) != nil && c.lookup(97 * 512) == nil)
        for i in 0..<6 { c.markClean(Int64(i) * 512) }
        #expect(c.dirtyCount == 0)
        #expect(c.count == 8)
        for i in 200..<210 { c.insert(Int64(i) * 512, table(UInt8(i - 200))) }
        #expect(c.count == 8)
        // Marking a cached clean entry clean again is harmless.
        c.markClean(209 * 512)
        #expect(c.count == 8)
    }

    @Test("remove and removeAll")
    func removal() {
        let c = MetadataCache(tableSize: 512, capacity: 4)
        c.insert(0x1000, table(1))
        c.insert(0x2000, table(2))
        c.remove(0x1000)
        #expect(c.lookup(0x1000) == nil && c.count == 1)
        c.remove(0x9999)  // absent: no-op
        c.markDirty(0x2000, 0..<1)
        c.removeAll()
        #expect(c.count == 0 && c.dirtyCount == 0 && c.lookup(0x2000) == nil)
        c.insert(0x3000, table(3))
        #expect(c.lookup(0x3000) != nil)
    }
}

@Suite("L2 cache smaller than the image")
struct SmallL2CacheTests {
    /// With `l2CacheBytes` of 4 tables, every cached table is dirty after
    /// four allocating writes to four L2 ranges (the write-back threshold is
    /// 8 tables); the fifth new table is evicted by its own insertion and
    /// `markDirty` traps ("marking an uncached table dirty"). Run as an exit
    /// test so a trap fails this test only.
    @Test("writes touching more L2 tables than the cache holds do not crash")
    func moreTablesThanCache() async {
        await #expect(processExitsWith: .success) {
            let dir = TempDir()
            let q = dir.file("s.qcow2")
            var o = Qcow2CreateOptions()
            o.size = 8 << 30  // 16 L2 tables of 512 MiB each
            try await ImageCreator.createQcow2(path: q, options: o)
            let file = try FileDriver.open(q, readOnly: false)
            var qo = Qcow2OpenOptions()
            qo.readOnly = false
            qo.l2CacheBytes = 4 * 65536
            let img = try await Qcow2Image.open(file: file, options: qo)
            let node = BlockNode(driver: img, filename: q, readOnly: false)
            let b = AlignedBuffer(count: 65536, zeroed: true)
            b.bytes[0] = 1
            for t in 0..<6 {
                try await node.write(at: Int64(t) << 29, from: UnsafeRawBufferPointer(b.bytes))
            }
            try await node.close()
        }
    }
}
