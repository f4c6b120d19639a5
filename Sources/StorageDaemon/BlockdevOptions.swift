import BlockCore
import BlockGraph

/// QAPI BlockdevOptions, reduced to the drivers Lamina's daemon opens.
/// Plain data: parsed from QMP arguments or the command line by
/// `BlockdevOptions.parse`, opened by `NodeOpener`.
public struct BlockdevOptions: Sendable {
    public enum Driver: Sendable {
        case file(FileOptions)
        case raw(RawOptions)
        case qcow2(Qcow2Options)
        case nullCo(NullOptions)
        case blkdebug(BlkdebugBlockdevOptions)
        case copyOnRead(CopyOnReadOptions)
    }

    public var nodeName: String?
    /// nil = inherit (children) / default.
    public var discardUnmap: Bool?
    public var cacheDirect: Bool?
    public var cacheNoFlush: Bool?
    public var readOnly: Bool?
    public var autoReadOnly: Bool?
    public var forceShare: Bool?
    public var detectZeroes: DetectZeroes?
    public var driver: Driver

    public init(driver: Driver) { self.driver = driver }

    public var driverName: String {
        switch driver {
        case .file: return "file"
        case .raw: return "raw"
        case .qcow2: return "qcow2"
        case .nullCo: return "null-co"
        case .blkdebug: return "blkdebug"
        case .copyOnRead: return "copy-on-read"
        }
    }
}

/// QAPI BlockdevRef: an existing node's name or options for a new one.
public indirect enum BlockdevRef: Sendable {
    case reference(String)
    case options(BlockdevOptions)
}

public enum OnOffAuto: String, Sendable, CaseIterable { case on, off, auto }

public struct FileOptions: Sendable {
    public var filename: String
    public var locking: OnOffAuto = .auto
    public var aio: String?
    public init(filename: String) { self.filename = filename }
}

public struct RawOptions: Sendable {
    public var file: BlockdevRef
    public var offset: Int64?
    public var size: Int64?
    public init(file: BlockdevRef) { self.file = file }
}

public struct Qcow2Options: Sendable {
    public var file: BlockdevRef
    /// nil: the backing file named in the image header; `.some(nil)`: none.
    public var backing: BlockdevRef??
    public var lazyRefcounts: Bool?
    public var l2CacheSize: Int64?
    public init(file: BlockdevRef) { self.file = file }
}

/// QAPI BlockdevOptionsCor.
public struct CopyOnReadOptions: Sendable {
    public var file: BlockdevRef
    /// The lowest node whose data is copied (a node name).
    public var bottom: String?
    public init(file: BlockdevRef) { self.file = file }
}

public struct NullOptions: Sendable {
    /// nil: not given (defaults 1 GiB, off, 0). Given options show in the
    /// node's filename as QEMU's "json:{...}" pseudo-filename.
    public var size: Int64?
    public var readZeroes: Bool?
    public var latencyNs: Int64?
    public init() {}
}

/// Options a child opened from nested options inherits from its parent
/// when it does not set them (QEMU's bdrv_inherited_options).
struct InheritedOptions: Sendable {
    var readOnly = false
    var autoReadOnly = false
    var cacheDirect = false
    var cacheNoFlush = false
    var discardUnmap = false
    var forceShare = false

    /// What the graph records of them.
    var openOptions: NodeOpenOptions {
        NodeOpenOptions(cacheDirect: cacheDirect, cacheNoFlush: cacheNoFlush, autoReadOnly: autoReadOnly,
                        forceShare: forceShare)
    }

    /// The effective values for `o`, falling back to these.
    func resolved(_ o: BlockdevOptions) -> InheritedOptions {
        InheritedOptions(readOnly: o.readOnly ?? readOnly, autoReadOnly: o.autoReadOnly ?? autoReadOnly,
                         cacheDirect: o.cacheDirect ?? cacheDirect, cacheNoFlush: o.cacheNoFlush ?? cacheNoFlush,
                         discardUnmap: o.discardUnmap ?? discardUnmap, forceShare: o.forceShare ?? forceShare)
    }
}
