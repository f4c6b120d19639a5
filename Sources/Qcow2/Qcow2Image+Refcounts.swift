import BlockCore
import BlockGraph

/// Refcount handling and cluster allocation. Every function here is called
/// with `lock` held.
extension Qcow2Image {
    var refblockEntries: Int64 { Int64(geo.refblockEntries) }
    /// Clusters to reserve at the next refill: 16 MiB worth at first,
    /// doubling while the image keeps allocating, up to 1 GiB (or one
    /// refcount block). Unused reserved clusters are released on close; a
    /// crash leaves them as refcounts past the end of the file, which
    /// nothing references and `check` does not even report.
    var reserveChunk: Int64 {
        let first = max(8, (16 << 20) / Int64(geo.clusterSize))
        let most = max(first, min(Int64(geo.refblockEntries), (1 << 30) / Int64(geo.clusterSize)))
        return min(most, first << Int64(min(reserveRefills, 16)))
    }

    // MARK: - Table I/O

    /// Writes bytes `range` of a cached metadata cluster at host `tableOffset`,
    /// widened to the file's request alignment.
    func writeTableRange(_ buf: AlignedBuffer, at tableOffset: Int64, _ range: Range<Int>) async throws(BlockError) {
        let a = max(1, file.driver.requestAlignment)
        let lo = range.lowerBound / a * a
        let hi = min(buf.count, (range.upperBound + a - 1) / a * a)
        try await file.write(at: tableOffset + Int64(lo), from: UnsafeRawBufferPointer(buf.slice(lo, hi - lo)))
    }

    func refblock(at offset: Int64, index: Int64) async throws(BlockError) -> AlignedBuffer {
        if let b = refCache.lookup(offset) { return b }
        if offset % Int64(geo.clusterSize) != 0 {
            throw await corruption("Refblock offset \(hex(offset)) unaligned (reftable index: \(hex(index)))")
        }
        let b = AlignedBuffer(count: geo.clusterSize)
        file.debugEvent(.refblockLoad)
        try await Qcow2Image.readInto(file, b, offset)
        refCache.insert(offset, b)
        return b
    }

    static func readInto(_ file: BlockNode, _ b: AlignedBuffer, _ offset: Int64) async throws(BlockError) {
        try await file.read(at: offset, into: b.bytes)
    }

    func refcount(_ cluster: Int64) async throws(BlockError) -> UInt64 {
        let idx = cluster / refblockEntries
        guard idx < Int64(refTable.count) else { return 0 }
        let off = Int64(refTable[Int(idx)] & Qcow2.refTableOffsetMask)
        if off == 0 { return 0 }
        let b = try await refblock(at: off, index: idx)
        return RefcountCodec.get(b.pointer, Int(cluster % refblockEntries), order: geo.refcountOrder)
    }

    /// Sets the refcount of `count` clusters from `start`, which must share
    /// one refcount block that exists, to `value`; one write.
    func setRefcountRun(_ start: Int64, _ count: Int64, _ value: UInt64) async throws(BlockError) {
        guard count > 0 else { return }
        let idx = start / refblockEntries
        precondition((start + count - 1) / refblockEntries == idx)
        let off = Int64(refTable[Int(idx)] & Qcow2.refTableOffsetMask)
        precondition(off != 0)
        let b = try await refblock(at: off, index: idx)
        let first = Int(start % refblockEntries)
        for i in 0..<Int(count) {
            RefcountCodec.set(b.pointer, first + i, order: geo.refcountOrder, value)
        }
        let lo = RefcountCodec.byteRange(first, order: geo.refcountOrder).lowerBound
        let hi = RefcountCodec.byteRange(first + Int(count) - 1, order: geo.refcountOrder).upperBound
        file.debugEvent(.refblockUpdatePart)
        try await writeTableRange(b, at: off, lo..<hi)
    }

    /// Adds `delta` to the refcount of one cluster (creating its refcount
    /// block if needed). Returns the new value.
    @discardableResult
    func changeRefcount(_ cluster: Int64, by delta: Int64) async throws(BlockError) -> UInt64 {
        try await ensureRefblock(cluster / refblockEntries)
        let old = try await refcount(cluster)
        let maxV = RefcountCodec.maxValue(order: geo.refcountOrder)
        let new: UInt64
        if delta >= 0 {
            if maxV - old < UInt64(delta) {
                throw BlockError(.io, errno: 34, "Refcount overflow for cluster \(cluster)")
            }
            new = old + UInt64(delta)
        } else {
            if old < UInt64(-delta) {
                throw await corruption("Refcount underflow for cluster \(hex(cluster * Int64(geo.clusterSize)))")
            }
            new = old - UInt64(-delta)
        }
        try await setRefcountRun(cluster, 1, new)
        return new
    }

    // MARK: - Refcount blocks and table

    /// Makes sure refcount block `index` exists (allocating it, and growing
    /// the refcount table, as needed).
    func ensureRefblock(_ index: Int64) async throws(BlockError) {
        var guardCount = 0
        while true {
            guardCount += 1
            if guardCount > 64 { throw await corruption("Could not allocate a refcount block") }
            if index < Int64(refTable.count) && refTable[Int(index)] & Qcow2.refTableOffsetMask != 0 { return }
            file.debugEvent(.refblockAlloc)
            if index >= Int64(refTable.count) {
                file.debugEvent(.reftableGrow)
                try await growRefTable(toCover: index)
                continue
            }
            // Place the new block at the first free cluster.
            let f = try await findFreeCluster(from: freeClusterHint)
            let fidx = f / refblockEntries
            let newBlock = AlignedBuffer(count: geo.clusterSize, zeroed: true)
            if fidx == index {
                // Self-describing: the block counts itself.
                RefcountCodec.set(newBlock.pointer, Int(f % refblockEntries), order: geo.refcountOrder, 1)
            } else if fidx < Int64(refTable.count) && refTable[Int(fidx)] & Qcow2.refTableOffsetMask != 0 {
                try await setRefcountRun(f, 1, 1)
            } else {
                // The free cluster's own block is missing: create that one first.
                try await ensureRefblock(fidx)
                continue
            }
            file.debugEvent(.refblockAllocWrite)
            try await file.write(at: f * Int64(geo.clusterSize), from: UnsafeRawBufferPointer(newBlock.bytes))
            refCache.insert(f * Int64(geo.clusterSize), newBlock)
            refTable[Int(index)] = UInt64(f * Int64(geo.clusterSize))
            file.debugEvent(.refblockAllocHookup)
            try await writeRefTableEntry(Int(index))
            noteMetadata(cluster: f)
            if f == freeClusterHint { freeClusterHint = f + 1 }
            return
        }
    }

    func writeRefTableEntry(_ i: Int) async throws(BlockError) {
        let a = max(8, file.driver.requestAlignment)
        let perSpan = a / 8
        let first = i / perSpan * perSpan
        let last = min(refTable.count, first + perSpan)
        let buf = AlignedBuffer(count: (last - first) * 8)
        for j in first..<last { buf.setBE64(j - first, refTable[j]) }
        try await file.write(at: Int64(header.refcountTableOffset) + Int64(first * 8), from: UnsafeRawBufferPointer(buf.bytes))
    }

    /// Grows the refcount table so that block `index` can exist, and
    /// creates that block. The new table and the blocks describing it are
    /// placed in a fresh area beyond everything the old table can describe;
    /// the header switch is a single write, so a crash leaves either the old
    /// or the new table in force.
    func growRefTable(toCover index: Int64) async throws(BlockError) {
        let cs = Int64(geo.clusterSize)
        let e = refblockEntries
        let oldCount = Int64(refTable.count)
        var newEntries = max(index + 1, oldCount + oldCount / 2, 1)
        newEntries = alignUp(newEntries, cs / 8)
        let tableClusters = newEntries * 8 / cs
        if newEntries * 8 > Qcow2.maxRefTableBytes {
            throw BlockError(.io, errno: 27, "Refcount table too large")
        }
        // The area starts at the first cluster the old table cannot describe.
        let areaStart = oldCount * e
        // Blocks needed to describe the area [areaStart, areaStart + k + tableClusters).
        var k: Int64 = 1
        while divRoundUp(k + tableClusters, e) > k { k += 1 }
        let firstNewIndex = oldCount
        if firstNewIndex + k > newEntries {
            throw BlockError(.io, errno: 27, "Refcount table too large")
        }
        // Build the blocks.
        file.debugEvent(.refblockAllocWriteBlocks)
        for j in 0..<k {
            let block = AlignedBuffer(count: geo.clusterSize, zeroed: true)
            let blockFirst = areaStart + j * e
            let used = k + tableClusters
            for c in blockFirst..<min(blockFirst + e, areaStart + used) {
                RefcountCodec.set(block.pointer, Int(c - blockFirst), order: geo.refcountOrder, 1)
            }
            let at = (areaStart + j) * cs
            try await file.write(at: at, from: UnsafeRawBufferPointer(block.bytes))
            refCache.insert(at, block)
        }
        // Build and write the new table.
        var newTable = refTable
        newTable += [UInt64](repeating: 0, count: Int(newEntries - oldCount))
        for j in 0..<k { newTable[Int(firstNewIndex + j)] = UInt64((areaStart + j) * cs) }
        let tableOffset = (areaStart + k) * cs
        let tbuf = AlignedBuffer(count: Int(tableClusters * cs), zeroed: true)
        for (i, v) in newTable.enumerated() { tbuf.setBE64(i, v) }
        file.debugEvent(.refblockAllocWriteTable)
        try await file.write(at: tableOffset, from: UnsafeRawBufferPointer(tbuf.bytes))
        try await barrier()
        file.debugEvent(.refblockAllocSwitchTable)
        // Switch the header (refcount_table_offset + refcount_table_clusters: 12 contiguous bytes).
        var hb = [UInt8](repeating: 0, count: 12)
        hb.putBE64(UInt64(tableOffset), 0)
        hb.putBE32(UInt32(tableClusters), 8)
        try await writeBytes(hb, at: 48)
        let oldOffset = Int64(header.refcountTableOffset)
        let oldClusters = Int64(header.refcountTableClusters)
        header.refcountTableOffset = UInt64(tableOffset)
        header.refcountTableClusters = UInt32(tableClusters)
        refTable = newTable
        for j in 0..<(k + tableClusters) { noteMetadata(cluster: areaStart + j) }
        // The old table is no longer referenced.
        if oldClusters > 0 {
            forgetMetadata(clusters: (oldOffset / cs)..<(oldOffset / cs + oldClusters))
            queueFree(oldOffset, oldClusters * cs)
        }
    }

    /// Writes every dirty L2 table back to the file (QEMU's L2 cache is
    /// writeback too). Refcounts are written through at allocation time, so
    /// whatever a table references already has its refcount on disk.
    func writebackL2Locked() async throws(BlockError) {
        guard l2Cache.dirtyCount > 0 else { return }
        if refcountsNeedSync {
            try await barrier()
            refcountsNeedSync = false
        }
        for (off, buf, range) in l2Cache.dirtyEntries() {
            file.debugEvent(.l2Update)
            try await writeTableRange(buf, at: off, range)
            l2Cache.markClean(off)
        }
    }

    /// Bounds the amount of unwritten metadata.
    func writebackIfNeededLocked() async throws(BlockError) {
        if l2Cache.dirtyCount > max(8, l2Cache.capacity / 2) {
            try await writebackL2Locked()
        }
    }

    /// fdatasync, unless the image was opened with cache.no-flush.
    func barrier() async throws(BlockError) {
        if !options.noFlush { try await file.flush() }
    }

    // MARK: - Finding and reserving clusters

    /// The first cluster at or after `start` whose refcount is 0.
    func findFreeCluster(from start: Int64) async throws(BlockError) -> Int64 {
        var c = max(start, 0)
        let e = refblockEntries
        while true {
            let idx = c / e
            if idx >= Int64(refTable.count) { return c }
            let off = Int64(refTable[Int(idx)] & Qcow2.refTableOffsetMask)
            if off == 0 { return c }
            let b = try await refblock(at: off, index: idx)
            var i = Int(c % e)
            while i < Int(e) {
                if RefcountCodec.get(b.pointer, i, order: geo.refcountOrder) == 0 { return idx * e + Int64(i) }
                i += 1
            }
            c = (idx + 1) * e
        }
    }

    /// Takes up to `count` contiguous clusters (refcount already 1) from
    /// the reserve, refilling it first if empty. Returns the first cluster
    /// index and how many were taken (at least 1).
    func allocateClusters(_ count: Int64) async throws(BlockError) -> (Int64, Int64) {
        file.debugEvent(.clusterAlloc)
        if releaseReservePending {
            releaseReservePending = false
            try await releaseReserveLocked()
        }
        if reserveCount == 0 {
            try await refillReserve(want: max(count, reserveChunk))
        }
        let n = min(count, reserveCount)
        let start = reserveStart
        reserveStart += n
        reserveCount -= n
        return (start, n)
    }

    /// `count` contiguous free clusters with refcount 1 (written through;
    /// the caller's next barrier makes them durable, before anything points
    /// at them). Their refcount blocks are placed first, after the run as
    /// QEMU's allocator does; should one land inside the run, the search
    /// starts again after it. With `asMetadata` the run is checked against
    /// the known metadata and then noted as metadata (new tables). Returns
    /// the first cluster index.
    func allocateContiguousLocked(_ count: Int64, asMetadata: Bool = true) async throws(BlockError) -> Int64 {
        precondition(count > 0)
        file.debugEvent(.clusterAlloc)
        var c = try await findFreeCluster(from: freeClusterHint)
        var attempts = 0
        while true {
            attempts += 1
            if attempts > 100_000 { throw await corruption("Could not allocate clusters") }
            let savedHint = freeClusterHint
            freeClusterHint = c + count
            var idx = c / refblockEntries
            while idx <= (c + count - 1) / refblockEntries {
                try await ensureRefblock(idx)
                idx += 1
            }
            freeClusterHint = savedHint
            var k: Int64 = 0
            while k < count, try await refcount(c + k) == 0 { k += 1 }
            if k == count { break }
            c = try await findFreeCluster(from: c + k + 1)
        }
        var r = c
        while r < c + count {
            let blockEnd = min(c + count, (r / refblockEntries + 1) * refblockEntries)
            try await setRefcountRun(r, blockEnd - r, 1)
            r = blockEnd
        }
        refcountsNeedSync = true
        if c == freeClusterHint { freeClusterHint = c + count }
        if asMetadata {
            try await checkOverlap(c * Int64(geo.clusterSize), count * Int64(geo.clusterSize))
            for k in 0..<count { noteMetadata(cluster: c + k) }
        }
        return c
    }

    func refillReserve(want: Int64) async throws(BlockError) {
        if !pendingFrees.isEmpty {
            // Make the L2 updates that dropped these clusters durable, then reuse them.
            try await writebackL2Locked()
            try await barrier()
            try await applyFreesLocked(durable: true)
        }
        var attempts = 0
        while true {
            attempts += 1
            if attempts > 1000 { throw await corruption("Could not allocate clusters") }
            let c = try await findFreeCluster(from: freeClusterHint)
            try await ensureRefblock(c / refblockEntries)
            if try await refcount(c) != 0 {
                freeClusterHint = c + 1
                continue
            }
            var n: Int64 = 1
            let blockEnd = (c / refblockEntries + 1) * refblockEntries
            while n < want && c + n < blockEnd, try await refcount(c + n) == 0 {
                n += 1
            }
            try await setRefcountRun(c, n, 1)
            // Durable before any L2 table that references these clusters is
            // written back (writebackL2Locked), not necessarily now.
            refcountsNeedSync = true
            reserveRefills += 1
            // Data written into the reserve lands inside the file, which the
            // host handles faster than writes extending it; unused space is
            // given back on close.
            try await file.reserveSpace(upTo: (c + n) * Int64(geo.clusterSize))
            reserveStart = c
            reserveCount = n
            freeClusterHint = c + n
            return
        }
    }

    /// Returns unused reserved clusters to the free pool (refcount 0).
    func releaseReserveLocked() async throws(BlockError) {
        guard reserveCount > 0 else { return }
        var c = reserveStart
        let end = reserveStart + reserveCount
        while c < end {
            let blockEnd = min(end, (c / refblockEntries + 1) * refblockEntries)
            try await setRefcountRun(c, blockEnd - c, 0)
            c = blockEnd
        }
        freeClusterHint = min(freeClusterHint, reserveStart)
        reserveCount = 0
    }

    // MARK: - Freeing

    /// Queues the release of host bytes [offset, offset+length): every
    /// cluster touched loses one reference once nothing planned earlier can
    /// still use it and (unless cache.no-flush) after the next flush.
    func queueFree(_ offset: Int64, _ length: Int64) {
        guard length > 0 else { return }
        file.debugEvent(.clusterFree)
        pendingFrees.append(PendingFree(offset: offset, length: length, epoch: ioGate.advance()))
    }

    /// Applies queued frees whose requests have drained. `durable` says the
    /// caller just made the file durable (or durability is off).
    func applyFreesLocked(durable: Bool, force: Bool = false) async throws(BlockError) {
        guard !pendingFrees.isEmpty else { return }
        if !durable && !options.noFlush { return }
        var keep: [PendingFree] = []
        var ready: [PendingFree] = []
        for f in pendingFrees {
            if force || ioGate.isClear(upTo: f.epoch) { ready.append(f) } else { keep.append(f) }
        }
        guard !ready.isEmpty else { return }
        // The L2 updates that dropped these references must be on disk first.
        try await writebackL2Locked()
        pendingFrees = keep
        defer {
            // Reuse freed space first (like QEMU's free-cluster index): give
            // the reserve back so the next allocation starts at the hole.
            if freedBelowReserve && reserveCount > 0 {
                releaseReservePending = true
            }
            freedBelowReserve = false
        }
        let cs = Int64(geo.clusterSize)
        for f in ready {
            let first = f.offset / cs
            let last = (f.offset + f.length - 1) / cs
            for c in first...last {
                let v = try await changeRefcount(c, by: -1)
                if v == 0 {
                    freedBelowReserve = freedBelowReserve || c < reserveStart
                    freeClusterHint = min(freeClusterHint, c)
                    forgetMetadata(clusters: c..<(c + 1))
                    if c * cs <= compressedFreeByte && compressedFreeByte < (c + 1) * cs { compressedFreeByte = 0 }
                }
            }
        }
    }

    /// Frees later, or now when durability is off (kill -9 safety only
    /// needs the reference removal to precede the decrement, which the
    /// caller has already written).
    func freeAfterUnref(_ offset: Int64, _ length: Int64) async throws(BlockError) {
        queueFree(offset, length)
        if options.noFlush { try await applyFreesLocked(durable: true) }
    }

    // MARK: - Metadata overlap guard

    func noteMetadata(cluster: Int64) {
        metadataClusters?.insert(cluster)
    }

    func forgetMetadata(clusters: Range<Int64>) {
        guard metadataClusters != nil else { return }
        for c in clusters { metadataClusters!.remove(c) }
    }

    /// Builds the set of clusters holding metadata (header, L1, refcount
    /// table and blocks, active L2 tables, snapshot table and L1 tables).
    func buildMetadataSet() {
        let cs = Int64(geo.clusterSize)
        var s = Set<Int64>()
        s.insert(0)
        func addRange(_ off: Int64, _ bytes: Int64) {
            guard bytes > 0 else { return }
            for c in (off / cs)...((off + bytes - 1) / cs) { s.insert(c) }
        }
        addRange(Int64(header.l1TableOffset), Int64(header.l1Size) * 8)
        addRange(Int64(header.refcountTableOffset), Int64(header.refcountTableClusters) * cs)
        for e in refTable where e & Qcow2.refTableOffsetMask != 0 { s.insert(Int64(e & Qcow2.refTableOffsetMask) / cs) }
        for e in l1 where e & Qcow2.l1OffsetMask != 0 { s.insert(Int64(e & Qcow2.l1OffsetMask) / cs) }
        if header.nbSnapshots > 0 {
            addRange(Int64(header.snapshotsOffset), max(Int64(snapshotTableBytes), 1))
            for sn in snapshots where Int64(sn.l1Size) * 8 <= Qcow2.maxL1Bytes && sn.l1TableOffset < UInt64(Int64.max / 2) {
                addRange(Int64(sn.l1TableOffset), Int64(sn.l1Size) * 8)
            }
        }
        if let bm = header.bitmaps { addRange(Int64(bm.directoryOffset), Int64(bm.directorySize)) }
        metadataClusters = s
    }

    /// Refuses a data write that would land on metadata (QEMU's overlap check).
    func checkOverlap(_ host: Int64, _ length: Int64) async throws(BlockError) {
        if metadataClusters == nil { buildMetadataSet() }
        let cs = Int64(geo.clusterSize)
        for c in (host / cs)...((host + length - 1) / cs) where metadataClusters!.contains(c) {
            throw await corruption("Preventing invalid write on metadata (overlaps with cluster \(hex(c * cs)))")
        }
    }
}

/// printf("%#" PRIx64): "0" for zero, "0x..." otherwise.
@inline(never)
func hex(_ v: Int64) -> String { v == 0 ? "0" : "0x" + String(v, radix: 16) }

@inline(never)
func hex(_ v: UInt64) -> String { v == 0 ? "0" : "0x" + String(v, radix: 16) }
