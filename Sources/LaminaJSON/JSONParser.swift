#if canImport(Glibc)
import Glibc
#endif

/// An error from QEMU's JSON parser or streamer; `message` is QEMU's text
/// ("JSON parse error, expecting value", "JSON token size limit exceeded",
/// "Expecting a JSON value", ...).
public struct JSONParseError: Error, Equatable, Sendable, CustomStringConvertible {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// The tokens of one top-level value: kinds and byte ranges into one
/// contiguous buffer (no allocation per token).
struct JSONTokenList {
    var kinds: [JSONTokenKind] = []
    var ranges: [Range<Int>] = []
    var storage: [UInt8] = []

    var count: Int { kinds.count }
    var isEmpty: Bool { kinds.isEmpty }

    mutating func append(_ kind: JSONTokenKind, _ bytes: [UInt8]) {
        let start = storage.count
        storage.append(contentsOf: bytes)
        kinds.append(kind)
        ranges.append(start..<storage.count)
    }

    mutating func removeAll() {
        let big = storage.count > 1 << 20 || kinds.count > 1 << 14
        kinds.removeAll(keepingCapacity: !big)
        ranges.removeAll(keepingCapacity: !big)
        storage.removeAll(keepingCapacity: !big)
    }
}

/// QEMU's recursive-descent JSON parser (qobject/json-parser.c), written
/// with an explicit stack so nesting depth never touches the thread stack.
/// It reports the same first error at the same point as QEMU's parser:
/// "premature EOI", "expecting value", "invalid keyword 'x'", "key is not
/// a string in object", "missing : in object pair", "duplicate key",
/// "expected separator in dict", "expected separator in list", string
/// errors; each prefixed with "JSON parse error, ".
enum JSONParser {
    private enum Frame {
        case array([JSON])
        /// Members so far; `key` is set while the value of a pair is parsed.
        case object([(String, JSON)], key: String?)
    }

    static func parse(_ tokens: JSONTokenList) -> Result<JSON, JSONParseError> {
        var pos = 0
        var stack: [Frame] = []
        func fail(_ msg: String) -> Result<JSON, JSONParseError> {
            var bytes = Array(msg.utf8)
            if bytes.count > 1023 { bytes.removeLast(bytes.count - 1023) }  // QEMU's message[1024]
            return .failure(JSONParseError("JSON parse error, " + ModUTF8.lenientString(bytes)))
        }
        func peek() -> JSONTokenKind? { pos < tokens.count ? tokens.kinds[pos] : nil }
        func pop() -> JSONTokenKind? {
            guard pos < tokens.count else { return nil }
            pos += 1
            return tokens.kinds[pos - 1]
        }
        var value: JSON
        // Each iteration parses one value (opening containers pushes frames
        // and continues), then hands completed values to the frames above.
        while true {
            guard let kind = peek() else { return fail("premature EOI") }
            switch kind {
            case .lcurly, .lsquare:
                pos += 1
                guard let next = peek() else { return fail("premature EOI") }
                if kind == .lcurly {
                    if next != .rcurly { stack.append(.object([], key: nil)); continue }
                    value = .object([])
                } else {
                    if next != .rsquare { stack.append(.array([])); continue }
                    value = .array([])
                }
                pos += 1
            case .string:
                switch parseString(tokens, pos) {
                case .success(let s): value = .string(s)
                case .failure(let e): return fail(e.message)
                }
                pos += 1
            case .integer, .float:
                value = parseNumber(tokens, pos)
                pos += 1
            case .keyword:
                let word = String(decoding: tokens.storage[tokens.ranges[pos]], as: UTF8.self)
                switch word {
                case "true": value = .bool(true)
                case "false": value = .bool(false)
                case "null": value = .null
                default: return fail("invalid keyword '\(word)'")
                }
                pos += 1
            default:
                return fail("expecting value")
            }
            // Hand the completed value upwards until a frame needs another value.
            while true {
                guard let frame = stack.popLast() else { return .success(value) }
                switch frame {
                case .array(var items):
                    items.append(value)
                    guard let sep = pop() else { return fail("premature EOI") }
                    if sep == .rsquare { value = .array(items); continue }
                    if sep != .comma { return fail("expected separator in list") }
                    stack.append(.array(items))
                case .object(let members, key: nil):
                    guard case .string(let key) = value else { return fail("key is not a string in object") }
                    guard let colon = pop() else { return fail("premature EOI") }
                    if colon != .colon { return fail("missing : in object pair") }
                    stack.append(.object(members, key: key))
                case .object(var members, key: .some(let key)):
                    if members.contains(where: { $0.0 == key }) { return fail("duplicate key") }
                    members.append((key, value))
                    guard let sep = pop() else { return fail("premature EOI") }
                    if sep == .rcurly { value = .object(members); continue }
                    if sep != .comma { return fail("expected separator in dict") }
                    stack.append(.object(members, key: nil))
                }
                break
            }
        }
    }

    /// QEMU's parse_string over the token's bytes (quotes included).
    private static func parseString(_ tokens: JSONTokenList, _ index: Int) -> Result<String, JSONParseError> {
        let range = tokens.ranges[index]
        return tokens.storage.withUnsafeBufferPointer { all in
            let buf = UnsafeBufferPointer(rebasing: all[range])
            let quote = buf[0]
            var scalars = String.UnicodeScalarView()
            var p = 1
            func hex4(_ at: Int) -> Int {
                var cp = 0
                for k in 0..<4 {
                    guard at + k < buf.count else { return -1 }
                    let c = buf[at + k]
                    let d: Int
                    switch c {
                    case 0x30...0x39: d = Int(c) - 0x30
                    case 0x61...0x66: d = Int(c) - 0x61 + 10
                    case 0x41...0x46: d = Int(c) - 0x41 + 10
                    default: return -1
                    }
                    cp = cp << 4 | d
                }
                return cp
            }
            while buf[p] != quote {
                if buf[p] == 0x5C {
                    let beg = p
                    let e = buf[p + 1]
                    p += 2
                    switch e {
                    case 0x22, 0x27, 0x5C, 0x2F: scalars.append(Unicode.Scalar(e))
                    case UInt8(ascii: "b"): scalars.append("\u{08}")
                    case UInt8(ascii: "f"): scalars.append("\u{0C}")
                    case UInt8(ascii: "n"): scalars.append("\n")
                    case UInt8(ascii: "r"): scalars.append("\r")
                    case UInt8(ascii: "t"): scalars.append("\t")
                    case UInt8(ascii: "u"):
                        var cp = hex4(p)
                        p += 4
                        if cp >= 0xD800 && cp <= 0xDBFF && p + 1 < buf.count
                            && buf[p] == 0x5C && buf[p + 1] == UInt8(ascii: "u")
                        {
                            let trailing = hex4(p + 2)
                            if trailing >= 0xDC00 && trailing <= 0xDFFF {
                                cp = 0x10000 + ((cp & 0x3FF) << 10) | (trailing & 0x3FF)
                                p += 6
                            } else {
                                cp = -1
                            }
                        }
                        guard ModUTF8.isEncodable(cp), let s = Unicode.Scalar(UInt32(cp)) else {
                            let text = ModUTF8.lenientString(buf[beg..<min(p, buf.count)])
                            return .failure(JSONParseError("\(text) is not a valid Unicode character"))
                        }
                        scalars.append(s)
                    default:
                        return .failure(JSONParseError("invalid escape sequence in string"))
                    }
                    continue
                }
                let (cp, next) = ModUTF8.decode(buf, at: p, end: buf.count)
                guard let c = cp, let s = Unicode.Scalar(c) else {
                    return .failure(JSONParseError("invalid UTF-8 sequence in string"))
                }
                scalars.append(s)
                p = next
            }
            return .success(String(scalars))
        }
    }

    /// JSON_INTEGER as int64 if it fits, else uint64 (non-negative), else
    /// double; JSON_FLOAT as double (strtod, so 1e400 is inf).
    private static func parseNumber(_ tokens: JSONTokenList, _ index: Int) -> JSON {
        let text = String(decoding: tokens.storage[tokens.ranges[index]], as: UTF8.self)
        if tokens.kinds[index] == .integer {
            if let i = Int64(text) { return .int(i) }
            if !text.hasPrefix("-"), let u = UInt64(text) { return .uint(u) }
        }
        return .double(strtod(text, nil))
    }
}
