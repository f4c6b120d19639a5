#ifndef CLAMINASYS_H
#define CLAMINASYS_H
/* A deliberately small, opaque C surface. Only plain C types cross it. */
#include <stdint.h>
#include <spawn.h>
#include <stddef.h>
#include <sys/types.h>

int lamina_o_direct(void);
int lamina_o_cloexec(void);
/* fallocate(2); returns 0 or -errno. */
int lamina_fallocate(int fd, int mode, int64_t offset, int64_t length);
int lamina_falloc_punch_hole(void);   /* FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE */
int lamina_falloc_zero_range(void);   /* FALLOC_FL_ZERO_RANGE */
int lamina_falloc_keep_size(void);
/* lseek(SEEK_DATA / SEEK_HOLE); returns offset or -errno. */
int64_t lamina_seek_data(int fd, int64_t offset);
int64_t lamina_seek_hole(int fd, int64_t offset);
/* Open file description locks. type: 0 = unlock, 1 = read lock, 2 = write lock.
   Returns 0 or -errno. */
int lamina_ofd_setlk(int fd, int type, int64_t start, int64_t length);
/* Tests whether a lock of `type` could be placed; returns 0 if free, 1 if a conflicting
   lock exists, or -errno. */
int lamina_ofd_getlk(int fd, int type, int64_t start, int64_t length);
/* stat(2) identity of a path; 0 or -errno. */
int lamina_stat_identity(const char *path, uint64_t *dev, uint64_t *ino);
/* copy_file_range(2): bytes copied, 0 at source EOF, or -errno. */
ssize_t lamina_copy_file_range(int fd_in, int64_t off_in, int fd_out, int64_t off_out, size_t len);
/* Block device size in bytes, or -errno. */
int64_t lamina_blkdev_size(int fd);

/* zlib raw deflate (window bits -12, as qcow2 uses). Returns compressed length,
   -2 if it does not fit into dst, -1 on any other error. */
ssize_t lamina_deflate_raw(const void *src, size_t src_len, void *dst, size_t dst_cap);
/* Inflates raw deflate data until dst is full. Returns 0 if dst was filled, -1 otherwise. */
int lamina_inflate_raw(const void *src, size_t src_len, void *dst, size_t dst_len);
/* zstd, as qcow2 uses it: one frame per cluster. Same return conventions. */
ssize_t lamina_zstd_compress(const void *src, size_t src_len, void *dst, size_t dst_cap);
int lamina_zstd_decompress(const void *src, size_t src_len, void *dst, size_t dst_len);

/// posix_spawn_file_actions_addclosefrom_np (glibc 2.34+): close every
/// descriptor >= from in the child. Returns 0 or an errno value.
int lamina_spawn_closefrom(posix_spawn_file_actions_t *fa, int from);
/// Names the calling thread (15 bytes are kept), as shown by ps/perf.
void lamina_set_thread_name(const char *name);
/// dup3(oldfd, newfd, O_CLOEXEC).
int lamina_dup3_cloexec(int oldfd, int newfd);
/// sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE): start writeback, no wait.
int lamina_start_writeback(int fd);
/// Serves malloc requests up to max_buffer bytes from the heap (not fresh
/// mmaps whose pages are faulted in and zeroed on every use) and keeps
/// freed memory for reuse.
void lamina_keep_large_buffers_in_heap(int max_buffer);

#endif
