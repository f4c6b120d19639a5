import BlockCore
import BlockGraph

/// Resizing (QEMU's qcow2_co_truncate): growing the L1 table, preallocating
/// the new area, zeroing what a bigger backing file would show through,
/// and shrinking (discarding clusters past the new end, clearing L1 entries
/// and refcount blocks that became unused, cutting the file's free tail).
///
/// Order for kill -9 safety: new structures are written and flushed before
/// the pointer that makes them live (new L1 before the header switch,
/// refcounts before the L2 entries that use them); references are removed
/// and flushed before the clusters are freed; the header's size is written
/// last. A crash leaves the old size, at worst with leaked clusters.
extension Qcow2Image {
    /// Resizes the image to `newSize` bytes (a multiple of 512). Shrinking
    /// drops the data past the new end; `preallocation` applies to the new
    /// area when growing.
    public func truncate(to newSize: Int64, preallocation: Preallocation) async throws(BlockError) {
        if newSize < 0 || newSize % 512 != 0 {
            throw BlockError(.invalidArgument, errno: 22, "The new size must be a multiple of 512")
        }
        if isReadOnly { throw BlockError(.permissionDenied, errno: 1, "Block node is read-only") }
        await ioGate.waitIdle()
        let oldSize = length
        let cs = Int64(geo.clusterSize)
        let hasBigBacking: Bool
        if let b = backing, newSize > oldSize { hasBigBacking = b.length > oldSize } else { hasBigBacking = false }

        try await lock.withLock { () async throws(BlockError) in
            if header.nbSnapshots > 0 && header.version < 3 {
                throw BlockError(.notSupported, errno: 95, "Can't resize a v2 image which has snapshots")
            }
            // QEMU's qcow2_truncate_bitmaps_check: no inconsistent bitmap.
            try checkBitmapsResizableLocked()
            if newSize < oldSize && preallocation != .off {
                throw BlockError(.invalidArgument, errno: 22, "Preallocation can't be used for shrinking an image")
            }
            if hasBigBacking && geo.version < 3 && (preallocation == .off || preallocation == .metadata) {
                throw BlockError(.notSupported, errno: 95, "Failed to zero out new clusters: Operation not supported")
            }
            try await ensureWritableLocked()
        }
        metadataPreallocation = nil

        if newSize < oldSize {
            try await shrink(from: oldSize, to: newSize)
        } else {
            let newL1 = geo.l1EntriesFor(size: newSize)
            if newL1 * 8 > Qcow2.maxL1Bytes || newL1 > Int64(Int32.max) {
                throw BlockError(.io, errno: 27, "Failed to grow the L1 table: File too large")
            }
            try await lock.withLock { () async throws(BlockError) in
                do throws(BlockError) {
                    try await growL1Locked(to: Int(newL1))
                } catch {
                    throw error.prefixed("Failed to grow the L1 table: ")
                }
            }
            // Guest bytes of the cluster holding the old end (copied into a
            // newly allocated head cluster).
            var head: AlignedBuffer?
            let headStart = alignDown(oldSize, cs)
            if newSize > oldSize && preallocation != .off && oldSize > headStart {
                let h = AlignedBuffer(count: Int(cs), zeroed: true)
                try await read(at: headStart, into: h.slice(0, Int(oldSize - headStart)))
                head = h
            }
            switch preallocation {
            case .off: break
            case .metadata:
                if newSize > oldSize {
                    try await preallocateMetadata(from: oldSize, to: newSize, head: head)
                }
            case .falloc, .full:
                if newSize > oldSize {
                    try await preallocateData(from: oldSize, to: newSize, head: head, mode: preallocation,
                                              allocateSubclusters: hasBigBacking)
                }
            }
            if hasBigBacking && (preallocation == .off || preallocation == .metadata) {
                // The backing file is longer than the old end: the new area
                // must read as zeroes, not as the backing file's data.
                setLength(newSize)
                do throws(BlockError) {
                    let zeroStart = alignUp(oldSize, Int64(geo.subclusterSize))
                    if zeroStart > oldSize {
                        let n = min(zeroStart, newSize) - oldSize
                        let z = AlignedBuffer(count: Int(n), zeroed: true)
                        try await write(at: oldSize, from: UnsafeRawBufferPointer(z.bytes), flags: [])
                    }
                    if newSize > zeroStart {
                        try await writeZeroes(at: zeroStart, length: newSize - zeroStart, flags: [])
                    }
                } catch {
                    setLength(oldSize)
                    throw error.prefixed("Failed to zero out new clusters: ")
                }
            }
        }
        try await lock.withLock { () async throws(BlockError) in
            try await writebackL2Locked()
            try await barrier()
            var b = [UInt8](repeating: 0, count: 8)
            b.putBE64(UInt64(newSize), 0)
            do throws(BlockError) {
                try await writeBytes(b, at: 24)
                try await barrier()
            } catch {
                setLength(oldSize)
                throw error.prefixed("Failed to update the image size: ")
            }
            header.size = UInt64(newSize)
            setLength(newSize)
            resizeBitmapsLocked(to: newSize)
        }
    }

    // MARK: - L1 growth

    /// QEMU's qcow2_grow_l1_table (exact size): a new, larger table in
    /// free clusters, written and flushed, then one header write switches
    /// l1_size and l1_table_offset; the old table is freed afterwards.
    func growL1Locked(to newCount: Int) async throws(BlockError) {
        guard newCount > l1.count else { return }
        let cs = Int64(geo.clusterSize)
        let bytes = Int64(newCount) * 8
        let clusters = divRoundUp(bytes, cs)
        try await releaseReserveLocked()
        file.debugEvent(.l1GrowAllocTable)
        let start = try await allocateContiguousLocked(clusters)
        let offset = start * cs
        let a = Int64(max(8, file.driver.requestAlignment))
        let buf = AlignedBuffer(count: Int(alignUp(bytes, a)), zeroed: true)
        for (i, e) in l1.enumerated() { buf.setBE64(i, e) }
        file.debugEvent(.l1GrowWriteTable)
        try await file.write(at: offset, from: UnsafeRawBufferPointer(buf.bytes))
        try await barrier()
        file.debugEvent(.l1GrowActivateTable)
        var hb = [UInt8](repeating: 0, count: 12)
        hb.putBE32(UInt32(newCount), 0)
        hb.putBE64(UInt64(offset), 4)
        try await writeBytes(hb, at: 36)
        try await barrier()
        let oldOffset = Int64(header.l1TableOffset)
        let oldBytes = Int64(l1.count) * 8
        header.l1Size = UInt32(newCount)
        header.l1TableOffset = UInt64(offset)
        l1 += [UInt64](repeating: 0, count: newCount - l1.count)
        if oldBytes > 0 && oldOffset != 0 {
            forgetMetadata(clusters: (oldOffset / cs)..<divRoundUp(oldOffset + oldBytes, cs))
            try await freeAfterUnref(oldOffset, oldBytes)
        }
    }

    // MARK: - Preallocation of the new area

    /// preallocation=metadata: every new cluster gets a host cluster and an
    /// L2 entry (QEMU's preallocate_co from the old end). Reused host
    /// clusters are zeroed so that the new area reads as zeroes; the head
    /// cluster receives the guest bytes before the old end.
    func preallocateMetadata(from oldSize: Int64, to newSize: Int64, head: AlignedBuffer?) async throws(BlockError) {
        let cs = Int64(geo.clusterSize)
        await lock.lock()
        defer { lock.unlock() }
        try await writebackL2Locked()
        try await releaseReserveLocked()
        try await file.releaseUnusedSpace()
        let firstCluster = oldSize / cs
        let endCluster = divRoundUp(newSize, cs)
        var hostEnd: Int64 = 0
        var c = firstCluster
        while c < endCluster {
            let (l2Off, table) = try await l2TableForWriteLocked(geo.l1Index(c * cs))
            let tableEnd = min(endCluster, (c / Int64(geo.l2Entries) + 1) * Int64(geo.l2Entries))
            var lo = Int.max
            var hi = 0
            var i = c
            // A cluster keeps its host cluster if that is a plain one owned
            // by this table (COPIED); compressed, shared and unallocated
            // clusters get a new one (QEMU's cluster_needs_new_alloc).
            func keeps(_ e: UInt64) -> Bool {
                e & Qcow2.oflagCompressed == 0 && e & Qcow2.l2OffsetMask != 0 && e & Qcow2.oflagCopied != 0
            }
            var frees: [(Int64, Int64)] = []
            while i < tableEnd {
                if keeps(table.l2Entry(geo.l2Index(i * cs), geo)) {
                    i += 1
                    continue
                }
                var n: Int64 = 1
                while i + n < tableEnd && !keeps(table.l2Entry(geo.l2Index((i + n) * cs), geo)) { n += 1 }
                let (hc, got) = try await allocateClusters(n)
                // Contents: the new clusters must read as zeroes (or hold the
                // head bytes). Holes in the file already do; anything else
                // (clusters freed earlier, even during this operation) is
                // zeroed. With subclusters only the head is read from the cluster.
                if !geo.extendedL2 {
                    try await zeroUnlessHoleLocked(hc * cs, got * cs)
                }
                let headHere = head != nil && firstCluster >= i && firstCluster < i + got
                if let h = head, headHere {
                    let host = (hc + firstCluster - i) * cs
                    let n = Int(alignUp(oldSize - firstCluster * cs, 512))
                    try await file.write(at: host, from: UnsafeRawBufferPointer(h.slice(0, n)))
                }
                for k in 0..<got {
                    let j = geo.l2Index((i + k) * cs)
                    let oe = table.l2Entry(j, geo)
                    if let r = hostRange(of: oe) { frees.append(r) }
                    table.setL2Entry(j, geo, UInt64((hc + k) * cs) | Qcow2.oflagCopied)
                    if geo.extendedL2 {
                        var bm = oe & Qcow2.oflagCompressed != 0 ? 0 : table.l2Bitmap(j, geo)
                        if headHere && i + k == firstCluster {
                            // The head bytes now live in the new cluster.
                            let scs = Int64(geo.subclusterSize)
                            let n = divRoundUp(oldSize - firstCluster * cs, scs)
                            let mask = n >= 32 ? Qcow2Image.allAllocBitmap : (UInt64(1) << UInt64(n)) - 1
                            bm = (bm | mask) & ~(mask << 32)
                        }
                        // Otherwise subclusters stay as they were (unallocated:
                        // zeroes or the backing file, as before).
                        table.setL2Bitmap(j, geo, bm)
                    }
                    lo = min(lo, j)
                    hi = max(hi, j + 1)
                }
                hostEnd = max(hostEnd, (hc + got) * cs)
                i += got
            }
            for (o, l) in frees { try await freeAfterUnref(o, l) }
            if hi > lo { l2Cache.markDirty(l2Off, (lo * geo.l2EntrySize)..<(hi * geo.l2EntrySize)) }
            try await writebackIfNeededLocked()
            c = tableEnd
        }
        try await writebackL2Locked()
        try await releaseReserveLocked()
        try await file.releaseUnusedSpace()
        if hostEnd > file.length {
            try await file.truncate(to: hostEnd, preallocation: .off)
        }
    }

    /// preallocation=falloc/full (QEMU's truncate path): one contiguous data
    /// area after the last used cluster, reserved or written by the file
    /// layer, then mapped from the cluster holding the old end onwards (that
    /// cluster is copied into the area).
    func preallocateData(from oldSize: Int64, to newSize: Int64, head: AlignedBuffer?, mode: Preallocation,
                         allocateSubclusters: Bool) async throws(BlockError) {
        let cs = Int64(geo.clusterSize)
        await lock.lock()
        defer { lock.unlock() }
        try await writebackL2Locked()
        try await barrier()
        try await applyFreesLocked(durable: true, force: true)
        try await releaseReserveLocked()
        try await file.releaseUnusedSpace()
        let fileLen = file.length
        let firstGuest = oldSize / cs
        let n = divRoundUp(newSize, cs) - firstGuest
        guard n > 0 else { return }
        // The area starts after the last cluster in use, behind fresh
        // refcount structures that cover it (QEMU's qcow2_refcount_area).
        let lastUsed = try await lastUsedClusterLocked(below: fileLen)
        let oldFileEnd = lastUsed.map { $0 + 1 } ?? divRoundUp(fileLen, cs)
        let newL2Tables = divRoundUp(n, Int64(geo.l2Entries)) + 1
        let start = try await refcountAreaLocked(start: oldFileEnd, additional: n + newL2Tables)
        var r = start
        while r < start + n {
            try await ensureRefblock(r / refblockEntries)
            let blockEnd = min(start + n, (r / refblockEntries + 1) * refblockEntries)
            try await setRefcountRun(r, blockEnd - r, 1)
            r = blockEnd
        }
        try await barrier()
        if start <= freeClusterHint && freeClusterHint < start + n { freeClusterHint = start + n }
        let areaStart = start * cs
        let areaEnd = (start + n) * cs
        // Clusters of the area inside the current file may hold stale bytes.
        let curLen = file.length
        if curLen > areaStart {
            let z = AlignedBuffer(count: Int(min(cs * 16, curLen - areaStart)), zeroed: true)
            var at = areaStart
            while at < min(curLen, areaEnd) {
                let len = min(Int64(z.count), min(curLen, areaEnd) - at)
                try await file.write(at: at, from: UnsafeRawBufferPointer(z.slice(0, Int(len))))
                at += len
            }
        }
        if areaEnd > file.length {
            do throws(BlockError) {
                try await file.truncate(to: areaEnd, preallocation: mode)
            } catch {
                throw error.prefixed("Failed to resize underlying file: ")
            }
        }
        if let h = head {
            let n = Int(alignUp(oldSize - firstGuest * cs, 512))
            try await file.write(at: areaStart, from: UnsafeRawBufferPointer(h.slice(0, n)))
        }
        try await barrier()
        // Map the area.
        var g = firstGuest
        while g < firstGuest + n {
            let (l2Off, table) = try await l2TableForWriteLocked(geo.l1Index(g * cs))
            let tableEnd = min(firstGuest + n, (g / Int64(geo.l2Entries) + 1) * Int64(geo.l2Entries))
            var lo = Int.max
            var hi = 0
            var frees: [(Int64, Int64)] = []
            for c in g..<tableEnd {
                let j = geo.l2Index(c * cs)
                let oe = table.l2Entry(j, geo)
                let ob = table.l2Bitmap(j, geo)
                if oe & Qcow2.l2OffsetMask != 0 || oe & Qcow2.oflagCompressed != 0, let r = hostRange(of: oe) {
                    frees.append(r)
                }
                table.setL2Entry(j, geo, UInt64(areaStart + (c - firstGuest) * cs) | Qcow2.oflagCopied)
                if geo.extendedL2 {
                    table.setL2Bitmap(j, geo, allocateSubclusters ? Qcow2Image.allAllocBitmap : (c == firstGuest ? ob & Qcow2Image.allAllocBitmap : 0))
                }
                lo = min(lo, j)
                hi = max(hi, j + 1)
            }
            if hi > lo { l2Cache.markDirty(l2Off, (lo * geo.l2EntrySize)..<(hi * geo.l2EntrySize)) }
            for (o, l) in frees { try await freeAfterUnref(o, l) }
            try await writebackIfNeededLocked()
            g = tableEnd
        }
        try await writebackL2Locked()
        try await releaseReserveLocked()
        try await file.releaseUnusedSpace()
    }

    /// QEMU's qcow2_refcount_area (exact size): new refcount blocks for
    /// everything up to `start + additional` clusters are placed at
    /// cluster `start`, followed by a new refcount table (always written);
    /// the header then switches to the new table and the old one is freed.
    /// Returns the first cluster after these structures.
    func refcountAreaLocked(start: Int64, additional: Int64) async throws(BlockError) -> Int64 {
        let cs = Int64(geo.clusterSize)
        let e = refblockEntries
        // Refcount blocks needed to cover [0, start + additional) and themselves.
        var total: Int64 = 0
        var table: Int64 = 0
        var n: Int64 = 0
        var last: Int64
        repeat {
            last = n
            total = divRoundUp(start + additional + table + total, e)
            table = divRoundUp(total, cs / 8)
            n = start + additional + total + table
        } while n != last
        let tableSize = alignUp(total, cs / 8)
        let tableClusters = tableSize * 8 / cs
        if tableSize * 8 > Qcow2.maxRefTableBytes {
            throw BlockError(.io, errno: 27, "Failed to resize refcount structures: File too large")
        }
        var newTable = [UInt64](repeating: 0, count: Int(tableSize))
        for i in 0..<min(refTable.count, Int(tableSize)) { newTable[i] = refTable[i] }
        let areaIndex = start / e
        var newBlocks: [(Int, Int64)] = []
        var blockAt = start
        for i in areaIndex..<total where newTable[Int(i)] & Qcow2.refTableOffsetMask == 0 {
            newBlocks.append((Int(i), blockAt))
            newTable[Int(i)] = UInt64(blockAt * cs)
            blockAt += 1
        }
        let tableStart = blockAt
        let end = tableStart + tableClusters
        for i in areaIndex..<total {
            let off = Int64(newTable[Int(i)] & Qcow2.refTableOffsetMask)
            let isNew = newBlocks.contains { $0.0 == Int(i) }
            let b: AlignedBuffer
            if isNew {
                b = AlignedBuffer(count: geo.clusterSize, zeroed: true)
            } else {
                b = try await refblock(at: off, index: i)
            }
            let first = i * e
            let lo = max(start, first)
            let hi = min(end, first + e)
            if lo < hi {
                for c in lo..<hi { RefcountCodec.set(b.pointer, Int(c - first), order: geo.refcountOrder, 1) }
            }
            if isNew {
                try await file.write(at: off, from: UnsafeRawBufferPointer(b.bytes))
                refCache.insert(off, b)
            } else if lo < hi {
                let a = RefcountCodec.byteRange(Int(lo - first), order: geo.refcountOrder).lowerBound
                let z = RefcountCodec.byteRange(Int(hi - 1 - first), order: geo.refcountOrder).upperBound
                try await writeTableRange(b, at: off, a..<z)
            }
        }
        try await barrier()
        let tbuf = AlignedBuffer(count: Int(tableClusters * cs), zeroed: true)
        for (i, v) in newTable.enumerated() { tbuf.setBE64(i, v) }
        try await file.write(at: tableStart * cs, from: UnsafeRawBufferPointer(tbuf.bytes))
        try await barrier()
        var hb = [UInt8](repeating: 0, count: 12)
        hb.putBE64(UInt64(tableStart * cs), 0)
        hb.putBE32(UInt32(tableClusters), 8)
        try await writeBytes(hb, at: 48)
        try await barrier()
        let oldOffset = Int64(header.refcountTableOffset)
        let oldClusters = Int64(header.refcountTableClusters)
        header.refcountTableOffset = UInt64(tableStart * cs)
        header.refcountTableClusters = UInt32(tableClusters)
        refTable = newTable
        for c in start..<end { noteMetadata(cluster: c) }
        if oldClusters > 0 {
            forgetMetadata(clusters: (oldOffset / cs)..<(oldOffset / cs + oldClusters))
            try await freeAfterUnref(oldOffset, oldClusters * cs)
        }
        return end
    }

    /// Writes zeroes over the parts of host range [offset, offset+length)
    /// that are not holes of the file.
    func zeroUnlessHoleLocked(_ offset: Int64, _ length: Int64) async throws(BlockError) {
        let end = offset + length
        var at = offset
        while at < end {
            let st = try await file.blockStatus(at: at, length: end - at)
            if st.length <= 0 { break }
            let n = min(st.length, end - at)
            if !st.flags.contains(.zero) {
                let z = AlignedBuffer(count: Int(min(n, 1 << 20)), zeroed: true)
                var w = at
                while w < at + n {
                    let k = min(Int64(z.count), at + n - w)
                    try await file.write(at: w, from: UnsafeRawBufferPointer(z.slice(0, Int(k))))
                    w += k
                }
            }
            at += n
        }
    }

    /// The highest cluster below `fileLength` with a nonzero refcount.
    func lastUsedClusterLocked(below fileLength: Int64) async throws(BlockError) -> Int64? {
        let cs = Int64(geo.clusterSize)
        var c = divRoundUp(fileLength, cs) - 1
        while c >= 0 {
            let idx = c / refblockEntries
            if idx < Int64(refTable.count) && refTable[Int(idx)] & Qcow2.refTableOffsetMask != 0 {
                if try await refcount(c) > 0 { return c }
                c -= 1
            } else {
                // No refcount block: the whole block's range is free.
                c = idx * refblockEntries - 1
            }
        }
        return nil
    }

    // MARK: - Shrink

    func shrink(from oldSize: Int64, to newSize: Int64) async throws(BlockError) {
        let cs = Int64(geo.clusterSize)
        // 1. Drop every cluster past the new end (entries become 0).
        let discardStart = alignUp(newSize, cs)
        if discardStart < oldSize {
            do throws(BlockError) {
                // QEMU's discard gives the L1 entry holding the new end a table
                // of its own (allocated if missing, copied if shared) even when
                // nothing in it changes; that table stays.
                let l1i = geo.l1Index(discardStart)
                if Int64(l1i) < geo.l1EntriesFor(size: newSize) && l1i < l1.count {
                    try await lock.withLock { () async throws(BlockError) in
                        if l1[l1i] & Qcow2.oflagCopied == 0 {
                            _ = try await l2TableForWriteLocked(l1i)
                        }
                    }
                }
                try await rewriteEntries(discardStart / cs, divRoundUp(oldSize, cs)) { e, _ in
                    let allocated = e & Qcow2.oflagCompressed != 0 || e & Qcow2.l2OffsetMask != 0
                    return (0, 0, allocated)
                }
            } catch {
                throw BlockError(error.kind, errno: error.errno, "Failed to discard cropped clusters: " + errnoString(error.errno))
            }
        }
        try await lock.withLock { () async throws(BlockError) in
            // 2. L1 entries past the new end: zeroed on disk (the table keeps
            // its size, as in QEMU), then their L2 tables are freed.
            let newL1 = Int(geo.l1EntriesFor(size: newSize))
            if newL1 < l1.count {
                var dropped: [Int64] = []
                for i in newL1..<l1.count {
                    let off = Int64(l1[i] & Qcow2.l1OffsetMask)
                    if off != 0 { dropped.append(off) }
                    l1[i] = 0
                }
                do throws(BlockError) {
                    file.debugEvent(.l1ShrinkWriteTable)
                    try await writeL1RangeLocked(newL1, l1.count)
                    try await barrier()
                } catch {
                    throw error.prefixed("Failed to reduce the number of L2 tables: ")
                }
                try await writebackL2Locked()
                if !dropped.isEmpty { file.debugEvent(.l1ShrinkFreeL2Clusters) }
                for off in dropped {
                    l2Cache.remove(off)
                    forgetMetadata(clusters: (off / cs)..<(off / cs + 1))
                    queueFree(off, cs)
                }
            }
            // 3. Make the frees happen now, return the reserve.
            try await writebackL2Locked()
            try await barrier()
            try await applyFreesLocked(durable: true, force: true)
            try await releaseReserveLocked()
            try await file.releaseUnusedSpace()
            // 4. Refcount blocks that count nothing any more.
            do throws(BlockError) {
                try await shrinkRefTableLocked()
            } catch {
                throw error.prefixed("Failed to discard unused refblocks: ")
            }
            // 5. Cut the file after the last cluster in use.
            let fileLen = file.length
            guard let last = try await lastUsedClusterLocked(below: fileLen) else {
                throw await corruption("There are no references in the refcount table.")
            }
            if (last + 1) * cs < fileLen {
                do throws(BlockError) {
                    try await file.truncate(to: (last + 1) * cs, preallocation: .off)
                } catch {
                    BlockDiagnostics.warn("Failed to truncate the tail of the image: " + error.message)
                }
            }
        }
    }

    /// Writes L1 entries [lo, hi) from memory (the aligned span around them
    /// is read back first so that neighbouring bytes are kept).
    func writeL1RangeLocked(_ lo: Int, _ hi: Int) async throws(BlockError) {
        guard hi > lo else { return }
        let a = Int64(max(8, file.driver.requestAlignment))
        let base = Int64(header.l1TableOffset)
        let from = alignDown(base + Int64(lo) * 8, a)
        let to = alignUp(base + Int64(hi) * 8, a)
        let buf = AlignedBuffer(count: Int(to - from), zeroed: true)
        if a > 8 {
            let avail = max(0, min(to, file.length) - from)
            if avail > 0 { try await file.read(at: from, into: buf.slice(0, Int(avail))) }
        }
        for i in lo..<hi {
            let pos = base + Int64(i) * 8 - from
            buf.pointer.storeBE64(l1[i], Int(pos))
        }
        try await file.write(at: from, from: UnsafeRawBufferPointer(buf.bytes))
    }

    /// QEMU's qcow2_shrink_reftable: refcount blocks whose entries are all
    /// zero (apart from the block's own entry) leave the refcount table; the
    /// table is rewritten and flushed, then the blocks are freed.
    func shrinkRefTableLocked() async throws(BlockError) {
        let cs = Int64(geo.clusterSize)
        var newTable = refTable
        var dropped: [(Int, Int64)] = []
        for i in 0..<refTable.count {
            let off = Int64(refTable[i] & Qcow2.refTableOffsetMask)
            if off == 0 { continue }
            let b = try await refblock(at: off, index: Int64(i))
            let own = off / cs
            var unused = true
            let ownIndex = own / refblockEntries == Int64(i) ? Int(own % refblockEntries) : -1
            for k in 0..<Int(refblockEntries) where k != ownIndex {
                if RefcountCodec.get(b.pointer, k, order: geo.refcountOrder) != 0 {
                    unused = false
                    break
                }
            }
            if unused {
                newTable[i] = 0
                dropped.append((i, off))
            }
        }
        guard !dropped.isEmpty else { return }
        let tbuf = AlignedBuffer(count: Int(Int64(header.refcountTableClusters) * cs), zeroed: true)
        for (i, v) in newTable.enumerated() { tbuf.setBE64(i, v) }
        try await file.write(at: Int64(header.refcountTableOffset), from: UnsafeRawBufferPointer(tbuf.bytes))
        try await barrier()
        refTable = newTable
        for (_, off) in dropped {
            refCache.remove(off)
            forgetMetadata(clusters: (off / cs)..<(off / cs + 1))
        }
        for (i, off) in dropped {
            let c = off / cs
            if c / refblockEntries == Int64(i) { continue }
            // Counted by another (live) block.
            let idx = c / refblockEntries
            if idx < Int64(refTable.count) && refTable[Int(idx)] & Qcow2.refTableOffsetMask != 0 {
                try await changeRefcount(c, by: -1)
            }
            freeClusterHint = min(freeClusterHint, c)
        }
        for (i, _) in dropped { freeClusterHint = min(freeClusterHint, Int64(i) * refblockEntries) }
    }
}
