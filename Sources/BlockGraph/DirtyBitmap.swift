import Synchronization

/// A dirty bitmap (QEMU's BdrvDirtyBitmap, in memory): one bit per
/// `granularity` bytes of a node, set by every write that touches the
/// granule. Thread-safe; marking is one mutex operation.
public final class DirtyBitmap: Sendable {
    public let granularity: Int64
    public let size: Int64
    private let shift: Int64
    private let words: Mutex<(bits: [UInt64], count: Int64)>

    /// `granularity` must be a power of two.
    public init(size: Int64, granularity: Int64) {
        precondition(granularity > 0 && granularity & (granularity - 1) == 0)
        self.granularity = granularity
        self.size = size
        self.shift = Int64(granularity.trailingZeroBitCount)
        let granules = (size + granularity - 1) >> Int64(granularity.trailingZeroBitCount)
        words = Mutex(([UInt64](repeating: 0, count: Int((granules + 63) / 64)), 0))
    }

    private var granules: Int64 { (size + granularity - 1) >> shift }

    /// Marks every granule that [offset, offset+length) touches.
    public func mark(_ offset: Int64, _ length: Int64) {
        guard length > 0, offset < size else { return }
        let first = offset >> shift
        let last = min((offset + length - 1) >> shift, granules - 1)
        words.withLock { w in
            var g = first
            while g <= last {
                let i = Int(g >> 6), b = UInt64(1) << UInt64(g & 63)
                if w.bits[i] & b == 0 {
                    w.bits[i] |= b
                    w.count += 1
                }
                g += 1
            }
        }
    }

    /// Clears the granules that lie inside [offset, offset+length) (whole
    /// granules only; a partial one at the edges stays as it is unless it
    /// reaches the end of the node).
    public func clear(_ offset: Int64, _ length: Int64) {
        guard length > 0 else { return }
        let first = (offset + granularity - 1) >> shift
        let end = offset + length >= size ? granules : (offset + length) >> shift
        guard first < end else { return }
        words.withLock { w in
            var g = first
            while g < end {
                let i = Int(g >> 6), b = UInt64(1) << UInt64(g & 63)
                if w.bits[i] & b != 0 {
                    w.bits[i] &= ~b
                    w.count -= 1
                }
                g += 1
            }
        }
    }

    /// Marks everything.
    public func markAll() { mark(0, size) }

    /// Bytes covered by dirty granules (QEMU's dirty count).
    public var dirtyBytes: Int64 {
        let last = granules - 1
        let (n, lastDirty) = words.withLock { w in
            (w.count, last >= 0 && w.bits[Int(last >> 6)] & (UInt64(1) << UInt64(last & 63)) != 0)
        }
        // The last granule may reach past the end of the node.
        let overhang = lastDirty ? (granules << shift) - size : 0
        return (n << shift) - overhang
    }

    public var isClean: Bool { words.withLock { $0.count == 0 } }

    /// The first dirty run at or after `offset`, at most `maxLength` bytes,
    /// granule aligned and clipped to the node: (start, length), or nil.
    public func nextDirtyRun(from offset: Int64, maxLength: Int64) -> (Int64, Int64)? {
        let total = granules
        return words.withLock { w -> (Int64, Int64)? in
            guard w.count > 0 else { return nil }
            var g = max(0, offset >> shift)
            // Find the first set bit, a word at a time.
            while g < total {
                let i = Int(g >> 6)
                let word = w.bits[i] >> UInt64(g & 63)
                if word != 0 {
                    g += Int64(word.trailingZeroBitCount)
                    break
                }
                g = Int64(i + 1) << 6
            }
            guard g < total else { return nil }
            let maxGranules = max(1, maxLength >> shift)
            var e = g
            while e < total && e - g < maxGranules && w.bits[Int(e >> 6)] & (UInt64(1) << UInt64(e & 63)) != 0 {
                e += 1
            }
            let start = g << shift
            return (start, min(e << shift, size) - start)
        }
    }

    // MARK: - Whole-bitmap access (persistent bitmaps, merge)

    /// The bits as 64-bit words, granule g at bit g%64 of word g/64
    /// (little-endian bytes of these words are qcow2's on-disk layout).
    public func snapshotWords() -> [UInt64] { words.withLock { $0.bits } }

    /// Replaces every bit; bits past the last granule are ignored.
    public func setWords(_ new: [UInt64]) {
        let total = granules
        words.withLock { w in
            var n: Int64 = 0
            for i in 0..<w.bits.count {
                var v = i < new.count ? new[i] : 0
                let firstGranule = Int64(i) << 6
                if firstGranule + 64 > total {
                    let keep = total - firstGranule
                    v &= keep <= 0 ? 0 : (UInt64(1) << UInt64(keep)) &- 1
                }
                w.bits[i] = v
                n += Int64(v.nonzeroBitCount)
            }
            w.count = n
        }
    }

    /// Clears everything.
    public func clearAll() {
        words.withLock { w in
            for i in 0..<w.bits.count { w.bits[i] = 0 }
            w.count = 0
        }
    }

    /// ORs `other` (same node size, any granularity) into this bitmap:
    /// every granule here that overlaps a dirty granule there is marked.
    public func merge(from other: DirtyBitmap) {
        if other.granularity == granularity && other.size == size {
            let src = other.snapshotWords()
            words.withLock { w in
                var n: Int64 = 0
                for i in 0..<min(w.bits.count, src.count) {
                    w.bits[i] |= src[i]
                    n += Int64(w.bits[i].nonzeroBitCount)
                }
                for i in src.count..<max(src.count, w.bits.count) { n += Int64(w.bits[i].nonzeroBitCount) }
                w.count = n
            }
            return
        }
        var off: Int64 = 0
        while let (s, l) = other.nextDirtyRun(from: off, maxLength: Int64.max / 2) {
            mark(s, l)
            off = s + l
        }
    }
}
