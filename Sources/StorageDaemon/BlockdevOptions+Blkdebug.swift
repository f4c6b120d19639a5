import BlkdebugDriver
import BlockCore
import BlockGraph
import LaminaJSON
import QMP

/// QAPI BlockdevOptionsBlkdebug: the image to filter and blkdebug's own
/// options.
public struct BlkdebugBlockdevOptions: Sendable {
    public var image: BlockdevRef
    public var options: BlkdebugOptions
    public init(image: BlockdevRef, options: BlkdebugOptions = BlkdebugOptions()) {
        self.image = image
        self.options = options
    }
}

extension BlockdevOptions {
    /// The members of BlockdevOptionsBlkdebug, in schema order (so the
    /// first error is QEMU's).
    static func parseBlkdebug(_ a: QAPIInput) throws(QMPError) -> BlkdebugBlockdevOptions {
        var b = BlkdebugBlockdevOptions(image: try parseRef(a.required("image")))
        var o = BlkdebugOptions()
        o.nesting = a.path.compactMap { if case .member(let n) = $0 { n } else { nil } }
        o.config = try a.optionalString("config")
        o.align = try a.optionalInt64("align")
        o.maxTransfer = try a.optionalInteger("max-transfer", as: Int32.self).map(Int64.init)
        o.optWriteZero = try a.optionalInteger("opt-write-zero", as: Int32.self).map(Int64.init)
        o.maxWriteZero = try a.optionalInteger("max-write-zero", as: Int32.self).map(Int64.init)
        o.optDiscard = try a.optionalInteger("opt-discard", as: Int32.self).map(Int64.init)
        o.maxDiscard = try a.optionalInteger("max-discard", as: Int32.self).map(Int64.init)
        o.injectErrors = try a.optionalList("inject-error") { (v: QAPIValue) throws(QMPError) in
            try v.object { (r: QAPIInput) throws(QMPError) in
                var e = BlkdebugInjectError(event: try r.enumValue("event", as: BlkdebugEvent.self))
                e.state = try r.optionalInt64("state")
                e.iotype = try r.optionalEnumValue("iotype", as: BlkdebugIOType.self)
                e.errno = try r.optionalInt64("errno")
                e.sector = try r.optionalInt64("sector")
                e.once = try r.optionalBool("once")
                e.immediately = try r.optionalBool("immediately")
                return e
            }
        } ?? []
        o.setStates = try a.optionalList("set-state") { (v: QAPIValue) throws(QMPError) in
            try v.object { (r: QAPIInput) throws(QMPError) in
                let event = try r.enumValue("event", as: BlkdebugEvent.self)
                let state = try r.optionalInt64("state")
                return BlkdebugSetState(event: event, state: state, newState: try r.int64("new_state"))
            }
        } ?? []
        o.takeChildPerms = try permissions(a, "take-child-perms")
        o.unshareChildPerms = try permissions(a, "unshare-child-perms")
        b.options = o
        return b
    }

    /// A list of QAPI BlockPermission (its enum errors name "null").
    private static func permissions(_ a: QAPIInput, _ name: String) throws(QMPError) -> BlockPermissions {
        let names = ["consistent-read", "write", "write-unchanged", "resize"]
        let bits: [BlockPermissions] = [.consistentRead, .write, .writeUnchanged, .resize]
        let list = try a.optionalList(name) { (v: QAPIValue) throws(QMPError) in
            bits[names.firstIndex(of: try v.enumValue(allowed: names))!]
        } ?? []
        return list.reduce(into: BlockPermissions()) { $0.formUnion($1) }
    }
}

extension Graph {
    /// QEMU's full_open_options of a blkdebug node: the driver, the strong
    /// options as given (flattened, "inject-error.0.event"), the image's.
    func blkdebugFullOptions(_ node: BlockNode, _ d: BlkdebugDriver) -> JSON {
        .object(Self.blkdebugStrongOptions(d.options) + [("image", node.children.first.map { fullOptions($0.node) } ?? .null)])
    }

    /// "driver" and blkdebug's strong runtime options, in the order QEMU
    /// gathers them (bdrv_refresh_filename).
    static func blkdebugStrongOptions(_ o: BlkdebugOptions) -> [(String, JSON)] {
        var m: [(String, JSON)] = [("driver", .string("blkdebug"))]
        if let c = o.config { m.append(("config", .string(c))) }
        // QEMU flattens each rule's members (iterated in QDict order) into
        // the options of the blockdev-add; a parent node works on a copy of
        // its options and copies its child's out of that; finally the
        // rules are copied out of the node's own options. Each copy inserts
        // in the source's iteration order, which decides the order of keys
        // sharing a hash bucket.
        func flattened(_ prefix: String, _ rules: [[(String, JSON)]]) -> [(String, JSON)] {
            var flat: [(String, JSON)] = []
            for (i, members) in rules.enumerated() {
                for (k, v) in JSON.qdictOrder(members) { flat.append(("\(prefix).\(i).\(k)", v)) }
            }
            for level in o.nesting.indices {
                let outer = o.nesting[level...].map { $0 + "." }.joined()
                let n = outer.utf8.count
                let copied = JSON.qdictOrder(JSON.qdictOrder(flat.map { (outer + $0.0, $0.1) }))
                flat = copied.map { (String($0.0.utf8.dropFirst(n))!, $0.1) }
            }
            return JSON.qdictOrder(flat)
        }
        m += flattened("inject-error", o.injectErrors.map { r in
            var rule: [(String, JSON)] = [("event", .string(r.event.rawValue))]
            if let v = r.state { rule.append(("state", .int(v))) }
            if let v = r.iotype { rule.append(("iotype", .string(v.rawValue))) }
            if let v = r.errno { rule.append(("errno", .int(v))) }
            if let v = r.sector { rule.append(("sector", .int(v))) }
            if let v = r.once { rule.append(("once", .bool(v))) }
            if let v = r.immediately { rule.append(("immediately", .bool(v))) }
            return rule
        })
        m += flattened("set-state", o.setStates.map { r in
            var rule: [(String, JSON)] = [("event", .string(r.event.rawValue))]
            if let v = r.state { rule.append(("state", .int(v))) }
            rule.append(("new_state", .int(r.newState)))
            return rule
        })
        let sizes: [(String, Int64?)] = [("align", o.align), ("max-transfer", o.maxTransfer),
                                         ("opt-write-zero", o.optWriteZero), ("max-write-zero", o.maxWriteZero),
                                         ("opt-discard", o.optDiscard), ("max-discard", o.maxDiscard)]
        for (k, v) in sizes { if let v { m.append((k, .int(v))) } }
        return m
    }

    /// QEMU's blkdebug_refresh_filename, then bdrv_refresh_filename: a
    /// plain "blkdebug:CONFIG:IMAGE" name when no option but `config` was
    /// given and the image has a plain name; else "json:{...}".
    func blkdebugDisplayName(_ node: BlockNode, _ d: BlkdebugDriver) -> String {
        let strong = Self.blkdebugStrongOptions(d.options)
        if let image = node.children.first?.node, strong.allSatisfy({ $0.0 == "driver" || $0.0 == "config" }) {
            let name = displayFilename(image)
            if !name.hasPrefix("json:") { return "blkdebug:\(d.options.config ?? ""):\(name)" }
        }
        return "json:" + blkdebugFullOptions(node, d).compact
    }
}
