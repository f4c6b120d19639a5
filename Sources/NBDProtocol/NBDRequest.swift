/// Transmission-phase requests: the 28-byte header codec and QEMU 7.2's
/// admission rules (`nbd_co_receive_request`), kept apart from I/O.

/// A decoded request header. `magicValid` is false for a header whose magic
/// is wrong (QEMU still answers it, with the cookie it carried).
public struct NBDRequest: Sendable, Equatable {
    public static let size = 28

    public var magic: UInt32
    public var flags: UInt16
    public var type: UInt16
    public var cookie: UInt64
    public var offset: UInt64
    public var length: UInt32

    public init(flags: UInt16 = 0, type: UInt16, cookie: UInt64, offset: UInt64, length: UInt32) {
        self.magic = NBDMagic.request
        self.flags = flags
        self.type = type
        self.cookie = cookie
        self.offset = offset
        self.length = length
    }

    /// Decodes the first 28 bytes. Precondition: `bytes.count >= 28`.
    @inline(__always)
    public init(decoding bytes: UnsafeRawBufferPointer) {
        precondition(bytes.count >= Self.size)
        magic = nbdLoad32(bytes, 0)
        flags = nbdLoad16(bytes, 4)
        type = nbdLoad16(bytes, 6)
        cookie = nbdLoad64(bytes, 8)
        offset = nbdLoad64(bytes, 16)
        length = nbdLoad32(bytes, 24)
    }

    /// Encodes into the first 28 bytes (client side; tests).
    public func encode(into p: UnsafeMutableRawBufferPointer) {
        nbdStore32(p, 0, magic)
        nbdStore16(p, 4, flags)
        nbdStore16(p, 6, type)
        nbdStore64(p, 8, cookie)
        nbdStore64(p, 16, offset)
        nbdStore32(p, 24, length)
    }

    public var bytes: [UInt8] {
        var b = [UInt8](repeating: 0, count: Self.size)
        b.withUnsafeMutableBytes { encode(into: $0) }
        return b
    }

    public var magicValid: Bool { magic == NBDMagic.request }
    public func has(_ flag: UInt16) -> Bool { flags & flag != 0 }
}

/// What to do with a request header (QEMU 7.2 `nbd_co_receive_request`
/// plus the early checks of `nbd_handle_request`).
public enum NBDAdmission: Sendable, Equatable {
    /// NBD_CMD_DISC: no reply; finish what is in flight, then close.
    case disconnect
    /// Serve it. For WRITE, `payload` bytes follow the header.
    case serve(payload: UInt32)
    /// Answer with `error` and `message` (a structured error chunk when
    /// structured replies are on, else a simple reply). `payload` bytes
    /// follow the header and must be read and discarded first. When
    /// `thenClose`, the connection ends after the reply (QEMU: "Request
    /// handling failed in intermediate state").
    case reject(error: NBDError, message: String, payload: UInt32, thenClose: Bool)
}

extension NBDSession {
    /// Applies QEMU 7.2's checks, in its order. Every receive-time error is
    /// sent as EINVAL (QEMU 7.2's `nbd_trip` replaces the errno, e.g. the
    /// EROFS of a write to a read-only export and the ENOSPC of a write
    /// past the end).
    public func admit(_ r: NBDRequest) -> NBDAdmission {
        if !r.magicValid {
            return .reject(error: .einval, message: "invalid magic (got 0x\(String(r.magic, radix: 16)))",
                           payload: 0, thenClose: true)
        }
        let type = r.type
        if type == NBDCommand.disconnect { return .disconnect }
        var payload: UInt32 = 0
        if type == NBDCommand.read || type == NBDCommand.write || type == NBDCommand.cache {
            if r.length > NBDLimits.maxBuffer {
                // An oversized WRITE's payload is never read: the stream is lost.
                return .reject(error: .einval,
                               message: "len (\(r.length) ) is larger than max len (\(NBDLimits.maxBuffer))",
                               payload: 0, thenClose: type == NBDCommand.write)
            }
            if type == NBDCommand.write { payload = r.length }
        }
        if export.flags.contains(.readOnly)
            && (type == NBDCommand.write || type == NBDCommand.writeZeroes || type == NBDCommand.trim) {
            // EPERM, as the NBD specification asks for writes to a read-only
            // export (QEMU 7.2 sends EINVAL here; docs/notes/deviations.md).
            return .reject(error: .eperm, message: "Export is read-only", payload: payload, thenClose: false)
        }
        let size = export.size
        if r.offset > size || UInt64(r.length) > size - r.offset {
            return .reject(error: .einval,
                           message: "operation past EOF; From: \(r.offset), Len: \(r.length), Size: \(size)",
                           payload: payload, thenClose: false)
        }
        var valid = NBDCommandFlags.fua
        if type == NBDCommand.read && structured {
            valid |= NBDCommandFlags.dontFragment
        } else if type == NBDCommand.writeZeroes {
            valid |= NBDCommandFlags.noHole | NBDCommandFlags.fastZero
        } else if type == NBDCommand.blockStatus {
            valid |= NBDCommandFlags.reqOne
        }
        if r.flags & ~valid != 0 {
            return .reject(error: .einval,
                           message: "unsupported flags for command \(NBDCommand.name(type)) (got 0x\(String(r.flags, radix: 16)))",
                           payload: payload, thenClose: false)
        }
        switch type {
        case NBDCommand.read, NBDCommand.write, NBDCommand.flush, NBDCommand.trim, NBDCommand.cache,
             NBDCommand.writeZeroes:
            return .serve(payload: payload)
        case NBDCommand.blockStatus:
            if r.length == 0 {
                return .reject(error: .einval, message: "need non-zero length", payload: 0, thenClose: false)
            }
            if meta.count == 0 {
                return .reject(error: .einval, message: "CMD_BLOCK_STATUS not negotiated", payload: 0, thenClose: false)
            }
            return .serve(payload: 0)
        default:
            return .reject(error: .einval, message: "invalid request type (\(type)) received", payload: 0, thenClose: false)
        }
    }
}
