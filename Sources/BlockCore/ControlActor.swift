/// The control plane (QEMU's "global state" code under the big lock): QMP
/// command handlers, graph changes, job state transitions and job verbs run
/// on this actor, one at a time. Data-plane I/O never runs here; it runs on
/// the nodes' home event loops.
@globalActor
public actor ControlActor {
    public static let shared = ControlActor()
}
