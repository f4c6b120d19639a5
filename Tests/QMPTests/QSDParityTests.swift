import Foundation
import LaminaJSON
import QMP
import Testing

/// Sends identical bytes to qemu-storage-daemon 7.2 and to our server (with
/// the dummy dispatcher) and requires byte-identical answers for every
/// protocol-level mistake that does not depend on QEMU's command set.
/// Not skipped: CI installs qemu-storage-daemon (qemu-system-common).
@Suite(.timeLimit(.minutes(3))) struct QSDParityTests {
    /// A request both sides answer with an error carrying id "sync": marks
    /// the end of one case's responses.
    static let sync = Array("\n{\"execute\":\"x-sync\",\"id\":\"sync\"}\n".utf8)

    static let negotiationCases: [[UInt8]] = [
        #"{"execute":"query-version"}"#, #"{"execute":"nope","id":1}"#,
        #"{"execute":"qmp_capabilities","arguments":{"x":1}}"#,
        #"{"execute":"qmp_capabilities","arguments":{"enable":["foo"]}}"#,
        #"{"execute":"qmp_capabilities","arguments":{"enable":"oob"}}"#,
        #"{"exec-oob":"qmp_capabilities"}"#, "[1]", "{}", "}", #"{"execute": tru}"#,
    ].map { Array($0.utf8) }

    static let commandTexts: [String] = [
        #"{"execute":"qmp_capabilities","id":null}"#,
        #"{"execute":"qmp_capabilities","arguments":{"x":1}}"#,
        "[1]", "{}", #"{"id":5}"#, #"{"execute":1,"id":5}"#, #"{"execute":"x","arguments":[]}"#,
        #"{"execute":"x","bogus":1,"id":"a"}"#, #"{"execute":"x","exec-oob":"y"}"#,
        #"{"execute": "x", "c": 1, "arguments": 5}"#, #"{"execute": "x", "arguments": 5, "c": 1}"#,
        #"{"exec-oob":"query-version"}"#,
        #"{"execute":"foo", "id": [1,{"a":2}]}"#, #"{"execute":"x","id":1.5}"#, "'abc'", "1 2 3",
        #"{"execute":"x","id":[0.1, 1e300, -0.0, 1e-7, 100.0, 18446744073709551615, 18446744073709551616, 1E400, -9223372036854775809, -0]}"#,
        #"{"execute":"x","id":["\u00e9\ud83d\ude00", "\/\b\f\n\r\t\u0001\u007f", "\u0000"]}"#,
        "{'execute':'x','id':'a\\\"b\\'c'}",
        #"{"execute": "x" "y"}"#, #"{"execute" "x"}"#, #"{"execute": }"#, "{1: 2}", #"{"a":1,"a":2}"#,
        "[1,]", "[1 2]", #"{"a":1,}"#, "]", "{]", "[}", #"{"a": [}]"#, "nul@",
        #"{"execute": @"x"}"#, "{\"execute\": \"a\u{1}b\"}", #"{"execute":"\x"}"#, #"{"execute":"\ud800"}"#,
        #"{"execute":"\u12"}"#, #"{"execute":"\ud800\u0041"}"#, #"{"execute":"\uFFFE"}"#, "01", "1.e5", "%d",
        #"{"execute":"x"} garbage {"execute":"y"}"#, String(repeating: "k", count: 3000),
        String(repeating: "[", count: 1025) + String(repeating: "]", count: 1025),
        #"{"execute":"query-version","arguments":{"x":1}}"#,
        #"{"execute":"blockdev-del"}"#, #"{"execute":"blockdev-del","arguments":{"node-name":1}}"#,
        #"{"execute":"query-named-block-nodes","arguments":{"flat":"x"}}"#,
        #"{"execute":"query-named-block-nodes","arguments":{"flat":true,"q":1,"r":2,"s":3}}"#,
        #"{"execute":"query-named-block-nodes","arguments":{"b":1,"a":2,"c":3,"d":4,"e":5,"f":6,"g":7,"h":8,"i":9}}"#,
    ]

    static let rawCases: [[UInt8]] = [
        [0xFF] + Array(#"{"execute":"x"}"#.utf8),
        Array(#"{"execute":""#.utf8) + [0xC3] + Array(#""}"#.utf8),
        Array(#"{"execute":""#.utf8) + [0xC3, 0xA9] + Array(#""}"#.utf8),
        [0x61, 0x00, 0x62],
    ]

    static let commandCases: [[UInt8]] = commandTexts.map { Array($0.utf8) } + rawCases

    static let oobCases: [[UInt8]] = [
        #"{"exec-oob":"query-version","id":1}"#, #"{"exec-oob":"nope", "id": 5}"#,
        #"{"exec-oob":"query-version","execute":"x"}"#, #"{"exec-oob":7}"#, #"{"execute":"qmp_capabilities"}"#,
    ].map { Array($0.utf8) }

    /// Sends one case and returns the raw lines up to the sync answer.
    private static func exchange(_ c: QMPClient, _ bytes: [UInt8]) throws -> [String] {
        try c.send(bytes + sync)
        var lines: [String] = []
        while true {
            let line = try c.readLine()
            if let v = try? JSON.parse(String(decoding: line, as: UTF8.self)), v["id"] == "sync" { return lines }
            lines.append(String(decoding: line, as: UTF8.self))
        }
    }

    /// Runs every phase against the socket at `path`; returns the transcript.
    private static func transcript(_ path: String) throws -> [[String]] {
        var out: [[String]] = []
        let c = try QMPClient(unixPath: path)
        for bytes in negotiationCases { out.append(try exchange(c, bytes)) }
        out.append(try exchange(c, Array(#"{"execute":"qmp_capabilities","id":"neg"}"#.utf8)))
        for bytes in commandCases { out.append(try exchange(c, bytes)) }
        c.close()
        let o = try QMPClient(unixPath: path)
        out.append(try exchange(o, Array(#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}"#.utf8)))
        for bytes in oobCases { out.append(try exchange(o, bytes)) }
        o.close()
        return out
    }

    private var negotiationCases: [[UInt8]] { Self.negotiationCases }
    private var commandCases: [[UInt8]] { Self.commandCases }
    private var oobCases: [[UInt8]] { Self.oobCases }

    @Test func protocolMistakesAnswerLikeQSD() async throws {
        let t = TestServer()
        let ours = try await t.listen()
        let qsd = try QSDProcess(dir: t.dir)
        let (expected, got) = try await blocking {
            (try QSDParityTests.transcript(qsd.socket), try QSDParityTests.transcript(ours))
        }
        #expect(expected.count == got.count)
        #expect(expected.count == 2 + negotiationCases.count + commandCases.count + oobCases.count)
        let all = expected.joined()
        #expect(all.contains(#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\uFFFD'"}}"#))
        #expect(all.contains(#"{"error": {"class": "GenericError", "desc": "Parameter 'b' is unexpected"}}"#))
        let inputs = QSDParityTests.negotiationCases + [nil] + QSDParityTests.commandCases + [nil] + QSDParityTests.oobCases
        for (i, (e, g)) in zip(expected, got).enumerated() {
            let input = inputs.indices.contains(i) ? inputs[i].map { String(decoding: $0.prefix(80), as: UTF8.self) } : nil
            #expect(e == g, "case \(i): \(input ?? "-")")
            #expect(!e.isEmpty || input == nil || input == "1 2 3", "case \(i) produced no answer")
        }
        await t.shutdown()
    }

    /// QSD serves one client per socket monitor; a second one waits without
    /// a greeting until the first leaves. Same behaviour on both.
    @Test func secondClientWaitsOnBoth() async throws {
        let t = TestServer()
        let ours = try await t.listen()
        let qsd = try QSDProcess(dir: t.dir)
        for path in [qsd.socket, ours] {
            try await blocking {
                let a = try QMPClient(unixPath: path)
                let b = try QMPClient(unixPath: path, timeout: 0.5, readGreeting: false)
                #expect(throws: QMPClientError.self) { _ = try b.readLine() }
                a.close()
                b.timeout = 60
                #expect(try b.readMessage()["QMP"]?["capabilities"] == ["oob"])
            }
        }
        await t.shutdown()
    }
}
