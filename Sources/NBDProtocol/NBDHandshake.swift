/// The server side of fixed-newstyle negotiation as a state machine: feed it
/// the bytes the client sent, perform what the returned `Step` says.
///
/// Behaviour follows QEMU 7.2's `nbd_negotiate_options` byte for byte,
/// including how hostile input is treated: an option longer than 32 MiB,
/// a bad option magic or unknown client flags end the connection without a
/// reply; malformed option payloads are dropped (streamed, never buffered
/// whole) and answered with NBD_REP_ERR_INVALID; unknown options with
/// NBD_REP_ERR_UNSUP. Memory use is bounded by one field (≤ 4 KiB).
///
/// Not thread-safe; a value owned by one connection.
public struct NBDHandshake: Sendable {
    /// What the connection does after writing `Step.output`.
    public enum Outcome: Sendable, Equatable {
        case needMoreInput
        /// Close the connection. `reason` is QEMU's log text (nil for a
        /// clean NBD_OPT_ABORT).
        case close(reason: String?)
        /// Negotiation finished: bytes after `consumed` are transmission requests.
        case transmission(NBDSession)
    }

    public struct Step: Sendable {
        /// Bytes of the input that were used; the rest must be offered again.
        public var consumed: Int
        /// Bytes to send to the client, before acting on `outcome`.
        public var output: [UInt8]
        public var outcome: Outcome
    }

    /// The 18 bytes the server sends on connect: NBDMAGIC, IHAVEOPT and the
    /// handshake flags FIXED_NEWSTYLE | NO_ZEROES.
    public static let greeting: [UInt8] = {
        var w = NBDByteWriter()
        w.u64(NBDMagic.initPassword)
        w.u64(NBDMagic.option)
        w.u16(NBDHandshakeFlags.fixedNewstyle | NBDHandshakeFlags.noZeroes)
        return w.bytes
    }()

    enum Phase: Sendable {
        case clientFlags
        case optionHeader
        /// Discarding the rest of an option, then replying.
        case dropping(remaining: UInt32, replyType: UInt32, message: [UInt8])
        case exportName(length: Int)
        case info(InfoStep)
        case meta(MetaStep)
        case done
    }

    enum InfoStep: Sendable {
        case nameLength
        case name(length: Int)
        case requestCount(name: [UInt8])
        case requests(name: [UInt8], left: Int, sendName: Bool, blockSize: Bool)
    }

    enum MetaStep: Sendable {
        case nameLength
        case name(length: Int)
        case queryCount(NBDExportInfo)
        case queryLength(NBDExportInfo, left: UInt32, NBDMetaSelection)
        case query(NBDExportInfo, left: UInt32, NBDMetaSelection, length: Int)
        case skipQuery(NBDExportInfo, left: UInt32, NBDMetaSelection, remaining: UInt32)
    }

    var phase: Phase = .clientFlags
    var fixedNewstyle = false
    var noZeroes = false
    /// Reply framing negotiated so far.
    public internal(set) var mode: NBDReplyMode = .exportName
    /// Contexts chosen by the last NBD_OPT_SET_META_CONTEXT.
    public internal(set) var meta = NBDMetaSelection()
    /// The option being handled and how many of its payload bytes are unread.
    var option: UInt32 = 0
    var optionLeft: UInt32 = 0
    /// Partial field being accumulated across inputs.
    var field: [UInt8] = []

    public init() {}

    /// Consumes client bytes. Precondition: no terminal outcome (close or
    /// transmission) was returned before.
    public mutating func receive<D: NBDExportDirectory>(_ input: UnsafeRawBufferPointer, directory: inout D) -> Step {
        var pos = 0
        var out = NBDByteWriter()
        func finish(_ outcome: Outcome) -> Step {
            Step(consumed: pos, output: out.bytes, outcome: outcome)
        }
        while true {
            switch phase {
            case .done:
                preconditionFailure("NBDHandshake used after it finished")

            case .clientFlags:
                guard let b = take(4, input, &pos) else { return finish(.needMoreInput) }
                var flags = be32(b)
                mode = .exportName
                if flags & NBDHandshakeFlags.clientFixedNewstyle != 0 {
                    fixedNewstyle = true
                    mode = .simple
                    flags &= ~NBDHandshakeFlags.clientFixedNewstyle
                }
                if flags & NBDHandshakeFlags.clientNoZeroes != 0 {
                    noZeroes = true
                    flags &= ~NBDHandshakeFlags.clientNoZeroes
                }
                if flags != 0 {
                    return fail("Unknown client flags 0x\(String(flags, radix: 16)) received", finish)
                }
                phase = .optionHeader

            case .optionHeader:
                guard let b = take(16, input, &pos) else { return finish(.needMoreInput) }
                if be64(b) != NBDMagic.option { return fail("Bad magic received", finish) }
                option = be32(b, 8)
                optionLeft = be32(b, 12)
                if optionLeft > NBDLimits.maxBuffer {
                    return fail("len (\(optionLeft) ) is larger than max len (\(NBDLimits.maxBuffer))", finish)
                }
                if let outcome = beginOption(&out, directory: directory) { return finish(outcome) }

            case .dropping(let remaining, let type, let message):
                let n = Int(min(UInt32(input.count - pos), remaining))
                pos += n
                if UInt32(n) < remaining {
                    phase = .dropping(remaining: remaining - UInt32(n), replyType: type, message: message)
                    return finish(.needMoreInput)
                }
                out.optionReply(option: option, type: type, payload: message)
                phase = .optionHeader

            case .exportName(let length):
                guard let b = take(length, input, &pos) else { return finish(.needMoreInput) }
                optionLeft = 0
                // QEMU reads the name as a C string: it ends at the first NUL.
                let name = Array(b.prefix { $0 != 0 })
                guard let export = directory.attachExport(named: name) else {
                    return fail("export not found", finish)
                }
                let session = NBDSession(export: export, mode: mode, meta: meta)
                out.u64(export.size)
                out.u16(session.transmissionFlags.rawValue)
                if !noZeroes { out.zeroes(124) }
                phase = .done
                return finish(.transmission(session))

            case .info(let step):
                switch advanceInfo(step, input, &pos, &out, directory: &directory) {
                case .needMore: return finish(.needMoreInput)
                case .proceed: break
                case .session(let s): return finish(.transmission(s))
                }

            case .meta(let step):
                if !advanceMeta(step, input, &pos, &out, directory: directory) { return finish(.needMoreInput) }
            }
        }
    }

    /// Ends negotiation with QEMU's "option negotiation failed: ..." text.
    private mutating func fail(_ why: String, _ finish: (Outcome) -> Step) -> Step {
        phase = .done
        return finish(.close(reason: "option negotiation failed: " + why))
    }

    /// Dispatches a freshly read option header. Returns a terminal outcome
    /// or nil to keep going.
    private mutating func beginOption<D: NBDExportDirectory>(_ out: inout NBDByteWriter, directory: D) -> Outcome? {
        let name = NBDOption.name(option)
        if !fixedNewstyle {
            if option == NBDOption.exportName { return beginExportName() }
            phase = .done
            return .close(reason: "option negotiation failed: Unsupported option \(option) (\(name))")
        }
        switch option {
        case NBDOption.list:
            if optionLeft != 0 { rejectLength(); return nil }
            for e in directory.listExports() {
                var p = NBDByteWriter()
                let n = Array(e.name.utf8)
                p.u32(UInt32(n.count))
                p.append(n)
                p.append((e.description ?? "").utf8)
                out.optionReply(option: option, type: NBDOptionReply.server, payload: p.bytes)
            }
            out.optionReply(option: option, type: NBDOptionReply.ack)
        case NBDOption.abort:
            out.optionReply(option: option, type: NBDOptionReply.ack)
            phase = .done
            return .close(reason: nil)
        case NBDOption.exportName:
            return beginExportName()
        case NBDOption.info, NBDOption.go:
            if reserve(4) { phase = .info(.nameLength) }
        case NBDOption.startTLS:
            if optionLeft != 0 { rejectLength(); return nil }
            out.optionReply(option: option, type: NBDOptionReply.errPolicy, payload: Array("TLS not configured".utf8))
        case NBDOption.structuredReply:
            if optionLeft != 0 { rejectLength(); return nil }
            if mode == .structured {
                out.optionReply(option: option, type: NBDOptionReply.errInvalid,
                                payload: Array("structured reply already negotiated".utf8))
            } else {
                out.optionReply(option: option, type: NBDOptionReply.ack)
                mode = .structured
            }
        case NBDOption.listMetaContext, NBDOption.setMetaContext:
            if option == NBDOption.setMetaContext && mode != .structured {
                invalid("request option '\(name)' when structured reply is not negotiated")
                return nil
            }
            if option == NBDOption.setMetaContext { meta = NBDMetaSelection() }
            if reserve(4) { phase = .meta(.nameLength) }
        default:
            drop(NBDOptionReply.errUnsupported, Array("Unsupported option \(option) (\(name))".utf8))
        }
        return nil
    }

    private mutating func beginExportName() -> Outcome? {
        if optionLeft > NBDLimits.maxString {
            phase = .done
            return .close(reason: "option negotiation failed: Bad length received")
        }
        phase = .exportName(length: Int(optionLeft))
        return nil
    }

    // MARK: QEMU's option payload helpers (nbd_opt_read / nbd_opt_drop / ...)

    /// Discards the rest of the option, then sends `type` with `message`.
    mutating func drop(_ type: UInt32, _ message: [UInt8]) {
        phase = .dropping(remaining: optionLeft, replyType: type, message: message)
        optionLeft = 0
    }

    /// `nbd_opt_invalid`: drop, then NBD_REP_ERR_INVALID.
    mutating func invalid(_ message: String) {
        drop(NBDOptionReply.errInvalid, Array(message.utf8))
    }

    /// `nbd_reject_length` (non-fatal form).
    mutating func rejectLength() {
        invalid("option '\(NBDOption.name(option))' has unexpected length")
    }

    /// `nbd_opt_read`'s length check: claims `n` payload bytes, or starts
    /// the "Inconsistent lengths" error and returns false.
    mutating func reserve(_ n: Int) -> Bool {
        if UInt32(clamping: n) > optionLeft {
            invalid("Inconsistent lengths in option \(NBDOption.name(option))")
            return false
        }
        optionLeft -= UInt32(n)
        return true
    }

    /// Accumulates exactly `n` bytes (possibly across calls).
    mutating func take(_ n: Int, _ input: UnsafeRawBufferPointer, _ pos: inout Int) -> [UInt8]? {
        let want = n - field.count
        let k = min(want, input.count - pos)
        if k > 0 {
            field.append(contentsOf: UnsafeRawBufferPointer(rebasing: input[pos..<(pos + k)]))
            pos += k
        }
        guard field.count == n else { return nil }
        defer { field.removeAll(keepingCapacity: true) }
        return field
    }
}

@inline(__always) func be16(_ b: [UInt8], _ at: Int = 0) -> UInt16 { UInt16(b[at]) << 8 | UInt16(b[at + 1]) }
@inline(__always) func be32(_ b: [UInt8], _ at: Int = 0) -> UInt32 {
    UInt32(b[at]) << 24 | UInt32(b[at + 1]) << 16 | UInt32(b[at + 2]) << 8 | UInt32(b[at + 3])
}
@inline(__always) func be64(_ b: [UInt8], _ at: Int = 0) -> UInt64 { UInt64(be32(b, at)) << 32 | UInt64(be32(b, at + 4)) }
