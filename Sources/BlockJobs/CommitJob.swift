import BlockCopy
import BlockCore
import BlockGraph
import BlockIO
import Synchronization

/// block-commit of layers below the active one (QEMU 7.2's block/commit.c):
/// a `commit_top` filter goes above `top` (the overlay reads through it),
/// the job copies what `top` and the layers down to `base` hold into
/// `base`, then the overlay's backing file becomes `base`. Nobody writes
/// the committed layers meanwhile (the job's edges refuse it); reads
/// through them stay correct because each range reaches `base` with the
/// same bytes.
public final class CommitJob: BlockJobDriver {
    let top: BlockNode
    let base: BlockNode
    /// The layer whose backing is `base` (QEMU's base_overlay).
    let baseOverlay: BlockNode
    let backingFile: String?
    /// `base` was read-only and reopened read-write for the job.
    let reopened: Bool
    let commitTop: BlockNode
    /// The job's backends (QEMU's s->base and s->top).
    let baseBlk: BlockBackend
    let topBlk: BlockBackend
    let editor: any GraphEditor
    private let filterGone = Atomic<Bool>(false)

    /// QEMU's COMMIT_BUFFER_SIZE.
    public static let chunk: Int64 = 512 * 1024

    public var type: JobType { .commit }

    private init(top: BlockNode, base: BlockNode, baseOverlay: BlockNode, backingFile: String?, reopened: Bool,
                 commitTop: BlockNode, baseBlk: BlockBackend, topBlk: BlockBackend, editor: any GraphEditor) {
        self.top = top
        self.base = base
        self.baseOverlay = baseOverlay
        self.backingFile = backingFile
        self.reopened = reopened
        self.commitTop = commitTop
        self.baseBlk = baseBlk
        self.topBlk = topBlk
        self.editor = editor
    }

    /// QEMU's commit_start, after the QMP checks: the job on the device
    /// `bs`, `base` reopened read-write, the `commit_top` filter above
    /// `top` (named `filterNodeName`, else implicit), the job's edges and
    /// backends; then the job starts. On failure everything is undone.
    @ControlActor
    public static func start(_ jobs: JobManager, editor: any GraphEditor, id: String, device bs: BlockNode,
                             top: BlockNode, base: BlockNode, backingFile: String?, filterNodeName: String?,
                             speed: Int64, onError: BlockdevOnError, autoFinalize: Bool,
                             autoDismiss: Bool) async throws(BlockError) -> Job {
        let graph = editor.graph
        if top.skippingFilters === base.skippingFilters {
            throw BlockError.invalid("Invalid files for merge: top and base are the same")
        }
        // QEMU's bdrv_find_overlay(top, base).
        var baseOverlay = top
        while let below = baseOverlay.filterOrBacking, below !== base { baseOverlay = below }
        var basePerms: BlockPermissions = [.consistentRead, .write]
        if base.length < top.length { basePerms.insert(.resize) }
        let reopened = base.readOnly
        var job: Job?
        var filter: BlockNode?
        var blks: [BlockBackend] = []
        do throws(BlockError) {
            // The driver needs the filter and backends: build them first,
            // attach them once the job exists (QEMU's order of checks).
            top.retain()
            // QEMU opens it with no flags: read-only.
            let f = BlockNode(driver: JobTopFilter(kind: .commitTop, over: top), filename: graph.displayFilename(top),
                              readOnly: true)
            let baseBlk = BlockBackend(node: base, perm: basePerms, shared: [.consistentRead, .writeUnchanged],
                                       queuesRequests: false)
            let topBlk = BlockBackend(node: top, perm: [], shared: .all, queuesRequests: false)
            blks = [baseBlk, topBlk]
            let driver = CommitJob(top: top, base: base, baseOverlay: baseOverlay, backingFile: backingFile,
                                   reopened: reopened, commitTop: f, baseBlk: baseBlk, topBlk: topBlk, editor: editor)
            let j: Job
            do throws(BlockError) {
                j = try await jobs.createBlockJob(id: id, driver: driver, speed: speed, onError: onError,
                                                  autoFinalize: autoFinalize, autoDismiss: autoDismiss,
                                                  mainNode: bs, perm: [], shared: .all)
            } catch {
                try? await f.close()
                throw error
            }
            job = j
            if reopened { try await graph.reopenReadWrite(base) }
            do throws(BlockError) {
                try graph.registerFilter(f, name: filterNodeName)
                try await graph.insertFilter(f, above: top)
            } catch {
                try? await f.close()
                graph.sweepClosed()
                throw error
            }
            // The filter's users hold it now.
            try? await f.close()
            filter = f
            editor.filterInserted(f, namedAfterChild: true)
            // Every layer from top down to base leaves the chain: nobody
            // reads it consistently or resizes it meanwhile.
            var n: BlockNode? = top
            while let c = n, c !== base {
                try await j.nodes?.add("intermediate node", c, perm: [], shared: [.writeUnchanged, .write])
                n = c.filterOrBacking
            }
            try await j.nodes?.add("base", base, perm: [], shared: .all)
            try await graph.attach(baseBlk)
            try await graph.attach(topBlk)
            jobs.start(j)
            return j
        } catch {
            for b in blks.reversed() { await graph.detach(b) }
            if let job { await jobs.discardNew(job) }
            if let filter { await graph.dropFilter(filter, releasing: false) }
            if reopened { await graph.reopenReadOnly(base) }
            throw error
        }
    }

    public func body(_ job: Job) async throws(BlockError) {
        let len = topBlk.node.length
        if baseBlk.node.length < len {
            try await baseBlk.request { (node) async throws(BlockError) in
                try await node.truncate(to: len)
            }
        }
        let (top, baseOverlay, topBlk, baseBlk) = (self.top, self.baseOverlay, self.topBlk, self.baseBlk)
        let engine = BlockCopy(.init(chunk: Self.chunk, executors: top.context?.transferExecutors ?? [],
                                     writebackTarget: base))
        try await engine.copyRange(length: len, controller: job, ignored: .retry) { (offset, n0) throws(BlockError) in
            // Copy if allocated above the base (QEMU's commit_run).
            let (allocated, m) = try await top.isAllocatedAbove(base: baseOverlay.filterOrBacking, at: offset, length: n0)
            return CopyStep(offset: offset, length: m > 0 ? m : n0, method: allocated ? .copy : .skip)
        } perform: { (step, buffer) throws(CopyFailure) in
            let view = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<Int(step.length)])
            do throws(BlockError) {
                try await topBlk.request { (node) async throws(BlockError) in
                    try await node.read(at: step.offset, into: view)
                }
            } catch {
                throw CopyFailure(error, isRead: true)
            }
            do throws(BlockError) {
                try await baseBlk.request { (node) async throws(BlockError) in
                    try await node.write(at: step.offset, from: UnsafeRawBufferPointer(view))
                }
            } catch {
                throw CopyFailure(error, isRead: false)
            }
        }
    }

    /// QEMU's commit_prepare: the base's backend goes, then
    /// bdrv_drop_intermediate: the filter's users (the overlay) use `base`
    /// from now on, and the overlay's header names it. (Lamina makes the
    /// committed data durable first.)
    @ControlActor public func prepare(_ job: Job) async throws(BlockError) {
        try await base.flush()
        await editor.graph.detach(baseBlk)
        guard let overlay = commitTop.parents.compactMap({ $0.parent as? BlockNode }).first else { return }
        try await editor.changeBacking(of: overlay, to: base, backingFile: backingFile, replacing: commitTop)
        filterGone.store(true, ordering: .releasing)
    }

    /// QEMU's commit_abort: the job's edges go, and the filter's users read
    /// `top` again.
    @ControlActor public func abort(_ job: Job) async {
        await editor.graph.detach(baseBlk)
        await job.nodes?.removeAll()
        if !filterGone.exchange(true, ordering: .acquiringAndReleasing) {
            await editor.graph.dropFilter(commitTop, releasing: false)
        }
    }

    /// QEMU's commit_clean.
    @ControlActor public func clean(_ job: Job) async {
        if reopened { await editor.graph.reopenReadOnly(base) }
        await editor.graph.detach(topBlk)
    }
}
