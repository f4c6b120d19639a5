#if canImport(Glibc)
import Glibc
#endif
import BlockCore
import BlockDrivers
import BlockGraph
import BlockIO
import FileDriver

/// `convert [-c] [-p] [-q] [-n] [-f fmt] [-t cache] [-T src_cache] [-O output_fmt]
///  [-B backing_file [-F backing_fmt]] [-o options] [-S sparse_size] [-m num] [-W] [-U]
///  filename [filename2 [...]] output_filename`
enum ConvertCommand {
    static func run(_ args: [String], _ ctx: ToolContext) async throws(ToolError) -> Int32 {
        let opts = try ctx.parse(args, short: ":hf:O:B:CcF:o:l:S:pt:T:qnm:WUr:", long: [
            .init(name: "help", hasArgument: false, key: "h"), .init(name: "object", hasArgument: true, key: "object"),
            .init(name: "image-opts", hasArgument: false, key: "image-opts"), .init(name: "salvage", hasArgument: false, key: "salvage"),
            .init(name: "target-image-opts", hasArgument: false, key: "target-image-opts"),
            .init(name: "target-is-zero", hasArgument: false, key: "target-is-zero"),
            .init(name: "bitmaps", hasArgument: false, key: "bitmaps"),
            .init(name: "skip-broken-bitmaps", hasArgument: false, key: "skip-broken-bitmaps"),
            .init(name: "force-share", hasArgument: false, key: "U"),
        ])
        var fmt: String?
        var outFmt: String?
        var cache = "unsafe"
        var srcCache = "writeback"
        var baseImage: String?
        var baseFormat: String?
        var optionList: String?
        var compressed = false
        var skipCreate = false
        var progress = false
        var quiet = false
        var minSparse: Int64 = 8
        var workers = 8
        var inOrder = true
        var forceShare = false
        var targetIsZero = false
        var snapshot: SnapshotParam?
        var copyRange = false
        var bitmaps = false
        var skipBroken = false
        for (k, v) in opts.options {
            switch k {
            case "h": outln(LaminaImg.helpText(ctx.progName)); return 0
            case "f": fmt = v
            case "O": outFmt = v
            case "B": baseImage = v
            case "F": baseFormat = v
            case "C": copyRange = true
            case "c": compressed = true
            case "o":
                if !CreateOptions.wantsHelp(v!) && CreateOptions.splitList(v!) == nil {
                    throw ctx.fail("Invalid option list: \(v!)")
                }
                optionList = optionList.map { $0 + "," + v! } ?? v!
            case "l": snapshot = try SnapshotParam.parse(v!)
            case "S":
                let s = try cvtnum("buffer size for sparse output", v!)
                if s % 512 != 0 || s / 512 > 32768 {
                    throw ctx.fail("Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 16777216. Select 0 to disable sparse detection (fully allocates output).")
                }
                minSparse = s / 512
            case "p": progress = true
            case "t": cache = v!
            case "T": srcCache = v!
            case "q": quiet = true
            case "n": skipCreate = true
            case "m":
                guard let m = Int(v!), m >= 1, m <= 16 else {
                    throw ctx.fail("Invalid number of coroutines. Allowed number of coroutines is between 1 and 16")
                }
                workers = m
            case "W": inOrder = false
            case "U": forceShare = true
            case "r": _ = try cvtnum("rate limit", v!)
            case "target-is-zero": targetIsZero = true
            case "bitmaps": bitmaps = true
            case "skip-broken-bitmaps": skipBroken = true
            default: break
            }
        }
        let outFormat = outFmt ?? "raw"
        if skipBroken && !bitmaps { throw ctx.fail("Use of --skip-broken-bitmaps requires --bitmaps") }
        if skipCreate && optionList != nil { throw ctx.fail("-o has no effect when skipping image creation") }
        if targetIsZero && !skipCreate { throw ctx.fail("--target-is-zero requires use of -n flag") }
        let srcNum = opts.operands.count - 1
        let outFilename = srcNum >= 1 ? opts.operands.last! : nil
        if let list = optionList, CreateOptions.wantsHelp(list) {
            guard ["qcow2", "raw"].contains(outFormat) else { throw ctx.fail("Unknown file format '\(outFormat)'") }
            out(CreateOptions.helpText(format: outFormat, withFilename: outFilename != nil))
            return 0
        }
        guard srcNum >= 1, let outName = outFilename else { throw ctx.fail("Must specify image file name") }
        guard let srcMode = CacheMode.parse(srcCache) else { throw ctx.fail("Invalid source cache option: \(srcCache)") }
        if quiet { progress = false }
        let prog = Progress(enabled: progress)
        prog.advance(0, max: 100)
        let result = await convert(ctx: ctx, sourcesNames: Array(opts.operands.dropLast()), outName: outName, fmt: fmt,
                                   outFormat: outFormat, cache: cache, srcMode: srcMode, baseImage: baseImage,
                                   baseFormat: baseFormat, optionList: optionList, compressed: compressed,
                                   skipCreate: skipCreate, minSparse: minSparse, workers: workers, inOrder: inOrder,
                                   forceShare: forceShare, targetIsZero: targetIsZero, snapshot: snapshot, progress: prog,
                                   copyRange: copyRange, bitmaps: bitmaps ? (skipBroken ? .skipBroken : .copy) : .none)
        if result == nil { prog.advance(100, max: 0) }
        prog.end()
        if let e = result { throw e }
        return 0
    }

    /// Returns nil on success, or the error to report (an empty message when
    /// it was already printed).
    static func convert(ctx: ToolContext, sourcesNames: [String], outName: String, fmt: String?, outFormat: String,
                        cache: String, srcMode: CacheMode, baseImage: String?, baseFormat: String?, optionList: String?,
                        compressed: Bool, skipCreate: Bool, minSparse: Int64, workers: Int, inOrder: Bool,
                        forceShare: Bool, targetIsZero: Bool, snapshot: SnapshotParam?, progress: Progress,
                        copyRange: Bool = false, bitmaps: BitmapCopy = .none) async -> ToolError? {
        var sources: [BlockNode] = []
        var target: BlockNode?
        func cleanup() async {
            await closeQuietly(target)
            for s in sources { await closeQuietly(s) }
        }
        do throws(ToolError) {
            if let f = fmt, !["qcow2", "raw", "file"].contains(f) {
                throw ToolError(message: "Could not open '\(sourcesNames[0])': Unknown driver '\(f)'")
            }
            for name in sourcesNames {
                sources.append(try await openImage(name, format: fmt, readOnly: true, forceShare: forceShare, cache: srcMode))
            }
            if let snap = snapshot {
                if snap.idOrName != nil && sources.count > 1 {
                    throw ToolError(message: "No support for concatenating multiple snapshot")
                }
                try await snap.load(sources[0])
            }
            if bitmaps != .none {
                if sources.count > 1 { throw ToolError(message: "Copying bitmaps only possible with single source") }
                try await checkBitmaps(sources[0], skipBroken: bitmaps == .skipBroken)
            }
            let totalSectors = sources.reduce(Int64(0)) { $0 + ($1.length + 511) / 512 }
            var targetHasBacking = false
            if !skipCreate {
                guard ["qcow2", "raw"].contains(outFormat) else { throw ToolError(message: "Unknown file format '\(outFormat)'") }
                var co = CreateOptions(format: outFormat)
                if let list = optionList { try co.parse(list) }
                co.set("size", String(totalSectors * 512))
                if let b = baseImage {
                    guard outFormat == "qcow2" else { throw ToolError(message: "Backing file not supported for file format '\(outFormat)'") }
                    co.set("backing_file", b)
                }
                if let f = baseFormat {
                    guard outFormat == "qcow2" else { throw ToolError(message: "Backing file format not supported for file format '\(outFormat)'") }
                    co.set("backing_fmt", f)
                }
                targetHasBacking = co.value("backing_file") != nil
                if sources.count > 1 && targetHasBacking {
                    throw ToolError(message: "Having a backing file for the target makes no sense when concatenating multiple input images")
                }
                if targetHasBacking && co.value("backing_fmt") == nil {
                    throw ToolError(message: "Use of backing file requires explicit backing format")
                }
                if compressed {
                    if outFormat != "qcow2" { throw ToolError(message: "Compression not supported for this file format") }
                    if let p = co.value("preallocation"), p != "off" {
                        throw ToolError(message: "Compression and preallocation not supported at the same time")
                    }
                }
                do throws(ToolError) {
                    try await CreateCommand.create(filename: outName, format: outFormat, size: -1, baseFile: nil, baseFormat: nil,
                                                   optionList: serialize(co), quiet: true, unsafe: true)
                } catch {
                    var e = error
                    e.message = "\(outName): error while converting \(outFormat): \(error.message)"
                    throw e
                }
            } else if baseImage != nil {
                targetHasBacking = true
            }
            guard let mode = CacheMode.parse(cache) else { throw ToolError(message: "Invalid cache option: \(cache)") }
            var o = ImageOpenOptions()
            o.format = outFormat
            o.readOnly = false
            o.cacheDirect = mode.direct
            o.noFlush = mode.noFlush
            o.unmap = minSparse > 0
            do throws(BlockError) {
                target = try await ImageOpener.open(outName, o)
            } catch {
                throw ToolError(message: "Could not open '\(outName)': \(error.message)")
            }
            guard let tgt = target else { throw ToolError(message: "Could not open '\(outName)'") }
            if bitmaps != .none && !((tgt.driver as? any PersistentBitmaps)?.supportsPersistentBitmaps ?? false) {
                throw ToolError(message: "Format driver '\(tgt.formatName)' does not support bitmaps")
            }
            if compressed && !tgt.driver.supportedWriteFlags.contains(.compressed) {
                throw ToolError(message: "Compression not supported for this file format")
            }
            if skipCreate && (tgt.length + 511) / 512 < totalSectors {
                throw ToolError(message: "output file is smaller than input file")
            }
            var targetBackingSectors: Int64 = -1
            if targetHasBacking && !skipCreate, let b = tgt.backing {
                targetBackingSectors = (b.length + 511) / 512
            }
            var clusterSectors: Int64 = 0
            if let info = await tgt.driverInfo() { clusterSectors = Int64(info.clusterSize / 512) }
            let bufSectors: Int64 = compressed ? clusterSectors : 4096
            let reqAlign = Int64(max(1, tgt.driver.requestAlignment) / 512)
            let alignment = max(pow2floor(minSparse), max(reqAlign, 1))
            let hasZeroInit = targetIsZero || (!skipCreate && minSparse > 0 && !targetHasBacking)
            let cfg = ConvertEngine.Config(sources: sources, target: tgt, targetHasBacking: targetHasBacking,
                                           targetBackingSectors: targetBackingSectors, hasZeroInit: hasZeroInit,
                                           compressed: compressed, minSparse: minSparse, alignment: alignment,
                                           bufSectors: bufSectors, clusterSectors: max(clusterSectors, 1),
                                           inOrder: inOrder, workers: workers,
                                           copyOffload: copyOffloadPays(tgt, mode, srcMode, compressed))
            var engineConfig = cfg
            engineConfig.copyRange = copyRange
            let engine = await ConvertEngine(engineConfig, progress: progress)
            // Workers are requests, not threads: blocking host I/O needs no
            // more threads than cores to keep the CPUs and the disk busy.
            // O_DIRECT requests block for the device, so there every request
            // gets a thread; page-cache copies are CPU bound.
            let pool = IOThreadPool(count: mode.direct || srcMode.direct ? workers : ioThreadCount(workers: workers),
                                    name: "convert")
            let ok = await engine.run(pool: pool)
            pool.shutdown()
            if !ok {
                await cleanup()
                return ToolError(message: "", exitCode: 1)
            }
            if bitmaps != .none {
                try await copyBitmaps(from: sources[0], to: tgt, skipBroken: bitmaps == .skipBroken)
            }
            do throws(BlockError) {
                try await tgt.close()
                target = nil
            } catch {
                throw ToolError(message: "\(outName): \(error.message)")
            }
        } catch {
            await cleanup()
            return error
        }
        await cleanup()
        return nil
    }

    static func pow2floor(_ v: Int64) -> Int64 {
        if v <= 0 { return 1 }
        var p: Int64 = 1
        while p * 2 <= v { p *= 2 }
        return p
    }

    /// Re-serialises parsed options into an -o list for the create path.
    static func serialize(_ co: CreateOptions) -> String? {
        var parts: [String] = []
        for spec in CreateOptions.specs(for: co.format) where co.has(spec.name) {
            parts.append(spec.name + "=" + co.value(spec.name)!.split(separator: ",", omittingEmptySubsequences: false).joined(separator: ",,"))
        }
        return parts.isEmpty ? nil : parts.joined(separator: ",")
    }
}

/// Threads for `workers` parallel requests (LAMINA_IOTHREADS overrides).
func ioThreadCount(workers: Int) -> Int {
    if let s = getenv("LAMINA_IOTHREADS"), let n = Int(String(cString: s)), n > 0 { return min(n, workers) }
    return min(workers, max(2, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))))
}

/// Measured here (bench/convert.sh): copying inside the kernel wins big for
/// raw targets, whose 2 MiB-aligned page-cache writes are the slow case on
/// Linux with large folios; for qcow2 targets (cluster offsets, space
/// reserved ahead) plain reads and writes are as fast or faster. O_DIRECT
/// on either side rules it out.
func copyOffloadPays(_ target: BlockNode, _ mode: CacheMode, _ srcMode: CacheMode, _ compressed: Bool) -> Bool {
    !mode.direct && !srcMode.direct && !compressed && target.formatName != "qcow2"
}
