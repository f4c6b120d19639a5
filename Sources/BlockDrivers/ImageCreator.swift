import BlockCore
import BlockGraph
import BlockIO
import FileDriver
import Qcow2

/// Creates images (QEMU's bdrv_img_create for raw and qcow2).
public enum ImageCreator {
    /// Creates (or empties) a host file for a new image, the way QEMU's file
    /// driver does: open without truncating, take the write lock (so an
    /// image someone is using, even this very process, is never clobbered),
    /// then truncate.
    public static func createHostFile(_ path: String) throws(BlockError) -> BlockNode {
        let h: HostFile
        do throws(BlockError) {
            h = try HostFile.open(path, .init(readOnly: false, create: true))
        } catch {
            let detail = error.errno == 21 ? "Is a directory" : errnoString(error.errno)
            throw BlockError(error.kind, errno: error.errno, "Could not create '\(path)': \(detail)")
        }
        do throws(BlockError) {
            try ImageLock.writer.apply(to: h)
            try h.truncate(to: 0)
        } catch {
            h.close()
            throw error
        }
        let d = try FileDriver(host: h)
        return BlockNode(driver: d, filename: path, readOnly: false)
    }

    /// Creates a raw image the way QEMU's file driver does (including the
    /// zeroed first block it writes so alignment probing sees data).
    public static func createRaw(path: String, size: Int64, preallocation: Preallocation) async throws(BlockError) {
        let node = try createHostFile(path)
        do throws(BlockError) {
            if preallocation == .metadata {
                throw BlockError.unsupported("Unsupported preallocation mode: metadata")
            }
            if size > Int64.max - 511 {
                // QEMU's sector rounding overflows into a negative size here.
                throw BlockError.invalid("Could not resize file: Invalid argument")
            }
            do throws(BlockError) {
                try await node.truncate(to: (size + 511) / 512 * 512, preallocation: preallocation)
            } catch {
                if error.errno == 27 { throw BlockError(.invalidArgument, errno: 27, "The image size is too large for file format 'raw'") }
                throw BlockError.io("Could not resize file: \(errnoString(error.errno))", errno: error.errno)
            }
            let first = Int(min(size, 4096))
            if first > 0 && preallocation == .off {
                let zeros = AlignedBuffer(count: first, zeroed: true)
                try await node.write(at: 0, from: UnsafeRawBufferPointer(zeros.bytes))
            }
            try await node.flush()
        } catch {
            try? await node.close()
            throw error
        }
        try await node.close()
    }

    /// Creates a qcow2 image. The backing file, if named, must be openable
    /// (its size is the default image size) unless `unsafe` is set.
    public static func createQcow2(path: String, options: Qcow2CreateOptions) async throws(BlockError) {
        try options.validate()
        let fileNode = try createHostFile(path)
        do throws(BlockError) {
            try await formatQcow2(on: fileNode, options: options)
        } catch {
            try? await fileNode.close()
            throw error
        }
        try await fileNode.close()
    }

    /// Writes a new qcow2 image onto an existing, writable node (QEMU's
    /// qcow2_co_create on a node: blockdev-create, or a new host file),
    /// then preallocates it as `options.preallocation` says, with the image
    /// opened on the node for the duration. `options` were validated by
    /// the caller. The caller keeps its reference to `node` either way.
    public static func formatQcow2(on node: BlockNode, options: Qcow2CreateOptions) async throws(BlockError) {
        try await Qcow2Creator.create(file: node, options: options)
        guard options.preallocation != .off else { return }
        // The image takes a reference of its own, released when it closes.
        node.retain()
        var fo = FormatOpenOptions()
        fo.readOnly = false
        let img: Qcow2Image
        do throws(BlockError) {
            img = try await Qcow2Image.open(file: node, options: fo.qcow2)
        } catch {
            try? await node.close()
            throw error
        }
        do throws(BlockError) {
            try await img.preallocate(options.preallocation)
        } catch {
            try? await img.close()
            throw error
        }
        try await img.close()
    }
}
