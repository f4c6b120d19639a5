#if canImport(Glibc)
import Glibc
#endif

/// QEMU's JSON writer (qobject/json-writer.c): compact and pretty forms,
/// members in QDict iteration order, QEMU's string escaping and number
/// formatting (`%" PRId64`, `%" PRIu64`, `%.17g`; a double may print as
/// `inf`, `nan` or `100`, exactly as QEMU prints it).
extension JSON {
    /// One line, the way QEMU writes QMP traffic: `{"return": {}}`,
    /// separators `", "` and `": "`, no trailing newline.
    public var compact: String {
        var out: [UInt8] = []
        writeCompact(into: &out)
        return String(decoding: out, as: UTF8.self)
    }

    /// The compact form as UTF-8 bytes, appended to `out`.
    public func writeCompact(into out: inout [UInt8]) {
        switch self {
        case .object(let members):
            out.append(UInt8(ascii: "{"))
            for (i, (k, v)) in JSON.qdictOrder(members).enumerated() {
                if i > 0 { out.append(UInt8(ascii: ",")); out.append(UInt8(ascii: " ")) }
                JSON.writeQuoted(k, into: &out)
                out.append(UInt8(ascii: ":")); out.append(UInt8(ascii: " "))
                v.writeCompact(into: &out)
            }
            out.append(UInt8(ascii: "}"))
        case .array(let items):
            out.append(UInt8(ascii: "["))
            for (i, v) in items.enumerated() {
                if i > 0 { out.append(UInt8(ascii: ",")); out.append(UInt8(ascii: " ")) }
                v.writeCompact(into: &out)
            }
            out.append(UInt8(ascii: "]"))
        default:
            writeScalar(into: &out)
        }
    }

    /// QEMU's pretty form (qemu-img's `--output=json`): four-space indent,
    /// one member or element per line, `": "` separators; an empty object
    /// is `{`, newline, indent, `}`. `indent` is the starting depth.
    public func pretty(indent: Int = 0) -> String {
        var out: [UInt8] = []
        writePretty(into: &out, indent: indent)
        return String(decoding: out, as: UTF8.self)
    }

    private func writePretty(into out: inout [UInt8], indent: Int) {
        func newline(_ depth: Int) {
            out.append(UInt8(ascii: "\n"))
            out.append(contentsOf: repeatElement(UInt8(ascii: " "), count: depth * 4))
        }
        switch self {
        case .object(let members):
            out.append(UInt8(ascii: "{"))
            for (i, (k, v)) in JSON.qdictOrder(members).enumerated() {
                if i > 0 { out.append(UInt8(ascii: ",")) }
                newline(indent + 1)
                JSON.writeQuoted(k, into: &out)
                out.append(UInt8(ascii: ":")); out.append(UInt8(ascii: " "))
                v.writePretty(into: &out, indent: indent + 1)
            }
            newline(indent)
            out.append(UInt8(ascii: "}"))
        case .array(let items):
            out.append(UInt8(ascii: "["))
            for (i, v) in items.enumerated() {
                if i > 0 { out.append(UInt8(ascii: ",")) }
                newline(indent + 1)
                v.writePretty(into: &out, indent: indent + 1)
            }
            newline(indent)
            out.append(UInt8(ascii: "]"))
        default:
            writeScalar(into: &out)
        }
    }

    private func writeScalar(into out: inout [UInt8]) {
        switch self {
        case .string(let v): JSON.writeQuoted(v, into: &out)
        case .int(let v): out.append(contentsOf: String(v).utf8)
        case .uint(let v): out.append(contentsOf: String(v).utf8)
        case .double(let v): out.append(contentsOf: JSON.formatDouble(v).utf8)
        case .bool(let v): out.append(contentsOf: (v ? "true" : "false").utf8)
        case .null: out.append(contentsOf: "null".utf8)
        case .object, .array: preconditionFailure("not a scalar")
        }
    }

    /// `%.17g`, as QEMU prints a double (C locale).
    public static func formatDouble(_ v: Double) -> String {
        cPrintf("%.17g", v)
    }

    /// QEMU's QDict iterates its 512 hash buckets in order (tdb_hash of the
    /// key), newest entry first within a bucket; every JSON object QEMU
    /// prints or iterates comes out in that order. `members` is in
    /// insertion order.
    public static func qdictOrder(_ members: [(String, JSON)]) -> [(String, JSON)] {
        if members.count < 2 { return members }
        return members.enumerated()
            .map { (bucket: tdbHash($0.element.0) % 512, index: $0.offset, member: $0.element) }
            .sorted { $0.bucket != $1.bucket ? $0.bucket < $1.bucket : $0.index > $1.index }
            .map(\.member)
    }

    /// The keys of `keys` (insertion order) in QDict iteration order.
    public static func qdictOrder(keys: [String]) -> [String] {
        qdictOrder(keys.map { ($0, JSON.null) }).map(\.0)
    }

    /// QEMU's tdb_hash (qobject/qdict.c) over the key's UTF-8 bytes.
    public static func tdbHash(_ key: String) -> UInt32 {
        var value: UInt32 = 0x238F_13AF &* UInt32(truncatingIfNeeded: key.utf8.count)
        for (i, c) in key.utf8.enumerated() {
            value = value &+ (UInt32(c) << UInt32(i * 5 % 24))
        }
        return 1_103_515_243 &* value &+ 12345
    }

    /// QEMU's quoting: `\"`, `\\`, `\b`, `\f`, `\n`, `\r`, `\t`; other
    /// control characters, DEL and every non-ASCII code point as `\uXXXX`
    /// (upper-case hex, surrogate pairs above the BMP); Unicode
    /// noncharacters print as `\uFFFD` (QEMU's decoder rejects them).
    public static func quote(_ str: String) -> String {
        var out: [UInt8] = []
        writeQuoted(str, into: &out)
        return String(decoding: out, as: UTF8.self)
    }

    /// `quote(_:)` appended to a byte buffer.
    public static func writeQuoted(_ str: String, into out: inout [UInt8]) {
        out.append(UInt8(ascii: "\""))
        for u in str.unicodeScalars {
            let v = u.value
            switch v {
            case 0x22: out.append(0x5C); out.append(0x22)
            case 0x5C: out.append(0x5C); out.append(0x5C)
            case 0x08: out.append(0x5C); out.append(UInt8(ascii: "b"))
            case 0x0C: out.append(0x5C); out.append(UInt8(ascii: "f"))
            case 0x0A: out.append(0x5C); out.append(UInt8(ascii: "n"))
            case 0x0D: out.append(0x5C); out.append(UInt8(ascii: "r"))
            case 0x09: out.append(0x5C); out.append(UInt8(ascii: "t"))
            case 0x20..<0x7F: out.append(UInt8(v))
            default:
                if ModUTF8.isNoncharacter(v) {
                    appendEscape(0xFFFD, &out)
                } else if v > 0xFFFF {
                    appendEscape(0xD800 + ((v - 0x10000) >> 10), &out)
                    appendEscape(0xDC00 + ((v - 0x10000) & 0x3FF), &out)
                } else {
                    appendEscape(v, &out)
                }
            }
        }
        out.append(UInt8(ascii: "\""))
    }

    private static func appendEscape(_ v: UInt32, _ out: inout [UInt8]) {
        let hex: [UInt8] = Array("0123456789ABCDEF".utf8)
        out.append(0x5C); out.append(UInt8(ascii: "u"))
        for shift in stride(from: 12, through: 0, by: -4) {
            out.append(hex[Int((v >> UInt32(shift)) & 0xF)])
        }
    }
}

/// printf-style formatting through the C library (C locale assumed), for
/// the few places that must print numbers exactly as QEMU's C code does.
public func cPrintf(_ format: String, _ args: any CVarArg...) -> String {
    withVaList(args) { va in
        var buf = [CChar](repeating: 0, count: 64)
        let n = vsnprintf(&buf, buf.count, format, va)
        if n >= buf.count {
            buf = [CChar](repeating: 0, count: Int(n) + 1)
            _ = withVaList(args) { va2 in vsnprintf(&buf, buf.count, format, va2) }
        }
        return String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}
