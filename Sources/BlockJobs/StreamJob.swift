import BlockCopy
import BlockCore
import BlockGraph
import BlockIO
import CopyOnReadDriver
import Synchronization

/// block-stream (QEMU 7.2's block/stream.c): a copy-on-read filter goes
/// above the node for the job's life (its users, exports included, now
/// read and write through it); the job reads every range that layers down
/// to `bottom` allocate and the node does not, through the filter, which
/// copies it into the node. Then the node's backing file becomes the base.
public final class StreamJob: BlockJobDriver {
    /// The node streamed into (QEMU's target_bs).
    let target: BlockNode
    /// The lowest layer streamed from (QEMU's base_overlay).
    let bottom: BlockNode
    let backingFile: String?
    /// The node was read-only and reopened read-write for the job.
    let reopened: Bool
    let filter: BlockNode
    /// The job's own backend on the filter (QEMU's s->blk).
    let blk: BlockBackend
    let editor: any GraphEditor
    private let filterDropped = Atomic<Bool>(false)

    public static let chunk: Int64 = 512 * 1024

    public var type: JobType { .stream }

    private init(target: BlockNode, bottom: BlockNode, backingFile: String?, reopened: Bool, filter: BlockNode,
                 blk: BlockBackend, editor: any GraphEditor) {
        self.target = target
        self.bottom = bottom
        self.backingFile = backingFile
        self.reopened = reopened
        self.filter = filter
        self.blk = blk
        self.editor = editor
    }

    /// QEMU's stream_start, after the QMP checks: reopens the node
    /// read-write if needed, inserts the filter (named `filterNodeName`,
    /// else implicit), creates the job with its edges and backend, and
    /// starts it. On failure everything is undone.
    @ControlActor
    public static func start(_ jobs: JobManager, editor: any GraphEditor, id: String, node bs: BlockNode,
                             bottom: BlockNode, backingFile: String?, filterNodeName: String?, speed: Int64,
                             onError: BlockdevOnError, autoFinalize: Bool, autoDismiss: Bool) async throws(BlockError) -> Job {
        let graph = editor.graph
        let reopened = bs.readOnly
        if reopened { try await graph.reopenReadWrite(bs) }
        var filter: BlockNode?
        var job: Job?
        var blk: BlockBackend?
        do throws(BlockError) {
            bs.retain()
            let f = BlockNode(driver: CopyOnReadFilter(file: bs, bottom: bottom), filename: graph.displayFilename(bs),
                              readOnly: false)
            do throws(BlockError) {
                try graph.registerFilter(f, name: filterNodeName)
            } catch {
                try? await f.close()
                throw error.prefixed("Could not create node: ")
            }
            do throws(BlockError) {
                try await graph.insertFilter(f, above: bs)
            } catch {
                try? await f.close()
                graph.sweepClosed()
                throw error.prefixed("Could not replace node: ")
            }
            filter = f
            editor.filterInserted(f, namedAfterChild: false)
            let b = BlockBackend(node: f, perm: .consistentRead, shared: [.consistentRead, .writeUnchanged, .write],
                                 queuesRequests: false)
            blk = b
            let driver = StreamJob(target: bs, bottom: bottom, backingFile: backingFile, reopened: reopened,
                                   filter: f, blk: b, editor: editor)
            let j = try await jobs.createBlockJob(id: id, driver: driver, speed: speed, onError: onError,
                                                  autoFinalize: autoFinalize, autoDismiss: autoDismiss,
                                                  mainNode: f, perm: [], shared: .all)
            job = j
            try await graph.attach(b)
            let basic: BlockPermissions = [.consistentRead, .writeUnchanged]
            try await j.nodes?.add("active node", bs, perm: [], shared: basic.union(.write))
            // Every layer that leaves the chain: nobody may change it.
            var n = bs.filterOrBacking
            let base = bottom.filterOrBacking
            while let c = n, c !== base {
                try await j.nodes?.add("intermediate node", c, perm: [], shared: basic)
                n = c.filterOrBacking
            }
            jobs.start(j)
            return j
        } catch {
            if let job { await jobs.discardNew(job) }
            if let blk { await graph.detach(blk) }
            if let filter { await graph.dropFilter(filter) }
            if reopened { await graph.reopenReadOnly(bs) }
            throw error
        }
    }

    public func body(_ job: Job) async throws(BlockError) {
        let top = target.skippingFilters
        if top === bottom { return }
        let len = target.length
        let (bottom, blk) = (self.bottom, self.blk)
        // One step at a time (QEMU's stream), on the home context's workers.
        let engine = BlockCopy(.init(chunk: Self.chunk, executors: target.context?.transferExecutors ?? [],
                                     writebackTarget: top))
        try await engine.copyRange(length: len, controller: job, ignored: .skipAndFail) { (offset, n0) throws(BlockError) in
            // Allocated in the top: nothing to copy. Else copy what the
            // layers down to the bottom allocate (QEMU's stream_run).
            let st = try await top.blockStatus(at: offset, length: n0)
            var n = max(1, min(st.length, n0))
            if st.flags.contains(.allocated) { return CopyStep(offset: offset, length: n, method: .skip) }
            guard let below = top.filterOrBacking else { return CopyStep(offset: offset, length: n, method: .skip) }
            let (allocated, m) = try await below.isAllocatedAbove(base: bottom.filterOrBacking, at: offset, length: n)
            n = m > 0 ? m : len - offset
            return CopyStep(offset: offset, length: n, method: allocated ? .copy : .skip)
        } perform: { (step, _) throws(CopyFailure) in
            do throws(BlockError) {
                try await blk.request { (node) async throws(BlockError) in
                    try await node.prefetch(at: step.offset, length: step.length)
                }
            } catch {
                throw CopyFailure(error, isRead: true)
            }
        }
    }

    /// QEMU's bdrv_cor_filter_drop: the filter's users go back to the node.
    @ControlActor private func dropFilter() async {
        if filterDropped.exchange(true, ordering: .acquiringAndReleasing) { return }
        await editor.graph.dropFilter(filter)
    }

    /// QEMU's stream_prepare: the filter goes, then the node's backing file
    /// becomes the base, in memory and in its header. (Lamina also makes
    /// the copied data durable before the header stops pointing at the
    /// layers it came from.)
    @ControlActor public func prepare(_ job: Job) async throws(BlockError) {
        await dropFilter()
        let top = target.skippingFilters
        try await top.flush()
        let base = bottom.filterOrBacking
        if top.backing === base { return }
        try await editor.changeBacking(of: top, to: base, backingFile: backingFile)
    }

    /// QEMU's stream_clean.
    @ControlActor public func clean(_ job: Job) async {
        await dropFilter()
        await editor.graph.detach(blk)
        if reopened { await editor.graph.reopenReadOnly(target) }
    }
}
