import BlockCore
import BlockGraph

/// One persistent dirty bitmap from the bitmap directory.
public struct Qcow2BitmapInfo: Sendable, Equatable {
    public var tableOffset: UInt64
    public var tableSize: UInt32
    public var flags: UInt32
    public var type: UInt8
    public var granularityBits: UInt8
    public var name: String
    public var extraData: [UInt8]

    public static let flagInUse: UInt32 = 1 << 0
    public static let flagAuto: UInt32 = 1 << 1
    public static let flagExtraDataCompatible: UInt32 = 1 << 2

    public var inUse: Bool { flags & Qcow2BitmapInfo.flagInUse != 0 }
    public var isAuto: Bool { flags & Qcow2BitmapInfo.flagAuto != 0 }
    public var granularity: UInt64 { UInt64(1) << UInt64(granularityBits) }
}

extension Qcow2Image {
    /// Parses the bitmap directory (if the bitmaps extension is valid).
    func readBitmapDirectory() async throws(BlockError) -> [Qcow2BitmapInfo] {
        guard let ext = header.bitmaps, ext.count > 0 else { return [] }
        if ext.directorySize > 64 << 20 {
            throw BlockError.invalid("Bitmap directory is too large")
        }
        var dir = [UInt8](repeating: 0, count: Int(ext.directorySize))
        try await Qcow2Image.readBytes(file, &dir, Int64(ext.directoryOffset))
        var out: [Qcow2BitmapInfo] = []
        var off = 0
        for _ in 0..<ext.count {
            guard off + 24 <= dir.count else { throw BlockError.invalid("Bitmap directory is truncated") }
            let nameSize = Int(dir.be16(off + 18))
            let extraSize = Int(dir.be32(off + 20))
            let entryEnd = off + 24 + extraSize + nameSize
            guard entryEnd <= dir.count else { throw BlockError.invalid("Bitmap directory is truncated") }
            let extra = Array(dir[(off + 24)..<(off + 24 + extraSize)])
            let name = String(decoding: dir[(off + 24 + extraSize)..<entryEnd], as: UTF8.self)
            out.append(Qcow2BitmapInfo(tableOffset: dir.be64(off), tableSize: dir.be32(off + 8), flags: dir.be32(off + 12),
                                       type: dir[off + 16], granularityBits: dir[off + 17], name: name, extraData: extra))
            off = (entryEnd + 7) & ~7
        }
        return out
    }

    /// The persistent bitmaps, as `qemu-img info` lists them. Bitmaps are
    /// considered only while the autoclear "bitmaps" bit is set.
    public func bitmapList() async -> [Qcow2BitmapInfo] {
        await lock.withLock {
            guard header.autoclearFeatures & Qcow2.autoclearBitmaps != 0 else { return [] }
            return (try? await readBitmapDirectory()) ?? []
        }
    }
}
