#if canImport(Glibc)
import Glibc
#endif
import BlockCore
import LaminaJSON
import QMP
import ServerKit

/// One option of qemu-storage-daemon's command line, in the order given
/// ("things must be defined first before they can be referenced").
public enum DaemonOption: Equatable, Sendable {
    case blockdev(String)
    case chardev(String)
    case monitor(String)
    case nbdServer(String)
    case export(String)
    case object(String)
    case pidfile(String)
    case daemonize
    case trace(String)
    case quickstart
    case help
    case version
}

/// A command-line mistake: printed as "<prog>: <message>", exit 1.
public struct UsageError: Error {
    public var message: String
    /// getopt's own message: QEMU lets getopt print it, naming the program
    /// as invoked (argv[0]) rather than by its short name.
    public var fromGetopt = false
}

/// getopt_long as QEMU uses it for qemu-storage-daemon: long options take
/// their argument as the next word or after '='; -h/-V/-T short forms.
public enum DaemonCommandLine {
    static let withArgument: [String: @Sendable (String) -> DaemonOption] = [
        "blockdev": { .blockdev($0) }, "chardev": { .chardev($0) }, "monitor": { .monitor($0) },
        "nbd-server": { .nbdServer($0) }, "export": { .export($0) }, "object": { .object($0) },
        "pidfile": { .pidfile($0) }, "trace": { .trace($0) },
    ]

    public static func parse(_ args: [String]) throws(UsageError) -> [DaemonOption] {
        var out: [DaemonOption] = []
        var i = 0
        var positional: [String] = []
        while i < args.count {
            let a = args[i]
            i += 1
            if a == "--" {
                positional += args[i...]
                break
            }
            if a.hasPrefix("--") {
                var name = String(a.dropFirst(2))
                var value: String?
                if let eq = name.firstIndex(of: "=") {
                    value = String(name[name.index(after: eq)...])
                    name = String(name[..<eq])
                }
                switch name {
                case "help": out.append(.help); continue
                case "version": out.append(.version); continue
                case "daemonize": out.append(.daemonize); continue
                case "quickstart": out.append(.quickstart); continue
                default: break
                }
                guard let make = withArgument[name] else {
                    throw UsageError(message: "unrecognized option '\(a)'", fromGetopt: true)
                }
                if value == nil {
                    guard i < args.count else { throw UsageError(message: "option '--\(name)' requires an argument", fromGetopt: true) }
                    value = args[i]
                    i += 1
                }
                out.append(make(value!))
            } else if a.hasPrefix("-") && a.count > 1 {
                var rest = Substring(a.dropFirst())
                while let c = rest.first {
                    rest = rest.dropFirst()
                    switch c {
                    case "h": out.append(.help)
                    case "V": out.append(.version)
                    case "T":
                        var v = String(rest)
                        rest = ""
                        if v.isEmpty {
                            guard i < args.count else { throw UsageError(message: "option requires an argument -- 'T'", fromGetopt: true) }
                            v = args[i]
                            i += 1
                        }
                        out.append(.trace(v))
                    default:
                        throw UsageError(message: "invalid option -- '\(c)'", fromGetopt: true)
                    }
                }
            } else {
                positional.append(a)
            }
        }
        if let p = positional.first {
            throw UsageError(message: "\(p): Unexpected argument")
        }
        return out
    }

    static let usage = """
        Usage: lamina-storage-daemon [options]
        Lamina storage daemon (qemu-storage-daemon compatible)

          -h, --help             display this help and exit
          -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                                 accepted for compatibility; Lamina has no trace events
          -V, --version          output version information and exit

          --blockdev [driver=]<driver>[,node-name=<N>][,discard=ignore|unmap]
                     [,cache.direct=on|off][,cache.no-flush=on|off]
                     [,read-only=on|off][,auto-read-only=on|off]
                     [,force-share=on|off][,detect-zeroes=on|off|unmap]
                     [,driver specific parameters...]
                                 configure a block backend
                                 (drivers: file, raw, qcow2, null-co)

          --chardev socket,id=<id>,path=<path>[,server=on][,wait=off]
          --chardev socket,id=<id>,host=<host>,port=<port>[,server=on][,wait=off]
                                 configure a socket for a QMP monitor

          --daemonize            daemonize the process, and have the parent exit
                                 once startup is complete

          --export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>]
                   [,writable=on|off][,description=<text>][,allocation-depth=on|off]
                                 export the specified block node over NBD
                                 (requires --nbd-server)

          --monitor [chardev=]name[,mode=control][,pretty[=on|off]]
                                 configure a QMP monitor

          --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>
                       [,max-connections=<n>]
          --nbd-server addr.type=unix,addr.path=<path>[,max-connections=<n>]
                                 start an NBD server for exporting block nodes

          --pidfile <path>       write process ID to a file after startup

          --quickstart           Lamina: create a scratch qcow2, export it over NBD
                                 and open a QMP socket, then print how to connect

        Lamina implements QEMU 7.2's QMP and NBD for these drivers and exports.

        """
}

/// --chardev in QemuOpts syntax: "socket,id=x,path=/p,server=on,wait=off".
struct ChardevSpec: Equatable {
    var id: String
    var address: ListenAddress

    /// QEMU's deprecation warnings (short-form booleans such as `server`).
    var warnings: [String] = []

    static func parse(_ text: String) throws(UsageError) -> ChardevSpec {
        // QemuOpts syntax: ",," escapes a comma, the first bare word is the backend.
        let parsed: QemuOpts
        do throws(QMPError) {
            parsed = try QemuOpts.parse(text, spec: .chardev)
        } catch {
            throw UsageError(message: String(error.desc.split(separator: "\n").first ?? ""))
        }
        if parsed.help {
            throw UsageError(message: "chardev: help is not available in Lamina")
        }
        var opts: [String: String] = [:]
        for (k, v) in parsed.options { opts[k] = v }
        if let id = parsed.id { opts["id"] = id }
        guard let backend = opts.removeValue(forKey: "backend") else { throw UsageError(message: "chardev: \"\(text)\" missing backend") }
        guard let id = opts["id"] else { throw UsageError(message: "Parameter 'id' is missing") }
        guard backend == "socket" else {
            throw UsageError(message: "chardev '\(id)': backend '\(backend)' is not supported by Lamina (use socket)")
        }
        if opts["server"] != nil, (try? parsed.bool("server")) != true {
            throw UsageError(message: "chardev '\(id)': only server sockets (server=on) are supported by Lamina")
        }
        if let path = opts["path"] {
            return ChardevSpec(id: id, address: .unix(path: path), warnings: parsed.warnings)
        }
        if let port = opts["port"] {
            return ChardevSpec(id: id, address: .inet(host: opts["host"] ?? "", port: port), warnings: parsed.warnings)
        }
        throw UsageError(message: "chardev: socket: no host given")
    }
}
