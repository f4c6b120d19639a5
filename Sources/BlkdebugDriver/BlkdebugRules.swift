#if canImport(Glibc)
import Glibc
#endif
import BlockCore
import BlockGraph
import Synchronization

/// One rule as blkdebug keeps it (QEMU's BlkdebugRule): values already
/// converted the way QEMU converts them (C `int` state and errno, a byte
/// offset from the sector).
struct BlkdebugRule: Sendable {
    enum Action: Sendable {
        /// Fail matching requests with `errno` (0: match, fail nothing).
        case injectError(iotypeMask: UInt8, errno: Int32, immediately: Bool, once: Bool, offset: UInt64)
        case setState(Int32)
    }

    var event: BlkdebugEvent
    /// 0: any state.
    var state: Int32
    var action: Action

    /// No sector: any offset (QEMU stores -1).
    static let anyOffset = UInt64.max

    init(_ r: BlkdebugInjectError) {
        event = r.event
        state = Int32(truncatingIfNeeded: r.state ?? 0)
        let sector = r.sector ?? -1
        action = .injectError(iotypeMask: r.iotype?.bit ?? BlkdebugIOType.defaultMask,
                              errno: Int32(truncatingIfNeeded: r.errno ?? Int64(EIO)),
                              immediately: r.immediately ?? false, once: r.once ?? false,
                              offset: sector == -1 ? Self.anyOffset : UInt64(bitPattern: sector &* 512))
    }

    init(_ r: BlkdebugSetState) {
        event = r.event
        state = Int32(truncatingIfNeeded: r.state ?? 0)
        action = .setState(Int32(truncatingIfNeeded: r.newState))
    }
}

/// What a failing rule check asks the request to do.
struct InjectedError: Sendable {
    var errno: Int32
    var immediately: Bool
}

/// blkdebug's rule state machine (blkdebug.c), thread-safe: events come
/// from the drivers above (any I/O thread), checks from requests through
/// the node; both take one `Mutex` and never suspend inside it.
///
/// - Rules are grouped by event; each group lists the newest rule first
///   (QEMU inserts at the head, inject-error rules before set-state rules,
///   each kind in the order given).
/// - An event runs its group: a rule whose state is 0 or the current state
///   acts. The first acting inject-error rule replaces the active list,
///   every acting one is put at its head; a set-state rule sets the state
///   the machine takes once the whole group ran (the last one wins).
/// - A request checks the active list from the head: the first rule whose
///   iotype matches and whose sector (if any) lies in the request decides.
///   Its errno (if not 0) fails the request; a `once` rule then leaves the
///   active list and its group for good.
/// - The state starts at 1.
final class BlkdebugRules: Sendable {
    private struct State {
        var state: Int32 = 1
        /// Rule storage; removed rules become nil (ids stay stable).
        var rules: [BlkdebugRule?] = []
        /// Per event (index into BlkdebugEvent.allCases): rule ids, head first.
        var byEvent: [[Int]] = Array(repeating: [], count: BlkdebugEvent.allCases.count)
        /// Active inject-error rule ids, head first.
        var active: [Int] = []
    }

    private let state: Mutex<State>
    /// Whether any rule exists at all (events skip the lock when none).
    let isEmpty: Bool

    /// The rules in QEMU's creation order: inject-error rules, then
    /// set-state rules, each in the order given.
    init(injectErrors: [BlkdebugInjectError], setStates: [BlkdebugSetState]) {
        var s = State()
        let all = injectErrors.map(BlkdebugRule.init) + setStates.map(BlkdebugRule.init)
        for r in all {
            s.rules.append(r)
            s.byEvent[Self.index(r.event)].insert(s.rules.count - 1, at: 0)
        }
        isEmpty = all.isEmpty
        state = Mutex(s)
    }

    private static let indices: [BlkdebugEvent: Int] = Dictionary(
        uniqueKeysWithValues: BlkdebugEvent.allCases.enumerated().map { ($0.element, $0.offset) })

    static func index(_ e: BlkdebugEvent) -> Int { indices[e]! }

    /// The current state (for tests and diagnostics).
    var currentState: Int32 { state.withLock { $0.state } }

    /// QEMU's blkdebug_debug_event.
    func event(_ event: BlkdebugEvent) {
        if isEmpty { return }
        let i = Self.index(event)
        state.withLock { s in
            if s.byEvent[i].isEmpty { return }
            var newState = s.state
            var injections = 0
            for id in s.byEvent[i] {
                guard let r = s.rules[id], r.state == 0 || r.state == s.state else { continue }
                switch r.action {
                case .injectError:
                    injections += 1
                    if injections == 1 { s.active.removeAll(keepingCapacity: true) }
                    s.active.insert(id, at: 0)
                case .setState(let n):
                    newState = n
                }
            }
            s.state = newState
        }
    }

    /// QEMU's rule_check: the error a request of `iotype` covering
    /// [offset, offset+bytes) gets, if any (`bytes` 0: flush).
    func check(offset: Int64, bytes: Int64, _ iotype: BlkdebugIOType) -> InjectedError? {
        if isEmpty { return nil }
        let bit = iotype.bit
        let lo = UInt64(bitPattern: offset)
        let hi = lo &+ UInt64(bitPattern: bytes)
        return state.withLock { s -> InjectedError? in
            for (pos, id) in s.active.enumerated() {
                guard let r = s.rules[id], case .injectError(let mask, let errno, let immediately, let once, let at) = r.action
                else { continue }
                guard mask & bit != 0,
                      at == BlkdebugRule.anyOffset || (bytes != 0 && at >= lo && at < hi) else { continue }
                if errno == 0 { return nil }
                if once {
                    s.active.remove(at: pos)
                    s.byEvent[Self.index(r.event)].removeAll { $0 == id }
                    s.rules[id] = nil
                }
                return InjectedError(errno: errno, immediately: immediately)
            }
            return nil
        }
    }
}
