import BlockCore
import BlockGraph

/// One action of a `transaction` (QEMU's BlkActionOps): `prepare` does the
/// work that may fail, in a way `abort` can undo; then exactly one of
/// `commit` / `abort` runs, then `clean` (always, also after a failed
/// prepare). New kinds of actions (bitmaps, backups) conform without
/// changing `Transaction`.
@ControlActor
public protocol TransactionAction: AnyObject {
    func prepare() async throws(BlockError)
    func commit() async
    /// Undoes `prepare`, also a `prepare` that failed half-way.
    func abort() async
    func clean() async
}

extension TransactionAction {
    public func commit() async {}
    public func abort() async {}
    public func clean() async {}
}

/// QEMU 7.2's qmp_transaction: all I/O is drained once (every job goes
/// through a pause point); every action is prepared in order; at the first
/// failure every action prepared so far, the failed one included, is
/// aborted (newest first) and the error is returned; otherwise every
/// action is committed. Then every action started is cleaned.
@ControlActor
public enum Transaction {
    public static func run(_ actions: [any TransactionAction], graph: Graph) async throws(BlockError) {
        await graph.drainAll()
        var started: [any TransactionAction] = []
        var failure: BlockError?
        for a in actions {
            started.append(a)
            do throws(BlockError) {
                try await a.prepare()
            } catch {
                failure = error
                break
            }
        }
        if failure != nil {
            for a in started.reversed() { await a.abort() }
        } else {
            for a in started { await a.commit() }
        }
        for a in started { await a.clean() }
        if let failure { throw failure }
    }
}

/// transaction's "abort" action: always fails in prepare.
public final class AbortAction: TransactionAction {
    public init() {}
    public func prepare() async throws(BlockError) {
        throw BlockError.invalid("Transaction aborted using Abort action")
    }
}
