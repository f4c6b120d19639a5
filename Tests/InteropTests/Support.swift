import Foundation
import TestSupport
import Testing

/// Captured result of one process run.
struct ProcessResult: Equatable, CustomStringConvertible {
    var status: Int32
    var stdout: String
    var stderr: String
    var description: String { "rc=\(status)\n--- stdout ---\n\(stdout)--- stderr ---\n\(stderr)" }
}

/// Runs `args[0]` (looked up in PATH unless it contains a slash) with the
/// remaining arguments, in `cwd`, with a hard timeout; never inherits stdin.
/// Built on TestSupport's posix_spawn runner (Foundation's Process sometimes
/// never notices a child's exit here).
func run(_ args: [String], cwd: String? = nil, timeout: TimeInterval = 120, env: [String: String] = [:]) throws -> ProcessResult {
    let r = try TestSupport.runProcess(args, cwd: cwd, environment: env, timeout: timeout)
    if r.timedOut {
        Issue.record("timed out after \(timeout)s: \(args.joined(separator: " "))")
        return ProcessResult(status: -1, stdout: "", stderr: "timeout")
    }
    return ProcessResult(status: r.status, stdout: r.stdout, stderr: r.stderr)
}

/// The directory holding the built products (lamina-img, lamina-io), found
/// from the test bundle's location so any scratch path works.
let productsDirectory: String = {
    for b in Bundle.allBundles where b.bundlePath.hasSuffix(".xctest") {
        return b.bundleURL.deletingLastPathComponent().path
    }
    let exe = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
    return exe.path
}()

let laminaImg = productsDirectory + "/lamina-img"
let laminaIO = productsDirectory + "/lamina-io"

/// A temporary directory, removed when released.
final class TempDir: @unchecked Sendable {
    let path: String
    init() {
        path = FileManager.default.temporaryDirectory.path + "/lamina-interop-" + UUID().uuidString
        try! FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }
    func file(_ name: String) -> String { path + "/" + name }
    deinit { try? FileManager.default.removeItem(atPath: path) }
}

/// Runs the same qemu-img style command line through qemu-img and
/// lamina-img in `cwd` and returns both results, with lamina-img's program
/// name replaced by qemu-img's so the texts can be compared.
func both(_ args: [String], cwd: String, prepare: (() throws -> Void)? = nil) throws -> (qemu: ProcessResult, lamina: ProcessResult) {
    try prepare?()
    let q = try run(["qemu-img"] + args, cwd: cwd)
    try prepare?()
    var l = try run([laminaImg] + args, cwd: cwd)
    l.stdout = l.stdout.replacingOccurrences(of: "lamina-img", with: "qemu-img")
    l.stderr = l.stderr.replacingOccurrences(of: "lamina-img", with: "qemu-img")
    return (q, l)
}

/// Overwrites bytes of a file at `offset` (for building damaged images).
func patch(_ path: String, at offset: UInt64, _ bytes: [UInt8]) throws {
    let h = try FileHandle(forUpdating: URL(fileURLWithPath: path))
    try h.seek(toOffset: offset)
    try h.write(contentsOf: Data(bytes))
    try h.close()
}

func be64(_ v: UInt64) -> [UInt8] { (0..<8).map { UInt8(truncatingIfNeeded: v >> (56 - 8 * UInt64($0))) } }
func be32(_ v: UInt32) -> [UInt8] { (0..<4).map { UInt8(truncatingIfNeeded: v >> (24 - 8 * UInt32($0))) } }
func be16(_ v: UInt16) -> [UInt8] { [UInt8(v >> 8), UInt8(truncatingIfNeeded: v)] }
