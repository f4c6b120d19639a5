import Foundation
import LaminaJSON
import QMP
import TestSupport
import Testing

/// The block graph while jobs run, compared with qemu-storage-daemon 7.2:
/// the filter nodes jobs insert (copy-on-read for block-stream, commit_top
/// for an intermediate commit, mirror_top for an active commit), named by
/// filter-node-name or implicit; the exports moved onto them and back; the
/// jobs' own edges and backends in x-debug-query-block-graph, with their
/// permissions; what other commands say about the nodes meanwhile; and
/// that all of it is gone once the job is over (completed or cancelled).
@Suite("Block graph during jobs compared with qemu-storage-daemon", .serialized)
struct GraphDuringJobsTests {
    typealias D = ChainData
    static let everything = D.a + D.b + D.c + D.d

    /// The facts of a graph at one moment.
    static func snapshot(_ r: JobRun, _ when: String) throws {
        try r.graphFact("graph \(when)")
        try r.exportsFact("exports \(when)")
        try r.nodesFact("nodes \(when)")
    }

    @Test("block-stream: an implicit copy-on-read filter above the device, the export on it; after a cancel, the graph as before")
    func streamImplicitFilterCancelled() {
        JobParity.both { r in
            try r.startSeedWalkthrough()
            try Self.snapshot(r, "before")
            let m = try r.startJob("block-stream", ["device": "node-D", "job-id": "job0", "speed": 1])
            try Self.snapshot(r, "during")
            let c = r.mark
            try r.ok("block-job-cancel", ["device": "job0"])
            try r.waitStatus("job0", "null", from: c)
            #expect(r.events[m...].contains { $0["event"] == "BLOCK_JOB_CANCELLED" }, "\(r.label)")
            try Self.snapshot(r, "after")
            try r.nbdWrite(D.post)
            try r.quit()
            try r.checkImages()
            try r.expectContent("d.qcow2", Self.everything + D.post, "A+B+C+D+post")
        }
    }

    @Test("block-stream with filter-node-name: the named filter, what other commands say meanwhile, writes through it; after COMPLETED the filter is gone")
    func streamNamedFilterCompleted() {
        JobParity.both { r in
            try r.startSeedWalkthrough()
            let m = try r.startJob("block-stream", ["device": "node-D", "base-node": "node-A", "job-id": "job0",
                                                    "speed": 1, "filter-node-name": "cor0"])
            try Self.snapshot(r, "during")
            // The device and the filter are no root nodes now; every node
            // of the chain is blocked by the job.
            r.bad("block-commit", ["device": "node-D", "job-id": "j1"])
            r.bad("block-commit", ["device": "cor0", "job-id": "j1"])
            r.bad("block-stream", ["device": "node-D", "job-id": "j1"])
            r.bad("block-stream", ["device": "node-C", "job-id": "j1"])
            r.bad("blockdev-snapshot-sync", ["node-name": "node-D", "snapshot-file": .string(r.path("e.qcow2")),
                                             "snapshot-node-name": "node-E", "format": "qcow2"])
            r.bad("blockdev-del", ["node-name": "node-C"])
            r.bad("blockdev-del", ["node-name": "cor0"])
            r.bad("blockdev-add", ["driver": "null-co", "node-name": "cor0"])
            // Guest writes go through the filter meanwhile.
            try r.nbdWrite(D.post)
            let s = r.mark
            try r.ok("block-job-set-speed", ["device": "job0", "speed": 0])
            try r.waitStatus("job0", "null", from: s)
            #expect(r.events[m...].contains { $0["event"] == "BLOCK_JOB_COMPLETED" }, "\(r.label)")
            try Self.snapshot(r, "after")
            try r.quit()
            try r.chainFact("d.qcow2", expect: ["d.qcow2", "a.qcow2"])
            try r.checkImages()
            try r.expectContent("d.qcow2", Self.everything + D.post, "A+B+C+D+post")
        }
    }

    @Test("block-stream: a filter-node-name already in use, or invalid, refuses the job and changes nothing")
    func streamBadFilterName() {
        JobParity.both { r in
            try r.startSeedWalkthrough()
            r.bad("block-stream", ["device": "node-D", "job-id": "job0", "filter-node-name": "node-B"])
            r.bad("block-stream", ["device": "node-D", "job-id": "job0", "filter-node-name": "1bad"])
            r.bad("block-stream", ["device": "node-D", "job-id": "", "filter-node-name": "cor0"])
            try Self.snapshot(r, "after")
            r.cmd("query-block-jobs")
        }
    }

    @Test("block-commit below the active layer: commit_top above top, the job's edges and backends; after a cancel the overlay reads top again; after COMPLETED the layers are gone")
    func intermediateCommitGraph() {
        JobParity.both { r in
            try r.startSeedWalkthrough()
            var m = try r.startJob("block-commit", ["device": "node-D", "top-node": "node-C", "base-node": "node-A",
                                                    "job-id": "job0", "speed": 1])
            try Self.snapshot(r, "during the first commit")
            r.bad("block-stream", ["device": "node-D", "job-id": "j1"])
            r.bad("block-commit", ["device": "node-D", "top-node": "node-C", "job-id": "j1"])
            let c = r.mark
            try r.ok("block-job-cancel", ["device": "job0"])
            try r.waitStatus("job0", "null", from: c)
            try Self.snapshot(r, "after the cancel")
            m = try r.startJob("block-commit", ["device": "node-D", "top-node": "node-C", "base-node": "node-A",
                                                "job-id": "job1", "speed": 1, "filter-node-name": "ctop"])
            try Self.snapshot(r, "during the second commit")
            try r.nbdWrite(D.post)
            let s = r.mark
            try r.ok("block-job-set-speed", ["device": "job1", "speed": 0])
            try r.waitStatus("job1", "null", from: s)
            #expect(r.events[m...].contains { $0["event"] == "BLOCK_JOB_COMPLETED" }, "\(r.label)")
            try Self.snapshot(r, "after COMPLETED")
            try r.quit()
            try r.chainFact("d.qcow2", expect: ["d.qcow2", "a.qcow2"])
            try r.checkImages()
            try r.expectContent("d.qcow2", Self.everything + D.post, "A+B+C+D+post")
            try r.expectContent("a.qcow2", D.a + D.b + D.c, "A+B+C")
        }
    }

    @Test("active block-commit: mirror_top above the active layer, the export on it; a cancel before READY puts the export back; complete moves it to the base")
    func activeCommitGraph() {
        JobParity.both { r in
            try r.startSeedWalkthrough()
            let m = try r.startJob("block-commit", ["device": "node-D", "job-id": "job0", "speed": 1])
            try Self.snapshot(r, "during the first commit")
            let c = r.mark
            try r.ok("block-job-cancel", ["device": "job0"])
            try r.waitStatus("job0", "null", from: c)
            #expect(r.events[m...].contains { $0["event"] == "BLOCK_JOB_CANCELLED" }, "\(r.label)")
            try Self.snapshot(r, "after the cancel")
            let m2 = try r.startJob("block-commit", ["device": "node-D", "job-id": "job1",
                                                     "filter-node-name": "mtop"])
            try r.waitEvent("BLOCK_JOB_READY", from: m2)
            try Self.snapshot(r, "when READY")
            let d = r.mark
            try r.ok("block-job-complete", ["device": "job1"])
            try r.waitStatus("job1", "null", from: d)
            try Self.snapshot(r, "after COMPLETED")
            try r.nbdWrite(D.post)
            try r.quit()
            try r.checkImages()
            try r.expectContent("a.qcow2", Self.everything + D.post, "A+B+C+D+post")
        }
    }
}

/// Permission conflicts with QEMU's messages, compared with
/// qemu-storage-daemon 7.2: a second writer of an image (another file node
/// on the same file: image locks), a writer on a read-only node, exports
/// and deletions of nodes in use, writers of layers a job reads.
@Suite("Permission conflicts compared with qemu-storage-daemon", .serialized)
struct PermissionConflictTests {
    @Test("second writers, read-only writers, nodes in use, writers under a job: QEMU's messages, nothing changes")
    func conflicts() {
        JobParity.both { r in
            try r.startNamedChain()
            let d = r.path("d.qcow2")
            // Another file node on the image node-D writes: opening takes
            // nothing; a qcow2 over it needs write, which node-D's file
            // refuses (image locks, even in one process).
            try r.ok("blockdev-add", ["driver": "file", "node-name": "fdup", "filename": .string(d)])
            r.bad("blockdev-add", ["driver": "qcow2", "node-name": "qdup", "file": "fdup"])
            // A read-only user may be added; exporting it writable is
            // refused, and even read-only: an export forbids resizing,
            // which node-D's file holds.
            try r.ok("blockdev-add", ["driver": "raw", "node-name": "rdup", "file": "fdup", "read-only": true])
            r.bad("block-export-add", ["type": "nbd", "id": "e1", "node-name": "rdup", "writable": true])
            r.bad("block-export-add", ["type": "nbd", "id": "e1", "node-name": "rdup", "name": "ro"])
            r.bad("block-export-add", ["type": "nbd", "id": "1e", "node-name": "rdup", "name": "ro"])
            r.bad("nbd-server-add", ["device": "rdup", "name": "ro", "writable": true])
            // Nodes in use.
            r.bad("blockdev-del", ["node-name": "fdup"])
            r.bad("blockdev-del", ["node-name": "node-C"])
            r.bad("blockdev-del", ["node-name": "node-D"])
            try r.ok("blockdev-del", ["node-name": "rdup"])
            try r.ok("blockdev-del", ["node-name": "fdup"])
            // A job that reads node-B and node-C refuses their writers.
            let m = try r.startJob("block-stream", ["device": "node-D", "job-id": "job0", "speed": 1])
            r.bad("block-export-add", ["type": "nbd", "id": "e2", "node-name": "node-B", "writable": true])
            r.bad("block-commit", ["device": "node-D", "top-node": "node-C", "job-id": "job1"])
            r.bad("blockdev-del", ["node-name": "node-B"])
            try r.ok("block-export-add", ["type": "nbd", "id": "e2", "node-name": "node-B", "name": "b"])
            try r.graphFact("graph with a reader of node-B during the stream")
            try r.ok("block-export-del", ["id": "e2"])
            let c = r.mark
            try r.ok("block-job-cancel", ["device": "job0"])
            try r.waitStatus("job0", "null", from: c)
            #expect(r.events[m...].contains { $0["event"] == "BLOCK_JOB_CANCELLED" }, "\(r.label)")
            // Now node-B may have a writer again (its users share write).
            try r.ok("block-export-add", ["type": "nbd", "id": "e3", "node-name": "node-B", "name": "b", "writable": true])
            try r.graphFact("graph after")
            try r.ok("block-export-del", ["id": "e3"])
            try r.quit()
            try r.checkImages()
        }
    }
}

/// The copy-on-read filter added by the user (blockdev-add), compared with
/// qemu-storage-daemon 7.2: its options and errors, its place in the graph,
/// and what reading through it copies into the node below.
@Suite("copy-on-read filter by blockdev-add compared with qemu-storage-daemon", .serialized)
struct CopyOnReadFilterTests {
    @Test("blockdev-add copy-on-read over the active layer with a bottom: reads through it copy only what lies above the bottom; bad options")
    func corFilter() {
        JobParity.both { r in
            try r.startNamedChain()
            r.bad("blockdev-add", ["driver": "copy-on-read", "node-name": "cor0"])
            r.bad("blockdev-add", ["driver": "copy-on-read", "node-name": "cor0", "file": "node-D", "bottom": "nope"])
            r.bad("blockdev-add", ["driver": "copy-on-read", "node-name": "cor0", "file": "nope"])
            try r.ok("blockdev-add", ["driver": "copy-on-read", "node-name": "cor0", "file": "node-D", "bottom": "node-C"])
            r.bad("blockdev-add", ["driver": "copy-on-read", "node-name": "cor1", "file": "node-D", "bottom": "cor0"])
            try r.ok("block-export-add", ["type": "nbd", "id": "e1", "node-name": "cor0", "name": "cor"])
            try r.graphFact("graph with the filter")
            try r.nodesFact("nodes with the filter")
            // Reading the whole disk through the filter copies what C
            // holds into D (not B's or A's data: bottom is C).
            let read = try run(["qemu-img", "convert", "-f", "raw", "-O", "raw",
                                "nbd+unix:///cor?socket=\(r.nbdSocket)", r.path("out.raw")])
            try r.expectOK(read, "read through the filter")
            try r.ok("block-export-del", ["id": "e1"])
            try r.ok("blockdev-del", ["node-name": "cor0"])
            try r.graphFact("graph after")
            try r.quit()
            // D now allocates C's ranges itself; the guest view is unchanged.
            let map = try run(["qemu-img", "map", "--output=json", "-f", "qcow2", r.path("d.qcow2")])
            try r.expectOK(map, "qemu-img map")
            // Host offsets follow the order in which qemu-img convert's
            // parallel reads completed (and decide which extents the map
            // merges); the allocation (depth, data, zero) is the fact.
            let allocation = Self.allocation(map.stdout)
            #expect(allocation.contains(#"1572864+1048576 "depth": 0"#), "C's range now in D: \(allocation)")
            r.fact("allocation of d.qcow2", allocation)
            try r.checkImages()
            try r.expectContent("d.qcow2", BlockJobTests.everything, "A+B+C+D")
        }
    }

    /// qemu-img map's JSON lines without host offsets, neighbours with the
    /// same attributes merged: "start+length attributes" per line.
    static func allocation(_ map: String) -> String {
        var merged: [(start: Int, length: Int, rest: String)] = []
        for line in map.split(separator: "\n") {
            guard let m = line.firstMatch(of: #/"start": (\d+), "length": (\d+), (.*?)(, "offset": \d+)?\}/#),
                  let start = Int(m.1), let length = Int(m.2) else { continue }
            let rest = String(m.3)
            if let last = merged.last, last.rest == rest, last.start + last.length == start {
                merged[merged.count - 1].length += length
            } else {
                merged.append((start, length, rest))
            }
        }
        return merged.map { "\($0.start)+\($0.length) \($0.rest)" }.joined(separator: "\n")
    }
}
