#if canImport(Glibc)
import Glibc
#endif
import BlockCore
import BlockGraph
import BlockJobs
import LaminaJSON
import QMP

/// block-stream and block-commit: QEMU 7.2's QMP checks in its order, then
/// the jobs (BlockJobs), with the daemon as their graph editor.
extension Daemon {
    /// block-stream: QEMU 7.2's checks in its order, then the job.
    func blockStream(_ a: StreamArgs) async throws(BlockError) {
        if a.base != nil && a.baseNode != nil {
            throw BlockError.invalid("'base' and 'base-node' cannot be specified at the same time")
        }
        if a.base != nil && a.bottom != nil {
            throw BlockError.invalid("'base' and 'bottom' cannot be specified at the same time")
        }
        if a.bottom != nil && a.baseNode != nil {
            throw BlockError.invalid("'bottom' and 'base-node' cannot be specified at the same time")
        }
        guard let bs = graph.find(a.device)?.node else {
            throw BlockError(.notFound, errno: ENOENT, "Cannot find device='\(a.device)' nor node-name='\(a.device)'")
        }
        var base: BlockNode?
        if let name = a.base {
            guard let b = findBackingImage(bs, name) else {
                throw BlockError.invalid("Can't find '\(name)' in the backing chain")
            }
            base = b
        }
        if let name = a.baseNode {
            let b = try lookupNodeName(name)
            if b === bs || !Self.chainContains(bs, b) {
                throw BlockError.invalid("Node '\(name)' is not a backing image of '\(a.device)'")
            }
            base = b
        }
        // QEMU 7.2 checks backing-file against base/base-node only: with
        // `bottom` it is refused as if the whole chain were streamed.
        let namedBase = base
        var bottom: BlockNode?
        if let name = a.bottom {
            let b = try lookupNodeName(name)
            if b.driver.isFilter {
                throw BlockError.invalid("Node '\(name)' is a filter, use a non-filter node as 'bottom'")
            }
            if !Self.chainContains(bs, b) {
                throw BlockError.invalid("Node '\(name)' is not in a chain starting from '\(a.device)'")
            }
            bottom = b
            base = b.filterOrBacking
        }
        // Op blockers on the chain from the device down to the base.
        var n: BlockNode? = bs
        while let c = n, c !== base {
            try c.checkOp(.stream)
            n = c.filterOrBacking
        }
        if namedBase == nil && a.backingFile != nil {
            throw BlockError.invalid("backing file specified, but streaming the entire chain")
        }
        try jobs.checkNewID(a.jobID ?? "")
        // QEMU's stream_start: the lowest layer streamed from.
        if bottom == nil {
            var o = bs
            while let below = o.filterOrBacking, below !== base { o = below }
            guard base == nil || o.filterOrBacking === base else {
                throw BlockError.invalid("'\(base?.nodeName ?? "")' is not in the backing chain of '\(bs.nodeName)'")
            }
            bottom = o
        }
        _ = try await StreamJob.start(jobs, editor: self, id: a.jobID ?? "", node: bs, bottom: bottom!,
                                      backingFile: a.backingFile, filterNodeName: a.filterNodeName, speed: a.speed,
                                      onError: a.onError, autoFinalize: a.autoFinalize, autoDismiss: a.autoDismiss)
    }

    /// block-commit: QEMU 7.2's checks in its order, then an intermediate
    /// or an active commit job.
    func blockCommit(_ a: CommitArgs) async throws(QMPError) {
        // The device: a root node (QEMU's qmp_get_root_bs), else DeviceNotFound.
        guard let bs = graph.find(a.device)?.node else {
            throw QMPError(.deviceNotFound, "Device '\(a.device)' not found")
        }
        try await Commands.qmp { () async throws(BlockError) in
            if !Self.isRootNode(bs) {
                throw BlockError.invalid("Need a root block node")
            }
            try bs.checkOp(.commitSource)
            var top: BlockNode? = bs
            if a.topNode != nil && a.top != nil {
                throw BlockError.invalid("'top-node' and 'top' are mutually exclusive")
            } else if let name = a.topNode {
                let t = try lookupNodeName(name)
                if !Self.chainContains(bs, t) {
                    throw BlockError.invalid("'\(name)' is not in this backing file chain")
                }
                top = t
            } else if let name = a.top, name != bs.filename {
                top = findBackingImage(bs, name)
            }
            guard let top else {
                throw BlockError.invalid("Top image file \(a.top ?? "NULL") not found")
            }
            var base: BlockNode
            if a.baseNode != nil && a.base != nil {
                throw BlockError.invalid("'base-node' and 'base' are mutually exclusive")
            } else if let name = a.baseNode {
                let b = try lookupNodeName(name)
                if !Self.chainContains(top, b) {
                    throw BlockError.invalid("'\(name)' is not in this backing file chain")
                }
                base = b
            } else if let name = a.base {
                guard let b = findBackingImage(top, name) else {
                    throw BlockError.invalid("Can't find '\(name)' in the backing chain")
                }
                base = b
            } else {
                // QEMU's bdrv_find_base: the bottom of the chain.
                var b = top
                while let below = b.filterOrBacking { b = below }
                base = b
            }
            var n: BlockNode? = top
            while let c = n {
                try c.checkOp(.commitTarget)
                if c === base { break }
                n = c.filterOrBacking
            }
            if top === base {
                throw BlockError.invalid("cannot commit an image into itself")
            }
            // QEMU: active commit when someone writes the top (or it is the device).
            let active = top === bs || top.cumulativePermissions.perm.contains(.write)
            if active && a.backingFile != nil {
                throw BlockError.invalid(top === bs ? "'backing-file' specified, but 'top' is the active layer"
                                                    : "'backing-file' specified, but 'top' has a writer on it")
            }
            if !active {
                var o: BlockNode = bs
                while let below = o.filterOrBacking, below !== top { o = below }
                guard o.filterOrBacking === top else {
                    throw BlockError.invalid("Could not find overlay image for \(graph.displayFilename(top)):")
                }
                try o.checkOp(.commitTarget)
            }
            try jobs.checkNewID(a.jobID ?? "")
            if !["qcow2", "raw"].contains(base.formatName) {
                throw BlockError.unsupported("Lamina commits into qcow2 or raw images only, not '\(base.formatName)'")
            }
            if active {
                _ = try await ActiveCommitJob.start(jobs, editor: self, id: a.jobID ?? "", top: top, base: base,
                                                    filterNodeName: a.filterNodeName, speed: a.speed, onError: a.onError,
                                                    autoFinalize: a.autoFinalize, autoDismiss: a.autoDismiss)
            } else {
                _ = try await CommitJob.start(jobs, editor: self, id: a.jobID ?? "", device: bs, top: top, base: base,
                                              backingFile: a.backingFile, filterNodeName: a.filterNodeName,
                                              speed: a.speed, onError: a.onError, autoFinalize: a.autoFinalize,
                                              autoDismiss: a.autoDismiss)
            }
        }
    }
}

extension Daemon: GraphEditor {
    /// QEMU's bdrv_backing_overridden after a backing change: the header
    /// names `name`; a backing node whose file name differs shows in a
    /// json: filename.
    public func backingChanged(of overlay: BlockNode, to base: BlockNode?, name: String?) {
        guard let rec = graph.entry(overlay), let file = overlay.file else { return }
        if let base, let name, name != graph.displayFilename(base) {
            rec.jsonFilename = graph.jsonFilename(overlay, file: file, backing: graph.fullOptions(base))
        } else {
            // Not overridden: the name the format node has over its file.
            rec.jsonFilename = graph.formatDisplayName(format: overlay.formatName, file: file)
        }
    }

    /// QEMU's bdrv_refresh_filename for a job's filter: an implicit one,
    /// or one whose driver names it after its child, shows the child's
    /// file name; a named copy-on-read filter shows its options.
    public func filterInserted(_ filter: BlockNode, namedAfterChild: Bool) {
        guard let rec = graph.entry(filter), !filter.isImplicit, !namedAfterChild,
              let child = filter.filteredChild else { return }
        rec.jsonFilename = "json:" + JSON.object([("driver", .string(filter.formatName)),
                                                  (child.name, graph.fullOptions(child.node))]).compact
    }
}
