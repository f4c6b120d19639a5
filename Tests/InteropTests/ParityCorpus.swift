import Foundation
import Testing

// The image corpus for the qemu-img parity tests (ParityTests.swift).
//
// Every image is built once, on first use, inside one TempDir with qemu-img,
// qemu-io and byte patches, following the recipes of
// docs/notes/qemu-img-7.2-behaviour.md (Appendix B: s2.sh, s3.sh, s4.sh,
// s5.sh, s7.sh). All command lines use names relative to that directory.
//
// Left out on purpose: images with an external data file (`-o data_file=`),
// which Lamina does not support.

/// What kind of image a corpus entry is; decides which command lines apply.
enum CorpusKind: Sendable {
    /// Any image qemu-img can be run on without hanging (qcow2, raw, damaged).
    case normal
    /// Part of a backing-chain loop: qemu-img only terminates for `info`
    /// and `info --backing-chain`; everything else hangs.
    case loop
}

struct CorpusImage: Sendable {
    let name: String
    let kind: CorpusKind

    init(_ name: String, _ kind: CorpusKind = .normal) {
        self.name = name
        self.kind = kind
    }
}

/// One command line, run through both tools in the corpus directory.
struct ParityCase: Sendable, CustomTestStringConvertible {
    let args: [String]
    init(_ args: [String]) { self.args = args }
    init(_ line: String) { args = line.split(separator: " ").map(String.init) }
    var testDescription: String { args.map { $0.isEmpty ? "\"\"" : $0 }.joined(separator: " ") }
}

/// `check -r <mode> [--output=json] <image>` on fresh copies of the image.
struct RepairCase: Sendable, CustomTestStringConvertible {
    let image: String
    let mode: String
    let json: Bool
    var workName: String { "rep-\(mode)\(json ? "-json" : "")-\(image)" }
    var args: [String] { ["check", "-r", mode] + (json ? ["--output=json"] : []) + [workName] }
    var testDescription: String { "check -r \(mode)\(json ? " --output=json" : "") \(image)" }
}

enum ParityCatalog {
    /// Every image of the corpus (files that must exist after the build).
    static let images: [CorpusImage] = [
        // clean qcow2 images
        .init("empty.qcow2"), .init("c.qcow2"), .init("base.qcow2"),
        .init("cs512.qcow2"), .init("cs4k.qcow2"), .init("cs64k.qcow2"), .init("cs2m.qcow2"),
        .init("rb1.qcow2"), .init("rb64.qcow2"),
        .init("v2.qcow2"), .init("v2data.qcow2"), .init("ovnf.qcow2"),
        .init("p.qcow2"), .init("z.qcow2"), .init("d.qcow2"),
        .init("x.qcow2"), .init("xz.qcow2"), .init("u.qcow2"), .init("u2.qcow2"),
        .init("comp.qcow2"), .init("compz.qcow2"), .init("comp4k.qcow2"),
        .init("lz.qcow2"), .init("lzc.qcow2"),
        .init("c0.qcow2"), .init("c1.qcow2"), .init("c2.qcow2"),
        .init("rtop.qcow2"), .init("rtopodd.qcow2"), .init("small.qcow2"), .init("bigtop.qcow2"),
        .init("sn.qcow2"), .init("bm.qcow2"), .init("nf2.qcow2"), .init("db.qcow2"),
        // raw images
        .init("src.raw"), .init("rbase.raw"), .init("rbodd.raw"), .init("odd.raw"), .init("s.raw"),
        .init("zero.raw"), .init("tiny.img"), .init("zeros.img"), .init("text.txt"),
        // compare corpus (s4.sh)
        .init("a.qcow2"), .init("b.qcow2"), .init("a.raw"),
        .init("diff.qcow2"), .init("diff2.qcow2"), .init("diff3.qcow2"),
        .init("z1.qcow2"), .init("z2.qcow2"), .init("z3.qcow2"),
        .init("big.qcow2"), .init("bignz.qcow2"), .init("bigz.qcow2"), .init("bignz2.qcow2"),
        .init("half.qcow2"), .init("odd1.raw"), .init("odd2.raw"),
        .init("cbase.qcow2"), .init("top.qcow2"),
        // damaged: refcounts / L1 / L2 (s3.sh, on c.qcow2)
        .init("leak.qcow2"), .init("leak2.qcow2"), .init("leak3.qcow2"), .init("leak4.qcow2"),
        .init("leak5.qcow2"), .init("low.qcow2"), .init("low2.qcow2"), .init("low3.qcow2"),
        .init("snlow.qcow2"), .init("past.qcow2"), .init("unal.qcow2"), .init("dup.qcow2"),
        .init("l1past.qcow2"), .init("l1unal.qcow2"), .init("cop.qcow2"), .init("both.qcow2"),
        .init("dirty.qcow2"), .init("corr.qcow2"), .init("dirtyleak.qcow2"), .init("leakbase-top.qcow2"),
        // damaged: header fields, truncation, tables past EOF (s7.sh, on base.qcow2)
        .init("unk.qcow2"), .init("unk2.qcow2"), .init("unkc.qcow2"), .init("unka.qcow2"),
        .init("dv2.qcow2"), .init("v4.qcow2"), .init("v1.qcow2"),
        .init("cb8.qcow2"), .init("cb22.qcow2"), .init("crypt1.qcow2"), .init("crypt3.qcow2"),
        .init("hl80.qcow2"), .init("ro7.qcow2"), .init("ct2.qcow2"), .init("ct1.qcow2"),
        .init("bigsize.qcow2"),
        .init("t4.qcow2"), .init("t50.qcow2"), .init("t100.qcow2"), .init("t70000.qcow2"),
        .init("t200k.qcow2"), .init("t300k.qcow2"),
        .init("l1eof.qcow2"), .init("l1un.qcow2"), .init("l1big.qcow2"), .init("l1small.qcow2"),
        .init("rteof.qcow2"), .init("rtun.qcow2"), .init("rtc.qcow2"),
        .init("l2eof.qcow2"), .init("dataeof.qcow2"), .init("l2un.qcow2"),
        // missing backing files
        .init("mb.qcow2"), .init("mb2.qcow2"),
        // backing-chain loops: loopa -> loopb -> loopa, self -> self
        .init("loopa.qcow2", .loop), .init("loopb.qcow2", .loop), .init("self.qcow2", .loop),
    ]

    static var normalImages: [String] { images.filter { $0.kind == .normal }.map(\.name) }

    /// info in all four flavours; loop images included (qemu-img terminates
    /// for info and info --backing-chain on loops).
    static let infoCases: [ParityCase] = images.flatMap { img in
        [
            ParityCase(["info", img.name]),
            ParityCase(["info", "--output=json", img.name]),
            ParityCase(["info", "--backing-chain", img.name]),
            ParityCase(["info", "--backing-chain", "--output=json", img.name]),
        ]
    }

    static let checkCases: [ParityCase] = normalImages.flatMap { name in
        [ParityCase(["check", name]), ParityCase(["check", "--output=json", name])]
    }

    static let mapCases: [ParityCase] = normalImages.flatMap { name in
        [ParityCase(["map", name]), ParityCase(["map", "--output=json", name])]
    }

    static let repairCases: [RepairCase] =
        normalImages.flatMap { name in
            [RepairCase(image: name, mode: "leaks", json: false), RepairCase(image: name, mode: "all", json: false)]
        } + [
            RepairCase(image: "leak3.qcow2", mode: "leaks", json: true),
            RepairCase(image: "leak4.qcow2", mode: "leaks", json: true),
            RepairCase(image: "low.qcow2", mode: "all", json: true),
            RepairCase(image: "dup.qcow2", mode: "all", json: true),
            RepairCase(image: "corr.qcow2", mode: "all", json: true),
        ]

    static let compareCases: [ParityCase] = [
        // identical
        "compare a.qcow2 b.qcow2", "compare a.qcow2 a.raw", "compare -f qcow2 -F raw a.qcow2 a.raw",
        "compare -q a.qcow2 b.qcow2", "compare -s a.qcow2 b.qcow2", "compare -s a.qcow2 a.raw",
        "compare a.qcow2 a.qcow2", "compare -p a.qcow2 b.qcow2",
        // differing data
        "compare a.qcow2 diff.qcow2", "compare diff.qcow2 a.qcow2", "compare a.qcow2 diff2.qcow2",
        "compare diff2.qcow2 a.qcow2", "compare a.qcow2 diff3.qcow2", "compare -q a.qcow2 diff.qcow2",
        "compare -s a.qcow2 diff.qcow2", "compare a.raw diff.qcow2", "compare -p a.qcow2 diff2.qcow2",
        // allocation differences (strict mode)
        "compare z1.qcow2 z2.qcow2", "compare -s z1.qcow2 z2.qcow2", "compare z1.qcow2 z3.qcow2",
        "compare -s z1.qcow2 z3.qcow2", "compare -s z3.qcow2 z1.qcow2", "compare -s z2.qcow2 z3.qcow2",
        // different sizes
        "compare a.qcow2 big.qcow2", "compare big.qcow2 a.qcow2", "compare a.qcow2 bignz.qcow2",
        "compare bignz.qcow2 a.qcow2", "compare a.qcow2 bigz.qcow2", "compare -s a.qcow2 big.qcow2",
        "compare -s big.qcow2 a.qcow2", "compare -s a.qcow2 bigz.qcow2", "compare half.qcow2 a.qcow2",
        "compare half.qcow2 diff2.qcow2", "compare odd1.raw odd2.raw", "compare a.qcow2 bignz2.qcow2",
        "compare bignz2.qcow2 a.qcow2", "compare -s -p a.qcow2 bignz2.qcow2",
        // raw vs qcow2, cluster sizes, compression
        "compare cs512.qcow2 cs4k.qcow2", "compare cs512.qcow2 cs2m.qcow2", "compare -s cs4k.qcow2 cs64k.qcow2",
        "compare cs64k.qcow2 cs2m.qcow2", "compare comp.qcow2 src.raw", "compare compz.qcow2 src.raw",
        "compare -s comp.qcow2 compz.qcow2", "compare comp4k.qcow2 src.raw", "compare src.raw compz.qcow2",
        "compare odd.raw s.raw", "compare x.qcow2 xz.qcow2", "compare v2.qcow2 v2data.qcow2",
        // chains
        "compare top.qcow2 a.qcow2", "compare -s top.qcow2 a.qcow2", "compare c2.qcow2 c1.qcow2",
        "compare c0.qcow2 c2.qcow2", "compare rtop.qcow2 rbase.raw", "compare -s rtop.qcow2 rbase.raw",
        "compare bigtop.qcow2 small.qcow2", "compare rtopodd.qcow2 rbodd.raw",
        // damaged images and missing files
        "compare a.qcow2 missing.qcow2", "compare missing.qcow2 a.qcow2", "compare mb.qcow2 a.qcow2",
        "compare corr.qcow2 base.qcow2", "compare dataeof.qcow2 base.qcow2", "compare t70000.qcow2 base.qcow2",
        "compare l2un.qcow2 base.qcow2", "compare past.qcow2 c.qcow2", "compare low.qcow2 c.qcow2",
        "compare leak.qcow2 c.qcow2", "compare dirty.qcow2 c.qcow2", "compare sn.qcow2 c.qcow2",
        "compare bm.qcow2 a.qcow2", "compare unk.qcow2 base.qcow2", "compare l2eof.qcow2 base.qcow2",
        // format options
        "compare -f raw a.qcow2 b.qcow2", "compare -F raw a.qcow2 b.qcow2", "compare -f qcow2 a.raw a.qcow2",
    ].map(ParityCase.init)

    /// Usage errors and option handling.
    enum RepairDeviation { case none, betterRepair }

    /// Repairs where Lamina deliberately differs from qemu-img 7.2.
    static func repairDeviation(_ c: RepairCase) -> RepairDeviation {
        if c.image == "t70000.qcow2" && c.mode == "all" { return .betterRepair }
        return .none
    }

    static let usageCases: [ParityCase] = [
        ParityCase(["info"]), ParityCase(["check"]), ParityCase(["map"]), ParityCase(["compare"]),
        ParityCase(["compare", "a.qcow2"]), ParityCase(["compare", "a.qcow2", "b.qcow2", "c.qcow2"]),
        ParityCase(["info", "a.qcow2", "b.qcow2"]),
        ParityCase(["info", "--output=xml", "c.qcow2"]), ParityCase(["check", "--output=xml", "c.qcow2"]),
        ParityCase(["map", "--output=xml", "p.qcow2"]),
        ParityCase(["check", "-r", "bogus", "c.qcow2"]),
        ParityCase(["info", "--bogus", "c.qcow2"]), ParityCase(["info", "-z", "c.qcow2"]),
        ParityCase(["check", "--bogus", "c.qcow2"]), ParityCase(["map", "-z", "c.qcow2"]),
        ParityCase(["compare", "--bogus", "a.qcow2", "b.qcow2"]),
        ParityCase(["info", "-f"]), ParityCase(["check", "-f"]), ParityCase(["check", "-r"]),
        ParityCase(["map", "-f"]), ParityCase(["compare", "-F"]), ParityCase(["info", "--output"]),
        ParityCase(["info", "nonexist.qcow2"]), ParityCase(["check", "nonexist.qcow2"]),
        ParityCase(["check", "--output=json", "nonexist.qcow2"]), ParityCase(["map", "missing.qcow2"]),
        ParityCase(["info", "dir"]), ParityCase(["info", ""]),
        ParityCase(["info", "-f", "vmdk", "c.qcow2"]), ParityCase(["info", "-f", "qcow2", "src.raw"]),
        ParityCase(["info", "-f", "qcow2", "zeros.img"]), ParityCase(["check", "-f", "qcow2", "zeros.img"]),
        ParityCase(["map", "-f", "qcow2", "zeros.img"]), ParityCase(["info", "-f", "qcow2", "text.txt"]),
        ParityCase(["info", "-f", "qcow2", "t4.qcow2"]), ParityCase(["info", "-f", "qcow2", "t50.qcow2"]),
        ParityCase(["info", "-f", "qcow2", "t100.qcow2"]), ParityCase(["info", "-f", "raw", "c.qcow2"]),
        ParityCase(["check", "-f", "raw", "c.qcow2"]), ParityCase(["map", "-f", "raw", "--output=json", "c.qcow2"]),
        ParityCase(["info", "-f", "raw", "--output=json", "tiny.img"]),
        ParityCase(["check", "-f", "qcow2", "c.qcow2"]), ParityCase(["check", "-q", "c.qcow2"]),
        ParityCase(["check", "-q", "leak.qcow2"]), ParityCase(["check", "-q", "low.qcow2"]),
        ParityCase(["info", "-U", "c.qcow2"]), ParityCase(["map", "-U", "p.qcow2"]),
        ParityCase(["info", "--output=human", "c.qcow2"]), ParityCase(["map", "--output=human", "p.qcow2"]),
        ParityCase(["map", "--start-offset=1M", "--max-length=128k", "p.qcow2"]),
        ParityCase(["map", "--output=json", "--start-offset=1000", "--max-length=100000", "p.qcow2"]),
        ParityCase(["map", "--output=json", "--start-offset=1G", "p.qcow2"]),
        ParityCase(["map", "--start-offset=bogus", "p.qcow2"]),
        ParityCase(["map", "--output=json", "--max-length=1M", "c2.qcow2"]),
    ]

    /// Commands qemu-img hangs on for loop images; Lamina must fail instead.
    static let loopCases: [ParityCase] = [
        "check loopa.qcow2", "check --output=json loopa.qcow2", "check self.qcow2",
        "map loopa.qcow2", "map --output=json loopb.qcow2", "map self.qcow2",
        "compare loopa.qcow2 loopb.qcow2", "compare a.qcow2 loopa.qcow2", "compare self.qcow2 a.qcow2",
    ].map(ParityCase.init)
}

/// The built corpus; `problems` lists setup steps that did not go as planned.
final class ParityCorpus: Sendable {
    let dir: TempDir
    let problems: [String]

    var path: String { dir.path }

    init() {
        let dir = TempDir()
        let b = CorpusBuilder(dir: dir.path)
        b.buildAll()
        self.dir = dir
        problems = b.problems
    }
}

/// Built on first use by any parity test; removed at process exit.
let parityCorpus: ParityCorpus = {
    let c = ParityCorpus()
    atexit { try? FileManager.default.removeItem(atPath: parityCorpus.path) }
    return c
}()

/// Runs the setup steps; failures are collected, not thrown, so one broken
/// recipe shows up as one failing "corpus builds" test.
final class CorpusBuilder {
    let dir: String
    var problems: [String] = []

    init(dir: String) { self.dir = dir }

    func f(_ name: String) -> String { dir + "/" + name }

    /// Runs a setup command; a non-zero status is a problem unless allowed.
    func sh(_ args: [String], allowFailure: Bool = false) {
        do {
            let r = try run(args, cwd: dir, timeout: 60)
            if r.status != 0 && !allowFailure {
                problems.append("\(args.joined(separator: " ")): \(r)")
            }
        } catch {
            problems.append("\(args.joined(separator: " ")): \(error)")
        }
    }

    func img(_ line: String) { sh(["qemu-img"] + line.split(separator: " ").map(String.init)) }

    /// qemu-io with one `-c` per command.
    func io(_ file: String, _ cmds: String..., format: String = "qcow2", allowFailure: Bool = false) {
        sh(["qemu-io", "-f", format] + cmds.flatMap { ["-c", $0] } + [file], allowFailure: allowFailure)
    }

    func cp(_ from: String, _ to: String) {
        do {
            try? FileManager.default.removeItem(atPath: f(to))
            try FileManager.default.copyItem(atPath: f(from), toPath: f(to))
        } catch {
            problems.append("cp \(from) \(to): \(error)")
        }
    }

    func poke(_ name: String, _ offset: UInt64, _ bytes: [UInt8]) {
        do { try patch(f(name), at: offset, bytes) } catch { problems.append("patch \(name)@\(offset): \(error)") }
    }

    /// Copy of `from` with bytes patched.
    func damaged(_ from: String, _ to: String, _ offset: UInt64, _ bytes: [UInt8]) {
        cp(from, to)
        poke(to, offset, bytes)
    }

    func truncate(_ name: String, _ size: UInt64) { sh(["truncate", "-s", String(size), name]) }

    func write(_ name: String, _ data: [UInt8]) {
        if !FileManager.default.createFile(atPath: f(name), contents: Data(data)) {
            problems.append("cannot write \(name)")
        }
    }

    func expectSize(_ name: String, _ size: UInt64) {
        let attrs = try? FileManager.default.attributesOfItem(atPath: f(name))
        let actual = (attrs?[.size] as? NSNumber)?.uint64Value
        if actual != size { problems.append("\(name): size \(String(describing: actual)), expected \(size)") }
    }

    func expectBytes(_ name: String, at offset: UInt64, _ bytes: [UInt8]) {
        guard let h = FileHandle(forReadingAtPath: f(name)) else { problems.append("cannot read \(name)"); return }
        defer { try? h.close() }
        try? h.seek(toOffset: offset)
        let got = [UInt8]((try? h.read(upToCount: bytes.count)) ?? Data())
        if got != bytes { problems.append("\(name)@\(offset): \(got), expected \(bytes) (layout changed?)") }
    }

    /// Deterministic incompressible bytes.
    func noise(_ count: Int, seed: UInt64) -> [UInt8] {
        var s = seed | 1
        var out = [UInt8]()
        out.reserveCapacity(count)
        for _ in 0..<count {
            s ^= s << 13; s ^= s >> 7; s ^= s << 17
            out.append(UInt8(truncatingIfNeeded: s >> 24))
        }
        return out
    }

    func buildAll() {
        clean()
        raw()
        compareSet()
        refcountDamage()
        headerDamage()
        backingProblems()
    }

    func clean() {
        img("create -q -f qcow2 empty.qcow2 64M")
        // c.qcow2 layout (s3.sh): 0 header, 1 refcount table, 2 refcount block
        // (16-bit entries at 0x20000), 3 L1 (0x30000), 4 L2 (0x40000), 5..20 data
        // for guest 0..1M, 21 data for guest 4M.
        img("create -q -f qcow2 c.qcow2 64M")
        io("c.qcow2", "write -P 1 0 1M", "write -P 2 4M 64k")
        expectSize("c.qcow2", 0x160000)
        expectBytes("c.qcow2", at: 0x30000, be64(0x8000_0000_0004_0000))
        expectBytes("c.qcow2", at: 0x40000, be64(0x8000_0000_0005_0000))
        img("create -q -f qcow2 base.qcow2 64M")
        io("base.qcow2", "write -P 1 0 128k")
        expectSize("base.qcow2", 0x70000)

        for (name, cs) in [("cs512", "512"), ("cs4k", "4k"), ("cs64k", "64k"), ("cs2m", "2M")] {
            img("create -q -f qcow2 -o cluster_size=\(cs) \(name).qcow2 16M")
            io("\(name).qcow2", "write -P 0x11 0 64k", "write -P 0x22 1M 3k", "write -P 0x33 3M 2M",
               "write -z 8M 1M", "write -P 0x44 15M 1M")
        }
        img("create -q -f qcow2 -o refcount_bits=1,cluster_size=4k rb1.qcow2 16M")
        io("rb1.qcow2", "write -P 0x11 0 100k", "write -P 0x22 8M 4k")
        img("create -q -f qcow2 -o refcount_bits=64 rb64.qcow2 16M")
        io("rb64.qcow2", "write -P 0x11 0 100k", "write -P 0x22 8M 4k")

        // compat=0.10: no zero flag, discard in v2
        img("create -q -f qcow2 -o compat=0.10 v2.qcow2 64M")
        io("v2.qcow2", "write -P 0x11 0 256k", "discard 64k 64k", "write -z 128k 64k")
        img("create -q -f qcow2 -o compat=0.10 v2data.qcow2 64M")
        io("v2data.qcow2", "write -P 0x11 0 256k", "write -P 0 64k 128k", "write -P 0x22 10M 64k")
        // v2 overlay whose backing format is not recorded
        // (qemu-img refuses to write one, so the backing-format extension magic at 72 is zeroed)
        img("create -q -f qcow2 -o compat=0.10 -b base.qcow2 -F qcow2 ovnf.qcow2")
        expectBytes("ovnf.qcow2", at: 72, be32(0xe279_2aca))
        poke("ovnf.qcow2", 72, [0, 0, 0, 0])

        // partly written (5.2), zero clusters (5.3), discards (5.4)
        img("create -q -f qcow2 p.qcow2 64M")
        io("p.qcow2", "write -P 0x11 0 128k", "write -P 0x22 1M 64k", "write -P 0x33 1088k 64k",
           "write -P 0x44 10M 4k", "write -P 0x55 63M 1M")
        img("create -q -f qcow2 z.qcow2 64M")
        io("z.qcow2", "write -P 0x11 0 256k", "write -z 64k 64k", "write -z 1M 128k", "write -z 2M 1000",
           "write -z 3M 512")
        io("z.qcow2", "write -z -u 128k 64k")
        img("create -q -f qcow2 d.qcow2 64M")
        io("d.qcow2", "write -P 0x11 0 512k", "discard 64k 64k", "discard 256k 128k", "discard 448k 1000")

        // extended L2 with partial subcluster writes (5.8), also with zstd
        img("create -q -f qcow2 -o extended_l2=on x.qcow2 64M")
        io("x.qcow2", "write -P 0x11 0 2k", "write -P 0x22 4k 2k", "write -P 0x33 64k 32k", "write -z 128k 8k",
           "write -P 0x44 200k 1k")
        io("x.qcow2", "discard 68k 4k")
        img("create -q -f qcow2 -o extended_l2=on,compression_type=zstd,cluster_size=128k xz.qcow2 64M")
        io("xz.qcow2", "write -P 0x11 0 2k", "write -P 0x22 4k 2k", "write -P 0x33 64k 32k", "write -z 128k 8k",
           "write -P 0x44 200k 1k", "write -z 300k 4k", "discard 68k 4k")

        // size not cluster aligned (5.9)
        img("create -q -f qcow2 u.qcow2 100000")
        io("u.qcow2", "write -P 1 0 100352")
        img("create -q -f qcow2 u2.qcow2 100000")
        io("u2.qcow2", "write -P 1 65536 1000")

        // compressed clusters: zlib, zstd, 4k clusters, plus a qemu-io write -c
        img("create -q -f raw src.raw 4M")
        io("src.raw", "write -P 0x41 0 256k", "write -P 0x42 1M 64k", format: "raw")
        do {
            try patch(f("src.raw"), at: 2 * 1024 * 1024, noise(131072, seed: 0x5eed))
        } catch { problems.append("noise src.raw: \(error)") }
        img("convert -c -O qcow2 src.raw comp.qcow2")
        io("comp.qcow2", "write -c -P 0x66 3M 64k")
        img("convert -c -O qcow2 -o compression_type=zstd src.raw compz.qcow2")
        img("convert -c -O qcow2 -o cluster_size=4k src.raw comp4k.qcow2")

        // lazy refcounts: killed mid-write (dirty bit set) and closed cleanly
        img("create -q -f qcow2 -o lazy_refcounts=on lz.qcow2 64M")
        io("lz.qcow2", "write -P 7 0 256k", "abort", allowFailure: true)
        expectBytes("lz.qcow2", at: 72, be64(1))
        img("create -q -f qcow2 -o lazy_refcounts=on lzc.qcow2 64M")
        io("lzc.qcow2", "write -P 7 0 256k", "write -P 8 1M 64k")

        // 3-deep chain with data in each layer (5.6)
        img("create -q -f qcow2 c0.qcow2 64M")
        img("create -q -f qcow2 -b c0.qcow2 -F qcow2 c1.qcow2")
        img("create -q -f qcow2 -b c1.qcow2 -F qcow2 c2.qcow2")
        io("c0.qcow2", "write -P 1 0 1M", "write -P 1 8M 64k")
        io("c1.qcow2", "write -P 2 512k 1M", "write -z 8M 64k")
        io("c2.qcow2", "write -P 3 1M 128k", "write -P 3 20M 64k")

        // raw backing files shorter than the overlay (one of them not a multiple of 512)
        img("create -q -f raw rbase.raw 1M")
        io("rbase.raw", "write -P 9 0 64k", "write -P 9 960k 64k", format: "raw")
        img("create -q -f qcow2 -b rbase.raw -F raw rtop.qcow2 4M")
        io("rtop.qcow2", "write -P 8 1M 64k", "write -P 8 512k 64k")
        write("rbodd.raw", [UInt8](repeating: 0x3c, count: 100000))
        img("create -q -f qcow2 -b rbodd.raw -F raw rtopodd.qcow2 1M")
        io("rtopodd.qcow2", "write -P 8 512k 64k")
        // qcow2 backing file shorter than the overlay
        img("create -q -f qcow2 small.qcow2 1M")
        io("small.qcow2", "write -P 1 0 1M")
        img("create -q -f qcow2 -b small.qcow2 -F qcow2 bigtop.qcow2 4M")

        // internal snapshots
        img("create -q -f qcow2 sn.qcow2 64M")
        io("sn.qcow2", "write -P 5 0 128k")
        img("snapshot -c snap1 sn.qcow2")
        io("sn.qcow2", "write -P 6 64k 128k")
        img("snapshot -c snap-two sn.qcow2")

        // persistent bitmaps
        img("create -q -f qcow2 bm.qcow2 64M")
        io("bm.qcow2", "write -P 3 0 1M")
        img("bitmap --add bm.qcow2 b0")
        img("bitmap --add -g 128k bm.qcow2 b1")
        img("bitmap --add --disable bm.qcow2 b2")
        io("bm.qcow2", "write -P 4 2M 256k")

        // backing file without a recorded format (s2b.sh): zero the backing-format extension magic
        img("create -q -f qcow2 -b base.qcow2 -F qcow2 nf2.qcow2")
        expectBytes("nf2.qcow2", at: 112, be32(0xe279_2aca))
        poke("nf2.qcow2", 112, [0, 0, 0, 0])
        // dirty bit + crypt_method=1 on an overlay (s2c.sh)
        img("create -q -f qcow2 -b base.qcow2 -F qcow2 db.qcow2")
        poke("db.qcow2", 72, be64(1))
        poke("db.qcow2", 32, be32(1))
    }

    func raw() {
        // size not a multiple of 512, data at both ends
        truncate("odd.raw", 100000)
        poke("odd.raw", 0, [UInt8](repeating: 0x5a, count: 4096))
        poke("odd.raw", 99000, [UInt8](repeating: 0xa5, count: 1000))
        // sparse raw with two data extents
        truncate("s.raw", 8 * 1024 * 1024)
        poke("s.raw", 1024 * 1024, noise(65536, seed: 7))
        poke("s.raw", 4000 * 1024, noise(4096, seed: 8))
        truncate("zero.raw", 0)
        write("tiny.img", Array("hello".utf8))
        write("zeros.img", [UInt8](repeating: 0, count: 1024 * 1024))
        write("text.txt", Array("hi\n".utf8))
        do {
            try FileManager.default.createDirectory(atPath: f("dir"), withIntermediateDirectories: true)
        } catch { problems.append("mkdir dir: \(error)") }
    }

    func compareSet() {
        // s4.sh
        img("create -q -f qcow2 a.qcow2 64M")
        io("a.qcow2", "write -P 1 0 1M")
        cp("a.qcow2", "b.qcow2")
        img("convert -O raw a.qcow2 a.raw")
        img("create -q -f qcow2 diff.qcow2 64M")
        io("diff.qcow2", "write -P 1 0 1M", "write -P 9 300000 1")
        img("create -q -f qcow2 diff2.qcow2 64M")
        io("diff2.qcow2", "write -P 1 0 1M", "write -P 9 5000000 10")
        img("create -q -f qcow2 diff3.qcow2 64M")
        io("diff3.qcow2", "write -P 1 0 1M", "write -P 0 1000 1")
        img("create -q -f qcow2 z1.qcow2 64M")
        img("create -q -f qcow2 z2.qcow2 64M")
        io("z2.qcow2", "write -z 1M 64k")
        img("create -q -f qcow2 z3.qcow2 64M")
        io("z3.qcow2", "write -P 0 1M 64k")
        img("create -q -f qcow2 big.qcow2 128M")
        io("big.qcow2", "write -P 1 0 1M")
        cp("big.qcow2", "bignz.qcow2")
        io("bignz.qcow2", "write -P 7 100M 4k")
        cp("big.qcow2", "bigz.qcow2")
        io("bigz.qcow2", "write -P 0 100M 4k")
        cp("big.qcow2", "bignz2.qcow2")
        io("bignz2.qcow2", "write -P 7 104858600 1")
        img("create -q -f qcow2 half.qcow2 32M")
        io("half.qcow2", "write -P 1 0 1M")
        img("create -q -f raw odd1.raw 100000")
        img("create -q -f raw odd2.raw 100352")
        io("odd2.raw", "write -P 5 100000 352", format: "raw")
        img("create -q -f qcow2 cbase.qcow2 64M")
        io("cbase.qcow2", "write -P 1 0 1M")
        img("create -q -f qcow2 -b cbase.qcow2 -F qcow2 top.qcow2")
    }

    /// s3.sh: refcount entries are 16-bit at 0x20000 + 2*cluster, L1 at 0x30000, L2 at 0x40000.
    func refcountDamage() {
        let rb: UInt64 = 0x20000
        damaged("c.qcow2", "leak.qcow2", rb + 2 * 30, be16(1))   // refcount on an unused cluster past EOF
        damaged("c.qcow2", "leak2.qcow2", rb + 2 * 5, be16(2))   // refcount too high on a data cluster
        cp("c.qcow2", "leak3.qcow2")                               // appended cluster with refcount 1
        truncate("leak3.qcow2", 0x170000)
        poke("leak3.qcow2", rb + 2 * 22, be16(1))
        cp("c.qcow2", "leak5.qcow2")
        truncate("leak5.qcow2", 0x190000)
        for i: UInt64 in [22, 23, 24] { poke("leak5.qcow2", rb + 2 * i, be16(1)) }
        cp("c.qcow2", "leak4.qcow2")
        for i: UInt64 in [30, 31, 32, 40] { poke("leak4.qcow2", rb + 2 * i, be16(1)) }
        damaged("c.qcow2", "low.qcow2", rb + 2 * 6, be16(0))     // refcount 0 on a referenced data cluster
        damaged("c.qcow2", "low2.qcow2", rb + 2 * 4, be16(0))    // ... on the L2 table
        damaged("c.qcow2", "low3.qcow2", rb + 2 * 0, be16(0))    // ... on the header
        // refcount too low but not zero: cluster 5 of sn.qcow2 is shared by two snapshots (refcount 3)
        cp("sn.qcow2", "snlow.qcow2")
        expectBytes("snlow.qcow2", at: rb + 2 * 5, be16(3))
        poke("snlow.qcow2", rb + 2 * 5, be16(1))
        damaged("c.qcow2", "past.qcow2", 0x40000 + 8 * 2, be64(0x8000_0000_1000_0000))  // L2 entry past EOF
        damaged("c.qcow2", "unal.qcow2", 0x40000 + 8 * 3, be64(0x8000_0000_0008_1200))  // unaligned L2 entry
        damaged("c.qcow2", "dup.qcow2", 0x40000 + 8 * 1, be64(0x8000_0000_0005_0000))   // duplicate reference
        damaged("c.qcow2", "l1past.qcow2", 0x30000, be64(0x8000_0000_2000_0000))        // L1 entry past EOF
        damaged("c.qcow2", "l1unal.qcow2", 0x30000, be64(0x8000_0000_0004_0200))        // unaligned L1 entry
        damaged("c.qcow2", "cop.qcow2", 0x40000, be64(0x0000_0000_0005_0000))           // COPIED flag missing
        damaged("c.qcow2", "both.qcow2", rb + 2 * 6, be16(0))
        poke("both.qcow2", rb + 2 * 30, be16(1))
        damaged("c.qcow2", "dirty.qcow2", 72, be64(1))
        damaged("c.qcow2", "corr.qcow2", 72, be64(2))
        damaged("leak.qcow2", "dirtyleak.qcow2", 72, be64(1))
        // an overlay on a leaking base: check only looks at the top image
        cp("leak.qcow2", "leakbase.qcow2")
        img("create -q -f qcow2 -b leakbase.qcow2 -F qcow2 leakbase-top.qcow2")
    }

    /// s7.sh: header fields, truncation and tables past EOF, on base.qcow2.
    func headerDamage() {
        damaged("base.qcow2", "unk.qcow2", 72, be64(0x10_0000))                 // unknown incompatible bit 20
        damaged("base.qcow2", "unk2.qcow2", 72, be64(0x8000_0000_0000_0020))    // bits 63 and 5
        damaged("base.qcow2", "unkc.qcow2", 80, be64(0x100))                    // unknown compatible bit
        damaged("base.qcow2", "unka.qcow2", 88, be64(0x100))                    // unknown autoclear bit
        damaged("base.qcow2", "dv2.qcow2", 4, be32(2))                          // version 2 with a v3 header
        damaged("base.qcow2", "v4.qcow2", 4, be32(4))
        damaged("base.qcow2", "v1.qcow2", 4, be32(1))
        damaged("base.qcow2", "cb8.qcow2", 20, be32(8))                         // cluster_bits 8
        damaged("base.qcow2", "cb22.qcow2", 20, be32(22))                       // cluster_bits 22
        damaged("base.qcow2", "crypt1.qcow2", 32, be32(1))
        damaged("base.qcow2", "crypt3.qcow2", 32, be32(3))
        damaged("base.qcow2", "hl80.qcow2", 100, be32(80))                      // header_length 80
        damaged("base.qcow2", "ro7.qcow2", 96, be32(7))                         // refcount_order 7
        damaged("base.qcow2", "ct2.qcow2", 104, [2])                            // compression type 2
        damaged("base.qcow2", "ct1.qcow2", 104, [1])                            // zstd (valid, but no feature bit)
        damaged("base.qcow2", "bigsize.qcow2", 24, be64(0x0100_0000_0000_0000)) // huge virtual size
        for (name, size) in [("t4", 4), ("t50", 50), ("t100", 100), ("t70000", 70000), ("t200k", 200_000),
                             ("t300k", 300_000)] as [(String, UInt64)] {
            cp("base.qcow2", "\(name).qcow2")
            truncate("\(name).qcow2", size)
        }
        damaged("base.qcow2", "l1eof.qcow2", 40, be64(0x1000_0000))   // L1 table offset past EOF
        damaged("base.qcow2", "l1un.qcow2", 40, be64(0x30200))        // L1 table offset unaligned
        damaged("base.qcow2", "l1big.qcow2", 36, be32(0x1000_0000))   // L1 size too large
        damaged("base.qcow2", "l1small.qcow2", 36, be32(0))           // L1 size too small
        damaged("base.qcow2", "rteof.qcow2", 48, be64(0x1000_0000))   // refcount table past EOF
        damaged("base.qcow2", "rtun.qcow2", 48, be64(0x10200))        // refcount table unaligned
        damaged("base.qcow2", "rtc.qcow2", 56, be32(0x0100_0000))     // refcount table too large
        damaged("base.qcow2", "l2eof.qcow2", 0x30000, be64(0x8000_0000_1000_0000))   // L1[0] past EOF
        damaged("base.qcow2", "dataeof.qcow2", 0x40000, be64(0x8000_0000_1000_0000)) // L2[0] past EOF
        damaged("base.qcow2", "l2un.qcow2", 0x40000, be64(0x8000_0000_0005_0200))    // L2[0] unaligned
    }

    func backingProblems() {
        img("create -q -f qcow2 -u -b gone.qcow2 -F qcow2 mb.qcow2 64M")
        img("create -q -f qcow2 -u -b sub/gone.qcow2 -F qcow2 mb2.qcow2 64M")
        // loops (s7.sh 7.7); qemu-img must never run check/map/compare on these
        img("create -q -f qcow2 loopa.qcow2 64M")
        io("loopa.qcow2", "write -P 1 0 64k")
        img("create -q -f qcow2 -b loopa.qcow2 -F qcow2 loopb.qcow2")
        io("loopb.qcow2", "write -P 2 64k 64k")
        img("rebase -u -b loopb.qcow2 -F qcow2 loopa.qcow2")
        img("create -q -f qcow2 self.qcow2 64M")
        img("rebase -u -b self.qcow2 -F qcow2 self.qcow2")
    }
}
