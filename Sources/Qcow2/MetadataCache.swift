import BlockCore

/// An LRU cache of whole metadata clusters (L2 tables, refcount blocks),
/// keyed by host offset.
///
/// Not thread-safe: owned by one `Qcow2Image` and only touched while its
/// metadata lock is held. An entry may be marked dirty (a byte range not yet
/// written to the file); dirty entries are never evicted, the owner writes
/// them back (`dirtyEntries`, `markClean`) before it relies on the file.
final class MetadataCache {
    private final class Node {
        let offset: Int64
        let buffer: AlignedBuffer
        var prev: Node?
        var next: Node?
        var dirtyLo = Int.max
        var dirtyHi = 0
        var isDirty: Bool { dirtyHi > dirtyLo }
        init(offset: Int64, buffer: AlignedBuffer) {
            self.offset = offset
            self.buffer = buffer
        }
    }

    let tableSize: Int
    let capacity: Int
    private var map: [Int64: Node] = [:]
    private var head: Node?  // most recently used
    private var tail: Node?  // least recently used

    init(tableSize: Int, capacity: Int) {
        self.tableSize = tableSize
        self.capacity = max(2, capacity)
    }

    var count: Int { map.count }

    func lookup(_ offset: Int64) -> AlignedBuffer? {
        guard let n = map[offset] else { return nil }
        moveToFront(n)
        return n.buffer
    }

    func insert(_ offset: Int64, _ buffer: AlignedBuffer) {
        if let n = map[offset] {
            unlink(n)
            map[offset] = nil
        }
        let n = Node(offset: offset, buffer: buffer)
        map[offset] = n
        pushFront(n)
        evictClean()
    }

    /// Drops least recently used clean entries while over capacity; the
    /// most recently used entry (the one just inserted or looked up) stays.
    private func evictClean() {
        var cur = tail
        while map.count > capacity, let t = cur, t !== head {
            cur = t.prev
            if t.isDirty { continue }
            unlink(t)
            map[t.offset] = nil
        }
    }

    /// Records that bytes `range` of the cached table at `offset` are newer
    /// than the file.
    func markDirty(_ offset: Int64, _ range: Range<Int>) {
        guard let n = map[offset] else { preconditionFailure("marking an uncached table dirty") }
        n.dirtyLo = min(n.dirtyLo, range.lowerBound)
        n.dirtyHi = max(n.dirtyHi, range.upperBound)
        dirtySet.insert(offset)
    }

    private var dirtySet: Set<Int64> = []
    var dirtyCount: Int { dirtySet.count }

    /// Dirty entries, by host offset: (offset, buffer, dirty byte range).
    func dirtyEntries() -> [(Int64, AlignedBuffer, Range<Int>)] {
        dirtySet.sorted().compactMap { off in map[off].map { (off, $0.buffer, $0.dirtyLo..<$0.dirtyHi) } }
    }

    func markClean(_ offset: Int64) {
        if let n = map[offset] {
            n.dirtyLo = Int.max
            n.dirtyHi = 0
        }
        dirtySet.remove(offset)
        evictClean()
    }

    func remove(_ offset: Int64) {
        if let n = map[offset] {
            precondition(!n.isDirty, "dropping a dirty metadata table")
            unlink(n)
            map[offset] = nil
        }
    }

    func removeAll() {
        // Break the links so nodes are freed.
        var n = head
        while let cur = n {
            n = cur.next
            cur.prev = nil
            cur.next = nil
        }
        map.removeAll()
        dirtySet.removeAll()
        head = nil
        tail = nil
    }

    private func unlink(_ n: Node) {
        if let p = n.prev { p.next = n.next } else { head = n.next }
        if let x = n.next { x.prev = n.prev } else { tail = n.prev }
        n.prev = nil
        n.next = nil
    }

    private func pushFront(_ n: Node) {
        n.next = head
        n.prev = nil
        head?.prev = n
        head = n
        if tail == nil { tail = n }
    }

    private func moveToFront(_ n: Node) {
        if head === n { return }
        unlink(n)
        pushFront(n)
    }

    deinit { removeAll() }
}
