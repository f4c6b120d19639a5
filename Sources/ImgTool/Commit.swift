#if canImport(Glibc)
import Glibc
#endif
import BlockCore
import BlockDrivers
import BlockGraph
import BlockIO
import FileDriver
import Synchronization

/// `commit [-q] [-f fmt] [-t cache] [-b base] [-r rate_limit] [-d] [-p] filename`
///
/// QEMU 7.2 runs an active commit (a mirror of the image into its base):
/// every range allocated above the base, widened to the mirror's
/// granularity, is copied down; whole granules the chain reads as zeroes
/// become zero writes (may unmap); then, unless -d (or -b, which implies
/// -d), the image is emptied. No header of the chain is rewritten.
enum CommitCommand {
    static func run(_ args: [String], _ ctx: ToolContext) async throws(ToolError) -> Int32 {
        let opts = try ctx.parse(args, short: ":f:ht:b:dpqr:", long: [
            .init(name: "help", hasArgument: false, key: "h"), .init(name: "object", hasArgument: true, key: "object"),
            .init(name: "image-opts", hasArgument: false, key: "image-opts"),
        ])
        var fmt: String?
        var cache = "writeback"
        var baseName: String?
        var drop = false
        var progress = false
        var quiet = false
        var rate: Int64 = 0
        for (k, v) in opts.options {
            switch k {
            case "h": outln(LaminaImg.helpText(ctx.progName)); return 0
            case "f": fmt = v
            case "t": cache = v!
            case "b":
                baseName = v
                drop = true
            case "d": drop = true
            case "p": progress = true
            case "q": quiet = true
            case "r": rate = try cvtnum("rate limit", v!)
            default: break
            }
        }
        if quiet { progress = false }
        guard opts.operands.count == 1 else { throw ctx.usage("Expecting one image file name") }
        let filename = opts.operands[0]
        guard let mode = CacheMode.parse(cache) else { throw ctx.fail("Invalid cache option: \(cache)") }
        try checkFormat(fmt, filename)
        let top = try await openImage(filename, format: fmt, readOnly: false, cache: mode, unmap: true)
        let prog = Progress(enabled: progress)
        prog.advance(0, max: 100)
        let result = await commit(top: top, filename: filename, baseName: baseName, drop: drop, rate: rate, progress: prog,
                                  mapHostFiles: !mode.direct)
        prog.end()
        do throws(BlockError) {
            try await top.close()
        } catch {
            if result == nil { throw ToolError(message: error.message) }
        }
        if let e = result { throw e }
        if !quiet { outln("Image committed.") }
        return 0
    }

    static func commit(top: BlockNode, filename: String, baseName: String?, drop: Bool, rate: Int64,
                       progress: Progress, mapHostFiles: Bool) async -> ToolError? {
        let base: BlockNode
        if let name = baseName {
            guard let b = findBackingImage(top, name) else {
                return ToolError(message: "Did not find '\(name)' in the backing chain of '\(filename)'")
            }
            base = b
        } else {
            guard let b = top.backing else { return ToolError(message: "Image does not have a backing file") }
            base = b
        }
        do throws(BlockError) {
            try await base.reopenReadWrite()
            if let fd = base.file?.driver as? FileDriver, fd.currentLock != nil {
                try fd.updateLock(.writer)
            }
        } catch {
            return ToolError(message: error.message)
        }
        do throws(BlockError) {
            let copier = await ChainCommitCopy(top: top, base: base, rate: rate, progress: progress, mapHostFiles: mapHostFiles)
            try await copier.run()
            progress.advance(100, max: 0)
            // What went down is durable before the image stops holding it.
            try await base.flush()
        } catch {
            return ToolError(message: "Block job failed: " + errnoString(error.errno == 0 ? 5 : error.errno))
        }
        if !drop, let q = top.driver as? any Emptiable {
            do throws(BlockError) {
                try await q.makeEmpty()
            } catch {
                return ToolError(message: error.message)
            }
        }
        return nil
    }

    /// QEMU's bdrv_find_backing_image: a layer whose backing file name,
    /// resolved against that layer's directory, is the same file as `name`
    /// resolved the same way (both canonicalised); protocol names compare
    /// as written.
    static func findBackingImage(_ top: BlockNode, _ name: String) -> BlockNode? {
        var cur: BlockNode = top
        while let below = cur.backing {
            defer { cur = below }
            let written = (cur.driver as? any BackingDriver)?.backingFileName ?? below.filename
            if isProtocolPath(name) || isProtocolPath(written) {
                if name == written || name == ImageOpener.resolveBackingPath(written, overlay: cur.filename) {
                    return below
                }
                continue
            }
            let wanted = ImageOpener.resolveBackingPath(name, overlay: cur.filename)
            let actual = ImageOpener.resolveBackingPath(written, overlay: cur.filename)
            guard let a = realPath(wanted), let b = realPath(actual) else { continue }
            if a == b { return below }
        }
        return nil
    }

    static func isProtocolPath(_ s: String) -> Bool {
        guard let colon = s.firstIndex(of: ":") else { return false }
        let prefix = s[..<colon]
        return !prefix.isEmpty && !prefix.contains("/")
    }
}

func realPath(_ path: String) -> String? {
    guard let p = realpath(path, nil) else { return nil }
    defer { free(p) }
    return String(cString: p)
}

/// The copy of an active commit: plans granule-aligned steps in order (the
/// mirror's rules) and runs reads and writes on a few I/O threads.
final class ChainCommitCopy: @unchecked Sendable {
    enum Method { case copy, zero, discard }

    let top: BlockNode
    let base: BlockNode
    let rate: Int64
    let progress: Progress
    let granularity: Int64
    /// Copy from the page cache of the layers' files (not with O_DIRECT).
    let mapHostFiles: Bool
    /// Backing links from the image down to the base.
    let baseDepth: Int
    static let maxIO: Int64 = 4 << 20
    static let workers = 4

    private struct Shared {
        var runs: [(Int64, Int64)] = []
        var runIndex = 0
        var pos: Int64 = 0
        var done: Int64 = 0
        var total: Int64 = 0
        var sinceWriteback: Int64 = 0
        var error: BlockError?
    }
    private let shared = Mutex(Shared())
    private let planLock = AsyncLock()
    private let progressLock = Mutex(())
    private let started = ContinuousClock.now

    /// The copy granularity is the base's default bitmap granularity
    /// (QEMU's mirror default: its cluster size, within 4 KiB..64 KiB).
    init(top: BlockNode, base: BlockNode, rate: Int64, progress: Progress, mapHostFiles: Bool) async {
        self.mapHostFiles = mapHostFiles
        var depth = 0
        var node: BlockNode? = top
        while let n = node, n !== base {
            depth += 1
            node = n.backing
        }
        self.baseDepth = depth
        self.top = top
        self.base = base
        self.rate = rate
        self.progress = progress
        if let info = await base.driverInfo() {
            granularity = min(65536, max(4096, Int64(info.clusterSize)))
        } else {
            granularity = 65536
        }
    }

    func run() async throws(BlockError) {
        let len = top.length
        if base.length < len {
            try await base.truncate(to: len)
        }
        // What lies above the base, in granules (the mirror's dirty bitmap).
        var runs: [(Int64, Int64)] = []
        var offset: Int64 = 0
        while offset < len {
            let (allocated, n0) = try await top.isAllocatedAbove(base: base, at: offset, length: len - offset)
            let n = n0 > 0 ? n0 : len - offset
            if allocated {
                let s = alignDown(offset, granularity)
                let e = min(len, alignUp(offset + n, granularity))
                if let last = runs.last, last.1 >= s {
                    runs[runs.count - 1].1 = max(last.1, e)
                } else {
                    runs.append((s, e))
                }
            }
            offset += n
        }
        let total = runs.reduce(Int64(0)) { $0 + $1.1 - $1.0 }
        shared.withLock {
            $0.runs = runs
            $0.total = total
            $0.pos = runs.first?.0 ?? 0
        }
        if runs.isEmpty { return }
        let pool = IOThreadPool(count: Self.workers, name: "commit")
        await withTaskGroup(of: Void.self) { group in
            for i in 0..<Self.workers {
                group.addTask(executorPreference: pool[i]) { await self.worker() }
            }
        }
        pool.shutdown()
        if let e = shared.withLock({ $0.error }) { throw e }
    }

    /// The next step: offset, length, method (nil when done).
    private func plan() async throws(BlockError) -> (Int64, Int64, Method)? {
        let (runEnd, off): (Int64, Int64)
        let next = shared.withLock { s -> (Int64, Int64)? in
            if s.error != nil { return nil }
            while s.runIndex < s.runs.count && s.pos >= s.runs[s.runIndex].1 {
                s.runIndex += 1
                if s.runIndex < s.runs.count { s.pos = s.runs[s.runIndex].0 }
            }
            guard s.runIndex < s.runs.count else { return nil }
            return (s.runs[s.runIndex].1, s.pos)
        }
        guard let n = next else { return nil }
        (runEnd, off) = n
        let want = runEnd - off
        let st = try await top.blockStatusAbove(base: nil, at: off, length: want)
        let f = st.status.flags
        var io = max(st.status.length, 1)
        var method = Method.copy
        if f.contains(.data) { io = min(io, Self.maxIO) }
        io -= io % granularity
        if io < granularity {
            io = granularity
        } else if !f.contains(.data) {
            method = f.contains(.zero) ? .zero : .discard
        }
        io = min(io, runEnd - off)
        shared.withLock { $0.pos = off + io }
        return (off, io, method)
    }

    private func fail(_ e: BlockError) {
        shared.withLock { if $0.error == nil { $0.error = e } }
    }

    private func worker() async {
        let buf = AlignedBuffer(count: Int(Self.maxIO))
        while true {
            await planLock.lock()
            let step: (Int64, Int64, Method)?
            do throws(BlockError) {
                step = try await plan()
            } catch {
                planLock.unlock()
                fail(error)
                return
            }
            planLock.unlock()
            guard let (off, n, method) = step else { return }
            do throws(BlockError) {
                switch method {
                case .copy:
                    var done: Int64 = 0
                    while done < n {
                        var m = min(n - done, Self.maxIO)
                        // Straight from the page cache of the layer's file
                        // when one data run covers the piece (no copy).
                        if mapHostFiles {
                            let cs = try await top.blockStatusAbove(base: nil, at: off + done, length: m)
                            let st = cs.status
                            // Only from layers above the base (never a page
                            // of the file being written).
                            if cs.depth < baseDepth, st.flags.contains(.data), st.flags.contains(.offsetValid),
                               !st.flags.contains(.zero), !st.flags.contains(.compressed),
                               let fd = st.hostNode?.driver as? FileDriver,
                               let map = HostMapping(fd.host, st.hostOffset, Int(min(m, st.length))) {
                                m = min(m, st.length)
                                defer { map.unmap() }
                                try await base.write(at: off + done,
                                                     from: UnsafeRawBufferPointer(start: map.pointer, count: Int(m)))
                                done += m
                                continue
                            }
                        }
                        let view = buf.slice(0, Int(m))
                        try await top.read(at: off + done, into: view)
                        try await base.write(at: off + done, from: UnsafeRawBufferPointer(view))
                        done += m
                    }
                case .zero:
                    try await base.writeZeroes(at: off, length: n, flags: [.mayUnmap])
                case .discard:
                    try await base.discard(at: off, length: n)
                }
            } catch {
                fail(error)
                return
            }
            let (done, total, kick) = shared.withLock { s -> (Int64, Int64, Bool) in
                s.done += n
                s.sinceWriteback += n
                let kick = s.sinceWriteback >= 32 << 20
                if kick { s.sinceWriteback = 0 }
                return (s.done, s.total, kick)
            }
            // Keep the base's writeback going, so the final flush finds
            // little left to write.
            if kick && method == .copy { await base.startWriteback() }
            progressLock.withLock { _ in
                progress.advance(Float(Double(done) / Double(max(total, 1)) * 100), max: 0)
            }
            if rate > 0 {
                // The job's speed limit: never ahead of rate bytes per second.
                let due = Double(done) / Double(rate)
                let elapsed = ContinuousClock.now - started
                let secs = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
                if due > secs {
                    try? await Task.sleep(nanoseconds: UInt64((due - secs) * 1e9))
                }
            }
        }
    }
}
