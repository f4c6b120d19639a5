import BlockCore
import BlockGraph

/// `convert --bitmaps [--skip-broken-bitmaps]`: every persistent bitmap of
/// the (single, qcow2 v3) source is recreated on the target with its name,
/// granularity, enabled state and bits (qemu-img 7.2's convert_check_bitmaps
/// and convert_copy_bitmaps).
extension ConvertCommand {
    enum BitmapCopy { case none, copy, skipBroken }

    /// Before the target is created: the source supports bitmaps and has
    /// no inconsistent one (unless they are to be skipped).
    static func checkBitmaps(_ src: BlockNode, skipBroken: Bool) async throws(ToolError) {
        guard let q = src.driver as? any PersistentBitmaps, q.supportsPersistentBitmaps else {
            throw ToolError(message: "Source lacks bitmap support")
        }
        if skipBroken { return }
        // QEMU walks a node's bitmaps newest first.
        for b in await q.persistentBitmaps().reversed() where b.inconsistent {
            throw ToolError(message: "Cannot copy inconsistent bitmap '\(b.name)'\nTry --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete it")
        }
    }

    /// After the data: the bitmaps, stored when the target is closed.
    static func copyBitmaps(from src: BlockNode, to tgt: BlockNode, skipBroken: Bool) async throws(ToolError) {
        guard let sq = src.driver as? any PersistentBitmaps, let tq = tgt.driver as? any PersistentBitmaps else { return }
        for b in await sq.persistentBitmaps().reversed() {
            if skipBroken && b.inconsistent {
                FileHandleStderr.write("\(ProgName.current): warning: Skipping inconsistent bitmap '\(b.name)'\n")
                continue
            }
            do throws(BlockError) {
                try await tq.canStoreNewBitmap(name: b.name, granularity: b.granularity)
            } catch {
                throw ToolError(message: "Failed to create bitmap \(b.name): Can't make bitmap '\(b.name)' persistent in '#block3\(String(format2: Int.random(in: 0..<100)))': \(error.message)")
            }
            if await tq.persistentBitmaps().contains(where: { $0.name == b.name }) {
                throw ToolError(message: "Failed to create bitmap \(b.name): Bitmap already exists: \(b.name)")
            }
            await tq.addBitmap(name: b.name, granularity: b.granularity, enabled: b.enabled)
            guard let bits = await sq.bitmapBits(name: b.name) else {
                try? await tq.removeBitmap(name: b.name)
                throw ToolError(message: "Failed to populate bitmap \(b.name): Bitmap '\(b.name)' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk")
            }
            if bits.size != tgt.length {
                try? await tq.removeBitmap(name: b.name)
                throw ToolError(message: "Failed to populate bitmap \(b.name): Bitmaps are of different sizes (destination size is \(tgt.length), source size is \(bits.size)) and can't be merged")
            }
            await tq.mergeIntoBitmap(name: b.name, from: bits)
        }
    }
}
