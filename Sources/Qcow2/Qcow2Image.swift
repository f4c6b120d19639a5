import BlockCore
import BlockGraph
import Synchronization

public struct Qcow2OpenOptions: Sendable {
    public var readOnly = true
    /// cache.no-flush / cache=unsafe: never fdatasync.
    public var noFlush = false
    /// Opened by `check`: a corrupt image may be opened writable (for repair)
    /// and the snapshot table is not validated.
    public var checkMode = false
    /// Repair a dirty image on read-write open (QEMU does).
    public var repairDirty = true
    /// L2 cache size in bytes (default: enough to map the whole image, up to 32 MiB).
    public var l2CacheBytes: Int?
    /// Metadata only (qemu-img info): no guest I/O will follow, so an
    /// encrypted image may be opened without its key.
    public var noIO = false
    public init() {}
}

/// One in-flight allocating write (QEMU's QCowL2Meta on `cluster_allocs`):
/// other writes to these guest clusters wait until it is linked into L2.
struct InflightAllocation {
    var firstCluster: Int64
    var endCluster: Int64
    var done: AsyncEvent
}

/// A host range to be released once no I/O planned before it remains.
struct PendingFree {
    var offset: Int64
    var length: Int64
    var epoch: UInt64
}

/// The qcow2 format driver (QEMU block/qcow2*.c), split by concern across
/// the `Qcow2Image+*.swift` files.
///
/// Concurrency: all metadata (header, L1, refcount table, caches, allocator
/// state) is guarded by `lock`, an `AsyncLock` that may be held across
/// metadata I/O. Guest data I/O is planned under the lock and performed
/// outside it. Writes to a guest cluster being allocated wait for that
/// allocation (`inflight`); host clusters freed by discard or COW are
/// reused only after every request planned before the free has finished
/// (`ioGate`).
///
/// Metadata is written through (no dirty cache) in an order that keeps the
/// image consistent at every instant: refcount increments before the L2/L1
/// entries that reference the cluster, L2 updates before the refcount
/// decrements that free a cluster. That makes any `kill -9` leave at worst
/// leaked clusters. For power loss, allocations come from a reserve whose
/// refcounts were made durable (fdatasync) before use, and frees are
/// applied only after a flush made the new references durable.
public final class Qcow2Image: BackingDriver, @unchecked Sendable {
    /// The edge to the image file (data and metadata).
    public let fileChild: BlockChild
    public var file: BlockNode { fileChild.node }
    public let options: Qcow2OpenOptions
    /// Fixed for the life of the image, except that `amend` (with the
    /// image otherwise idle, under `lock`) changes version and refcount order.
    var geo: Qcow2Geometry
    let lock = AsyncLock()
    let ioGate = IOGate()

    // MARK: State guarded by `lock`
    var header: Qcow2Header
    var l1: [UInt64]
    var refTable: [UInt64]
    let l2Cache: MetadataCache
    let refCache: MetadataCache
    var inflight: [InflightAllocation] = []
    var pendingFrees: [PendingFree] = []
    /// Clusters [reserveStart, reserveStart+reserveCount) have refcount 1 and no user yet.
    var reserveStart: Int64 = 0
    var reserveCount: Int64 = 0
    /// Lowest cluster index that may be free.
    var freeClusterHint: Int64 = 0
    /// Next free byte in the cluster used for compressed data (0 = none).
    var compressedFreeByte: Int64 = 0
    var markedDirty = false
    var bitmapsMarkedInUse = false
    /// Persistent dirty bitmaps (Qcow2Image+BitmapStore.swift).
    var bitmapStore = BitmapStoreState()
    /// Refcount increments written since the last barrier.
    var refcountsNeedSync = false
    var reserveRefills = 0
    var freedBelowReserve = false
    var releaseReservePending = false
    var corruptionSignalled = false
    var metadataPreallocation: Bool?
    var snapshots: [Qcow2Snapshot] = []
    var snapshotTableBytes = 0
    var closed = false
    /// Cluster indices holding metadata, for the overlap guard (built lazily).
    var metadataClusters: Set<Int64>?

    // MARK: Lock-free state
    private let sizeBox: Atomic<Int64>
    private let writableBox: Atomic<Bool>
    private let backingBox = Mutex<BlockChild?>(nil)
    /// The node wrapping the image, and the enabled persistent bitmaps
    /// handed to its generic layer (which marks them on every write).
    private struct NodeLink {
        weak var node: BlockNode?
        var published: [DirtyBitmap] = []
    }
    private let nodeLink = Mutex(NodeLink())
    /// What `persistentBitmapsNow()` answers (kept by updateTrackedBitmaps).
    let bitmapCatalog = Mutex<[(PersistentBitmapInfo, DirtyBitmap?)]>([])

    public var formatName: String { "qcow2" }
    public var supportedWriteFlags: WriteFlags { [.compressed] }

    /// The node exists: the enabled persistent bitmaps loaded at open are
    /// marked by its generic layer from now on.
    public func attached(to node: BlockNode) {
        let published = nodeLink.withLock { l -> [DirtyBitmap] in
            l.node = node
            return l.published
        }
        for b in published { node.addDirtyBitmap(b) }
    }

    /// Replaces the bitmaps the node marks for this image.
    func publishTrackedBitmaps(_ active: [DirtyBitmap]) {
        let (node, old) = nodeLink.withLock { l -> (BlockNode?, [DirtyBitmap]) in
            let o = l.published
            l.published = active
            return (l.node, o)
        }
        guard let node else { return }
        for b in old where !active.contains(where: { $0 === b }) { node.removeDirtyBitmap(b) }
        for b in active where !old.contains(where: { $0 === b }) { node.addDirtyBitmap(b) }
    }
    public var length: Int64 { sizeBox.load(ordering: .relaxed) }
    public var children: [BlockChild] {
        if let b = backingBox.withLock({ $0 }) { return [fileChild, b] }
        return [fileChild]
    }

    public var backing: BlockNode? { backingBox.withLock { $0?.node } }

    /// Installs the backing edge (`BlockNode.setBacking`). The caller makes
    /// sure no request is in flight (drained section).
    public func setBackingChild(_ child: BlockChild?) {
        backingBox.withLock { $0 = child }
    }

    /// The header as last written (a copy; for info and tools).
    public func currentHeader() async -> Qcow2Header {
        await lock.withLock { header }
    }

    public var clusterSize: Int { geo.clusterSize }
    public var extendedL2: Bool { geo.extendedL2 }
    public var version: Int { geo.version }

    private init(file: BlockNode, header: Qcow2Header, l1: [UInt64], refTable: [UInt64], options: Qcow2OpenOptions) {
        self.fileChild = BlockChild(name: "file", role: .image, node: file)
        self.header = header
        self.options = options
        self.geo = Qcow2Geometry(header: header)
        self.l1 = l1
        self.refTable = refTable
        self.sizeBox = Atomic(Int64(header.size))
        self.writableBox = Atomic(!options.readOnly)
        let cs = 1 << Int(header.clusterBits)
        // Default L2 cache: whole image mapped, at most 32 MiB (QEMU's rule on Linux).
        let entriesPerTable = Int64(cs / (header.extendedL2 ? 16 : 8))
        let tablesForImage = divRoundUp(Int64(header.size), Int64(cs) * entriesPerTable)
        let bytes = options.l2CacheBytes ?? Int(min(max(tablesForImage, 4) * Int64(cs), 32 << 20))
        self.l2Cache = MetadataCache(tableSize: cs, capacity: max(4, bytes / cs))
        self.refCache = MetadataCache(tableSize: cs, capacity: max(4, min(4 << 20, max(bytes / 4, 256 << 10)) / cs))
    }

    // MARK: - Open

    /// Opens a qcow2 image on `file`. The backing file is not opened here:
    /// the caller reads `backingFileName`/`backingFormat` and attaches it.
    public static func open(file: BlockNode, options: Qcow2OpenOptions) async throws(BlockError) -> Qcow2Image {
        let fileSize = file.length
        // Read the header the way QEMU does: missing bytes read as zeroes.
        var probe = [UInt8](repeating: 0, count: 512)
        try await readBytes(file, &probe, 0)
        if probe.be32(0) != Qcow2.magic { throw BlockError.invalid("Image is not in qcow2 format") }
        let clusterBits = probe.be32(20)
        var first = probe
        if clusterBits >= 9 && clusterBits <= 21 {
            first = [UInt8](repeating: 0, count: 1 << Int(clusterBits))
            try await readBytes(file, &first, 0)
        }
        let header = try Qcow2Header.parse(first)
        try validate(header, fileSize: fileSize, options: options)

        let g = Qcow2Geometry(header: header)
        // L1 table
        var l1 = [UInt64](repeating: 0, count: Int(header.l1Size))
        if header.l1Size > 0 {
            try await readTable(file, Int64(header.l1TableOffset), &l1, what: "L1 table")
        }
        // Refcount table
        let rtEntries = Int(header.refcountTableClusters) * g.clusterSize / 8
        var rt = [UInt64](repeating: 0, count: rtEntries)
        if rtEntries > 0 {
            file.debugEvent(.reftableLoad)
            try await readTable(file, Int64(header.refcountTableOffset), &rt, what: "refcount table")
        }
        let img = Qcow2Image(file: file, header: header, l1: l1, refTable: rt, options: options)
        if !options.checkMode {
            img.snapshots = try await img.readSnapshotTable()
        }
        try await img.lock.withLock { () async throws(BlockError) in
            try await img.loadBitmapsAtOpen()
        }
        if !options.readOnly {
            try await img.openForWriting()
        }
        return img
    }

    static func readBytes(_ file: BlockNode, _ bytes: inout [UInt8], _ offset: Int64) async throws(BlockError) {
        let n = bytes.count
        let buf = AlignedBuffer(count: n)
        let avail = max(0, min(Int64(n), file.length - offset))
        if avail > 0 {
            try await file.read(at: offset, into: buf.slice(0, Int(avail)))
        }
        if Int(avail) < n { buf.slice(Int(avail), n - Int(avail)).zeroFill() }
        bytes = Array(UnsafeRawBufferPointer(buf.bytes))
    }

    static func readTable(_ file: BlockNode, _ offset: Int64, _ table: inout [UInt64], what: String) async throws(BlockError) {
        let bytes = table.count * 8
        let buf = AlignedBuffer(count: bytes)
        let avail = max(0, min(Int64(bytes), file.length - offset))
        if avail > 0 {
            do throws(BlockError) {
                try await file.read(at: offset, into: buf.slice(0, Int(avail)))
            } catch {
                throw error.prefixed("Could not read \(what): ")
            }
        }
        if Int(avail) < bytes { buf.slice(Int(avail), bytes - Int(avail)).zeroFill() }
        for i in 0..<table.count { table[i] = buf.be64(i) }
    }

    /// QEMU's open-time checks, with its messages.
    static func validate(_ h: Qcow2Header, fileSize: Int64, options: Qcow2OpenOptions) throws(BlockError) {
        let cs = Int64(h.clusterSize)
        // Compression type
        if h.compressionType > 1 {
            throw BlockError(.notSupported, errno: 95, "qcow2: unknown compression type: \(h.compressionType)")
        }
        if h.compressionType == 0 && h.incompatibleFeatures & Qcow2.incompatCompression != 0 {
            throw BlockError.invalid("qcow2: Compression type incompatible feature bit must not be set")
        }
        if h.compressionType != 0 && h.incompatibleFeatures & Qcow2.incompatCompression == 0 {
            throw BlockError.invalid("qcow2: Compression type incompatible feature bit must be set")
        }
        let unsupported = h.incompatibleFeatures & ~Qcow2.incompatSupported
        if unsupported != 0 {
            throw BlockError(.unsupportedFeature, errno: 95,
                             "Unsupported qcow2 feature(s): " + h.describeIncompatible(unsupported))
        }
        if h.isCorrupt && !options.readOnly && !options.checkMode {
            throw BlockError(.permissionDenied, errno: 13, "qcow2: Image is corrupt; cannot be opened read/write")
        }
        if h.refcountOrder > 6 {
            throw BlockError.invalid("Reference count entry width too large; may not exceed 64 bits")
        }
        if h.cryptMethod > 2 {
            throw BlockError(.notSupported, errno: 95, "Unsupported encryption method \(h.cryptMethod)")
        }
        if h.cryptMethod != 0 && !options.noIO {
            throw BlockError.invalid("Parameter 'encrypt.key-secret' is required for cipher")
        }
        if h.refcountTableClusters == 0 && !options.checkMode {
            throw BlockError.invalid("Image does not contain a reference count table")
        }
        try validateTable(offset: h.refcountTableOffset, entries: UInt64(h.refcountTableClusters), entryLength: UInt64(cs),
                          maxBytes: UInt64(Qcow2.maxRefTableBytes), name: "Reference count table", cs: cs)
        if !options.checkMode {
            try validateTable(offset: h.snapshotsOffset, entries: UInt64(h.nbSnapshots), entryLength: UInt64(Qcow2.snapshotHeaderSize),
                              maxBytes: UInt64(Qcow2.snapshotHeaderSize * Qcow2.maxSnapshots), name: "Snapshot table", cs: cs)
        }
        try validateTable(offset: h.l1TableOffset, entries: UInt64(h.l1Size), entryLength: 8,
                          maxBytes: UInt64(Qcow2.maxL1Bytes), name: "Active L1 table", cs: cs)
        let g = Qcow2Geometry(header: h)
        let needed = g.l1EntriesFor(size: Int64(clamping: h.size))
        if needed > Int64(Int32.max) {
            throw BlockError(.invalidArgument, errno: 27, "Image is too big")
        }
        if Int64(h.l1Size) < needed {
            throw BlockError.invalid("L1 table is too small")
        }
        if h.incompatibleFeatures & Qcow2.incompatDataFile != 0 {
            throw BlockError(.notSupported, errno: 95, "'data-file' is required for this image")
        }
    }

    static func validateTable(offset: UInt64, entries: UInt64, entryLength: UInt64, maxBytes: UInt64,
                              name: String, cs: Int64) throws(BlockError) {
        if entries > maxBytes / entryLength {
            throw BlockError.invalid("\(name) too large")
        }
        let size = entries * entryLength
        if UInt64(Int64.max) - size < offset || offset % UInt64(cs) != 0 {
            throw BlockError.invalid("\(name) offset invalid")
        }
    }

    /// Read-write open: repair a dirty image, clear unknown autoclear bits.
    private func openForWriting() async throws(BlockError) {
        try await lock.withLock { () async throws(BlockError) in
            if header.isDirty && options.repairDirty && !options.checkMode {
                let result = try await checkLocked(repair: [.leaks, .errors])
                // QEMU's check prints what it finds and repairs (stderr).
                for m in result.messages { FileHandleStderr.write(m + "\n") }
                if result.checkErrors > 0 || result.corruptions > result.corruptionsFixed {
                    throw BlockError.io("Could not repair dirty image: Input/output error", errno: 5)
                }
                // checkLocked cleared the dirty bit after repairing.
            }
            try await dropStaleBitmapsExtensionLocked()
            if header.autoclearFeatures & ~Qcow2.autoclearKnown != 0 && header.version >= 3 {
                header.autoclearFeatures &= Qcow2.autoclearKnown
                try await writeHeaderLocked()
            }
            freeClusterHint = 0
        }
    }

    /// Whether the image accepts writes now (opened read-write, or
    /// reopened so; a reopen read-only clears it).
    var isReadOnly: Bool { !writableBox.load(ordering: .acquiring) }

    /// Reopen read-write (QEMU's qcow2_reopen_prepare to read-write): the
    /// file below becomes writable, then what a read-write open does.
    public func reopenForWriting() async throws(BlockError) {
        if !isReadOnly { return }
        try await file.reopenReadWrite()
        let corrupt = await lock.withLock { header.isCorrupt }
        if corrupt {
            throw BlockError(.permissionDenied, errno: 13, "qcow2: Image is corrupt; cannot be opened read/write")
        }
        try await openForWriting()
        writableBox.store(true, ordering: .releasing)
    }

    /// QEMU's bdrv_change_backing_file: rewrites the backing file name and
    /// format in the header (nil: no backing file). Not flushed: until the
    /// next flush a crash leaves the old name, whose chain the caller keeps
    /// intact (it made the new backing's data durable first).
    public func changeBackingFile(_ name: String?, format: String?) async throws(BlockError) {
        try await lock.withLock { () async throws(BlockError) in
            let old = header
            header.backingFile = name
            header.backingFormat = name == nil ? nil : format
            do throws(BlockError) {
                try await writeHeaderLocked()
            } catch {
                header = old
                throw error
            }
        }
    }

    public var backingFileName: String? { header.backingFile }
    public var backingFormat: String? { header.backingFormat }

    // MARK: - Header

    /// Rewrites the header cluster from `header`. Called with `lock` held.
    func writeHeaderLocked() async throws(BlockError) {
        let bytes = try header.serialize()
        let n = Int(alignUp(Int64(bytes.count), 512))
        let buf = AlignedBuffer(count: min(n, geo.clusterSize), zeroed: true)
        bytes.withUnsafeBytes { buf.bytes.copyMemory(from: $0) }
        try await file.write(at: 0, from: UnsafeRawBufferPointer(buf.bytes))
    }

    /// Writes a few header bytes (through an aligned buffer).
    func writeBytes(_ bytes: [UInt8], at offset: Int64) async throws(BlockError) {
        let buf = AlignedBuffer(count: bytes.count)
        bytes.withUnsafeBytes { buf.bytes.copyMemory(from: $0) }
        try await file.write(at: offset, from: UnsafeRawBufferPointer(buf.bytes))
    }

    /// Writes only the 8-byte incompatible-features field (v3).
    func writeIncompatibleFeaturesLocked() async throws(BlockError) {
        var b = [UInt8](repeating: 0, count: 8)
        b.putBE64(header.incompatibleFeatures, 0)
        try await writeBytes(b, at: 72)
    }

    /// Sets the dirty bit before the first write of a lazy-refcounts image.
    func markDirtyIfNeededLocked() async throws(BlockError) {
        guard header.lazyRefcounts, !header.isDirty, header.version >= 3 else { return }
        try await file.flush()
        header.incompatibleFeatures |= Qcow2.incompatDirty
        try await writeIncompatibleFeaturesLocked()
        try await file.flush()
        markedDirty = true
    }

    /// "Signal corruption": mark the image corrupt (if writable), report
    /// it (`BlockDiagnostics.reportCorruption`, QEMU's
    /// BLOCK_IMAGE_CORRUPTED) and fail.
    func corruption(_ message: String) async -> BlockError {
        if !corruptionSignalled {
            corruptionSignalled = true
            let fatal = !isReadOnly && !header.isCorrupt && header.version >= 3
            defer { BlockDiagnostics.reportCorruption(self, message: message, fatal: fatal) }
            if fatal {
                header.incompatibleFeatures |= Qcow2.incompatCorrupt
                try? await writeIncompatibleFeaturesLocked()
                try? await file.flush()
                let e = "qcow2: Marking image as corrupt: \(message); further corruption events will be suppressed"
                FileHandleStderr.write(e + "\n")
            } else {
                FileHandleStderr.write("qcow2: Image is corrupt: \(message); further non-fatal corruption events will be suppressed\n")
            }
        }
        return BlockError(.corrupt, errno: 5, message)
    }

    func ensureWritableLocked() async throws(BlockError) {
        if header.isCorrupt && !options.checkMode {
            throw BlockError(.corrupt, errno: 5, "qcow2: Image is corrupt; cannot be written to")
        }
        if closed { throw BlockError(.io, errno: 5, "Image is closed") }
        try await markDirtyIfNeededLocked()
        if !bitmapsMarkedInUse { try await markBitmapsInUseLocked() }
    }

    // MARK: - Flush / close

    /// QEMU's flush of a qcow2 node: `flush_to_os` to the file node, the
    /// cached tables written back, `flush_to_disk` (unless cache.no-flush),
    /// then the file flushed.
    public func flush() async throws(BlockError) {
        if isReadOnly { return }
        let file = self.file
        file.debugEvent(.flushToOS)
        try await lock.withLock { () async throws(BlockError) in
            try await writebackL2Locked()
        }
        if !options.noFlush { file.debugEvent(.flushToDisk) }
        try await file.flush()
        try await lock.withLock { () async throws(BlockError) in
            try await applyFreesLocked(durable: true)
        }
    }

    /// A live snapshot's old layer becomes read-only: the cached tables,
    /// the cluster reserve and the dirty bit are settled now, as a clean
    /// close would; afterwards the image is not written again.
    public func settleForReadOnly() async throws(BlockError) {
        if isReadOnly { return }
        await ioGate.waitIdle()
        await lock.lock()
        defer { lock.unlock() }
        if closed || isReadOnly { return }
        try await settleLocked()
        // From now on nothing is written, not even at close.
        writableBox.store(false, ordering: .releasing)
    }

    /// What a clean close writes: cached L2 tables, the unused reserve
    /// returned, deferred frees applied, the dirty bit cleared; durable.
    private func settleLocked() async throws(BlockError) {
        try await storeBitmapsLocked()
        bitmapsMarkedInUse = false
        try await writebackL2Locked()
        try await releaseReserveLocked()
        try await file.flush()
        try await applyFreesLocked(durable: true, force: true)
        try await file.flush()
        if header.isDirty && (markedDirty || header.lazyRefcounts) {
            header.incompatibleFeatures &= ~Qcow2.incompatDirty
            try await writeIncompatibleFeaturesLocked()
            try await file.flush()
        }
    }

    public func close() async throws(BlockError) {
        var firstError: BlockError?
        if !isReadOnly {
            await ioGate.waitIdle()
            await lock.lock()
            do throws(BlockError) {
                if !closed {
                    try await settleLocked()
                }
            } catch {
                firstError = error
            }
            closed = true
            lock.unlock()
        }
        l2Cache.removeAll()
        refCache.removeAll()
        if let b = backing {
            do { try await b.close() } catch { if firstError == nil { firstError = error } }
        }
        do { try await file.close() } catch { if firstError == nil { firstError = error } }
        if let e = firstError { throw e }
    }

    // MARK: - Size

    func setLength(_ v: Int64) { sizeBox.store(v, ordering: .relaxed) }
}

/// Tracks in-flight guest I/O by epoch so freed clusters are reused only
/// when nothing planned before the free can still touch them.
final class IOGate: Sendable {
    private struct State {
        var epoch: UInt64 = 1
        var active: [UInt64: Int] = [:]
        var idleWaiters: [UnsafeContinuation<Void, Never>] = []
    }
    private let state = Mutex(State())

    /// Registers a request planned now; returns its epoch.
    func enter() -> UInt64 {
        state.withLock { s in
            s.active[s.epoch, default: 0] += 1
            return s.epoch
        }
    }

    func leave(_ e: UInt64) {
        let waiters = state.withLock { s -> [UnsafeContinuation<Void, Never>] in
            if let c = s.active[e] {
                if c <= 1 { s.active[e] = nil } else { s.active[e] = c - 1 }
            }
            if s.active.isEmpty {
                let w = s.idleWaiters
                s.idleWaiters = []
                return w
            }
            return []
        }
        for w in waiters { w.resume() }
    }

    /// Closes the current epoch and returns it (frees are tagged with it).
    func advance() -> UInt64 {
        state.withLock { s in
            let e = s.epoch
            s.epoch += 1
            return e
        }
    }

    /// True if no request with epoch <= e is still running.
    func isClear(upTo e: UInt64) -> Bool {
        state.withLock { s in !s.active.keys.contains { $0 <= e } }
    }

    func waitIdle() async {
        if state.withLock({ $0.active.isEmpty }) { return }
        await withUnsafeContinuation { (c: UnsafeContinuation<Void, Never>) in
            let now = state.withLock { s -> Bool in
                if s.active.isEmpty { return true }
                s.idleWaiters.append(c)
                return false
            }
            if now { c.resume() }
        }
    }
}
