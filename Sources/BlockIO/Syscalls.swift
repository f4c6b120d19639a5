#if canImport(Glibc)
import Glibc
#endif
import BlockCore
import CLaminaSys

/// The seam where the block layer calls libc for file I/O. Every call retries
/// EINTR here and converts failures into `BlockError` once.
public enum Sys {
    public static func open(_ path: String, flags: Int32, mode: mode_t = 0o644) -> Result<Int32, BlockError> {
        while true {
            let fd = Glibc.open(path, flags | lamina_o_cloexec(), mode)
            if fd >= 0 { return .success(fd) }
            if errno == EINTR { continue }
            return .failure(.posix(errno))
        }
    }

    /// Reads until `buffer` is full or EOF. Returns the number of bytes read.
    public static func pread(_ fd: Int32, _ buffer: UnsafeMutableRawBufferPointer, _ offset: Int64) -> Result<Int, BlockError> {
        var done = 0
        while done < buffer.count {
            let n = Glibc.pread(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            if n > 0 { done += n; continue }
            if n == 0 { break }
            if errno == EINTR { continue }
            return .failure(.posix(errno))
        }
        return .success(done)
    }

    /// Writes the whole buffer (short writes are continued).
    public static func pwrite(_ fd: Int32, _ buffer: UnsafeRawBufferPointer, _ offset: Int64) -> Result<Void, BlockError> {
        var done = 0
        while done < buffer.count {
            let n = Glibc.pwrite(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            if n > 0 { done += n; continue }
            if n < 0 && errno == EINTR { continue }
            if n == 0 { return .failure(.posix(ENOSPC)) }
            return .failure(.posix(errno))
        }
        return .success(())
    }

    public static func fdatasync(_ fd: Int32) -> Result<Void, BlockError> {
        while Glibc.fdatasync(fd) != 0 {
            if errno == EINTR { continue }
            return .failure(.posix(errno))
        }
        return .success(())
    }

    public static func fsync(_ fd: Int32) -> Result<Void, BlockError> {
        while Glibc.fsync(fd) != 0 {
            if errno == EINTR { continue }
            return .failure(.posix(errno))
        }
        return .success(())
    }

    public static func ftruncate(_ fd: Int32, _ length: Int64) -> Result<Void, BlockError> {
        while Glibc.ftruncate(fd, off_t(length)) != 0 {
            if errno == EINTR { continue }
            return .failure(.posix(errno))
        }
        return .success(())
    }

    public static func fstat(_ fd: Int32) -> Result<Glibc.stat, BlockError> {
        var st = Glibc.stat()
        if Glibc.fstat(fd, &st) != 0 { return .failure(.posix(errno)) }
        return .success(st)
    }

    /// Device and inode of `path` (nil if it cannot be stat'ed).
    public static func identity(_ path: String) -> (UInt64, UInt64)? {
        var dev: UInt64 = 0
        var ino: UInt64 = 0
        return lamina_stat_identity(path, &dev, &ino) == 0 ? (dev, ino) : nil
    }

    public static func fallocate(_ fd: Int32, mode: Int32, _ offset: Int64, _ length: Int64) -> Result<Void, BlockError> {
        let r = lamina_fallocate(fd, mode, offset, length)
        return r == 0 ? .success(()) : .failure(.posix(-r))
    }

    /// lseek(SEEK_DATA): nil means "no data at or after offset" (ENXIO).
    public static func seekData(_ fd: Int32, _ offset: Int64) -> Result<Int64?, BlockError> {
        let r = lamina_seek_data(fd, offset)
        if r >= 0 { return .success(r) }
        if -r == ENXIO { return .success(nil) }
        return .failure(.posix(Int32(-r)))
    }

    public static func seekHole(_ fd: Int32, _ offset: Int64) -> Result<Int64?, BlockError> {
        let r = lamina_seek_hole(fd, offset)
        if r >= 0 { return .success(r) }
        if -r == ENXIO { return .success(nil) }
        return .failure(.posix(Int32(-r)))
    }

    public static func close(_ fd: Int32) {
        _ = Glibc.close(fd)
    }
}
