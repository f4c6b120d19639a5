import LaminaJSON

/// The option names and types of a QemuOpts list (QEMU's QemuOptDesc).
public struct QemuOptsSpec: Sendable {
    public enum Kind: Sendable, Equatable { case string, bool, number, size }
    public var name: String
    /// The name a leading bare value stands for (QEMU's implied_opt_name).
    public var impliedKey: String?
    public var options: [String: Kind]

    public init(name: String, impliedKey: String?, options: [String: Kind]) {
        self.name = name
        self.impliedKey = impliedKey
        self.options = options
    }

    /// QEMU 7.2's `-chardev` options (`--chardev help` lists them).
    public static let chardev = QemuOptsSpec(name: "chardev", impliedKey: "backend", options: {
        var o: [String: Kind] = [:]
        for s in ["backend", "chardev", "fd", "host", "localaddr", "localport", "logfile", "name", "path", "port",
                  "tls-authz", "tls-creds"] { o[s] = .string }
        for b in ["abstract", "append", "clipboard", "delay", "ipv4", "ipv6", "logappend", "mouse", "mux", "nodelay",
                  "server", "signal", "telnet", "tight", "tn3270", "wait", "websocket"] { o[b] = .bool }
        for n in ["cols", "debug", "height", "reconnect", "rows", "to", "width"] { o[n] = .number }
        o["size"] = .size
        return o
    }())
}

/// QEMU's older option syntax (util/qemu-option.c), which
/// qemu-storage-daemon still uses for `--chardev`:
/// `socket,id=m,path=/x,,y,server=on,wait=off`.
///
/// Differences from keyval: no nesting; `id` is taken out; a parameter
/// without `=` is a flag (`server` means on, `nowait` means wait=off,
/// both with QEMU's deprecation warning); `help`/`?` asks for help; a
/// repeated option keeps every value and the last one counts.
public struct QemuOpts: Sendable {
    public var id: String?
    /// Options in order, `id` excluded.
    public var options: [(String, String)] = []
    /// QEMU's warnings (short-form booleans), to print after "warning: ".
    public var warnings: [String] = []
    /// "help" or "?" was given (QEMU prints the option list).
    public var help = false

    /// The last value given for `name`.
    public subscript(name: String) -> String? {
        options.last { $0.0 == name }?.1
    }

    /// A boolean option (already validated by `parse`).
    public func bool(_ name: String) throws(QMPError) -> Bool? {
        guard let v = self[name] else { return nil }
        switch v {
        case "on", "yes", "true", "y": return true
        case "off", "no", "false", "n": return false
        default: throw QMPError.invalidParameterValue(name, expects: "'on' or 'off'")
        }
    }

    /// A number option (`strtoull` base 0).
    public func number(_ name: String) throws(QMPError) -> UInt64? {
        guard let v = self[name] else { return nil }
        guard let n = CNumbers.strtou64(v, base: 0) else { throw QMPError.invalidParameterValue(name, expects: "a number") }
        return n
    }

    /// Parses `params`; options are checked against `spec` with QEMU's
    /// errors: "Invalid parameter 'x'", "Parameter 'x' expects 'on' or
    /// 'off'", "Parameter 'x' expects a number", "Parameter 'id' expects an
    /// identifier" (plus QEMU's hint line).
    public static func parse(_ params: String, spec: QemuOptsSpec) throws(QMPError) -> QemuOpts {
        var result = QemuOpts()
        let p = Array(params.utf8)
        if let id = parseID(p) {
            guard isIdentifier(id) else {
                throw QMPError("Parameter 'id' expects an identifier\n"
                    + "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter.")
            }
            result.id = id
        }
        var pos = 0
        var first = spec.impliedKey
        while pos < p.count {
            let (name, value, next, flag) = nameValue(p, pos, firstName: first)
            pos = next
            first = nil
            if let flag {
                if name == "help" || name == "?" {
                    result.help = true
                    return result
                }
                let advice = name == "delay" ? "nodelay=\(flag ? "off" : "on")" : "\(name)=\(value)"
                result.warnings.append("short-form boolean option '\(flag ? "" : "no")\(name)' deprecated\nPlease use \(advice) instead")
            }
            if name == "id" { continue }
            guard let kind = spec.options[name] else { throw QMPError.invalidParameter(name) }
            switch kind {
            case .string: break
            case .bool:
                if !["on", "yes", "true", "y", "off", "no", "false", "n"].contains(value) {
                    throw QMPError.invalidParameterValue(name, expects: "'on' or 'off'")
                }
            case .number:
                if CNumbers.strtou64(value, base: 0) == nil { throw QMPError.invalidParameterValue(name, expects: "a number") }
            case .size:
                if CNumbers.strtosz(value) == nil {
                    throw QMPError("Parameter '\(name)' expects a non-negative number below 2^64\n"
                        + "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.")
                }
            }
            result.options.append((name, value))
        }
        return result
    }

    /// get_opt_name_value: `flag` is non-nil for a short-form boolean
    /// (true for `name`, false for `noname`).
    private static func nameValue(_ p: [UInt8], _ start: Int, firstName: String?) -> (String, String, Int, Bool?) {
        var len = 0
        while start + len < p.count, p[start + len] != UInt8(ascii: "="), p[start + len] != UInt8(ascii: ",") { len += 1 }
        var name: String
        var value: String
        var next: Int
        var flag: Bool? = nil
        if start + len >= p.count || p[start + len] != UInt8(ascii: "=") {
            if let firstName {
                name = firstName
                (value, next) = optValue(p, start)
            } else {
                name = String(decoding: p[start..<start + len], as: UTF8.self)
                next = start + len
                if name.hasPrefix("no") {
                    name.removeFirst(2)
                    value = "off"
                    flag = false
                } else {
                    value = "on"
                    flag = true
                }
            }
        } else {
            name = String(decoding: p[start..<start + len], as: UTF8.self)
            (value, next) = optValue(p, start + len + 1)
        }
        if next < p.count && p[next] == UInt8(ascii: ",") { next += 1 }
        return (name, value, next, flag)
    }

    /// get_opt_value: up to a single ',' (",," is a literal comma).
    private static func optValue(_ p: [UInt8], _ start: Int) -> (String, Int) {
        var v: [UInt8] = []
        var i = start
        while i < p.count {
            if p[i] == UInt8(ascii: ",") {
                if i + 1 < p.count && p[i + 1] == UInt8(ascii: ",") { v.append(p[i]); i += 2; continue }
                break
            }
            v.append(p[i])
            i += 1
        }
        return (String(decoding: v, as: UTF8.self), i)
    }

    /// opts_parse_id: the value of the first `id=` parameter.
    private static func parseID(_ p: [UInt8]) -> String? {
        var pos = 0
        while pos < p.count {
            let (name, value, next, _) = nameValue(p, pos, firstName: nil)
            if name == "id" { return value }
            pos = next
        }
        return nil
    }

    /// id_wellformed: a letter, then letters, digits, '-', '.', '_'.
    public static func isIdentifier(_ s: String) -> Bool {
        guard let f = s.utf8.first, (f | 0x20) >= UInt8(ascii: "a"), (f | 0x20) <= UInt8(ascii: "z") else { return false }
        return s.utf8.allSatisfy { c in
            ((c | 0x20) >= UInt8(ascii: "a") && (c | 0x20) <= UInt8(ascii: "z")) || (c >= 0x30 && c <= 0x39)
                || c == UInt8(ascii: "-") || c == UInt8(ascii: ".") || c == UInt8(ascii: "_")
        }
    }
}
