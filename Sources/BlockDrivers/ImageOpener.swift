import BlockCore
import BlockGraph
import BlockIO
import FileDriver
import Qcow2
import RawDriver

/// How to open an image (the subset of QEMU's blockdev options and
/// qemu-img flags the tools need).
public struct ImageOpenOptions: Sendable {
    /// "qcow2", "raw", or nil to probe.
    public var format: String?
    public var readOnly = true
    /// cache.direct (O_DIRECT).
    public var cacheDirect = false
    /// cache.no-flush.
    public var noFlush = false
    /// -U: share every permission (no locks refused).
    public var forceShare = false
    /// Do not open the backing chain.
    public var noBacking = false
    /// Opened for `check` (corrupt images may be opened for repair).
    public var checkMode = false
    /// discard=unmap
    public var unmap = false
    /// Take QEMU-compatible image locks.
    public var locking = true
    /// Metadata only: no guest I/O (qemu-img info).
    public var noIO = false
    public init() {}
}

/// Opens images and their backing chains (QEMU's bdrv_open for the file,
/// raw and qcow2 drivers).
public enum ImageOpener {
    /// Probes the format from the first bytes: qcow2 magic with a version of
    /// at least 2 means qcow2, anything else raw.
    public static func probe(_ file: BlockNode) async throws(BlockError) -> String {
        // QEMU's qcow2 probe needs a whole header (104 bytes).
        guard file.length >= 104 else { return "raw" }
        let buf = AlignedBuffer(count: 512)
        try await file.read(at: 0, into: buf.slice(0, Int(min(512, file.length))))
        let p = UnsafeRawPointer(buf.pointer)
        if p.loadBE32(0) == Qcow2.magic && p.loadBE32(4) >= 2 { return "qcow2" }
        if p.loadBE32(0) == Qcow2.magic && p.loadBE32(4) == 1 && file.length >= 48 { return "qcow" }
        return "raw"
    }

    /// Resolves a backing file name the way QEMU 7.2 does: absolute names
    /// and protocol names are used as they are; relative names are taken
    /// relative to the directory of the overlay's file name.
    public static func resolveBackingPath(_ backing: String, overlay: String) -> String {
        if backing.hasPrefix("/") || isProtocolName(backing) { return backing }
        if overlay.hasPrefix("json:") || isProtocolName(overlay) { return backing }
        guard let slash = overlay.lastIndex(of: "/") else { return backing }
        return String(overlay[...slash]) + backing
    }

    static func isProtocolName(_ s: String) -> Bool {
        // "nbd:..." or "nbd+unix://..." style: letters/digits/+ before a colon,
        // and no slash before it.
        guard let colon = s.firstIndex(of: ":") else { return false }
        let prefix = s[..<colon]
        return !prefix.isEmpty && prefix.allSatisfy { $0.isLetter || $0.isNumber || $0 == "+" || $0 == "-" || $0 == "." }
            && !prefix.contains("/")
    }

    public static func open(_ filename: String, _ options: ImageOpenOptions) async throws(BlockError) -> BlockNode {
        var visited: [(UInt64, UInt64)] = []
        return try await openChain(filename, options, depth: 0, visited: &visited)
    }

    static func identity(_ path: String) -> (UInt64, UInt64)? { Sys.identity(path) }

    private static func openChain(_ filename: String, _ options: ImageOpenOptions, depth: Int,
                                  visited: inout [(UInt64, UInt64)]) async throws(BlockError) -> BlockNode {
        if isProtocolName(filename) && !filename.hasPrefix("file:") {
            throw BlockError(.notSupported, errno: 95, "Unknown protocol '\(filename.prefix { $0 != ":" })'")
        }
        let path = filename.hasPrefix("file:") ? String(filename.dropFirst(5)) : filename
        if path.isEmpty {
            throw BlockError.invalid("The 'file' block driver requires a file name")
        }
        if let id = identity(path) {
            if visited.contains(where: { $0 == id }) {
                throw BlockError.invalid("Backing file '\(path)' creates an infinite loop.")
            }
            visited.append(id)
        }
        if depth > 4096 {
            throw BlockError.invalid("Backing chain is too deep")
        }
        let lock: ImageLock?
        if !options.locking {
            lock = nil
        } else if depth > 0 {
            lock = .backing
        } else if options.forceShare {
            lock = .sharedReader
        } else {
            lock = options.readOnly ? .reader : .writer
        }
        let fileNode = try FileDriver.open(path, readOnly: options.readOnly, direct: options.cacheDirect,
                                           noFlush: options.noFlush, unmap: options.unmap, lock: lock)
        let format: String
        if let f = options.format {
            format = f
        } else {
            do throws(BlockError) {
                format = try await probe(fileNode)
            } catch {
                try? await fileNode.close()
                throw error
            }
            if format == "raw" && !options.readOnly {
                FileHandleStderr.write("""
                    WARNING: Image format was not specified for '\(filename)' and probing guessed raw.
                             Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.
                             Specify the 'raw' format explicitly to remove the restrictions.

                    """)
            }
        }
        switch format {
        case "raw":
            let probed = options.format == nil
            return BlockNode(driver: RawDriver(file: fileNode, probed: probed), filename: path, readOnly: options.readOnly)
        case "qcow":
            let e = await QcowV1.validate(fileNode)
            try? await fileNode.close()
            throw e
        case "file":
            return fileNode
        case "qcow2":
            var fo = FormatOpenOptions()
            fo.readOnly = options.readOnly
            fo.noFlush = options.noFlush
            fo.checkMode = options.checkMode
            fo.noIO = options.noIO
            let img: any BlockDriver
            do throws(BlockError) {
                img = try await FormatDrivers.open(format, file: fileNode, options: fo)
            } catch {
                try? await fileNode.close()
                throw error
            }
            let node = BlockNode(driver: img, filename: path, readOnly: options.readOnly)
            if !options.noBacking, let img = img as? any BackingDriver, let b = img.backingFileName, !b.isEmpty {
                let full = resolveBackingPath(b, overlay: path)
                var bo = options
                bo.format = img.backingFormat
                bo.readOnly = true
                bo.cacheDirect = options.cacheDirect
                bo.checkMode = false
                do throws(BlockError) {
                    let bnode = try await openChain(full, bo, depth: depth + 1, visited: &visited)
                    node.setBacking(bnode)
                } catch {
                    try? await node.close()
                    // QEMU prefixes once per level ("Could not open backing
                    // file: Could not open backing file: ..."); the loop
                    // message (Lamina's own) stays as it is.
                    if error.message.contains("creates an infinite loop") {
                        throw error
                    }
                    throw error.prefixed("Could not open backing file: ")
                }
            }
            return node
        default:
            try? await fileNode.close()
            throw BlockError.invalid("Unknown driver '\(format)'")
        }
    }
}

/// The legacy qcow (version 1) format: recognised so its images get QEMU's
/// header errors, but not opened.
enum QcowV1 {
    static func validate(_ file: BlockNode) async -> BlockError {
        let buf = AlignedBuffer(count: 512, zeroed: true)
        let n = Int(min(512, file.length))
        if n > 0 { try? await file.read(at: 0, into: buf.slice(0, n)) }
        let p = UnsafeRawPointer(buf.pointer)
        let size = p.loadBE64(24)
        let clusterBits = buf.bytes[32]
        let l2Bits = buf.bytes[33]
        if size <= 1 { return BlockError.invalid("Image size is too small (must be at least 2 bytes)") }
        if clusterBits < 9 || clusterBits > 16 { return BlockError.invalid("Cluster size must be between 512 and 64k") }
        if l2Bits < 6 || l2Bits > 13 { return BlockError.invalid("L2 table size must be between 512 and 64k") }
        return BlockError.unsupported("qcow (version 1) images are not supported; convert them with qemu-img")
    }
}
