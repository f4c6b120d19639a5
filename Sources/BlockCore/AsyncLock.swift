import DequeModule
import Synchronization

/// A FIFO mutual-exclusion lock that may be held across `await`
/// (QEMU's `CoMutex`). Uncontended acquire/release is one `Mutex` operation;
/// a contended acquire suspends the task instead of blocking its thread.
public final class AsyncLock: Sendable {
    private struct State {
        var locked = false
        var waiters: Deque<UnsafeContinuation<Void, Never>> = []
    }

    private let state = Mutex(State())

    public init() {}

    public func lock() async {
        let acquired = state.withLock { s -> Bool in
            if s.locked { return false }
            s.locked = true
            return true
        }
        if acquired { return }
        await withUnsafeContinuation { (c: UnsafeContinuation<Void, Never>) in
            let now = state.withLock { s -> Bool in
                if !s.locked {
                    s.locked = true
                    return true
                }
                s.waiters.append(c)
                return false
            }
            if now { c.resume() }
        }
    }

    /// Releases the lock; ownership passes directly to the oldest waiter.
    public func unlock() {
        let next = state.withLock { s -> UnsafeContinuation<Void, Never>? in
            precondition(s.locked, "AsyncLock.unlock() while not locked")
            if let w = s.waiters.popFirst() { return w }
            s.locked = false
            return nil
        }
        next?.resume()
    }

    public func withLock<R, E: Error>(_ body: () async throws(E) -> R) async throws(E) -> R {
        await lock()
        defer { unlock() }
        return try await body()
    }
}

/// A one-shot event: tasks `wait()` until someone calls `signal()`; waiting
/// after the signal returns at once. Used for "wait until this in-flight
/// request finishes" (QEMU's dependent-request queues).
public final class AsyncEvent: Sendable {
    private struct State {
        var signalled = false
        var waiters: [UnsafeContinuation<Void, Never>] = []
    }

    private let state = Mutex(State())

    public init() {}

    public var isSignalled: Bool { state.withLock { $0.signalled } }

    public func wait() async {
        if state.withLock({ $0.signalled }) { return }
        await withUnsafeContinuation { (c: UnsafeContinuation<Void, Never>) in
            let done = state.withLock { s -> Bool in
                if s.signalled { return true }
                s.waiters.append(c)
                return false
            }
            if done { c.resume() }
        }
    }

    public func signal() {
        let waiters = state.withLock { s -> [UnsafeContinuation<Void, Never>] in
            s.signalled = true
            let w = s.waiters
            s.waiters = []
            return w
        }
        for w in waiters { w.resume() }
    }
}
