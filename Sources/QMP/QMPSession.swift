import LaminaJSON

/// One unit of QMP input, in arrival order: a parsed JSON value or the
/// JSON parser's error for the bytes that failed.
public enum QMPInput: Sendable, Equatable {
    case value(JSON)
    case parseError(JSONParseError)
}

/// A validated command request, ready for the dispatcher.
public struct QMPRequest: Sendable, Equatable {
    /// The command name (`execute` or `exec-oob`).
    public var command: String
    /// The `arguments` object (empty when absent).
    public var arguments: JSON
    /// The request's `id`, echoed in the response (any JSON value).
    public var id: JSON?
    /// True for `exec-oob`.
    public var outOfBand: Bool

    public init(command: String, arguments: JSON, id: JSON?, outOfBand: Bool = false) {
        self.command = command
        self.arguments = arguments
        self.id = id
        self.outOfBand = outOfBand
    }
}

/// What the I/O layer does with one input.
public enum QMPStep: Sendable, Equatable {
    /// Send this response (an error, or `qmp_capabilities`' answer).
    case respond(JSON)
    /// Run the command through the dispatcher, then send
    /// `QMPSession.response(to:result:)`.
    case execute(QMPRequest)
}

/// The QMP protocol state machine of one monitor connection (no I/O),
/// following QEMU's monitor/qmp.c and qapi/qmp-dispatch.c:
///
/// 1. The server sends `greeting` on connect.
/// 2. Capabilities negotiation: only `qmp_capabilities` is accepted; any
///    other known or unknown command gets CommandNotFound "Expecting
///    capabilities negotiation with 'qmp_capabilities'". `enable: ["oob"]`
///    turns on out-of-band execution when it was offered ("Capability oob
///    not available" otherwise).
/// 3. Command mode: requests are validated (QEMU's texts: "QMP input must
///    be a JSON object", "QMP input lacks member 'execute'", "QMP input
///    member 'x' must be a string", "... 'arguments' must be an object",
///    "... 'x' is unexpected", "... 'x' clashes with 'y'"), unknown
///    commands get CommandNotFound, `exec-oob` of a command that does not
///    allow it gets "The command x does not support OOB", and
///    `qmp_capabilities` gets CommandNotFound "Capabilities negotiation is
///    already complete, command ignored".
///
/// Parse errors are answered with GenericError and never carry an id;
/// other responses echo the request's `id`. Members are examined in QDict
/// order, so the error QEMU reports first is the one reported here.
///
/// Usage: feed received bytes to `receive(_:)`; handle each returned
/// input in order with `step(for:)` (inputs for which `isOutOfBand(_:)`
/// is true may be handled at once, ahead of queued ones). Not
/// thread-safe: one owner per connection.
public struct QMPSession: Sendable {
    public struct Configuration: Sendable {
        /// The `version` member of the greeting (QEMU's query-version result).
        public var version: JSON
        /// Offer the "oob" capability (QEMU offers it on monitors with an
        /// I/O thread, which includes every qemu-storage-daemon socket monitor).
        public var offerOOB: Bool
        /// Commands available after negotiation (`qmp_capabilities` is
        /// always available and handled by the session).
        public var commands: Set<String>
        /// Commands that may run with `exec-oob`.
        public var oobCommands: Set<String>

        public init(version: JSON, offerOOB: Bool = true, commands: Set<String>, oobCommands: Set<String> = []) {
            self.version = version
            self.offerOOB = offerOOB
            self.commands = commands
            self.oobCommands = oobCommands
        }
    }

    public enum Mode: Sendable, Equatable { case negotiation, command }

    public let configuration: Configuration
    public private(set) var mode: Mode = .negotiation
    public private(set) var oobEnabled = false
    private var streamer = JSONStreamer()

    public init(_ configuration: Configuration) {
        self.configuration = configuration
    }

    /// `{"QMP": {"version": ..., "capabilities": [...]}}`
    public var greeting: JSON {
        let caps: [JSON] = configuration.offerOOB ? ["oob"] : []
        return ["QMP": ["version": configuration.version, "capabilities": .array(caps)]]
    }

    /// Splits received bytes into inputs (see `JSONStreamer`).
    public mutating func receive(_ bytes: some Collection<UInt8>) -> [QMPInput] {
        streamer.feed(bytes).map { r in
            switch r {
            case .success(let v): return .value(v)
            case .failure(let e): return .parseError(e)
            }
        }
    }

    /// QEMU's qmp_is_oob at read time: with OOB enabled, an object with
    /// `exec-oob` and without `execute` bypasses the queue.
    public func isOutOfBand(_ input: QMPInput) -> Bool {
        guard oobEnabled, case .value(let v) = input, v.isObject else { return false }
        return v["exec-oob"] != nil && v["execute"] == nil
    }

    /// Decides what to do with one input; call in input order, each after
    /// the previous one's response was produced (state changes made by
    /// `qmp_capabilities` apply to the inputs after it).
    public mutating func step(for input: QMPInput) -> QMPStep {
        switch input {
        case .parseError(let e):
            return .respond(QMPError(e.message).response(id: nil))
        case .value(let request):
            let id = request.isObject ? request["id"] : nil
            do {
                let req = try validate(request)
                if req.command == "qmp_capabilities" {
                    return .respond(try capabilities(req))
                }
                return .execute(req)
            } catch {
                var e = error
                if mode == .negotiation && e.errorClass == .commandNotFound {
                    e.desc = "Expecting capabilities negotiation with 'qmp_capabilities'"
                }
                return .respond(e.response(id: id))
            }
        }
    }

    /// The response to a dispatched command.
    public func response(to request: QMPRequest, result: Result<JSON, QMPError>) -> JSON {
        QMPSession.response(to: request, result: result)
    }

    /// The response to a dispatched command (`{"return": ...}` or
    /// `{"error": ...}`, plus the request's id); independent of state.
    public static func response(to request: QMPRequest, result: Result<JSON, QMPError>) -> JSON {
        switch result {
        case .success(let value):
            var members: [(String, JSON)] = [("return", value)]
            if let id = request.id { members.append(("id", id)) }
            return .object(members)
        case .failure(let error):
            return error.response(id: request.id)
        }
    }

    /// qmp_dispatch_check_obj plus the command lookups of qmp_dispatch.
    private func validate(_ request: JSON) throws(QMPError) -> QMPRequest {
        guard case .object(let members) = request else {
            throw QMPError("QMP input must be a JSON object")
        }
        var execKey: String?
        for (name, value) in JSON.qdictOrder(members) {
            if name == "execute" || (name == "exec-oob" && oobEnabled) {
                guard case .string = value else { throw QMPError("QMP input member '\(name)' must be a string") }
                if let other = execKey { throw QMPError("QMP input member '\(name)' clashes with '\(other)'") }
                execKey = name
            } else if name == "arguments" {
                guard value.isObject else { throw QMPError("QMP input member 'arguments' must be an object") }
            } else if name != "id" {
                throw QMPError("QMP input member '\(name)' is unexpected")
            }
        }
        guard let key = execKey, let command = request[key]?.stringValue else {
            throw QMPError("QMP input lacks member 'execute'")
        }
        let oob = key == "exec-oob"
        let available = mode == .negotiation
            ? command == "qmp_capabilities"
            : command == "qmp_capabilities" || configuration.commands.contains(command)
        if !available { throw QMPError.commandNotFound(command) }
        if oob && !configuration.oobCommands.contains(command) {
            throw QMPError("The command \(command) does not support OOB")
        }
        return QMPRequest(command: command, arguments: request["arguments"] ?? .emptyObject, id: request["id"], outOfBand: oob)
    }

    /// qmp_capabilities: arguments first (QAPI visitor), then the state check.
    private mutating func capabilities(_ req: QMPRequest) throws(QMPError) -> JSON {
        let input = try QAPIInput(req.arguments)
        let enable = try input.optionalList("enable") { v throws(QMPError) in try v.enumValue(allowed: ["oob"]) }
        try input.finish()
        if mode == .command {
            throw QMPError(.commandNotFound, "Capabilities negotiation is already complete, command ignored")
        }
        var oob = false
        for cap in enable ?? [] {
            if cap == "oob" && !configuration.offerOOB { throw QMPError("Capability \(cap) not available") }
            oob = true
        }
        oobEnabled = oob
        mode = .command
        return response(to: req, result: .success(.emptyObject))
    }
}
