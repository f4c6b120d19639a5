import Foundation
import Testing

/// Lamina never writes to an image it could not validate: every damaged
/// image here is refused with a clear error and stays byte-for-byte the
/// same (except the corrupt bit QEMU also sets when a write would land on
/// metadata).
@Suite("bad input: refused writes leave images untouched")
struct BadInputWriteTests {
    struct Damage: Sendable, CustomTestStringConvertible {
        var name: String
        var offset: UInt64
        var bytes: [UInt8]
        var message: String
        var testDescription: String { name }
    }

    static let damages: [Damage] = [
        Damage(name: "unknown incompatible feature", offset: 72, bytes: be64(1 << 20),
               message: "Unsupported qcow2 feature(s): Unknown incompatible feature: 100000"),
        Damage(name: "corrupt bit", offset: 72, bytes: be64(2), message: "qcow2: Image is corrupt; cannot be opened read/write"),
        Damage(name: "version 4", offset: 4, bytes: be32(4), message: "Unsupported qcow2 version 4"),
        Damage(name: "cluster bits 22", offset: 20, bytes: be32(22), message: "Unsupported cluster size: 2^22"),
        Damage(name: "refcount order 7", offset: 96, bytes: be32(7),
               message: "Reference count entry width too large; may not exceed 64 bits"),
        Damage(name: "L1 table offset unaligned", offset: 40, bytes: be64(0x30200), message: "Active L1 table offset invalid"),
        Damage(name: "L1 too small", offset: 36, bytes: be32(0), message: "L1 table is too small"),
        Damage(name: "refcount table unaligned", offset: 48, bytes: be64(0x10200),
               message: "Reference count table offset invalid"),
        Damage(name: "refcount table too large", offset: 56, bytes: be32(0x100000), message: "Reference count table too large"),
        Damage(name: "header length 80", offset: 100, bytes: be32(80), message: "qcow2 header too short"),
        Damage(name: "compression type 2", offset: 104, bytes: [2], message: "qcow2: unknown compression type: 2"),
        Damage(name: "encryption method 3", offset: 32, bytes: be32(3), message: "Unsupported encryption method 3"),
    ]

    @Test("write to a damaged header is refused", arguments: damages)
    func refused(_ d: Damage) throws {
        let dir = TempDir()
        let img = dir.file("d.qcow2")
        #expect(try run(["qemu-img", "create", "-q", "-f", "qcow2", img, "16M"]).status == 0)
        #expect(try run(["qemu-io", "-f", "qcow2", "-c", "write -P 7 0 1M", img]).status == 0)
        try patch(img, at: d.offset, d.bytes)
        let before = try Data(contentsOf: URL(fileURLWithPath: img))
        let r = try run([laminaIO, "-f", "qcow2", "-c", "write -P 1 0 64k", "-c", "write -z 1M 1M", "-c", "discard 0 64k", img])
        #expect(r.status != 0, "\(r)")
        #expect(r.stderr.contains(d.message), "\(r)")
        let after = try Data(contentsOf: URL(fileURLWithPath: img))
        #expect(before == after, "the image was modified")
        let conv = try run([laminaImg, "convert", "-n", "-O", "qcow2", "-f", "raw", "/dev/null", img])
        #expect(conv.status != 0)
        #expect(try Data(contentsOf: URL(fileURLWithPath: img)) == before, "convert -n modified it")
    }

    @Test("a data cluster pointing into metadata is never written; the image is marked corrupt")
    func metadataOverlap() throws {
        let dir = TempDir()
        let img = dir.file("m.qcow2")
        #expect(try run(["qemu-img", "create", "-q", "-f", "qcow2", img, "16M"]).status == 0)
        #expect(try run(["qemu-io", "-f", "qcow2", "-c", "write -P 7 0 64k", img]).status == 0)
        // L2 table at 0x40000, entry 0 -> the refcount table cluster (0x10000), COPIED.
        try patch(img, at: 0x40000, be64(0x8000_0000_0001_0000))
        let reftable = try Data(contentsOf: URL(fileURLWithPath: img))[0x10000..<0x20000]
        let r = try run([laminaIO, "-f", "qcow2", "-c", "write -P 1 0 4k", img])
        #expect(r.status != 0 || r.stdout.contains("failed"), "\(r)")
        let data = try Data(contentsOf: URL(fileURLWithPath: img))
        #expect(data[0x10000..<0x20000] == reftable, "metadata was overwritten")
        let info = try run(["qemu-img", "info", "--output=json", img])
        #expect(info.stdout.contains("\"corrupt\": true"), "\(info)")
        // And from now on the image refuses read-write opens, like QEMU.
        let again = try run([laminaIO, "-f", "qcow2", "-c", "write -P 1 1M 4k", img])
        #expect(again.status != 0 && again.stderr.contains("Image is corrupt; cannot be opened read/write"), "\(again)")
    }

    @Test("hostile backing chains fail fast: loops and missing files")
    func backingChains() throws {
        let dir = TempDir()
        for n in ["a", "b"] {
            #expect(try run(["qemu-img", "create", "-q", "-f", "qcow2", dir.file("\(n).qcow2"), "16M"]).status == 0)
        }
        _ = try run(["qemu-img", "rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", dir.file("a.qcow2")])
        _ = try run(["qemu-img", "rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", dir.file("b.qcow2")])
        for cmd in [["check"], ["map"], ["compare", "a.qcow2"], ["convert", "-O", "raw"]] {
            var args = [laminaImg] + cmd + ["a.qcow2"]
            if cmd[0] == "convert" { args.append("out.raw") }
            let r = try run(args, cwd: dir.path, timeout: 20)
            #expect(r.status != 0 && r.stderr.contains("creates an infinite loop"), "\(cmd): \(r)")
        }
        let w = try run([laminaIO, "-c", "write -P 1 0 4k", "a.qcow2"], cwd: dir.path, timeout: 20)
        #expect(w.status != 0 && w.stderr.contains("infinite loop"), "\(w)")
        _ = try run(["qemu-img", "rebase", "-u", "-b", "gone.qcow2", "-F", "qcow2", dir.file("a.qcow2")])
        let m = try run([laminaIO, "-c", "write -P 1 0 4k", "a.qcow2"], cwd: dir.path, timeout: 20)
        #expect(m.status != 0 && m.stderr.contains("Could not open 'gone.qcow2': No such file or directory"), "\(m)")
    }
}
