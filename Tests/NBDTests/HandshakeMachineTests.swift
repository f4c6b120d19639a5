import NBDProtocol
import TestSupport
import Testing

/// An export directory for socket-free handshake tests.
struct FakeDirectory: NBDExportDirectory {
    var exports: [NBDExportInfo]
    var attached: [String] = []

    func listExports() -> [NBDExportInfo] { exports }
    func lookupExport(named name: [UInt8]) -> NBDExportInfo? { exports.first { Array($0.name.utf8) == name } }
    mutating func attachExport(named name: [UInt8]) -> NBDExportInfo? {
        guard let e = lookupExport(named: name) else { return nil }
        attached.append(e.name)
        return e
    }

    static let standard = FakeDirectory(exports: [
        NBDExportInfo(id: 1, name: "e1", description: "hello", size: 64 << 20,
                      flags: .qemu(writable: true, multiConn: true)),
        NBDExportInfo(id: 2, name: "ro", description: nil, size: 64 << 20, flags: .qemu(writable: false, multiConn: true)),
        NBDExportInfo(id: 3, name: "depth", description: nil, size: 1 << 20, flags: .qemu(writable: false, multiConn: false),
                      requestAlignment: 512, allocationDepth: true, bitmaps: ["b0", "b1"]),
    ])
}

/// Builds client bytes.
func clientOption(_ option: UInt32, _ data: [UInt8] = []) -> [UInt8] {
    var w = NBDByteWriter()
    w.u64(NBDMagic.option)
    w.u32(option)
    w.u32(UInt32(data.count))
    w.append(data)
    return w.bytes
}

let clientFlags: [UInt8] = [0, 0, 0, 3]

/// Parsed option replies from server bytes.
func parseReplies(_ bytes: [UInt8]) -> [(option: UInt32, type: UInt32, payload: [UInt8])] {
    var out: [(UInt32, UInt32, [UInt8])] = []
    var i = 0
    while i + 20 <= bytes.count {
        let len = Int(be32(bytes, i + 16))
        out.append((be32(bytes, i + 8), be32(bytes, i + 12), Array(bytes[(i + 20)..<(i + 20 + len)])))
        i += 20 + len
    }
    return out
}

/// Feeds `input` in pieces of `chunk` bytes (offering unconsumed bytes
/// again, as the connection does) until a terminal outcome.
func drive(_ input: [UInt8], chunk: Int = .max, directory: inout FakeDirectory)
    -> (output: [UInt8], outcome: NBDHandshake.Outcome, leftover: Int) {
    var machine = NBDHandshake()
    var output: [UInt8] = []
    var pending: [UInt8] = []
    var pos = 0
    while true {
        let n = min(chunk, input.count - pos)
        pending += input[pos..<(pos + n)]
        pos += n
        let step = pending.withUnsafeBytes { machine.receive($0, directory: &directory) }
        output += step.output
        pending.removeFirst(step.consumed)
        if step.outcome != .needMoreInput || pos == input.count {
            return (output, step.outcome, pending.count + input.count - pos)
        }
    }
}

@Suite struct HandshakeMachineTests {
    @Test func greetingIsFixedNewstyleNoZeroes() {
        #expect(NBDHandshake.greeting == Array("NBDMAGIC".utf8) + [0x49, 0x48, 0x41, 0x56, 0x45, 0x4f, 0x50, 0x54, 0, 3])
    }

    @Test func listInfoAndGo() {
        var dir = FakeDirectory.standard
        let input = clientFlags + clientOption(NBDOption.list) + clientOption(NBDOption.structuredReply)
            + clientOption(NBDOption.info, goPayload("e1", requests: [NBDInfo.name]))
            + clientOption(NBDOption.go, goPayload("e1")) + [1, 2, 3]
        let r = drive(input, directory: &dir)
        let replies = parseReplies(r.output)
        #expect(replies.map(\.type) == [2, 2, 2, 1, 1, 3, 3, 3, 3, 1, 3, 3, 3, 1])
        #expect(replies[0].payload == [0, 0, 0, 2] + Array("e1hello".utf8))
        #expect(replies[5].payload == [0, 1] + Array("e1".utf8))
        #expect(replies[7].payload == [0, 3, 0, 0, 0, 1, 0, 0, 0x10, 0, 0x02, 0, 0, 0])
        // Flags 0x0ded: QEMU 7.2's writable export with structured replies.
        #expect(replies[8].payload == [0, 0, 0, 0, 0, 0, 0x04, 0, 0, 0, 0x0d, 0xed])
        guard case .transmission(let s) = r.outcome else { Issue.record("no transmission"); return }
        #expect(s.structured && s.export.name == "e1" && s.transmissionFlags.rawValue == 0x0ded)
        #expect(r.leftover == 3)
        #expect(dir.attached == ["e1"])
    }

    @Test func byteAtATimeEqualsWhole() {
        let input = clientFlags + clientOption(NBDOption.structuredReply)
            + clientOption(NBDOption.listMetaContext, metaPayload("depth", []))
            + clientOption(NBDOption.setMetaContext, metaPayload("depth", ["qemu:dirty-bitmap:b1", "base:allocation",
                                                                          String(repeating: "x", count: 5000)]))
            + clientOption(99, Array(repeating: 7, count: 300))
            + clientOption(NBDOption.info, goPayload("zzz"))
            + clientOption(NBDOption.go, goPayload("depth", requests: [NBDInfo.blockSize]))
        var d1 = FakeDirectory.standard, d2 = FakeDirectory.standard
        let whole = drive(input, directory: &d1)
        let bytewise = drive(input, chunk: 1, directory: &d2)
        #expect(whole.output == bytewise.output)
        #expect(whole.outcome == bytewise.outcome)
        guard case .transmission(let s) = whole.outcome else { Issue.record("no transmission"); return }
        #expect(s.meta.baseAllocation && !s.meta.allocationDepth && s.meta.bitmaps == [false, true])
        let replies = parseReplies(whole.output)
        let contexts = replies.filter { $0.type == NBDOptionReply.metaContext }.map { ($0.option, Array($0.payload)) }
        #expect(contexts.map(\.0) == [9, 9, 9, 9, 10, 10])
        #expect(contexts[4].1 == [0, 0, 0, 0] + Array("base:allocation".utf8))
        #expect(contexts[5].1 == [0, 0, 0, 3] + Array("qemu:dirty-bitmap:b1".utf8))
        #expect(replies.contains { $0.type == NBDOptionReply.errUnsupported && $0.payload == Array("Unsupported option 99 (<unknown>)".utf8) })
        #expect(replies.contains { $0.type == NBDOptionReply.errUnknown && $0.payload == Array("export 'zzz' not present".utf8) })
        // GO with NBD_INFO_BLOCK_SIZE: minimum is the request alignment.
        #expect(replies.contains { $0.type == NBDOptionReply.info && $0.payload == [0, 3, 0, 0, 2, 0, 0, 0, 0x10, 0, 0x02, 0, 0, 0] })
    }

    @Test func metaQueriesLikeQemu() {
        func list(_ queries: [String], export: String = "depth") -> [String] {
            var dir = FakeDirectory.standard
            let r = drive(clientFlags + clientOption(NBDOption.listMetaContext, metaPayload(export, queries)), directory: &dir)
            return parseReplies(r.output).filter { $0.type == NBDOptionReply.metaContext }
                .map { String(decoding: $0.payload.dropFirst(4), as: UTF8.self) }
        }
        #expect(list([]) == ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"])
        #expect(list(["qemu:"]) == ["qemu:allocation-depth", "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"])
        #expect(list(["base:"]) == ["base:allocation"])
        #expect(list(["qemu:dirty-bitmap:"]) == ["qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"])
        #expect(list(["qemu:allocation-depth"], export: "e1") == [])
        #expect(list(["foo:bar", "", "qemu:bogus", "base:allocationx"]) == [])
        #expect(list([]) == list(["base:", "qemu:"]))
    }

    @Test func hostileHeadersClose() {
        func outcome(_ input: [UInt8]) -> NBDHandshake.Outcome {
            var dir = FakeDirectory.standard
            return drive(input, directory: &dir).outcome
        }
        var big = NBDByteWriter()
        big.u64(NBDMagic.option)
        big.u32(7)
        big.u32(100 << 20)
        #expect(outcome(clientFlags + big.bytes)
            == .close(reason: "option negotiation failed: len (104857600 ) is larger than max len (33554432)"))
        #expect(outcome(clientFlags + Array(repeating: 0x41, count: 16))
            == .close(reason: "option negotiation failed: Bad magic received"))
        #expect(outcome([0, 0, 0, 7]) == .close(reason: "option negotiation failed: Unknown client flags 0x4 received"))
        #expect(outcome([0, 0, 0, 0] + clientOption(NBDOption.list))
            == .close(reason: "option negotiation failed: Unsupported option 3 (list)"))
        #expect(outcome(clientFlags + clientOption(NBDOption.exportName, Array("nope".utf8)))
            == .close(reason: "option negotiation failed: export not found"))
        #expect(outcome(clientFlags + clientOption(NBDOption.abort, [1, 2])) == .close(reason: nil))
    }

    @Test func malformedOptionsAnswerInvalid() {
        var dir = FakeDirectory.standard
        let input = clientFlags
            + clientOption(NBDOption.list, [1])
            + clientOption(NBDOption.go, goPayload("e1") + [9, 9])
            + clientOption(NBDOption.go, [0, 0, 0, 2] + Array("e\0".utf8) + [0, 0])
            + clientOption(NBDOption.go, [0, 0, 0, 2] + Array("e1".utf8) + [0, 5, 0, 1])
            + clientOption(NBDOption.go, [0, 0, 0x13, 0x88])
            + clientOption(NBDOption.go, goPayload(String(repeating: "x", count: 90)))
            + clientOption(NBDOption.setMetaContext, metaPayload("e1", []))
            + clientOption(NBDOption.startTLS)
            + clientOption(NBDOption.structuredReply) + clientOption(NBDOption.structuredReply)
            + clientOption(NBDOption.info, goPayload("depth"))
        let texts = parseReplies(drive(input, directory: &dir).output).map { String(decoding: $0.payload, as: UTF8.self) }
        #expect(texts.contains("option 'list' has unexpected length"))
        #expect(texts.contains("option 'go' has unexpected length"))
        #expect(texts.contains("Unexpected embedded NUL in option go"))
        #expect(texts.contains("Inconsistent lengths in option go"))
        #expect(texts.contains("Inconsistent lengths in option go"))
        #expect(texts.contains("export '" + String(repeating: "x", count: 80) + "...' not present"))
        #expect(texts.contains("request option 'set meta context' when structured reply is not negotiated"))
        #expect(texts.contains("TLS not configured"))
        #expect(texts.contains("structured reply already negotiated"))
        #expect(texts.last == "request NBD_INFO_BLOCK_SIZE to use this export")
    }

    @Test func trailingMetaBytesAreReadAsNextHeader() {
        // QEMU leaves unread bytes of a meta-context option in the stream.
        var dir = FakeDirectory.standard
        let input = clientFlags + clientOption(NBDOption.structuredReply)
            + clientOption(NBDOption.setMetaContext, metaPayload("e1", []) + [0x7a, 0x7a])
            + clientOption(NBDOption.list)
        let r = drive(input, directory: &dir)
        #expect(parseReplies(r.output).map(\.type) == [1, 1])
        #expect(r.outcome == .close(reason: "option negotiation failed: Bad magic received"))
    }

    @Test func exportNameHonoursNoZeroes() {
        var dir = FakeDirectory.standard
        let plain = drive([0, 0, 0, 1] + clientOption(NBDOption.exportName, Array("ro".utf8)), directory: &dir)
        #expect(plain.output.count == 134)
        #expect(Array(plain.output[8..<10]) == [0x05, 0x0f])
        let noZeroes = drive(clientFlags + clientOption(NBDOption.exportName, Array("ro\0junk".utf8)), directory: &dir)
        #expect(noZeroes.output.count == 10)
    }
}
