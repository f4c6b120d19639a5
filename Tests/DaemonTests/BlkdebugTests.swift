import Foundation
import LaminaJSON
import QMP
import TestSupport
import Testing

/// blkdebug against qemu-storage-daemon 7.2: the same rules give NBD
/// clients (qemu-io over nbd+unix://) the same errors, the same dropped
/// connections and the same data; options are checked with QEMU's
/// messages; the nodes show up in the queries as QEMU shows them.
@Suite("blkdebug against qemu-storage-daemon", .serialized)
struct BlkdebugTests {
    /// A qcow2 node "q" over an inline blkdebug node "bd" (on a.qcow2)
    /// with `options` (blkdebug's, without the "file." prefix), exported
    /// as "disk".
    static func startQcow2(_ r: JobRun, _ options: [String]) throws {
        try r.makeBlkdebugImage()
        let bd = (["driver=qcow2", "node-name=q", "file.driver=blkdebug", "file.node-name=bd",
                   "file.image.driver=file", "file.image.filename=\(r.path("a.qcow2"))"]
                  + options.map { "file." + $0 }).joined(separator: ",")
        try r.start(["--blockdev", bd], exportNode: "q")
    }

    /// qemu-io sessions (one per element) through a qcow2 node over
    /// blkdebug with `options`; then the image must check clean and hold
    /// the same data in both runs.
    static func sessions(_ options: [String], _ sessions: [[String]]) {
        BlkdebugParity.both(same: [("a.qcow2", "qcow2")], { r in
            try startQcow2(r, options)
            for s in sessions { try r.nbdSession(s) }
        }, after: { r in try r.checkFact() })
    }

    // MARK: - (a) read and write errors through NBD

    @Test("read_aio, EIO on every request: the read fails, the client is dropped as QEMU drops it")
    func readErrorEveryTime() {
        Self.sessions(["inject-error.0.event=read_aio", "inject-error.0.errno=5"], [
            ["read -P 1 0 64k", "read 2M 64k"],
            ["read 2M 64k"],
            ["read -P 1 512k 64k"],
        ])
    }

    @Test("read_aio, ENOSPC once: one failed read, then the data reads back")
    func readErrorOnce() {
        Self.sessions(["inject-error.0.event=read_aio", "inject-error.0.errno=28", "inject-error.0.once=on"], [
            ["read -P 1 0 64k"],
            ["read -P 1 0 64k", "read -P 1 64k 64k"],
        ])
    }

    @Test("write_aio, ENOSPC on every request: 'No space left on device', later requests fail too")
    func writeErrorEveryTime() {
        Self.sessions(["inject-error.0.event=write_aio", "inject-error.0.errno=28"], [
            ["write -P 3 2M 64k", "read -P 1 0 64k"],
            ["read -P 1 0 64k"],
        ])
    }

    @Test("write_aio, EPERM once: the first write fails, the second lands")
    func writeErrorOnce() {
        Self.sessions(["inject-error.0.event=write_aio", "inject-error.0.errno=1", "inject-error.0.once=on"], [
            ["write -P 3 2M 64k", "write -P 4 2M 64k", "read -P 4 2M 64k"],
            ["read -P 4 2M 64k", "read -P 1 0 1M"],
        ])
    }

    @Test("write_aio rules limited to sectors, with errnos NBD carries as they are or as EINVAL/ENOSPC")
    func writeErrorsBySector() {
        let rules: [(Int, Int)] = [(0, 22), (64 << 10, 12), (128 << 10, 2), (192 << 10, 122)]
        var options: [String] = []
        for (i, (guest, errno)) in rules.enumerated() {
            options += ["inject-error.\(i).event=write_aio", "inject-error.\(i).errno=\(errno)",
                        "inject-error.\(i).sector=\(BlkdebugImage.sector(ofGuest: guest + 4096))"]
        }
        Self.sessions(options, [
            ["write -P 5 0 8k", "write -P 5 64k 8k", "write -P 5 128k 8k", "write -P 5 192k 8k",
             "write -P 5 256k 8k", "read -P 5 256k 8k"],
            ["read -P 1 0 64k", "write -P 6 0 4k", "read -P 6 0 4k"],
        ])
    }

    @Test("read_aio limited to one sector: only reads covering it fail")
    func readErrorBySector() {
        Self.sessions(["inject-error.0.event=read_aio", "inject-error.0.errno=5",
                       "inject-error.0.sector=\(BlkdebugImage.sector(ofGuest: 132 << 10))"], [
            ["read -P 1 0 128k"],
            ["read -P 1 0 1M"],
            ["read -P 1 192k 64k", "read -P 1 128k 4k"],
            ["read -P 1 132k 4k"],
        ])
    }

    // MARK: - (b) set-state

    @Test("set-state: a rule waits for its state, which a read event sets")
    func setStateBeforeInject() {
        Self.sessions(["set-state.0.event=read_aio", "set-state.0.state=1", "set-state.0.new_state=2",
                       "inject-error.0.event=read_aio", "inject-error.0.state=2", "inject-error.0.errno=5"], [
            ["read -P 1 0 64k"],
            ["read -P 1 64k 64k"],
            ["read -P 1 128k 64k"],
        ])
    }

    @Test("set-state: a write event arms a read-only rule")
    func setStateByWrite() {
        Self.sessions(["set-state.0.event=write_aio", "set-state.0.new_state=3", "inject-error.0.event=read_aio",
                       "inject-error.0.state=3", "inject-error.0.errno=5", "inject-error.0.iotype=read"], [
            ["read -P 1 0 64k"],
            ["write -P 7 0 4k"],
            ["read -P 7 0 4k"],
            ["read -P 1 64k 4k"],
        ])
    }

    @Test("set-state: two states taking turns; an active rule stays active until its event re-runs")
    func setStateCycle() {
        for once in ["off", "on"] {
            Self.sessions(["set-state.0.event=read_aio", "set-state.0.state=1", "set-state.0.new_state=2",
                           "set-state.1.event=read_aio", "set-state.1.state=2", "set-state.1.new_state=1",
                           "inject-error.0.event=read_aio", "inject-error.0.state=2", "inject-error.0.errno=5",
                           "inject-error.0.once=\(once)"], [
                ["read -P 1 0 4k"], ["read -P 1 0 4k"], ["read -P 1 0 4k"], ["read -P 1 0 4k"], ["read -P 1 0 4k"],
            ])
        }
    }

    @Test("set-state on the 'none' event: the state is set when the node opens")
    func setStateAtOpen() {
        Self.sessions(["set-state.0.event=none", "set-state.0.new_state=5", "inject-error.0.event=read_aio",
                       "inject-error.0.state=5", "inject-error.0.errno=5"], [
            ["read -P 1 0 4k"],
            ["write -P 2 1M 4k"],
        ])
    }

    // MARK: - iotypes on a raw image

    /// A blkdebug node "x" exported directly over a raw file r.img.
    static func rawSessions(_ options: [String], file: String = "", _ sessions: [[String]]) {
        BlkdebugParity.both(same: [("r.img", "raw")]) { r in
            try r.makeBlkdebugImage("r.img", raw: true)
            let image = file.isEmpty ? "image.driver=file,image.filename=\(r.path("r.img"))"
                : "image.driver=file,image.filename=\(r.path("r.img")),\(file)"
            try r.start(["--blockdev", (["driver=blkdebug", "node-name=x", image] + options).joined(separator: ",")],
                        exportNode: "x")
            for s in sessions { try r.nbdSession(s) }
        }
    }

    @Test("iotype write-zeroes, discard and flush rules armed at open (event 'none')")
    func ioTypes() {
        Self.rawSessions(["inject-error.0.event=none", "inject-error.0.iotype=write-zeroes", "inject-error.0.errno=28"], [
            ["write -z 0 64k", "write -z -u 64k 64k", "write -P 2 128k 4k"],
            ["read -P 1 0 64k", "read -P 2 128k 4k"],
        ])
        // A flush fails only if the node was written since its last flush.
        Self.rawSessions(["inject-error.0.event=none", "inject-error.0.iotype=flush", "inject-error.0.errno=5"], [
            ["flush"], ["write -P 3 0 4k", "flush", "flush"], ["flush"],
        ])
        Self.rawSessions(["discard=unmap", "inject-error.0.event=none", "inject-error.0.iotype=discard",
                          "inject-error.0.errno=1", "inject-error.0.sector=200", "opt-discard=65536",
                          "max-discard=131072"], file: "discard=unmap", [
            ["discard 0 64k", "discard 100 1000", "discard 90k 100k", "discard 0 1M", "read -P 1 0 64k"],
        ])
    }

    // MARK: - Jobs meeting injected errors

    @Test("block-stream reading through blkdebug: report fails the job, enospc stops it until resumed, as QEMU")
    func streamJobErrors() {
        for (errno, onError) in [(5, "report"), (28, "enospc")] {
            JobParity.both { r in
                r.result = "top.qcow2"
                try r.makeBlkdebugImage("base.qcow2")
                try r.expectOK(try qemuImg(["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                                            r.path("top.qcow2")]), "qemu-img create top")
                try r.start(["--blockdev", "driver=qcow2,node-name=base,file.driver=blkdebug,file.image.driver=file,"
                             + "file.image.filename=\(r.path("base.qcow2")),file.inject-error.0.event=read_aio,"
                             + "file.inject-error.0.errno=\(errno),file.inject-error.0.once=on",
                             "--blockdev", "driver=qcow2,node-name=top,file.driver=file,"
                             + "file.filename=\(r.path("top.qcow2")),backing=base"], exportNode: "top")
                let m = try r.startJob("block-stream", .object([("device", "top"), ("job-id", "j0"),
                                                                ("on-error", .string(onError))]))
                if onError == "enospc" {
                    try r.waitStatus("j0", "paused", from: m)
                    r.cmd("query-block-jobs")
                    try r.ok("block-job-resume", ["device": "j0"])
                }
                try r.waitStatus("j0", "null", from: m)
                try r.nodesFact("nodes after the job")
                try r.expectExportContent([PatternWrite(pattern: 1, offset: 0, length: 1 << 20)], "the data")
            }
        }
    }

    // MARK: - (c) align and max-transfer

    @Test("opt-write-zero and max-write-zero: QEMU's split, unaligned pieces written as data")
    func writeZeroSplitting() {
        Self.rawSessions(["align=512", "opt-write-zero=65536", "max-write-zero=131072",
                          "inject-error.0.event=none", "inject-error.0.iotype=write", "inject-error.0.errno=28",
                          "inject-error.0.sector=1000", "inject-error.1.event=none", "inject-error.1.iotype=write-zeroes",
                          "inject-error.1.errno=5", "inject-error.1.sector=300"], [
            ["write -z 480k 100k"], ["write -z 490k 100k"], ["write -z 100k 100k"], ["write -z 0 64k"], ["write -z 0 1M"],
        ])
    }

    @Test("align and max-transfer: NBD block sizes, unaligned I/O, a sector rule under split requests")
    func alignAndMaxTransfer() {
        BlkdebugParity.both(same: [("r.img", "raw"), ("a.qcow2", "qcow2")]) { r in
            try r.makeBlkdebugImage("r.img", raw: true)
            try r.makeBlkdebugImage()
            try r.start(["--blockdev", "driver=blkdebug,node-name=x,align=4096,max-transfer=65536,"
                         + "image.driver=file,image.filename=\(r.path("r.img"))"], exportNode: "x")
            try r.ok("blockdev-add", .object([
                ("driver", "qcow2"), ("node-name", "q"),
                ("file", .object([
                    ("driver", "blkdebug"), ("align", 512), ("max-transfer", 65536),
                    ("image", .object([("driver", "file"), ("filename", .string(r.path("a.qcow2")))])),
                    ("inject-error", .array([.object([("event", "read_aio"), ("errno", 5),
                                                       ("sector", .int(Int64(BlkdebugImage.sector(ofGuest: 132 << 10))))])])),
                ])),
            ]))
            try r.ok("block-export-add", ["type": "nbd", "id": "e1", "node-name": "q", "name": "q", "writable": true])
            try r.blockSizesFact(export: "disk")
            try r.blockSizesFact(export: "q")
            try r.nbdSession(["write -P 5 100 1000", "write -P 6 5000 200000", "read -P 5 100 1000",
                              "read -P 6 5000 200000", "read -P 1 205000 10000", "write -z 300000 5000",
                              "read -P 0 300000 5000"])
            try r.nbdSession(["read -P 1 0 128k"], export: "q")
            try r.nbdSession(["read -P 1 0 1M"], export: "q")
        } after: { r in try r.checkFact() }
    }

    // MARK: - (d) bad options

    @Test("bad options on the command line: QEMU's message and exit status")
    func badOptionsOnCommandLine() throws {
        let dir = TempDir()
        #expect(try qemuImg(["create", "-q", "-f", "qcow2", dir.file("a.qcow2"), "1M"]).status == 0)
        let cfg = dir.file("rules.cfg")
        try "[inject-error]\nevent = \"read_aio\"\nbogus = \"1\"\n".write(toFile: cfg, atomically: true, encoding: .utf8)
        let cfg2 = dir.file("rules2.cfg")
        try "[inject-error \"inject-error.0\"]\nevent = \"read_aio\"\n".write(toFile: cfg2, atomically: true, encoding: .utf8)
        let base = "driver=blkdebug,node-name=bd,image.driver=file,image.filename=\(dir.file("a.qcow2"))"
        let cases = [
            "inject-error.0.event=bogus", "inject-error.0.errno=5", "inject-error.0.event=read_aio,inject-error.0.iotype=x",
            "inject-error.0.event=read_aio,inject-error.0.errno=x", "inject-error.0.event=read_aio,inject-error.0.once=maybe",
            "inject-error.0.event=read_aio,inject-error.0.bogus=1", "inject-error.event=read_aio", "inject-error.1.event=read_aio",
            "set-state.0.event=read_aio", "set-state.0.new_state=2", "align=3", "align=-1", "align=2147483648",
            "align=4096,max-transfer=1000", "max-transfer=4096,align=8192", "max-transfer=2147483648",
            "max-transfer=-1,align=-1", "opt-write-zero=1000,align=512", "max-write-zero=1536,opt-write-zero=1024",
            "opt-discard=100,align=64", "max-discard=100,opt-discard=64", "max-discard=-1,opt-discard=-1,align=-1",
            "config=\(dir.file("missing.cfg"))", "config=\(cfg)", "config=\(cfg2),inject-error.0.event=read_aio",
            "take-child-perms.0=bogus", "x-image=foo", "image=nosuch", "image.filename=\(dir.file("missing"))",
            "align=-1,image.filename=\(dir.file("missing"))",
        ]
        for c in cases {
            let args = ["--blockdev", "\(base),\(c)"]
            let (qs, qe) = try BlkdebugParity.startFailure(.qemu, args)
            let (ls, le) = try BlkdebugParity.startFailure(.lamina, args)
            #expect(qs == 1 && qs == ls, "exit status for \(c): qemu \(qs) lamina \(ls)")
            #expect(qe == le, "stderr for \(c)\nqemu:   \(qe)\nlamina: \(le)")
        }
    }

    @Test("bad options at blockdev-add: QEMU's errors; the graph is unchanged")
    func badOptionsAtBlockdevAdd() {
        BlkdebugParity.both { r in
            try r.makeBlkdebugImage()
            try r.start(["--blockdev", "driver=null-co,node-name=n0"], exportNode: "n0")
            let image: JSON = .object([("driver", "file"), ("filename", .string(r.path("a.qcow2")))])
            let bad: [[(String, JSON)]] = [
                [("align", -1)], [("align", 3)], [("max-transfer", -1)], [("max-transfer", 4_294_967_296)],
                [("inject-error", .array([.object([("event", "bogus")])]))],
                [("inject-error", .array([.object([("event", "read_aio"), ("iotype", "x")])]))],
                [("inject-error", .object([("event", "read_aio")]))],
                [("inject-error", .array([.object([("event", "read_aio"), ("errno", "5")])]))],
                [("inject-error", .array([.object([("event", "read_aio"), ("sector", .double(1.5))])]))],
                [("inject-error", .array([.object([("event", "read_aio"), ("bogus", 1)])]))],
                [("inject-error", .array([.object([])]))],
                [("set-state", .array([.object([("event", "read_aio")])]))],
                [("take-child-perms", .array(["bogus"]))], [("take-child-perms", "write")],
                [("config", .string(r.path("missing.cfg")))],
                [("align", 512), ("max-transfer", 1000)], [("opt-discard", -5), ("align", -5)],
            ]
            for extra in bad {
                r.bad("blockdev-add", .object([("driver", "blkdebug"), ("node-name", "bd"), ("image", image)] + extra))
            }
            r.bad("blockdev-add", ["driver": "blkdebug", "node-name": "bd"])
            r.bad("blockdev-add", ["driver": "blkdebug", "node-name": "bd", "image": "nosuch"])
            // Odd but valid values are accepted (QEMU keeps them as C ints).
            try r.ok("blockdev-add", .object([
                ("driver", "blkdebug"), ("node-name", "bd"), ("image", image),
                ("inject-error", .array([.object([("event", "read_aio"), ("errno", -1), ("state", 4_294_967_297)])])),
                ("set-state", .array([.object([("event", "read_aio"), ("new_state", -3)])])),
            ]))
            try r.queryFact("query-named-block-nodes", ["flat": true])
            try r.ok("blockdev-del", ["node-name": "bd"])
            try r.queryFact("x-debug-query-block-graph")
        }
    }

    // MARK: - (e) the node in the queries

    @Test("query-named-block-nodes and x-debug-query-block-graph show blkdebug nodes as QEMU does")
    func queries() throws {
        BlkdebugParity.both { r in
            try r.makeBlkdebugImage()
            try r.makeBlkdebugImage("b.qcow2")
            try r.makeBlkdebugImage("c.qcow2")
            try "[set-state]\nevent = \"read_aio\"\nnew_state = \"2\"\n".write(
                toFile: r.path("rules.cfg"), atomically: true, encoding: .utf8)
            // Inline with rules of each kind (json: names), and plain (blkdebug::).
            try r.start(["--blockdev", "driver=qcow2,node-name=q,file.driver=blkdebug,file.node-name=bd,"
                         + "file.image.driver=file,file.image.filename=\(r.path("a.qcow2")),"
                         + "file.inject-error.0.event=read_aio,file.inject-error.0.errno=5,file.inject-error.0.once=on,"
                         + "file.inject-error.1.event=l2_load,file.inject-error.1.sector=7,file.inject-error.1.iotype=write,"
                         + "file.set-state.0.event=write_aio,file.set-state.0.new_state=3,file.align=4096,file.max-transfer=65536",
                         "--blockdev", "driver=qcow2,node-name=q2,file.driver=blkdebug,"
                         + "file.image.driver=file,file.image.filename=\(r.path("b.qcow2"))"],
                        exportNode: "q")
            // A config file only (blkdebug:CONFIG:FILE), by JSON, and a
            // named blkdebug node used by reference, with permissions.
            try r.ok("blockdev-add", .object([
                ("driver", "qcow2"), ("node-name", "q3"),
                ("file", .object([("driver", "blkdebug"), ("config", .string(r.path("rules.cfg"))),
                                  ("image", .object([("driver", "file"), ("filename", .string(r.path("c.qcow2"))),
                                                     ("locking", "off")]))])),
            ]))
            try r.ok("blockdev-add", .object([
                ("driver", "blkdebug"), ("node-name", "bd4"),
                ("image", .object([("driver", "file"), ("filename", .string(r.path("c.qcow2"))), ("locking", "off")])),
                ("inject-error", .array([.object([("event", "write_aio"), ("state", 2), ("iotype", "write-zeroes"),
                                                   ("errno", 28), ("sector", 8), ("once", false), ("immediately", true)])])),
                ("set-state", .array([.object([("event", "none"), ("state", 1), ("new_state", 2)])])),
                ("opt-write-zero", 4096), ("max-write-zero", 8192), ("opt-discard", 4096), ("max-discard", 65536),
                ("take-child-perms", .array(["resize"])), ("unshare-child-perms", .array(["write"])),
            ]))
            try r.ok("blockdev-add", ["driver": "raw", "node-name": "r4", "read-only": true, "file": "bd4"])
            try r.queryFact("query-named-block-nodes", ["flat": true])
            try r.queryFact("query-named-block-nodes")
            try r.queryFact("x-debug-query-block-graph")
            try r.ok("blockdev-del", ["node-name": "r4"])
            try r.ok("blockdev-del", ["node-name": "bd4"])
            try r.ok("blockdev-del", ["node-name": "q3"])
            try r.queryFact("x-debug-query-block-graph")
        }
    }
}
