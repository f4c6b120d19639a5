import BlockCore
import BlockGraph
import BlockJobs
import LaminaJSON
import QMP
import Qcow2

/// One QMP command: decodes its arguments with the QAPI visitor, then
/// calls the daemon. Runs on the control actor.
typealias CommandHandler = @ControlActor (Daemon, QAPIInput) async throws(QMPError) -> JSON

/// The daemon's QMP command table (QEMU's command registry for
/// qemu-storage-daemon, restricted to what Lamina implements).
@ControlActor
enum Commands {
    static let table: [(String, CommandHandler)] = [
        ("query-version", { d, a throws(QMPError) in try a.finish(); return d.versionJSON }),
        ("query-commands", { d, a throws(QMPError) in
            try a.finish()
            // QEMU lists commands newest-registered first.
            return .array((["qmp_capabilities"] + names).reversed().map { .object([("name", .string($0))]) })
        }),
        ("quit", { d, a throws(QMPError) in try a.finish(); return .emptyObject }),
        ("blockdev-add", { d, a throws(QMPError) in
            let o = try BlockdevOptions.parse(a)
            try a.finish()
            try await qmp { () async throws(BlockError) in try await d.blockdevAdd(o) }
            return .emptyObject
        }),
        ("blockdev-del", { d, a throws(QMPError) in
            let name = try a.string("node-name")
            try a.finish()
            try await qmp { () async throws(BlockError) in try await d.blockdevDel(name) }
            return .emptyObject
        }),
        ("blockdev-create", { d, a throws(QMPError) in
            let id = try a.string("job-id")
            let o = try a.object("options") { (o: QAPIInput) throws(QMPError) in try parseCreateOptions(o) }
            try a.finish()
            try await qmp { () async throws(BlockError) in try d.blockdevCreate(jobID: id, options: o) }
            return .emptyObject
        }),
        ("blockdev-snapshot", { d, a throws(QMPError) in
            let action = try SnapshotAction.parseSnapshot(a)
            try await qmp { () async throws(BlockError) in try await d.snapshotTransaction([action]) }
            return .emptyObject
        }),
        ("blockdev-snapshot-sync", { d, a throws(QMPError) in
            let action = try SnapshotAction.parseSync(a)
            try await qmp { () async throws(BlockError) in try await d.snapshotTransaction([action]) }
            return .emptyObject
        }),
        ("transaction", { d, a throws(QMPError) in
            let actions = try a.list("actions") { (v: QAPIValue) throws(QMPError) in
                try SnapshotAction.parseTransactionAction(v)
            }
            _ = try a.optionalObject("properties") { (p: QAPIInput) throws(QMPError) in
                _ = try p.optionalEnumValue("completion-mode", allowed: ["individual", "grouped"])
                try p.finish()
            }
            try a.finish()
            try await qmp { () async throws(BlockError) in try await d.snapshotTransaction(actions) }
            return .emptyObject
        }),
        ("query-named-block-nodes", { d, a throws(QMPError) in
            let flat = try a.optionalBool("flat") ?? false
            try a.finish()
            var out: [JSON] = []
            for rec in d.graph.all { out.append(await NodeInfo.blockDeviceInfo(rec, graph: d.graph, flat: flat)) }
            return .array(out)
        }),
        ("x-debug-query-block-graph", { d, a throws(QMPError) in
            try a.finish()
            return NodeInfo.graphJSON(d.graph)
        }),
        ("query-jobs", { d, a throws(QMPError) in
            try a.finish()
            return .array(d.jobs.jobs.map { d.jobInfo($0) })
        }),
        ("job-dismiss", jobVerb { d, j throws(BlockError) in try await d.jobs.dismiss(j) }),
        ("job-finalize", jobVerb { d, j throws(BlockError) in try await d.jobs.finalize(j) }),
        ("job-pause", jobVerb { d, j throws(BlockError) in try await d.jobs.pause(j) }),
        ("job-resume", jobVerb { d, j throws(BlockError) in try await d.jobs.resume(j) }),
        ("job-complete", jobVerb { d, j throws(BlockError) in try d.jobs.complete(j) }),
        // QEMU's job-cancel is a forced cancel (block-job-cancel has force=false).
        ("job-cancel", jobVerb { d, j throws(BlockError) in try await d.jobs.cancel(j, force: true) }),
    ] + ExportCommands.table + BlockJobCommands.table

    static var names: [String] { table.map(\.0) }

    static func handler(_ name: String) -> CommandHandler? {
        table.first { $0.0 == name }?.1
    }

    /// Runs a block-layer operation, translating its error at the boundary.
    static func qmp(_ body: () async throws(BlockError) -> Void) async throws(QMPError) {
        do throws(BlockError) {
            try await body()
        } catch {
            throw QMPError(.genericError, qmpDescription(error))
        }
    }

    /// QEMU's QMP errors carry no hints (they go to human monitors only):
    /// Lamina keeps hints after a newline in its messages, so cut there.
    static func qmpDescription(_ e: BlockError) -> String {
        String(e.message.split(separator: "\n", maxSplits: 1, omittingEmptySubsequences: false).first ?? "")
    }

    static func jobVerb(_ verb: @escaping @ControlActor (Daemon, Job) async throws(BlockError) -> Void) -> CommandHandler {
        { d, a throws(QMPError) in
            let id = try a.string("id")
            try a.finish()
            try await qmp { () async throws(BlockError) in
                let j = try d.findJob(id)
                try await verb(d, j)
            }
            return .emptyObject
        }
    }

    /// QAPI BlockdevCreateOptions (file and qcow2).
    static func parseCreateOptions(_ a: QAPIInput) throws(QMPError) -> CreateOptions {
        let driver = try a.string("driver")
        switch driver {
        case "file":
            let filename = try a.string("filename")
            let size = try a.size("size")
            let prealloc = try a.optionalEnumValue("preallocation", as: Preallocation.self) ?? .off
            _ = try a.optionalBool("nocow")
            _ = try a.optionalSize("extent-size-hint")
            return .file(filename: filename, size: Int64(clamping: size), preallocation: prealloc)
        case "qcow2":
            let file = try BlockdevOptions.parseRef(a.required("file"))
            if a.has("data-file") { throw QMPError("qcow2: external data files are not supported by Lamina") }
            _ = try a.optionalBool("data-file-raw")
            var o = Qcow2CreateOptions()
            o.extendedL2 = try a.optionalBool("extended-l2") ?? false
            o.size = Int64(clamping: try a.size("size"))
            if let v = try a.optionalEnumValue("version", allowed: ["v2", "v3"]) { o.version = v == "v2" ? 2 : 3 }
            o.backingFile = try a.optionalString("backing-file")
            o.backingFormat = try a.optionalEnumValue("backing-fmt", allowed: Array(BlockdevOptions.qemuDrivers))
            if a.has("encrypt") { throw QMPError("qcow2: encryption is not supported by Lamina") }
            if let c = try a.optionalSize("cluster-size") { o.clusterSize = Int(clamping: c) }
            o.preallocation = try a.optionalEnumValue("preallocation", as: Preallocation.self) ?? .off
            o.lazyRefcounts = try a.optionalBool("lazy-refcounts") ?? false
            if let r = try a.optionalInteger("refcount-bits", as: Int64.self) { o.refcountBits = Int(r) }
            if let c = try a.optionalEnumValue("compression-type", allowed: ["zlib", "zstd"]) {
                o.compressionType = c == "zstd" ? .zstd : .zlib
            }
            return .qcow2(file: file, options: o)
        default:
            if BlockdevOptions.qemuDrivers.contains(driver) {
                throw QMPError("Driver '\(driver)' does not support blockdev-create in Lamina (supported: file, qcow2)")
            }
            throw QMPError.invalidEnumValue("driver", driver)
        }
    }
}

extension Daemon {
    /// query-version: QEMU 7.2 compatibility level, Lamina as the package.
    var versionJSON: JSON {
        .object([
            ("qemu", .object([("major", .int(7)), ("minor", .int(2)), ("micro", .int(0))])),
            ("package", .string("Lamina \(laminaVersion)")),
        ])
    }
}

public let laminaVersion = "0.3.0"
