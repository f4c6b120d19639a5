import BlockCore
import BlockGraph
import BlockIO
import BlockJobs
import NBDServer
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

/// One block export (QEMU's BlockExport): an NBD export of a node,
/// through its block backend (whose root edge follows the node when the
/// graph changes: a snapshot's overlay, a job's filter, a commit's base).
@ControlActor
final class ExportRecord {
    let id: String
    let nbdName: String
    let writable: Bool
    let backend: NodeExportBackend
    var shuttingDown = false

    init(id: String, nbdName: String, writable: Bool, backend: NodeExportBackend) {
        self.id = id
        self.nbdName = nbdName
        self.writable = writable
        self.backend = backend
    }

    /// The node served now.
    var node: BlockNode { backend.blk.node }
}

/// The export registry: block-export-add/del, nbd-server-add/remove,
/// query-block-exports and BLOCK_EXPORT_DELETED.
@ControlActor
final class ExportRegistry {
    /// Newest first (QEMU's order in query-block-exports).
    private(set) var exports: [ExportRecord] = []
    let graph: Graph
    let nbd: NBDServer
    /// The home loop of the exports' nodes.
    let loop: EventLoopExecutor
    /// Emits BLOCK_EXPORT_DELETED.
    let onDeleted: (String) -> Void

    init(graph: Graph, nbd: NBDServer, loop: EventLoopExecutor, onDeleted: @escaping (String) -> Void) {
        self.graph = graph
        self.nbd = nbd
        self.loop = loop
        self.onDeleted = onDeleted
    }

    func find(_ id: String) -> ExportRecord? { exports.first { $0.id == id } }

    /// QEMU's blk_exp_add then nbd_export_create, checks in their order.
    func add(_ o: NBDExportOptions) async throws(BlockError) {
        if !JobManager.isWellFormedID(o.id) {
            throw BlockError.invalid("Invalid block export id")
        }
        if find(o.id) != nil {
            throw BlockError.invalid("Block export id '\(o.id)' is already in use")
        }
        guard let rec = graph.find(o.nodeName) else {
            throw BlockError(.notFound, errno: 2, "Cannot find device='\(o.legacy ? o.nodeName : "")' nor node-name='\(o.nodeName)'")
        }
        // nbd-server-add quietly exports a read-only node read-only.
        let writable = o.writable && !(o.legacy && rec.node.readOnly)
        if rec.node.readOnly && writable {
            throw BlockError.invalid("Cannot export read-only node as writable")
        }
        // The backend: consistent read (and write), sharing everything for
        // now (QEMU's blk_new(ctx, perm, BLK_PERM_ALL) + blk_insert_bs).
        let blk = BlockBackend(node: rec.node, perm: writable ? [.consistentRead, .write] : [.consistentRead],
                               shared: .all)
        try await graph.attach(blk)
        do throws(BlockError) {
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
            // nbd_export_create: nobody may resize an exported node.
            try graph.setPermissions(blk, blk.root.perm, shared: [.consistentRead, .write, .writeUnchanged])
            let bitmaps = try exportBitmaps(o.bitmaps, node: rec.node, writable: writable)
            // Requests run on the node's home executor (its IOContext), the
            // same thread the jobs on the node use.
            let home = (rec.node.context?.executor as? EventLoopExecutor) ?? loop
            let backend = NodeExportBackend(blk: blk, loop: home, writable: writable,
                                            allocationDepth: o.allocationDepth, bitmaps: bitmaps)
            _ = try nbd.addExport(NBDExportConfig(name: name, description: o.description, backend: backend,
                                                  writable: writable, allocationDepth: o.allocationDepth,
                                                  bitmaps: o.bitmaps))
            exports.insert(ExportRecord(id: o.id, nbdName: name, writable: writable, backend: backend), at: 0)
        } catch {
            await graph.detach(blk)
            throw error
        }
    }

    /// block-export-del / nbd-server-remove. `hard` disconnects clients;
    /// safe mode refuses while clients are connected.
    func remove(id: String, hard: Bool) async throws(BlockError) {
        guard let e = find(id), !e.shuttingDown else {
            throw BlockError(.notFound, errno: 2, "Export '\(id)' is not found")
        }
        if !hard && nbd.clientCount(export: e.nbdName) > 0 {
            throw BlockError.invalid("export '\(id)' still in use")
        }
        e.shuttingDown = true
        try? nbd.removeExport(name: e.nbdName, mode: hard ? .hard : .safe)
        if nbd.clientCount(export: e.nbdName) == 0 {
            await finishRemoval(e)
        }
    }

    /// The NBD server reports that a removed export's last client is gone.
    func exportClosed(nbdName: String) async {
        if let e = exports.first(where: { $0.nbdName == nbdName && $0.shuttingDown }) {
            await finishRemoval(e)
        }
    }

    private func finishRemoval(_ e: ExportRecord) async {
        guard exports.contains(where: { $0 === e }) else { return }
        exports.removeAll { $0 === e }
        await graph.detach(e.backend.blk)
        onDeleted(e.id)
    }

    /// nbd-server-stop: every NBD export goes (clients are disconnected).
    func removeAll() async {
        for e in exports where !e.shuttingDown {
            e.shuttingDown = true
            try? nbd.removeExport(name: e.nbdName, mode: .hard)
        }
        for e in exports { await finishRemoval(e) }
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
            var found: (BlockNode, PersistentBitmapInfo, DirtyBitmap?)?
            var n: BlockNode? = node
            while let cur = n, found == nil {
                if let q = cur.driver as? any PersistentBitmaps,
                   let e = q.persistentBitmapsNow().first(where: { $0.0.name == name }) {
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
