#if canImport(Glibc)
import Glibc
#endif
import BlockCore
import BlockDrivers
import BlockGraph

/// `compare [-f fmt] [-F fmt] [-T src_cache] [-p] [-q] [-s] [-U] filename1 filename2`
/// Exit codes: 0 identical, 1 different, 2 open error, 3 allocation test error, 4 read error.
enum CompareCommand {
    static let bufSize: Int64 = 2 << 20

    static func run(_ args: [String], _ ctx: ToolContext) async throws(ToolError) -> Int32 {
        let opts = try ctx.parse(args, short: ":hf:F:T:pqsU", long: [
            .init(name: "help", hasArgument: false, key: "h"), .init(name: "object", hasArgument: true, key: "object"),
            .init(name: "image-opts", hasArgument: false, key: "image-opts"), .init(name: "force-share", hasArgument: false, key: "U"),
        ])
        var fmt1: String?
        var fmt2: String?
        var progress = false
        var quiet = false
        var strict = false
        var forceShare = false
        var cache = CacheMode(direct: false, noFlush: false)
        for (k, v) in opts.options {
            switch k {
            case "h": outln(LaminaImg.helpText(ctx.progName)); return 0
            case "f": fmt1 = v
            case "F": fmt2 = v
            case "p": progress = true
            case "q": quiet = true
            case "s": strict = true
            case "U": forceShare = true
            case "T":
                guard let c = CacheMode.parse(v!) else { throw ctx.fail("Invalid source cache option: \(v!)") }
                cache = c
            default: break
            }
        }
        if quiet { progress = false }
        guard opts.operands.count == 2 else { throw ctx.usage("Expecting two image file names") }
        let (name1, name2) = (opts.operands[0], opts.operands[1])
        func say(_ s: String) { if !quiet { outln(s) } }
        let node1: BlockNode
        let node2: BlockNode
        do throws(ToolError) {
            try checkFormat(fmt1, name1)
            try checkFormat(fmt2, name2)
            node1 = try await openImage(name1, format: fmt1, readOnly: true, forceShare: forceShare, cache: cache)
        } catch {
            throw ToolError(message: error.message, exitCode: 2)
        }
        do throws(ToolError) {
            node2 = try await openImage(name2, format: fmt2, readOnly: true, forceShare: forceShare, cache: cache)
        } catch {
            await closeQuietly(node1)
            throw ToolError(message: error.message, exitCode: 2)
        }
        let p = Progress(enabled: progress, minSkip: 2.0)
        let result = await compare(node1, node2, name1, name2, strict: strict, progress: p, say: say)
        p.end()
        await closeQuietly(node1)
        await closeQuietly(node2)
        switch result {
        case .success(let code): return code
        case .failure(let e): throw e
        }
    }

    static func compare(_ n1: BlockNode, _ n2: BlockNode, _ name1: String, _ name2: String, strict: Bool,
                        progress: Progress, say: (String) -> Void) async -> Result<Int32, ToolError> {
        let size1 = n1.length
        let size2 = n2.length
        let total = min(size1, size2)
        let base = Float(max(size1, size2))
        progress.advance(0, max: 100)
        if strict && size1 != size2 {
            say("Strict mode: Image size mismatch!")
            return .success(1)
        }
        let buf1 = AlignedBuffer(count: Int(bufSize))
        let buf2 = AlignedBuffer(count: Int(bufSize))
        var offset: Int64 = 0
        while offset < total {
            let s1: ChainStatus
            let s2: ChainStatus
            do throws(BlockError) {
                s1 = try await n1.blockStatusAbove(base: nil, at: offset, length: size1 - offset)
            } catch {
                return .failure(ToolError(message: "Sector allocation test failed for \(name1)", exitCode: 3))
            }
            do throws(BlockError) {
                s2 = try await n2.blockStatusAbove(base: nil, at: offset, length: size2 - offset)
            } catch {
                return .failure(ToolError(message: "Sector allocation test failed for \(name2)", exitCode: 3))
            }
            var chunk = min(s1.status.length, s2.status.length, total - offset)
            if strict && statusWord(s1.status) != statusWord(s2.status) {
                say("Strict mode: Offset \(offset) block status mismatch!")
                return .success(1)
            }
            let a1 = s1.status.flags.contains(.allocated)
            let a2 = s2.status.flags.contains(.allocated)
            if s1.status.flags.contains(.zero) && s2.status.flags.contains(.zero) {
                // both read as zeroes
            } else if a1 == a2 {
                if a1 {
                    chunk = min(chunk, bufSize)
                    if let e = await readInto(n1, offset, chunk, buf1, name1) { return .failure(e) }
                    if let e = await readInto(n2, offset, chunk, buf2, name2) { return .failure(e) }
                    if let at = firstDifferentSector(buf1, buf2, Int(chunk)) {
                        say("Content mismatch at offset \(offset + Int64(at))!")
                        return .success(1)
                    }
                }
            } else {
                chunk = min(chunk, bufSize)
                let (n, name) = a1 ? (n1, name1) : (n2, name2)
                if let e = await readInto(n, offset, chunk, buf1, name) { return .failure(e) }
                if let at = firstNonZeroSector(buf1, Int(chunk)) {
                    say("Content mismatch at offset \(offset + Int64(at))!")
                    return .success(1)
                }
            }
            offset += chunk
            progress.advance(Float(chunk) / base * 100, max: 100)
        }
        if size1 != size2 {
            say("Warning: Image size mismatch!")
            let (over, name, overSize) = size1 > size2 ? (n1, name1, size1) : (n2, name2, size2)
            while offset < overSize {
                let st: ChainStatus
                do throws(BlockError) {
                    st = try await over.blockStatusAbove(base: nil, at: offset, length: overSize - offset)
                } catch {
                    return .failure(ToolError(message: "Sector allocation test failed for \(name)", exitCode: 3))
                }
                var chunk = st.status.length
                if st.status.flags.contains(.allocated) && !st.status.flags.contains(.zero) {
                    chunk = min(chunk, bufSize)
                    if let e = await readInto(over, offset, chunk, buf1, name) { return .failure(e) }
                    if let at = firstNonZeroSector(buf1, Int(chunk)) {
                        say("Content mismatch at offset \(offset + Int64(at))!")
                        return .success(1)
                    }
                }
                offset += chunk
                progress.advance(Float(chunk) / base * 100, max: 100)
            }
        }
        say("Images are identical.")
        return .success(0)
    }

    /// The block-status bits QEMU compares in strict mode.
    static func statusWord(_ s: BlockStatus) -> UInt8 {
        s.flags.intersection([.data, .zero, .allocated, .offsetValid, .eof]).rawValue
    }

    static func readInto(_ n: BlockNode, _ offset: Int64, _ len: Int64, _ buf: AlignedBuffer, _ name: String) async -> ToolError? {
        do throws(BlockError) {
            try await n.read(at: offset, into: buf.slice(0, Int(len)))
            return nil
        } catch {
            return ToolError(message: "Error while reading offset \(offset) of \(name): \(errnoString(error.errno))", exitCode: 4)
        }
    }

    static func firstDifferentSector(_ a: AlignedBuffer, _ b: AlignedBuffer, _ n: Int) -> Int? {
        var i = 0
        while i < n {
            let len = min(512, n - i)
            if memcmp(a.pointer + i, b.pointer + i, len) != 0 { return i }
            i += len
        }
        return nil
    }

    static func firstNonZeroSector(_ a: AlignedBuffer, _ n: Int) -> Int? {
        var i = 0
        while i < n {
            let len = min(512, n - i)
            if !isZeroMemory(a.pointer + i, len) { return i }
            i += len
        }
        return nil
    }
}
