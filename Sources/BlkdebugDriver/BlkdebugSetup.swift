#if canImport(Glibc)
import Glibc
#endif
import BlockCore
import BlockGraph
import LaminaJSON

/// blkdebug's options checked and its rules read, before the image is
/// opened (the first half of QEMU's blkdebug_open): the size options'
/// syntax, then the `config` file, then the rules (file rules first, then
/// the inline ones; inject-error rules before set-state rules).
public struct BlkdebugSetup: Sendable {
    public let options: BlkdebugOptions
    /// Every rule, file rules first.
    public let injectErrors: [BlkdebugInjectError]
    public let setStates: [BlkdebugSetState]

    /// Throws QEMU's errors: a negative size ("Parameter 'align' expects a
    /// non-negative number below 2^64", with QEMU's hint after a newline),
    /// an unreadable config file ("Could not read blkdebug config file:
    /// ..."), a malformed one ("parse error", "no group defined", "There is
    /// no option group 'x'", "Invalid parameter 'x'", "Parameter 'x'
    /// expects a number", "Duplicate ID 'x' for inject-error", ...), a rule
    /// without an event ("Missing event name for rule") or with an unknown
    /// event or iotype ("invalid parameter value: x").
    public init(_ options: BlkdebugOptions) throws(BlockError) {
        self.options = options
        try options.checkSizes { JSON.qdictOrder(keys: $0) }
        var sections: [ConfigSection] = []
        if let path = options.config {
            sections = try ConfigSection.read(path)
        }
        // The inline rules join the same option lists under the ids QEMU
        // gives them ("inject-error.0", ...).
        var ids = Set(sections.compactMap { s in s.id.map { "\(s.group)/\($0)" } })
        for (group, count) in [("inject-error", options.injectErrors.count), ("set-state", options.setStates.count)] {
            for i in 0..<count where !ids.insert("\(group)/\(group).\(i)").inserted {
                throw BlockError.invalid("Duplicate ID '\(group).\(i)' for \(group)")
            }
        }
        var inject: [BlkdebugInjectError] = []
        for s in sections where s.group == "inject-error" { inject.append(try s.injectError()) }
        injectErrors = inject + options.injectErrors
        var set: [BlkdebugSetState] = []
        for s in sections where s.group == "set-state" { set.append(try s.setState()) }
        setStates = set + options.setStates
    }
}

/// One `[group]` or `[group "id"]` section of a blkdebug config file
/// (QEMU's qemu_config_parse), its values already type-checked the way
/// QemuOpts checks them.
struct ConfigSection {
    var group: String
    var id: String?
    /// Keys in file order (a repeated key keeps its first place, last value).
    var values: [(String, String)]

    enum Kind { case string, number, bool }
    static let groups: [String: [String: Kind]] = [
        "inject-error": ["event": .string, "state": .number, "iotype": .string, "errno": .number, "sector": .number,
                         "once": .bool, "immediately": .bool],
        "set-state": ["event": .string, "state": .number, "new_state": .number],
    ]

    static func read(_ path: String) throws(BlockError) -> [ConfigSection] {
        guard let f = fopen(path, "r") else {
            throw BlockError.posix(errno, "Could not read blkdebug config file")
        }
        defer { fclose(f) }
        var text: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = fread(&chunk, 1, chunk.count, f)
            if n > 0 { text += chunk[0..<n] }
            if n < chunk.count {
                if ferror(f) != 0 { throw BlockError.posix(EIO, "Cannot read config file") }
                break
            }
        }
        return try parse(text)
    }

    /// qemu_config_foreach over `text`, then qemu_config_do_parse of each
    /// section (a section is checked when the next one starts, or at the end).
    static func parse(_ text: [UInt8]) throws(BlockError) -> [ConfigSection] {
        var out: [ConfigSection] = []
        var current: ConfigSection?
        for raw in lines(text) {
            if raw.first == UInt8(ascii: "\n") || raw.first == UInt8(ascii: "#") { continue }
            if raw.first == UInt8(ascii: "["), let (group, id) = sectionHeader(raw) {
                if let c = current { out.append(try c.checked(existing: out)) }
                current = ConfigSection(group: group, id: id, values: [])
                continue
            }
            guard let (key, value) = assignment(raw) else { throw BlockError.invalid("parse error") }
            guard current != nil else { throw BlockError.invalid("no group defined") }
            if let i = current!.values.firstIndex(where: { $0.0 == key }) {
                current!.values[i].1 = value
            } else {
                current!.values.append((key, value))
            }
        }
        if let c = current { out.append(try c.checked(existing: out)) }
        return out
    }

    /// Lines as fgets returns them (at most 1023 bytes, newline kept).
    private static func lines(_ text: [UInt8]) -> [ArraySlice<UInt8>] {
        var out: [ArraySlice<UInt8>] = []
        var start = 0
        var i = 0
        while i < text.count {
            if text[i] == UInt8(ascii: "\n") || i - start == 1022 {
                out.append(text[start...i])
                start = i + 1
            }
            i += 1
        }
        if start < text.count { out.append(text[start...]) }
        return out
    }

    private static func isSpace(_ c: UInt8) -> Bool { c == 32 || (9...13).contains(c) }

    /// `[%63s "%63[^"]"]` or `[%63[^]]]`.
    private static func sectionHeader(_ line: ArraySlice<UInt8>) -> (String, String?)? {
        let body = Array(line.dropFirst())
        // Group and id: a word, blanks, a quoted id.
        var p = 0
        while p < body.count && !isSpace(body[p]) && p < 63 { p += 1 }
        if p > 0 {
            var q = p
            while q < body.count && isSpace(body[q]) { q += 1 }
            if q < body.count && body[q] == UInt8(ascii: "\"") {
                var e = q + 1
                while e < body.count && body[e] != UInt8(ascii: "\"") && e - q - 1 < 63 { e += 1 }
                if e > q + 1 {
                    return (String(decoding: body[0..<p], as: UTF8.self), String(decoding: body[(q + 1)..<e], as: UTF8.self))
                }
            }
        }
        var e = 0
        while e < body.count && body[e] != UInt8(ascii: "]") && e < 63 { e += 1 }
        return e > 0 ? (String(decoding: body[0..<e], as: UTF8.self), nil) : nil
    }

    /// ` %63s = "%1023[^"]"`, else ` %63s = ""` (which matches as soon as
    /// the key does: the value is then empty).
    private static func assignment(_ line: ArraySlice<UInt8>) -> (String, String)? {
        let b = Array(line)
        var p = 0
        while p < b.count && isSpace(b[p]) { p += 1 }
        let keyStart = p
        while p < b.count && !isSpace(b[p]) && p - keyStart < 63 { p += 1 }
        if p == keyStart { return nil }
        let key = String(decoding: b[keyStart..<p], as: UTF8.self)
        while p < b.count && isSpace(b[p]) { p += 1 }
        guard p < b.count, b[p] == UInt8(ascii: "=") else { return (key, "") }
        p += 1
        while p < b.count && isSpace(b[p]) { p += 1 }
        guard p < b.count, b[p] == UInt8(ascii: "\"") else { return (key, "") }
        p += 1
        let v = p
        while p < b.count && b[p] != UInt8(ascii: "\"") && p - v < 1023 { p += 1 }
        return (key, String(decoding: b[v..<p], as: UTF8.self))
    }

    /// qemu_opts_from_qdict: the group must exist, the id be well formed
    /// and new, every key known and of its type (checked in QEMU's
    /// dictionary order).
    private func checked(existing: [ConfigSection]) throws(BlockError) -> ConfigSection {
        guard let desc = Self.groups[group] else { throw BlockError.invalid("There is no option group '\(group)'") }
        var copy = self
        if let i = values.firstIndex(where: { $0.0 == "id" }) {
            copy.id = values[i].1
            copy.values.remove(at: i)
        }
        if let id = copy.id {
            let ok = id.unicodeScalars.first.map { ("a"..."z").contains($0) || ("A"..."Z").contains($0) } ?? false
                && id.unicodeScalars.allSatisfy {
                    ("a"..."z").contains($0) || ("A"..."Z").contains($0) || ("0"..."9").contains($0)
                        || $0 == "-" || $0 == "." || $0 == "_"
                }
            if !ok {
                throw BlockError.invalid("Parameter 'id' expects an identifier\n"
                    + "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter.")
            }
            if existing.contains(where: { $0.group == group && $0.id == id }) {
                throw BlockError.invalid("Duplicate ID '\(id)' for \(group)")
            }
        }
        let all = values.map(\.0)
        for key in JSON.qdictOrder(keys: all) where key != "id" {
            let value = values.first { $0.0 == key }!.1
            guard let kind = desc[key] else { throw BlockError.invalid("Invalid parameter '\(key)'") }
            switch kind {
            case .string: break
            case .number: _ = try Self.number(key, value)
            case .bool: _ = try Self.bool(key, value)
            }
        }
        return copy
    }

    /// QEMU's parse_option_number: qemu_strtou64 (strtoull, base 0, the
    /// whole string; a negative number wraps).
    static func number(_ key: String, _ value: String) throws(BlockError) -> UInt64 {
        let (v, consumed, err) = value.withCString { p -> (UInt64, Int, Int32) in
            var end: UnsafeMutablePointer<CChar>?
            errno = 0
            let v = strtoull(p, &end, 0)
            let e = errno
            return (UInt64(v), end.map { $0 - UnsafeMutablePointer(mutating: p) } ?? 0, e)
        }
        if (err == 0 && consumed == 0) || consumed != value.utf8.count {
            throw BlockError.invalid("Parameter '\(key)' expects a number")
        }
        if err == ERANGE { throw BlockError.invalid("Value '\(value)' is too large for parameter '\(key)'") }
        if err != 0 { throw BlockError.invalid("Parameter '\(key)' expects a number") }
        return v
    }

    static func bool(_ key: String, _ value: String) throws(BlockError) -> Bool {
        switch value {
        case "on", "yes", "true", "y": return true
        case "off", "no", "false", "n": return false
        default: throw BlockError.invalid("Parameter '\(key)' expects 'on' or 'off'")
        }
    }

    private func get(_ key: String) -> String? { values.first { $0.0 == key }?.1 }
    private func int(_ key: String) -> Int64? {
        get(key).map { Int64(bitPattern: (try? Self.number(key, $0)) ?? 0) }
    }

    private func event() throws(BlockError) -> BlkdebugEvent {
        guard let name = get("event") else { throw BlockError.invalid("Missing event name for rule") }
        guard let e = BlkdebugEvent(rawValue: name) else { throw BlockError.invalid("invalid parameter value: \(name)") }
        return e
    }

    /// add_rule for an inject-error section.
    func injectError() throws(BlockError) -> BlkdebugInjectError {
        var r = BlkdebugInjectError(event: try event())
        r.state = int("state")
        r.errno = int("errno")
        r.sector = int("sector")
        r.once = get("once").map { (try? Self.bool("once", $0)) ?? false }
        r.immediately = get("immediately").map { (try? Self.bool("immediately", $0)) ?? false }
        if let t = get("iotype") {
            guard let type = BlkdebugIOType(rawValue: t) else { throw BlockError.invalid("invalid parameter value: \(t)") }
            r.iotype = type
        }
        return r
    }

    /// add_rule for a set-state section (new_state defaults to 0).
    func setState() throws(BlockError) -> BlkdebugSetState {
        BlkdebugSetState(event: try event(), state: int("state"), newState: int("new_state") ?? 0)
    }
}
