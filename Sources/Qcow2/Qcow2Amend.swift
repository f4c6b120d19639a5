import BlockCore
import BlockGraph

/// The operations behind `qemu-img amend` for qcow2 (QEMU's
/// qcow2_amend_options): version upgrade and downgrade, refcount width,
/// lazy refcounts. Each runs with the image otherwise idle (the tool is its
/// only user) and keeps it consistent at every instant: new structures are
/// written and flushed before the single header write that makes them live,
/// old ones are released only after it (a crash leaves at worst leaks).
///
/// `progress(done, total)` reports the operation's own work units, the
/// ones QEMU's amend status callback receives.
extension Qcow2Image {
    /// Settles everything a running image keeps in flight: cached L2 tables
    /// written, the cluster reserve returned, deferred frees applied.
    func settleForAmendLocked() async throws(BlockError) {
        if closed { throw BlockError(.io, errno: 5, "Image is closed") }
        try await writebackL2Locked()
        try await releaseReserveLocked()
        try await file.flush()
        try await applyFreesLocked(durable: true, force: true)
        try await barrier()
        l2Cache.removeAll()
        compressedFreeByte = 0
    }

    /// QEMU's qcow2_update_header, as amend calls it between its steps.
    public func amendRewriteHeader() async throws(BlockError) {
        try await lock.withLock { () async throws(BlockError) in
            do throws(BlockError) {
                try await writeHeaderLocked()
            } catch {
                throw error.prefixed("Failed to update the image header: ")
            }
        }
    }

    // MARK: - Upgrade (v2 -> v3)

    public func amendUpgrade(progress: (Int64, Int64) -> Void) async throws(BlockError) {
        try await lock.withLock { () async throws(BlockError) in
            guard header.version < 3 else { return }
            try await settleForAmendLocked()
            progress(0, 2)
            // v3 requires every snapshot to record its disk size and 64-bit VM state size.
            if snapshots.contains(where: { $0.extraData.count < 16 }) {
                do throws(BlockError) {
                    try await rewriteSnapshotTableLocked()
                } catch {
                    throw error.prefixed("Failed to update the snapshot table: ")
                }
            }
            progress(1, 2)
            let old = header
            header.version = 3
            header.headerLength = UInt32(Qcow2.v3HeaderLength)
            header.refcountOrder = 4
            header.incompatibleFeatures = 0
            header.compatibleFeatures = 0
            header.autoclearFeatures = 0
            header.compressionType = 0
            header.unknownHeaderFields = []
            if !header.extensions.contains(where: { $0.type == Qcow2.extFeatureTable }) {
                header.extensions.append(Qcow2Header.standardFeatureTable())
            }
            do throws(BlockError) {
                try await writeHeaderLocked()
                try await barrier()
            } catch {
                header = old
                throw error.prefixed("Failed to update the header: ")
            }
            geo = Qcow2Geometry(header: header)
            progress(2, 2)
        }
    }

    /// Writes the snapshot table anew (every entry with at least the v3
    /// extra data) to freshly allocated clusters, switches the header to
    /// it in one write, then frees the old table.
    func rewriteSnapshotTableLocked() async throws(BlockError) {
        var list = snapshots
        for i in list.indices where list[i].extraData.count < 24 {
            var sn = list[i]
            var extra = [UInt8](repeating: 0, count: 24)
            extra.putBE64(sn.vmStateSize, 0)
            extra.putBE64(sn.diskSize ?? header.size, 8)
            extra.putBE64(sn.icount ?? UInt64.max, 16)
            sn.extraData = extra
            sn.diskSize = sn.diskSize ?? header.size
            sn.icount = sn.icount ?? UInt64.max
            list[i] = sn
        }
        try await writeSnapshotTableLocked(list)
    }

    // MARK: - Refcount width

    /// The first refcount that does not fit in 2^order bits, as QEMU
    /// reports it (with the refcount table index where it is found and the
    /// table's size, for the progress QEMU shows until then); nil if all
    /// fit. Changes nothing.
    public func amendRefcountWidthProblem(order: Int) async throws(BlockError)
        -> (reftableIndex: Int64, reftableSize: Int64, message: String)? {
        try await lock.withLock { () async throws(BlockError) in
            let (_, failure) = try await collectRefcountsLocked(newOrder: order)
            guard let f = failure else { return nil }
            return (f.cluster / refblockEntries, Int64(refTable.count), refcountWidthMessage(order, f))
        }
    }

    func refcountWidthMessage(_ order: Int, _ f: (cluster: Int64, value: UInt64)) -> String {
        "Cannot decrease refcount entry width to \(1 << order) bits: Cluster at offset \(hex(f.cluster * Int64(geo.clusterSize))) has a refcount of \(f.value)"
    }

    /// Every refcount (index = cluster), trimmed after the last nonzero
    /// one; or the first that does not fit in the new width.
    func collectRefcountsLocked(newOrder: Int) async throws(BlockError) -> ([UInt64], (cluster: Int64, value: UInt64)?) {
        let cs = Int64(geo.clusterSize)
        let e = Int(refblockEntries)
        let newMax = RefcountCodec.maxValue(order: newOrder)
        var counts: [UInt64] = []
        for (idx, entry) in refTable.enumerated() {
            let off = Int64(entry & Qcow2.refTableOffsetMask)
            if off == 0 { continue }
            if off % cs != 0 {
                _ = await corruption("Refblock offset \(hex(off)) unaligned (reftable index: \(hex(Int64(idx))))")
                throw BlockError(.corrupt, errno: 5, "Image is corrupt (unaligned refblock offset)")
            }
            let b = try await refblock(at: off, index: Int64(idx))
            for i in 0..<e {
                let v = RefcountCodec.get(b.pointer, i, order: geo.refcountOrder)
                if v == 0 { continue }
                let c = idx * e + i
                if v > newMax { return (counts, (Int64(c), v)) }
                if c >= counts.count { counts += [UInt64](repeating: 0, count: c + 1 - counts.count) }
                counts[c] = v
            }
        }
        return (counts, nil)
    }

    /// QEMU's qcow2_change_refcount_order: new refcount blocks and table in
    /// the new width, placed past every allocated cluster, written and
    /// flushed; then one header write switches refcount_order and the table
    /// pointer; then the old blocks and table are freed.
    public func amendChangeRefcountOrder(_ order: Int, progress: (Int64, Int64) -> Void) async throws(BlockError) {
        try await lock.withLock { () async throws(BlockError) in
            precondition(header.version >= 3 && (0...6).contains(order))
            if order == geo.refcountOrder { return }
            try await settleForAmendLocked()
            let cs = Int64(geo.clusterSize)
            // QEMU walks the old table three times (two allocation passes and
            // one writing pass), reporting each table entry.
            let n = Int64(refTable.count)
            func walk(_ w: Int64) {
                for i in 0..<n { progress(w * n + i, 3 * n) }
                progress((w + 1) * n, 3 * n)
            }
            var (counts, failure) = try await collectRefcountsLocked(newOrder: order)
            if let f = failure { throw BlockError(.invalidArgument, errno: 22, refcountWidthMessage(order, f)) }
            walk(0)
            walk(1)
            let areaStart = Int64(counts.count)
            let newE = cs * 8 / Int64(1 << order)
            var used = Set<Int64>()
            for (c, v) in counts.enumerated() where v != 0 { used.insert(Int64(c) / newE) }
            // Blocks (B) and table clusters (T) describing themselves too.
            var b = Int64(0)
            var t = Int64(1)
            var blocks: [Int64] = []
            var iterations = 0
            while true {
                iterations += 1
                var all = used
                for i in (areaStart / newE)...((areaStart + b + t - 1) / newE) { all.insert(i) }
                let maxIndex = all.max() ?? 0
                let entries = alignUp(maxIndex + 1, cs / 8)
                if entries * 8 > Qcow2.maxRefTableBytes {
                    throw BlockError(.notSupported, errno: 95,
                                     "This operation would make the refcount table grow beyond the maximum size supported by QEMU, aborting")
                }
                let newT = entries * 8 / cs
                let newB = Int64(all.count)
                if newB == b && newT == t {
                    blocks = all.sorted()
                    break
                }
                if iterations > 64 {
                    b = max(b, newB)
                    t = max(t, newT)
                    if newB <= b && newT <= t { blocks = all.sorted(); break }
                } else {
                    b = newB
                    t = newT
                }
            }
            // Clusters of the new area (any unused block cluster stays allocated: a leak at worst).
            counts += [UInt64](repeating: 1, count: Int(b + t))
            let tableOffset = (areaStart + b) * cs
            let tableEntries = Int(t * cs / 8)
            var newTable = [UInt64](repeating: 0, count: tableEntries)
            for (j, bi) in blocks.enumerated() { newTable[Int(bi)] = UInt64((areaStart + Int64(j)) * cs) }
            // Write the blocks.
            let blockBuf = AlignedBuffer(count: Int(cs))
            for (j, bi) in blocks.enumerated() {
                blockBuf.zero()
                let first = bi * newE
                let last = min(first + newE, Int64(counts.count))
                if first < last {
                    for c in first..<last where counts[Int(c)] != 0 {
                        RefcountCodec.set(blockBuf.pointer, Int(c - first), order: order, counts[Int(c)])
                    }
                }
                try await file.write(at: (areaStart + Int64(j)) * cs, from: UnsafeRawBufferPointer(blockBuf.bytes))
            }
            if Int64(blocks.count) < b {
                // Unused block clusters: keep them zeroed (they are counted as allocated).
                blockBuf.zero()
                for j in Int64(blocks.count)..<b {
                    try await file.write(at: (areaStart + j) * cs, from: UnsafeRawBufferPointer(blockBuf.bytes))
                }
            }
            let tbuf = AlignedBuffer(count: Int(t * cs), zeroed: true)
            for (i, v) in newTable.enumerated() where v != 0 { tbuf.setBE64(i, v) }
            try await file.write(at: tableOffset, from: UnsafeRawBufferPointer(tbuf.bytes))
            try await barrier()
            // The switch: one header write.
            let old = header
            let oldTable = refTable
            header.refcountOrder = UInt32(order)
            header.refcountTableOffset = UInt64(tableOffset)
            header.refcountTableClusters = UInt32(t)
            do throws(BlockError) {
                try await writeHeaderLocked()
                try await barrier()
            } catch {
                header = old
                throw error.prefixed("Failed to update the qcow2 header: ")
            }
            geo = Qcow2Geometry(header: header)
            refTable = newTable
            refCache.removeAll()
            metadataClusters = nil
            freeClusterHint = 0
            for i in 0..<n { progress(2 * n + i, 3 * n) }
            // Release the old structures (a crash before this leaves leaks).
            for e in oldTable where e & Qcow2.refTableOffsetMask != 0 {
                try await changeRefcount(Int64(e & Qcow2.refTableOffsetMask) / cs, by: -1)
            }
            let oldTableCluster = Int64(old.refcountTableOffset) / cs
            for c in oldTableCluster..<(oldTableCluster + Int64(old.refcountTableClusters)) {
                try await changeRefcount(c, by: -1)
            }
            try await barrier()
            progress(3 * n, 3 * n)
        }
    }

    // MARK: - Lazy refcounts

    public func amendSetLazyRefcounts(_ on: Bool) async throws(BlockError) {
        try await lock.withLock { () async throws(BlockError) in
            if on == header.lazyRefcounts { return }
            if !on {
                do throws(BlockError) {
                    try await settleForAmendLocked()
                    try await markCleanLocked()
                } catch {
                    throw error.prefixed("Failed to make the image clean: ")
                }
            }
            let old = header
            if on {
                header.compatibleFeatures |= Qcow2.compatLazyRefcounts
            } else {
                header.compatibleFeatures &= ~Qcow2.compatLazyRefcounts
            }
            do throws(BlockError) {
                try await writeHeaderLocked()
            } catch {
                header = old
                throw error.prefixed("Failed to update the image header: ")
            }
        }
    }

    /// QEMU's qcow2_mark_clean: flush, then clear the dirty bit.
    func markCleanLocked() async throws(BlockError) {
        guard header.isDirty else { return }
        try await file.flush()
        header.incompatibleFeatures &= ~Qcow2.incompatDirty
        try await writeIncompatibleFeaturesLocked()
        try await file.flush()
        markedDirty = false
    }

    // MARK: - Downgrade (v3 -> v2)

    /// The refusals of QEMU's qcow2_downgrade, in its order, checked
    /// before anything changes. `size` and `refcountOrder` are the values
    /// the image will have when the downgrade runs.
    public func amendCheckDowngrade(size: Int64, refcountOrder: Int) async throws(BlockError) {
        try await lock.withLock { () async throws(BlockError) in
            if refcountOrder != 4 {
                throw BlockError(.notSupported, errno: 95, "compat=0.10 requires refcount_bits=16")
            }
            if header.incompatibleFeatures & Qcow2.incompatDataFile != 0 {
                throw BlockError(.notSupported, errno: 95, "Cannot downgrade an image with a data file")
            }
            for sn in snapshots where sn.vmStateSize > UInt64(UInt32.max) || (sn.diskSize ?? header.size) != UInt64(size) {
                throw BlockError(.notSupported, errno: 95, "Internal snapshots prevent downgrade of image")
            }
            let others = header.incompatibleFeatures & ~(Qcow2.incompatCompression | Qcow2.incompatDirty)
            if others != 0 {
                throw BlockError(.notSupported, errno: 95,
                                 "Cannot downgrade an image with incompatible features 0x\(String(others, radix: 16)) set")
            }
            if header.incompatibleFeatures & Qcow2.incompatCompression != 0 {
                if try await hasCompressedClustersLocked() {
                    throw BlockError(.notSupported, errno: 95,
                                     "Cannot downgrade an image with zstd compression type and existing compressed clusters")
                }
            }
        }
    }

    /// Whether the active L2 tables map any compressed cluster.
    func hasCompressedClustersLocked() async throws(BlockError) -> Bool {
        try await writebackL2Locked()
        let cs = geo.clusterSize
        let buf = AlignedBuffer(count: cs)
        for e in l1 {
            let off = Int64(e & Qcow2.l1OffsetMask)
            if off == 0 { continue }
            try await file.read(at: off, into: buf.bytes)
            for j in 0..<geo.l2Entries where buf.be64(j * (geo.l2EntrySize / 8)) & Qcow2.oflagCompressed != 0 {
                return true
            }
        }
        return false
    }

    /// QEMU's qcow2_downgrade to version 2 (after amendCheckDowngrade):
    /// clean, zero clusters expanded, then the v2 header in one write.
    public func amendDowngrade(progress: (Int64, Int64) -> Void) async throws(BlockError) {
        try await lock.withLock { () async throws(BlockError) in
            guard header.version >= 3 else { return }
            try await settleForAmendLocked()
            do throws(BlockError) {
                try await markCleanLocked()
            } catch {
                throw error.prefixed("Failed to make the image clean: ")
            }
            do throws(BlockError) {
                try await expandZeroClustersLocked(progress: progress)
            } catch {
                throw error.prefixed("Failed to turn zero into data clusters: ")
            }
            let old = header
            header.version = 2
            header.headerLength = UInt32(Qcow2.v2HeaderLength)
            header.incompatibleFeatures = 0
            header.compatibleFeatures = 0
            header.autoclearFeatures = 0
            header.compressionType = 0
            header.unknownHeaderFields = []
            header.extensions.removeAll { $0.type == Qcow2.extFeatureTable }
            do throws(BlockError) {
                try await writeHeaderLocked()
                try await barrier()
            } catch {
                header = old
                throw error.prefixed("Failed to update the image header: ")
            }
            geo = Qcow2Geometry(header: header)
        }
    }

    /// QEMU's qcow2_expand_zero_clusters: v2 has no zero flag, so every
    /// zero cluster of the active and the snapshot L2 tables becomes
    /// unallocated (no backing file) or a zero-filled data cluster.
    func expandZeroClustersLocked(progress: (Int64, Int64) -> Void) async throws(BlockError) {
        var total = Int64(l1.count)
        for sn in snapshots { total += Int64(sn.l1Size) }
        var visited: Int64 = 0
        try await expandZeroClusters(inL1: l1, visited: &visited, total: total, progress: progress)
        for sn in snapshots {
            var table = [UInt64](repeating: 0, count: Int(sn.l1Size))
            if sn.l1Size > 0 {
                try await Qcow2Image.readTable(file, Int64(sn.l1TableOffset), &table, what: "snapshot L1 table")
            }
            try await expandZeroClusters(inL1: table, visited: &visited, total: total, progress: progress)
        }
        try await releaseReserveLocked()
        try await barrier()
    }

    private func expandZeroClusters(inL1 table: [UInt64], visited: inout Int64, total: Int64,
                                    progress: (Int64, Int64) -> Void) async throws(BlockError) {
        let cs = Int64(geo.clusterSize)
        let hasBacking = header.backingFile != nil
        let l2 = AlignedBuffer(count: Int(cs))
        var zeroes: AlignedBuffer?
        for (i, e) in table.enumerated() {
            defer {
                visited += 1
                progress(visited, total)
            }
            let l2Offset = Int64(e & Qcow2.l1OffsetMask)
            if l2Offset == 0 { continue }
            if l2Offset % cs != 0 {
                throw await corruption("L2 table offset \(hex(l2Offset)) unaligned (L1 index: \(hex(Int64(i))))")
            }
            let l2Refcount = try await refcount(l2Offset / cs)
            try await file.read(at: l2Offset, into: l2.bytes)
            var dirty = false
            for j in 0..<geo.l2Entries {
                let entry = l2.be64(j)
                if entry & Qcow2.oflagCompressed != 0 || entry & Qcow2.oflagZero == 0 { continue }
                var host = Int64(entry & Qcow2.l2OffsetMask)
                var copied: Bool
                if host == 0 {
                    if !hasBacking {
                        l2.setBE64(j, 0)
                        dirty = true
                        continue
                    }
                    let (c, _) = try await allocateClusters(1)
                    if l2Refcount > 1 { try await changeRefcount(c, by: Int64(l2Refcount) - 1) }
                    host = c * cs
                    copied = l2Refcount == 1
                } else {
                    if host % cs != 0 {
                        throw await corruption("Cluster allocation offset \(hex(host)) unaligned (L2 offset: \(hex(l2Offset)), L2 index: \(hex(Int64(j))))")
                    }
                    try await checkOverlap(host, cs)
                    copied = try await refcount(host / cs) == 1
                }
                if zeroes == nil { zeroes = AlignedBuffer(count: Int(cs), zeroed: true) }
                try await file.write(at: host, from: UnsafeRawBufferPointer(zeroes!.bytes))
                l2.setBE64(j, UInt64(host) | (copied ? Qcow2.oflagCopied : 0))
                dirty = true
            }
            if dirty {
                // Zeroes and refcounts first, then the table that uses them.
                try await barrier()
                refcountsNeedSync = false
                try await file.write(at: l2Offset, from: UnsafeRawBufferPointer(l2.bytes))
                l2Cache.removeAll()
            }
        }
    }
}
