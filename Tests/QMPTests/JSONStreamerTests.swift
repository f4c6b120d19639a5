import LaminaJSON
import Testing

/// The streaming splitter: QEMU's message boundaries, resynchronisation
/// after lexical errors and limits (expected results observed on
/// qemu-storage-daemon 7.2 with the same bytes).
@Suite struct JSONStreamerTests {
    private typealias R = Result<JSON, JSONParseError>

    private func feed(_ s: inout JSONStreamer, _ text: String) -> [R] { s.feed(Array(text.utf8)) }
    private func fail(_ m: String) -> R { .failure(JSONParseError(m)) }

    @Test func byteAtATimeEqualsOneChunk() {
        let text = #"{"execute": "a", "arguments": {"x": [1, "}", '{']}} [2] "s" 3 "#
        var whole = JSONStreamer()
        let expected = feed(&whole, text)
        var bytes = JSONStreamer()
        var got: [R] = []
        for b in text.utf8 { got += bytes.feed([b]) }
        #expect(got == expected)
        #expect(expected.count == 4)
        #expect(expected[0] == .success(["execute": "a", "arguments": ["x": [1, "}", "{"]]]))
    }

    @Test func scalarsNeedOneByteOfLookahead() {
        var s = JSONStreamer()
        #expect(feed(&s, "1 2 3") == [.success(1), .success(2)])
        #expect(feed(&s, "\n") == [.success(3)])
        #expect(feed(&s, "nul") == [])
        #expect(feed(&s, "@") == [fail("JSON parse error, invalid keyword 'nul'"), fail("JSON parse error, stray '@'")])
        #expect(s.isIdle)
    }

    @Test func recoveryAfterLexicalError() {
        var s = JSONStreamer()
        // Stray '@': tokens so far dropped; recovery skips "x" until '}'.
        #expect(feed(&s, #"{"execute": @"x"}"#)
            == [fail("JSON parse error, stray '@'"), fail("JSON parse error, expecting value")])
        // Control character inside a string.
        #expect(feed(&s, "{\"execute\": \"a\u{1}b\"}")
            == [fail("JSON parse error, stray '\"a\u{1}'"), fail("JSON parse error, expecting value")])
        // 0xFF resynchronises at once.
        #expect(s.feed([0xFF] + Array(#"{"execute":"x"}"#.utf8))
            == [fail("JSON parse error, stray '\u{FFFD}'"), .success(["execute": "x"])])
        // Garbage between values.
        #expect(feed(&s, #"{"execute":"x"} garbage {"execute":"y"}"#)
            == [.success(["execute": "x"]), fail("JSON parse error, invalid keyword 'garbage'"), .success(["execute": "y"])])
        // A NUL byte ends the stray text (QEMU prints it with %s).
        #expect(s.feed([0x61, 0x00]) == [fail("JSON parse error, invalid keyword 'a'"), fail("JSON parse error, stray ''")])
    }

    @Test func bracketCountingWaitsUntilBalanced() {
        var s = JSONStreamer()
        #expect(feed(&s, #"{"a": [}"#) == [])
        #expect(feed(&s, "]") == [fail("JSON parse error, expecting value")])
        #expect(feed(&s, "[}") == [fail("JSON parse error, expecting value")])
        #expect(feed(&s, "1]") == [.success(1), fail("JSON parse error, expecting value")])
    }

    @Test func flushReportsIncompleteInput() {
        var s = JSONStreamer()
        #expect(feed(&s, #"{"a": 1"#) == [])
        #expect(s.flush() == [fail("JSON parse error, premature EOI")])
        #expect(feed(&s, "12") == [])
        #expect(s.flush() == [.success(12)])
    }

    @Test func nestingLimit() {
        var s = JSONStreamer()
        let r = feed(&s, String(repeating: "{", count: 1025))
        #expect(r == [fail("JSON nesting depth limit exceeded")])
        #expect(feed(&s, #"{"a":1}"#) == [.success(["a": 1])])
    }

    @Test func tokenCountLimit() {
        var s = JSONStreamer()
        var text = "["
        text += String(repeating: "1,", count: (2 << 20) / 2)
        let r = feed(&s, text)
        #expect(r == [fail("JSON token count limit exceeded")])
    }

    /// A 100 MB string member: the same four responses QSD 7.2 gives
    /// (size limit, the rest lexed as a keyword cut to 1023 bytes of
    /// message, then a stray token), then the next request parses.
    @Test func hundredMegabyteLine() {
        var s = JSONStreamer()
        var out: [R] = []
        out += feed(&s, #"{"execute":"x","arguments":{"a":""#)
        let chunk = [UInt8](repeating: UInt8(ascii: "a"), count: 1 << 20)
        var sent = 0
        while sent < 100_000_000 {
            let n = min(chunk.count, 100_000_000 - sent)
            out += s.feed(chunk[..<n])
            sent += n
        }
        out += feed(&s, "\"}}\n{\"execute\":\"query-version\"}\n")
        #expect(out.count == 4)
        guard out.count == 4 else { return }
        #expect(out[0] == fail("JSON token size limit exceeded"))
        if case .failure(let e) = out[1] {
            #expect(e.message.hasPrefix("JSON parse error, invalid keyword 'aaaa"))
            #expect(e.message.utf8.count == 18 + 1023)
        } else {
            Issue.record("expected the keyword error")
        }
        #expect(out[2] == fail("JSON parse error, stray '\"}}\n'"))
        #expect(out[3] == .success(["execute": "query-version"]))
    }
}
