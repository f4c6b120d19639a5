#if canImport(Glibc)
import Glibc
#endif
import BlkdebugDriver
import BlockCore
import BlockDrivers
import BlockGraph
import CopyOnReadDriver
import FileDriver
import LaminaJSON
import RawDriver

/// Opens a blockdev-add tree: new nodes for nested options, references to
/// existing nodes by name, the default backing chain from image headers.
///
/// Ownership: `open` returns a node holding one reference for its caller
/// (a new node's creation reference, or a `retain()` on an existing one);
/// when it throws it has released everything it acquired, so the graph is
/// as before.
@ControlActor
struct NodeOpener {
    let graph: Graph

    init(graph: Graph) { self.graph = graph }

    /// Opens the root of a blockdev-add (node-name required).
    static func add(_ opts: BlockdevOptions, graph: Graph) async throws(BlockError) -> BlockNode {
        guard let name = opts.nodeName else {
            throw BlockError.invalid("'node-name' must be specified for the root node")
        }
        try Graph.checkNodeName(name)
        let opener = NodeOpener(graph: graph)
        let node: BlockNode
        do throws(BlockError) {
            node = try await opener.open(opts, inherited: InheritedOptions(), monitorOwned: true)
        } catch {
            graph.sweepClosed()
            graph.refreshAll()
            throw error
        }
        do throws(BlockError) {
            try graph.refresh([node])
        } catch {
            try? await node.close()
            graph.sweepClosed()
            graph.refreshAll()
            throw error
        }
        return node
    }

    private func checkName(_ name: String?) throws(BlockError) {
        guard let name else { return }
        try Graph.checkNodeName(name)
        if graph.find(name) != nil {
            throw BlockError.invalid("Duplicate nodes with node-name='\(name)'")
        }
    }

    /// Resolves a child reference: an existing node (retained) or new options.
    private func child(_ ref: BlockdevRef, parent: InheritedOptions, backing: Bool,
                                parentName: String?) async throws(BlockError) -> BlockNode {
        switch ref {
        case .reference(let name):
            guard let rec = graph.find(name) else {
                throw BlockError(.notFound, errno: ENOENT, "Cannot find device='\(name)' nor node-name='\(name)'")
            }
            rec.node.retain()
            return rec.node
        case .options(let o):
            var inh = parent
            if backing {
                inh.readOnly = true
                inh.autoReadOnly = false
            }
            return try await open(o, inherited: inh, monitorOwned: false)
        }
    }

    func open(_ o: BlockdevOptions, inherited: InheritedOptions, monitorOwned: Bool) async throws(BlockError) -> BlockNode {
        try checkName(o.nodeName)
        let eff = inherited.resolved(o)
        if o.detectZeroes == .unmap && !eff.discardUnmap {
            throw BlockError.invalid("setting detect-zeroes to unmap is not allowed without setting discard operation to unmap")
        }
        let policy = NodePolicy(discardUnmap: eff.discardUnmap, detectZeroes: o.detectZeroes ?? .off)
        var readOnly = eff.readOnly
        let node: BlockNode
        switch o.driver {
        case .file(let f):
            node = try openFile(f, eff, &readOnly, policy)
            register(node, o, eff, readOnly, monitorOwned)
        case .nullCo(let n):
            node = BlockNode(driver: NullDriver(size: n.size ?? 1 << 30, readZeroes: n.readZeroes ?? false,
                                                latencyNs: n.latencyNs ?? 0),
                             filename: Self.nullFilename(n), readOnly: readOnly, policy: policy)
            register(node, o, eff, readOnly, monitorOwned)
        case .raw(let r):
            // raw takes no permission of its own on its file (it passes its
            // parents' through), so a writable raw node over a read-only
            // file may exist, as in QEMU; a writer attaching to it is refused.
            let file = try await child(r.file, parent: eff, backing: false, parentName: o.nodeName)
            let driver: RawDriver
            if r.offset != nil || r.size != nil {
                do throws(BlockError) {
                    driver = try RawDriver(file: file, offset: r.offset ?? 0, size: r.size)
                } catch {
                    try? await file.close()
                    throw error
                }
            } else {
                driver = RawDriver(file: file)
            }
            node = BlockNode(driver: driver, filename: file.filename, readOnly: readOnly, policy: policy)
            register(node, o, eff, readOnly, monitorOwned)
            graph.entry(node)?.jsonFilename = graph.formatDisplayName(format: "raw", file: file)
            if r.offset != nil || r.size != nil {
                var m: [(String, JSON)] = [("driver", .string("raw")), ("file", graph.fullOptions(file))]
                if let v = r.offset { m.append(("offset", .int(v))) }
                if let v = r.size { m.append(("size", .int(v))) }
                graph.entry(node)?.jsonFilename = "json:" + JSON.object(m).compact
            }
            do throws(BlockError) {
                try checkEdges(node)
            } catch {
                try? await node.close()
                throw error
            }
        case .qcow2(let q):
            node = try await openQcow2(q, o, eff, &readOnly, policy, monitorOwned)
        case .blkdebug(let b):
            node = try await openBlkdebug(b, o, eff, readOnly, policy, monitorOwned)
        case .copyOnRead(let c):
            node = try await openCopyOnRead(c, o, eff, readOnly, policy, monitorOwned)
        }
        return node
    }

    /// copy-on-read (QEMU's cor_open): the file, then the bottom node.
    private func openCopyOnRead(_ c: CopyOnReadOptions, _ o: BlockdevOptions, _ eff: InheritedOptions,
                                _ readOnly: Bool, _ policy: NodePolicy, _ monitorOwned: Bool) async throws(BlockError) -> BlockNode {
        let file = try await child(c.file, parent: eff, backing: false, parentName: o.nodeName)
        var bottom: BlockNode?
        if let name = c.bottom {
            guard let b = graph.find(name)?.node else {
                try? await file.close()
                throw BlockError.invalid("Bottom node '\(name)' not found")
            }
            if b.driver.isFilter {
                try? await file.close()
                throw BlockError.invalid("Bottom node '\(name)' is a filter")
            }
            bottom = b
        }
        let node = BlockNode(driver: CopyOnReadFilter(file: file, bottom: bottom), filename: graph.displayFilename(file),
                             readOnly: readOnly, policy: policy)
        register(node, o, eff, readOnly, monitorOwned)
        // A filter the user named shows its options (bdrv_refresh_filename).
        graph.entry(node)?.jsonFilename = "json:" + JSON.object([("driver", .string("copy-on-read")),
                                                                 ("file", graph.fullOptions(file))]).compact
        do throws(BlockError) {
            try checkEdges(node)
        } catch {
            try? await node.close()
            throw error
        }
        return node
    }

    private func register(_ node: BlockNode, _ o: BlockdevOptions, _ eff: InheritedOptions,
                          _ readOnly: Bool, _ monitorOwned: Bool) {
        graph.register(node, name: o.nodeName, monitorOwned: monitorOwned, options: eff.openOptions)
    }

    /// QEMU's bdrv_refresh_filename for null-co: "null-co://" unless
    /// options were given, then "json:" and the options.
    static func nullFilename(_ n: NullOptions) -> String {
        var m: [(String, JSON)] = [("driver", .string("null-co"))]
        if let v = n.size { m.append(("size", .int(v))) }
        if let v = n.latencyNs { m.append(("latency-ns", .int(v))) }
        if let v = n.readZeroes { m.append(("read-zeroes", .bool(v))) }
        return m.count == 1 ? "null-co://" : "json:" + JSON.object(m).compact
    }

    /// The permission update for a new node's edges (QEMU gives each
    /// child edge the parent's default permissions as it is attached and
    /// refreshes the child's subtree).
    private func checkEdges(_ node: BlockNode) throws(BlockError) {
        try graph.refresh([node])
    }

    private func openFile(_ f: FileOptions, _ eff: InheritedOptions, _ readOnly: inout Bool,
                          _ policy: NodePolicy) throws(BlockError) -> BlockNode {
        if f.filename.isEmpty {
            throw BlockError.invalid("The 'file' block driver requires a file name")
        }
        if let aio = f.aio, aio != "threads" && aio != "native" && aio != "io_uring" {
            throw BlockError.invalid("Parameter 'aio' does not accept value '\(aio)'")
        }
        let lock: ImageLock? = f.locking == .off ? nil : .unused
        do throws(BlockError) {
            return try FileDriver.open(f.filename, readOnly: readOnly, direct: eff.cacheDirect, noFlush: eff.cacheNoFlush,
                                       unmap: policy.discardUnmap, lock: lock, policy: policy)
        } catch {
            guard !readOnly, eff.autoReadOnly, error.errno == EACCES || error.errno == EROFS || error.errno == EPERM else {
                throw error
            }
            readOnly = true
            return try FileDriver.open(f.filename, readOnly: true, direct: eff.cacheDirect, noFlush: eff.cacheNoFlush,
                                       unmap: policy.discardUnmap, lock: lock, policy: policy)
        }
    }

    private func openQcow2(_ q: Qcow2Options, _ o: BlockdevOptions, _ eff: InheritedOptions,
                                    _ readOnly: inout Bool, _ policy: NodePolicy,
                                    _ monitorOwned: Bool) async throws(BlockError) -> BlockNode {
        let file = try await child(q.file, parent: eff, backing: false, parentName: o.nodeName)
        if file.readOnly && !readOnly {
            if eff.autoReadOnly { readOnly = true } else {
                try? await file.close()
                throw BlockError(.permissionDenied, errno: EPERM, "Block node is read-only")
            }
        }
        var fo = FormatOpenOptions()
        fo.readOnly = readOnly
        fo.noFlush = eff.cacheNoFlush
        if let l2 = q.l2CacheSize { fo.l2CacheBytes = Int(l2) }
        // QEMU attaches the file child with the format's permissions before
        // the format opens (and may write) the image: a second writer is
        // refused before it touches anything.
        let probe: StorageProbe
        do throws(BlockError) {
            probe = try await StorageProbe.attach(file, for: o.nodeName ?? "", writable: !readOnly, graph: graph)
        } catch {
            try? await file.close()
            throw error
        }
        let driver: any BlockDriver
        do throws(BlockError) {
            driver = try await FormatDrivers.open("qcow2", file: file, options: fo)
        } catch {
            await probe.release()
            try? await file.close()
            throw error
        }
        // What the image header names as its backing file.
        let header = driver as? any BackingDriver
        let node = BlockNode(driver: driver, filename: file.filename, readOnly: readOnly, policy: policy)
        // Named before the permission check, so its errors can name it.
        register(node, o, eff, readOnly, monitorOwned)
        graph.entry(node)?.jsonFilename = graph.formatDisplayName(format: "qcow2", file: file)
        do throws(BlockError) {
            // The node's own edge takes over (no refresh in between: the
            // locks stay held).
            await probe.release(refreshing: false)
            try checkEdges(node)
            switch q.backing {
            case .some(.none):
                graph.entry(node)?.jsonFilename = graph.jsonFilename(node, file: file, backing: .null)
            case .some(.some(let ref)):
                let b: BlockNode
                do throws(BlockError) {
                    b = try await child(ref, parent: eff, backing: true, parentName: o.nodeName)
                } catch {
                    if error.message.hasPrefix("Could not open backing file: ") { throw error }
                    throw error.prefixed("Could not open backing file: ")
                }
                node.setBacking(b)
                try graph.refresh([node])
                // QEMU's bdrv_backing_overridden: a backing node other than
                // the file the header names (compared as strings) shows up
                // in a json: filename.
                if header?.backingFileName != graph.displayFilename(b) {
                    graph.entry(node)?.jsonFilename = graph.jsonFilename(node, file: file, backing: graph.fullOptions(b))
                }
            case .none:
                if let name = header?.backingFileName, !name.isEmpty {
                    try await openDefaultBacking(format: header?.backingFormat, node, name, eff)
                }
            }
        } catch {
            await probe.release()
            try? await node.close()
            throw error
        }
        return node
    }

    /// blkdebug (QEMU's blkdebug_open): the option syntax and the rules
    /// first, then the image, then the limits checked against the image.
    private func openBlkdebug(_ b: BlkdebugBlockdevOptions, _ o: BlockdevOptions, _ eff: InheritedOptions,
                              _ readOnly: Bool, _ policy: NodePolicy, _ monitorOwned: Bool) async throws(BlockError) -> BlockNode {
        let setup = try BlkdebugSetup(b.options)
        // QEMU names the node before it opens the image.
        let seq = graph.reserveSeq()
        let name = o.nodeName ?? graph.generateName()
        let image = try await child(b.image, parent: eff, backing: false, parentName: o.nodeName)
        let driver: BlkdebugDriver
        do throws(BlockError) {
            driver = try BlkdebugDriver(image: image, setup: setup)
        } catch {
            try? await image.close()
            throw error
        }
        let node = BlockNode(driver: driver, filename: image.filename, readOnly: readOnly, policy: policy)
        graph.register(node, name: name, monitorOwned: monitorOwned, options: eff.openOptions, seq: seq)
        graph.entry(node)?.jsonFilename = graph.blkdebugDisplayName(node, driver)
        do throws(BlockError) {
            try checkEdges(node)
        } catch {
            try? await node.close()
            throw error
        }
        return node
    }

    /// The backing chain named in the image headers, every node implicit.
    private func openDefaultBacking(format: String?, _ node: BlockNode, _ name: String,
                                    _ eff: InheritedOptions) async throws(BlockError) {
        let path = ImageOpener.resolveBackingPath(name, overlay: node.filename)
        var io = ImageOpenOptions()
        io.format = format
        io.readOnly = true
        io.cacheDirect = eff.cacheDirect
        io.noFlush = eff.cacheNoFlush
        io.unmap = eff.discardUnmap
        let chain: BlockNode
        do throws(BlockError) {
            chain = try await ImageOpener.open(path, io)
        } catch {
            if error.message.hasPrefix("Could not open backing file: ") || error.message.contains("infinite loop") {
                throw error
            }
            throw error.prefixed("Could not open backing file: ")
        }
        node.setBacking(chain)
        // Name the chain as QEMU does: each layer's file, then the layer, then its backing.
        var layer: BlockNode? = chain
        var inh = eff
        inh.readOnly = true
        inh.autoReadOnly = false
        while let l = layer {
            if let f = l.file, l !== f {
                graph.register(f, name: nil, monitorOwned: false, options: inh.openOptions)
            }
            graph.register(l, name: nil, monitorOwned: false, options: inh.openOptions)
            layer = l.backing
        }
        try graph.refresh([node])
    }
}

/// A format node's file edge before the format node exists (QEMU's
/// bdrv_open_child attaches the child with the parent's permissions before
/// the parent's driver opens it): the permissions the format will take are
/// checked and the image locks taken, or the open is refused, before the
/// driver reads or writes the image. Released once the node's own edge
/// holds them.
@ControlActor
final class StorageProbe: BlockParent {
    let parentDescription: String
    private let edge: BlockChild
    private let graph: Graph
    private var released = false

    private init(_ file: BlockNode, for nodeName: String, graph: Graph) {
        parentDescription = "node '\(nodeName)'"
        self.graph = graph
        file.retain()
        edge = BlockChild(name: "file", role: .image, node: file)
    }

    /// Attaches the probe with the permissions a format node takes on its
    /// file (writable or not); throws, attaching nothing, when they cannot
    /// be granted.
    static func attach(_ file: BlockNode, for nodeName: String, writable: Bool,
                       graph: Graph) async throws(BlockError) -> StorageProbe {
        let probe = StorageProbe(file, for: nodeName, graph: graph)
        let (p, s) = defaultChildPermissions(role: .image, writable: writable, perm: [], shared: .all)
        probe.edge.setPermissions(p, s)
        probe.edge.attach(to: probe)
        do throws(BlockError) {
            try graph.refresh([file])
        } catch {
            await probe.release()
            throw error
        }
        return probe
    }

    /// Detaches the probe; with `refreshing`, the file's permissions
    /// loosen now (else the caller's next update does it).
    func release(refreshing: Bool = true) async {
        if released { return }
        released = true
        let file = edge.node
        edge.detach()
        if refreshing { try? graph.refresh([file]) }
        try? await file.close()
    }

    nonisolated func drainBegin() async {}
    nonisolated func drainEnd() async {}
}
