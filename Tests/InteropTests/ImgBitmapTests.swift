import Foundation
import TestSupport
import Testing

// `lamina-img bitmap`, persistent dirty bitmaps tracked by guest writes,
// `convert --bitmaps`, against qemu-img/qemu-io/qemu-storage-daemon 7.2.

// MARK: - Reading bitmaps straight from the file (the test's own decoder)

/// One bitmap as stored: directory entry fields and, unless in use, the
/// dirty granules as ranges "first-last".
struct DecodedBitmap: Equatable, CustomStringConvertible {
    var name: String
    var granularityBits: Int
    var flags: UInt32
    var dirty: String
    var description: String { "\(name) g=\(1 << granularityBits) flags=\(flags) dirty=\(dirty)" }
}

struct BitmapLayout {
    var extOffset: Int
    var count: UInt32
    var dirSize: UInt64
    var dirOffset: UInt64
    var autoclear: UInt64
}

private func rd64(_ d: [UInt8], _ o: Int) -> UInt64 { (0..<8).reduce(0) { $0 << 8 | UInt64(d[o + $1]) } }
private func rd32(_ d: [UInt8], _ o: Int) -> UInt32 { (0..<4).reduce(0) { $0 << 8 | UInt32(d[o + $1]) } }
private func rd16(_ d: [UInt8], _ o: Int) -> Int { Int(d[o]) << 8 | Int(d[o + 1]) }

func readFileBytes(_ path: String) -> [UInt8] {
    [UInt8]((try? Data(contentsOf: URL(fileURLWithPath: path))) ?? Data())
}

/// Finds the bitmaps header extension.
func bitmapLayout(_ path: String) -> BitmapLayout? {
    let d = readFileBytes(path)
    guard d.count >= 104, rd32(d, 4) >= 3 else { return nil }
    var off = Int(rd32(d, 100))
    while off + 8 <= d.count {
        let type = rd32(d, off)
        let len = Int(rd32(d, off + 4))
        if type == 0 { return nil }
        if type == 0x2385_2875 {
            return BitmapLayout(extOffset: off, count: rd32(d, off + 8), dirSize: rd64(d, off + 16),
                                dirOffset: rd64(d, off + 24), autoclear: rd64(d, 88))
        }
        off += 8 + ((len + 7) & ~7)
    }
    return nil
}

/// Decodes every bitmap of a qcow2 file (docs/interop/qcow2.txt).
func decodeBitmaps(_ path: String) -> [DecodedBitmap] {
    let d = readFileBytes(path)
    guard let l = bitmapLayout(path), l.autoclear & 1 != 0 else { return [] }
    let clusterSize = 1 << Int(rd32(d, 20))
    let size = rd64(d, 24)
    func byte(_ at: Int) -> UInt8 { at < d.count ? d[at] : 0 }
    var out: [DecodedBitmap] = []
    var e = Int(l.dirOffset)
    for _ in 0..<l.count {
        guard e + 24 <= d.count else { break }
        let tableOffset = Int(rd64(d, e))
        let tableSize = Int(rd32(d, e + 8))
        let flags = rd32(d, e + 12)
        let gbits = Int(d[e + 17])
        let nameSize = rd16(d, e + 18)
        let extra = Int(rd32(d, e + 20))
        let name = String(decoding: d[(e + 24 + extra)..<(e + 24 + extra + nameSize)], as: UTF8.self)
        var dirty = "(in use)"
        if flags & 1 == 0 && gbits < 63 {
            let granules = Int((size + (UInt64(1) << UInt64(gbits)) - 1) >> UInt64(gbits))
            let nbytes = (granules + 7) / 8
            var ranges: [String] = []
            var runStart = -1
            func close(_ g: Int) {
                if runStart >= 0 {
                    ranges.append(runStart == g - 1 ? "\(runStart)" : "\(runStart)-\(g - 1)")
                    runStart = -1
                }
            }
            var byteIndex = 0
            while byteIndex < nbytes {
                let ti = byteIndex / clusterSize
                let entry = ti < tableSize ? rd64(d, tableOffset + 8 * ti) : 0
                let off = Int(entry & 0x00ff_ffff_ffff_fe00)
                let end = min(nbytes, (ti + 1) * clusterSize)
                while byteIndex < end {
                    let v: UInt8 = off == 0 ? (entry & 1 != 0 ? 0xff : 0) : byte(off + byteIndex % clusterSize)
                    if v == 0 && runStart < 0 {
                        byteIndex += 1
                        continue
                    }
                    if v == 0xff && runStart >= 0 {
                        byteIndex += 1
                        continue
                    }
                    for bit in 0..<8 {
                        let g = byteIndex * 8 + bit
                        guard g < granules else { break }
                        if (v >> UInt8(bit)) & 1 != 0 {
                            if runStart < 0 { runStart = g }
                        } else {
                            close(g)
                        }
                    }
                    byteIndex += 1
                }
            }
            close(granules)
            dirty = "[" + ranges.joined(separator: ",") + "]"
        }
        out.append(DecodedBitmap(name: name, granularityBits: gbits, flags: flags, dirty: dirty))
        e += (24 + extra + nameSize + 7) & ~7
    }
    return out
}

// MARK: - QEMU's own view: qemu-storage-daemon + nbdinfo

/// The dirty map of bitmap `name` as qemu-storage-daemon exports it over
/// NBD (`nbdinfo --map=qemu:dirty-bitmap:NAME`).
func qsdDirtyMap(_ path: String, _ name: String, daemon: String = "qemu-storage-daemon") throws -> String {
    let tmp = TempDir()
    let sock = tmp.file("s")
    let p = try ChildProcess(["/usr/bin/env", daemon,
                   "--blockdev", "driver=file,filename=\(path),node-name=f,read-only=on",
                   "--blockdev", "driver=qcow2,file=f,node-name=q,read-only=on",
                   "--nbd-server", "addr.type=unix,addr.path=\(sock)",
                   "--export", "nbd,id=e,node-name=q,name=x,bitmaps.0=\(name)"])
    defer {
        // The test process may have signals such as SIGTERM blocked, which
        // the child inherits; the daemon is read-only, so SIGKILL it.
        p.signal(SIGKILL)
        _ = p.wait()
    }
    for _ in 0..<400 {
        if FileManager.default.fileExists(atPath: sock) || p.poll() != nil { break }
        usleep(25_000)
    }
    let r = try run(["nbdinfo", "--map=qemu:dirty-bitmap:\(name)", "nbd+unix:///x?socket=\(sock)"], timeout: 30)
    return r.status == 0 ? r.stdout : "nbdinfo failed: \(r)"
}

// MARK: - Helpers

/// QEMU's node names carry two random digits ("#block138").
func normalizeNodeNames(_ r: ProcessResult) -> ProcessResult {
    var r = r
    let re = try! NSRegularExpression(pattern: "#block[0-9]+")
    for keyPath in [\ProcessResult.stdout, \ProcessResult.stderr] {
        let s = r[keyPath: keyPath]
        r[keyPath: keyPath] = re.stringByReplacingMatches(in: s, range: NSRange(s.startIndex..., in: s), withTemplate: "#blockN")
    }
    return r
}

/// `info --output=json` (by qemu-img) without the allocation-dependent size.
func jsonInfoWithoutSize(_ r: ProcessResult) -> ProcessResult {
    var r = r
    r.stdout = r.stdout.split(separator: "\n", omittingEmptySubsequences: false)
        .filter { !$0.contains("\"actual-size\"") }.joined(separator: "\n")
    return r
}

/// The state both tools must leave alike: qemu-img's JSON info, a clean
/// check (when qemu-img's own result checks clean), and the stored bits.
func expectSameBitmapState(_ twin: TwinDirs, _ image: String, _ label: String, leaksAllowed: Bool = false,
                           sourceLocation: SourceLocation = #_sourceLocation) throws {
    let info = try twin.judge(["info", "--output=json", image])
    expectSameResult(jsonInfoWithoutSize(info.qemu), jsonInfoWithoutSize(info.lamina), "info of \(label)",
                     sourceLocation: sourceLocation)
    let check = try twin.judge(["check", image])
    if check.qemu.status == 0 {
        #expect(check.lamina.status == 0 || (leaksAllowed && check.lamina.status == 3), "qemu-img check of lamina's \(image) (\(label)): \(check.lamina)",
                sourceLocation: sourceLocation)
    }
    let qb = decodeBitmaps(twin.q + "/" + image)
    let lb = decodeBitmaps(twin.l + "/" + image)
    #expect(qb == lb, "bitmaps of \(label):\nqemu:   \(qb)\nlamina: \(lb)", sourceLocation: sourceLocation)
}

/// A fixture directory built with qemu-img/qemu-io.
func makeBitmapFixture() throws -> TempDir {
    let dir = TempDir()
    let steps: [[String]] = [
        ["qemu-img", "create", "-q", "-f", "qcow2", "a.qcow2", "64M"],
        ["qemu-img", "bitmap", "--add", "a.qcow2", "b0"],
        ["qemu-img", "bitmap", "--add", "-g", "128k", "--disable", "a.qcow2", "b1"],
        ["qemu-io", "-f", "qcow2", "-c", "write 0 1M", "-c", "write 10M 64k", "-c", "write 63M 1M", "a.qcow2"],
        ["qemu-img", "create", "-q", "-f", "qcow2", "s.qcow2", "64M"],
        ["qemu-img", "bitmap", "--add", "-g", "4k", "s.qcow2", "sb"],
        ["qemu-io", "-f", "qcow2", "-c", "write 30M 2M", "-c", "write 40M 4k", "s.qcow2"],
        ["qemu-img", "create", "-q", "-f", "qcow2", "big.qcow2", "128M"],
        ["qemu-img", "bitmap", "--add", "big.qcow2", "bb"],
        ["qemu-img", "create", "-q", "-f", "raw", "r.raw", "1M"],
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "64M"],
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "c512.qcow2", "16M"],
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", "c2m.qcow2", "64M"],
        // br.qcow2: x and y left in use by a writer that died, z added after.
        ["qemu-img", "create", "-q", "-f", "qcow2", "br.qcow2", "64M"],
        ["qemu-img", "bitmap", "--add", "br.qcow2", "x"],
        ["qemu-img", "bitmap", "--add", "--disable", "br.qcow2", "y"],
        ["qemu-io", "-f", "qcow2", "-c", "write 0 64k", "-c", "abort", "br.qcow2"],
        ["qemu-img", "bitmap", "--add", "br.qcow2", "z"],
        ["qemu-io", "-f", "qcow2", "-c", "write 1M 64k", "br.qcow2"],
    ]
    for s in steps {
        let r = try run(s, cwd: dir.path)
        if s.contains("abort") { continue }
        if r.status != 0 { Issue.record("fixture step \(s): \(r)") }
    }
    return dir
}

@Suite("lamina-img bitmap and persistent bitmaps", .serialized)
struct ImgBitmapTests {
    /// (command lines run in order by both tools, image to compare after).
    static let sequences: [([[String]], String)] = {
        let long1024 = String(repeating: "x", count: 1024)
        let long1023 = String(repeating: "y", count: 1023)
        var s: [([[String]], String)] = []
        func one(_ args: [String], _ image: String = "a.qcow2") { s.append(([["bitmap"] + args], image)) }
        // add
        one(["--add", "a.qcow2", "n0"])
        one(["--add", "-g", "512", "a.qcow2", "n0"])
        one(["--add", "-g", "2G", "a.qcow2", "n0"])
        one(["--add", "--granularity=1M", "a.qcow2", "n0"])
        one(["--add", "-g", "4G", "a.qcow2", "n0"])
        one(["--add", "-g", "4294967808", "a.qcow2", "n0"])
        one(["--add", "-g", "1000", "a.qcow2", "n0"])
        one(["--add", "-g", "256", "a.qcow2", "n0"])
        one(["--add", "-g", "0", "a.qcow2", "n0"])
        one(["--add", "-g", "-1", "a.qcow2", "n0"])
        one(["--add", "-g", "abc", "a.qcow2", "n0"])
        one(["--add", "--disable", "a.qcow2", "n0"])
        one(["--disable", "--add", "a.qcow2", "n0"])
        one(["--add", "a.qcow2", "b0"])
        one(["--add", "--add", "a.qcow2", "n0"])
        one(["--add", "a.qcow2", ""])
        one(["--add", "a.qcow2", long1024])
        one(["--add", "a.qcow2", long1023])
        one(["--add", "c512.qcow2", "d"], "c512.qcow2")
        one(["--add", "c2m.qcow2", "d"], "c2m.qcow2")
        one(["--add", "v2.qcow2", "b0"], "v2.qcow2")
        // remove, clear, enable, disable
        one(["--remove", "a.qcow2", "b0"])
        one(["--remove", "a.qcow2", "nope"])
        one(["--remove", "--remove", "a.qcow2", "b1"])
        one(["--clear", "a.qcow2", "b0"])
        one(["--clear", "a.qcow2", "nope"])
        one(["--enable", "a.qcow2", "b1"])
        one(["--enable", "a.qcow2", "nope"])
        one(["--disable", "a.qcow2", "b0"])
        one(["--disable", "--enable", "--disable", "a.qcow2", "b0"])
        // merge
        one(["--merge", "b0", "a.qcow2", "b1"])
        one(["--merge", "b1", "a.qcow2", "b0"])
        one(["--merge", "nope", "a.qcow2", "b0"])
        one(["--merge", "b0", "a.qcow2", "nope"])
        one(["--merge", "b0", "a.qcow2", "b0"])
        one(["--merge", "sb", "-b", "s.qcow2", "a.qcow2", "b1"])
        one(["--merge", "sb", "-b", "s.qcow2", "-F", "qcow2", "a.qcow2", "b0"])
        one(["--merge", "bb", "-b", "big.qcow2", "a.qcow2", "b0"])
        one(["--merge", "b0", "-b", "a.qcow2", "a.qcow2", "b0"])
        one(["--merge", "b0", "-b", "missing.qcow2", "a.qcow2", "b1"])
        one(["--merge", "sb", "-b", "s.qcow2", "-F", "raw", "a.qcow2", "b1"])
        // several actions in one call
        one(["--add", "--merge", "b0", "--disable", "a.qcow2", "n0"])
        one(["--add", "-g", "8k", "--merge", "sb", "-b", "s.qcow2", "a.qcow2", "n0"])
        one(["--remove", "--add", "-g", "1M", "a.qcow2", "b0"])
        one(["--clear", "--remove", "--add", "--disable", "a.qcow2", "b1"])
        one(["--add", "--remove", "--merge", "b0", "a.qcow2", "n0"])
        s.append(([["bitmap", "--clear", "--remove", "a.qcow2", "b0"], ["bitmap", "--add", "a.qcow2", "b0"],
                   ["bitmap", "--add", "a.qcow2", "b2"], ["bitmap", "--merge", "b1", "a.qcow2", "b2"]], "a.qcow2"))
        // removing every bitmap drops the extension and the autoclear bit
        s.append(([["bitmap", "--remove", "a.qcow2", "b0"], ["bitmap", "--remove", "a.qcow2", "b1"]], "a.qcow2"))
        s.append(([["bitmap", "--remove", "a.qcow2", "b0"], ["bitmap", "--remove", "a.qcow2", "b1"],
                   ["bitmap", "--add", "-g", "16k", "a.qcow2", "again"]], "a.qcow2"))
        // usage errors
        one(["a.qcow2", "b0"])
        one(["--add", "a.qcow2"])
        one(["--add", "a.qcow2", "b0", "extra"])
        one(["-g", "64k", "--remove", "a.qcow2", "b0"])
        one(["-F", "qcow2", "--add", "a.qcow2", "b0"])
        one(["-b", "s.qcow2", "--add", "a.qcow2", "b0"])
        one(["--bogus", "a.qcow2", "b0"])
        one(["--merge"])
        one(["-g"])
        one(["-z", "a.qcow2", "b0"])
        // other formats and files
        one(["--add", "-f", "raw", "r.raw", "b0"], "r.raw")
        one(["--add", "r.raw", "b0"], "r.raw")
        one(["--remove", "-f", "raw", "r.raw", "b0"], "r.raw")
        one(["--merge", "b0", "-f", "raw", "r.raw", "b0"], "r.raw")
        one(["--add", "-f", "raw", "a.qcow2", "b9"])
        one(["--add", "nonexist.qcow2", "b0"], "a.qcow2")
        one(["--add", "-f", "bogus", "a.qcow2", "b0"])
        // inconsistent bitmaps (in use after a crash)
        for act in ["--clear", "--enable", "--disable"] { one([act, "br.qcow2", "x"], "br.qcow2") }
        one(["--merge", "x", "br.qcow2", "z"], "br.qcow2")
        one(["--merge", "z", "br.qcow2", "x"], "br.qcow2")
        one(["--add", "br.qcow2", "x"], "br.qcow2")
        one(["--remove", "br.qcow2", "x"], "br.qcow2")
        one(["--add", "br.qcow2", "w"], "br.qcow2")
        one(["--merge", "z", "br.qcow2", "z"], "br.qcow2")
        one(["--remove", "br.qcow2", "y"], "br.qcow2")
        return s
    }()

    @Test("action sequences: same output, info, check and bits as qemu-img", arguments: 0..<sequences.count)
    func sequence(_ index: Int) throws {
        let fixture = try Self.sharedFixture()
        let (steps, image) = Self.sequences[index]
        let twin = try TwinDirs(copying: fixture.path)
        for args in steps {
            let (q, l) = try twin.runTools(args)
            expectSameResult(normalizeNodeNames(q), normalizeNodeNames(l), args.joined(separator: " "))
        }
        try expectSameBitmapState(twin, image, steps.map { $0.joined(separator: " ") }.joined(separator: "; "))
    }

    nonisolated(unsafe) static var fixture: TempDir?
    static let fixtureLock = NSLock()
    static func sharedFixture() throws -> TempDir {
        fixtureLock.lock()
        defer { fixtureLock.unlock() }
        if let f = fixture { return f }
        let f = try makeBitmapFixture()
        fixture = f
        return f
    }

    /// Guest writes mark the enabled bitmaps the same way in both tools:
    /// qemu-io/qemu-img in q/, lamina-io/lamina-img in l/, steps interleaved
    /// with bitmap actions; QEMU reads lamina's bitmaps (qemu-storage-daemon
    /// over NBD) with the bits it wrote itself.
    @Test("writes mark enabled bitmaps; QEMU reads the same bits")
    func writesAndActions() throws {
        let twin = try TwinDirs(copying: nil)
        for d in [twin.q, twin.l] {
            for s in [["qemu-img", "create", "-q", "-f", "qcow2", "w.qcow2", "64M"],
                      ["qemu-img", "bitmap", "--add", "w.qcow2", "b0"],
                      ["qemu-img", "bitmap", "--add", "-g", "1M", "w.qcow2", "b1"],
                      ["qemu-img", "bitmap", "--add", "--disable", "w.qcow2", "b2"]] {
                #expect(try run(s, cwd: d).status == 0)
            }
        }
        func io(_ cmds: [String]) throws {
            let args = ["-f", "qcow2"] + cmds.flatMap { ["-c", $0] } + ["w.qcow2"]
            let q = try run(["qemu-io"] + args, cwd: twin.q)
            let l = try run([laminaIO] + args, cwd: twin.l)
            #expect(q.status == 0 && l.status == 0, "io \(cmds): \(q) \(l)")
        }
        func img(_ args: [String]) throws {
            let (q, l) = try twin.runTools(args)
            expectSameResult(normalizeNodeNames(q), normalizeNodeNames(l), args.joined(separator: " "))
        }
        try io(["write 100k 5k", "write -z 20M 3M", "discard 40M 1M", "write 63M 1M", "write -z -u 50M 64k"])
        try expectSameBitmapState(twin, "w.qcow2", "after first writes")
        try img(["bitmap", "--merge", "b0", "w.qcow2", "b2"])
        try img(["bitmap", "--add", "-g", "4k", "w.qcow2", "n"])
        try io(["write 7M 4k", "write 8M 1", "write 33M 130k"])
        try expectSameBitmapState(twin, "w.qcow2", "after merge, add, writes")
        try img(["bitmap", "--enable", "--merge", "n", "w.qcow2", "b2"])
        try img(["bitmap", "--clear", "--disable", "w.qcow2", "b0"])
        try io(["write 5M 4k", "write 0 512"])
        try expectSameBitmapState(twin, "w.qcow2", "after enable, clear, disable, writes")
        // Cross: each tool acts on the other tool's image.
        let qx = try run([laminaImg, "bitmap", "--merge", "n", "w.qcow2", "b1"], cwd: twin.q)
        let lx = try run(["qemu-img", "bitmap", "--merge", "n", "w.qcow2", "b1"], cwd: twin.l)
        #expect(qx.status == 0 && lx.status == 0, "\(qx) \(lx)")
        try expectSameBitmapState(twin, "w.qcow2", "after cross merges")
        for name in ["b0", "b1", "b2", "n"] {
            let q = try qsdDirtyMap(twin.q + "/w.qcow2", name)
            let l = try qsdDirtyMap(twin.l + "/w.qcow2", name)
            #expect(q == l, "QSD's view of \(name):\nqemu:\n\(q)\nlamina:\n\(l)")
            // Lamina's daemon exports the bitmap as QEMU's does.
            let ld = try qsdDirtyMap(twin.l + "/w.qcow2", name, daemon: productsDirectory + "/lamina-storage-daemon")
            #expect(ld == q, "lamina-storage-daemon's view of \(name):\n\(ld)\nQSD's:\n\(q)")
            #expect(q.contains("dirty") || name == "b0", "bitmap \(name) has dirty bits: \(q)")
        }
    }

    /// Bitmaps lamina-img adds and lamina-io marks are read by QEMU with
    /// the bits the test decoder finds, and lamina reads what QEMU wrote.
    @Test("cross interop: bits written by one tool read by the other")
    func crossInterop() throws {
        let dir = TempDir()
        for s in [[laminaImg, "create", "-q", "-f", "qcow2", "x.qcow2", "32M"],
                  [laminaImg, "bitmap", "--add", "-g", "512k", "x.qcow2", "l0"],
                  ["qemu-io", "-f", "qcow2", "-c", "write 1M 1M", "x.qcow2"],
                  [laminaIO, "-f", "qcow2", "-c", "write 20M 8k", "x.qcow2"],
                  ["qemu-img", "bitmap", "--add", "-g", "64k", "x.qcow2", "q0"],
                  [laminaIO, "-f", "qcow2", "-c", "write 3M 64k", "x.qcow2"],
                  [laminaImg, "bitmap", "--merge", "q0", "x.qcow2", "l0"]] {
            let r = try run(s, cwd: dir.path)
            #expect(r.status == 0, "\(s): \(r)")
        }
        let bits = decodeBitmaps(dir.file("x.qcow2"))
        #expect(bits.map(\.description) == ["l0 g=524288 flags=2 dirty=[2-3,6,40]", "q0 g=65536 flags=2 dirty=[48]"])
        #expect(try qsdDirtyMap(dir.file("x.qcow2"), "l0") == """
                     0     1048576    0  clean
               1048576     1048576    1  dirty
               2097152     1048576    0  clean
               3145728      524288    1  dirty
               3670016    17301504    0  clean
              20971520      524288    1  dirty
              21495808    12058624    0  clean

            """)
        #expect(try run(["qemu-img", "check", "x.qcow2"], cwd: dir.path).status == 0)
    }

    /// A writer killed after its first write leaves its bitmaps in use;
    /// both tools then report and refuse them alike.
    @Test("killed writer: bitmaps in use, reported and refused like qemu-img")
    func killedWriter() throws {
        let twin = try TwinDirs(copying: nil)
        for d in [twin.q, twin.l] {
            for s in [["qemu-img", "create", "-q", "-f", "qcow2", "k.qcow2", "64M"],
                      ["qemu-img", "bitmap", "--add", "k.qcow2", "b0"],
                      ["qemu-img", "bitmap", "--add", "--disable", "k.qcow2", "b1"]] {
                #expect(try run(s, cwd: d).status == 0)
            }
        }
        let q = try run(["qemu-io", "-f", "qcow2", "-c", "write 0 64k", "-c", "abort", "k.qcow2"], cwd: twin.q)
        let l = try run([laminaIO, "-f", "qcow2", "-c", "write 0 64k", "-c", "abort", "k.qcow2"], cwd: twin.l)
        #expect(q.status != 0 && l.status != 0)
        // A killed Lamina writer may leak clusters of its allocation
        // reserve (never corruption); qemu-io leaks none here.
        try expectSameBitmapState(twin, "k.qcow2", "after kill", leaksAllowed: true)
        #expect(decodeBitmaps(twin.l + "/k.qcow2").map(\.flags) == [3, 1])
        for args in [["info", "k.qcow2"], ["bitmap", "--clear", "k.qcow2", "b0"], ["bitmap", "--enable", "k.qcow2", "b1"],
                     ["convert", "--bitmaps", "-O", "qcow2", "k.qcow2", "o.qcow2"],
                     ["convert", "--bitmaps", "--skip-broken-bitmaps", "-O", "qcow2", "k.qcow2", "o2.qcow2"],
                     ["info", "o2.qcow2"], ["bitmap", "--remove", "k.qcow2", "b0"], ["bitmap", "--add", "k.qcow2", "b0"]] {
            var (q, l) = try twin.runTools(args)
            if args[0] == "info" || args[0] == "check" {
                q.stdout = q.stdout.split(separator: "\n").filter { !$0.hasPrefix("disk size") && !$0.hasPrefix("Image end") }.joined(separator: "\n")
                l.stdout = l.stdout.split(separator: "\n").filter { !$0.hasPrefix("disk size") && !$0.hasPrefix("Image end") }.joined(separator: "\n")
            }
            expectSameResult(q, l, args.joined(separator: " "))
        }
        try expectSameBitmapState(twin, "k.qcow2", "after remove and add", leaksAllowed: true)
        try expectSameBitmapState(twin, "o2.qcow2", "converted, broken skipped")
    }

    static let convertCases: [[String]] = [
        ["convert", "--bitmaps", "-O", "qcow2", "a.qcow2", "o.qcow2"],
        ["convert", "--bitmaps", "-c", "-O", "qcow2", "a.qcow2", "o.qcow2"],
        ["convert", "--bitmaps", "-O", "qcow2", "-o", "cluster_size=4k", "s.qcow2", "o.qcow2"],
        ["convert", "--bitmaps", "-O", "qcow2", "br.qcow2", "o.qcow2"],
        ["convert", "--bitmaps", "--skip-broken-bitmaps", "-O", "qcow2", "br.qcow2", "o.qcow2"],
        ["convert", "--skip-broken-bitmaps", "-O", "qcow2", "a.qcow2", "o.qcow2"],
        ["convert", "--bitmaps", "-O", "raw", "a.qcow2", "o.qcow2"],
        ["convert", "--bitmaps", "-O", "qcow2", "-o", "compat=0.10", "a.qcow2", "o.qcow2"],
        ["convert", "--bitmaps", "-f", "raw", "-O", "qcow2", "r.raw", "o.qcow2"],
        ["convert", "--bitmaps", "-O", "qcow2", "v2.qcow2", "o.qcow2"],
        ["convert", "--bitmaps", "-O", "qcow2", "a.qcow2", "s.qcow2", "o.qcow2"],
        ["convert", "-n", "--bitmaps", "-O", "qcow2", "s.qcow2", "a.qcow2"],
        ["convert", "-n", "--bitmaps", "-O", "qcow2", "a.qcow2", "s.qcow2"],
        ["convert", "--bitmaps", "-O", "qcow2", "big.qcow2", "o.qcow2"],
    ]

    @Test("convert --bitmaps: same result as qemu-img", arguments: 0..<convertCases.count)
    func convertBitmaps(_ index: Int) throws {
        let args = Self.convertCases[index]
        let twin = try TwinDirs(copying: try Self.sharedFixture().path)
        let (q, l) = try twin.runTools(args)
        expectSameResult(normalizeNodeNames(q), normalizeNodeNames(l), args.joined(separator: " "))
        let out = args.last!
        if q.status == 0 {
            try expectSameBitmapState(twin, out, args.joined(separator: " "))
            let c = try run(["qemu-img", "compare", "q/" + out, "l/" + out], cwd: twin.tmp.path)
            #expect(c.status == 0, "content: \(c)")
        }
    }

    /// Damaged bitmap structures: both tools refuse (or cope) alike, and
    /// lamina changes nothing it refuses.
    static let damage: [(String, @Sendable (String, BitmapLayout) throws -> Void)] = [
        // Not damage as such: a program without bitmap support wrote the
        // image; a read-write open drops the extension (both tools).
        ("autoclear bit cleared", { p, _ in try patch(p, at: 88, be64(0)) }),
        ("directory past the end", { p, b in try patch(p, at: UInt64(b.extOffset + 24), be64(0x1000_0000)) }),
        ("directory offset unaligned", { p, b in try patch(p, at: UInt64(b.extOffset + 24), be64(b.dirOffset + 1)) }),
        ("zero bitmaps", { p, b in try patch(p, at: UInt64(b.extOffset + 8), be32(0)) }),
        ("too many bitmaps", { p, b in try patch(p, at: UInt64(b.extOffset + 8), be32(70000)) }),
        ("directory too large", { p, b in try patch(p, at: UInt64(b.extOffset + 16), be64(0x1000_0000)) }),
        ("table past the end", { p, b in try patch(p, at: b.dirOffset, be64(0x1000_0000)) }),
        ("table offset unaligned", { p, b in try patch(p, at: b.dirOffset, be64(0x10001)) }),
        ("table size zero", { p, b in try patch(p, at: b.dirOffset + 8, be32(0)) }),
        ("granularity bits 40", { p, b in try patch(p, at: b.dirOffset + 17, [40]) }),
        ("granularity bits 8", { p, b in try patch(p, at: b.dirOffset + 17, [8]) }),
        ("unknown type", { p, b in try patch(p, at: b.dirOffset + 16, [2]) }),
        ("reserved flag", { p, b in try patch(p, at: b.dirOffset + 12, be32(0x12)) }),
        ("extra data", { p, b in try patch(p, at: b.dirOffset + 20, be32(8)) }),
        ("table entry unaligned", { p, b in
            let t = rd64(readFileBytes(p), Int(b.dirOffset))
            try patch(p, at: t, be64(0x12345))
        }),
        ("table entry all ones", { p, b in
            let t = rd64(readFileBytes(p), Int(b.dirOffset))
            try patch(p, at: t, be64(1))
        }),
        ("table entry reserved bits", { p, b in
            let t = rd64(readFileBytes(p), Int(b.dirOffset))
            try patch(p, at: t, be64(0x0100_0000_0000_0000))
        }),
    ]

    @Test("damaged bitmap structures: same messages, nothing changed", arguments: 0..<damage.count)
    func damaged(_ index: Int) throws {
        let (label, apply) = Self.damage[index]
        let twin = try TwinDirs(copying: nil)
        for d in [twin.q, twin.l] {
            for s in [["qemu-img", "create", "-q", "-f", "qcow2", "d.qcow2", "64M"],
                      ["qemu-img", "bitmap", "--add", "d.qcow2", "b0"],
                      ["qemu-io", "-f", "qcow2", "-c", "write 0 64k", "d.qcow2"]] {
                #expect(try run(s, cwd: d).status == 0)
            }
            let p = d + "/d.qcow2"
            guard let layout = bitmapLayout(p) else { Issue.record("no bitmaps extension"); return }
            try apply(p, layout)
        }
        let before = readFileBytes(twin.l + "/d.qcow2")
        for args in [["info", "--output=json", "d.qcow2"], ["check", "d.qcow2"], ["bitmap", "--clear", "d.qcow2", "b0"],
                     ["convert", "--bitmaps", "-O", "qcow2", "d.qcow2", "o.qcow2"], ["check", "d.qcow2"]] {
            let (q, l) = try twin.runTools(args)
            if args[0] == "info" {
                expectSameResult(jsonInfoWithoutSize(q), jsonInfoWithoutSize(l), "\(label): info")
            } else {
                expectSameResult(q, l, "\(label): \(args.joined(separator: " "))")
            }
            if l.status != 0 && args[0] == "bitmap" && label != "autoclear bit cleared" {
                #expect(readFileBytes(twin.l + "/d.qcow2") == before, "\(label): lamina changed a refused image")
            }
        }
        let check = try twin.judge(["check", "d.qcow2"])
        #expect(check.qemu.status == check.lamina.status, "\(label): check after: \(check.qemu) \(check.lamina)")
    }
}

// MARK: - Storage daemons: bitmaps stored on clean shutdown, in use after a kill

/// Sends QMP commands over a unix socket, one line each, reading the
/// greeting and every answer (bounded by a receive timeout).
func qmpSend(_ path: String, _ commands: [String]) -> Bool {
    let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { return false }
    defer { close(fd) }
    var tv = timeval(tv_sec: 20, tv_usec: 0)
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    var addr = sockaddr_un()
    addr.sun_family = sa_family_t(AF_UNIX)
    let bytes = Array(path.utf8)
    guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else { return false }
    withUnsafeMutableBytes(of: &addr.sun_path) { p in
        for (i, b) in bytes.enumerated() { p[i] = b }
        p[bytes.count] = 0
    }
    let ok = withUnsafePointer(to: &addr) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
    }
    guard ok == 0 else { return false }
    func readLine() -> Bool {
        var c: UInt8 = 0
        while true {
            let n = read(fd, &c, 1)
            if n <= 0 { return false }
            if c == 10 { return true }
        }
    }
    guard readLine() else { return false }
    for cmd in commands {
        let line = Array((cmd + "\n").utf8)
        guard write(fd, line, line.count) == line.count else { return false }
        // quit may close the connection before or after its answer.
        if !readLine() { return cmd.contains("\"quit\"") }
    }
    return true
}

enum DaemonEnd { case quit, blockdevDel, kill }

/// Runs a storage daemon (QEMU's or Lamina's) on `image` (qcow2 node "q"
/// exported writable over NBD), writes through NBD with qemu-io, then ends
/// it as told.
func daemonSession(_ binary: String, dir: String, image: String, io: [String], end: DaemonEnd) throws {
    let qmp = dir + "/qmp.sock", nbd = dir + "/nbd.sock", pidfile = dir + "/d.pid"
    for f in [qmp, nbd, pidfile] { try? FileManager.default.removeItem(atPath: f) }
    let p = try ChildProcess([binary.contains("/") ? binary : "/usr/bin/" + binary,
                   "--chardev", "socket,id=m0,path=\(qmp),server=on,wait=off", "--monitor", "chardev=m0",
                   "--blockdev", "driver=file,filename=\(dir)/\(image),node-name=f",
                   "--blockdev", "driver=qcow2,file=f,node-name=q",
                   "--nbd-server", "addr.type=unix,addr.path=\(nbd)",
                   "--export", "nbd,id=e,node-name=q,name=x,writable=on", "--pidfile", pidfile])
    defer {
        p.signal(SIGKILL)
        _ = p.wait()
    }
    for _ in 0..<800 {
        if FileManager.default.fileExists(atPath: pidfile) || p.poll() != nil { break }
        usleep(25_000)
    }
    let r = try run(["qemu-io", "-f", "raw"] + io.flatMap { ["-c", $0] } + ["nbd+unix:///x?socket=\(nbd)"], timeout: 60)
    #expect(r.status == 0, "qemu-io over NBD (\(binary)): \(r)")
    switch end {
    case .kill:
        p.signal(SIGKILL)
    case .quit:
        #expect(qmpSend(qmp, ["{\"execute\":\"qmp_capabilities\"}", "{\"execute\":\"quit\"}"]), "\(binary): quit")
    case .blockdevDel:
        #expect(qmpSend(qmp, ["{\"execute\":\"qmp_capabilities\"}",
                              "{\"execute\":\"block-export-del\",\"arguments\":{\"id\":\"e\"}}",
                              "{\"execute\":\"blockdev-del\",\"arguments\":{\"node-name\":\"q\"}}",
                              "{\"execute\":\"quit\"}"]), "\(binary): blockdev-del")
    }
    for _ in 0..<800 where p.poll() == nil { usleep(25_000) }
}

@Suite("persistent bitmaps in the storage daemon", .serialized)
struct DaemonBitmapTests {
    @Test("clean shutdown stores the bits, a kill leaves them in use: as qemu-storage-daemon",
          arguments: [DaemonEnd.quit, .blockdevDel, .kill])
    func session(_ end: DaemonEnd) throws {
        let twin = try TwinDirs(copying: nil)
        for d in [twin.q, twin.l] {
            for s in [["qemu-img", "create", "-q", "-f", "qcow2", "d.qcow2", "64M"],
                      ["qemu-img", "bitmap", "--add", "d.qcow2", "b0"],
                      ["qemu-img", "bitmap", "--add", "-g", "1M", "d.qcow2", "b1"],
                      ["qemu-img", "bitmap", "--add", "--disable", "d.qcow2", "b2"]] {
                #expect(try run(s, cwd: d).status == 0)
            }
        }
        let io = ["write 0 64k", "write -z 5M 2M", "discard 10M 1M", "write 63M 4k", "flush"]
        try daemonSession("qemu-storage-daemon", dir: twin.q, image: "d.qcow2", io: io, end: end)
        try daemonSession(productsDirectory + "/lamina-storage-daemon", dir: twin.l, image: "d.qcow2", io: io, end: end)
        try expectSameBitmapState(twin, "d.qcow2", "daemon \(end)", leaksAllowed: end == .kill)
        let flags = decodeBitmaps(twin.l + "/d.qcow2").map(\.flags)
        #expect(flags == (end == .kill ? [3, 3, 1] : [2, 2, 0]))
        if end != .kill {
            // (The NBD export ignores discard without discard=unmap, in both.)
            #expect(decodeBitmaps(twin.l + "/d.qcow2").map(\.dirty) == ["[0,80-111,1008]", "[0,5-6,63]", "[]"])
        }
    }
}

@Suite("bitmap store killed mid-way", .serialized)
struct BitmapStoreCrashTests {
    /// `lamina-img bitmap --merge` writes a multi-cluster bitmap at close;
    /// killed at random instants, the image is never corrupt and holds the
    /// old or the new bitmap, nothing else.
    @Test("kill -9 during the store at close")
    func killDuringStore() throws {
        let dir = TempDir()
        let img = dir.file("k.qcow2")
        for s in [["qemu-img", "create", "-q", "-f", "qcow2", img, "16G"],
                  ["qemu-img", "bitmap", "--add", "-g", "512", img, "b0"],
                  ["qemu-img", "bitmap", "--add", "-g", "512", "--disable", img, "b1"]] {
            #expect(try run(s).status == 0)
        }
        let writes = (0..<64).map { "write \($0 * 256)M 4k" }
        #expect(try run(["qemu-io", "-f", "qcow2"] + writes.flatMap { ["-c", $0] } + [img]).status == 0)
        let before = decodeBitmaps(img)
        try #require(before.count == 2 && before[0].dirty != "[]" && before[1].dirty == "[]")
        var rng = SeededRandom(seed: 7)
        var sawOld = false, sawNew = false
        for round in 0..<8 {
            let args = round % 2 == 0 ? ["bitmap", "--merge", "b0", img, "b1"] : ["bitmap", "--clear", img, "b1"]
            let p = try ChildProcess([laminaImg] + args)
            usleep(UInt32.random(in: 5_000...400_000, using: &rng))
            p.signal(SIGKILL)
            _ = p.wait()
            let chk = try run(["qemu-img", "check", img])
            #expect(chk.status == 0 || chk.status == 3, "round \(round): \(chk)")
            #expect(!chk.stdout.contains("Data may be corrupted"), "\(chk)")
            let after = decodeBitmaps(img)
            #expect(after.count == 2 && after[0] == before[0], "round \(round): \(after)")
            if after.count == 2 {
                let merged = after[1].dirty == before[0].dirty
                #expect(merged || after[1].dirty == "[]", "round \(round): b1 is \(after[1])")
                if (round % 2 == 0) == merged { sawNew = true } else { sawOld = true }
            }
            // Bring the image to a known state for the next round.
            let fix = try run([laminaImg, "bitmap", round % 2 == 0 ? "--merge" : "--clear"]
                              + (round % 2 == 0 ? ["b0", img, "b1"] : [img, "b1"]))
            #expect(fix.status == 0, "\(fix)")
            _ = try run(["qemu-img", "check", "-q", "-r", "leaks", img])
        }
        #expect(try run(["qemu-img", "check", img]).status == 0)
        _ = (sawOld, sawNew)
    }
}

@Suite("bitmaps exported over NBD: start-up errors")
struct ExportBitmapErrorTests {
    /// The same `--export ...,bitmaps.0=NAME` refusals (message, exit code)
    /// from both daemons.
    @Test("export bitmap refusals match qemu-storage-daemon", arguments: [
        ("a.qcow2", "zz", false), ("a.qcow2", "b0", false), ("s.qcow2", "sb", false), ("br.qcow2", "x", true),
    ])
    func refusal(_ image: String, _ bitmap: String, _ writable: Bool) throws {
        let fixture = try ImgBitmapTests.sharedFixture()
        let twin = try TwinDirs(copying: fixture.path)
        func start(_ binary: String, _ dir: String) throws -> ProcessResult {
            var r = try run([binary, "--blockdev", "driver=file,filename=\(image),node-name=f",
                             "--blockdev", "driver=qcow2,file=f,node-name=q",
                             "--nbd-server", "addr.type=unix,addr.path=\(dir)/s.sock",
                             "--export", "nbd,id=e,node-name=q,name=x,writable=\(writable ? "on" : "off"),bitmaps.0=\(bitmap)"],
                            cwd: dir, timeout: 30)
            r.stderr = r.stderr.replacingOccurrences(of: "lamina-storage-daemon", with: "qemu-storage-daemon")
                .replacingOccurrences(of: dir, with: "@DIR@")
            return r
        }
        let q = try start("qemu-storage-daemon", twin.q)
        let l = try start(productsDirectory + "/lamina-storage-daemon", twin.l)
        #expect(q.status != 0)
        expectSameResult(q, l, "export \(bitmap) of \(image)")
    }
}
