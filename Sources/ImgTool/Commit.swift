#if canImport(Glibc)
import Glibc
#endif
import BlockCore
import BlockDrivers
import BlockCopy
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
            try await ChainCommitCopy.run(top: top, base: base, rate: rate, progress: progress, mapHostFiles: mapHostFiles)
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

/// The copy of qemu-img commit (QEMU runs an active commit, a mirror of
/// the image into its base) on the block layer's copy engine: what lies
/// above the base, in granules, is a dirty bitmap; each range goes down as
/// the mirror decides (data copied, zeroes written, unallocated discarded)
/// with a few steps in flight on I/O threads, at `-r`'s rate.
enum ChainCommitCopy {
    static let maxIO: Int64 = 4 << 20
    static let workers = 4

    static func run(top: BlockNode, base: BlockNode, rate: Int64, progress: Progress,
                    mapHostFiles: Bool) async throws(BlockError) {
        let len = top.length
        if base.length < len {
            try await base.truncate(to: len)
        }
        let granularity = await BlockCopy.defaultGranularity(of: base)
        let bitmap = DirtyBitmap(size: len, granularity: granularity)
        try await BlockCopy.markAllocated(bitmap, top: top, above: base)
        if bitmap.isClean { return }
        // Backing links from the image down to the base.
        var baseDepth = 0
        var node: BlockNode? = top
        while let n = node, n !== base {
            baseDepth += 1
            node = n.backing
        }
        let pool = IOThreadPool(count: workers, name: "commit")
        defer { pool.shutdown() }
        let controller = OfflineCopy(rate: UInt64(max(0, rate)), total: bitmap.dirtyBytes, progress: progress)
        let engine = BlockCopy(.init(chunk: maxIO, runLength: 16 << 20, inFlight: workers, executors: pool.threads,
                                     writebackTarget: base))
        let depth = baseDepth
        try await engine.copyDirty(bitmap: bitmap, controller: controller,
                                   plan: BlockCopy.mirrorPlan(source: top, granularity: granularity, maxIO: maxIO)) {
            (step, buffer) throws(CopyFailure) in
            do throws(BlockError) {
                switch step.method {
                case .copy:
                    try await copy(step, top: top, base: base, baseDepth: depth, mapHostFiles: mapHostFiles, buffer)
                case .zero:
                    try await base.writeZeroes(at: step.offset, length: step.length, flags: [.mayUnmap])
                case .discard:
                    try await base.discard(at: step.offset, length: step.length)
                case .skip:
                    break
                }
            } catch {
                throw CopyFailure(error, isRead: false)
            }
        } inSync: { () throws(BlockError) in false }
    }

    /// Copies one data step, straight from the page cache of a layer's
    /// file where one data run covers a piece (no bounce copy).
    private static func copy(_ step: CopyStep, top: BlockNode, base: BlockNode, baseDepth: Int, mapHostFiles: Bool,
                             _ buffer: UnsafeMutableRawBufferPointer) async throws(BlockError) {
        var done: Int64 = 0
        let n = step.length
        while done < n {
            var m = n - done
            let at = step.offset + done
            if mapHostFiles {
                let cs = try await top.blockStatusAbove(base: nil, at: at, length: m)
                let st = cs.status
                // Only from layers above the base (never a page of the
                // file being written).
                if cs.depth < baseDepth, st.flags.contains(.data), st.flags.contains(.offsetValid),
                   !st.flags.contains(.zero), !st.flags.contains(.compressed),
                   let fd = st.hostNode?.driver as? FileDriver,
                   let map = HostMapping(fd.host, st.hostOffset, Int(min(m, st.length))) {
                    m = min(m, st.length)
                    defer { map.unmap() }
                    try await base.write(at: at, from: UnsafeRawBufferPointer(start: map.pointer, count: Int(m)))
                    done += m
                    continue
                }
            }
            let view = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<Int(m)])
            try await top.read(at: at, into: view)
            try await base.write(at: at, from: UnsafeRawBufferPointer(view))
            done += m
        }
    }
}

/// What drives an offline copy: `-r`'s rate (QEMU's rate limiter, as the
/// job's speed), the progress line, no pause or cancel; every error fails
/// the copy.
final class OfflineCopy: CopyController, @unchecked Sendable {
    private struct State {
        var rate = RateLimit()
        var done: Int64 = 0
    }
    private let state = Mutex(State())
    private let speed: UInt64
    private let total: Int64
    /// Guarded by `state`'s lock order: only touched inside `state.withLock`.
    private let progress: Progress

    init(rate: UInt64, total: Int64, progress: Progress) {
        self.speed = rate
        self.total = max(1, total)
        self.progress = progress
    }

    func rateLimitDelay(_ bytes: UInt64) -> UInt64 {
        state.withLock { $0.rate.delay(speed: speed, bytes: bytes, now: monotonicNanoseconds()) }
    }

    func sleep(nanoseconds ns: UInt64) async {
        if ns > 0 { try? await Task.sleep(nanoseconds: ns) }
    }

    var cancelRequested: Bool { false }

    func progressUpdate(_ n: UInt64) {
        state.withLock { s in
            s.done += Int64(n)
            progress.advance(Float(Double(s.done) / Double(total) * 100), max: 0)
        }
    }

    func progressSetRemaining(_ remaining: UInt64) {}

    func errorAction(errno: Int32, isRead: Bool) async -> BlockErrorAction { .report }
}
