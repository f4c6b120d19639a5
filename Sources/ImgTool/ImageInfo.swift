#if canImport(Glibc)
import Glibc
#endif
import BlockCore
import BlockDrivers
import BlockGraph
import LaminaJSON
import FileDriver
import Qcow2

/// QEMU's ImageInfo for one node, collected from the block layer.
public struct ImageInfo: Sendable {
    var filename: String
    var format: String
    var dirty: Bool
    var actualSize: Int64?
    var virtualSize: Int64
    var clusterSize: Int64?
    var encrypted = false
    var backingFilename: String?
    var fullBackingFilename: String?
    var backingFormat: String?
    var snapshots: [Qcow2Snapshot] = []
    var formatSpecific: JSON?

    public static func collect(_ node: BlockNode) async -> ImageInfo {
        var info = ImageInfo(filename: node.filename, format: node.formatName, dirty: false,
                             actualSize: nil, virtualSize: node.length)
        if let f = node.file?.driver as? any HostBackedDriver {
            info.actualSize = try? f.allocatedBytes()
        } else if let f = node.driver as? any HostBackedDriver {
            info.actualSize = try? f.allocatedBytes()
        }
        if let q = node.driver as? Qcow2Image {
            let h = await q.currentHeader()
            info.clusterSize = Int64(h.clusterSize)
            info.dirty = h.isDirty
            info.encrypted = h.cryptMethod != 0
            if let b = h.backingFile, !b.isEmpty {
                info.backingFilename = b
                info.fullBackingFilename = ImageOpener.resolveBackingPath(b, overlay: node.filename)
                info.backingFormat = h.backingFormat
            }
            info.snapshots = await q.snapshotList()
            info.formatSpecific = .object([("type", .string("qcow2")), ("data", await qcow2Specific(q, h))])
        }
        return info
    }

    static func qcow2Specific(_ q: Qcow2Image, _ h: Qcow2Header) async -> JSON {
        var m: [(String, JSON)] = []
        if h.version == 2 {
            m.append(("compat", .string("0.10")))
            m.append(("refcount-bits", .int(Int64(h.refcountBits))))
            m.append(("compression-type", .string(CompressionType(rawValue: h.compressionType)?.name ?? "zlib")))
            return .object(m)
        }
        m.append(("compat", .string("1.1")))
        let bitmaps = await q.bitmapList()
        m.append(("lazy-refcounts", .bool(h.lazyRefcounts)))
        if !bitmaps.isEmpty {
            var list: [JSON] = []
            for b in bitmaps {
                var flags: [JSON] = []
                if b.inUse { flags.append(.string("in-use")) }
                if b.isAuto { flags.append(.string("auto")) }
                list.append(.object([("name", .string(b.name)), ("granularity", .uint(b.granularity)), ("flags", .array(flags))]))
            }
            m.append(("bitmaps", .array(list)))
        }
        m.append(("refcount-bits", .int(Int64(h.refcountBits))))
        if h.cryptMethod == 1 {
            m.append(("encrypt", .object([("format", .string("aes"))])))
        } else if h.cryptMethod == 2 {
            m.append(("encrypt", .object([("format", .string("luks"))])))
        }
        m.append(("corrupt", .bool(h.isCorrupt)))
        m.append(("extended-l2", .bool(h.extendedL2)))
        m.append(("compression-type", .string(CompressionType(rawValue: h.compressionType)?.name ?? "zlib")))
        return .object(m)
    }

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
        if let f = formatSpecific { m.append(("format-specific", f)) }
        return .object(m)
    }

    /// bdrv_image_info_dump.
    var human: String {
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
        if case .object(let fs)? = formatSpecific, let data = fs.first(where: { $0.0 == "data" })?.1 {
            s += "Format specific information:\n"
            s += dumpQObject(data, indent: 1)
        }
        return s
    }
}

func snapshotHeader() -> String {
    pad("ID", 10, left: true) + pad("TAG", 17, left: true) + pad("VM SIZE", 8) + pad("DATE", 20) + pad("VM CLOCK", 13) + pad("ICOUNT", 11)
}

func snapshotLine(_ sn: Qcow2Snapshot) -> String {
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
func pad(_ s: String, _ width: Int, left: Bool = false) -> String {
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
