/// What the handshake tells a client about one export. Built by the server
/// when the export is added; immutable afterwards (QEMU fixes the size and
/// flags at `nbd_export_create`).
public struct NBDExportInfo: Sendable, Equatable {
    /// Opaque identity assigned by the directory (two exports added under
    /// the same name at different times have different ids).
    public var id: UInt64
    public var name: String
    /// NBD_INFO_DESCRIPTION is sent only when this is non-nil.
    public var description: String?
    /// Export size in bytes (QEMU: the node size rounded down to 512).
    public var size: UInt64
    /// Transmission flags without NBD_FLAG_SEND_DF (added per client).
    public var flags: NBDTransmissionFlags
    /// The node's request alignment: NBD_INFO_BLOCK_SIZE minimum when the
    /// client asks for block sizes (1 otherwise, for compatibility).
    public var requestAlignment: UInt32
    /// NBD_INFO_BLOCK_SIZE maximum (at most 32 MiB).
    public var maximumBlockSize: UInt32
    /// Whether `qemu:allocation-depth` is offered.
    public var allocationDepth: Bool
    /// Bitmaps offered as `qemu:dirty-bitmap:NAME`, in configuration order.
    public var bitmaps: [String]

    public init(id: UInt64, name: String, description: String?, size: UInt64, flags: NBDTransmissionFlags,
                requestAlignment: UInt32 = 1, maximumBlockSize: UInt32 = NBDLimits.maxBuffer,
                allocationDepth: Bool = false, bitmaps: [String] = []) {
        self.id = id
        self.name = name
        self.description = description
        self.size = size
        self.flags = flags
        self.requestAlignment = requestAlignment
        self.maximumBlockSize = maximumBlockSize
        self.allocationDepth = allocationDepth
        self.bitmaps = bitmaps
    }
}

/// The exports a handshake can see. The handshake calls it synchronously
/// from the connection's event loop.
public protocol NBDExportDirectory {
    /// All exports, in the order they were added (NBD_OPT_LIST).
    func listExports() -> [NBDExportInfo]
    /// An export by name, without joining it (INFO, meta-context options).
    func lookupExport(named name: [UInt8]) -> NBDExportInfo?
    /// Finds an export and registers this connection as its client (GO,
    /// EXPORT_NAME). Nil when there is no such export (or it is going away).
    mutating func attachExport(named name: [UInt8]) -> NBDExportInfo?
}

/// The metadata contexts selected by NBD_OPT_SET_META_CONTEXT (QEMU's
/// NBDExportMetaContexts), for one export.
public struct NBDMetaSelection: Sendable, Equatable {
    /// The export the selection was made for (a GO to another export
    /// drops it).
    public var exportID: UInt64?
    public var baseAllocation = false
    public var allocationDepth = false
    /// Per export bitmap index: selected.
    public var bitmaps: [Bool] = []

    public init(exportID: UInt64? = nil, bitmapCount: Int = 0) {
        self.exportID = exportID
        self.bitmaps = Array(repeating: false, count: bitmapCount)
    }

    /// Number of selected contexts (the number of BLOCK_STATUS chunks).
    public var count: Int {
        (baseAllocation ? 1 : 0) + (allocationDepth ? 1 : 0) + bitmaps.reduce(0) { $0 + ($1 ? 1 : 0) }
    }

    /// Selected contexts as (id, name), in QEMU's reply order.
    public func contexts(of export: NBDExportInfo) -> [(id: UInt32, name: String)] {
        var out: [(UInt32, String)] = []
        if baseAllocation { out.append((NBDMetaContextID.baseAllocation, "base:allocation")) }
        if allocationDepth { out.append((NBDMetaContextID.allocationDepth, "qemu:allocation-depth")) }
        for (i, on) in bitmaps.enumerated() where on {
            out.append((NBDMetaContextID.dirtyBitmapBase + UInt32(i), "qemu:dirty-bitmap:" + export.bitmaps[i]))
        }
        return out
    }
}

/// How replies are framed for a client (QEMU's NBDMode, up to 7.2).
public enum NBDReplyMode: Sendable, Equatable {
    /// Old newstyle client (no fixed-newstyle flag): EXPORT_NAME only.
    case exportName
    /// Fixed newstyle, simple replies.
    case simple
    /// NBD_OPT_STRUCTURED_REPLY negotiated.
    case structured
}

/// The outcome of a successful handshake: what transmission needs.
public struct NBDSession: Sendable, Equatable {
    public var export: NBDExportInfo
    public var mode: NBDReplyMode
    /// Contexts for NBD_CMD_BLOCK_STATUS (empty when none negotiated for
    /// this export).
    public var meta: NBDMetaSelection
    /// The flags the client was sent (with SEND_DF when structured).
    public var transmissionFlags: NBDTransmissionFlags

    public init(export: NBDExportInfo, mode: NBDReplyMode, meta: NBDMetaSelection) {
        self.export = export
        self.mode = mode
        self.meta = meta.exportID == export.id ? meta : NBDMetaSelection(exportID: export.id, bitmapCount: export.bitmaps.count)
        var flags = export.flags
        if mode == .structured { flags.insert(.sendDF) }
        self.transmissionFlags = flags
    }

    public var structured: Bool { mode == .structured }
}
