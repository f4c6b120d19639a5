import BlockCore
import BlockGraph
import CLaminaSys

/// What a stretch of guest bytes maps to, as planned under the lock and
/// executed outside it.
enum ExtentKind: Equatable {
    case data(host: Int64)
    case zero
    /// Not allocated in this image: read through to the backing file.
    case backing
    /// Inside a compressed cluster whose L2 entry is `entry`; `clusterStart`
    /// is the guest offset of that cluster.
    case compressed(entry: UInt64, clusterStart: Int64)
}

struct Extent {
    var guest: Int64
    var length: Int64
    var kind: ExtentKind
}

/// Cluster mapping: L1/L2 lookup and planning of reads. Functions ending in
/// `Locked` run with `lock` held.
extension Qcow2Image {
    /// The L2 table for `l1Index`, or nil if none is allocated.
    func l2TableLocked(_ l1Index: Int) async throws(BlockError) -> (Int64, AlignedBuffer)? {
        guard l1Index < l1.count else { return nil }
        let e = l1[l1Index]
        let off = Int64(e & Qcow2.l1OffsetMask)
        if off == 0 { return nil }
        if let b = l2Cache.lookup(off) { return (off, b) }
        if off % Int64(geo.clusterSize) != 0 {
            throw await corruption("L2 table offset \(hex(off)) unaligned (L1 index: \(hex(Int64(l1Index))))")
        }
        let b = AlignedBuffer(count: geo.clusterSize)
        file.debugEvent(.l2Load)
        try await Qcow2Image.readInto(file, b, off)
        l2Cache.insert(off, b)
        return (off, b)
    }

    /// Maps `[guest, guest+length)` up to the end of one L2 table. The
    /// returned extents cover a prefix of the range (at least one byte).
    func mapLocked(_ guest: Int64, _ length: Int64) async throws(BlockError) -> [Extent] {
        let cs = Int64(geo.clusterSize)
        let l1i = geo.l1Index(guest)
        let tableSpan = cs * Int64(geo.l2Entries)
        let tableEnd = (guest / tableSpan + 1) * tableSpan
        let end = min(guest + length, tableEnd)
        var out: [Extent] = []
        func add(_ g: Int64, _ len: Int64, _ k: ExtentKind) {
            if var last = out.last, last.guest + last.length == g {
                switch (last.kind, k) {
                case (.zero, .zero), (.backing, .backing):
                    last.length += len
                    out[out.count - 1] = last
                    return
                case (.data(let h1), .data(let h2)) where h1 + last.length == h2:
                    last.length += len
                    out[out.count - 1] = last
                    return
                default: break
                }
            }
            out.append(Extent(guest: g, length: len, kind: k))
        }
        guard let (l2Off, table) = try await l2TableLocked(l1i) else {
            add(guest, end - guest, .backing)
            return out
        }
        var g = guest
        while g < end {
            let idx = geo.l2Index(g)
            let entry = table.l2Entry(idx, geo)
            let bitmap = table.l2Bitmap(idx, geo)
            let clusterStart = g - geo.offsetInCluster(g)
            let clusterEnd = min(clusterStart + cs, end)
            if entry & Qcow2.oflagCompressed != 0 {
                if geo.extendedL2 && bitmap != 0 {
                    throw await corruption("Compressed cluster entry with non-zero subcluster bitmap (L2 offset: \(hex(l2Off)), L2 index: \(hex(Int64(idx))))")
                }
                add(g, clusterEnd - g, .compressed(entry: entry, clusterStart: clusterStart))
                g = clusterEnd
                continue
            }
            let host = Int64(entry & Qcow2.l2OffsetMask)
            if host % cs != 0 {
                throw await corruption("Cluster allocation offset \(hex(host)) unaligned (L2 offset: \(hex(l2Off)), L2 index: \(hex(Int64(idx))))")
            }
            if !geo.extendedL2 {
                let kind = geo.subclusterKind(entry: geo.version >= 3 ? entry : entry & ~Qcow2.oflagZero, bitmap: 0, sc: 0)
                switch kind {
                case .normal(let h): add(g, clusterEnd - g, .data(host: h + (g - clusterStart)))
                case .zeroPlain, .zeroAlloc: add(g, clusterEnd - g, .zero)
                default: add(g, clusterEnd - g, .backing)
                }
                g = clusterEnd
                continue
            }
            // Extended L2: walk subclusters.
            let scs = Int64(geo.subclusterSize)
            while g < clusterEnd {
                let sc = Int((g - clusterStart) / scs)
                let scEnd = min(clusterStart + Int64(sc + 1) * scs, clusterEnd)
                switch geo.subclusterKind(entry: entry, bitmap: bitmap, sc: sc) {
                case .normal(let h): add(g, scEnd - g, .data(host: h + (g - clusterStart - Int64(sc) * scs)))
                case .zeroPlain, .zeroAlloc: add(g, scEnd - g, .zero)
                case .unallocated, .unallocatedAlloc: add(g, scEnd - g, .backing)
                case .invalid:
                    throw await corruption("Invalid cluster entry found  (L2 offset: \(hex(l2Off)), L2 index: \(hex(Int64(idx))))")
                case .compressed: break
                }
                g = scEnd
            }
        }
        return out
    }

    // MARK: - Executing reads

    /// Reads planned extents into `buffer` (which starts at guest offset
    /// `base`). Runs outside the lock. Tells the file node `read_aio`
    /// before reading guest data from it (QEMU's BLKDBG_EVENT).
    func readExtents(_ extents: [Extent], base: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws(BlockError) {
        for e in extents {
            let dst = UnsafeMutableRawBufferPointer(rebasing: buffer[Int(e.guest - base)..<Int(e.guest - base + e.length)])
            switch e.kind {
            case .data(let host):
                let file = self.file
                file.debugEvent(.readAio)
                try await file.read(at: host, into: dst)
            case .zero:
                dst.zeroFill()
            case .backing:
                try await readBacking(e.guest, dst)
            case .compressed(let entry, let clusterStart):
                let cluster = try await decompressCluster(entry)
                let from = Int(e.guest - clusterStart)
                dst.copyMemory(from: UnsafeRawBufferPointer(cluster.slice(from, dst.count)))
            }
        }
    }

    /// Reads guest bytes from the backing node; what lies past its end (or
    /// with no backing file at all) reads as zeroes.
    func readBacking(_ guest: Int64, _ dst: UnsafeMutableRawBufferPointer) async throws(BlockError) {
        guard let b = backing else {
            dst.zeroFill()
            return
        }
        file.debugEvent(.readBackingAio)
        let blen = b.length
        let avail = max(0, min(Int64(dst.count), blen - guest))
        if avail > 0 {
            try await b.read(at: guest, into: UnsafeMutableRawBufferPointer(rebasing: dst[0..<Int(avail)]))
        }
        if Int(avail) < dst.count {
            UnsafeMutableRawBufferPointer(rebasing: dst[Int(avail)...]).zeroFill()
        }
    }

    func decompressCluster(_ entry: UInt64) async throws(BlockError) -> AlignedBuffer {
        let (off, len) = geo.compressedRange(entry)
        let cbuf = AlignedBuffer(count: len)
        file.debugEvent(.readCompressed)
        try await file.read(at: off, into: cbuf.bytes)
        let out = AlignedBuffer(count: geo.clusterSize)
        let rc: Int32
        if header.compressionType == CompressionType.zstd.rawValue {
            rc = lamina_zstd_decompress(cbuf.pointer, len, out.pointer, geo.clusterSize)
        } else {
            rc = lamina_inflate_raw(cbuf.pointer, len, out.pointer, geo.clusterSize)
        }
        if rc != 0 {
            throw BlockError.io("Could not decompress cluster at host offset \(hex(off))", errno: 5)
        }
        return out
    }

    // MARK: - Driver: read and block status

    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws(BlockError) {
        var done: Int64 = 0
        let total = Int64(buffer.count)
        while done < total {
            let g = offset + done
            await lock.lock()
            let extents: [Extent]
            do throws(BlockError) {
                extents = try await mapLocked(g, total - done)
            } catch {
                lock.unlock()
                throw error
            }
            let epoch = ioGate.enter()
            lock.unlock()
            defer { ioGate.leave(epoch) }
            let got = extents.reduce(Int64(0)) { $0 + $1.length }
            let slice = UnsafeMutableRawBufferPointer(rebasing: buffer[Int(done)..<Int(done + got)])
            try await readExtents(extents, base: g, into: slice)
            done += got
        }
    }

    public var supportsBacking: Bool { true }

    public func blockStatus(at offset: Int64, length: Int64) async throws(BlockError) -> BlockStatus {
        await lock.lock()
        defer { lock.unlock() }
        if metadataPreallocation == nil {
            metadataPreallocation = try await detectMetadataPreallocationLocked()
        }
        let cs = Int64(geo.clusterSize)
        let tableSpan = cs * Int64(geo.l2Entries)
        let end = min(offset + length, (offset / tableSpan + 1) * tableSpan)
        guard let (l2Off, table) = try await l2TableLocked(geo.l1Index(offset)) else {
            return BlockStatus(flags: [], length: end - offset)
        }
        let unit = Int64(geo.subclusterSize)
        return try await mergedStatus(from: offset, to: end) { g throws(BlockError) in
            let idx = geo.l2Index(g)
            let entry = table.l2Entry(idx, geo)
            let inCluster = geo.offsetInCluster(g)
            let sc = Int(inCluster / unit)
            let raw = geo.version >= 3 || geo.extendedL2 ? entry : entry & ~Qcow2.oflagZero
            switch geo.subclusterKind(entry: raw, bitmap: table.l2Bitmap(idx, geo), sc: sc) {
            case .normal(let h):
                if h % cs != Int64(sc) * unit % cs {
                    throw await corruption("Cluster allocation offset \(hex(h - Int64(sc) * unit)) unaligned (L2 offset: \(hex(l2Off)), L2 index: \(hex(Int64(idx))))")
                }
                let flags: BlockStatus.Flags = metadataPreallocation == true ? [.data, .offsetValid, .recurse] : [.data, .offsetValid]
                return (flags, h + (inCluster - Int64(sc) * unit))
            case .zeroAlloc(let h):
                return ([.zero, .offsetValid], h + (inCluster - Int64(sc) * unit))
            case .unallocatedAlloc(let h):
                return ([.offsetValid], h + (inCluster - Int64(sc) * unit))
            case .zeroPlain:
                return ([.zero], 0)
            case .unallocated:
                return ([], 0)
            case .compressed:
                return ([.data, .compressed], 0)
            case .invalid:
                throw await corruption("Invalid cluster entry found  (L2 offset: \(hex(l2Off)), L2 index: \(hex(Int64(idx))))")
            }
        }
    }

    /// The status of [offset, end) (within one L2 table) as one run: the
    /// allocation units (subclusters) from `offset` on, each classified by
    /// `unitStatus` (flags, host offset of the byte at the given guest
    /// offset), merged while the flags stay equal and, where the host
    /// offset is valid, the host bytes stay contiguous.
    func mergedStatus(from offset: Int64, to end: Int64,
                      _ unitStatus: (Int64) async throws(BlockError) -> (BlockStatus.Flags, Int64)) async throws(BlockError) -> BlockStatus {
        let unit = Int64(geo.subclusterSize)
        var g = offset
        var runFlags: BlockStatus.Flags?
        var runHost: Int64 = 0
        var runLen: Int64 = 0
        while g < end {
            let (flags, host) = try await unitStatus(g)
            if let rf = runFlags {
                if rf != flags || (flags.contains(.offsetValid) && host != runHost + runLen) { break }
            } else {
                runFlags = flags
                runHost = host
            }
            let unitEnd = min(alignDown(g, unit) + unit, end)
            runLen += unitEnd - g
            g = unitEnd
        }
        let f = runFlags ?? []
        return BlockStatus(flags: f, length: runLen, hostOffset: runHost, hostNode: f.contains(.offsetValid) ? file : nil)
    }

    /// QEMU's heuristic: an image whose refcounted clusters clearly exceed
    /// what the host file really allocates was preallocated with metadata,
    /// so block status must ask the file whether data clusters are holes.
    func detectMetadataPreallocationLocked() async throws(BlockError) -> Bool {
        let fileLength = file.length
        let real: Int64
        if let f = file.driver as? any HostBackedDriver {
            real = (try? f.allocatedBytes()) ?? fileLength
        } else {
            return false
        }
        let cs = Int64(geo.clusterSize)
        let realClusters = real / cs
        let threshold = max(realClusters * 10 / 9, realClusters + 2)
        let endCluster = divRoundUp(fileLength, cs)
        var count: Int64 = 0
        var c: Int64 = 0
        while c < endCluster && count < threshold {
            if try await refcount(c) != 0 { count += 1 }
            c += 1
        }
        return count >= threshold
    }
}
