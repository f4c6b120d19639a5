import BlockCore
import BlockGraph
import Synchronization

/// QAPI BlockErrorAction: what a job did about an I/O error.
public enum BlockErrorAction: String, Sendable {
    case ignore, report, stop
}

/// What a copy is driven by (a block job, or a tool's offline copy): the
/// rate limit, pause points, cancellation, progress and the on-error
/// policy. `BlockCopy` calls it from its coordinating task.
public protocol CopyController: Sendable {
    /// Nanoseconds to wait after copying `bytes` (QEMU's
    /// block_job_ratelimit_get_delay).
    func rateLimitDelay(_ bytes: UInt64) -> UInt64
    /// QEMU's job_sleep_ns: sleeps unless cancelled, then honours a pause
    /// request (the copy's pause point; called even with 0).
    func sleep(nanoseconds: UInt64) async
    /// The copy stops at its next step (QEMU's job_is_cancelled, or any
    /// cancel request for jobs that finish early on a soft cancel).
    var cancelRequested: Bool { get }
    func progressUpdate(_ done: UInt64)
    func progressSetRemaining(_ remaining: UInt64)
    /// QEMU's block_job_error_action: what the policy says about an error
    /// (`stop` also pauses the job until the user resumes it).
    func errorAction(errno: Int32, isRead: Bool) async -> BlockErrorAction
}

/// How a range is brought over.
public enum CopyMethod: Sendable, Equatable {
    /// Nothing to do (already there, or not to be copied).
    case skip
    /// Read and write the data.
    case copy
    /// Write zeroes (the source reads as zeroes).
    case zero
    /// Discard (the source has nothing there).
    case discard
}

/// One step of a copy: [offset, offset+length) and how.
public struct CopyStep: Sendable, Equatable {
    public var offset: Int64
    public var length: Int64
    public var method: CopyMethod
    public init(offset: Int64, length: Int64, method: CopyMethod) {
        self.offset = offset
        self.length = length
        self.method = method
    }
}

/// A failed step: the error and whether it was the read side.
public struct CopyFailure: Error, Sendable {
    public var error: BlockError
    public var isRead: Bool
    public init(_ error: BlockError, isRead: Bool) {
        self.error = error
        self.isRead = isRead
    }
}

/// The one copy engine of the block layer (stream, commit, active commit,
/// `lamina-img commit`; mirror and backup next): steps planned in order by
/// block status (`copyRange`) or by a dirty bitmap (`copyDirty`), up to
/// `inFlight` steps running at once on the given executors, each with a
/// buffer of its own allocated once, QEMU's rate limiter, progress, pause
/// points, cancellation and the on-error policy; the target's writeback is
/// kept going so the final flush finds little to write.
///
/// Threading: the coordinating loop runs on the first of `executors` (the
/// caller's executor when there are none). One step at a time
/// (`inFlight` 1, QEMU's stream and commit) runs right there, so a step
/// costs no thread hop; several run as tasks on `executors`, round robin.
public final class BlockCopy: Sendable {
    /// What an ignored error means (QEMU's jobs differ).
    public enum IgnoredError: Sendable {
        /// Go on with the next range, fail at the end (block-stream).
        case skipAndFail
        /// Copy the range again (block-commit's `n = 0; continue`).
        case retry
    }

    public struct Options: Sendable {
        /// The largest step (and the buffer each step gets).
        public var chunk: Int64
        /// `copyDirty`: the most dirty data one iteration takes on before
        /// its pause point and rate-limit sleep (QEMU's mirror buf_size).
        public var runLength: Int64
        /// `copyDirty`: zero and discard steps do not count against the
        /// rate limit (QEMU: the target can write zeroes with unmap).
        public var freeZeroes: Bool
        /// Steps running at once.
        public var inFlight: Int
        /// Where steps run; empty: on the coordinating task's executor.
        public var executors: [any TaskExecutor]
        /// Kept writing back while copying (nil: none).
        public var writebackTarget: BlockNode?
        public init(chunk: Int64, runLength: Int64? = nil, freeZeroes: Bool = false, inFlight: Int = 1,
                    executors: [any TaskExecutor] = [], writebackTarget: BlockNode? = nil) {
            self.chunk = chunk
            self.runLength = runLength ?? chunk
            self.freeZeroes = freeZeroes
            self.inFlight = max(1, inFlight)
            self.executors = executors
            self.writebackTarget = writebackTarget
        }
    }

    /// Decides the step starting at `offset`, at most `length` bytes long
    /// (at least one byte unless `length` is 0). Errors count as reads.
    public typealias Plan = @Sendable (_ offset: Int64, _ length: Int64) async throws(BlockError) -> CopyStep
    /// Performs a step (`skip` steps never arrive); `buffer` is the step's
    /// own, at least `chunk` bytes, valid until it returns.
    public typealias Perform = @Sendable (CopyStep, UnsafeMutableRawBufferPointer) async throws(CopyFailure) -> Void

    public let options: Options
    private let buffers: Mutex<[AlignedBuffer]>
    private let writebackBytes = Atomic<Int64>(0)
    static let writebackEvery: Int64 = 32 << 20
    /// The writeback kick running beside the copy (at most one).
    private let writeback = Mutex<Task<Void, Never>?>(nil)
    private let writebackBusy = Atomic<Bool>(false)

    public init(_ options: Options) {
        self.options = options
        self.buffers = Mutex((0..<options.inFlight).map { _ in AlignedBuffer(count: Int(options.chunk)) })
    }

    // MARK: - In order (stream, commit)

    /// QEMU's stream_run / commit_run: [0, length) in order, step by step.
    /// Progress counts every byte passed, copied or not. A stopped step is
    /// planned again after the job resumes; an ignored one is skipped
    /// (`skipAndFail`) or planned again (`retry`).
    public func copyRange(length: Int64, controller: any CopyController, ignored: IgnoredError,
                          plan: Plan, perform: @escaping Perform) async throws(BlockError) {
        try await withTaskExecutorPreference(options.executors.first) { () async throws(BlockError) in
            do throws(BlockError) {
                try await copyRangeHere(length: length, controller: controller, ignored: ignored, plan: plan,
                                        perform: perform)
            } catch {
                await writebackDone()
                throw error
            }
            await writebackDone()
        }
    }

    private func copyRangeHere(length: Int64, controller: any CopyController, ignored: IgnoredError,
                               plan: Plan, perform: @escaping Perform) async throws(BlockError) {
        controller.progressSetRemaining(UInt64(length))
        var running = Running(self, controller)
        var firstIgnored: BlockError?
        var offset: Int64 = 0
        var delay: UInt64 = 0
        do throws(BlockError) {
            // Applies the policy to a finished step; returns false if it failed.
            func settle(_ o: Outcome) throws(BlockError) -> Bool {
                guard let action = o.action, let failure = o.failure else {
                    controller.progressUpdate(UInt64(o.step.length))
                    return true
                }
                switch action {
                case .stop:
                    offset = min(offset, o.step.offset)
                case .report:
                    throw failure.error
                case .ignore:
                    if ignored == .retry {
                        offset = min(offset, o.step.offset)
                    } else {
                        if firstIgnored == nil { firstIgnored = failure.error }
                        controller.progressUpdate(UInt64(o.step.length))
                    }
                }
                return false
            }
            while true {
                await controller.sleep(nanoseconds: delay)
                delay = 0
                if controller.cancelRequested { break }
                if offset >= length {
                    guard let o = await running.collect() else { break }
                    _ = try settle(o)
                    continue
                }
                let want = min(options.chunk, length - offset)
                let step: CopyStep
                do throws(BlockError) {
                    step = try await plan(offset, want)
                } catch {
                    switch await controller.errorAction(errno: error.errnoOrEIO, isRead: true) {
                    case .stop: break
                    case .report: throw error
                    case .ignore:
                        if ignored == .skipAndFail {
                            // QEMU's stream goes on after the range it could not plan.
                            if firstIgnored == nil { firstIgnored = error }
                            controller.progressUpdate(UInt64(want))
                            offset += want
                        }
                    }
                    continue
                }
                offset += step.length
                guard try await running.dispatch(step, planned: offset - step.length, perform, { (o) throws(BlockError) in
                    _ = try settle(o)
                }) else { continue }
                if options.inFlight == 1 {
                    // One at a time (QEMU's stream and commit): the step is
                    // over before the rate limit and the next pause point.
                    if let o = await running.collect(), try settle(o) {
                        delay = controller.rateLimitDelay(UInt64(step.length))
                    }
                } else {
                    delay = controller.rateLimitDelay(UInt64(step.length))
                }
            }
            while let o = await running.collect() { _ = try settle(o) }
        } catch {
            await running.waitAll()
            throw error
        }
        if let e = firstIgnored { throw e }
    }

    // MARK: - By dirty bitmap (active commit, mirror, offline commit)

    /// QEMU's mirror_run: copies what `bitmap` marks, clearing bits as
    /// steps start (writes meanwhile mark them again), until the bitmap is
    /// clean with nothing in flight; then `inSync` says whether to go on
    /// (READY and waiting for guest writes) or stop. A failed step marks
    /// its range again: `stop` pauses, `ignore` copies it again later,
    /// `report` fails the copy.
    public func copyDirty(bitmap: DirtyBitmap, controller: any CopyController, plan: Plan,
                          perform: @escaping Perform, inSync: () async throws(BlockError) -> Bool) async throws(BlockError) {
        try await withTaskExecutorPreference(options.executors.first) { () async throws(BlockError) in
            do throws(BlockError) {
                try await copyDirtyHere(bitmap: bitmap, controller: controller, plan: plan, perform: perform,
                                        inSync: inSync)
            } catch {
                await writebackDone()
                throw error
            }
            await writebackDone()
        }
    }

    private func copyDirtyHere(bitmap: DirtyBitmap, controller: any CopyController, plan: Plan,
                               perform: @escaping Perform, inSync: () async throws(BlockError) -> Bool) async throws(BlockError) {
        var running = Running(self, controller)
        var cursor: Int64 = 0
        var delay: UInt64 = 0
        do throws(BlockError) {
            func settle(_ o: Outcome) throws(BlockError) {
                guard let action = o.action, let failure = o.failure else {
                    controller.progressUpdate(UInt64(o.step.length))
                    return
                }
                bitmap.mark(o.step.offset, o.step.length)
                if action == .report { throw failure.error }
            }
            while true {
                await controller.sleep(nanoseconds: delay)
                delay = 0
                if controller.cancelRequested { break }
                controller.progressSetRemaining(UInt64(bitmap.dirtyBytes) + UInt64(running.bytes))
                guard let (start, runLength) = bitmap.nextDirtyRun(from: cursor, maxLength: options.runLength)
                    ?? bitmap.nextDirtyRun(from: 0, maxLength: options.runLength) else {
                    if let o = await running.collect() {
                        try settle(o)
                        continue
                    }
                    if try await inSync() { continue }
                    break
                }
                bitmap.clear(start, runLength)
                var pos = start
                let end = start + runLength
                while pos < end {
                    let step: CopyStep
                    do throws(BlockError) {
                        step = try await plan(pos, end - pos)
                    } catch {
                        bitmap.mark(pos, end - pos)
                        if await controller.errorAction(errno: error.errnoOrEIO, isRead: true) == .report { throw error }
                        break
                    }
                    pos += step.length
                    guard try await running.dispatch(step, planned: pos - step.length, perform, settle) else { continue }
                    let counted = step.method == .copy || !options.freeZeroes ? step.length : 0
                    delay = controller.rateLimitDelay(UInt64(counted))
                }
                cursor = end
            }
            while let o = await running.collect() { try settle(o) }
        } catch {
            await running.waitAll()
            throw error
        }
    }

    // MARK: - Steps in flight

    fileprivate func takeBuffer() -> AlignedBuffer {
        buffers.withLock { $0.popLast() } ?? AlignedBuffer(count: Int(options.chunk))
    }

    fileprivate func giveBack(_ b: AlignedBuffer) { buffers.withLock { $0.append(b) } }

    /// Runs one step with a buffer of its own; nil when it succeeded.
    fileprivate func run(_ step: CopyStep, _ perform: Perform) async -> CopyFailure? {
        let buffer = takeBuffer()
        defer { giveBack(buffer) }
        do throws(CopyFailure) {
            try await perform(step, buffer.bytes)
        } catch {
            return error
        }
        if step.method == .copy { copied(step.length) }
        return nil
    }

    /// Every `writebackEvery` bytes copied, the target's writeback is
    /// started beside the copy (on the last executor, the copy's own being
    /// the first), so that submitting it costs the copy nothing; a kick
    /// still running makes the next one unnecessary.
    fileprivate func copied(_ n: Int64) {
        guard let target = options.writebackTarget else { return }
        let total = writebackBytes.add(n, ordering: .relaxed).newValue
        guard total >= Self.writebackEvery else { return }
        writebackBytes.store(0, ordering: .relaxed)
        guard !writebackBusy.exchange(true, ordering: .acquiring) else { return }
        let executor = options.executors.count > 1 ? options.executors.last : nil
        writeback.withLock {
            $0 = Task(executorPreference: executor) { [self] in
                await target.startWriteback()
                writebackBusy.store(false, ordering: .releasing)
            }
        }
    }

    /// Waits for the writeback kick, if any: nothing outlives the copy.
    private func writebackDone() async {
        await writeback.withLock({ $0 })?.value
    }

    /// A finished step, and for a failed one the error and what the policy
    /// said about it (asked in step order, as QEMU's loops do).
    fileprivate struct Outcome {
        var step: CopyStep
        var failure: CopyFailure?
        var action: BlockErrorAction?
    }

    /// The steps in flight of one copy (owned by its coordinating loop),
    /// oldest first.
    fileprivate struct Running {
        let engine: BlockCopy
        let controller: any CopyController
        private enum Pending {
            case running(Task<CopyFailure?, Never>)
            case finished(CopyFailure?)

            var result: CopyFailure? {
                get async {
                    switch self {
                    case .running(let t): return await t.value
                    case .finished(let f): return f
                    }
                }
            }
        }
        private var tasks: [(CopyStep, Pending)] = []
        private var next = 0

        init(_ engine: BlockCopy, _ controller: any CopyController) {
            self.engine = engine
            self.controller = controller
        }

        var count: Int { tasks.count }
        var bytes: Int64 { tasks.reduce(0) { $0 + $1.0.length } }

        /// Hands a planned step on: a `skip` step only counts as progress
        /// (returns false); another waits for a free slot, settling the
        /// steps that finish meanwhile, and starts.
        mutating func dispatch(_ step: CopyStep, planned offset: Int64, _ perform: @escaping Perform,
                               _ settle: (Outcome) throws(BlockError) -> Void) async throws(BlockError) -> Bool {
            precondition(step.offset == offset && step.length > 0, "a plan must start at its offset")
            if step.method == .skip {
                controller.progressUpdate(UInt64(step.length))
                return false
            }
            while count >= engine.options.inFlight, let o = await collect() {
                try settle(o)
            }
            await start(step, perform)
            return true
        }

        /// One at a time: the step runs here, on the coordinating task.
        /// Else it becomes a task on the next executor.
        mutating func start(_ step: CopyStep, _ perform: @escaping Perform) async {
            let engine = self.engine
            if engine.options.inFlight == 1 {
                tasks.append((step, .finished(await engine.run(step, perform))))
                return
            }
            let executor: (any TaskExecutor)? = engine.options.executors.isEmpty
                ? nil : engine.options.executors[next % engine.options.executors.count]
            next += 1
            tasks.append((step, .running(Task(executorPreference: executor) { await engine.run(step, perform) })))
        }

        /// Waits for the oldest step (nil: none running).
        mutating func collect() async -> Outcome? {
            guard !tasks.isEmpty else { return nil }
            let (step, pending) = tasks.removeFirst()
            guard let failure = await pending.result else { return Outcome(step: step) }
            let action = await controller.errorAction(errno: failure.error.errnoOrEIO, isRead: failure.isRead)
            return Outcome(step: step, failure: failure, action: action)
        }

        /// Waits for every step still running (the copy has failed
        /// already): nothing is left doing I/O; each further failure is
        /// still reported to the policy (QEMU's jobs report every failed
        /// request), its answer dropped.
        mutating func waitAll() async {
            while !tasks.isEmpty {
                if let failure = await tasks.removeFirst().1.result {
                    _ = await controller.errorAction(errno: failure.error.errnoOrEIO, isRead: failure.isRead)
                }
            }
        }
    }
}

extension BlockError {
    /// The errno a job's error policy sees (EIO when none).
    public var errnoOrEIO: Int32 { errno != 0 ? errno : 5 }
}
