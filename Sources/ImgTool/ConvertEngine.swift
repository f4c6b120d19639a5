#if canImport(Glibc)
import Glibc
#endif
import BlockCore
import BlockGraph
import BlockIO
import FileDriver
import Synchronization

/// The copy loop of `convert` (QEMU's convert_do_copy): several workers
/// plan chunks in order under a lock, read them in parallel, and (unless
/// out-of-order writes are allowed) write them in order.
final class ConvertEngine: @unchecked Sendable {
    enum ChunkStatus { case data, zero, backing }

    struct Config {
        var sources: [BlockNode]
        var target: BlockNode
        var targetHasBacking: Bool
        var targetBackingSectors: Int64  // negative if unknown
        var hasZeroInit: Bool
        var compressed: Bool
        var minSparse: Int64  // sectors
        var alignment: Int64  // sectors
        var bufSectors: Int64
        var clusterSectors: Int64
        var inOrder: Bool
        var workers: Int
        /// Copy data inside the kernel (copy_file_range) where source and
        /// target are host files in the page cache.
        var copyOffload: Bool
        /// -C: data ranges are copied as they are, without zero detection.
        var copyRange = false
    }

    let cfg: Config
    let sourceSectors: [Int64]
    let sourceAlignment: [Int64]
    let totalSectors: Int64

    // Planning state, guarded by `planLock`.
    private let planLock = AsyncLock()
    private var sectorNum: Int64 = 0
    private var sectorNextStatus: Int64 = 0
    private var status: ChunkStatus = .data
    /// Where the current status run's data lives in a host file, if it is
    /// plain data there (start sector of the run, file, host offset).
    private var runStart: Int64 = 0
    private var runHost: HostFile?
    private var runHostOffset: Int64 = 0

    // Shared counters and errors.
    private struct Shared {
        var failed = false
        var allocatedSectors: Int64 = 0
        var allocatedDone: Int64 = 0
        var messages: [String] = []
    }
    private let shared = Mutex(Shared())
    private let progress: Progress
    private let progressLock = Mutex(())
    private let writer = OrderedWriter()

    /// Reads each source's alignment (its cluster size, if it has one).
    init(_ cfg: Config, progress: Progress) async {
        self.cfg = cfg
        self.progress = progress
        sourceSectors = cfg.sources.map { ($0.length + 511) / 512 }
        var alignments: [Int64] = []
        for n in cfg.sources {
            var a = Int64(max(1, n.driver.requestAlignment / 512))
            if let info = await n.driverInfo() { a = max(a, Int64(info.clusterSize / 512)) }
            alignments.append(a)
        }
        sourceAlignment = alignments
        totalSectors = sourceSectors.reduce(0, +)
    }

    private func selectPart(_ sector: Int64) -> (Int, Int64) {
        var idx = 0
        var base: Int64 = 0
        while idx < sourceSectors.count - 1 && sector - base >= sourceSectors[idx] {
            base += sourceSectors[idx]
            idx += 1
        }
        return (idx, base)
    }

    /// convert_iteration_sectors: how many sectors from `sector` share one
    /// status (updating `status`). Called with `planLock` held.
    private func iterationSectors(_ sector: Int64) async throws(BlockError) -> Int64 {
        let (src, base) = selectPart(sector)
        var n = min(totalSectors - sector, Int64(Int32.max) >> 9)
        var postBackingZero = false
        if cfg.targetBackingSectors >= 0 {
            if sector >= cfg.targetBackingSectors {
                postBackingZero = true
            } else if sector + n > cfg.targetBackingSectors {
                n = cfg.targetBackingSectors - sector
            }
        }
        if sectorNextStatus <= sector {
            let node = cfg.sources[src]
            let offset = (sector - base) * 512
            let baseNode = cfg.targetHasBacking ? node.backing : nil
            let st = try await node.blockStatusAbove(base: baseNode, at: offset, length: n * 512)
            n = max(1, divRoundUp(st.status.length, 512))
            let tail = (sector - base + n) % sourceAlignment[src]
            if n > tail { n -= tail }
            let f = st.status.flags
            runHost = nil
            if cfg.copyOffload && f.contains(.data) && f.contains(.offsetValid) && !f.contains(.zero),
               let fd = st.status.hostNode?.driver as? FileDriver {
                runStart = sector
                runHost = fd.host
                runHostOffset = st.status.hostOffset
            }
            if f.contains(.zero) {
                status = postBackingZero ? .backing : .zero
            } else if f.contains(.data) {
                status = .data
            } else {
                status = cfg.targetHasBacking ? .backing : .data
            }
            sectorNextStatus = sector + n
        }
        n = min(n, sectorNextStatus - sector)
        if status == .data { n = min(n, cfg.bufSectors) }
        if cfg.compressed {
            if n < cfg.clusterSectors {
                n = min(cfg.clusterSectors, totalSectors - sector)
                status = .data
            } else {
                n = alignDown(n, cfg.clusterSectors)
            }
        }
        return n
    }

    /// Runs the copy; returns false after printing an error.
    func run(pool: IOThreadPool) async -> Bool {
        // First pass: how much data there is (for progress).
        await planLock.lock()
        var s: Int64 = 0
        var allocated: Int64 = 0
        do throws(BlockError) {
            while s < totalSectors {
                let n = try await iterationSectors(s)
                if status == .data || (cfg.minSparse == 0 && status == .zero) { allocated += n }
                s += n
            }
        } catch {
            planLock.unlock()
            report("error while reading block status at offset \(s * 512): \(errnoString(error.errno))")
            return false
        }
        sectorNextStatus = 0
        sectorNum = 0
        planLock.unlock()
        shared.withLock { $0.allocatedSectors = allocated }

        await withTaskGroup(of: Void.self) { group in
            for i in 0..<cfg.workers {
                group.addTask(executorPreference: pool[i]) {
                    await self.worker()
                }
            }
        }
        let (failed, messages) = shared.withLock { ($0.failed, $0.messages) }
        for m in messages { errln("\(ProgName.current): \(m)") }
        if failed { return false }
        if cfg.compressed, cfg.target.driver.supportedWriteFlags.contains(.compressed), let file = cfg.target.file {
            // Like QEMU, end the file on a sector boundary.
            try? await file.releaseUnusedSpace()
            let len = file.length
            try? await file.truncate(to: len)
        }
        return true
    }

    private func report(_ message: String) {
        shared.withLock { s in
            s.failed = true
            s.messages.append(message)
        }
    }

    private var failed: Bool { shared.withLock { $0.failed } }

    private func worker() async {
        let buf = AlignedBuffer(count: Int(cfg.bufSectors * 512))
        while true {
            await planLock.lock()
            if failed || sectorNum >= totalSectors {
                planLock.unlock()
                return
            }
            var n: Int64
            do throws(BlockError) {
                n = try await iterationSectors(sectorNum)
            } catch {
                planLock.unlock()
                report("error while reading block status at offset \(sectorNum * 512): \(errnoString(error.errno))")
                return
            }
            let sector = sectorNum
            var st = status
            let host = runHost.map { ($0, runHostOffset + (sector - runStart) * 512) }
            if cfg.minSparse == 0 && st == .zero { n = min(n, cfg.bufSectors) }
            sectorNum += n
            planLock.unlock()

            if st == .data || (cfg.minSparse == 0 && st == .zero) {
                let (done, total) = shared.withLock { s -> (Int64, Int64) in
                    s.allocatedDone += n
                    return (s.allocatedDone, s.allocatedSectors)
                }
                progressLock.withLock { _ in
                    progress.advance(Float(100.0 * Double(done) / Double(max(total, 1))), max: 0)
                }
            }
            if st == .data, let (file, hostOffset) = host, let mapping = HostMapping(file, hostOffset, Int(n * 512)) {
                // Fast path: zero detection on the mapped page cache, data
                // copied by the kernel.
                let status = st
                await ordered(sector, n) {
                    do throws(BlockError) {
                        try await self.write(sector, n, mapping.pointer, status) { pos, len in
                            .host(file, offset: hostOffset + Int64(pos), count: len)
                        }
                    } catch {
                        self.report("error while writing at byte \(sector * 512): \(errnoString(error.errno))")
                    }
                }
                mapping.unmap()
                continue
            }
            if st == .data {
                do throws(BlockError) {
                    try await readSources(sector, n, buf)
                } catch {
                    report("error while reading at byte \(sector * 512): \(errnoString(error.errno))")
                }
            } else if cfg.minSparse == 0 && st == .zero {
                st = .data
                buf.slice(0, Int(n * 512)).zeroFill()
            }
            let status = st
            await ordered(sector, n) {
                do throws(BlockError) {
                    try await self.write(sector, n, UnsafeRawPointer(buf.pointer), status) { pos, len in
                        .memory(UnsafeRawBufferPointer(buf.slice(pos, len)))
                    }
                } catch {
                    self.report("error while writing at byte \(sector * 512): \(errnoString(error.errno))")
                }
            }
        }
    }

    /// Runs `work` (the write of sectors [sector, sector+n)) in sector
    /// order unless out-of-order writes were allowed. Whoever finds the
    /// next chunk ready performs it and then every following ready chunk,
    /// so consecutive writes need no thread hand-off.
    private func ordered(_ sector: Int64, _ n: Int64, _ work: @escaping () async -> Void) async {
        if !cfg.inOrder || failed {
            if !failed { await work() }
            return
        }
        await writer.submit(OrderedWriter.Job(sector: sector, count: n, run: work, done: AsyncEvent()))
    }

    private func readSources(_ sector: Int64, _ count: Int64, _ buf: AlignedBuffer) async throws(BlockError) {
        var sec = sector
        var left = count
        var pos = 0
        while left > 0 {
            let (src, base) = selectPart(sec)
            let node = cfg.sources[src]
            let n = min(left, sourceSectors[src] - (sec - base))
            let offset = (sec - base) * 512
            // The last sector of a source may be partial: the rest reads as zeroes.
            let avail = max(0, min(n * 512, node.length - offset))
            if avail > 0 { try await node.read(at: offset, into: buf.slice(pos, Int(avail))) }
            if avail < n * 512 { buf.slice(pos + Int(avail), Int(n * 512 - avail)).zeroFill() }
            sec += n
            left -= n
            pos += Int(n * 512)
        }
    }

    /// Writes `count` sectors whose bytes are at `base` (for zero
    /// detection); `payload(pos, len)` gives the bytes to write.
    private func write(_ sector: Int64, _ count: Int64, _ base: UnsafeRawPointer, _ st: ChunkStatus,
                       _ payload: (Int, Int) -> WritePayload) async throws(BlockError) {
        var sec = sector
        var left = count
        var pos = 0
        let target = cfg.target
        while left > 0 {
            var n = left
            var writeZero = false
            switch st {
            case .backing:
                break
            case .data:
                if cfg.minSparse == 0 || cfg.copyRange {
                    try await writeData(sec, payload(pos, Int(n * 512)))
                } else if cfg.compressed {
                    if !isZeroMemory(base + pos, Int(n * 512)) {
                        try await writeData(sec, payload(pos, Int(n * 512)))
                    } else {
                        writeZero = true
                    }
                } else {
                    let (allocated, run) = ConvertEngine.allocatedSectorsMin(base + pos, n, min: cfg.minSparse,
                                                                              sector: sec, alignment: cfg.alignment)
                    n = run
                    if allocated {
                        try await writeData(sec, payload(pos, Int(n * 512)))
                    } else {
                        writeZero = true
                    }
                }
            case .zero:
                writeZero = true
            }
            if writeZero && !cfg.hasZeroInit {
                let len = min(n * 512, target.length - sec * 512)
                if len > 0 { try await target.writeZeroes(at: sec * 512, length: len, flags: [.mayUnmap]) }
            }
            sec += n
            left -= n
            pos += Int(n * 512)
        }
    }

    private func writeData(_ sector: Int64, _ bytes: WritePayload) async throws(BlockError) {
        let target = cfg.target
        let offset = sector * 512
        // Never write past the target's end (the last source sector may be partial).
        let len = min(Int64(bytes.count), target.length - offset)
        guard len > 0 else { return }
        let data = bytes.slice(0, Int(len))
        if cfg.compressed, target.driver.supportedWriteFlags.contains(.compressed), case .memory(let mem) = data {
            try await target.write(at: offset, from: mem, flags: [.compressed])
        } else {
            try await data.write(to: target, at: offset)
        }
    }

    /// qemu-img's is_allocated_sectors: is the first sector non-zero, and
    /// how many sectors share that state (ends aligned to `alignment`).
    static func allocatedSectors(_ p: UnsafeRawPointer, _ n: Int64, sector: Int64, alignment: Int64) -> (Bool, Int64) {
        if n <= 0 { return (false, 0) }
        let isZero = isZeroMemory(p, 512)
        var i: Int64 = 1
        while i < n {
            if isZeroMemory(p + Int(i) * 512, 512) != isZero { break }
            i += 1
        }
        if i == n { return (!isZero, i) }
        var zero = isZero
        let tail = (sector + i) & (alignment - 1)
        if tail != 0 {
            if zero && i <= tail {
                // The following data will rewrite this tail anyway.
                zero = false
            }
            if !zero {
                i = min(i + alignment - tail, n)
            } else {
                i -= tail
            }
        }
        return (!zero, i)
    }

    /// is_allocated_sectors_min: data runs swallow zero runs shorter than `min`.
    static func allocatedSectorsMin(_ p: UnsafeRawPointer, _ count: Int64, min minimum: Int64,
                                    sector: Int64, alignment: Int64) -> (Bool, Int64) {
        var n = count
        let minRun = Swift.min(minimum, n)
        let (first, run) = allocatedSectors(p, n, sector: sector, alignment: alignment)
        if !first { return (false, run) }
        var used = run
        var checked = run
        var ptr = p + Int(run) * 512
        n -= run
        var sec = sector + run
        while n > 0 {
            let (alloc, r) = allocatedSectors(ptr, n, sector: sec, alignment: alignment)
            ptr += Int(r) * 512
            n -= r
            sec += r
            checked += r
            if alloc {
                used = checked
            } else if r >= minRun {
                break
            }
        }
        return (true, used)
    }
}

/// A read-only mapping of part of a host file (page cache), for looking at
/// data without copying it.
struct HostMapping {
    let base: UnsafeMutableRawPointer
    let mappedLength: Int
    let pointer: UnsafeRawPointer

    init?(_ file: HostFile, _ offset: Int64, _ length: Int) {
        let page = Int64(sysconf(Int32(_SC_PAGESIZE)))
        let start = offset - offset % page
        let delta = Int(offset - start)
        // Only what the file really holds can be mapped.
        guard let size = try? file.size(), offset + Int64(length) <= size, length > 0 else { return nil }
        let len = delta + length
        let m = mmap(nil, len, PROT_READ, MAP_SHARED | MAP_POPULATE, file.fd, off_t(start))
        guard let m, m != MAP_FAILED else { return nil }
        base = m
        mappedLength = len
        pointer = UnsafeRawPointer(m + delta)
    }

    func unmap() { munmap(base, mappedLength) }
}

/// Executes write jobs strictly in sector order with a single writer at a
/// time; the submitting task waits until its own job has run.
final class OrderedWriter: @unchecked Sendable {
    /// The job's closure captures its submitter's buffers; the submitter
    /// keeps them alive by waiting for `done`.
    struct Job: @unchecked Sendable {
        let sector: Int64
        let count: Int64
        let run: () async -> Void
        let done: AsyncEvent
    }

    private struct State {
        var next: Int64 = 0
        var pending: [Int64: Job] = [:]
        var writing = false
    }

    private let state = Mutex(State())

    func submit(_ job: Job) async {
        let becameWriter = state.withLock { s -> Bool in
            s.pending[job.sector] = job
            if !s.writing && s.pending[s.next] != nil {
                s.writing = true
                return true
            }
            return false
        }
        if becameWriter {
            while true {
                let j = state.withLock { s -> Job? in
                    if let j = s.pending.removeValue(forKey: s.next) {
                        s.next = j.sector + j.count
                        return j
                    }
                    s.writing = false
                    return nil
                }
                guard let j else { break }
                await j.run()
                j.done.signal()
            }
        }
        await job.done.wait()
    }
}
