#if canImport(Glibc)
import Glibc
#endif
import BlockCore
import BlockDrivers
import BlockGraph
import LaminaJSON

/// QEMU's ImageInfo for one node, collected from the block layer (what
/// `qemu-img info` prints and query-named-block-nodes' "image" holds).
public struct ImageInfo: Sendable {
    public var filename: String
    public var format: String
    public var dirty: Bool
    public var actualSize: Int64?
    public var virtualSize: Int64
    public var clusterSize: Int64?
    public var encrypted = false
    public var backingFilename: String?
    public var fullBackingFilename: String?
    public var backingFormat: String?
    public var snapshots: [SnapshotInfo] = []
    public var formatSpecific: ImageInfoSpecific?

    /// QEMU's bdrv_query_image_info: the generic fields, then what the
    /// driver's capabilities answer (driver info, encryption, backing file
    /// named in the image, internal snapshots, format-specific data).
    /// Reads metadata only; callable on an image opened with noIO.
    public static func collect(_ node: BlockNode) async -> ImageInfo {
        var info = ImageInfo(filename: node.filename, format: node.formatName, dirty: false,
                             actualSize: nil, virtualSize: node.length)
        if let f = node.file?.driver as? any HostBackedDriver {
            info.actualSize = try? f.allocatedBytes()
        } else if let f = node.driver as? any HostBackedDriver {
            info.actualSize = try? f.allocatedBytes()
        }
        if let d = await node.driverInfo() {
            info.clusterSize = Int64(d.clusterSize)
            info.dirty = d.isDirty
        }
        if let i = node.driver as? any ImageInfoProvider {
            info.encrypted = await i.isEncrypted()
        }
        if let b = node.driver as? any BackingDriver, let name = b.backingFileName, !name.isEmpty {
            info.backingFilename = name
            info.fullBackingFilename = ImageOpener.resolveBackingPath(name, overlay: node.filename)
            info.backingFormat = b.backingFormat
        }
        if let s = node.driver as? any InternalSnapshots {
            info.snapshots = await s.listSnapshots()
        }
        if let i = node.driver as? any ImageInfoProvider {
            info.formatSpecific = await i.specificInfo()
        }
        return info
    }

    /// QAPI ImageInfoSpecific as QEMU's visitor prints it: {"type", "data"}.
    static func json(_ specific: ImageInfoSpecific) -> JSON {
        switch specific {
        case .qcow2(let q):
            return .object([("type", .string("qcow2")), ("data", json(q))])
        }
    }

    /// ImageInfoSpecificQCow2's members in QEMU's order, absent ones left out.
    static func json(_ q: ImageInfoSpecificQcow2) -> JSON {
        var m: [(String, JSON)] = [("compat", .string(q.compat))]
        if let v = q.lazyRefcounts { m.append(("lazy-refcounts", .bool(v))) }
        if let list = q.bitmaps {
            m.append(("bitmaps", .array(list.map { b in
                .object([("name", .string(b.name)), ("granularity", .uint(b.granularity)),
                         ("flags", .array(b.flags.map { .string($0) }))])
            })))
        }
        m.append(("refcount-bits", .int(Int64(q.refcountBits))))
        if let e = q.encryptFormat { m.append(("encrypt", .object([("format", .string(e))]))) }
        if let v = q.corrupt { m.append(("corrupt", .bool(v))) }
        if let v = q.extendedL2 { m.append(("extended-l2", .bool(v))) }
        m.append(("compression-type", .string(q.compressionType)))
        return .object(m)
    }

    /// QAPI ImageInfo as QEMU's visitor prints it (member order kept).
    public var json: JSON {
        var m: [(String, JSON)] = [("filename", .string(filename)), ("format", .string(format)), ("dirty-flag", .bool(dirty))]
        if let a = actualSize { m.append(("actual-size", .int(a))) }
        m.append(("virtual-size", .int(virtualSize)))
        if let c = clusterSize { m.append(("cluster-size", .int(c))) }
        if encrypted { m.append(("encrypted", .bool(true))) }
        if let b = backingFilename { m.append(("backing-filename", .string(b))) }
        if let b = fullBackingFilename { m.append(("full-backing-filename", .string(b))) }
        if let b = backingFormat { m.append(("backing-filename-format", .string(b))) }
        if !snapshots.isEmpty {
            m.append(("snapshots", .array(snapshots.map { sn in
                var s: [(String, JSON)] = [
                    ("id", .string(sn.id)), ("name", .string(sn.name)), ("vm-state-size", .uint(sn.vmStateSize)),
                    ("date-sec", .int(Int64(sn.dateSec))), ("date-nsec", .int(Int64(sn.dateNsec))),
                    ("vm-clock-sec", .int(Int64(sn.vmClockNsec / 1_000_000_000))),
                    ("vm-clock-nsec", .int(Int64(sn.vmClockNsec % 1_000_000_000))),
                ]
                if let ic = sn.icount, ic != UInt64.max { s.append(("icount", .uint(ic))) }
                return .object(s)
            })))
        }
        if let f = formatSpecific { m.append(("format-specific", Self.json(f))) }
        return .object(m)
    }

    /// bdrv_image_info_dump: `qemu-img info`'s human output.
    public var human: String {
        var s = "image: \(filename)\nfile format: \(format)\n"
        s += "virtual size: \(humanSize(UInt64(virtualSize))) (\(virtualSize) bytes)\n"
        s += "disk size: \(actualSize.map { humanSize(UInt64($0)) } ?? "unavailable")\n"
        if encrypted { s += "encrypted: yes\n" }
        if let c = clusterSize { s += "cluster_size: \(c)\n" }
        if dirty { s += "cleanly shut down: no\n" }
        if let b = backingFilename {
            s += "backing file: \(b)"
            if let f = fullBackingFilename {
                if f != b { s += " (actual path: \(f))" }
            } else {
                s += " (cannot determine actual path)"
            }
            s += "\n"
            if let bf = backingFormat { s += "backing file format: \(bf)\n" }
        }
        if !snapshots.isEmpty {
            s += "Snapshot list:\n"
            s += snapshotHeader() + "\n"
            for sn in snapshots { s += snapshotLine(sn) + "\n" }
        }
        if let f = formatSpecific, case .object(let fs) = Self.json(f), let data = fs.first(where: { $0.0 == "data" })?.1 {
            s += "Format specific information:\n"
            s += dumpQObject(data, indent: 1)
        }
        return s
    }
}

/// The column titles of `qemu-img snapshot -l` and info's snapshot list.
public func snapshotHeader() -> String {
    pad("ID", 10, left: true) + pad("TAG", 17, left: true) + pad("VM SIZE", 8) + pad("DATE", 20) + pad("VM CLOCK", 13) + pad("ICOUNT", 11)
}

/// One snapshot as `qemu-img snapshot -l` lists it (bdrv_snapshot_dump;
/// the date in local time).
public func snapshotLine(_ sn: SnapshotInfo) -> String {
    var t = time_t(sn.dateSec)
    var tmv = tm()
    localtime_r(&t, &tmv)
    let date = cPrintf("%04d-%02d-%02d %02d:%02d:%02d", tmv.tm_year + 1900, tmv.tm_mon + 1, tmv.tm_mday, tmv.tm_hour, tmv.tm_min, tmv.tm_sec)
    let secs = sn.vmClockNsec / 1_000_000_000
    let clock = cPrintf("%02d:%02d:%02d.%03d", Int32(secs / 3600), Int32((secs / 60) % 60), Int32(secs % 60),
                        Int32((sn.vmClockNsec / 1_000_000) % 1000))
    let icount = sn.icount.map { $0 == UInt64.max ? "" : String($0) } ?? ""
    return pad(sn.id, 9, left: true) + " " + pad(sn.name, 16, left: true) + " " + pad(humanSize(sn.vmStateSize), 8)
        + pad(date, 20) + pad(clock, 13) + pad(icount, 11)
}

/// printf's %-Ns / %Ns.
public func pad(_ s: String, _ width: Int, left: Bool = false) -> String {
    let n = s.count
    if n >= width { return s }
    let fill = String(repeating: " ", count: width - n)
    return left ? s + fill : fill + s
}

/// QEMU's dump_qobject for "Format specific information" (QDict order,
/// dashes in keys become spaces).
func dumpQObject(_ v: JSON, indent: Int) -> String {
    var s = ""
    switch v {
    case .object(let members):
        for (k, val) in JSON.qdictOrder(members) {
            let composite: Bool
            switch val { case .object, .array: composite = true; default: composite = false }
            s += String(repeating: " ", count: indent * 4) + k.replacingDashes() + ":"
            s += composite ? "\n" : " "
            s += dumpQObject(val, indent: indent + 1)
            if !composite { s += "\n" }
        }
    case .array(let items):
        for (i, val) in items.enumerated() {
            let composite: Bool
            switch val { case .object, .array: composite = true; default: composite = false }
            s += String(repeating: " ", count: indent * 4) + "[\(i)]:" + (composite ? "\n" : " ")
            s += dumpQObject(val, indent: indent + 1)
            if !composite { s += "\n" }
        }
    case .string(let x): s += x
    case .int(let x): s += String(x)
    case .uint(let x): s += String(x)
    case .double(let x): s += cPrintf("%g", x)
    case .bool(let x): s += x ? "true" : "false"
    case .null: s += "null"
    }
    return s
}

extension String {
    func replacingDashes() -> String {
        String(map { $0 == "-" ? " " : $0 })
    }
}

/// QEMU's size_to_str: "196 KiB", "1 GiB", "1.5 GiB", "512 B".
public func humanSize(_ v: UInt64) -> String {
    let suffixes = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"]
    var e: Int32 = 0
    _ = frexp(Double(v) / (1000.0 / 1024.0), &e)
    let i = max(0, Int((e - 1) / 10))
    let div = Double(UInt64(1) << UInt64(i * 10))
    return cPrintf("%0.3g", Double(v) / div) + " " + suffixes[i] + "B"
}
