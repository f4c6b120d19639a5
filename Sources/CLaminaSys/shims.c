#define _GNU_SOURCE
#include "CLaminaSys.h"
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/fs.h>
#include <linux/falloc.h>
#include <sys/stat.h>
#include <zlib.h>
#include <zstd.h>
#include <spawn.h>

int lamina_o_direct(void) { return O_DIRECT; }
int lamina_o_cloexec(void) { return O_CLOEXEC; }

int lamina_fallocate(int fd, int mode, int64_t offset, int64_t length) {
    for (;;) {
        if (fallocate(fd, mode, (off_t)offset, (off_t)length) == 0) return 0;
        if (errno != EINTR) return -errno;
    }
}
int lamina_falloc_punch_hole(void) { return FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE; }
int lamina_falloc_zero_range(void) { return FALLOC_FL_ZERO_RANGE; }
int lamina_falloc_keep_size(void) { return FALLOC_FL_KEEP_SIZE; }

int64_t lamina_seek_data(int fd, int64_t offset) {
    off_t r = lseek(fd, (off_t)offset, SEEK_DATA);
    return r < 0 ? -errno : (int64_t)r;
}
int64_t lamina_seek_hole(int fd, int64_t offset) {
    off_t r = lseek(fd, (off_t)offset, SEEK_HOLE);
    return r < 0 ? -errno : (int64_t)r;
}

static short lock_type(int type) {
    return type == 0 ? F_UNLCK : (type == 1 ? F_RDLCK : F_WRLCK);
}
int lamina_ofd_setlk(int fd, int type, int64_t start, int64_t length) {
    struct flock fl;
    memset(&fl, 0, sizeof fl);
    fl.l_whence = SEEK_SET;
    fl.l_start = (off_t)start;
    fl.l_len = (off_t)length;
    fl.l_type = lock_type(type);
    if (fcntl(fd, F_OFD_SETLK, &fl) == -1) return -errno;
    return 0;
}
int lamina_ofd_getlk(int fd, int type, int64_t start, int64_t length) {
    struct flock fl;
    memset(&fl, 0, sizeof fl);
    fl.l_whence = SEEK_SET;
    fl.l_start = (off_t)start;
    fl.l_len = (off_t)length;
    fl.l_type = lock_type(type);
    if (fcntl(fd, F_OFD_GETLK, &fl) == -1) return -errno;
    return fl.l_type == F_UNLCK ? 0 : 1;
}
int64_t lamina_blkdev_size(int fd) {
    uint64_t size = 0;
    if (ioctl(fd, BLKGETSIZE64, &size) == -1) return -errno;
    return (int64_t)size;
}

ssize_t lamina_deflate_raw(const void *src, size_t src_len, void *dst, size_t dst_cap) {
    z_stream s;
    memset(&s, 0, sizeof s);
    if (deflateInit2(&s, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY) != Z_OK)
        return -1;
    s.next_in = (Bytef *)src;
    s.avail_in = (uInt)src_len;
    s.next_out = (Bytef *)dst;
    s.avail_out = (uInt)dst_cap;
    int r = deflate(&s, Z_FINISH);
    ssize_t out;
    if (r == Z_STREAM_END) out = (ssize_t)(dst_cap - s.avail_out);
    else if (r == Z_OK || r == Z_BUF_ERROR) out = -2;
    else out = -1;
    deflateEnd(&s);
    return out;
}

int lamina_inflate_raw(const void *src, size_t src_len, void *dst, size_t dst_len) {
    z_stream s;
    memset(&s, 0, sizeof s);
    if (inflateInit2(&s, -12) != Z_OK) return -1;
    s.next_in = (Bytef *)src;
    s.avail_in = (uInt)src_len;
    s.next_out = (Bytef *)dst;
    s.avail_out = (uInt)dst_len;
    int r = inflate(&s, Z_FINISH);
    int ok = (r == Z_STREAM_END || r == Z_BUF_ERROR || r == Z_OK) && s.avail_out == 0;
    inflateEnd(&s);
    return ok ? 0 : -1;
}

ssize_t lamina_zstd_compress(const void *src, size_t src_len, void *dst, size_t dst_cap) {
    ZSTD_CCtx *c = ZSTD_createCCtx();
    if (!c) return -1;
    ZSTD_inBuffer in = { src, src_len, 0 };
    ZSTD_outBuffer out = { dst, dst_cap, 0 };
    ssize_t result = -1;
    for (;;) {
        size_t rem = ZSTD_compressStream2(c, &out, &in, ZSTD_e_end);
        if (ZSTD_isError(rem)) { result = -1; break; }
        if (rem == 0) { result = (ssize_t)out.pos; break; }
        if (out.pos == out.size) { result = -2; break; }
    }
    ZSTD_freeCCtx(c);
    return result;
}

int lamina_zstd_decompress(const void *src, size_t src_len, void *dst, size_t dst_len) {
    ZSTD_DCtx *d = ZSTD_createDCtx();
    if (!d) return -1;
    ZSTD_inBuffer in = { src, src_len, 0 };
    ZSTD_outBuffer out = { dst, dst_len, 0 };
    int ok = -1;
    while (out.pos < out.size) {
        size_t prev_in = in.pos, prev_out = out.pos;
        size_t r = ZSTD_decompressStream(d, &out, &in);
        if (ZSTD_isError(r)) break;
        if (out.pos == out.size) { ok = 0; break; }
        if (in.pos == in.size || (in.pos == prev_in && out.pos == prev_out)) break;
    }
    ZSTD_freeDCtx(d);
    return ok;
}

int lamina_stat_identity(const char *path, uint64_t *dev, uint64_t *ino) {
    struct stat st;
    if (stat(path, &st) != 0) return -errno;
    *dev = (uint64_t)st.st_dev;
    *ino = (uint64_t)st.st_ino;
    return 0;
}

ssize_t lamina_copy_file_range(int fd_in, int64_t off_in, int fd_out, int64_t off_out, size_t len) {
    loff_t in = (loff_t)off_in, out = (loff_t)off_out;
    for (;;) {
        ssize_t r = copy_file_range(fd_in, &in, fd_out, &out, len, 0);
        if (r >= 0) return r;
        if (errno != EINTR) return -errno;
    }
}

int lamina_spawn_closefrom(posix_spawn_file_actions_t *fa, int from) {
    return posix_spawn_file_actions_addclosefrom_np(fa, from);
}

#include <sys/prctl.h>
void lamina_set_thread_name(const char *name) { prctl(PR_SET_NAME, (unsigned long)name, 0, 0, 0); }

#include <malloc.h>
void lamina_keep_large_buffers_in_heap(int max_buffer) {
    mallopt(M_MMAP_THRESHOLD, max_buffer);
    mallopt(M_TRIM_THRESHOLD, 8 * max_buffer);
}

int lamina_dup3_cloexec(int oldfd, int newfd) { return dup3(oldfd, newfd, O_CLOEXEC); }

/* Starts writeback of every dirty page of the file; does not wait. */
int lamina_start_writeback(int fd) { return sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE); }
