#if canImport(Glibc)
import Glibc
#endif

/// Writes diagnostics to standard error without Foundation.
public enum FileHandleStderr {
    public static func write(_ s: String) {
        var s = s
        s.withUTF8 { p in
            var off = 0
            while off < p.count {
                let n = Glibc.write(2, p.baseAddress! + off, p.count - off)
                if n <= 0 { break }
                off += n
            }
        }
    }
}
