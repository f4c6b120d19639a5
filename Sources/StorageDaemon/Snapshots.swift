#if canImport(Glibc)
import Glibc
#endif
import BlockCore
import BlockDrivers
import BlockGraph
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

/// A prepared snapshot: `overlay` opened and checked, not yet attached.
@ControlActor
struct PreparedSnapshot {
    let old: GraphEntry
    let overlay: BlockNode
    /// The overlay was opened by this action (closed again on abort).
    let openedHere: Bool
}

extension Daemon {
    /// transaction (and the single commands): every action is prepared
    /// first; if any fails, the ones prepared are undone and nothing in
    /// the graph changes; then all are committed.
    func snapshotTransaction(_ actions: [SnapshotAction]) async throws(BlockError) {
        var prepared: [PreparedSnapshot] = []
        do throws(BlockError) {
            for a in actions {
                prepared.append(try await prepareSnapshot(a, earlier: prepared))
            }
        } catch {
            for p in prepared.reversed() where p.openedHere {
                try? await p.overlay.close()
            }
            graph.sweepClosed()
            graph.refreshAll()
            throw error
        }
        for p in prepared {
            await commitSnapshot(p)
        }
        graph.refreshAll()
    }

    private func lookupOld(device: String?, nodeName: String?) throws(BlockError) -> GraphEntry {
        // qemu-storage-daemon has no BlockBackends with names: a device
        // name never matches; node names do.
        if let n = nodeName, let rec = graph.find(n) { return rec }
        throw BlockError(.notFound, errno: ENOENT,
                         "Cannot find device='\(device ?? "")' nor node-name='\(nodeName ?? "")'")
    }

    private func prepareSnapshot(_ action: SnapshotAction, earlier: [PreparedSnapshot]) async throws(BlockError) -> PreparedSnapshot {
        let old: GraphEntry
        var overlay: BlockNode
        var openedHere = false
        switch action {
        case .abort:
            throw BlockError.invalid("Transaction aborted using Abort action")
        case .snapshot(let node, let overlayName):
            old = try lookupOld(device: node, nodeName: node)
            try checkSnapshotSource(old)
            guard let o = graph.find(overlayName) else {
                throw BlockError(.notFound, errno: ENOENT, "Cannot find device='\(overlayName)' nor node-name='\(overlayName)'")
            }
            overlay = o.node
        case .sync(let device, let nodeName, let file, let snapName, let format, let existing):
            old = try lookupOld(device: device, nodeName: nodeName)
            try checkSnapshotSource(old)
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
            overlay = try await NodeOpener.add(opts, graph: graph)
            openedHere = true
            // Opened by the snapshot, not by blockdev-add: not the monitor's.
            graph.entry(overlay)?.monitorOwned = false
            // Its header names the node's image; the open skipped it.
            graph.entry(overlay)?.jsonFilename = nil
        }
        do throws(BlockError) {
            try checkOverlay(overlay, old: old.node, earlier: earlier)
        } catch {
            if openedHere { try? await overlay.close() }
            throw error
        }
        return PreparedSnapshot(old: old, overlay: overlay, openedHere: openedHere)
    }

    /// The node being snapshotted: not blocked, flushed.
    private func checkSnapshotSource(_ old: GraphEntry) throws(BlockError) {
        // Op blockers: a job's, or the backing link's of an overlay.
        try old.node.checkOp(.externalSnapshot)
        // Parents other than exports would have to move to the overlay too.
        if let p = graph.nodeParents(of: old.node).first {
            throw BlockError(.notSupported, errno: ENOTSUP,
                             "Lamina cannot yet snapshot node '\(old.name)' while node '\(p.nodeName)' uses it")
        }
    }

    private func checkOverlay(_ overlay: BlockNode, old: BlockNode, earlier: [PreparedSnapshot]) throws(BlockError) {
        let consistentRead = overlay.parents.contains { $0.perm.contains(.consistentRead) }
        if consistentRead || earlier.contains(where: { $0.overlay === overlay }) {
            throw BlockError.invalid("The overlay is already in use")
        }
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
            n = c.backing
        }
        if earlier.contains(where: { $0.old.node === old }) {
            throw BlockError.invalid("The overlay is already in use")
        }
    }

    /// QEMU's bdrv_append: the node becomes the overlay's backing file and
    /// the exports that served the node serve the overlay (drained: no
    /// request is in flight across the switch).
    private func commitSnapshot(_ p: PreparedSnapshot) async {
        let old = p.old.node
        // QEMU's names: an overlay blockdev-snapshot-sync opened follows its
        // header (plain filename); one added with "backing": null and then
        // given a backing node is shown with that node in a json: name.
        if p.openedHere {
            graph.entry(p.overlay)?.jsonFilename = nil
        } else if let file = p.overlay.file {
            graph.entry(p.overlay)?.jsonFilename = graph.jsonFilename(p.overlay, file: file, backing: graph.fullOptions(old))
        }
        try? await withDrained([old]) { () async throws(BlockError) in
            // The backing edge holds a reference. A node the monitor owns
            // keeps the monitor's; a top layer nobody named (an earlier
            // snapshot's overlay) hands its top-level reference to the edge.
            if p.old.monitorOwned { old.retain() }
            p.overlay.setBacking(old)
            // QEMU's bdrv_append: the node's users use the overlay now.
            try await graph.replaceNode(old, with: p.overlay)
        }
        // QEMU's external_snapshot_commit: the old layer becomes read-only,
        // with the file below it when nothing else writes there.
        await reopenReadOnlyWithFile(old)
    }
}
