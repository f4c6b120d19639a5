import BlockCore
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
}

public extension JobDriver {
    @ControlActor func prepare(_ job: Job) async throws(BlockError) {}
    @ControlActor func commit(_ job: Job) async {}
    @ControlActor func abort(_ job: Job) async {}
    @ControlActor func clean(_ job: Job) async {}
    @ControlActor func complete(_ job: Job) throws(BlockError) {
        throw BlockError.invalid("The active block job '\(job.id)' cannot be completed")
    }
}

/// One job (QEMU's Job): the lifecycle state machine, verbs, progress and
/// pause/cancel flags shared with the running body.
///
/// Threading: state transitions and verbs happen on the control actor;
/// `progress`, `isCancelled` and `pausePoint()` are safe from the body's thread.
public final class Job: Sendable {
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
    }
    let shared = Mutex(Shared())

    init(id: String, driver: any JobDriver, autoFinalize: Bool, autoDismiss: Bool,
         executor: any TaskExecutor, manager: JobManager) {
        self.id = id
        self.driver = driver
        self.autoFinalize = autoFinalize
        self.autoDismiss = autoDismiss
        self.executor = executor
        self.manager = manager
    }

    public var type: JobType { driver.type }
    public var status: JobStatus { shared.withLock { $0.status } }
    public var isCancelled: Bool { shared.withLock { $0.cancelled } }
    public var isForceCancelled: Bool { shared.withLock { $0.cancelled && $0.force } }
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
            let resumeNow = shared.withLock { s -> Bool in
                if s.pauseCount == 0 || s.cancelled { return true }
                s.paused = true
                s.busy = false
                s.resumeWaiters.append(c)
                return false
            }
            if resumeNow { c.resume() }
        }
        shared.withLock {
            $0.paused = false
            $0.busy = true
        }
        await manager.transition(self, to: before)
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
        manager.transition(self, to: .ready)
        manager.emit(.ready(self))
    }

    public func setSpeedValue(_ v: UInt64) { shared.withLock { $0.speed = v } }
}
