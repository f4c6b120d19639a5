#if canImport(Glibc)
import Glibc
#endif
import BlockCore
import CLaminaSys
import Synchronization

/// An open host file (regular file or block device).
///
/// Threading: every method is synchronous and may block; call it from an
/// I/O thread (see `IOThread`), never from the control plane. The descriptor
/// is shared by all requests of a node; `pread`/`pwrite` with explicit
/// offsets need no further locking.
public final class HostFile: Sendable {
    public let fd: Int32
    public let path: String
    /// Whether the descriptor is open read-only (changes with `reopen`).
    public var readOnly: Bool { readOnlyBox.load(ordering: .acquiring) }
    private let readOnlyBox: Atomic<Bool>
    public let direct: Bool
    public let isBlockDevice: Bool
    /// Request alignment in bytes (1 unless O_DIRECT).
    public let requestAlignment: Int
    private let closed = Atomic<Bool>(false)

    public struct OpenFlags: Sendable {
        public var readOnly: Bool
        public var direct: Bool
        public var create: Bool
        public var truncate: Bool
        public var exclusive: Bool
        public init(readOnly: Bool = true, direct: Bool = false, create: Bool = false,
                    truncate: Bool = false, exclusive: Bool = false) {
            self.readOnly = readOnly
            self.direct = direct
            self.create = create
            self.truncate = truncate
            self.exclusive = exclusive
        }
    }

    /// Opens `path`. Errors are phrased as QEMU's file driver phrases them
    /// ("Could not open 'x': No such file or directory").
    public static func open(_ path: String, _ flags: OpenFlags) throws(BlockError) -> HostFile {
        var oflags: Int32 = flags.readOnly ? O_RDONLY : O_RDWR
        if flags.create { oflags |= O_CREAT }
        if flags.truncate { oflags |= O_TRUNC }
        if flags.exclusive { oflags |= O_EXCL }
        if flags.direct { oflags |= lamina_o_direct() }
        let fd: Int32
        switch Sys.open(path, flags: oflags) {
        case .success(let f): fd = f
        case .failure(let e): throw e.prefixed("Could not open '\(path)': ")
        }
        var st = Glibc.stat()
        if Glibc.fstat(fd, &st) != 0 {
            let e = BlockError.posix(errno)
            Sys.close(fd)
            throw e.prefixed("Could not open '\(path)': ")
        }
        let isDir = (st.st_mode & S_IFMT) == S_IFDIR
        if isDir {
            Sys.close(fd)
            throw BlockError(.invalidArgument, errno: EISDIR, "'file' driver requires '\(path)' to be a regular file")
        }
        let isBlk = (st.st_mode & S_IFMT) == S_IFBLK
        let alignment = flags.direct ? HostFile.probeAlignment(fd) : 1
        return HostFile(fd: fd, path: path, readOnly: flags.readOnly, direct: flags.direct,
                        isBlockDevice: isBlk, requestAlignment: alignment)
    }

    private init(fd: Int32, path: String, readOnly: Bool, direct: Bool, isBlockDevice: Bool, requestAlignment: Int) {
        self.fd = fd
        self.path = path
        self.readOnlyBox = Atomic(readOnly)
        self.direct = direct
        self.isBlockDevice = isBlockDevice
        self.requestAlignment = requestAlignment
    }

    deinit {
        if !closed.load(ordering: .acquiring) {
            _ = lamina_ofd_setlk(fd, 0, 0, 0)
            Sys.close(fd)
        }
    }

    /// Smallest read size/offset O_DIRECT accepts here (QEMU probes likewise).
    private static func probeAlignment(_ fd: Int32) -> Int {
        let buf = AlignedBuffer(count: 4096)
        for align in [512, 1024, 2048, 4096] {
            let n = Glibc.pread(fd, buf.pointer, align, 0)
            if n >= 0 { return align }
            if errno != EINVAL { return 4096 }
        }
        return 4096
    }

    /// QEMU's raw_reopen: the same descriptor number now refers to the file
    /// opened anew with `readOnly` (dup3 swaps the open file description
    /// atomically; requests in flight finish on the old one). Image locks
    /// belong to the description: the caller applies them again.
    public func reopen(readOnly: Bool) throws(BlockError) {
        var oflags: Int32 = readOnly ? O_RDONLY : O_RDWR
        if direct { oflags |= lamina_o_direct() }
        let nfd: Int32
        switch Sys.open(path, flags: oflags) {
        case .success(let f): nfd = f
        case .failure(let e): throw e.prefixed("Could not reopen file: ")
        }
        defer { Sys.close(nfd) }
        if lamina_dup3_cloexec(nfd, fd) < 0 {
            throw BlockError.posix(errno).prefixed("Could not reopen file: ")
        }
        readOnlyBox.store(readOnly, ordering: .releasing)
    }

    public func close() {
        if !closed.exchange(true, ordering: .acquiringAndReleasing) {
            // Drop our image locks explicitly: a child forked by another
            // thread may still share this open file description until it
            // execs, and the locks would outlive our close() otherwise.
            _ = lamina_ofd_setlk(fd, 0, 0, 0)
            Sys.close(fd)
        }
    }

    /// Reads `buffer.count` bytes at `offset`; the part past end-of-file reads as zeroes.
    public func read(_ buffer: UnsafeMutableRawBufferPointer, at offset: Int64) throws(BlockError) {
        guard buffer.count > 0 else { return }
        let n = try Sys.pread(fd, buffer, offset).get()
        if n < buffer.count {
            memset(buffer.baseAddress! + n, 0, buffer.count - n)
        }
    }

    /// Reads and returns how many bytes the file had (short at EOF).
    public func readPartial(_ buffer: UnsafeMutableRawBufferPointer, at offset: Int64) throws(BlockError) -> Int {
        try Sys.pread(fd, buffer, offset).get()
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: Int64) throws(BlockError) {
        guard buffer.count > 0 else { return }
        try Sys.pwrite(fd, buffer, offset).get()
    }

    /// Copies `length` bytes from `source` at `sourceOffset` to this file at
    /// `offset` inside the kernel (copy_file_range). Returns false, having
    /// copied nothing, where the kernel cannot do it for these files;
    /// bytes past the source's end are written as zeroes.
    public func copyIn(from source: HostFile, sourceOffset: Int64, at offset: Int64, length: Int) throws(BlockError) -> Bool {
        if direct || source.direct { return false }
        var done = 0
        while done < length {
            let r = lamina_copy_file_range(source.fd, sourceOffset + Int64(done), fd, offset + Int64(done), length - done)
            if r > 0 {
                done += r
                continue
            }
            if r == 0 {
                // Source EOF: the rest reads as zeroes.
                let zeros = AlignedBuffer(count: length - done, zeroed: true)
                try write(UnsafeRawBufferPointer(zeros.bytes), at: offset + Int64(done))
                return true
            }
            let e = Int32(-r)
            if done == 0 && (e == EXDEV || e == EINVAL || e == ENOSYS || e == EOPNOTSUPP || e == EBADF) { return false }
            throw BlockError.posix(e)
        }
        return true
    }

    public func size() throws(BlockError) -> Int64 {
        if isBlockDevice {
            let r = lamina_blkdev_size(fd)
            if r < 0 { throw BlockError.posix(Int32(-r)) }
            return r
        }
        return Int64(try Sys.fstat(fd).get().st_size)
    }

    /// Bytes actually allocated on the host (st_blocks * 512), as `du` shows.
    public func allocatedSize() throws(BlockError) -> Int64 {
        Int64(try Sys.fstat(fd).get().st_blocks) * 512
    }

    public func truncate(to length: Int64) throws(BlockError) {
        try Sys.ftruncate(fd, length).get()
    }

    /// Starts writing the file's dirty pages back (sync_file_range WRITE):
    /// a later fdatasync then has less to wait for. Best effort.
    public func startWriteback() { _ = lamina_start_writeback(fd) }

    public func dataSync() throws(BlockError) { try Sys.fdatasync(fd).get() }
    public func fullSync() throws(BlockError) { try Sys.fsync(fd).get() }

    public func fallocate(mode: Int32, offset: Int64, length: Int64) throws(BlockError) {
        try Sys.fallocate(fd, mode: mode, offset, length).get()
    }

    /// Deallocates the range; it reads back as zeroes. Throws notSupported
    /// where the host file system cannot punch holes.
    public func punchHole(offset: Int64, length: Int64) throws(BlockError) {
        try Sys.fallocate(fd, mode: lamina_falloc_punch_hole(), offset, length).get()
    }

    public func zeroRange(offset: Int64, length: Int64) throws(BlockError) {
        try Sys.fallocate(fd, mode: lamina_falloc_zero_range(), offset, length).get()
    }

    /// Next data offset at or after `offset`, nil if only a hole follows.
    public func seekData(_ offset: Int64) throws(BlockError) -> Int64? { try Sys.seekData(fd, offset).get() }
    public func seekHole(_ offset: Int64) throws(BlockError) -> Int64? { try Sys.seekHole(fd, offset).get() }
}
