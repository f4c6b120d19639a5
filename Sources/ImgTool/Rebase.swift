#if canImport(Glibc)
import Glibc
#endif
import BlockCore
import BlockDrivers
import BlockGraph
import BlockIO
import FileDriver
import Synchronization

/// `rebase [-q] [-f fmt] [-t cache] [-T src_cache] [-p] [-u] [-U] -b backing_file [-F backing_fmt] filename`
///
/// Safe mode (QEMU 7.2's img_rebase): in 2 MiB steps over what the image
/// does not allocate itself (and, when the new backing file is a layer of
/// the current chain, what the layers above it allocate), the old and the
/// new backing content are compared sector by sector and the differing
/// sectors are written into the image with the old content; then the
/// header names the new backing file. -u only rewrites the header.
enum RebaseCommand {
    static let ioBufSize: Int64 = 2 << 20

    /// Format names QEMU 7.2 knows (`qemu-img --help`), for -F.
    static let knownFormats: Set<String> = [
        "blkdebug", "blklogwrites", "blkverify", "bochs", "cloop", "compress", "copy-before-write", "copy-on-read",
        "dmg", "file", "ftp", "ftps", "gluster", "host_cdrom", "host_device", "http", "https", "iscsi", "iser",
        "luks", "nbd", "nfs", "null-aio", "null-co", "nvme", "parallels", "preallocate", "qcow", "qcow2", "qed",
        "quorum", "raw", "rbd", "replication", "snapshot-access", "ssh", "throttle", "vdi", "vhdx", "vmdk", "vpc",
        "vvfat",
    ]

    static func run(_ args: [String], _ ctx: ToolContext) async throws(ToolError) -> Int32 {
        let opts = try ctx.parse(args, short: ":hf:F:b:upt:T:qU", long: [
            .init(name: "help", hasArgument: false, key: "h"), .init(name: "object", hasArgument: true, key: "object"),
            .init(name: "image-opts", hasArgument: false, key: "image-opts"),
            .init(name: "force-share", hasArgument: false, key: "U"),
        ])
        var fmt: String?
        var baseFmt: String?
        var baseImg: String?
        var unsafe = false
        var progress = false
        var cache = "writeback"
        var srcCache = "writeback"
        var quiet = false
        var forceShare = false
        for (k, v) in opts.options {
            switch k {
            case "h": outln(LaminaImg.helpText(ctx.progName)); return 0
            case "f": fmt = v
            case "F": baseFmt = v
            case "b": baseImg = v
            case "u": unsafe = true
            case "p": progress = true
            case "t": cache = v!
            case "T": srcCache = v!
            case "q": quiet = true
            case "U": forceShare = true
            default: break
            }
        }
        if quiet { progress = false }
        guard opts.operands.count == 1 else { throw ctx.usage("Expecting one image file name") }
        if !unsafe && baseImg == nil { throw ctx.usage("Must specify backing file (-b) or use unsafe mode (-u)") }
        let filename = opts.operands[0]
        let prog = Progress(enabled: progress, minSkip: 2.0)
        prog.advance(0, max: 100)
        defer { prog.end() }
        guard let mode = CacheMode.parse(cache) else { throw ctx.fail("Invalid cache option: \(cache)") }
        guard let srcMode = CacheMode.parse(srcCache) else { throw ctx.fail("Invalid source cache option: \(srcCache)") }
        try checkFormat(fmt, filename)
        let top = try await openImage(filename, format: fmt, readOnly: false, cache: mode, noBacking: unsafe)
        var newBacking: BlockNode?
        var ownsNewBacking = false
        func cleanup() async {
            if ownsNewBacking { await closeQuietly(newBacking) }
            await closeQuietly(top)
        }
        do throws(ToolError) {
            if let f = baseFmt, !knownFormats.contains(f) { throw ToolError(message: "Invalid format name: '\(f)'") }
            var prefix: BlockNode?
            if !unsafe, let b = baseImg, !b.isEmpty {
                let realPathName = ImageOpener.resolveBackingPath(b, overlay: top.filename)
                if let p = CommitCommand.findBackingImage(top, realPathName) {
                    prefix = p
                    newBacking = p
                } else {
                    var bo = ImageOpenOptions()
                    bo.format = baseFmt
                    bo.readOnly = true
                    bo.forceShare = forceShare
                    bo.cacheDirect = srcMode.direct
                    do throws(BlockError) {
                        newBacking = try await ImageOpener.open(realPathName, bo)
                        ownsNewBacking = true
                    } catch {
                        throw ToolError(message: "Could not open new backing file '\(b)': " + error.message)
                    }
                }
            }
            // Refuse what the header change would refuse before anything is
            // written (QEMU finds out only after copying).
            let newName = (baseImg?.isEmpty ?? true) ? nil : baseImg
            let newFormat = newName == nil ? nil : baseFmt
            var errno: Int32 = 0
            if newName != nil && newFormat == nil {
                errno = 22
            } else if let q = top.driver as? any BackingDriver {
                errno = await q.backingChangeErrno(newName, format: newFormat)
            } else {
                errno = 95
            }
            if errno != 0 {
                let shown = baseImg ?? "(null)"
                if errno == 28 {
                    throw ToolError(message: "Could not change the backing file to '\(shown)': No space left in the file header")
                } else if errno == 22 && baseImg != nil && baseFmt == nil {
                    throw ToolError(message: "Could not change the backing file to '\(shown)': backing format must be specified")
                }
                throw ToolError(message: "Could not change the backing file to '\(shown)': \(errnoString(errno))")
            }
            if !unsafe {
                let copier = RebaseCopy(top: top, old: top.backing, new: newBacking, prefix: prefix, progress: prog,
                                        filename: filename, mapHostFiles: !mode.direct && !srcMode.direct)
                try await copier.run()
                do throws(BlockError) {
                    // The copied data is durable before the header stops
                    // pointing at the old chain.
                    try await top.flush()
                } catch {
                    throw ToolError(message: "Error while writing to COW image: \(errnoString(error.errno == 0 ? 5 : error.errno))")
                }
            }
            guard let q = top.driver as? any BackingDriver else { throw ToolError(message: "Could not change the backing file") }
            do throws(BlockError) {
                try await q.changeBackingFile(newName, format: newFormat)
                try await top.flush()
            } catch {
                throw ToolError(message: "Could not change the backing file to '\(baseImg ?? "(null)")': \(errnoString(error.errno == 0 ? 5 : error.errno))")
            }
            prog.advance(100, max: 0)
        } catch {
            await cleanup()
            throw error
        }
        if ownsNewBacking { await closeQuietly(newBacking) }
        do throws(BlockError) {
            try await top.close()
        } catch {
            throw ToolError(message: error.message)
        }
        return 0
    }
}

/// The safe rebase's comparison loop. Steps are planned in QEMU's order
/// (same step boundaries, same progress) and processed by a few workers in
/// parallel: the ranges are disjoint and each step only allocates the
/// image's clusters it covers (a step that ends inside a cluster is let to
/// finish before the next one is planned).
final class RebaseCopy: @unchecked Sendable {
    let top: BlockNode
    let old: BlockNode?
    let new: BlockNode?
    let prefix: BlockNode?
    let progress: Progress
    let filename: String
    /// Compare straight from the backing files' page cache (not with
    /// O_DIRECT sources).
    let mapHostFiles: Bool
    static let workers = 4

    init(top: BlockNode, old: BlockNode?, new: BlockNode?, prefix: BlockNode?, progress: Progress, filename: String,
         mapHostFiles: Bool) {
        self.mapHostFiles = mapHostFiles
        self.top = top
        self.old = old
        self.new = new
        self.prefix = prefix
        self.progress = progress
        self.filename = filename
    }

    private let failure = Mutex<ToolError?>(nil)
    private let sinceWriteback = Mutex<Int64>(0)

    /// Keeps the image's writeback going, so the flush before the header
    /// change finds little left to write.
    private func wrote(_ n: Int64) async {
        let kick = sinceWriteback.withLock { v -> Bool in
            v += n
            if v < 32 << 20 { return false }
            v = 0
            return true
        }
        if kick { await top.startWriteback() }
    }

    private func fail(_ e: ToolError) { failure.withLock { if $0 == nil { $0 = e } } }

    func run() async throws(ToolError) {
        let size = top.length
        let oldSize = old?.length ?? 0
        let newSize = new?.length ?? 0
        let bufSize = RebaseCommand.ioBufSize
        let localProgress: Float = size != 0 ? Float(100) / Float(size / min(size, bufSize)) : 0
        let clusterSize = Int64(await top.driverInfo()?.clusterSize ?? 512)
        let pool = IOThreadPool(count: Self.workers, name: "rebase")
        defer { pool.shutdown() }
        let buffers = (0..<Self.workers).map { _ in
            (AlignedBuffer(count: Int(bufSize)), AlignedBuffer(count: Int(bufSize)))
        }
        var free = Array(0..<Self.workers)
        await withTaskGroup(of: Int.self) { group in
            var inFlight = 0
            var offset: Int64 = 0
            var mustDrain = false
            while offset < size {
                if failure.withLock({ $0 != nil }) { break }
                if mustDrain || free.isEmpty {
                    while inFlight > 0, let slot = await group.next() {
                        inFlight -= 1
                        free.append(slot)
                        if !mustDrain { break }
                    }
                    mustDrain = false
                }
                var n = min(bufSize, size - offset)
                do throws(BlockError) {
                    let st = try await top.blockStatus(at: offset, length: n)
                    n = max(1, min(n, st.length))
                    if st.flags.contains(.allocated) {
                        offset += n
                        continue
                    }
                    if let p = prefix, let below = top.backing {
                        let (allocated, m) = try await below.isAllocatedAbove(base: p, at: offset, length: n)
                        if m > 0 { n = min(n, m) }
                        if !allocated {
                            offset += n
                            continue
                        }
                    }
                } catch {
                    fail(ToolError(message: "error while reading image metadata: \(errnoString(error.errno == 0 ? 5 : error.errno))"))
                    break
                }
                let oldIsZero = offset >= oldSize
                if !oldIsZero && offset + n > oldSize { n = oldSize - offset }
                if new != nil && offset < newSize && offset + n > newSize { n = newSize - offset }
                let slot = free.removeLast()
                let (bufOld, bufNew) = buffers[slot]
                let at = offset
                let count = n
                inFlight += 1
                group.addTask(executorPreference: pool[slot]) {
                    await self.step(at, count, oldIsZero: oldIsZero, oldSize: oldSize, newSize: newSize,
                                    bufOld, bufNew)
                    return slot
                }
                progress.advance(localProgress, max: 100)
                offset += n
                // A step ending inside a cluster may allocate past its end.
                if offset % clusterSize != 0 { mustDrain = true }
            }
            while inFlight > 0, await group.next() != nil { inFlight -= 1 }
        }
        if let e = failure.withLock({ $0 }) { throw e }
    }

    private func step(_ offset: Int64, _ n: Int64, oldIsZero: Bool, oldSize: Int64, newSize: Int64,
                      _ bufOld: AlignedBuffer, _ bufNew: AlignedBuffer) async {
        var mappings: [HostMapping] = []
        defer { for m in mappings { m.unmap() } }
        let pa: UnsafeRawPointer
        let pb: UnsafeRawPointer
        do throws(BlockError) {
            let (p, m) = try await view(oldIsZero ? nil : old, offset, n, bufOld)
            pa = p
            if let m { mappings.append(m) }
        } catch {
            fail(ToolError(message: "error while reading from old backing file"))
            return
        }
        do throws(BlockError) {
            let (p, m) = try await view(offset < newSize ? new : nil, offset, n, bufNew)
            pb = p
            if let m { mappings.append(m) }
        } catch {
            fail(ToolError(message: "error while reading from new backing file"))
            return
        }
        var written: Int64 = 0
        while written < n {
            let (differ, run) = compareSectors(pa + Int(written), pb + Int(written), n - written)
            if differ {
                do throws(BlockError) {
                    if oldIsZero {
                        try await zeroLikeQemu(offset + written, run)
                    } else {
                        try await top.write(at: offset + written,
                                            from: UnsafeRawBufferPointer(start: pa + Int(written), count: Int(run)))
                    }
                } catch {
                    fail(ToolError(message: "Error while writing to COW image: \(errnoString(error.errno == 0 ? 5 : error.errno))"))
                    return
                }
                await wrote(run)
            }
            written += run
        }
    }

    /// The bytes of `node` at [offset, offset+n): mapped straight from the
    /// host file's page cache when one data run of the chain covers them
    /// (no copy), read into `buf` otherwise; zeroes without a node.
    private func view(_ node: BlockNode?, _ offset: Int64, _ n: Int64,
                      _ buf: AlignedBuffer) async throws(BlockError) -> (UnsafeRawPointer, HostMapping?) {
        guard let node else {
            buf.slice(0, Int(n)).zeroFill()
            return (UnsafeRawPointer(buf.pointer), nil)
        }
        if mapHostFiles {
            let st = try await node.blockStatusAbove(base: nil, at: offset, length: n).status
            if st.length >= n, st.flags.contains(.data), st.flags.contains(.offsetValid),
               !st.flags.contains(.zero), !st.flags.contains(.compressed),
               let fd = st.hostNode?.driver as? FileDriver,
               let m = HostMapping(fd.host, st.hostOffset, Int(n)) {
                return (m.pointer, m)
            }
        }
        try await node.read(at: offset, into: buf.slice(0, Int(n)))
        return (UnsafeRawPointer(buf.pointer), nil)
    }

    /// A zero write into the image as QEMU's qcow2 does it (the safe
    /// rebase writes zeroes where the old chain ends): whole clusters get
    /// the zero flag; a part of a cluster makes the whole cluster a zero
    /// cluster when the rest of it reads as zeroes and it holds no data,
    /// and is written as explicit zeroes otherwise. (A part that already
    /// reads as zeroes must still be written: the backing file changes.)
    func zeroLikeQemu(_ offset: Int64, _ length: Int64) async throws(BlockError) {
        guard let info = await top.driverInfo(), info.supportsZeroClusters else {
            try await writeZeroBuffer(offset, length)
            return
        }
        let cs = Int64(info.clusterSize)
        let size = top.length
        let end = offset + length
        var pos = offset
        while pos < end {
            let cStart = alignDown(pos, cs)
            let cEnd = min(cStart + cs, size)
            let pieceEnd = min(end, cEnd)
            if pos == cStart && pieceEnd == cEnd {
                var fullEnd = max(pieceEnd, alignDown(end, cs))
                if end == size { fullEnd = end }
                try await top.writeZeroes(at: pos, length: fullEnd - pos, flags: [])
                pos = fullEnd
                continue
            }
            let st = try await top.blockStatus(at: cStart, length: cEnd - cStart)
            let holdsNoData = st.length >= cEnd - cStart && !st.flags.contains(.data)
            var zeroCluster = false
            if holdsNoData {
                let headZero = try await readsAsZero(cStart, pos - cStart)
                let tailZero = try await readsAsZero(pieceEnd, cEnd - pieceEnd)
                zeroCluster = headZero && tailZero
            }
            if zeroCluster {
                try await top.writeZeroes(at: cStart, length: cEnd - cStart, flags: [])
            } else {
                try await writeZeroBuffer(pos, pieceEnd - pos)
            }
            pos = pieceEnd
        }
    }

    private func readsAsZero(_ offset: Int64, _ length: Int64) async throws(BlockError) -> Bool {
        var pos = offset
        while pos < offset + length {
            let st = try await top.blockStatusAbove(base: nil, at: pos, length: offset + length - pos)
            if !st.status.flags.contains(.zero) || st.status.length <= 0 { return false }
            pos += st.status.length
        }
        return true
    }

    private func writeZeroBuffer(_ offset: Int64, _ length: Int64) async throws(BlockError) {
        let zeros = AlignedBuffer(count: Int(min(length, 1 << 20)), zeroed: true)
        var done: Int64 = 0
        while done < length {
            let n = min(Int64(zeros.count), length - done)
            try await top.write(at: offset + done, from: UnsafeRawBufferPointer(zeros.slice(0, Int(n))))
            done += n
        }
    }

    /// QEMU's compare_buffers: whether the first sector differs, and how
    /// many bytes (whole sectors, or the tail) share that answer.
    func compareSectors(_ a: UnsafeRawPointer, _ b: UnsafeRawPointer, _ bytes: Int64) -> (Bool, Int64) {
        var i = min(bytes, 512)
        let res = memcmp(a, b, Int(i)) != 0
        // Long equal runs: compare big blocks first.
        while i < bytes {
            let len = min(bytes - i, 512)
            if !res && bytes - i >= 65536 && memcmp(a + Int(i), b + Int(i), 65536) == 0 {
                i += 65536
                continue
            }
            if (memcmp(a + Int(i), b + Int(i), Int(len)) != 0) != res { break }
            i += len
        }
        return (res, i)
    }
}
