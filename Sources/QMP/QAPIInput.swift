import LaminaJSON

/// QEMU's QObject input visitor (qapi/qobject-input-visitor.c) for one
/// struct: command handlers read their arguments through it, member by
/// member in schema order, so errors come out in QEMU's order and text.
///
/// Two modes, as in QEMU:
/// - `.qobject` (QMP, JSON on the command line): values must have the
///   JSON type the schema expects.
/// - `.keyval` (KEY=VALUE command-line syntax): every scalar is a string
///   converted by the expected type (integers with `strtoll` base 0, sizes
///   with QEMU's suffixes, booleans on/yes/true/y and off/no/false/n).
///
/// Names in errors follow QEMU: missing/type/unexpected errors use the
/// full path (`file.cache.direct`, `bitmaps[0].name`, `x.0` in keyval
/// mode); enum, fixed-width range and alternate errors use the bare
/// member name (`null` inside a list).
///
/// Not thread-safe; create one per command invocation.
public final class QAPIInput {
    public enum Mode: Sendable, Equatable { case qobject, keyval }

    /// One step of a member's path.
    public enum PathComponent: Sendable, Equatable {
        case member(String)
        case index(Int)
    }

    public let mode: Mode
    /// Path of this struct from the root (empty for the root).
    public let path: [PathComponent]
    private let members: [(String, JSON)]
    private var unvisited: GHashOrder

    /// Visits `object` (which must be a JSON object) as the root struct.
    public convenience init(_ object: JSON, mode: Mode = .qobject) throws(QMPError) {
        guard case .object(let m) = object else {
            throw QMPError.invalidParameterType("null", expected: "object")
        }
        self.init(members: m, mode: mode, path: [])
    }

    init(members: [(String, JSON)], mode: Mode, path: [PathComponent]) {
        self.members = members
        self.mode = mode
        self.path = path
        self.unvisited = GHashOrder(inserting: JSON.qdictOrder(keys: members.map(\.0)))
    }

    /// QEMU's qobject_input_visitor_new_str, as qemu-storage-daemon parses
    /// --blockdev/--export/--nbd-server/--monitor: an argument starting
    /// with `{` is JSON (QObject mode), anything else KEY=VALUE (keyval
    /// mode, with `impliedKey` for a leading bare value). "help" gives
    /// "Help is not available for this option".
    public static func fromOption(_ text: String, impliedKey: String? = nil) throws(QMPError) -> QAPIInput {
        if text.utf8.first == UInt8(ascii: "{") {
            let value: JSON
            do { value = try JSON.parse(text) } catch { throw QMPError(error.message) }
            return try QAPIInput(value, mode: .qobject)
        }
        let (object, help) = try KeyVal.parse(text, impliedKey: impliedKey)
        if help { throw QMPError("Help is not available for this option") }
        return try QAPIInput(object, mode: .keyval)
    }

    /// The full name QEMU prints for `components` below the root.
    public func fullName(_ components: [PathComponent]) -> String {
        QAPIInput.render(components, mode: mode)
    }

    static func render(_ components: [PathComponent], mode: Mode) -> String {
        var s = ""
        for c in components {
            switch c {
            case .member(let n): s += s.isEmpty ? n : "." + n
            case .index(let i): s += mode == .keyval ? ".\(i)" : "[\(i)]"
            }
        }
        return s.isEmpty ? "<anonymous>" : s
    }

    // MARK: - Members

    /// visit_optional: whether member `name` is present (does not consume).
    public func has(_ name: String) -> Bool {
        members.contains { $0.0 == name }
    }

    /// The raw JSON of member `name`, without consuming it.
    public func peek(_ name: String) -> JSON? {
        members.first { $0.0 == name }?.1
    }

    /// Consumes member `name`; "Parameter 'x' is missing" when absent.
    public func required(_ name: String) throws(QMPError) -> QAPIValue {
        guard let v = optional(name) else {
            throw QMPError.missingParameter(fullName(path + [.member(name)]))
        }
        return v
    }

    /// Consumes member `name` when present. Alternates: take the member
    /// with `required`/`optional`, switch on its `qtype`, and report a
    /// mismatch with `QAPIValue.alternateMismatch(expected:)`.
    public func optional(_ name: String) -> QAPIValue? {
        guard let v = peek(name) else { return nil }
        unvisited.remove(name)
        return QAPIValue(json: v, mode: mode, path: path + [.member(name)], bareName: name)
    }

    /// visit_check_struct: "Parameter 'x' is unexpected" for the first
    /// unvisited member in QEMU's (GLib hash table) order.
    public func finish() throws(QMPError) {
        if let first = unvisited.orderedKeys.first {
            throw QMPError.unexpectedParameter(fullName(path + [.member(first)]))
        }
    }

    /// Names of members not consumed yet, in the order QEMU would report them.
    public var unvisitedMembers: [String] { unvisited.orderedKeys }

    // MARK: - Conveniences (required / optional members of each type)

    public func string(_ name: String) throws(QMPError) -> String { try required(name).string() }
    public func optionalString(_ name: String) throws(QMPError) -> String? { try optional(name)?.string() }
    public func bool(_ name: String) throws(QMPError) -> Bool { try required(name).bool() }
    public func optionalBool(_ name: String) throws(QMPError) -> Bool? { try optional(name)?.bool() }
    public func int64(_ name: String) throws(QMPError) -> Int64 { try required(name).int64() }
    public func optionalInt64(_ name: String) throws(QMPError) -> Int64? { try optional(name)?.int64() }
    public func uint64(_ name: String) throws(QMPError) -> UInt64 { try required(name).uint64() }
    public func optionalUInt64(_ name: String) throws(QMPError) -> UInt64? { try optional(name)?.uint64() }
    public func size(_ name: String) throws(QMPError) -> UInt64 { try required(name).size() }
    public func optionalSize(_ name: String) throws(QMPError) -> UInt64? { try optional(name)?.size() }
    public func number(_ name: String) throws(QMPError) -> Double { try required(name).number() }
    public func optionalNumber(_ name: String) throws(QMPError) -> Double? { try optional(name)?.number() }
    public func any(_ name: String) throws(QMPError) -> JSON { try required(name).json }
    public func optionalAny(_ name: String) -> JSON? { optional(name)?.json }

    /// A fixed-width integer member (visit_type_uint32 and friends).
    public func integer<T: FixedWidthInteger>(_ name: String, as type: T.Type) throws(QMPError) -> T {
        try required(name).integer(T.self)
    }

    public func optionalInteger<T: FixedWidthInteger>(_ name: String, as type: T.Type) throws(QMPError) -> T? {
        try optional(name)?.integer(T.self)
    }

    /// An enum member given its values.
    public func enumValue(_ name: String, allowed: [String]) throws(QMPError) -> String {
        try required(name).enumValue(allowed: allowed)
    }

    public func optionalEnumValue(_ name: String, allowed: [String]) throws(QMPError) -> String? {
        try optional(name)?.enumValue(allowed: allowed)
    }

    /// An enum member mapped to a Swift enum whose raw values are QAPI's.
    public func enumValue<E: RawRepresentable & CaseIterable>(_ name: String, as type: E.Type) throws(QMPError) -> E
    where E.RawValue == String {
        try required(name).enumValue(E.self)
    }

    public func optionalEnumValue<E: RawRepresentable & CaseIterable>(_ name: String, as type: E.Type) throws(QMPError) -> E?
    where E.RawValue == String {
        try optional(name)?.enumValue(E.self)
    }

    /// A nested struct member: `body` reads its members, then unexpected
    /// members are rejected.
    public func object<T>(_ name: String, _ body: (QAPIInput) throws(QMPError) -> T) throws(QMPError) -> T {
        try required(name).object(body)
    }

    public func optionalObject<T>(_ name: String, _ body: (QAPIInput) throws(QMPError) -> T) throws(QMPError) -> T? {
        guard let v = optional(name) else { return nil }
        return try v.object(body)
    }

    /// A list member: `element` converts each element in order.
    public func list<T>(_ name: String, _ element: (QAPIValue) throws(QMPError) -> T) throws(QMPError) -> [T] {
        try required(name).list(element)
    }

    public func optionalList<T>(_ name: String, _ element: (QAPIValue) throws(QMPError) -> T) throws(QMPError) -> [T]? {
        guard let v = optional(name) else { return nil }
        return try v.list(element)
    }
}
