/// A model of the GLib 2.74 `GHashTable` that QEMU's QObject input
/// visitor keeps of a struct's unvisited members: QEMU reports
/// "Parameter 'x' is unexpected" for the first key this table's iterator
/// yields, so matching QEMU's choice among several unexpected members
/// needs the same table: `g_str_hash` (djb2 over signed chars), slot
/// `(hash * 11) % prime`, quadratic probing, tombstones on removal, growth
/// at 15/16 occupancy and shrinking below 1/4, with GLib's in-place
/// rehash order.
struct GHashOrder {
    private static let primeMod: [UInt32] = [
        1, 2, 3, 7, 13, 31, 61, 127, 251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521,
        131071, 262139, 524287, 1_048_573, 2_097_143, 4_194_301, 8_388_593, 16_777_213,
    ]
    private static let minShift = 3

    private var hashes: [UInt32]
    private var keys: [String?]
    private var mod: UInt32
    private var mask: UInt32
    private var nnodes = 0
    private var noccupied = 0

    init() {
        hashes = Array(repeating: 0, count: 1 << GHashOrder.minShift)
        keys = Array(repeating: nil, count: 1 << GHashOrder.minShift)
        mod = GHashOrder.primeMod[GHashOrder.minShift]
        mask = UInt32((1 << GHashOrder.minShift) - 1)
    }

    /// Builds the table by inserting `keys` in order (QEMU inserts in QDict
    /// iteration order).
    init(inserting keys: [String]) {
        self.init()
        for k in keys { insert(k) }
    }

    static func strHash(_ key: String) -> UInt32 {
        var h: UInt32 = 5381
        for b in key.utf8 {
            h = (h << 5) &+ h &+ UInt32(bitPattern: Int32(Int8(bitPattern: b)))
        }
        return h < 2 ? 2 : h
    }

    private func index(_ hash: UInt32) -> UInt32 {
        UInt32((UInt64(hash) &* 11) & 0xFFFF_FFFF) % mod
    }

    /// The slot holding `key`, or where it would go (first tombstone seen
    /// on the probe path, else the first unused slot).
    private func lookup(_ key: String, _ hash: UInt32) -> (slot: Int, found: Bool) {
        var i = index(hash)
        var step: UInt32 = 0
        var tombstone: UInt32? = nil
        while hashes[Int(i)] != 0 {
            let h = hashes[Int(i)]
            if h == hash && keys[Int(i)] == key { return (Int(i), true) }
            if h == 1 && tombstone == nil { tombstone = i }
            step += 1
            i = (i &+ step) & mask
        }
        return (Int(tombstone ?? i), false)
    }

    mutating func insert(_ key: String) {
        let hash = GHashOrder.strHash(key)
        let (slot, found) = lookup(key, hash)
        if found { return }
        let wasUnused = hashes[slot] == 0
        hashes[slot] = hash
        keys[slot] = key
        nnodes += 1
        if wasUnused {
            noccupied += 1
            maybeResize()
        }
    }

    mutating func remove(_ key: String) {
        let (slot, found) = lookup(key, GHashOrder.strHash(key))
        guard found else { return }
        hashes[slot] = 1
        keys[slot] = nil
        nnodes -= 1
        maybeResize()
    }

    /// Keys in iterator order.
    var orderedKeys: [String] {
        (0..<hashes.count).compactMap { hashes[$0] >= 2 ? keys[$0] : nil }
    }

    private mutating func maybeResize() {
        let size = hashes.count
        if (size > nnodes * 4 && size > 1 << GHashOrder.minShift) || size <= noccupied + noccupied / 16 {
            resize()
        }
    }

    private mutating func resize() {
        let oldSize = hashes.count
        var n = Int(Double(nnodes) * 1.333)
        var shift = 0
        while n != 0 { n >>= 1; shift += 1 }
        shift = max(shift, GHashOrder.minShift)
        let newSize = 1 << shift
        mod = GHashOrder.primeMod[shift]
        mask = UInt32(newSize - 1)
        if newSize > oldSize {
            hashes += Array(repeating: 0, count: newSize - oldSize)
            keys += Array(repeating: nil, count: newSize - oldSize)
        }
        var moved = [Bool](repeating: false, count: max(newSize, oldSize))
        for i in 0..<oldSize {
            var hash = hashes[i]
            if hash < 2 { hashes[i] = 0; continue }
            if moved[i] { continue }
            hashes[i] = 0
            var key = keys[i]
            keys[i] = nil
            while true {
                var slot = index(hash)
                var step: UInt32 = 0
                while moved[Int(slot)] {
                    step += 1
                    slot = (slot &+ step) & mask
                }
                moved[Int(slot)] = true
                let replaced = hashes[Int(slot)]
                let replacedKey = keys[Int(slot)]
                hashes[Int(slot)] = hash
                keys[Int(slot)] = key
                if replaced < 2 { break }
                hash = replaced
                key = replacedKey
            }
        }
        if newSize < oldSize {
            hashes.removeLast(oldSize - newSize)
            keys.removeLast(oldSize - newSize)
        }
        noccupied = nnodes
    }
}
