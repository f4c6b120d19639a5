#if canImport(Glibc)
import Glibc
#endif
import BlockCore
import BlockGraph
import BlockIO
import BlockJobs
import QMP
import Qcow2
import Synchronization

/// block-commit of layers below the active one (QEMU's block/commit.c):
/// copies what `top` and the layers down to `base` hold into `base`, then
/// the overlay of `top` gets `base` as its backing file. Nobody writes the
/// committed layers meanwhile; guest reads through them stay correct
/// because each range moves into `base` with the same bytes.
final class CommitJobDriver: BlockJobDriver {
    let top: BlockNode
    let base: BlockNode
    /// The node whose backing is `top` (its backing file changes).
    let overlay: BlockNode
    let backingFile: String?
    /// `base` was read-only and reopened read-write for the job.
    let reopened: Bool
    let daemon: Daemon

    static let chunk: Int64 = 512 * 1024

    init(top: BlockNode, base: BlockNode, overlay: BlockNode, backingFile: String?, reopened: Bool, daemon: Daemon) {
        self.top = top
        self.base = base
        self.overlay = overlay
        self.backingFile = backingFile
        self.reopened = reopened
        self.daemon = daemon
    }

    var type: JobType { .commit }

    func body(_ job: Job) async throws(BlockError) {
        let len = top.length
        job.progressSetRemaining(UInt64(len))
        if base.length < len {
            try await base.truncate(to: len)
        }
        let buffer = AlignedBuffer(count: Int(Self.chunk))
        try await job.copyLoop(length: len, chunk: Self.chunk, target: base) { (offset, n0) in
            let allocated: Bool
            var n = n0
            do throws(BlockError) {
                let (a, m) = try await top.isAllocatedAbove(base: base, at: offset, length: n)
                (allocated, n) = (a, m > 0 ? m : n)
            } catch {
                return CopyStep(length: n, copied: false, failure: (error, true))
            }
            guard allocated else { return CopyStep(length: n, copied: false, failure: nil) }
            let view = buffer.slice(0, Int(n))
            do throws(BlockError) {
                try await top.read(at: offset, into: view)
            } catch {
                return CopyStep(length: n, copied: true, failure: (error, true))
            }
            do throws(BlockError) {
                try await base.write(at: offset, from: UnsafeRawBufferPointer(view))
            } catch {
                return CopyStep(length: n, copied: true, failure: (error, false))
            }
            return CopyStep(length: n, copied: true, failure: nil)
        }
    }

    @ControlActor func prepare(_ job: Job) async throws(BlockError) {
        // The committed data is durable before the overlay stops pointing
        // at the layers that held it.
        try await base.flush()
        try await daemon.replaceBacking(of: overlay, with: base, backingFile: backingFile)
    }

    @ControlActor func clean(_ job: Job) async {
        if reopened {
            await daemon.reopenReadOnlyWithFile(base)
        }
        daemon.graph.refreshAll()
    }
}

/// Active commit (QEMU's commit_active_start, a mirror of the active layer
/// into its base): copies everything above `base` into it while guest
/// writes go on; a dirty bitmap on the active layer records what to copy
/// again. READY once in sync; block-job-complete drains the exports,
/// copies the rest and pivots them to `base`; a cancel after READY ends
/// the job without pivoting.
final class ActiveCommitJobDriver: BlockJobDriver {
    let top: BlockNode
    let base: BlockNode
    let reopened: Bool
    let daemon: Daemon
    let dirty: DirtyBitmap
    private let shouldComplete = Atomic<Bool>(false)

    static let chunk: Int64 = 1024 * 1024

    init(top: BlockNode, base: BlockNode, reopened: Bool, daemon: Daemon) {
        self.top = top
        self.base = base
        self.reopened = reopened
        self.daemon = daemon
        let granularity = Int64((base.driver as? Qcow2Image)?.clusterSize ?? 65536)
        dirty = DirtyBitmap(size: top.length, granularity: max(4096, granularity))
        // Writes from now on are recorded before any copying starts.
        top.addDirtyBitmap(dirty)
    }

    var type: JobType { .commit }

    /// Copies one dirty run from the active layer into the base.
    private func copy(_ start: Int64, _ length: Int64, _ buffer: AlignedBuffer) async -> (BlockError, Bool)? {
        dirty.clear(start, length)
        let view = buffer.slice(0, Int(length))
        do throws(BlockError) {
            try await top.read(at: start, into: view)
        } catch {
            dirty.mark(start, length)
            return (error, true)
        }
        do throws(BlockError) {
            try await base.write(at: start, from: UnsafeRawBufferPointer(view))
        } catch {
            dirty.mark(start, length)
            return (error, false)
        }
        return nil
    }

    /// Copies everything still dirty (the pivot, with the exports drained).
    func copyRemaining(_ job: Job) async throws(BlockError) {
        let buffer = AlignedBuffer(count: Int(Self.chunk))
        while let (start, length) = dirty.nextDirtyRun(from: 0, maxLength: Self.chunk) {
            if let (error, _) = await copy(start, length, buffer) { throw error }
            job.progressUpdate(UInt64(length))
        }
        job.progressSetRemaining(0)
    }

    func body(_ job: Job) async throws(BlockError) {
        let len = top.length
        if base.length < len {
            try await base.truncate(to: len)
        }
        // What lies above the base must go down (QEMU's mirror_dirty_init).
        var offset: Int64 = 0
        while offset < len {
            if job.cancelRequested { return }
            let (allocated, n0) = try await top.isAllocatedAbove(base: base, at: offset, length: len - offset)
            let n = n0 > 0 ? n0 : len - offset
            if allocated { dirty.mark(offset, n) }
            offset += n
        }
        let buffer = AlignedBuffer(count: Int(Self.chunk))
        var cursor: Int64 = 0
        var delay: UInt64 = 0
        var firstError: BlockError?
        var sinceWriteback: Int64 = 0
        job.progressSetRemaining(UInt64(dirty.dirtyBytes))
        while true {
            await job.sleep(nanoseconds: delay)
            delay = 0
            if job.cancelRequested { break }
            guard let (start, length) = dirty.nextDirtyRun(from: cursor, maxLength: Self.chunk)
                ?? dirty.nextDirtyRun(from: 0, maxLength: Self.chunk) else {
                // In sync. As QEMU's mirror, the base is flushed before READY:
                // what READY promises survives a crash.
                if !job.isReady {
                    do throws(BlockError) {
                        try await base.flush()
                    } catch {
                        let action = await job.errorAction(errno: error.errno != 0 ? error.errno : EIO, isRead: false)
                        if action == .stop { continue }
                        if action == .report { throw error }
                    }
                    await MainActorless.ready(job)
                }
                if shouldComplete.load(ordering: .acquiring) { break }
                // Wait for guest writes (or complete/cancel).
                await job.sleep(nanoseconds: 10_000_000)
                continue
            }
            if let (error, isRead) = await copy(start, length, buffer) {
                let action = await job.errorAction(errno: error.errno != 0 ? error.errno : EIO, isRead: isRead)
                if action == .stop { continue }
                if firstError == nil { firstError = error }
                if action == .report { break }
                // ignore: the range stays dirty and is tried again.
                cursor = start + length
                continue
            }
            cursor = start + length
            job.progressUpdate(UInt64(length))
            job.progressSetRemaining(UInt64(dirty.dirtyBytes))
            // Keep the base's writeback going, so the flush before READY
            // (and at completion) finds little left to write.
            sinceWriteback += length
            if sinceWriteback >= 32 << 20 {
                sinceWriteback = 0
                await base.startWriteback()
            }
            delay = job.rateLimitDelay(UInt64(length))
        }
        if let e = firstError { throw e }
    }

    @ControlActor func complete(_ job: Job) throws(BlockError) {
        shouldComplete.store(true, ordering: .releasing)
    }

    /// QEMU's mirror_cancel: a READY job cancelled without force finishes
    /// successfully, without the pivot.
    @ControlActor func cancelIsForced(_ job: Job, force: Bool) -> Bool {
        force || !job.isReady
    }

    @ControlActor func prepare(_ job: Job) async throws(BlockError) {
        guard shouldComplete.load(ordering: .acquiring) && !job.cancelRequested else { return }
        try await daemon.pivotActiveCommit(self, job: job)
    }

    @ControlActor func clean(_ job: Job) async {
        top.removeDirtyBitmap(dirty)
        // QEMU's mirror leaves the base read-write, pivoted or not.
        daemon.graph.refreshAll()
    }
}

extension MainActorless {
    @ControlActor static func ready(_ job: Job) { job.becomeReady() }
}

extension Daemon {
    /// block-commit: QEMU 7.2's checks in its order, then an intermediate
    /// or an active commit job.
    func blockCommit(_ a: CommitArgs) async throws(QMPError) {
        // The device: a root node (QEMU's qmp_get_root_bs), else DeviceNotFound.
        guard let bs = graph.find(a.device)?.node else {
            throw QMPError(.deviceNotFound, "Device '\(a.device)' not found")
        }
        try await Commands.qmp { () async throws(BlockError) in
            if !Self.isRootNode(bs) {
                throw BlockError.invalid("Need a root block node")
            }
            try bs.checkOp(.commitSource)
            var top: BlockNode? = bs
            if a.topNode != nil && a.top != nil {
                throw BlockError.invalid("'top-node' and 'top' are mutually exclusive")
            } else if let name = a.topNode {
                let t = try lookupNodeName(name)
                if !Self.chainContains(bs, t) {
                    throw BlockError.invalid("'\(name)' is not in this backing file chain")
                }
                top = t
            } else if let name = a.top, name != bs.filename {
                top = findBackingImage(bs, name)
            }
            guard let top else {
                throw BlockError.invalid("Top image file \(a.top ?? "NULL") not found")
            }
            var base: BlockNode
            if a.baseNode != nil && a.base != nil {
                throw BlockError.invalid("'base-node' and 'base' are mutually exclusive")
            } else if let name = a.baseNode {
                let b = try lookupNodeName(name)
                if !Self.chainContains(top, b) {
                    throw BlockError.invalid("'\(name)' is not in this backing file chain")
                }
                base = b
            } else if let name = a.base {
                guard let b = findBackingImage(top, name) else {
                    throw BlockError.invalid("Can't find '\(name)' in the backing chain")
                }
                base = b
            } else {
                // QEMU's bdrv_find_base: the bottom of the chain.
                var b = top
                while let below = b.backing { b = below }
                base = b
            }
            var busy: [BlockNode] = []
            var n: BlockNode? = top
            while let c = n {
                try c.checkOp(.commitTarget)
                busy.append(c)
                if c === base { break }
                n = c.backing
            }
            if top === base {
                throw BlockError.invalid("cannot commit an image into itself")
            }
            // QEMU: active commit when someone writes the top (or it is the device).
            let active = top === bs || top.cumulativePermissions.perm.contains(.write)
            if active && a.backingFile != nil {
                throw BlockError.invalid(top === bs ? "'backing-file' specified, but 'top' is the active layer"
                                                    : "'backing-file' specified, but 'top' has a writer on it")
            }
            var overlay: BlockNode?
            if !active {
                var o: BlockNode = bs
                while let below = o.backing, below !== top { o = below }
                guard o.backing === top else {
                    throw BlockError.invalid("Could not find overlay image for \(graph.displayFilename(top)):")
                }
                overlay = o
            }
            try jobs.checkNewID(a.jobID ?? "")
            if !(base.driver is Qcow2Image) && base.formatName != "raw" {
                throw BlockError.unsupported("Lamina commits into qcow2 or raw images only, not '\(base.formatName)'")
            }
            let reopened = base.readOnly
            if reopened {
                try await base.reopenReadWrite()
                graph.refreshAll()
            }
            let driver: any JobDriver
            if let overlay {
                driver = CommitJobDriver(top: top, base: base, overlay: overlay, backingFile: a.backingFile,
                                         reopened: reopened, daemon: self)
            } else {
                driver = ActiveCommitJobDriver(top: top, base: base, reopened: reopened, daemon: self)
            }
            let job: Job
            do throws(BlockError) {
                job = try await startBlockJob(id: a.jobID, driver: driver, speed: a.speed, onError: a.onError,
                                              autoFinalize: a.autoFinalize, autoDismiss: a.autoDismiss)
                try await addJobNodes(job, "main node", [bs])
                try await addJobNodes(job, "intermediate node", busy.filter { $0 !== bs })
            } catch {
                if let ac = driver as? ActiveCommitJobDriver { top.removeDirtyBitmap(ac.dirty) }
                if reopened { await reopenReadOnlyWithFile(base) }
                throw error
            }
            jobs.start(job)
        }
    }

    /// block-job-complete of an active commit: with every export drained,
    /// copy what is still dirty, then the exports of the active layer
    /// serve the base and the committed layers are dropped.
    func pivotActiveCommit(_ driver: ActiveCommitJobDriver, job: Job) async throws(BlockError) {
        let (top, base) = (driver.top, driver.base)
        try await withDrained([top]) { () async throws(BlockError) in
            try await driver.copyRemaining(job)
            try await base.flush()
            // The base takes over the active layer's place (and its
            // top-level reference unless the monitor owns it).
            let baseRec = graph.entry(base)
            let topRec = graph.entry(top)
            if baseRec?.monitorOwned != true { base.retain() }
            try await graph.replaceNode(top, with: base)
            if topRec?.monitorOwned != true {
                try? await top.close()
            }
        }
        graph.sweepClosed()
        graph.refreshAll()
    }
}
