import BlockCore
import Synchronization

/// A user of the graph that is not a node (QEMU's BlockBackend): an
/// export, or the backend a job reads or writes through. It holds one
/// "root" edge with the permissions it asked for, and a gate that drained
/// sections close: requests wait at the gate while the graph below changes,
/// and the ones in flight are waited for.
///
/// Threading: `request` may be called from any executor; `attach`, `detach`
/// and permission changes happen on the control plane.
public final class BlockBackend: BlockParent {
    public let root: BlockChild
    /// QEMU's blk name (qemu-storage-daemon's backends have none).
    public let name: String?
    /// QEMU's blk_set_disable_request_queuing: requests never wait at the
    /// gate (a job's backend: the job itself stops at its pause point, and
    /// a drain waits for that, so holding its requests would deadlock).
    public let queuesRequests: Bool

    private struct Gate {
        var inFlight = 0
        /// Drained sections open (they nest); requests wait while > 0.
        var quiesceCount = 0
        var waitingToEnter: [UnsafeContinuation<Void, Never>] = []
        var drained: [UnsafeContinuation<Void, Never>] = []
    }
    private let gate = Mutex(Gate())
    /// The backend let go of its node (`Graph.detach`): at most once.
    private let released = Atomic<Bool>(false)

    /// A backend on `node`, taking `perm` and sharing `shared`; the edge
    /// takes a reference of `node`. Not attached yet (`Graph.attach`).
    public init(node: BlockNode, perm: BlockPermissions, shared: BlockPermissions, name: String? = nil,
                queuesRequests: Bool = true) {
        node.retain()
        self.name = name
        self.queuesRequests = queuesRequests
        self.root = BlockChild(name: "root", role: [], node: node)
        root.setPermissions(perm, shared)
    }

    /// Marks the backend released; true the first time only.
    func markReleased() -> Bool { !released.exchange(true, ordering: .acquiringAndReleasing) }

    /// The node requests go to now (it changes when the node is replaced).
    public var node: BlockNode { root.node }

    public var parentDescription: String {
        name.map { "block device '\($0)'" } ?? "an unnamed block device"
    }

    /// Every request enters (waiting while a drained section is open) and
    /// leaves; `body` runs on the node current at entry.
    public func request<T>(_ body: (BlockNode) async throws(BlockError) -> T) async throws(BlockError) -> T {
        var entered: BlockNode? = enter()
        while entered == nil {
            await withUnsafeContinuation { (c: UnsafeContinuation<Void, Never>) in
                let resumeNow = gate.withLock { g -> Bool in
                    if g.quiesceCount == 0 || !queuesRequests { return true }
                    g.waitingToEnter.append(c)
                    return false
                }
                if resumeNow { c.resume() }
            }
            entered = enter()
        }
        defer { leave() }
        return try await body(entered!)
    }

    private func enter() -> BlockNode? {
        let ok = gate.withLock { g -> Bool in
            if g.quiesceCount > 0 && queuesRequests { return false }
            g.inFlight += 1
            return true
        }
        return ok ? root.node : nil
    }

    private func leave() {
        let done = gate.withLock { g -> [UnsafeContinuation<Void, Never>] in
            g.inFlight -= 1
            if g.inFlight == 0 && !g.drained.isEmpty {
                defer { g.drained = [] }
                return g.drained
            }
            return []
        }
        done.forEach { $0.resume() }
    }

    /// Opens a drained section: new requests wait, and this returns once
    /// the requests in flight have finished. Sections nest.
    public func drainBegin() async {
        await withUnsafeContinuation { (c: UnsafeContinuation<Void, Never>) in
            let now = gate.withLock { g -> Bool in
                g.quiesceCount += 1
                if g.inFlight == 0 { return true }
                g.drained.append(c)
                return false
            }
            if now { c.resume() }
        }
    }

    public func drainEnd() async {
        let waiters = gate.withLock { g -> [UnsafeContinuation<Void, Never>] in
            g.quiesceCount -= 1
            if g.quiesceCount > 0 { return [] }
            defer { g.waitingToEnter = [] }
            return g.waitingToEnter
        }
        waiters.forEach { $0.resume() }
    }
}
