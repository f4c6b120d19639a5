import BlockCore
import BlockGraph
import Synchronization

/// The graph side of a block job (QEMU's BlockJob nodes list and its
/// blocker): the job holds an edge to every node it works on, with the
/// permissions it needs and shares; those edges stay at their nodes when
/// the graph changes around them, and each node refuses other operations
/// with "Node 'x' is busy: block device is in use by block job: <type>".
///
/// Drained sections pause the job (QEMU's child_job_drained_begin) and
/// wait until its body is at a pause point.
public final class BlockJobNodes: GraphJob {
    public let jobID: String
    public let type: JobType
    let blocker: OpBlocker
    private let state = Mutex<(edges: [BlockChild], job: Job?)>(([], nil))

    public init(jobID: String, type: JobType) {
        self.jobID = jobID
        self.type = type
        self.blocker = OpBlocker("block device is in use by block job: \(type.rawValue)")
    }

    /// Set when the job exists (drained sections pause it).
    func bind(_ job: Job) { state.withLock { $0.job = job } }

    /// Newest first (QEMU prepends).
    public var edges: [BlockChild] { state.withLock { $0.edges } }

    public var parentDescription: String { "\(type.rawValue) job '\(jobID)'" }
    public var staysAtNode: Bool { true }

    /// QEMU's block_job_add_bdrv: an edge `name` to `node` taking `perm`
    /// and sharing `shared`, checked by the permission update; every
    /// operation on `node` is then blocked.
    @ControlActor
    public func add(_ name: String, _ node: BlockNode, perm: BlockPermissions, shared: BlockPermissions) async throws(BlockError) {
        node.retain()
        let edge = BlockChild(name: name, role: [], node: node)
        edge.setPermissions(perm, shared)
        edge.attach(to: self)
        do throws(BlockError) {
            try PermissionUpdate.refresh([node])
        } catch {
            edge.detach()
            try? PermissionUpdate.refresh([node])
            try? await node.close()
            throw error
        }
        state.withLock { $0.edges.insert(edge, at: 0) }
        node.block(blocker, owner: self)
    }

    /// QEMU's block_job_remove_all_bdrv: the edges go, the nodes are
    /// unblocked, permissions loosen, references are dropped.
    @ControlActor
    public func removeAll() async {
        let edges = state.withLock { s -> [BlockChild] in
            defer { s.edges = [] }
            return s.edges
        }
        for e in edges {
            e.node.unblock(owner: self)
            e.detach()
        }
        for e in edges {
            try? PermissionUpdate.refresh([e.node])
            try? await e.node.close()
        }
    }

    public func drainBegin() async {
        guard let job = state.withLock({ $0.job }) else { return }
        await job.drainPause()
    }

    public func drainEnd() async {
        await state.withLock { $0.job }?.drainResume()
    }
}
