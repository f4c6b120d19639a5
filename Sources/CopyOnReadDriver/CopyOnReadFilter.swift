import BlockCore
import BlockGraph
import Synchronization

/// The `copy-on-read` filter (QEMU 7.2's block/copy-on-read.c): reads
/// through it copy what the node below reads from its backing chain into
/// that node (QEMU's BDRV_REQ_COPY_ON_READ, done by the node's generic
/// layer with the clusters serialised); everything else passes through.
///
/// With a `bottom` node, only data of the layers down to `bottom` is
/// copied (what block-stream streams): a range the node below does not
/// allocate and no layer down to `bottom` allocates is read, not copied.
public final class CopyOnReadFilter: PrefetchingDriver, Sendable {
    private let child: Mutex<BlockChild?>
    /// The lowest layer whose data is copied (nil: the whole chain).
    public let bottom: BlockNode?

    /// A filter over `file` (whose reference passes to the filter's edge).
    /// `bottom` must be `file` or below it; the filter holds a reference
    /// of it while it exists.
    public init(file: BlockNode, bottom: BlockNode?) {
        self.child = Mutex(BlockChild(name: "file", role: [.filtered, .primary], node: file))
        bottom?.retain()
        self.bottom = bottom
    }

    public var formatName: String { "copy-on-read" }
    public var isFilter: Bool { true }
    public var children: [BlockChild] { child.withLock { $0.map { [$0] } ?? [] } }
    private var file: BlockNode {
        guard let c = child.withLock({ $0 }) else { preconditionFailure("copy-on-read filter without its child") }
        return c.node
    }
    public var length: Int64 { child.withLock { $0?.node.length } ?? 0 }
    public var supportedWriteFlags: WriteFlags { file.driver.supportedWriteFlags }

    public func removeChild(_ c: BlockChild) {
        child.withLock { if $0 === c { $0 = nil } }
    }

    /// QEMU's cor_child_perm: consistent read, write and resize pass
    /// through; the filter itself writes unchanged data below.
    public func childPermissions(for child: BlockChild, node: BlockNode, perm: BlockPermissions,
                                 shared: BlockPermissions) -> (BlockPermissions, BlockPermissions) {
        let pass: BlockPermissions = [.consistentRead, .write, .resize]
        return (perm.intersection(pass).union(.writeUnchanged), shared.intersection(pass).union(.writeUnchanged))
    }

    public func reopenForWriting() async throws(BlockError) {}

    /// The runs of [offset, offset+length) and whether each is to be
    /// copied: not allocated in the node below, allocated down to `bottom`.
    private func runs(_ offset: Int64, _ length: Int64,
                      _ body: (Int64, Int64, Bool) async throws(BlockError) -> Void) async throws(BlockError) {
        let file = self.file
        let base = bottom?.filterOrBacking
        var pos = offset
        let end = offset + length
        while pos < end {
            var copy = false
            var n = end - pos
            let st = try await file.blockStatus(at: pos, length: n)
            n = min(n, max(st.length, 1))
            if !st.flags.contains(.allocated), let below = file.filterOrBacking {
                let (allocated, m) = try await below.isAllocatedAbove(base: base, at: pos, length: n)
                if m == 0 { break }
                n = min(n, m)
                copy = allocated
            }
            try await body(pos, n, copy)
            pos += n
        }
        if pos < end { try await body(pos, end - pos, false) }
    }

    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws(BlockError) {
        let file = self.file
        guard bottom != nil else {
            try await file.read(at: offset, into: buffer, flags: [.copyOnRead])
            return
        }
        try await runs(offset, Int64(buffer.count)) { (o, n, copy) async throws(BlockError) in
            let piece = UnsafeMutableRawBufferPointer(rebasing: buffer[Int(o - offset)..<Int(o - offset + n)])
            try await file.read(at: o, into: piece, flags: copy ? [.copyOnRead] : [])
        }
    }

    /// block-stream's population (QEMU's BDRV_REQ_PREFETCH): only the runs
    /// that need copying are read, into nothing.
    public func prefetch(at offset: Int64, length: Int64) async throws(BlockError) {
        let file = self.file
        try await runs(offset, length) { (o, n, copy) async throws(BlockError) in
            if copy { try await file.prefetch(at: o, length: n) }
        }
    }

    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws(BlockError) {
        try await file.write(at: offset, from: buffer, flags: flags)
    }

    public func writeZeroes(at offset: Int64, length: Int64, flags: WriteFlags) async throws(BlockError) {
        try await file.writeZeroes(at: offset, length: length, flags: flags)
    }

    public func discard(at offset: Int64, length: Int64) async throws(BlockError) {
        try await file.discard(at: offset, length: length)
    }

    public func flush() async throws(BlockError) { try await file.flush() }

    public func blockStatus(at offset: Int64, length: Int64) async throws(BlockError) -> BlockStatus {
        try await file.blockStatus(at: offset, length: length)
    }

    public func truncate(to length: Int64, preallocation: Preallocation) async throws(BlockError) {
        try await file.truncate(to: length, preallocation: preallocation)
    }

    public func close() async throws(BlockError) {
        let c = child.withLock { c -> BlockChild? in
            defer { c = nil }
            return c
        }
        var first: BlockError?
        do { try await c?.node.close() } catch { first = error }
        do { try await bottom?.close() } catch { if first == nil { first = error } }
        if let e = first { throw e }
    }
}
