import LaminaJSON
import Testing

/// QEMU's JSON dialect and error texts (each expected text was produced
/// by qemu-storage-daemon 7.2 for the same input).
@Suite struct JSONParserTests {
    private func parse(_ s: String) -> Result<JSON, JSONParseError> {
        do { return .success(try JSON.parse(s)) } catch { return .failure(error) }
    }

    private func error(_ s: String) -> String? {
        if case .failure(let e) = parse(s) { return e.message }
        return nil
    }

    @Test func values() throws {
        #expect(try JSON.parse(#"{"a": [1, -2, 1.5, true, false, null, "s"]}"#)
            == ["a": [1, -2, 1.5, true, false, .null, "s"]])
        #expect(try JSON.parse("'single \"quoted\" \\' string'") == .string("single \"quoted\" ' string"))
        #expect(try JSON.parse(#""\u00e9\ud83d\ude00\/\b\f\n\r\t\u0000""#) == .string("\u{e9}\u{1F600}/\u{8}\u{C}\n\r\t\u{0}"))
        #expect(try JSON.parse("\"\u{e9}\"") == .string("\u{e9}"))
        #expect(try JSON.parse(" \t\r\n {} \n") == .emptyObject)
    }

    @Test func integersAndDoubles() throws {
        #expect(try JSON.parse("9223372036854775807") == .int(Int64.max))
        #expect(try JSON.parse("-9223372036854775808") == .int(Int64.min))
        #expect(try JSON.parse("9223372036854775808") == .uint(9223372036854775808))
        #expect(try JSON.parse("18446744073709551615") == .uint(UInt64.max))
        #expect(try JSON.parse("18446744073709551616") == .double(18446744073709551616.0))
        #expect(try JSON.parse("-9223372036854775809") == .double(-9223372036854775809.0))
        #expect(try JSON.parse("-0") == .int(0))
        #expect(try JSON.parse("-0.0") == .double(-0.0))
        #expect(try JSON.parse("1E400") == .double(.infinity))
        #expect(try JSON.parse("1.0e5") == .double(100000))
    }

    @Test func syntaxErrors() {
        #expect(error(#"{"execute": tru}"#) == "JSON parse error, invalid keyword 'tru'")
        #expect(error(#"{"execute": "x" "y"}"#) == "JSON parse error, expected separator in dict")
        #expect(error(#"{"execute" "x"}"#) == "JSON parse error, missing : in object pair")
        #expect(error(#"{"execute": }"#) == "JSON parse error, expecting value")
        #expect(error("{1: 2}") == "JSON parse error, key is not a string in object")
        #expect(error(#"{"a":1,"a":2}"#) == "JSON parse error, duplicate key")
        #expect(error("[1,]") == "JSON parse error, expecting value")
        #expect(error("[1 2]") == "JSON parse error, expected separator in list")
        #expect(error(#"{"a":1,}"#) == "JSON parse error, expecting value")
        #expect(error("}") == "JSON parse error, expecting value")
        #expect(error("{]") == "JSON parse error, expecting value")
        #expect(error("[}") == "JSON parse error, expecting value")
        #expect(error(#"{"a":[}]"#) == "JSON parse error, expecting value")
        #expect(error(#"{"driver":"file""#) == "JSON parse error, premature EOI")
        #expect(error("[[[") == "JSON parse error, premature EOI")
    }

    @Test func stringErrors() {
        #expect(error(#"{"execute":"\x"}"#) == "JSON parse error, invalid escape sequence in string")
        #expect(error(#"{"execute":"\ud800"}"#) == #"JSON parse error, \ud800 is not a valid Unicode character"#)
        #expect(error(#"{"execute":"\u12"}"#) == #"JSON parse error, \u12" is not a valid Unicode character"#)
        #expect(error(#"{"execute":"\ud800\u0041"}"#) == #"JSON parse error, \ud800 is not a valid Unicode character"#)
        #expect(error(#""\uFFFE""#) == #"JSON parse error, \uFFFE is not a valid Unicode character"#)
    }

    @Test func invalidUTF8InString() {
        var s = JSONStreamer()
        let r = s.feed([0x22, 0xC3, 0x22, 0x20])
        #expect(r == [.failure(JSONParseError("JSON parse error, invalid UTF-8 sequence in string"))])
        // Modified UTF-8: C0 80 is U+0000.
        #expect(s.feed([0x22, 0xC0, 0x80, 0x22]) == [.success(.string("\u{0}"))])
    }

    @Test func lexicalErrors() {
        #expect(error("01") == "JSON parse error, stray '01'")
        #expect(error("1.e5") == "JSON parse error, stray '1.e'")
        #expect(error("%d") == "JSON parse error, stray '%'")
        #expect(error("@") == "JSON parse error, stray '@'")
        #expect(error("-") == "JSON parse error, stray '-'")
        #expect(error("\"abc") == "JSON parse error, stray '\"abc'")
    }

    @Test func wholeValueRules() {
        #expect(error("") == "Expecting a JSON value")
        #expect(error("   ") == "Expecting a JSON value")
        #expect(error("{} {}") == "Expecting at most one JSON value")
        #expect(error("{} @") == "Expecting at most one JSON value")
        #expect(error("@ {}") == "JSON parse error, stray '@'")
        #expect(error("[1] 2") == "Expecting at most one JSON value")
    }

    @Test func longKeywordMessageIsCutLikeQEMU() {
        let word = String(repeating: "a", count: 5000)
        let msg = error(word)!
        #expect(msg.utf8.count == "JSON parse error, ".utf8.count + 1023)
        #expect(msg.hasPrefix("JSON parse error, invalid keyword 'aaaa"))
    }

    @Test func deepNestingParsesWithoutRecursion() throws {
        let depth = 1024
        let text = String(repeating: "[", count: depth) + String(repeating: "]", count: depth)
        var v = try JSON.parse(text)
        var n = 1
        while case .array(let a) = v, let first = a.first { v = first; n += 1 }
        #expect(n == depth)
        #expect(error(String(repeating: "[", count: depth + 1) + String(repeating: "]", count: depth + 1))
            == "JSON nesting depth limit exceeded")
    }
}
