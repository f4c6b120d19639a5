#if canImport(Glibc)
import Glibc
#endif
import BlockCore
import BlockDrivers
import BlockGraph
import BlockIO
import FileDriver
import Synchronization

/// A user-facing failure: message printed as "<prog>: <message>", exit code.
struct ToolError: Error {
    var message: String
    var exitCode: Int32 = 1
    /// Print "Try '<prog> --help' for more information" after the message.
    var showHelpHint = false
    /// The message ends without a newline (QEMU hints printed verbatim).
    var noNewline = false

    init(message: String, exitCode: Int32 = 1, showHelpHint: Bool = false, noNewline: Bool = false) {
        self.message = message
        self.exitCode = exitCode
        self.showHelpHint = showHelpHint
        self.noNewline = noNewline
    }
}

/// State shared by the subcommands of one invocation.
struct ToolContext {
    var progName: String

    func fail(_ message: String) -> ToolError { ToolError(message: message) }

    /// Prints an error the way qemu-img does and returns its exit code.
    func report(_ e: ToolError) -> Int32 {
        StdoutBuffer.shared.flush()
        FileHandleStderr.write("\(progName): \(e.message)" + (e.noNewline ? "" : "\n"))
        if e.showHelpHint {
            FileHandleStderr.write("Try '\(progName) --help' for more information\n")
        }
        return e.exitCode
    }

    func usage(_ message: String) -> ToolError {
        ToolError(message: message, exitCode: 1, showHelpHint: true)
    }

    func parse(_ args: [String], short: String, long: [GetOpt.LongOption] = []) throws(ToolError) -> GetOpt {
        do {
            return try GetOpt(args, short: short, long: long)
        } catch {
            switch error {
            case .missingArgument(let o): throw usage("missing argument for option '\(o)'")
            case .unrecognized(let o): throw usage("unrecognized option '\(o)'")
            }
        }
    }
}

/// Parses a size argument the way qemu-img's cvtnum does, with its messages.
func cvtnum(_ name: String, _ text: String) throws(ToolError) -> Int64 {
    do {
        let r = try parseSize(text)
        if r.hexWithSuffix {
            FileHandleStderr.write("\(ProgName.current): warning: Using a multiplier suffix on hex numbers is deprecated: \(text)\n")
        }
        return Int64(r.value)
    } catch {
        switch error {
        case .overflow:
            throw ToolError(message: "Invalid \(name) specified. Must be between 0 and \(Int64.max).")
        case .syntax:
            throw ToolError(message: "Invalid \(name) specified. You may use k, M, G, T, P or E suffixes for\n\(ProgName.current): kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")
        }
    }
}

enum ProgName {
    nonisolated(unsafe) static var current = "lamina-img" {
        didSet { BlockDiagnostics.programName.withLock { $0 = current } }
    }
}

/// Cache mode strings (-t / -T) as QEMU understands them.
struct CacheMode {
    var direct: Bool
    var noFlush: Bool

    static func parse(_ s: String) -> CacheMode? {
        switch s {
        case "none", "off": return CacheMode(direct: true, noFlush: false)
        case "writeback": return CacheMode(direct: false, noFlush: false)
        case "writethrough": return CacheMode(direct: false, noFlush: false)
        case "directsync": return CacheMode(direct: true, noFlush: false)
        case "unsafe": return CacheMode(direct: false, noFlush: true)
        default: return nil
        }
    }
}

/// Opens an image for a command, with qemu-img's error phrasing.
func openImage(_ filename: String, format: String?, readOnly: Bool, forceShare: Bool = false,
               cache: CacheMode? = nil, noBacking: Bool = false, checkMode: Bool = false,
               noIO: Bool = false, unmap: Bool = false) async throws(ToolError) -> BlockNode {
    var o = ImageOpenOptions()
    o.unmap = unmap
    o.noIO = noIO
    o.format = format
    o.readOnly = readOnly
    o.forceShare = forceShare
    o.noBacking = noBacking
    o.checkMode = checkMode
    if let c = cache {
        o.cacheDirect = c.direct
        o.noFlush = c.noFlush
    }
    do throws(BlockError) {
        return try await ImageOpener.open(filename, o)
    } catch {
        throw ToolError(message: "Could not open '\(filename)': " + error.message)
    }
}

func closeQuietly(_ node: BlockNode?) async {
    guard let n = node else { return }
    try? await n.close()
}

/// Validates a format name given with -f for opening `filename`.
func checkFormat(_ f: String?, _ filename: String? = nil) throws(ToolError) {
    guard let f else { return }
    if !["qcow2", "raw", "file"].contains(f) {
        if let n = filename { throw ToolError(message: "Could not open '\(n)': Unknown driver '\(f)'") }
        throw ToolError(message: "Unknown file format '\(f)'")
    }
}

