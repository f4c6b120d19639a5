import Foundation
import LaminaJSON
import QMP
import TestSupport
import Testing

/// Block jobs meeting I/O errors injected by blkdebug, compared with
/// qemu-storage-daemon 7.2: every on-error policy (report, ignore, stop
/// then resume, enospc with ENOSPC and with another errno) for
/// block-stream, an intermediate block-commit and an active block-commit;
/// the BLOCK_JOB_ERROR events (operation, action), the io-status while a
/// job is stopped, how the job ends, and the images afterwards.
///
/// The chain is A <- B <- C, each layer over a blkdebug node whose rule
/// comes from the scenario; C is exported.
@Suite("Block jobs meeting blkdebug errors compared with qemu-storage-daemon", .serialized)
struct JobErrorTests {
    static let m = 1 << 20
    static let a = [PatternWrite(pattern: 0xa1, offset: 0, length: 3 * m)]
    static let b = [PatternWrite(pattern: 0xb1, offset: m, length: m)]
    static let c = [PatternWrite(pattern: 0xc1, offset: 2 * m + 4096, length: 64 << 10)]

    /// A blkdebug rule: on `event`, fail with `errno`, once or not.
    struct Rule {
        var event: String
        var errno: Int
        var once: Bool
        var options: String {
            "file.inject-error.0.event=\(event),file.inject-error.0.errno=\(errno),file.inject-error.0.once=\(once ? "on" : "off")"
        }
    }

    /// Makes a.qcow2 <- b.qcow2 <- c.qcow2 with their data and starts the
    /// daemon with each layer's file behind blkdebug (`rules` by layer).
    static func start(_ r: JobRun, rules: [String: Rule]) throws {
        var prev: String?
        for (l, data) in [("a", a), ("b", b), ("c", c)] {
            var args = ["create", "-q", "-f", "qcow2"]
            if let prev { args += ["-b", r.path("\(prev).qcow2"), "-F", "qcow2"] }
            args += [r.path("\(l).qcow2")]
            if prev == nil { args.append("\(ChainData.size)") }
            try r.expectOK(try qemuImg(args), "qemu-img create \(l)")
            try r.qemuIO(r.path("\(l).qcow2"), data, format: "qcow2")
            prev = l
        }
        var args: [String] = []
        prev = nil
        for l in ["a", "b", "c"] {
            var o = "driver=qcow2,node-name=node-\(l.uppercased()),file.driver=blkdebug,file.image.driver=file,"
                + "file.image.filename=\(r.path("\(l).qcow2"))"
            if let rule = rules[l] { o += "," + rule.options }
            if let prev { o += ",backing=node-\(prev.uppercased())" }
            args += ["--blockdev", o]
            prev = l
        }
        try r.start(args, exportNode: "node-C")
        r.result = "c.qcow2"
    }

    /// Runs a job until it ends; a job the policy stops is looked at
    /// (query-block-jobs: paused, io-status), then resumed.
    static func runToEnd(_ r: JobRun, _ command: String, _ args: JSON, stops: Int = 0, ready: Bool = false) throws {
        var m = try r.startJob(command, args)
        for _ in 0..<stops {
            try r.waitStatus("j0", "paused", from: m)
            r.cmd("query-block-jobs")
            m = r.mark
            try r.ok("block-job-resume", ["device": "j0"])
            try r.waitStatus("j0", "running", from: m)
        }
        if ready {
            try r.waitEvent("BLOCK_JOB_READY", from: m)
            r.cmd("query-block-jobs")
            m = r.mark
            try r.ok("block-job-complete", ["device": "j0"])
        }
        try r.waitStatus("j0", "null", from: m)
        r.cmd("query-block-jobs")
    }

    /// The chain's length (the names inside: the files' json: names, as
    /// QEMU writes a backing node's name into a header).
    static func finish(_ r: JobRun, chain: [String], content: [PatternWrite]) throws {
        try r.nodesFact("nodes after")
        try r.quit()
        try r.chainFact("c.qcow2", expect: nil)
        try r.checkImages()
        try r.expectContent("c.qcow2", content, "the chain")
    }

    // MARK: - block-stream (reads from A fail)

    @Test("block-stream, on-error=report: the first read error fails the job; the chain is kept")
    func streamReport() {
        JobParity.both { r in
            try Self.start(r, rules: ["a": Rule(event: "read_aio", errno: 5, once: false)])
            try Self.runToEnd(r, "block-stream", ["device": "node-C", "job-id": "j0"])
            try Self.finish(r, chain: ["c.qcow2", "b.qcow2", "a.qcow2"], content: Self.a + Self.b + Self.c)
        }
    }

    @Test("block-stream, on-error=ignore: the error is reported with action ignore, the job goes on and fails at the end")
    func streamIgnore() {
        JobParity.both { r in
            try Self.start(r, rules: ["a": Rule(event: "read_aio", errno: 5, once: true)])
            try Self.runToEnd(r, "block-stream", ["device": "node-C", "job-id": "j0", "on-error": "ignore"])
            try Self.finish(r, chain: ["c.qcow2", "b.qcow2", "a.qcow2"], content: Self.a + Self.b + Self.c)
        }
    }

    @Test("block-stream, on-error=stop: the job pauses with io-status failed, resume retries and completes")
    func streamStop() {
        JobParity.both { r in
            try Self.start(r, rules: ["a": Rule(event: "read_aio", errno: 5, once: true)])
            try Self.runToEnd(r, "block-stream", ["device": "node-C", "job-id": "j0", "on-error": "stop"], stops: 1)
            try Self.finish(r, chain: ["c.qcow2"], content: Self.a + Self.b + Self.c)
        }
    }

    @Test("block-stream, on-error=enospc: ENOSPC stops the job (io-status nospace), another errno fails it")
    func streamEnospc() {
        JobParity.both { r in
            try Self.start(r, rules: ["a": Rule(event: "read_aio", errno: 28, once: true)])
            try Self.runToEnd(r, "block-stream", ["device": "node-C", "job-id": "j0", "on-error": "enospc"], stops: 1)
            try Self.finish(r, chain: ["c.qcow2"], content: Self.a + Self.b + Self.c)
        }
        JobParity.both { r in
            try Self.start(r, rules: ["a": Rule(event: "read_aio", errno: 5, once: true)])
            try Self.runToEnd(r, "block-stream", ["device": "node-C", "job-id": "j0", "on-error": "enospc"])
            try Self.finish(r, chain: ["c.qcow2", "b.qcow2", "a.qcow2"], content: Self.a + Self.b + Self.c)
        }
    }

    // MARK: - intermediate block-commit (B into A: reads from B, writes to A)

    @Test("block-commit of B into A: a read error with report, a write error with ignore (QEMU copies the range again), stop, enospc")
    func commitPolicies() {
        let commit: JSON = ["device": "node-C", "top-node": "node-B", "base-node": "node-A", "job-id": "j0"]
        func with(_ onError: String) -> JSON {
            var o = commit.objectMembers ?? []
            o.append(("on-error", .string(onError)))
            return .object(o)
        }
        JobParity.both { r in
            try Self.start(r, rules: ["b": Rule(event: "read_aio", errno: 5, once: false)])
            try Self.runToEnd(r, "block-commit", commit)
            try Self.finish(r, chain: ["c.qcow2", "b.qcow2", "a.qcow2"], content: Self.a + Self.b + Self.c)
        }
        JobParity.both { r in
            try Self.start(r, rules: ["a": Rule(event: "write_aio", errno: 5, once: true)])
            try Self.runToEnd(r, "block-commit", with("ignore"))
            try Self.finish(r, chain: ["c.qcow2", "a.qcow2"], content: Self.a + Self.b + Self.c)
        }
        JobParity.both { r in
            try Self.start(r, rules: ["b": Rule(event: "read_aio", errno: 5, once: true)])
            try Self.runToEnd(r, "block-commit", with("stop"), stops: 1)
            try Self.finish(r, chain: ["c.qcow2", "a.qcow2"], content: Self.a + Self.b + Self.c)
        }
        JobParity.both { r in
            try Self.start(r, rules: ["a": Rule(event: "write_aio", errno: 28, once: true)])
            try Self.runToEnd(r, "block-commit", with("enospc"), stops: 1)
            try Self.finish(r, chain: ["c.qcow2", "a.qcow2"], content: Self.a + Self.b + Self.c)
        }
    }

    // MARK: - active block-commit (C into A: writes to A fail)

    @Test("active block-commit: a write error with report fails it; with ignore or stop the range is copied again and the pivot still happens")
    func activeCommitPolicies() {
        JobParity.both { r in
            try Self.start(r, rules: ["a": Rule(event: "write_aio", errno: 5, once: false)])
            try Self.runToEnd(r, "block-commit", ["device": "node-C", "job-id": "j0"])
            try Self.finish(r, chain: ["c.qcow2", "b.qcow2", "a.qcow2"], content: Self.a + Self.b + Self.c)
        }
        JobParity.both { r in
            try Self.start(r, rules: ["a": Rule(event: "write_aio", errno: 5, once: true)])
            try Self.runToEnd(r, "block-commit", ["device": "node-C", "job-id": "j0", "on-error": "ignore"], ready: true)
            r.cmd("query-block-exports")
            try r.nodesFact("nodes after")
            try r.quit()
            try r.checkImages()
            r.result = "a.qcow2"
            try r.expectContent("a.qcow2", Self.a + Self.b + Self.c, "A+B+C")
        }
        JobParity.both { r in
            try Self.start(r, rules: ["a": Rule(event: "write_aio", errno: 28, once: true)])
            try Self.runToEnd(r, "block-commit", ["device": "node-C", "job-id": "j0", "on-error": "enospc"],
                              stops: 1, ready: true)
            try r.nodesFact("nodes after")
            try r.quit()
            try r.checkImages()
            r.result = "a.qcow2"
            try r.expectContent("a.qcow2", Self.a + Self.b + Self.c, "A+B+C")
        }
    }
}
