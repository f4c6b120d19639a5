import LaminaJSON

/// QEMU's KEY=VALUE,... syntax (util/keyval.c), used by the daemon's
/// command line (--blockdev, --export, --nbd-server, --object, --monitor).
///
///     key-vals = [ key-val { ',' key-val } [ ',' ] ]
///     key-val  = key '=' val      key = fragment { '.' fragment }
///     val      = { [^,] | ',,' }
///
/// The result is a JSON object whose leaves are strings: `a.b=1,c=x` is
/// `{"a": {"b": "1"}, "c": "x"}`; numeric fragments make arrays
/// (`x.0=a,x.1=b` is `{"x": ["a", "b"]}`); a later key-val for the same
/// leaf replaces the earlier value. With an implied key, the first
/// key-val may omit `key=` (`file,filename=x` is `driver=file,...`).
/// A first fragment must be a QAPI name (letter first, then letters,
/// digits, '-' and '_'; or a `__RFQDN_` downstream prefix); later
/// fragments may also be decimal list indexes. Fragments are 1-127 bytes.
public enum KeyVal {
    /// Parses `params`; returns the object and whether "help" or "?"
    /// appeared as a parameter (QEMU's help request).
    ///
    /// Errors (QEMU's texts): "Invalid parameter 'k'", "Parameter 'k' is
    /// too long", "Parameter fragment 'k' is too long", "Expected '='
    /// after parameter 'k'", "Parameters 'a.*' used inconsistently",
    /// "Parameter 'x.1' missing".
    public static func parse(_ params: String, impliedKey: String? = nil) throws(QMPError) -> (object: JSON, help: Bool) {
        let root = Node()
        let bytes = Array(params.utf8.prefix { $0 != 0 })
        var pos = 0
        var implied = impliedKey.map { Array($0.utf8) }
        var help = false
        while pos < bytes.count {
            pos = try parseOne(root, bytes, pos, impliedKey: implied, help: &help)
            implied = nil
        }
        if help { return (.object([]), true) }
        return (try listify(root, path: []), false)
    }

    /// Mutable tree while parsing; member order is insertion order, a
    /// replaced member keeps its place (QDict semantics).
    private final class Node {
        enum Value { case string(String), node(Node) }
        var members: [(String, Value)] = []
        func get(_ k: String) -> Value? { members.first { $0.0 == k }?.1 }
        func put(_ k: String, _ v: Value) {
            if let i = members.firstIndex(where: { $0.0 == k }) { members[i].1 = v } else { members.append((k, v)) }
        }
    }

    private static func text(_ b: ArraySlice<UInt8>) -> String { String(decoding: b, as: UTF8.self) }

    /// keyval_parse_one: one key-val starting at `start`; returns where
    /// the next one starts.
    private static func parseOne(_ root: Node, _ p: [UInt8], _ start: Int, impliedKey: [UInt8]?, help: inout Bool) throws(QMPError) -> Int {
        var len = 0
        while start + len < p.count, p[start + len] != UInt8(ascii: "="), p[start + len] != UInt8(ascii: ",") { len += 1 }
        var key = p[start...]  // the key text runs to its end marker
        var keyLen = len
        var impliedValueEnd: Int? = nil
        if len > 0 && (start + len == p.count || p[start + len] != UInt8(ascii: "=")) {
            if helpOptionLength(p[start...]) == len {
                help = true
                var s = start + len
                if s < p.count && p[s] == UInt8(ascii: ",") { s += 1 }
                return s
            }
            if let ik = impliedKey {
                key = ik[...]
                keyLen = ik.count
                impliedValueEnd = start + len
            }
        }
        let keyStart = key.startIndex
        let keyEnd = keyStart + keyLen
        func at(_ i: Int) -> UInt8 { i < key.endIndex ? key[i] : 0 }

        var cur = root
        var s = keyStart
        var keyInCur = ""
        while true {
            var fragLen: Int
            if s != keyStart, let n = indexPrefixLength(key, s) {
                fragLen = n
            } else {
                fragLen = qapiNameLength(key, s) ?? 0
            }
            if fragLen == 0 || (s + fragLen < keyEnd && at(s + fragLen) != UInt8(ascii: ".")) {
                throw QMPError("Invalid parameter '\(text(key[keyStart..<keyEnd]))'")
            }
            if fragLen >= 128 {
                let frag = s != keyStart || s + fragLen != keyEnd ? " fragment" : ""
                throw QMPError("Parameter\(frag) '\(text(key[s..<s + fragLen]))' is too long")
            }
            if s != keyStart {
                cur = try put(cur, keyInCur, nil, inconsistent: text(key[keyStart..<s - 1]))
            }
            keyInCur = text(key[s..<s + fragLen])
            s += fragLen
            if at(s) != UInt8(ascii: ".") { break }
            s += 1
        }

        var value: [UInt8] = []
        var next: Int
        if let end = impliedValueEnd {
            value = Array(p[start..<end])
            next = end
            if next < p.count && p[next] == UInt8(ascii: ",") { next += 1 }
        } else {
            if at(s) != UInt8(ascii: "=") {
                throw QMPError("Expected '=' after parameter '\(text(key[keyStart..<s]))'")
            }
            next = s + 1
            while next < p.count {
                if p[next] == UInt8(ascii: ",") {
                    next += 1
                    if next >= p.count || p[next] != UInt8(ascii: ",") { break }
                }
                value.append(p[next])
                next += 1
            }
        }
        _ = try put(cur, keyInCur, String(decoding: value, as: UTF8.self), inconsistent: text(key[keyStart..<keyEnd]))
        return next
    }

    /// keyval_parse_put: `value == nil` needs an object at `k`.
    private static func put(_ cur: Node, _ k: String, _ value: String?, inconsistent: String) throws(QMPError) -> Node {
        switch (cur.get(k), value) {
        case (.node(let n)?, nil): return n
        case (nil, nil):
            let n = Node()
            cur.put(k, .node(n))
            return n
        case (.string?, let v?), (nil, let v?):
            cur.put(k, .string(v))
            return cur
        default:
            throw QMPError("Parameters '\(inconsistent).*' used inconsistently")
        }
    }

    /// "?" or a "help" prefix (QEMU's starts_with_help_option).
    private static func helpOptionLength(_ s: ArraySlice<UInt8>) -> Int {
        if s.first == UInt8(ascii: "?") { return 1 }
        return s.starts(with: "help".utf8) ? 4 : 0
    }

    /// Length of the leading decimal digits at `s`, nil when none.
    private static func indexPrefixLength(_ b: ArraySlice<UInt8>, _ s: Int) -> Int? {
        var i = s
        while i < b.endIndex, b[i] >= 0x30, b[i] <= 0x39 { i += 1 }
        return i > s ? i - s : nil
    }

    /// parse_qapi_name(s, false): the length of the QAPI name at `s`.
    private static func qapiNameLength(_ b: ArraySlice<UInt8>, _ s: Int) -> Int? {
        func at(_ i: Int) -> UInt8 { i < b.endIndex ? b[i] : 0 }
        func isAlpha(_ c: UInt8) -> Bool { (c >= 0x41 && c <= 0x5A) || (c >= 0x61 && c <= 0x7A) }
        func isAlnum(_ c: UInt8) -> Bool { isAlpha(c) || (c >= 0x30 && c <= 0x39) }
        var p = s
        if at(p) == UInt8(ascii: "_") {
            p += 1
            if at(p) != UInt8(ascii: "_") { return nil }
            p += 1
            while at(p) != 0, isAlnum(at(p)) || at(p) == UInt8(ascii: "-") || at(p) == UInt8(ascii: ".") { p += 1 }
            if at(p) != UInt8(ascii: "_") { return nil }
            p += 1
        }
        if !isAlpha(at(p)) { return nil }
        p += 1
        while isAlnum(at(p)) || at(p) == UInt8(ascii: "-") || at(p) == UInt8(ascii: "_") { p += 1 }
        return p - s
    }

    /// key_to_index on a whole key: all decimal digits, capped at Int32.max.
    private static func listIndex(_ k: String) -> Int? {
        guard !k.isEmpty, k.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }) else { return nil }
        var v = 0
        for c in k.utf8 { v = min(v * 10 + Int(c - 0x30), Int(Int32.max)) }
        return v
    }

    /// keyval_listify: objects whose keys are all indexes become arrays.
    /// Members are examined in QDict iteration order, as QEMU does (which
    /// decides the reported error and which of `x.1`/`x.01` wins).
    private static func listify(_ node: Node, path: [String]) throws(QMPError) -> JSON {
        var hasIndex = false
        var hasMember = false
        var converted: [String: JSON] = [:]
        let order = JSON.qdictOrder(keys: node.members.map(\.0))
        for k in order {
            if listIndex(k) != nil { hasIndex = true } else { hasMember = true }
            switch node.get(k)! {
            case .string(let s): converted[k] = .string(s)
            case .node(let n): converted[k] = try listify(n, path: path + [k])
            }
        }
        let prefix = path.map { $0 + "." }.joined()
        if hasIndex && hasMember {
            throw QMPError("Parameters '\(prefix)*' used inconsistently")
        }
        if !hasIndex {
            return .object(node.members.map { ($0.0, converted[$0.0]!) })
        }
        let slots = node.members.count
        var elements = [JSON?](repeating: nil, count: slots)
        var maxIndex = -1
        for k in order {
            let i = listIndex(k)!
            maxIndex = max(maxIndex, i)
            if i < slots { elements[i] = converted[k] }
        }
        var list: [JSON] = []
        for i in 0..<min(slots + 1, maxIndex + 1) {
            guard i < slots, let e = elements[i] else {
                throw QMPError("Parameter '\(prefix)\(i)' missing")
            }
            list.append(e)
        }
        return .array(list)
    }
}
