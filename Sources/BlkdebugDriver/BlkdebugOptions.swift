import BlockCore
import BlockGraph

/// QAPI BlkdebugIOType: the kinds of request an `inject-error` rule fails.
public enum BlkdebugIOType: String, Sendable, CaseIterable {
    case read, write
    case writeZeroes = "write-zeroes"
    case discard, flush
    case blockStatus = "block-status"

    /// The rule's iotype mask bit (QEMU: 1 << enum value).
    var bit: UInt8 { 1 << UInt8(Self.allCases.firstIndex(of: self)!) }

    /// QEMU's default when a rule names no iotype: every type but block-status.
    static let defaultMask: UInt8 = {
        let types: [BlkdebugIOType] = [.read, .write, .writeZeroes, .discard, .flush]
        return types.reduce(UInt8(0)) { $0 | $1.bit }
    }()
}

/// QAPI BlkdebugInjectErrorOptions, as given (nil: not given). QEMU keeps
/// the given members in the node's options and shows them in its json:
/// file name, so the values are kept as the user wrote them.
public struct BlkdebugInjectError: Sendable, Equatable {
    public var event: BlkdebugEvent
    /// The state the rule is active in (0 or nil: any).
    public var state: Int64?
    /// nil: read, write, write-zeroes, discard and flush.
    public var iotype: BlkdebugIOType?
    /// The error returned (nil: EIO; 0: the rule matches but fails nothing).
    public var errno: Int64?
    /// The 512-byte sector a request must cover (nil or -1: any request).
    public var sector: Int64?
    /// Fire once, then the rule is gone.
    public var once: Bool?
    /// Fail without first yielding (QEMU reschedules the failing request).
    public var immediately: Bool?

    public init(event: BlkdebugEvent, state: Int64? = nil, iotype: BlkdebugIOType? = nil, errno: Int64? = nil,
                sector: Int64? = nil, once: Bool? = nil, immediately: Bool? = nil) {
        self.event = event
        self.state = state
        self.iotype = iotype
        self.errno = errno
        self.sector = sector
        self.once = once
        self.immediately = immediately
    }
}

/// QAPI BlkdebugSetStateOptions.
public struct BlkdebugSetState: Sendable, Equatable {
    public var event: BlkdebugEvent
    /// The state the rule is active in (0 or nil: any).
    public var state: Int64?
    public var newState: Int64

    public init(event: BlkdebugEvent, state: Int64? = nil, newState: Int64) {
        self.event = event
        self.state = state
        self.newState = newState
    }
}

/// QAPI BlockdevOptionsBlkdebug without the `image` reference (the caller
/// opens the image and hands the node to `BlkdebugDriver`). Values are as
/// given; nil means not given.
public struct BlkdebugOptions: Sendable, Equatable {
    /// A rules file in QEMU's config syntax (`[inject-error]`/`[set-state]`
    /// sections of `key = "value"` lines); its rules come first.
    public var config: String?
    public var align: Int64?
    public var maxTransfer: Int64?
    public var optWriteZero: Int64?
    public var maxWriteZero: Int64?
    public var optDiscard: Int64?
    public var maxDiscard: Int64?
    public var injectErrors: [BlkdebugInjectError] = []
    public var setStates: [BlkdebugSetState] = []
    /// Permissions taken on the image beyond what the node's users need.
    public var takeChildPerms: BlockPermissions = []
    /// Permissions not shared on the image beyond what must not be.
    public var unshareChildPerms: BlockPermissions = []
    /// Where these options sat in the options that created the node
    /// (["file"]: a qcow2's inline `file`). QEMU's option dictionaries are
    /// copied level by level, which decides the order its json: file names
    /// list the rules in; nothing else depends on it.
    public var nesting: [String] = []

    public init() {}

    /// The size options in QEMU's option order (runtime_opts).
    var sizes: [(String, Int64?)] {
        [("align", align), ("max-transfer", maxTransfer), ("opt-write-zero", optWriteZero),
         ("max-write-zero", maxWriteZero), ("opt-discard", optDiscard), ("max-discard", maxDiscard)]
    }
}

/// The values blkdebug works with once its options are checked (QEMU's
/// BDRVBlkdebugState "IN" fields); 0 means "not set".
struct BlkdebugLimits: Sendable, Equatable {
    var align: Int64 = 0
    var maxTransfer: Int64 = 0
    var optWriteZero: Int64 = 0
    var maxWriteZero: Int64 = 0
    var optDiscard: Int64 = 0
    var maxDiscard: Int64 = 0
}

extension BlkdebugOptions {
    static let intMax: Int64 = 2_147_483_647

    /// QEMU's size parsing of the node options (qemu_opts_absorb_qdict in
    /// blkdebug_open): a negative size is refused, with QEMU's hint after
    /// the first line. Checked in the order QEMU's options dictionary
    /// iterates them; `order` gives that order for the given names.
    func checkSizes(order: ([String]) -> [String]) throws(BlockError) {
        let given = sizes.compactMap { s in s.1.map { (s.0, $0) } }
        for name in order(given.map(\.0)) {
            guard let v = given.first(where: { $0.0 == name })?.1, v < 0 else { continue }
            throw BlockError.invalid("Parameter '\(name)' expects a non-negative number below 2^64\n"
                + "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.")
        }
    }

    /// blkdebug_open's constraint checks once the image is open:
    /// `imageAlignment` is the image's request alignment. Messages are
    /// QEMU's ("Cannot meet constraints with align 3").
    func checkedLimits(imageAlignment: Int) throws(BlockError) -> BlkdebugLimits {
        var l = BlkdebugLimits()
        func fail(_ name: String, _ v: Int64) -> BlockError {
            BlockError.invalid("Cannot meet constraints with \(name) \(UInt64(bitPattern: v))")
        }
        l.align = align ?? 0
        if l.align != 0 && (l.align >= Self.intMax || l.align & (l.align - 1) != 0) { throw fail("align", l.align) }
        let a = max(l.align, Int64(imageAlignment))
        func check(_ name: String, _ v: Int64?, multipleOf m: Int64) throws(BlockError) -> Int64 {
            let v = v ?? 0
            if v != 0 && (v >= Self.intMax || v % m != 0) { throw fail(name, v) }
            return v
        }
        l.maxTransfer = try check("max-transfer", maxTransfer, multipleOf: a)
        l.optWriteZero = try check("opt-write-zero", optWriteZero, multipleOf: a)
        l.maxWriteZero = try check("max-write-zero", maxWriteZero, multipleOf: max(l.optWriteZero, a))
        l.optDiscard = try check("opt-discard", optDiscard, multipleOf: a)
        l.maxDiscard = try check("max-discard", maxDiscard, multipleOf: max(l.optDiscard, a))
        return l
    }
}
