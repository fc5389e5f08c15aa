/* Live snapshots with synchronous userfaultfd write-protect (see snapshot.c). */
#ifndef MIGRATE_SNAPSHOT_H
#define MIGRATE_SNAPSHOT_H

#include <stdint.h>

/* cffi: begin */
/* What a snapshot did so far; read at any time with mig_snap_stats. */
struct mig_snap_stats {
    uint64_t pages_total;
    uint64_t pages_saved;     /* by either thread: in the file (or in the stream's buffer, see snapshot.c) */
    uint64_t pages_streamed;  /* saved by the stream thread */
    uint64_t pages_faulted;   /* saved by the fault thread, ahead of the stream */
    uint64_t pages_discarded; /* saved by a guest thread about to discard them (mig_snap_before_discard) */
    uint64_t wp_faults;       /* write-protect fault messages read */
    uint64_t waited;          /* faults on a page the stream was copying: waited for that one page */
    uint64_t blocked_ns;      /* sum over faults of read-to-unprotect time */
    uint64_t max_blocked_ns;  /* the longest of them */
    uint64_t bytes_written;
    uint64_t elapsed_ns;      /* since start, until done */
    int32_t done;             /* 1: every page saved and unprotected, threads ended */
    int32_t error;            /* 0 or -errno of the first failure (then every page was unprotected) */
};

struct mig_snap;

/* Start saving [base, base + size) of this process, write-protected by the
 * caller through `uffd` (registered UFFDIO_REGISTER_MODE_WP, synchronous,
 * non-blocking fd), into `out_fd` at offset (addr - base): a fault thread
 * saves pages the guest writes first, a stream thread walks the rest in
 * order, `chunk_pages` pages per unprotect. NULL (errno set) on failure. */
struct mig_snap *mig_snap_start(int uffd, int out_fd, uint8_t *base, uint64_t size, uint32_t page_size,
                                uint32_t chunk_pages);
/* Wait up to timeout_ms for the end; 1 if done. */
int mig_snap_wait(struct mig_snap *s, int64_t timeout_ms);
void mig_snap_stats(struct mig_snap *s, struct mig_snap_stats *out);
/* A guest thread is about to discard [addr, addr + len) (MADV_REMOVE): save
 * the range's pages not saved yet, as a WP fault would, before their bytes
 * go. The discard itself raises no fault (a zap is no write), so without
 * this the image would hold zeros where the guest had data at the instant.
 * Blocks the caller only for those pages' writes. */
void mig_snap_before_discard(struct mig_snap *s, const uint8_t *addr, uint64_t len);
/* Stop early (if running: every page is unprotected, error -ECANCELED), join, free. */
void mig_snap_free(struct mig_snap *s);
/* cffi: end */

#endif
