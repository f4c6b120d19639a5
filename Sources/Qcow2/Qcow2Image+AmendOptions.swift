import BlockCore
import BlockGraph

/// QEMU's qcow2_amend_options: the amend options of `qemu-img amend`
/// interpreted and carried out with the operations of Qcow2Amend.swift.
extension Qcow2Image: Amendable {
    /// Options (QEMU's qcow2 amend_opts names: size, compat, backing_file,
    /// backing_fmt, data_file, data_file_raw, lazy_refcounts, refcount_bits,
    /// encrypt.*) are read in the order given. Every refusal QEMU can make
    /// is checked, in its order, before anything changes (QEMU itself
    /// refuses some only after earlier steps ran). Then: upgrade, refcount
    /// width, header rewrite, lazy refcounts, size (through `node`),
    /// downgrade. `progress(done, total)` spans all of them, as QEMU's
    /// qcow2_amend_helper_cb reports.
    public func amend(_ options: [(name: String, value: String)], node: BlockNode,
                      progress: (Int64, Int64) -> Void) async throws(BlockError) {
        let h = await currentHeader()
        let oldVersion = Int(h.version)
        var newVersion = oldVersion
        var newSize: UInt64 = 0
        var backingFile: String?
        var backingFormat: String?
        var lazy = h.lazyRefcounts
        var refcountBits = h.refcountBits
        for (name, v) in options {
            switch name {
            case let n where n.hasPrefix("encrypt."):
                throw BlockError.invalid(h.cryptMethod == 0 ? "Can't amend encryption options - encryption not present"
                                                            : "Only LUKS encryption options can be amended")
            case "size":
                newSize = UInt64(v) ?? 0
            case "compat":
                switch v {
                case "0.10", "v2": newVersion = 2
                case "1.1", "v3": newVersion = 3
                default: throw BlockError.invalid("Unknown compatibility level \(v)")
                }
            case "backing_file": backingFile = v
            case "backing_fmt": backingFormat = v
            case "data_file":
                throw BlockError.invalid("data-file can only be set for images that use an external data file")
            case "data_file_raw":
                if Self.isTrue(v) { throw BlockError.invalid("data-file-raw cannot be set on existing images") }
            case "lazy_refcounts":
                lazy = Self.isTrue(v)
            case "refcount_bits":
                // QEMU stores the number in an int.
                let bits = Int32(truncatingIfNeeded: UInt64(v) ?? 0)
                if bits <= 0 || bits > 64 || bits & (bits - 1) != 0 {
                    throw BlockError.invalid("Refcount width must be a power of two and may not exceed 64 bits")
                }
                refcountBits = Int(bits)
            default: break
            }
        }
        let currentSize = node.length
        let targetSize = newSize != 0 ? Int64(clamping: newSize) : currentSize
        let newOrder = refcountBits.trailingZeroBitCount
        if refcountBits != h.refcountBits {
            if newVersion < 3 && refcountBits != 16 {
                throw BlockError.invalid("Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)")
            }
            if let problem = try await amendRefcountWidthProblem(order: newOrder) {
                // What QEMU reports before it hits the refcount: the
                // upgrade (if asked for), then its first walk over the
                // refcount table up to the offending entry.
                var helper = AmendStatus(totalOperations: (newVersion != oldVersion ? 1 : 0) + 1)
                if newVersion > oldVersion {
                    helper.current = .upgrading
                    for i in Int64(0)...2 { helper.report(i, 2, to: progress) }
                }
                helper.current = .changingRefcountOrder
                for i in 0...problem.reftableIndex { helper.report(i, 3 * problem.reftableSize, to: progress) }
                throw BlockError.invalid(problem.message)
            }
        }
        if backingFile != nil || backingFormat != nil {
            if backingFile != h.backingFile || backingFormat != h.backingFormat {
                throw BlockError.invalid("Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.")
            }
        }
        if lazy != h.lazyRefcounts && lazy && newVersion < 3 {
            throw BlockError.invalid("Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)")
        }
        if newVersion < oldVersion {
            try await amendCheckDowngrade(size: targetSize, refcountOrder: newOrder)
        }

        var helper = AmendStatus(totalOperations: (newVersion != oldVersion ? 1 : 0) + (refcountBits != h.refcountBits ? 1 : 0))
        if newVersion > oldVersion {
            helper.current = .upgrading
            try await amendUpgrade { helper.report($0, $1, to: progress) }
        }
        if refcountBits != h.refcountBits {
            helper.current = .changingRefcountOrder
            try await amendChangeRefcountOrder(newOrder) { helper.report($0, $1, to: progress) }
        }
        try await amendRewriteHeader()
        if lazy != h.lazyRefcounts {
            try await amendSetLazyRefcounts(lazy)
        }
        if newSize != 0 && targetSize != currentSize {
            try await node.truncate(to: targetSize)
        }
        if newVersion < oldVersion {
            helper.current = .downgrading
            try await amendDowngrade { helper.report($0, $1, to: progress) }
        }
    }

    /// QemuOpts' boolean values ("on", "yes", "true").
    private static func isTrue(_ v: String) -> Bool {
        v == "on" || v == "yes" || v == "true"
    }
}

/// QEMU's Qcow2AmendHelperCBInfo: one progress scale over the operations
/// of one amend.
private struct AmendStatus {
    enum Operation { case none, upgrading, changingRefcountOrder, downgrading }
    let totalOperations: Int64
    var current = Operation.none
    var last = Operation.none
    var offsetCompleted: Int64 = 0
    var operationsCompleted: Int64 = 0
    var lastWorkSize: Int64 = 0

    init(totalOperations: Int64) {
        self.totalOperations = totalOperations
    }

    /// One operation's own progress, `offset` of `workSize` units, passed
    /// on to `progress` on the scale of the whole amend.
    mutating func report(_ offset: Int64, _ workSize: Int64, to progress: (Int64, Int64) -> Void) {
        if current != last {
            if last != .none {
                offsetCompleted += lastWorkSize
                operationsCompleted += 1
            }
            last = current
        }
        guard totalOperations > 0 else { return }
        lastWorkSize = workSize
        let currentWork = offsetCompleted + workSize
        let projected = currentWork * (totalOperations - operationsCompleted - 1) / (operationsCompleted + 1)
        let total = currentWork + projected
        guard total != 0 else { return }
        progress(offsetCompleted + offset, total)
    }
}
