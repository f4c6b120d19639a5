/// QAPI JobStatus, in QEMU's order (the order of the transition tables).
public enum JobStatus: String, Sendable, CaseIterable {
    case undefined, created, running, paused, ready, standby, waiting, pending, aborting, concluded, null
}

/// QAPI JobVerb: the user commands a job accepts depending on its state.
public enum JobVerb: String, Sendable, CaseIterable {
    case cancel, pause, resume
    case setSpeed = "set-speed"
    case complete, finalize, dismiss
}

/// QAPI JobType (the ones Lamina runs or will run).
public enum JobType: String, Sendable {
    case commit, stream, mirror, backup, create, amend
    case snapshotLoad = "snapshot-load"
    case snapshotSave = "snapshot-save"
    case snapshotDelete = "snapshot-delete"
}

/// The written transition tables of the job lifecycle (QEMU's JobSTT and
/// JobVerbTable, restated). Rows are the current state.
public enum JobTables {
    // U C R P Y S W D X E N, one string per source state; "1" = allowed.
    private static let transitions: [JobStatus: String] = [
        .undefined: "01000000000",
        .created:   "00100000101",
        .running:   "00011010100",
        .paused:    "00100000000",
        .ready:     "00000110100",
        .standby:   "00001000000",
        .waiting:   "00000001100",
        .pending:   "00000000110",
        .aborting:  "00000000110",
        .concluded: "00000000001",
        .null:      "00000000000",
    ]

    private static let verbs: [JobVerb: String] = [
        .cancel:   "01111111000",
        .pause:    "01111100000",
        .resume:   "01111100000",
        .setSpeed: "01111100000",
        .complete: "00001000000",
        .finalize: "00000001000",
        .dismiss:  "00000000010",
    ]

    private static func bit(_ row: String, _ s: JobStatus) -> Bool {
        let i = JobStatus.allCases.firstIndex(of: s)!
        return row.utf8[row.utf8.index(row.utf8.startIndex, offsetBy: i)] == UInt8(ascii: "1")
    }

    public static func canTransition(from: JobStatus, to: JobStatus) -> Bool {
        bit(transitions[from]!, to)
    }

    public static func allows(_ verb: JobVerb, in status: JobStatus) -> Bool {
        bit(verbs[verb]!, status)
    }
}
