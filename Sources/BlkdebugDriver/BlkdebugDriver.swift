#if canImport(Glibc)
import Glibc
#endif
import BlockCore
import BlockGraph
import Synchronization

/// The `blkdebug` fault-injection filter (QEMU 7.2's block/blkdebug.c).
///
/// The node passes every request to its `image` child. Drivers above it
/// report events (`debugEvent`, QEMU's BLKDBG_EVENT: qcow2's `read_aio`
/// before it reads guest data, `l2_load`, ...; the generic layer's
/// `pwritev`, ...); `inject-error` rules activated by an event make later
/// requests through the node fail with the rule's errno, `set-state`
/// rules move the state machine the rules are keyed on (see
/// `BlkdebugRules`). It also imposes limits (`align`, `max-transfer`)
/// and QEMU's write-zeroes/discard splitting for `opt-write-zero`,
/// `max-write-zero`, `opt-discard` and `max-discard`, so that the layers
/// above can be tested against them.
///
/// Threading: events and rule checks may come from any I/O thread; the
/// rules live behind one `Mutex` (never held across a suspension).
public final class BlkdebugDriver: BlockDriver, Sendable {
    private let child: Mutex<BlockChild?>
    let rules: BlkdebugRules
    let limitsIn: BlkdebugLimits
    /// The options the node was opened with (for its file name).
    public let options: BlkdebugOptions
    private let takePerms: BlockPermissions
    private let unsharePerms: BlockPermissions
    /// QEMU's write_gen / flushed_gen of the node: a flush checks the
    /// `flush` rules only if the node was written since its last flush.
    private let generations = Mutex<(written: UInt64, flushed: UInt64)>((0, 0))

    /// A filter over `image` (whose reference passes to the filter's
    /// "image" edge) with rules already read by `BlkdebugSetup`. Throws
    /// QEMU's "Cannot meet constraints with ..." when a limit does not fit
    /// `align` and the image's request alignment; the caller then still
    /// owns `image`'s reference. Runs the `none` event, as QEMU's open does.
    public init(image: BlockNode, setup: BlkdebugSetup) throws(BlockError) {
        limitsIn = try setup.options.checkedLimits(imageAlignment: image.driver.requestAlignment)
        options = setup.options
        takePerms = setup.options.takeChildPerms
        unsharePerms = setup.options.unshareChildPerms
        rules = BlkdebugRules(injectErrors: setup.injectErrors, setStates: setup.setStates)
        child = Mutex(BlockChild(name: "image", role: [.filtered, .primary], node: image))
        rules.event(.none)
    }

    public var formatName: String { "blkdebug" }
    public var isFilter: Bool { true }
    public var children: [BlockChild] { child.withLock { $0.map { [$0] } ?? [] } }

    private var image: BlockNode {
        guard let c = child.withLock({ $0 }) else { preconditionFailure("blkdebug without its image") }
        return c.node
    }

    public var length: Int64 { child.withLock { $0?.node.length } ?? 0 }
    /// Writes may extend the node when they may extend the image (QEMU lets
    /// any node grow by writes; Lamina's generic layer asks this).
    public var growable: Bool { child.withLock { $0?.node.driver.growable } ?? false }
    /// `align`, or 1 (QEMU's default for drivers with a byte interface).
    public var requestAlignment: Int { limitsIn.align > 0 ? Int(limitsIn.align) : 1 }
    public var limits: BlockLimits { BlockLimits(maxTransfer: limitsIn.maxTransfer) }

    /// The current state of the rule machine.
    public var state: Int32 { rules.currentState }

    public func removeChild(_ c: BlockChild) {
        child.withLock { if $0 === c { $0 = nil } }
    }

    /// QEMU's blkdebug_child_perm: the default for the filtered child,
    /// plus `take-child-perms`, minus `unshare-child-perms`.
    public func childPermissions(for child: BlockChild, node: BlockNode, perm: BlockPermissions,
                                 shared: BlockPermissions) -> (BlockPermissions, BlockPermissions) {
        let (p, s) = defaultChildPermissions(role: child.role, writable: !node.readOnly, perm: perm, shared: shared)
        return (p.union(takePerms), s.subtracting(unsharePerms))
    }

    public func reopenForWriting() async throws(BlockError) { try await image.reopenReadWrite() }

    /// QEMU's bdrv_debug_event on this node.
    public func debugEvent(_ event: BlkdebugEvent) { rules.event(event) }

    // MARK: - Requests

    /// QEMU's rule_check: throws the injected error, after yielding once
    /// unless the rule says `immediately`. Returns false when a rule with a
    /// negative errno matched: QEMU then reports success without doing the
    /// request.
    private func check(_ offset: Int64, _ bytes: Int64, _ type: BlkdebugIOType) async throws(BlockError) -> Bool {
        guard let e = rules.check(offset: offset, bytes: bytes, type) else { return true }
        if !e.immediately { await Task.yield() }
        if e.errno < 0 { return false }
        throw BlockError.posix(e.errno)
    }

    /// The generic layer's guarantees QEMU asserts.
    @inline(__always)
    private func assertAligned(_ offset: Int64, _ bytes: Int) {
        let a = Int64(requestAlignment)
        precondition(offset % a == 0 && Int64(bytes) % a == 0, "blkdebug: unaligned request \(offset)+\(bytes)")
        precondition(limitsIn.maxTransfer == 0 || Int64(bytes) <= limitsIn.maxTransfer,
                     "blkdebug: request of \(bytes) bytes above max-transfer \(limitsIn.maxTransfer)")
    }

    private func wrote() { generations.withLock { $0.written &+= 1 } }

    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws(BlockError) {
        assertAligned(offset, buffer.count)
        guard try await check(offset, Int64(buffer.count), .read) else {
            buffer.initializeMemory(as: UInt8.self, repeating: 0)
            return
        }
        try await image.read(at: offset, into: buffer)
    }

    /// A write; FUA is QEMU's emulated one (QEMU's file driver has no
    /// FUA, so neither has blkdebug): the node is flushed after the write,
    /// before the write counts for the node's flush generation.
    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws(BlockError) {
        assertAligned(offset, buffer.count)
        defer { wrote() }
        guard try await check(offset, Int64(buffer.count), .write) else { return }
        try await image.write(at: offset, from: buffer, flags: flags.subtracting(.fua))
        if flags.contains(.fua) { try await flush() }
    }

    /// The node's largest transfer (QEMU's bl.max_transfer), 0: none.
    private var maxTransfer: Int64 {
        limits.merged(with: BlockLimits(maxTransfer: image.limits.maxTransfer)).maxTransfer
    }

    /// QEMU's bdrv_co_do_pwrite_zeroes on this node, with
    /// blkdebug_co_pwrite_zeroes for each piece: the range is cut at
    /// multiples of max(align, opt-write-zero), in pieces of at most
    /// max-write-zero; a piece smaller than that alignment is refused
    /// (ENOTSUP), so it is written as explicit zeroes (a `write` request
    /// through this node, at most max-transfer or 16 MiB of it at a time),
    /// or the request fails with `noFallback`.
    public func writeZeroes(at offset: Int64, length: Int64, flags: WriteFlags) async throws(BlockError) {
        defer { wrote() }
        let align = max(Int64(requestAlignment), limitsIn.optWriteZero)
        let maxZero = alignDown(limitsIn.maxWriteZero > 0 ? limitsIn.maxWriteZero : Int64.max, align)
        let maxBounce = maxTransfer > 0 ? min(maxTransfer, Self.maxBounce) : Self.maxBounce
        var head = offset % align
        let tail = (offset + length) % align
        var pos = offset
        var left = length
        while left > 0 {
            var num = left
            if head != 0 {
                num = min(left, maxBounce, align - head)
                head = (head + num) % align
            } else if tail != 0 && num > align {
                num -= tail
            }
            num = min(num, maxZero)
            if num >= align {
                guard try await check(pos, num, .writeZeroes) else { return }
                try await image.writeZeroes(at: pos, length: num, flags: flags.subtracting(.fua))
            } else {
                if flags.contains(.noFallback) { throw BlockError.posix(ENOTSUP) }
                num = min(num, maxBounce)
                let zeroes = AlignedBuffer(count: Int(num), zeroed: true)
                guard try await check(pos, num, .write) else { return }
                try await image.write(at: pos, from: UnsafeRawBufferPointer(zeroes.bytes), flags: [])
            }
            pos += num
            left -= num
        }
        // QEMU emulates FUA with one flush of the node at the end.
        if flags.contains(.fua) { try await flush() }
    }

    /// QEMU's MAX_BOUNCE_BUFFER.
    static let maxBounce: Int64 = 16 << 20

    /// QEMU's bdrv_co_pdiscard on this node, then blkdebug_co_pdiscard for
    /// each piece: cut at multiples of max(align, opt-discard), at most
    /// max-discard; pieces smaller than `align` are dropped (discard is
    /// advisory).
    public func discard(at offset: Int64, length: Int64) async throws(BlockError) {
        defer { wrote() }
        let ra = Int64(requestAlignment)
        let align = max(limitsIn.optDiscard, ra)
        let maxDiscard = alignDown(limitsIn.maxDiscard > 0 ? limitsIn.maxDiscard : Int64.max, align)
        var head = offset % align
        var tail = (offset + length) % align
        var pos = offset
        var left = length
        while left > 0 {
            var num = left
            if head != 0 {
                num = min(left, align - head)
                if num % ra != 0 { num %= ra }
                head = (head + num) % align
            } else if tail != 0 {
                if num > align {
                    num -= tail
                } else if tail % ra != 0 && tail > ra {
                    tail %= ra
                    num -= tail
                }
            }
            num = min(num, maxDiscard)
            if num >= ra {
                guard try await check(pos, num, .discard) else { return }
                try await image.discard(at: pos, length: num)
            }
            pos += num
            left -= num
        }
    }

    /// QEMU's generic flush of this node with blkdebug_co_flush: the
    /// `flush` rules are checked only when the node was written since its
    /// last successful flush (QEMU's write generation); the image is
    /// flushed unless a rule failed the flush.
    public func flush() async throws(BlockError) {
        let gen = generations.withLock { $0 }
        let image = self.image
        image.debugEvent(.flushToOS)
        if gen.written != gen.flushed {
            image.debugEvent(.flushToDisk)
            _ = try await check(0, 0, .flush)
        }
        try await image.flush()
        generations.withLock { $0.flushed = gen.written }
    }

    /// QEMU's blkdebug_co_block_status: checked, then the image answers.
    public func blockStatus(at offset: Int64, length: Int64) async throws(BlockError) -> BlockStatus {
        guard try await check(offset, length, .blockStatus) else {
            return BlockStatus(flags: [], length: length)
        }
        return try await image.blockStatus(at: offset, length: length)
    }

    public func truncate(to length: Int64, preallocation: Preallocation) async throws(BlockError) {
        defer { wrote() }
        try await image.truncate(to: length, preallocation: preallocation)
    }

    public func startWriteback() async { await image.startWriteback() }

    /// Lamina's space reservation hints pass through (no rule applies:
    /// they are no requests in QEMU's sense).
    public func reserveSpace(upTo length: Int64) async throws(BlockError) {
        try await image.reserveSpace(upTo: length)
    }

    public func releaseUnusedSpace() async throws(BlockError) {
        try await image.releaseUnusedSpace()
    }

    public func close() async throws(BlockError) {
        let c = child.withLock { c -> BlockChild? in
            defer { c = nil }
            return c
        }
        try await c?.node.close()
    }
}
