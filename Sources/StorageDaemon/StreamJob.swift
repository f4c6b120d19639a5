#if canImport(Glibc)
import Glibc
#endif
import BlockCore
import BlockGraph
import BlockIO
import BlockJobs
import FileDriver
import Qcow2

/// block-stream (QEMU's block/stream.c): copies into `top` whatever the
/// layers between it and `base` hold and `top` does not, then makes `base`
/// the backing file of `top`. Guest writes to `top` go on meanwhile: the
/// copy only fills clusters still unallocated in `top`, atomically.
final class StreamJobDriver: BlockJobDriver {
    let top: BlockNode
    /// The new backing node (nil: flatten the whole chain).
    let base: BlockNode?
    let backingFile: String?
    /// `top` was read-only and reopened read-write for the job.
    let reopened: Bool
    let daemon: Daemon

    static let chunk: Int64 = 512 * 1024

    init(top: BlockNode, base: BlockNode?, backingFile: String?, reopened: Bool, daemon: Daemon) {
        self.top = top
        self.base = base
        self.backingFile = backingFile
        self.reopened = reopened
        self.daemon = daemon
    }

    var type: JobType { .stream }

    func body(_ job: Job) async throws(BlockError) {
        guard let below = top.backing, below !== base else { return }
        let len = top.length
        let cs = Int64((top.driver as? Qcow2Image)?.clusterSize ?? 65536)
        let buffer = AlignedBuffer(count: Int(Self.chunk + 2 * cs))
        try await job.copyLoop(length: len, chunk: Self.chunk, target: top) { (offset, n0) in
            var n = n0
            var copy = false
            do throws(BlockError) {
                let st = try await top.blockStatus(at: offset, length: n)
                n = st.length
                if !st.flags.contains(.allocated) {
                    let (allocated, m) = try await below.isAllocatedAbove(base: base, at: offset, length: n)
                    n = m > 0 ? m : len - offset
                    copy = allocated
                }
            } catch {
                return CopyStep(length: n, copied: false, failure: (error, true))
            }
            guard copy else { return CopyStep(length: n, copied: false, failure: nil) }
            // Whole clusters of `top`, read from its backing chain.
            let start = alignDown(offset, cs)
            let end = min(alignUp(offset + n, cs), len)
            let view = buffer.slice(0, Int(end - start))
            do throws(BlockError) {
                try await below.read(at: start, into: view)
            } catch {
                return CopyStep(length: n, copied: true, failure: (error, true))
            }
            do throws(BlockError) {
                try await top.write(at: start, from: UnsafeRawBufferPointer(view), flags: [.copyOnRead])
            } catch {
                return CopyStep(length: n, copied: true, failure: (error, false))
            }
            return CopyStep(length: n, copied: true, failure: nil)
        }
    }

    @ControlActor func prepare(_ job: Job) async throws(BlockError) {
        // The copied data is durable before the header stops pointing at
        // the layers it came from.
        try await top.flush()
        try await daemon.replaceBacking(of: top, with: base, backingFile: backingFile)
    }

    @ControlActor func clean(_ job: Job) async {
        if reopened {
            await daemon.reopenReadOnlyWithFile(top)
        }
        daemon.graph.refreshAll()
    }
}

extension Daemon {
    /// block-stream: QEMU 7.2's checks in its order, then the job.
    func blockStream(_ a: StreamArgs) async throws(BlockError) {
        if a.base != nil && a.baseNode != nil {
            throw BlockError.invalid("'base' and 'base-node' cannot be specified at the same time")
        }
        if a.base != nil && a.bottom != nil {
            throw BlockError.invalid("'base' and 'bottom' cannot be specified at the same time")
        }
        if a.bottom != nil && a.baseNode != nil {
            throw BlockError.invalid("'bottom' and 'base-node' cannot be specified at the same time")
        }
        guard let bs = graph.find(a.device)?.node else {
            throw BlockError(.notFound, errno: ENOENT, "Cannot find device='\(a.device)' nor node-name='\(a.device)'")
        }
        var base: BlockNode?
        if let name = a.base {
            guard let b = findBackingImage(bs, name) else {
                throw BlockError.invalid("Can't find '\(name)' in the backing chain")
            }
            base = b
        }
        if let name = a.baseNode {
            let b = try lookupNodeName(name)
            if b === bs || !Self.chainContains(bs, b) {
                throw BlockError.invalid("Node '\(name)' is not a backing image of '\(a.device)'")
            }
            base = b
        }
        // QEMU 7.2 checks backing-file against base/base-node only: with
        // `bottom` it is refused as if the whole chain were streamed.
        let namedBase = base
        if let name = a.bottom {
            let b = try lookupNodeName(name)
            if !Self.chainContains(bs, b) {
                throw BlockError.invalid("Node '\(name)' is not in a chain starting from '\(a.device)'")
            }
            base = b.backing
        }
        // Op blockers on the chain from the device down to the base.
        var n: BlockNode? = bs
        var chain: [BlockNode] = []
        while let c = n, c !== base {
            try c.checkOp(.stream)
            chain.append(c)
            n = c.backing
        }
        if namedBase == nil && a.backingFile != nil {
            throw BlockError.invalid("backing file specified, but streaming the entire chain")
        }
        try jobs.checkNewID(a.jobID ?? "")
        if bs.backing != nil && !(bs.driver is Qcow2Image) {
            throw BlockError.unsupported("Lamina streams into qcow2 images only, not '\(bs.formatName)'")
        }
        // Copy-on-read fills whole clusters only; a partly allocated
        // extended-L2 cluster would keep holes that the new chain no
        // longer backs.
        if let img = bs.driver as? Qcow2Image, img.extendedL2, bs.backing != nil {
            throw BlockError.unsupported("Lamina cannot stream into images with extended L2 entries yet")
        }
        let reopened = bs.readOnly
        if reopened {
            try await bs.reopenReadWrite()
            graph.refreshAll()
        }
        let driver = StreamJobDriver(top: bs, base: base, backingFile: a.backingFile, reopened: reopened, daemon: self)
        let job: Job
        do throws(BlockError) {
            job = try await startBlockJob(id: a.jobID, driver: driver, speed: a.speed, onError: a.onError,
                                          autoFinalize: a.autoFinalize, autoDismiss: a.autoDismiss)
            try await addJobNodes(job, "main node", [bs])
            try await addJobNodes(job, "intermediate node", Array(chain.dropFirst()))
        } catch {
            if reopened { await reopenReadOnlyWithFile(bs) }
            throw error
        }
        jobs.start(job)
    }

    /// The end of stream and intermediate commit (QEMU's
    /// bdrv_set_backing_hd + bdrv_change_backing_file, then the dropped
    /// layers released): `overlay`'s backing becomes `base`, in memory and
    /// in its header, with every export drained across the switch. The
    /// caller has made the data the new chain relies on durable.
    func replaceBacking(of overlay: BlockNode, with base: BlockNode?, backingFile: String?) async throws(BlockError) {
        guard let img = overlay.driver as? any BackingDriver else { return }
        let old = overlay.backing
        if old === base { return }
        let name = base.map { backingFile ?? graph.displayFilename($0) }
        // A read-only overlay (a layer below the active one) is reopened
        // read-write for its header update, then read-only again.
        let wasReadOnly = overlay.readOnly
        if wasReadOnly { try await overlay.reopenReadWrite() }
        // The old chain stays open until the header no longer needs it.
        old?.retain()
        do throws(BlockError) {
            try await graph.setBacking(of: overlay, to: base)
            do throws(BlockError) {
                try await img.changeBackingFile(name, format: base?.formatName)
            } catch {
                if let old { try? await graph.setBacking(of: overlay, to: old) }
                throw error
            }
        } catch {
            try? await old?.close()
            if wasReadOnly { await reopenReadOnlyWithFile(overlay) }
            throw error
        }
        try? await old?.close()
        if wasReadOnly { await reopenReadOnlyWithFile(overlay) }
        // QEMU's bdrv_backing_overridden: the header now names `name`; a
        // backing node whose file name differs shows in a json: filename.
        if let rec = graph.entry(overlay), let file = overlay.file {
            if let base, let name, name != graph.displayFilename(base) {
                rec.jsonFilename = graph.jsonFilename(overlay, file: file, backing: graph.fullOptions(base))
            } else {
                rec.jsonFilename = nil
            }
        }
        graph.sweepClosed()
        graph.refreshAll()
    }
}

/// A block job whose failure reads as its errno (stream, commit, mirror):
/// `body` is the work, `run` reports its error as QEMU does.
protocol BlockJobDriver: JobDriver {
    func body(_ job: Job) async throws(BlockError)
}

extension BlockJobDriver {
    func run(_ job: Job) async throws(BlockError) {
        do throws(BlockError) {
            try await body(job)
        } catch {
            throw error.asJobError
        }
    }
}

/// What one step of a copy loop did: how far it got, whether it copied
/// (rate-limited) and the error it met, with whether it was a read.
struct CopyStep {
    var length: Int64
    var copied: Bool
    var failure: (BlockError, Bool)?
}

extension Job {
    /// The loop stream and commit share (QEMU's stream_run / commit_run):
    /// sleep for the rate limit, stop when cancelled, one step per chunk,
    /// the on-error policy for a failed step (stop: pause and retry;
    /// ignore: go on, but fail at the end; report: fail now), progress,
    /// and writeback of `target` kept going while copying.
    func copyLoop(length len: Int64, chunk: Int64, target: BlockNode,
                  _ step: (Int64, Int64) async -> CopyStep) async throws(BlockError) {
        progressSetRemaining(UInt64(len))
        var offset: Int64 = 0
        var delay: UInt64 = 0
        var firstError: BlockError?
        var sinceWriteback: Int64 = 0
        while offset < len {
            await sleep(nanoseconds: delay)
            if cancelRequested { break }
            let r = await step(offset, min(chunk, len - offset))
            if let (error, isRead) = r.failure {
                let action = await errorAction(errno: error.errno != 0 ? error.errno : EIO, isRead: isRead)
                if action == .stop {
                    delay = 0
                    continue
                }
                if firstError == nil { firstError = error }
                if action == .report { break }
            }
            progressUpdate(UInt64(r.length))
            offset += r.length
            delay = r.copied ? rateLimitDelay(UInt64(r.length)) : 0
            if r.copied {
                // The flush at the end then finds little left to write.
                sinceWriteback += r.length
                if sinceWriteback >= 32 << 20 {
                    sinceWriteback = 0
                    await target.startWriteback()
                }
            }
        }
        // An ignored error still fails the job (and keeps the chain).
        if let e = firstError { throw e }
    }
}

extension Daemon {
    /// QEMU's bdrv_reopen_set_read_only(bs, true): the node and, when
    /// nothing else writes there, the file node below it.
    func reopenReadOnlyWithFile(_ node: BlockNode) async {
        try? await node.reopenReadOnly()
        graph.refreshAll()
        if let f = node.file, f !== node, !f.parents.contains(where: { $0.perm.contains(.write) }) {
            try? await f.reopenReadOnly()
        }
    }
}
