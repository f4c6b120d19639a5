import BlockCore
import BlockDrivers
import BlockGraph

/// `bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)...
///  [-b source_file [-F source_fmt]] [-g granularity] [--object objectdef]
///  [--image-opts | -f fmt] filename bitmap`: the actions run in order, as
/// QMP's block-dirty-bitmap-* commands on the image's node; the bitmaps are
/// written back when the image is closed (also after a failed action, as
/// qemu-img 7.2 does).
enum BitmapCommand {
    enum Action {
        case add, remove, clear, enable, disable, merge(String)
        var name: String {
            switch self {
            case .add: "add"
            case .remove: "remove"
            case .clear: "clear"
            case .enable: "enable"
            case .disable: "disable"
            case .merge: "merge"
            }
        }
    }

    static func run(_ args: [String], _ ctx: ToolContext) async throws(ToolError) -> Int32 {
        let opts = try ctx.parse(args, short: ":b:f:F:g:h", long: [
            .init(name: "help", hasArgument: false, key: "h"), .init(name: "object", hasArgument: true, key: "object"),
            .init(name: "image-opts", hasArgument: false, key: "image-opts"),
            .init(name: "add", hasArgument: false, key: "add"), .init(name: "remove", hasArgument: false, key: "remove"),
            .init(name: "clear", hasArgument: false, key: "clear"), .init(name: "enable", hasArgument: false, key: "enable"),
            .init(name: "disable", hasArgument: false, key: "disable"), .init(name: "merge", hasArgument: true, key: "merge"),
            .init(name: "granularity", hasArgument: true, key: "g"), .init(name: "source-file", hasArgument: true, key: "b"),
            .init(name: "source-format", hasArgument: true, key: "F"),
        ])
        var fmt: String?
        var srcFmt: String?
        var srcFile: String?
        var granularity: Int64 = 0
        var actions: [Action] = []
        for (k, v) in opts.options {
            switch k {
            case "h": outln(LaminaImg.helpText(ctx.progName)); return 0
            case "b": srcFile = v
            case "f": fmt = v
            case "F": srcFmt = v
            case "g": granularity = try cvtnum("granularity", v!)
            case "add": actions.append(.add)
            case "remove": actions.append(.remove)
            case "clear": actions.append(.clear)
            case "enable": actions.append(.enable)
            case "disable": actions.append(.disable)
            case "merge": actions.append(.merge(v!))
            default: break
            }
        }
        if actions.isEmpty {
            throw ctx.fail("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge")
        }
        let adds = actions.contains { if case .add = $0 { true } else { false } }
        let merges = actions.contains { if case .merge = $0 { true } else { false } }
        if granularity != 0 && !adds { throw ctx.fail("granularity only supported with --add") }
        if srcFmt != nil && srcFile == nil { throw ctx.fail("-F only supported with -b") }
        if srcFile != nil && !merges { throw ctx.fail("Merge bitmap source file only supported with --merge") }
        guard opts.operands.count == 2 else { throw ctx.fail("Expecting filename and bitmap name") }
        let filename = opts.operands[0]
        let bitmap = opts.operands[1]
        try checkFormat(fmt, filename)
        let node = try await openImage(filename, format: fmt, readOnly: false, noBacking: true)
        var source = node
        if let s = srcFile {
            do throws(ToolError) {
                try checkFormat(srcFmt, s)
                source = try await openImage(s, format: srcFmt, readOnly: true, noBacking: true)
            } catch {
                await closeQuietly(node)
                throw error
            }
        }
        // QEMU names the node "#block<counter><two random digits>".
        let nodeName = "#block1" + String(format2: Int.random(in: 0..<100))
        var failure: ToolError?
        for act in actions {
            do throws(BlockError) {
                try await perform(act, bitmap: bitmap, node: node, source: source, granularity: granularity, nodeName: nodeName)
            } catch {
                failure = ToolError(message: "Operation \(act.name) on bitmap \(bitmap) failed: \(error.message)")
                break
            }
        }
        if source !== node { await closeQuietly(source) }
        do throws(BlockError) {
            try await node.close()
        } catch {
            if failure == nil { failure = ToolError(message: error.message) }
        }
        if let f = failure { throw f }
        return 0
    }

    static func inconsistent(_ name: String) -> BlockError {
        BlockError.invalid("Bitmap '\(name)' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk")
    }

    static func notFound(_ name: String) -> BlockError {
        BlockError(.notFound, errno: 2, "Dirty bitmap '\(name)' not found")
    }

    /// Looks a bitmap up by name on a node (QEMU's block_dirty_bitmap_lookup).
    static func lookup(_ node: BlockNode, _ name: String) async throws(BlockError) -> (any PersistentBitmaps, PersistentBitmapInfo) {
        guard let q = node.driver as? any PersistentBitmaps,
              let b = await q.persistentBitmaps().first(where: { $0.name == name }) else { throw notFound(name) }
        return (q, b)
    }

    static func perform(_ act: Action, bitmap: String, node: BlockNode, source: BlockNode, granularity: Int64,
                        nodeName: String) async throws(BlockError) {
        switch act {
        case .add:
            if bitmap.isEmpty { throw BlockError.invalid("Bitmap name cannot be empty") }
            var g: Int64
            if granularity != 0 {
                // QMP's granularity is a uint32.
                g = Int64(UInt32(truncatingIfNeeded: granularity))
                if g < 512 || g & (g - 1) != 0 { throw BlockError.invalid("Granularity must be power of 2 and at least 512") }
            } else {
                g = (node.driver as? any PersistentBitmaps)?.defaultBitmapGranularity ?? 65536
            }
            guard let q = node.driver as? any PersistentBitmaps else {
                throw BlockError(.notSupported, errno: 95, "Can't store persistent bitmaps to \(nodeName): Operation not supported")
            }
            do throws(BlockError) {
                try await q.canStoreNewBitmap(name: bitmap, granularity: g)
            } catch {
                throw error.prefixed("Can't make bitmap '\(bitmap)' persistent in '\(nodeName)': ")
            }
            if await q.persistentBitmaps().contains(where: { $0.name == bitmap }) {
                throw BlockError.invalid("Bitmap already exists: \(bitmap)")
            }
            await q.addBitmap(name: bitmap, granularity: g, enabled: true)
        case .remove:
            let (q, _) = try await lookup(node, bitmap)
            try await q.removeBitmap(name: bitmap)
        case .clear:
            let (q, b) = try await lookup(node, bitmap)
            if b.inconsistent { throw inconsistent(bitmap) }
            await q.clearBitmap(name: bitmap)
        case .enable, .disable:
            let (q, b) = try await lookup(node, bitmap)
            if b.inconsistent { throw inconsistent(bitmap) }
            if case .enable = act { await q.setBitmapEnabled(name: bitmap, true) } else { await q.setBitmapEnabled(name: bitmap, false) }
        case .merge(let srcName):
            let (q, dst) = try await lookup(node, bitmap)
            let (sq, src) = try await lookup(source, srcName)
            if src.inconsistent { throw inconsistent(srcName) }
            if source.length != node.length {
                throw BlockError.invalid("Bitmaps are of different sizes (destination size is \(node.length), source size is \(source.length)) and can't be merged")
            }
            if dst.inconsistent { throw inconsistent(bitmap) }
            guard let bits = await sq.bitmapBits(name: srcName) else { throw inconsistent(srcName) }
            // A copy first: source and destination may be the same bitmap.
            let copy = DirtyBitmap(size: bits.size, granularity: bits.granularity)
            copy.setWords(bits.snapshotWords())
            await q.mergeIntoBitmap(name: bitmap, from: copy)
        }
    }
}

extension String {
    /// Two decimal digits ("%02d").
    init(format2 v: Int) {
        self = v < 10 ? "0\(v)" : "\(v)"
    }
}
