#if canImport(Glibc)
import Glibc
#endif
import Foundation
import NBDProtocol

/// A blocking NBD client over a raw socket, able to send anything (hostile
/// clients, byte-exact transcripts). Every read has a timeout.
final class RawClient {
    let fd: Int32
    var timeout: Double = 5

    init(unixPath: String) throws {
        fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { p in
            for (i, b) in unixPath.utf8.enumerated() { p[i] = b }
        }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        if rc != 0 { close(fd); throw RawClientError("connect \(unixPath): errno \(errno)") }
    }

    init(port: Int) throws {
        fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = in_port_t(UInt16(port).bigEndian)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        if rc != 0 { close(fd); throw RawClientError("connect port \(port): errno \(errno)") }
    }

    deinit { close(fd) }

    /// Sends everything; false if the peer is gone (EPIPE/ECONNRESET).
    @discardableResult
    func send(_ bytes: [UInt8]) -> Bool {
        var sent = 0
        while sent < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress! + sent, bytes.count - sent, Int32(MSG_NOSIGNAL)) }
            if n <= 0 { return false }
            sent += n
        }
        return true
    }

    func shutdownWrite() { shutdown(fd, Int32(SHUT_WR)) }

    /// Reads exactly `n` bytes, or fewer on EOF / error / timeout.
    func recv(_ n: Int) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: n)
        var got = 0
        while got < n {
            var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            if poll(&pfd, 1, Int32(timeout * 1000)) <= 0 { break }
            let r = out.withUnsafeMutableBytes { Glibc.recv(fd, $0.baseAddress! + got, n - got, 0) }
            if r <= 0 { break }
            got += r
        }
        return Array(out.prefix(got))
    }

    /// True when the server closed the connection (EOF or reset) within the timeout.
    func isClosed() -> Bool {
        var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        if poll(&pfd, 1, Int32(timeout * 1000)) <= 0 { return false }
        var b: UInt8 = 0
        return Glibc.recv(fd, &b, 1, 0) <= 0
    }

    /// Everything the server sends until it closes or stays quiet for
    /// `quiet` seconds (`first`: how long to wait for the first byte).
    func drain(first: Double? = nil, quiet: Double = 0.5) -> (bytes: [UInt8], closed: Bool) {
        var out: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        var wait = first ?? quiet
        while true {
            var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            if poll(&pfd, 1, Int32(wait * 1000)) <= 0 { return (out, false) }
            let r = chunk.withUnsafeMutableBytes { Glibc.recv(fd, $0.baseAddress!, 65536, 0) }
            if r <= 0 { return (out, true) }
            out += chunk.prefix(r)
            wait = quiet
        }
    }

    // MARK: Protocol helpers

    /// Reads the 18-byte greeting and sends client flags.
    func greet(flags: UInt32 = 3) -> [UInt8] {
        let g = recv(18)
        var w = NBDByteWriter()
        w.u32(flags)
        send(w.bytes)
        return g
    }

    func option(_ option: UInt32, _ data: [UInt8] = []) {
        var w = NBDByteWriter()
        w.u64(NBDMagic.option)
        w.u32(option)
        w.u32(UInt32(data.count))
        w.append(data)
        send(w.bytes)
    }

    struct OptionReply: Equatable {
        var option: UInt32
        var type: UInt32
        var payload: [UInt8]
        var text: String { String(decoding: payload, as: UTF8.self) }
    }

    func optionReply() -> OptionReply? {
        let h = recv(20)
        guard h.count == 20, be64(h, 0) == NBDMagic.optionReply else { return nil }
        let length = Int(be32(h, 16))
        return OptionReply(option: be32(h, 8), type: be32(h, 12), payload: recv(length))
    }

    /// Replies up to and including an ACK or an error.
    func optionReplies() -> [OptionReply] {
        var out: [OptionReply] = []
        while let r = optionReply() {
            out.append(r)
            if r.type == NBDOptionReply.ack || r.type & 0x8000_0000 != 0 { break }
        }
        return out
    }

    /// Negotiates (structured replies, meta contexts) and GOes to `export`.
    @discardableResult
    func open(_ export: String, structured: Bool = true, meta: [String] = []) -> [OptionReply] {
        _ = greet()
        if structured {
            option(NBDOption.structuredReply)
            _ = optionReplies()
        }
        if !meta.isEmpty {
            option(NBDOption.setMetaContext, metaPayload(export, meta))
            _ = optionReplies()
        }
        option(NBDOption.go, goPayload(export))
        return optionReplies()
    }

    func request(_ type: UInt16, flags: UInt16 = 0, cookie: UInt64 = 1, offset: UInt64 = 0, length: UInt32 = 0,
                 payload: [UInt8] = []) {
        send(NBDRequest(flags: flags, type: type, cookie: cookie, offset: offset, length: length).bytes + payload)
    }

    enum Reply: Equatable {
        case simple(error: UInt32, cookie: UInt64)
        case chunk(flags: UInt16, type: UInt16, cookie: UInt64, payload: [UInt8])
        case closed
    }

    /// One reply header (simple) or one whole chunk.
    func reply() -> Reply {
        let m = recv(4)
        guard m.count == 4 else { return .closed }
        switch be32(m, 0) {
        case NBDMagic.simpleReply:
            let r = recv(12)
            guard r.count == 12 else { return .closed }
            return .simple(error: be32(r, 0), cookie: be64(r, 4))
        case NBDMagic.structuredReply:
            let r = recv(16)
            guard r.count == 16 else { return .closed }
            return .chunk(flags: UInt16(r[0]) << 8 | UInt16(r[1]), type: UInt16(r[2]) << 8 | UInt16(r[3]),
                          cookie: be64(r, 4), payload: recv(Int(be32(r, 12))))
        default:
            return .closed
        }
    }

    /// The (error, message) of a structured error chunk, if `r` is one.
    static func chunkError(_ r: Reply) -> (UInt32, String)? {
        guard case .chunk(_, let type, _, let p) = r, type == NBDReplyType.error, p.count >= 6 else { return nil }
        let n = Int(UInt16(p[4]) << 8 | UInt16(p[5]))
        return (be32(p, 0), String(decoding: p[6..<(6 + n)], as: UTF8.self))
    }
}

struct RawClientError: Error, CustomStringConvertible {
    var description: String
    init(_ d: String) { description = d }
}

func goPayload(_ export: String, requests: [UInt16] = []) -> [UInt8] {
    var w = NBDByteWriter()
    w.u32(UInt32(export.utf8.count))
    w.append(export.utf8)
    w.u16(UInt16(requests.count))
    for r in requests { w.u16(r) }
    return w.bytes
}

func metaPayload(_ export: String, _ queries: [String]) -> [UInt8] {
    var w = NBDByteWriter()
    w.u32(UInt32(export.utf8.count))
    w.append(export.utf8)
    w.u32(UInt32(queries.count))
    for q in queries {
        w.u32(UInt32(q.utf8.count))
        w.append(q.utf8)
    }
    return w.bytes
}

func be32(_ b: [UInt8], _ at: Int) -> UInt32 {
    UInt32(b[at]) << 24 | UInt32(b[at + 1]) << 16 | UInt32(b[at + 2]) << 8 | UInt32(b[at + 3])
}

func be64(_ b: [UInt8], _ at: Int) -> UInt64 { UInt64(be32(b, at)) << 32 | UInt64(be32(b, at + 4)) }
