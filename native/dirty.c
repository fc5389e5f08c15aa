/* Dirty-page scanning and stale-page discarding (see dirty.h). */
#define _GNU_SOURCE
#include "dirty.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/ioctl.h>

#include "bitmap.h"
#include "uffd.h"

#define SCAN_VEC 512

int64_t mig_scan_dirty(int pagemap_fd, uint64_t base, uint64_t len, uint32_t page_size,
                       uint64_t *bitmap, uint64_t first_page)
{
    struct page_region vec[SCAN_VEC];
    uint64_t pos = base, end = base + len;
    int64_t found = 0;
    while (pos < end) {
        struct pm_scan_arg arg = {
            .size = sizeof(arg),
            .flags = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
            .start = pos,
            .end = end,
            .vec = (uint64_t)(uintptr_t)vec,
            .vec_len = SCAN_VEC,
            .category_mask = PAGE_IS_WRITTEN,
            .return_mask = PAGE_IS_WRITTEN,
        };
        int got = ioctl(pagemap_fd, PAGEMAP_SCAN, &arg);
        if (got < 0)
            return -errno;
        for (int i = 0; i < got; i++) {
            uint64_t first = (vec[i].start - base) / page_size;
            uint64_t count = (vec[i].end - vec[i].start) / page_size;
            mig_bitmap_set(bitmap, first_page + first, count);
            found += count;
        }
        if (arg.walk_end <= pos)
            return -EIO;  /* the kernel made no progress: never spin */
        pos = arg.walk_end;
    }
    return found;
}

int64_t mig_discard_pages(int memfd, uint64_t *received, const uint64_t *stale, uint64_t nbits,
                          uint32_t page_size, uint64_t *runs)
{
    int64_t pages = 0;
    uint64_t page = mig_bitmap_next_set(stale, nbits, 0);
    *runs = 0;
    while (page < nbits) {
        uint64_t end = mig_bitmap_next_clear(stale, nbits, page);
        /* Not received first: a set bit always means "present". */
        mig_bitmap_clear(received, page, end - page);
        if (fallocate(memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)(page * page_size),
                      (off_t)((end - page) * page_size)) < 0)
            return -errno;
        pages += end - page;
        (*runs)++;
        page = mig_bitmap_next_set(stale, nbits, end);
    }
    return pages;
}
