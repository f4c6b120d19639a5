#if canImport(Glibc)
import Glibc
#endif
import BlockCore
import BlockDrivers
import BlockGraph
import BlockJobs
import FileDriver
import LaminaJSON
import QMP
import Qcow2

/// One external-snapshot action (QAPI BlockdevSnapshot /
/// BlockdevSnapshotSync), alone or inside `transaction`.
enum SnapshotAction: Sendable {
    /// blockdev-snapshot: put the existing node `overlay` on top of `node`.
    case snapshot(node: String, overlay: String)
    /// blockdev-snapshot-sync: create (unless mode=existing) and open an
    /// image whose backing file is the node, then put it on top.
    case sync(device: String?, nodeName: String?, file: String, snapshotNodeName: String?, format: String,
              existing: Bool)
    /// transaction's "abort" action: always fails in prepare.
    case abort
}

extension SnapshotAction {
    static func parseSnapshot(_ a: QAPIInput) throws(QMPError) -> SnapshotAction {
        let node = try a.string("node")
        let overlay = try a.string("overlay")
        try a.finish()
        return .snapshot(node: node, overlay: overlay)
    }

    static func parseSync(_ a: QAPIInput) throws(QMPError) -> SnapshotAction {
        let device = try a.optionalString("device")
        let nodeName = try a.optionalString("node-name")
        let file = try a.string("snapshot-file")
        let snapName = try a.optionalString("snapshot-node-name")
        let format = try a.optionalString("format") ?? "qcow2"
        let mode = try a.optionalEnumValue("mode", allowed: ["existing", "absolute-paths"]) ?? "absolute-paths"
        try a.finish()
        return .sync(device: device, nodeName: nodeName, file: file, snapshotNodeName: snapName, format: format,
                     existing: mode == "existing")
    }

    /// One TransactionAction: {"type": ..., "data": {...}}.
    static func parseTransactionAction(_ v: QAPIValue) throws(QMPError) -> SnapshotAction {
        try v.object { (a: QAPIInput) throws(QMPError) -> SnapshotAction in
            let type = try a.enumValue("type", allowed: transactionTypes)
            let action: SnapshotAction
            switch type {
            case "blockdev-snapshot":
                action = try a.object("data") { (d: QAPIInput) throws(QMPError) in try parseSnapshot(d) }
            case "blockdev-snapshot-sync":
                action = try a.object("data") { (d: QAPIInput) throws(QMPError) in try parseSync(d) }
            case "abort":
                try a.object("data") { (d: QAPIInput) throws(QMPError) in try d.finish() }
                action = .abort
            default:
                throw QMPError("Lamina does not support the transaction action '\(type)' yet")
            }
            try a.finish()
            return action
        }
    }

    /// QAPI TransactionAction's discriminator values in QEMU 7.2.
    static let transactionTypes = [
        "abort", "block-dirty-bitmap-add", "block-dirty-bitmap-remove", "block-dirty-bitmap-clear",
        "block-dirty-bitmap-enable", "block-dirty-bitmap-disable", "block-dirty-bitmap-merge",
        "blockdev-backup", "blockdev-snapshot", "blockdev-snapshot-internal-sync", "blockdev-snapshot-sync",
        "drive-backup",
    ]
}

/// One external snapshot as a transaction action (QEMU's
/// ExternalSnapshotState): prepare opens (or creates) the overlay, checks
/// it and appends it above the node — the node's users use the overlay
/// from then on; commit makes the old node read-only; abort undoes the
/// append and closes an overlay it opened.
@ControlActor
final class ExternalSnapshotAction: TransactionAction {
    let daemon: Daemon
    let spec: SnapshotAction
    private var old: GraphEntry?
    private var overlay: BlockNode?
    /// The overlay was opened by this action (closed again on abort).
    private var openedHere = false
    private var appended = false
    /// QEMU drains the old node from prepare to clean.
    private var section: Graph.DrainedSection?

    init(_ daemon: Daemon, _ spec: SnapshotAction) {
        self.daemon = daemon
        self.spec = spec
    }

    private var graph: Graph { daemon.graph }

    func prepare() async throws(BlockError) {
        let old: GraphEntry
        switch spec {
        case .abort:
            throw BlockError.invalid("Transaction aborted using Abort action")
        case .snapshot(let node, let overlayName):
            old = try lookupOld(device: node, nodeName: node)
            self.old = old
            section = await graph.drainBegin([old.node])
            try checkSource(old)
            guard let o = graph.find(overlayName) else {
                throw BlockError(.notFound, errno: ENOENT, "Cannot find device='\(overlayName)' nor node-name='\(overlayName)'")
            }
            overlay = o.node
        case .sync(let device, let nodeName, let file, let snapName, let format, let existing):
            old = try lookupOld(device: device, nodeName: nodeName)
            self.old = old
            section = await graph.drainBegin([old.node])
            try checkSource(old)
            if nodeName != nil && snapName == nil {
                throw BlockError.invalid("New overlay node-name missing")
            }
            if let s = snapName, graph.find(s) != nil {
                throw BlockError.invalid("New overlay node-name already in use")
            }
            if !existing {
                guard format == "qcow2" else {
                    throw BlockError.invalid("Lamina creates snapshot overlays in qcow2 only, not '\(format)'")
                }
                var co = Qcow2CreateOptions()
                co.size = old.node.length
                co.backingFile = graph.displayFilename(old.node)
                co.backingFormat = old.node.formatName
                // QEMU's bdrv_img_create announces the new image on stdout.
                print("Formatting '\(file)', fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib "
                      + "size=\(co.size) backing_file=\(co.backingFile ?? "") backing_fmt=\(co.backingFormat ?? "") "
                      + "lazy_refcounts=off refcount_bits=16")
                fflush(nil)
                try await ImageCreator.createQcow2(path: file, options: co)
            }
            var members: [(String, JSON)] = [
                ("driver", .string(format)),
                ("file", .object([("driver", .string("file")), ("filename", .string(file))])),
            ]
            if format == "qcow2" { members.append(("backing", .null)) }
            if let s = snapName { members.append(("node-name", .string(s))) }
            let opts: BlockdevOptions
            do throws(QMPError) {
                opts = try BlockdevOptions.parse(try QAPIInput(.object(members)))
            } catch {
                throw BlockError.invalid(error.desc)
            }
            let o = try await NodeOpener.add(opts, graph: graph)
            overlay = o
            openedHere = true
            // Opened by the snapshot, not by blockdev-add: not the monitor's.
            graph.entry(o)?.monitorOwned = false
            // Its header names the node's image; the open skipped it.
            graph.entry(o)?.jsonFilename = nil
        }
        guard let overlay else { return }
        try checkOverlay(overlay, old: old.node)
        try await append(overlay, to: old)
    }

    private func lookupOld(device: String?, nodeName: String?) throws(BlockError) -> GraphEntry {
        // qemu-storage-daemon has no BlockBackends with names: a device
        // name never matches; node names do.
        if let n = nodeName, let rec = graph.find(n) { return rec }
        throw BlockError(.notFound, errno: ENOENT,
                         "Cannot find device='\(device ?? "")' nor node-name='\(nodeName ?? "")'")
    }

    /// The node being snapshotted: not blocked (a job's, or the backing
    /// link of an overlay), flushed.
    private func checkSource(_ old: GraphEntry) throws(BlockError) {
        try old.node.checkOp(.externalSnapshot)
        // Parents other than backends would have to move to the overlay too.
        if let p = graph.nodeParents(of: old.node).first {
            throw BlockError(.notSupported, errno: ENOTSUP,
                             "Lamina cannot yet snapshot node '\(old.name)' while node '\(p.nodeName)' uses it")
        }
    }

    /// QEMU's checks of the new overlay, in its order.
    private func checkOverlay(_ overlay: BlockNode, old: BlockNode) throws(BlockError) {
        if overlay.hasBackend || overlay.parents.contains(where: { $0.perm.contains(.consistentRead) }) {
            throw BlockError.invalid("The overlay is already in use")
        }
        try overlay.checkOp(.externalSnapshot)
        if overlay.backing != nil {
            throw BlockError.invalid("The overlay already has a backing image")
        }
        guard overlay.driver is any BackingDriver else {
            throw BlockError.invalid("The overlay does not support backing images")
        }
        var n: BlockNode? = old
        while let c = n {
            if c === overlay {
                throw BlockError.invalid("Making '\(old.nodeName)' a backing child of '\(overlay.nodeName)' would create a cycle")
            }
            n = c.filterOrBacking
        }
    }

    /// QEMU's bdrv_append: the node becomes the overlay's backing file and
    /// the node's users (exports) use the overlay, in a drained section.
    private func append(_ overlay: BlockNode, to old: GraphEntry) async throws(BlockError) {
        let node = old.node
        // QEMU's names: an overlay blockdev-snapshot-sync opened follows its
        // header (plain filename); one added with "backing": null and then
        // given a backing node is shown with that node in a json: name.
        if !openedHere, let file = overlay.file {
            graph.entry(overlay)?.jsonFilename = graph.jsonFilename(overlay, file: file, backing: graph.fullOptions(node))
        }
        try await graph.drained([node]) { () async throws(BlockError) in
            // The backing edge holds a reference. A node the monitor owns
            // keeps the monitor's; a top layer nobody named (an earlier
            // snapshot's overlay) hands its top-level reference to the edge.
            if old.monitorOwned { node.retain() }
            overlay.setBacking(node)
            do throws(BlockError) {
                try await graph.replaceNode(node, with: overlay)
            } catch {
                let edge = overlay.setBacking(nil)
                if old.monitorOwned { try? await edge?.node.close() }
                throw error
            }
        }
        appended = true
    }

    /// QEMU's external_snapshot_commit: the old layer becomes read-only,
    /// with the file below it when nothing else writes there.
    func commit() async {
        guard let old else { return }
        await graph.reopenReadOnly(old.node)
    }

    /// QEMU's external_snapshot_abort: the overlay's users use the node
    /// again and the overlay lets go of it; an overlay this action opened
    /// is closed.
    func abort() async {
        guard let overlay else { return }
        if appended, let old {
            _ = try? await graph.drained([overlay]) { () async throws(BlockError) in
                let edge = overlay.setBacking(nil)
                try? await graph.replaceNode(overlay, with: old.node)
                if old.monitorOwned { try? await edge?.node.close() }
            }
            if !openedHere { graph.entry(overlay)?.jsonFilename = nil }
        }
        if openedHere { try? await overlay.close() }
        graph.sweepClosed()
        graph.refreshAll()
    }

    /// QEMU's external_snapshot_clean: the old node's drained section ends.
    func clean() async {
        if let section { await graph.drainEnd(section) }
        section = nil
    }
}

extension Daemon {
    /// transaction (and the single snapshot commands), QEMU's way.
    func snapshotTransaction(_ actions: [SnapshotAction]) async throws(BlockError) {
        try await Transaction.run(actions.map { a -> any TransactionAction in
            if case .abort = a { return AbortAction() }
            return ExternalSnapshotAction(self, a)
        }, graph: graph)
    }
}
