import BlockCore
import BlockDrivers
import BlockGraph
import BlockInfo
import LaminaJSON

/// `info [-f fmt] [--output=ofmt] [--backing-chain] [-U] filename`
enum InfoCommand {
    static func run(_ args: [String], _ ctx: ToolContext) async throws(ToolError) -> Int32 {
        let opts = try ctx.parse(args, short: ":f:hU", long: [
            .init(name: "help", hasArgument: false, key: "h"), .init(name: "format", hasArgument: true, key: "f"),
            .init(name: "output", hasArgument: true, key: "output"), .init(name: "backing-chain", hasArgument: false, key: "backing-chain"),
            .init(name: "object", hasArgument: true, key: "object"), .init(name: "image-opts", hasArgument: false, key: "image-opts"),
            .init(name: "force-share", hasArgument: false, key: "U"),
        ])
        var format: String?
        var output = "human"
        var chain = false
        var forceShare = false
        for (k, v) in opts.options {
            switch k {
            case "h": outln(LaminaImg.helpText(ctx.progName)); return 0
            case "f": format = v
            case "output": output = v!
            case "backing-chain": chain = true
            case "U": forceShare = true
            default: break
            }
        }
        guard opts.operands.count == 1 else { throw ctx.usage("Expecting one image file name") }
        guard output == "human" || output == "json" else {
            throw ctx.fail("--output must be used with human or json as argument.")
        }
        let filename = opts.operands[0]
        try checkFormat(format, filename)
        // Like qemu-img, open each image on its own without its backing
        // file; with --backing-chain follow the backing names one by one.
        var infos: [ImageInfo] = []
        var seen: Set<String> = []
        var next: (String, String?)? = (filename, format)
        while let (name, fmt) = next {
            if seen.contains(name) {
                throw ctx.fail("Backing file '\(name)' creates an infinite loop.")
            }
            seen.insert(name)
            let node = try await openImage(name, format: fmt, readOnly: true, forceShare: forceShare, noBacking: true, noIO: true)
            let info = await ImageInfo.collect(node)
            await closeQuietly(node)
            infos.append(info)
            next = nil
            if chain, let full = info.fullBackingFilename {
                next = (full, info.backingFormat)
            }
        }
        if output == "json" {
            if chain {
                outln(JSON.array(infos.map(\.json)).pretty())
            } else {
                outln(infos[0].json.pretty())
            }
        } else {
            out(infos.map(\.human).joined(separator: "\n"))
        }
        return 0
    }
}
