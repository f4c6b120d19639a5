import BlockCore
import BlockGraph
import BlockInfo
import Qcow2

/// QEMU's create option lists (QemuOpts) for the formats Lamina writes:
/// parsing `-o` strings, the "Formatting ..." line and `-o help`.
struct CreateOptions {
    enum Kind { case size, number, bool, string }

    struct Spec {
        var name: String
        var kind: Kind
        var help: String
        var defaultValue: String?

        /// The line `-o help` prints for this option.
        var helpLine: String {
            let type: String
            switch kind {
            case .size: type = "<size>"
            case .number: type = "<num>"
            case .bool: type = "<bool (on/off)>"
            case .string: type = "<str>"
            }
            return "  " + pad(name + "=" + type, 22, left: true) + " - " + help + "\n"
        }
    }

    static let fileSpecs: [Spec] = [
        Spec(name: "size", kind: .size, help: "Virtual disk size"),
        Spec(name: "nocow", kind: .bool, help: "Turn off copy-on-write (valid only on btrfs)"),
        Spec(name: "preallocation", kind: .string, help: "Preallocation mode (allowed values: off, falloc, full)"),
        Spec(name: "extent_size_hint", kind: .size, help: "Extent size hint for the image file, 0 to disable"),
    ]

    static let qcow2Specs: [Spec] = [
        Spec(name: "encryption", kind: .bool, help: "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)"),
        Spec(name: "encrypt.format", kind: .string, help: "Encrypt the image, format choices: 'aes', 'luks'"),
        Spec(name: "encrypt.key-secret", kind: .string, help: "ID of secret providing qcow AES key or LUKS passphrase"),
        Spec(name: "encrypt.cipher-alg", kind: .string, help: "Name of encryption cipher algorithm"),
        Spec(name: "encrypt.cipher-mode", kind: .string, help: "Name of encryption cipher mode"),
        Spec(name: "encrypt.ivgen-alg", kind: .string, help: "Name of IV generator algorithm"),
        Spec(name: "encrypt.ivgen-hash-alg", kind: .string, help: "Name of IV generator hash algorithm"),
        Spec(name: "encrypt.hash-alg", kind: .string, help: "Name of encryption hash algorithm"),
        Spec(name: "encrypt.iter-time", kind: .number, help: "Time to spend in PBKDF in milliseconds"),
        Spec(name: "cluster_size", kind: .size, help: "qcow2 cluster size", defaultValue: "65536"),
        Spec(name: "extended_l2", kind: .bool, help: "Extended L2 tables", defaultValue: "off"),
        Spec(name: "preallocation", kind: .string, help: "Preallocation mode (allowed values: off, metadata, falloc, full)"),
        Spec(name: "compression_type", kind: .string, help: "Compression method used for image cluster compression", defaultValue: "zlib"),
        Spec(name: "size", kind: .size, help: "Virtual disk size"),
        Spec(name: "compat", kind: .string, help: "Compatibility level (v2 [0.10] or v3 [1.1])"),
        Spec(name: "backing_file", kind: .string, help: "File name of a base image"),
        Spec(name: "backing_fmt", kind: .string, help: "Image format of the base image"),
        Spec(name: "data_file", kind: .string, help: "File name of an external data file"),
        Spec(name: "data_file_raw", kind: .bool, help: "The external data file must stay valid as a raw image"),
        Spec(name: "lazy_refcounts", kind: .bool, help: "Postpone refcount updates", defaultValue: "off"),
        Spec(name: "refcount_bits", kind: .number, help: "Width of a reference count entry in bits", defaultValue: "16"),
        Spec(name: "nocow", kind: .bool, help: "Turn off copy-on-write (valid only on btrfs)"),
        Spec(name: "extent_size_hint", kind: .size, help: "Extent size hint for the image file, 0 to disable"),
    ]

    static let rawFormatSpecs: [Spec] = [Spec(name: "size", kind: .size, help: "Virtual disk size")]

    static func specs(for format: String) -> [Spec] {
        format == "qcow2" ? qcow2Specs : fileSpecs
    }

    let format: String
    /// An option list other than the format's creation options (amend's).
    var customSpecs: [Spec]?
    /// Values as QEMU keeps them: sizes and numbers normalised, the rest verbatim.
    private(set) var values: [String: String] = [:]

    init(format: String) { self.format = format }
    init(format: String, specs: [Spec]) {
        self.format = format
        self.customSpecs = specs
    }

    func has(_ key: String) -> Bool { values[key] != nil }
    func value(_ key: String) -> String? {
        values[key] ?? CreateOptions.specs(for: format).first { $0.name == key }?.defaultValue
    }

    mutating func set(_ key: String, _ v: String) { values[key] = v }

    /// True if the option list asks for help ("help" or "?" as an element).
    static func wantsHelp(_ list: String) -> Bool {
        splitList(list)?.contains { $0 == "help" || $0 == "?" } ?? false
    }

    /// Splits on commas; ",," is a literal comma. nil for an invalid list.
    static func splitList(_ list: String) -> [String]? {
        if list.isEmpty { return nil }
        var parts: [String] = []
        var cur = ""
        var chars = Array(list)
        var i = 0
        while i < chars.count {
            if chars[i] == "," {
                if i + 1 < chars.count && chars[i + 1] == "," {
                    cur.append(",")
                    i += 2
                    continue
                }
                parts.append(cur)
                cur = ""
                i += 1
                continue
            }
            cur.append(chars[i])
            i += 1
        }
        parts.append(cur)
        chars.removeAll()
        if parts.contains(where: \.isEmpty) { return nil }
        return parts
    }

    /// Parses a `-o` list into the option set. Errors are phrased as QEMU's.
    mutating func parse(_ list: String) throws(ToolError) {
        guard CreateOptions.splitList(list) != nil else { throw ToolError(message: "Invalid option list: \(list)") }
        let specs = customSpecs ?? CreateOptions.specs(for: format)
        for (key, value) in CreateOptions.tokenize(list) where !(value == nil && (key == "help" || key == "?")) {
            guard let spec = specs.first(where: { $0.name == key }) else {
                throw ToolError(message: "Invalid parameter '\(key)'")
            }
            switch spec.kind {
            case .bool:
                let v = value ?? "on"
                guard ["on", "off", "yes", "no", "true", "false"].contains(v) else {
                    throw ToolError(message: "Parameter '\(key)' expects 'on' or 'off'")
                }
                values[key] = value == nil ? "on" : v
            case .size:
                guard let v = value, let r = try? parseSize(v) else {
                    throw ToolError(message: "Parameter '\(key)' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.")
                }
                values[key] = String(r.value)
            case .number:
                guard let v = value, let n = CreateOptions.strtoull(v) else {
                    throw ToolError(message: "Parameter '\(key)' expects a number")
                }
                values[key] = String(n)
            case .string:
                values[key] = value ?? ""
            }
        }
    }

    /// QEMU's is_valid_option_list: not empty, not starting with a comma,
    /// not ending in an odd number of commas.
    static func isValidOptionList(_ list: String) -> Bool {
        guard let first = list.first, first != "," else { return false }
        let trailing = list.reversed().prefix { $0 == "," }.count
        return trailing % 2 == 0
    }

    /// QemuOpts' reading of a list: a name runs to the first '=' or ','
    /// (no escapes; without '=' it is a flag), a value to the next single
    /// ',' (",," is a literal comma).
    static func tokenize(_ list: String) -> [(String, String?)] {
        var out: [(String, String?)] = []
        let c = Array(list)
        var i = 0
        while i < c.count {
            var name = ""
            while i < c.count && c[i] != "=" && c[i] != "," {
                name.append(c[i])
                i += 1
            }
            if i < c.count && c[i] == "=" {
                i += 1
                var value = ""
                while i < c.count {
                    if c[i] == "," {
                        if i + 1 < c.count && c[i + 1] == "," {
                            value.append(",")
                            i += 2
                            continue
                        }
                        break
                    }
                    value.append(c[i])
                    i += 1
                }
                out.append((name, value))
            } else {
                out.append((name, nil))
            }
            if i < c.count && c[i] == "," { i += 1 }
        }
        return out
    }

    /// C strtoull(s, NULL, 0) with full-string check.
    static func strtoull(_ s: String) -> UInt64? {
        if s.hasPrefix("0x") || s.hasPrefix("0X") { return UInt64(s.dropFirst(2), radix: 16) }
        if s.count > 1 && s.hasPrefix("0") { return UInt64(s.dropFirst(), radix: 8) }
        return UInt64(s)
    }

    static func isTrue(_ v: String?) -> Bool { v == "on" || v == "yes" || v == "true" }

    /// "Formatting 'f', fmt=qcow2 cluster_size=65536 ..." (without newline).
    func formattingLine(_ filename: String) -> String {
        var s = "Formatting '\(filename)', fmt=\(format)"
        let order: [Spec] = format == "qcow2" ? CreateOptions.qcow2Specs : CreateOptions.fileSpecs
        for spec in order {
            if let v = values[spec.name] ?? spec.defaultValue { s += " \(spec.name)=\(v)" }
        }
        return s
    }

    static func helpText(format: String, withFilename: Bool) -> String {
        var specs = format == "qcow2" ? qcow2Specs.filter { $0.name != "nocow" && $0.name != "extent_size_hint" } : rawFormatSpecs
        var s: String
        if withFilename {
            for f in fileSpecs where !specs.contains(where: { $0.name == f.name }) { specs.append(f) }
            s = "Supported options:\n"
        } else {
            s = "Supported \(format) options:\n"
        }
        for spec in specs.sorted(by: { $0.name < $1.name }) { s += spec.helpLine }
        if !withFilename {
            s += "\nThe protocol level may support further options.\nSpecify the target filename to include those options.\n"
        }
        return s
    }

    /// The qcow2 creation options, validated with QEMU's messages (the
    /// checks QEMU makes after printing the Formatting line).
    func qcow2Options(size: Int64) throws(ToolError) -> Qcow2CreateOptions {
        var o = Qcow2CreateOptions()
        o.size = roundUpToSector(size)
        if let c = values["compat"] {
            switch c {
            case "0.10", "v2": o.version = 2
            case "1.1", "v3": o.version = 3
            default: throw ToolError(message: "Parameter 'version' does not accept value '\(c)'")
            }
        }
        if let p = values["preallocation"] {
            guard let m = Preallocation(rawValue: p) else {
                throw ToolError(message: "Parameter 'preallocation' does not accept value '\(p)'")
            }
            o.preallocation = m
        }
        if let c = values["compression_type"] {
            switch c {
            case "zlib": o.compressionType = .zlib
            case "zstd": o.compressionType = .zstd
            default: throw ToolError(message: "Parameter 'compression-type' does not accept value '\(c)'")
            }
        }
        o.clusterSize = Int(clamping: UInt64(value("cluster_size") ?? "65536") ?? 0)
        o.extendedL2 = CreateOptions.isTrue(value("extended_l2"))
        o.lazyRefcounts = CreateOptions.isTrue(value("lazy_refcounts"))
        o.refcountBits = Int(clamping: UInt64(value("refcount_bits") ?? "16") ?? 0)
        o.backingFile = values["backing_file"]
        o.backingFormat = values["backing_fmt"]
        if CreateOptions.isTrue(values["encryption"]) || values["encrypt.format"] != nil {
            throw ToolError(message: "Encrypted images are not supported by Lamina")
        }
        if values["data_file"] != nil || CreateOptions.isTrue(values["data_file_raw"]) {
            throw ToolError(message: "External data files are not supported by Lamina")
        }
        return o
    }
}
