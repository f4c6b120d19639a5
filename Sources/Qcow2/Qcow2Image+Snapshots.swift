import BlockCore
import BlockGraph

/// Internal snapshots: create, apply (goto) and delete, with QEMU 7.2's
/// on-disk results (block/qcow2-snapshot.c).
///
/// Crash safety (kill -9): every refcount increment is written (and
/// flushed) before anything that makes the new reference live, and every
/// decrement comes after the write that removed the reference, so a crash
/// leaves at worst leaked clusters. The one window QEMU has too stays: a
/// crash between a refcount change and the matching OFLAG_COPIED update of
/// the active tables leaves flags that `check` reports (harmless for the
/// data: a set flag on a cluster no live snapshot shares yet, or a cleared
/// flag on an unshared cluster, which is just copied on its next write);
/// `check -r all` rewrites them.
extension Qcow2Image {
    /// Size of the known extra data QEMU 7.2 writes: vm_state_size_large,
    /// disk_size, icount.
    static let snapshotExtraSize = 24
    /// QCOW_MAX_SNAPSHOTS_SIZE.
    static let maxSnapshotTableBytes = 64 << 20

    // MARK: - Public API

    /// Creates an internal snapshot of the active state (QEMU
    /// qcow2_snapshot_create); the id is the next free number.
    @discardableResult
    public func createSnapshot(name: String, dateSec: UInt32, dateNsec: UInt32, vmClockNsec: UInt64 = 0,
                               icount: UInt64 = 0) async throws(BlockError) -> Qcow2Snapshot {
        try await withSnapshotLock { () async throws(BlockError) -> Qcow2Snapshot in
            try await createSnapshotLocked(name: name, dateSec: dateSec, dateNsec: dateNsec,
                                           vmClockNsec: vmClockNsec, icount: icount)
        }
    }

    /// Makes snapshot `idOrName` (matched by id first, then by name) the
    /// active state (QEMU qcow2_snapshot_goto). Not found: errno ENOENT.
    public func applySnapshot(_ idOrName: String) async throws(BlockError) {
        try await withSnapshotLock { () async throws(BlockError) in
            guard let i = snapshots.firstIndex(where: { $0.id == idOrName })
                ?? snapshots.firstIndex(where: { $0.name == idOrName }) else {
                throw BlockError(.notFound, errno: 2, "No such file or directory")
            }
            try await applySnapshotLocked(i)
        }
    }

    /// Deletes the snapshot with this id and name (QEMU
    /// qcow2_snapshot_delete). Not found: "Can't find the snapshot".
    public func deleteSnapshot(id: String, name: String) async throws(BlockError) {
        try await withSnapshotLock { () async throws(BlockError) in
            guard let i = snapshots.firstIndex(where: { $0.id == id && $0.name == name }) else {
                throw BlockError(.notFound, errno: 2, "Can't find the snapshot")
            }
            try await deleteSnapshotLocked(i)
        }
    }

    /// Runs `body` with the metadata lock held and no guest request in
    /// flight, after the dirty cached L2 tables were written back (the
    /// snapshot code writes through and keeps the cache clean).
    private func withSnapshotLock<T>(_ body: () async throws(BlockError) -> T) async throws(BlockError) -> T {
        if isReadOnly { throw BlockError(.permissionDenied, errno: 1, "Operation not permitted") }
        await ioGate.waitIdle()
        await lock.lock()
        defer { lock.unlock() }
        if header.isCorrupt { throw BlockError(.corrupt, errno: 5, "qcow2: Image is corrupt; cannot be written to") }
        if closed { throw BlockError(.io, errno: 5, "Image is closed") }
        if header.incompatibleFeatures & Qcow2.incompatDataFile != 0 {
            throw BlockError(.notSupported, errno: 95, "Operation not supported")
        }
        try await writebackL2Locked()
        // Deferred frees first: their clusters must not be counted twice.
        if !pendingFrees.isEmpty {
            try await barrier()
            try await applyFreesLocked(durable: true, force: true)
        }
        defer { metadataClusters = nil }
        return try await body()
    }

    // MARK: - Create

    private func createSnapshotLocked(name: String, dateSec: UInt32, dateNsec: UInt32, vmClockNsec: UInt64,
                                      icount: UInt64) async throws(BlockError) -> Qcow2Snapshot {
        if snapshots.count >= Qcow2.maxSnapshots {
            throw BlockError(.io, errno: 27, "File too large")
        }
        // find_new_snapshot_id: one more than the largest numeric id
        // (strtoul: leading digits, 0 when none).
        var maxId: UInt64 = 0
        for sn in snapshots { maxId = max(maxId, leadingNumber(sn.id)) }
        let sn = Qcow2Snapshot(l1TableOffset: 0, l1Size: UInt32(l1.count), id: String(maxId &+ 1), name: name,
                               dateSec: dateSec, dateNsec: dateNsec, vmClockNsec: vmClockNsec, vmStateSize: 0,
                               diskSize: header.size, icount: icount, extraData: [])
        try checkTableInFile()
        var newList = snapshots
        newList.append(sn)
        // The new table must be writable at all before anything changes.
        _ = try serializeSnapshotTable(newList)

        // Everything the active L1 reaches gains a reference; check first.
        let active = l1
        let deltas = try await collectReferences(active, addend: 1, what: "Active L1 table")
        try await checkDeltas(deltas)

        // 1. The copy of the active L1 table.
        let cs = Int64(geo.clusterSize)
        let l1Bytes = Int64(active.count) * 8
        var l1Offset: Int64 = 0
        if l1Bytes > 0 {
            let c = try await allocateContiguousLocked(divRoundUp(l1Bytes, cs))
            l1Offset = c * cs
            try await writeL1Image(active, at: l1Offset, clusters: divRoundUp(l1Bytes, cs))
        }
        // 2. Refcounts +1 (durable before any flag or pointer relies on them).
        try await applyDeltasLocked(deltas)
        try await barrier()
        // 3. The active tables are shared now: clear OFLAG_COPIED.
        var newL1 = active
        try await fixCopiedFlagsLocked(&newL1, writeL1: true)
        try await barrier()
        // 4. The new snapshot table, then the header switch.
        var created = sn
        created.l1TableOffset = UInt64(l1Offset)
        newList[newList.count - 1] = created
        // A failure from here leaks the new L1 copy and leaves refcounts
        // one too high (and the COPIED flags cleared): safe, like QEMU.
        try await writeSnapshotTableLocked(newList)
        return created
    }

    // MARK: - Apply

    private func applySnapshotLocked(_ index: Int) async throws(BlockError) {
        let sn = snapshots[index]
        try validateSnapshotL1(sn)
        if header.autoclearFeatures & Qcow2.autoclearBitmaps != 0, let bm = header.bitmaps, bm.count > 0 {
            throw BlockError(.busy, errno: 16, "Device has active dirty bitmaps")
        }
        let cs = Int64(geo.clusterSize)
        // The snapshot's table as stored.
        var snL1 = [UInt64](repeating: 0, count: Int(sn.l1Size))
        if sn.l1Size > 0 {
            try await Qcow2Image.readTable(file, Int64(sn.l1TableOffset), &snL1, what: "snapshot L1 table")
        }
        // The virtual size becomes the snapshot's (QEMU resizes first).
        let newSize = Int64(clamping: sn.diskSize ?? header.size)
        let needed = geo.l1EntriesFor(size: newSize)
        if needed > Int64(Qcow2.maxL1Bytes / 8) {
            throw BlockError(.invalidArgument, errno: 27, "File too large")
        }
        let newCount = max(l1.count, snL1.count, Int(needed))

        let incs = try await collectReferences(snL1, addend: 1, what: "Snapshot L1 table")
        let oldActive = l1
        let decs = try await collectReferences(oldActive, addend: -1, what: "Active L1 table")
        try await checkDeltas(incs)

        // 1. The snapshot's clusters gain the new active reference.
        try await applyDeltasLocked(incs)
        try await barrier()
        // 2. Their tables are shared now: clear OFLAG_COPIED where so
        //    (the snapshot's own L1 copy included, as QEMU does).
        var snL1Fixed = snL1
        if try await fixCopiedFlagsLocked(&snL1Fixed, writeL1: false), sn.l1Size > 0 {
            try await writeTableBytes(snL1Fixed, at: Int64(sn.l1TableOffset))
        }
        try await barrier()
        // 3. The active L1 becomes the snapshot's: in place when it fits,
        //    else in new clusters; the header's size, l1_size and
        //    l1_table_offset (bytes 24..<48) switch in one write.
        var newL1 = snL1Fixed
        newL1 += [UInt64](repeating: 0, count: newCount - snL1Fixed.count)
        let oldL1Offset = Int64(header.l1TableOffset)
        let oldL1Bytes = Int64(l1.count) * 8
        var l1Offset = oldL1Offset
        if newCount > l1.count {
            let clusters = divRoundUp(Int64(newCount) * 8, cs)
            l1Offset = try await allocateContiguousLocked(clusters) * cs
            try await writeL1Image(newL1, at: l1Offset, clusters: clusters)
        } else {
            try await writeTableBytes(newL1, at: l1Offset)
        }
        try await barrier()
        if l1Offset != oldL1Offset || Int64(header.size) != newSize {
            var hb = [UInt8](repeating: 0, count: 24)
            hb.putBE64(UInt64(newSize), 0)
            hb.putBE32(header.cryptMethod, 8)
            hb.putBE32(UInt32(newCount), 12)
            hb.putBE64(UInt64(l1Offset), 16)
            try await writeBytes(hb, at: 24)
            try await barrier()
            header.size = UInt64(newSize)
            header.l1Size = UInt32(newCount)
            header.l1TableOffset = UInt64(l1Offset)
            setLength(newSize)
        }
        l1 = newL1
        // 4. The old active state loses its reference.
        try await applyDeltasLocked(decs)
        if l1Offset != oldL1Offset && oldL1Bytes > 0 {
            try await applyDeltasLocked(clusterDeltas(oldL1Offset, oldL1Bytes, -1))
        }
        // Tables of the old state still held by snapshots: fix their flags
        // as QEMU does (where a refcount dropped to 1).
        var oldCopy = oldActive
        _ = try await fixCopiedFlagsLocked(&oldCopy, writeL1: false)
        // 5. OFLAG_COPIED of the new active tables.
        var fixed = l1
        try await fixCopiedFlagsLocked(&fixed, writeL1: true)
        try await barrier()
    }

    // MARK: - Delete

    private func deleteSnapshotLocked(_ index: Int) async throws(BlockError) {
        let sn = snapshots[index]
        try validateSnapshotL1(sn)
        try checkTableInFile()
        var snL1 = [UInt64](repeating: 0, count: Int(sn.l1Size))
        if sn.l1Size > 0 {
            try await Qcow2Image.readTable(file, Int64(sn.l1TableOffset), &snL1, what: "snapshot L1 table")
        }
        let decs = try await collectReferences(snL1, addend: -1, what: "Snapshot L1 table")
        // 1. The snapshot leaves the table (header switch).
        var newList = snapshots
        newList.remove(at: index)
        do throws(BlockError) {
            try await writeSnapshotTableLocked(newList)
        } catch {
            throw error.prefixed("Failed to remove snapshot from snapshot list: ")
        }
        // 2. Its clusters lose a reference; its L1 table is freed.
        try await applyDeltasLocked(decs)
        let l1Bytes = Int64(sn.l1Size) * 8
        if l1Bytes > 0 {
            try await applyDeltasLocked(clusterDeltas(Int64(sn.l1TableOffset), l1Bytes, -1))
        }
        // 3. OFLAG_COPIED where a refcount dropped to 1.
        var fixed = l1
        try await fixCopiedFlagsLocked(&fixed, writeL1: true)
        try await barrier()
    }

    // MARK: - Snapshot table

    /// A table that lies past the end of the file reads as zeroes: QEMU
    /// lists that, but rewriting it would free clusters never counted (QEMU
    /// then fails half-way): refused before anything changes.
    func checkTableInFile() throws(BlockError) {
        if header.nbSnapshots > 0 && Int64(header.snapshotsOffset) + Int64(max(snapshotTableBytes, 1)) > file.length {
            throw BlockError(.corrupt, errno: 22, "Snapshot table exceeds the end of the file")
        }
    }

    func validateSnapshotL1(_ sn: Qcow2Snapshot) throws(BlockError) {
        if UInt64(sn.l1Size) > UInt64(Qcow2.maxL1Bytes / 8) {
            throw BlockError(.invalidArgument, errno: 27, "Snapshot L1 table too large")
        }
        if UInt64(Int64.max) - UInt64(sn.l1Size) * 8 < sn.l1TableOffset {
            throw BlockError(.invalidArgument, errno: 22, "Snapshot L1 table exceeds the maximum supported size")
        }
        if sn.l1TableOffset % UInt64(geo.clusterSize) != 0 {
            throw BlockError(.invalidArgument, errno: 22, "Snapshot L1 table offset invalid")
        }
        // QEMU would read zeroes there (and lose the snapshot's data on
        // apply, or fail half-way through a delete): refused instead.
        if sn.l1TableOffset + UInt64(sn.l1Size) * 8 > UInt64(file.length) {
            throw BlockError(.invalidArgument, errno: 22, "Snapshot L1 table exceeds the end of the file")
        }
    }

    /// The table as QEMU 7.2 writes it: entries 8-byte aligned, 24 bytes of
    /// known extra data (unknown extra data kept after it), id, name.
    func serializeSnapshotTable(_ list: [Qcow2Snapshot]) throws(BlockError) -> [UInt8] {
        var out: [UInt8] = []
        for sn in list {
            while out.count % 8 != 0 { out.append(0) }
            let unknown = sn.extraData.count > Self.snapshotExtraSize ? Array(sn.extraData[Self.snapshotExtraSize...]) : []
            let id = Array(sn.id.utf8)
            let name = Array(sn.name.utf8)
            if id.count > 0xffff || name.count > 0xffff {
                throw BlockError(.invalidArgument, errno: 22, "Invalid argument")
            }
            var h = [UInt8](repeating: 0, count: 40 + Self.snapshotExtraSize)
            h.putBE64(sn.l1TableOffset, 0)
            h.putBE32(sn.l1Size, 8)
            h.putBE16(UInt16(id.count), 12)
            h.putBE16(UInt16(name.count), 14)
            h.putBE32(sn.dateSec, 16)
            h.putBE32(sn.dateNsec, 20)
            h.putBE64(sn.vmClockNsec, 24)
            h.putBE32(sn.vmStateSize <= 0xffff_ffff ? UInt32(sn.vmStateSize) : 0, 32)
            h.putBE32(UInt32(Self.snapshotExtraSize + unknown.count), 36)
            h.putBE64(sn.vmStateSize, 40)
            h.putBE64(sn.diskSize ?? header.size, 48)
            h.putBE64(sn.icount ?? UInt64.max, 56)
            out += h
            out += unknown
            out += id
            out += name
            if out.count > Self.maxSnapshotTableBytes {
                throw BlockError(.io, errno: 27, "File too large")
            }
        }
        return out
    }

    /// Writes `list` as a new table in new clusters, switches the header's
    /// nb_snapshots + snapshots_offset (adjacent: one write), then frees the
    /// old table. On failure before the switch nothing changed but leaks.
    func writeSnapshotTableLocked(_ list: [Qcow2Snapshot]) async throws(BlockError) {
        let bytes = try serializeSnapshotTable(list)
        let cs = Int64(geo.clusterSize)
        var newOffset: Int64 = 0
        if !bytes.isEmpty {
            let clusters = divRoundUp(Int64(bytes.count), cs)
            newOffset = try await allocateContiguousLocked(clusters) * cs
            let buf = AlignedBuffer(count: Int(clusters * cs), zeroed: true)
            bytes.withUnsafeBytes { buf.bytes.copyMemory(from: $0) }
            try await file.write(at: newOffset, from: UnsafeRawBufferPointer(buf.bytes))
        }
        try await barrier()
        var hb = [UInt8](repeating: 0, count: 12)
        hb.putBE32(UInt32(list.count), 0)
        hb.putBE64(UInt64(newOffset), 4)
        try await writeBytes(hb, at: 60)
        try await barrier()
        let oldOffset = Int64(header.snapshotsOffset)
        let oldBytes = Int64(snapshotTableBytes)
        let hadTable = header.nbSnapshots > 0
        header.nbSnapshots = UInt32(list.count)
        header.snapshotsOffset = UInt64(newOffset)
        snapshots = list
        snapshotTableBytes = bytes.count
        if hadTable && oldBytes > 0 {
            try await applyDeltasLocked(clusterDeltas(oldOffset, oldBytes, -1))
        }
    }

    // MARK: - References and refcounts

    /// Clusters [offset, offset+length) each with `delta`.
    func clusterDeltas(_ offset: Int64, _ length: Int64, _ delta: Int64) -> [Int64: Int64] {
        let cs = Int64(geo.clusterSize)
        var d: [Int64: Int64] = [:]
        guard length > 0 else { return d }
        for c in (offset / cs)...((offset + length - 1) / cs) { d[c, default: 0] += delta }
        return d
    }

    /// Every cluster an L1 table reaches (its L2 tables, their data and
    /// compressed clusters), each with `addend` per reference, the way
    /// QEMU's qcow2_update_snapshot_refcount counts them. Reads only.
    func collectReferences(_ table: [UInt64], addend: Int64, what: String) async throws(BlockError) -> [Int64: Int64] {
        let cs = Int64(geo.clusterSize)
        var d: [Int64: Int64] = [:]
        for (i, e) in table.enumerated() {
            let l2 = Int64(e & Qcow2.l1OffsetMask)
            if l2 == 0 { continue }
            if l2 % cs != 0 {
                throw BlockError(.corrupt, errno: 5, "\(what): L2 table offset \(hex(l2)) unaligned (L1 index: \(hex(Int64(i))))")
            }
            if l2 + cs > file.length {
                throw BlockError(.corrupt, errno: 22, "\(what): L2 table offset \(hex(l2)) beyond the end of the file (L1 index: \(hex(Int64(i))))")
            }
            let buf = try await l2TableAt(l2)
            for j in 0..<geo.l2Entries {
                let entry = buf.l2Entry(j, geo)
                if entry & Qcow2.oflagCompressed != 0 {
                    let (off, len) = geo.compressedRange(entry)
                    for (c, v) in clusterDeltas(off, Int64(len), addend) { d[c, default: 0] += v }
                    continue
                }
                let host = Int64(entry & Qcow2.l2OffsetMask)
                if host == 0 { continue }
                if host % cs != 0 {
                    throw BlockError(.corrupt, errno: 5, "Cluster allocation offset \(hex(host)) unaligned (L2 offset: \(hex(l2)), L2 index: \(hex(Int64(j))))")
                }
                d[host / cs, default: 0] += addend
            }
            d[l2 / cs, default: 0] += addend
        }
        return d.filter { $0.value != 0 }
    }

    /// The L2 table at host `offset`, through the cache.
    func l2TableAt(_ offset: Int64) async throws(BlockError) -> AlignedBuffer {
        if let b = l2Cache.lookup(offset) { return b }
        let b = AlignedBuffer(count: geo.clusterSize)
        try await Qcow2Image.readInto(file, b, offset)
        l2Cache.insert(offset, b)
        return b
    }

    /// Fails (changing nothing) if a refcount would leave its range.
    func checkDeltas(_ deltas: [Int64: Int64]) async throws(BlockError) {
        let maxV = RefcountCodec.maxValue(order: geo.refcountOrder)
        for (c, delta) in deltas {
            let old = try await refcount(c)
            if delta > 0 && maxV - old < UInt64(delta) {
                throw BlockError(.io, errno: 34, "Numerical result out of range")
            }
            if delta < 0 && old < UInt64(-delta) {
                throw BlockError(.corrupt, errno: 22, "Invalid argument")
            }
        }
    }

    /// Applies refcount deltas, one write per refcount block touched.
    /// Clusters that reach 0 are forgotten by the caches and allocator.
    func applyDeltasLocked(_ deltas: [Int64: Int64]) async throws(BlockError) {
        guard !deltas.isEmpty else { return }
        try await checkDeltas(deltas)
        let e = refblockEntries
        let sorted = deltas.keys.sorted()
        var i = 0
        let cs = Int64(geo.clusterSize)
        while i < sorted.count {
            let idx = sorted[i] / e
            var j = i
            while j < sorted.count && sorted[j] / e == idx { j += 1 }
            try await ensureRefblock(idx)
            let off = Int64(refTable[Int(idx)] & Qcow2.refTableOffsetMask)
            let b = try await refblock(at: off, index: idx)
            var lo = Int.max
            var hi = 0
            for k in i..<j {
                let c = sorted[k]
                let slot = Int(c % e)
                let old = RefcountCodec.get(b.pointer, slot, order: geo.refcountOrder)
                let delta = deltas[c]!
                let new = delta >= 0 ? old + UInt64(delta) : old - UInt64(-delta)
                RefcountCodec.set(b.pointer, slot, order: geo.refcountOrder, new)
                let r = RefcountCodec.byteRange(slot, order: geo.refcountOrder)
                lo = min(lo, r.lowerBound)
                hi = max(hi, r.upperBound)
                if new == 0 {
                    freeClusterHint = min(freeClusterHint, c)
                    forgetMetadata(clusters: c..<(c + 1))
                    l2Cache.remove(c * cs)
                    if c * cs <= compressedFreeByte && compressedFreeByte < (c + 1) * cs { compressedFreeByte = 0 }
                    if c < reserveStart && reserveCount > 0 { releaseReservePending = true }
                }
            }
            try await writeTableRange(b, at: off, lo..<hi)
            i = j
        }
    }

    /// Sets OFLAG_COPIED exactly where the refcount is 1, in the L2 tables
    /// `table` reaches (each written if it changed) and in `table` itself.
    /// Tables whose refcount is 0 (being freed) are left alone. With
    /// `writeL1` the table is the active one: the changed entries are
    /// written and `l1` updated. Returns whether `table` changed.
    @discardableResult
    func fixCopiedFlagsLocked(_ table: inout [UInt64], writeL1: Bool) async throws(BlockError) -> Bool {
        let cs = Int64(geo.clusterSize)
        var changed = false
        var done: Set<Int64> = []
        for i in 0..<table.count {
            let e = table[i]
            let l2 = Int64(e & Qcow2.l1OffsetMask)
            if l2 == 0 {
                if e & Qcow2.oflagCopied != 0 { table[i] = e & ~Qcow2.oflagCopied; changed = true }
                continue
            }
            let rc = try await refcount(l2 / cs)
            if rc == 0 { continue }
            if !done.contains(l2) {
                done.insert(l2)
                let buf = try await l2TableAt(l2)
                var lo = Int.max
                var hi = 0
                for j in 0..<geo.l2Entries {
                    let entry = buf.l2Entry(j, geo)
                    var want = entry & ~Qcow2.oflagCopied
                    if entry & Qcow2.oflagCompressed == 0 {
                        let host = Int64(entry & Qcow2.l2OffsetMask)
                        if host != 0, try await refcount(host / cs) == 1 { want |= Qcow2.oflagCopied }
                    } else {
                        want = entry
                    }
                    if want != entry {
                        buf.setL2Entry(j, geo, want)
                        lo = min(lo, j * geo.l2EntrySize)
                        hi = max(hi, j * geo.l2EntrySize + 8)
                    }
                }
                if hi > lo { try await writeTableRange(buf, at: l2, lo..<hi) }
            }
            let want = rc == 1 ? (e | Qcow2.oflagCopied) : (e & ~Qcow2.oflagCopied)
            if want != e { table[i] = want; changed = true }
        }
        if writeL1 && changed {
            l1 = table
            try await writeTableBytes(table, at: Int64(header.l1TableOffset))
        }
        return changed
    }

    /// Writes a whole table of big-endian entries at `offset`, widened to
    /// the file's alignment (bytes past the table in the last block kept).
    func writeTableBytes(_ table: [UInt64], at offset: Int64) async throws(BlockError) {
        guard !table.isEmpty else { return }
        let a = Int64(max(512, file.driver.requestAlignment))
        let bytes = Int64(table.count) * 8
        let span = alignUp(bytes, a)
        let buf = AlignedBuffer(count: Int(span), zeroed: true)
        if span > bytes {
            let tail = AlignedBuffer(count: Int(a))
            try await Qcow2Image.readInto(file, tail, offset + span - a)
            buf.slice(Int(span - a), Int(a)).copyMemory(from: UnsafeRawBufferPointer(tail.bytes))
        }
        for (i, v) in table.enumerated() { buf.setBE64(i, v) }
        try await file.write(at: offset, from: UnsafeRawBufferPointer(buf.bytes))
    }

    /// Writes a table into freshly allocated clusters (zero padded).
    func writeL1Image(_ table: [UInt64], at offset: Int64, clusters: Int64) async throws(BlockError) {
        let buf = AlignedBuffer(count: Int(clusters) * geo.clusterSize, zeroed: true)
        for (i, v) in table.enumerated() { buf.setBE64(i, v) }
        try await file.write(at: offset, from: UnsafeRawBufferPointer(buf.bytes))
    }

}

/// strtoul(s, NULL, 10) for the snapshot id: leading blanks and sign, then
/// the leading decimal digits (0 when there are none; saturating).
func leadingNumber(_ s: String) -> UInt64 {
    var it = Array(s.utf8)[...]
    while let f = it.first, f == 32 || (f >= 9 && f <= 13) { it = it.dropFirst() }
    var negative = false
    if let f = it.first, f == 43 || f == 45 { negative = f == 45; it = it.dropFirst() }
    var v: UInt64 = 0
    var any = false
    for ch in it {
        guard ch >= 48 && ch <= 57 else { break }
        any = true
        let (m, o1) = v.multipliedReportingOverflow(by: 10)
        let (a, o2) = m.addingReportingOverflow(UInt64(ch - 48))
        if o1 || o2 { return UInt64.max }
        v = a
    }
    if !any { return 0 }
    return negative ? 0 &- v : v
}

extension Qcow2Image {
    /// Makes a snapshot's L1 table the one reads go through, in memory
    /// only (QEMU qcow2_snapshot_load_tmp, for `convert -l`). The image
    /// must be read-only; the virtual size stays the current one. With
    /// both `id` and `name` both must match.
    public func loadSnapshotTemporarily(id: String?, name: String?) async throws(BlockError) {
        if !isReadOnly { throw BlockError(.invalidArgument, errno: 22, "Device is not readonly") }
        try await lock.withLock { () async throws(BlockError) in
            let found: Int?
            switch (id, name) {
            case let (i?, n?): found = snapshots.firstIndex { $0.id == i && $0.name == n }
            case let (i?, nil): found = snapshots.firstIndex { $0.id == i }
            case let (nil, n?): found = snapshots.firstIndex { $0.name == n }
            default: found = nil
            }
            guard let index = found else { throw BlockError(.notFound, errno: 2, "Can't find snapshot") }
            let sn = snapshots[index]
            try validateSnapshotL1(sn)
            var table = [UInt64](repeating: 0, count: Int(sn.l1Size))
            if sn.l1Size > 0 {
                try await Qcow2Image.readTable(file, Int64(sn.l1TableOffset), &table, what: "snapshot L1 table")
            }
            l1 = table
            header.l1Size = sn.l1Size
            header.l1TableOffset = sn.l1TableOffset
            metadataClusters = nil
        }
    }
}
