#if canImport(Glibc)
import Glibc
#endif
import CLaminaSys
import DequeModule
import Synchronization

/// A dedicated OS thread that runs Swift tasks (QEMU's IOThread /
/// AioContext). Blocking file syscalls are issued from here, never from the
/// cooperative pool. Use it with `Task(executorPreference:)`,
/// `group.addTask(executorPreference:)` or `withTaskExecutorPreference`:
/// every nonisolated async function the task calls then runs on this thread
/// without further hops.
public final class IOThread: TaskExecutor, @unchecked Sendable {
    // Guarded by `mutex`.
    private var queue: Deque<UnownedJob> = []
    private var stopping = false
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private let cond: UnsafeMutablePointer<pthread_cond_t>
    private var thread: pthread_t?
    public let name: String

    public init(name: String = "iothread") {
        self.name = name
        mutex = .allocate(capacity: 1)
        cond = .allocate(capacity: 1)
        pthread_mutex_init(mutex, nil)
        pthread_cond_init(cond, nil)
        let box = Unmanaged.passRetained(self)
        var tid = pthread_t()
        let rc = pthread_create(&tid, nil, { arg in
            let me = Unmanaged<IOThread>.fromOpaque(arg!).takeRetainedValue()
            me.run()
            return nil
        }, box.toOpaque())
        precondition(rc == 0, "pthread_create failed")
        thread = tid
    }

    deinit {
        pthread_mutex_destroy(mutex)
        pthread_cond_destroy(cond)
        mutex.deallocate()
        cond.deallocate()
    }

    public func enqueue(_ job: consuming ExecutorJob) {
        let unowned = UnownedJob(job)
        pthread_mutex_lock(mutex)
        queue.append(unowned)
        pthread_cond_signal(cond)
        pthread_mutex_unlock(mutex)
    }

    /// Stops the thread after the queued jobs have run.
    public func shutdown() {
        pthread_mutex_lock(mutex)
        stopping = true
        pthread_cond_signal(cond)
        pthread_mutex_unlock(mutex)
    }

    private func run() {
        lamina_set_thread_name(name)
        let executor = asUnownedTaskExecutor()
        var batch: Deque<UnownedJob> = []
        while true {
            pthread_mutex_lock(mutex)
            while queue.isEmpty && !stopping {
                pthread_cond_wait(cond, mutex)
            }
            if queue.isEmpty && stopping {
                pthread_mutex_unlock(mutex)
                return
            }
            swap(&batch, &queue)
            pthread_mutex_unlock(mutex)
            while let job = batch.popFirst() {
                job.runSynchronously(on: executor)
            }
        }
    }
}

/// A fixed set of I/O threads; requests are spread over them by the caller.
public final class IOThreadPool: Sendable {
    public let threads: [IOThread]

    public init(count: Int, name: String = "iothread") {
        threads = (0..<max(1, count)).map { IOThread(name: "\(name)-\($0)") }
    }

    public subscript(_ i: Int) -> IOThread { threads[i % threads.count] }

    public func shutdown() { for t in threads { t.shutdown() } }
}

/// The home of a subtree of block nodes (QEMU's AioContext): the executor
/// on which the nodes' requests, the exports serving them and the jobs
/// working on them run, so that none of them hops threads per request;
/// plus worker threads to which big blocking transfers are fanned out so
/// that several are in flight at once (QEMU's thread pool).
public final class IOContext: Sendable {
    public let executor: any TaskExecutor
    public let workers: IOThreadPool?

    public init(executor: any TaskExecutor, workers: IOThreadPool?) {
        self.executor = executor
        self.workers = workers
    }

    /// The executors parallel transfers are spread over (the workers, or
    /// the home executor when there are none).
    public var transferExecutors: [any TaskExecutor] {
        workers?.threads ?? [executor]
    }

    /// Where the `i`-th of several parallel transfers runs.
    public func worker(_ i: Int) -> any TaskExecutor {
        guard let w = workers else { return executor }
        return w[i]
    }

    public func shutdown() { workers?.shutdown() }
}
