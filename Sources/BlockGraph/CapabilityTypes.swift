/// QEMU's BlockDriverInfo: what bdrv_get_info answers.
public struct BlockDriverInfo: Sendable, Equatable {
    /// Allocation unit in bytes (qcow2: the cluster size).
    public var clusterSize: Int
    /// The image was not closed cleanly (qcow2: the dirty bit of lazy
    /// refcounts), so its metadata may need a repair.
    public var isDirty: Bool
    /// Lamina's addition: a zero write of whole clusters is recorded as
    /// zero clusters, without writing data (qcow2 v3; QEMU's v2 images
    /// write zeroed data instead).
    public var supportsZeroClusters: Bool

    public init(clusterSize: Int, isDirty: Bool, supportsZeroClusters: Bool) {
        self.clusterSize = clusterSize
        self.isDirty = isDirty
        self.supportsZeroClusters = supportsZeroClusters
    }
}

/// One internal snapshot (QEMU's QEMUSnapshotInfo).
public struct SnapshotInfo: Sendable, Equatable {
    /// Unique id the driver gave it ("1", "2", ...); ignored on create.
    public var id: String
    public var name: String
    /// Bytes of saved VM state (0 for disk-only snapshots).
    public var vmStateSize: UInt64
    public var dateSec: UInt32
    public var dateNsec: UInt32
    public var vmClockNsec: UInt64
    /// Instruction count; nil when the entry does not record it, and
    /// UInt64.max for QEMU's "none" (-1).
    public var icount: UInt64?

    public init(id: String, name: String, vmStateSize: UInt64, dateSec: UInt32, dateNsec: UInt32,
                vmClockNsec: UInt64, icount: UInt64?) {
        self.id = id
        self.name = name
        self.vmStateSize = vmStateSize
        self.dateSec = dateSec
        self.dateNsec = dateNsec
        self.vmClockNsec = vmClockNsec
        self.icount = icount
    }
}

/// What a caller sees of one persistent dirty bitmap of an open image.
public struct PersistentBitmapInfo: Sendable, Equatable {
    public var name: String
    /// Bytes per bit (a power of two).
    public var granularity: Int64
    /// Guest writes mark it.
    public var enabled: Bool
    /// Found in use on disk (its writer died): its bits are not trusted
    /// and it can only be removed.
    public var inconsistent: Bool

    public init(name: String, granularity: Int64, enabled: Bool, inconsistent: Bool) {
        self.name = name
        self.granularity = granularity
        self.enabled = enabled
        self.inconsistent = inconsistent
    }
}

/// What a check found (QEMU's BdrvCheckResult with its BlockFragInfo).
public struct ImageCheckResult: Sendable {
    public var corruptions = 0
    public var leaks = 0
    public var checkErrors = 0
    public var corruptionsFixed = 0
    public var leaksFixed = 0
    public var imageEndOffset: Int64 = 0
    public var totalClusters: Int64 = 0
    public var allocatedClusters: Int64 = 0
    public var fragmentedClusters: Int64 = 0
    public var compressedClusters: Int64 = 0
    /// Diagnostics in the order QEMU prints them (to stderr).
    public var messages: [String] = []
    public init() {}
}

/// What a check may repair (QEMU's BdrvCheckMode).
public struct ImageRepairMode: OptionSet, Sendable {
    public let rawValue: Int
    public init(rawValue: Int) { self.rawValue = rawValue }
    /// BDRV_FIX_LEAKS: release clusters nothing references.
    public static let leaks = ImageRepairMode(rawValue: 1)
    /// BDRV_FIX_ERRORS: fix wrong refcounts and flags.
    public static let errors = ImageRepairMode(rawValue: 2)
}

/// QAPI ImageInfoSpecific: the format-specific part of image info, as
/// typed data (the info module prints it as QEMU does).
public enum ImageInfoSpecific: Sendable, Equatable {
    case qcow2(ImageInfoSpecificQcow2)
}

/// QAPI ImageInfoSpecificQCow2. Optional members are absent when nil.
public struct ImageInfoSpecificQcow2: Sendable, Equatable {
    /// QAPI Qcow2BitmapInfo.
    public struct Bitmap: Sendable, Equatable {
        public var name: String
        public var granularity: UInt64
        /// Qcow2BitmapInfoFlags names, in QEMU's order ("in-use", "auto").
        public var flags: [String]

        public init(name: String, granularity: UInt64, flags: [String]) {
            self.name = name
            self.granularity = granularity
            self.flags = flags
        }
    }

    /// "0.10" or "1.1".
    public var compat: String
    public var lazyRefcounts: Bool?
    /// Present only when the image has bitmaps.
    public var bitmaps: [Bitmap]?
    public var refcountBits: Int
    /// The encryption format ("aes", "luks"), when encrypted.
    public var encryptFormat: String?
    public var corrupt: Bool?
    public var extendedL2: Bool?
    /// "zlib" or "zstd".
    public var compressionType: String

    public init(compat: String, lazyRefcounts: Bool? = nil, bitmaps: [Bitmap]? = nil, refcountBits: Int,
                encryptFormat: String? = nil, corrupt: Bool? = nil, extendedL2: Bool? = nil,
                compressionType: String) {
        self.compat = compat
        self.lazyRefcounts = lazyRefcounts
        self.bitmaps = bitmaps
        self.refcountBits = refcountBits
        self.encryptFormat = encryptFormat
        self.corrupt = corrupt
        self.extendedL2 = extendedL2
        self.compressionType = compressionType
    }
}
