#if canImport(Glibc)
import Glibc
#endif
import BlockCore
import BlockCopy
import Synchronization

/// What happens to a job that the outside world must hear about (QMP
/// events are built from these by the daemon). Delivered on the control actor.
public enum JobEvent: Sendable {
    case statusChange(Job, JobStatus)
    /// All work is done and the job waits to be finalized (BLOCK_JOB_PENDING).
    case pending(Job)
    /// The job reached READY (BLOCK_JOB_READY).
    case ready(Job)
    /// Finalized successfully (BLOCK_JOB_COMPLETED).
    case completed(Job)
    /// Finalized after a cancel (BLOCK_JOB_CANCELLED) or a failure with
    /// `error` set (BLOCK_JOB_COMPLETED with error).
    case cancelled(Job)
    /// An I/O error met by a block job, with the on-error action taken
    /// (BLOCK_JOB_ERROR; operation "read" or "write").
    case ioError(Job, operation: String, action: BlockErrorAction)
}

/// QAPI BlockdevOnError (the values block jobs accept).
public enum BlockdevOnError: String, Sendable, CaseIterable {
    case report, ignore, enospc, stop, auto
}

/// A job's body and its transactional finish (QEMU's JobDriver).
///
/// `run` executes on the job's executor (the home loop of the nodes it
/// touches); it should call `await job.pausePoint()` between requests and
/// return early when `job.isCancelled`. The other methods run on the
/// control actor after `run` returned: `prepare` may still fail the job;
/// then exactly one of `commit` / `abort` runs, then `clean`.
public protocol JobDriver: AnyObject, Sendable {
    var type: JobType { get }
    func run(_ job: Job) async throws(BlockError)
    @ControlActor func prepare(_ job: Job) async throws(BlockError)
    @ControlActor func commit(_ job: Job) async
    @ControlActor func abort(_ job: Job) async
    @ControlActor func clean(_ job: Job) async
    /// block-job-complete / job-complete on a READY job.
    @ControlActor func complete(_ job: Job) throws(BlockError)
    /// QEMU's JobDriver.cancel: whether a cancel request really cancels
    /// (`force`) or, for a READY mirror-like job, finishes it without
    /// completing (a soft cancel: the job ends successfully).
    @ControlActor func cancelIsForced(_ job: Job, force: Bool) -> Bool
}

public extension JobDriver {
    @ControlActor func prepare(_ job: Job) async throws(BlockError) {}
    @ControlActor func commit(_ job: Job) async {}
    @ControlActor func abort(_ job: Job) async {}
    @ControlActor func clean(_ job: Job) async {}
    @ControlActor func complete(_ job: Job) throws(BlockError) {
        throw BlockError.invalid("The active block job '\(job.id)' cannot be completed")
    }
    @ControlActor func cancelIsForced(_ job: Job, force: Bool) -> Bool { true }
}

/// The block-job part of a job (QEMU's BlockJob): what query-block-jobs
/// and the BLOCK_JOB_* events report.
public struct BlockJobInfo: Sendable {
    public var onError: BlockdevOnError
    public init(onError: BlockdevOnError = .report) { self.onError = onError }
}

extension BlockError {
    /// How a block job's failure reads in query-jobs and BLOCK_JOB_COMPLETED:
    /// QEMU keeps only the errno of a stream/commit/mirror body (strerror).
    public var asJobError: BlockError {
        let code = errno != 0 ? errno : EIO
        return BlockError(kind, errno: code, errnoString(code))
    }
}

/// A block job whose failure reads as its errno (stream, commit, mirror):
/// `body` is the work, `run` reports its error as QEMU does.
public protocol BlockJobDriver: JobDriver {
    func body(_ job: Job) async throws(BlockError)
}

extension BlockJobDriver {
    public func run(_ job: Job) async throws(BlockError) {
        do throws(BlockError) {
            try await body(job)
        } catch {
            throw error.asJobError
        }
    }
}

/// One job (QEMU's Job): the lifecycle state machine, verbs, progress and
/// pause/cancel flags shared with the running body.
///
/// Threading: state transitions and verbs happen on the control actor;
/// `progress`, `isCancelled` and `pausePoint()` are safe from the body's thread.
public final class Job: CopyController, Sendable {
    public let id: String
    public let driver: any JobDriver
    public let autoFinalize: Bool
    public let autoDismiss: Bool
    let executor: any TaskExecutor
    let manager: JobManager

    struct Shared {
        var status: JobStatus = .undefined
        var progressCurrent: UInt64 = 0
        var progressTotal: UInt64 = 0
        var cancelled = false
        var force = false
        var pauseCount = 1
        var userPaused = false
        var paused = true
        var busy = false
        var started = false
        var error: String?
        var speed: UInt64 = 0
        var resumeWaiters: [UnsafeContinuation<Void, Never>] = []
        /// Drained sections waiting for the body to stop being busy.
        var idleWaiters: [UnsafeContinuation<Void, Never>] = []
        /// Drained sections waiting for the body to be back at work.
        var backWaiters: [UnsafeContinuation<Void, Never>] = []
        /// The body returned.
        var finished = false
        var ready = false
        /// QAPI BlockDeviceIoStatus: "ok", "failed" or "nospace".
        var ioStatus = "ok"
        var rate = RateLimit()
    }
    let shared = Mutex(Shared())

    /// Set for block jobs (stream, commit...): listed by query-block-jobs.
    public let block: BlockJobInfo?
    /// A block job's edges into the graph (removed when it is dismissed,
    /// or earlier by its driver).
    public let nodes: BlockJobNodes?

    init(id: String, driver: any JobDriver, autoFinalize: Bool, autoDismiss: Bool,
         executor: any TaskExecutor, manager: JobManager, block: BlockJobInfo?, nodes: BlockJobNodes?) {
        self.id = id
        self.block = block
        self.nodes = nodes
        self.driver = driver
        self.autoFinalize = autoFinalize
        self.autoDismiss = autoDismiss
        self.executor = executor
        self.manager = manager
    }

    public var type: JobType { driver.type }
    public var status: JobStatus { shared.withLock { $0.status } }
    /// Cancelled for real (QEMU's job_is_cancelled): the job fails with
    /// ECANCELED. A soft cancel of a READY job is not.
    public var isCancelled: Bool { shared.withLock { $0.cancelled && $0.force } }
    /// Any cancel request (QEMU's job_cancel_requested): the body stops.
    public var cancelRequested: Bool { shared.withLock { $0.cancelled } }
    public var isReady: Bool { shared.withLock { $0.ready } }
    /// QEMU's BlockJobInfo.paused: a pause is requested (pause_count > 0).
    public var pauseRequested: Bool { shared.withLock { $0.pauseCount > 0 } }
    public var ioStatus: String { shared.withLock { $0.ioStatus } }
    public var error: String? { shared.withLock { $0.error } }
    public var progress: (current: UInt64, total: UInt64) {
        shared.withLock { ($0.progressCurrent, $0.progressTotal) }
    }
    public var isBusy: Bool { shared.withLock { $0.busy } }
    public var isPaused: Bool { shared.withLock { $0.paused || $0.userPaused } }
    public var isUserPaused: Bool { shared.withLock { $0.userPaused } }
    public var speed: UInt64 { shared.withLock { $0.speed } }

    // MARK: Progress (body side)

    public func progressUpdate(_ done: UInt64) { shared.withLock { $0.progressCurrent += done } }
    public func progressSetRemaining(_ remaining: UInt64) {
        shared.withLock { $0.progressTotal = $0.progressCurrent + remaining }
    }
    public func progressIncreaseRemaining(_ delta: UInt64) { shared.withLock { $0.progressTotal += delta } }

    // MARK: Pause points (body side)

    /// QEMU's job_pause_point: if a pause was requested (and the job is not
    /// cancelled), go to paused/standby until resumed.
    public func pausePoint() async {
        let mustPause = shared.withLock { $0.pauseCount > 0 && !$0.cancelled }
        guard mustPause else { return }
        let before = status
        await manager.transition(self, to: before == .ready ? .standby : .paused)
        await withUnsafeContinuation { (c: UnsafeContinuation<Void, Never>) in
            let (resumeNow, idle) = shared.withLock { s -> (Bool, [UnsafeContinuation<Void, Never>]) in
                if s.pauseCount == 0 || s.cancelled { return (true, []) }
                s.paused = true
                s.busy = false
                s.resumeWaiters.append(c)
                defer { s.idleWaiters = [] }
                return (false, s.idleWaiters)
            }
            idle.forEach { $0.resume() }
            if resumeNow { c.resume() }
        }
        shared.withLock {
            $0.paused = false
            $0.busy = true
        }
        await manager.transition(self, to: before)
        let back = shared.withLock { s -> [UnsafeContinuation<Void, Never>] in
            defer { s.backWaiters = [] }
            return s.backWaiters
        }
        back.forEach { $0.resume() }
    }

    /// The body is not running requests (asleep, paused or returned).
    func setNotBusy(finished: Bool = false) {
        let idle = shared.withLock { s -> [UnsafeContinuation<Void, Never>] in
            s.busy = false
            if finished { s.finished = true }
            defer { s.idleWaiters = [] }
            return s.idleWaiters
        }
        idle.forEach { $0.resume() }
    }

    /// A drained section over the job's nodes (QEMU's job_pause from
    /// child_job_drained_begin, which enters a sleeping job): the body goes
    /// to its next pause point and parks there (JOB_STATUS_CHANGE paused);
    /// returns once it is parked, or has returned.
    func drainPause() async {
        shared.withLock { $0.pauseCount += 1 }
        await withUnsafeContinuation { (c: UnsafeContinuation<Void, Never>) in
            let now = shared.withLock { s -> Bool in
                if s.paused || s.finished || !s.started || s.cancelled { return true }
                s.idleWaiters.append(c)
                return false
            }
            if now { c.resume() }
        }
    }

    /// The end of that drained section (QEMU's job_resume, which re-enters
    /// the job at once): a body parked only for drains is woken, and this
    /// returns once it is back at work (JOB_STATUS_CHANGE running).
    func drainResume() async {
        let parked = shared.withLock { s -> Bool in
            s.pauseCount -= 1
            return s.paused && (s.pauseCount == 0 || s.cancelled)
        }
        guard parked else {
            wakeIfNeeded()
            return
        }
        await withUnsafeContinuation { (c: UnsafeContinuation<Void, Never>) in
            shared.withLock { $0.backWaiters.append(c) }
            wakeIfNeeded()
        }
    }

    /// Wakes a paused body when the pause count dropped to zero or it was cancelled.
    func wakeIfNeeded() {
        let waiters = shared.withLock { s -> [UnsafeContinuation<Void, Never>] in
            guard s.pauseCount == 0 || s.cancelled else { return [] }
            let w = s.resumeWaiters
            s.resumeWaiters = []
            return w
        }
        for w in waiters { w.resume() }
    }

    /// Sets the job's error text (shown by query-jobs and the events).
    public func setError(_ message: String) { shared.withLock { $0.error = message } }

    /// Moves the job to READY (for jobs that need block-job-complete).
    @ControlActor public func becomeReady() {
        shared.withLock { $0.ready = true }
        manager.transition(self, to: .ready)
        manager.emit(.ready(self))
    }

    public func setSpeedValue(_ v: UInt64) { shared.withLock { $0.speed = v } }

    // MARK: Rate limit and sleeping (body side)

    /// QEMU's block_job_ratelimit_get_delay: nanoseconds to wait after
    /// copying `bytes` at the current speed.
    public func rateLimitDelay(_ bytes: UInt64) -> UInt64 {
        shared.withLock { s in s.rate.delay(speed: s.speed, bytes: bytes, now: monotonicNanoseconds()) }
    }

    /// QEMU's job_sleep_ns: sleeps unless cancelled, then honours a pause
    /// request. Cancel, pause and a speed change cut the sleep short
    /// (checked every 10 ms).
    public func sleep(nanoseconds ns: UInt64) async {
        if ns > 0 {
            // QEMU's job is not busy while it sleeps.
            setNotBusy()
            defer { shared.withLock { $0.busy = true } }
            let deadline = monotonicNanoseconds() + ns
            let startSpeed = speed
            while true {
                let interrupted = shared.withLock { s in s.cancelled || s.pauseCount > 0 || s.speed != startSpeed }
                let now = monotonicNanoseconds()
                if interrupted || now >= deadline { break }
                try? await Task.sleep(nanoseconds: min(deadline - now, 10_000_000))
            }
        }
        await pausePoint()
    }

    // MARK: Errors (body side)

    /// QEMU's block_job_error_action: decides what an I/O error means under
    /// the job's on-error policy, reports it (BLOCK_JOB_ERROR) and, for
    /// `stop`, pauses the job as if the user had (resume continues).
    public func errorAction(errno code: Int32, isRead: Bool) async -> BlockErrorAction {
        let policy = block?.onError ?? .report
        let action: BlockErrorAction
        switch policy {
        case .enospc: action = code == ENOSPC ? .stop : .report
        case .stop: action = .stop
        case .ignore: action = .ignore
        case .report, .auto: action = .report
        }
        await manager.reportError(self, operation: isRead ? "read" : "write", action: action, errno: code)
        return action
    }
}
