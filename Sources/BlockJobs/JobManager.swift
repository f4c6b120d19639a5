#if canImport(Glibc)
import Glibc
#endif
import BlockCore
import BlockCopy
import BlockGraph
import BlockIO
import Synchronization

/// The job registry and the lifecycle driver (QEMU's job.c): creation,
/// start, verbs, completion through waiting/pending/concluded, dismissal.
/// Every method runs on the control actor.
@ControlActor
public final class JobManager: Sendable {
    /// Newest first (QEMU inserts at the head of its job list).
    public private(set) var jobs: [Job] = []
    private let sink: @Sendable @ControlActor (JobEvent) -> Void

    /// The graph block jobs hold edges in.
    public let graph: Graph?
    /// Where jobs whose nodes have no home context run.
    public let defaultExecutor: any TaskExecutor

    public init(graph: Graph? = nil, defaultExecutor: any TaskExecutor,
                sink: @escaping @Sendable @ControlActor (JobEvent) -> Void) {
        self.graph = graph
        self.defaultExecutor = defaultExecutor
        self.sink = sink
    }

    public func job(_ id: String) -> Job? { jobs.first { $0.id == id } }

    func emit(_ e: JobEvent) { sink(e) }

    func transition(_ job: Job, to s1: JobStatus) {
        let s0 = job.status
        precondition(JobTables.canTransition(from: s0, to: s1), "job \(job.id): illegal transition \(s0) -> \(s1)")
        job.shared.withLock { $0.status = s1 }
        if s0 != s1 { sink(.statusChange(job, s1)) }
    }

    /// QEMU's id_wellformed: a letter, then letters, digits, '-', '.', '_'.
    public static func isWellFormedID(_ id: String) -> Bool {
        guard let first = id.unicodeScalars.first, first.isASCIILetter else { return false }
        return id.unicodeScalars.allSatisfy { $0.isASCIILetter || ("0"..."9").contains($0) || $0 == "-" || $0 == "." || $0 == "_" }
    }

    /// Creates a job in state `created` (QEMU's job_create).
    public func create(id: String, driver: any JobDriver, autoFinalize: Bool = true, autoDismiss: Bool = true,
                       executor: any TaskExecutor, block: BlockJobInfo? = nil, nodes: BlockJobNodes? = nil,
                       speed: UInt64 = 0) throws(BlockError) -> Job {
        try checkNewID(id)
        let job = Job(id: id, driver: driver, autoFinalize: autoFinalize, autoDismiss: autoDismiss,
                      executor: executor, manager: self, block: block, nodes: nodes)
        if let n = nodes {
            n.bind(job)
            graph?.register(job: n)
        }
        job.setSpeedValue(speed)
        transition(job, to: .created)
        jobs.insert(job, at: 0)
        return job
    }

    /// QEMU's job_create checks on a new job's ID.
    public func checkNewID(_ id: String) throws(BlockError) {
        if !Self.isWellFormedID(id) { throw BlockError.invalid("Invalid job ID '\(id)'") }
        if job(id) != nil { throw BlockError.invalid("Job ID '\(id)' already in use") }
    }

    /// QEMU's job_early_fail: a job created but refused before it started
    /// (created, then null).
    public func discardNew(_ job: Job) async {
        await doDismiss(job)
    }

    /// The block jobs (query-block-jobs), newest first.
    public var blockJobs: [Job] { jobs.filter { $0.block != nil } }

    /// Starts the body (QEMU's job_start): running, then the body's first pause point.
    public func start(_ job: Job) {
        job.shared.withLock {
            $0.pauseCount -= 1
            $0.busy = true
            $0.paused = false
            $0.started = true
        }
        transition(job, to: .running)
        Task(executorPreference: job.executor) {
            await job.pausePoint()
            var failure: BlockError?
            do throws(BlockError) {
                try await job.driver.run(job)
            } catch {
                failure = error
            }
            await self.exit(job, failure)
        }
    }

    /// The body returned: QEMU's job_exit / job_completed.
    private func exit(_ job: Job, _ failure: BlockError?) async {
        job.setNotBusy(finished: true)
        var failed = failure != nil
        if let f = failure { job.setError(f.message) }
        if !failed && job.isCancelled {
            job.setError(errnoString(ECANCELED))
            failed = true
        }
        if failed {
            await abortAndConclude(job)
            return
        }
        transition(job, to: .waiting)
        transition(job, to: .pending)
        // QEMU announces BLOCK_JOB_PENDING only when the user finalizes.
        if !job.autoFinalize { emit(.pending(job)) }
        if job.autoFinalize {
            await finalizeSingle(job)
        }
    }

    private func abortAndConclude(_ job: Job) async {
        transition(job, to: .aborting)
        await job.driver.abort(job)
        await job.driver.clean(job)
        emit(.cancelled(job))
        await conclude(job)
    }

    /// QEMU 7.2's job_do_finalize: prepare (which may still fail the job),
    /// then commit or abort, clean, the event, concluded.
    private func finalizeSingle(_ job: Job) async {
        do throws(BlockError) {
            try await job.driver.prepare(job)
        } catch {
            job.setError(error.message)
            await abortAndConclude(job)
            return
        }
        await job.driver.commit(job)
        await job.driver.clean(job)
        emit(job.isCancelled ? .cancelled(job) : .completed(job))
        await conclude(job)
    }

    private func conclude(_ job: Job) async {
        transition(job, to: .concluded)
        let started = job.shared.withLock { $0.started }
        if job.autoDismiss || !started { await doDismiss(job) }
    }

    /// QEMU's job_dismiss and the last unref: the job goes, and with it
    /// its edges into the graph.
    private func doDismiss(_ job: Job) async {
        // The edges go first: whoever sees the job's end sees the graph
        // without them (QEMU does both at once under its big lock).
        if let n = job.nodes {
            graph?.unregister(job: n)
            await n.removeAll()
            graph?.sweepClosed()
        }
        transition(job, to: .null)
        jobs.removeAll { $0 === job }
    }

    // MARK: Verbs

    private func apply(_ verb: JobVerb, _ job: Job) throws(BlockError) {
        let s = job.status
        if !JobTables.allows(verb, in: s) {
            throw BlockError.invalid("Job '\(job.id)' in state '\(s.rawValue)' cannot accept command verb '\(verb.rawValue)'")
        }
    }

    public func dismiss(_ job: Job) async throws(BlockError) {
        try apply(.dismiss, job)
        await doDismiss(job)
    }

    public func finalize(_ job: Job) async throws(BlockError) {
        try apply(.finalize, job)
        await finalizeSingle(job)
    }

    public func pause(_ job: Job) async throws(BlockError) {
        try apply(.pause, job)
        if job.isUserPaused { throw BlockError.invalid("Job is already paused") }
        job.shared.withLock {
            $0.userPaused = true
            $0.pauseCount += 1
        }
        // QEMU enters a sleeping job at once, so it is paused before the
        // command returns; wait (briefly) for the body's pause point too.
        await settle(job) { $0 == .paused || $0 == .standby }
    }

    /// Waits until the job's status satisfies `done` (or it ends), at most
    /// about a second: a body reaches its next pause point within one
    /// request.
    private func settle(_ job: Job, _ done: (JobStatus) -> Bool) async {
        for _ in 0..<1000 {
            let s = job.status
            if done(s) || s == .concluded || s == .null || s == .aborting || s == .waiting || s == .pending { return }
            try? await Task.sleep(nanoseconds: 1_000_000)
        }
    }

    public func resume(_ job: Job) async throws(BlockError) {
        let ok = job.shared.withLock { $0.userPaused && $0.pauseCount > 0 }
        if !ok { throw BlockError.invalid("Can't resume a job that was not paused") }
        try apply(.resume, job)
        job.shared.withLock {
            $0.userPaused = false
            $0.pauseCount -= 1
            // QEMU's block_job_user_resume: the error that stopped it is over.
            $0.ioStatus = "ok"
        }
        let wasPaused = job.status == .paused || job.status == .standby
        job.wakeIfNeeded()
        if wasPaused {
            await settle(job) { $0 != .paused && $0 != .standby }
        }
    }

    /// A body met an I/O error (QEMU's block_job_error_action after the
    /// action was chosen): BLOCK_JOB_ERROR unless cancelled; `stop` pauses
    /// the job like block-job-pause and records the I/O status.
    func reportError(_ job: Job, operation: String, action: BlockErrorAction, errno code: Int32) {
        if !job.isCancelled {
            emit(.ioError(job, operation: operation, action: action))
        }
        if action == .stop {
            job.shared.withLock {
                if !$0.userPaused {
                    $0.userPaused = true
                    $0.pauseCount += 1
                }
                $0.ioStatus = code == ENOSPC ? "nospace" : "failed"
            }
        }
    }

    public func complete(_ job: Job) throws(BlockError) {
        try apply(.complete, job)
        if job.isCancelled {
            throw BlockError.invalid("Job '\(job.id)' has been cancelled")
        }
        try job.driver.complete(job)
    }

    public func setSpeed(_ job: Job, _ speed: UInt64, negative: Bool = false) throws(BlockError) {
        try apply(.setSpeed, job)
        if negative { throw BlockError.invalid("Parameter 'speed' expects a non-negative value") }
        job.setSpeedValue(speed)
    }

    /// job-cancel / block-job-cancel (force as QEMU's block-job-cancel).
    public func cancel(_ job: Job, force: Bool = false) async throws(BlockError) {
        try apply(.cancel, job)
        let started = job.shared.withLock { $0.started }
        let forced = job.driver.cancelIsForced(job, force: force)
        job.shared.withLock {
            $0.cancelled = true
            if forced { $0.force = true }
            // QEMU's job_cancel_async: a user pause ends with the cancel.
            if $0.userPaused {
                $0.userPaused = false
                $0.pauseCount -= 1
            }
        }
        if !started || (job.status == .pending && forced) {
            // Never ran, or finished but not finalized: abort at once.
            job.setError(errnoString(ECANCELED))
            await abortAndConclude(job)
            return
        }
        job.wakeIfNeeded()
    }
}

extension Unicode.Scalar {
    var isASCIILetter: Bool { ("a"..."z").contains(self) || ("A"..."Z").contains(self) }
}

extension JobManager {
    /// On quit (QEMU's job_cancel_sync_all): every job is cancelled and
    /// waited for, so that no body touches a node being closed.
    public func cancelAllAndWait() async {
        for j in jobs where j.status != .concluded && j.status != .null {
            try? await cancel(j, force: true)
        }
        for _ in 0..<3000 {
            if jobs.allSatisfy({ $0.status == .concluded || $0.status == .null || $0.status == .undefined }) { return }
            try? await Task.sleep(nanoseconds: 10_000_000)
        }
    }
}

extension JobManager {
    /// QEMU's block_job_create: a block job on `mainNode` with its first
    /// edge ("main node", taking `perm` and sharing `shared`), running on
    /// the node's home executor. A negative speed fails after the job was
    /// created, as in QEMU (JOB_STATUS_CHANGE created, then null).
    public func createBlockJob(id: String, driver: any JobDriver, speed: Int64, onError: BlockdevOnError,
                               autoFinalize: Bool, autoDismiss: Bool, mainNode: BlockNode,
                               perm: BlockPermissions, shared: BlockPermissions) async throws(BlockError) -> Job {
        let nodes = BlockJobNodes(jobID: id, type: driver.type)
        let executor = mainNode.context?.executor ?? defaultExecutor
        let job = try create(id: id, driver: driver, autoFinalize: autoFinalize, autoDismiss: autoDismiss,
                             executor: executor, block: BlockJobInfo(onError: onError), nodes: nodes,
                             speed: UInt64(max(0, speed)))
        if speed < 0 {
            await discardNew(job)
            throw BlockError.invalid("Parameter 'speed' expects a non-negative value")
        }
        do throws(BlockError) {
            try await nodes.add("main node", mainNode, perm: perm, shared: shared)
        } catch {
            await discardNew(job)
            throw error
        }
        return job
    }
}
