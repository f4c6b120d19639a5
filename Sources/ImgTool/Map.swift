import BlockCore
import BlockDrivers
import BlockGraph
import BlockInfo

/// `map [--output=ofmt] [-f fmt] [--start-offset=offset] [--max-length=len] [-U] filename`
enum MapCommand {
    struct Entry {
        var start: Int64
        var length: Int64
        var data: Bool
        var zero: Bool
        var present: Bool
        var depth: Int
        var offset: Int64?
        var filename: String?

        func mergeable(with n: Entry) -> Bool {
            if length == 0 { return false }
            if zero != n.zero || data != n.data || depth != n.depth || present != n.present
                || (filename == nil) != (n.filename == nil) || (offset == nil) != (n.offset == nil) { return false }
            if let f = filename, f != n.filename { return false }
            if let o = offset, o + length != n.offset { return false }
            return true
        }
    }

    static func run(_ args: [String], _ ctx: ToolContext) async throws(ToolError) -> Int32 {
        let opts = try ctx.parse(args, short: ":f:hU", long: [
            .init(name: "help", hasArgument: false, key: "h"), .init(name: "format", hasArgument: true, key: "f"),
            .init(name: "output", hasArgument: true, key: "output"), .init(name: "object", hasArgument: true, key: "object"),
            .init(name: "image-opts", hasArgument: false, key: "image-opts"), .init(name: "force-share", hasArgument: false, key: "U"),
            .init(name: "start-offset", hasArgument: true, key: "s"), .init(name: "max-length", hasArgument: true, key: "l"),
        ])
        var format: String?
        var output = "human"
        var forceShare = false
        var start: Int64 = 0
        var maxLength: Int64 = -1
        for (k, v) in opts.options {
            switch k {
            case "h": outln(LaminaImg.helpText(ctx.progName)); return 0
            case "f": format = v
            case "output": output = v!
            case "U": forceShare = true
            case "s": start = try cvtnum("start offset", v!)
            case "l": maxLength = try cvtnum("max length", v!)
            default: break
            }
        }
        guard opts.operands.count == 1 else { throw ctx.usage("Expecting one image file name") }
        guard output == "human" || output == "json" else {
            throw ctx.fail("--output must be used with human or json as argument.")
        }
        let filename = opts.operands[0]
        try checkFormat(format, filename)
        let node = try await openImage(filename, format: format, readOnly: true, forceShare: forceShare)
        var length = node.length
        if maxLength != -1 { length = min(start + maxLength, length) }
        if output == "human" {
            out(pad("Offset", 16, left: true) + pad("Length", 16, left: true) + pad("Mapped to", 16, left: true) + "File\n")
        } else {
            out("[")
        }
        var curr = Entry(start: start, length: 0, data: false, zero: false, present: false, depth: 0)
        var first = true
        var failure: ToolError?
        while curr.start + curr.length < length {
            let offset = curr.start + curr.length
            let next: Entry
            do throws(BlockError) {
                next = try await status(node, offset, length - offset)
            } catch {
                failure = ctx.fail("Could not read file metadata: \(errnoString(error.errno))")
                break
            }
            if curr.mergeable(with: next) {
                curr.length += next.length
                continue
            }
            if curr.length > 0 {
                if let e = dump(curr, output, first: &first, last: false) { failure = ctx.fail(e); break }
            }
            curr = next
        }
        if failure == nil, let e = dump(curr, output, first: &first, last: true) { failure = ctx.fail(e) }
        if let f = failure {
            await closeQuietly(node)
            throw f
        }
        await closeQuietly(node)
        return 0
    }

    static func status(_ node: BlockNode, _ offset: Int64, _ bytes: Int64) async throws(BlockError) -> Entry {
        let cs = try await node.mapStatus(at: offset, length: bytes)
        let st = cs.status
        let hasOffset = st.flags.contains(.offsetValid)
        return Entry(start: offset, length: st.length, data: st.flags.contains(.data), zero: st.flags.contains(.zero),
                     present: st.flags.contains(.allocated), depth: cs.depth,
                     offset: hasOffset ? st.hostOffset : nil,
                     filename: hasOffset ? (st.hostNode?.filename ?? cs.node.filename) : nil)
    }

    /// dump_map_entry; returns an error message for the human format's
    /// refusal of compressed data.
    static func dump(_ e: Entry, _ output: String, first: inout Bool, last: Bool) -> String? {
        if output == "human" {
            if e.data && e.offset == nil {
                return "File contains external, encrypted or compressed clusters."
            }
            if e.data && !e.zero {
                out(pad(hexAlt(e.start), 16, left: true) + pad(hexAlt(e.length), 16, left: true)
                    + pad(hexAlt(e.offset ?? 0), 16, left: true) + (e.filename ?? "") + "\n")
            }
            return nil
        }
        var s = ""
        first = false
        s += "{ \"start\": \(e.start), \"length\": \(e.length), \"depth\": \(e.depth), \"present\": \(e.present), \"zero\": \(e.zero), \"data\": \(e.data)"
        if let o = e.offset { s += ", \"offset\": \(o)" }
        s += "}"
        s += last ? "]\n" : ",\n"
        out(s)
        return nil
    }

    /// printf("%#x"): "0" for zero, "0x..." otherwise.
    static func hexAlt(_ v: Int64) -> String {
        v == 0 ? "0" : "0x" + String(v, radix: 16)
    }
}
