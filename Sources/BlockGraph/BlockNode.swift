import BlockCore
import BlockIO
import Synchronization

/// A node of the block graph (QEMU's BlockDriverState): a driver, the
/// generic request layer in front of it (BlockNode+IO.swift), and the
/// node's place in the graph — its child edges (owned by the driver), the
/// edges of its parents, op blockers, reference count.
///
/// Threading: graph state (parents, blockers, names) changes on the control
/// plane only; the I/O methods may be called from any executor.
public final class BlockNode: Sendable {
    public let driver: any BlockDriver
    /// The file name the node was opened from (what `qemu-img info` calls "image").
    public let filename: String
    /// Read-only (QEMU's bdrv_is_read_only); a live snapshot reopens the
    /// old active layer read-only.
    public var readOnly: Bool { readOnlyBox.load(ordering: .acquiring) }
    private let readOnlyBox: Atomic<Bool>
    /// The node's discard and detect-zeroes options (QEMU's BDRV_O_UNMAP
    /// and detect_zeroes), applied by the generic layer.
    public let policy: NodePolicy
    private let nodeNameBox: Mutex<String>
    let requests = RequestTracker()
    let dirtyBitmaps = DirtyBitmapList()
    /// References (QEMU's bdrv_ref): the creator holds one; every edge into
    /// the node and every other owner holds one (`retain()`).
    private let refs = Atomic<Int>(1)

    private struct GraphState {
        /// Edges into this node, newest first (QEMU's bs->parents).
        var parents: [BlockChild] = []
        /// Op blockers, newest first: the blocker, the ops it lets
        /// through, and who set it.
        var blockers: [(blocker: OpBlocker, except: Set<BlockOp>, owner: ObjectIdentifier)] = []
        /// Created by the block layer itself, not named by the user
        /// (QEMU's bs->implicit: a job's filter without filter-node-name).
        var implicit = false
        /// force-share=on: users of this node share everything.
        var forceShare = false
        /// The home executor of the node's subtree (QEMU's AioContext).
        var context: IOContext?
        /// The driver's limits merged with its data children's.
        var limits = BlockLimits()
    }
    private let graph = Mutex(GraphState())

    public init(driver: any BlockDriver, filename: String, readOnly: Bool, nodeName: String = "",
                policy: NodePolicy = NodePolicy()) {
        self.driver = driver
        self.filename = filename
        self.readOnlyBox = Atomic(readOnly)
        self.policy = policy
        self.nodeNameBox = Mutex(nodeName)
        // The driver's children were opened for it: connect their edges.
        for c in driver.children { c.attach(to: self) }
        refreshLimits()
        driver.attached(to: self)
    }

    /// The limits requests are split by (QEMU's bs->bl).
    public var limits: BlockLimits { graph.withLock { $0.limits } }

    /// QEMU's bdrv_refresh_limits: the driver's own limits merged with
    /// those of the children that hold its data.
    public func refreshLimits() {
        var l = driver.limits
        for c in children where !c.role.isDisjoint(with: [.data, .filtered, .cow]) {
            l = l.merged(with: c.node.limits)
        }
        graph.withLock { $0.limits = l }
    }

    public var nodeName: String { nodeNameBox.withLock { $0 } }
    public func setNodeName(_ name: String) { nodeNameBox.withLock { $0 = name } }

    public var formatName: String { driver.formatName }
    public var length: Int64 { driver.length }

    // MARK: - Edges

    /// The edges to the node's children, in the order they were attached.
    public var children: [BlockChild] { driver.children }

    /// The backing node (QEMU's bs->backing), if any.
    public var backing: BlockNode? { backingChild?.node }
    public var backingChild: BlockChild? { children.first { $0.role.contains(.cow) } }

    /// The "file" child (QEMU's bs->file), if any.
    public var file: BlockNode? { children.first { $0.name == "file" }?.node }

    /// The filtered child of a filter node (QEMU's bdrv_filter_child).
    public var filteredChild: BlockChild? {
        driver.isFilter ? children.first { $0.role.contains(.filtered) } : nil
    }

    /// QEMU's bdrv_filter_or_cow_bs: the node below in the chain.
    public var filterOrBacking: BlockNode? { (filteredChild ?? backingChild)?.node }

    /// QEMU's bdrv_primary_child: where block status and debug events go.
    public var primaryChild: BlockChild? { children.first { $0.role.contains(.primary) } }

    /// QEMU's bdrv_skip_filters: the first node at or below this one that
    /// is not a filter.
    public var skippingFilters: BlockNode {
        var n = self
        while let f = n.filteredChild?.node { n = f }
        return n
    }

    /// Edges of the node's users, newest first.
    public var parents: [BlockChild] { graph.withLock { $0.parents } }

    func addParent(_ c: BlockChild) {
        graph.withLock { $0.parents.insert(c, at: 0) }
        if c.role.contains(.cow), let p = c.parent as? BlockNode {
            // QEMU's bdrv_backing_attach: a backing file cannot be the
            // subject of most operations, but can still be committed
            // into, streamed from and backed up.
            block(OpBlocker { [weak p] in "node is used as backing hd of '\(p?.nodeName ?? "")'" },
                  except: [.commitTarget, .stream, .backupSource, .backupTarget], owner: c)
        }
    }

    func removeParent(_ c: BlockChild) {
        graph.withLock { g in
            g.parents.removeAll { $0 === c }
        }
        unblock(owner: c)
    }

    /// QEMU's bdrv_get_cumulative_perm: what all users together take, and
    /// what all of them share.
    public var cumulativePermissions: (perm: BlockPermissions, shared: BlockPermissions) {
        parents.reduce(into: (BlockPermissions(), BlockPermissions.all)) {
            $0.perm.formUnion($1.perm)
            $0.shared.formIntersection($1.shared)
        }
    }

    /// Whether a block backend (an export or a job's backend) uses the node
    /// directly (QEMU's bdrv_has_blk).
    public var hasBackend: Bool { parents.contains { $0.parent is BlockBackend } }

    /// QEMU's bdrv_set_backing_hd without the permission update: `new`
    /// (whose reference passes to the new edge) becomes the backing node.
    /// Returns the old backing edge, detached: the caller releases it.
    /// Callers make sure no request is in flight (drained section).
    @discardableResult
    public func setBacking(_ new: BlockNode?) -> BlockChild? {
        guard let d = driver as? any BackingDriver else {
            preconditionFailure("\(formatName) has no backing file")
        }
        let old = backingChild
        old?.detach()
        let edge = new.map { BlockChild(name: "backing", role: .cow, node: $0) }
        d.setBackingChild(edge)
        edge?.attach(to: self)
        refreshLimits()
        return old
    }

    // MARK: - Attributes

    public var isImplicit: Bool {
        get { graph.withLock { $0.implicit } }
    }
    public func setImplicit(_ v: Bool) { graph.withLock { $0.implicit = v } }

    /// force-share=on (QEMU's bs->force_share): every edge into the node
    /// shares everything.
    public var forceShare: Bool { graph.withLock { $0.forceShare } }
    public func setForceShare(_ v: Bool) { graph.withLock { $0.forceShare = v } }

    /// The node's home executor (see `IOContext`); nil until the node is
    /// placed in a graph that has one.
    public var context: IOContext? { graph.withLock { $0.context } }

    /// Moves the node and its whole subtree to `context` (QEMU's
    /// bdrv_try_change_aio_context; here only at attach time).
    public func setContext(_ context: IOContext?) {
        let old = graph.withLock { g -> IOContext? in
            let o = g.context
            g.context = context
            return o
        }
        if old === context { return }
        for c in children { c.node.setContext(context) }
    }

    // MARK: - Op blockers

    /// QEMU's bdrv_op_block_all + bdrv_op_unblock for `except`.
    /// `owner` identifies the blocker for `unblock`.
    public func block(_ blocker: OpBlocker, except: Set<BlockOp> = [], owner: AnyObject) {
        graph.withLock { $0.blockers.insert((blocker, except, ObjectIdentifier(owner)), at: 0) }
    }

    /// Removes every blocker `owner` set.
    public func unblock(owner: AnyObject) {
        let id = ObjectIdentifier(owner)
        graph.withLock { $0.blockers.removeAll { $0.owner == id } }
    }

    /// QEMU's bdrv_op_is_blocked: "Node 'x' is busy: <newest reason>".
    public func checkOp(_ op: BlockOp) throws(BlockError) {
        let reason = graph.withLock { g in g.blockers.first { !$0.except.contains(op) }?.blocker }
        if let r = reason {
            throw BlockError(.busy, errno: 16, "Node '\(nodeName)' is busy: \(r.reason)")
        }
    }

    public var hasOpBlockers: Bool { graph.withLock { !$0.blockers.isEmpty } }

    // MARK: - Read-only state

    /// QEMU's bdrv_reopen_set_read_only(bs, true): flushes, then refuses
    /// writes from now on. (The caller makes sure none is in flight.)
    public func reopenReadOnly() async throws(BlockError) {
        if readOnly { return }
        try await flush()
        try await driver.settleForReadOnly()
        readOnlyBox.store(true, ordering: .releasing)
    }

    /// QEMU's bdrv_reopen_set_read_only(bs, false): the node (and the
    /// children it writes) accept writes again.
    public func reopenReadWrite() async throws(BlockError) {
        if !readOnly { return }
        try await driver.reopenForWriting()
        readOnlyBox.store(false, ordering: .releasing)
    }

    // MARK: - References

    /// Takes one more reference: the node stays open until every holder
    /// has called `close()`.
    public func retain() { refs.add(1, ordering: .relaxed) }

    /// True once the last reference was closed.
    public var isClosed: Bool { refs.load(ordering: .acquiring) <= 0 }

    /// References held now (QEMU's refcnt), for "in use" checks.
    public var referenceCount: Int { refs.load(ordering: .acquiring) }

    /// Drops one reference; the last one flushes and closes the driver,
    /// which releases its child edges in turn.
    public func close() async throws(BlockError) {
        let left = refs.subtract(1, ordering: .acquiringAndReleasing).newValue
        guard left == 0 else { return }
        for c in children { c.detach() }
        try await driver.close()
    }
}

extension BlockNode: BlockParent {
    public var parentDescription: String { "node '\(nodeName)'" }

    /// A node's requests come from its own parents: drain them, then the
    /// node's own requests (QEMU's bdrv_drained_begin on a parent node).
    public func drainBegin() async {
        for p in parents { await p.parent?.drainBegin() }
        await requests.waitIdle()
    }

    public func drainEnd() async {
        for p in parents { await p.parent?.drainEnd() }
    }
}

/// QAPI BlockdevDetectZeroesOptions.
public enum DetectZeroes: String, Sendable, CaseIterable {
    case off, on, unmap
}

/// Per-node request policy set by the node's options.
public struct NodePolicy: Sendable, Equatable {
    /// discard=unmap (true) or ignore (false): whether discard requests and
    /// the may-unmap hint of write-zeroes reach the driver.
    public var discardUnmap: Bool
    public var detectZeroes: DetectZeroes
    /// The default keeps discards (what qemu-img's own opens do).
    public init(discardUnmap: Bool = true, detectZeroes: DetectZeroes = .off) {
        self.discardUnmap = discardUnmap
        self.detectZeroes = detectZeroes
    }
}
