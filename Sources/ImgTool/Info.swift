import BlockCore
import BlockDrivers
import BlockGraph

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
        try checkFormat(format)
        let filename = opts.operands[0]
        // Open the top image; with --backing-chain, each backing image in turn.
        var infos: [ImageInfo] = []
        let top = try await openImage(filename, format: format, readOnly: true, forceShare: forceShare, noBacking: false)
        var node: BlockNode? = top
        while let n = node {
            infos.append(await ImageInfo.collect(n))
            if !chain { break }
            node = n.backing
        }
        await closeQuietly(top)
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
