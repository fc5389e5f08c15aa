/* Source-side page packing (see pages.h). */
#include <errno.h>
#include <string.h>

#include "pages.h"

/* Is the page (page_size a multiple of 64) all zero? ORs 64-byte blocks word
 * by word (the compiler vectorizes the inner loop) and stops at the first
 * block with a set bit: non-zero pages usually differ from zero early. */
static int page_is_zero(const uint8_t *p, uint32_t page_size)
{
    const uint64_t *w = (const uint64_t *)p;
    for (uint32_t i = 0; i < page_size / 8; i += 8) {
        uint64_t acc = 0;
        for (int j = 0; j < 8; j++)
            acc |= w[i + j];
        if (acc)
            return 0;
    }
    return 1;
}

int64_t mig_pack_pages(const uint8_t *src, uint32_t npages, uint32_t page_size, uint32_t *zero_runs,
                       uint32_t max_runs, uint32_t *nzero_runs, uint8_t *dst)
{
    uint32_t runs = 0;
    uint64_t out = 0;
    for (uint32_t i = 0; i < npages; i++) {
        const uint8_t *page = src + (uint64_t)i * page_size;
        if (!page_is_zero(page, page_size)) {
            memcpy(dst + out, page, page_size);
            out += page_size;
        } else if (runs && zero_runs[2 * runs - 2] + zero_runs[2 * runs - 1] == i) {
            zero_runs[2 * runs - 1]++;
        } else {
            if (runs == max_runs)
                return -ENOSPC;
            zero_runs[2 * runs] = i;
            zero_runs[2 * runs + 1] = 1;
            runs++;
        }
    }
    *nzero_runs = runs;
    return (int64_t)out;
}
