#if canImport(Glibc)
import Glibc
#endif
import BlockCore
import BlockIO

/// What the graph remembers about a named node beyond the node itself:
/// how it was opened (QEMU keeps these in the BDS's options and flags) and
/// whether the monitor owns it.
@ControlActor
public final class GraphEntry {
    public let node: BlockNode
    /// Naming order; query-named-block-nodes lists newest first.
    public let seq: Int
    /// Added by name through blockdev-add / --blockdev (QEMU's monitor
    /// reference, monitor_bdrv_states).
    public var monitorOwned: Bool
    public let cacheDirect: Bool
    public let cacheNoFlush: Bool
    public let autoReadOnly: Bool
    /// QEMU's "json:{...}" name when the node's options cannot be told by
    /// a plain filename (bdrv_refresh_filename); nil when `node.filename`
    /// says it all.
    public var jsonFilename: String?

    init(node: BlockNode, seq: Int, monitorOwned: Bool, options: NodeOpenOptions) {
        self.node = node
        self.seq = seq
        self.monitorOwned = monitorOwned
        self.cacheDirect = options.cacheDirect
        self.cacheNoFlush = options.cacheNoFlush
        self.autoReadOnly = options.autoReadOnly
    }

    public var name: String { node.nodeName }
}

/// The options of a node the graph reports back (query-named-block-nodes).
public struct NodeOpenOptions: Sendable {
    public var cacheDirect = false
    public var cacheNoFlush = false
    public var autoReadOnly = false
    public var forceShare = false
    public init(cacheDirect: Bool = false, cacheNoFlush: Bool = false, autoReadOnly: Bool = false,
                forceShare: Bool = false) {
        self.cacheDirect = cacheDirect
        self.cacheNoFlush = cacheNoFlush
        self.autoReadOnly = autoReadOnly
        self.forceShare = forceShare
    }
}

/// A block job as a parent in the graph (QEMU's BlockJob with its nodes
/// list): edges named "main node", "intermediate node", ... that stay at
/// their nodes when these are replaced, newest first.
public protocol GraphJob: BlockParent {
    var jobID: String { get }
    var edges: [BlockChild] { get }
}

/// The block graph of a process (QEMU's graph_bdrv_states, block backends
/// and block jobs): every named node, every backend, every job that holds
/// edges; node names; the home context new nodes join. Runs on the
/// control actor; nodes do their I/O elsewhere.
@ControlActor
public final class Graph {
    private var entries: [ObjectIdentifier: GraphEntry] = [:]
    private var nextSeq = 0
    private var idCounter: UInt64 = 0
    /// Backends in creation order (QEMU's blk_all_next).
    public private(set) var backends: [BlockBackend] = []
    /// Jobs holding edges, newest first (QEMU's job list).
    public private(set) var jobs: [any GraphJob] = []
    /// The home of every node of this graph (one context: QEMU's main
    /// AioContext; nil in tests that need none).
    public let context: IOContext?

    public init(context: IOContext? = nil) {
        self.context = context
    }

    // MARK: - Nodes and names

    /// Every node, newest first (QEMU's order).
    public var all: [GraphEntry] { entries.values.sorted { $0.seq > $1.seq } }

    /// Every node, in naming order.
    public var nodes: [BlockNode] { all.reversed().map(\.node) }

    public func find(_ name: String) -> GraphEntry? {
        entries.values.first { $0.name == name }
    }

    public func entry(_ node: BlockNode) -> GraphEntry? { entries[ObjectIdentifier(node)] }

    /// The name QEMU shows for a node (bdrv_refresh_filename's result).
    public func displayFilename(_ node: BlockNode) -> String {
        entry(node)?.jsonFilename ?? node.filename
    }

    /// QEMU's id_generate(ID_BLOCK): "#block" + counter + two random digits.
    public func generateName() -> String {
        let n = idCounter
        idCounter += 1
        let r = Int.random(in: 0..<100)
        return "#block\(n)" + (r < 10 ? "0\(r)" : "\(r)")
    }

    /// QEMU's node-name rules: a letter, then letters, digits, '-', '.', '_'; < 32 bytes.
    public static func checkNodeName(_ name: String) throws(BlockError) {
        let ok = name.unicodeScalars.first.map { ("a"..."z").contains($0) || ("A"..."Z").contains($0) } ?? false
            && name.unicodeScalars.allSatisfy {
                ("a"..."z").contains($0) || ("A"..."Z").contains($0) || ("0"..."9").contains($0)
                    || $0 == "-" || $0 == "." || $0 == "_"
            }
        if !ok { throw BlockError.invalid("Invalid node-name: '\(name)'") }
        if name.utf8.count >= 32 { throw BlockError.invalid("Node name too long") }
    }

    /// Names a node (a generated name if `name` is nil) and adds it to the
    /// graph's home context. `seq`: a place in the naming order taken
    /// earlier with `reserveSeq()` (nil: the next one).
    public func register(_ node: BlockNode, name: String?, monitorOwned: Bool, options: NodeOpenOptions = NodeOpenOptions(),
                         seq: Int? = nil) {
        node.setNodeName(name ?? generateName())
        node.setForceShare(options.forceShare)
        if node.context == nil { node.setContext(context) }
        entries[ObjectIdentifier(node)] = GraphEntry(node: node, seq: seq ?? nextSeq, monitorOwned: monitorOwned, options: options)
        if seq == nil { nextSeq += 1 }
    }

    /// Takes the next place in the naming order for a node registered
    /// later (QEMU names a protocol or filter node before it opens its
    /// children).
    public func reserveSeq() -> Int {
        defer { nextSeq += 1 }
        return nextSeq
    }

    /// Forgets nodes whose last reference was closed.
    public func sweepClosed() {
        entries = entries.filter { !$0.value.node.isClosed }
    }

    // MARK: - Backends

    /// Attaches a backend's root edge (QEMU's blk_insert_bs): the node's
    /// permissions are checked and applied; on failure the backend is
    /// left detached and its reference dropped.
    public func attach(_ backend: BlockBackend) async throws(BlockError) {
        backend.root.attach(to: backend)
        do throws(BlockError) {
            try PermissionUpdate.refresh([backend.node])
        } catch {
            backend.root.detach()
            try? PermissionUpdate.refresh([backend.node])
            await detach(backend)
            throw error
        }
        backends.append(backend)
    }

    /// Lets go of a backend (QEMU's blk_unref of the last reference): an
    /// attached one is detached and its node's permissions loosen; either
    /// way its reference of the node is dropped, once.
    public func detach(_ backend: BlockBackend) async {
        guard backend.markReleased() else { return }
        let node = backend.node
        if backends.contains(where: { $0 === backend }) {
            // QEMU's blk_unref drains the node (blk_drain), and so does the
            // blk_remove_bs it calls: jobs above it pass a pause point twice.
            await drain(node)
            await drain(node)
            backends.removeAll { $0 === backend }
            backend.root.detach()
            try? PermissionUpdate.refresh([node])
        }
        try? await node.close()
        sweepClosed()
    }

    /// Changes what a backend takes and shares (QEMU's blk_set_perm).
    public func setPermissions(_ backend: BlockBackend, _ perm: BlockPermissions,
                               shared: BlockPermissions) throws(BlockError) {
        let (op, os) = (backend.root.perm, backend.root.shared)
        backend.root.setPermissions(perm, shared)
        do throws(BlockError) {
            try PermissionUpdate.refresh([backend.node])
        } catch {
            backend.root.setPermissions(op, os)
            throw error
        }
    }

    // MARK: - Jobs

    public func register(job: any GraphJob) { jobs.insert(job, at: 0) }

    public func unregister(job: any GraphJob) { jobs.removeAll { $0 === job } }

    // MARK: - Permissions

    /// QEMU's bdrv_refresh_perms for the subtrees of `nodes`.
    public func refresh(_ nodes: [BlockNode]) throws(BlockError) {
        try PermissionUpdate.refresh(nodes)
    }

    /// Refreshes the whole graph (after changes that only loosen
    /// permissions; failures are ignored, as QEMU's loosening updates).
    public func refreshAll() {
        PermissionUpdate.refreshAll(nodes)
    }

    /// Nodes that use `node` (as file, backing, ...).
    public func nodeParents(of node: BlockNode) -> [BlockNode] {
        node.parents.compactMap { $0.parent as? BlockNode }
    }

    /// backing_file_depth: the length of the backing chain below `node`.
    public static func backingDepth(_ node: BlockNode) -> Int {
        var d = 0
        var n = node.backing
        while let b = n {
            d += 1
            n = b.backing
        }
        return d
    }
}
