import BlockCore
import BlockGraph

/// `amend [--object objectdef] [--image-opts] [-p] [-q] [-f fmt] [-t cache] [--force] -o options filename`
/// (QEMU's img_amend; the driver's `Amendable.amend` carries the options out).
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
                guard let img = node.driver as? any Amendable else {
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
                // The options in the amend list's order (the order QEMU acts on them).
                let amendOptions = amendSpecs.filter { co.has($0.name) }.map { (name: $0.name, value: co.value($0.name) ?? "") }
                do throws(BlockError) {
                    try await img.amend(amendOptions, node: node) { done, total in
                        progress.advance(Float(100) * Float(done) / Float(total), max: 0)
                    }
                } catch {
                    progress.advance(100, max: 0)
                    throw ToolError(message: error.message)
                }
                progress.advance(100, max: 0)
            }
        } catch {
            await closeQuietly(node)
            throw error
        }
        await closeQuietly(node)
    }
}
