import BlockCore
import BlockDrivers
import BlockGraph

/// `create [-q] [-f fmt] [-b backing_file [-F backing_fmt]] [-u] [-o options] filename [size]`
enum CreateCommand {
    static func run(_ args: [String], _ ctx: ToolContext) async throws(ToolError) -> Int32 {
        let opts = try ctx.parse(args, short: ":F:b:f:ho:qu", long: [
            .init(name: "help", hasArgument: false, key: "h"), .init(name: "object", hasArgument: true, key: "object"),
        ])
        var format = "raw"
        var baseFile: String?
        var baseFormat: String?
        var optionList: String?
        var quiet = false
        var unsafe = false
        for (k, v) in opts.options {
            switch k {
            case "h": outln(LaminaImg.helpText(ctx.progName)); return 0
            case "f": format = v!
            case "b": baseFile = v
            case "F": baseFormat = v
            case "o":
                if !CreateOptions.wantsHelp(v!) && CreateOptions.splitList(v!) == nil {
                    throw ctx.fail("Invalid option list: \(v!)")
                }
                optionList = optionList.map { $0 + "," + v! } ?? v!
            case "q": quiet = true
            case "u": unsafe = true
            default: break
            }
        }
        if let list = optionList, CreateOptions.wantsHelp(list) {
            guard ["qcow2", "raw"].contains(format) else { throw ctx.fail("Unknown file format '\(format)'") }
            out(CreateOptions.helpText(format: format, withFilename: !opts.operands.isEmpty))
            return 0
        }
        guard let filename = opts.operands.first else { throw ctx.usage("Expecting image file name") }
        var size: Int64 = -1
        if opts.operands.count >= 2 {
            size = try cvtnum("image size", opts.operands[1])
        }
        if opts.operands.count > 2 { throw ctx.usage("Unexpected argument: \(opts.operands[2])") }
        do throws(ToolError) {
            try await create(filename: filename, format: format, size: size, baseFile: baseFile, baseFormat: baseFormat,
                             optionList: optionList, quiet: quiet, unsafe: unsafe)
        } catch {
            var e = error
            e.message = "\(filename): \(error.message)"
            throw e
        }
        return 0
    }

    /// QEMU's bdrv_img_create. Errors carry no file name prefix.
    static func create(filename: String, format: String, size sizeArg: Int64, baseFile: String?, baseFormat: String?,
                       optionList: String?, quiet: Bool, unsafe: Bool, formattingPrefix: String = "") async throws(ToolError) {
        guard ["qcow2", "raw"].contains(format) else { throw ToolError(message: "Unknown file format '\(format)'") }
        var co = CreateOptions(format: format)
        if let list = optionList { try co.parse(list) }
        var size = sizeArg
        if co.has("size") {
            if sizeArg != -1 { throw ToolError(message: "The image size must be specified only once") }
            size = Int64(co.value("size")!)!
        } else if size != -1 {
            co.set("size", String(size))
        }
        if let b = baseFile {
            guard format == "qcow2" else { throw ToolError(message: "Backing file not supported for file format '\(format)'") }
            co.set("backing_file", b)
        }
        if let f = baseFormat {
            guard format == "qcow2" else { throw ToolError(message: "Backing file format not supported for file format '\(format)'") }
            co.set("backing_fmt", f)
        }
        let backing = co.value("backing_file")
        let backingFmt = co.value("backing_fmt")
        if let b = backing {
            if b == filename { throw ToolError(message: "Error: Trying to create an image with the same filename as the backing file") }
            if b.isEmpty { throw ToolError(message: "Expected backing file name, got empty string") }
        }
        if let b = backing, !unsafe {
            let full = ImageOpener.resolveBackingPath(b, overlay: filename)
            var o = ImageOpenOptions()
            o.format = backingFmt
            o.forceShare = true
            o.locking = false
            let node: BlockNode
            do throws(BlockError) {
                if let f = backingFmt, !["qcow2", "raw", "file"].contains(f) {
                    throw BlockError.invalid("Unknown driver '\(f)'")
                }
                node = try await ImageOpener.open(full, o)
            } catch {
                throw ToolError(message: error.message + "\nCould not open backing image.")
            }
            let detected = node.formatName
            let length = node.length
            try? await node.close()
            if backingFmt == nil {
                throw ToolError(message: "Backing file specified without backing format\nDetected format of \(detected).", noNewline: true)
            }
            if size == -1 {
                size = length
                co.set("size", String(size))
            }
        } else if backing != nil && backingFmt == nil {
            throw ToolError(message: "Backing file specified without backing format")
        }
        if size == -1 { throw ToolError(message: "Image creation needs a size parameter") }
        if !quiet { outln(formattingPrefix + co.formattingLine(filename)) }
        StdoutBuffer.shared.flush()
        if format == "raw" {
            try await createRaw(filename, size: size, co)
        } else {
            try await createQcow2(filename, size: size, co)
        }
    }

    static func createRaw(_ filename: String, size: Int64, _ co: CreateOptions) async throws(ToolError) {
        var prealloc = Preallocation.off
        if let p = co.value("preallocation") {
            guard let m = Preallocation(rawValue: p) else { throw ToolError(message: "invalid parameter value: \(p)") }
            prealloc = m
        }
        do throws(BlockError) {
            try await ImageCreator.createRaw(path: filename, size: size, preallocation: prealloc)
        } catch {
            throw ToolError(message: error.message)
        }
    }

    static func createQcow2(_ filename: String, size: Int64, _ co: CreateOptions) async throws(ToolError) {
        let o = try co.qcow2Options(size: size)
        do throws(BlockError) {
            try await ImageCreator.createQcow2(path: filename, options: o)
        } catch {
            throw ToolError(message: error.message)
        }
    }
}

/// Rounds a byte count up to whole sectors without overflowing.
func roundUpToSector(_ size: Int64) -> Int64 {
    size > Int64.max - 511 ? size : (size + 511) / 512 * 512
}
