import Foundation
import Testing

/// `lamina-img snapshot` against qemu-img 7.2's: twin images run through
/// the same sequences of create / write / apply / delete, one side by
/// qemu-img, the other by lamina-img (or mixed, for interop); after every
/// step both images check clean (no leaks), read the same, list the same
/// snapshots and every snapshot reads as the active image did when it was
/// taken.
@Suite("img snapshot")
struct ImgSnapshotTests {
    // MARK: - Fixtures

    struct Layout: Sendable, CustomTestStringConvertible {
        var name: String
        var clusterSize: Int
        var extendedL2 = false
        var backing = false
        var refcountBits = 16
        var compat = "1.1"
        var testDescription: String { name }
        var size: Int { max(16 << 20, clusterSize * 8) }
    }

    static let layouts: [Layout] = [
        Layout(name: "64k", clusterSize: 65536),
        Layout(name: "512", clusterSize: 512),
        Layout(name: "2M", clusterSize: 2 << 20),
        Layout(name: "64k extended_l2", clusterSize: 65536, extendedL2: true),
        Layout(name: "64k backing", clusterSize: 65536, backing: true),
        Layout(name: "4k refcount_bits=4", clusterSize: 4096, refcountBits: 4),
        Layout(name: "64k compat=0.10", clusterSize: 65536, compat: "0.10"),
    ]

    static func qemuIO(_ cmds: [String], _ img: String, cwd: String) throws {
        var args = ["qemu-io"]
        for c in cmds { args += ["-c", c] }
        let r = try run(args + [img], cwd: cwd)
        #expect(r.status == 0 && !r.stdout.contains("error") && r.stderr.isEmpty, "qemu-io \(cmds): \(r)")
    }

    /// img.qcow2 (and base.qcow2) in `dir`, with data, zero writes,
    /// compressed clusters and discards.
    static func makeFixture(_ lay: Layout, in dir: String) throws {
        let cs = lay.clusterSize
        var opts = "cluster_size=\(cs),refcount_bits=\(lay.refcountBits),compat=\(lay.compat)"
        if lay.extendedL2 { opts += ",extended_l2=on" }
        if lay.backing {
            #expect(try run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, "base.qcow2", "\(lay.size)"], cwd: dir).status == 0)
            try qemuIO(["write -P 0x0b 0 \(lay.size)"], "base.qcow2", cwd: dir)
            #expect(try run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, "-b", "base.qcow2", "-F", "qcow2",
                             "img.qcow2"], cwd: dir).status == 0)
        } else {
            #expect(try run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, "img.qcow2", "\(lay.size)"], cwd: dir).status == 0)
        }
        try qemuIO(["write -P 0x11 0 64k", "write -z 1M 128k", "write -c -P 0x22 2M \(cs)", "write -c -P 0x23 \(2 * (1 << 20) + 4 * cs) \(cs)",
                    "write -P 0x33 5M 4k", "write -P 0x34 \(lay.size - 8192) 8k", "discard 5M \(cs)"], "img.qcow2", cwd: dir)
    }

    // MARK: - Twin runner

    enum Tool { case lamina, qemu }

    /// One step: an img command run on both sides (qemu-img on q/, `lTool`
    /// on l/), or guest writes (qemu-io or lamina-io on both sides).
    enum Step {
        case img([String], lTool: Tool = .lamina)
        case io([String], writer: Tool = .qemu)
        case judge([String])
    }

    final class Twin {
        let dirs: TwinDirs
        /// Expected content (raw) of each snapshot, by name, per side.
        var expected: [String: (q: String, l: String)] = [:]
        var counter = 0
        init(fixture: String) throws { dirs = try TwinDirs(copying: fixture) }
        var q: String { dirs.q }
        var l: String { dirs.l }
    }

    static func normalizeDates(_ s: String) -> String {
        s.replacingOccurrences(of: #"[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}"#, with: "<DATE>",
                               options: .regularExpression)
    }

    static func toolRun(_ tool: Tool, _ args: [String], cwd: String) throws -> ProcessResult {
        var r = try run([tool == .qemu ? "qemu-img" : laminaImg] + args, cwd: cwd)
        r.stdout = normalizeDates(r.stdout.replacingOccurrences(of: "lamina-img", with: "qemu-img"))
        r.stderr = r.stderr.replacingOccurrences(of: "lamina-img", with: "qemu-img")
        return r
    }

    static func perform(_ t: Twin, _ step: Step, label: String) throws {
        switch step {
        case .img(let args, let lTool):
            let qr = try toolRun(.qemu, args, cwd: t.q)
            let lr = try toolRun(lTool, args, cwd: t.l)
            expectSameResult(qr, lr, "\(label): \(args.joined(separator: " "))")
            if args.count >= 3, args[0] == "snapshot", args[1] == "-c", qr.status == 0 {
                // What the snapshot must read as from now on.
                t.counter += 1
                let qf = t.q + "/expect-\(t.counter).raw"
                let lf = t.l + "/expect-\(t.counter).raw"
                #expect(try run(["qemu-img", "convert", "-O", "raw", "img.qcow2", qf], cwd: t.q).status == 0)
                #expect(try run(["qemu-img", "convert", "-O", "raw", "img.qcow2", lf], cwd: t.l).status == 0)
                t.expected[args[2]] = (qf, lf)
            }
        case .io(let cmds, let writer):
            for dir in [t.q, t.l] {
                if writer == .qemu {
                    try qemuIO(cmds, "img.qcow2", cwd: dir)
                } else {
                    var a = [laminaIO]
                    for c in cmds { a += ["-c", c] }
                    let r = try run(a + ["img.qcow2"], cwd: dir)
                    #expect(r.status == 0 && !r.stdout.contains("error"), "lamina-io \(cmds): \(r)")
                }
            }
        case .judge(let args):
            let (a, b) = try t.dirs.judge(args)
            #expect(a.status == 0 && b.status == 0, "\(label): \(args): \(a) \(b)")
        }
    }

    /// Parses `snapshot -l` output: (id, name) per line.
    static func listed(_ out: String) -> [(String, String)] {
        out.split(separator: "\n").dropFirst(2).map { line in
            let f = line.split(separator: " ", omittingEmptySubsequences: true)
            return (String(f[0]), String(f.count > 1 ? f[1] : ""))
        }
    }

    /// Both images clean, same content, same snapshot list; every
    /// snapshot reads as recorded when it was taken, on both sides.
    static func verify(_ t: Twin, label: String) throws {
        for dir in [t.q, t.l] {
            let c = try run(["qemu-img", "check", "img.qcow2"], cwd: dir)
            #expect(c.status == 0 && c.stdout.contains("No errors were found") && !c.stdout.contains("leaked")
                    && c.stderr.isEmpty, "\(label): check \(dir == t.q ? "qemu side" : "lamina side"): \(c)")
        }
        let cmp = try run(["qemu-img", "compare", "q/img.qcow2", "l/img.qcow2"], cwd: t.dirs.tmp.path)
        #expect(cmp.status == 0, "\(label): active images differ: \(cmp)")
        let ql = try toolRun(.qemu, ["snapshot", "-l", "img.qcow2"], cwd: t.q)
        let ll = try toolRun(.qemu, ["snapshot", "-l", "img.qcow2"], cwd: t.l)
        expectSameResult(ql, ll, "\(label): snapshot -l (by qemu-img)")
        let qi = try run(["qemu-img", "info", "img.qcow2"], cwd: t.q)
        let li = try run(["qemu-img", "info", "img.qcow2"], cwd: t.l)
        #expect(qi.stdout.split(separator: "\n").filter { $0.hasPrefix("virtual size") }
                == li.stdout.split(separator: "\n").filter { $0.hasPrefix("virtual size") }, "\(label): sizes")
        for (id, name) in listed(ql.stdout) {
            for (side, dir) in [("qemu", t.q), ("lamina", t.l)] {
                let out = dir + "/sn-\(id).raw"
                let r = try run(["qemu-img", "convert", "-l", "snapshot.id=\(id)", "-O", "raw", "img.qcow2", out], cwd: dir)
                #expect(r.status == 0, "\(label): convert snapshot \(id) on \(side) side: \(r)")
                if let e = t.expected[name] {
                    let ref = side == "qemu" ? e.q : e.l
                    // convert -l reads a snapshot at the current virtual size.
                    func size(_ f: String) throws -> Int {
                        (try FileManager.default.attributesOfItem(atPath: f)[.size] as? NSNumber)?.intValue ?? 0
                    }
                    let n = min(try size(ref), try size(out))
                    let c = try run(["cmp", "-n", "\(n)", ref, out])
                    #expect(c.status == 0, "\(label): snapshot \(name) (\(id)) on the \(side) side does not read as when taken: \(c)")
                }
            }
            let c = try run(["cmp", t.q + "/sn-\(id).raw", t.l + "/sn-\(id).raw"])
            #expect(c.status == 0, "\(label): snapshot \(id) differs between the twins")
            // lamina-img reads it the same (convert -l).
            let lo = t.l + "/lsn-\(id).raw"
            let lr = try run([laminaImg, "convert", "-l", "snapshot.id=\(id)", "-O", "raw", "img.qcow2", lo], cwd: t.l)
            #expect(lr.status == 0, "\(label): lamina-img convert -l snapshot.id=\(id): \(lr)")
            let lc = try run(["cmp", t.l + "/sn-\(id).raw", lo])
            #expect(lc.status == 0, "\(label): lamina-img reads snapshot \(id) differently")
        }
    }

    static func runSequence(_ lay: Layout, _ steps: [Step], label: String) throws {
        let fixture = TempDir()
        try makeFixture(lay, in: fixture.path)
        try runSequence(fixture: fixture.path, steps, label: label)
    }

    static func runSequence(fixture: String, _ steps: [Step], label: String) throws {
        let t = try Twin(fixture: fixture)
        try verify(t, label: "\(label) fixture")
        for (i, s) in steps.enumerated() {
            let l = "\(label) step \(i + 1)"
            try perform(t, s, label: l)
            try verify(t, label: l)
        }
    }

    static func mainSequence(writer: Tool, cs: Int) -> [Step] {
        [
            .img(["snapshot", "-c", "s1", "img.qcow2"]),
            .io(["write -P 0x44 0 32k", "write -z 5M 4k", "discard 2M \(cs)", "write -P 0x45 3M 8k"], writer: writer),
            .img(["snapshot", "-c", "s2", "img.qcow2"]),
            .img(["snapshot", "-l", "img.qcow2"]),
            .io(["write -P 0x55 64k 8k", "write -c -P 0x56 \(8 * (1 << 20) + 2 * cs) \(cs)"], writer: writer),
            .img(["snapshot", "-a", "s1", "img.qcow2"]),
            .io(["write -P 0x66 6M 4k", "write -P 0x67 0 4k"], writer: writer),
            .img(["snapshot", "-c", "s3", "img.qcow2"]),
            .img(["snapshot", "-c", "s3", "img.qcow2"]),
            .img(["snapshot", "-d", "s2", "img.qcow2"]),
            .img(["snapshot", "-a", "3", "img.qcow2"]),
            .io(["write -P 0x77 1M 64k"], writer: writer),
            .img(["snapshot", "-d", "s1", "img.qcow2"]),
            .img(["snapshot", "-l", "img.qcow2"]),
            .img(["snapshot", "-a", "s3", "img.qcow2"]),
            .img(["snapshot", "-d", "s3", "img.qcow2"]),
            .img(["snapshot", "-d", "s3", "img.qcow2"]),
            .img(["snapshot", "-c", "last", "img.qcow2"]),
            .img(["snapshot", "-l", "img.qcow2"]),
            .img(["snapshot", "-d", "last", "img.qcow2"]),
            .img(["snapshot", "-l", "img.qcow2"]),
        ]
    }

    // MARK: - Tests

    @Test("create / write / apply / delete sequences match qemu-img", arguments: layouts)
    func sequences(_ lay: Layout) throws {
        try Self.runSequence(lay, Self.mainSequence(writer: .qemu, cs: lay.clusterSize), label: lay.name)
    }

    @Test("writes by lamina-io after a snapshot leave the snapshot intact")
    func laminaIOWrites() throws {
        let lay = Layout(name: "64k", clusterSize: 65536)
        try Self.runSequence(lay, Self.mainSequence(writer: .lamina, cs: lay.clusterSize), label: "lamina-io")
        let ext = Layout(name: "16k extended_l2", clusterSize: 16384, extendedL2: true)
        try Self.runSequence(ext, Self.mainSequence(writer: .lamina, cs: ext.clusterSize), label: "lamina-io ext")
    }

    @Test("interop: snapshots made by qemu-img applied and deleted by lamina-img, and the other way round")
    func interop() throws {
        let lay = Layout(name: "64k", clusterSize: 65536)
        let cs = lay.clusterSize
        try Self.runSequence(lay, [
            .img(["snapshot", "-c", "q1", "img.qcow2"], lTool: .qemu),
            .io(["write -P 0x44 0 32k", "discard 2M \(cs)"]),
            .img(["snapshot", "-c", "q2", "img.qcow2"], lTool: .qemu),
            .io(["write -P 0x45 64k 4k"]),
            .img(["snapshot", "-a", "q1", "img.qcow2"]),
            .io(["write -P 0x46 128k 4k"], writer: .lamina),
            .img(["snapshot", "-d", "q2", "img.qcow2"]),
            .img(["snapshot", "-c", "l3", "img.qcow2"]),
            .io(["write -P 0x47 0 4k"]),
            .img(["snapshot", "-a", "l3", "img.qcow2"], lTool: .qemu),
            .img(["snapshot", "-c", "l4", "img.qcow2"]),
            .io(["write -P 0x48 0 4k"], writer: .lamina),
            .img(["snapshot", "-d", "l3", "img.qcow2"], lTool: .qemu),
            .img(["snapshot", "-a", "q1", "img.qcow2"], lTool: .qemu),
            .img(["snapshot", "-d", "q1", "img.qcow2"]),
            .img(["snapshot", "-d", "l4", "img.qcow2"], lTool: .qemu),
        ], label: "interop")
    }

    @Test("apply restores the snapshot's virtual size (grown and shrunk)")
    func applyResizes() throws {
        let lay = Layout(name: "64k", clusterSize: 65536)
        try Self.runSequence(lay, [
            .img(["snapshot", "-c", "small", "img.qcow2"]),
            .judge(["resize", "-q", "img.qcow2", "600M"]),
            .io(["write -P 0x50 500M 64k"]),
            .img(["snapshot", "-c", "big", "img.qcow2"]),
            .img(["snapshot", "-a", "small", "img.qcow2"]),
            .img(["snapshot", "-a", "big", "img.qcow2"]),
            .img(["snapshot", "-d", "small", "img.qcow2"]),
            .img(["snapshot", "-a", "big", "img.qcow2"]),
        ], label: "resize")
    }

    @Test("apply of a snapshot whose L1 table is larger than the active one")
    func applyGrowsL1() throws {
        let dir = TempDir()
        #expect(try run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "img.qcow2", "600M"], cwd: dir.path).status == 0)
        try Self.qemuIO(["write -P 0x61 0 64k", "write -P 0x62 500M 64k"], "img.qcow2", cwd: dir.path)
        #expect(try run(["qemu-img", "snapshot", "-c", "big", "img.qcow2"], cwd: dir.path).status == 0)
        // The active state shrinks to 1 MiB (one L1 entry) behind QEMU's
        // back; check -r leaks settles the references it dropped.
        try patch(dir.path + "/img.qcow2", at: 24, be64(1 << 20))
        try patch(dir.path + "/img.qcow2", at: 36, be32(1))
        _ = try run(["qemu-img", "check", "-q", "-r", "leaks", "img.qcow2"], cwd: dir.path)
        try Self.runSequence(fixture: dir.path, [
            .img(["snapshot", "-c", "small", "img.qcow2"]),
            .io(["write -P 0x63 0 4k"]),
            .img(["snapshot", "-a", "big", "img.qcow2"]),
            .io(["write -P 0x64 500M 4k"]),
            .img(["snapshot", "-a", "small", "img.qcow2"]),
            .img(["snapshot", "-d", "big", "img.qcow2"]),
        ], label: "grow L1")
    }

    /// The snapshot table of dir/img.qcow2, L1 offsets and dates zeroed.
    static func table(_ dir: String) throws -> [UInt8] {
        let d = [UInt8](try Data(contentsOf: URL(fileURLWithPath: dir + "/img.qcow2")))
        let n = Int(d[60]) << 24 | Int(d[61]) << 16 | Int(d[62]) << 8 | Int(d[63])
        var off = 0
        for i in 64..<72 { off = off << 8 | Int(d[i]) }
        var bytes: [UInt8] = []
        var p = off
        for _ in 0..<n {
            while (p - off) % 8 != 0 { bytes.append(d[p]); p += 1 }
            var e = Array(d[p..<(p + 40)])
            for i in 0..<8 { e[i] = 0 }  // L1 table offset: allocation may differ
            for i in 16..<24 { e[i] = 0 }  // date
            let extra = Int(e[36]) << 24 | Int(e[37]) << 16 | Int(e[38]) << 8 | Int(e[39])
            let idLen = Int(e[12]) << 8 | Int(e[13])
            let nameLen = Int(e[14]) << 8 | Int(e[15])
            bytes += e
            bytes += d[(p + 40)..<(p + 40 + extra + idLen + nameLen)]
            p += 40 + extra + idLen + nameLen
        }
        return bytes
    }

    @Test("the snapshot table is laid out as qemu-img writes it")
    func tableBytes() throws {
        let fixture = TempDir()
        try Self.makeFixture(Layout(name: "64k", clusterSize: 65536), in: fixture.path)
        let t = try Twin(fixture: fixture.path)
        for name in ["first", "a-much-longer-snapshot-name", "", "x"] {
            try Self.perform(t, .img(["snapshot", "-c", name, "img.qcow2"]), label: "create '\(name)'")
        }
        let qt = try Self.table(t.q)
        let lt = try Self.table(t.l)
        #expect(qt == lt, "snapshot tables differ:\nqemu   \(qt)\nlamina \(lt)")
        try Self.verify(t, label: "table bytes")
    }

    @Test("unknown extra data of a snapshot table entry is kept when the table is rewritten")
    func unknownExtraData() throws {
        let dir = TempDir()
        try Self.makeFixture(Layout(name: "64k", clusterSize: 65536), in: dir.path)
        #expect(try run(["qemu-img", "snapshot", "-c", "old", "img.qcow2"], cwd: dir.path).status == 0)
        let img = dir.path + "/img.qcow2"
        let d = [UInt8](try Data(contentsOf: URL(fileURLWithPath: img)))
        var off = 0
        for i in 64..<72 { off = off << 8 | Int(d[i]) }
        // The same entry with 8 more bytes of extra data, as a new table
        // at the end of the file (the old one then leaks: repaired).
        var e = Array(d[off..<(off + 64)])
        e.replaceSubrange(36..<40, with: be32(32))
        e += [0xab, 0xcd, 0xef, 1, 2, 3, 4, 5]
        e += Array(d[(off + 64)..<(off + 64 + 1 + 3)])  // id "1", name "old"
        let end = (UInt64(d.count) + 65535) / 65536 * 65536
        try patch(img, at: end, e + [UInt8](repeating: 0, count: 65536 - e.count))
        try patch(img, at: 64, be64(end))
        _ = try run(["qemu-img", "check", "-q", "-r", "all", "img.qcow2"], cwd: dir.path)
        try Self.runSequence(fixture: dir.path, [
            .img(["snapshot", "-c", "new", "img.qcow2"]),
            .img(["snapshot", "-l", "img.qcow2"]),
        ], label: "unknown extra")
        let t = try Twin(fixture: dir.path)
        try Self.perform(t, .img(["snapshot", "-c", "new", "img.qcow2"]), label: "unknown extra")
        let qt = try Self.table(t.q)
        let lt = try Self.table(t.l)
        #expect(qt == lt, "snapshot tables differ:\nqemu   \(qt)\nlamina \(lt)")
        #expect(qt.count > 0 && lt.contains(0xab), "the unknown extra data was dropped")
        try Self.perform(t, .img(["snapshot", "-d", "new", "img.qcow2"]), label: "unknown extra")
        #expect(try Self.table(t.q) == Self.table(t.l), "after delete")
    }

    @Test("command line errors and lookup failures match qemu-img and change nothing")
    func errors() throws {
        let fixture = TempDir()
        try Self.makeFixture(Layout(name: "64k", clusterSize: 65536), in: fixture.path)
        #expect(try run(["qemu-img", "snapshot", "-c", "s1", "img.qcow2"], cwd: fixture.path).status == 0)
        #expect(try run(["qemu-img", "snapshot", "-c", "s1", "img.qcow2"], cwd: fixture.path).status == 0)
        #expect(try run(["qemu-img", "create", "-q", "-f", "raw", "r.raw", "1M"], cwd: fixture.path).status == 0)
        let cases: [[String]] = [
            ["snapshot"], ["snapshot", "-l"], ["snapshot", "-c"], ["snapshot", "-x", "img.qcow2"],
            ["snapshot", "-f", "qcow2", "-l", "img.qcow2"], ["snapshot", "-l", "-c", "x", "img.qcow2"],
            ["snapshot", "-l", "-l", "img.qcow2"], ["snapshot", "-c", "x", "img.qcow2", "extra"],
            ["snapshot", "-c", "x", "-U", "img.qcow2"], ["snapshot", "-U", "img.qcow2"],
            ["snapshot", "-a", "nope", "img.qcow2"], ["snapshot", "-d", "nope", "img.qcow2"],
            ["snapshot", "-d", "2", "img.qcow2"], ["snapshot", "-c", "x", "missing.qcow2"],
            ["snapshot", "-l", "-U", "img.qcow2"], ["snapshot", "--force-share", "-q", "-l", "img.qcow2"],
            ["snapshot", "img.qcow2"], ["snapshot", "-l", "r.raw"], ["snapshot", "-c", "x", "r.raw"],
            ["snapshot", "-a", "x", "r.raw"], ["snapshot", "-d", "x", "r.raw"], ["snapshot", "r.raw"],
        ]
        for args in cases {
            let t = try TwinDirs(copying: fixture.path)
            let before = try Data(contentsOf: URL(fileURLWithPath: t.l + "/img.qcow2"))
            let (q, l) = try t.runTools(args)
            var qn = q
            qn.stdout = Self.normalizeDates(q.stdout)
            var ln = l
            ln.stdout = Self.normalizeDates(l.stdout)
            expectSameResult(qn, ln, args.joined(separator: " "))
            #expect(try Data(contentsOf: URL(fileURLWithPath: t.l + "/img.qcow2")) == before, "\(args): image changed")
        }
    }

    @Test("convert -l: snapshot parameters and lookups as qemu-img")
    func convertSnapshot() throws {
        let fixture = TempDir()
        try Self.makeFixture(Layout(name: "64k backing", clusterSize: 65536, backing: true), in: fixture.path)
        #expect(try run(["qemu-img", "snapshot", "-c", "s1", "img.qcow2"], cwd: fixture.path).status == 0)
        try Self.qemuIO(["write -P 0x71 0 1M"], "img.qcow2", cwd: fixture.path)
        #expect(try run(["qemu-img", "snapshot", "-c", "2", "img.qcow2"], cwd: fixture.path).status == 0)
        try Self.qemuIO(["write -P 0x72 0 2M"], "img.qcow2", cwd: fixture.path)
        #expect(try run(["qemu-img", "create", "-q", "-f", "raw", "r.raw", "1M"], cwd: fixture.path).status == 0)
        let t = try TwinDirs(copying: fixture.path)
        let params = ["s1", "1", "2", "nope", "", "snapshot.id=1", "snapshot.name=s1", "snapshot.id=1,snapshot.name=s1",
                      "snapshot.id=2,snapshot.name=s1", "snapshot.name=2", "snapshot.id=2", "snapshot.foo=1",
                      "snapshot.id=1,bad", "snapshot.name="]
        for p in params {
            for fmt in ["raw", "qcow2"] {
                let args = ["convert", "-l", p, "-O", fmt, "img.qcow2", "out.\(fmt)"]
                let (q, l) = try t.runTools(args)
                expectSameResult(q, l, args.joined(separator: " "))
                if q.status == 0 {
                    let c = try run(["qemu-img", "compare", "q/out.\(fmt)", "l/out.\(fmt)"], cwd: t.tmp.path)
                    #expect(c.status == 0, "\(args): \(c)")
                }
                try? FileManager.default.removeItem(atPath: t.q + "/out.\(fmt)")
                try? FileManager.default.removeItem(atPath: t.l + "/out.\(fmt)")
            }
        }
        for args in [["convert", "-l", "s1", "-O", "raw", "img.qcow2", "img.qcow2", "out.raw"],
                     ["convert", "-l", "snapshot.name=s1", "-O", "raw", "img.qcow2", "img.qcow2", "out.raw"],
                     ["convert", "-l", "s1", "-f", "raw", "-O", "raw", "r.raw", "out.raw"]] {
            let (q, l) = try t.runTools(args)
            expectSameResult(q, l, args.joined(separator: " "))
        }
    }

    @Test("a refcount overflow (refcount_bits=1) fails like qemu-img and changes nothing")
    func refcountOverflow() throws {
        let dir = TempDir()
        #expect(try run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "refcount_bits=1", "img.qcow2", "4M"], cwd: dir.path).status == 0)
        try Self.qemuIO(["write -P 1 0 128k"], "img.qcow2", cwd: dir.path)
        let t = try TwinDirs(copying: dir.path)
        let before = try Data(contentsOf: URL(fileURLWithPath: t.l + "/img.qcow2"))
        let (q, l) = try t.runTools(["snapshot", "-c", "s", "img.qcow2"])
        #expect(l.status == 1 && q.status == 1, "\(q) \(l)")
        #expect(l.stderr == "qemu-img: Could not create snapshot 's': -34 (Numerical result out of range)\n", "\(l)")
        #expect(try Data(contentsOf: URL(fileURLWithPath: t.l + "/img.qcow2")) == before, "image changed")
    }

    @Test("a table of 65536 snapshots: one more is refused like qemu-img")
    func tooManySnapshots() throws {
        let dir = TempDir()
        #expect(try run(["qemu-img", "create", "-q", "-f", "qcow2", "img.qcow2", "4M"], cwd: dir.path).status == 0)
        let img = dir.path + "/img.qcow2"
        let end = (try FileManager.default.attributesOfItem(atPath: img)[.size] as? NSNumber)?.uint64Value ?? 0
        var table: [UInt8] = []
        for i in 1...65536 {
            while table.count % 8 != 0 { table.append(0) }
            let id = Array(String(i).utf8)
            var e = [UInt8](repeating: 0, count: 64)
            e.replaceSubrange(12..<14, with: be16(UInt16(id.count)))
            e.replaceSubrange(36..<40, with: be32(24))
            e.replaceSubrange(48..<56, with: be64(4 << 20))
            table += e + id
        }
        let aligned = (end + 65535) / 65536 * 65536
        try patch(img, at: aligned, table)
        try patch(img, at: 60, be32(65536) + be64(aligned))
        let t = try TwinDirs(copying: dir.path)
        let before = try Data(contentsOf: URL(fileURLWithPath: t.l + "/img.qcow2"))
        let (q, l) = try t.runTools(["snapshot", "-c", "one-more", "img.qcow2"])
        expectSameResult(q, l, "snapshot -c on a full table")
        #expect(l.stderr == "qemu-img: Could not create snapshot 'one-more': -27 (File too large)\n", "\(l)")
        #expect(try Data(contentsOf: URL(fileURLWithPath: t.l + "/img.qcow2")) == before, "image changed")
    }

    @Test("images with persistent bitmaps: create works, apply is refused like qemu-img")
    func bitmaps() throws {
        let dir = TempDir()
        #expect(try run(["qemu-img", "create", "-q", "-f", "qcow2", "img.qcow2", "4M"], cwd: dir.path).status == 0)
        #expect(try run(["qemu-img", "bitmap", "--add", "img.qcow2", "bm0"], cwd: dir.path).status == 0)
        try Self.qemuIO(["write -P 1 0 128k"], "img.qcow2", cwd: dir.path)
        let t = try Twin(fixture: dir.path)
        try Self.perform(t, .img(["snapshot", "-c", "s1", "img.qcow2"]), label: "bitmaps")
        try Self.verify(t, label: "bitmaps create")
        let (q, l) = try t.dirs.judge(["info", "--output=json", "img.qcow2"])
        #expect(q.stdout.contains("\"auto\"") && l.stdout.contains("\"auto\"") && !l.stdout.contains("in-use"), "\(l)")
        // The refused apply changes nothing but, like qemu-img, stores the
        // bitmaps again at the read-write close: same bits, same content.
        let bitsBefore = decodeBitmaps(t.l + "/img.qcow2")
        let keep = TempDir()
        #expect(try run(["cp", t.l + "/img.qcow2", keep.file("before.qcow2")]).status == 0)
        try Self.perform(t, .img(["snapshot", "-a", "s1", "img.qcow2"]), label: "bitmaps apply")
        #expect(decodeBitmaps(t.l + "/img.qcow2") == bitsBefore, "bitmaps changed")
        #expect(decodeBitmaps(t.q + "/img.qcow2") == bitsBefore, "qemu-img's bitmaps changed")
        #expect(try run(["qemu-img", "compare", keep.file("before.qcow2"), t.l + "/img.qcow2"]).status == 0, "content changed")
        try Self.verify(t, label: "bitmaps refused apply")
        try Self.perform(t, .img(["snapshot", "-d", "s1", "img.qcow2"]), label: "bitmaps delete")
        try Self.verify(t, label: "bitmaps delete")
    }

    // MARK: - Damaged images

    struct Damaged: Sendable, CustomTestStringConvertible {
        var name: String
        /// What to overwrite: (where, bytes); where "table" is the snapshot
        /// table's first entry, "header" the file start.
        var inTable: Bool
        var offset: UInt64
        var bytes: [UInt8]
        /// Action -> Lamina's stderr when it deliberately differs from
        /// qemu-img (nil: same as qemu-img).
        var deviations: [String: String]
        var testDescription: String { name }
    }

    static let damaged: [Damaged] = [
        Damaged(name: "snapshot table past the end of the file", inTable: false, offset: 64, bytes: be64(0x1000_0000),
                deviations: ["-c": "qemu-img: Could not create snapshot 'new': -22 (Invalid argument)\n"]),
        Damaged(name: "snapshot L1 table unaligned", inTable: true, offset: 0, bytes: be64(0x30200), deviations: [:]),
        Damaged(name: "snapshot L1 table past the end of the file", inTable: true, offset: 0, bytes: be64(0x1000_0000),
                deviations: [
                    "-a": "qemu-img: Snapshot L1 table exceeds the end of the file\nqemu-img: Could not apply snapshot 's1': Failed to load snapshot: Invalid argument\n",
                    "-d": "qemu-img: Could not delete snapshot 's1': Snapshot L1 table exceeds the end of the file\n",
                ]),
        Damaged(name: "too much extra data", inTable: true, offset: 36, bytes: be32(2000), deviations: [:]),
        // qemu-img's new L1 copy "overlaps" the huge inactive L1 table and
        // the image is marked corrupt; Lamina creates the snapshot.
        Damaged(name: "snapshot L1 table too large", inTable: true, offset: 8, bytes: be32(0x0800_0000), deviations: ["-c": ""]),
    ]

    @Test("damaged snapshot tables: clear errors, nothing changed", arguments: damaged)
    func damagedInputs(_ d: Damaged) throws {
        let dir = TempDir()
        try Self.makeFixture(Layout(name: "64k", clusterSize: 65536), in: dir.path)
        #expect(try run(["qemu-img", "snapshot", "-c", "s1", "img.qcow2"], cwd: dir.path).status == 0)
        let img = dir.path + "/img.qcow2"
        let raw = [UInt8](try Data(contentsOf: URL(fileURLWithPath: img)))
        var tableOffset: UInt64 = 0
        for i in 64..<72 { tableOffset = tableOffset << 8 | UInt64(raw[i]) }
        try patch(img, at: (d.inTable ? tableOffset : 0) + d.offset, d.bytes)
        for action in [["-l"], ["-a", "s1"], ["-d", "s1"], ["-c", "new"]] {
            let t = try TwinDirs(copying: dir.path)
            let before = try Data(contentsOf: URL(fileURLWithPath: t.l + "/img.qcow2"))
            let args = ["snapshot"] + action + ["img.qcow2"]
            let (q, l) = try t.runTools(args)
            var qn = q
            qn.stdout = Self.normalizeDates(q.stdout)
            var ln = l
            ln.stdout = Self.normalizeDates(l.stdout)
            if d.deviations[action[0]] == "" {
                #expect(l.status == 0 && l.stderr.isEmpty, "\(d.name) \(action): \(l)")
                let c = try run(["qemu-img", "snapshot", "-l", "img.qcow2"], cwd: t.l)
                #expect(c.status == 0 && c.stdout.contains(" new "), "\(d.name) \(action): \(c)")
            } else if let dev = d.deviations[action[0]] {
                #expect(l.status == 1 && l.stderr == dev && l.stdout.isEmpty, "\(d.name) \(action): \(l)")
            } else {
                expectSameResult(qn, ln, "\(d.name): \(args.joined(separator: " "))")
            }
            if l.status != 0 || action == ["-l"] {
                #expect(try Data(contentsOf: URL(fileURLWithPath: t.l + "/img.qcow2")) == before, "\(d.name) \(action): image changed")
            }
        }
    }
}
