#if canImport(Glibc)
import Glibc
#endif
import BlockCore
import BlockDrivers
import BlockGraph
import BlockInfo
import RawDriver

/// `snapshot [-U] [-q] [-l | -a snapshot | -c snapshot | -d snapshot] filename`
/// (qemu-img 7.2 has no -f here: the format is always probed).
enum SnapshotCommand {
    enum Action { case none, list, apply(String), create(String), delete(String) }

    static func run(_ args: [String], _ ctx: ToolContext) async throws(ToolError) -> Int32 {
        let opts = try ctx.parse(args, short: ":la:c:d:hqU", long: [
            .init(name: "help", hasArgument: false, key: "h"),
            .init(name: "object", hasArgument: true, key: "object"),
            .init(name: "image-opts", hasArgument: false, key: "image-opts"),
            .init(name: "force-share", hasArgument: false, key: "U"),
        ])
        var action = Action.none
        var forceShare = false
        for (k, v) in opts.options {
            switch k {
            case "h": outln(LaminaImg.helpText(ctx.progName)); return 0
            case "l", "a", "c", "d":
                if case .none = action {} else { throw ctx.usage("Cannot mix '-l', '-a', '-c', '-d'") }
                switch k {
                case "l": action = .list
                case "a": action = .apply(v!)
                case "c": action = .create(v!)
                default: action = .delete(v!)
                }
            case "U": forceShare = true
            default: break
            }
        }
        guard opts.operands.count == 1 else { throw ctx.usage("Expecting one image file name") }
        let filename = opts.operands[0]
        var readOnly = false
        if case .list = action { readOnly = true }
        if forceShare && !readOnly {
            throw ctx.fail("Could not open '\(filename)': force-share=on can only be used with read-only images")
        }
        let node = try await openImage(filename, format: nil, readOnly: readOnly, forceShare: forceShare)
        let snapshots = node.driver as? any InternalSnapshots
        var failure: ToolError?
        switch action {
        case .none:
            break
        case .list:
            if let q = snapshots {
                let list = await q.listSnapshots()
                if !list.isEmpty {
                    var s = "Snapshot list:\n" + snapshotHeader() + "\n"
                    for sn in list { s += snapshotLine(sn) + "\n" }
                    out(s)
                }
            }
        case .create(let name):
            var tv = timeval()
            gettimeofday(&tv, nil)
            if let q = snapshots {
                do throws(BlockError) {
                    try await q.createSnapshot(SnapshotInfo(id: "", name: name, vmStateSize: 0,
                                                            dateSec: UInt32(truncatingIfNeeded: tv.tv_sec),
                                                            dateNsec: UInt32(tv.tv_usec) * 1000, vmClockNsec: 0, icount: 0))
                } catch {
                    failure = ctx.fail("Could not create snapshot '\(name)': -\(error.errno) (\(errnoText(error.errno)))")
                }
            } else {
                failure = ctx.fail("Could not create snapshot '\(name)': -95 (\(errnoText(95)))")
            }
        case .apply(let name):
            if let q = snapshots {
                // QEMU refuses while the node has dirty bitmaps (here: the
                // persistent ones the image carries).
                if let b = node.driver as? any PersistentBitmaps, await !b.persistentBitmaps().isEmpty {
                    failure = ctx.fail("Could not apply snapshot '\(name)': Device has active dirty bitmaps")
                } else {
                    do throws(BlockError) {
                        try await q.applySnapshot(name)
                    } catch {
                        failure = ctx.fail("Could not apply snapshot '\(name)': " + applyMessage(error))
                    }
                }
            } else {
                // QEMU closes and reopens the raw node around its failed
                // fallback, which repeats the probing warning.
                if isProbedRaw(node) {
                    FileHandleStderr.write("""
                        WARNING: Image format was not specified for '\(filename)' and probing guessed raw.
                                 Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.
                                 Specify the 'raw' format explicitly to remove the restrictions.

                        """)
                }
                failure = ctx.fail("Could not apply snapshot '\(name)': Block driver does not support snapshots")
            }
        case .delete(let name):
            // bdrv_snapshot_find: by name only; then deleted by id and name.
            if let q = snapshots, let sn = await q.listSnapshots().first(where: { $0.name == name }) {
                do throws(BlockError) {
                    try await q.deleteSnapshot(id: sn.id, name: sn.name)
                } catch {
                    failure = ctx.fail("Could not delete snapshot '\(name)': " + error.message)
                }
            } else {
                failure = ctx.fail("Could not delete snapshot '\(name)': snapshot not found")
            }
        }
        do throws(BlockError) {
            try await node.close()
        } catch {
            if failure == nil { failure = ctx.fail(error.message) }
        }
        if let f = failure { throw f }
        return 0
    }

    /// bdrv_snapshot_goto's wording: the driver's errno as "Failed to load
    /// snapshot: <strerror>"; a bad snapshot L1 table is reported by the
    /// driver itself first.
    static func applyMessage(_ e: BlockError) -> String {
        if e.message.hasPrefix("Snapshot L1 table") {
            FileHandleStderr.write("\(ProgName.current): \(e.message)\n")
        }
        return "Failed to load snapshot: " + errnoText(e.errno)
    }

    static func isProbedRaw(_ node: BlockNode) -> Bool {
        (node.driver as? RawDriver)?.probed ?? false
    }

    static func errnoText(_ e: Int32) -> String {
        String(cString: strerror(e))
    }
}

/// `convert -l` / `measure -l`: `snapshot.id=ID,snapshot.name=NAME` (either
/// or both) or a plain ID_OR_NAME.
struct SnapshotParam {
    var id: String?
    var name: String?
    var idOrName: String?

    static func parse(_ s: String) throws(ToolError) -> SnapshotParam {
        guard s.hasPrefix("snapshot.") else { return SnapshotParam(idOrName: s) }
        var p = SnapshotParam()
        for part in s.split(separator: ",", omittingEmptySubsequences: false) {
            guard let eq = part.firstIndex(of: "=") else {
                FileHandleStderr.write("\(ProgName.current): warning: short-form boolean option '\(part)' deprecated\nPlease use \(part)=on instead\n")
                FileHandleStderr.write("\(ProgName.current): Invalid parameter '\(part)'\n")
                throw ToolError(message: "Failed in parsing snapshot param '\(s)'")
            }
            let key = part[..<eq]
            let value = String(part[part.index(after: eq)...])
            switch key {
            case "snapshot.id": p.id = value
            case "snapshot.name": p.name = value
            default:
                FileHandleStderr.write("\(ProgName.current): Invalid parameter '\(key)'\n")
                throw ToolError(message: "Failed in parsing snapshot param '\(s)'")
            }
        }
        return p
    }

    /// QEMU's bdrv_snapshot_load_tmp(_by_id_or_name), reported as
    /// "Failed to load snapshot: ...".
    func load(_ node: BlockNode) async throws(ToolError) {
        guard let q = node.driver as? any InternalSnapshots else {
            throw ToolError(message: "Failed to load snapshot: Block format '\(node.formatName)' used by device '' does not support temporarily loading internal snapshots")
        }
        do throws(BlockError) {
            if let both = idOrName {
                do throws(BlockError) {
                    try await q.loadSnapshotTemporarily(id: both, name: nil)
                } catch where error.errno == 2 {
                    try await q.loadSnapshotTemporarily(id: nil, name: both)
                }
            } else {
                try await q.loadSnapshotTemporarily(id: id, name: name)
            }
        } catch {
            throw ToolError(message: "Failed to load snapshot: " + error.message)
        }
    }
}
