/// Reply encoders: fixed-size headers written into caller-owned memory so
/// the server can put them straight into its output buffers.
public enum NBDReplyCodec {
    public static let simpleHeaderSize = 16
    public static let chunkHeaderSize = 20
    /// Chunk header + 64-bit offset of NBD_REPLY_TYPE_OFFSET_DATA.
    public static let dataChunkPrefixSize = 28
    /// A whole NBD_REPLY_TYPE_OFFSET_HOLE chunk.
    public static let holeChunkSize = 32
    /// Chunk header + context id of NBD_REPLY_TYPE_BLOCK_STATUS.
    public static let blockStatusPrefixSize = 24

    /// Simple reply: magic, error, cookie (data, if any, follows).
    @inline(__always)
    public static func simpleHeader(into p: UnsafeMutableRawBufferPointer, cookie: UInt64, error: NBDError) {
        nbdStore32(p, 0, NBDMagic.simpleReply)
        nbdStore32(p, 4, error.rawValue)
        nbdStore64(p, 8, cookie)
    }

    /// Structured chunk header; `length` counts the payload after it.
    @inline(__always)
    public static func chunkHeader(into p: UnsafeMutableRawBufferPointer, flags: UInt16, type: UInt16,
                                   cookie: UInt64, length: UInt32) {
        nbdStore32(p, 0, NBDMagic.structuredReply)
        nbdStore16(p, 4, flags)
        nbdStore16(p, 6, type)
        nbdStore64(p, 8, cookie)
        nbdStore32(p, 16, length)
    }

    /// OFFSET_DATA prefix: header + offset; `dataLength` bytes follow.
    @inline(__always)
    public static func dataChunkPrefix(into p: UnsafeMutableRawBufferPointer, done: Bool, cookie: UInt64,
                                       offset: UInt64, dataLength: UInt32) {
        chunkHeader(into: p, flags: done ? NBDReplyType.flagDone : 0, type: NBDReplyType.offsetData,
                    cookie: cookie, length: 8 + dataLength)
        nbdStore64(p, 20, offset)
    }

    /// A whole OFFSET_HOLE chunk.
    @inline(__always)
    public static func holeChunk(into p: UnsafeMutableRawBufferPointer, done: Bool, cookie: UInt64,
                                 offset: UInt64, length: UInt32) {
        chunkHeader(into: p, flags: done ? NBDReplyType.flagDone : 0, type: NBDReplyType.offsetHole,
                    cookie: cookie, length: 12)
        nbdStore64(p, 20, offset)
        nbdStore32(p, 28, length)
    }

    /// BLOCK_STATUS prefix: header + context id; `extentCount` 8-byte
    /// descriptors follow.
    @inline(__always)
    public static func blockStatusPrefix(into p: UnsafeMutableRawBufferPointer, done: Bool, cookie: UInt64,
                                         contextID: UInt32, extentCount: Int) {
        chunkHeader(into: p, flags: done ? NBDReplyType.flagDone : 0, type: NBDReplyType.blockStatus,
                    cookie: cookie, length: UInt32(4 + 8 * extentCount))
        nbdStore32(p, 20, contextID)
    }

    /// Size of an ERROR chunk carrying `messageLength` bytes of text.
    public static func errorChunkSize(messageLength: Int) -> Int { chunkHeaderSize + 6 + messageLength }

    /// NBD_REPLY_TYPE_ERROR chunk (always the last: DONE set).
    public static func errorChunk(into p: UnsafeMutableRawBufferPointer, cookie: UInt64, error: NBDError,
                                  message: some Collection<UInt8>) {
        chunkHeader(into: p, flags: NBDReplyType.flagDone, type: NBDReplyType.error, cookie: cookie,
                    length: UInt32(6 + message.count))
        nbdStore32(p, 20, error.rawValue)
        nbdStore16(p, 24, UInt16(message.count))
        var i = 26
        for byte in message {
            p[i] = byte
            i += 1
        }
    }
}

/// Extents for one BLOCK_STATUS chunk, merged and capped the way QEMU's
/// `NBDExtentArray` does: adjacent extents with equal flags are merged while
/// the sum fits 32 bits; once `capacity` descriptors exist, the next
/// different extent fills it up and ends the collection.
public struct NBDExtentCollector: Sendable {
    public private(set) var lengths: [UInt32] = []
    public private(set) var flags: [UInt32] = []
    public private(set) var totalLength: UInt64 = 0
    public let capacity: Int
    public private(set) var isFull = false

    public init(capacity: Int) {
        precondition(capacity > 0)
        self.capacity = capacity
    }

    /// Adds an extent; returns false (and ignores it) when the array is full.
    @discardableResult
    public mutating func add(length: UInt32, flags f: UInt32) -> Bool {
        precondition(!isFull, "NBDExtentCollector.add after it reported full")
        if length == 0 { return true }
        if let last = flags.last, last == f {
            let sum = UInt64(lengths[lengths.count - 1]) + UInt64(length)
            if sum <= UInt64(UInt32.max) {
                lengths[lengths.count - 1] = UInt32(sum)
                totalLength += UInt64(length)
                return true
            }
        }
        if lengths.count >= capacity {
            isFull = true
            return false
        }
        lengths.append(length)
        flags.append(f)
        totalLength += UInt64(length)
        return true
    }

    public var count: Int { lengths.count }

    /// Writes the descriptors (length, flags) big-endian.
    public func encode(into p: UnsafeMutableRawBufferPointer) {
        for i in lengths.indices {
            nbdStore32(p, 8 * i, lengths[i])
            nbdStore32(p, 8 * i + 4, flags[i])
        }
    }
}
