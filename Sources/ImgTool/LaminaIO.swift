#if canImport(Glibc)
import Glibc
#endif
import BlockCore
import BlockDrivers
import BlockGraph
import BlockIO

/// `lamina-io`: a qemu-io work-alike for scripting I/O against an image
/// (tests, crash-safety runs): -c "write [-P pat] [-z [-u]] [-c] [-f] off len",
/// "read [-P pat] off len", "discard off len", "flush", "abort".
public enum LaminaIO {
    public static func main(_ argv: [String]) async -> Int32 {
        let thread = IOThread(name: "lamina-io")
        defer { thread.shutdown() }
        return await withTaskExecutorPreference(thread) {
            await run(argv)
        }
    }

    static func run(_ argv: [String]) async -> Int32 {
        let prog = argv.first.map { String($0.split(separator: "/").last ?? "lamina-io") } ?? "lamina-io"
        ProgName.current = prog
        let ctx = ToolContext(progName: prog)
        do throws(ToolError) {
            return try await runCommands(Array(argv.dropFirst()), ctx)
        } catch {
            StdoutBuffer.shared.flush()
            return ctx.report(error)
        }
    }

    static func runCommands(_ args: [String], _ ctx: ToolContext) async throws(ToolError) -> Int32 {
        let opts = try ctx.parse(args, short: "f:c:rnUt:", long: [
            .init(name: "format", hasArgument: true, key: "f"), .init(name: "cmd", hasArgument: true, key: "c"),
            .init(name: "read-only", hasArgument: false, key: "r"), .init(name: "nocache", hasArgument: false, key: "n"),
            .init(name: "force-share", hasArgument: false, key: "U"), .init(name: "cache", hasArgument: true, key: "t"),
        ])
        var format: String?
        var cmds: [String] = []
        var readOnly = false
        var forceShare = false
        var cache = CacheMode(direct: false, noFlush: false)
        for (k, v) in opts.options {
            switch k {
            case "f": format = v
            case "c": cmds.append(v!)
            case "r": readOnly = true
            case "n": cache.direct = true
            case "U": forceShare = true
            case "t":
                guard let c = CacheMode.parse(v!) else { throw ctx.fail("Invalid cache option: \(v!)") }
                cache = c
            default: break
            }
        }
        guard opts.operands.count == 1 else { throw ctx.usage("Expecting one image file name") }
        try checkFormat(format)
        var o = ImageOpenOptions()
        o.format = format
        o.readOnly = readOnly
        o.forceShare = forceShare
        o.cacheDirect = cache.direct
        o.noFlush = cache.noFlush
        o.unmap = true
        let file = opts.operands[0]
        let node: BlockNode
        do throws(BlockError) {
            node = try await ImageOpener.open(file, o)
        } catch {
            throw ctx.fail("can't open device \(file): \(error.message)")
        }
        var status: Int32 = 0
        for c in cmds {
            do throws(ToolError) {
                try await execute(c, node, ctx)
            } catch {
                outln(error.message)
                status = 1
            }
            // One line per command as it completes (scripts watch progress).
            StdoutBuffer.shared.flush()
        }
        StdoutBuffer.shared.flush()
        do throws(BlockError) {
            try await node.close()
        } catch {
            throw ctx.fail(error.message)
        }
        return status
    }

    static func number(_ s: String) throws(ToolError) -> Int64 {
        guard let r = try? parseSize(s) else { throw ToolError(message: "non-numeric length argument -- \(s)") }
        return Int64(r.value)
    }

    static func execute(_ line: String, _ node: BlockNode, _ ctx: ToolContext) async throws(ToolError) {
        let words = line.split(separator: " ").map(String.init)
        guard let cmd = words.first else { return }
        let opts = try ctx.parse(Array(words.dropFirst()), short: "P:zucfq")
        var pattern: UInt8?
        var zero = false
        var unmap = false
        var compressed = false
        var fua = false
        for (k, v) in opts.options {
            switch k {
            case "P":
                guard let p = Int(v!.hasPrefix("0x") ? String(v!.dropFirst(2)) : v!, radix: v!.hasPrefix("0x") ? 16 : 10) else {
                    throw ToolError(message: "non-numeric pattern -- \(v!)")
                }
                pattern = UInt8(truncatingIfNeeded: p)
            case "z": zero = true
            case "u": unmap = true
            case "c": compressed = true
            case "f": fua = true
            default: break
            }
        }
        switch cmd {
        case "flush":
            do throws(BlockError) { try await node.flush() } catch { throw ToolError(message: "flush failed: \(error.message)") }
            outln("flushed")
            return
        case "abort":
            // qemu-io's abort: die without closing (crash tests).
            StdoutBuffer.shared.flush()
            Glibc.abort()
        case "read", "write", "discard":
            break
        default:
            throw ToolError(message: "command \"\(cmd)\" not found")
        }
        guard opts.operands.count == 2 else { throw ToolError(message: "\(cmd): wrong number of arguments") }
        let off = try number(opts.operands[0])
        let len = try number(opts.operands[1])
        do throws(BlockError) {
            switch cmd {
            case "read":
                let buf = AlignedBuffer(count: Int(len))
                try await node.read(at: off, into: buf.bytes)
                if let p = pattern, let bad = buf.bytes.firstIndex(where: { $0 != p }) {
                    throw BlockError.io("Pattern verification failed at offset \(off + Int64(bad)), \(len) bytes")
                }
                outln("read \(len)/\(len) bytes at offset \(off)")
            case "write":
                if zero {
                    try await node.writeZeroes(at: off, length: len, flags: unmap ? [.mayUnmap] : [])
                } else {
                    let buf = AlignedBuffer(count: Int(len))
                    memset(buf.pointer, Int32(pattern ?? 0xcd), Int(len))
                    var flags: WriteFlags = fua ? [.fua] : []
                    if compressed && node.driver.supportedWriteFlags.contains(.compressed) { flags.insert(.compressed) }
                    try await node.write(at: off, from: UnsafeRawBufferPointer(buf.bytes), flags: flags)
                }
                outln("wrote \(len)/\(len) bytes at offset \(off)")
            default:
                try await node.discard(at: off, length: len)
                outln("discard \(len)/\(len) bytes at offset \(off)")
            }
        } catch {
            if error.message.hasPrefix("Pattern verification") { throw ToolError(message: error.message) }
            throw ToolError(message: "\(cmd) failed: \(error.message)")
        }
    }
}
