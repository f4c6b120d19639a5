import BlockCore
import BlockDrivers
import BlockGraph
import LaminaJSON

/// `measure [--output=ofmt] [-O output_fmt] [-o options] [--size N | [--object objectdef] [--image-opts] [-f fmt] [-l snapshot_param] filename]`
enum MeasureCommand {
    /// Formats QEMU 7.2 knows that have creation options but no measure.
    static let creatableWithoutMeasure: Set<String> = ["file", "vdi", "qcow", "nbd", "vmdk", "vhdx", "vpc", "qed",
                                                       "parallels", "host_device", "host_cdrom", "ssh", "rbd", "gluster",
                                                       "iscsi", "nfs", "vvfat"]
    /// Formats QEMU 7.2 knows that cannot create images.
    static let notCreatable: Set<String> = ["blkdebug", "blklogwrites", "blkverify", "bochs", "cloop", "compress",
                                            "copy-before-write", "copy-on-read", "dmg", "ftp", "ftps", "http", "https",
                                            "null-aio", "null-co", "nvme", "preallocate", "quorum", "replication",
                                            "snapshot-access", "throttle"]

    static func run(_ args: [String], _ ctx: ToolContext) async throws(ToolError) -> Int32 {
        let opts = try ctx.parse(args, short: "hf:O:o:l:U", long: [
            .init(name: "help", hasArgument: false, key: "h"),
            .init(name: "image-opts", hasArgument: false, key: "image-opts"),
            .init(name: "object", hasArgument: true, key: "object"),
            .init(name: "output", hasArgument: true, key: "output"),
            .init(name: "size", hasArgument: true, key: "size"),
            .init(name: "force-share", hasArgument: false, key: "U"),
        ])
        var format: String?
        var outFormat = "raw"
        var options: String?
        var snapshotName: String?
        var snapshotOpts: (id: String?, name: String?)?
        var forceShare = false
        var json = false
        var imgSize: Int64?
        for (k, v) in opts.options {
            switch k {
            case "h": outln(LaminaImg.helpText(ctx.progName)); return 0
            case "f": format = v
            case "O": outFormat = v!
            case "o":
                guard CreateOptions.splitList(v!) != nil else { throw ctx.fail("Invalid option list: \(v!)") }
                options = options.map { $0 + "," + v! } ?? v!
            case "l":
                if v!.hasPrefix("snapshot.") {
                    snapshotOpts = try parseSnapshotParam(v!, ctx)
                } else {
                    snapshotName = v!
                }
            case "U": forceShare = true
            case "object", "image-opts":
                throw ctx.fail("--\(k) is not supported by Lamina")
            case "output":
                switch v! {
                case "json": json = true
                case "human": json = false
                default: throw ctx.fail("--output must be used with human or json as argument.")
                }
            case "size":
                imgSize = try cvtnum("image size", v!)
            default: break
            }
        }
        if opts.operands.count > 1 { throw ctx.fail("At most one filename argument is allowed.") }
        let filename = opts.operands.first
        if filename == nil && (format != nil || snapshotName != nil || snapshotOpts != nil) {
            throw ctx.fail("--image-opts, -f, and -l require a filename argument.")
        }
        if filename != nil && imgSize != nil { throw ctx.fail("--size N cannot be used together with a filename.") }
        if filename == nil && imgSize == nil { throw ctx.fail("Either --size N or one filename must be specified.") }

        var node: BlockNode?
        var snapshot: (any SnapshotView)?
        if let f = filename {
            try checkFormat(format, f)
            node = try await openImage(f, format: format, readOnly: true, forceShare: forceShare)
        }
        do throws(ToolError) {
            if let n = node, snapshotName != nil || snapshotOpts != nil {
                guard let q = n.driver as? any InternalSnapshots else {
                    throw ctx.fail("Failed to load snapshot: Block format '\(n.driver.formatName)' used by device '' does not support temporarily loading internal snapshots")
                }
                let list = await q.listSnapshots()
                let found: Bool
                if let s = snapshotOpts {
                    found = list.contains { (s.id == nil || $0.id == s.id) && (s.name == nil || $0.name == s.name) }
                        && (s.id != nil || s.name != nil)
                } else {
                    found = list.contains { $0.id == snapshotName } || list.contains { $0.name == snapshotName }
                }
                let match: SnapshotInfo?
                if let s = snapshotOpts {
                    match = (s.id != nil || s.name != nil)
                        ? list.first { (s.id == nil || $0.id == s.id) && (s.name == nil || $0.name == s.name) } : nil
                } else {
                    match = list.first { $0.id == snapshotName } ?? list.first { $0.name == snapshotName }
                }
                guard let sn = match, found else { throw ctx.fail("Failed to load snapshot: Can't find snapshot") }
                do throws(BlockError) {
                    snapshot = try await q.snapshotView(sn)
                } catch {
                    throw ctx.fail("Failed to load snapshot: " + error.message)
                }
            }
            if outFormat != "qcow2" && outFormat != "raw" {
                if creatableWithoutMeasure.contains(outFormat) {
                    throw ctx.fail("Block driver '\(outFormat)' does not support size measurement")
                }
                if notCreatable.contains(outFormat) {
                    throw ctx.fail("Format driver '\(outFormat)' does not support image creation")
                }
                if outFormat == "luks" { throw ctx.fail("Measuring for format 'luks' is not supported by Lamina") }
                throw ctx.fail("Unknown file format '\(outFormat)'")
            }
            var co = CreateOptions(format: outFormat)
            if let o = options {
                do throws(ToolError) {
                    // img_measure has no "-o help": it is an unknown parameter.
                    if let h = CreateOptions.splitList(o)?.first(where: { $0 == "help" || $0 == "?" }) {
                        throw ToolError(message: "Invalid parameter '\(h)'")
                    }
                    try co.parse(o)
                } catch {
                    throw ctx.fail(error.message + "\n\(ctx.progName): Invalid options for file format '\(outFormat)'")
                }
            }
            if let s = imgSize { co.set("size", String(s)) }
            let (required, fully, bitmaps) = outFormat == "qcow2"
                ? try await measureQcow2(co, node, snapshot: snapshot)
                : try await measureRaw(co, node)
            if json {
                var m: [(String, JSON)] = []
                if let b = bitmaps { m.append(("bitmaps", .int(b))) }
                m.append(("required", .int(required)))
                m.append(("fully-allocated", .int(fully)))
                outln(JSON.object(m).pretty())
            } else {
                outln("required size: \(UInt64(bitPattern: required))")
                outln("fully allocated size: \(UInt64(bitPattern: fully))")
                if let b = bitmaps { outln("bitmaps size: \(b)") }
            }
        } catch {
            await closeQuietly(node)
            throw error
        }
        await closeQuietly(node)
        return 0
    }

    /// "snapshot.id=ID,snapshot.name=NAME" (QEMU's internal_snapshot_opts).
    static func parseSnapshotParam(_ s: String, _ ctx: ToolContext) throws(ToolError) -> (id: String?, name: String?) {
        var id: String?
        var name: String?
        for part in s.split(separator: ",", omittingEmptySubsequences: false) {
            let kv = part.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            let key = String(kv[0])
            let value = kv.count > 1 ? String(kv[1]) : "on"
            switch key {
            case "snapshot.id": id = value
            case "snapshot.name": name = value
            default:
                throw ctx.fail("Invalid parameter '\(key)'\n\(ctx.progName): Failed in parsing snapshot param '\(s)'")
            }
        }
        return (id, name)
    }

    static func measureRaw(_ co: CreateOptions, _ node: BlockNode?) async throws(ToolError) -> (Int64, Int64, Int64?) {
        let required: Int64
        if let n = node {
            required = n.length
        } else {
            let s = Int64(clamping: UInt64(co.value("size") ?? "0") ?? 0)
            required = (s + 511) / 512 * 512
        }
        return (required, required, nil)
    }

    static func measureQcow2(_ co: CreateOptions, _ node: BlockNode?,
                             snapshot: (any SnapshotView)? = nil) async throws(ToolError) -> (Int64, Int64, Int64?) {
        let extendedL2 = CreateOptions.isTrue(co.value("extended_l2"))
        let cs64 = UInt64(co.value("cluster_size") ?? "65536") ?? 0
        let bits = cs64 == 0 ? 0 : cs64.trailingZeroBitCount
        if bits < 9 || bits > 21 || UInt64(1) << UInt64(bits) != cs64 {
            throw ToolError(message: "Cluster size must be a power of two between 512 and 2048k")
        }
        if extendedL2 && cs64 < 16384 {
            throw ToolError(message: "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes")
        }
        let cs = Int64(cs64)
        let version: Int
        switch co.value("compat") {
        case nil: version = 3
        case "0.10": version = 2
        case "1.1": version = 3
        case let v?: throw ToolError(message: "Invalid compatibility level: '\(v)'")
        }
        let refcountBits = UInt64(co.value("refcount_bits") ?? "16") ?? 0
        if refcountBits > 64 || refcountBits == 0 || refcountBits & (refcountBits - 1) != 0 {
            throw ToolError(message: "Refcount width must be a power of two and may not exceed 64 bits")
        }
        if version < 3 && refcountBits != 16 {
            throw ToolError(message: "Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)")
        }
        var prealloc = Preallocation.off
        if let p = co.value("preallocation") {
            guard let m = Preallocation(rawValue: p) else { throw ToolError(message: "invalid parameter value: \(p)") }
            prealloc = m
        }
        let hasBacking = co.value("backing_file") != nil
        if co.value("encrypt.format") != nil || CreateOptions.isTrue(co.value("encryption")) {
            throw ToolError(message: "Measuring encrypted qcow2 images is not supported by Lamina")
        }
        let sizeOpt = UInt64(co.value("size") ?? "0") ?? 0
        var virtualSize = Int64(clamping: sizeOpt)
        virtualSize = roundUp(virtualSize, cs)
        let l2e: Int64 = extendedL2 ? 16 : 8
        let l2Tables = divUp(virtualSize / cs, cs / l2e)
        if l2Tables * 8 > 32 * 1024 * 1024 {
            throw ToolError(message: "The image size is too large (try using a larger cluster size)")
        }
        var required: Int64 = 0
        var bitmaps: Int64?
        if let n = node {
            let ssize = n.length
            virtualSize = roundUp(ssize, cs)
            if hasBacking {
                required = virtualSize
            } else {
                var offset: Int64 = 0
                while offset < ssize {
                    let status: BlockStatus
                    do throws(BlockError) {
                        if let view = snapshot {
                            status = try await snapshotStatus(view, n, at: offset, length: ssize - offset)
                        } else {
                            status = try await n.blockStatusAbove(base: nil, at: offset, length: ssize - offset).status
                        }
                    } catch {
                        throw ToolError(message: "Unable to get block status: " + errnoString(error.errno))
                    }
                    var pnum = max(status.length, 1)
                    if status.flags.contains(.zero) {
                        // Zero regions need no data clusters.
                    } else if status.flags.contains(.data) && status.flags.contains(.allocated) {
                        pnum = roundUp(offset + pnum, cs) - offset
                        required += offset % cs + pnum
                    }
                    offset += pnum
                }
            }
            if version >= 3, let b = n.driver as? any PersistentBitmaps, b.supportsPersistentBitmaps {
                bitmaps = await persistentBitmapsSize(b, length: ssize, clusterSize: cs)
            }
        }
        if prealloc == .full || prealloc == .falloc { required = virtualSize }
        let fully = preallocSize(virtualSize, cs, refcountOrder: refcountBits.trailingZeroBitCount, extendedL2: extendedL2)
        return (fully - virtualSize + required, fully, bitmaps)
    }

    /// What bdrv_block_status_above reports with a snapshot loaded in the
    /// top layer: the snapshot's own mapping (data on a hole of the file
    /// reads as zeroes), unallocated ranges from the backing chain.
    static func snapshotStatus(_ view: any SnapshotView, _ node: BlockNode,
                               at offset: Int64, length: Int64) async throws(BlockError) -> BlockStatus {
        var st = try await view.blockStatus(at: offset, length: length)
        if st.flags.contains(.recurse), let host = st.hostNode {
            st.flags.remove(.recurse)
            let hs = try await host.blockStatus(at: st.hostOffset, length: st.length)
            if hs.flags.contains(.eof) && hs.length == 0 {
                st.flags.insert(.zero)
            } else {
                st.length = min(st.length, max(hs.length, 1))
                if hs.flags.contains(.zero) { st.flags.insert(.zero) }
            }
        }
        if !st.flags.isDisjoint(with: [.data, .zero]) {
            st.flags.insert(.allocated)
            return st
        }
        guard let b = node.backing, offset < b.length else {
            return BlockStatus(flags: [.zero], length: st.length)
        }
        var bs = try await b.blockStatusAbove(base: nil, at: offset, length: min(st.length, b.length - offset)).status
        bs.length = max(1, min(bs.length, st.length))
        return bs
    }

    /// Space the source's persistent bitmaps would take in a qcow2 image
    /// (QEMU's qcow2_get_persistent_dirty_bitmap_size over the source's
    /// persistent bitmaps).
    static func persistentBitmapsSize(_ source: any PersistentBitmaps, length: Int64, clusterSize cs: Int64) async -> Int64 {
        var total: Int64 = 0
        var dirSize: Int64 = 0
        for b in await source.persistentBitmaps() {
            let g = Int64(b.granularity)
            let bits = divUp(length, g)
            let bytes = divUp(bits, 8)
            let clusters = divUp(bytes, cs)
            total += clusters * cs
            total += roundUp(clusters * 8, cs)
            dirSize += roundUp(24 + Int64(b.name.utf8.count), 8)
        }
        return total + roundUp(dirSize, cs)
    }

    /// QEMU's qcow2_calc_prealloc_size.
    static func preallocSize(_ totalSize: Int64, _ cs: Int64, refcountOrder: Int, extendedL2: Bool) -> Int64 {
        let aligned = roundUp(totalSize, cs)
        let l2e: Int64 = extendedL2 ? 16 : 8
        var meta = cs
        var nl2e = aligned / cs
        nl2e = roundUp(nl2e, cs / l2e)
        meta += nl2e * l2e
        var nl1e = nl2e * l2e / cs
        nl1e = roundUp(nl1e, cs / 8)
        meta += nl1e * 8
        meta += refcountMetadataSize(clusters: (meta + aligned) / cs, cs, refcountOrder: refcountOrder)
        return meta + aligned
    }

    /// QEMU's qcow2_refcount_metadata_size (no generous increase): the
    /// fixed point of refcount blocks and table clusters.
    static func refcountMetadataSize(clusters: Int64, _ cs: Int64, refcountOrder: Int) -> Int64 {
        let perTableCluster = cs / 8
        let perBlock = cs * 8 / (Int64(1) << Int64(refcountOrder))
        var table: Int64 = 0
        var blocks: Int64 = 0
        var n: Int64 = 0
        var last: Int64
        repeat {
            last = n
            blocks = divUp(clusters + table + blocks, perBlock)
            table = divUp(blocks, perTableCluster)
            n = clusters + blocks + table
        } while n != last
        return (blocks + table) * cs
    }

    static func roundUp(_ v: Int64, _ a: Int64) -> Int64 { (v + a - 1) / a * a }
    static func divUp(_ v: Int64, _ d: Int64) -> Int64 { (v + d - 1) / d }
}
