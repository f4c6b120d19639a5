import BlockCore
import BlockJobs
import LaminaJSON
import QMP

/// Connects the QMP server to the daemon: commands from every monitor run
/// one at a time on the control actor (QEMU runs them under its big lock),
/// so a graph change never interleaves with another command.
public final class DaemonDispatcher: QMPDispatcher, Sendable {
    let daemon: Daemon
    private let serial = AsyncLock()

    /// Fixed at start-up (the table never changes).
    public let commandNames: [String]

    @ControlActor
    public init(daemon: Daemon) {
        self.daemon = daemon
        self.commandNames = ["qmp_capabilities"] + Commands.table.map(\.0)
    }

    public func dispatch(_ command: String, arguments: JSON, monitor: QMPMonitorInfo) async -> QMPReply {
        await serial.lock()
        defer { serial.unlock() }
        return await run(command, arguments)
    }

    @ControlActor
    private func run(_ command: String, _ arguments: JSON) async -> QMPReply {
        guard let handler = Commands.handler(command) else {
            return .failure(QMPError.commandNotFound(command))
        }
        do throws(QMPError) {
            let input = try QAPIInput(arguments)
            let result = try await handler(daemon, input)
            if command == "quit" {
                let d = daemon
                // qemu-storage-daemon deletes its exports (BLOCK_EXPORT_DELETED)
                // before quit's answer goes out.
                await d.exports.removeAll()
                // ... and cancels its jobs (BLOCK_JOB_CANCELLED), too.
                await d.jobs.cancelAllAndWait()
                return .success(result, afterSend: { Task { @ControlActor in await d.quit() } })
            }
            return .success(result)
        } catch {
            return .failure(error)
        }
    }
}
