#if canImport(Glibc)
import Glibc
#endif
import BlockCore
import LaminaJSON

/// Buffered standard output (flushed explicitly and at exit).
final class StdoutBuffer: @unchecked Sendable {
    static let shared = StdoutBuffer()
    private var bytes: [UInt8] = []

    func write(_ s: String) {
        bytes += Array(s.utf8)
        if bytes.count > 1 << 16 { flush() }
    }

    func flush() {
        var off = 0
        while off < bytes.count {
            let n = bytes[off...].withUnsafeBytes { Glibc.write(1, $0.baseAddress!, $0.count) }
            if n <= 0 { break }
            off += n
        }
        bytes.removeAll(keepingCapacity: true)
    }
}

func out(_ s: String) { StdoutBuffer.shared.write(s) }
func outln(_ s: String = "") { StdoutBuffer.shared.write(s + "\n") }
func errln(_ s: String) {
    StdoutBuffer.shared.flush()
    FileHandleStderr.write(s + "\n")
}

