import BlockCore
import BlockGraph

/// Emptying an image after `qemu-img commit` (QEMU's qcow2_make_empty):
/// every guest cluster becomes unallocated, so the image reads from its
/// backing file again.
extension Qcow2Image {
    /// Empties the active layer. Like QEMU, an image that holds nothing but
    /// the active mapping (v3, no snapshots, no bitmaps, no encryption) is
    /// reset to a freshly created layout: header, refcount table, one
    /// refcount block, L1 table, and the file cut after them. Other images
    /// get every cluster discarded (entries cleared, clusters freed).
    ///
    /// Crash safety: the L1 table is cleared (and made durable) first, so
    /// from then on nothing but the fixed metadata is referenced and every
    /// later step only lowers refcounts of unreferenced clusters (leaks at
    /// worst); only then are refcount blocks dropped and the file cut.
    public func makeEmpty() async throws(BlockError) {
        if isReadOnly { throw BlockError(.permissionDenied, errno: 1, "Block node is read-only") }
        await ioGate.waitIdle()
        await lock.lock()
        let fast: Bool
        do throws(BlockError) {
            try await ensureWritableLocked()
            fast = canResetLayoutLocked()
            if fast { try await resetLayoutLocked() }
        } catch {
            lock.unlock()
            throw error
        }
        lock.unlock()
        if fast { return }
        // The general way: clear every entry, freeing what it referenced.
        let cs = Int64(geo.clusterSize)
        try await rewriteEntries(0, divRoundUp(length, cs)) { e, _ in
            let allocated = e & Qcow2.oflagCompressed != 0 || e & Qcow2.l2OffsetMask != 0
            return (0, 0, allocated)
        }
    }

    /// The layout QEMU's make_completely_empty produces, and whether this
    /// image already has it where it matters: refcount table in cluster 1
    /// (one cluster), its first refcount block in cluster 2, the L1 table
    /// from cluster 3, all described by that first block.
    private func canResetLayoutLocked() -> Bool {
        let cs = Int64(geo.clusterSize)
        let l1Clusters = divRoundUp(Int64(header.l1Size) * 8, cs)
        guard header.version >= 3, header.nbSnapshots == 0, snapshots.isEmpty,
              header.cryptMethod == 0,
              header.incompatibleFeatures & Qcow2.incompatDataFile == 0,
              header.bitmaps == nil || header.bitmaps!.count == 0,
              3 + l1Clusters <= refblockEntries,
              Int64(header.refcountTableOffset) == cs, header.refcountTableClusters == 1,
              !refTable.isEmpty, Int64(refTable[0] & Qcow2.refTableOffsetMask) == 2 * cs,
              Int64(header.l1TableOffset) == 3 * cs || header.l1Size == 0
        else { return false }
        return true
    }

    private func resetLayoutLocked() async throws(BlockError) {
        let cs = Int64(geo.clusterSize)
        let l1Clusters = divRoundUp(Int64(header.l1Size) * 8, cs)
        // Write back first: no cached table may be written after this.
        try await writebackL2Locked()
        try await releaseReserveLocked()
        try await barrier()
        try await applyFreesLocked(durable: true, force: true)
        // 1. Nothing mapped any more.
        file.debugEvent(.l1Update)
        if header.l1Size > 0 {
            let bytes = Int(alignUp(Int64(header.l1Size) * 8, 512))
            let zeros = AlignedBuffer(count: bytes, zeroed: true)
            try await file.write(at: Int64(header.l1TableOffset), from: UnsafeRawBufferPointer(zeros.bytes))
            for i in l1.indices { l1[i] = 0 }
        }
        l2Cache.removeAll()
        try await barrier()
        // 2. Drop every refcount block but the first (it describes all that
        //    is still referenced).
        file.debugEvent(.emptyImagePrepare)
        if refTable.count > 1, refTable[1...].contains(where: { $0 != 0 }) {
            file.debugEvent(.reftableUpdate)
            for i in 1..<refTable.count { refTable[i] = 0 }
            let buf = AlignedBuffer(count: geo.clusterSize, zeroed: true)
            buf.pointer.storeBytes(of: refTable[0].bigEndian, as: UInt64.self)
            try await file.write(at: cs, from: UnsafeRawBufferPointer(buf.bytes))
            try await barrier()
        }
        // 3. Refcount 1 for the fixed metadata, 0 for everything else.
        let block = AlignedBuffer(count: geo.clusterSize, zeroed: true)
        for c in 0..<(3 + l1Clusters) {
            RefcountCodec.set(block.pointer, Int(c), order: geo.refcountOrder, 1)
        }
        file.debugEvent(.refblockAlloc)
        try await file.write(at: 2 * cs, from: UnsafeRawBufferPointer(block.bytes))
        refCache.removeAll()
        try await barrier()
        // 4. Nothing lives past the metadata now.
        try await file.truncate(to: (3 + l1Clusters) * cs)
        reserveStart = 0
        reserveCount = 0
        freeClusterHint = 0
        compressedFreeByte = 0
        pendingFrees = []
        metadataClusters = nil
        refcountsNeedSync = false
        releaseReservePending = false
        freedBelowReserve = false
    }
}

extension Qcow2Image {
    /// The errno QEMU's qcow2_change_backing_file would fail with for this
    /// change (0: it fits): EINVAL for a name over 1023 bytes, ENOSPC when
    /// the header would outgrow its cluster. Lets a caller refuse before
    /// changing anything.
    public func backingChangeErrno(_ name: String?, format: String?) async -> Int32 {
        if let n = name, n.utf8.count > 1023 { return 22 }
        var h = await currentHeader()
        h.backingFile = name
        h.backingFormat = name == nil ? nil : format
        do throws(BlockError) {
            _ = try h.serialize()
        } catch {
            return 28
        }
        return 0
    }
}
