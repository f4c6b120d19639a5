import BlockCore
import BlockIO
import Synchronization
import Testing

/// A counter deliberately updated without atomics: only correct if the
/// caller provides mutual exclusion.
private final class UnsafeCounter: @unchecked Sendable {
    var value = 0
}

/// Shared test state (atomics and mutexes cannot be captured by escaping closures directly).
private final class Shared<T: Sendable>: Sendable {
    let a = Atomic<Int>(0)
    let b = Atomic<Int>(0)
    let list: Mutex<[T]>
    init(_ initial: [T] = []) { list = Mutex(initial) }
    var values: [T] { list.withLock { $0 } }
    func append(_ v: T) { list.withLock { $0.append(v) } }
}

@Suite("AsyncLock and AsyncEvent")
struct AsyncLockTests {
    @Test("mutual exclusion under many concurrent tasks (suspending inside the critical section)")
    func mutualExclusion() async {
        let lock = AsyncLock()
        let shared = Shared<Int>()
        let counter = UnsafeCounter()
        let pool = IOThreadPool(count: 3, name: "lock-test")
        defer { pool.shutdown() }
        let tasks = 400
        let rounds = 5
        await withTaskGroup(of: Void.self) { group in
            for t in 0..<tasks {
                // Mix the global executor and dedicated threads.
                let body: @Sendable () async -> Void = {
                    for _ in 0..<rounds {
                        await lock.lock()
                        if shared.a.add(1, ordering: .sequentiallyConsistent).newValue != 1 {
                            shared.b.add(1, ordering: .relaxed)
                        }
                        let v = counter.value
                        await Task.yield()
                        counter.value = v + 1
                        shared.a.subtract(1, ordering: .sequentiallyConsistent)
                        lock.unlock()
                    }
                }
                if t % 2 == 0 {
                    group.addTask(executorPreference: pool[t], operation: body)
                } else {
                    group.addTask(operation: body)
                }
            }
        }
        #expect(shared.b.load(ordering: .relaxed) == 0)
        #expect(counter.value == tasks * rounds)
    }

    @Test("withLock returns the body's value, rethrows typed errors and releases the lock")
    func withLockReleases() async {
        struct Boom: Error, Equatable {}
        let lock = AsyncLock()
        let v = await lock.withLock { 42 }
        #expect(v == 42)
        do {
            try await lock.withLock { () async throws(Boom) in throw Boom() }
            Issue.record("expected a throw")
        } catch {
            #expect(error == Boom())
        }
        // Released after the throw: this must not hang.
        await lock.lock()
        lock.unlock()
    }

    /// All tasks run on one serial thread, so each waiter is enqueued before
    /// the next is created: the acquisition order must be creation order.
    @Test("waiters acquire in FIFO order; unlock hands ownership to the oldest waiter (no barging)")
    func fifoHandoff() async {
        let thread = IOThread(name: "fifo-test")
        defer { thread.shutdown() }
        let order = Shared<Int>()
        await withTaskExecutorPreference(thread) {
            let lock = AsyncLock()
            await lock.lock()
            let n = 12
            var tasks: [Task<Void, Never>] = []
            for i in 0..<n {
                let ready = AsyncEvent()
                tasks.append(Task(executorPreference: thread) {
                    ready.signal()
                    await lock.lock()
                    order.append(i)
                    await Task.yield()
                    lock.unlock()
                })
                await ready.wait()
            }
            // Release and immediately try again: with direct handoff the lock
            // is already owned by waiter 0, so we must queue behind all of them.
            lock.unlock()
            await lock.lock()
            order.append(-1)
            lock.unlock()
            for t in tasks { await t.value }
        }
        #expect(order.values == Array(0..<12) + [-1])
    }

    @Test("every queued waiter is eventually woken exactly once")
    func allWaitersWake() async {
        let lock = AsyncLock()
        let shared = Shared<Int>()
        await lock.lock()
        let n = 64
        await withTaskGroup(of: Void.self) { group in
            for i in 0..<n {
                group.addTask {
                    shared.a.add(1, ordering: .relaxed)
                    await lock.lock()
                    shared.append(i)
                    lock.unlock()
                }
            }
            while shared.a.load(ordering: .relaxed) < n { await Task.yield() }
            lock.unlock()
        }
        #expect(shared.values.sorted() == Array(0..<n))
        // Lock is free again.
        await lock.lock()
        lock.unlock()
    }

    @Test("AsyncEvent: wait after signal returns at once; all waiters resume; signal is idempotent")
    func event() async {
        let ev = AsyncEvent()
        #expect(!ev.isSignalled)
        let shared = Shared<Int>()
        let n = 50
        await withTaskGroup(of: Void.self) { group in
            for _ in 0..<n {
                group.addTask {
                    shared.a.add(1, ordering: .relaxed)
                    await ev.wait()
                    shared.b.add(1, ordering: .relaxed)
                }
            }
            while shared.a.load(ordering: .relaxed) < n { await Task.yield() }
            try? await Task.sleep(for: .milliseconds(5))
            #expect(shared.b.load(ordering: .relaxed) == 0)
            ev.signal()
        }
        #expect(shared.b.load(ordering: .relaxed) == n)
        #expect(ev.isSignalled)
        ev.signal()
        #expect(ev.isSignalled)
        await ev.wait()  // already signalled: immediate
    }

    @Test("AsyncEvent: a waiter suspended on a serial thread is resumed by a signal from another task")
    func eventAcrossTasks() async {
        let thread = IOThread(name: "event-test")
        defer { thread.shutdown() }
        let ev = AsyncEvent()
        let order = Shared<String>()
        await withTaskExecutorPreference(thread) {
            let waiter = Task(executorPreference: thread) {
                order.append("wait")
                await ev.wait()
                order.append("woke")
            }
            await Task.yield()
            order.append("signal")
            ev.signal()
            await waiter.value
        }
        #expect(order.values == ["wait", "signal", "woke"])
    }
}
