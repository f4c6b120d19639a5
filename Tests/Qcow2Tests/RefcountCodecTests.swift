import BlockCore
import Foundation
import Testing
@testable import Qcow2

@Suite("RefcountCodec")
struct RefcountCodecTests {
    static let blockBytes = 512

    @Test("maxValue per order")
    func maxValues() {
        #expect(RefcountCodec.maxValue(order: 0) == 1)
        #expect(RefcountCodec.maxValue(order: 1) == 3)
        #expect(RefcountCodec.maxValue(order: 2) == 15)
        #expect(RefcountCodec.maxValue(order: 3) == 0xFF)
        #expect(RefcountCodec.maxValue(order: 4) == 0xFFFF)
        #expect(RefcountCodec.maxValue(order: 5) == 0xFFFF_FFFF)
        #expect(RefcountCodec.maxValue(order: 6) == UInt64.max)
    }

    @Test("byteRange: the bytes holding an entry", arguments: 0...6)
    func byteRanges(order: Int) {
        let bits = 1 << order
        let entries = Self.blockBytes * 8 / bits
        for i in 0..<entries {
            let r = RefcountCodec.byteRange(i, order: order)
            #expect(r.lowerBound == i * bits / 8)
            #expect(r.count == max(1, bits / 8))
            #expect(r.upperBound <= Self.blockBytes)
        }
    }

    @Test("set/get round trip at every index; neighbours and bytes outside byteRange untouched", arguments: 0...6)
    func roundTrip(order: Int) {
        let n = Self.blockBytes
        let entries = n * 8 >> order
        let maxV = RefcountCodec.maxValue(order: order)
        let buf = AlignedBuffer(count: n)
        let snapshot = AlignedBuffer(count: n)
        var rng: UInt64 = 0x1234_5678_9ABC_DEF1
        func next() -> UInt64 {
            rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17
            return rng
        }
        for i in 0..<entries {
            // Random background so neighbours hold distinct values.
            for j in 0..<n { buf.bytes[j] = UInt8(truncatingIfNeeded: next()) }
            snapshot.bytes.copyMemory(from: UnsafeRawBufferPointer(buf.bytes))
            let values: [UInt64] = [0, 1, maxV, next() & maxV, maxV == 1 ? 0 : maxV - 1]
            for v in values {
                RefcountCodec.set(buf.pointer, i, order: order, v)
                #expect(RefcountCodec.get(buf.pointer, i, order: order) == v, "order \(order) index \(i) value \(v)")
            }
            let r = RefcountCodec.byteRange(i, order: order)
            let outsideSame = withExtendedLifetime((buf, snapshot)) {
                memcmp(buf.pointer, snapshot.pointer, r.lowerBound) == 0
                    && memcmp(buf.pointer + r.upperBound, snapshot.pointer + r.upperBound, n - r.upperBound) == 0
            }
            #expect(outsideSame, "order \(order) index \(i) changed bytes outside \(r)")
            // Entries sharing the byte (orders 0...2) keep their values.
            if order < 3 {
                let perByte = 8 >> order
                let first = i / perByte * perByte
                for j in first..<(first + perByte) where j != i {
                    #expect(RefcountCodec.get(buf.pointer, j, order: order) == RefcountCodec.get(snapshot.pointer, j, order: order))
                }
            }
            if i > 0 {
                #expect(RefcountCodec.get(buf.pointer, i - 1, order: order) == RefcountCodec.get(snapshot.pointer, i - 1, order: order))
            }
            if i + 1 < entries {
                #expect(RefcountCodec.get(buf.pointer, i + 1, order: order) == RefcountCodec.get(snapshot.pointer, i + 1, order: order))
            }
        }
    }

    @Test("values wider than the entry are truncated to the entry width", arguments: 0...5)
    func truncation(order: Int) {
        let buf = AlignedBuffer(count: 64, zeroed: true)
        let maxV = RefcountCodec.maxValue(order: order)
        RefcountCodec.set(buf.pointer, 3, order: order, maxV + 1 + 1)  // wraps to 1
        #expect(RefcountCodec.get(buf.pointer, 3, order: order) == 1)
        #expect(RefcountCodec.get(buf.pointer, 2, order: order) == 0)
        #expect(RefcountCodec.get(buf.pointer, 4, order: order) == 0)
    }

    @Test("on-disk layout: big-endian words, sub-byte entries least significant bits first")
    func layout() {
        let buf = AlignedBuffer(count: 16, zeroed: true)
        RefcountCodec.set(buf.pointer, 0, order: 0, 1)
        RefcountCodec.set(buf.pointer, 7, order: 0, 1)
        #expect(buf.bytes[0] == 0x81)
        buf.zero()
        RefcountCodec.set(buf.pointer, 1, order: 1, 3)
        RefcountCodec.set(buf.pointer, 4, order: 1, 1)
        #expect(buf.bytes[0] == 0x0C && buf.bytes[1] == 0x01)
        buf.zero()
        RefcountCodec.set(buf.pointer, 1, order: 2, 0xA)
        #expect(buf.bytes[0] == 0xA0)
        buf.zero()
        RefcountCodec.set(buf.pointer, 1, order: 4, 0x1234)
        #expect(Array(buf.bytes[0..<4]) == [0, 0, 0x12, 0x34])
        buf.zero()
        RefcountCodec.set(buf.pointer, 1, order: 5, 0x0102_0304)
        #expect(Array(buf.bytes[0..<8]) == [0, 0, 0, 0, 1, 2, 3, 4])
        buf.zero()
        RefcountCodec.set(buf.pointer, 1, order: 6, 0x0102_0304_0506_0708)
        #expect(Array(buf.bytes[8..<16]) == [1, 2, 3, 4, 5, 6, 7, 8])
    }
}
