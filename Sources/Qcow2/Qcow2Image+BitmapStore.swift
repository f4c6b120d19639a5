import BlockCore
import BlockGraph
import Synchronization

/// Limits of the qcow2 bitmaps extension (docs/interop/qcow2.txt and
/// QEMU's implementation limits, which `qemu-img` enforces).
public enum Qcow2BitmapLimits {
    public static let maxBitmaps = 65535
    public static let maxDirectorySize = 1024 * 65535
    public static let maxNameSize = 1023
    public static let minGranularityBits = 9
    public static let maxGranularityBits = 31
    static let maxTableSize: UInt64 = 0x800_0000
    static let maxPhysSize: UInt64 = 0x2000_0000
    static let reservedFlags: UInt32 = ~(Qcow2BitmapInfo.flagInUse | Qcow2BitmapInfo.flagAuto)
    static let entryReservedMask: UInt64 = 0xff00_0000_0000_01fe
    static let entryOffsetMask: UInt64 = 0x00ff_ffff_ffff_fe00
    static let entryAllOnes: UInt64 = 1
    static let typeDirtyTracking: UInt8 = 1

    /// Bytes a directory entry takes (8-byte aligned).
    public static func entrySize(nameBytes: Int, extra: Int = 0) -> Int { (24 + extra + nameBytes + 7) & ~7 }
}

/// One persistent bitmap as this open image holds it: loaded from the
/// bitmap directory (its data in `bits`) or added since.
struct StoredBitmap {
    var name: String
    var granularityBits: UInt8
    var enabled: Bool
    /// In use on disk when loaded: its data cannot be trusted and is not
    /// loaded; it is kept on disk as it is until removed.
    var inconsistent: Bool
    var bits: DirtyBitmap?
    /// As on disk (nil `entryOffset`: not on disk yet).
    var diskFlags: UInt32 = 0
    var tableOffset: UInt64 = 0
    var tableSize: UInt32 = 0
    var table: [UInt64] = []
    var entryOffset: Int?
}

/// The persistent bitmaps of an open image (guarded by the image's lock).
struct BitmapStoreState {
    var list: [StoredBitmap] = []
    /// Changed by a bitmap operation since the last store.
    var modified = false
    /// Host ranges of removed bitmaps, released after the next store.
    var orphans: [(Int64, Int64)] = []
    /// A bitmaps extension without the autoclear bit: ignored, and dropped
    /// by a read-write open.
    var staleExtension = false
}

extension Qcow2Image {
    /// Read-write open: a stale bitmaps extension goes (QEMU rewrites the
    /// header without it). Called with `lock` held.
    func dropStaleBitmapsExtensionLocked() async throws(BlockError) {
        guard bitmapStore.staleExtension, header.extensions.contains(where: { $0.type == Qcow2.extBitmaps }) else { return }
        let saved = header
        header.extensions.removeAll { $0.type == Qcow2.extBitmaps }
        do throws(BlockError) {
            try await writeHeaderLocked()
        } catch {
            header = saved
            throw error
        }
        bitmapStore.staleExtension = false
    }

    // MARK: - Loading (at open)

    /// Reads and checks the bitmap directory and every consistent bitmap's
    /// table and data, with QEMU's open-time messages. Called by `open`.
    func loadBitmapsAtOpen() async throws(BlockError) {
        guard let e = header.extensions.first(where: { $0.type == Qcow2.extBitmaps }) else { return }
        if header.version < 3 || header.autoclearFeatures & Qcow2.autoclearBitmaps == 0 {
            // Written by a program that does not know bitmaps: none can be
            // trusted. A read-write open drops the extension (nothing of
            // it is freed: those clusters may have been reused since).
            let what = header.version < 3
                ? "This qcow2 v2 image contains bitmaps, but they may have been modified by a program without persistent bitmap support; so now they must all be considered inconsistent"
                : "a program lacking bitmap support modified this file, so all bitmaps are now considered inconsistent"
            let prog = BlockDiagnostics.programName.withLock { $0 }
            FileHandleStderr.write((prog.isEmpty ? "" : prog + ": ") + "warning: " + what + "\n"
                                   + "Some clusters may be leaked, run 'qemu-img check -r' on the image file to fix.")
            bitmapStore.staleExtension = true
            return
        }
        if e.data.count != 24 { throw BlockError.invalid("bitmaps_ext: Invalid extension length") }
        guard let ext = header.bitmaps else { return }
        if e.data.be32(4) != 0 { throw BlockError.invalid("bitmaps_ext: reserved field is not zero") }
        if ext.count > UInt32(Qcow2BitmapLimits.maxBitmaps) {
            throw BlockError.invalid("bitmaps_ext: Image has \(ext.count) bitmaps, exceeding the QEMU supported maximum of \(Qcow2BitmapLimits.maxBitmaps)")
        }
        if ext.count == 0 { throw BlockError.invalid("found bitmaps extension with zero bitmaps") }
        if ext.directoryOffset % UInt64(geo.clusterSize) != 0 {
            throw BlockError.invalid("bitmaps_ext: invalid bitmap directory offset")
        }
        if ext.directorySize > UInt64(Qcow2BitmapLimits.maxDirectorySize) {
            throw BlockError.invalid("bitmaps_ext: bitmap directory size (\(ext.directorySize)) exceeds the maximum supported size (\(Qcow2BitmapLimits.maxDirectorySize))")
        }
        var dir = [UInt8](repeating: 0, count: Int(ext.directorySize))
        do throws(BlockError) {
            try await Qcow2Image.readBytes(file, &dir, Int64(ext.directoryOffset))
        } catch {
            throw error.prefixed("Failed to read bitmap directory: ")
        }
        var list: [StoredBitmap] = []
        var off = 0
        let broken = BlockError.invalid("Broken bitmap directory")
        for _ in 0..<ext.count {
            guard off + 24 <= dir.count else { throw broken }
            let nameSize = Int(dir.be16(off + 18))
            let extraSize = Int(dir.be32(off + 20))
            let entryEnd = off + 24 + extraSize + nameSize
            guard entryEnd <= dir.count else { throw broken }
            let name = String(decoding: dir[(off + 24 + extraSize)..<entryEnd], as: UTF8.self)
            if extraSize != 0 { throw BlockError.invalid("Bitmap extra data is not supported") }
            var b = StoredBitmap(name: name, granularityBits: dir[off + 17], enabled: false, inconsistent: false)
            b.tableOffset = dir.be64(off)
            b.tableSize = dir.be32(off + 8)
            b.diskFlags = dir.be32(off + 12)
            b.entryOffset = off
            if !entryIsValid(b, type: dir[off + 16], nameSize: nameSize) {
                throw BlockError.invalid("Bitmap '\(name)' doesn't satisfy the constraints")
            }
            b.enabled = b.diskFlags & Qcow2BitmapInfo.flagAuto != 0
            b.inconsistent = b.diskFlags & Qcow2BitmapInfo.flagInUse != 0
            list.append(b)
            off = Qcow2BitmapLimits.entrySize(nameBytes: nameSize, extra: extraSize) + off
        }
        if off != dir.count { throw broken }
        for i in list.indices where !list[i].inconsistent {
            let b = list[i]
            let table: [UInt64]
            do throws(BlockError) {
                table = try await readBitmapTable(b)
            } catch {
                throw BlockError(error.kind, errno: error.errno,
                                 "Could not read bitmap_table table from image for bitmap '\(b.name)': \(errnoString(error.errno))")
            }
            list[i].table = table
            do throws(BlockError) {
                list[i].bits = try await readBitmapData(table, granularityBits: b.granularityBits)
            } catch {
                throw error.prefixed("Could not read bitmap '\(b.name)' from image: ")
            }
        }
        bitmapStore.list = list
        updateTrackedBitmaps()
    }

    /// QEMU's check_dir_entry.
    private func entryIsValid(_ b: StoredBitmap, type: UInt8, nameSize: Int) -> Bool {
        if b.tableSize == 0 || b.tableOffset == 0 || b.tableOffset % UInt64(geo.clusterSize) != 0 { return false }
        if UInt64(b.tableSize) > Qcow2BitmapLimits.maxTableSize { return false }
        if Int(b.granularityBits) > Qcow2BitmapLimits.maxGranularityBits
            || Int(b.granularityBits) < Qcow2BitmapLimits.minGranularityBits { return false }
        if b.diskFlags & Qcow2BitmapLimits.reservedFlags != 0 { return false }
        if nameSize > Qcow2BitmapLimits.maxNameSize || type != Qcow2BitmapLimits.typeDirtyTracking { return false }
        let phys = UInt64(b.tableSize) * UInt64(geo.clusterSize)
        if phys > Qcow2BitmapLimits.maxPhysSize { return false }
        if b.diskFlags & Qcow2BitmapInfo.flagInUse == 0 && header.size > (phys * 8) << UInt64(b.granularityBits) {
            return false
        }
        return true
    }

    /// Reads a bitmap table and checks its entries.
    func readBitmapTable(_ b: StoredBitmap) async throws(BlockError) -> [UInt64] {
        var t = [UInt64](repeating: 0, count: Int(b.tableSize))
        try await Qcow2Image.readTable(file, Int64(b.tableOffset), &t, what: "bitmap table")
        for e in t {
            let off = e & Qcow2BitmapLimits.entryOffsetMask
            if e & Qcow2BitmapLimits.entryReservedMask != 0
                || (off != 0 && (e & Qcow2BitmapLimits.entryAllOnes != 0 || off % UInt64(geo.clusterSize) != 0)) {
                throw BlockError(.invalidArgument, errno: 22, "Invalid bitmap table entry")
            }
        }
        return t
    }

    /// Granules of a bitmap over this image, and the bytes its data takes.
    private func bitmapGeometry(_ granularityBits: UInt8) -> (granules: Int64, bytes: Int64) {
        let g = (Int64(header.size) + (Int64(1) << Int64(granularityBits)) - 1) >> Int64(granularityBits)
        return (g, (g + 7) / 8)
    }

    /// Loads bitmap data: table entry i holds bytes [i*cs, (i+1)*cs) of the
    /// bitmap (bit j of byte k = granule 8k+j); an entry without offset is
    /// all zeroes, or all ones with bit 0 set.
    private func readBitmapData(_ table: [UInt64], granularityBits: UInt8) async throws(BlockError) -> DirtyBitmap {
        let cs = geo.clusterSize
        let (granules, bytes) = bitmapGeometry(granularityBits)
        var data = [UInt8](repeating: 0, count: Int((granules + 63) / 64 * 8))
        let buf = AlignedBuffer(count: cs)
        for (i, e) in table.enumerated() {
            let start = i * cs
            guard Int64(start) < bytes else { break }
            let n = min(cs, Int(bytes) - start)
            let off = e & Qcow2BitmapLimits.entryOffsetMask
            if off == 0 {
                if e & Qcow2BitmapLimits.entryAllOnes != 0 {
                    for k in start..<(start + n) { data[k] = 0xff }
                }
                continue
            }
            let avail = max(0, min(Int64(cs), file.length - Int64(off)))
            if avail > 0 { try await file.read(at: Int64(off), into: buf.slice(0, Int(avail))) }
            if Int(avail) < cs { buf.slice(Int(avail), cs - Int(avail)).zeroFill() }
            let src = UnsafeRawBufferPointer(buf.bytes)
            for k in 0..<n { data[start + k] = src[k] }
        }
        var words = [UInt64](repeating: 0, count: data.count / 8)
        for w in words.indices {
            var v: UInt64 = 0
            for k in 0..<8 { v |= UInt64(data[w * 8 + k]) << UInt64(8 * k) }
            words[w] = v
        }
        let bm = DirtyBitmap(size: Int64(header.size), granularity: Int64(1) << Int64(granularityBits))
        bm.setWords(words)
        return bm
    }

    /// The enabled, consistent bitmaps are the ones guest writes mark: the
    /// node's generic layer marks them (QEMU's bdrv_set_dirty), the driver
    /// only loads and stores them.
    func updateTrackedBitmaps() {
        let active = bitmapStore.list.compactMap { $0.enabled && !$0.inconsistent ? $0.bits : nil }
        publishTrackedBitmaps(active)
        let catalog = bitmapStore.list.map {
            (PersistentBitmapInfo(name: $0.name, granularity: Int64(1) << Int64($0.granularityBits),
                                  enabled: $0.enabled, inconsistent: $0.inconsistent), $0.bits)
        }
        bitmapCatalog.withLock { $0 = catalog }
    }

    /// The persistent bitmaps and their live bits, without waiting for the
    /// image's lock (for callers that cannot suspend, e.g. export setup).
    public func persistentBitmapsNow() -> [(PersistentBitmapInfo, DirtyBitmap?)] {
        bitmapCatalog.withLock { $0 }
    }

    // MARK: - In-use marking (first write)

    /// Before the first guest write, every consistent bitmap is flagged
    /// in-use on disk (flushed): if the process dies before the clean
    /// close stores them, they read as inconsistent, never trusted.
    func markBitmapsInUseLocked() async throws(BlockError) {
        bitmapsMarkedInUse = true
        guard let ext = header.bitmaps, header.autoclearFeatures & Qcow2.autoclearBitmaps != 0 else { return }
        var changed = false
        for i in bitmapStore.list.indices {
            let b = bitmapStore.list[i]
            guard !b.inconsistent, let eo = b.entryOffset, b.diskFlags & Qcow2BitmapInfo.flagInUse == 0 else { continue }
            var f = [UInt8](repeating: 0, count: 4)
            f.putBE32(b.diskFlags | Qcow2BitmapInfo.flagInUse, 0)
            try await writeBytes(f, at: Int64(ext.directoryOffset) + Int64(eo + 12))
            bitmapStore.list[i].diskFlags |= Qcow2BitmapInfo.flagInUse
            changed = true
        }
        if changed { try await barrier() }
    }

    // MARK: - Storing (clean close)

    /// Whether a clean close writes bitmaps back: as QEMU, after every
    /// read-write use of an image with consistent bitmaps (QEMU loads them
    /// at open and stores them all at close), so both leave the same layout.
    var bitmapsNeedStore: Bool {
        bitmapStore.modified || bitmapStore.list.contains { !$0.inconsistent }
    }

    /// Writes every consistent bitmap to new clusters and a new directory,
    /// then switches the header extension to it, then frees the old
    /// tables and directory. Each step is flushed before the pointer that
    /// makes it live, so a crash leaves the old or the new set (and leaks).
    func storeBitmapsLocked() async throws(BlockError) {
        guard bitmapsNeedStore, !isReadOnly else { return }
        let cs = Int64(geo.clusterSize)
        var list = bitmapStore.list
        var oldRanges = bitmapStore.orphans
        for i in list.indices where !list[i].inconsistent {
            guard let bits = list[i].bits else { continue }
            if list[i].entryOffset != nil { oldRanges += rangesOf(list[i]) }
            let (offset, table) = try await writeBitmapData(bits, granularityBits: list[i].granularityBits)
            list[i].tableOffset = UInt64(offset)
            list[i].tableSize = UInt32(table.count)
            list[i].table = table
            list[i].diskFlags = list[i].enabled ? Qcow2BitmapInfo.flagAuto : 0
        }
        try await barrier()
        let old = header.autoclearFeatures & Qcow2.autoclearBitmaps != 0 ? header.bitmaps : nil
        var h = header
        h.extensions.removeAll { $0.type == Qcow2.extBitmaps }
        if list.isEmpty {
            h.autoclearFeatures &= ~Qcow2.autoclearBitmaps
        } else {
            var dir: [UInt8] = []
            for i in list.indices {
                list[i].entryOffset = dir.count
                let name = Array(list[i].name.utf8)
                var e = [UInt8](repeating: 0, count: Qcow2BitmapLimits.entrySize(nameBytes: name.count))
                e.putBE64(list[i].tableOffset, 0)
                e.putBE32(list[i].tableSize, 8)
                e.putBE32(list[i].diskFlags, 12)
                e[16] = Qcow2BitmapLimits.typeDirtyTracking
                e[17] = list[i].granularityBits
                e.putBE16(UInt16(name.count), 18)
                for (k, c) in name.enumerated() { e[24 + k] = c }
                dir += e
            }
            let clusters = (Int64(dir.count) + cs - 1) / cs
            let at = try await allocateBitmapClustersLocked(clusters)
            let buf = AlignedBuffer(count: Int(clusters * cs), zeroed: true)
            dir.withUnsafeBytes { buf.bytes.copyMemory(from: $0) }
            try await file.write(at: at, from: UnsafeRawBufferPointer(buf.bytes))
            try await barrier()
            var ext = [UInt8](repeating: 0, count: 24)
            ext.putBE32(UInt32(list.count), 0)
            ext.putBE64(UInt64(dir.count), 8)
            ext.putBE64(UInt64(at), 16)
            h.extensions.append(HeaderExtension(type: Qcow2.extBitmaps, data: ext))
            h.autoclearFeatures |= Qcow2.autoclearBitmaps
        }
        let saved = header
        header = h
        do throws(BlockError) {
            try await writeHeaderLocked()
            try await barrier()
        } catch {
            header = saved
            throw error
        }
        if let o = old { oldRanges.append((Int64(o.directoryOffset), Int64(o.directorySize))) }
        bitmapStore.list = list
        bitmapStore.orphans = []
        bitmapStore.modified = false
        metadataClusters = nil
        try await releaseBitmapRangesLocked(oldRanges)
    }

    /// The host ranges a bitmap occupies on disk (table and data clusters).
    func rangesOf(_ b: StoredBitmap) -> [(Int64, Int64)] {
        guard b.tableOffset != 0, b.tableSize > 0 else { return [] }
        var r: [(Int64, Int64)] = [(Int64(b.tableOffset), Int64(b.tableSize) * 8)]
        for e in b.table {
            let off = e & Qcow2BitmapLimits.entryOffsetMask
            if off != 0 { r.append((Int64(off), Int64(geo.clusterSize))) }
        }
        return r
    }

    /// Releases clusters that held bitmap structures no longer referenced,
    /// one range at a time. A damaged range (a cluster past the end of the
    /// file or without a reference) is left alone, with QEMU's message for
    /// its failed free: at worst a leak.
    func releaseBitmapRangesLocked(_ ranges: [(Int64, Int64)]) async throws(BlockError) {
        let cs = Int64(geo.clusterSize)
        var queued = Set<Int64>()
        for (off, len) in ranges where len > 0 && off > 0 {
            let clusters = (off / cs)...((off + len - 1) / cs)
            var ok = true
            for c in clusters {
                if c * cs >= file.length || queued.contains(c) {
                    ok = false
                } else if try await refcount(c) == 0 {
                    ok = false
                }
                if !ok { break }
            }
            guard ok else {
                FileHandleStderr.write("qcow2_free_clusters failed: Invalid argument\n")
                continue
            }
            for c in clusters { queued.insert(c) }
            queueFree(clusters.lowerBound * cs, Int64(clusters.count) * cs)
        }
    }

    /// Writes one bitmap's data clusters and table; returns the table's
    /// offset and entries. Nothing points to them yet.
    private func writeBitmapData(_ bits: DirtyBitmap, granularityBits: UInt8) async throws(BlockError) -> (Int64, [UInt64]) {
        let cs = geo.clusterSize
        let (_, bytes) = bitmapGeometry(granularityBits)
        let words = bits.snapshotWords()
        let tableSize = max(1, Int((bytes + Int64(cs) - 1) / Int64(cs)))
        var table = [UInt64](repeating: 0, count: tableSize)
        let buf = AlignedBuffer(count: cs)
        for i in 0..<tableSize {
            let start = i * cs
            let n = min(cs, Int(bytes) - start)
            guard n > 0 else { continue }
            let p = buf.bytes
            var any = false
            for k in 0..<cs {
                let byteIndex = start + k
                var v: UInt8 = 0
                if k < n {
                    let w = byteIndex / 8
                    if w < words.count { v = UInt8(truncatingIfNeeded: words[w] >> UInt64(8 * (byteIndex % 8))) }
                }
                p[k] = v
                if v != 0 { any = true }
            }
            guard any else { continue }
            let (c, _) = try await allocateClusters(1)
            try await file.write(at: c * Int64(cs), from: UnsafeRawBufferPointer(buf.bytes))
            table[i] = UInt64(c * Int64(cs))
        }
        let tableBytes = Int64(tableSize * 8)
        let clusters = (tableBytes + Int64(cs) - 1) / Int64(cs)
        let at = try await allocateBitmapClustersLocked(clusters)
        let tbuf = AlignedBuffer(count: Int(clusters) * cs, zeroed: true)
        for (i, v) in table.enumerated() { tbuf.setBE64(i, v) }
        try await file.write(at: at, from: UnsafeRawBufferPointer(tbuf.bytes))
        return (at, table)
    }

    /// `count` contiguous clusters with refcount 1 and no user, for bitmap
    /// tables and directories; returns the host offset. Single clusters
    /// come from the reserve (QEMU's layout after a store).
    func allocateBitmapClustersLocked(_ count: Int64) async throws(BlockError) -> Int64 {
        if count == 1 {
            let (c, _) = try await allocateClusters(1)
            return c * Int64(geo.clusterSize)
        }
        return try await allocateContiguousLocked(count, asMetadata: false) * Int64(geo.clusterSize)
    }

    // MARK: - Operations (qemu-img bitmap, convert --bitmaps)

    /// The persistent bitmaps of this open image, in directory order.
    public func persistentBitmaps() async -> [PersistentBitmapInfo] {
        await lock.withLock {
            bitmapStore.list.map {
                PersistentBitmapInfo(name: $0.name, granularity: Int64(1) << Int64($0.granularityBits),
                                     enabled: $0.enabled, inconsistent: $0.inconsistent)
            }
        }
    }

    /// QEMU's bdrv_get_default_bitmap_granularity for qcow2.
    public var defaultBitmapGranularity: Int64 { Int64(min(65536, max(4096, geo.clusterSize))) }

    /// QEMU's qcow2_co_can_store_new_dirty_bitmap (message without the
    /// "Can't make bitmap ... persistent" prefix).
    public func canStoreNewBitmap(name: String, granularity: Int64) async throws(BlockError) {
        if header.version < 3 { throw BlockError.unsupported("Cannot store dirty bitmaps in qcow2 v2 files") }
        let bits = granularity.trailingZeroBitCount
        if bits > Qcow2BitmapLimits.maxGranularityBits {
            throw BlockError.invalid("Granularity exceeds maximum (\(UInt64(1) << UInt64(Qcow2BitmapLimits.maxGranularityBits)) bytes)")
        }
        if bits < Qcow2BitmapLimits.minGranularityBits {
            throw BlockError.invalid("Granularity is under minimum (\(1 << Qcow2BitmapLimits.minGranularityBits) bytes)")
        }
        let granules = (UInt64(header.size) + UInt64(granularity) - 1) >> UInt64(bits)
        let bitmapBytes = (granules + 7) / 8
        if bitmapBytes > Qcow2BitmapLimits.maxPhysSize || bitmapBytes > Qcow2BitmapLimits.maxTableSize * UInt64(geo.clusterSize) {
            throw BlockError.invalid("Too much space will be occupied by the bitmap. Use larger granularity")
        }
        if name.utf8.count > Qcow2BitmapLimits.maxNameSize {
            throw BlockError.invalid("Name length exceeds maximum (\(Qcow2BitmapLimits.maxNameSize) characters)")
        }
        let onDisk = await lock.withLock { header.bitmaps }
        guard let ext = onDisk, header.autoclearFeatures & Qcow2.autoclearBitmaps != 0 else { return }
        if Int(ext.count) >= Qcow2BitmapLimits.maxBitmaps {
            throw BlockError.invalid("Maximum number of persistent bitmaps is already reached")
        }
        if Int(ext.directorySize) + Qcow2BitmapLimits.entrySize(nameBytes: name.utf8.count) > Qcow2BitmapLimits.maxDirectorySize {
            throw BlockError.invalid("Not enough space in the bitmap directory")
        }
    }

    /// Adds an empty persistent bitmap (stored at close).
    public func addBitmap(name: String, granularity: Int64, enabled: Bool) async {
        await lock.withLock {
            let bm = DirtyBitmap(size: Int64(header.size), granularity: granularity)
            // QEMU stores the bitmaps already on disk in directory order,
            // then new ones newest first (its in-memory list order).
            let at = bitmapStore.list.firstIndex { $0.entryOffset == nil } ?? bitmapStore.list.count
            bitmapStore.list.insert(StoredBitmap(name: name, granularityBits: UInt8(granularity.trailingZeroBitCount),
                                                 enabled: enabled, inconsistent: false, bits: bm), at: at)
            bitmapStore.modified = true
            updateTrackedBitmaps()
        }
    }

    /// Removes a bitmap; its clusters are released after the next store.
    public func removeBitmap(name: String) async throws(BlockError) {
        try await lock.withLock { () async throws(BlockError) in
            guard let i = bitmapStore.list.firstIndex(where: { $0.name == name }) else {
                throw BlockError(.notFound, errno: 2, "Dirty bitmap '\(name)' not found")
            }
            var b = bitmapStore.list.remove(at: i)
            if b.entryOffset != nil {
                if b.inconsistent && b.table.isEmpty { b.table = (try? await readBitmapTable(b)) ?? [] }
                bitmapStore.orphans += rangesOf(b)
            }
            bitmapStore.modified = true
            updateTrackedBitmaps()
        }
    }

    /// Enables or disables a bitmap (whether writes mark it).
    public func setBitmapEnabled(name: String, _ enabled: Bool) async {
        await lock.withLock {
            guard let i = bitmapStore.list.firstIndex(where: { $0.name == name }) else { return }
            if bitmapStore.list[i].enabled != enabled {
                bitmapStore.list[i].enabled = enabled
                bitmapStore.modified = true
                updateTrackedBitmaps()
            }
        }
    }

    /// The live bits of a consistent bitmap (nil: unknown or inconsistent).
    public func bitmapBits(name: String) async -> DirtyBitmap? {
        await lock.withLock { bitmapStore.list.first { $0.name == name }?.bits }
    }

    /// Clears a bitmap's bits.
    public func clearBitmap(name: String) async {
        await lock.withLock {
            guard let b = bitmapStore.list.first(where: { $0.name == name })?.bits else { return }
            b.clearAll()
            bitmapStore.modified = true
        }
    }

    /// ORs `source` into bitmap `name`.
    public func mergeIntoBitmap(name: String, from source: DirtyBitmap) async {
        await lock.withLock {
            guard let b = bitmapStore.list.first(where: { $0.name == name })?.bits else { return }
            b.merge(from: source)
            bitmapStore.modified = true
        }
    }
}

// MARK: - Resize (for the truncate path)

extension Qcow2Image {
    /// QEMU's qcow2_truncate_bitmaps_check: an image whose bitmaps include
    /// an inconsistent one cannot be resized. Called with `lock` held
    /// before a resize changes anything.
    func checkBitmapsResizableLocked() throws(BlockError) {
        // QEMU walks a node's bitmaps newest first.
        for b in bitmapStore.list.reversed() where b.inconsistent {
            throw BlockError.invalid("Bitmap '\(b.name)' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk")
        }
    }

    /// Follows a new virtual size (`header.size` already updated): every
    /// bitmap keeps its bits below the new end, a grown area is clean; the
    /// bitmaps are stored at close. Called with `lock` held.
    func resizeBitmapsLocked(to newSize: Int64) {
        guard !bitmapStore.list.isEmpty else { return }
        for i in bitmapStore.list.indices {
            guard let old = bitmapStore.list[i].bits else { continue }
            let new = DirtyBitmap(size: newSize, granularity: old.granularity)
            new.setWords(old.snapshotWords())
            bitmapStore.list[i].bits = new
        }
        bitmapStore.modified = true
        updateTrackedBitmaps()
    }
}
