import BlockCore
import BlockGraph
import FileDriver
import ImgTool
import LaminaJSON
import Qcow2

/// query-named-block-nodes' BlockDeviceInfo and x-debug-query-block-graph.
@ControlActor
enum NodeInfo {
    /// QAPI BlockDeviceInfo for one node (QEMU's bdrv_block_device_info).
    static func blockDeviceInfo(_ rec: NodeRecord, graph: Graph, flat: Bool) async -> JSON {
        let node = rec.node
        var m: [(String, JSON)] = [
            ("file", .string(graph.displayFilename(node))),
            ("node-name", .string(node.nodeName)),
            ("ro", .bool(node.readOnly)),
            ("drv", .string(node.formatName)),
        ]
        // With "backing": null QEMU reports no backing file at all.
        if let b = node.backing {
            m.append(("backing_file", .string(graph.displayFilename(b))))
        }
        m.append(("backing_file_depth", .int(flat ? 0 : Int64(Graph.backingDepth(node)))))
        m.append(("encrypted", .bool(false)))
        m.append(("detect_zeroes", .string(node.policy.detectZeroes.rawValue)))
        for k in ["bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr"] {
            m.append((k, .int(0)))
        }
        m.append(("image", await imageInfo(node, graph: graph, flat: flat)))
        m.append(("cache", .object([
            ("writeback", .bool(true)),
            ("direct", .bool(rec.cacheDirect)),
            ("no-flush", .bool(rec.cacheNoFlush)),
        ])))
        m.append(("write_threshold", .int(0)))
        return .object(m)
    }

    /// QAPI ImageInfo (qemu-img info's keys), with backing-image unless flat.
    static func imageInfo(_ node: BlockNode, graph: Graph, flat: Bool) async -> JSON {
        if node.formatName == "null-co" {
            return .object([
                ("filename", .string(node.filename)), ("format", .string("null-co")),
                ("actual-size", .int(0)), ("virtual-size", .int(node.length)),
            ])
        }
        let info = await ImageInfo.collect(node)
        guard case .object(var m) = info.json else { return info.json }
        if let j = graph.record(node)?.jsonFilename, let i = m.firstIndex(where: { $0.0 == "filename" }) {
            m[i].1 = .string(j)
        }
        if !flat, let b = node.backing {
            m.append(("backing-image", await imageInfo(b, graph: graph, flat: false)))
        }
        return .object(m)
    }

    /// x-debug-query-block-graph: nodes (block drivers and export
    /// backends) and edges with the permissions each parent holds.
    /// Numbered and ordered as QEMU's walk does: block backends (exports)
    /// in creation order, then nodes in naming order (a node's file is
    /// named before it, its backing after it), each node's children most
    /// recently attached first; an id is given at first sight; both lists
    /// come out reversed (QEMU prepends).
    static func graphJSON(_ graph: Graph, exports: [(id: String, node: BlockNode, writable: Bool)]) -> JSON {
        var ids: [ObjectIdentifier: Int] = [:]
        var nodes: [JSON] = []
        var edges: [JSON] = []
        var next = 1
        func id(_ n: BlockNode) -> Int {
            if let i = ids[ObjectIdentifier(n)] { return i }
            let i = next
            next += 1
            ids[ObjectIdentifier(n)] = i
            return i
        }
        for e in exports {
            let backendID = next
            next += 1
            nodes.append(.object([("id", .int(Int64(backendID))), ("type", .string("block-backend")), ("name", .string(""))]))
            let edge = Graph.rootEdge(RootUser(exportID: e.id, writable: e.writable), e.node)
            edges.append(edgeJSON(parent: backendID, child: id(e.node), edge))
        }
        for rec in graph.all.reversed() {
            let pid = id(rec.node)
            nodes.append(.object([("id", .int(Int64(pid))), ("type", .string("block-driver")),
                                  ("name", .string(rec.name))]))
            for c in rec.node.children.reversed() {
                edges.append(edgeJSON(parent: pid, child: id(c.node), graph.edge(parent: rec.node, child: c)))
            }
        }
        return .object([("nodes", .array(nodes.reversed())), ("edges", .array(edges.reversed()))])
    }

    private static func edgeJSON(parent: Int, child: Int, _ e: GraphEdge) -> JSON {
        .object([
            ("parent", .int(Int64(parent))), ("child", .int(Int64(child))), ("name", .string(e.role)),
            ("perm", .array(e.perm.qapiNames.map { .string($0) })),
            ("shared-perm", .array(e.shared.qapiNames.map { .string($0) })),
        ])
    }
}
