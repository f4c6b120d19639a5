import BlockCopy
import BlockCore
import BlockGraph
import BlockIO
import Synchronization

/// Active commit (QEMU 7.2's commit_active_start: a mirror of the active
/// layer into its base): a `mirror_top` filter goes above the active layer
/// (its users, exports included, read and write through it); a dirty
/// bitmap on the active layer records guest writes; the job copies what
/// lies above the base, then keeps copying what guests write. READY once
/// in sync (after a flush of the base). block-job-complete pivots: with
/// the users drained, the rest is copied and they use the base from then
/// on; a cancel after READY ends the job successfully without the pivot.
public final class ActiveCommitJob: BlockJobDriver {
    let source: BlockNode
    let base: BlockNode
    let filter: BlockNode
    /// The job's backend on the base (QEMU's s->target).
    let targetBlk: BlockBackend
    let dirty: DirtyBitmap
    let granularity: Int64
    let editor: any GraphEditor
    private let shouldComplete = Atomic<Bool>(false)
    private let exited = Atomic<Bool>(false)

    /// QEMU's MAX_IO_BYTES, MAX_IN_FLIGHT and DEFAULT_MIRROR_BUF_SIZE.
    public static let maxIO: Int64 = 1 << 20
    public static let maxInFlight = 16
    public static let bufSize: Int64 = 16 << 20

    public var type: JobType { .commit }

    private init(source: BlockNode, base: BlockNode, filter: BlockNode, targetBlk: BlockBackend,
                 granularity: Int64, editor: any GraphEditor) {
        self.source = source
        self.base = base
        self.filter = filter
        self.targetBlk = targetBlk
        self.granularity = granularity
        self.editor = editor
        dirty = DirtyBitmap(size: source.length, granularity: granularity)
    }

    /// QEMU's commit_active_start + mirror_start_job, after the QMP
    /// checks: `base` reopened read-write, the mirror_top filter above
    /// `top` (named `filterNodeName`, else implicit), the job with its
    /// edges and backend, the dirty bitmap; then the job starts.
    @ControlActor
    public static func start(_ jobs: JobManager, editor: any GraphEditor, id: String, top: BlockNode,
                             base: BlockNode, filterNodeName: String?, speed: Int64, onError: BlockdevOnError,
                             autoFinalize: Bool, autoDismiss: Bool) async throws(BlockError) -> Job {
        let graph = editor.graph
        let reopened = base.readOnly
        if reopened { try await graph.reopenReadWrite(base) }
        var filter: BlockNode?
        var job: Job?
        var driver: ActiveCommitJob?
        do throws(BlockError) {
            top.retain()
            let f = BlockNode(driver: JobTopFilter(kind: .mirrorTop(isCommit: true), over: top),
                              filename: graph.displayFilename(top), readOnly: false)
            do throws(BlockError) {
                try graph.registerFilter(f, name: filterNodeName)
                try await graph.insertFilter(f, above: top)
            } catch {
                try? await f.close()
                graph.sweepClosed()
                throw error
            }
            filter = f
            editor.filterInserted(f, namedAfterChild: true)
            var targetPerm: BlockPermissions = .write
            if base.length < top.length { targetPerm.insert(.resize) }
            let blk = BlockBackend(node: base, perm: targetPerm, shared: [.writeUnchanged, .consistentRead, .write],
                                   queuesRequests: false)
            let d = ActiveCommitJob(source: top, base: base, filter: f, targetBlk: blk,
                                    granularity: await BlockCopy.defaultGranularity(of: base), editor: editor)
            driver = d
            let j = try await jobs.createBlockJob(id: id, driver: d, speed: speed, onError: onError,
                                                  autoFinalize: autoFinalize, autoDismiss: autoDismiss,
                                                  mainNode: f, perm: .consistentRead,
                                                  shared: [.consistentRead, .writeUnchanged, .write])
            job = j
            // The job's reference of the filter is enough now.
            try? await f.close()
            try await graph.attach(blk)
            // Writes from now on are recorded before any copying starts.
            top.addDirtyBitmap(d.dirty)
            try await j.nodes?.add("source", top, perm: [], shared: [.writeUnchanged, .write, .consistentRead])
            try await j.nodes?.add("target", base, perm: [], shared: .all)
            var n = top.filterOrBacking
            while let c = n, c !== base {
                try await j.nodes?.add("intermediate node", c, perm: [], shared: [.writeUnchanged, .write])
                n = c.filterOrBacking
            }
            jobs.start(j)
            return j
        } catch {
            if let driver {
                top.removeDirtyBitmap(driver.dirty)
                await graph.detach(driver.targetBlk)
            }
            if let job { await jobs.discardNew(job) }
            if let filter { await graph.dropFilter(filter, releasing: job == nil) }
            if reopened { await graph.reopenReadOnly(base) }
            throw error
        }
    }

    private var engine: BlockCopy {
        // QEMU's bdrv_can_write_zeroes_with_unmap: zeroes cost nothing
        // when the base may unmap.
        BlockCopy(.init(chunk: Self.maxIO, runLength: Self.bufSize, freeZeroes: base.policy.discardUnmap,
                        inFlight: Self.maxInFlight, executors: source.context?.transferExecutors ?? [],
                        writebackTarget: base))
    }

    /// One step into the base: data read from the source, zeroes, or a discard.
    private var perform: BlockCopy.Perform {
        let (source, blk) = (self.source, self.targetBlk)
        return { (step, buffer) throws(CopyFailure) in
            let view = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<Int(step.length)])
            if step.method == .copy {
                do throws(BlockError) {
                    try await source.read(at: step.offset, into: view)
                } catch {
                    throw CopyFailure(error, isRead: true)
                }
            }
            do throws(BlockError) {
                try await blk.request { (node) async throws(BlockError) in
                    switch step.method {
                    case .copy: try await node.write(at: step.offset, from: UnsafeRawBufferPointer(view))
                    case .zero: try await node.writeZeroes(at: step.offset, length: step.length, flags: [.mayUnmap])
                    case .discard: try await node.discard(at: step.offset, length: step.length)
                    case .skip: break
                    }
                }
            } catch {
                throw CopyFailure(error, isRead: false)
            }
        }
    }

    /// QEMU's mirror_run for a commit.
    public func body(_ job: Job) async throws(BlockError) {
        let len = source.length
        if base.length < len {
            try await targetBlk.request { (node) async throws(BlockError) in try await node.truncate(to: len) }
        }
        // What lies above the base must go down (QEMU's mirror_dirty_init).
        try await BlockCopy.markAllocated(dirty, top: source, above: base) { job.cancelRequested }
        let base = self.base
        try await engine.copyDirty(bitmap: dirty, controller: job,
                                   plan: BlockCopy.mirrorPlan(source: source, granularity: granularity, maxIO: Self.maxIO),
                                   perform: perform) { () throws(BlockError) in
            // In sync. As QEMU's mirror, the base is flushed before READY:
            // what READY promises survives a crash.
            if !job.isReady {
                do throws(BlockError) {
                    try await base.flush()
                } catch {
                    switch await job.errorAction(errno: error.errnoOrEIO, isRead: false) {
                    case .report: throw error
                    case .stop, .ignore: return true
                    }
                }
                await job.becomeReady()
            }
            if self.shouldComplete.load(ordering: .acquiring) { return false }
            // Wait for guest writes (or complete/cancel).
            await job.sleep(nanoseconds: 10_000_000)
            return true
        }
    }

    @ControlActor public func complete(_ job: Job) throws(BlockError) {
        shouldComplete.store(true, ordering: .releasing)
    }

    /// QEMU's mirror_cancel: a READY job cancelled without force finishes
    /// successfully, without the pivot.
    @ControlActor public func cancelIsForced(_ job: Job, force: Bool) -> Bool {
        force || !job.isReady
    }

    /// QEMU's mirror_exit_common: the base's backend goes, the filter stops
    /// passing permissions; on completion (users drained) the rest is
    /// copied and the base takes the active layer's place; the job's edges
    /// go and the filter is dropped (its users now use the base, or the
    /// active layer again).
    @ControlActor private func exit(_ job: Job, pivot: Bool) async throws(BlockError) {
        if exited.exchange(true, ordering: .acquiringAndReleasing) { return }
        let graph = editor.graph
        source.removeDirtyBitmap(dirty)
        var failure: BlockError?
        try? await graph.drained([filter]) { () async throws(BlockError) in
            if pivot {
                do throws(BlockError) {
                    try await copyRemaining(job)
                    try await base.flush()
                } catch {
                    failure = error
                }
            }
            await graph.detach(targetBlk)
            (filter.driver as? JobTopFilter)?.stop()
            try? graph.refresh([filter])
            if pivot && failure == nil {
                // The active layer's place (the filter's edge) goes to the
                // base, and with it, below, the filter's users.
                let entry = graph.entry(source)
                if graph.entry(base)?.monitorOwned != true { base.retain() }
                do throws(BlockError) {
                    try await graph.replaceNode(source, with: base)
                    if entry?.monitorOwned != true { try? await source.close() }
                } catch {
                    failure = error
                }
            }
            await job.nodes?.removeAll()
        }
        await graph.dropFilter(filter, releasing: false)
        graph.sweepClosed()
        graph.refreshAll()
        if let failure { throw failure }
    }

    /// Copies what is still dirty (with the users drained).
    private func copyRemaining(_ job: Job) async throws(BlockError) {
        let buffer = AlignedBuffer(count: Int(Self.maxIO))
        let plan = BlockCopy.mirrorPlan(source: source, granularity: granularity, maxIO: Self.maxIO)
        while let (start, length) = dirty.nextDirtyRun(from: 0, maxLength: Self.maxIO) {
            dirty.clear(start, length)
            var pos = start
            while pos < start + length {
                let step = try await plan(pos, start + length - pos)
                do throws(CopyFailure) {
                    try await perform(step, buffer.bytes)
                } catch {
                    dirty.mark(pos, start + length - pos)
                    throw error.error
                }
                job.progressUpdate(UInt64(step.length))
                pos += step.length
            }
        }
        job.progressSetRemaining(0)
    }

    @ControlActor public func prepare(_ job: Job) async throws(BlockError) {
        try await exit(job, pivot: shouldComplete.load(ordering: .acquiring) && !job.cancelRequested)
    }

    @ControlActor public func abort(_ job: Job) async {
        try? await exit(job, pivot: false)
    }
}
