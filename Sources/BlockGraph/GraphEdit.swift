import BlockCore

/// Changes of the graph's shape (QEMU's bdrv_replace_node, bdrv_append,
/// bdrv_drop_filter, bdrv_set_backing_hd) and the drained sections they
/// run in. Every change is followed by the permission update; a change
/// that cannot be granted is undone.
extension Graph {
    // MARK: - Drained sections

    /// An open drained section (`drainBegin` ... `drainEnd`).
    public struct DrainedSection: Sendable {
        let parents: [any BlockParent]
    }

    /// QEMU's bdrv_drained_begin over `nodes`: every backend and job above
    /// them stops sending requests (a job pauses at its next pause point),
    /// and the requests in flight finish first. `except` is the caller,
    /// when a job drains its own nodes. Sections nest; each `drainBegin`
    /// is paired with one `drainEnd`.
    public func drainBegin(_ nodes: [BlockNode], except: (any BlockParent)? = nil) async -> DrainedSection {
        var seenNodes = Set<ObjectIdentifier>()
        var seenParents = Set<ObjectIdentifier>()
        var visited: [BlockNode] = []
        var quiesced: [any BlockParent] = []
        func walk(_ n: BlockNode) {
            guard seenNodes.insert(ObjectIdentifier(n)).inserted else { return }
            visited.append(n)
            for e in n.parents {
                guard let p = e.parent else { continue }
                if let pn = p as? BlockNode {
                    walk(pn)
                } else if p !== except, seenParents.insert(ObjectIdentifier(p)).inserted {
                    quiesced.append(p)
                }
            }
        }
        nodes.forEach(walk)
        for p in quiesced { await p.drainBegin() }
        for n in visited { await n.requests.waitIdle() }
        return DrainedSection(parents: quiesced)
    }

    /// QEMU's bdrv_drained_end: the section's backends and jobs go on.
    public func drainEnd(_ section: DrainedSection) async {
        for p in section.parents.reversed() { await p.drainEnd() }
    }

    /// Runs `body` with `nodes` drained (`drainBegin` ... `drainEnd`).
    public func drained<T>(_ nodes: [BlockNode], except: (any BlockParent)? = nil,
                           _ body: () async throws(BlockError) -> T) async throws(BlockError) -> T {
        let section = await drainBegin(nodes, except: except)
        let result: T
        do throws(BlockError) {
            result = try await body()
        } catch {
            await drainEnd(section)
            throw error
        }
        await drainEnd(section)
        return result
    }

    /// QEMU's bdrv_drain_all: every node drained once (every job goes
    /// through a pause point), then released.
    public func drainAll() async {
        await drainEnd(await drainBegin(nodes))
    }

    /// QEMU's blk_drain: the backend's node drained once, then released.
    public func drain(_ node: BlockNode) async {
        await drainEnd(await drainBegin([node]))
    }

    // MARK: - Replacing nodes

    /// QEMU's should_update_child: an edge is moved unless it stays at its
    /// node (a job's) or its parent lies below `to` (moving it would make
    /// a loop: `to`'s own edge to `from`).
    static func shouldMove(_ edge: BlockChild, to: BlockNode) -> Bool {
        guard let p = edge.parent, !p.staysAtNode else { return false }
        var queue = [to]
        var seen = Set([ObjectIdentifier(to)])
        while let v = queue.popLast() {
            for c in v.children {
                if c === edge { return false }
                if seen.insert(ObjectIdentifier(c.node)).inserted { queue.append(c.node) }
            }
        }
        return true
    }

    /// QEMU's bdrv_replace_node: the users of `from` use `to` from now on
    /// (edges that stay, and `to`'s own path to `from`, excepted); then
    /// the permissions of both subtrees are refreshed. On failure every
    /// edge is moved back. The caller drains `from`.
    public func replaceNode(_ from: BlockNode, with to: BlockNode) async throws(BlockError) {
        let moved = from.parents.filter { Self.shouldMove($0, to: to) }
        for e in moved {
            to.retain()
            e.setNode(to)
        }
        do throws(BlockError) {
            try PermissionUpdate.refresh([from, to])
        } catch {
            for e in moved {
                e.setNode(from)
                try? await to.close()
            }
            try? PermissionUpdate.refresh([from, to])
            throw error
        }
        // Each moved edge's reference of `from` is dropped.
        for _ in moved { try? await from.close() }
    }

    /// QEMU's bdrv_insert_node / bdrv_append for a filter whose filtered
    /// edge already points at `node`: the filter takes `node`'s place for
    /// all of `node`'s users, in a drained section.
    public func insertFilter(_ filter: BlockNode, above node: BlockNode) async throws(BlockError) {
        try await drained([node]) { () async throws(BlockError) in
            try await replaceNode(node, with: filter)
        }
    }

    /// QEMU's bdrv_drop_filter (then bdrv_unref): the filter's users go
    /// back to the node below it, the filter lets go of that node, and the
    /// caller's reference of the filter is dropped (unless `releasing` is
    /// false: the caller holds none). Loosening only: it cannot fail.
    public func dropFilter(_ filter: BlockNode, releasing: Bool = true) async {
        guard let edge = filter.filteredChild else { return }
        let below = edge.node
        _ = try? await drained([filter]) { () async throws(BlockError) in
            let moved = filter.parents.filter { Self.shouldMove($0, to: below) }
            for e in moved {
                below.retain()
                e.setNode(below)
            }
            filter.driver.removeChild(edge)
            edge.detach()
            try? PermissionUpdate.refresh([below])
            for _ in moved { try? await filter.close() }
            try? await below.close()
        }
        if releasing { try? await filter.close() }
        sweepClosed()
    }

    // MARK: - Backing files

    /// QEMU's bdrv_set_backing_hd: `overlay`'s backing node becomes `new`
    /// (nil: none) in a drained section; permissions are refreshed (and the
    /// old link restored if they cannot be granted); the old backing node's
    /// reference is dropped. Only the in-memory link changes: the header is
    /// the caller's.
    public func setBacking(of overlay: BlockNode, to new: BlockNode?) async throws(BlockError) {
        let old = overlay.backing
        if old === new { return }
        try await drained([overlay]) { () async throws(BlockError) in
            new?.retain()
            let oldEdge = overlay.setBacking(new)
            do throws(BlockError) {
                try PermissionUpdate.refresh([overlay])
            } catch {
                let added = overlay.setBacking(oldEdge?.node)
                if let o = oldEdge?.node { o.retain() }
                // The failed edge's reference goes; the restored edge took one.
                try? await added?.node.close()
                try? await oldEdge?.node.close()
                try? PermissionUpdate.refresh([overlay])
                throw error
            }
            if let o = oldEdge?.node {
                try? PermissionUpdate.refresh([o])
                try? await o.close()
            }
        }
        sweepClosed()
    }

    // MARK: - x-debug-query-block-graph

    /// One node of `debugGraph()`.
    public struct DebugNode: Sendable {
        public enum Kind: String, Sendable { case blockBackend = "block-backend", blockJob = "block-job", blockDriver = "block-driver" }
        public var id: Int
        public var kind: Kind
        public var name: String
    }

    /// One edge of `debugGraph()`.
    public struct DebugEdge: Sendable {
        public var parent: Int
        public var child: Int
        public var name: String
        public var perm: BlockPermissions
        public var shared: BlockPermissions
    }

    /// QEMU's bdrv_get_xdbg_block_graph: backends in creation order, jobs,
    /// then nodes in naming order, each with its edges (a node's newest
    /// child first); ids are given at first sight. The lists come out
    /// reversed, as QEMU prepends.
    public func debugGraph() -> (nodes: [DebugNode], edges: [DebugEdge]) {
        var ids: [ObjectIdentifier: Int] = [:]
        var nodes: [DebugNode] = []
        var edges: [DebugEdge] = []
        func id(_ o: AnyObject) -> Int {
            if let i = ids[ObjectIdentifier(o)] { return i }
            let i = ids.count + 1
            ids[ObjectIdentifier(o)] = i
            return i
        }
        func edge(_ parent: AnyObject, _ c: BlockChild) {
            edges.append(DebugEdge(parent: id(parent), child: id(c.node), name: c.name, perm: c.perm, shared: c.shared))
        }
        for b in backends {
            nodes.append(DebugNode(id: id(b), kind: .blockBackend, name: b.name ?? ""))
            edge(b, b.root)
        }
        for j in jobs {
            nodes.append(DebugNode(id: id(j), kind: .blockJob, name: j.jobID))
            for c in j.edges { edge(j, c) }
        }
        for n in self.nodes where !n.isClosed {
            nodes.append(DebugNode(id: id(n), kind: .blockDriver, name: n.nodeName))
            for c in n.children.reversed() { edge(n, c) }
        }
        return (nodes.reversed(), edges.reversed())
    }
}

// MARK: - Reopening

extension Graph {
    /// QEMU's bdrv_reopen_set_read_only(node, false): the node (and the
    /// file below it) accept writes; the permission update then takes the
    /// write locks, and if it cannot, the node is read-only again.
    public func reopenReadWrite(_ node: BlockNode) async throws(BlockError) {
        if !node.readOnly { return }
        try await node.reopenReadWrite()
        do throws(BlockError) {
            try refresh([node])
        } catch {
            await reopenReadOnly(node)
            throw error
        }
    }

    /// QEMU's bdrv_reopen_set_read_only(node, true): the node, and its file
    /// when nothing else writes there, become read-only; permissions loosen.
    public func reopenReadOnly(_ node: BlockNode) async {
        try? await node.reopenReadOnly()
        try? refresh([node])
        if let f = node.file, f !== node, !f.parents.contains(where: { $0.perm.contains(.write) }) {
            try? await f.reopenReadOnly()
        }
    }

    /// Registers a filter node created by the block layer (a job's): named
    /// `name`, or implicit with a generated name (QEMU's bs->implicit).
    public func registerFilter(_ node: BlockNode, name: String?) throws(BlockError) {
        if let name {
            try Self.checkNodeName(name)
            if find(name) != nil { throw BlockError.invalid("Duplicate nodes with node-name='\(name)'") }
        }
        register(node, name: name, monitorOwned: false)
        node.setImplicit(name == nil)
    }
}
