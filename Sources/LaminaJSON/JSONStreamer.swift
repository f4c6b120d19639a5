/// QEMU's JSON message splitter (qobject/json-streamer.c) with its lexer
/// and parser: feed arbitrary chunks of a byte stream, get each complete
/// top-level value or error in order.
///
/// Semantics (all verified against qemu-storage-daemon 7.2):
/// - Tokens are collected until braces and brackets balance (or either
///   count goes negative); then the collected tokens are parsed. A scalar
///   at top level is a value by itself (numbers and keywords need one byte
///   of lookahead, so `1` alone waits for the next byte).
/// - A lexical error yields "JSON parse error, stray '<text>'" at once,
///   drops the tokens collected so far, and the lexer skips input until a
///   structural character, an ASCII control character other than tab, or
///   a byte 0xFE/0xFF (QEMU's resynchronisation points).
/// - Limits: 64 MiB of token text per value ("JSON token size limit
///   exceeded"), 2 Mi tokens ("JSON token count limit exceeded"), nesting
///   deeper than 1024 ("JSON nesting depth limit exceeded"). After a limit
///   error the value's tokens are dropped and lexing continues with the
///   next byte, exactly as QEMU does (so the rest of an oversized value
///   produces further errors; memory stays bounded by the limits).
///
/// Not thread-safe: one streamer per connection.
public struct JSONStreamer: Sendable {
    public static let maxTokenSize = 64 << 20
    public static let maxTokenCount = 2 << 20
    public static let maxNesting = 1 << 10

    private var lexer = JSONLexer()
    private var tokens = JSONTokenList()
    private var braceCount = 0
    private var bracketCount = 0
    private var tokenSize = 0

    public init() {}

    /// Feeds a chunk; returns the values and errors it completed, in order.
    public mutating func feed(_ bytes: some Collection<UInt8>) -> [Result<JSON, JSONParseError>] {
        var out: [Result<JSON, JSONParseError>] = []
        var lx = lexer
        lexer = JSONLexer()  // keeps lx's buffer uniquely referenced
        let done: Void? = bytes.withContiguousStorageIfAvailable { buf in
            lx.feed(buf) { kind, text in process(kind, text, &out) }
        }
        if done == nil {
            Array(bytes).withUnsafeBufferPointer { buf in
                lx.feed(buf) { kind, text in process(kind, text, &out) }
            }
        }
        lexer = lx
        return out
    }

    /// End of input: completes a pending number or keyword, reports an
    /// unterminated string as a stray token, and parses any collected
    /// tokens (an incomplete value gives "JSON parse error, premature EOI").
    public mutating func flush() -> [Result<JSON, JSONParseError>] {
        var out: [Result<JSON, JSONParseError>] = []
        var lx = lexer
        lexer = JSONLexer()
        lx.flush { kind, text in process(kind, text, &out) }
        lexer = lx
        return out
    }

    /// True when no partial value is pending (nothing buffered; the lexer
    /// may be skipping input after an error).
    public var isIdle: Bool { tokens.isEmpty && (lexer.state == .start || lexer.state == .recovery) }

    private mutating func process(_ kind: JSONTokenKind, _ text: [UInt8], _ out: inout [Result<JSON, JSONParseError>]) {
        switch kind {
        case .lcurly: braceCount += 1
        case .rcurly: braceCount -= 1
        case .lsquare: bracketCount += 1
        case .rsquare: bracketCount -= 1
        case .error:
            let stray = text.prefix { $0 != 0 }  // QEMU prints it with %s
            emit(.failure(JSONParseError("JSON parse error, stray '\(ModUTF8.lenientString(stray))'")), &out)
            return
        case .endOfInput:
            if tokens.isEmpty { return }
            emit(JSONParser.parse(tokens), &out)
            return
        default: break
        }
        if tokenSize + text.count + 1 > JSONStreamer.maxTokenSize {
            emit(.failure(JSONParseError("JSON token size limit exceeded")), &out)
            return
        }
        if tokens.count + 1 > JSONStreamer.maxTokenCount {
            emit(.failure(JSONParseError("JSON token count limit exceeded")), &out)
            return
        }
        if braceCount + bracketCount > JSONStreamer.maxNesting {
            emit(.failure(JSONParseError("JSON nesting depth limit exceeded")), &out)
            return
        }
        tokens.append(kind, text)
        tokenSize += text.count
        if (braceCount > 0 || bracketCount > 0) && braceCount >= 0 && bracketCount >= 0 {
            return
        }
        emit(JSONParser.parse(tokens), &out)
    }

    private mutating func emit(_ r: Result<JSON, JSONParseError>, _ out: inout [Result<JSON, JSONParseError>]) {
        braceCount = 0
        bracketCount = 0
        tokens.removeAll()
        tokenSize = 0
        out.append(r)
    }
}

extension JSON {
    /// Parses exactly one JSON value in QEMU's dialect (qobject_from_json):
    /// input stops at the first NUL byte; no value gives "Expecting a JSON
    /// value"; anything after the first value gives "Expecting at most one
    /// JSON value"; otherwise the first error of the streamer.
    public static func parse(_ text: some StringProtocol) throws(JSONParseError) -> JSON {
        let bytes = Array(text.utf8.prefix { $0 != 0 })
        var streamer = JSONStreamer()
        var results = streamer.feed(bytes)
        results += streamer.flush()
        var value: JSON?
        for r in results {
            if value != nil { throw JSONParseError("Expecting at most one JSON value") }
            switch r {
            case .failure(let e): throw e
            case .success(let v): value = v
            }
        }
        guard let v = value else { throw JSONParseError("Expecting a JSON value") }
        return v
    }
}
