import BlockCore
import BlockGraph
import NBDServer
import LaminaJSON
import QMP
import ServerKit

/// NBD server and block export commands (QAPI block-export.json).
@ControlActor
enum ExportCommands {
    static let table: [(String, CommandHandler)] = [
        ("nbd-server-start", { d, a throws(QMPError) in
            let addr = try a.object("addr") { (s: QAPIInput) throws(QMPError) in try parseLegacyAddress(s) }
            if a.has("tls-creds") || a.has("tls-authz") {
                _ = try a.optionalString("tls-creds")
                _ = try a.optionalString("tls-authz")
                throw QMPError("TLS is not supported by Lamina's NBD server")
            }
            let max = try a.optionalInteger("max-connections", as: UInt32.self) ?? 0
            try a.finish()
            try await d.nbdServerStart(addr, maxConnections: Int(max))
            return .emptyObject
        }),
        ("nbd-server-stop", { d, a throws(QMPError) in
            try a.finish()
            try await d.nbdServerStop()
            return .emptyObject
        }),
        ("block-export-add", { d, a throws(QMPError) in
            let o = try parseExport(a)
            try a.finish()
            try await Commands.qmp { () async throws(BlockError) in try await d.exports.add(o) }
            return .emptyObject
        }),
        ("block-export-del", { d, a throws(QMPError) in
            let id = try a.string("id")
            let mode = try a.optionalEnumValue("mode", allowed: ["safe", "hard"]) ?? "safe"
            try a.finish()
            try await d.exportDel(id, hard: mode == "hard")
            return .emptyObject
        }),
        ("nbd-server-add", { d, a throws(QMPError) in
            let device = try a.string("device")
            var o = NBDExportOptions(id: "", nodeName: device)
            o.legacy = true
            o.name = try a.optionalString("name")
            o.description = try a.optionalString("description")
            o.writable = try a.optionalBool("writable") ?? false
            if let b = try a.optionalString("bitmap") { o.bitmaps = [b] }
            try a.finish()
            o.id = o.name ?? device
            try await Commands.qmp { () async throws(BlockError) in try await d.exports.add(o) }
            return .emptyObject
        }),
        ("nbd-server-remove", { d, a throws(QMPError) in
            let name = try a.string("name")
            let mode = try a.optionalEnumValue("mode", allowed: ["safe", "hard"]) ?? "safe"
            try a.finish()
            try await d.exportDel(name, hard: mode == "hard")
            return .emptyObject
        }),
        ("query-block-exports", { d, a throws(QMPError) in
            try a.finish()
            return .array(d.exports.exports.map { e in
                .object([("id", .string(e.id)), ("type", .string("nbd")), ("node-name", .string(e.node.nodeName)),
                         ("shutting-down", .bool(e.shuttingDown))])
            })
        }),
    ]

    /// QAPI BlockExportOptions with type nbd (the only type Lamina serves).
    static func parseExport(_ a: QAPIInput) throws(QMPError) -> NBDExportOptions {
        let type = try a.enumValue("type", allowed: ["nbd", "vhost-user-blk", "fuse", "vduse-blk"])
        let id = try a.string("id")
        _ = try a.optionalBool("fixed-iothread")
        if a.has("iothread") {
            _ = try a.optionalString("iothread")
        }
        var o = NBDExportOptions(id: id, nodeName: try a.string("node-name"))
        o.writable = try a.optionalBool("writable") ?? false
        o.writethrough = try a.optionalBool("writethrough") ?? false
        guard type == "nbd" else {
            throw QMPError("Export type '\(type)' is not supported by Lamina (supported: nbd)")
        }
        o.name = try a.optionalString("name")
        o.description = try a.optionalString("description")
        o.bitmaps = try a.optionalList("bitmaps") { (v: QAPIValue) throws(QMPError) in try v.string() } ?? []
        o.allocationDepth = try a.optionalBool("allocation-depth") ?? false
        return o
    }

    /// SocketAddressLegacy ({"type": "unix", "data": {"path": ...}}); the
    /// flat SocketAddress form is accepted too.
    static func parseLegacyAddress(_ s: QAPIInput) throws(QMPError) -> ListenAddress {
        let type = try s.enumValue("type", allowed: ["inet", "unix", "vsock", "fd"])
        if s.has("data") || s.mode == .qobject && !s.has("path") && !s.has("host") {
            return try s.object("data") { (d: QAPIInput) throws(QMPError) in try parseAddressMembers(type, d) }
        }
        return try parseAddressMembers(type, s)
    }

    /// SocketAddress (flat): the form --nbd-server addr.* uses.
    static func parseFlatAddress(_ s: QAPIInput) throws(QMPError) -> ListenAddress {
        let type = try s.enumValue("type", allowed: ["inet", "unix", "vsock", "fd"])
        return try parseAddressMembers(type, s)
    }

    private static func parseAddressMembers(_ type: String, _ d: QAPIInput) throws(QMPError) -> ListenAddress {
        switch type {
        case "unix":
            let path = try d.string("path")
            if try d.optionalBool("abstract") == true { throw QMPError("Abstract UNIX sockets are not supported by Lamina") }
            _ = try d.optionalBool("tight")
            return .unix(path: path)
        case "inet":
            let host = try d.string("host")
            let port = try d.string("port")
            _ = try d.optionalBool("numeric")
            _ = try d.optionalInteger("to", as: UInt16.self)
            _ = try d.optionalBool("ipv4")
            _ = try d.optionalBool("ipv6")
            _ = try d.optionalBool("keep-alive")
            _ = try d.optionalBool("mptcp")
            return .inet(host: host, port: port)
        default:
            throw QMPError("Socket address type '\(type)' is not supported by Lamina (supported: unix, inet)")
        }
    }
}

extension Commands {
    static func qmpSync(_ body: () throws(BlockError) -> Void) throws(QMPError) {
        do throws(BlockError) {
            try body()
        } catch {
            throw QMPError(.genericError, qmpDescription(error))
        }
    }
}

extension Daemon {
    func nbdServerStart(_ addr: ListenAddress, maxConnections: Int) async throws(QMPError) {
        if nbd.isRunning { throw QMPError("NBD server already running") }
        unlinkSocketPath(addr)
        do {
            try await nbd.start(address: addr, maxConnections: maxConnections)
        } catch {
            throw QMPError(String(describing: error))
        }
    }

    func nbdServerStop() async throws(QMPError) {
        if !nbd.isRunning { throw QMPError("NBD server not running") }
        await exports.removeAll()
        await nbd.stop()
    }

    func exportDel(_ id: String, hard: Bool) async throws(QMPError) {
        do throws(BlockError) {
            try await exports.remove(id: id, hard: hard)
        } catch {
            throw QMPError(.genericError, Commands.qmpDescription(error))
        }
    }
}
