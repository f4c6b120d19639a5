import LaminaJSON

/// One value being visited (a struct member or list element), with the
/// names QEMU uses in its errors. Conversions throw QEMU's texts; see
/// `QAPIInput` for the two modes.
public struct QAPIValue {
    /// QEMU's QType of the value, for alternates (in keyval mode every
    /// scalar is a string).
    public enum QType: Sendable, Equatable {
        case object, array, string, number, bool, null
    }

    public let json: JSON
    public let mode: QAPIInput.Mode
    /// Path from the root struct to this value.
    public let path: [QAPIInput.PathComponent]
    /// The name the value was visited with (nil for list elements).
    public let bareName: String?

    public init(json: JSON, mode: QAPIInput.Mode, path: [QAPIInput.PathComponent], bareName: String?) {
        self.json = json
        self.mode = mode
        self.path = path
        self.bareName = bareName
    }

    /// QEMU's full_name for this value (`cache.direct`, `bitmaps[0]`).
    public var fullName: String { QAPIInput.render(path, mode: mode) }

    /// The name used by enum, range and alternate errors ("null" in lists).
    public var shortName: String { bareName ?? "null" }

    public var qtype: QType {
        switch json {
        case .object: return .object
        case .array: return .array
        case .string: return .string
        case .int, .uint, .double: return .number
        case .bool: return .bool
        case .null: return .null
        }
    }

    /// The error a generated alternate visitor reports when no branch
    /// matches: "Invalid parameter type for 'file', expected: BlockdevRef".
    public func alternateMismatch(expected typeName: String) -> QMPError {
        QMPError.invalidParameterType(shortName, expected: typeName)
    }

    /// qobject_input_get_keyval: the string of a keyval scalar.
    private func keyvalString() throws(QMPError) -> String {
        switch json {
        case .string(let s): return s
        case .object, .array: throw QMPError("Parameters '\(fullName).*' are unexpected")
        default: throw QMPError("Internal error: parameter \(fullName) invalid")
        }
    }

    public func string() throws(QMPError) -> String {
        if mode == .keyval { return try keyvalString() }
        guard case .string(let s) = json else { throw QMPError.invalidParameterType(fullName, expected: "string") }
        return s
    }

    public func bool() throws(QMPError) -> Bool {
        if mode == .keyval {
            switch try keyvalString() {
            case "on", "yes", "true", "y": return true
            case "off", "no", "false", "n": return false
            default: throw QMPError.invalidParameterValue(fullName, expects: "'on' or 'off'")
            }
        }
        guard case .bool(let b) = json else { throw QMPError.invalidParameterType(fullName, expected: "boolean") }
        return b
    }

    public func int64() throws(QMPError) -> Int64 {
        if mode == .keyval {
            guard let v = CNumbers.strtoi64(try keyvalString(), base: 0) else {
                throw QMPError.invalidParameterValue(fullName, expects: "integer")
            }
            return v
        }
        guard let v = json.int64Value else { throw QMPError.invalidParameterType(fullName, expected: "integer") }
        return v
    }

    /// uint64; negative int64 values wrap, as QEMU accepts them "for
    /// backward compatibility".
    public func uint64() throws(QMPError) -> UInt64 {
        if mode == .keyval {
            guard let v = CNumbers.strtou64(try keyvalString(), base: 0) else {
                throw QMPError.invalidParameterValue(fullName, expects: "integer")
            }
            return v
        }
        if let u = json.uint64Value { return u }
        if case .int(let i) = json { return UInt64(bitPattern: i) }
        throw QMPError.invalidParameterValue(fullName, expects: "uint64")
    }

    /// QAPI 'size': uint64 in QObject mode; in keyval mode QEMU's size
    /// syntax (`1k`, `1.5G`, `0x1000`).
    public func size() throws(QMPError) -> UInt64 {
        if mode == .keyval {
            guard let v = CNumbers.strtosz(try keyvalString()) else {
                throw QMPError.invalidParameterValue(fullName, expects: "size")
            }
            return v
        }
        return try uint64()
    }

    public func number() throws(QMPError) -> Double {
        if mode == .keyval {
            guard let v = CNumbers.strtodFinite(try keyvalString()) else {
                throw QMPError.invalidParameterType(fullName, expected: "number")
            }
            return v
        }
        guard let d = json.doubleValue else { throw QMPError.invalidParameterType(fullName, expected: "number") }
        return d
    }

    /// A fixed-width integer (visit_type_uint32 and friends): out of range
    /// gives "Parameter 'x' expects uint32_t" (bare name).
    public func integer<T: FixedWidthInteger>(_ type: T.Type) throws(QMPError) -> T {
        let name = (T.isSigned ? "int" : "uint") + "\(T.bitWidth)_t"
        if T.isSigned {
            let v = try int64()
            guard let r = T(exactly: v) else { throw QMPError.invalidParameterValue(shortName, expects: name) }
            return r
        }
        let v = try uint64()
        guard let r = T(exactly: v) else { throw QMPError.invalidParameterValue(shortName, expects: name) }
        return r
    }

    /// An enum: "Parameter 'x' does not accept value 'y'" (bare name).
    public func enumValue(allowed: [String]) throws(QMPError) -> String {
        let s = try string()
        guard allowed.contains(s) else { throw QMPError.invalidEnumValue(shortName, s) }
        return s
    }

    public func enumValue<E: RawRepresentable & CaseIterable>(_ type: E.Type) throws(QMPError) -> E
    where E.RawValue == String {
        let s = try string()
        guard let e = E(rawValue: s) else { throw QMPError.invalidEnumValue(shortName, s) }
        return e
    }

    /// The 'null' type.
    public func null() throws(QMPError) {
        guard case .null = json else { throw QMPError.invalidParameterType(fullName, expected: "null") }
    }

    /// A struct: `body` reads the members, then unexpected members are
    /// rejected ("Invalid parameter type for 'x', expected: object" when
    /// the value is not an object).
    public func object<T>(_ body: (QAPIInput) throws(QMPError) -> T) throws(QMPError) -> T {
        guard case .object(let m) = json else { throw QMPError.invalidParameterType(fullName, expected: "object") }
        let input = QAPIInput(members: m, mode: mode, path: path)
        let result = try body(input)
        try input.finish()
        return result
    }

    /// A list: `element` converts each element (visited without a name).
    public func list<T>(_ element: (QAPIValue) throws(QMPError) -> T) throws(QMPError) -> [T] {
        guard case .array(let items) = json else { throw QMPError.invalidParameterType(fullName, expected: "array") }
        var out: [T] = []
        out.reserveCapacity(items.count)
        for (i, item) in items.enumerated() {
            out.append(try element(QAPIValue(json: item, mode: mode, path: path + [.index(i)], bareName: nil)))
        }
        return out
    }
}
