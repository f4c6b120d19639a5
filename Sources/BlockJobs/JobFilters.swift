import BlockCore
import BlockGraph
import Synchronization

/// The filter nodes block jobs put above the node they work on (QEMU's
/// bdrv_commit_top in block/commit.c and bdrv_mirror_top in
/// block/mirror.c): their filtered child is named "backing", and their
/// permissions on it are what make the job possible.
public final class JobTopFilter: BlockDriver, Sendable {
    public enum Kind: Sendable {
        /// Intermediate commit: takes nothing on the layers below and
        /// shares everything (the job's own edges block consistent reads of
        /// the layers it empties). Read-only.
        case commitTop
        /// Mirror and active commit: passes its users' permissions down,
        /// except that an active commit neither reads consistently nor
        /// refuses writers below (the base is written by the job).
        case mirrorTop(isCommit: Bool)
    }

    public let kind: Kind
    private struct State {
        var child: BlockChild?
        /// QEMU's MirrorBDSOpaque.stop: the job is over, nothing passes.
        var stopped = false
    }
    private let state: Mutex<State>

    /// A filter over `node` (whose reference passes to the filter's edge).
    public init(kind: Kind, over node: BlockNode) {
        self.kind = kind
        self.state = Mutex(State(child: BlockChild(name: "backing", role: [.filtered, .primary], node: node)))
    }

    public var formatName: String {
        switch kind {
        case .commitTop: return "commit_top"
        case .mirrorTop: return "mirror_top"
        }
    }
    public var isFilter: Bool { true }
    public var children: [BlockChild] { state.withLock { $0.child.map { [$0] } ?? [] } }
    private var below: BlockNode {
        guard let c = state.withLock({ $0.child }) else { preconditionFailure("\(formatName) without its child") }
        return c.node
    }
    public var length: Int64 { state.withLock { $0.child?.node.length } ?? 0 }

    public func removeChild(_ c: BlockChild) {
        state.withLock { if $0.child === c { $0.child = nil } }
    }

    /// The job is over (QEMU's mirror_exit_common sets `stop`): the filter
    /// takes nothing and shares everything until it is dropped.
    public func stop() { state.withLock { $0.stopped = true } }

    public func childPermissions(for child: BlockChild, node: BlockNode, perm: BlockPermissions,
                                 shared: BlockPermissions) -> (BlockPermissions, BlockPermissions) {
        if state.withLock({ $0.stopped }) { return ([], .all) }
        switch kind {
        case .commitTop:
            return ([], .all)
        case .mirrorTop(let isCommit):
            var (p, s) = defaultChildPermissions(role: child.role, writable: !node.readOnly, perm: perm, shared: shared)
            if isCommit {
                p.remove(.consistentRead)
                s.insert(.write)
            }
            return (p, s)
        }
    }

    public func reopenForWriting() async throws(BlockError) {}

    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws(BlockError) {
        try await below.read(at: offset, into: buffer)
    }

    private func checkWritable() throws(BlockError) {
        if case .commitTop = kind { throw BlockError.unsupported("Operation not supported") }
    }

    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws(BlockError) {
        try checkWritable()
        try await below.write(at: offset, from: buffer, flags: flags)
    }

    public func writeZeroes(at offset: Int64, length: Int64, flags: WriteFlags) async throws(BlockError) {
        try checkWritable()
        try await below.writeZeroes(at: offset, length: length, flags: flags)
    }

    public func discard(at offset: Int64, length: Int64) async throws(BlockError) {
        try checkWritable()
        try await below.discard(at: offset, length: length)
    }

    public func flush() async throws(BlockError) {
        if let c = state.withLock({ $0.child }) { try await c.node.flush() }
    }

    public func blockStatus(at offset: Int64, length: Int64) async throws(BlockError) -> BlockStatus {
        try await below.blockStatus(at: offset, length: length)
    }

    public func close() async throws(BlockError) {
        let c = state.withLock { s -> BlockChild? in
            defer { s.child = nil }
            return s.child
        }
        try await c?.node.close()
    }
}
