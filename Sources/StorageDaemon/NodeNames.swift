import BlkdebugDriver
import BlockCore
import BlockGraph
import LaminaJSON

/// QEMU's node file names (bdrv_refresh_filename): a plain file name when
/// the node's options can be told from it, else a "json:{...}" name with
/// the options.
extension Graph {
    /// The node's options as QEMU's json: filenames embed them.
    func fullOptions(_ node: BlockNode) -> JSON {
        if let d = node.driver as? BlkdebugDriver { return blkdebugFullOptions(node, d) }
        if let j = entry(node)?.jsonFilename, j.hasPrefix("json:"), let v = try? JSON.parse(String(j.dropFirst(5))) {
            return Self.reinserted(v)
        }
        if node.filename.hasPrefix("json:"), let v = try? JSON.parse(String(node.filename.dropFirst(5))) {
            return Self.reinserted(v)
        }
        if node.formatName == "file" {
            return .object([("driver", .string("file")), ("filename", .string(node.filename))])
        }
        if let f = node.file, f !== node {
            return .object([("driver", .string(node.formatName)), ("file", fullOptions(f))])
        }
        return .object([("driver", .string(node.formatName)), ("filename", .string(node.filename))])
    }

    /// Options read back from a printed json: name: QEMU printed each
    /// dictionary in iteration order, newest member first within a hash
    /// bucket, so the members are inserted again in reverse for the
    /// printer to give that order back.
    static func reinserted(_ j: JSON) -> JSON {
        switch j {
        case .object(let m): return .object(m.reversed().map { ($0.0, reinserted($0.1)) })
        case .array(let a): return .array(a.map(reinserted))
        default: return j
        }
    }

    /// The name of a format node (qcow2, raw) over `file` as QEMU's
    /// bdrv_refresh_filename derives it when nothing else overrides it:
    /// the file's own name if it is plain, else "json:" with the format
    /// and the file's options. Nil when it is the file's plain file name.
    func formatDisplayName(format: String, file: BlockNode) -> String? {
        let name = displayFilename(file)
        if name == file.filename { return nil }
        if !name.hasPrefix("json:") { return name }
        return "json:" + JSON.object([("driver", .string(format)), ("file", fullOptions(file))]).compact
    }

    /// The json: name of a qcow2 node whose backing is not the one its
    /// header names: every option in it.
    func jsonFilename(_ node: BlockNode, file: BlockNode, backing: JSON) -> String {
        "json:" + JSON.object([("backing", backing), ("driver", .string("qcow2")),
                               ("file", fullOptions(file))]).compact
    }
}
