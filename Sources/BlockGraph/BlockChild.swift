import BlockCore
import Synchronization

/// Whoever holds edges into nodes (QEMU's BdrvChildClass side of a
/// BdrvChild): a node (its driver's children), a block backend (an
/// export's or a job's "root"), or a block job (its "main node",
/// "intermediate node", ... edges).
///
/// Threading: the graph is changed on the control plane only (the daemon's
/// control actor, or a tool's single task); I/O only reads `BlockChild.node`.
public protocol BlockParent: AnyObject, Sendable {
    /// QEMU's get_parent_desc, for permission errors ("node 'x'",
    /// "an unnamed block device", "stream job 'j0'").
    var parentDescription: String { get }
    /// Edges that stay where they are when their node is replaced
    /// (QEMU's stay_at_node: block jobs keep their nodes).
    var staysAtNode: Bool { get }
    /// Drained section (QEMU's drained_begin/end of a parent): stop
    /// sending requests to the child and wait for those in flight.
    func drainBegin() async
    /// Ends the section; returns once the parent goes on (a job is back at
    /// work, as QEMU's drained_end re-enters it at once).
    func drainEnd() async
}

extension BlockParent {
    public var staysAtNode: Bool { false }
}

/// One edge of the block graph (QEMU's BdrvChild): a parent uses `node` in
/// a named role, holding permissions `perm` and sharing `shared`.
///
/// The edge owns one reference of `node` (taken by whoever created it);
/// `release()` gives it back. Replacing a node swaps the node of every edge
/// into it (`setNode`), so a parent's I/O goes to the new node from then on:
/// drivers always reach their children through their edges.
public final class BlockChild: Sendable {
    /// "file", "backing", "root", "main node", ...
    public let name: String
    public let role: ChildRole

    private struct State {
        var node: BlockNode
        var perm: BlockPermissions = []
        var shared: BlockPermissions = .all
        weak var parent: (any BlockParent)?
        var attached = false
    }
    private let state: Mutex<State>

    /// A detached edge to `node` that owns one of its references.
    public init(name: String, role: ChildRole, node: BlockNode) {
        self.name = name
        self.role = role
        self.state = Mutex(State(node: node))
    }

    /// The node this edge points at now.
    public var node: BlockNode { state.withLock { $0.node } }
    public var perm: BlockPermissions { state.withLock { $0.perm } }
    public var shared: BlockPermissions { state.withLock { $0.shared } }
    public var parent: (any BlockParent)? { state.withLock { $0.parent } }

    /// QEMU's bdrv_child_user_desc plus the edge: "node 'a' (uses node
    /// 'b' as 'file' child)".
    var userDescription: String {
        let p = parent?.parentDescription ?? "an unknown parent"
        return "\(p) (uses node '\(node.nodeName)' as '\(name)' child)"
    }

    /// Records permissions: the permission update sets those of node
    /// parents; a backend or a job sets the ones it asks for, then runs
    /// the update.
    public func setPermissions(_ perm: BlockPermissions, _ shared: BlockPermissions) {
        state.withLock {
            $0.perm = perm
            $0.shared = shared
        }
    }

    /// Connects the edge to its parent and its node: the node lists it
    /// among its parents (newest first, as QEMU), and a backing edge blocks
    /// operations on its node (QEMU's backing blocker).
    public func attach(to parent: any BlockParent) {
        let node = state.withLock { s -> BlockNode in
            precondition(!s.attached, "edge '\(name)' attached twice")
            s.parent = parent
            s.attached = true
            return s.node
        }
        node.addParent(self)
    }

    /// Disconnects the edge (the reference stays with it).
    public func detach() {
        let node = state.withLock { s -> BlockNode? in
            guard s.attached else { return nil }
            s.attached = false
            return s.node
        }
        node?.removeParent(self)
    }

    public var isAttached: Bool { state.withLock { $0.attached } }

    /// Points the edge at `new` (which it now owns a reference of) and
    /// returns the old node, whose reference passes to the caller.
    /// Callers make sure no request of the parent is in flight.
    @discardableResult
    public func setNode(_ new: BlockNode) -> BlockNode {
        let (old, attached) = state.withLock { s -> (BlockNode, Bool) in
            let o = s.node
            s.node = new
            return (o, s.attached)
        }
        if attached && old !== new {
            old.removeParent(self)
            new.addParent(self)
        }
        return old
    }

    /// Detaches and drops the edge's reference (the node closes when it
    /// was the last).
    public func release() async throws(BlockError) {
        detach()
        try await node.close()
    }
}

/// QEMU's BlockOpType: operations that op blockers can refuse.
public enum BlockOp: Sendable, CaseIterable {
    case backupSource, backupTarget, change, commitSource, commitTarget, dataplane, driveDel, eject
    case externalSnapshot, internalSnapshot, internalSnapshotDelete, mirrorSource, mirrorTarget, resize
    case stream, replace
}

/// One op blocker (QEMU's Error *reason shared by the blocked ops): the
/// reason reads "Node 'x' is busy: <reason>". Identity matters: the
/// owner removes exactly its own blocker.
public final class OpBlocker: Sendable {
    private let text: @Sendable () -> String
    public init(_ reason: @escaping @Sendable () -> String) { self.text = reason }
    public convenience init(_ reason: String) { self.init { reason } }
    public var reason: String { text() }
}
