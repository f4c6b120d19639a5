import BlockCore
import Testing

@Suite("alignment arithmetic, big-endian helpers and zero detection")
struct AlignmentTests {
    // MARK: divRoundUp / alignUp / alignDown

    @Test("divRoundUp on small values")
    func divRoundUpSmall() {
        #expect(divRoundUp(0, 1) == 0)
        #expect(divRoundUp(0, 512) == 0)
        #expect(divRoundUp(1, 512) == 1)
        #expect(divRoundUp(511, 512) == 1)
        #expect(divRoundUp(512, 512) == 1)
        #expect(divRoundUp(513, 512) == 2)
        #expect(divRoundUp(7, 3) == 3)
        #expect(divRoundUp(9, 3) == 3)
        for v in Int64(0)...300 {
            for d in Int64(1)...17 {
                #expect(divRoundUp(v, d) == (v + d - 1) / d)
            }
        }
    }

    @Test("divRoundUp near Int64.max does not overflow")
    func divRoundUpLarge() {
        let m = Int64.max  // 2^63 - 1
        #expect(divRoundUp(m, 1) == m)
        #expect(divRoundUp(m, 2) == 1 << 62)
        #expect(divRoundUp(m, m) == 1)
        #expect(divRoundUp(m - 1, m) == 1)
        #expect(divRoundUp(m, m - 1) == 2)
        #expect(divRoundUp(m, 4096) == 1 << 51)
        #expect(divRoundUp(m, 1 << 62) == 2)
        #expect(divRoundUp(m - 4095, 4096) == (1 << 51) - 1)  // 2^63-4096 = 4096 * (2^51-1)
        #expect(divRoundUp(m - 4096, 4096) == (1 << 51) - 1)
        #expect(divRoundUp(m, 3) == m / 3 + 1)
    }

    @Test("alignUp / alignDown / isAligned")
    func alignUpDown() {
        #expect(alignUp(0, 512) == 0)
        #expect(alignUp(1, 512) == 512)
        #expect(alignUp(512, 512) == 512)
        #expect(alignUp(513, 512) == 1024)
        #expect(alignDown(0, 512) == 0)
        #expect(alignDown(511, 512) == 0)
        #expect(alignDown(512, 512) == 512)
        #expect(alignDown(1023, 512) == 512)
        #expect(alignUp(5, 1) == 5)
        #expect(alignDown(5, 1) == 5)
        // Non-power-of-two alignments work too (modulo based).
        #expect(alignUp(10, 3) == 12)
        #expect(alignDown(10, 3) == 9)
        for v in Int64(0)...2000 {
            for a: Int64 in [1, 2, 3, 8, 512, 4096] {
                let up = alignUp(v, a)
                let down = alignDown(v, a)
                #expect(up >= v && up - v < a && up % a == 0)
                #expect(down <= v && v - down < a && down % a == 0)
                #expect(isAligned(v, a) == (up == v))
                #expect(isAligned(v, a) == (down == v))
            }
        }
    }

    @Test("alignUp / alignDown near Int64.max")
    func alignLarge() {
        let m = Int64.max
        let top = m - 4095  // 2^63 - 4096, the largest multiple of 4096
        #expect(alignDown(m, 4096) == top)
        #expect(alignDown(m, 512) == m - 511)
        #expect(alignUp(top, 4096) == top)
        #expect(alignUp(top - 1, 4096) == top)
        #expect(alignUp(top - 4095, 4096) == top)
        #expect(alignUp(m, 1) == m)
        #expect(isAligned(top, 4096))
        #expect(!isAligned(m, 4096))
        #expect(alignDown(m, m) == m)
        #expect(alignUp(m, m) == m)
    }

    // MARK: big-endian helpers

    @Test("pointer loadBE/storeBE at every unaligned offset")
    func pointerBE() {
        let raw = UnsafeMutableRawPointer.allocate(byteCount: 32, alignment: 16)
        defer { raw.deallocate() }
        for off in 0..<16 {
            raw.initializeMemory(as: UInt8.self, repeating: 0xEE, count: 32)
            raw.storeBE64(0x0102_0304_0506_0708, off)
            let b = UnsafeRawBufferPointer(start: raw, count: 32)
            #expect(Array(b[off..<(off + 8)]) == [1, 2, 3, 4, 5, 6, 7, 8])
            #expect(b[..<off].allSatisfy { $0 == 0xEE })
            #expect(b[(off + 8)...].allSatisfy { $0 == 0xEE })
            #expect(UnsafeRawPointer(raw).loadBE64(off) == 0x0102_0304_0506_0708)
            #expect(UnsafeRawPointer(raw).loadBE32(off) == 0x0102_0304)
            #expect(UnsafeRawPointer(raw).loadBE16(off) == 0x0102)

            raw.storeBE32(0xA1B2_C3D4, off)
            #expect(Array(b[off..<(off + 4)]) == [0xA1, 0xB2, 0xC3, 0xD4])
            #expect(UnsafeRawPointer(raw).loadBE32(off) == 0xA1B2_C3D4)
            #expect(b[off + 4] == 5)  // untouched
            raw.storeBE16(0xFE01, off)
            #expect(Array(b[off..<(off + 2)]) == [0xFE, 0x01])
            #expect(UnsafeRawPointer(raw).loadBE16(off) == 0xFE01)
            #expect(b[off + 2] == 0xC3)
        }
    }

    @Test("array be/putBE/appendBE agree with the pointer helpers")
    func arrayBE() {
        var a = [UInt8](repeating: 0, count: 20)
        a.putBE64(0x8877_6655_4433_2211, 1)
        #expect(Array(a[1..<9]) == [0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11])
        #expect(a[0] == 0 && a[9] == 0)
        #expect(a.be64(1) == 0x8877_6655_4433_2211)
        a.putBE32(0xDEAD_BEEF, 11)
        #expect(a.be32(11) == 0xDEAD_BEEF)
        #expect(Array(a[11..<15]) == [0xDE, 0xAD, 0xBE, 0xEF])
        a.putBE16(0xCAFE, 17)
        #expect(a.be16(17) == 0xCAFE)
        #expect(a[17] == 0xCA && a[18] == 0xFE && a[19] == 0)

        var b: [UInt8] = [9]
        b.appendBE64(UInt64.max - 1)
        b.appendBE32(1)
        b.appendBE16(0x0203)
        #expect(b.count == 1 + 8 + 4 + 2)
        #expect(b.be64(1) == UInt64.max - 1)
        #expect(b.be32(9) == 1)
        #expect(b.be16(13) == 0x0203)
        b.withUnsafeBytes { p in
            #expect(p.baseAddress!.loadBE64(1) == UInt64.max - 1)
            #expect(p.baseAddress!.loadBE32(9) == 1)
            #expect(p.baseAddress!.loadBE16(13) == 0x0203)
        }
        // Extremes.
        var c = [UInt8](repeating: 0xFF, count: 8)
        c.putBE64(0, 0)
        #expect(c == [UInt8](repeating: 0, count: 8))
        c.putBE64(UInt64.max, 0)
        #expect(c.be64(0) == UInt64.max)
    }

    // MARK: zero detection

    @Test("isZeroMemory: every start alignment and length, with non-zero guard bytes around")
    func zeroAllAlignments() {
        let cap = 16 + 200 + 16
        let raw = UnsafeMutableRawPointer.allocate(byteCount: cap, alignment: 64)
        defer { raw.deallocate() }
        for start in 0..<9 {
            for len in 0...200 {
                // Guards are non-zero: reading outside the range would be noticed.
                raw.initializeMemory(as: UInt8.self, repeating: 0xFF, count: cap)
                let base = raw + 8 + start
                base.initializeMemory(as: UInt8.self, repeating: 0, count: len)
                #expect(isZeroMemory(base, len), "start \(start) len \(len)")
            }
        }
    }

    @Test("isZeroMemory: a single non-zero byte at each position is found")
    func zeroSingleByte() {
        let cap = 16 + 160 + 16
        let raw = UnsafeMutableRawPointer.allocate(byteCount: cap, alignment: 64)
        defer { raw.deallocate() }
        raw.initializeMemory(as: UInt8.self, repeating: 0, count: cap)
        for start in 0..<9 {
            for len in [1, 7, 8, 9, 63, 64, 65, 71, 72, 127, 128, 129, 150] {
                let base = raw + 8 + start
                for pos in 0..<len {
                    for v: UInt8 in [1, 0x80] {
                        base.storeBytes(of: v, toByteOffset: pos, as: UInt8.self)
                        #expect(!isZeroMemory(base, len), "start \(start) len \(len) pos \(pos)")
                        base.storeBytes(of: 0, toByteOffset: pos, as: UInt8.self)
                    }
                }
                #expect(isZeroMemory(base, len))
            }
        }
    }

    @Test("isZeroMemory on a large buffer; isAllZero on buffers, including empty ones")
    func zeroLarge() {
        let buf = AlignedBuffer(count: 1 << 20, zeroed: true)
        #expect(isZeroMemory(buf.pointer, buf.count))
        #expect(buf.bytes.isAllZero)
        #expect(UnsafeRawBufferPointer(buf.bytes).isAllZero)
        for pos in [0, 1, 4095, 4096, 65_535, (1 << 20) - 64, (1 << 20) - 1] {
            buf.bytes[pos] = 0x10
            #expect(!buf.bytes.isAllZero, "pos \(pos)")
            buf.bytes[pos] = 0
        }
        #expect(UnsafeRawBufferPointer(start: nil, count: 0).isAllZero)
        #expect(buf.slice(100, 0).isAllZero)
        buf.bytes[5] = 1
        #expect(buf.slice(6, 1000).isAllZero)
        #expect(!buf.slice(5, 1).isAllZero)
        buf.bytes.zeroFill()
        #expect(buf.bytes.isAllZero)
    }

    @Test("AlignedBuffer honours its alignment and zeroes on request")
    func alignedBuffer() {
        for a in [8, 512, 4096, 65_536] {
            let b = AlignedBuffer(count: 1000, alignment: a, zeroed: true)
            #expect(Int(bitPattern: b.pointer) % a == 0)
            #expect(b.bytes.isAllZero)
            #expect(b.count == 1000)
        }
        let e = AlignedBuffer(count: 0)
        #expect(e.count == 0 && e.bytes.isEmpty)
    }
}
