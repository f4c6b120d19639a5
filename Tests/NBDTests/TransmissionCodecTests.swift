import NBDProtocol
import TestSupport
import Testing

@Suite struct TransmissionCodecTests {
    let writable = NBDSession(export: NBDExportInfo(id: 1, name: "e", description: nil, size: 1 << 20,
                                                    flags: .qemu(writable: true, multiConn: true)),
                              mode: .structured, meta: NBDMetaSelection())
    let readOnly = NBDSession(export: NBDExportInfo(id: 2, name: "r", description: nil, size: 1 << 20,
                                                    flags: .qemu(writable: false, multiConn: true)),
                              mode: .simple, meta: NBDMetaSelection())

    @Test func headerRoundTrip() {
        let r = NBDRequest(flags: 5, type: 1, cookie: 0x1122_3344_5566_7788, offset: 4096, length: 512)
        let bytes = r.bytes
        #expect(bytes.count == 28 && Array(bytes.prefix(4)) == [0x25, 0x60, 0x95, 0x13])
        #expect(bytes.withUnsafeBytes { NBDRequest(decoding: $0) } == r)
    }

    @Test func admissionFollowsQemu72() {
        func admit(_ s: NBDSession, _ type: UInt16, flags: UInt16 = 0, offset: UInt64 = 0, length: UInt32 = 0) -> NBDAdmission {
            s.admit(NBDRequest(flags: flags, type: type, cookie: 1, offset: offset, length: length))
        }
        #expect(admit(writable, NBDCommand.write, length: 4096) == .serve(payload: 4096))
        #expect(admit(writable, NBDCommand.disconnect, flags: 0xffff, offset: 1 << 60) == .disconnect)
        #expect(admit(writable, NBDCommand.write, length: 40 << 20)
            == .reject(error: .einval, message: "len (41943040 ) is larger than max len (33554432)", payload: 0, thenClose: true))
        #expect(admit(writable, NBDCommand.read, length: 40 << 20)
            == .reject(error: .einval, message: "len (41943040 ) is larger than max len (33554432)", payload: 0, thenClose: false))
        #expect(admit(writable, NBDCommand.write, offset: (1 << 20) - 512, length: 1024)
            == .reject(error: .einval, message: "operation past EOF; From: 1048064, Len: 1024, Size: 1048576",
                       payload: 1024, thenClose: false))
        // EPERM where QEMU 7.2 says EINVAL (docs/notes/deviations.md).
        #expect(admit(readOnly, NBDCommand.write, length: 512)
            == .reject(error: .eperm, message: "Export is read-only", payload: 512, thenClose: false))
        #expect(admit(readOnly, NBDCommand.trim, length: 512)
            == .reject(error: .eperm, message: "Export is read-only", payload: 0, thenClose: false))
        #expect(admit(readOnly, NBDCommand.read, flags: NBDCommandFlags.dontFragment, length: 512)
            == .reject(error: .einval, message: "unsupported flags for command read (got 0x4)", payload: 0, thenClose: false))
        #expect(admit(writable, NBDCommand.read, flags: NBDCommandFlags.dontFragment, length: 512) == .serve(payload: 0))
        #expect(admit(writable, NBDCommand.trim, length: 512 << 10) == .serve(payload: 0))
        #expect(admit(writable, NBDCommand.blockStatus, length: 0)
            == .reject(error: .einval, message: "need non-zero length", payload: 0, thenClose: false))
        #expect(admit(writable, NBDCommand.blockStatus, length: 10)
            == .reject(error: .einval, message: "CMD_BLOCK_STATUS not negotiated", payload: 0, thenClose: false))
        #expect(admit(writable, 42)
            == .reject(error: .einval, message: "invalid request type (42) received", payload: 0, thenClose: false))
        var bad = NBDRequest(type: 0, cookie: 7, offset: 0, length: 0)
        bad.magic = 0x1234_5678
        #expect(writable.admit(bad)
            == .reject(error: .einval, message: "invalid magic (got 0x12345678)", payload: 0, thenClose: true))
    }

    @Test func errnoTable() {
        #expect(NBDError(errno: 1) == .eperm)
        #expect(NBDError(errno: 30) == .eperm)  // EROFS
        #expect(NBDError(errno: 5) == .eio)
        #expect(NBDError(errno: 122) == .enospc)  // EDQUOT
        #expect(NBDError(errno: 27) == .enospc)  // EFBIG
        #expect(NBDError(errno: 95) == .enotsup)
        #expect(NBDError(errno: 108) == .eshutdown)
        #expect(NBDError(errno: 2) == .einval)  // anything else
    }

    @Test func extentCollectorMergesAndCaps() {
        var c = NBDExtentCollector(capacity: 2)
        let added = [c.add(length: 10, flags: 0), c.add(length: 5, flags: 0), c.add(length: 7, flags: 3),
                     c.add(length: 1, flags: 3), c.add(length: 1, flags: 0)]
        #expect(added == [true, true, true, true, false])
        #expect(c.lengths == [15, 8] && c.flags == [0, 3] && c.isFull)
        var one = NBDExtentCollector(capacity: 1)
        one.add(length: UInt32.max, flags: 0)
        let overflowed = one.add(length: 1, flags: 0)
        #expect(!overflowed)  // the sum would overflow 32 bits
    }

    @Test func replyEncoders() {
        var b = [UInt8](repeating: 0, count: 40)
        b.withUnsafeMutableBytes { NBDReplyCodec.holeChunk(into: $0, done: true, cookie: 9, offset: 4096, length: 512) }
        #expect(Array(b.prefix(32)) == [0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 12,
                                       0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 2, 0])
        b.withUnsafeMutableBytes { NBDReplyCodec.errorChunk(into: $0, cookie: 1, error: .eio, message: Array("xy".utf8)) }
        #expect(Array(b.prefix(28)) == [0x66, 0x8e, 0x33, 0xef, 0, 1, 0x80, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 8,
                                       0, 0, 0, 5, 0, 2, 0x78, 0x79])
    }
}
