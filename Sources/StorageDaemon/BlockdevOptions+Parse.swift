import BlockCore
import BlockGraph
import LaminaJSON
import QMP

/// Decoding of QAPI BlockdevOptions (blockdev-add, --blockdev): members
/// visited in schema order so errors come out as QEMU's.
extension BlockdevOptions {
    /// QEMU 7.2's BlockdevDriver enum: values QEMU knows but Lamina does
    /// not open get a clear "not supported" instead of an enum error.
    static let qemuDrivers: Set<String> = [
        "blkdebug", "blklogwrites", "blkreplay", "blkverify", "bochs", "cloop", "compress", "copy-before-write",
        "copy-on-read", "dmg", "file", "snapshot-access", "ftp", "ftps", "gluster", "host_cdrom", "host_device",
        "http", "https", "io_uring", "iscsi", "luks", "nbd", "nfs", "null-aio", "null-co", "nvme",
        "nvme-io_uring", "parallels", "preallocate", "qcow", "qcow2", "qed", "quorum", "raw", "rbd",
        "replication", "ssh", "throttle", "vdi", "vhdx", "virtio-blk-vfio-pci", "virtio-blk-vhost-user",
        "virtio-blk-vhost-vdpa", "vmdk", "vpc", "vvfat",
    ]

    /// Reads one BlockdevOptions struct; the caller calls `finish()` for the root.
    static func parse(_ a: QAPIInput) throws(QMPError) -> BlockdevOptions {
        let driver = try a.string("driver")
        if !qemuDrivers.contains(driver) {
            throw QMPError.invalidEnumValue("driver", driver)
        }
        let nodeName = try a.optionalString("node-name")
        let discard = try a.optionalEnumValue("discard", allowed: ["ignore", "unmap"])
        let cache = try a.optionalObject("cache") { (c: QAPIInput) throws(QMPError) -> (Bool?, Bool?) in
            (try c.optionalBool("direct"), try c.optionalBool("no-flush"))
        }
        let readOnly = try a.optionalBool("read-only")
        let autoReadOnly = try a.optionalBool("auto-read-only")
        let forceShare = try a.optionalBool("force-share")
        let detectZeroes = try a.optionalEnumValue("detect-zeroes", as: DetectZeroes.self)

        let d: Driver
        switch driver {
        case "file":
            var f = FileOptions(filename: try a.string("filename"))
            if a.has("pr-manager") { _ = try a.optionalString("pr-manager") }
            if let l = try a.optionalEnumValue("locking", as: OnOffAuto.self) { f.locking = l }
            f.aio = try a.optionalEnumValue("aio", allowed: ["threads", "native", "io_uring"])
            _ = try a.optionalInteger("aio-max-batch", as: Int64.self)
            _ = try a.optionalBool("drop-cache")
            _ = try a.optionalBool("x-check-cache-dropped")
            d = .file(f)
        case "raw":
            var r = RawOptions(file: try parseRef(a.required("file")))
            r.offset = try a.optionalInteger("offset", as: Int64.self)
            r.size = try a.optionalInteger("size", as: Int64.self)
            d = .raw(r)
        case "qcow2":
            var q = Qcow2Options(file: try parseRef(a.required("file")))
            if let b = a.optional("backing") {
                q.backing = .some(try parseRefOrNull(b))
            }
            q.lazyRefcounts = try a.optionalBool("lazy-refcounts")
            _ = try a.optionalBool("pass-discard-request")
            _ = try a.optionalBool("pass-discard-snapshot")
            _ = try a.optionalBool("pass-discard-other")
            _ = a.optionalAny("overlap-check")  // accepted, Lamina always checks
            _ = try a.optionalInteger("cache-size", as: UInt64.self)
            q.l2CacheSize = try a.optionalInteger("l2-cache-size", as: Int64.self)
            _ = try a.optionalInteger("l2-cache-entry-size", as: UInt64.self)
            _ = try a.optionalInteger("refcount-cache-size", as: UInt64.self)
            _ = try a.optionalInteger("cache-clean-interval", as: UInt64.self)
            if a.has("encrypt") { throw QMPError("qcow2: encryption is not supported by Lamina") }
            if a.has("data-file") { throw QMPError("qcow2: external data files are not supported by Lamina") }
            d = .qcow2(q)
        case "null-co":
            var n = NullOptions()
            if let s = try a.optionalInteger("size", as: Int64.self) { n.size = s }
            if let l = try a.optionalInteger("latency-ns", as: Int64.self) { n.latencyNs = l }
            if let z = try a.optionalBool("read-zeroes") { n.readZeroes = z }
            d = .nullCo(n)
        case "blkdebug":
            d = .blkdebug(try parseBlkdebug(a))
        case "copy-on-read":
            var c = CopyOnReadOptions(file: try parseRef(a.required("file")))
            c.bottom = try a.optionalString("bottom")
            d = .copyOnRead(c)
        default:
            throw QMPError("Driver '\(driver)' is not supported by Lamina (supported: file, raw, qcow2, null-co, blkdebug, copy-on-read)")
        }
        var o = BlockdevOptions(driver: d)
        o.nodeName = nodeName
        o.discardUnmap = discard.map { $0 == "unmap" }
        o.cacheDirect = cache?.0
        o.cacheNoFlush = cache?.1
        o.readOnly = readOnly
        o.autoReadOnly = autoReadOnly
        o.forceShare = forceShare
        o.detectZeroes = detectZeroes
        return o
    }

    /// BlockdevRef: a node name (string) or nested options (object).
    static func parseRef(_ v: QAPIValue) throws(QMPError) -> BlockdevRef {
        switch v.qtype {
        case .string: return .reference(try v.string())
        case .object: return .options(try v.object { (a: QAPIInput) throws(QMPError) in try parse(a) })
        default: throw v.alternateMismatch(expected: "BlockdevRef")
        }
    }

    /// BlockdevRefOrNull: null means "no backing".
    static func parseRefOrNull(_ v: QAPIValue) throws(QMPError) -> BlockdevRef? {
        switch v.qtype {
        case .null: return nil
        case .string:
            let s = try v.string()
            // On the command line (keyval) a null can only be spelled as a string.
            if v.mode == .keyval && (s.isEmpty || s == "null") { return nil }
            return .reference(s)
        case .object: return .options(try v.object { (a: QAPIInput) throws(QMPError) in try parse(a) })
        default: throw v.alternateMismatch(expected: "BlockdevRefOrNull")
        }
    }
}
