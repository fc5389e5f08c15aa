/* Source-side page packing: split a batch of pages into zero runs and the
 * concatenated non-zero pages (see pages.c). */
#ifndef MIGRATE_PAGES_H
#define MIGRATE_PAGES_H

#include <stdint.h>

/* Scan npages pages at src. Zero pages become runs (start, len) in zero_runs,
 * pairs relative to src, at most max_runs pairs; *nzero_runs gets their
 * number. The other pages are copied, in order, contiguously into dst (room
 * for npages pages). Returns bytes written to dst, or -ENOSPC when the runs
 * do not fit. */
int64_t mig_pack_pages(const uint8_t *src, uint32_t npages, uint32_t page_size, uint32_t *zero_runs,
                       uint32_t max_runs, uint32_t *nzero_runs, uint8_t *dst);

#endif
