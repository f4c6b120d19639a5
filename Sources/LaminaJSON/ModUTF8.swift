/// QEMU's "modified UTF-8" rules (util/unicode.c): UTF-8 where U+0000 may
/// be written as the overlong pair C0 80; surrogates, noncharacters,
/// overlong forms (other than C0 80) and code points above U+10FFFF are
/// invalid.
public enum ModUTF8 {
    /// Unicode's 66 noncharacters: U+FDD0...U+FDEF and every U+xxFFFE/U+xxFFFF.
    public static func isNoncharacter(_ cp: UInt32) -> Bool {
        (cp >= 0xFDD0 && cp <= 0xFDEF) || (cp & 0xFFFE) == 0xFFFE
    }

    /// True when `cp` can be encoded (QEMU's mod_utf8_encode accepts it).
    public static func isEncodable(_ cp: Int) -> Bool {
        cp >= 0 && cp <= 0x10FFFF && !(cp >= 0xD800 && cp <= 0xDFFF) && !isNoncharacter(UInt32(cp))
    }

    /// Decodes the sequence starting at `bytes[start]`, reading at most up to
    /// `end` (exclusive). Returns the code point (nil when invalid) and the
    /// index after the sequence, with QEMU's rules for how far an invalid
    /// sequence extends: a NUL or empty input consumes nothing, an
    /// impossible byte (FE, FF) or stray continuation byte consumes one, a
    /// truncated sequence consumes its lead and the continuation bytes
    /// present. Precondition: `start <= end <= bytes.count`.
    public static func decode(_ bytes: UnsafeBufferPointer<UInt8>, at start: Int, end: Int) -> (cp: UInt32?, next: Int) {
        if start >= end || bytes[start] == 0 { return (nil, start) }
        var p = start
        var byte = UInt32(bytes[p]); p += 1
        if byte < 0x80 { return (byte, p) }
        if byte >= 0xFE || byte & 0x40 == 0 { return (nil, p) }
        var len = 0
        var mask: UInt32 = 0x80
        while byte & mask != 0 { len += 1; mask >>= 1 }
        var cp = byte & (mask - 1)
        for _ in 1..<len {
            byte = p < end ? UInt32(bytes[p]) : 0
            if byte & 0xC0 != 0x80 { return (nil, p) }
            p += 1
            cp = (cp << 6) | (byte & 0x3F)
        }
        let minCP: [UInt32] = [0x80, 0x800, 0x10000, 0x200000, 0x4000000]
        if cp > 0x10FFFF || isNoncharacter(cp) || (cp >= 0xD800 && cp <= 0xDFFF) {
            return (nil, p)
        }
        if cp < minCP[len - 2] && !(cp == 0 && len == 2) { return (nil, p) }
        return (cp, p)
    }

    /// Converts raw bytes to the string QEMU would print for them: decoding
    /// stops at the first NUL byte (C strings), each invalid sequence
    /// becomes U+FFFD, C0 80 becomes U+0000.
    public static func lenientString(_ bytes: some Collection<UInt8>) -> String {
        let array = Array(bytes)
        if let fast = fastASCII(array) { return fast }
        var scalars = String.UnicodeScalarView()
        array.withUnsafeBufferPointer { buf in
            var i = 0
            while i < buf.count && buf[i] != 0 {
                let (cp, next) = decode(buf, at: i, end: buf.count)
                scalars.append(cp.flatMap(Unicode.Scalar.init) ?? "\u{FFFD}")
                i = max(next, i + 1)
            }
        }
        return String(scalars)
    }

    /// Decodes a whole string strictly (the JSON parser's rule for string
    /// contents): nil on the first invalid sequence.
    public static func strictString(_ bytes: UnsafeBufferPointer<UInt8>, from: Int, to: Int) -> String? {
        var scalars = String.UnicodeScalarView()
        var i = from
        while i < to {
            let (cp, next) = decode(bytes, at: i, end: to)
            guard let c = cp, let s = Unicode.Scalar(c) else { return nil }
            scalars.append(s)
            i = next
        }
        return String(scalars)
    }

    private static func fastASCII(_ bytes: [UInt8]) -> String? {
        for b in bytes where b == 0 || b >= 0x80 { return nil }
        return String(decoding: bytes, as: UTF8.self)
    }
}
