import BlockCore

/// Status of a range through a backing chain.
public struct ChainStatus: Sendable {
    /// The status of the layer that answered.
    public var status: BlockStatus
    /// How many backing links below the queried node that layer is.
    public var depth: Int
    /// The layer that answered.
    public var node: BlockNode
}

extension BlockNode {
    /// QEMU's bdrv_block_status_above(bs, base): the status of the first
    /// layer (from this node down to `base`, exclusive) that allocates the
    /// range; if none does, the answer of the lowest layer visited. The
    /// returned length never exceeds any layer's run.
    public func blockStatusAbove(base: BlockNode?, at offset: Int64, length: Int64) async throws(BlockError) -> ChainStatus {
        var node: BlockNode = self
        var depth = 0
        var bytes = length
        while true {
            var st = try await node.blockStatus(at: offset, length: bytes)
            if st.length == 0 && st.flags.contains(.eof) {
                // Past this layer's end: reads as zeroes (a short backing file).
                st = BlockStatus(flags: [.zero], length: bytes)
                return ChainStatus(status: st, depth: depth, node: node)
            }
            if st.flags.contains(.allocated) {
                return ChainStatus(status: st, depth: depth, node: node)
            }
            bytes = min(bytes, st.length)
            st.length = bytes
            guard let next = node.filterOrBacking, next !== base else {
                return ChainStatus(status: st, depth: depth, node: node)
            }
            node = next
            depth += 1
        }
    }

    /// qemu-img map's walk: stop at the first layer reporting data or
    /// zeroes (allocated or not).
    public func mapStatus(at offset: Int64, length: Int64) async throws(BlockError) -> ChainStatus {
        var node: BlockNode = self
        var depth = 0
        var bytes = length
        while true {
            let st = try await node.blockStatus(at: offset, length: bytes)
            if !st.flags.isDisjoint(with: [.data, .zero]) || st.length == 0 {
                return ChainStatus(status: st, depth: depth, node: node)
            }
            bytes = min(bytes, st.length)
            guard let next = node.filterOrBacking else {
                return ChainStatus(status: BlockStatus(flags: [], length: bytes), depth: depth, node: node)
            }
            node = next
            depth += 1
        }
    }
}
