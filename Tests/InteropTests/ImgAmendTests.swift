import Foundation
import TestSupport
import Testing

// `lamina-img amend` against the real qemu-img 7.2: twin copies of images
// built by qemu-img/qemu-io (data, zero clusters, discards, compressed
// clusters, backing files, snapshots), the same amend run by both tools;
// then same stdout/stderr/status, same `info --output=json` (without the
// file's allocated size), content unchanged (`qemu-img compare` with the
// image before amend), `qemu-img check` as clean as qemu-img's own result,
// and the amended image still usable (more writes by qemu-io, check again).

@Suite("ImgAmend")
struct ImgAmendTests {
    /// qemu-io commands that give an image every kind of L2 entry.
    static let varietyWrites: [String] = [
        "write -P 0xaa 0 192k", "write -z 256k 128k", "write -c -P 0xbb 512k 128k", "write -P 0xcc 1M 256k",
        "discard 1088k 64k", "write -z 2M 64k", "write -z -u 1152k 64k", "write -c -P 0xdd 3M 64k",
    ]

    struct Shell {
        let dir: String
        var problems: [String] = []
        mutating func img(_ args: [String]) {
            let r = (try? run(["qemu-img"] + args, cwd: dir)) ?? ProcessResult(status: -1, stdout: "", stderr: "spawn")
            if r.status != 0 { problems.append("qemu-img \(args): \(r)") }
        }
        mutating func io(_ file: String, _ cmds: [String], format: String = "qcow2", allowFailure: Bool = false) {
            var args = ["qemu-io", "-f", format]
            for c in cmds { args += ["-c", c] }
            let r = (try? run(args + [file], cwd: dir)) ?? ProcessResult(status: -1, stdout: "", stderr: "spawn")
            if r.status != 0 && !allowFailure { problems.append("qemu-io \(cmds): \(r)") }
        }
    }

    /// Builds `img.qcow2` (plus `base.qcow2` with `backing`) in a fresh
    /// directory, runs `extra`, and keeps a copy as `orig.qcow2`.
    static func fixture(create: String, backing: Bool = false, writes: [String] = varietyWrites,
                        extra: (inout Shell) -> Void = { _ in }) throws -> TempDir {
        let t = TempDir()
        var sh = Shell(dir: t.path)
        var opts = create
        if backing {
            sh.img(["create", "-q", "-f", "qcow2", "base.qcow2", "4M"])
            sh.io("base.qcow2", ["write -P 0x11 0 4M"])
            opts += (opts.isEmpty ? "" : ",") + "backing_file=base.qcow2,backing_fmt=qcow2"
        }
        sh.img(["create", "-q", "-f", "qcow2"] + (opts.isEmpty ? [] : ["-o", opts]) + ["img.qcow2", "4M"])
        if !writes.isEmpty { sh.io("img.qcow2", writes) }
        extra(&sh)
        sh.img(["convert", "-f", "qcow2", "-O", "qcow2", "img.qcow2", "orig.qcow2"])
        if backing {
            // orig.qcow2 is flattened; the content comparison is then on the whole chain.
        }
        #expect(sh.problems.isEmpty, "fixture: \(sh.problems)")
        return t
    }

    static func withoutActualSize(_ r: ProcessResult) -> ProcessResult {
        var r = r
        r.stdout = r.stdout.split(separator: "\n", omittingEmptySubsequences: false)
            .filter { !$0.contains("\"actual-size\"") }.joined(separator: "\n")
        return r
    }

    /// `laminaClean`: QEMU's own result has check errors (its downgrade
    /// sets OFLAG_COPIED on zero clusters shared with snapshots), Lamina's must not.
    enum CheckExpectation { case clean, sameAsQemu, laminaClean }

    /// Runs one amend in both twins and compares everything.
    @discardableResult
    static func amendBoth(_ fixture: TempDir, _ args: [String], label: String, check: CheckExpectation = .clean,
                          writeAfter: Bool = true,
                          sourceLocation: SourceLocation = #_sourceLocation) throws -> TwinDirs {
        let twin = try TwinDirs(copying: fixture.path)
        let r = try twin.runTools(["amend"] + args + ["img.qcow2"])
        expectSameResult(r.qemu, r.lamina, "amend \(args) [\(label)]", sourceLocation: sourceLocation)
        try compareAfter(twin, label: label + " amend \(args)", check: check, sourceLocation: sourceLocation)
        if writeAfter && r.qemu.status == 0 && check != .sameAsQemu {
            // The amended image keeps working: more writes by qemu-io.
            for d in [twin.q, twin.l] {
                var sh = Shell(dir: d)
                sh.io("img.qcow2", ["write -P 0x77 64k 128k", "write -z 1M 64k", "write -P 0x78 3584k 256k", "discard 512k 64k"])
                #expect(sh.problems.isEmpty, "\(label): writes after amend: \(sh.problems)", sourceLocation: sourceLocation)
            }
            let c = try twin.judge(["check", "img.qcow2"])
            #expect(c.lamina.status == 0, "\(label): check after further writes:\n\(c.lamina)", sourceLocation: sourceLocation)
            let cmp = try run(["qemu-img", "compare", "q/img.qcow2", "l/img.qcow2"], cwd: twin.tmp.path)
            #expect(cmp.status == 0, "\(label): content after further writes: \(cmp)", sourceLocation: sourceLocation)
        }
        return twin
    }

    static func compareAfter(_ twin: TwinDirs, label: String, check: CheckExpectation,
                             sourceLocation: SourceLocation = #_sourceLocation) throws {
        let info = try twin.judge(["info", "--output=json", "img.qcow2"])
        expectSameResult(withoutActualSize(info.qemu), withoutActualSize(info.lamina), "info of \(label)",
                         sourceLocation: sourceLocation)
        let c = try twin.judge(["check", "img.qcow2"])
        switch check {
        case .clean:
            #expect(c.qemu.status == 0, "qemu's own result not clean? \(label)\n\(c.qemu)", sourceLocation: sourceLocation)
            #expect(c.lamina.status == 0 && c.lamina.stdout.hasPrefix("No errors were found"),
                    "check of lamina's result, \(label):\n\(c.lamina)", sourceLocation: sourceLocation)
        case .laminaClean:
            #expect(c.lamina.status == 0 && c.lamina.stdout.hasPrefix("No errors were found"),
                    "check of lamina's result, \(label):\n\(c.lamina)", sourceLocation: sourceLocation)
        case .sameAsQemu:
            #expect(c.qemu.status == c.lamina.status, "check status \(label): qemu \(c.qemu) lamina \(c.lamina)",
                    sourceLocation: sourceLocation)
        }
        for d in ["q", "l"] {
            let cmp = try run(["qemu-img", "compare", "q/orig.qcow2", d + "/img.qcow2"], cwd: twin.tmp.path)
            #expect(cmp.status == 0 && cmp.stdout == "Images are identical.\n",
                    "content after amend (\(d)), \(label): \(cmp)", sourceLocation: sourceLocation)
        }
    }

    static func bytes(_ path: String) -> Data { FileManager.default.contents(atPath: path) ?? Data() }

    // MARK: - Command line and option errors

    @Test func commandLineAndOptionErrors() throws {
        let f = try Self.fixture(create: "compat=v3")
        let optionLists = [
            "cluster_size=4k", "preallocation=full", "compression_type=zstd", "extended_l2=on", "encryption=on",
            "encrypt.format=luks", "encrypt.new-secret=x", "encrypt.keyslot=1", "nocow=on", "foo=bar", "compat=v4",
            "compat=", "refcount_bits=3", "refcount_bits=128", "refcount_bits=0", "refcount_bits=abc",
            "lazy_refcounts=maybe", "size=abc", "data_file=x", "data_file_raw=on", "backing_file=x", "backing_fmt=raw",
            "", "a,,b", "compat=v2,,b", "lazy_refcounts,,compat=v2", "compat=v2,refcount_bits=8",
            "compat=v2,lazy_refcounts=on", "compat=v4,encrypt.keyslot=1", "refcount_bits=3,compat=v4",
            "data_file_raw=on,refcount_bits=3", "cluster_size=4k,foo=1", "help", "?", "help,compat=v2",
        ]
        let twin = try TwinDirs(copying: f.path)
        let before = Self.bytes(twin.q + "/img.qcow2")
        for o in optionLists {
            let r = try twin.runTools(["amend", "-o", o, "img.qcow2"])
            expectSameResult(r.qemu, r.lamina, "amend -o '\(o)'")
        }
        let lines: [[String]] = [
            ["amend", "img.qcow2"], ["amend"], ["amend", "-o", "compat=v2"], ["amend", "-f", "raw", "-o", "size=1M", "img.qcow2"],
            ["amend", "-f", "raw", "-o", "help"], ["amend", "-f", "qcow2", "-o", "help"], ["amend", "-o", "help"],
            ["amend", "-f", "foo", "-o", "help"], ["amend", "-f", "vmdk", "-o", "help"], ["amend", "-f", "file", "-o", "size=1M", "img.qcow2"],
            ["amend", "-t", "foo", "-o", "compat=v2", "img.qcow2"], ["amend", "-o", "compat=v2", "img.qcow2", "other.qcow2"],
            ["amend", "-o", "compat=v2", "missing.qcow2"], ["amend", "-x", "-o", "compat=v2", "img.qcow2"],
            ["amend", "-o", "compat=v2", "-t"], ["amend", "-o", "compat=v2", "-o", ",,", "img.qcow2"],
            ["amend", "-o", "compat=v2", "-o", "help", "img.qcow2"], ["amend", "-p", "-o", "compat=v4", "img.qcow2"],
            ["amend", "-p", "-o", "foo=1", "img.qcow2"], ["amend", "-p", "-o", "compat=v2", "img.qcow2", "x"],
            ["amend", "-q", "-p", "-o", "compat=v4", "img.qcow2"], ["amend", "-p", "-o", "help", "img.qcow2"],
        ]
        for l in lines {
            let r = try twin.runTools(l)
            expectSameResult(r.qemu, r.lamina, "\(l)")
        }
        // Errors change nothing.
        #expect(Self.bytes(twin.q + "/img.qcow2") == before, "qemu-img changed the image on error")
        #expect(Self.bytes(twin.l + "/img.qcow2") == before, "lamina-img changed the image on error")
    }

    @Test func cacheModesForceQuietAndRawFiles() throws {
        let f = try Self.fixture(create: "compat=v3")
        try Self.amendBoth(f, ["-t", "none", "-o", "compat=v2"], label: "cache none")
        try Self.amendBoth(f, ["-t", "unsafe", "-o", "lazy_refcounts=on"], label: "cache unsafe")
        try Self.amendBoth(f, ["-t", "writethrough", "-q", "--force", "-o", "refcount_bits=32"], label: "writethrough -q --force")
        let t = TempDir()
        _ = try run(["qemu-img", "create", "-q", "-f", "raw", "r.raw", "1M"], cwd: t.path)
        let twin = try TwinDirs(copying: t.path)
        for args in [["amend", "-o", "compat=v2", "r.raw"], ["amend", "-f", "qcow2", "-o", "compat=v2", "r.raw"],
                     ["amend", "-f", "raw", "-o", "compat=v2", "r.raw"], ["amend", "-o", "help", "r.raw"]] {
            let r = try twin.runTools(args)
            expectSameResult(r.qemu, r.lamina, "\(args)")
        }
    }

    @Test func noOpAmendsKeepTheImage() throws {
        let f = try Self.fixture(create: "compat=v3", backing: true)
        for o in ["compat=v3", "compat=1.1", "lazy_refcounts=off", "refcount_bits=16", "size=4M", "size=0",
                  "data_file_raw=off", "backing_file=base.qcow2,backing_fmt=qcow2", "compat=v2,compat=v3"] {
            try Self.amendBoth(f, ["-o", o], label: "no-op \(o)", writeAfter: false)
        }
        for o in ["backing_file=base.qcow2", "backing_fmt=qcow2", "backing_file=other.qcow2,backing_fmt=qcow2"] {
            let twin = try Self.amendBoth(f, ["-o", o], label: "backing \(o)", writeAfter: false)
            #expect(Self.bytes(twin.l + "/img.qcow2") == Self.bytes(f.path + "/img.qcow2"))
        }
    }

    // MARK: - compat

    @Test func downgradeToV2() throws {
        for backing in [false, true] {
            let f = try Self.fixture(create: "compat=v3", backing: backing)
            for o in ["compat=v2", "compat=0.10"] {
                try Self.amendBoth(f, ["-o", o], label: "v3->v2 backing=\(backing)")
                try Self.amendBoth(f, ["-p", "-o", o], label: "v3->v2 -p backing=\(backing)", writeAfter: false)
            }
        }
    }

    @Test func downgradeExpandsZeroClustersOfSnapshots() throws {
        for backing in [false, true] {
            let f = try Self.fixture(create: "compat=v3", backing: backing) { sh in
                sh.img(["snapshot", "-c", "s1", "img.qcow2"])
                sh.io("img.qcow2", ["write -z 0 64k", "write -z 3M 64k", "write -P 0x55 2M 64k"])
                sh.img(["snapshot", "-c", "s2", "img.qcow2"])
                sh.io("img.qcow2", ["write -z 2M 64k"])
            }
            try Self.amendBoth(f, ["-o", "compat=v2"], label: "snapshots backing=\(backing)", check: .laminaClean)
            // Every snapshot still reads as before (qemu-img convert -l).
            let g = try Self.fixture(create: "compat=v3", backing: backing) { sh in
                sh.img(["snapshot", "-c", "s1", "img.qcow2"])
                sh.io("img.qcow2", ["write -z 0 64k", "write -z 3M 64k"])
            }
            let t2 = try TwinDirs(copying: g.path)
            let r = try t2.runTools(["amend", "-p", "-o", "compat=v2", "img.qcow2"])
            expectSameResult(r.qemu, r.lamina, "snapshot downgrade -p")
            for d in [t2.q, t2.l] {
                let a = try run(["qemu-img", "convert", "-l", "s1", "-O", "raw", "img.qcow2", "s1.raw"], cwd: d)
                #expect(a.status == 0, "\(a)")
            }
            let c = try run(["cmp", "q/s1.raw", "l/s1.raw"], cwd: t2.tmp.path)
            #expect(c.status == 0, "snapshot s1 content differs: \(c)")
            let ch = try t2.judge(["check", "img.qcow2"])
            #expect(ch.lamina.status == 0, "\(ch.lamina)")
        }
    }

    @Test func upgradeToV3() throws {
        for backing in [false, true] {
            let f = try Self.fixture(create: "compat=v2", backing: backing,
                                     writes: Self.varietyWrites.filter { !$0.contains("-z") }) { sh in
                sh.img(["snapshot", "-c", "s1", "img.qcow2"])
                sh.io("img.qcow2", ["write -P 0x66 0 64k"])
            }
            for o in ["compat=v3", "compat=1.1", "compat=v3,lazy_refcounts=on", "compat=v3,refcount_bits=8"] {
                try Self.amendBoth(f, ["-o", o], label: "v2->v3 backing=\(backing)")
                try Self.amendBoth(f, ["-p", "-o", o], label: "v2->v3 -p backing=\(backing)", writeAfter: false)
            }
            // Header bytes as qemu-img writes them (no refcount structures moved).
            let twin = try TwinDirs(copying: f.path)
            _ = try twin.runTools(["amend", "-o", "compat=v3", "img.qcow2"])
            let q = Self.bytes(twin.q + "/img.qcow2").prefix(4096)
            let l = Self.bytes(twin.l + "/img.qcow2").prefix(4096)
            #expect(q == l, "v3 header after upgrade differs")
        }
    }

    /// A v2 image whose snapshot table has no extra data (older QEMU):
    /// the upgrade rewrites the table with the v3 fields.
    @Test func upgradeRewritesOldSnapshotTable() throws {
        let f = try Self.fixture(create: "compat=v2", writes: ["write -P 0x21 0 1M"]) { sh in
            sh.img(["snapshot", "-c", "old", "img.qcow2"])
        }
        // Strip the extra data of the only snapshot: move id+name over it.
        let path = f.path + "/img.qcow2"
        var d = Self.bytes(path)
        let snOff = Int(d[64..<72].reduce(UInt64(0)) { $0 << 8 | UInt64($1) })
        let extraLen = Int(d[(snOff + 36)..<(snOff + 40)].reduce(UInt32(0)) { $0 << 8 | UInt32($1) })
        let idLen = Int(d[snOff + 12]) << 8 | Int(d[snOff + 13])
        let nameLen = Int(d[snOff + 14]) << 8 | Int(d[snOff + 15])
        let strings = d[(snOff + 40 + extraLen)..<(snOff + 40 + extraLen + idLen + nameLen)]
        d.replaceSubrange((snOff + 40)..<(snOff + 40 + extraLen + idLen + nameLen),
                          with: Data(strings) + Data(repeating: 0, count: extraLen))
        d.replaceSubrange((snOff + 36)..<(snOff + 40), with: Data([0, 0, 0, 0]))
        try d.write(to: URL(fileURLWithPath: path))
        let pre = try run(["qemu-img", "check", "img.qcow2"], cwd: f.path)
        #expect(pre.status == 0, "\(pre)")
        try Self.amendBoth(f, ["-o", "compat=v3"], label: "old snapshot table")
        let twin = try TwinDirs(copying: f.path)
        _ = try twin.runTools(["amend", "-o", "compat=v3", "img.qcow2"])
        let sn = try twin.judge(["snapshot", "-l", "img.qcow2"])
        expectSameResult(sn.qemu, sn.lamina, "snapshot list after upgrade")
    }

    @Test func downgradeRefusals() throws {
        let cases: [(String, String, (inout Shell) -> Void)] = [
            ("extended_l2=on", "compat=v2", { _ in }),
            ("compression_type=zstd", "compat=v2", { _ in }),
            ("refcount_bits=8", "compat=v2", { _ in }),
            ("refcount_bits=8", "compat=v2,refcount_bits=16", { _ in }),
            ("compat=v3", "compat=v2", { sh in
                sh.img(["snapshot", "-c", "s1", "img.qcow2"])
                sh.img(["resize", "img.qcow2", "8M"])
            }),
        ]
        for (create, amend, extra) in cases {
            let writes = create.contains("extended") ? Self.varietyWrites.filter { !$0.contains("-c") } : Self.varietyWrites
            let f = try Self.fixture(create: create, writes: writes, extra: extra)
            let twin = try Self.amendBoth(f, ["-o", amend], label: "\(create) -> \(amend)")
            if amend != "compat=v2,refcount_bits=16" {
                // A refused amend leaves the image as it was.
                #expect(Self.bytes(twin.l + "/img.qcow2") == Self.bytes(f.path + "/img.qcow2"), "\(create) -> \(amend) changed")
            }
        }
        // zstd without compressed clusters downgrades (and becomes zlib).
        let z = try Self.fixture(create: "compression_type=zstd", writes: ["write -P 1 0 1M", "write -z 1M 64k"])
        try Self.amendBoth(z, ["-o", "compat=v2"], label: "zstd without compressed clusters")
    }

    @Test func downgradeWithBitmaps() throws {
        let f = try Self.fixture(create: "compat=v3") { sh in
            sh.img(["bitmap", "--add", "img.qcow2", "b0"])
        }
        // Both leave the bitmaps' clusters unreferenced in v2 (leaks).
        try Self.amendBoth(f, ["-o", "compat=v2"], label: "bitmaps", check: .sameAsQemu)
    }

    // MARK: - refcount_bits

    @Test(arguments: [1, 2, 4, 8, 32, 64])
    func refcountBits(_ bits: Int) throws {
        // Compressed clusters share host clusters (refcount 2): one bit refuses.
        let f = try Self.fixture(create: "compat=v3", backing: bits == 8) { sh in
            sh.img(["snapshot", "-c", "s1", "img.qcow2"])
        }
        try Self.amendBoth(f, ["-o", "refcount_bits=\(bits)"], label: "16 -> \(bits)")
        try Self.amendBoth(f, ["-p", "-o", "refcount_bits=\(bits)"], label: "16 -> \(bits) -p", writeAfter: false)
        // And back: from an image created with that width.
        let g = try Self.fixture(create: "compat=v3,refcount_bits=\(bits)", writes: Self.varietyWrites.filter { !$0.contains("-c") || bits > 1 })
        try Self.amendBoth(g, ["-o", "refcount_bits=16"], label: "\(bits) -> 16")
        try Self.amendBoth(g, ["-o", "compat=v2,refcount_bits=16"], label: "\(bits) -> 16 and v2")
        let other = bits == 64 ? 2 : 64
        try Self.amendBoth(g, ["-o", "refcount_bits=\(other),lazy_refcounts=on"], label: "\(bits) -> \(other)")
    }

    @Test func refcountBitsOnBiggerImage() throws {
        // Several refcount blocks in the narrow width (64 KiB clusters, 1 bit: 512 Ki entries per block is
        // too many; 512-byte clusters make blocks small).
        let f = try Self.fixture(create: "compat=v3,cluster_size=512", writes: ["write -P 0x31 0 3M", "write -z 3M 512k"])
        for bits in [1, 64] {
            try Self.amendBoth(f, ["-o", "refcount_bits=\(bits)"], label: "512-byte clusters -> \(bits)")
        }
    }

    // MARK: - lazy refcounts

    @Test func lazyRefcounts() throws {
        let f = try Self.fixture(create: "compat=v3")
        try Self.amendBoth(f, ["-o", "lazy_refcounts=on"], label: "lazy on")
        try Self.amendBoth(f, ["-p", "-o", "lazy_refcounts=on"], label: "lazy on -p", writeAfter: false)
        let g = try Self.fixture(create: "compat=v3,lazy_refcounts=on")
        try Self.amendBoth(g, ["-o", "lazy_refcounts=off"], label: "lazy off")
        try Self.amendBoth(g, ["-o", "compat=v2"], label: "lazy v3 -> v2")
    }

    /// A lazy-refcounts image left dirty by a killed writer: both tools
    /// repair it on open (same messages), then amend.
    @Test func dirtyLazyImage() throws {
        for amend in ["lazy_refcounts=off", "compat=v2", "refcount_bits=8"] {
            let f = try Self.fixture(create: "compat=v3,lazy_refcounts=on") { sh in
                sh.io("img.qcow2", ["write -P 0x42 3M 128k", "abort"], allowFailure: true)
            }
            let info = try run(["qemu-img", "info", "--output=json", "img.qcow2"], cwd: f.path)
            #expect(info.stdout.contains("\"dirty-flag\": true"), "fixture not dirty: \(info.stdout)")
            try Self.amendBoth(f, ["-o", amend], label: "dirty + \(amend)")
        }
    }

    // MARK: - Damaged images

    @Test func damagedImages() throws {
        // (name, patch offset, value, amend options)
        let cases: [(String, UInt64, UInt64, String)] = [
            ("corrupt bit", 72, 2, "compat=v2"),
            ("unaligned refblock", 0x10000, 0x20100, "refcount_bits=8"),
            ("unaligned refblock, downgrade", 0x10000, 0x20100, "compat=v2"),
            ("unaligned L2 entry of a zero cluster", 0x30000, 0x8000_0000_0005_0101, "compat=v2"),
        ]
        for (label, offset, value, amend) in cases {
            let f = try Self.fixture(create: "compat=v3", writes: ["write -P 1 0 1M", "write -z 1M 64k"])
            try patch(f.path + "/img.qcow2", at: offset, be64(value))
            let twin = try TwinDirs(copying: f.path)
            let r = try twin.runTools(["amend", "-o", amend, "img.qcow2"])
            expectSameResult(r.qemu, r.lamina, "amend -o \(amend) of \(label)")
            let c = try twin.judge(["check", "img.qcow2"])
            #expect(c.qemu.status == c.lamina.status, "check after \(label): qemu \(c.qemu) lamina \(c.lamina)")
        }
        // A missing backing file.
        let t = TempDir()
        _ = try run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "missing.qcow2", "-F", "qcow2", "img.qcow2", "4M"], cwd: t.path)
        let twin = try TwinDirs(copying: t.path)
        let r = try twin.runTools(["amend", "-o", "compat=v2", "img.qcow2"])
        expectSameResult(r.qemu, r.lamina, "amend with a missing backing file")
    }

    // MARK: - Crash safety

    /// kill -9 at arbitrary instants of a downgrade (thousands of zero
    /// clusters to expand over a backing file, 512-byte clusters), of
    /// refcount width changes and of a lazy-refcounts switch: the image is
    /// never corrupt (leaks allowed) and reads as before.
    @Test func killedAmendLeavesConsistentImage() throws {
        let f = TempDir()
        var sh = Shell(dir: f.path)
        sh.img(["create", "-q", "-f", "qcow2", "base.qcow2", "32M"])
        sh.io("base.qcow2", ["write -P 0x11 0 32M"])
        sh.img(["create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "-b", "base.qcow2", "-F", "qcow2", "img.qcow2", "32M"])
        sh.io("img.qcow2", ["write -P 0x31 0 8M", "write -z 8M 8M", "write -c -P 0x32 16M 1M", "write -z 20M 64k"])
        sh.img(["convert", "-f", "qcow2", "-O", "qcow2", "img.qcow2", "orig.qcow2"])
        #expect(sh.problems.isEmpty, "fixture: \(sh.problems)")
        let plan: [(String, [Double])] = [
            ("compat=v2", [0.05, 0.2, 0.4, 0.7, 1.0, 1.4]),
            ("refcount_bits=64", [0.01, 0.03, 0.06, 0.1]),
            ("refcount_bits=4", [0.01, 0.03, 0.06, 0.1]),
            ("lazy_refcounts=on", [0.01, 0.03]),
        ]
        for (amend, delays) in plan {
            for delay in delays {
                let t = TempDir()
                _ = try run(["cp", f.path + "/img.qcow2", f.path + "/orig.qcow2", f.path + "/base.qcow2", t.path + "/"])
                let p = try ChildProcess(["/usr/bin/env", "-C", t.path, laminaImg, "amend", "-o", amend, "img.qcow2"])
                Thread.sleep(forTimeInterval: delay)
                p.signal(SIGKILL)
                _ = p.wait()
                let c = try run(["qemu-img", "check", "img.qcow2"], cwd: t.path)
                // Status 3 = leaks only.
                #expect(c.status == 0 || c.status == 3, "\(amend) killed after \(delay)s: \(c)")
                let cmp = try run(["qemu-img", "compare", "orig.qcow2", "img.qcow2"], cwd: t.path)
                #expect(cmp.status == 0, "\(amend) killed after \(delay)s: content \(cmp)")
            }
        }
    }
}
