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


/// QEMU's size_to_str: "196 KiB", "1 GiB", "1.5 GiB", "512 B".
func humanSize(_ v: UInt64) -> String {
    let suffixes = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"]
    var e: Int32 = 0
    _ = frexp(Double(v) / (1000.0 / 1024.0), &e)
    let i = max(0, Int((e - 1) / 10))
    let div = Double(UInt64(1) << UInt64(i * 10))
    return cPrintf("%0.3g", Double(v) / div) + " " + suffixes[i] + "B"
}
