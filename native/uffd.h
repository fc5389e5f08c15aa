/* userfaultfd and PAGEMAP_SCAN: thin wrappers, the fault-reading step and
 * the batch installer (see uffd.c).
 *
 * The installed uapi headers predate the running kernel, so the constants and
 * structs added after them (6.1-6.8) are defined here under #ifndef guards,
 * with the kernel's uapi layout (include/uapi/linux/userfaultfd.h, fs.h).
 * Every function returns >= 0 on success or -errno. */
#ifndef MIGRATE_UFFD_H
#define MIGRATE_UFFD_H

#include <stdint.h>
#include <linux/ioctl.h>
#include <linux/types.h>
#include <linux/userfaultfd.h>
/* <linux/fs.h> is deliberately not included: it drags in <linux/mount.h>,
 * which clashes with glibc's <sys/mount.h>; its old copy here lacks
 * PAGEMAP_SCAN anyway. */

/* ---- userfaultfd additions (uapi/linux/userfaultfd.h) ---- */
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_POISON
#define UFFD_FEATURE_POISON (1 << 14)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif
#ifndef UFFD_FEATURE_MOVE
#define UFFD_FEATURE_MOVE (1 << 16)
#endif

#ifndef USERFAULTFD_IOC
#define USERFAULTFD_IOC 0xAA
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(USERFAULTFD_IOC, 0x00)
#endif

#ifndef _UFFDIO_MOVE
#define _UFFDIO_MOVE (0x05)
struct uffdio_move {
    __u64 dst;
    __u64 src;
    __u64 len;
    __u64 mode;
    __s64 move; /* written by the kernel: bytes moved or -errno */
};
#define UFFDIO_MOVE _IOWR(UFFDIO, _UFFDIO_MOVE, struct uffdio_move)
#endif
#ifndef UFFDIO_MOVE_MODE_DONTWAKE
#define UFFDIO_MOVE_MODE_DONTWAKE ((__u64)1 << 0)
#define UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES ((__u64)1 << 1)
#endif

/* ---- PAGEMAP_SCAN (uapi/linux/fs.h, Linux 6.7) ---- */
#ifndef PAGEMAP_SCAN
#define PAGE_IS_WPALLOWED (1 << 0)
#define PAGE_IS_WRITTEN (1 << 1)
#define PAGE_IS_FILE (1 << 2)
#define PAGE_IS_PRESENT (1 << 3)
#define PAGE_IS_SWAPPED (1 << 4)
#define PAGE_IS_PFNZERO (1 << 5)
#define PAGE_IS_HUGE (1 << 6)
#define PAGE_IS_SOFT_DIRTY (1 << 7)

struct page_region {
    __u64 start;
    __u64 end; /* exclusive */
    __u64 categories;
};

#define PM_SCAN_WP_MATCHING (1 << 0)   /* write-protect the matched pages */
#define PM_SCAN_CHECK_WPASYNC (1 << 1) /* abort on a page without async WP */

struct pm_scan_arg {
    __u64 size; /* sizeof(struct pm_scan_arg) */
    __u64 flags;
    __u64 start;
    __u64 end;
    __u64 walk_end; /* written by the kernel: where the walk stopped */
    __u64 vec;      /* struct page_region[] */
    __u64 vec_len;
    __u64 max_pages;
    __u64 category_inverted;
    __u64 category_mask;
    __u64 category_anyof_mask;
    __u64 return_mask;
};

#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
#endif

/* The kernel's constants Python reads (<linux/userfaultfd.h>, or the fallbacks above). */
/* cffi: constants
 * UFFDIO_REGISTER_MODE_MISSING UFFDIO_REGISTER_MODE_WP UFFDIO_REGISTER_MODE_MINOR
 * UFFDIO_COPY_MODE_DONTWAKE UFFDIO_COPY_MODE_WP UFFDIO_ZEROPAGE_MODE_DONTWAKE
 * UFFDIO_WRITEPROTECT_MODE_WP UFFDIO_WRITEPROTECT_MODE_DONTWAKE
 * UFFDIO_MOVE_MODE_DONTWAKE UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES
 * UFFD_FEATURE_PAGEFAULT_FLAG_WP UFFD_FEATURE_EVENT_FORK UFFD_FEATURE_EVENT_REMAP
 * UFFD_FEATURE_EVENT_REMOVE UFFD_FEATURE_MISSING_HUGETLBFS UFFD_FEATURE_MISSING_SHMEM
 * UFFD_FEATURE_EVENT_UNMAP UFFD_FEATURE_SIGBUS UFFD_FEATURE_THREAD_ID
 * UFFD_FEATURE_MINOR_HUGETLBFS UFFD_FEATURE_MINOR_SHMEM UFFD_FEATURE_EXACT_ADDRESS
 * UFFD_FEATURE_WP_HUGETLBFS_SHMEM UFFD_FEATURE_WP_UNPOPULATED UFFD_FEATURE_POISON
 * UFFD_FEATURE_WP_ASYNC UFFD_FEATURE_MOVE */

/* ---- our API ---- */

/* cffi: begin */
/* One guest memory region as mapped in the guest process: host virtual base,
 * size in bytes, and the global index of its first page. */
struct mig_region {
    uint64_t base;
    uint64_t size;
    uint64_t first_page;
};

/* Counters, accumulated (+=) by mig_install: the caller zeroes them. */
struct mig_install_stats {
    uint64_t copied;  /* pages installed by UFFDIO_COPY */
    uint64_t zeroed;  /* pages installed as zero pages (lazy ones included) */
    uint64_t skipped; /* pages already set in the bitmap, not touched */
    uint64_t eexist;  /* pages the kernel found present (someone raced us) */
    uint64_t ioctls;  /* install ioctls issued */
    uint64_t done_ns; /* CLOCK_MONOTONIC when the last page was in place (set by mig_install) */
    uint64_t lazy;    /* zero pages only marked received, left as holes (mig_space_lazy_zero) */
};

/* Counters, accumulated (+=) by mig_read_faults. */
struct mig_fault_stats {
    uint64_t msgs;         /* uffd_msg read */
    uint64_t woken;        /* fault messages for pages already received: woken at once */
    uint64_t other_events; /* events of a kind we do not know */
};

/* Non-cooperative events a space has handled (see mig_space). */
struct mig_event_stats {
    uint64_t remove;         /* UFFD_EVENT_REMOVE: MADV_DONTNEED / MADV_REMOVE */
    uint64_t removed_pages;  /* image pages they discarded: never fetched again, zero if touched */
    uint64_t unmap;          /* UFFD_EVENT_UNMAP: munmap, or mremap over a region */
    uint64_t unmapped_pages; /* image pages gone with them */
    uint64_t remap;          /* UFFD_EVENT_REMAP: mremap moved a range */
    uint64_t remapped_pages;
    uint64_t fork;           /* UFFD_EVENT_FORK: a child's userfaultfd, refused (closed) */
    uint64_t zero_served;    /* faults answered with a zero page: a discarded page, or outside every region */
    uint64_t deferred;       /* zero pages put off while the mm was changing: woken to fault again */
};

/* The guest address space one userfaultfd serves: its region table, which
 * REMAP and UNMAP events change, and what it takes to read events safely.
 *
 * Every installer (mig_install, mig_install_batch, the native data plane)
 * holds the space's lock for reading from its bitmap check to its
 * UFFDIO_COPY (held over up to 16 pieces of a batch: runs of pages
 * all zero or all data; at most one batch's pages); the fault reader holds it for writing from its read() of the
 * messages to the end of their handling, when the fd has event features. The
 * kernel zaps a REMOVE range only once its event is read, and the handler
 * marks the range received under the same lock: so an install either lands
 * before the zap (and is zapped) or sees the range received and skips it, and
 * a discarded page never comes back with the image's old bytes. An installer
 * told -EAGAIN (an event is waiting to be read) drops the lock and reads the
 * pending messages itself (events handled, faults kept for the next
 * mig_read_faults), so no thread ever waits for another to read an event. */
struct mig_space;

struct mig_space *mig_space_new(int fd, const struct mig_region *regions, int nregions, uint32_t page_size);
void mig_space_free(struct mig_space *s);
/* The features the fd's creator enabled (from /proc/self/fdinfo), or 0 if unknown. */
uint64_t mig_space_features(const struct mig_space *s);
void mig_space_events(struct mig_space *s, struct mig_event_stats *out);
/* The current region table into out (at most max); returns how many regions there are. */
int mig_space_regions(struct mig_space *s, struct mig_region *out, int max);
/* With `on`, every install into the space from now on (mig_install*, the
 * native data plane) write-protects the pages it fills (UFFDIO_COPY_MODE_WP;
 * zero pages are copied from a zero area then, UFFDIO_ZEROPAGE having no such
 * mode): on a range registered MISSING|WP by a fd with UFFD_FEATURE_WP_ASYNC,
 * the guest's first write to such a page only clears the protection, and
 * mig_scan_written_present finds it (which pages the guest really wrote, for a policy).
 * Off again: installs leave the pages writable. */
void mig_space_set_install_wp(struct mig_space *s, int on);
/* Lazy zero pages (off by default): a zero run is only marked received, never
 * installed, where a hole of the guest's memory reads as zeros (a fresh memfd
 * mapped shared, or anonymous memory), so an untouched zero page is never
 * allocated. Threads that faulted in the run are woken: they fault again and
 * mig_read_faults answers each with a zero page (a page received, missing). */
void mig_space_lazy_zero(struct mig_space *s, int on);
/* cffi: end */

/* For the native fault path (dp_dest.c), C only: */
int mig_space_fd(const struct mig_space *s);
/* Readable when an installer stashed faults: poll it beside the fd (-1 on
 * an fd without events, where nothing is ever stashed). The native fault
 * thread polls it with the fd (mig_read_faults polls it itself). */
int mig_space_wakefd(const struct mig_space *s);
/* 1 if faults read by an installer wait for mig_read_faults. */
int mig_space_stashed(struct mig_space *s);

/* For the native data plane's installers (dp_dest.c), C only. A piece:
 * global pages [page, page + count), all zero (src NULL) or all data (src:
 * their bytes). */
struct mig_piece {
    uint64_t page;
    uint64_t count;
    const uint8_t *src;
};

/* Install pieces in order, as mig_install does each run of its batch
 * (pages set in the bitmap skipped), holding the space's read lock over
 * many pieces: a scattered set's frame (up to 128 pieces of a page or two)
 * takes the lock once per 16 pieces, not once a piece. Adds to *st but
 * leaves st->done_ns to the caller (the plane reads the clock once a
 * frame). Returns pages newly installed or -errno. */
int64_t mig_install_pieces(struct mig_space *s, uint64_t *bitmap, const struct mig_piece *pieces, uint32_t n,
                           struct mig_install_stats *st);

/* cffi: begin */
int mig_uffd_open(int nonblock);
int mig_uffd_probe(uint64_t *features_out, uint64_t *ioctls_out);
int mig_uffd_api(int fd, uint64_t features, uint64_t *features_out, uint64_t *ioctls_out);
int mig_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls_out);
int mig_uffd_unregister(int fd, uint64_t start, uint64_t len);
int64_t mig_uffd_copy(int fd, uint64_t dst, const void *src, uint64_t len, uint64_t mode, uint32_t page_size);
int64_t mig_uffd_zeropage(int fd, uint64_t start, uint64_t len, uint64_t mode, uint32_t page_size);
int mig_uffd_wake(int fd, uint64_t start, uint64_t len);
int mig_uffd_writeprotect(int fd, uint64_t start, uint64_t len, uint64_t mode);
int64_t mig_uffd_move(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode);
/* cffi: end */

/* cffi: begin */
/* Wait up to timeout_ms for messages, or for the eventfd wake_fd (-1: none;
 * read empty here) to be signalled; handle the events among the messages (see
 * mig_space) and the faults on pages already received (woken, or, for a page
 * discarded since, answered with a zero page); return the other faults'
 * pages, deduplicated, with their waiter counts and read times (0 faults:
 * a timeout, or wake_fd signalled). */
int mig_read_faults(struct mig_space *s, uint64_t *bitmap, uint64_t *out_pages, uint32_t *out_waiters,
                    uint64_t *out_t_ns, int max_out, int timeout_ms, int wake_fd, struct mig_fault_stats *stats);

int64_t mig_install(struct mig_space *s, uint64_t *bitmap, uint64_t first_page, uint32_t count,
                    const uint32_t *zero_runs, uint32_t nzero_runs, const uint8_t *data,
                    uint64_t data_len, struct mig_install_stats *st);
/* cffi: end */

/* cffi: begin */
/* Parse a serialized PageBatch (buf, len) and, if it is raw, check it and
 * install it: the urgent path's whole receive in one call (one GIL
 * release). npages bounds the batch's pages (the bitmap's size). Returns
 * pages installed; -EBADMSG for bytes that are not a sound raw batch (bad
 * shape, size or checksum: refuse it, ask again); -EPROTONOSUPPORT for a
 * compressed batch (the caller decompresses and uses mig_install); or
 * mig_install's errors. *b gets the parsed fields, runs its zero runs, *st
 * (reset first) what the install did. */
struct mig_batch;
int64_t mig_install_batch(struct mig_space *s, uint64_t *bitmap, uint64_t npages, const uint8_t *buf, uint64_t len, uint32_t *runs,
                          uint32_t max_runs, struct mig_batch *b, struct mig_install_stats *st);
/* cffi: end */

/* cffi: begin */
/* PAGEMAP_SCAN [base, base + len) of the process behind `pagemap_fd` for
 * pages written since they were last write-protected (PM_SCAN_WP_MATCHING |
 * PM_SCAN_CHECK_WPASYNC: the same call protects them again) and set their
 * bits in `bitmap` (bit first_page + (addr - base) / page_size). Returns
 * the pages found, or -errno. */
int64_t mig_scan_dirty(int pagemap_fd, uint64_t base, uint64_t len, uint32_t page_size,
                       uint64_t *bitmap, uint64_t first_page);
/* mig_scan_dirty for present pages only. The kernel's scan for written pages
 * alone counts a missing page (an empty PTE in a populated page table) as
 * written, and protects it with a marker: right where every page is mapped
 * (a source guest), wrong where many are still missing (a destination during
 * post-copy). A missing page is left alone by this one. */
int64_t mig_scan_written_present(int pagemap_fd, uint64_t base, uint64_t len, uint32_t page_size,
                                 uint64_t *bitmap, uint64_t first_page);
/* cffi: end */

/* cffi: begin */
/* Install the batches of a serialized PageBatches message (a bulk stream's:
 * each batch a length-delimited field `field_key`) from offset *pos on, in
 * order, each as mig_install_batch does: one call for many short batches.
 * ids gets (req_id, pages) of each batch installed (room for max_ids).
 * Stops at the first batch it cannot install, or when ids is full, with
 * *pos at that batch's field and *err its mig_install_batch error (0: none,
 * all installed or ids full; -EBADMSG too for a field that is not a
 * batches field); *pos is len once every batch is in. Returns the number
 * of batches installed; *st sums their installs (done_ns: the last's). */
int64_t mig_install_batches(struct mig_space *s, uint64_t *bitmap, uint64_t npages, const uint8_t *buf,
                            uint64_t len, uint8_t field_key, uint64_t *pos, uint32_t *runs, uint32_t max_runs,
                            struct mig_batch *b, uint64_t *ids, uint32_t max_ids, int64_t *err,
                            struct mig_install_stats *st);
/* cffi: end */

#endif
