#if canImport(Glibc)
import Glibc
#endif

/// A heap buffer whose address is aligned for O_DIRECT (4 KiB by default).
///
/// Ownership: one request owns a buffer at a time; the block layer never
/// keeps a reference after the call that was given it returns. The class is
/// `@unchecked Sendable` because ownership is handed over, never shared.
public final class AlignedBuffer: @unchecked Sendable {
    public let pointer: UnsafeMutableRawPointer
    public let count: Int

    public static let defaultAlignment = 4096

    public init(count: Int, alignment: Int = AlignedBuffer.defaultAlignment, zeroed: Bool = false) {
        precondition(count >= 0)
        var raw: UnsafeMutableRawPointer?
        let size = max(count, 1)
        let rc = posix_memalign(&raw, alignment, size)
        precondition(rc == 0 && raw != nil, "out of memory allocating \(count) bytes")
        pointer = raw!
        self.count = count
        if zeroed { memset(pointer, 0, size) }
    }

    deinit { free(pointer) }

    public var bytes: UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(start: pointer, count: count)
    }

    public func slice(_ offset: Int, _ length: Int) -> UnsafeMutableRawBufferPointer {
        precondition(offset >= 0 && length >= 0 && offset + length <= count)
        return UnsafeMutableRawBufferPointer(start: pointer + offset, count: length)
    }

    public func zero() { memset(pointer, 0, count) }
}

public extension UnsafeRawBufferPointer {
    /// True if every byte is zero. Word-at-a-time; used by zero detection.
    var isAllZero: Bool {
        guard let base = baseAddress else { return true }
        return isZeroMemory(base, count)
    }
}

public extension UnsafeMutableRawBufferPointer {
    var isAllZero: Bool { UnsafeRawBufferPointer(self).isAllZero }
    func zeroFill() { if let b = baseAddress { memset(b, 0, count) } }
}

/// Word-wise zero check over raw memory.
public func isZeroMemory(_ base: UnsafeRawPointer, _ count: Int) -> Bool {
    var i = 0
    let addr = Int(bitPattern: base)
    // Head until 8-byte aligned.
    while i < count && (addr + i) & 7 != 0 {
        if base.load(fromByteOffset: i, as: UInt8.self) != 0 { return false }
        i += 1
    }
    // 64 bytes at a time.
    while i + 64 <= count {
        let p = (base + i).assumingMemoryBound(to: UInt64.self)
        if (p[0] | p[1] | p[2] | p[3] | p[4] | p[5] | p[6] | p[7]) != 0 { return false }
        i += 64
    }
    while i + 8 <= count {
        if (base + i).load(as: UInt64.self) != 0 { return false }
        i += 8
    }
    while i < count {
        if base.load(fromByteOffset: i, as: UInt8.self) != 0 { return false }
        i += 1
    }
    return true
}
