import Foundation
import Testing

// Support for CreateConvertParityTests.swift: twin work directories (one
// per tool, same relative layout), shared input fixtures, and the checks
// applied to the images both tools produce.

/// How strictly two produced images are compared.
enum ImageLayout: Sendable {
    /// Byte-identical (`cmp`), plus info, check and map.
    case exact
    /// Same info, check output, map and content, not necessarily the same bytes.
    case sameMetadata
    /// Same info and content; both must check clean; map and file size not compared
    /// (falloc/full preallocation, out-of-order writes).
    case contentOnly
}

/// Two sibling directories `q/` (qemu-img) and `l/` (lamina-img), each a
/// copy of the same fixture; each tool runs with its own one as cwd, so
/// messages with relative file names are identical.
final class TwinDirs {
    let tmp = TempDir()
    let q: String
    let l: String

    /// With `hardLinks`, the fixture's files are hard-linked (they must then
    /// only be read), except `copies`, which are real copies.
    init(copying fixture: String?, hardLinks: Bool = false, copies: [String] = []) throws {
        q = tmp.path + "/q"
        l = tmp.path + "/l"
        for d in [q, l] {
            try FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true)
            guard let f = fixture else { continue }
            let r = try run(["cp", hardLinks ? "-al" : "-a", "--sparse=always", f + "/.", d + "/"])
            if r.status != 0 { Issue.record("copying fixture: \(r)") }
            if !hardLinks { continue }
            for name in copies where FileManager.default.fileExists(atPath: f + "/" + name) {
                try FileManager.default.removeItem(atPath: d + "/" + name)
                let c = try run(["cp", "-a", "--sparse=always", f + "/" + name, d + "/" + name])
                if c.status != 0 { Issue.record("copying \(name): \(c)") }
            }
        }
    }

    /// `@DIR@` in arguments stands for the tool's own directory.
    private func substitute(_ args: [String], _ dir: String) -> [String] {
        args.map { $0.replacingOccurrences(of: "@DIR@", with: dir) }
    }

    /// Replaces the absolute twin directory paths by `@DIR@`.
    func normalize(_ r: ProcessResult) -> ProcessResult {
        var r = r
        for d in [q, l] {
            r.stdout = r.stdout.replacingOccurrences(of: d, with: "@DIR@")
            r.stderr = r.stderr.replacingOccurrences(of: d, with: "@DIR@")
        }
        return r
    }

    /// Runs the command line through qemu-img in `q/` and lamina-img in `l/`.
    func runTools(_ args: [String]) throws -> (qemu: ProcessResult, lamina: ProcessResult) {
        let qr = try run(["qemu-img"] + substitute(args, q), cwd: q)
        var lr = try run([laminaImg] + substitute(args, l), cwd: l)
        lr.stdout = lr.stdout.replacingOccurrences(of: "lamina-img", with: "qemu-img")
        lr.stderr = lr.stderr.replacingOccurrences(of: "lamina-img", with: "qemu-img")
        return (normalize(qr), normalize(lr))
    }

    /// Runs the real qemu-img (the judge) on the same relative arguments in both directories.
    func judge(_ args: [String]) throws -> (qemu: ProcessResult, lamina: ProcessResult) {
        (normalize(try run(["qemu-img"] + args, cwd: q)), normalize(try run(["qemu-img"] + args, cwd: l)))
    }
}

/// Regular files (path -> size) and directories (`path/` -> 0) below `dir`.
func treeListing(_ dir: String) -> [String: UInt64] {
    var out: [String: UInt64] = [:]
    let fm = FileManager.default
    guard let e = fm.enumerator(atPath: dir) else { return out }
    while let rel = e.nextObject() as? String {
        let attrs = try? fm.attributesOfItem(atPath: dir + "/" + rel)
        if attrs?[.type] as? FileAttributeType == .typeDirectory {
            out[rel + "/"] = 0
        } else {
            out[rel] = (attrs?[.size] as? NSNumber)?.uint64Value ?? 0
        }
    }
    return out
}

func isQcow2File(_ path: String) -> Bool {
    guard let h = FileHandle(forReadingAtPath: path) else { return false }
    defer { try? h.close() }
    let magic = (try? h.read(upToCount: 4)) ?? Data()
    return [UInt8](magic) == [0x51, 0x46, 0x49, 0xfb]
}

/// Expects equal status, stdout and stderr; the failure message shows the
/// first differing line of each stream that differs.
func expectSameResult(_ qemu: ProcessResult, _ lamina: ProcessResult, _ label: String,
                      sourceLocation: SourceLocation = #_sourceLocation) {
    if qemu == lamina { return }
    var msg = "\(label)\n"
    if qemu.status != lamina.status { msg += "status: qemu \(qemu.status) lamina \(lamina.status)\n" }
    msg += firstLineDifference("stdout", qemu.stdout, lamina.stdout)
    msg += firstLineDifference("stderr", qemu.stderr, lamina.stderr)
    msg += "--- qemu-img ---\n\(qemu)\n--- lamina-img ---\n\(lamina)"
    Issue.record(Comment(rawValue: msg), sourceLocation: sourceLocation)
}

func firstLineDifference(_ stream: String, _ q: String, _ l: String) -> String {
    if q == l { return "" }
    let ql = q.split(separator: "\n", omittingEmptySubsequences: false)
    let ll = l.split(separator: "\n", omittingEmptySubsequences: false)
    var i = 0
    while i < ql.count && i < ll.count && ql[i] == ll[i] { i += 1 }
    let qLine = i < ql.count ? "'\(ql[i])'" : "<end>"
    let lLine = i < ll.count ? "'\(ll[i])'" : "<end>"
    return "\(stream) line \(i + 1): qemu \(qLine)\n\(stream) line \(i + 1): lamina \(lLine)\n"
}

private func withoutDiskSize(_ r: ProcessResult) -> ProcessResult {
    var r = r
    r.stdout = r.stdout.split(separator: "\n", omittingEmptySubsequences: false)
        .filter { !$0.hasPrefix("disk size:") }.joined(separator: "\n")
    return r
}

/// Compares the file `name` as produced in `q/` (by qemu-img) and `l/` (by
/// lamina-img): info (without disk size), content (`qemu-img compare`),
/// check, and depending on the layout map and bytes.
func expectSameImage(_ twin: TwinDirs, _ name: String, layout: ImageLayout, label: String,
                     sourceLocation: SourceLocation = #_sourceLocation) throws {
    let tag = "\(label) [\(name)]"
    let qcow2 = isQcow2File(twin.q + "/" + name)

    let info = try twin.judge(["info", name])
    expectSameResult(withoutDiskSize(info.qemu), withoutDiskSize(info.lamina), "qemu-img info of \(tag)",
                     sourceLocation: sourceLocation)

    let cmpContent = try run(["qemu-img", "compare", "q/" + name, "l/" + name], cwd: twin.tmp.path)
    if cmpContent.status != 0 || cmpContent.stdout != "Images are identical.\n" {
        // Only a finding if qemu-img can compare its own result with itself
        // (not so with a missing backing file, for instance).
        let own = try run(["qemu-img", "compare", "q/" + name, "q/" + name], cwd: twin.tmp.path)
        if own.status == 0 {
            Issue.record("content differs, qemu-img compare q/\(name) l/\(name) for \(tag):\n\(cmpContent)",
                         sourceLocation: sourceLocation)
        }
    }

    let check = try twin.judge(["check", name])
    if qcow2 && check.qemu.status == 0 {
        #expect(check.lamina.status == 0 && check.lamina.stdout.hasPrefix("No errors were found"),
                "qemu-img check of lamina's \(tag) not clean:\n\(check.lamina)", sourceLocation: sourceLocation)
    }
    if layout == .contentOnly {
        #expect(check.qemu.status == check.lamina.status,
                "qemu-img check status of \(tag): qemu \(check.qemu) lamina \(check.lamina)",
                sourceLocation: sourceLocation)
        return
    }
    expectSameResult(check.qemu, check.lamina, "qemu-img check of \(tag)", sourceLocation: sourceLocation)

    let map = try twin.judge(["map", "--output=json", name])
    expectSameResult(map.qemu, map.lamina, "qemu-img map --output=json of \(tag)", sourceLocation: sourceLocation)

    if layout == .exact {
        let c = try run(["cmp", "q/" + name, "l/" + name], cwd: twin.tmp.path)
        #expect(c.status == 0, "not byte-identical, \(tag): \(c.stdout)\(c.stderr)", sourceLocation: sourceLocation)
    }
}

/// After one run in both twin directories: the same files must exist (with
/// the same sizes, except `sizeFree` ones), and every file that is new or
/// changed size, plus `extra`, is compared with `expectSameImage` when both
/// copies are non-empty.
func expectSameProducts(_ twin: TwinDirs, fixture: [String: UInt64], extra: [String] = [],
                        layout: ImageLayout, label: String,
                        sourceLocation: SourceLocation = #_sourceLocation) throws {
    let lq = treeListing(twin.q)
    let ll = treeListing(twin.l)
    if Set(lq.keys) != Set(ll.keys) {
        let onlyQ = Set(lq.keys).subtracting(ll.keys).sorted()
        let onlyL = Set(ll.keys).subtracting(lq.keys).sorted()
        Issue.record("\(label): files only after qemu-img: \(onlyQ), only after lamina-img: \(onlyL)",
                     sourceLocation: sourceLocation)
    }
    var produced = Set<String>()
    for (k, v) in lq where fixture[k] != v { produced.insert(k) }
    for (k, v) in ll where fixture[k] != v { produced.insert(k) }
    for e in extra where lq[e] != nil { produced.insert(e) }
    for name in produced.sorted() where !name.hasSuffix("/") {
        guard let qs = lq[name], let ls = ll[name] else { continue }
        if layout != .contentOnly {
            #expect(qs == ls, "\(label): size of \(name): qemu \(qs) lamina \(ls)", sourceLocation: sourceLocation)
        }
        if qs > 0 && ls > 0 {
            try expectSameImage(twin, name, layout: layout, label: label, sourceLocation: sourceLocation)
        }
    }
}

/// A directory of input files built once (with qemu-img and qemu-io) and
/// copied into every twin directory.
final class InputFixture: Sendable {
    let dir: TempDir
    let problems: [String]
    let files: [String: UInt64]

    var path: String { dir.path }

    init(_ build: (CorpusBuilder) -> Void) {
        let dir = TempDir()
        let b = CorpusBuilder(dir: dir.path)
        build(b)
        self.dir = dir
        problems = b.problems
        files = treeListing(dir.path)
    }
}

extension CorpusBuilder {
    func mkdir(_ name: String) {
        do {
            try FileManager.default.createDirectory(atPath: f(name), withIntermediateDirectories: true)
        } catch { problems.append("mkdir \(name): \(error)") }
    }
}

/// Deterministic pseudo-random numbers (xorshift64*).
struct SeededRandom: RandomNumberGenerator {
    private var state: UInt64
    init(seed: UInt64) { state = seed &* 0x9E37_79B9_7F4A_7C15 | 1 }
    mutating func next() -> UInt64 {
        state ^= state >> 12
        state ^= state << 25
        state ^= state >> 27
        return state &* 0x2545_F491_4F6C_DD1D
    }
}
