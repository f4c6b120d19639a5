import Foundation
import Testing

@Suite("interop smoke")
struct SmokeTests {
    @Test("the built tools are found and run")
    func toolsRun() throws {
        let r = try run([laminaImg, "--help"])
        #expect(r.status == 0, "\(r)")
        let q = try run(["qemu-img", "--version"])
        #expect(q.status == 0, "qemu-img must be installed: \(q)")
    }
}
