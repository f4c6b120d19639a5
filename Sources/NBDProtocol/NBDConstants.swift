/// Numbers of the NBD protocol (see `shared/reference/nbd-proto.md`), with
/// the names QEMU's `nbd/common.c` prints for them in error messages.
public enum NBDMagic {
    /// "NBDMAGIC": the first 8 bytes the server sends.
    public static let initPassword: UInt64 = 0x4e42_444d_4147_4943
    /// "IHAVEOPT": newstyle greeting magic and the magic of every option.
    public static let option: UInt64 = 0x4948_4156_454f_5054
    /// Magic of every option reply.
    public static let optionReply: UInt64 = 0x0003_e889_0455_65a9
    public static let request: UInt32 = 0x2560_9513
    public static let simpleReply: UInt32 = 0x6744_6698
    public static let structuredReply: UInt32 = 0x668e_33ef
}

/// Size limits shared with QEMU (`include/block/nbd.h`).
public enum NBDLimits {
    /// NBD_MAX_BUFFER_SIZE: the largest option payload, READ, WRITE or CACHE.
    public static let maxBuffer: UInt32 = 32 << 20
    /// NBD_MAX_STRING_SIZE: export names, descriptions and context queries.
    public static let maxString: UInt32 = 4096
    /// QEMU's MAX_NBD_REQUESTS: requests a connection has in flight.
    public static let maxRequestsPerClient = 16
    /// QEMU's NBD_MAX_BLOCK_STATUS_EXTENTS (1 MiB of extent descriptors).
    public static let maxBlockStatusExtents = (1 << 20) / 8
}

/// Handshake flags (server) and client flags.
public enum NBDHandshakeFlags {
    public static let fixedNewstyle: UInt16 = 1 << 0
    public static let noZeroes: UInt16 = 1 << 1
    public static let clientFixedNewstyle: UInt32 = 1 << 0
    public static let clientNoZeroes: UInt32 = 1 << 1
}

/// Transmission flags (the 16-bit export flags).
public struct NBDTransmissionFlags: OptionSet, Sendable, Hashable {
    public var rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let hasFlags = NBDTransmissionFlags(rawValue: 1 << 0)
    public static let readOnly = NBDTransmissionFlags(rawValue: 1 << 1)
    public static let sendFlush = NBDTransmissionFlags(rawValue: 1 << 2)
    public static let sendFUA = NBDTransmissionFlags(rawValue: 1 << 3)
    public static let rotational = NBDTransmissionFlags(rawValue: 1 << 4)
    public static let sendTrim = NBDTransmissionFlags(rawValue: 1 << 5)
    public static let sendWriteZeroes = NBDTransmissionFlags(rawValue: 1 << 6)
    public static let sendDF = NBDTransmissionFlags(rawValue: 1 << 7)
    public static let canMultiConn = NBDTransmissionFlags(rawValue: 1 << 8)
    public static let sendResize = NBDTransmissionFlags(rawValue: 1 << 9)
    public static let sendCache = NBDTransmissionFlags(rawValue: 1 << 10)
    public static let sendFastZero = NBDTransmissionFlags(rawValue: 1 << 11)

    /// The flags QEMU 7.2 (`nbd_export_create`) gives an export; `SEND_DF`
    /// is added per client once structured replies are negotiated.
    public static func qemu(writable: Bool, multiConn: Bool) -> NBDTransmissionFlags {
        var f: NBDTransmissionFlags = [.hasFlags, .sendFlush, .sendFUA, .sendCache]
        if multiConn { f.insert(.canMultiConn) }
        if writable {
            f.formUnion([.sendTrim, .sendWriteZeroes, .sendFastZero])
        } else {
            f.insert(.readOnly)
        }
        return f
    }
}

/// Option numbers (NBD_OPT_*).
public enum NBDOption {
    public static let exportName: UInt32 = 1
    public static let abort: UInt32 = 2
    public static let list: UInt32 = 3
    public static let startTLS: UInt32 = 5
    public static let info: UInt32 = 6
    public static let go: UInt32 = 7
    public static let structuredReply: UInt32 = 8
    public static let listMetaContext: UInt32 = 9
    public static let setMetaContext: UInt32 = 10

    /// `nbd_opt_lookup` of QEMU 7.2 (option 11, extended headers, is unknown there).
    public static func name(_ option: UInt32) -> String {
        switch option {
        case exportName: return "export name"
        case abort: return "abort"
        case list: return "list"
        case startTLS: return "starttls"
        case info: return "info"
        case go: return "go"
        case structuredReply: return "structured reply"
        case listMetaContext: return "list meta context"
        case setMetaContext: return "set meta context"
        default: return "<unknown>"
        }
    }
}

/// Option reply types (NBD_REP_*).
public enum NBDOptionReply {
    public static let ack: UInt32 = 1
    public static let server: UInt32 = 2
    public static let info: UInt32 = 3
    public static let metaContext: UInt32 = 4
    public static let errUnsupported: UInt32 = 0x8000_0001
    public static let errPolicy: UInt32 = 0x8000_0002
    public static let errInvalid: UInt32 = 0x8000_0003
    public static let errPlatform: UInt32 = 0x8000_0004
    public static let errTLSRequired: UInt32 = 0x8000_0005
    public static let errUnknown: UInt32 = 0x8000_0006
    public static let errShutdown: UInt32 = 0x8000_0007
    public static let errBlockSizeRequired: UInt32 = 0x8000_0008
}

/// NBD_INFO_* items of NBD_REP_INFO.
public enum NBDInfo {
    public static let export: UInt16 = 0
    public static let name: UInt16 = 1
    public static let description: UInt16 = 2
    public static let blockSize: UInt16 = 3
}

/// Command types (NBD_CMD_*).
public enum NBDCommand {
    public static let read: UInt16 = 0
    public static let write: UInt16 = 1
    public static let disconnect: UInt16 = 2
    public static let flush: UInt16 = 3
    public static let trim: UInt16 = 4
    public static let cache: UInt16 = 5
    public static let writeZeroes: UInt16 = 6
    public static let blockStatus: UInt16 = 7

    /// `nbd_cmd_lookup`.
    public static func name(_ type: UInt16) -> String {
        switch type {
        case read: return "read"
        case write: return "write"
        case disconnect: return "disconnect"
        case flush: return "flush"
        case trim: return "trim"
        case cache: return "cache"
        case writeZeroes: return "write zeroes"
        case blockStatus: return "block status"
        default: return "<unknown>"
        }
    }
}

/// Command flags (NBD_CMD_FLAG_*).
public enum NBDCommandFlags {
    public static let fua: UInt16 = 1 << 0
    public static let noHole: UInt16 = 1 << 1
    public static let dontFragment: UInt16 = 1 << 2
    public static let reqOne: UInt16 = 1 << 3
    public static let fastZero: UInt16 = 1 << 4
}

/// Structured reply chunk types and flags.
public enum NBDReplyType {
    public static let none: UInt16 = 0
    public static let offsetData: UInt16 = 1
    public static let offsetHole: UInt16 = 2
    public static let blockStatus: UInt16 = 5
    public static let error: UInt16 = 0x8001
    public static let errorOffset: UInt16 = 0x8002
    /// NBD_REPLY_FLAG_DONE.
    public static let flagDone: UInt16 = 1
}

/// Metadata context ids QEMU assigns (`NBD_META_ID_*`); bitmap i gets
/// `dirtyBitmapBase + i`.
public enum NBDMetaContextID {
    public static let baseAllocation: UInt32 = 0
    public static let allocationDepth: UInt32 = 1
    public static let dirtyBitmapBase: UInt32 = 2
}

/// Flags of the `base:allocation` context.
public enum NBDStateFlags {
    public static let hole: UInt32 = 1 << 0
    public static let zero: UInt32 = 1 << 1
    /// `qemu:dirty-bitmap:*`: the extent is dirty.
    public static let dirty: UInt32 = 1 << 0
}
