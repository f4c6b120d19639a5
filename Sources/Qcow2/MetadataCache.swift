import BlockCore

/// An LRU cache of whole metadata clusters (L2 tables, refcount blocks),
/// keyed by host offset.
///
/// Not thread-safe: owned by one `Qcow2Image` and only touched while its
/// metadata lock is held. Write-through: whoever modifies a cached table
/// writes the changed bytes to disk before releasing the lock, so the cache
/// never holds anything the file lacks, and eviction never writes.
final class MetadataCache {
    private final class Node {
        let offset: Int64
        let buffer: AlignedBuffer
        var prev: Node?
        var next: Node?
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
        while map.count > capacity, let t = tail {
            unlink(t)
            map[t.offset] = nil
        }
    }

    func remove(_ offset: Int64) {
        if let n = map[offset] {
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
