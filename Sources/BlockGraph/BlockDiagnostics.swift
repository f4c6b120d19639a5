import BlockCore
import Synchronization

/// What drivers report outside a request's result: warnings on stderr
/// (QEMU's warn_report, prefixed with the program name) and corruption
/// events (QEMU's BLOCK_IMAGE_CORRUPTED). Process-wide; set once at start.
public enum BlockDiagnostics {
    /// The program name messages start with ("qemu-img: warning: ...");
    /// empty: no prefix. Set by the tool or daemon at start.
    public static let programName = Mutex<String>("")

    /// Told about every corruption a driver signals: the driver (the caller
    /// finds its node by identity), the message, and whether it was fatal
    /// (the image got marked corrupt). Called on the driver's task; the
    /// hook must not block. Set by the storage daemon.
    public static let corruptionReporter = Mutex<(@Sendable (any BlockDriver, String, Bool) -> Void)?>(nil)

    /// Writes "<program>: warning: <message>" and a newline to stderr.
    public static func warn(_ message: String) {
        let prog = programName.withLock { $0 }
        FileHandleStderr.write((prog.isEmpty ? "" : prog + ": ") + "warning: " + message + "\n")
    }

    /// Passes a corruption event to the reporter, if one is set.
    public static func reportCorruption(_ driver: any BlockDriver, message: String, fatal: Bool) {
        let report = corruptionReporter.withLock { $0 }
        report?(driver, message, fatal)
    }
}
