import BlockCore
import BlockGraph
import BlockIO
import CLaminaSys

/// QEMU's image locking (file-posix "locking=on"): one byte per permission
/// at offset 100+bit is read-locked by holders of that permission, and one
/// byte at 200+bit by those who refuse to share it. Open file description
/// locks make this interoperate with qemu-img, qemu-io and QEMU itself.
public struct ImageLock: Sendable, Equatable {
    public typealias Permissions = BlockPermissions

    public var perm: Permissions
    public var shared: Permissions

    public init(perm: Permissions, shared: Permissions) {
        self.perm = perm
        self.shared = shared
    }

    /// What a read-only user of an image takes (qemu-img info/check/convert source).
    public static let reader = ImageLock(perm: [.consistentRead], shared: [.consistentRead, .writeUnchanged, .resize])
    /// What a writer takes (qemu-img convert target, a daemon's active layer).
    public static let writer = ImageLock(perm: [.consistentRead, .write, .resize], shared: [.consistentRead, .writeUnchanged])
    /// -U / force-share: hold only consistent read, share everything.
    public static let sharedReader = ImageLock(perm: [.consistentRead], shared: .all)
    /// Backing files: others may do anything with them.
    public static let backing = ImageLock(perm: [.consistentRead], shared: .all)

    /// No permissions taken, everything shared (a node nobody uses).
    public static let unused = ImageLock(perm: [], shared: .all)
    /// A format node opened read-only takes this on its file (QEMU's
    /// default for a read-only storage child: others may not write).
    public static let readOnlyStorage = ImageLock(perm: [.consistentRead], shared: [.consistentRead, .writeUnchanged])

    /// Moves the file's lock bytes from `old` to `self`: checks that no
    /// other process conflicts with the new state first, then takes the
    /// new bytes and releases the ones no longer needed. On failure the
    /// old state is left in place.
    public func replace(_ old: ImageLock, on file: HostFile) throws(BlockError) {
        for bit in 0..<4 {
            let p = Permissions(rawValue: 1 << UInt8(bit))
            if perm.contains(p) && !old.perm.contains(p)
                && lamina_ofd_getlk(file.fd, 2, ImageLock.sharedBase + Int64(bit), 1) == 1 {
                throw failure(Permissions(rawValue: 1 << UInt8(bit)).humanNames, shared: false, file.path)
            }
            if !shared.contains(p) && old.shared.contains(p)
                && lamina_ofd_getlk(file.fd, 2, ImageLock.permBase + Int64(bit), 1) == 1 {
                throw failure(Permissions(rawValue: 1 << UInt8(bit)).humanNames, shared: true, file.path)
            }
        }
        for bit in 0..<4 {
            let p = Permissions(rawValue: 1 << UInt8(bit))
            let wantPerm = perm.contains(p), hadPerm = old.perm.contains(p)
            if wantPerm != hadPerm {
                _ = lamina_ofd_setlk(file.fd, wantPerm ? 1 : 0, ImageLock.permBase + Int64(bit), 1)
            }
            let wantShared = !shared.contains(p), hadShared = !old.shared.contains(p)
            if wantShared != hadShared {
                _ = lamina_ofd_setlk(file.fd, wantShared ? 1 : 0, ImageLock.sharedBase + Int64(bit), 1)
            }
        }
    }

    static let permBase: Int64 = 100
    static let sharedBase: Int64 = 200

    public func apply(to file: HostFile) throws(BlockError) {
        for bit in 0..<4 {
            let p = Permissions(rawValue: 1 << UInt8(bit))
            if perm.contains(p) {
                let r = lamina_ofd_setlk(file.fd, 1, ImageLock.permBase + Int64(bit), 1)
                if r < 0 { throw failure(Permissions(rawValue: 1 << UInt8(bit)).humanNames, shared: false, file.path) }
            }
            if !shared.contains(p) {
                let r = lamina_ofd_setlk(file.fd, 1, ImageLock.sharedBase + Int64(bit), 1)
                if r < 0 { throw failure(Permissions(rawValue: 1 << UInt8(bit)).humanNames, shared: true, file.path) }
            }
        }
        for bit in 0..<4 {
            let p = Permissions(rawValue: 1 << UInt8(bit))
            if perm.contains(p) && lamina_ofd_getlk(file.fd, 2, ImageLock.sharedBase + Int64(bit), 1) == 1 {
                throw failure(Permissions(rawValue: 1 << UInt8(bit)).humanNames, shared: false, file.path)
            }
            if !shared.contains(p) && lamina_ofd_getlk(file.fd, 2, ImageLock.permBase + Int64(bit), 1) == 1 {
                throw failure(Permissions(rawValue: 1 << UInt8(bit)).humanNames, shared: true, file.path)
            }
        }
    }

    private func failure(_ name: String, shared: Bool, _ path: String) -> BlockError {
        BlockError(.busy, errno: 11,
                   "Failed to get \(shared ? "shared " : "")\"\(name)\" lock\nIs another process using the image [\(path)]?")
    }
}
