import BlockCore
import BlockDrivers
import BlockGraph
import RawDriver

/// `resize [--object objectdef] [--image-opts] [-f fmt] [--preallocation=prealloc] [-q] [--shrink] filename [+ | -]size`
enum ResizeCommand {
    static func run(_ args: [String], _ ctx: ToolContext) async throws(ToolError) -> Int32 {
        // The size is taken off the end first, so that "-512M" is not
        // mistaken for an option (qemu-img does the same).
        guard args.count >= 2 else { throw ctx.usage("Not enough arguments") }
        var sizeText = args[args.count - 1]
        let opts = try ctx.parse(Array(args.dropLast()), short: ":f:hq", long: [
            .init(name: "help", hasArgument: false, key: "h"),
            .init(name: "object", hasArgument: true, key: "object"),
            .init(name: "image-opts", hasArgument: false, key: "image-opts"),
            .init(name: "preallocation", hasArgument: true, key: "preallocation"),
            .init(name: "shrink", hasArgument: false, key: "shrink"),
        ])
        var format: String?
        var quiet = false
        var shrink = false
        var prealloc = Preallocation.off
        for (k, v) in opts.options {
            switch k {
            case "h": outln(LaminaImg.helpText(ctx.progName)); return 0
            case "f": format = v
            case "q": quiet = true
            case "shrink": shrink = true
            case "preallocation":
                guard let m = Preallocation(rawValue: v!) else {
                    throw ctx.fail("Invalid preallocation mode '\(v!)'")
                }
                prealloc = m
            case "object", "image-opts":
                throw ctx.fail("--\(k) is not supported by Lamina")
            default: break
            }
        }
        guard opts.operands.count == 1 else { throw ctx.usage("Expecting image file name and size") }
        let filename = opts.operands[0]

        var relative: Int64 = 0
        if sizeText.hasPrefix("+") {
            relative = 1
            sizeText.removeFirst()
        } else if sizeText.hasPrefix("-") {
            relative = -1
            sizeText.removeFirst()
        }
        let n = try parseOptionSize("size", sizeText)

        try checkFormat(format, filename)
        let node = try await openImage(filename, format: format, readOnly: false)
        let current = node.length
        let total: Int64
        if relative == 0 {
            total = Int64(bitPattern: n)
        } else {
            let (p, o1) = Int64(bitPattern: n).multipliedReportingOverflow(by: relative)
            let (s, o2) = current.addingReportingOverflow(p)
            total = (o1 || o2) ? (relative < 0 ? Int64.min : Int64.max) : s
        }
        do throws(ToolError) {
            if total <= 0 { throw ctx.fail("New image size must be positive") }
            if total <= current && prealloc != .off {
                throw ctx.fail("Preallocation can only be used for growing images")
            }
            if total < current && !shrink {
                throw ToolError(message: "Use the --shrink option to perform a shrink operation.\n"
                    + "\(ctx.progName): warning: Shrinking an image will delete all data beyond the shrunken image's end. "
                    + "Before performing such an operation, make sure there is no important data there.")
            }
            if node.driver is RawDriver && prealloc == .metadata {
                throw ctx.fail("Unsupported preallocation mode: metadata")
            }
            do throws(BlockError) {
                // Driver warnings (qcow2's tail truncation) go to stderr
                // as they happen, prefixed like QEMU's warn_report.
                try await node.truncate(to: total, preallocation: prealloc)
            } catch {
                throw ctx.fail(error.message)
            }
            if !quiet { outln("Image resized.") }
        } catch {
            await closeQuietly(node)
            throw error
        }
        do {
            try await node.close()
        } catch {
            throw ctx.fail(error.message)
        }
        return 0
    }

}

/// QemuOpts' size parsing (parse_option_size), with its messages.
func parseOptionSize(_ name: String, _ text: String) throws(ToolError) -> UInt64 {
    do {
        return try parseSize(text).value
    } catch {
        switch error {
        case .overflow:
            throw ToolError(message: "Value '\(text)' is out of range for parameter '\(name)'")
        case .syntax:
            throw ToolError(message: "Parameter '\(name)' expects a non-negative number below 2^64\n"
                + "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.")
        }
    }
}
