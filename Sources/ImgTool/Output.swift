#if canImport(Glibc)
import Glibc
#endif
import BlockCore

/// Buffered standard output (flushed explicitly and at exit).
final class StdoutBuffer: @unchecked Sendable {
    static let shared = StdoutBuffer()
    private var bytes: [UInt8] = []

    func write(_ s: String) {
        bytes += Array(s.utf8)
        if bytes.count > 1 << 16 { flush() }
    }

    func flush() {
        var off = 0
        while off < bytes.count {
            let n = bytes[off...].withUnsafeBytes { Glibc.write(1, $0.baseAddress!, $0.count) }
            if n <= 0 { break }
            off += n
        }
        bytes.removeAll(keepingCapacity: true)
    }
}

func out(_ s: String) { StdoutBuffer.shared.write(s) }
func outln(_ s: String = "") { StdoutBuffer.shared.write(s + "\n") }
func errln(_ s: String) {
    StdoutBuffer.shared.flush()
    FileHandleStderr.write(s + "\n")
}

/// printf-style "%0.3g" and friends, through the C library.
func cFormat(_ format: String, _ args: any CVarArg...) -> String {
    withVaList(args) { va in
        var buf = [CChar](repeating: 0, count: 128)
        let n = vsnprintf(&buf, buf.count, format, va)
        if n >= buf.count {
            buf = [CChar](repeating: 0, count: Int(n) + 1)
            _ = withVaList(args) { va2 in vsnprintf(&buf, buf.count, format, va2) }
        }
        return String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}

/// QEMU's size_to_str: "196 KiB", "1 GiB", "1.5 GiB", "512 B".
func humanSize(_ v: UInt64) -> String {
    let suffixes = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"]
    var e: Int32 = 0
    _ = frexp(Double(v) / (1000.0 / 1024.0), &e)
    let i = max(0, Int((e - 1) / 10))
    let div = Double(UInt64(1) << UInt64(i * 10))
    return cFormat("%0.3g", Double(v) / div) + " " + suffixes[i] + "B"
}

/// A JSON value with ordered object members, printed the way QEMU's
/// json-writer prints (pretty: four-space indent, ": " separators).
indirect enum JSON {
    case object([(String, JSON)])
    case array([JSON])
    case string(String)
    case int(Int64)
    case uint(UInt64)
    case double(Double)
    case bool(Bool)
    case null

    func pretty(indent: Int = 0) -> String {
        var s = ""
        write(into: &s, indent: indent)
        return s
    }

    private func write(into s: inout String, indent: Int) {
        switch self {
        case .object(let members):
            if members.isEmpty { s += "{\n" + String(repeating: " ", count: indent * 4) + "}"; return }
            s += "{"
            for (i, (k, v)) in JSON.qdictOrder(members).enumerated() {
                s += i == 0 ? "\n" : ",\n"
                s += String(repeating: " ", count: (indent + 1) * 4)
                s += JSON.quote(k) + ": "
                v.write(into: &s, indent: indent + 1)
            }
            s += "\n" + String(repeating: " ", count: indent * 4) + "}"
        case .array(let items):
            if items.isEmpty { s += "[\n" + String(repeating: " ", count: indent * 4) + "]"; return }
            s += "["
            for (i, v) in items.enumerated() {
                s += i == 0 ? "\n" : ",\n"
                s += String(repeating: " ", count: (indent + 1) * 4)
                v.write(into: &s, indent: indent + 1)
            }
            s += "\n" + String(repeating: " ", count: indent * 4) + "]"
        case .string(let v): s += JSON.quote(v)
        case .int(let v): s += String(v)
        case .uint(let v): s += String(v)
        case .double(let v): s += cFormat("%.17g", v)
        case .bool(let v): s += v ? "true" : "false"
        case .null: s += "null"
        }
    }

    /// QEMU's QDict iterates its 512 hash buckets in order (tdb_hash of the
    /// key), newest entry first within a bucket; every JSON object QEMU
    /// prints comes out in that order. `members` is in insertion order.
    static func qdictOrder(_ members: [(String, JSON)]) -> [(String, JSON)] {
        members.enumerated()
            .map { (bucket: tdbHash($0.element.0) % 512, index: $0.offset, member: $0.element) }
            .sorted { $0.bucket != $1.bucket ? $0.bucket < $1.bucket : $0.index > $1.index }
            .map(\.member)
    }

    static func tdbHash(_ key: String) -> UInt32 {
        let bytes = Array(key.utf8)
        var value: UInt32 = 0x238F_13AF &* UInt32(truncatingIfNeeded: bytes.count)
        for (i, c) in bytes.enumerated() {
            value = value &+ (UInt32(c) << UInt32(i * 5 % 24))
        }
        return 1_103_515_243 &* value &+ 12345
    }

    /// QEMU's quoting: escapes, control characters and every non-ASCII
    /// code point as \uXXXX (surrogate pairs above the BMP).
    static func quote(_ str: String) -> String {
        var s = "\""
        for u in str.unicodeScalars {
            switch u {
            case "\"": s += "\\\""
            case "\\": s += "\\\\"
            case "\u{08}": s += "\\b"
            case "\u{0C}": s += "\\f"
            case "\n": s += "\\n"
            case "\r": s += "\\r"
            case "\t": s += "\\t"
            default:
                if u.value < 0x20 || u.value == 0x7f {
                    s += cFormat("\\u%04X", u.value)
                } else if u.value < 0x7f {
                    s.unicodeScalars.append(u)
                } else if u.value > 0xffff {
                    let v = u.value - 0x10000
                    s += cFormat("\\u%04X\\u%04X", 0xd800 + (v >> 10), 0xdc00 + (v & 0x3ff))
                } else {
                    s += cFormat("\\u%04X", u.value)
                }
            }
        }
        return s + "\""
    }
}
