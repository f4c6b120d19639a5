import Foundation
import Testing

// Byte-for-byte parity of lamina-img with qemu-img 7.2 for info, check
// (with and without repair), map and compare, over the corpus of
// ParityCorpus.swift. Every command line runs in the corpus directory with
// relative file names, so outputs contain no random paths.
//
// Not compared with qemu-img (it hangs): check/map/compare on images whose
// backing chain loops. There Lamina must fail quickly, mentioning the
// infinite loop (see `backingLoop`). Images with an external data file are
// not in the corpus (unsupported by Lamina).

@Suite("qemu-img parity")
struct ParityTests {
    var dir: String { parityCorpus.path }

    @Test("corpus builds")
    func corpusBuilds() {
        #expect(parityCorpus.problems.isEmpty, "\(parityCorpus.problems.joined(separator: "\n"))")
        for img in ParityCatalog.images {
            #expect(FileManager.default.fileExists(atPath: dir + "/" + img.name), "missing \(img.name)")
        }
    }

    @Test("info", arguments: ParityCatalog.infoCases)
    func info(_ c: ParityCase) throws {
        expectParity(try both(c.args, cwd: dir), c.testDescription)
    }

    @Test("check", arguments: ParityCatalog.checkCases)
    func check(_ c: ParityCase) throws {
        expectParity(try both(c.args, cwd: dir), c.testDescription)
    }

    @Test("map", arguments: ParityCatalog.mapCases)
    func map(_ c: ParityCase) throws {
        expectParity(try both(c.args, cwd: dir), c.testDescription)
    }

    @Test("compare", arguments: ParityCatalog.compareCases)
    func compare(_ c: ParityCase) throws {
        expectParity(try both(c.args, cwd: dir), c.testDescription)
    }

    @Test("usage errors and options", arguments: ParityCatalog.usageCases)
    func usage(_ c: ParityCase) throws {
        if c.args == ["info", "-f", "vmdk", "c.qcow2"] {
            // Deliberate deviation: Lamina has no VMDK driver, so -f vmdk is
            // an unknown driver (qemu-img parses the file as VMDK and fails).
            let r = try run([laminaImg] + c.args, cwd: dir)
            #expect(r.status == 1 && r.stderr.hasSuffix("Could not open 'c.qcow2': Unknown driver 'vmdk'\n"), "\(r)")
            return
        }
        expectParity(try both(c.args, cwd: dir), c.testDescription)
    }

    /// Each tool repairs its own fresh copy of the pristine image (same
    /// file name, so messages match); then plain `qemu-img check` of both
    /// repaired copies must agree too.
    @Test("check -r", arguments: ParityCatalog.repairCases)
    func repair(_ c: RepairCase) throws {
        let fm = FileManager.default
        let pristine = dir + "/" + c.image
        let work = dir + "/" + c.workName
        let qemuRepaired = work + ".qemu-repaired"
        let laminaRepaired = work + ".lamina-repaired"
        defer {
            for p in [work, qemuRepaired, laminaRepaired] { try? fm.removeItem(atPath: p) }
        }
        var runs = 0
        let r = try both(c.args, cwd: dir, prepare: {
            if runs == 1 { try replace(qemuRepaired, with: work, move: true) }
            runs += 1
            try replace(work, with: pristine, move: false)
        })
        try replace(laminaRepaired, with: work, move: true)
        try replace(work, with: qemuRepaired, move: false)
        let afterQemu = try run(["qemu-img", "check", c.workName], cwd: dir)
        try replace(work, with: laminaRepaired, move: false)
        let afterLamina = try run(["qemu-img", "check", c.workName], cwd: dir)
        switch ParityCatalog.repairDeviation(c) {
        case .none:
            expectParity(r, c.testDescription)
            expectParity((afterQemu, afterLamina), "qemu-img check after \(c.testDescription)")
        case .betterRepair:
            // QEMU's repair fails here (it refuses to write over the L1 table it
            // could not count and marks the image corrupt); Lamina's succeeds.
            #expect(r.qemu.status == 1 && r.lamina.status == 0, "\(r.lamina)")
            #expect(afterLamina.status == 0, "\(afterLamina)")
        }
    }

    /// qemu-img hangs here, so lamina-img is not compared: it must fail
    /// within the timeout and say why.
    @Test("backing loop (lamina-img only)", arguments: ParityCatalog.loopCases)
    func backingLoop(_ c: ParityCase) throws {
        let r = try run([laminaImg] + c.args, cwd: dir, timeout: 20)
        #expect(r.status != 0 && r.status != -1, "\(c.testDescription): \(r)")
        #expect(r.stderr.contains("infinite loop"), "\(c.testDescription): \(r)")
    }
}

/// Replaces `dest` by a copy (or the moved file) of `source`.
private func replace(_ dest: String, with source: String, move: Bool) throws {
    let fm = FileManager.default
    if fm.fileExists(atPath: dest) { try fm.removeItem(atPath: dest) }
    if move {
        try fm.moveItem(atPath: source, toPath: dest)
    } else {
        try fm.copyItem(atPath: source, toPath: dest)
    }
}

/// Expects equal status, stdout and stderr; the failure message shows the
/// first differing line of each stream that differs.
private func expectParity(_ r: (qemu: ProcessResult, lamina: ProcessResult), _ label: String,
                          sourceLocation: SourceLocation = #_sourceLocation) {
    if r.qemu == r.lamina { return }
    var msg = "\(label)\n"
    if r.qemu.status != r.lamina.status { msg += "status: qemu \(r.qemu.status) lamina \(r.lamina.status)\n" }
    msg += firstDifference("stdout", r.qemu.stdout, r.lamina.stdout)
    msg += firstDifference("stderr", r.qemu.stderr, r.lamina.stderr)
    msg += "--- qemu-img ---\n\(r.qemu)\n--- lamina-img ---\n\(r.lamina)"
    Issue.record(Comment(rawValue: msg), sourceLocation: sourceLocation)
}

private func firstDifference(_ stream: String, _ q: String, _ l: String) -> String {
    if q == l { return "" }
    let ql = q.split(separator: "\n", omittingEmptySubsequences: false)
    let ll = l.split(separator: "\n", omittingEmptySubsequences: false)
    var i = 0
    while i < ql.count && i < ll.count && ql[i] == ll[i] { i += 1 }
    let qLine = i < ql.count ? "'\(ql[i])'" : "<end>"
    let lLine = i < ll.count ? "'\(ll[i])'" : "<end>"
    return "\(stream) line \(i + 1): qemu \(qLine)\n\(stream) line \(i + 1): lamina \(lLine)\n"
}
