import Foundation
import TestSupport
import Testing

/// kill -9 at random instants: the image must never be corrupt (leaks are
/// allowed), and everything written before the last completed flush must
/// still be there.
@Suite("crash consistency (kill -9)", .serialized)
struct CrashTests {
    struct Config: Sendable, CustomTestStringConvertible {
        var options: String
        var backing: Bool
        var seed: UInt64
        var testDescription: String { "\(options)\(backing ? " +backing" : "") seed \(seed)" }
    }

    static let configs: [Config] = [
        Config(options: "cluster_size=65536", backing: false, seed: 11),
        Config(options: "cluster_size=65536", backing: true, seed: 12),
        Config(options: "cluster_size=4096,lazy_refcounts=on", backing: false, seed: 13),
        Config(options: "cluster_size=512", backing: true, seed: 14),
        Config(options: "cluster_size=65536,compat=0.10", backing: false, seed: 15),
        Config(options: "cluster_size=65536,extended_l2=on", backing: true, seed: 16),
    ]

    /// Every operation touches its own 64 KiB slot, so after a crash a slot
    /// holds either its new content or what it had before, never anything else.
    @Test("random writes, zeroes, discards and flushes killed mid-way", arguments: configs)
    func killDuringIO(_ config: Config) throws {
        let dir = TempDir()
        let size = 32 << 20
        let slot = 64 << 10
        var create = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", config.options]
        if config.backing {
            _ = try run(["qemu-img", "create", "-q", "-f", "qcow2", dir.file("base.qcow2"), "\(size)"])
            _ = try run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xbb 0 \(size)", dir.file("base.qcow2")])
            create += ["-b", "base.qcow2", "-F", "qcow2"]
        }
        let img = dir.file("crash.qcow2")
        #expect(try run(create + [img, "\(size)"]).status == 0)
        var rng = SeededRandom(seed: config.seed)
        for round in 0..<3 {
            // What the image holds before this round.
            let prevRaw = dir.file("prev\(round).raw")
            #expect(try run(["qemu-img", "convert", "-O", "raw", img, prevRaw]).status == 0)
            let prev = try Data(contentsOf: URL(fileURLWithPath: prevRaw))
            // Slots are used once per round; each op: (slot, kind, pattern).
            var slots = Array(0..<(size / slot))
            slots.shuffle(using: &rng)
            var ops: [(Int, Int, UInt8)] = []
            var cmds: [String] = []
            for (i, s) in slots.prefix(300).enumerated() {
                let kind = Int.random(in: 0..<10, using: &rng)
                let pat = UInt8(truncatingIfNeeded: 1 + round * 80 + i % 80)
                let off = s * slot
                // Sub-cluster sized writes at odd places inside the slot too.
                let sub = Int.random(in: 0..<8, using: &rng) * 512
                if kind < 6 {
                    cmds.append("write -P \(pat) \(off) \(slot)")
                    ops.append((s, 0, pat))
                } else if kind < 8 {
                    cmds.append("write -P \(pat) \(off + sub) \(slot - sub)")
                    ops.append((s, 1, pat))
                } else if kind < 9 {
                    cmds.append("write -z \(off) \(slot)")
                    ops.append((s, 2, 0))
                } else {
                    cmds.append("flush")
                    ops.append((-1, 3, 0))
                }
            }
            // Run lamina-io in the background and kill it at a random moment.
            let outPath = dir.file("io\(round).out")
            let p = try ChildProcess([laminaIO, "-f", "qcow2"] + cmds.flatMap { ["-c", $0] } + [img],
                                     stderrPath: "/dev/null", stdoutPath: outPath)
            usleep(UInt32.random(in: 20_000...250_000, using: &rng))
            p.signal(SIGKILL)
            _ = p.wait()
            let lines = String(decoding: (try? Data(contentsOf: URL(fileURLWithPath: outPath))) ?? Data(), as: UTF8.self)
                .split(separator: "\n")
            // Completed operations: one output line each, in order.
            let completed = lines.count
            let lastFlush = ops.prefix(completed).lastIndex { $0.1 == 3 } ?? -1

            let chk = try run(["qemu-img", "check", img])
            #expect(chk.status == 0 || chk.status == 3, "round \(round) killed after \(completed) ops: \(chk)")
            #expect(!chk.stdout.contains("Data may be corrupted"), "\(chk)")

            let raw = dir.file("r\(round).raw")
            #expect(try run(["qemu-img", "convert", "-O", "raw", img, raw]).status == 0)
            let data = try Data(contentsOf: URL(fileURLWithPath: raw))
            for (i, op) in ops.enumerated() where op.0 >= 0 {
                let s = op.0
                let lo = op.1 == 1 ? (s + 1) * slot - 512 : s * slot
                let region = data[lo..<((s + 1) * slot)]
                let old = prev[lo..<((s + 1) * slot)]
                let expected: UInt8 = op.1 == 2 ? 0 : op.2
                if i < lastFlush {
                    #expect(region.allSatisfy { $0 == expected }, "round \(round): op \(i) before the last flush is lost")
                } else {
                    // Not yet durable: like a disk's volatile cache, any sector
                    // of it may or may not have reached the image, but each
                    // sector holds either the new or the old bytes, never garbage.
                    var ok = true
                    var at = region.startIndex
                    while at < region.endIndex {
                        let r = region[at..<(at + 512)]
                        let o = old[at..<(at + 512)]
                        if !(r.allSatisfy { $0 == expected } || r.elementsEqual(o)) { ok = false }
                        at += 512
                    }
                    #expect(ok, "round \(round): op \(i) left garbage")
                }
            }
            // Reopen read-write: lamina repairs if needed; check stays clean.
            let again = try run([laminaIO, "-f", "qcow2", "-c", "write -P 9 0 512", img])
            #expect(again.status == 0, "\(again)")
            let chk2 = try run(["qemu-img", "check", img])
            #expect(chk2.status == 0 || chk2.status == 3, "\(chk2)")
            _ = try run(["qemu-img", "check", "-q", "-r", "leaks", img])
        }
    }

    @Test("lamina-img convert killed mid-way leaves a consistent target")
    func killDuringConvert() throws {
        let dir = TempDir()
        let src = dir.file("src.qcow2")
        _ = try run(["qemu-img", "create", "-q", "-f", "qcow2", src, "256M"])
        _ = try run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5c 0 200M", src])
        var rng = SeededRandom(seed: 99)
        for i in 0..<5 {
            let dst = dir.file("dst\(i).qcow2")
            let p = try ChildProcess([laminaImg, "convert", "-O", "qcow2", "-o",
                                      i % 2 == 0 ? "cluster_size=65536" : "cluster_size=4096", src, dst],
                                     stderrPath: "/dev/null", stdoutPath: "/dev/null")
            usleep(UInt32.random(in: 30_000...300_000, using: &rng))
            p.signal(SIGKILL)
            _ = p.wait()
            guard FileManager.default.fileExists(atPath: dst) else { continue }
            let chk = try run(["qemu-img", "check", dst])
            // A target killed before its header was written is not an image at all.
            if chk.stderr.contains("not in qcow2 format") || chk.stderr.contains("does not support checks") { continue }
            #expect(chk.status == 0 || chk.status == 3, "\(chk)")
        }
    }
}

