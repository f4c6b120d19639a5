import NIOCore
import NIOPosix

/// A SwiftNIO event loop used as a Swift `TaskExecutor`: QEMU's AioContext.
///
/// A block node, the NBD connections that export it and the jobs that use it
/// share one such loop (their "home"). Socket events arrive on the loop, the
/// request's task runs on the same thread (`Task(executorPreference:)`), the
/// file syscall is issued from it and the reply is written from it: no
/// thread hop per request.
///
/// Thread: `enqueue` may be called from any thread; jobs run on the loop.
public final class EventLoopExecutor: TaskExecutor, @unchecked Sendable {
    public let eventLoop: any EventLoop

    public init(_ eventLoop: any EventLoop) {
        self.eventLoop = eventLoop
    }

    public func enqueue(_ job: consuming ExecutorJob) {
        let unowned = UnownedJob(job)
        eventLoop.execute { [self] in
            unowned.runSynchronously(on: self.asUnownedTaskExecutor())
        }
    }

    /// True when the caller runs on this executor's thread.
    public var inEventLoop: Bool { eventLoop.inEventLoop }
}

/// The daemon's threads: a NIO event-loop group whose loops double as
/// I/O threads. Loop 0 is the main loop (QMP, graph changes' I/O, and every
/// node unless an iothread is chosen).
public final class DaemonLoops: Sendable {
    public let group: MultiThreadedEventLoopGroup
    public let executors: [EventLoopExecutor]

    public init(threads: Int = 1) {
        group = MultiThreadedEventLoopGroup(numberOfThreads: max(1, threads))
        var loops: [any EventLoop] = []
        for loop in group.makeIterator() { loops.append(loop) }
        executors = loops.map { EventLoopExecutor($0) }
    }

    public var main: EventLoopExecutor { executors[0] }

    public func shutdown() async {
        try? await group.shutdownGracefully()
    }
}
