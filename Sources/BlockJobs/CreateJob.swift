import BlockCore

/// The blockdev-create job (type "create", QEMU's blockdev_create_run):
/// runs the driver's create function, then concludes; the user dismisses
/// it (QEMU's JOB_MANUAL_DISMISS). Progress is one step, counted done
/// whether or not it succeeded, as QEMU does.
public final class CreateJob: JobDriver, Sendable {
    /// The driver's create function (composed by the caller from the
    /// driver registry and the graph).
    let create: @Sendable () async throws(BlockError) -> Void

    public init(_ create: @escaping @Sendable () async throws(BlockError) -> Void) {
        self.create = create
    }

    public var type: JobType { .create }

    public func run(_ job: Job) async throws(BlockError) {
        job.progressSetRemaining(1)
        defer { job.progressUpdate(1) }
        try await create()
    }
}
