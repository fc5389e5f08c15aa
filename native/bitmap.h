/* Page bitmaps: uint64_t words, bit i = page i (LSB first).
 *
 * The received bitmap lives in shared memory and is written by several
 * processes at once (fault path, bulk path), so every access goes through
 * __atomic builtins: writers with read-modify-write, readers with acquire
 * loads. A bit is set only after its page is installed, so a reader that sees
 * it set may wake the page's waiters. */
#ifndef MIGRATE_BITMAP_H
#define MIGRATE_BITMAP_H

#include <stdint.h>

/* cffi: begin */
void mig_bitmap_set(uint64_t *bm, uint64_t first, uint64_t count);
void mig_bitmap_clear(uint64_t *bm, uint64_t first, uint64_t count);
int mig_bitmap_test(const uint64_t *bm, uint64_t bit);
uint64_t mig_bitmap_count(const uint64_t *bm, uint64_t nbits);
/* First clear (set) bit in [start, nbits), or nbits if there is none. */
uint64_t mig_bitmap_next_clear(const uint64_t *bm, uint64_t nbits, uint64_t start);
uint64_t mig_bitmap_next_set(const uint64_t *bm, uint64_t nbits, uint64_t start);
/* Clear in `bm` the bits set in `mask` (the first nbits), one atomic
 * read-modify-write per word that has any; returns how many of them were
 * set in `bm` (e.g. prefetched pages found used: hits, each counted once). */
uint64_t mig_bitmap_take(uint64_t *bm, const uint64_t *mask, uint64_t nbits);
/* Map `size` bytes of memfd `fd` shared, read-write, without keeping a
 * descriptor (NULL and errno on failure); mig_bitmap_unmap undoes it. */
uint64_t *mig_bitmap_map(int fd, uint64_t size);
void mig_bitmap_unmap(uint64_t *bm, uint64_t size);
/* Claim pages missing from `received` and not in `asked`, in [start, stop),
 * in order: at most max_pages pages in at most max_runs runs, written to runs
 * as (first, count) pairs. A page is claimed by setting its `asked` bit
 * atomically: a page another thread claims meanwhile is left to it. Returns
 * the number of runs; *next is where to go on from. One call plans a bulk
 * request of many runs (a scattered set) where a bit-by-bit walk from
 * Python cost more than moving the pages. */
uint32_t mig_bitmap_claim(const uint64_t *received, uint64_t *asked, uint64_t start, uint64_t stop,
                          uint64_t max_pages, uint32_t max_runs, uint64_t *runs, uint64_t *next);
/* cffi: end */

#endif
