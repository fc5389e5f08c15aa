/* Stale-page discarding on the destination (see dirty.h). */
#define _GNU_SOURCE
#include "dirty.h"

#include <errno.h>
#include <fcntl.h>

#include "bitmap.h"

int64_t mig_take_removed(uint64_t *removed, uint64_t *bitmap, uint64_t nbits)
{
    int64_t found = 0;
    for (uint64_t w = 0; w < (nbits + 63) / 64; w++) {
        if (!__atomic_load_n(&removed[w], __ATOMIC_RELAXED))
            continue;
        uint64_t m = __atomic_exchange_n(&removed[w], 0, __ATOMIC_ACQ_REL);
        __atomic_fetch_or(&bitmap[w], m, __ATOMIC_RELEASE);
        found += __builtin_popcountll(m);
    }
    return found;
}

int mig_punch_pages(int memfd, uint64_t first, uint64_t count, uint32_t page_size)
{
    return fallocate(memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)(first * page_size),
                     (off_t)(count * page_size)) ? -errno : 0;
}

int64_t mig_discard_pages(int memfd, uint64_t *received, const uint64_t *stale, uint64_t nbits,
                          uint32_t page_size, uint64_t *runs)
{
    /* Only pages both stale and received are in the memfd: a clear bit
     * already means a hole, and a guest that keeps re-dirtying the same
     * pages costs nothing the second time. Runs merge across words. */
    uint64_t nwords = (nbits + 63) / 64, run_first = 0, run_len = 0;
    int64_t pages = 0;
    *runs = 0;
    for (uint64_t w = 0; w < nwords; w++) {
        uint64_t m = stale[w];
        if (w == nwords - 1 && nbits % 64)
            m &= (1ULL << (nbits % 64)) - 1;
        m &= __atomic_load_n(&received[w], __ATOMIC_ACQUIRE);
        if (!m)
            continue;
        /* Not received first: a set bit always means "present". */
        __atomic_fetch_and(&received[w], ~m, __ATOMIC_RELEASE);
        while (m) {
            unsigned lo = (unsigned)__builtin_ctzll(m);
            uint64_t rest = ~(m >> lo);
            unsigned len = rest ? (unsigned)__builtin_ctzll(rest) : 64 - lo;
            uint64_t first = w * 64 + lo;
            if (run_len && run_first + run_len == first) {
                run_len += len;
            } else {
                int err = run_len ? mig_punch_pages(memfd, run_first, run_len, page_size) : 0;
                if (err)
                    return err;
                *runs += run_len ? 1 : 0;
                run_first = first;
                run_len = len;
            }
            pages += len;
            m = len + lo >= 64 ? 0 : m & ~(((1ULL << len) - 1) << lo);
        }
    }
    if (run_len) {
        int err = mig_punch_pages(memfd, run_first, run_len, page_size);
        if (err)
            return err;
        (*runs)++;
    }
    return pages;
}
