#if canImport(Glibc)
import Glibc
#endif
import BlockCore
import BlockGraph
import BlockIO
import BlockJobs
import LaminaJSON
import NBDServer
import ServerKit
import Synchronization

/// The composition root (QEMU's storage daemon main): the loops, the
/// block graph, the exports, the NBD server, the jobs and the event sink.
/// Command-line options and QMP commands both end in the methods here.
@ControlActor
public final class Daemon {
    public let loops: DaemonLoops
    /// Every node lives in the main loop's context (QEMU's main
    /// AioContext); its workers carry big transfers.
    public let graph: Graph
    let nbd: NBDServer
    private(set) var exports: ExportRegistry!
    private(set) var jobs: JobManager!
    /// Where events go (the QMP monitors); set by the QMP layer.
    public var eventSink: @Sendable (String, JSON?) -> Void = { _, _ in }
    /// Called once by `quit` after the reply went out.
    public var onQuit: @Sendable () -> Void = {}
    private var quitting = false

    public init(loops: DaemonLoops) {
        self.loops = loops
        self.graph = Graph(context: IOContext(executor: loops.main, workers: IOThreadPool(count: 4, name: "io-worker")))
        self.nbd = NBDServer(loops: loops)
        self.jobs = JobManager(graph: graph, defaultExecutor: loops.main) { [weak self] e in self?.jobEvent(e) }
        self.exports = ExportRegistry(
            graph: graph, nbd: nbd, loop: loops.main,
            onDeleted: { [weak self] id in
                self?.emit("BLOCK_EXPORT_DELETED", .object([("id", .string(id))]))
            })
        BlockDiagnostics.corruptionReporter.withLock {
            $0 = { [weak self] driver, message, fatal in
                Task { @ControlActor in self?.imageCorrupted(driver, message, fatal) }
            }
        }
        let registry = exports!
        nbd.onExportClosed = { name in
            Task { @ControlActor in await registry.exportClosed(nbdName: name) }
        }
    }

    /// BLOCK_IMAGE_CORRUPTED (no device names in a storage daemon) for the
    /// node whose driver reported it.
    func imageCorrupted(_ driver: any BlockDriver, _ message: String, _ fatal: Bool) {
        guard let rec = graph.all.first(where: { $0.node.driver === driver }) else { return }
        emit("BLOCK_IMAGE_CORRUPTED", .object([("device", .string("")), ("msg", .string(message)),
                                               ("node-name", .string(rec.name)), ("fatal", .bool(fatal))]))
    }

    func emit(_ event: String, _ data: JSON?) {
        eventSink(event, data)
    }

    private func jobEvent(_ e: JobEvent) {
        switch e {
        case .statusChange(let job, let status):
            emit("JOB_STATUS_CHANGE", .object([("id", .string(job.id)), ("status", .string(status.rawValue))]))
        case .pending, .ready, .completed, .cancelled, .ioError:
            // BLOCK_JOB_* events, for block jobs only.
            blockJobEvent(e)
        }
    }

    // MARK: - Graph

    func blockdevAdd(_ o: BlockdevOptions) async throws(BlockError) {
        _ = try await NodeOpener.add(o, graph: graph)
    }

    func blockdevDel(_ name: String) async throws(BlockError) {
        guard let rec = graph.find(name) else {
            throw BlockError(.notFound, errno: ENOENT, "Failed to find node with node-name='\(name)'")
        }
        // QEMU's qmp_blockdev_del: a block backend, then op blockers
        // (the newest speaks: a job's, a backing link's), monitor
        // ownership, other references.
        if rec.node.hasBackend {
            throw BlockError(.busy, errno: EBUSY, "Node \(name) is in use")
        }
        try rec.node.checkOp(.driveDel)
        if !rec.monitorOwned {
            throw BlockError.invalid("Node \(name) is not owned by the monitor")
        }
        if rec.node.referenceCount > 1 {
            throw BlockError(.busy, errno: EBUSY, "Block device \(name) is in use")
        }
        rec.monitorOwned = false
        var failure: BlockError?
        do throws(BlockError) {
            try await rec.node.close()
        } catch {
            failure = error
        }
        graph.sweepClosed()
        graph.refreshAll()
        if let f = failure { throw f }
    }

    // MARK: - Jobs

    func blockdevCreate(jobID: String, options: CreateOptions) throws(BlockError) {
        let graph = self.graph
        let work = options.createFunction { name in await MainActorless.lookup(graph, name) }
        let job = try jobs.create(id: jobID, driver: CreateJob(work), autoFinalize: true, autoDismiss: false,
                                  executor: loops.main)
        jobs.start(job)
    }

    func jobInfo(_ job: Job) -> JSON {
        let p = job.progress
        var m: [(String, JSON)] = [
            ("id", .string(job.id)), ("type", .string(job.type.rawValue)), ("status", .string(job.status.rawValue)),
            ("current-progress", .uint(p.current)), ("total-progress", .uint(p.total)),
        ]
        if let e = job.error { m.append(("error", .string(e))) }
        return .object(m)
    }

    func findJob(_ id: String) throws(BlockError) -> Job {
        guard let j = jobs.job(id) else {
            throw BlockError(.notFound, errno: ENOENT, "Job not found")
        }
        return j
    }

    // MARK: - Shutdown

    /// quit (QMP) and SIGTERM/SIGINT: shut down cleanly, then `onQuit`.
    public func quit() async {
        await shutdown()
        onQuit()
    }

    /// quit: stop serving, then flush and close every node (children last).
    public func shutdown() async {
        if quitting { return }
        quitting = true
        await jobs.cancelAllAndWait()
        await exports.removeAll()
        await nbd.stop()
        for rec in graph.all where rec.monitorOwned {
            rec.monitorOwned = false
            try? await rec.node.close()
        }
        // Top layers nobody added by name (a snapshot's overlay) close too,
        // and with them the chains they hold.
        graph.sweepClosed()
        for rec in graph.all where !rec.node.isClosed && graph.nodeParents(of: rec.node).isEmpty {
            try? await rec.node.close()
        }
        // Anything still open (nodes kept by other references) is flushed too.
        for rec in graph.all where !rec.node.isClosed {
            try? await rec.node.flush()
        }
        graph.sweepClosed()
        graph.context?.shutdown()
    }
}

/// Node lookup from a job body: hops to the control actor.
enum MainActorless {
    @ControlActor static func lookup(_ graph: Graph, _ name: String) -> BlockNode? {
        graph.find(name)?.node
    }
}
