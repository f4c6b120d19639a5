@inlinable public func alignDown(_ value: Int64, _ alignment: Int64) -> Int64 {
    value - (value % alignment)
}

@inlinable public func alignUp(_ value: Int64, _ alignment: Int64) -> Int64 {
    let r = value % alignment
    return r == 0 ? value : value + (alignment - r)
}

/// Overflow-safe ceiling division for non-negative values.
@inlinable public func divRoundUp(_ value: Int64, _ divisor: Int64) -> Int64 {
    value / divisor + (value % divisor != 0 ? 1 : 0)
}

@inlinable public func isAligned(_ value: Int64, _ alignment: Int64) -> Bool {
    value % alignment == 0
}

/// Big-endian load/store helpers on raw memory (qcow2 and NBD are big-endian).
public extension UnsafeRawPointer {
    @inlinable func loadBE64(_ offset: Int) -> UInt64 {
        UInt64(bigEndian: loadUnaligned(fromByteOffset: offset, as: UInt64.self))
    }
    @inlinable func loadBE32(_ offset: Int) -> UInt32 {
        UInt32(bigEndian: loadUnaligned(fromByteOffset: offset, as: UInt32.self))
    }
    @inlinable func loadBE16(_ offset: Int) -> UInt16 {
        UInt16(bigEndian: loadUnaligned(fromByteOffset: offset, as: UInt16.self))
    }
}

public extension UnsafeMutableRawPointer {
    @inlinable func storeBE64(_ value: UInt64, _ offset: Int) {
        storeBytes(of: value.bigEndian, toByteOffset: offset, as: UInt64.self)
    }
    @inlinable func storeBE32(_ value: UInt32, _ offset: Int) {
        storeBytes(of: value.bigEndian, toByteOffset: offset, as: UInt32.self)
    }
    @inlinable func storeBE16(_ value: UInt16, _ offset: Int) {
        storeBytes(of: value.bigEndian, toByteOffset: offset, as: UInt16.self)
    }
}

/// Big-endian reading/writing on byte arrays (headers, extensions).
public extension Array where Element == UInt8 {
    func be64(_ o: Int) -> UInt64 {
        var v: UInt64 = 0
        for i in 0..<8 { v = v << 8 | UInt64(self[o + i]) }
        return v
    }
    func be32(_ o: Int) -> UInt32 {
        var v: UInt32 = 0
        for i in 0..<4 { v = v << 8 | UInt32(self[o + i]) }
        return v
    }
    func be16(_ o: Int) -> UInt16 {
        UInt16(self[o]) << 8 | UInt16(self[o + 1])
    }
    mutating func putBE64(_ v: UInt64, _ o: Int) {
        for i in 0..<8 { self[o + i] = UInt8(truncatingIfNeeded: v >> (56 - 8 * UInt64(i))) }
    }
    mutating func putBE32(_ v: UInt32, _ o: Int) {
        for i in 0..<4 { self[o + i] = UInt8(truncatingIfNeeded: v >> (24 - 8 * UInt32(i))) }
    }
    mutating func putBE16(_ v: UInt16, _ o: Int) {
        self[o] = UInt8(v >> 8)
        self[o + 1] = UInt8(truncatingIfNeeded: v)
    }
    mutating func appendBE64(_ v: UInt64) { append(contentsOf: [UInt8](repeating: 0, count: 8)); putBE64(v, count - 8) }
    mutating func appendBE32(_ v: UInt32) { append(contentsOf: [UInt8](repeating: 0, count: 4)); putBE32(v, count - 4) }
    mutating func appendBE16(_ v: UInt16) { append(UInt8(v >> 8)); append(UInt8(truncatingIfNeeded: v)) }
}
