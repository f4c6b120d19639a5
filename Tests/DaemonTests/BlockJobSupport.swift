import Foundation
import LaminaJSON
import QMP
import TestSupport
import Testing

// The harness of BlockJobTests: every scenario runs once against
// qemu-storage-daemon (the oracle) and once against the daemon playing
// Lamina, each in its own temporary directory; the transcripts (answers,
// events, facts about the graph and the images) are then compared.

/// The executable that plays Lamina: `LAMINA_JOBTEST_DAEMON` replaces
/// lamina-storage-daemon (set it to /usr/bin/qemu-storage-daemon to check
/// the harness itself: QEMU against QEMU must pass every test).
let jobTestLaminaBinary: String = {
    let v = ProcessInfo.processInfo.environment["LAMINA_JOBTEST_DAEMON"] ?? ""
    return v.isEmpty ? laminaDaemon : v
}()

/// One write of the data model: `pattern` over [offset, offset+length).
struct PatternWrite: Sendable {
    var pattern: UInt8
    var offset: Int
    var length: Int
    var command: String { "write -P 0x\(String(pattern, radix: 16)) \(offset) \(length)" }
}

/// The guest-visible data of the chain A <- B <- C <- D and of the NBD
/// writers. Disk size 16 MiB; A holds 4 MiB at the start (several job
/// chunks). The writer's and the post-job writes overlap each other
/// nowhere, so applying them once in any order gives the model.
enum ChainData {
    static let size = 16 << 20
    static let k = 1024, m = 1 << 20
    static let a = [PatternWrite(pattern: 0xa1, offset: 0, length: 4 * m),
                    PatternWrite(pattern: 0xa2, offset: 10 * m, length: m)]
    static let b = [PatternWrite(pattern: 0xb1, offset: m, length: m),
                    PatternWrite(pattern: 0xb2, offset: 6 * m, length: m)]
    static let c = [PatternWrite(pattern: 0xc1, offset: 1536 * k, length: m),
                    PatternWrite(pattern: 0xc2, offset: 8 * m, length: 512 * k)]
    static let d = [PatternWrite(pattern: 0xd1, offset: 3 * m, length: 256 * k),
                    PatternWrite(pattern: 0xd2, offset: 12 * m, length: 64 * k)]
    static let layers: [String: [PatternWrite]] = ["a": a, "b": b, "c": c, "d": d]
    /// What the concurrent NBD writer writes, pass after pass: aligned and
    /// unaligned, inside every layer's data and where nothing is allocated.
    static let writer = [
        PatternWrite(pattern: 0x50, offset: 0, length: 64 * k),
        PatternWrite(pattern: 0x51, offset: m + 4 * k, length: 4 * k),
        PatternWrite(pattern: 0x52, offset: 1600 * k, length: 64 * k),
        PatternWrite(pattern: 0x53, offset: 3 * m + 512, length: 1024),
        PatternWrite(pattern: 0x54, offset: 5 * m, length: 128 * k),
        PatternWrite(pattern: 0x55, offset: 6 * m + 300 * k, length: 8 * k),
        PatternWrite(pattern: 0x56, offset: 8 * m + 256 * k, length: 64 * k),
        PatternWrite(pattern: 0x57, offset: 11 * m - 4 * k, length: 8 * k),
        PatternWrite(pattern: 0x58, offset: 12 * m, length: 4 * k),
        PatternWrite(pattern: 0x59, offset: 15 * m + 960 * k, length: 64 * k),
    ]
    /// Written through the export once the job is over: must land in the
    /// node the export then serves.
    static let post = [PatternWrite(pattern: 0x60, offset: 2 * m, length: 64 * k),
                       PatternWrite(pattern: 0x61, offset: 14 * m + 512, length: 4 * k)]
}

struct JobTestError: Error, CustomStringConvertible {
    var description: String
    init(_ d: String) { description = d }
}

/// One implementation's run of a scenario.
final class JobRun: @unchecked Sendable {
    let impl: Impl
    let dir = TempDir()
    private(set) var daemon: DaemonProcess?
    private(set) var client: QMPClient?
    /// Recorded commands: label and the raw response.
    private(set) var steps: [(String, JSON)] = []
    /// Every event received, in order.
    private(set) var events: [JSON] = []
    /// Named observations compared between the runs (already normalized).
    private(set) var facts: [(String, String)] = []
    /// The scenario threw: its transcript is incomplete.
    var failed = false
    /// The image whose guest view is compared between the runs.
    var result = "d.qcow2"
    private var refCount = 0

    init(_ impl: Impl) { self.impl = impl }

    var label: String { impl == .qemu ? "qemu" : "lamina(\(jobTestLaminaBinary))" }
    var nbdSocket: String { dir.file("nbd.sock") }
    var nbdURI: String { "nbd+unix:///disk?socket=\(nbdSocket)" }
    func path(_ name: String) -> String { dir.file(name) }

    // MARK: images

    /// Creates `x.qcow2` for each layer letter, backed by the previous one
    /// (backing strings relative, "a.qcow2", or absolute), with the layer data.
    func makeChain(relative: Bool) throws {
        var prev: String?
        for l in ["a", "b", "c", "d"] {
            var args = ["create", "-q", "-f", "qcow2"]
            if let prev { args += ["-b", relative ? "\(prev).qcow2" : path("\(prev).qcow2"), "-F", "qcow2"] }
            args += [path("\(l).qcow2")]
            if prev == nil { args.append("\(ChainData.size)") }
            try expectOK(try qemuImg(args), "qemu-img create \(l)")
            try qemuIO(path("\(l).qcow2"), ChainData.layers[l] ?? [], format: "qcow2")
            prev = l
        }
    }

    func qemuIO(_ target: String, _ writes: [PatternWrite], format: String = "raw") throws {
        guard !writes.isEmpty else { return }
        let r = try run(["qemu-io", "-f", format] + writes.flatMap { ["-c", $0.command] } + [target])
        try expectOK(r, "qemu-io \(target)")
        if r.stdout.contains("failed") { throw JobTestError("\(label): qemu-io \(target): \(r)") }
    }

    func expectOK(_ r: ProcessResult, _ what: String) throws {
        if r.status != 0 { throw JobTestError("\(label): \(what): \(r)") }
    }

    // MARK: daemon

    /// Starts the daemon with `args`, an NBD server on nbd.sock and the
    /// writable export e0 ("disk") of `exportNode`; connects the monitor.
    func start(_ args: [String], exportNode: String) throws {
        let all = args + [
            "--nbd-server", "addr.type=unix,addr.path=\(nbdSocket)",
            "--export", "type=nbd,id=e0,node-name=\(exportNode),name=disk,writable=on",
        ]
        let d = try DaemonProcess(impl, dir: dir.path, args: all, binary: impl == .qemu ? nil : jobTestLaminaBinary)
        daemon = d
        let c = try QMPClient(unixPath: d.qmpPath, timeout: 20)
        try c.negotiate()
        client = c
    }

    /// --blockdev options opening a.qcow2 .. d.qcow2 as node-A .. node-D,
    /// each naming the previous one as its backing node.
    func namedChainArgs() -> [String] {
        var args: [String] = []
        var prev: String?
        for l in ["a", "b", "c", "d"] {
            var o = "driver=qcow2,node-name=node-\(l.uppercased()),file.driver=file,file.filename=\(path("\(l).qcow2"))"
            if let prev { o += ",backing=\(prev)" }
            args += ["--blockdev", o]
            prev = "node-\(l.uppercased())"
        }
        return args
    }

    /// The seed's walkthrough: the daemon starts with node-A (a.qcow2 with
    /// A's data) exported; B, C and D are created live with
    /// blockdev-snapshot-sync, each layer's data written through the
    /// export (which follows the active layer) before the next snapshot.
    func startSeedWalkthrough() throws {
        try expectOK(try qemuImg(["create", "-q", "-f", "qcow2", path("a.qcow2"), "\(ChainData.size)"]), "create a")
        try qemuIO(path("a.qcow2"), ChainData.a, format: "qcow2")
        try start(["--blockdev", "driver=qcow2,node-name=node-A,file.driver=file,file.filename=\(path("a.qcow2"))"],
                  exportNode: "node-A")
        var prev = "A"
        for l in ["b", "c", "d"] {
            let node = "node-\(l.uppercased())"
            try ok("blockdev-snapshot-sync", ["node-name": .string("node-\(prev)"), "snapshot-file": .string(path("\(l).qcow2")),
                                              "snapshot-node-name": .string(node), "format": "qcow2"])
            try qemuIO(nbdURI, ChainData.layers[l] ?? [])
            prev = l.uppercased()
        }
        cmd("query-block-exports")
        try nodesFact("nodes before the job")
    }

    /// The named chain from qemu-img (absolute backing strings), node-D exported.
    func startNamedChain() throws {
        try makeChain(relative: false)
        try start(namedChainArgs(), exportNode: "node-D")
        try nodesFact("nodes before the job")
    }

    // MARK: QMP

    /// Runs a command and records it; a broken connection is recorded too.
    @discardableResult
    func cmd(_ name: String, _ args: JSON? = nil) -> JSON {
        let label = args.map { "\(name) \(canonical($0).compact)" } ?? name
        guard let c = client else {
            steps.append((label, ["no-connection": true]))
            return ["no-connection": true]
        }
        do {
            let r = try c.execute(name, args)
            events += c.events
            c.events.removeAll()
            steps.append((label, r))
            return r
        } catch {
            // A dead or hung monitor: later commands fail at once instead of
            // each waiting for the timeout.
            client = nil
            let r: JSON = ["client-error": .string("\(error)")]
            steps.append((label, r))
            return r
        }
    }

    /// A recorded command that must succeed; returns its `return`.
    @discardableResult
    func ok(_ name: String, _ args: JSON? = nil) throws -> JSON {
        let r = cmd(name, args)
        guard let v = r["return"] else { throw JobTestError("\(label): \(name) \(args?.compact ?? ""): \(r.compact)") }
        return v
    }

    /// A recorded command that must fail (the class and desc are compared
    /// with QEMU's by the transcript).
    func bad(_ name: String, _ args: JSON? = nil) {
        let r = cmd(name, args)
        #expect(r["error"] != nil, "\(label): \(name) \(args?.compact ?? "") should fail: \(r.compact)")
    }

    /// A command that is not recorded (for the harness's own checks).
    func query(_ name: String, _ args: JSON? = nil) throws -> JSON {
        guard let c = client else { throw JobTestError("\(label): no monitor") }
        let r = try c.execute(name, args)
        events += c.events
        c.events.removeAll()
        guard let v = r["return"] else { throw JobTestError("\(label): \(name): \(r.compact)") }
        return v
    }

    /// The index the next event will get.
    var mark: Int { events.count }

    /// Waits (at most 30 s) for an event at index `from` or later that
    /// satisfies `pred`.
    @discardableResult
    func waitEvent(from: Int, _ what: String, _ pred: (JSON) -> Bool) throws -> JSON {
        guard let c = client else { throw JobTestError("\(label): no monitor") }
        let deadline = Date().addingTimeInterval(30)
        var i = from
        while true {
            while i < events.count {
                if pred(events[i]) { return events[i] }
                i += 1
            }
            if Date() > deadline { throw JobTestError("\(label): no \(what) within 30 s; events: \(events.map(\.compact))") }
            let m: JSON
            do { m = try c.readMessage() } catch {
                throw JobTestError("\(label): waiting for \(what): \(error); events: \(events.map(\.compact))")
            }
            guard m["event"] != nil else { throw JobTestError("\(label): a response while waiting for \(what): \(m.compact)") }
            events.append(m)
        }
    }

    /// Waits for JOB_STATUS_CHANGE of `id` to `status`.
    func waitStatus(_ id: String, _ status: String, from: Int) throws {
        try waitEvent(from: from, "JOB_STATUS_CHANGE \(id) -> \(status)") {
            $0["event"]?.stringValue == "JOB_STATUS_CHANGE" && $0["data"]?["id"]?.stringValue == id
                && $0["data"]?["status"]?.stringValue == status
        }
    }

    func waitEvent(_ name: String, from: Int) throws {
        try waitEvent(from: from, name) { $0["event"]?.stringValue == name }
    }

    /// Starts a job with a recorded command that must succeed.
    func startJob(_ name: String, _ args: JSON) throws -> Int {
        let m = mark
        try ok(name, args)
        return m
    }

    /// quit; the daemon must exit 0. Idempotent.
    func quit() throws {
        guard let d = daemon else { return }
        daemon = nil
        if d.poll() != nil {
            client = nil
            throw JobTestError("\(label): the daemon died: \(d.stderrText())")
        }
        if let c = client {
            _ = try? c.execute("quit")
            // (QEMU announces BLOCK_EXPORT_DELETED while quitting: not part of the comparison.)
        }
        client = nil
        let status = d.wait()
        #expect(status == 0, "\(label): exit status \(status) after quit: \(d.stderrText())")
    }

    var stderrText: String { daemon?.stderrText() ?? "" }

    // MARK: facts

    func fact(_ key: String, _ value: String) { facts.append((key, value)) }

    /// The nodes as query-named-block-nodes lists them: name, driver,
    /// file, backing file, read-only; implicit names collapsed, sorted.
    func nodeSummary() throws -> [String] {
        let nodes = try query("query-named-block-nodes", ["flat": true]).arrayValue ?? []
        return nodes.map { n in
            canonical(.array([n["node-name"] ?? .null, n["drv"] ?? .null, n["file"] ?? .null,
                              n["backing_file"] ?? .null, n["ro"] ?? .null])).compact
        }.sorted()
    }

    func nodesFact(_ key: String) throws { fact(key, try nodeSummary().joined(separator: "\n")) }

    /// x-debug-query-block-graph in QEMU's order, ids replaced by names
    /// (implicit node names collapsed, backends as "backend", jobs by id):
    /// every node, then every edge with its permissions.
    func graphSummary() throws -> String {
        let g = try query("x-debug-query-block-graph")
        var names: [Int64: String] = [:]
        var lines: [String] = []
        for n in g["nodes"]?.arrayValue ?? [] {
            let type = n["type"]?.stringValue ?? "?"
            var name = n["name"]?.stringValue ?? ""
            if name.hasPrefix("#block") { name = "#block" }
            if type == "block-backend" { name = "backend" }
            names[n["id"]?.int64Value ?? -1] = name
            lines.append("\(type) \(name)")
        }
        for e in g["edges"]?.arrayValue ?? [] {
            let p = names[e["parent"]?.int64Value ?? -1] ?? "?", c = names[e["child"]?.int64Value ?? -1] ?? "?"
            let perm = (e["perm"]?.arrayValue ?? []).compactMap(\.stringValue).joined(separator: ",")
            let shared = (e["shared-perm"]?.arrayValue ?? []).compactMap(\.stringValue).joined(separator: ",")
            lines.append("\(p) -\(e["name"]?.stringValue ?? "?")-> \(c) perm=\(perm) shared=\(shared)")
        }
        return lines.joined(separator: "\n")
    }

    func graphFact(_ key: String) throws { fact(key, try graphSummary()) }

    /// query-block-exports: which node each export serves now.
    func exportsFact(_ key: String) throws {
        let e = try query("query-block-exports").arrayValue ?? []
        fact(key, e.map { canonical(.array([$0["id"] ?? .null, $0["node-name"] ?? .null])).compact }.joined(separator: "\n"))
    }

    /// The job list without the volatile fields (offset, busy); an error
    /// answer is summarized as itself.
    func jobSummary() throws -> String {
        guard let c = client else { throw JobTestError("\(label): no monitor") }
        let r = try c.execute("query-block-jobs")
        events += c.events
        c.events.removeAll()
        guard let jobs = r["return"]?.arrayValue else { return canonical(r).compact }
        return jobs.map { j in
            canonical(.object((j.objectMembers ?? []).filter { !["offset", "busy"].contains($0.0) })).compact
        }.joined(separator: "\n")
    }

    /// Exact values for comparison: paths relative to the run's directory,
    /// implicit node names collapsed, numbers as signed, members sorted.
    func canonical(_ j: JSON) -> JSON {
        switch j {
        case .object(let m): return .object(m.map { ($0.0, canonical($0.1)) }.sorted { $0.0 < $1.0 })
        case .array(let a): return .array(a.map(canonical))
        case .string(let s):
            if s.hasPrefix("#block") { return "#block" }
            return .string(s.replacingOccurrences(of: dir.path, with: "DIR"))
        case .uint(let u) where u <= UInt64(Int64.max): return .int(Int64(u))
        default: return j
        }
    }

    // MARK: after quit

    /// qemu-img info --backing-chain of `image`: the chain must be
    /// `expect` (file names), and is a fact (backing strings modulo the directory).
    func chainFact(_ image: String, expect: [String]?) throws {
        let r = try qemuImg(["info", "--backing-chain", "--output=json", path(image)])
        try expectOK(r, "qemu-img info --backing-chain \(image)")
        let chain = try JSON.parse(r.stdout).arrayValue ?? []
        let keys = ["filename", "format", "virtual-size", "backing-filename", "full-backing-filename", "backing-filename-format"]
        let lines = chain.map { i in canonical(.array(keys.map { i[$0] ?? .null })).compact }
        fact("chain of \(image)", lines.joined(separator: "\n"))
        let names = chain.map { ($0["filename"]?.stringValue ?? "?").split(separator: "/").last.map(String.init) ?? "?" }
        if let expect { #expect(names == expect, "\(label): chain of \(image):\n\(r.stdout)") }
    }

    /// qemu-img check of every qcow2 image of the run.
    func checkImages() throws {
        let files = try FileManager.default.contentsOfDirectory(atPath: dir.path).filter { $0.hasSuffix(".qcow2") }.sorted()
        for f in files {
            let r = try qemuImg(["check", path(f)])
            #expect(r.status == 0, "\(label): qemu-img check \(f): \(r)")
        }
    }

    /// The guest view of `image` (with its backing chain) equals the
    /// model: a raw image with `writes` applied in order.
    func expectContent(_ image: String, _ writes: [PatternWrite], _ what: String) throws {
        refCount += 1
        let ref = path("model-\(refCount).raw")
        try expectOK(try qemuImg(["create", "-q", "-f", "raw", ref, "\(ChainData.size)"]), "create model")
        try qemuIO(ref, writes)
        let r = try qemuImg(["compare", "-f", "raw", "-F", "qcow2", ref, path(image)])
        #expect(r.status == 0, "\(label): \(image) is not \(what): \(r)")
        unlink(ref)
    }

    /// Writes through the export.
    func nbdWrite(_ writes: [PatternWrite]) throws { try qemuIO(nbdURI, writes) }

    /// What the export reads equals the model.
    func expectExportContent(_ writes: [PatternWrite], _ what: String) throws {
        refCount += 1
        let ref = path("model-\(refCount).raw")
        try expectOK(try qemuImg(["create", "-q", "-f", "raw", ref, "\(ChainData.size)"]), "create model")
        try qemuIO(ref, writes)
        let r = try qemuImg(["compare", "-f", "raw", "-F", "raw", ref, nbdURI])
        #expect(r.status == 0, "\(label): the export does not read \(what): \(r)")
        unlink(ref)
    }
}

/// qemu-io writing `ChainData.writer` through the export again and again
/// (a new connection per pass) until told to stop after a full pass: every
/// write happened at least once, so the end result is predictable.
final class LiveWriter: @unchecked Sendable {
    let child: ChildProcess
    let dir: String

    init(_ run: JobRun) throws {
        dir = run.dir.path
        let cmds = ChainData.writer.map { "-c '\($0.command)'" }.joined(separator: " ")
        let script = """
        n=0
        while :; do
          qemu-io -f raw \(cmds) '\(run.nbdURI)' > '\(dir)/writer.out' 2>&1 || { cat '\(dir)/writer.out' >&2; exit 1; }
          if grep -q failed '\(dir)/writer.out'; then cat '\(dir)/writer.out' >&2; exit 2; fi
          n=$((n+1)); echo $n > '\(dir)/writer.passes'
          [ -e '\(dir)/writer.stop' ] && exit 0
        done
        """
        try script.write(toFile: dir + "/writer.sh", atomically: true, encoding: .utf8)
        child = try ChildProcess(["/bin/sh", dir + "/writer.sh"], stderrPath: dir + "/writer.err")
    }

    var passes: Int {
        Int(((try? String(contentsOfFile: dir + "/writer.passes", encoding: .utf8)) ?? "0")
            .trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0
    }

    /// Waits (at most 30 s) until one full pass is done.
    func waitFirstPass() throws {
        let deadline = Date().addingTimeInterval(30)
        while passes == 0 {
            if child.poll() != nil || Date() > deadline {
                throw JobTestError("the NBD writer made no pass: \(errText)")
            }
            usleep(5_000)
        }
    }

    /// Waits (at most 30 s) until `n` more full passes are done.
    func waitPasses(_ n: Int) throws {
        let target = passes + n
        let deadline = Date().addingTimeInterval(30)
        while passes < target {
            if child.poll() != nil || Date() > deadline {
                throw JobTestError("the NBD writer stopped after \(passes) passes: \(errText)")
            }
            usleep(5_000)
        }
    }

    var errText: String { (try? String(contentsOfFile: dir + "/writer.err", encoding: .utf8)) ?? "" }

    /// Lets the current pass end; the writer must have succeeded throughout.
    func finish(_ label: String) {
        _ = FileManager.default.createFile(atPath: dir + "/writer.stop", contents: nil)
        let s = child.wait(timeout: 60)
        #expect(s == 0, "\(label): the NBD writer failed (status \(s.map(String.init) ?? "timeout")) after \(passes) passes: \(errText)")
    }

    deinit {
        _ = FileManager.default.createFile(atPath: dir + "/writer.stop", contents: nil)
    }
}

/// Runs a scenario on both daemons and compares them.
enum JobParity {
    /// Fields of answers compared exactly; all others by shape (same keys,
    /// same JSON types). `offset`, `busy`, `paused`, progress counters and
    /// sizes on disk may differ.
    static let exactKeys: Set<String> = [
        "type", "device", "status", "ready", "io-status", "auto-finalize", "auto-dismiss", "len", "total-progress",
        "speed", "id", "node-name", "shutting-down", "error", "drv", "ro",
    ]
    /// Fields of event data compared exactly.
    static let eventKeys: Set<String> = ["type", "device", "len", "status", "id", "speed", "error", "action", "operation"]

    /// `lenVaries`: the job's length depends on the concurrent writer (active commit).
    @discardableResult
    static func both(lenVaries: Bool = false, _ body: (JobRun) throws -> Void) -> [JobRun] {
        var runs: [JobRun] = []
        for impl in Impl.allCases {
            // qemu-storage-daemon 7.2 itself sometimes aborts on an internal
            // assertion (mirror.c's "QLIST_EMPTY(&bs->tracked_requests)"
            // when a guest writes while an active commit completes): the
            // reference crashed, not the scenario; it is run again, from
            // scratch, up to three times.
            var attempt = 0
            while true {
                attempt += 1
                let r = JobRun(impl)
                do {
                    try body(r)
                } catch {
                    r.failed = true
                    if impl == .qemu && attempt < 3 && r.stderrText.contains("Assertion `") {
                        try? r.quit()
                        continue
                    }
                    let e = "\(error)"
                    Issue.record("\(e.hasPrefix(r.label) ? e : "\(r.label): \(e)")\n--- daemon stderr ---\n\(r.stderrText)")
                }
                try? r.quit()
                runs.append(r)
                break
            }
        }
        // Progress reaches len: a job that completed without error ends
        // with offset == len (both daemons).
        for r in runs {
            for e in r.events where e["event"] == "BLOCK_JOB_COMPLETED" && e["data"]?["error"] == nil {
                #expect(e["data"]?["offset"] == e["data"]?["len"], "\(r.label): \(e.compact)")
            }
        }
        guard let q = runs.first, let l = runs.last else { return runs }
        if q.failed || l.failed {
            // Incomplete: the commands both got to, for the diagnosis.
            for (i, (a, b)) in zip(q.steps, l.steps).enumerated() {
                let x = "\(a.0) -> \(response(a.1, q, exactKeys))", y = "\(b.0) -> \(response(b.1, l, exactKeys))"
                #expect(x == y, "command #\(i)\nqemu:   \(x)\nlamina: \(y)")
            }
            return runs
        }
        compare(q, l, lenVaries: lenVaries)
        // The same guest view in both results (each in its own directory).
        if let c = try? qemuImg(["compare", "-f", "qcow2", "-F", "qcow2", q.path(q.result), l.path(l.result)]) {
            #expect(c.status == 0, "guest view of \(q.result): qemu's and \(l.label)'s differ: \(c)")
        }
        return runs
    }

    static func shape(_ j: JSON, _ exact: Set<String>, _ run: JobRun) -> JSON {
        switch j {
        case .object(let m):
            return .object(m.map { ($0.0, exact.contains($0.0) ? run.canonical($0.1) : shape($0.1, exact, run)) }
                .sorted { $0.0 < $1.0 })
        case .array(let a): return .array(a.map { shape($0, exact, run) })
        case .string: return "<string>"
        case .int, .uint, .double: return "<number>"
        case .bool: return "<bool>"
        case .null: return .null
        }
    }

    /// A response as compared: errors exactly, returns by shape.
    static func response(_ r: JSON, _ run: JobRun, _ exact: Set<String>) -> String {
        if r["error"] != nil { return run.canonical(["error": r["error"] ?? .null]).compact }
        if let v = r["return"] { return (["return": shape(v, exact, run)] as JSON).compact }
        return run.canonical(r).compact
    }

    static func event(_ e: JSON, _ run: JobRun, _ exact: Set<String>) -> String {
        "\(e["event"]?.stringValue ?? "?") \(shape(e["data"] ?? .null, exact, run).compact)"
    }

    static func compare(_ q: JobRun, _ l: JobRun, lenVaries: Bool) {
        var exact = exactKeys, ev = eventKeys
        if lenVaries {
            exact.subtract(["len", "total-progress"])
            ev.remove("len")
        }
        let qs = q.steps.map { "\($0.0) -> \(response($0.1, q, exact))" }
        let ls = l.steps.map { "\($0.0) -> \(response($0.1, l, exact))" }
        #expect(qs.count == ls.count, "number of commands: qemu \(qs.count), \(l.label) \(ls.count)")
        for (i, (a, b)) in zip(qs, ls).enumerated() {
            #expect(a == b, "command #\(i)\nqemu:   \(a)\nlamina: \(b)")
        }
        let qe = q.events.map { event($0, q, ev) }
        let le = l.events.map { event($0, l, ev) }
        #expect(qe == le, "events differ\nqemu:\n  \(qe.joined(separator: "\n  "))\nlamina:\n  \(le.joined(separator: "\n  "))")
        #expect(q.facts.map(\.0) == l.facts.map(\.0), "facts recorded: \(q.facts.map(\.0)) vs \(l.facts.map(\.0))")
        for ((k, a), (_, b)) in zip(q.facts, l.facts) {
            #expect(a == b, "\(k)\nqemu:\n\(a)\nlamina:\n\(b)")
        }
    }
}
