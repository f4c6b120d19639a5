import BlockCopy
import BlockCore
import BlockGraph
import Synchronization
import Testing

/// A controller that records what the engine asked and answers the
/// error policy from a script.
final class ScriptedController: CopyController, @unchecked Sendable {
    struct State {
        var done: UInt64 = 0
        var remaining: [UInt64] = []
        var errors: [(Int32, Bool)] = []
        var actions: [BlockErrorAction]
        var sleeps = 0
    }
    let state: Mutex<State>
    let speed: UInt64
    private let rate = Mutex(RateLimit())

    init(actions: [BlockErrorAction] = [], speed: UInt64 = 0) {
        state = Mutex(State(actions: actions))
        self.speed = speed
    }

    func rateLimitDelay(_ bytes: UInt64) -> UInt64 {
        rate.withLock { $0.delay(speed: speed, bytes: bytes, now: monotonicNanoseconds()) }
    }
    func sleep(nanoseconds: UInt64) async {
        state.withLock { $0.sleeps += 1 }
        await Task.yield()
    }
    var cancelRequested: Bool { false }
    func progressUpdate(_ done: UInt64) { state.withLock { $0.done += done } }
    func progressSetRemaining(_ remaining: UInt64) { state.withLock { $0.remaining.append(remaining) } }
    func errorAction(errno: Int32, isRead: Bool) async -> BlockErrorAction {
        state.withLock { s in
            s.errors.append((errno, isRead))
            return s.actions.isEmpty ? .report : s.actions.removeFirst()
        }
    }
    var done: UInt64 { state.withLock { $0.done } }
    var errors: [(Int32, Bool)] { state.withLock { $0.errors } }
}

/// Records the steps performed; fails a step at `failAt` `failures` times.
final class StepLog: @unchecked Sendable {
    let state = Mutex<(steps: [CopyStep], failuresLeft: Int, inFlight: Int, maxInFlight: Int)>(([], 0, 0, 0))
    let failAt: Int64?
    init(failAt: Int64? = nil, failures: Int = 0) {
        self.failAt = failAt
        state.withLock { $0.failuresLeft = failures }
    }
    var steps: [CopyStep] { state.withLock { $0.steps } }
    var maxInFlight: Int { state.withLock { $0.maxInFlight } }

    var perform: BlockCopy.Perform {
        { [self] (step, _) throws(CopyFailure) in
            state.withLock { s in
                s.inFlight += 1
                s.maxInFlight = max(s.maxInFlight, s.inFlight)
            }
            await Task.yield()
            let fail = state.withLock { s -> Bool in
                s.inFlight -= 1
                if step.offset == failAt && s.failuresLeft > 0 {
                    s.failuresLeft -= 1
                    return true
                }
                s.steps.append(step)
                return false
            }
            if fail { throw CopyFailure(BlockError.io("injected", errno: 28), isRead: false) }
        }
    }
}

@Suite("Copy engine (BlockCopy)")
struct BlockCopyTests {
    /// Every other 64 KiB needs copying.
    static let plan: BlockCopy.Plan = { (offset, length) throws(BlockError) in
        CopyStep(offset: offset, length: length, method: (offset / 65536) % 2 == 0 ? .copy : .skip)
    }

    @Test("in order: every byte is planned once, only copy steps are performed, progress counts all of them")
    func inOrder() async throws {
        let engine = BlockCopy(.init(chunk: 65536))
        let c = ScriptedController()
        let log = StepLog()
        try await engine.copyRange(length: 1 << 20, controller: c, ignored: .skipAndFail, plan: Self.plan, perform: log.perform)
        #expect(log.steps.map(\.offset) == stride(from: 0, to: 1 << 20, by: 131072).map { Int64($0) })
        #expect(c.done == 1 << 20)
        #expect(c.state.withLock { $0.remaining } == [1 << 20])
    }

    @Test("stop: the failed step is planned again after the pause point, and then succeeds")
    func stopRetries() async throws {
        let engine = BlockCopy(.init(chunk: 65536))
        let c = ScriptedController(actions: [.stop])
        let log = StepLog(failAt: 262144, failures: 1)
        try await engine.copyRange(length: 1 << 20, controller: c, ignored: .skipAndFail, plan: Self.plan, perform: log.perform)
        #expect(c.errors.count == 1 && c.errors[0].0 == 28 && c.errors[0].1 == false)
        #expect(log.steps.map(\.offset).contains(262144))
        #expect(c.done == 1 << 20)
    }

    @Test("ignore: block-stream goes on and fails at the end; block-commit copies the range again")
    func ignore() async throws {
        let c1 = ScriptedController(actions: [.ignore])
        let log1 = StepLog(failAt: 262144, failures: 1)
        await #expect(throws: BlockError.self) {
            try await BlockCopy(.init(chunk: 65536)).copyRange(length: 1 << 20, controller: c1, ignored: .skipAndFail,
                                                               plan: Self.plan, perform: log1.perform)
        }
        #expect(!log1.steps.map(\.offset).contains(262144) && log1.steps.count == 7)
        let c2 = ScriptedController(actions: [.ignore])
        let log2 = StepLog(failAt: 262144, failures: 1)
        try await BlockCopy(.init(chunk: 65536)).copyRange(length: 1 << 20, controller: c2, ignored: .retry,
                                                           plan: Self.plan, perform: log2.perform)
        #expect(log2.steps.map(\.offset).contains(262144) && log2.steps.count == 8)
    }

    @Test("report: the copy fails with the step's error, and no step is left running")
    func report() async throws {
        let log = StepLog(failAt: 131072 * 2, failures: 1)
        do throws(BlockError) {
            try await BlockCopy(.init(chunk: 65536, inFlight: 4)).copyRange(
                length: 1 << 20, controller: ScriptedController(), ignored: .skipAndFail, plan: Self.plan, perform: log.perform)
            Issue.record("no error")
        } catch {
            #expect(error.errno == 28)
        }
        #expect(log.state.withLock { $0.inFlight } == 0)
    }

    @Test("by bitmap: dirty ranges copied with at most inFlight steps at once; a failed step is marked again and copied later; clean means in sync")
    func byBitmap() async throws {
        let bitmap = DirtyBitmap(size: 4 << 20, granularity: 65536)
        bitmap.mark(0, 1 << 20)
        bitmap.mark(2 << 20, 512 << 10)
        let c = ScriptedController(actions: [.ignore])
        let log = StepLog(failAt: 2 << 20, failures: 1)
        let engine = BlockCopy(.init(chunk: 65536, runLength: 1 << 20, inFlight: 3))
        let syncs = Mutex(0)
        try await engine.copyDirty(bitmap: bitmap, controller: c, plan: { (o, n) throws(BlockError) in
            CopyStep(offset: o, length: min(n, 65536), method: .copy)
        }, perform: log.perform) { () throws(BlockError) in
            syncs.withLock { $0 += 1 }
            return false
        }
        #expect(bitmap.isClean)
        #expect(syncs.withLock { $0 } == 1)
        #expect(log.maxInFlight <= 3 && log.maxInFlight > 1)
        #expect(Set(log.steps.map(\.offset)).count == 24 && log.steps.count == 24)
        #expect(c.errors.count == 1)
    }

    @Test("QEMU's rate limit: 100 ms slices, a slice over quota lasts as long as its bytes are worth")
    func rateLimit() {
        var r = RateLimit()
        // 1 MiB/s: quota 104857.6 bytes per slice.
        #expect(r.delay(speed: 1 << 20, bytes: 50_000, now: 1_000_000_000) == 0)
        let d = r.delay(speed: 1 << 20, bytes: 200_000, now: 1_000_000_000)
        // 250000 bytes are 2.384 slices: the slice ends 238.4 ms after it began.
        #expect(d > 238_000_000 && d < 239_000_000)
        #expect(r.delay(speed: 0, bytes: 1 << 30, now: 0) == 0)
    }
}
