#if canImport(Glibc)
import Glibc
#endif
import LaminaJSON

/// A failure of `QMPClient` itself (connection, timeout, bad line).
public struct QMPClientError: Error, CustomStringConvertible, Sendable {
    public var description: String
    public init(_ d: String) { description = d }
}

/// A tiny blocking QMP client for tests (of this module, the daemon and
/// against qemu-storage-daemon): connect to a UNIX socket, read the
/// greeting, negotiate, execute commands, collect events.
///
/// Every read waits at most `timeout` seconds. Blocking calls: never use
/// it on an event loop or the cooperative pool's threads for long. It may
/// be handed from thread to thread but must not be used concurrently.
public final class QMPClient: @unchecked Sendable {
    private var fd: Int32
    private var buffer: [UInt8] = []
    /// Bytes of `buffer` already searched for a newline.
    private var scanned = 0
    public var timeout: Double
    /// The greeting received on connect.
    public private(set) var greeting: JSON = .null
    /// Events received so far (while waiting for responses), oldest first.
    public var events: [JSON] = []

    /// Connects and reads the greeting (unless `readGreeting` is false).
    public init(unixPath: String, timeout: Double = 60, readGreeting: Bool = true) throws {
        self.timeout = timeout
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let path = Array(unixPath.utf8)
        guard path.count < MemoryLayout.size(ofValue: addr.sun_path) else {
            throw QMPClientError("path too long: \(unixPath)")
        }
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in path.enumerated() { raw[i] = b }
        }
        // Close-on-exec: a child spawned meanwhile must not keep this
        // connection open (a QEMU monitor serves one client at a time).
        // A socket file that exists but does not listen yet (between
        // bind and listen) is retried for a few seconds.
        let deadline = ContinuousClock.now + .milliseconds(Int(min(timeout, 10) * 1000))
        while true {
            let s = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            guard s >= 0 else { throw QMPClientError("socket: errno \(errno)") }
            let rc = withUnsafePointer(to: &addr) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    connect(s, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
                }
            }
            if rc == 0 {
                fd = s
                break
            }
            let e = errno
            Glibc.close(s)
            if (e == ECONNREFUSED || e == ENOENT) && ContinuousClock.now < deadline {
                usleep(20_000)
                continue
            }
            throw QMPClientError("connect \(unixPath): errno \(e)")
        }
        if readGreeting { greeting = try readMessage() }
    }

    deinit { if fd >= 0 { Glibc.close(fd) } }

    /// Closes the connection.
    public func close() {
        if fd >= 0 { Glibc.close(fd); fd = -1 }
    }

    /// Half-closes the sending side (the server sees end of input).
    public func shutdownWrite() { if fd >= 0 { shutdown(fd, Int32(SHUT_WR)) } }

    /// Sends raw bytes.
    public func send(_ bytes: [UInt8]) throws {
        var off = 0
        while off < bytes.count {
            let n = bytes[off...].withUnsafeBytes { Glibc.send(fd, $0.baseAddress!, $0.count, Int32(MSG_NOSIGNAL)) }
            if n < 0 {
                if errno == EINTR { continue }
                throw QMPClientError("send: errno \(errno)")
            }
            off += n
        }
    }

    public func send(_ text: String) throws { try send(Array(text.utf8)) }

    /// The next line, without its CR LF; throws on timeout or end of stream.
    public func readLine() throws -> [UInt8] {
        while true {
            if let nl = buffer[scanned...].firstIndex(of: 0x0A) {
                var line = Array(buffer[..<nl])
                buffer.removeFirst(nl + 1)
                scanned = 0
                if line.last == 0x0D { line.removeLast() }
                return line
            }
            var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let r = poll(&pfd, 1, Int32(timeout * 1000))
            if r == 0 { throw QMPClientError("timed out after \(timeout)s waiting for a QMP line") }
            if r < 0 {
                if errno == EINTR { continue }
                throw QMPClientError("poll: errno \(errno)")
            }
            var chunk = [UInt8](repeating: 0, count: 1 << 16)
            let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress!, $0.count, 0) }
            if n == 0 { throw QMPClientError("connection closed by the server") }
            if n < 0 {
                if errno == EINTR { continue }
                throw QMPClientError("recv: errno \(errno)")
            }
            scanned = buffer.count
            buffer += chunk[..<n]
        }
    }

    /// The next message (response or event) as JSON.
    public func readMessage() throws -> JSON {
        let line = try readLine()
        do {
            return try JSON.parse(String(decoding: line, as: UTF8.self))
        } catch {
            throw QMPClientError("bad QMP line: \(String(decoding: line.prefix(200), as: UTF8.self))")
        }
    }

    /// The next response; events met on the way are appended to `events`.
    public func readResponse() throws -> JSON {
        while true {
            let m = try readMessage()
            if m["event"] != nil { events.append(m) } else { return m }
        }
    }

    /// Sends a command and returns the whole response object.
    public func execute(_ command: String, _ arguments: JSON? = nil, id: JSON? = nil) throws -> JSON {
        var req: JSON = ["execute": .string(command)]
        if let arguments { req["arguments"] = arguments }
        if let id { req["id"] = id }
        try send(req.qmpLine())
        return try readResponse()
    }

    /// Sends a command; returns its `return` value or throws its `QMPError`.
    @discardableResult
    public func call(_ command: String, _ arguments: JSON? = nil) throws -> JSON {
        let r = try execute(command, arguments)
        if let value = r["return"] { return value }
        if let e = r["error"], let cls = e["class"]?.stringValue, let desc = e["desc"]?.stringValue {
            throw QMPError(QMPError.Class(rawValue: cls) ?? .genericError, desc)
        }
        throw QMPClientError("unexpected response \(r)")
    }

    /// `qmp_capabilities` (optionally enabling capabilities).
    public func negotiate(enable: [String] = []) throws {
        try call("qmp_capabilities", enable.isEmpty ? nil : ["enable": .array(enable.map { .string($0) })])
    }

    /// Waits for an event named `name` (already received or arriving),
    /// removes it from `events` and returns it.
    public func waitEvent(_ name: String) throws -> JSON {
        while true {
            if let i = events.firstIndex(where: { $0["event"]?.stringValue == name }) {
                return events.remove(at: i)
            }
            let m = try readMessage()
            if m["event"] != nil { events.append(m) } else {
                throw QMPClientError("unexpected response while waiting for \(name): \(m)")
            }
        }
    }
}
