import BlockCore
import BlockGraph
import BlockIO
import NBDServer
import Qcow2
import ServerKit

/// QAPI BlockExportOptions for type nbd.
struct NBDExportOptions: Sendable {
    var id: String
    var nodeName: String
    var name: String?
    var description: String?
    var writable = false
    var writethrough = false
    var allocationDepth = false
    var bitmaps: [String] = []
    /// Added by the legacy nbd-server-add (which looks the node up as a device too).
    var legacy = false
}

/// One block export (QEMU's BlockExport): an NBD export of a node.
@ControlActor
final class ExportRecord {
    let id: String
    let nbdName: String
    /// The node served; changes when a snapshot puts an overlay on top.
    private(set) var node: BlockNode
    let writable: Bool
    let backend: NodeExportBackend?
    var shuttingDown = false

    init(id: String, nbdName: String, node: BlockNode, writable: Bool, backend: NodeExportBackend? = nil) {
        self.id = id
        self.nbdName = nbdName
        self.node = node
        self.writable = writable
        self.backend = backend
    }

    /// Serve `newNode` from now on (QEMU moves a BlockBackend's root).
    func retarget(to newNode: BlockNode, graph: Graph) async {
        let old = node
        let user = RootUser(exportID: id, writable: writable)
        await backend?.retarget(to: newNode)
        node = newNode
        let oldKey = ObjectIdentifier(old)
        graph.rootUsers[oldKey]?.removeAll { $0.exportID == id }
        if graph.rootUsers[oldKey]?.isEmpty == true { graph.rootUsers[oldKey] = nil }
        graph.rootUsers[ObjectIdentifier(newNode), default: []].append(user)
    }
}

/// The export registry: block-export-add/del, nbd-server-add/remove,
/// query-block-exports and BLOCK_EXPORT_DELETED.
@ControlActor
final class ExportRegistry {
    /// Newest first (QEMU's order in query-block-exports).
    private(set) var exports: [ExportRecord] = []
    let graph: Graph
    let nbd: NBDServer
    let executorFor: (BlockNode) -> EventLoopExecutor
    /// Emits BLOCK_EXPORT_DELETED.
    let onDeleted: (String) -> Void
    /// I/O threads for export reads (QEMU's thread pool): a connection
    /// keeps several reads in flight while its loop sends replies.
    let readPool = IOThreadPool(count: 4, name: "nbd-read")

    init(graph: Graph, nbd: NBDServer, executorFor: @escaping (BlockNode) -> EventLoopExecutor,
         onDeleted: @escaping (String) -> Void) {
        self.graph = graph
        self.nbd = nbd
        self.executorFor = executorFor
        self.onDeleted = onDeleted
    }

    func find(_ id: String) -> ExportRecord? { exports.first { $0.id == id } }

    func add(_ o: NBDExportOptions) throws(BlockError) {
        if find(o.id) != nil {
            throw BlockError.invalid("Block export id '\(o.id)' is already in use")
        }
        // QEMU's blk_exp_add finds the node before the NBD driver checks
        // that the server runs.
        guard let rec = graph.find(o.nodeName) else {
            throw BlockError(.notFound, errno: 2, "Cannot find device='\(o.legacy ? o.nodeName : "")' nor node-name='\(o.nodeName)'")
        }
        guard nbd.isRunning else { throw BlockError.invalid("NBD server not running") }
        let name = o.name ?? o.nodeName
        if name.utf8.count > 4096 {
            throw BlockError.invalid("export name '\(name)' too long")
        }
        if o.description.map({ $0.utf8.count > 4096 }) == true {
            throw BlockError.invalid("description '\(o.description!)' too long")
        }
        if nbd.exportNames().contains(name) {
            throw BlockError.invalid("NBD server already has export named '\(name)'")
        }
        let bitmaps = try exportBitmaps(o.bitmaps, node: rec.node, writable: o.writable)
        let user = RootUser(exportID: o.id, writable: o.writable)
        try graph.checkNewEdge(Graph.rootEdge(user, rec.node))
        let backend = NodeExportBackend(node: rec.node, executor: executorFor(rec.node), readPool: readPool,
                                        writable: o.writable,
                                        allocationDepth: o.allocationDepth, bitmaps: bitmaps)
        _ = try nbd.addExport(NBDExportConfig(name: name, description: o.description, backend: backend,
                                              writable: o.writable, allocationDepth: o.allocationDepth,
                                              bitmaps: o.bitmaps))
        graph.rootUsers[ObjectIdentifier(rec.node), default: []].append(user)
        try? graph.updateLocks()
        exports.insert(ExportRecord(id: o.id, nbdName: name, node: rec.node, writable: o.writable, backend: backend), at: 0)
    }

    /// block-export-del / nbd-server-remove. `hard` disconnects clients;
    /// safe mode refuses while clients are connected.
    func remove(id: String, hard: Bool) throws(BlockError) {
        guard let e = find(id), !e.shuttingDown else {
            throw BlockError(.notFound, errno: 2, "Export '\(id)' is not found")
        }
        if !hard && nbd.clientCount(export: e.nbdName) > 0 {
            throw BlockError.invalid("export '\(id)' still in use")
        }
        e.shuttingDown = true
        try? nbd.removeExport(name: e.nbdName, mode: hard ? .hard : .safe)
        if nbd.clientCount(export: e.nbdName) == 0 {
            finishRemoval(e)
        }
    }

    /// The NBD server reports that a removed export's last client is gone.
    func exportClosed(nbdName: String) {
        if let e = exports.first(where: { $0.nbdName == nbdName && $0.shuttingDown }) {
            finishRemoval(e)
        }
    }

    private func finishRemoval(_ e: ExportRecord) {
        guard exports.contains(where: { $0 === e }) else { return }
        exports.removeAll { $0 === e }
        let key = ObjectIdentifier(e.node)
        graph.rootUsers[key]?.removeAll { $0.exportID == e.id }
        if graph.rootUsers[key]?.isEmpty == true { graph.rootUsers[key] = nil }
        try? graph.updateLocks()
        onDeleted(e.id)
    }

    /// nbd-server-stop: every NBD export goes (clients are disconnected).
    func removeAll() {
        for e in exports where !e.shuttingDown {
            e.shuttingDown = true
            try? nbd.removeExport(name: e.nbdName, mode: .hard)
        }
        for e in exports { finishRemoval(e) }
    }

    func exportsUsing(_ node: BlockNode) -> [ExportRecord] {
        exports.filter { $0.node === node }
    }
}

extension ExportRegistry {
    /// QEMU's nbd_export_create checks for `bitmaps`: each is looked up on
    /// the node, then down its backing chain; an enabled bitmap of a
    /// writable node cannot go to a read-only export; an inconsistent one
    /// cannot be used.
    func exportBitmaps(_ names: [String], node: BlockNode, writable: Bool) throws(BlockError) -> [String: DirtyBitmap] {
        var out: [String: DirtyBitmap] = [:]
        for name in names {
            var found: (BlockNode, Qcow2PersistentBitmap, DirtyBitmap?)?
            var n: BlockNode? = node
            while let cur = n, found == nil {
                if let q = cur.driver as? Qcow2Image, let e = q.persistentBitmapsNow().first(where: { $0.0.name == name }) {
                    found = (cur, e.0, e.1)
                }
                n = cur.backing
            }
            guard let (owner, info, bits) = found else { throw BlockError.invalid("Bitmap '\(name)' is not found") }
            if !writable && !owner.readOnly && info.enabled {
                throw BlockError.invalid("Enabled bitmap '\(name)' incompatible with readonly export")
            }
            guard !info.inconsistent, let bits else {
                throw BlockError.invalid("Bitmap '\(name)' is inconsistent and cannot be used")
            }
            out[name] = bits
        }
        return out
    }
}
