import BlockCore
import BlockGraph

extension Qcow2Image {
    /// Checks (and optionally repairs) the image as QEMU's qcow2 check does:
    /// recomputes every reference, compares with the stored refcounts,
    /// checks the COPIED flags; repairs leaks, refcount errors (rebuilding
    /// the refcount structures when a referenced cluster has refcount 0)
    /// and COPIED flags. A failure is reported in `error`, together with
    /// the diagnostics printed so far.
    public func check(repair: ImageRepairMode = []) async -> (ImageCheckResult, BlockError?) {
        await lock.lock()
        defer { lock.unlock() }
        var res = ImageCheckResult()
        do throws(BlockError) {
            try await checkLocked(&res, repair: repair)
            return (res, nil)
        } catch {
            return (res, error)
        }
    }

    func checkLocked(repair: ImageRepairMode) async throws(BlockError) -> ImageCheckResult {
        var res = ImageCheckResult()
        try await checkLocked(&res, repair: repair)
        return res
    }

    func checkLocked(_ res: inout ImageCheckResult, repair: ImageRepairMode) async throws(BlockError) {
        if !repair.isEmpty && isReadOnly {
            throw BlockError(.permissionDenied, errno: 1, "Cannot repair a read-only image")
        }
        if !isReadOnly { try await writebackL2Locked() }
        if !repair.isEmpty {
            // Leftover reservations are not references; give them back first.
            try await releaseReserveLocked()
            try await applyFreesLocked(durable: true, force: true)
        }
        if snapshots.isEmpty && header.nbSnapshots > 0 {
            snapshots = (try? await readSnapshotTable()) ?? []
        }
        let cs = Int64(geo.clusterSize)
        var rebuild = false
        var highest: Int64 = -1
        var refs = try await calculateRefcounts(&res, &rebuild)
        let preCompare = res
        try await compareRefcounts(refs, &res, fix: [], &rebuild, &highest)
        if rebuild && repair.contains(.errors) {
            let old = res
            var fresh = 0
            res.messages.append("Rebuilding refcount structure")
            try await rebuildRefcountStructure(&refs)
            res.corruptions = 0
            res.leaks = 0
            rebuild = false
            refs = try await calculateRefcounts(&res, &rebuild)
            if repair.contains(.leaks) {
                var scratch = ImageCheckResult()
                try await compareRefcounts(refs, &scratch, fix: [.leaks], &rebuild, &highest)
                if rebuild { scratch.messages.append("ERROR rebuilt refcount structure is still broken") }
                fresh = scratch.leaks
                res.messages += scratch.messages
            }
            if res.corruptions < old.corruptions { res.corruptionsFixed += old.corruptions - res.corruptions }
            if res.leaks < old.leaks { res.leaksFixed += old.leaks - res.leaks }
            res.leaks += fresh
        } else if !repair.isEmpty {
            if rebuild {
                res.messages.append("ERROR need to rebuild refcount structures")
                res.checkErrors += 1
                throw BlockError.io("Input/output error")
            }
            if res.leaks > 0 || res.corruptions > 0 {
                let msgs = res.messages
                res = preCompare
                res.messages = msgs
                try await compareRefcounts(refs, &res, fix: repair, &rebuild, &highest)
            }
        }
        try await checkCopiedFlags(&res, repair: repair)
        res.imageEndOffset = (highest + 1) * cs
        res.totalClusters = divRoundUp(Int64(header.size), cs)
        if !repair.isEmpty {
            try await file.flush()
            metadataClusters = nil
            l2Cache.removeAll()
            refCache.removeAll()
            if res.checkErrors == 0 && res.corruptions == 0 && header.version >= 3
                && header.incompatibleFeatures & (Qcow2.incompatDirty | Qcow2.incompatCorrupt) != 0 {
                header.incompatibleFeatures &= ~(Qcow2.incompatDirty | Qcow2.incompatCorrupt)
                try await writeIncompatibleFeaturesLocked()
                try await file.flush()
            }
        }
    }

    /// In-memory reference counts over the host clusters of the file.
    struct ReferenceCounter {
        var refs: [UInt32]
        mutating func add(_ cluster: Int64) {
            let i = Int(cluster)
            if i >= refs.count { refs += [UInt32](repeating: 0, count: i + 1 - refs.count) }
            if refs[i] < UInt32.max { refs[i] += 1 }
        }
        func get(_ cluster: Int64) -> UInt32 {
            Int(cluster) < refs.count && cluster >= 0 ? refs[Int(cluster)] : 0
        }
    }

    /// Counts a reference to every cluster of host bytes [offset, offset+size).
    private func countRange(_ c: inout ReferenceCounter, _ res: inout ImageCheckResult, _ offset: Int64, _ size: Int64) {
        guard size > 0 else { return }
        let fileLen = file.length
        if offset + size - fileLen >= Int64(geo.clusterSize) {
            res.messages.append("ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x\(String(offset, radix: 16)) size 0x\(String(size, radix: 16))")
            res.corruptions += 1
            return
        }
        let cs = Int64(geo.clusterSize)
        for cl in (offset / cs)...((offset + size - 1) / cs) { c.add(cl) }
    }

    private func calculateRefcounts(_ res: inout ImageCheckResult, _ rebuild: inout Bool) async throws(BlockError) -> ReferenceCounter {
        let cs = Int64(geo.clusterSize)
        let nb = Int(divRoundUp(file.length, cs))
        var c = ReferenceCounter(refs: [UInt32](repeating: 0, count: max(nb, 1)))
        res.allocatedClusters = 0
        res.fragmentedClusters = 0
        res.compressedClusters = 0
        countRange(&c, &res, 0, cs)
        try await countL1(&c, &res, Int64(header.l1TableOffset), Int(header.l1Size), active: true)
        for sn in snapshots {
            if sn.l1TableOffset % UInt64(cs) != 0 {
                res.messages.append("ERROR snapshot \(sn.id) (\(sn.name)) l1_offset=\(hex(sn.l1TableOffset)): L1 table is not cluster aligned; snapshot table entry corrupted")
                res.corruptions += 1
                continue
            }
            if Int64(sn.l1Size) > Qcow2.maxL1Bytes / 8 {
                res.messages.append("ERROR snapshot \(sn.id) (\(sn.name)) l1_size=\(hex(UInt64(sn.l1Size))): L1 table is too large; snapshot table entry corrupted")
                res.corruptions += 1
                continue
            }
            try await countL1(&c, &res, Int64(sn.l1TableOffset), Int(sn.l1Size), active: false)
        }
        if header.nbSnapshots > 0 {
            countRange(&c, &res, Int64(header.snapshotsOffset), Int64(snapshotTableBytes))
        }
        countRange(&c, &res, Int64(header.refcountTableOffset), Int64(refTable.count) * 8)
        try await countBitmaps(&c, &res)
        // Refcount blocks
        for (i, e) in refTable.enumerated() {
            let off = Int64(e & Qcow2.refTableOffsetMask)
            if e & 0x1ff != 0 {
                res.messages.append("ERROR refcount table entry \(i) has reserved bits set")
                res.corruptions += 1
                rebuild = true
                continue
            }
            if off % cs != 0 {
                res.messages.append("ERROR refcount block \(i) is not cluster aligned; refcount table entry corrupted")
                res.corruptions += 1
                rebuild = true
                continue
            }
            if off == 0 { continue }
            if off / cs >= Int64(nb) {
                res.messages.append("ERROR refcount block \(i) is outside image")
                res.corruptions += 1
                rebuild = true
                continue
            }
            countRange(&c, &res, off, cs)
            if c.get(off / cs) != 1 {
                res.messages.append("ERROR refcount block \(i) refcount=\(c.get(off / cs))")
                res.corruptions += 1
                rebuild = true
            }
        }
        return c
    }

    private func readTableRaw(_ offset: Int64, _ bytes: Int) async throws(BlockError) -> AlignedBuffer {
        let b = AlignedBuffer(count: bytes, zeroed: true)
        let avail = max(0, min(Int64(bytes), file.length - offset))
        if avail > 0 { try await file.read(at: offset, into: b.slice(0, Int(avail))) }
        return b
    }

    private func countL1(_ c: inout ReferenceCounter, _ res: inout ImageCheckResult, _ l1Offset: Int64, _ l1Size: Int,
                         active: Bool) async throws(BlockError) {
        let cs = Int64(geo.clusterSize)
        countRange(&c, &res, l1Offset, Int64(l1Size) * 8)
        guard l1Size > 0 else { return }
        let table: [UInt64]
        if active {
            table = l1
        } else {
            let b = try await readTableRaw(l1Offset, l1Size * 8)
            table = (0..<l1Size).map { b.be64($0) }
        }
        for e in table {
            let l2 = Int64(e & Qcow2.l1OffsetMask)
            if l2 == 0 { continue }
            // QEMU counts fragmentation within each L2 table.
            var nextContiguous: Int64 = 0
            countRange(&c, &res, l2, cs)
            if l2 % cs != 0 {
                res.messages.append("ERROR l2_offset=\(String(l2, radix: 16)): Table is not cluster aligned; L1 entry corrupted")
                res.corruptions += 1
            }
            let t = try await readTableRaw(l2, geo.clusterSize)
            for j in 0..<geo.l2Entries {
                let entry = t.l2Entry(j, geo)
                let bitmap = t.l2Bitmap(j, geo)
                if entry & Qcow2.oflagCompressed == 0 && entry & Qcow2.l2ReservedMask != 0 {
                    res.messages.append("ERROR found l2 entry with reserved bits set: \(String(entry, radix: 16))")
                    res.corruptions += 1
                }
                if entry & Qcow2.oflagCompressed != 0 {
                    if entry & Qcow2.oflagCopied != 0 {
                        res.messages.append("ERROR: coffset=0x\(String(entry & geo.compressedOffsetMask, radix: 16)): copied flag must never be set for compressed clusters")
                        res.corruptions += 1
                    }
                    if geo.extendedL2 && bitmap != 0 {
                        res.messages.append("ERROR compressed cluster \(j) with non-zero subcluster allocation bitmap, entry=0x\(String(entry & ~Qcow2.oflagCopied, radix: 16))")
                        res.corruptions += 1
                        continue
                    }
                    let (off, len) = geo.compressedRange(entry)
                    countRange(&c, &res, off, Int64(len))
                    if active {
                        res.allocatedClusters += 1
                        res.compressedClusters += 1
                        res.fragmentedClusters += 1
                    }
                    continue
                }
                let host = Int64(entry & Qcow2.l2OffsetMask)
                if host == 0 {
                    if geo.extendedL2 && bitmap & 0xffff_ffff != 0 {
                        res.messages.append("ERROR: l2_entry=\(String(entry, radix: 16)): Unallocated cluster has non-zero subcluster allocation bitmap")
                        res.corruptions += 1
                    }
                    continue
                }
                if geo.extendedL2 && (bitmap >> 32) & bitmap & 0xffff_ffff != 0 {
                    res.messages.append("ERROR offset=\(String(host, radix: 16)): Allocated cluster has corrupted subcluster allocation bitmap")
                    res.corruptions += 1
                }
                if host % cs != 0 {
                    res.corruptions += 1
                    let containsData = geo.extendedL2 ? bitmap & 0xffff_ffff != 0 : (geo.version < 3 || entry & Qcow2.oflagZero == 0)
                    res.messages.append("ERROR offset=\(String(host, radix: 16)): \(containsData ? "Data" : "Preallocated") cluster is not properly aligned; L2 entry corrupted.")
                }
                if active {
                    res.allocatedClusters += 1
                    if nextContiguous != 0 && host != nextContiguous { res.fragmentedClusters += 1 }
                    nextContiguous = host + cs
                }
                countRange(&c, &res, host, cs)
            }
        }
    }

    private func countBitmaps(_ c: inout ReferenceCounter, _ res: inout ImageCheckResult) async throws(BlockError) {
        guard header.autoclearFeatures & Qcow2.autoclearBitmaps != 0, let ext = header.bitmaps, ext.count > 0 else { return }
        let cs = Int64(geo.clusterSize)
        countRange(&c, &res, Int64(ext.directoryOffset), Int64(ext.directorySize))
        guard let dir = try? await readBitmapDirectory() else { return }
        for bm in dir {
            countRange(&c, &res, Int64(bm.tableOffset), Int64(bm.tableSize) * 8)
            let t = try await readTableRaw(Int64(bm.tableOffset), Int(bm.tableSize) * 8)
            for i in 0..<Int(bm.tableSize) {
                let e = t.be64(i)
                let off = Int64(e & 0x00ff_ffff_ffff_fe00)
                if off != 0 { countRange(&c, &res, off, cs) }
            }
        }
    }

    /// Stored refcount of a cluster for check: refcount blocks past the end
    /// of the file read as zeroes.
    private func storedRefcount(_ cluster: Int64) async throws(BlockError) -> UInt64 {
        let idx = cluster / refblockEntries
        guard idx < Int64(refTable.count) else { return 0 }
        let off = Int64(refTable[Int(idx)] & Qcow2.refTableOffsetMask)
        if off == 0 { return 0 }
        if off % Int64(geo.clusterSize) != 0 || refTable[Int(idx)] & 0x1ff != 0 {
            throw BlockError.io("Input/output error")
        }
        let b = try await refblock(at: off, index: idx)
        return RefcountCodec.get(b.pointer, Int(cluster % refblockEntries), order: geo.refcountOrder)
    }

    private func compareRefcounts(_ c: ReferenceCounter, _ res: inout ImageCheckResult, fix: ImageRepairMode,
                                  _ rebuild: inout Bool, _ highest: inout Int64) async throws(BlockError) {
        let nb = Int64(c.refs.count)
        highest = -1
        var i: Int64 = 0
        while i < nb {
            let stored: UInt64
            do throws(BlockError) {
                stored = try await storedRefcount(i)
            } catch {
                res.messages.append("Can't get refcount for cluster \(i): \(error.message)")
                res.checkErrors += 1
                i += 1
                continue
            }
            let computed = UInt64(c.get(i))
            if stored > 0 || computed > 0 { highest = i }
            if stored != computed {
                var fixed = false
                if stored == 0 {
                    rebuild = true
                } else if stored > computed && fix.contains(.leaks) {
                    fixed = true
                } else if stored < computed && fix.contains(.errors) {
                    fixed = true
                }
                let what = fixed ? "Repairing" : (stored < computed ? "ERROR" : "Leaked")
                res.messages.append("\(what) cluster \(i) refcount=\(stored) reference=\(computed)")
                if fixed {
                    do throws(BlockError) {
                        try await setRefcountRun(i, 1, computed)
                        if stored > computed { res.leaksFixed += 1 } else { res.corruptionsFixed += 1 }
                        i += 1
                        continue
                    } catch {}
                }
                if stored < computed { res.corruptions += 1 } else { res.leaks += 1 }
            }
            i += 1
        }
    }

    /// Writes fresh refcount blocks and a fresh refcount table describing
    /// `refs` (QEMU's rebuild_refcount_structure): blocks and table go into
    /// free clusters, the header switches with one write.
    private func rebuildRefcountStructure(_ c: inout ReferenceCounter) async throws(BlockError) {
        let cs = Int64(geo.clusterSize)
        let e = refblockEntries
        var firstFree: Int64 = 0
        // Never place the new structures over metadata the references could
        // not count (an L1 table past the end of the file, say).
        buildMetadataSet()
        let reserved = metadataClusters ?? []
        // Metadata past the end of the file was not counted; the new
        // structures may extend the file over it, so count it now.
        let fileClusters = divRoundUp(file.length, cs)
        for r in reserved where r >= fileClusters && c.get(r) == 0 { c.add(r) }
        func allocate(_ n: Int64, _ c: inout ReferenceCounter) -> Int64 {
            var start = firstFree
            while true {
                var ok = true
                for k in 0..<n where c.get(start + k) != 0 || reserved.contains(start + k) {
                    ok = false
                    start = start + k + 1
                    break
                }
                if ok { break }
            }
            for k in 0..<n { c.add(start + k) }
            if start == firstFree { firstFree = start + n }
            return start
        }
        var table: [UInt64] = []
        var tableOffset: Int64 = 0
        var tableClusters: Int64 = 0
        while true {
            // One refcount block for every block range that holds a reference.
            let nbBlocks = divRoundUp(Int64(c.refs.count), e)
            if Int64(table.count) < nbBlocks { table += [UInt64](repeating: 0, count: Int(nbBlocks) - table.count) }
            var changed = false
            for b in 0..<nbBlocks where table[Int(b)] == 0 {
                let lo = b * e
                let hi = min(Int64(c.refs.count), lo + e)
                if (lo..<hi).contains(where: { c.get($0) != 0 }) {
                    table[Int(b)] = UInt64(allocate(1, &c) * cs)
                    changed = true
                }
            }
            let needClusters = divRoundUp(Int64(max(table.count, 1)) * 8, cs)
            if needClusters > tableClusters {
                tableClusters = needClusters
                tableOffset = allocate(tableClusters, &c) * cs
                changed = true
            }
            // Allocating may have created references in block ranges without a block.
            let nbAfter = divRoundUp(Int64(c.refs.count), e)
            if !changed && nbAfter <= Int64(table.count) { break }
        }
        // Write the blocks.
        for (b, off) in table.enumerated() where off != 0 {
            let block = AlignedBuffer(count: geo.clusterSize, zeroed: true)
            let lo = Int64(b) * e
            for k in 0..<Int(e) {
                let v = c.get(lo + Int64(k))
                if v != 0 { RefcountCodec.set(block.pointer, k, order: geo.refcountOrder, UInt64(v)) }
            }
            try await file.write(at: Int64(off), from: UnsafeRawBufferPointer(block.bytes))
        }
        let tbuf = AlignedBuffer(count: Int(tableClusters * cs), zeroed: true)
        for (i, v) in table.enumerated() { tbuf.setBE64(i, v) }
        try await file.write(at: tableOffset, from: UnsafeRawBufferPointer(tbuf.bytes))
        try await file.flush()
        var hb = [UInt8](repeating: 0, count: 12)
        hb.putBE64(UInt64(tableOffset), 0)
        hb.putBE32(UInt32(tableClusters), 8)
        try await writeBytes(hb, at: 48)
        try await file.flush()
        header.refcountTableOffset = UInt64(tableOffset)
        header.refcountTableClusters = UInt32(tableClusters)
        refTable = [UInt64](repeating: 0, count: Int(tableClusters * cs / 8))
        for (i, v) in table.enumerated() { refTable[i] = v }
        refCache.removeAll()
        metadataClusters = nil
        freeClusterHint = 0
    }

    private func checkCopiedFlags(_ res: inout ImageCheckResult, repair mode: ImageRepairMode) async throws(BlockError) {
        let cs = Int64(geo.clusterSize)
        let repair: Bool
        if mode.contains(.errors) {
            repair = true
        } else if mode.contains(.leaks) {
            repair = res.checkErrors == 0 && res.corruptions == 0 && res.leaks == 0
        } else {
            repair = false
        }
        for (i, e) in l1.enumerated() {
            let l2 = Int64(e & Qcow2.l1OffsetMask)
            if l2 == 0 { continue }
            guard let rc = try? await storedRefcount(l2 / cs) else { continue }
            if (rc == 1) != (e & Qcow2.oflagCopied != 0) {
                res.corruptions += 1
                res.messages.append("\(repair ? "Repairing" : "ERROR") OFLAG_COPIED L2 cluster: l1_index=\(i) l1_entry=\(String(e, radix: 16)) refcount=\(rc)")
                if repair {
                    l1[i] = rc == 1 ? e | Qcow2.oflagCopied : e & ~Qcow2.oflagCopied
                    try await writeL1EntryLocked(i)
                    res.corruptions -= 1
                    res.corruptionsFixed += 1
                }
            }
            let t = try await readTableRaw(l2, geo.clusterSize)
            var dirty = 0
            for j in 0..<geo.l2Entries {
                let entry = t.l2Entry(j, geo)
                if entry & Qcow2.oflagCompressed != 0 { continue }
                let host = Int64(entry & Qcow2.l2OffsetMask)
                if host == 0 { continue }
                guard let drc = try? await storedRefcount(host / cs) else { continue }
                if (drc == 1) != (entry & Qcow2.oflagCopied != 0) {
                    res.corruptions += 1
                    res.messages.append("\(repair ? "Repairing" : "ERROR") OFLAG_COPIED data cluster: l2_entry=\(String(entry, radix: 16)) refcount=\(drc)")
                    if repair {
                        t.setL2Entry(j, geo, drc == 1 ? entry | Qcow2.oflagCopied : entry & ~Qcow2.oflagCopied)
                        dirty += 1
                    }
                }
            }
            if dirty > 0 {
                try await file.write(at: l2, from: UnsafeRawBufferPointer(t.bytes))
                l2Cache.remove(l2)
                res.corruptions -= dirty
                res.corruptionsFixed += dirty
            }
        }
    }
}
