import BlockCore
import BlockGraph

/// What `check` found (QEMU's BdrvCheckResult + BlockFragInfo).
public struct Qcow2CheckResult: Sendable {
    public var corruptions = 0
    public var leaks = 0
    public var checkErrors = 0
    public var corruptionsFixed = 0
    public var leaksFixed = 0
    public var imageEndOffset: Int64 = 0
    public var totalClusters: Int64 = 0
    public var allocatedClusters: Int64 = 0
    public var fragmentedClusters: Int64 = 0
    public var compressedClusters: Int64 = 0
    /// Diagnostics in the order QEMU prints them (to stderr).
    public var messages: [String] = []
    public init() {}
}

public struct Qcow2RepairMode: OptionSet, Sendable {
    public let rawValue: Int
    public init(rawValue: Int) { self.rawValue = rawValue }
    public static let leaks = Qcow2RepairMode(rawValue: 1)
    public static let errors = Qcow2RepairMode(rawValue: 2)
}

extension Qcow2Image {
    /// Checks (and optionally repairs) refcounts and the COPIED flags.
    public func check(repair: Qcow2RepairMode = []) async throws(BlockError) -> Qcow2CheckResult {
        await lock.lock()
        defer { lock.unlock() }
        return try await checkLocked(repair: repair)
    }

    func checkLocked(repair: Qcow2RepairMode) async throws(BlockError) -> Qcow2CheckResult {
        var res = Qcow2CheckResult()
        if !repair.isEmpty && options.readOnly {
            throw BlockError(.permissionDenied, errno: 1, "Cannot repair a read-only image")
        }
        // Leftover reservations are not references; give them back first.
        if !repair.isEmpty {
            try await releaseReserveLocked()
            try await applyFreesLocked(durable: true, force: true)
        }
        var counter = try await computeReferences(&res)
        try await compareRefcounts(&counter, &res, repair: repair)
        try await checkCopiedFlags(&res, repair: repair)
        res.totalClusters = divRoundUp(Int64(header.size), Int64(geo.clusterSize))
        if !repair.isEmpty && res.corruptions == res.corruptionsFixed && res.leaks == res.leaksFixed && header.isDirty {
            header.incompatibleFeatures &= ~Qcow2.incompatDirty
            try await writeIncompatibleFeaturesLocked()
            try await file.flush()
        }
        if !repair.isEmpty {
            try await file.flush()
            metadataClusters = nil
            refCache.removeAll()
        }
        return res
    }

    /// Reference counter over host clusters.
    struct ReferenceCounter {
        var refs: [UInt32]
        let clusterBits: Int
        mutating func add(_ cluster: Int64) {
            let i = Int(cluster)
            if i >= refs.count { refs += [UInt32](repeating: 0, count: max(i + 1 - refs.count, refs.count / 2)) }
            if refs[i] < UInt32.max { refs[i] += 1 }
        }
        func get(_ cluster: Int64) -> UInt32 {
            Int(cluster) < refs.count ? refs[Int(cluster)] : 0
        }
    }

    /// Counts a reference to every cluster of host bytes [offset, offset+size).
    private func countRange(_ c: inout ReferenceCounter, _ res: inout Qcow2CheckResult, _ offset: Int64, _ size: Int64) {
        guard size > 0 else { return }
        let fileLen = file.length
        if offset + size - fileLen >= Int64(geo.clusterSize) {
            res.messages.append("ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset \(hex(offset)) size \(hex(size))")
            res.corruptions += 1
            return
        }
        let cs = Int64(geo.clusterSize)
        for cl in (offset / cs)...((offset + size - 1) / cs) { c.add(cl) }
    }

    private func computeReferences(_ res: inout Qcow2CheckResult) async throws(BlockError) -> ReferenceCounter {
        let cs = Int64(geo.clusterSize)
        let nb = Int(divRoundUp(file.length, cs))
        var c = ReferenceCounter(refs: [UInt32](repeating: 0, count: max(nb, 1)), clusterBits: geo.clusterBits)
        // Header
        countRange(&c, &res, 0, cs)
        // Active L1 and everything below it, with fragmentation info.
        try await countL1(&c, &res, Int64(header.l1TableOffset), Int(header.l1Size), active: true)
        // Snapshots
        for sn in snapshots {
            try await countL1(&c, &res, Int64(sn.l1TableOffset), Int(sn.l1Size), active: false)
        }
        if header.nbSnapshots > 0 {
            countRange(&c, &res, Int64(header.snapshotsOffset), Int64(snapshotTableBytes))
        }
        // Refcount table
        countRange(&c, &res, Int64(header.refcountTableOffset), Int64(header.refcountTableClusters) * cs)
        // Bitmaps
        try await countBitmaps(&c, &res)
        // Refcount blocks
        for (i, e) in refTable.enumerated() {
            let off = Int64(e & Qcow2.refTableOffsetMask)
            if off == 0 { continue }
            if off % cs != 0 {
                res.messages.append("ERROR refcount block \(i) is not cluster aligned; refcount table entry corrupted")
                res.corruptions += 1
                continue
            }
            if off >= file.length {
                res.messages.append("ERROR refcount block \(i) is outside image")
                res.corruptions += 1
                continue
            }
            c.add(off / cs)
        }
        return c
    }

    private func readTableRaw(_ offset: Int64, _ bytes: Int) async throws(BlockError) -> AlignedBuffer {
        let b = AlignedBuffer(count: bytes, zeroed: true)
        let avail = max(0, min(Int64(bytes), file.length - offset))
        if avail > 0 { try await file.read(at: offset, into: b.slice(0, Int(avail))) }
        return b
    }

    private func countL1(_ c: inout ReferenceCounter, _ res: inout Qcow2CheckResult, _ l1Offset: Int64, _ l1Size: Int,
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
        var nextContiguous: Int64 = 0
        for (i, e) in table.enumerated() {
            let l2 = Int64(e & Qcow2.l1OffsetMask)
            if l2 == 0 { continue }
            countRange(&c, &res, l2, cs)
            if l2 % cs != 0 {
                res.messages.append("ERROR l2_offset=\(String(l2, radix: 16)): Table is not cluster aligned; L1 entry corrupted")
                res.corruptions += 1
                continue
            }
            _ = i
            let t = try await readTableRaw(l2, geo.clusterSize)
            for j in 0..<geo.l2Entries {
                let entry = t.l2Entry(j, geo)
                let bitmap = t.l2Bitmap(j, geo)
                if entry & Qcow2.oflagCompressed != 0 {
                    if entry & Qcow2.oflagCopied != 0 {
                        res.messages.append("ERROR: coffset=0x\(String(entry & geo.compressedOffsetMask, radix: 16)): copied flag must never be set for compressed clusters")
                        res.corruptions += 1
                    }
                    if geo.extendedL2 && bitmap != 0 {
                        res.messages.append("ERROR compressed cluster \(j) with non-zero subcluster allocation bitmap, entry=0x\(String(entry, radix: 16))")
                        res.corruptions += 1
                    }
                    if active {
                        res.allocatedClusters += 1
                        res.compressedClusters += 1
                    }
                    let (off, len) = geo.compressedRange(entry)
                    countRange(&c, &res, off & ~511, Int64(len) + (off & 511))
                    continue
                }
                let host = Int64(entry & Qcow2.l2OffsetMask)
                if geo.extendedL2 && (bitmap >> 32) & bitmap & 0xffff_ffff != 0 {
                    res.messages.append("ERROR invalid cluster entry 0x\(String(entry, radix: 16)), subcluster bitmap 0x\(String(bitmap, radix: 16))")
                    res.corruptions += 1
                }
                if host == 0 { continue }
                if active {
                    res.allocatedClusters += 1
                    if host != nextContiguous { res.fragmentedClusters += 1 }
                    nextContiguous = host + cs
                }
                if host % cs != 0 {
                    res.messages.append("ERROR offset=\(String(host, radix: 16)): Cluster is not properly aligned; L2 entry corrupted")
                    res.corruptions += 1
                    continue
                }
                countRange(&c, &res, host, cs)
            }
        }
    }

    private func countBitmaps(_ c: inout ReferenceCounter, _ res: inout Qcow2CheckResult) async throws(BlockError) {
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

    private func compareRefcounts(_ c: inout ReferenceCounter, _ res: inout Qcow2CheckResult,
                                  repair: Qcow2RepairMode) async throws(BlockError) {
        let cs = Int64(geo.clusterSize)
        let nbStored = Int64(refTable.count) * refblockEntries
        let limit = max(Int64(c.refs.count), min(nbStored, divRoundUp(file.length, cs)))
        var highest: Int64 = -1
        var i: Int64 = 0
        while i < limit {
            // Skip whole missing refcount blocks with nothing referenced quickly.
            let stored: UInt64
            do throws(BlockError) {
                stored = try await refcount(i)
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
                if stored > computed && repair.contains(.leaks) {
                    fixed = true
                } else if stored < computed && repair.contains(.errors) {
                    fixed = true
                }
                let what = fixed ? "Repairing" : (stored < computed ? "ERROR" : "Leaked")
                res.messages.append("\(what) cluster \(i) refcount=\(stored) reference=\(computed)")
                if fixed {
                    do throws(BlockError) {
                        try await ensureRefblock(i / refblockEntries)
                        // A new refcount block may itself have taken a cluster: recount it.
                        try await setRefcountRun(i, 1, computed)
                        if stored > computed { res.leaksFixed += 1 } else { res.corruptionsFixed += 1 }
                    } catch {
                        res.messages.append("ERROR could not fix cluster \(i): \(error.message)")
                        res.checkErrors += 1
                    }
                }
                if stored < computed { res.corruptions += 1 } else { res.leaks += 1 }
            }
            i += 1
        }
        res.imageEndOffset = (highest + 1) * cs
    }

    private func checkCopiedFlags(_ res: inout Qcow2CheckResult, repair: Qcow2RepairMode) async throws(BlockError) {
        let cs = Int64(geo.clusterSize)
        for (i, e) in l1.enumerated() {
            let l2 = Int64(e & Qcow2.l1OffsetMask)
            if l2 == 0 || l2 % cs != 0 { continue }
            let rc = (try? await refcount(l2 / cs)) ?? 0
            if (rc == 1) != (e & Qcow2.oflagCopied != 0) {
                let fix = repair.contains(.errors)
                res.messages.append("\(fix ? "Repairing" : "ERROR") OFLAG_COPIED L2 cluster: l1_index=\(i) l1_entry=\(String(e, radix: 16)) refcount=\(rc)")
                res.corruptions += 1
                if fix {
                    l1[i] = rc == 1 ? e | Qcow2.oflagCopied : e & ~Qcow2.oflagCopied
                    try await writeL1EntryLocked(i)
                    res.corruptionsFixed += 1
                }
            }
            let t = try await readTableRaw(l2, geo.clusterSize)
            var dirty = false
            for j in 0..<geo.l2Entries {
                let entry = t.l2Entry(j, geo)
                if entry & Qcow2.oflagCompressed != 0 { continue }
                let host = Int64(entry & Qcow2.l2OffsetMask)
                if host == 0 || host % cs != 0 { continue }
                let drc = (try? await refcount(host / cs)) ?? 0
                if (drc == 1) != (entry & Qcow2.oflagCopied != 0) {
                    let fix = repair.contains(.errors)
                    res.messages.append("\(fix ? "Repairing" : "ERROR") OFLAG_COPIED data cluster: l2_entry=\(String(entry, radix: 16)) refcount=\(drc)")
                    res.corruptions += 1
                    if fix {
                        t.setL2Entry(j, geo, drc == 1 ? entry | Qcow2.oflagCopied : entry & ~Qcow2.oflagCopied)
                        dirty = true
                        res.corruptionsFixed += 1
                    }
                }
            }
            if dirty {
                try await file.write(at: l2, from: UnsafeRawBufferPointer(t.bytes))
                l2Cache.remove(l2)
            }
        }
    }
}
