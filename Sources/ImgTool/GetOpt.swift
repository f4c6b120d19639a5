/// A getopt_long work-alike (GNU semantics: options and operands may be
/// mixed, `--` ends options, long options may be abbreviated to a unique
/// prefix), reporting errors the way qemu-img does.
struct GetOpt {
    struct LongOption {
        var name: String
        var hasArgument: Bool
        /// The key reported for this option (a short option letter or a name).
        var key: String
    }

    enum Failure: Error, Equatable {
        case missingArgument(String)
        case unrecognized(String)
    }

    /// Parsed options in command-line order, and the operands.
    var options: [(key: String, value: String?)] = []
    var operands: [String] = []

    init(_ args: [String], short: String, long: [LongOption] = []) throws(Failure) {
        // Short option table: letter -> takes argument.
        var table: [Character: Bool] = [:]
        let chars = Array(short)
        var i = 0
        while i < chars.count {
            let c = chars[i]
            if c == ":" || c == "+" { i += 1; continue }
            let arg = i + 1 < chars.count && chars[i + 1] == ":"
            table[c] = arg
            i += arg ? 2 : 1
        }
        var idx = 0
        while idx < args.count {
            let a = args[idx]
            idx += 1
            if a == "--" {
                operands += args[idx...]
                break
            }
            if a.hasPrefix("--") {
                let body = a.dropFirst(2)
                let name: Substring
                var inlineValue: String?
                if let eq = body.firstIndex(of: "=") {
                    name = body[..<eq]
                    inlineValue = String(body[body.index(after: eq)...])
                } else {
                    name = body
                }
                let exact = long.first { $0.name == name }
                let matches = exact.map { [$0] } ?? long.filter { $0.name.hasPrefix(name) }
                let distinct = Set(matches.map { $0.key + ($0.hasArgument ? ":" : "") })
                guard let opt = matches.first, !name.isEmpty, distinct.count == 1 else {
                    throw .unrecognized(a)
                }
                if opt.hasArgument {
                    if let v = inlineValue {
                        options.append((opt.key, v))
                    } else if idx < args.count {
                        options.append((opt.key, args[idx]))
                        idx += 1
                    } else {
                        throw .missingArgument(a)
                    }
                } else {
                    if inlineValue != nil { throw .unrecognized(a) }
                    options.append((opt.key, nil))
                }
                continue
            }
            if a.hasPrefix("-") && a.count > 1 {
                let letters = Array(a.dropFirst())
                var j = 0
                while j < letters.count {
                    let c = letters[j]
                    guard let takesArg = table[c] else {
                        // GNU getopt has not advanced past this element when the
                        // bad letter is not its last one: qemu-img then names the
                        // element before it.
                        if j < letters.count - 1 && idx >= 2 { throw .unrecognized(args[idx - 2]) }
                        throw .unrecognized(a)
                    }
                    if takesArg {
                        if j + 1 < letters.count {
                            options.append((String(c), String(letters[(j + 1)...])))
                        } else if idx < args.count {
                            options.append((String(c), args[idx]))
                            idx += 1
                        } else {
                            throw .missingArgument(a)
                        }
                        break
                    }
                    options.append((String(c), nil))
                    j += 1
                }
                continue
            }
            operands.append(a)
        }
    }
}
