import BlockCore
import BlockGraph

public struct Qcow2CreateOptions: Sendable {
    public var size: Int64 = 0
    public var clusterSize: Int = 65536
    public var version: UInt32 = 3
    public var lazyRefcounts = false
    public var extendedL2 = false
    public var compressionType: CompressionType = .zlib
    public var refcountBits = 16
    public var backingFile: String?
    public var backingFormat: String?
    public var preallocation: Preallocation = .off
    public init() {}

    /// QEMU's qcow2_co_create checks, in its order, with its messages.
    public func validate() throws(BlockError) {
        if clusterSize < 512 || clusterSize > 2 << 20 || clusterSize & (clusterSize - 1) != 0 {
            throw BlockError.invalid("Cluster size must be a power of two between 512 and 2048k")
        }
        if extendedL2 && clusterSize < 16384 {
            throw BlockError.invalid("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes")
        }
        if version < 3 && lazyRefcounts {
            throw BlockError.invalid("Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)")
        }
        if refcountBits > 64 || refcountBits < 1 || refcountBits & (refcountBits - 1) != 0 {
            throw BlockError.invalid("Refcount width must be a power of two and may not exceed 64 bits")
        }
        if version < 3 && refcountBits != 16 {
            throw BlockError.invalid("Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)")
        }
        if extendedL2 && version < 3 {
            throw BlockError.invalid("Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)")
        }
        if backingFile != nil && preallocation != .off && !extendedL2 {
            throw BlockError.invalid("Backing file and preallocation can only be used at the same time if extended_l2 is on")
        }
        if backingFormat != nil && backingFile == nil {
            throw BlockError.invalid("Backing format cannot be used without backing file")
        }
        if version < 3 && compressionType != .zlib {
            throw BlockError.invalid("Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)")
        }
        if size < 0 { throw BlockError.invalid("Image size must be a multiple of 512 bytes") }
        let entries = Int64(clusterSize / (extendedL2 ? 16 : 8))
        let l1 = divRoundUp(size, Int64(clusterSize) * entries)
        if l1 * 8 > Qcow2.maxL1Bytes {
            throw BlockError(.invalidArgument, errno: 27, "The image size is too large for file format 'qcow2' (try using a larger cluster size)")
        }
    }
}

public enum Qcow2Creator {
    /// Writes a new, empty qcow2 image of `options.size` into `file` (which
    /// must be empty): header, refcount table, refcount blocks, L1 table.
    /// The layout for small images is QEMU's: header, refcount table,
    /// refcount block, then the L1 table, each in its own cluster.
    public static func create(file: BlockNode, options o: Qcow2CreateOptions) async throws(BlockError) {
        try o.validate()
        let cs = Int64(o.clusterSize)
        var h = Qcow2Header()
        h.version = o.version
        h.clusterBits = UInt32(o.clusterSize.trailingZeroBitCount)
        h.size = UInt64(o.size)
        h.refcountOrder = UInt32(o.refcountBits.trailingZeroBitCount)
        if o.version >= 3 {
            h.headerLength = UInt32(Qcow2.v3HeaderLength)
            if o.lazyRefcounts { h.compatibleFeatures |= Qcow2.compatLazyRefcounts }
            if o.extendedL2 { h.incompatibleFeatures |= Qcow2.incompatExtendedL2 }
            if o.compressionType != .zlib {
                h.incompatibleFeatures |= Qcow2.incompatCompression
                h.compressionType = o.compressionType.rawValue
            }
            h.extensions.append(Qcow2Header.standardFeatureTable())
        } else {
            h.headerLength = UInt32(Qcow2.v2HeaderLength)
        }
        if let b = o.backingFile {
            h.backingFile = b
            if let f = o.backingFormat { h.backingFormat = f }
        }
        let g = Qcow2Geometry(header: h)
        let l1Entries = g.l1EntriesFor(size: o.size)
        if l1Entries * 8 > Qcow2.maxL1Bytes {
            throw BlockError(.invalidArgument, errno: 27, "Could not resize image: Image size is too large for this cluster size")
        }
        let l1Bytes = l1Entries * 8
        let l1Clusters = divRoundUp(max(l1Bytes, 1), cs)
        // Fixpoint: refcount blocks and table clusters needed to describe the metadata.
        var rtClusters: Int64 = 1
        var blocks: Int64 = 1
        while true {
            let total = 1 + rtClusters + blocks + (l1Entries > 0 ? l1Clusters : 0)
            let needBlocks = divRoundUp(total, Int64(g.refblockEntries))
            let needRT = divRoundUp(needBlocks * 8, cs)
            if needBlocks == blocks && needRT == rtClusters { break }
            blocks = max(blocks, needBlocks)
            rtClusters = max(rtClusters, needRT)
        }
        // QEMU's layout: header, refcount table, the first refcount block,
        // the L1 table, then any further refcount blocks the L1 needs.
        let rtOffset = cs
        let firstBlockOffset = rtOffset + rtClusters * cs
        let l1Offset = firstBlockOffset + cs
        let extraBlocksOffset = l1Offset + (l1Entries > 0 ? l1Clusters : 0) * cs
        func blockOffset(_ i: Int64) -> Int64 { i == 0 ? firstBlockOffset : extraBlocksOffset + (i - 1) * cs }
        h.refcountTableOffset = UInt64(rtOffset)
        h.refcountTableClusters = UInt32(rtClusters)
        h.l1Size = UInt32(l1Entries)
        h.l1TableOffset = l1Entries > 0 ? UInt64(l1Offset) : 0
        let usedClusters = 1 + rtClusters + blocks + (l1Entries > 0 ? l1Clusters : 0)

        // Header cluster.
        let headerBytes = try h.serialize()
        let hb = AlignedBuffer(count: Int(cs), zeroed: true)
        headerBytes.withUnsafeBytes { hb.bytes.copyMemory(from: $0) }
        // Refcount table.
        let rt = AlignedBuffer(count: Int(rtClusters * cs), zeroed: true)
        for i in 0..<blocks { rt.setBE64(Int(i), UInt64(blockOffset(i))) }
        try await file.write(at: 0, from: UnsafeRawBufferPointer(hb.bytes))
        try await file.write(at: rtOffset, from: UnsafeRawBufferPointer(rt.bytes))
        // Refcount blocks: every used cluster has refcount 1.
        for i in 0..<blocks {
            let rb = AlignedBuffer(count: Int(cs), zeroed: true)
            let first = i * Int64(g.refblockEntries)
            for c in first..<min(usedClusters, first + Int64(g.refblockEntries)) {
                RefcountCodec.set(rb.pointer, Int(c - first), order: g.refcountOrder, 1)
            }
            try await file.write(at: blockOffset(i), from: UnsafeRawBufferPointer(rb.bytes))
        }
        if l1Entries > 0 {
            // QEMU writes exactly the L1 entries (the file ends there unless
            // further refcount blocks follow).
            let l1b = AlignedBuffer(count: Int(l1Bytes), zeroed: true)
            try await file.write(at: l1Offset, from: UnsafeRawBufferPointer(l1b.bytes))
        }
        try await file.flush()
    }
}

extension Qcow2Image {
    /// Allocates every cluster of the image (preallocation=metadata, and
    /// the host part of falloc/full), in QEMU's order: each L2 table, then
    /// the data clusters it maps.
    public func preallocate(_ mode: Preallocation) async throws(BlockError) {
        guard mode != .off else { return }
        let cs = Int64(geo.clusterSize)
        let size = length
        let totalClusters = divRoundUp(size, cs)
        await lock.lock()
        defer { lock.unlock() }
        var c: Int64 = 0
        var hostEnd: Int64 = 0
        if mode != .metadata && totalClusters > 0 {
            // falloc/full: all metadata first, then one data area after it.
            for l1i in 0...geo.l1Index((totalClusters - 1) * cs) {
                _ = try await l2TableForWriteLocked(l1i)
            }
        }
        while c < totalClusters {
            let guest = c * cs
            let (l2Off, table) = try await l2TableForWriteLocked(geo.l1Index(guest))
            let tableEnd = min(totalClusters, (c / Int64(geo.l2Entries) + 1) * Int64(geo.l2Entries))
            var i = c
            while i < tableEnd {
                if table.l2Entry(geo.l2Index(i * cs), geo) & Qcow2.l2OffsetMask != 0 {
                    i += 1
                    continue
                }
                var n: Int64 = 1
                while i + n < tableEnd && table.l2Entry(geo.l2Index((i + n) * cs), geo) & Qcow2.l2OffsetMask == 0 { n += 1 }
                let (hc, got) = try await allocateClusters(n)
                for k in 0..<got {
                    let j = geo.l2Index((i + k) * cs)
                    table.setL2Entry(j, geo, UInt64((hc + k) * cs) | Qcow2.oflagCopied)
                    // With subclusters, QEMU reserves the host cluster but leaves
                    // every subcluster unallocated (the backing file shows through).
                    if geo.extendedL2 { table.setL2Bitmap(j, geo, 0) }
                }
                hostEnd = max(hostEnd, (hc + got) * cs)
                i += got
            }
            l2Cache.markDirty(l2Off, 0..<geo.clusterSize)
            try await writebackIfNeededLocked()
            c = tableEnd
        }
        try await releaseReserveLocked()
        // The file must cover every allocated cluster; falloc/full also
        // reserve or write the host space of the data clusters.
        // Drop the space reserved ahead of writes, then size the file.
        try await file.releaseUnusedSpace()
        if hostEnd > file.length {
            try await file.truncate(to: hostEnd, preallocation: mode == .metadata ? .off : mode)
        }
    }
}
