import BlockCore
import BlockGraph
import Qcow2

/// `amend [--object objectdef] [--image-opts] [-p] [-q] [-f fmt] [-t cache] [--force] -o options filename`
/// (QEMU's img_amend with qcow2_amend_options).
enum AmendCommand {
    typealias Spec = CreateOptions.Spec

    /// qcow2's amend option list, in QEMU's order (the order options are acted on).
    static let amendSpecs: [Spec] = [
        Spec(name: "encrypt.state", kind: .string, help: "Select new state of affected keyslots (active/inactive)"),
        Spec(name: "encrypt.keyslot", kind: .number, help: "Select a single keyslot to modify explicitly"),
        Spec(name: "encrypt.old-secret", kind: .string, help: "Select all keyslots that match this password"),
        Spec(name: "encrypt.new-secret", kind: .string, help: "New secret to set in the matching keyslots. Empty string to erase"),
        Spec(name: "encrypt.iter-time", kind: .number, help: "Time to spend in PBKDF in milliseconds"),
        Spec(name: "size", kind: .size, help: "Virtual disk size"),
        Spec(name: "compat", kind: .string, help: "Compatibility level (v2 [0.10] or v3 [1.1])"),
        Spec(name: "backing_file", kind: .string, help: "File name of a base image"),
        Spec(name: "backing_fmt", kind: .string, help: "Image format of the base image"),
        Spec(name: "data_file", kind: .string, help: "File name of an external data file"),
        Spec(name: "data_file_raw", kind: .bool, help: "The external data file must stay valid as a raw image"),
        Spec(name: "lazy_refcounts", kind: .bool, help: "Postpone refcount updates"),
        Spec(name: "refcount_bits", kind: .number, help: "Width of a reference count entry in bits"),
    ]

    /// Amend options followed by the creation options (qemu_opts_append):
    /// what tells "only supported for image creation" apart.
    static var amendAndCreateSpecs: [Spec] {
        var s = amendSpecs
        for c in CreateOptions.qcow2Specs where c.name != "nocow" && c.name != "extent_size_hint" && !s.contains(where: { $0.name == c.name }) {
            s.append(c)
        }
        return s
    }

    /// Format names QEMU knows but cannot amend.
    static let otherFormats: Set<String> = [
        "raw", "file", "host_device", "host_cdrom", "qcow", "vmdk", "vdi", "vpc", "vhdx", "qed", "parallels",
        "bochs", "cloop", "dmg", "vvfat", "blkdebug", "blkverify", "copy-on-read", "throttle", "null-co",
        "null-aio", "nbd", "compress", "preallocate", "snapshot-access", "copy-before-write",
    ]

    static func run(_ args: [String], _ ctx: ToolContext) async throws(ToolError) -> Int32 {
        let opts = try ctx.parse(args, short: ":ho:f:t:pq", long: [
            .init(name: "help", hasArgument: false, key: "h"), .init(name: "object", hasArgument: true, key: "object"),
            .init(name: "image-opts", hasArgument: false, key: "image-opts"), .init(name: "force", hasArgument: false, key: "force"),
        ])
        var format: String?
        var cacheName = "writeback"
        var optionList: String?
        var progressWanted = false
        var quiet = false
        for (k, v) in opts.options {
            switch k {
            case "h": outln(LaminaImg.helpText(ctx.progName)); return 0
            case "o":
                if !CreateOptions.isValidOptionList(v!) {
                    throw ctx.fail("Invalid option list: \(v!)")
                }
                optionList = optionList.map { $0 + "," + v! } ?? v!
            case "f": format = v
            case "t": cacheName = v!
            case "p": progressWanted = true
            case "q": quiet = true
            case "image-opts": throw ctx.fail("--image-opts is not supported by Lamina")
            case "object": throw ctx.fail("--object is not supported by Lamina")
            default: break
            }
        }
        guard let options = optionList else { throw ctx.usage("Must specify options (-o)") }
        let progress = Progress(enabled: progressWanted && !quiet, minSkip: 1.0)
        do throws(ToolError) {
            try await amend(options: options, format: format, cacheName: cacheName, operands: opts.operands, progress: progress)
        } catch {
            progress.end()
            throw error
        }
        progress.end()
        return 0
    }

    static func printHelp(_ format: String) throws(ToolError) {
        guard format == "qcow2" else {
            if otherFormats.contains(format) {
                throw ToolError(message: "Format driver '\(format)' does not support option amendment")
            }
            throw ToolError(message: "Unknown file format '\(format)'")
        }
        var s = "Amend options for 'qcow2':\n"
        for spec in amendSpecs.sorted(by: { $0.name < $1.name }) { s += spec.helpLine }
        out(s)
    }

    static func amend(options: String, format: String?, cacheName: String, operands: [String],
                      progress: Progress) async throws(ToolError) {
        let wantsHelp = CreateOptions.wantsHelp(options)
        if let f = format, wantsHelp {
            try printHelp(f)
            return
        }
        guard operands.count == 1 else { throw ToolError(message: "Expecting one image file name") }
        let filename = operands[0]
        guard let cache = CacheMode.parse(cacheName) else { throw ToolError(message: "Invalid cache option: \(cacheName)") }
        try checkFormat(format, filename)
        let node = try await openImage(filename, format: format, readOnly: false, cache: cache)
        do throws(ToolError) {
            if wantsHelp {
                try printHelp(node.formatName)
            } else {
                guard let img = node.driver as? Qcow2Image else {
                    throw ToolError(message: "Format driver '\(node.formatName)' does not support option amendment")
                }
                var co = CreateOptions(format: "qcow2", specs: amendSpecs)
                do throws(ToolError) {
                    try co.parse(options)
                } catch {
                    var e = error
                    var both = CreateOptions(format: "qcow2", specs: amendAndCreateSpecs)
                    if (try? both.parse(options)) != nil {
                        e.message += "\nThis option is only supported for image creation"
                    }
                    throw e
                }
                progress.advance(0, max: 0)
                do throws(ToolError) {
                    try await amendQcow2(img, node, co, progress)
                } catch {
                    progress.advance(100, max: 0)
                    throw error
                }
                progress.advance(100, max: 0)
            }
        } catch {
            await closeQuietly(node)
            throw error
        }
        await closeQuietly(node)
    }

    /// QEMU's Qcow2AmendHelperCBInfo: one progress scale over the operations.
    final class StatusHelper {
        enum Operation { case none, upgrading, changingRefcountOrder, downgrading }
        let progress: Progress
        let totalOperations: Int64
        var current = Operation.none
        var last = Operation.none
        var offsetCompleted: Int64 = 0
        var operationsCompleted: Int64 = 0
        var lastWorkSize: Int64 = 0

        init(progress: Progress, totalOperations: Int64) {
            self.progress = progress
            self.totalOperations = totalOperations
        }

        func report(_ offset: Int64, _ workSize: Int64) {
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
            progress.advance(Float(100) * Float(offsetCompleted + offset) / Float(total), max: 0)
        }
    }

    static func amendQcow2(_ img: Qcow2Image, _ node: BlockNode, _ co: CreateOptions, _ progress: Progress) async throws(ToolError) {
        let h = await img.currentHeader()
        let oldVersion = Int(h.version)
        var newVersion = oldVersion
        var newSize: UInt64 = 0
        var backingFile: String?
        var backingFormat: String?
        var lazy = h.lazyRefcounts
        var refcountBits = h.refcountBits
        for spec in amendSpecs where co.has(spec.name) {
            let v = co.value(spec.name) ?? ""
            switch spec.name {
            case let n where n.hasPrefix("encrypt."):
                throw ToolError(message: h.cryptMethod == 0 ? "Can't amend encryption options - encryption not present"
                                                            : "Only LUKS encryption options can be amended")
            case "size":
                newSize = UInt64(v) ?? 0
            case "compat":
                switch v {
                case "0.10", "v2": newVersion = 2
                case "1.1", "v3": newVersion = 3
                default: throw ToolError(message: "Unknown compatibility level \(v)")
                }
            case "backing_file": backingFile = v
            case "backing_fmt": backingFormat = v
            case "data_file":
                throw ToolError(message: "data-file can only be set for images that use an external data file")
            case "data_file_raw":
                if CreateOptions.isTrue(v) { throw ToolError(message: "data-file-raw cannot be set on existing images") }
            case "lazy_refcounts":
                lazy = CreateOptions.isTrue(v)
            case "refcount_bits":
                // QEMU stores the number in an int.
                let bits = Int32(truncatingIfNeeded: UInt64(v) ?? 0)
                if bits <= 0 || bits > 64 || bits & (bits - 1) != 0 {
                    throw ToolError(message: "Refcount width must be a power of two and may not exceed 64 bits")
                }
                refcountBits = Int(bits)
            default: break
            }
        }
        let currentSize = node.length
        let targetSize = newSize != 0 ? Int64(clamping: newSize) : currentSize
        let newOrder = refcountBits.trailingZeroBitCount
        // Every refusal QEMU can make, checked in its order before anything
        // changes (QEMU itself refuses some only after earlier steps ran).
        do throws(BlockError) {
            if refcountBits != h.refcountBits {
                if newVersion < 3 && refcountBits != 16 {
                    throw BlockError.invalid("Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)")
                }
                if let problem = try await img.amendRefcountWidthProblem(order: newOrder) {
                    // What QEMU reports before it hits the refcount: the
                    // upgrade (if asked for), then its first walk over the
                    // refcount table up to the offending entry.
                    let helper = StatusHelper(progress: progress, totalOperations: (newVersion != oldVersion ? 1 : 0) + 1)
                    if newVersion > oldVersion {
                        helper.current = .upgrading
                        for i in Int64(0)...2 { helper.report(i, 2) }
                    }
                    helper.current = .changingRefcountOrder
                    for i in 0...problem.reftableIndex { helper.report(i, 3 * problem.reftableSize) }
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
                try await img.amendCheckDowngrade(size: targetSize, refcountOrder: newOrder)
            }
        } catch {
            throw ToolError(message: error.message)
        }

        let helper = StatusHelper(progress: progress,
                                  totalOperations: (newVersion != oldVersion ? 1 : 0) + (refcountBits != h.refcountBits ? 1 : 0))
        do throws(BlockError) {
            if newVersion > oldVersion {
                helper.current = .upgrading
                try await img.amendUpgrade(progress: helper.report)
            }
            if refcountBits != h.refcountBits {
                helper.current = .changingRefcountOrder
                try await img.amendChangeRefcountOrder(newOrder, progress: helper.report)
            }
            try await img.amendRewriteHeader()
            if lazy != h.lazyRefcounts {
                try await img.amendSetLazyRefcounts(lazy)
            }
            if newSize != 0 && targetSize != currentSize {
                try await node.truncate(to: targetSize)
            }
            if newVersion < oldVersion {
                helper.current = .downgrading
                try await img.amendDowngrade(progress: helper.report)
            }
        } catch {
            throw ToolError(message: error.message)
        }
    }
}
