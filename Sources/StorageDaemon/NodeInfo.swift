import BlockCore
import BlockGraph
import BlockInfo
import FileDriver
import LaminaJSON

/// query-named-block-nodes' BlockDeviceInfo and x-debug-query-block-graph.
@ControlActor
enum NodeInfo {
    /// QAPI BlockDeviceInfo for one node (QEMU's bdrv_block_device_info).
    static func blockDeviceInfo(_ rec: GraphEntry, graph: Graph, flat: Bool) async -> JSON {
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
        m.append(("backing_file_depth", .int(flat ? 0 : Int64(filterOrBackingDepth(node)))))
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
        if let j = graph.entry(node)?.jsonFilename, let i = m.firstIndex(where: { $0.0 == "filename" }) {
            m[i].1 = .string(j)
        }
        // QEMU lists a filter's filtered child here too.
        if !flat, let b = node.filterOrBacking {
            m.append(("backing-image", await imageInfo(b, graph: graph, flat: false)))
        }
        return .object(m)
    }

    /// QEMU's backing_file_depth: the nodes below `node` through filtered
    /// children and backing files.
    static func filterOrBackingDepth(_ node: BlockNode) -> Int {
        var d = 0
        var n = node.filterOrBacking
        while let b = n {
            d += 1
            n = b.filterOrBacking
        }
        return d
    }

    /// x-debug-query-block-graph: the graph's own walk (backends, jobs,
    /// nodes; QEMU's ids and order) as QAPI XDbgBlockGraph.
    static func graphJSON(_ graph: Graph) -> JSON {
        let g = graph.debugGraph()
        let nodes: [JSON] = g.nodes.map {
            .object([("id", .int(Int64($0.id))), ("type", .string($0.kind.rawValue)), ("name", .string($0.name))])
        }
        let edges: [JSON] = g.edges.map { e in
            .object([
                ("parent", .int(Int64(e.parent))), ("child", .int(Int64(e.child))), ("name", .string(e.name)),
                // QEMU prepends each permission: the list comes out reversed.
                ("perm", .array(e.perm.qapiNames.reversed().map { .string($0) })),
                ("shared-perm", .array(e.shared.qapiNames.reversed().map { .string($0) })),
            ])
        }
        return .object([("nodes", .array(nodes)), ("edges", .array(edges))])
    }
}
