/// NBD_OPT_INFO / NBD_OPT_GO and NBD_OPT_{LIST,SET}_META_CONTEXT, parsed a
/// field at a time the way QEMU's `nbd_negotiate_handle_info` and
/// `nbd_negotiate_meta_queries` read them.
extension NBDHandshake {
    enum InfoProgress {
        case needMore
        case proceed
        case session(NBDSession)
    }

    /// `nbd_opt_read_name`'s checks on a name length just read. Returns
    /// false when the option was turned into an error drop.
    private mutating func claimName(_ length: UInt32) -> Bool {
        if length > NBDLimits.maxString {
            invalid("Invalid name length: \(length)")
            return false
        }
        return reserve(Int(length))
    }

    /// Embedded NUL check of `nbd_opt_read(..., check_nul = true)`.
    private mutating func rejectNUL(_ bytes: [UInt8]) -> Bool {
        if bytes.contains(0) {
            invalid("Unexpected embedded NUL in option \(NBDOption.name(option))")
            return true
        }
        return false
    }

    mutating func advanceInfo<D: NBDExportDirectory>(_ step: InfoStep, _ input: UnsafeRawBufferPointer, _ pos: inout Int,
                                                    _ out: inout NBDByteWriter, directory: inout D) -> InfoProgress {
        switch step {
        case .nameLength:
            guard let b = take(4, input, &pos) else { return .needMore }
            let length = be32(b)
            if claimName(length) { phase = .info(.name(length: Int(length))) }
        case .name(let length):
            guard let name = take(length, input, &pos) else { return .needMore }
            if rejectNUL(name) { return .proceed }
            if reserve(2) { phase = .info(.requestCount(name: name)) }
        case .requestCount(let name):
            guard let b = take(2, input, &pos) else { return .needMore }
            let count = Int(be16(b))
            if count == 0 { return finishInfo(name: name, sendName: false, blockSize: false, &out, directory: &directory) }
            if reserve(2) { phase = .info(.requests(name: name, left: count, sendName: false, blockSize: false)) }
        case .requests(let name, let left, var sendName, var blockSize):
            guard let b = take(2, input, &pos) else { return .needMore }
            switch be16(b) {
            case NBDInfo.name: sendName = true
            case NBDInfo.blockSize: blockSize = true
            default: break
            }
            if left == 1 { return finishInfo(name: name, sendName: sendName, blockSize: blockSize, &out, directory: &directory) }
            if reserve(2) { phase = .info(.requests(name: name, left: left - 1, sendName: sendName, blockSize: blockSize)) }
        }
        return .proceed
    }

    private mutating func finishInfo<D: NBDExportDirectory>(name: [UInt8], sendName: Bool, blockSize: Bool,
                                                           _ out: inout NBDByteWriter, directory: inout D) -> InfoProgress {
        if optionLeft != 0 {
            rejectLength()
            return .proceed
        }
        phase = .optionHeader
        let isGo = option == NBDOption.go
        guard let export = isGo ? directory.attachExport(named: name) : directory.lookupExport(named: name) else {
            out.optionReply(option: option, type: NBDOptionReply.errUnknown,
                            payload: Array("export '".utf8) + sanitized(name) + Array("' not present".utf8))
            return .proceed
        }
        func info(_ type: UInt16, _ body: (inout NBDByteWriter) -> Void) {
            var p = NBDByteWriter()
            p.u16(type)
            body(&p)
            out.optionReply(option: option, type: NBDOptionReply.info, payload: p.bytes)
        }
        if sendName { info(NBDInfo.name) { $0.append(name) } }
        if let d = export.description { info(NBDInfo.description) { $0.append(d.utf8) } }
        let minimum = (!isGo || blockSize) ? export.requestAlignment : 1
        info(NBDInfo.blockSize) {
            $0.u32(minimum)
            $0.u32(max(4096, minimum))
            $0.u32(min(export.maximumBlockSize, NBDLimits.maxBuffer))
        }
        let session = NBDSession(export: export, mode: mode, meta: meta)
        info(NBDInfo.export) {
            $0.u64(export.size)
            $0.u16(session.transmissionFlags.rawValue)
        }
        if !isGo && !blockSize && export.requestAlignment > 1 {
            out.optionReply(option: option, type: NBDOptionReply.errBlockSizeRequired,
                            payload: Array("request NBD_INFO_BLOCK_SIZE to use this export".utf8))
            return .proceed
        }
        out.optionReply(option: option, type: NBDOptionReply.ack)
        if isGo {
            phase = .done
            return .session(session)
        }
        return .proceed
    }

    /// Returns false when more input is needed.
    mutating func advanceMeta<D: NBDExportDirectory>(_ step: MetaStep, _ input: UnsafeRawBufferPointer, _ pos: inout Int,
                                                    _ out: inout NBDByteWriter, directory: D) -> Bool {
        let isList = option == NBDOption.listMetaContext
        switch step {
        case .nameLength:
            guard let b = take(4, input, &pos) else { return false }
            let length = be32(b)
            if claimName(length) { phase = .meta(.name(length: Int(length))) }
        case .name(let length):
            guard let name = take(length, input, &pos) else { return false }
            if rejectNUL(name) { return true }
            guard let export = directory.lookupExport(named: name) else {
                drop(NBDOptionReply.errUnknown, Array("export '".utf8) + sanitized(name) + Array("' not present".utf8))
                return true
            }
            if reserve(4) { phase = .meta(.queryCount(export)) }
        case .queryCount(let export):
            guard let b = take(4, input, &pos) else { return false }
            let count = be32(b)
            var selection = NBDMetaSelection(exportID: export.id, bitmapCount: export.bitmaps.count)
            if count == 0 {
                if isList {
                    selection.baseAllocation = true
                    selection.allocationDepth = export.allocationDepth
                    for i in selection.bitmaps.indices { selection.bitmaps[i] = true }
                }
                finishMeta(export, selection, &out)
            } else if reserve(4) {
                phase = .meta(.queryLength(export, left: count, selection))
            }
        case .queryLength(let export, let left, let selection):
            guard let b = take(4, input, &pos) else { return false }
            let length = be32(b)
            if length > NBDLimits.maxString {
                // nbd_opt_skip: too long to be a context we know; ignore it.
                if reserve(Int(length)) { phase = .meta(.skipQuery(export, left: left, selection, remaining: length)) }
            } else if reserve(Int(length)) {
                phase = .meta(.query(export, left: left, selection, length: Int(length)))
            }
        case .query(let export, let left, var selection, let length):
            guard let query = take(length, input, &pos) else { return false }
            if rejectNUL(query) { return true }
            Self.match(query, export: export, list: isList, into: &selection)
            nextQuery(export, left: left, selection, &out)
        case .skipQuery(let export, let left, let selection, let remaining):
            let n = Int(min(UInt32(input.count - pos), remaining))
            pos += n
            if UInt32(n) < remaining {
                phase = .meta(.skipQuery(export, left: left, selection, remaining: remaining - UInt32(n)))
                return false
            }
            nextQuery(export, left: left, selection, &out)
        }
        return true
    }

    private mutating func nextQuery(_ export: NBDExportInfo, left: UInt32, _ selection: NBDMetaSelection,
                                    _ out: inout NBDByteWriter) {
        if left == 1 {
            finishMeta(export, selection, &out)
        } else if reserve(4) {
            phase = .meta(.queryLength(export, left: left - 1, selection))
        }
    }

    /// Replies with the selected contexts and ACK. Like QEMU, unread option
    /// bytes are not consumed: they are read as the next option header.
    private mutating func finishMeta(_ export: NBDExportInfo, _ selection: NBDMetaSelection, _ out: inout NBDByteWriter) {
        let isList = option == NBDOption.listMetaContext
        for (id, name) in selection.contexts(of: export) {
            var p = NBDByteWriter()
            p.u32(isList ? 0 : id)
            p.append(name.utf8)
            out.optionReply(option: option, type: NBDOptionReply.metaContext, payload: p.bytes)
        }
        out.optionReply(option: option, type: NBDOptionReply.ack)
        if !isList { meta = selection }
        optionLeft = 0
        phase = .optionHeader
    }

    /// QEMU's query grammar: `base:` and `qemu:` namespaces; an empty
    /// leaf matches everything only for LIST.
    static func match(_ query: [UInt8], export: NBDExportInfo, list: Bool, into s: inout NBDMetaSelection) {
        let base = Array("base:".utf8), qemu = Array("qemu:".utf8), bitmap = Array("dirty-bitmap:".utf8)
        if query.starts(with: base) {
            let rest = query.dropFirst(base.count)
            if rest.isEmpty ? list : rest.elementsEqual("allocation".utf8) { s.baseAllocation = true }
            return
        }
        guard query.starts(with: qemu) else { return }
        let rest = query.dropFirst(qemu.count)
        if rest.isEmpty {
            if list {
                s.allocationDepth = export.allocationDepth
                for i in s.bitmaps.indices { s.bitmaps[i] = true }
            }
        } else if rest.elementsEqual("allocation-depth".utf8) {
            s.allocationDepth = export.allocationDepth
        } else if rest.starts(with: bitmap) {
            let leaf = rest.dropFirst(bitmap.count)
            if leaf.isEmpty {
                if list { for i in s.bitmaps.indices { s.bitmaps[i] = true } }
            } else if let i = export.bitmaps.firstIndex(where: { $0.utf8.elementsEqual(leaf) }) {
                s.bitmaps[i] = true
            }
        }
    }
}

/// `nbd_sanitize_name`: names of 80 bytes or more are cut to 80 plus "...".
func sanitized(_ name: [UInt8]) -> [UInt8] {
    name.count < 80 ? name : Array(name.prefix(80)) + Array("...".utf8)
}
