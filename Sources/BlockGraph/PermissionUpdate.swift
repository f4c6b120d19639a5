import BlockCore

/// QEMU's permission update (block.c: bdrv_refresh_perms and
/// bdrv_list_refresh_perms), all-or-nothing: after any change of the graph
/// (an edge attached, detached or moved, a node reopened), the permissions
/// of every edge below the changed nodes are computed again, parents before
/// children:
///
/// 1. the node's parents must be compatible, pair by pair (what one takes,
///    every other shares) — QEMU's "Permission conflict" message;
/// 2. nobody may write a read-only node — "Block node is read-only";
/// 3. the driver applies what its users take (file nodes: image locks,
///    which fail when another process conflicts);
/// 4. each child edge gets what the driver takes of it
///    (`BlockDriver.childPermissions`), then the child is visited.
///
/// On the first failure every edge and lock changed so far is restored and
/// the error is thrown.
public enum PermissionUpdate {
    /// Refreshes the subtrees of `roots` (in QEMU's order: the subtree of
    /// the last root first).
    public static func refresh(_ roots: [BlockNode]) throws(BlockError) {
        var found = Set<ObjectIdentifier>()
        var list: [BlockNode] = []
        for r in roots where !r.isClosed {
            list = topologicalOrder(r, &found) + list
        }
        var undo: [() -> Void] = []
        do throws(BlockError) {
            for node in list {
                try checkParents(node)
                try refreshNode(node, &undo)
            }
        } catch {
            for u in undo.reversed() { u() }
            throw error
        }
    }

    /// QEMU's bdrv_topological_dfs: a node before everything below it.
    static func topologicalOrder(_ node: BlockNode, _ found: inout Set<ObjectIdentifier>) -> [BlockNode] {
        if !found.insert(ObjectIdentifier(node)).inserted { return [] }
        var below: [BlockNode] = []
        // QEMU walks children newest first, prepending each subtree.
        for c in node.children.reversed() {
            below = topologicalOrder(c.node, &found) + below
        }
        return [node] + below
    }

    /// QEMU's bdrv_parent_perms_conflict.
    static func checkParents(_ node: BlockNode) throws(BlockError) {
        let parents = node.parents
        for a in parents {
            for b in parents where a !== b {
                let missing = b.perm.subtracting(a.shared)
                if !missing.isEmpty {
                    throw BlockError(.busy, errno: 1,
                        "Permission conflict on node '\(node.nodeName)': permissions '\(missing.humanNames)' are both required by \(b.userDescription) and unshared by \(a.userDescription).")
                }
            }
        }
    }

    /// QEMU's bdrv_node_refresh_perm.
    static func refreshNode(_ node: BlockNode, _ undo: inout [() -> Void]) throws(BlockError) {
        let (perm, shared) = node.cumulativePermissions
        if !perm.isDisjoint(with: [.write, .writeUnchanged]) {
            if node.readOnly {
                throw BlockError(.permissionDenied, errno: 1, "Block node is read-only")
            }
            let a = Int64(node.driver.requestAlignment)
            if !perm.contains(.resize) && a > 1 && node.length % a != 0 {
                throw BlockError(.permissionDenied, errno: 1,
                                 "Cannot get 'write' permission without 'resize': Image size is not a multiple of request alignment")
            }
        }
        if let u = try node.driver.setPermissions(perm, shared: shared) { undo.append(u) }
        for c in node.children {
            var (p, s) = node.driver.childPermissions(for: c, node: node, perm: perm, shared: shared)
            if c.node.forceShare { s = .all }
            let (op, os) = (c.perm, c.shared)
            if (op, os) != (p, s) {
                c.setPermissions(p, s)
                undo.append { c.setPermissions(op, os) }
            }
        }
    }

    /// Refreshes every node of `nodes` that no other node uses (and so,
    /// everything below them): after changes that only loosen permissions.
    public static func refreshAll(_ nodes: [BlockNode]) {
        let roots = nodes.filter { n in !n.isClosed && !n.parents.contains { $0.parent is BlockNode } }
        try? refresh(roots)
    }
}
