/// The token kinds QEMU's JSON lexer produces (qobject/json-lexer.c).
enum JSONTokenKind: Sendable, Equatable {
    case lcurly, rcurly, lsquare, rsquare, colon, comma
    case integer, float, keyword, string
    /// A lexical error; the token text is what was consumed so far,
    /// including the offending byte.
    case error
    /// A token grew past `JSONLexer.maxTokenSize`; the text is the
    /// oversized prefix (the lexer restarts at the next byte).
    case overflow
    /// End of input (only from `flush`).
    case endOfInput
}

/// A byte-at-a-time lexer with QEMU's dialect and recovery: the RFC 8259
/// tokens, single-quoted strings, `\'` escapes, keywords `[a-z]+` (checked
/// by the parser), no interpolation. After a lexical error it skips input
/// until a structural character (`{}[]:,`), an ASCII control character
/// other than tab, or a byte 0xFE/0xFF, which restart lexing.
///
/// Not thread-safe; owned by one `JSONStreamer`.
struct JSONLexer {
    /// QEMU's MAX_TOKEN_SIZE: one token may hold at most this many bytes.
    static let maxTokenSize = 64 << 20

    enum State: UInt8 {
        case start, recovery, dq, dqEscape, sq, sqEscape
        case zero, expDigits, expSign, expE, mantissa, mantissaDigits, digits, sign, keyword
    }

    private enum Next {
        case go(State)
        case emit(JSONTokenKind)
        case toStart
        case error
    }

    private(set) var state = State.start
    private var token: [UInt8] = []

    /// The transition for byte `c` from state `s`, and whether the byte is
    /// left for the next state (lookahead) instead of being consumed.
    private static func transition(_ s: State, _ c: UInt8) -> (Next, lookahead: Bool) {
        let isDigit = c >= 0x30 && c <= 0x39
        switch s {
        case .start:
            switch c {
            case UInt8(ascii: "\""): return (.go(.dq), false)
            case UInt8(ascii: "'"): return (.go(.sq), false)
            case UInt8(ascii: "0"): return (.go(.zero), false)
            case UInt8(ascii: "1")...UInt8(ascii: "9"): return (.go(.digits), false)
            case UInt8(ascii: "-"): return (.go(.sign), false)
            case UInt8(ascii: "{"): return (.emit(.lcurly), false)
            case UInt8(ascii: "}"): return (.emit(.rcurly), false)
            case UInt8(ascii: "["): return (.emit(.lsquare), false)
            case UInt8(ascii: "]"): return (.emit(.rsquare), false)
            case UInt8(ascii: ","): return (.emit(.comma), false)
            case UInt8(ascii: ":"): return (.emit(.colon), false)
            case UInt8(ascii: "a")...UInt8(ascii: "z"): return (.go(.keyword), false)
            case 0x20, 0x09, 0x0D, 0x0A: return (.toStart, false)
            default: return (.error, false)
            }
        case .recovery:
            switch c {
            case 0x09: return (.go(.recovery), false)
            case 0x00...0x1F, 0xFE, 0xFF: return (.toStart, true)
            case UInt8(ascii: "["), UInt8(ascii: "]"), UInt8(ascii: "{"), UInt8(ascii: "}"),
                UInt8(ascii: ":"), UInt8(ascii: ","):
                return (.toStart, true)
            default: return (.go(.recovery), false)
            }
        case .dq, .sq:
            let quote = s == .dq ? UInt8(ascii: "\"") : UInt8(ascii: "'")
            if c == quote { return (.emit(.string), false) }
            if c == UInt8(ascii: "\\") { return (.go(s == .dq ? .dqEscape : .sqEscape), false) }
            return c >= 0x20 && c <= 0xFD ? (.go(s), false) : (.error, false)
        case .dqEscape: return c >= 0x20 && c <= 0xFD ? (.go(.dq), false) : (.error, false)
        case .sqEscape: return c >= 0x20 && c <= 0xFD ? (.go(.sq), false) : (.error, false)
        case .zero:
            if isDigit { return (.error, false) }
            if c == UInt8(ascii: ".") { return (.go(.mantissa), false) }
            return (.emit(.integer), true)
        case .expDigits: return isDigit ? (.go(.expDigits), false) : (.emit(.float), true)
        case .expSign: return isDigit ? (.go(.expDigits), false) : (.error, false)
        case .expE:
            if c == UInt8(ascii: "-") || c == UInt8(ascii: "+") { return (.go(.expSign), false) }
            return isDigit ? (.go(.expDigits), false) : (.error, false)
        case .mantissa: return isDigit ? (.go(.mantissaDigits), false) : (.error, false)
        case .mantissaDigits:
            if isDigit { return (.go(.mantissaDigits), false) }
            if c == UInt8(ascii: "e") || c == UInt8(ascii: "E") { return (.go(.expE), false) }
            return (.emit(.float), true)
        case .digits:
            if isDigit { return (.go(.digits), false) }
            if c == UInt8(ascii: "e") || c == UInt8(ascii: "E") { return (.go(.expE), false) }
            if c == UInt8(ascii: ".") { return (.go(.mantissa), false) }
            return (.emit(.integer), true)
        case .sign:
            if c == UInt8(ascii: "0") { return (.go(.zero), false) }
            return c >= 0x31 && c <= 0x39 ? (.go(.digits), false) : (.error, false)
        case .keyword:
            return c >= 0x61 && c <= 0x7A ? (.go(.keyword), false) : (.emit(.keyword), true)
        }
    }

    private mutating func clearToken() {
        if token.count > 1 << 16 { token = [] } else { token.removeAll(keepingCapacity: true) }
    }

    /// Processes one byte (or, with `flush`, the end of input) and reports
    /// every completed token to `emit`.
    private mutating func step(_ c: UInt8, flush: Bool, _ emit: (JSONTokenKind, [UInt8]) -> Void) {
        var consumed = false
        while flush ? state != .start : !consumed {
            let (next, lookahead) = JSONLexer.transition(state, c)
            consumed = !flush && !lookahead
            if consumed { token.append(c) }
            switch next {
            case .emit(let kind):
                emit(kind, token)
                clearToken()
                state = .start
            case .toStart:
                clearToken()
                state = .start
            case .error:
                emit(.error, token)
                clearToken()
                state = .recovery
            case .go(let s):
                if s == .recovery { clearToken() }
                state = s
            }
        }
        checkOverflow(emit)
    }

    private mutating func checkOverflow(_ emit: (JSONTokenKind, [UInt8]) -> Void) {
        if token.count > JSONLexer.maxTokenSize {
            emit(.overflow, token)
            clearToken()
            state = .start
        }
    }

    /// Feeds bytes; tokens are reported in order through `emit`. Runs of
    /// plain string, keyword, digit and recovery bytes are handled in bulk.
    mutating func feed(_ bytes: UnsafeBufferPointer<UInt8>, _ emit: (JSONTokenKind, [UInt8]) -> Void) {
        var i = 0
        let n = bytes.count
        while i < n {
            let run = bulkRun(bytes, from: i)
            if run > i {
                if state != .recovery { token.append(contentsOf: bytes[i..<run]) }
                i = run
                checkOverflow(emit)
                continue
            }
            step(bytes[i], flush: false, emit)
            i += 1
        }
    }

    /// The end of the run of bytes starting at `from` that keep the lexer
    /// in its current state without any other effect, capped so the token
    /// grows to at most maxTokenSize + 1 bytes (where QEMU cuts it).
    private func bulkRun(_ bytes: UnsafeBufferPointer<UInt8>, from: Int) -> Int {
        let room = JSONLexer.maxTokenSize + 1 - token.count
        let limit = state == .recovery ? bytes.count : min(bytes.count, from + max(room, 0))
        var j = from
        switch state {
        case .dq, .sq:
            let quote = state == .dq ? UInt8(ascii: "\"") : UInt8(ascii: "'")
            while j < limit {
                let b = bytes[j]
                if b < 0x20 || b > 0xFD || b == quote || b == 0x5C { break }
                j += 1
            }
        case .keyword:
            while j < limit, bytes[j] >= 0x61, bytes[j] <= 0x7A { j += 1 }
        case .digits, .mantissaDigits, .expDigits:
            while j < limit, bytes[j] >= 0x30, bytes[j] <= 0x39 { j += 1 }
        case .recovery:
            while j < limit {
                let b = bytes[j]
                if (b < 0x20 && b != 0x09) || b > 0xFD { break }
                if b == 0x5B || b == 0x5D || b == 0x7B || b == 0x7D || b == 0x3A || b == 0x2C { break }
                j += 1
            }
        default:
            break
        }
        return j
    }

    /// End of input: completes or rejects the pending token, then reports
    /// `.endOfInput`.
    mutating func flush(_ emit: (JSONTokenKind, [UInt8]) -> Void) {
        step(0, flush: true, emit)
        emit(.endOfInput, token)
    }
}
