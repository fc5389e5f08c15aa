/* Discarding stale pages on the destination (pre-copy and hybrid
 * migration); the source's write tracking is mig_scan_dirty (uffd.h). */
#ifndef MIGRATE_DIRTY_H
#define MIGRATE_DIRTY_H

#include <stdint.h>

/* cffi: begin */
/* Move the bits of `removed` (pages the guest discarded, set by the runner's
 * discard path: mig_wl_watch_discards) into `bitmap`, clearing them, word by
 * word atomically: a bit set meanwhile is taken now or at the next call.
 * Returns the bits moved. A discard is no write to PAGEMAP_SCAN: a page
 * sent, then discarded while protected, leaves only a marker. */
int64_t mig_take_removed(uint64_t *removed, uint64_t *bitmap, uint64_t nbits);

/* For the pages set in both `stale` and `received` (nbits bits): clear
 * their received bits, then punch them out of `memfd` (fallocate
 * PUNCH_HOLE, one call per run), so a registered MISSING userfaultfd faults
 * on them again. Pages not received are holes already and are left alone.
 * Returns the pages discarded, or -errno; *runs gets the fallocate calls. */
int64_t mig_discard_pages(int memfd, uint64_t *received, const uint64_t *stale, uint64_t nbits,
                          uint32_t page_size, uint64_t *runs);

/* Punch pages [first, first + count) out of `memfd` (they read as zeros, and
 * take no memory). Returns 0 or -errno. */
int mig_punch_pages(int memfd, uint64_t first, uint64_t count, uint32_t page_size);
/* cffi: end */

#endif
