/// Big-endian loads and stores on raw memory, and a growable byte writer,
/// used by every codec in this module. No Foundation, no allocation beyond
/// the writer's array.
@inline(__always)
public func nbdLoad16(_ p: UnsafeRawBufferPointer, _ offset: Int) -> UInt16 {
    UInt16(bigEndian: p.loadUnaligned(fromByteOffset: offset, as: UInt16.self))
}

@inline(__always)
public func nbdLoad32(_ p: UnsafeRawBufferPointer, _ offset: Int) -> UInt32 {
    UInt32(bigEndian: p.loadUnaligned(fromByteOffset: offset, as: UInt32.self))
}

@inline(__always)
public func nbdLoad64(_ p: UnsafeRawBufferPointer, _ offset: Int) -> UInt64 {
    UInt64(bigEndian: p.loadUnaligned(fromByteOffset: offset, as: UInt64.self))
}

@inline(__always)
public func nbdStore16(_ p: UnsafeMutableRawBufferPointer, _ offset: Int, _ v: UInt16) {
    p.storeBytes(of: v.bigEndian, toByteOffset: offset, as: UInt16.self)
}

@inline(__always)
public func nbdStore32(_ p: UnsafeMutableRawBufferPointer, _ offset: Int, _ v: UInt32) {
    p.storeBytes(of: v.bigEndian, toByteOffset: offset, as: UInt32.self)
}

@inline(__always)
public func nbdStore64(_ p: UnsafeMutableRawBufferPointer, _ offset: Int, _ v: UInt64) {
    p.storeBytes(of: v.bigEndian, toByteOffset: offset, as: UInt64.self)
}

/// Appends big-endian fields to a byte array (handshake replies: not the
/// hot path).
public struct NBDByteWriter: Sendable {
    public private(set) var bytes: [UInt8] = []

    public init() {}

    public mutating func u16(_ v: UInt16) {
        bytes.append(UInt8(v >> 8))
        bytes.append(UInt8(truncatingIfNeeded: v))
    }

    public mutating func u32(_ v: UInt32) {
        for shift in stride(from: 24, through: 0, by: -8) { bytes.append(UInt8(truncatingIfNeeded: v >> UInt32(shift))) }
    }

    public mutating func u64(_ v: UInt64) {
        for shift in stride(from: 56, through: 0, by: -8) { bytes.append(UInt8(truncatingIfNeeded: v >> UInt64(shift))) }
    }

    public mutating func append<S: Sequence>(_ s: S) where S.Element == UInt8 { bytes.append(contentsOf: s) }

    public mutating func zeroes(_ count: Int) { bytes.append(contentsOf: repeatElement(0, count: count)) }

    /// One option reply: magic, option, type, length, payload.
    public mutating func optionReply(option: UInt32, type: UInt32, payload: [UInt8] = []) {
        u64(NBDMagic.optionReply)
        u32(option)
        u32(type)
        u32(UInt32(payload.count))
        append(payload)
    }
}
