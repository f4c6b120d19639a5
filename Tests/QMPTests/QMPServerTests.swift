import Foundation
import LaminaJSON
import QMP
import ServerKit
import Synchronization
import Testing

/// The NIO server with a dummy dispatcher, over real UNIX sockets.
@Suite(.timeLimit(.minutes(3))) struct QMPServerTests {
    @Test func greetingNegotiationAndIDs() async throws {
        let t = TestServer()
        let path = try await t.listen()
        try await blocking {
            let c = try QMPClient(unixPath: path, readGreeting: false)
            #expect(String(decoding: try c.readLine(), as: UTF8.self)
                == #"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Lamina"}, "capabilities": ["oob"]}}"#)
            #expect(try c.execute("query-version").compact
                == #"{"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}"#)
            try c.negotiate()
            #expect(try c.execute("echo", ["value": [1, "two"]], id: ["any": .null]).compact
                == #"{"return": {"value": [1, "two"], "monitor": ""}, "id": {"any": null}}"#)
            #expect(try c.execute("nope", id: 7).compact
                == #"{"id": 7, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#)
            #expect(try c.execute("blockdev-del").compact
                == #"{"error": {"class": "GenericError", "desc": "Parameter 'node-name' is missing"}}"#)
            // Raw bytes: the line ending is CR LF, as QEMU's.
            try c.send(#"{"execute":"query-named-block-nodes"}"#)
            #expect(try c.readLine() == Array(#"{"return": []}"#.utf8))
        }
        await t.shutdown()
    }

    @Test func malformedInputThenGoodCommandOnSameConnection() async throws {
        let t = TestServer()
        let path = try await t.listen()
        try await blocking {
            let c = try QMPClient(unixPath: path)
            try c.negotiate()
            try c.send("}\u{1}{\"execute\": @}\n[1]\n{\"execute\":\"echo\",\"arguments\":{\"value\":1}}\n")
            let lines = try (0..<5).map { _ in try c.readMessage().compact }
            #expect(lines == [
                #"{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}"#,
                #"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\u0001'"}}"#,
                #"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '@'"}}"#,
                #"{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}"#,
                #"{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}"#,
            ])
            #expect(try c.readMessage() == ["return": ["value": 1, "monitor": ""]])
        }
        await t.shutdown()
    }

    @Test func eventsGoOnlyToNegotiatedMonitors() async throws {
        let t = TestServer()
        let p1 = try await t.listen("a.sock", id: "a")
        let p2 = try await t.listen("b.sock", id: "b")
        let clients = try await blocking {
            let a = try QMPClient(unixPath: p1)
            let b = try QMPClient(unixPath: p2)
            try a.negotiate()
            #expect(try a.call("echo")["monitor"] == "a")
            try a.call("emit", ["event": "BLOCK_JOB_READY", "data": ["device": "j"]])
            let ev = try a.waitEvent("BLOCK_JOB_READY")
            #expect(ev["data"] == ["device": "j"])
            #expect(ev.keys.sorted() == ["data", "event", "timestamp"])
            #expect(ev["timestamp"]?["seconds"]?.int64Value ?? 0 > 1_600_000_000)
            #expect((0..<1_000_000).contains(ev["timestamp"]?["microseconds"]?.int64Value ?? -1))
            // b was not negotiated when the event fired.
            try b.negotiate()
            #expect(try b.call("echo")["monitor"] == "b")
            #expect(b.events.isEmpty)
            try a.call("emit", ["event": "SHUTDOWN"])
            let e2 = try b.waitEvent("SHUTDOWN")
            #expect(e2["data"] == nil)
            _ = try a.waitEvent("SHUTDOWN")
            return [a, b]
        }
        #expect(await t.server.negotiatedConnectionCount() == 2)
        clients.forEach { $0.close() }
        await t.shutdown()
    }

    /// The event line has QSD's member order:
    /// {"timestamp": {"seconds": S, "microseconds": U}, "event": ..., "data": ...}
    @Test func eventLineFormat() async throws {
        let t = TestServer()
        let path = try await t.listen()
        try await blocking {
            let c = try QMPClient(unixPath: path)
            try c.negotiate()
            try c.send(#"{"execute":"emit","arguments":{"event":"BLOCK_EXPORT_DELETED","data":{"id":"e"}}}"#)
            let line = String(decoding: try c.readLine(), as: UTF8.self)
            #expect(line.hasPrefix(#"{"timestamp": {"seconds": "#))
            #expect(line.contains(#", "microseconds": "#))
            #expect(line.hasSuffix(#"}, "event": "BLOCK_EXPORT_DELETED", "data": {"id": "e"}}"#))
            #expect(try c.readLine() == Array(#"{"return": {}}"#.utf8))
        }
        await t.shutdown()
    }

    @Test func commandsAreOrderedPerMonitorAndConcurrentAcrossMonitors() async throws {
        let t = TestServer()
        let p1 = try await t.listen("a.sock", id: "a")
        let p2 = try await t.listen("b.sock", id: "b")
        try await blocking {
            let a = try QMPClient(unixPath: p1)
            let b = try QMPClient(unixPath: p2)
            try a.negotiate()
            try b.negotiate()
            // Pipelined on one monitor: run one at a time, answered in
            // order. Across monitors they run together: each rendezvous
            // returns only once the other monitor's command is running.
            try a.send(#"{"execute":"rendezvous","arguments":{"count":2},"id":1}"#
                       + "\n" + (2...4).map { #"{"execute":"echo","id":\#($0)}"# }.joined(separator: "\n"))
            try b.send(#"{"execute":"rendezvous","arguments":{"count":2},"id":"b"}"#)
            let ra = try (1...4).map { _ in try a.readResponse() }
            #expect(ra.map { $0["id"] } == [1, 2, 3, 4])
            #expect(ra[0]["return"]?["met"] == true)
            let rb = try b.readResponse()
            #expect(rb["id"] == "b")
            #expect(rb["return"]?["met"] == true)
        }
        #expect(t.dispatcher.maxRunning(monitor: "a") == 1)
        #expect(t.dispatcher.maxRunning(monitor: "b") == 1)
        #expect(t.dispatcher.maxRunning.load(ordering: .sequentiallyConsistent) == 2)
        await t.shutdown()
    }

    /// QSD's socket chardev serves one client at a time: a second client
    /// waits (no greeting) until the first leaves, then its queued input runs.
    @Test func secondClientWaitsForTheFirst() async throws {
        let t = TestServer()
        let path = try await t.listen()
        try await blocking {
            let a = try QMPClient(unixPath: path)
            let b = try QMPClient(unixPath: path, timeout: 0.5, readGreeting: false)
            #expect(throws: QMPClientError.self) { _ = try b.readLine() }
            try b.send(#"{"execute":"qmp_capabilities"}"#)
            #expect(throws: QMPClientError.self) { _ = try b.readLine() }
            try a.negotiate()
            a.close()
            b.timeout = 60
            #expect(try b.readMessage()["QMP"] != nil)
            #expect(try b.readMessage() == ["return": .emptyObject])
            #expect(try b.call("echo")["value"] == .null)
        }
        await t.shutdown()
    }

    @Test func hundredMegabyteLineKeepsTheMonitorUsable() async throws {
        let t = TestServer()
        let path = try await t.listen()
        try await blocking {
            let c = try QMPClient(unixPath: path, timeout: 60)
            try c.negotiate()
            try c.send(#"{"execute":"echo","arguments":{"value":""#)
            let chunk = [UInt8](repeating: UInt8(ascii: "a"), count: 1 << 20)
            for _ in 0..<95 { try c.send(chunk) }
            try c.send(Array(repeating: UInt8(ascii: "a"), count: 100_000_000 - 95 << 20))
            try c.send("\"}}\n{\"execute\":\"echo\",\"arguments\":{\"value\":\"ok\"}}\n")
            #expect(try c.readMessage() == QMPError("JSON token size limit exceeded").response(id: nil))
            let keyword = try c.readMessage()["error"]?["desc"]?.stringValue ?? ""
            #expect(keyword.hasPrefix("JSON parse error, invalid keyword 'aaaa") && keyword.utf8.count == 1041)
            #expect(try c.readMessage() == QMPError("JSON parse error, stray '\"}}\n'").response(id: nil))
            #expect(try c.readMessage() == ["return": ["value": "ok", "monitor": ""]])
        }
        await t.shutdown()
    }

    @Test func slowReaderDoesNotBlockOtherMonitors() async throws {
        let t = TestServer()
        let p1 = try await t.listen("a.sock")
        let p2 = try await t.listen("b.sock")
        try await blocking {
            let a = try QMPClient(unixPath: p1, timeout: 30)
            let b = try QMPClient(unixPath: p2)
            try a.negotiate()
            try b.negotiate()
            try a.send(#"{"execute":"big","arguments":{"bytes":20000000}}"#)  // not read yet
            for i in 0..<20 { #expect(try b.call("echo", ["value": .int(Int64(i))])["value"] == .int(Int64(i))) }
            let big = try a.readLine()
            #expect(big.count == 20_000_000 + #"{"return": ""}"#.utf8.count)
            #expect(try a.call("echo", ["value": 1])["value"] == 1)
        }
        await t.shutdown()
    }

    @Test func quitRunsAfterTheReplyAndDisconnectsAreHarmless() async throws {
        let t = TestServer()
        let path = try await t.listen()
        try await blocking {
            let c = try QMPClient(unixPath: path)
            try c.negotiate()
            #expect(try c.call("quit") == .emptyObject)
            // A client leaving in the middle of a command.
            try c.send(#"{"execute":"sleep","arguments":{"ms":200}}"#)
            c.close()
            let d = try QMPClient(unixPath: path)
            try d.negotiate()
            #expect(try d.call("echo", ["value": 2])["value"] == 2)
        }
        #expect(t.dispatcher.quitCount.load(ordering: .sequentiallyConsistent) == 1)
        await t.shutdown()
    }

    @Test func prettyMonitor() async throws {
        let t = TestServer()
        let path = try await t.listen(style: .pretty)
        try await blocking {
            let c = try QMPClient(unixPath: path, readGreeting: false)
            var lines: [String] = []
            while lines.last != "}" { lines.append(String(decoding: try c.readLine(), as: UTF8.self)) }
            #expect(lines == ["{", "    \"QMP\": {", "        \"version\": {", "            \"qemu\": {",
                              "                \"micro\": 22,", "                \"minor\": 2,", "                \"major\": 7",
                              "            },", "            \"package\": \"Lamina\"", "        },",
                              "        \"capabilities\": [", "            \"oob\"", "        ]", "    }", "}"])
        }
        await t.shutdown()
    }

    @Test func closeRemovesSocketFiles() async throws {
        let t = TestServer()
        let path = try await t.listen()
        #expect(FileManager.default.fileExists(atPath: path))
        let c = try await blocking { try QMPClient(unixPath: path) }
        await t.server.close()
        #expect(!FileManager.default.fileExists(atPath: path))
        try await blocking { #expect(throws: QMPClientError.self) { _ = try c.readLine() } } as Void
        await t.loops.shutdown()
    }
}
