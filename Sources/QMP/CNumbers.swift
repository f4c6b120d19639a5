#if canImport(Glibc)
import Glibc
#endif

/// QEMU's number parsers (util/cutils.c) as the keyval visitor and
/// QemuOpts use them: whole-string conversions through the C library,
/// nil on any error (empty, trailing characters, out of range).
public enum CNumbers {
    /// qemu_strtoi64(str, NULL, base): strtoll semantics (leading space,
    /// sign, `0x` and octal with base 0).
    public static func strtoi64(_ s: String, base: Int32) -> Int64? {
        s.withCString { p -> Int64? in
            var end: UnsafeMutablePointer<CChar>? = nil
            errno = 0
            let v = strtoll(p, &end, base)
            guard let e = end, e != UnsafeMutablePointer(mutating: p), e.pointee == 0, errno == 0 else { return nil }
            return Int64(v)
        }
    }

    /// qemu_strtou64(str, NULL, base): strtoull semantics, so "-1" is
    /// 18446744073709551615.
    public static func strtou64(_ s: String, base: Int32) -> UInt64? {
        s.withCString { p -> UInt64? in
            var end: UnsafeMutablePointer<CChar>? = nil
            errno = 0
            let v = strtoull(p, &end, base)
            guard let e = end, e != UnsafeMutablePointer(mutating: p), e.pointee == 0, errno == 0 else { return nil }
            return UInt64(v)
        }
    }

    /// qemu_strtod_finite: strtod over the whole string, rejecting
    /// overflow, inf and nan.
    public static func strtodFinite(_ s: String) -> Double? {
        s.withCString { p -> Double? in
            var end: UnsafeMutablePointer<CChar>? = nil
            errno = 0
            let v = strtod(p, &end)
            guard let e = end, e != UnsafeMutablePointer(mutating: p), e.pointee == 0, errno == 0, v.isFinite else {
                return nil
            }
            return v
        }
    }

    /// Multiplier of a size suffix (B, K, M, G, T, P, E; either case).
    private static func suffixMultiplier(_ c: UInt8) -> UInt64? {
        switch c | 0x20 {
        case UInt8(ascii: "b"): return 1
        case UInt8(ascii: "k"): return 1 << 10
        case UInt8(ascii: "m"): return 1 << 20
        case UInt8(ascii: "g"): return 1 << 30
        case UInt8(ascii: "t"): return 1 << 40
        case UInt8(ascii: "p"): return 1 << 50
        case UInt8(ascii: "e"): return 1 << 60
        default: return nil
        }
    }

    /// qemu_strtosz: a decimal number with optional fraction and suffix
    /// (default bytes; a fraction needs a suffix other than B), or hex
    /// `0x...` without fraction or suffix. Negative numbers, exponents and
    /// results of 2^64 or more are rejected.
    public static func strtosz(_ s: String) -> UInt64? {
        let b = Array(s.utf8)
        var i = 0
        while i < b.count, b[i] == 0x20 || (b[i] >= 0x09 && b[i] <= 0x0D) { i += 1 }
        if i < b.count, b[i] == UInt8(ascii: "-") { return nil }
        if i < b.count, b[i] == UInt8(ascii: "+") { i += 1 }
        let digitsStart = i
        while i < b.count, b[i] >= 0x30, b[i] <= 0x39 { i += 1 }
        if i == digitsStart { return nil }
        guard var val = UInt64(String(decoding: b[digitsStart..<i], as: UTF8.self)) else { return nil }
        if val == 0, i < b.count, b[i] | 0x20 == UInt8(ascii: "x") {
            guard let v = strtou64(s, base: 16) else { return nil }
            return v
        }
        var frac: UInt64 = 0
        if i < b.count, b[i] == UInt8(ascii: ".") {
            let f = i
            i += 1
            while i < b.count, b[i] >= 0x30, b[i] <= 0x39 { i += 1 }
            if i < b.count, b[i] | 0x20 == UInt8(ascii: "e") {
                // An exponent makes the whole input invalid (unless it is a suffix).
                let afterE = i + 1
                if afterE < b.count, (b[afterE] >= 0x30 && b[afterE] <= 0x39) || b[afterE] == 0x2B || b[afterE] == 0x2D {
                    return nil
                }
            }
            let text = "0" + String(decoding: b[f..<i], as: UTF8.self)
            let fraction = strtod(text, nil)
            if fraction > 0 { frac = UInt64(min(fraction * 18_446_744_073_709_551_616.0, 18_446_744_073_709_549_568.0)) }
        }
        var mul: UInt64 = 1
        if i < b.count, let m = suffixMultiplier(b[i]) {
            mul = m
            i += 1
        }
        guard i == b.count else { return nil }
        if mul == 1 {
            return frac == 0 ? val : nil
        }
        var (hi, lo) = val.multipliedFullWidth(by: mul)
        let (fhi, _) = frac.multipliedFullWidth(by: mul)
        let fraction = frac &* mul  // low 64 bits: the remaining fraction
        var carry: Bool
        (lo, carry) = lo.addingReportingOverflow(fhi)
        if carry { hi += 1 }
        (lo, carry) = lo.addingReportingOverflow(fraction >> 63)  // round 0.5 up
        if carry { hi += 1 }
        if hi != 0 { return nil }
        val = lo
        return val
    }
}
