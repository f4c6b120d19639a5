import LaminaJSON
import QMP
import Testing

/// The argument visitor; every text below is what qemu-storage-daemon 7.2
/// answered for the same arguments (blockdev-add, nbd-server-start,
/// block-export-add, query-named-block-nodes).
@Suite struct QAPIInputTests {
    private func err(_ args: JSON, mode: QAPIInput.Mode = .qobject, _ visit: (QAPIInput) throws(QMPError) -> Void) -> String? {
        do {
            let i = try QAPIInput(args, mode: mode)
            try visit(i)
            try i.finish()
            return nil
        } catch {
            return error.desc
        }
    }

    /// A slice of BlockdevOptionsFile: driver, filename, cache, read-only, aio.
    private func blockdevFile(_ i: QAPIInput) throws(QMPError) {
        _ = try i.enumValue("driver", allowed: ["file", "qcow2", "raw"])
        _ = try i.string("filename")
        _ = try i.optionalBool("read-only")
        _ = try i.optionalEnumValue("aio", allowed: ["threads", "native", "io_uring"])
        _ = try i.optionalObject("cache") { c throws(QMPError) in
            _ = try c.optionalBool("direct")
            _ = try c.optionalBool("no-flush")
        }
        _ = try i.optionalInteger("aio-max-batch", as: Int64.self)
    }

    @Test func missingTypeEnumUnexpected() {
        #expect(err([:], blockdevFile) == "Parameter 'driver' is missing")
        #expect(err(["driver": "nope"], blockdevFile) == "Parameter 'driver' does not accept value 'nope'")
        #expect(err(["driver": 5], blockdevFile) == "Invalid parameter type for 'driver', expected: string")
        #expect(err(["driver": "file"], blockdevFile) == "Parameter 'filename' is missing")
        #expect(err(["driver": "file", "filename": 1], blockdevFile) == "Invalid parameter type for 'filename', expected: string")
        #expect(err(["driver": "file", "filename": "/x", "bogus": 1], blockdevFile) == "Parameter 'bogus' is unexpected")
        #expect(err(["driver": "file", "filename": "/x", "cache": ["direct": "yes"]], blockdevFile)
            == "Invalid parameter type for 'cache.direct', expected: boolean")
        #expect(err(["driver": "file", "filename": "/x", "cache": ["direct": true, "zz": 1]], blockdevFile)
            == "Parameter 'cache.zz' is unexpected")
        #expect(err(["driver": "file", "filename": "/x", "cache": 5], blockdevFile)
            == "Invalid parameter type for 'cache', expected: object")
        #expect(err(["driver": "file", "filename": "/x", "read-only": "on"], blockdevFile)
            == "Invalid parameter type for 'read-only', expected: boolean")
        #expect(err(["driver": "file", "filename": "/x", "aio-max-batch": .uint(9223372036854775808)], blockdevFile)
            == "Invalid parameter type for 'aio-max-batch', expected: integer")
        #expect(err(["driver": "file", "filename": "/x", "aio-max-batch": 1.5], blockdevFile)
            == "Invalid parameter type for 'aio-max-batch', expected: integer")
    }

    @Test func nestedNamesAndBareNames() {
        // qcow2's "file" member: BlockdevRef alternate (object or string).
        func qcow2(_ i: QAPIInput) throws(QMPError) {
            _ = try i.enumValue("driver", allowed: ["file", "qcow2"])
            let file = try i.required("file")
            switch file.qtype {
            case .object: try file.object { o throws(QMPError) in try blockdevFile(o) }
            case .string: _ = try file.string()
            default: throw file.alternateMismatch(expected: "BlockdevRef")
            }
        }
        #expect(err(["driver": "qcow2", "file": 5], qcow2) == "Invalid parameter type for 'file', expected: BlockdevRef")
        #expect(err(["driver": "qcow2", "file": .null], qcow2) == "Invalid parameter type for 'file', expected: BlockdevRef")
        #expect(err(["driver": "qcow2"], qcow2) == "Parameter 'file' is missing")
        #expect(err(["driver": "qcow2", "file": ["driver": "file"]], qcow2) == "Parameter 'file.filename' is missing")
        #expect(err(["driver": "qcow2", "file": ["driver": "file", "filename": "/x", "cache": ["direct": 1]]], qcow2)
            == "Invalid parameter type for 'file.cache.direct', expected: boolean")
        // Enum errors name the bare member.
        #expect(err(["driver": "qcow2", "file": ["driver": "file", "filename": "/x", "aio": "bogus"]], qcow2)
            == "Parameter 'aio' does not accept value 'bogus'")
    }

    @Test func listsUseIndexesAndNull() {
        func export(_ i: QAPIInput) throws(QMPError) {
            _ = try i.optionalList("bitmaps") { e throws(QMPError) in
                switch e.qtype {
                case .string: return try e.string()
                case .object: return try e.object { o throws(QMPError) in try o.string("node") + o.string("name") }
                default: throw e.alternateMismatch(expected: "BlockDirtyBitmapOrStr")
                }
            }
        }
        #expect(err(["bitmaps": "x"], export) == "Invalid parameter type for 'bitmaps', expected: array")
        #expect(err(["bitmaps": ["x", 1]], export) == "Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr")
        #expect(err(["bitmaps": [["node": "a"]]], export) == "Parameter 'bitmaps[0].name' is missing")
        #expect(err(["bitmaps": [["node": "a", "name": 1]]], export)
            == "Invalid parameter type for 'bitmaps[0].name', expected: string")
        #expect(err(["bitmaps": [["node": "a", "name": "b", "c": 1]]], export) == "Parameter 'bitmaps[0].c' is unexpected")
        #expect(err(["enable": ["foo"]]) { i throws(QMPError) in
            _ = try i.list("enable") { v throws(QMPError) in try v.enumValue(allowed: ["oob"]) }
        } == "Parameter 'null' does not accept value 'foo'")
    }

    @Test func integerRanges() {
        func nbd(_ i: QAPIInput) throws(QMPError) { _ = try i.optionalInteger("max-connections", as: UInt32.self) }
        #expect(err(["max-connections": -1], nbd) == "Parameter 'max-connections' expects uint32_t")
        #expect(err(["max-connections": 4294967296], nbd) == "Parameter 'max-connections' expects uint32_t")
        #expect(err(["max-connections": .uint(UInt64.max)], nbd) == "Parameter 'max-connections' expects uint32_t")
        #expect(err(["max-connections": "x"], nbd) == "Parameter 'max-connections' expects uint64")
        #expect(err(["max-connections": 1.0], nbd) == "Parameter 'max-connections' expects uint64")
        #expect(err(["max-connections": 7], nbd) == nil)
        func size(_ i: QAPIInput) throws(QMPError) { _ = try i.optionalSize("s") }
        #expect(err(["s": -1], size) == nil)  // wraps, as QEMU does
        #expect(err(["s": "1k"], size) == "Parameter 's' expects uint64")
    }

    @Test func keyvalConversions() {
        func v(_ i: QAPIInput) throws(QMPError) {
            _ = try i.optionalBool("read-only")
            _ = try i.optionalObject("cache") { c throws(QMPError) in _ = try c.optionalBool("direct") }
            _ = try i.optionalInt64("aio-max-batch")
            _ = try i.optionalSize("size")
            _ = try i.optionalString("filename")
        }
        #expect(err(["read-only": "maybe"], mode: .keyval, v) == "Parameter 'read-only' expects 'on' or 'off'")
        #expect(err(["cache": ["direct": "x"]], mode: .keyval, v) == "Parameter 'cache.direct' expects 'on' or 'off'")
        #expect(err(["cache": "on"], mode: .keyval, v) == "Invalid parameter type for 'cache', expected: object")
        #expect(err(["aio-max-batch": "x"], mode: .keyval, v) == "Parameter 'aio-max-batch' expects integer")
        #expect(err(["size": "1.5x"], mode: .keyval, v) == "Parameter 'size' expects size")
        #expect(err(["filename": ["a": "b"]], mode: .keyval, v) == "Parameters 'filename.*' are unexpected")
        for yes in ["on", "yes", "true", "y"] { #expect(err(["read-only": .string(yes)], mode: .keyval, v) == nil) }
        for no in ["off", "no", "false", "n"] { #expect(err(["read-only": .string(no)], mode: .keyval, v) == nil) }
        #expect(err(["aio-max-batch": "0x10", "size": "1.5k"], mode: .keyval, v) == nil)
    }

    @Test func keyvalValues() throws {
        let i = try QAPIInput(["a": "0x10", "b": "-1", "s": "1.5k", "t": "0x1000", "l": ["1", "2"]], mode: .keyval)
        #expect(try i.int64("a") == 16)
        #expect(try i.uint64("b") == UInt64.max)
        #expect(try i.size("s") == 1536)
        #expect(try i.size("t") == 4096)
        #expect(try i.list("l") { v throws(QMPError) in try v.integer(UInt8.self) } == [1, 2])
        try i.finish()
    }

    @Test func sizeSyntax() {
        #expect(CNumbers.strtosz("1") == 1)
        #expect(CNumbers.strtosz("1k") == 1024 && CNumbers.strtosz("1K") == 1024)
        #expect(CNumbers.strtosz("1.5G") == 1_610_612_736)
        #expect(CNumbers.strtosz("1.k") == 1024)
        #expect(CNumbers.strtosz("0.5") == nil)
        #expect(CNumbers.strtosz("-1") == nil)
        #expect(CNumbers.strtosz("1e3") == nil)
        #expect(CNumbers.strtosz("16E") == nil)
        #expect(CNumbers.strtosz("15E") == 15 << 60)
        #expect(CNumbers.strtosz("0x10k") == nil)
        #expect(CNumbers.strtosz("1b") == 1)
    }

    /// The unexpected member QEMU reports among several is the first in
    /// GLib's hash table order (observed on QSD: {a,b} and {b,a} both
    /// report 'b'; {flat,q,r,s} and {flat,q,r,s,t} report 's').
    @Test func unexpectedMemberOrderFollowsGLib() {
        func flat(_ i: QAPIInput) throws(QMPError) { _ = try i.optionalBool("flat") }
        #expect(err(["a": 1, "b": 2], flat) == "Parameter 'b' is unexpected")
        #expect(err(["b": 1, "a": 2], flat) == "Parameter 'b' is unexpected")
        #expect(err(["flat": true, "q": 1, "r": 2, "s": 3], flat) == "Parameter 's' is unexpected")
        #expect(err(["flat": true, "q": 1, "r": 2, "s": 3, "t": 4], flat) == "Parameter 's' is unexpected")
        // Larger tables (GLib grows and rehashes them), observed on QSD 7.2.
        let cases: [([String], String)] = [
            ("abcdefghij".map(String.init), "b"),
            (["flat"] + "abcdefghijklmnop".map(String.init), "i"),
            ((0..<30).map { "k\($0)" }, "k13"),
            (["flat"] + (0..<7).map { "x\($0)" }, "x6"),
            ((0..<12).map { "node-name-\($0)" }, "node-name-6"),
            (["\u{e9}", "\u{fc}", "a"], "\u{fc}"),
            (["flat"] + (0..<40).map { "y\($0)" }, "y28"),
        ]
        for (keys, expected) in cases {
            let args = JSON.object(keys.map { ($0, $0 == "flat" ? true : 1) })
            #expect(err(args, flat) == "Parameter '\(expected)' is unexpected", "keys \(keys)")
        }
    }
}
