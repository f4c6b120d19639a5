#if canImport(Glibc)
import Glibc
#endif
import BlockCore
import BlockGraph
import BlockIO
import BlockJobs
import BlockCopy
import LaminaJSON
import QMP

/// QAPI block-stream arguments.
struct StreamArgs: Sendable {
    var jobID: String?
    var device: String
    var base: String?
    var baseNode: String?
    var backingFile: String?
    var bottom: String?
    var filterNodeName: String?
    var speed: Int64 = 0
    var onError: BlockdevOnError = .report
    var autoFinalize = true
    var autoDismiss = true

    static func parse(_ a: QAPIInput) throws(QMPError) -> StreamArgs {
        var s = StreamArgs(device: "")
        s.jobID = try a.optionalString("job-id")
        s.device = try a.string("device")
        s.base = try a.optionalString("base")
        s.baseNode = try a.optionalString("base-node")
        s.backingFile = try a.optionalString("backing-file")
        s.bottom = try a.optionalString("bottom")
        s.speed = try a.optionalInt64("speed") ?? 0
        s.onError = try a.optionalEnumValue("on-error", as: BlockdevOnError.self) ?? .report
        s.filterNodeName = try a.optionalString("filter-node-name")
        s.autoFinalize = try a.optionalBool("auto-finalize") ?? true
        s.autoDismiss = try a.optionalBool("auto-dismiss") ?? true
        try a.finish()
        return s
    }
}

/// QAPI block-commit arguments.
struct CommitArgs: Sendable {
    var jobID: String?
    var device: String
    var base: String?
    var baseNode: String?
    var top: String?
    var topNode: String?
    var backingFile: String?
    var filterNodeName: String?
    var speed: Int64 = 0
    var onError: BlockdevOnError = .report
    var autoFinalize = true
    var autoDismiss = true

    static func parse(_ a: QAPIInput) throws(QMPError) -> CommitArgs {
        var c = CommitArgs(device: "")
        c.jobID = try a.optionalString("job-id")
        c.device = try a.string("device")
        c.baseNode = try a.optionalString("base-node")
        c.base = try a.optionalString("base")
        c.topNode = try a.optionalString("top-node")
        c.top = try a.optionalString("top")
        c.backingFile = try a.optionalString("backing-file")
        c.speed = try a.optionalInt64("speed") ?? 0
        c.onError = try a.optionalEnumValue("on-error", as: BlockdevOnError.self) ?? .report
        c.filterNodeName = try a.optionalString("filter-node-name")
        c.autoFinalize = try a.optionalBool("auto-finalize") ?? true
        c.autoDismiss = try a.optionalBool("auto-dismiss") ?? true
        try a.finish()
        return c
    }
}

/// The block-job QMP commands: block-stream, block-commit,
/// query-block-jobs and the block-job-* verbs.
@ControlActor
enum BlockJobCommands {
    static let table: [(String, CommandHandler)] = [
        ("block-stream", { d, a throws(QMPError) in
            let args = try StreamArgs.parse(a)
            try await Commands.qmp { () async throws(BlockError) in try await d.blockStream(args) }
            return .emptyObject
        }),
        ("block-commit", { d, a throws(QMPError) in
            let args = try CommitArgs.parse(a)
            try await d.blockCommit(args)
            return .emptyObject
        }),
        ("query-block-jobs", { d, a throws(QMPError) in
            try a.finish()
            return .array(d.jobs.blockJobs.map { d.blockJobInfo($0) })
        }),
        ("block-job-set-speed", { d, a throws(QMPError) in
            let device = try a.string("device")
            let speed = try a.int64("speed")
            try a.finish()
            let j = try d.findBlockJob(device)
            try await Commands.qmp { () async throws(BlockError) in
                try d.jobs.setSpeed(j, UInt64(clamping: max(0, speed)), negative: speed < 0)
            }
            return .emptyObject
        }),
        ("block-job-cancel", { d, a throws(QMPError) in
            let device = try a.string("device")
            let force = try a.optionalBool("force") ?? false
            try a.finish()
            let j = try d.findBlockJob(device)
            try await Commands.qmp { () async throws(BlockError) in try await d.jobs.cancel(j, force: force) }
            return .emptyObject
        }),
        ("block-job-pause", blockJobVerb("device") { d, j throws(BlockError) in try await d.jobs.pause(j) }),
        ("block-job-resume", blockJobVerb("device") { d, j throws(BlockError) in try await d.jobs.resume(j) }),
        ("block-job-complete", blockJobVerb("device") { d, j throws(BlockError) in try d.jobs.complete(j) }),
        ("block-job-finalize", blockJobVerb("id") { d, j throws(BlockError) in try await d.jobs.finalize(j) }),
        ("block-job-dismiss", blockJobVerb("id") { d, j throws(BlockError) in try await d.jobs.dismiss(j) }),
    ]

    static func blockJobVerb(_ key: String,
                             _ verb: @escaping @ControlActor (Daemon, Job) async throws(BlockError) -> Void) -> CommandHandler {
        { d, a throws(QMPError) in
            let id = try a.string(key)
            try a.finish()
            let j = try d.findBlockJob(id)
            try await Commands.qmp { () async throws(BlockError) in try await verb(d, j) }
            return .emptyObject
        }
    }
}

extension Daemon {
    /// QEMU's find_block_job: block jobs only, DeviceNotActive otherwise.
    func findBlockJob(_ id: String) throws(QMPError) -> Job {
        guard let j = jobs.job(id), j.block != nil else {
            throw QMPError(.deviceNotActive, "Block job '\(id)' not found")
        }
        return j
    }

    /// QAPI BlockJobInfo.
    func blockJobInfo(_ job: Job) -> JSON {
        let p = job.progress
        var m: [(String, JSON)] = [
            ("type", .string(job.type.rawValue)), ("device", .string(job.id)),
            ("len", .uint(p.total)), ("offset", .uint(p.current)),
            ("busy", .bool(job.isBusy)), ("paused", .bool(job.pauseRequested)),
            ("speed", .uint(job.speed)), ("io-status", .string(job.ioStatus)),
            ("ready", .bool(job.isReady)), ("status", .string(job.status.rawValue)),
            ("auto-finalize", .bool(job.autoFinalize)), ("auto-dismiss", .bool(job.autoDismiss)),
        ]
        if let e = job.error { m.append(("error", .string(e))) }
        return .object(m)
    }

    /// The data of BLOCK_JOB_COMPLETED / _CANCELLED / _READY.
    func blockJobEventData(_ job: Job, error: Bool) -> JSON {
        let p = job.progress
        var m: [(String, JSON)] = [
            ("type", .string(job.type.rawValue)), ("device", .string(job.id)),
            ("len", .uint(p.total)), ("offset", .uint(p.current)), ("speed", .uint(job.speed)),
        ]
        if error, let e = job.error { m.append(("error", .string(e))) }
        return .object(m)
    }

    func blockJobEvent(_ e: JobEvent) {
        switch e {
        case .statusChange:
            break
        case .pending(let job):
            guard job.block != nil else { return }
            emit("BLOCK_JOB_PENDING", .object([("type", .string(job.type.rawValue)), ("id", .string(job.id))]))
        case .ready(let job):
            guard job.block != nil else { return }
            emit("BLOCK_JOB_READY", blockJobEventData(job, error: false))
        case .completed(let job):
            guard job.block != nil else { return }
            emit("BLOCK_JOB_COMPLETED", blockJobEventData(job, error: true))
        case .cancelled(let job):
            guard job.block != nil else { return }
            // A failure (not a cancel) is reported as COMPLETED with its error.
            if job.isCancelled {
                emit("BLOCK_JOB_CANCELLED", blockJobEventData(job, error: false))
            } else {
                emit("BLOCK_JOB_COMPLETED", blockJobEventData(job, error: true))
            }
        case .ioError(let job, let operation, let action):
            emit("BLOCK_JOB_ERROR", .object([("device", .string(job.id)), ("operation", .string(operation)),
                                              ("action", .string(action.rawValue))]))
        }
    }

    // MARK: - Lookups shared by stream and commit

    /// QEMU's bdrv_lookup_bs(NULL, name): node names only.
    func lookupNodeName(_ name: String) throws(BlockError) -> BlockNode {
        guard let rec = graph.find(name) else {
            throw BlockError(.notFound, errno: ENOENT, "Cannot find device='' nor node-name='\(name)'")
        }
        return rec.node
    }

    /// Whether `node` is `bs` or below it in its backing chain.
    static func chainContains(_ bs: BlockNode, _ node: BlockNode) -> Bool {
        var n: BlockNode? = bs
        while let c = n {
            if c === node { return true }
            n = c.filterOrBacking
        }
        return false
    }

    /// QEMU's bdrv_find_backing_image: the node below the layer whose
    /// backing file is `name` (resolved against that layer's directory and
    /// compared as real paths; a layer whose backing was given by node
    /// name compares with the backing node's file name).
    func findBackingImage(_ bs: BlockNode, _ name: String) -> BlockNode? {
        var cur = bs
        while let below = cur.backing {
            defer { cur = below }
            if graph.entry(cur)?.jsonFilename != nil {
                if name == graph.displayFilename(below) { return below }
                continue
            }
            let header = (cur.driver as? any BackingDriver)?.backingFileName ?? graph.displayFilename(below)
            let dir = Self.directory(of: cur.filename)
            guard let wanted = Self.realPath(name.hasPrefix("/") ? name : dir + name),
                  let actual = Self.realPath(header.hasPrefix("/") ? header : dir + header) else { continue }
            if wanted == actual { return below }
        }
        return nil
    }

    static func directory(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "" }
        return String(path[...slash])
    }

    static func realPath(_ path: String) -> String? {
        guard let p = realpath(path, nil) else { return nil }
        defer { free(p) }
        return String(cString: p)
    }

    /// QEMU's bdrv_is_root_node: only block backends use the node.
    static func isRootNode(_ node: BlockNode) -> Bool {
        node.parents.allSatisfy { $0.parent is BlockBackend }
    }
}
