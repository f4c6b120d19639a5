import BlockCore
import BlockGraph
import Qcow2

/// How to open a format driver over an existing file node (the subset of
/// QEMU's format options Lamina's drivers take).
public struct FormatOpenOptions: Sendable {
    public var readOnly = true
    /// cache.no-flush: never flush the file.
    public var noFlush = false
    /// Opened for `check`: a corrupt image may be opened (writable, for
    /// repair).
    public var checkMode = false
    /// Metadata only: no guest I/O will follow (qemu-img info).
    public var noIO = false
    /// qcow2's l2-cache-size in bytes (nil: the driver's default).
    public var l2CacheBytes: Int?
    public init() {}

    var qcow2: Qcow2OpenOptions {
        var o = Qcow2OpenOptions()
        o.readOnly = readOnly
        o.noFlush = noFlush
        o.checkMode = checkMode
        o.noIO = noIO
        o.l2CacheBytes = l2CacheBytes
        return o
    }
}

/// The format drivers by name (QEMU's bdrv_find_format and the format
/// half of bdrv_open): the one place that turns a format name into a
/// driver over a file node.
public enum FormatDrivers {
    /// Opens format `format` ("qcow2") on `file`, which the new driver
    /// uses through its "file" edge. The backing file is not opened: a
    /// driver with one adopts `BackingDriver` and names it. On error the
    /// caller still holds `file` and closes it.
    public static func open(_ format: String, file: BlockNode,
                            options: FormatOpenOptions) async throws(BlockError) -> any BlockDriver {
        switch format {
        case "qcow2":
            return try await Qcow2Image.open(file: file, options: options.qcow2)
        default:
            throw BlockError.invalid("Unknown driver '\(format)'")
        }
    }
}
