/// A JSON value as QEMU's QObject models it: objects keep their members in
/// insertion order (printers apply QEMU's QDict iteration order, see
/// `JSON.qdictOrder`), integers are signed or unsigned 64-bit (QNum's
/// I64/U64), other numbers are doubles.
///
/// Equality is structural; object members compare in order, so two objects
/// with the same members inserted in different orders are not equal (use
/// `sameMembers(as:)` for an order-insensitive comparison). Numbers of
/// different cases never compare equal (`.int(1) != .uint(1)`), as QEMU's
/// qobject_is_equal does not apply either: callers that care convert first.
public indirect enum JSON: Sendable, Equatable, Hashable {
    case object([(String, JSON)])
    case array([JSON])
    case string(String)
    case int(Int64)
    case uint(UInt64)
    case double(Double)
    case bool(Bool)
    case null

    public static func == (lhs: JSON, rhs: JSON) -> Bool {
        switch (lhs, rhs) {
        case (.object(let a), .object(let b)):
            return a.count == b.count && zip(a, b).allSatisfy { $0.0 == $1.0 && $0.1 == $1.1 }
        case (.array(let a), .array(let b)): return a == b
        case (.string(let a), .string(let b)): return a == b
        case (.int(let a), .int(let b)): return a == b
        case (.uint(let a), .uint(let b)): return a == b
        case (.double(let a), .double(let b)): return a == b
        case (.bool(let a), .bool(let b)): return a == b
        case (.null, .null): return true
        default: return false
        }
    }

    public func hash(into hasher: inout Hasher) {
        switch self {
        case .object(let m):
            hasher.combine(0)
            for (k, v) in m { hasher.combine(k); hasher.combine(v) }
        case .array(let a): hasher.combine(1); hasher.combine(a)
        case .string(let s): hasher.combine(2); hasher.combine(s)
        case .int(let i): hasher.combine(3); hasher.combine(i)
        case .uint(let u): hasher.combine(4); hasher.combine(u)
        case .double(let d): hasher.combine(5); hasher.combine(d)
        case .bool(let b): hasher.combine(6); hasher.combine(b)
        case .null: hasher.combine(7)
        }
    }

    /// True when both are objects with equal members regardless of order
    /// (recursively), or otherwise equal.
    public func sameMembers(as other: JSON) -> Bool {
        switch (self, other) {
        case (.object(let a), .object(let b)):
            guard a.count == b.count else { return false }
            for (k, v) in a {
                guard let w = b.first(where: { $0.0 == k })?.1, v.sameMembers(as: w) else { return false }
            }
            return true
        case (.array(let a), .array(let b)):
            return a.count == b.count && zip(a, b).allSatisfy { $0.sameMembers(as: $1) }
        default:
            return self == other
        }
    }

    /// An empty object, `{}`.
    public static let emptyObject = JSON.object([])
}

// MARK: - Accessors

extension JSON {
    /// The member named `key` of an object (first match), nil for other
    /// values or a missing key. Setting nil removes the member; setting a
    /// value replaces it in place or appends it. Setting on a non-object
    /// turns the value into a one-member object.
    public subscript(key: String) -> JSON? {
        get {
            guard case .object(let m) = self else { return nil }
            return m.first(where: { $0.0 == key })?.1
        }
        set {
            var m: [(String, JSON)]
            if case .object(let old) = self { m = old } else { m = [] }
            if let i = m.firstIndex(where: { $0.0 == key }) {
                if let v = newValue { m[i].1 = v } else { m.remove(at: i) }
            } else if let v = newValue {
                m.append((key, v))
            }
            self = .object(m)
        }
    }

    /// The element at `index` of an array, nil when out of range or not an array.
    public subscript(index: Int) -> JSON? {
        guard case .array(let a) = self, a.indices.contains(index) else { return nil }
        return a[index]
    }

    public var stringValue: String? { if case .string(let s) = self { return s }; return nil }
    public var boolValue: Bool? { if case .bool(let b) = self { return b }; return nil }
    public var objectMembers: [(String, JSON)]? { if case .object(let m) = self { return m }; return nil }
    public var arrayValue: [JSON]? { if case .array(let a) = self { return a }; return nil }
    public var isNull: Bool { if case .null = self { return true }; return false }
    public var isObject: Bool { if case .object = self { return true }; return false }

    /// The value as a signed 64-bit integer (QEMU's qnum_get_try_int):
    /// `.int`, or `.uint` up to Int64.max. Doubles are not converted.
    public var int64Value: Int64? {
        switch self {
        case .int(let i): return i
        case .uint(let u): return u <= UInt64(Int64.max) ? Int64(u) : nil
        default: return nil
        }
    }

    /// The value as an unsigned 64-bit integer (qnum_get_try_uint):
    /// `.uint`, or a non-negative `.int`.
    public var uint64Value: UInt64? {
        switch self {
        case .uint(let u): return u
        case .int(let i): return i >= 0 ? UInt64(i) : nil
        default: return nil
        }
    }

    /// Any number as a double (qnum_get_double).
    public var doubleValue: Double? {
        switch self {
        case .int(let i): return Double(i)
        case .uint(let u): return Double(u)
        case .double(let d): return d
        default: return nil
        }
    }

    /// True for the three number cases.
    public var isNumber: Bool {
        switch self {
        case .int, .uint, .double: return true
        default: return false
        }
    }

    /// The keys of an object in insertion order (empty for other values).
    public var keys: [String] { objectMembers?.map(\.0) ?? [] }
}

// MARK: - Literals

extension JSON: ExpressibleByStringLiteral, ExpressibleByIntegerLiteral, ExpressibleByBooleanLiteral,
    ExpressibleByFloatLiteral, ExpressibleByNilLiteral, ExpressibleByArrayLiteral, ExpressibleByDictionaryLiteral
{
    public init(stringLiteral value: String) { self = .string(value) }
    public init(integerLiteral value: Int64) { self = .int(value) }
    public init(booleanLiteral value: Bool) { self = .bool(value) }
    public init(floatLiteral value: Double) { self = .double(value) }
    public init(nilLiteral: ()) { self = .null }
    public init(arrayLiteral elements: JSON...) { self = .array(elements) }
    /// Members keep the literal's order.
    public init(dictionaryLiteral elements: (String, JSON)...) { self = .object(elements) }
}

extension JSON: CustomStringConvertible {
    /// The compact one-line form QEMU prints on QMP (see `compact`).
    public var description: String { compact }
}
