import LaminaJSON
import QMP
import Testing

/// The compact printer against bytes qemu-storage-daemon 7.2 sent.
@Suite struct JSONPrinterTests {
    @Test func compactSeparatorsAndQDictOrder() {
        #expect(JSON.object([("return", .emptyObject)]).compact == #"{"return": {}}"#)
        #expect(JSON.array([]).compact == "[]")
        let err: JSON = ["error": ["class": "CommandNotFound", "desc": "The command x has not been found"], "id": [1, ["a": 2]]]
        #expect(err.compact == #"{"id": [1, {"a": 2}], "error": {"class": "CommandNotFound", "desc": "The command x has not been found"}}"#)
        let ok: JSON = ["return": .emptyObject, "id": "x"]
        #expect(ok.compact == #"{"return": {}, "id": "x"}"#)
        let version: JSON = ["qemu": ["major": 7, "minor": 2, "micro": 22], "package": "Debian"]
        #expect(version.compact == #"{"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian"}"#)
    }

    @Test func numbersAsQEMUPrintsThem() {
        let values: [JSON] = [
            .double(0.1), .double(1e300), .double(-0.0), .double(1e-7), .double(100), .uint(18446744073709551615),
            .double(18446744073709551616.0), .double(.infinity), .int(Int64.min), .double(-9223372036854775809.0), .int(0),
        ]
        #expect(JSON.array(values).compact
            == "[0.10000000000000001, 1.0000000000000001e+300, -0, 9.9999999999999995e-08, 100, 18446744073709551615, 1.8446744073709552e+19, inf, -9223372036854775808, -9.2233720368547758e+18, 0]")
    }

    @Test func quoting() {
        #expect(JSON.quote("\u{e9}\u{1F600}") == #""\u00E9\uD83D\uDE00""#)
        #expect(JSON.quote("/\u{08}\u{0C}\n\r\t\u{01}\u{7F}") == #""/\b\f\n\r\t\u0001\u007F""#)
        #expect(JSON.quote("\u{0}") == #""\u0000""#)
        #expect(JSON.quote("a\"b\\c'") == #""a\"b\\c'""#)
        let nonchars = String(String.UnicodeScalarView([Unicode.Scalar(0xFFFE)!, Unicode.Scalar(0xFDD0)!]))
        #expect(JSON.quote(nonchars) == #""\uFFFD\uFFFD""#)
    }

    @Test func prettyMatchesQemuImg() {
        let v: JSON = ["a": 1, "b": [true, .null], "c": .emptyObject, "d": []]
        // QDict order puts "d" first, as qemu-img would.
        #expect(v.pretty() == "{\n    \"d\": [\n    ],\n    \"a\": 1,\n    \"b\": [\n        true,\n        null\n    ],\n    \"c\": {\n    }\n}")
    }

    @Test func qmpLineEndsWithCRLF() {
        let v: JSON = ["return": ["a": 1]]
        #expect(String(decoding: v.qmpLine(), as: UTF8.self) == "{\"return\": {\"a\": 1}}\r\n")
    }

    /// `--monitor pretty=on` bytes from QSD 7.2.
    @Test func prettyQMPLines() {
        let ret: JSON = ["return": .emptyObject]
        #expect(ret.qmpLine(.pretty) == Array("{\r\n    \"return\": {\r\n    }\r\n}\r\n".utf8))
        let err = QMPError.commandNotFound("x").response(id: [])
        #expect(String(decoding: err.qmpLine(.pretty), as: UTF8.self)
            == "{\r\n    \"id\": [\r\n    ],\r\n    \"error\": {\r\n        \"class\": \"CommandNotFound\",\r\n"
            + "        \"desc\": \"The command x has not been found\"\r\n    }\r\n}\r\n")
    }

    @Test func accessorsAndEquality() {
        var v: JSON = ["a": "x", "n": 5, "u": .uint(7), "l": [1, 2]]
        #expect(v["a"]?.stringValue == "x")
        #expect(v["n"]?.int64Value == 5 && v["n"]?.uint64Value == 5 && v["u"]?.int64Value == 7)
        #expect(v["l"]?[1] == 2)
        #expect(v["missing"] == nil)
        v["a"] = nil
        v["z"] = true
        #expect(v.keys == ["n", "u", "l", "z"])
        #expect(JSON.object([("a", 1), ("b", 2)]) != JSON.object([("b", 2), ("a", 1)]))
        #expect(JSON.object([("a", 1), ("b", 2)]).sameMembers(as: JSON.object([("b", 2), ("a", 1)])))
        #expect(JSON.int(-1).uint64Value == nil && JSON.double(1).int64Value == nil)
    }

    @Test func tdbHashBuckets() {
        // "arguments" and "c" share a bucket: newest first (QSD reports the later one).
        #expect(JSON.tdbHash("arguments") % 512 == 447 && JSON.tdbHash("c") % 512 == 447)
        #expect(JSON.qdictOrder(keys: ["execute", "c", "arguments"]) == ["execute", "arguments", "c"])
        #expect(JSON.qdictOrder(keys: ["execute", "arguments", "c"]) == ["execute", "c", "arguments"])
    }
}
