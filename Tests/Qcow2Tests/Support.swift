import BlockCore
import BlockDrivers
import BlockGraph
import Foundation
import TestSupport

/// Runs a program and captures its output.
struct ProcessResult {
    var status: Int32
    var stdout: String
    var stderr: String
}

func run(_ args: [String], cwd: String? = nil) throws -> ProcessResult {
    let r = try TestSupport.runProcess(args, cwd: cwd)
    return ProcessResult(status: r.status, stdout: r.stdout, stderr: r.stderr)
}

/// A temporary directory removed when the value is released.
final class TempDir: @unchecked Sendable {
    let path: String
    init() {
        let base = FileManager.default.temporaryDirectory.path
        path = base + "/lamina-test-" + UUID().uuidString
        try! FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }
    func file(_ name: String) -> String { path + "/" + name }
    deinit { try? FileManager.default.removeItem(atPath: path) }
}

/// A deterministic pseudo-random generator (xorshift) for reproducible tests.
struct SeededRandom: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed == 0 ? 0x9e37_79b9_7f4a_7c15 : seed }
    mutating func next() -> UInt64 {
        state ^= state << 13
        state ^= state >> 7
        state ^= state << 17
        return state
    }
}

func fill(_ buf: AlignedBuffer, pattern: UInt8) {
    memset(buf.pointer, Int32(pattern), buf.count)
}

func openRW(_ path: String, format: String? = nil) async throws -> BlockNode {
    var o = ImageOpenOptions()
    o.readOnly = false
    o.format = format
    return try await ImageOpener.open(path, o)
}

func openRO(_ path: String, format: String? = nil) async throws -> BlockNode {
    var o = ImageOpenOptions()
    o.format = format
    return try await ImageOpener.open(path, o)
}
