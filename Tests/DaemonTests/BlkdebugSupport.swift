import Foundation
import LaminaJSON
import QMP
import TestSupport
import Testing

// The harness of BlkdebugTests: a scenario runs on qemu-storage-daemon
// and on Lamina (a JobRun each, in its own directory); what the NBD
// clients saw, what the daemons reported and what the queries answered
// are recorded as facts and compared, as the block-job tests do.

/// The image most blkdebug scenarios use: 16 MiB qcow2 (64 KiB clusters)
/// with pattern 1 over its first MiB, at host offset 0x50000 (sector 640).
enum BlkdebugImage {
    static let size = 16 << 20
    /// Host sector of guest byte `guest` inside the first MiB.
    static func sector(ofGuest guest: Int) -> Int { (0x50000 + guest) / 512 }
}

extension JobRun {
    /// Creates `name` as `BlkdebugImage` (qcow2) or, with `raw`, a raw
    /// file of the same size with the same first MiB.
    func makeBlkdebugImage(_ name: String = "a.qcow2", raw: Bool = false) throws {
        let f = raw ? "raw" : "qcow2"
        try expectOK(try qemuImg(["create", "-q", "-f", f, path(name), "\(BlkdebugImage.size)"]), "qemu-img create \(name)")
        try qemuIO(path(name), [PatternWrite(pattern: 1, offset: 0, length: 1 << 20)], format: f)
    }

    /// One qemu-io session over the export `export` (raw): its output
    /// without the timing lines and its exit status, recorded as a fact.
    @discardableResult
    func nbdSession(_ commands: [String], export: String = "disk") throws -> ProcessResult {
        let uri = "nbd+unix:///\(export)?socket=\(nbdSocket)"
        let r = try run(["qemu-io", "-f", "raw"] + commands.flatMap { ["-c", $0] } + [uri])
        let keep = { (s: String) in
            s.split(separator: "\n", omittingEmptySubsequences: false).filter { !$0.contains(" ops; ") }.joined(separator: "\n")
        }
        fact("qemu-io \(commands.joined(separator: "; ")) (\(export))",
             "status \(r.status)\nstdout:\n\(keep(r.stdout))stderr:\n\(keep(r.stderr))")
        return r
    }

    /// The NBD clients the daemon dropped so far because a request failed
    /// ("Disconnect client, due to: Failed to send reply: ..." on its
    /// stderr), as a fact. (A client that reconnects and hangs up during
    /// the handshake is reported too, with timing-dependent texts: not
    /// compared.)
    func disconnectsFact() {
        let lines = stderrText.split(separator: "\n").filter { $0.contains("Disconnect client, due to: Failed to send reply") }.map { line in
            line.split(separator: ":", maxSplits: 1).last.map { String($0.dropFirst()) } ?? String(line)
        }
        fact("dropped NBD clients", lines.joined(separator: "\n"))
    }

    /// nbdinfo's block sizes for `export`, as a fact.
    func blockSizesFact(export: String = "disk") throws {
        let r = try run(["nbdinfo", "--json", "nbd+unix:///\(export)?socket=\(nbdSocket)"])
        try expectOK(r, "nbdinfo \(export)")
        let info = try JSON.parse(r.stdout)
        let keys = ["block_size_minimum", "block_size_preferred", "block_size_maximum"]
        fact("block sizes of \(export)", keys.map { "\($0)=\(info[$0]?.compact ?? "-")" }.joined(separator: " "))
    }

    /// A query's answer, exactly (paths relative to the run's directory,
    /// implicit node names collapsed), as a fact.
    func queryFact(_ name: String, _ args: JSON? = nil) throws {
        let v = try query(name, args)
        let text = v.compact.replacingOccurrences(of: dir.path, with: "DIR")
        fact("\(name) \(args?.compact ?? "")", text.replacingOccurrences(
            of: #"#block[0-9]+"#, with: "#block", options: .regularExpression))
    }

    /// After quit: `qemu-img check` of `image` must find no errors; its
    /// verdict and exit status are a fact.
    func checkFact(_ image: String = "a.qcow2") throws {
        let r = try qemuImg(["check", path(image)])
        #expect(r.status == 0, "\(label): qemu-img check \(image): \(r)")
        fact("check \(image)", "status \(r.status): \(r.stdout.split(separator: "\n").first ?? "")")
    }
}

/// Runs a blkdebug scenario on both daemons and compares them.
enum BlkdebugParity {
    /// `body` runs on qemu-storage-daemon, then on Lamina; each daemon is
    /// quit (exit 0) and `after` runs (image checks). Commands, answers,
    /// events and facts are compared as JobParity compares them; the
    /// images named `same` must hold the same guest data in both runs.
    @discardableResult
    static func both(same: [(String, String)] = [], _ body: (JobRun) throws -> Void,
                     after: (JobRun) throws -> Void = { _ in }) -> [JobRun] {
        var runs: [JobRun] = []
        for impl in Impl.allCases {
            let r = JobRun(impl)
            do {
                try body(r)
                r.disconnectsFact()
                try r.quit()
                try after(r)
            } catch {
                r.failed = true
                Issue.record("\(r.label): \(error)\n--- daemon stderr ---\n\(r.stderrText)")
                try? r.quit()
            }
            runs.append(r)
        }
        guard let q = runs.first, let l = runs.last, !q.failed, !l.failed else { return runs }
        JobParity.compare(q, l, lenVaries: false)
        for (image, format) in same {
            if let c = try? qemuImg(["compare", "-f", format, "-F", format, q.path(image), l.path(image)]) {
                #expect(c.status == 0, "\(image): qemu's and \(l.label)'s data differ: \(c)")
            }
        }
        return runs
    }

    /// A daemon command line that must fail at start-up: exit status and
    /// stderr with the program name replaced.
    static func startFailure(_ impl: Impl, _ args: [String]) throws -> (Int32, String) {
        let r = try run([impl.binary] + args, timeout: 30)
        let name = impl == .qemu ? "qemu-storage-daemon" : "lamina-storage-daemon"
        return (r.status, r.stderr.replacingOccurrences(of: impl.binary + ":", with: "PROG:")
                    .replacingOccurrences(of: name + ":", with: "PROG:"))
    }
}
