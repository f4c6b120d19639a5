import BlockCore
import BlockDrivers
import BlockGraph
import LaminaJSON

/// `check [-q] [-f fmt] [--output=ofmt] [-r [leaks | all]] [-T src_cache] [-U] filename`
enum CheckCommand {
    static func run(_ args: [String], _ ctx: ToolContext) async throws(ToolError) -> Int32 {
        let opts = try ctx.parse(args, short: ":hf:r:T:qU", long: [
            .init(name: "help", hasArgument: false, key: "h"), .init(name: "format", hasArgument: true, key: "f"),
            .init(name: "repair", hasArgument: true, key: "r"), .init(name: "output", hasArgument: true, key: "output"),
            .init(name: "object", hasArgument: true, key: "object"), .init(name: "image-opts", hasArgument: false, key: "image-opts"),
            .init(name: "force-share", hasArgument: false, key: "U"),
        ])
        var format: String?
        var output = "human"
        var repair: ImageRepairMode = []
        var quiet = false
        var forceShare = false
        var cache = CacheMode(direct: false, noFlush: false)
        for (k, v) in opts.options {
            switch k {
            case "h": outln(LaminaImg.helpText(ctx.progName)); return 0
            case "f": format = v
            case "r":
                switch v! {
                case "leaks": repair = [.leaks]
                case "all": repair = [.leaks, .errors]
                default: throw ctx.usage("Unknown option value for -r (expecting 'leaks' or 'all'): \(v!)")
                }
            case "output": output = v!
            case "q": quiet = true
            case "U": forceShare = true
            case "T":
                guard let c = CacheMode.parse(v!) else { throw ctx.fail("Invalid source cache option: \(v!)") }
                cache = c
            default: break
            }
        }
        guard opts.operands.count == 1 else { throw ctx.usage("Expecting one image file name") }
        guard output == "human" || output == "json" else {
            throw ctx.fail("--output must be used with human or json as argument.")
        }
        let filename = opts.operands[0]
        try checkFormat(format, filename)
        let node = try await openImage(filename, format: format, readOnly: repair.isEmpty, forceShare: forceShare,
                                       cache: cache, noBacking: false, checkMode: true)
        guard let q = node.driver as? any Checkable else {
            await closeQuietly(node)
            throw ToolError(message: "This image format does not support checks", exitCode: 63)
        }
        var (res, err) = await q.check(repair: repair)
        for m in res.messages { FileHandleStderr.write(m + "\n") }
        if let e = err {
            await closeQuietly(node)
            throw ctx.fail("Check failed: \(errnoString(e.errno))")
        }
        if res.corruptionsFixed + res.leaksFixed > 0 {
            if output == "human" && !quiet {
                out("The following inconsistencies were found and repaired:\n\n    \(res.leaksFixed) leaked clusters\n    \(res.corruptionsFixed) corruptions\n\nDouble checking the fixed image now...\n")
            }
            let (again, err2) = await q.check(repair: [])
            for m in again.messages { FileHandleStderr.write(m + "\n") }
            if let e = err2 {
                await closeQuietly(node)
                throw ctx.fail("Check failed: \(errnoString(e.errno))")
            }
            let lf = res.leaksFixed
            let cf = res.corruptionsFixed
            res = again
            res.leaksFixed = lf
            res.corruptionsFixed = cf
        }
        do {
            try await node.close()
        } catch {
            throw ctx.fail(error.message)
        }
        if output == "json" {
            var m: [(String, JSON)] = [("filename", .string(filename)), ("format", .string(node.formatName)),
                                       ("check-errors", .int(Int64(res.checkErrors)))]
            if res.imageEndOffset != 0 { m.append(("image-end-offset", .int(res.imageEndOffset))) }
            if res.corruptions != 0 { m.append(("corruptions", .int(Int64(res.corruptions)))) }
            if res.leaks != 0 { m.append(("leaks", .int(Int64(res.leaks)))) }
            if res.corruptionsFixed != 0 { m.append(("corruptions-fixed", .int(Int64(res.corruptionsFixed)))) }
            if res.leaksFixed != 0 { m.append(("leaks-fixed", .int(Int64(res.leaksFixed)))) }
            if res.totalClusters != 0 { m.append(("total-clusters", .int(res.totalClusters))) }
            if res.allocatedClusters != 0 { m.append(("allocated-clusters", .int(res.allocatedClusters))) }
            if res.fragmentedClusters != 0 { m.append(("fragmented-clusters", .int(res.fragmentedClusters))) }
            if res.compressedClusters != 0 { m.append(("compressed-clusters", .int(res.compressedClusters))) }
            outln(JSON.object(m).pretty())
        } else if !quiet {
            out(humanReport(res))
        }
        if res.checkErrors > 0 { return 1 }
        if res.corruptions > 0 { return 2 }
        if res.leaks > 0 { return 3 }
        return 0
    }

    static func humanReport(_ r: ImageCheckResult) -> String {
        var s = ""
        if r.corruptions == 0 && r.leaks == 0 && r.checkErrors == 0 {
            s += "No errors were found on the image.\n"
        } else {
            if r.corruptions > 0 {
                s += "\n\(r.corruptions) errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n"
            }
            if r.leaks > 0 {
                s += "\n\(r.leaks) leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n"
            }
            if r.checkErrors > 0 {
                s += "\n\(r.checkErrors) internal errors have occurred during the check.\n"
            }
        }
        if r.totalClusters != 0 && r.allocatedClusters != 0 {
            let a = Double(r.allocatedClusters)
            s += "\(r.allocatedClusters)/\(r.totalClusters) = " + cPrintf("%0.2f", a * 100.0 / Double(r.totalClusters))
                + "% allocated, " + cPrintf("%0.2f", Double(r.fragmentedClusters) * 100.0 / a) + "% fragmented, "
                + cPrintf("%0.2f", Double(r.compressedClusters) * 100.0 / a) + "% compressed clusters\n"
        }
        if r.imageEndOffset != 0 { s += "Image end offset: \(r.imageEndOffset)\n" }
        return s
    }
}
