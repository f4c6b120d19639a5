import LaminaJSON
import QMP
import Testing

/// The session state machine without sockets. Expected lines are what
/// qemu-storage-daemon 7.2 answered to the same bytes.
@Suite struct QMPSessionTests {
    static let version: JSON = ["qemu": ["major": 7, "minor": 2, "micro": 22], "package": "Lamina"]

    /// Feeds `text`; answers executed commands with `{"return": {}}`
    /// (or CommandNotFound-free dummy results); returns the output lines.
    private func run(_ s: inout QMPSession, _ text: String) -> [String] {
        var out: [String] = []
        for input in s.receive(Array(text.utf8)) {
            switch s.step(for: input) {
            case .respond(let json): out.append(json.compact)
            case .execute(let req):
                out.append(s.response(to: req, result: .success(["ran": .string(req.command)])).compact)
            }
        }
        return out
    }

    private func session(oob: Bool = true) -> QMPSession {
        QMPSession(.init(version: QMPSessionTests.version, offerOOB: oob, commands: ["query-version", "quit"]))
    }

    @Test func greeting() {
        #expect(session().greeting.compact
            == #"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Lamina"}, "capabilities": ["oob"]}}"#)
        #expect(session(oob: false).greeting.compact.hasSuffix(#""capabilities": []}}"#))
    }

    @Test func negotiation() {
        var s = session()
        #expect(run(&s, #"{"execute":"query-version"}"#)
            == [#"{"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}"#])
        #expect(run(&s, #"{"execute":"nope","id":1}"#)
            == [#"{"id": 1, "error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}"#])
        #expect(run(&s, #"{"execute":"qmp_capabilities","arguments":{"x":1}}"#)
            == [#"{"error": {"class": "GenericError", "desc": "Parameter 'x' is unexpected"}}"#])
        #expect(run(&s, #"{"execute":"qmp_capabilities","arguments":{"enable":["foo"]}}"#)
            == [#"{"error": {"class": "GenericError", "desc": "Parameter 'null' does not accept value 'foo'"}}"#])
        #expect(run(&s, #"{"execute":"qmp_capabilities","arguments":{"enable":"oob"}}"#)
            == [#"{"error": {"class": "GenericError", "desc": "Invalid parameter type for 'enable', expected: array"}}"#])
        #expect(run(&s, #"{"exec-oob":"qmp_capabilities"}"#)
            == [#"{"error": {"class": "GenericError", "desc": "QMP input member 'exec-oob' is unexpected"}}"#])
        #expect(s.mode == .negotiation)
        #expect(run(&s, #"{"execute":"qmp_capabilities", "id": "x"}"#) == [#"{"return": {}, "id": "x"}"#])
        #expect(s.mode == .command && !s.oobEnabled)
        #expect(run(&s, #"{"execute":"qmp_capabilities","id":null}"#)
            == [#"{"id": null, "error": {"class": "CommandNotFound", "desc": "Capabilities negotiation is already complete, command ignored"}}"#])
        #expect(run(&s, #"{"execute":"qmp_capabilities","arguments":{"x":1}}"#)
            == [#"{"error": {"class": "GenericError", "desc": "Parameter 'x' is unexpected"}}"#])
        #expect(run(&s, #"{"execute":"query-version"}"#) == [#"{"return": {"ran": "query-version"}}"#])
    }

    @Test func requestValidation() {
        var s = session()
        _ = run(&s, #"{"execute":"qmp_capabilities"}"#)
        let cases: [(String, String)] = [
            ("[1]", #"{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}"#),
            ("{}", #"{"error": {"class": "GenericError", "desc": "QMP input lacks member 'execute'"}}"#),
            (#"{"id":5}"#, #"{"id": 5, "error": {"class": "GenericError", "desc": "QMP input lacks member 'execute'"}}"#),
            (#"{"execute":1,"id":5}"#, #"{"id": 5, "error": {"class": "GenericError", "desc": "QMP input member 'execute' must be a string"}}"#),
            (#"{"execute":"x","arguments":[]}"#, #"{"error": {"class": "GenericError", "desc": "QMP input member 'arguments' must be an object"}}"#),
            (#"{"execute":"x","bogus":1,"id":"a"}"#, #"{"id": "a", "error": {"class": "GenericError", "desc": "QMP input member 'bogus' is unexpected"}}"#),
            (#"{"execute":"x","exec-oob":"y"}"#, #"{"error": {"class": "GenericError", "desc": "QMP input member 'exec-oob' is unexpected"}}"#),
            (#"{"execute": "x", "c": 1, "arguments": 5}"#, #"{"error": {"class": "GenericError", "desc": "QMP input member 'arguments' must be an object"}}"#),
            (#"{"execute": "x", "arguments": 5, "c": 1}"#, #"{"error": {"class": "GenericError", "desc": "QMP input member 'c' is unexpected"}}"#),
            (#"{"execute":"foo", "id": [1,{"a":2}]}"#, #"{"id": [1, {"a": 2}], "error": {"class": "CommandNotFound", "desc": "The command foo has not been found"}}"#),
            (#"{"execute":"x","id":1.5}"#, #"{"id": 1.5, "error": {"class": "CommandNotFound", "desc": "The command x has not been found"}}"#),
            ("'abc'", #"{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}"#),
            (#"{"execute": @"x"}"#, #"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '@'"}}"#),
        ]
        for (input, expected) in cases {
            let out = run(&s, input + "\n")
            #expect(out.first == expected, "input \(input)")
        }
        // The session goes on after parse errors.
        #expect(run(&s, "}{\"execute\":\"quit\"}") == [
            #"{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}"#,
            #"{"return": {"ran": "quit"}}"#,
        ])
    }

    @Test func outOfBand() {
        var s = session()
        _ = run(&s, #"{"execute":"qmp_capabilities","arguments":{"enable":["oob","oob"]}}"#)
        #expect(s.oobEnabled)
        let oob = s.receive(Array(#"{"exec-oob":"query-version","id":1}"#.utf8))
        #expect(oob.count == 1 && s.isOutOfBand(oob[0]))
        #expect(s.step(for: oob[0])
            == .respond(QMPError("The command query-version does not support OOB").response(id: 1)))
        #expect(run(&s, #"{"exec-oob":"nope", "id": 5}"#)
            == [#"{"id": 5, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#])
        #expect(run(&s, #"{"exec-oob":"query-version","execute":"x"}"#)
            == [#"{"error": {"class": "GenericError", "desc": "QMP input member 'execute' clashes with 'exec-oob'"}}"#])
        #expect(run(&s, #"{"exec-oob":7}"#)
            == [#"{"error": {"class": "GenericError", "desc": "QMP input member 'exec-oob' must be a string"}}"#])
        var n = session(oob: false)
        #expect(run(&n, #"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}"#)
            == [#"{"error": {"class": "GenericError", "desc": "Capability oob not available"}}"#])
        var allowed = QMPSession(.init(version: QMPSessionTests.version, commands: ["x-oob"], oobCommands: ["x-oob"]))
        _ = run(&allowed, #"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}"#)
        let input = allowed.receive(Array(#"{"exec-oob":"x-oob"}"#.utf8))[0]
        #expect(allowed.step(for: input) == .execute(QMPRequest(command: "x-oob", arguments: .emptyObject, id: nil, outOfBand: true)))
    }

    @Test func responseEchoesID() {
        let s = session()
        let req = QMPRequest(command: "x", arguments: .emptyObject, id: ["a": [1]])
        #expect(s.response(to: req, result: .success(.emptyObject)).compact == #"{"return": {}, "id": {"a": [1]}}"#)
        #expect(s.response(to: req, result: .failure(.deviceNotFound("n"))).compact
            == #"{"id": {"a": [1]}, "error": {"class": "DeviceNotFound", "desc": "Device 'n' not found"}}"#)
    }
}
