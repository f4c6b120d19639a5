/// QEMU's BLK_PERM_*: what a user of a node does with it (`perm`) and what
/// it lets others do at the same time (`shared`). Every edge of the graph
/// carries both; a node's file locks follow the permissions its parents
/// hold (see `PermissionUpdate`).
public struct BlockPermissions: OptionSet, Sendable, Hashable {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }

    public static let consistentRead = BlockPermissions(rawValue: 1 << 0)
    public static let write = BlockPermissions(rawValue: 1 << 1)
    public static let writeUnchanged = BlockPermissions(rawValue: 1 << 2)
    public static let resize = BlockPermissions(rawValue: 1 << 3)
    public static let all: BlockPermissions = [.consistentRead, .write, .writeUnchanged, .resize]

    /// The bits in QEMU's order (BLK_PERM_* bit order).
    static let ordered: [(BlockPermissions, human: String, qapi: String)] = [
        (.consistentRead, "consistent read", "consistent-read"),
        (.write, "write", "write"),
        (.writeUnchanged, "write unchanged", "write-unchanged"),
        (.resize, "resize", "resize"),
    ]

    /// bdrv_perm_names: human names in bit order ("consistent read, write").
    public var humanNames: String {
        Self.ordered.filter { contains($0.0) }.map(\.human).joined(separator: ", ")
    }

    /// QAPI BlockPermission names in bit order.
    public var qapiNames: [String] { Self.ordered.filter { contains($0.0) }.map(\.qapi) }

    /// The bit index of a single permission (the lock byte offset).
    public var bitIndex: Int { rawValue.trailingZeroBitCount }
}

/// QEMU's BdrvChildRole: what a child is to its parent. The default
/// permissions a parent takes on a child follow from it.
public struct ChildRole: OptionSet, Sendable, Hashable {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }

    /// Holds guest data.
    public static let data = ChildRole(rawValue: 1 << 0)
    /// Holds the parent's metadata (qcow2 tables in its file).
    public static let metadata = ChildRole(rawValue: 1 << 1)
    /// A filter's filtered child: the parent passes everything through.
    public static let filtered = ChildRole(rawValue: 1 << 2)
    /// A backing file: read where the parent has nothing.
    public static let cow = ChildRole(rawValue: 1 << 3)
    /// The child the parent is "about" (block status, events go there).
    public static let primary = ChildRole(rawValue: 1 << 4)
    /// An image's storage: data, metadata, primary (qcow2's file).
    public static let image: ChildRole = [.data, .metadata, .primary]
}

/// QEMU's bdrv_default_perms: the permissions a parent node takes on a
/// child by its role, given what the parent's own users need (`perm`) and
/// share (`shared`). `writable`: the parent is writable (metadata may be
/// written even when no user writes).
public func defaultChildPermissions(role: ChildRole, writable: Bool, perm: BlockPermissions,
                                    shared: BlockPermissions) -> (BlockPermissions, BlockPermissions) {
    if role.contains(.filtered) {
        return (perm, shared)
    }
    if role.contains(.cow) {
        // Consistent reads when the parent's users read; a parent that
        // copes with changing data lets others write its backing file.
        var s: BlockPermissions = shared.contains(.write) ? [.write, .resize] : []
        s.formUnion([.consistentRead, .writeUnchanged])
        return (perm.intersection(.consistentRead), s)
    }
    precondition(!role.isDisjoint(with: [.metadata, .data]), "a child needs a role")
    var p = perm
    var s = shared
    if role.contains(.metadata) {
        if writable { p.formUnion([.write, .resize]) }
        p.insert(.consistentRead)
        s.subtract([.write, .resize])
    }
    if role.contains(.data) {
        s.remove(.resize)
        if p.contains(.writeUnchanged) { p.insert(.write) }
        if p.contains(.write) { p.insert(.resize) }
    }
    return (p, s)
}
