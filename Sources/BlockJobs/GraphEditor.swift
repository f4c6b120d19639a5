import BlockCore
import BlockGraph

/// What block jobs need from the composition root beyond the graph:
/// QEMU keeps node file names in the nodes (bdrv_refresh_filename), the
/// daemon keeps them with its node records. Everything else jobs change
/// (filters, edges, backing links, permissions, reopens) is `Graph`'s.
@ControlActor
public protocol GraphEditor: AnyObject, Sendable {
    var graph: Graph { get }
    /// `overlay`'s backing is now `base`, its header names `name`: the
    /// file names that mention either are refreshed.
    func backingChanged(of overlay: BlockNode, to base: BlockNode?, name: String?)
    /// A job inserted `filter`: its file name, which QEMU takes from the
    /// child for implicit filters and filters that name themselves after
    /// it (`namedAfterChild`), else builds from its options.
    func filterInserted(_ filter: BlockNode, namedAfterChild: Bool)
}

extension GraphEditor {
    /// QEMU's bdrv_drop_intermediate / stream_prepare for one overlay:
    /// `overlay`'s backing becomes `base` in memory (a drained change with
    /// the permission update) and in its header (`backingFile`, else the
    /// base's file name). A read-only overlay is reopened read-write for
    /// its header and read-only again. The caller made the data the new
    /// chain relies on durable.
    func changeBacking(of overlay: BlockNode, to base: BlockNode?, backingFile: String?,
                       replacing old: BlockNode? = nil) async throws(BlockError) {
        guard let img = overlay.driver as? any BackingDriver else { return }
        let graph = self.graph
        let current = old ?? overlay.backing
        let name = base.map { backingFile ?? graph.displayFilename($0) }
        let wasReadOnly = overlay.readOnly
        if wasReadOnly { try await graph.reopenReadWrite(overlay) }
        // The old chain stays open until the header no longer needs it.
        current?.retain()
        do throws(BlockError) {
            if let old, let base {
                try await graph.drained([old]) { () async throws(BlockError) in
                    try await graph.replaceNode(old, with: base)
                }
            } else {
                try await graph.setBacking(of: overlay, to: base)
            }
            do throws(BlockError) {
                try await img.changeBackingFile(name, format: base?.formatName)
            } catch {
                if let current, old == nil { try? await graph.setBacking(of: overlay, to: current) }
                throw error
            }
        } catch {
            try? await current?.close()
            if wasReadOnly { await graph.reopenReadOnly(overlay) }
            throw error
        }
        try? await current?.close()
        if wasReadOnly { await graph.reopenReadOnly(overlay) }
        backingChanged(of: overlay, to: base, name: name)
        graph.sweepClosed()
        graph.refreshAll()
    }
}
