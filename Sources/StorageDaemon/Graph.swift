#if canImport(Glibc)
import Glibc
#endif
import BlockCore
import LaminaJSON
import BlockGraph
import FileDriver
import Qcow2

/// QEMU's BLK_PERM_* (names as x-debug-query-block-graph prints them).
typealias Perm = ImageLock.Permissions

extension ImageLock.Permissions {
    /// QAPI BlockPermission names, in the order QEMU lists them.
    var qapiNames: [String] {
        var out: [String] = []
        if contains(.resize) { out.append("resize") }
        if contains(.writeUnchanged) { out.append("write-unchanged") }
        if contains(.write) { out.append("write") }
        if contains(.consistentRead) { out.append("consistent-read") }
        return out
    }

    /// bdrv_perm_names: human names, in QEMU's bit order.
    var qemuNames: [String] {
        var out: [String] = []
        if contains(.consistentRead) { out.append("consistent read") }
        if contains(.write) { out.append("write") }
        if contains(.writeUnchanged) { out.append("write unchanged") }
        if contains(.resize) { out.append("resize") }
        return out
    }

    var qapiSingleNames: [String] {
        var out: [String] = []
        if contains(.consistentRead) { out.append("consistent-read") }
        if contains(.write) { out.append("write") }
        if contains(.writeUnchanged) { out.append("write-unchanged") }
        if contains(.resize) { out.append("resize") }
        return out
    }
}

/// What the daemon remembers about a node beyond the node itself.
@ControlActor
final class NodeRecord {
    let node: BlockNode
    /// Naming order; query-named-block-nodes lists newest first.
    let seq: Int
    /// Added by name through blockdev-add / --blockdev (owned by the monitor).
    var monitorOwned: Bool
    let cacheDirect: Bool
    let cacheNoFlush: Bool
    let autoReadOnly: Bool
    let forceShare: Bool
    /// QEMU's "json:{...}" name when the node's options cannot be told by
    /// a plain filename (a qcow2 node given an explicit backing, or
    /// "backing": null); nil when `node.filename` says it all.
    var jsonFilename: String?

    init(node: BlockNode, seq: Int, monitorOwned: Bool, cacheDirect: Bool, cacheNoFlush: Bool,
         autoReadOnly: Bool, forceShare: Bool) {
        self.node = node
        self.seq = seq
        self.monitorOwned = monitorOwned
        self.cacheDirect = cacheDirect
        self.cacheNoFlush = cacheNoFlush
        self.autoReadOnly = autoReadOnly
        self.forceShare = forceShare
    }

    var name: String { node.nodeName }
}

/// A user of a node that is not itself a node: an export (QEMU's
/// BlockBackend "root" edge).
struct RootUser: Sendable {
    var exportID: String
    var writable: Bool
}

/// One edge of the graph with the permissions it takes and shares.
struct GraphEdge {
    enum Parent {
        case node(BlockNode)
        case root(RootUser)
    }
    var parent: Parent
    var child: BlockNode
    var role: String
    var perm: Perm
    var shared: Perm

    var parentDescription: String {
        switch parent {
        case .node(let n): return "node '\(n.nodeName)'"
        case .root: return "block device"
        }
    }

    func sameParent(as other: GraphEdge) -> Bool {
        switch (parent, other.parent) {
        case (.node(let a), .node(let b)): return a === b
        case (.root(let a), .root(let b)): return a.exportID == b.exportID
        default: return false
        }
    }

    /// QEMU's bdrv_child_user_desc.
    var userDescription: String {
        "\(parentDescription) (uses node '\(child.nodeName)' as '\(role)' child)"
    }
}

/// The daemon's block graph: every node by name, and who uses whom.
/// Runs on the control actor; nodes do their I/O elsewhere.
@ControlActor
final class Graph {
    private(set) var records: [ObjectIdentifier: NodeRecord] = [:]
    private var nextSeq = 0
    private var idCounter: UInt64 = 0
    /// Root users (exports) per node, maintained by the export registry.
    var rootUsers: [ObjectIdentifier: [RootUser]] = [:]

    /// Every node, newest first (QEMU's order).
    var all: [NodeRecord] { records.values.sorted { $0.seq > $1.seq } }

    func find(_ name: String) -> NodeRecord? {
        records.values.first { $0.name == name }
    }

    func record(_ node: BlockNode) -> NodeRecord? { records[ObjectIdentifier(node)] }

    /// The name QEMU shows for a node (bdrv_refresh_filename's result).
    func displayFilename(_ node: BlockNode) -> String {
        record(node)?.jsonFilename ?? node.filename
    }

    /// The node's options as QEMU's json: filenames embed them.
    func fullOptions(_ node: BlockNode) -> JSON {
        if let j = record(node)?.jsonFilename, let v = try? JSON.parse(String(j.dropFirst(5))) {
            return v
        }
        if node.filename.hasPrefix("json:"), let v = try? JSON.parse(String(node.filename.dropFirst(5))) {
            return v
        }
        if node.formatName == "file" {
            return .object([("driver", .string("file")), ("filename", .string(node.filename))])
        }
        if let f = node.file, f !== node {
            return .object([("driver", .string(node.formatName)), ("file", fullOptions(f))])
        }
        return .object([("driver", .string(node.formatName)), ("filename", .string(node.filename))])
    }

    /// QEMU's id_generate(ID_BLOCK): "#block" + counter + two random digits.
    func generateName() -> String {
        let n = idCounter
        idCounter += 1
        let r = Int.random(in: 0..<100)
        return "#block\(n)" + (r < 10 ? "0\(r)" : "\(r)")
    }

    /// QEMU's node-name rules: a letter, then letters, digits, '-', '.', '_'; < 32 bytes.
    static func checkNodeName(_ name: String) throws(BlockError) {
        let ok = name.unicodeScalars.first.map { ("a"..."z").contains($0) || ("A"..."Z").contains($0) } ?? false
            && name.unicodeScalars.allSatisfy {
                ("a"..."z").contains($0) || ("A"..."Z").contains($0) || ("0"..."9").contains($0)
                    || $0 == "-" || $0 == "." || $0 == "_"
            }
        if !ok { throw BlockError.invalid("Invalid node-name: '\(name)'") }
        if name.utf8.count >= 32 { throw BlockError.invalid("Node name too long") }
    }

    func register(_ node: BlockNode, name: String?, monitorOwned: Bool, opts: InheritedOptions) {
        node.setNodeName(name ?? generateName())
        let rec = NodeRecord(node: node, seq: nextSeq, monitorOwned: monitorOwned, cacheDirect: opts.cacheDirect,
                             cacheNoFlush: opts.cacheNoFlush, autoReadOnly: opts.autoReadOnly,
                             forceShare: opts.forceShare)
        nextSeq += 1
        records[ObjectIdentifier(node)] = rec
    }

    /// Forgets nodes whose last reference was closed.
    func sweepClosed() {
        records = records.filter { !$0.value.node.isClosed }
    }

    // MARK: - Edges and permissions

    /// The edges into `child` (node parents and exports).
    func edges(into child: BlockNode) -> [GraphEdge] {
        var out: [GraphEdge] = []
        for rec in records.values {
            for c in rec.node.children where c.node === child {
                out.append(edge(parent: rec.node, child: c))
            }
        }
        for r in rootUsers[ObjectIdentifier(child)] ?? [] {
            out.append(Self.rootEdge(r, child))
        }
        return out
    }

    static func rootEdge(_ r: RootUser, _ child: BlockNode) -> GraphEdge {
        GraphEdge(parent: .root(r), child: child, role: "root",
                  perm: r.writable ? [.consistentRead, .write] : [.consistentRead],
                  shared: [.consistentRead, .write, .writeUnchanged])
    }

    /// The permissions a parent takes on a child, as QEMU's drivers choose them.
    func edge(parent: BlockNode, child: BlockChild) -> GraphEdge {
        var perm: Perm = []
        var shared: Perm = .all
        switch (parent.formatName, child.role) {
        case (_, .backing):
            // QEMU's bdrv_default_perms_for_cow: consistent reads of the
            // backing file when the overlay's own users read it.
            let up = edges(into: parent)
            perm = up.contains { $0.perm.contains(.consistentRead) } ? [.consistentRead] : []
            shared = .all
        case ("raw", _):
            // raw passes its parents' needs through.
            let up = edges(into: parent)
            perm = up.reduce(into: Perm()) { $0.formUnion($1.perm) }
            shared = up.reduce(into: Perm.all) { $0.formIntersection($1.shared) }
        default:
            if parent.readOnly {
                perm = [.consistentRead]
                shared = [.consistentRead, .writeUnchanged]
            } else {
                perm = [.consistentRead, .write, .resize]
                shared = [.consistentRead, .writeUnchanged]
            }
        }
        if record(parent)?.forceShare == true {
            shared = .all
        }
        return GraphEdge(parent: .node(parent), child: child.node, role: child.role.rawValue, perm: perm, shared: shared)
    }

    /// Checks that a new edge into `child` is compatible with the existing
    /// ones, with QEMU 7.2's permission-conflict message.
    func checkNewEdge(_ new: GraphEdge) throws(BlockError) {
        if new.perm.contains(.write) {
            // raw passes a parent's write permission down to its file.
            var n: BlockNode? = new.child
            while let c = n {
                if c.readOnly { throw BlockError(.permissionDenied, errno: EPERM, "Block node is read-only") }
                n = c.formatName == "raw" ? c.file : nil
            }
        }
        for e in edges(into: new.child) where !e.sameParent(as: new) {
            let a = e.perm.subtracting(new.shared)
            if !a.isEmpty { throw conflict(a, requiredBy: e, unsharedBy: new) }
            let b = new.perm.subtracting(e.shared)
            if !b.isEmpty { throw conflict(b, requiredBy: new, unsharedBy: e) }
        }
    }

    private func conflict(_ perms: Perm, requiredBy a: GraphEdge, unsharedBy b: GraphEdge) -> BlockError {
        let child = a.child.nodeName
        return BlockError(.busy, errno: EPERM,
            "Permission conflict on node '\(child)': permissions '\(perms.qemuNames.joined(separator: ", "))' are both required by \(a.userDescription) and unshared by \(b.userDescription).")
    }

    /// Re-applies the image-lock bytes of every file node from the
    /// permissions its parents now take (QEMU's raw_set_perm).
    func updateLocks() throws(BlockError) {
        for rec in records.values {
            guard let fd = rec.node.driver as? FileDriver, fd.currentLock != nil else { continue }
            let up = edges(into: rec.node)
            let perm = up.reduce(into: Perm()) { $0.formUnion($1.perm) }
            let shared = up.reduce(into: Perm.all) { $0.formIntersection($1.shared) }
            try fd.updateLock(ImageLock(perm: perm, shared: shared))
        }
    }

    /// Nodes that use `node` (as file, backing, ...), by name.
    func nodeParents(of node: BlockNode) -> [NodeRecord] {
        records.values.filter { r in r.node.children.contains { $0.node === node } }
    }

    /// backing_file_depth: the length of the backing chain below `node`.
    static func backingDepth(_ node: BlockNode) -> Int {
        var d = 0
        var n = node.backing
        while let b = n {
            d += 1
            n = b.backing
        }
        return d
    }
}
