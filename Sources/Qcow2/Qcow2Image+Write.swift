import BlockCore
import BlockGraph
import BlockIO
import CLaminaSys

/// How one guest cluster is written (QEMU's handle_copied / handle_alloc).
enum ClusterWriteClass: Equatable {
    /// Allocated, refcount 1, every touched subcluster holds data: overwrite.
    case inPlace(host: Int64)
    /// The host cluster can be reused but some bytes must be filled first
    /// (zero cluster with preallocation, or unallocated/zero subclusters).
    case fill(host: Int64)
    /// A new host cluster is needed (unallocated, zero, compressed or shared).
    case allocate
}

extension Qcow2Image {
    static let allZeroBitmap: UInt64 = 0xffff_ffff_0000_0000
    static let allAllocBitmap: UInt64 = 0x0000_0000_ffff_ffff

    // MARK: - L1 / L2 for writing

    func writeL1EntryLocked(_ i: Int) async throws(BlockError) {
        file.debugEvent(.l1Update)
        let a = max(8, file.driver.requestAlignment)
        let perSpan = a / 8
        let first = i / perSpan * perSpan
        let last = min(l1.count, first + perSpan)
        let buf = AlignedBuffer(count: a, zeroed: true)
        for j in first..<last { buf.setBE64(j - first, l1[j]) }
        let bytes = a == 8 ? 8 : (last - first) * 8
        // With an alignment > 8 the tail of the span past the table is written
        // only if the table ends there; the file keeps what follows.
        if a > 8 && last - first < perSpan {
            // Preserve bytes after the end of the L1 table in that span.
            let tail = AlignedBuffer(count: a)
            try await file.read(at: Int64(header.l1TableOffset) + Int64(first * 8), into: tail.bytes)
            for j in first..<last { tail.setBE64(j - first, l1[j]) }
            try await file.write(at: Int64(header.l1TableOffset) + Int64(first * 8), from: UnsafeRawBufferPointer(tail.bytes))
            return
        }
        try await file.write(at: Int64(header.l1TableOffset) + Int64(first * 8), from: UnsafeRawBufferPointer(buf.slice(0, bytes)))
    }

    /// The L2 table for `l1Index`, allocated or copied (if shared) so that
    /// it can be modified in place.
    func l2TableForWriteLocked(_ l1Index: Int) async throws(BlockError) -> (Int64, AlignedBuffer) {
        let e = l1[l1Index]
        let old = Int64(e & Qcow2.l1OffsetMask)
        if old != 0 && e & Qcow2.oflagCopied != 0 {
            return try await l2TableLocked(l1Index)!
        }
        let cs = Int64(geo.clusterSize)
        let buf = AlignedBuffer(count: geo.clusterSize, zeroed: true)
        if old != 0 {
            file.debugEvent(.l2AllocCowRead)
            if let (_, oldTable) = try await l2TableLocked(l1Index) {
                buf.bytes.copyMemory(from: UnsafeRawBufferPointer(oldTable.bytes))
            }
        }
        let (c, _) = try await allocateClusters(1)
        let newOff = c * cs
        if newOff == 0 { throw await corruption("Preventing invalid allocation of L2 table at offset 0") }
        try await checkOverlap(newOff, cs)
        file.debugEvent(.l2AllocWrite)
        try await file.write(at: newOff, from: UnsafeRawBufferPointer(buf.bytes))
        noteMetadata(cluster: c)
        l1[l1Index] = UInt64(newOff) | Qcow2.oflagCopied
        try await writeL1EntryLocked(l1Index)
        l2Cache.insert(newOff, buf)
        if old != 0 {
            l2Cache.remove(old)
            try await freeAfterUnref(old, cs)
        }
        return (newOff, buf)
    }

    // MARK: - In-flight allocations

    func inflightOverlap(_ first: Int64, _ end: Int64) -> AsyncEvent? {
        for a in inflight where a.firstCluster < end && first < a.endCluster { return a.done }
        return nil
    }

    /// Waits (dropping and retaking the lock) until no allocation overlaps
    /// guest clusters [first, end).
    func waitInflightLocked(_ first: Int64, _ end: Int64) async {
        while let ev = inflightOverlap(first, end) {
            lock.unlock()
            await ev.wait()
            await lock.lock()
        }
    }

    func addInflight(_ first: Int64, _ end: Int64) -> AsyncEvent {
        let ev = AsyncEvent()
        inflight.append(InflightAllocation(firstCluster: first, endCluster: end, done: ev))
        return ev
    }

    func removeInflight(_ ev: AsyncEvent) {
        inflight.removeAll { $0.done === ev }
        ev.signal()
    }

    // MARK: - Classification

    func classify(entry: UInt64, bitmap: UInt64, writeStart: Int64, writeEnd: Int64) -> ClusterWriteClass {
        if entry & Qcow2.oflagCompressed != 0 { return .allocate }
        let host = Int64(entry & Qcow2.l2OffsetMask)
        if host == 0 || entry & Qcow2.oflagCopied == 0 { return .allocate }
        if !geo.extendedL2 {
            if geo.version >= 3 && entry & Qcow2.oflagZero != 0 { return .fill(host: host) }
            return .inPlace(host: host)
        }
        let scs = Int64(geo.subclusterSize)
        let first = Int(writeStart / scs)
        let last = Int((writeEnd - 1) / scs)
        for sc in first...last {
            if (bitmap >> UInt64(sc)) & 1 == 0 { return .fill(host: host) }
        }
        return .inPlace(host: host)
    }

    /// Old host bytes an L2 entry holds (to free when it is replaced).
    func hostRange(of entry: UInt64) -> (Int64, Int64)? {
        if entry & Qcow2.oflagCompressed != 0 {
            let (off, len) = geo.compressedRange(entry)
            return (off, Int64(len))
        }
        let host = Int64(entry & Qcow2.l2OffsetMask)
        return host != 0 ? (host, Int64(geo.clusterSize)) : nil
    }

    // MARK: - Write

    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws(BlockError) {
        try await write(at: offset, payload: .memory(buffer), flags: flags)
    }

    /// Data taken from a host file goes to the host clusters by
    /// copy_file_range where the file child supports it.
    public func copyIn(at offset: Int64, from host: HostFile, sourceOffset: Int64, length: Int,
                       flags: WriteFlags) async throws(BlockError) -> Bool {
        try await write(at: offset, payload: .host(host, offset: sourceOffset, count: length), flags: flags)
        return true
    }

    func write(at offset: Int64, payload: WritePayload, flags: WriteFlags) async throws(BlockError) {
        if flags.contains(.compressed), case .memory(let mem) = payload {
            // Whole clusters (the last may be partial), one at a time.
            let cs = geo.clusterSize
            var done = 0
            while done < mem.count {
                let n = min(cs, mem.count - done)
                try await writeCompressed(at: offset + Int64(done), from: UnsafeRawBufferPointer(rebasing: mem[done..<(done + n)]))
                done += n
            }
            return
        }
        var done = 0
        while done < payload.count {
            done += try await writeStep(offset + Int64(done), payload.slice(done, payload.count - done))
        }
        if flags.contains(.fua) { try await flush() }
    }

    /// Writes a prefix of `data` at guest offset `guest` (one run of
    /// clusters of one class) and returns how many bytes it wrote.
    func writeStep(_ guest: Int64, _ data: WritePayload) async throws(BlockError) -> Int {
        let cs = Int64(geo.clusterSize)
        let tableSpan = cs * Int64(geo.l2Entries)
        let limit = min(Int64(data.count), (guest / tableSpan + 1) * tableSpan - guest)
        let firstCluster = guest / cs
        let lastCluster = (guest + limit - 1) / cs

        await lock.lock()
        let l2Off: Int64
        let table: AlignedBuffer
        let idx0: Int
        let cls: ClusterWriteClass
        func range(_ c: Int64) -> (Int64, Int64) {
            let s = max(guest, c * cs) - c * cs
            let e = min(guest + limit, (c + 1) * cs) - c * cs
            return (s, e)
        }
        let (s0, e0) = range(firstCluster)
        do throws(BlockError) {
            try await ensureWritableLocked()
            await waitInflightLocked(firstCluster, lastCluster + 1)
            (l2Off, table) = try await l2TableForWriteLocked(geo.l1Index(guest))
            idx0 = geo.l2Index(guest)
            cls = classify(entry: table.l2Entry(idx0, geo), bitmap: table.l2Bitmap(idx0, geo), writeStart: s0, writeEnd: e0)
        } catch {
            lock.unlock()
            throw error
        }
        switch cls {
        case .inPlace(let host0):
            var n: Int64 = 1
            while firstCluster + n <= lastCluster {
                let i = idx0 + Int(n)
                let (s, e) = range(firstCluster + n)
                guard case .inPlace(let h) = classify(entry: table.l2Entry(i, geo), bitmap: table.l2Bitmap(i, geo), writeStart: s, writeEnd: e),
                      h == host0 + n * cs else { break }
                n += 1
            }
            let len = min(limit, (firstCluster + n) * cs - guest)
            let host = host0 + s0
            do throws(BlockError) {
                try await checkOverlap(host, len)
            } catch {
                lock.unlock()
                throw error
            }
            let epoch = ioGate.enter()
            lock.unlock()
            defer { ioGate.leave(epoch) }
            let file = self.file
            file.debugEvent(.writeAio)
            try await data.slice(0, Int(len)).write(to: file, at: host)
            return Int(len)

        case .fill(let host):
            let len = e0 - s0
            return try await fillClusterLocked(guest: guest, host: host, table: table, l2Off: l2Off, idx: idx0,
                                               start: s0, end: e0, data: data.slice(0, Int(len)))

        case .allocate:
            var n: Int64 = 1
            while firstCluster + n <= lastCluster {
                let i = idx0 + Int(n)
                let (s, e) = range(firstCluster + n)
                guard classify(entry: table.l2Entry(i, geo), bitmap: table.l2Bitmap(i, geo), writeStart: s, writeEnd: e) == .allocate else { break }
                n += 1
            }
            return try await allocateAndWriteLocked(guest: guest, limit: limit, firstCluster: firstCluster, count: n,
                                                    l2Off: l2Off, idx0: idx0, data: data)
        }
    }

    /// Allocates new host clusters for guest clusters [firstCluster, +count)
    /// (fewer if the reserve runs short), writes data and copy-on-write
    /// bytes, then links them into L2. Entered with the lock held; returns
    /// with it released.
    private func allocateAndWriteLocked(guest: Int64, limit: Int64, firstCluster: Int64, count: Int64,
                                        l2Off: Int64, idx0: Int, data: WritePayload) async throws(BlockError) -> Int {
        let cs = Int64(geo.clusterSize)
        let runStart = firstCluster * cs
        let headLen = guest - runStart
        let host: Int64
        let n: Int64
        let writeEnd: Int64
        let tailLen: Int64
        let head: [Extent]
        let tail: [Extent]
        var oldRanges: [(Int64, Int64)] = []
        do throws(BlockError) {
            let (hostCluster, got) = try await allocateClusters(count)
            host = hostCluster * cs
            n = got
            let runEnd = (firstCluster + n) * cs
            writeEnd = min(guest + limit, runEnd)
            tailLen = runEnd - writeEnd
            head = headLen > 0 ? try await mapLocked(runStart, headLen) : []
            tail = tailLen > 0 ? try await mapLocked(writeEnd, tailLen) : []
            guard let (_, table) = try await l2TableLocked(geo.l1Index(guest)) else { preconditionFailure("L2 table vanished") }
            for i in 0..<Int(n) {
                if let r = hostRange(of: table.l2Entry(idx0 + i, geo)) { oldRanges.append(r) }
            }
            do throws(BlockError) {
                try await checkOverlap(host, n * cs)
            } catch {
                try? await freeAfterUnref(host, n * cs)
                throw error
            }
        } catch {
            lock.unlock()
            throw error
        }
        let ev = addInflight(firstCluster, firstCluster + n)
        let epoch = ioGate.enter()
        lock.unlock()

        var ioError: BlockError?
        // QEMU's events: the copy-on-write regions are read (`cow_read`),
        // then the guest data is written (`write_aio`), merged with the
        // regions (`cow_write`) when it touches them.
        let file = self.file
        do throws(BlockError) {
            let dataLen = Int(writeEnd - guest)
            if headLen == 0 && tailLen == 0 {
                file.debugEvent(.writeAio)
                try await data.slice(0, dataLen).write(to: file, at: host)
            } else if n == 1 {
                let bounce = AlignedBuffer(count: Int(cs))
                file.debugEvent(.cowRead)
                try await readExtents(head, base: runStart, into: bounce.slice(0, Int(headLen)))
                try data.slice(0, dataLen).copy(into: bounce.slice(Int(headLen), dataLen))
                try await readExtents(tail, base: writeEnd, into: bounce.slice(Int(cs - tailLen), Int(tailLen)))
                file.debugEvent(.writeAio)
                file.debugEvent(.cowWrite)
                try await file.write(at: host, from: UnsafeRawBufferPointer(bounce.bytes))
            } else {
                var dataPos = 0
                var hostPos = host
                file.debugEvent(.cowRead)
                if headLen > 0 {
                    let bounce = AlignedBuffer(count: Int(cs))
                    try await readExtents(head, base: runStart, into: bounce.slice(0, Int(headLen)))
                    let part = Int(cs - headLen)
                    try data.slice(0, part).copy(into: bounce.slice(Int(headLen), part))
                    file.debugEvent(.writeAio)
                    file.debugEvent(.cowWrite)
                    try await file.write(at: hostPos, from: UnsafeRawBufferPointer(bounce.bytes))
                    dataPos = part
                    hostPos += cs
                }
                let middleEnd = tailLen > 0 ? dataLen - Int(cs - tailLen) : dataLen
                if middleEnd > dataPos {
                    file.debugEvent(.writeAio)
                    try await data.slice(dataPos, middleEnd - dataPos).write(to: file, at: hostPos)
                    hostPos += Int64(middleEnd - dataPos)
                    dataPos = middleEnd
                }
                if tailLen > 0 {
                    let bounce = AlignedBuffer(count: Int(cs))
                    let part = dataLen - dataPos
                    try data.slice(dataPos, part).copy(into: bounce.slice(0, part))
                    try await readExtents(tail, base: writeEnd, into: bounce.slice(part, Int(tailLen)))
                    file.debugEvent(.writeAio)
                    file.debugEvent(.cowWrite)
                    try await file.write(at: hostPos, from: UnsafeRawBufferPointer(bounce.bytes))
                }
            }
        } catch {
            ioError = error
        }

        await lock.lock()
        defer { lock.unlock() }
        ioGate.leave(epoch)
        if let e = ioError {
            removeInflight(ev)
            try? await freeAfterUnref(host, n * cs)
            throw e
        }
        do throws(BlockError) {
            guard let (curOff, cur) = try await l2TableLocked(geo.l1Index(guest)), curOff == l2Off else {
                preconditionFailure("L2 table moved during an allocating write")
            }
            for i in 0..<Int(n) {
                cur.setL2Entry(idx0 + i, geo, UInt64(host + Int64(i) * cs) | Qcow2.oflagCopied)
                if geo.extendedL2 { cur.setL2Bitmap(idx0 + i, geo, Qcow2Image.allAllocBitmap) }
            }
            l2Cache.markDirty(curOff, (idx0 * geo.l2EntrySize)..<((idx0 + Int(n)) * geo.l2EntrySize))
        } catch {
            removeInflight(ev)
            throw error
        }
        removeInflight(ev)
        for (off, len) in oldRanges { try await freeAfterUnref(off, len) }
        try await writebackIfNeededLocked()
        return Int(writeEnd - guest)
    }

    /// Writes into a reusable host cluster whose touched (sub)clusters need
    /// filling first. Entered with the lock held; returns with it released.
    private func fillClusterLocked(guest: Int64, host: Int64, table: AlignedBuffer, l2Off: Int64, idx: Int,
                                   start: Int64, end: Int64, data: WritePayload) async throws(BlockError) -> Int {
        let cs = Int64(geo.clusterSize)
        let clusterGuest = guest - start
        let entry = table.l2Entry(idx, geo)
        let bitmap = table.l2Bitmap(idx, geo)
        let fillStart: Int64
        let fillEnd: Int64
        var newEntry = entry
        var newBitmap = bitmap
        if geo.extendedL2 {
            let scs = Int64(geo.subclusterSize)
            let first = start / scs
            let last = (end - 1) / scs
            fillStart = first * scs
            fillEnd = (last + 1) * scs
            for sc in first...last {
                newBitmap |= UInt64(1) << UInt64(sc)
                newBitmap &= ~(UInt64(1) << UInt64(32 + sc))
            }
        } else {
            fillStart = 0
            fillEnd = cs
            newEntry = entry & ~Qcow2.oflagZero
        }
        let head: [Extent]
        let tail: [Extent]
        do throws(BlockError) {
            head = start > fillStart ? try await mapLocked(clusterGuest + fillStart, start - fillStart) : []
            tail = fillEnd > end ? try await mapLocked(clusterGuest + end, fillEnd - end) : []
            try await checkOverlap(host, cs)
        } catch {
            lock.unlock()
            throw error
        }
        let ev = addInflight(clusterGuest / cs, clusterGuest / cs + 1)
        let epoch = ioGate.enter()
        lock.unlock()
        var ioError: BlockError?
        let file = self.file
        do throws(BlockError) {
            let bounce = AlignedBuffer(count: Int(fillEnd - fillStart))
            let cow = start > fillStart || fillEnd > end
            if cow { file.debugEvent(.cowRead) }
            try await readExtents(head, base: clusterGuest + fillStart, into: bounce.slice(0, Int(start - fillStart)))
            try data.copy(into: bounce.slice(Int(start - fillStart), data.count))
            try await readExtents(tail, base: clusterGuest + end, into: bounce.slice(Int(end - fillStart), Int(fillEnd - end)))
            file.debugEvent(.writeAio)
            if cow { file.debugEvent(.cowWrite) }
            try await file.write(at: host + fillStart, from: UnsafeRawBufferPointer(bounce.bytes))
        } catch {
            ioError = error
        }
        await lock.lock()
        defer { lock.unlock() }
        ioGate.leave(epoch)
        defer { removeInflight(ev) }
        if let e = ioError { throw e }
        guard let (curOff, cur) = try await l2TableLocked(geo.l1Index(clusterGuest)), curOff == l2Off else {
            preconditionFailure("L2 table moved during a fill")
        }
        cur.setL2Entry(idx, geo, newEntry)
        cur.setL2Bitmap(idx, geo, newBitmap)
        l2Cache.markDirty(curOff, (idx * geo.l2EntrySize)..<((idx + 1) * geo.l2EntrySize))
        try await writebackIfNeededLocked()
        return data.count
    }

    // MARK: - Zeroes and discard

    /// Applies `transform` to the L2 entries of whole clusters
    /// [first, end) (one L2 table at a time), writing changed entries and
    /// freeing what they no longer reference.
    func rewriteEntries(_ first: Int64, _ end: Int64,
                                _ transform: (UInt64, UInt64) -> (UInt64, UInt64, Bool)) async throws(BlockError) {
        let perTable = Int64(geo.l2Entries)
        let cs = Int64(geo.clusterSize)
        var c = first
        while c < end {
            let tableEnd = min(end, (c / perTable + 1) * perTable)
            await lock.lock()
            do throws(BlockError) {
                try await ensureWritableLocked()
                await waitInflightLocked(c, tableEnd)
                let l1i = geo.l1Index(c * cs)
                // Nothing to change in a table that does not exist, unless the
                // transform turns unallocated entries into something else.
                let (n0, b0, _) = transform(0, 0)
                if l1[l1i] & Qcow2.l1OffsetMask == 0 && n0 == 0 && b0 == 0 {
                    lock.unlock()
                    c = tableEnd
                    continue
                }
                var changed = false
                for cc in c..<tableEnd {
                    let i = geo.l2Index(cc * cs)
                    if let (_, t) = try await l2TableLocked(l1i) {
                        let (ne, nb, _) = transform(t.l2Entry(i, geo), t.l2Bitmap(i, geo))
                        if ne != t.l2Entry(i, geo) || nb != t.l2Bitmap(i, geo) { changed = true; break }
                    } else {
                        changed = true
                        break
                    }
                }
                if !changed {
                    lock.unlock()
                    c = tableEnd
                    continue
                }
                let (off, table) = try await l2TableForWriteLocked(l1i)
                var frees: [(Int64, Int64)] = []
                var lo = Int.max
                var hi = 0
                for cc in c..<tableEnd {
                    let i = geo.l2Index(cc * cs)
                    let oe = table.l2Entry(i, geo)
                    let ob = table.l2Bitmap(i, geo)
                    let (ne, nb, unref) = transform(oe, ob)
                    if ne == oe && nb == ob { continue }
                    table.setL2Entry(i, geo, ne)
                    table.setL2Bitmap(i, geo, nb)
                    lo = min(lo, i)
                    hi = max(hi, i + 1)
                    if unref, let r = hostRange(of: oe) { frees.append(r) }
                }
                if hi > lo {
                    l2Cache.markDirty(off, (lo * geo.l2EntrySize)..<(hi * geo.l2EntrySize))
                }
                for (o, l) in frees { try await freeAfterUnref(o, l) }
                try await writebackIfNeededLocked()
                lock.unlock()
            } catch {
                lock.unlock()
                throw error
            }
            c = tableEnd
        }
    }

    private func isAllocatedType(_ e: UInt64) -> Bool {
        e & Qcow2.oflagCompressed != 0 || e & Qcow2.l2OffsetMask != 0
    }

    public func discard(at offset: Int64, length: Int64) async throws(BlockError) {
        let cs = Int64(geo.clusterSize)
        let size = self.length
        var start = alignUp(offset, cs)
        var end = alignDown(offset + length, cs)
        if offset + length == size && offset % cs == 0 { end = offset + length; start = offset }
        if start >= end { return }
        let hasBacking = backing != nil
        let v3 = geo.version >= 3
        // Without the zero flag, dropping clusters would expose stale data
        // from the backing file: QEMU refuses, and so do we.
        if !v3 && hasBacking { return }
        let ext = geo.extendedL2
        try await rewriteEntries(start / cs, divRoundUp(end, cs)) { e, b in
            let allocated = self.isAllocatedType(e)
            if hasBacking || allocated {
                if ext { return (0, Qcow2Image.allZeroBitmap, allocated) }
                return (v3 ? Qcow2.oflagZero : 0, 0, allocated)
            }
            return (0, 0, allocated)
        }
    }

    public func writeZeroes(at offset: Int64, length: Int64, flags: WriteFlags) async throws(BlockError) {
        let cs = Int64(geo.clusterSize)
        let end = offset + length
        let size = self.length
        if geo.version < 3 {
            if flags.contains(.noFallback) { throw BlockError.unsupported("Zero writes need qcow2 version 3") }
            try await writeZeroBuffers(offset, length)
            return
        }
        let alignedStart = alignUp(offset, cs)
        var alignedEnd = alignDown(end, cs)
        if end == size && alignedEnd < end && alignedStart <= alignDown(end, cs) { alignedEnd = alignUp(end, cs) }
        if alignedStart >= alignedEnd {
            try await zeroPartial(offset, length, flags)
            return
        }
        if offset < alignedStart { try await zeroPartial(offset, alignedStart - offset, flags) }
        let mayUnmap = flags.contains(.mayUnmap)
        let ext = geo.extendedL2
        try await rewriteEntries(alignedStart / cs, alignedEnd / cs) { e, b in
            let compressed = e & Qcow2.oflagCompressed != 0
            let unmap = compressed || (mayUnmap && self.isAllocatedType(e))
            var ne = unmap ? 0 : e
            var nb = b
            if ext { nb = Qcow2Image.allZeroBitmap } else { ne |= Qcow2.oflagZero }
            if unmap { nb = ext ? Qcow2Image.allZeroBitmap : 0 }
            return (ne, nb, unmap)
        }
        let tailStart = min(alignedEnd, end)
        if end > tailStart { try await zeroPartial(tailStart, end - tailStart, flags) }
    }

    /// Zeroes part of one cluster: nothing if it already reads as zeroes,
    /// explicit zero data otherwise.
    private func zeroPartial(_ offset: Int64, _ length: Int64, _ flags: WriteFlags) async throws(BlockError) {
        if try await readsAsZero(offset, length) { return }
        if flags.contains(.noFallback) { throw BlockError.unsupported("Cannot zero a partial cluster efficiently") }
        try await writeZeroBuffers(offset, length)
    }

    func readsAsZero(_ offset: Int64, _ length: Int64) async throws(BlockError) -> Bool {
        await lock.lock()
        defer { lock.unlock() }
        var g = offset
        while g < offset + length {
            let ext = try await mapLocked(g, offset + length - g)
            for e in ext {
                switch e.kind {
                case .zero: break
                case .backing:
                    if let b = backing, e.guest < b.length { return false }
                default: return false
                }
                g = e.guest + e.length
            }
        }
        return true
    }

    private func writeZeroBuffers(_ offset: Int64, _ length: Int64) async throws(BlockError) {
        let chunk = Int64(min(Int64(1 << 20), length))
        let zeros = AlignedBuffer(count: Int(chunk), zeroed: true)
        var done: Int64 = 0
        while done < length {
            let n = min(chunk, length - done)
            try await write(at: offset + done, from: UnsafeRawBufferPointer(zeros.slice(0, Int(n))), flags: [])
            done += n
        }
    }

    // MARK: - Compressed writes

    /// Writes one whole cluster compressed (QEMU's pwritev_compressed). The
    /// guest cluster must not be allocated. Data that does not shrink is
    /// written uncompressed. `data` is one cluster, or the image's last,
    /// partial cluster.
    public func writeCompressed(at guest: Int64, from data: UnsafeRawBufferPointer) async throws(BlockError) {
        let cs = geo.clusterSize
        precondition(guest % Int64(cs) == 0 && data.count <= cs)
        // The last cluster of an image may be partial: compress it padded
        // with zeroes. `padded` lives until the end of the function.
        let padded = AlignedBuffer(count: cs, zeroed: true)
        padded.slice(0, data.count).copyMemory(from: data)
        let input = UnsafeRawBufferPointer(padded.bytes)
        let out = AlignedBuffer(count: cs)
        let n: Int
        if header.compressionType == CompressionType.zstd.rawValue {
            n = lamina_zstd_compress(input.baseAddress, cs, out.pointer, cs - 1)
        } else {
            n = lamina_deflate_raw(input.baseAddress, cs, out.pointer, cs - 1)
        }
        if n < 0 {
            // Incompressible (or an error): store it as a normal cluster.
            try await write(at: guest, from: data, flags: [])
            return
        }
        await lock.lock()
        let l2Off: Int64
        let idx = geo.l2Index(guest)
        let host: Int64
        let ev: AsyncEvent
        let epoch: UInt64
        do throws(BlockError) {
            try await ensureWritableLocked()
            await waitInflightLocked(guest / Int64(cs), guest / Int64(cs) + 1)
            let (off, table) = try await l2TableForWriteLocked(geo.l1Index(guest))
            l2Off = off
            if table.l2Entry(idx, geo) & Qcow2.l2OffsetMask != 0 || table.l2Entry(idx, geo) & Qcow2.oflagCompressed != 0 {
                throw BlockError.io("Compressed writes need an unallocated cluster", errno: 5)
            }
            host = try await allocateCompressedBytesLocked(n)
            try await checkOverlap(host, Int64(n))
            ev = addInflight(guest / Int64(cs), guest / Int64(cs) + 1)
            epoch = ioGate.enter()
        } catch {
            lock.unlock()
            throw error
        }
        lock.unlock()
        var ioError: BlockError?
        do throws(BlockError) {
            let file = self.file
            file.debugEvent(.writeCompressed)
            try await file.write(at: host, from: UnsafeRawBufferPointer(out.slice(0, n)))
        } catch { ioError = error }
        await lock.lock()
        defer { lock.unlock() }
        ioGate.leave(epoch)
        defer { removeInflight(ev) }
        if let e = ioError {
            try? await freeAfterUnref(host, Int64(n))
            throw e
        }
        guard let (curOff, cur) = try await l2TableLocked(geo.l1Index(guest)), curOff == l2Off else {
            preconditionFailure("L2 table moved during a compressed write")
        }
        cur.setL2Entry(idx, geo, geo.compressedEntry(host: host, length: n))
        cur.setL2Bitmap(idx, geo, 0)
        l2Cache.markDirty(curOff, (idx * geo.l2EntrySize)..<((idx + 1) * geo.l2EntrySize))
        try await writebackIfNeededLocked()
    }

    /// Byte-granular allocation for compressed clusters (QEMU's alloc_bytes):
    /// consecutive compressed clusters share host clusters, each holder
    /// adding one reference.
    private func allocateCompressedBytesLocked(_ n: Int) async throws(BlockError) -> Int64 {
        let cs = Int64(geo.clusterSize)
        file.debugEvent(.clusterAllocBytes)
        if compressedFreeByte != 0 && compressedFreeByte % cs + Int64(n) <= cs {
            let off = compressedFreeByte
            try await changeRefcount(off / cs, by: 1)
            compressedFreeByte = (off + Int64(n)) % cs == 0 ? 0 : off + Int64(n)
            return off
        }
        let (c, _) = try await allocateClusters(1)
        let off = c * cs
        compressedFreeByte = Int64(n) == cs ? 0 : off + Int64(n)
        return off
    }
}
