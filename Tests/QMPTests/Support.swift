import Foundation
import LaminaJSON
import NIOPosix
import QMP
import ServerKit
import Synchronization
import TestSupport
import Testing

/// A temporary directory (short path: UNIX socket paths are limited to
/// 107 bytes), removed when released.
final class TempDir: @unchecked Sendable {
    let path: String
    init() {
        path = "/tmp/lamina-qmp-" + String(UUID().uuidString.prefix(8))
        try! FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }
    func file(_ name: String) -> String { path + "/" + name }
    deinit { try? FileManager.default.removeItem(atPath: path) }
}

/// A dispatcher with a few commands shaped like the daemon's, enough to
/// exercise the server and to answer like QSD for argument mistakes.
final class DummyDispatcher: QMPDispatcher {
    let commandNames = ["query-version", "query-commands", "quit", "echo", "sleep", "big", "emit",
                        "blockdev-del", "query-named-block-nodes", "rendezvous"]
    /// Set after the server exists, so "emit" can send events.
    let server = Mutex<QMPServer?>(nil)
    let quitCount = Atomic<Int>(0)
    let running = Atomic<Int>(0)
    let maxRunning = Atomic<Int>(0)
    let meeting = Meeting()
    /// Per monitor: (running now, most ever running at once).
    let perMonitor = Mutex<[String: (now: Int, max: Int)]>([:])
    func maxRunning(monitor: String) -> Int { perMonitor.withLock { $0[monitor]?.max ?? 0 } }

    func dispatch(_ command: String, arguments: JSON, monitor: QMPMonitorInfo) async -> QMPReply {
        let now = running.add(1, ordering: .sequentiallyConsistent).newValue
        _ = maxRunning.max(now, ordering: .sequentiallyConsistent)
        let key = monitor.monitorID ?? ""
        perMonitor.withLock { m in
            let e = m[key] ?? (0, 0)
            m[key] = (e.now + 1, Swift.max(e.max, e.now + 1))
        }
        defer {
            running.subtract(1, ordering: .sequentiallyConsistent)
            perMonitor.withLock { m in m[key]!.now -= 1 }
        }
        do throws(QMPError) {
            let a = try QAPIInput(arguments)
            switch command {
            case "query-version":
                try a.finish()
                return .success(QMPSessionTests.version)
            case "query-commands":
                try a.finish()
                return .success(.array((["qmp_capabilities"] + commandNames).reversed().map { ["name": .string($0)] }))
            case "quit":
                try a.finish()
                return .success(afterSend: { self.quitCount.add(1, ordering: .sequentiallyConsistent) })
            case "echo":
                let v = a.optionalAny("value") ?? .null
                try a.finish()
                return .success(["value": v, "monitor": .string(monitor.monitorID ?? "")])
            case "sleep":
                let ms = try a.int64("ms")
                try a.finish()
                try? await Task.sleep(for: .milliseconds(ms))
                return .success(["slept": .int(ms)])
            case "rendezvous":
                // Returns once `count` rendezvous commands are in progress
                // at the same time (no polling: a starved cooperative pool
                // must not matter).
                let n = try a.int64("count")
                try a.finish()
                await meeting.arrive(count: Int(n))
                return .success(["met": true])
            case "big":
                let n = try a.int64("bytes")
                try a.finish()
                return .success(.string(String(repeating: "x", count: Int(n))))
            case "emit":
                let name = try a.string("event")
                let data = a.optionalAny("data")
                try a.finish()
                server.withLock { $0 }?.emit(event: name, data: data)
                return .success()
            case "blockdev-del":
                let node = try a.string("node-name")
                try a.finish()
                return .failure(QMPError("Failed to find node with node-name='\(node)'"))
            case "query-named-block-nodes":
                _ = try a.optionalBool("flat")
                try a.finish()
                return .success([])
            default:
                return .failure(.commandNotFound(command))
            }
        } catch {
            return .failure(error)
        }
    }
}

/// An in-process server with `DummyDispatcher` on one or more UNIX sockets.
final class TestServer: @unchecked Sendable {
    let dir = TempDir()
    let loops = DaemonLoops(threads: 2)
    let dispatcher = DummyDispatcher()
    let server: QMPServer

    init() {
        server = QMPServer(group: loops.group, dispatcher: dispatcher, version: QMPSessionTests.version)
        dispatcher.server.withLock { $0 = server }
    }

    /// Starts a monitor at `dir/name`; returns its path.
    @discardableResult
    func listen(_ name: String = "m.sock", id: String? = nil, style: QMPOutputStyle = .compact) async throws -> String {
        let path = dir.file(name)
        try await server.listen(on: .unix(path: path), monitorID: id, style: style)
        return path
    }

    func shutdown() async {
        await server.close()
        await loops.shutdown()
    }
}

/// Runs blocking client code off the cooperative pool.
func blocking<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { c in
        Thread.detachNewThread { c.resume(with: Result { try body() }) }
    }
}

/// A qemu-storage-daemon process with one QMP monitor, killed on release.
final class QSDProcess: @unchecked Sendable {
    let process: ChildProcess
    let socket: String

    init(dir: TempDir) throws {
        socket = dir.file("qsd.sock")
        process = try ChildProcess(["qemu-storage-daemon", "--chardev", "socket,id=m,path=\(socket),server=on,wait=off",
                                    "--monitor", "chardev=m"])
        let deadline = Date().addingTimeInterval(20)
        while !FileManager.default.fileExists(atPath: socket) {
            if Date() > deadline || process.poll() != nil { throw QMPClientError("qemu-storage-daemon did not start") }
            usleep(20_000)
        }
    }
}

/// Callers wait until `count` of them have arrived, then all go on.
final class Meeting: Sendable {
    private let state = Mutex<(arrived: Int, waiting: [CheckedContinuation<Void, Never>])>((0, []))

    func arrive(count: Int) async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            let release = state.withLock { s -> [CheckedContinuation<Void, Never>] in
                s.arrived += 1
                if s.arrived >= count {
                    defer { s.waiting = [] }
                    return s.waiting + [c]
                }
                s.waiting.append(c)
                return []
            }
            release.forEach { $0.resume() }
        }
    }
}
