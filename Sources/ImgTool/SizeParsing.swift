/// QEMU's qemu_strtosz: "1G", "1.5M", "512", "0x100", "+5", " 1M".
/// Fractions need a multiplier suffix; `b`/`B` means bytes. Returns nil on
/// any syntax error; `overflow` is set when the value is >= 2^63.
struct SizeParse {
    var value: UInt64
    var hexWithSuffix: Bool
}

enum SizeError: Error { case syntax, overflow }

func parseSize(_ text: String, defaultSuffix: Character = "B") throws(SizeError) -> SizeParse {
    var s = Substring(text)
    while let f = s.first, f == " " || f == "\t" || f == "\n" { s = s.dropFirst() }
    if s.first == "+" { s = s.dropFirst() }
    if s.first == "-" { throw .syntax }
    var isHex = false
    var intPart: UInt64 = 0
    var digits = 0
    var overflow = false
    if s.hasPrefix("0x") || s.hasPrefix("0X") {
        isHex = true
        s = s.dropFirst(2)
        while let c = s.first, let d = c.hexDigitValue {
            let (m, o1) = intPart.multipliedReportingOverflow(by: 16)
            let (a, o2) = m.addingReportingOverflow(UInt64(d))
            if o1 || o2 { overflow = true }
            intPart = a
            digits += 1
            s = s.dropFirst()
        }
        if digits == 0 { throw .syntax }
    } else {
        while let c = s.first, let d = c.wholeNumberValue, c.isASCII {
            let (m, o1) = intPart.multipliedReportingOverflow(by: 10)
            let (a, o2) = m.addingReportingOverflow(UInt64(d))
            if o1 || o2 { overflow = true }
            intPart = a
            digits += 1
            s = s.dropFirst()
        }
        if digits == 0 { throw .syntax }
    }
    var fraction = 0.0
    var hasFraction = false
    if !isHex, s.first == "." {
        s = s.dropFirst()
        hasFraction = true
        var scale = 0.1
        while let c = s.first, let d = c.wholeNumberValue, c.isASCII {
            fraction += Double(d) * scale
            scale /= 10
            s = s.dropFirst()
        }
    }
    var mult: UInt64 = 1
    let suffix = s.first ?? defaultSuffix
    if s.first != nil { s = s.dropFirst() }
    switch suffix {
    case "b", "B": mult = 1
    case "k", "K": mult = 1 << 10
    case "m", "M": mult = 1 << 20
    case "g", "G": mult = 1 << 30
    case "t", "T": mult = 1 << 40
    case "p", "P": mult = 1 << 50
    case "e", "E": mult = 1 << 60
    default: throw .syntax
    }
    if !s.isEmpty { throw .syntax }
    if hasFraction && mult == 1 { throw .syntax }
    if overflow { throw .overflow }
    let (v, o) = intPart.multipliedReportingOverflow(by: mult)
    if o { throw .overflow }
    var total = v
    if hasFraction {
        let extra = (fraction * Double(mult)).rounded()
        let (t, o2) = total.addingReportingOverflow(UInt64(extra))
        if o2 { throw .overflow }
        total = t
    }
    if total > UInt64(Int64.max) { throw .overflow }
    return SizeParse(value: total, hexWithSuffix: isHex && mult != 1)
}
