import Foundation
import NBDServer
import NIOCore
import ServerKit
import TestSupport
import Testing

/// Runs a program (looked up in PATH) with a hard timeout, off the
/// cooperative pool; never inherits stdin.
func run(_ args: [String], timeout: TimeInterval = 60) async throws -> ProcessResult {
    try await withCheckedThrowingContinuation { (c: CheckedContinuation<ProcessResult, any Error>) in
        DispatchQueue.global().async {
            do { c.resume(returning: try runBlocking(args, timeout: timeout)) } catch { c.resume(throwing: error) }
        }
    }
}

func runBlocking(_ args: [String], timeout: TimeInterval) throws -> ProcessResult {
    let r = try runProcess(args, timeout: timeout)
    if r.timedOut { Issue.record("timed out after \(timeout)s: \(args.joined(separator: " "))") }
    return r
}

/// A temporary directory with a short path (UNIX socket paths are limited
/// to 107 bytes), removed when released.
final class TempDir: @unchecked Sendable {
    let path: String
    init() {
        path = "/tmp/lnbd-" + String(UUID().uuidString.prefix(8))
        try! FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }
    func file(_ name: String) -> String { path + "/" + name }
    deinit { try? FileManager.default.removeItem(atPath: path) }
}

/// An `NBDServer` on a temporary UNIX socket (and optionally loopback TCP)
/// with its own event loop.
final class ServerFixture: @unchecked Sendable {
    let loops: DaemonLoops
    let server: NBDServer
    let dir = TempDir()
    var socketPath: String { dir.file("nbd.sock") }
    private(set) var port = 0
    let messages = MessageLog()

    init(threads: Int = 1, maxRequests: Int = 16) {
        loops = DaemonLoops(threads: threads)
        server = NBDServer(loops: loops, maxRequestsPerConnection: maxRequests)
        let log = messages
        server.errorReporter = { log.append($0) }
    }

    /// Starts on the UNIX socket, or on 127.0.0.1 with a free port.
    func start(tcp: Bool = false, maxConnections: Int = 0) async throws {
        if tcp {
            try await server.start(address: .inet(host: "127.0.0.1", port: "0"), maxConnections: maxConnections)
            port = server.localAddress?.port ?? 0
        } else {
            try await server.start(address: .unix(path: socketPath), maxConnections: maxConnections)
        }
    }

    @discardableResult
    func addMemoryExport(_ name: String, size: Int64 = 64 << 20, writable: Bool = true, description: String? = nil,
                         allocationDepth: Bool = false, bitmaps: [String] = [], canMultiConn: Bool = true,
                         backingDepth: @escaping @Sendable (Int64) -> UInt32 = { _ in 0 }) throws -> MemoryBackend {
        let backend = MemoryBackend(size: size, executor: loops.main, canMultiConn: canMultiConn, bitmaps: bitmaps,
                                    backingDepth: backingDepth)
        try server.addExport(NBDExportConfig(name: name, description: description, backend: backend, writable: writable,
                                             allocationDepth: allocationDepth, bitmaps: bitmaps))
        return backend
    }

    func uri(_ export: String) -> String { "nbd+unix:///\(export)?socket=\(socketPath)" }
    func tcpURI(_ export: String) -> String { "nbd://127.0.0.1:\(port)/\(export)" }

    func shutdown() async {
        for name in server.exportNames() { try? server.removeExport(name: name, mode: .hard) }
        await server.stop()
        await loops.shutdown()
    }
}

/// Thread-safe list of messages (server diagnostics).
final class MessageLog: @unchecked Sendable {
    private let lock = NSLock()
    private var items: [String] = []
    func append(_ s: String) { lock.lock(); items.append(s); lock.unlock() }
    var all: [String] { lock.lock(); defer { lock.unlock() }; return items }
}

/// Runs `body` with a started fixture and always shuts it down.
func withServer<T>(tcp: Bool = false, maxConnections: Int = 0, threads: Int = 1,
                   _ body: (ServerFixture) async throws -> T) async throws -> T {
    let f = ServerFixture(threads: threads)
    try await f.start(tcp: tcp, maxConnections: maxConnections)
    do {
        let r = try await body(f)
        await f.shutdown()
        return r
    } catch {
        await f.shutdown()
        throw error
    }
}

/// Waits until `condition` holds (polling), up to `seconds`.
func eventually(_ seconds: Double = 5, _ condition: () -> Bool) async -> Bool {
    let deadline = Date().addingTimeInterval(seconds)
    while Date() < deadline {
        if condition() { return true }
        try? await Task.sleep(for: .milliseconds(10))
    }
    return condition()
}
