import BlockCore
import BlockGraph
import Foundation
import Synchronization
import Testing

@testable import BlkdebugDriver

/// An image that records requests (offset, length) by kind.
final class RecordingDriver: BlockDriver, Sendable {
    let formatName = "rec"
    let children: [BlockChild] = []
    let length: Int64
    let log = Mutex<[String]>([])
    init(size: Int64 = 1 << 20) { length = size }

    private func note(_ s: String) { log.withLock { $0.append(s) } }
    func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws(BlockError) {
        note("read \(offset)+\(buffer.count)")
        buffer.initializeMemory(as: UInt8.self, repeating: 0xab)
    }
    func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws(BlockError) {
        note("write \(offset)+\(buffer.count)\(flags.contains(.fua) ? " fua" : "")")
    }
    func writeZeroes(at offset: Int64, length: Int64, flags: WriteFlags) async throws(BlockError) {
        note("zero \(offset)+\(length)")
    }
    func discard(at offset: Int64, length: Int64) async throws(BlockError) { note("discard \(offset)+\(length)") }
    func flush() async throws(BlockError) { note("flush") }
    func blockStatus(at offset: Int64, length: Int64) async throws(BlockError) -> BlockStatus {
        BlockStatus(flags: [.data, .offsetValid], length: length, hostOffset: offset)
    }
    func close() async throws(BlockError) {}
}

/// A blkdebug node over a recording image.
func blkdebugNode(_ o: BlkdebugOptions) throws -> (BlockNode, RecordingDriver) {
    let rec = RecordingDriver()
    let image = BlockNode(driver: rec, filename: "img", readOnly: false)
    let d = try BlkdebugDriver(image: image, setup: try BlkdebugSetup(o))
    return (BlockNode(driver: d, filename: "img", readOnly: false), rec)
}

@Suite("blkdebug rule state machine")
struct BlkdebugRuleTests {
    func rules(_ inject: [BlkdebugInjectError], _ set: [BlkdebugSetState] = []) -> BlkdebugRules {
        let r = BlkdebugRules(injectErrors: inject, setStates: set)
        r.event(.none)
        return r
    }

    @Test func activatedByItsEventOnly() {
        let r = rules([BlkdebugInjectError(event: .readAio)])
        #expect(r.check(offset: 0, bytes: 512, .read) == nil)
        r.event(.writeAio)
        #expect(r.check(offset: 0, bytes: 512, .read) == nil)
        r.event(.readAio)
        #expect(r.check(offset: 0, bytes: 512, .read)?.errno == EIO)
        // Still active: no other event with inject-error rules ran.
        r.event(.l2Load)
        #expect(r.check(offset: 0, bytes: 512, .write)?.errno == EIO)
    }

    @Test func anotherInjectingEventReplacesTheActiveList() {
        let r = rules([BlkdebugInjectError(event: .readAio, errno: 5), BlkdebugInjectError(event: .writeAio, errno: 28,
                                                                                          sector: 100)])
        r.event(.readAio)
        #expect(r.check(offset: 0, bytes: 512, .read)?.errno == 5)
        r.event(.writeAio)
        // The read_aio rule is no longer active; the write_aio one only covers sector 100.
        #expect(r.check(offset: 0, bytes: 512, .read) == nil)
        #expect(r.check(offset: 51200, bytes: 512, .read)?.errno == 28)
        #expect(r.check(offset: 51200 - 512, bytes: 512, .read) == nil)
        #expect(r.check(offset: 0, bytes: 0, .flush) == nil)
    }

    @Test func newestActingRuleDecidesAndZeroErrnoShadows() {
        // Processing runs newest rule first and puts each at the head: the
        // first rule given ends up first in the active list.
        let r = rules([BlkdebugInjectError(event: .readAio, errno: 0), BlkdebugInjectError(event: .readAio, errno: 5)])
        r.event(.readAio)
        #expect(r.check(offset: 0, bytes: 512, .read) == nil)
        let r2 = rules([BlkdebugInjectError(event: .readAio, errno: 12), BlkdebugInjectError(event: .readAio, errno: 5)])
        r2.event(.readAio)
        #expect(r2.check(offset: 0, bytes: 512, .read)?.errno == 12)
    }

    @Test func onceRemovesTheRuleForGood() {
        let r = rules([BlkdebugInjectError(event: .readAio, errno: 5, once: true)])
        r.event(.readAio)
        #expect(r.check(offset: 0, bytes: 512, .read)?.errno == 5)
        #expect(r.check(offset: 0, bytes: 512, .read) == nil)
        r.event(.readAio)
        #expect(r.check(offset: 0, bytes: 512, .read) == nil)
    }

    @Test func iotypes() {
        let r = rules([BlkdebugInjectError(event: .none)])
        for t in [BlkdebugIOType.read, .write, .writeZeroes, .discard, .flush] {
            #expect(r.check(offset: 0, bytes: 512, t)?.errno == EIO)
        }
        #expect(r.check(offset: 0, bytes: 512, .blockStatus) == nil)
        let s = rules([BlkdebugInjectError(event: .none, iotype: .blockStatus, errno: 95, immediately: true)])
        #expect(s.check(offset: 0, bytes: 512, .read) == nil)
        #expect(s.check(offset: 0, bytes: 512, .blockStatus)?.immediately == true)
    }

    @Test func statesGateRulesAndChangeAfterTheEvent() {
        let r = rules([BlkdebugInjectError(event: .readAio, state: 2)],
                      [BlkdebugSetState(event: .readAio, state: 1, newState: 2),
                       BlkdebugSetState(event: .readAio, state: 2, newState: 1)])
        #expect(r.currentState == 1)
        r.event(.readAio)  // state 1: only the first set-state acts
        #expect(r.currentState == 2)
        #expect(r.check(offset: 0, bytes: 1, .read) == nil)
        r.event(.readAio)  // state 2: the inject rule and the second set-state act
        #expect(r.currentState == 1)
        #expect(r.check(offset: 0, bytes: 1, .read)?.errno == EIO)
    }

    @Test func firstGivenSetStateWinsOnTheSameEvent() {
        let r = rules([], [BlkdebugSetState(event: .writeAio, newState: 7), BlkdebugSetState(event: .writeAio, newState: 9)])
        r.event(.writeAio)
        #expect(r.currentState == 7)
    }

    @Test func cIntConversions() {
        // QEMU keeps state and errno in a C int.
        let r = rules([BlkdebugInjectError(event: .none, state: 4_294_967_297, errno: 4_294_967_301)])
        #expect(r.check(offset: 0, bytes: 1, .read)?.errno == 5)
    }
}

@Suite("blkdebug node")
struct BlkdebugNodeTests {
    @Test func injectedErrorsCarryTheErrno() async throws {
        var o = BlkdebugOptions()
        o.injectErrors = [BlkdebugInjectError(event: .readAio, errno: 28, once: true)]
        let (node, rec) = try blkdebugNode(o)
        let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { buf.deallocate() }
        try await node.read(at: 0, into: buf)
        node.debugEvent(.readAio)
        await #expect(throws: BlockError.posix(28)) { try await node.read(at: 0, into: buf) }
        try await node.read(at: 0, into: buf)
        #expect(rec.log.withLock { $0 } == ["read 0+4096", "read 0+4096"])
    }

    @Test func negativeErrnoSkipsTheRequestWithoutError() async throws {
        var o = BlkdebugOptions()
        o.injectErrors = [BlkdebugInjectError(event: .none, errno: -1, immediately: true)]
        let (node, rec) = try blkdebugNode(o)
        let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: 512, alignment: 512)
        defer { buf.deallocate() }
        buf.initializeMemory(as: UInt8.self, repeating: 1)
        try await node.read(at: 0, into: buf)
        #expect(buf.allSatisfy { $0 == 0 })
        #expect(rec.log.withLock { $0 }.isEmpty)
    }

    @Test func flushRulesApplyOnlyAfterWrites() async throws {
        var o = BlkdebugOptions()
        o.injectErrors = [BlkdebugInjectError(event: .none, iotype: .flush, errno: 5)]
        let (node, _) = try blkdebugNode(o)
        try await node.flush()
        let b = UnsafeMutableRawBufferPointer.allocate(byteCount: 512, alignment: 512)
        defer { b.deallocate() }
        b.initializeMemory(as: UInt8.self, repeating: 3)
        // A FUA write flushes before it counts as written: no error yet.
        try await node.write(at: 0, from: UnsafeRawBufferPointer(b), flags: [.fua])
        await #expect(throws: BlockError.posix(5)) { try await node.flush() }
        await #expect(throws: BlockError.posix(5)) { try await node.flush() }
    }

    @Test func writeZeroesSplitByOptimalAlignment() async throws {
        var o = BlkdebugOptions()
        o.optWriteZero = 4096
        o.maxWriteZero = 8192
        let (node, rec) = try blkdebugNode(o)
        try await node.writeZeroes(at: 1000, length: 20000)
        #expect(rec.log.withLock { $0 } == ["write 1000+3096", "zero 4096+8192", "zero 12288+8192", "write 20480+520"])
    }

    @Test func discardDropsPiecesBelowTheAlignment() async throws {
        var o = BlkdebugOptions()
        o.align = 512
        o.optDiscard = 4096
        let (node, rec) = try blkdebugNode(o)
        try await node.discard(at: 512, length: 9000)
        #expect(rec.log.withLock { $0 } == ["discard 512+3584", "discard 4096+4096", "discard 8192+1024"])
    }

    @Test func limitsAndAlignment() async throws {
        var o = BlkdebugOptions()
        o.align = 4096
        o.maxTransfer = 8192
        let (node, rec) = try blkdebugNode(o)
        #expect(node.limits.maxTransfer == 8192)
        #expect(node.driver.requestAlignment == 4096)
        let b = UnsafeMutableRawBufferPointer.allocate(byteCount: 10000, alignment: 4096)
        defer { b.deallocate() }
        b.initializeMemory(as: UInt8.self, repeating: 7)
        try await node.write(at: 100, from: UnsafeRawBufferPointer(b))
        // Padded to 4 KiB, split at 8 KiB boundaries, never above max-transfer.
        #expect(rec.log.withLock { $0 } == ["read 0+8192", "write 0+8192", "read 8192+4096", "write 8192+4096"])
    }

    @Test func constraintMessages() throws {
        func message(_ o: BlkdebugOptions) -> String? {
            do {
                _ = try blkdebugNode(o)
                return nil
            } catch let e as BlockError {
                return e.message
            } catch {
                return "\(error)"
            }
        }
        var o = BlkdebugOptions()
        o.align = 3
        #expect(message(o) == "Cannot meet constraints with align 3")
        o = BlkdebugOptions()
        o.align = 4096
        o.maxTransfer = 1000
        #expect(message(o) == "Cannot meet constraints with max-transfer 1000")
        o = BlkdebugOptions()
        o.optDiscard = 64
        o.maxDiscard = 100
        #expect(message(o) == "Cannot meet constraints with max-discard 100")
        o = BlkdebugOptions()
        o.maxTransfer = -1
        #expect(message(o)?.hasPrefix("Parameter 'max-transfer' expects a non-negative number below 2^64\n") == true)
    }

    @Test func childPermissions() throws {
        var o = BlkdebugOptions()
        o.takeChildPerms = [.resize]
        o.unshareChildPerms = [.write]
        let (node, _) = try blkdebugNode(o)
        let c = try #require(node.children.first)
        let (p, s) = node.driver.childPermissions(for: c, node: node, perm: [.consistentRead], shared: .all)
        #expect(p == [.consistentRead, .resize])
        #expect(s == [.consistentRead, .writeUnchanged, .resize])
    }
}

@Suite("blkdebug config files")
struct BlkdebugConfigTests {
    func parse(_ text: String) -> Result<[ConfigSection], BlockError> {
        do throws(BlockError) {
            return .success(try ConfigSection.parse(Array(text.utf8)))
        } catch {
            return .failure(error)
        }
    }

    func error(_ text: String) -> String? {
        if case .failure(let e) = parse(text) { return e.message }
        return nil
    }

    @Test func sectionsAndValues() throws {
        guard case .success(let s) = parse("# rules\n[inject-error]\n  event = \"read_aio\"\nerrno = \"0x1c\"\n\n"
                                           + "[set-state \"s1\"]\nevent = \"write_aio\"\nnew_state = \"2\"\n") else {
            Issue.record("did not parse")
            return
        }
        #expect(s.count == 2)
        let inject = try s[0].injectError()
        #expect(inject.event == .readAio && inject.errno == 28)
        let set = try s[1].setState()
        #expect(s[1].id == "s1" && set.newState == 2 && set.event == .writeAio)
    }

    @Test func qemuMessages() {
        #expect(error("event = \"read_aio\"\n") == "no group defined")
        #expect(error("[inject-error]\n   \n") == "parse error")
        #expect(error("[bogus]\nx = \"1\"\n") == "There is no option group 'bogus'")
        #expect(error("[inject-error]\nbogus = \"1\"\n") == "Invalid parameter 'bogus'")
        // An unquoted value reads as empty, as QEMU's sscanf pattern does.
        #expect(error("[inject-error]\nerrno = 5\n") == "Parameter 'errno' expects a number")
        #expect(error("[inject-error]\nerrno = \"99999999999999999999\"\n")
                == "Value '99999999999999999999' is too large for parameter 'errno'")
        #expect(error("[inject-error]\nonce = \"maybe\"\n") == "Parameter 'once' expects 'on' or 'off'")
        #expect(error("[inject-error \"a\"]\n[inject-error \"a\"]\n") == "Duplicate ID 'a' for inject-error")
        #expect(error("[inject-error \"1a\"]\n")?.hasPrefix("Parameter 'id' expects an identifier\n") == true)
    }

    @Test func ruleErrors() throws {
        guard case .success(let s) = parse("[inject-error]\nerrno = \"5\"\n[inject-error]\nevent = \"x\"\n") else {
            Issue.record("did not parse")
            return
        }
        #expect(throws: BlockError.invalid("Missing event name for rule")) { try s[0].injectError() }
        #expect(throws: BlockError.invalid("invalid parameter value: x")) { try s[1].injectError() }
    }
}
