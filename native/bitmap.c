/* Atomic page bitmaps (see bitmap.h). */
#include "bitmap.h"
#include <stddef.h>
#include <sys/mman.h>

#define WORD_BITS 64

/* Bits [lo, hi) of one word, 0 <= lo < hi <= 64. */
static inline uint64_t word_mask(unsigned lo, unsigned hi)
{
    uint64_t upper = hi == WORD_BITS ? ~0ULL : (1ULL << hi) - 1;
    return upper & ~((1ULL << lo) - 1);
}

/* Apply `op` (1 = set, 0 = clear) to bits [first, first + count), one atomic
 * read-modify-write per word. */
static void update(uint64_t *bm, uint64_t first, uint64_t count, int op)
{
    uint64_t end = first + count;
    while (first < end) {
        uint64_t w = first / WORD_BITS;
        unsigned lo = first % WORD_BITS;
        unsigned hi = end - w * WORD_BITS < WORD_BITS ? (unsigned)(end - w * WORD_BITS) : WORD_BITS;
        uint64_t m = word_mask(lo, hi);
        if (op)
            __atomic_fetch_or(&bm[w], m, __ATOMIC_RELEASE);
        else
            __atomic_fetch_and(&bm[w], ~m, __ATOMIC_RELEASE);
        first = (w + 1) * WORD_BITS;
    }
}

void mig_bitmap_set(uint64_t *bm, uint64_t first, uint64_t count)
{
    update(bm, first, count, 1);
}

void mig_bitmap_clear(uint64_t *bm, uint64_t first, uint64_t count)
{
    update(bm, first, count, 0);
}

int mig_bitmap_test(const uint64_t *bm, uint64_t bit)
{
    return (__atomic_load_n(&bm[bit / WORD_BITS], __ATOMIC_ACQUIRE) >> (bit % WORD_BITS)) & 1;
}

uint64_t mig_bitmap_take(uint64_t *bm, const uint64_t *mask, uint64_t nbits)
{
    uint64_t taken = 0;
    for (uint64_t w = 0; w < (nbits + WORD_BITS - 1) / WORD_BITS; w++) {
        uint64_t m = __atomic_load_n(&mask[w], __ATOMIC_ACQUIRE);
        if (w == nbits / WORD_BITS)
            m &= word_mask(0, nbits % WORD_BITS);
        if (m & __atomic_load_n(&bm[w], __ATOMIC_ACQUIRE))
            taken += (uint64_t)__builtin_popcountll(__atomic_fetch_and(&bm[w], ~m, __ATOMIC_ACQ_REL) & m);
    }
    return taken;
}

uint64_t mig_bitmap_count(const uint64_t *bm, uint64_t nbits)
{
    uint64_t n = 0, full = nbits / WORD_BITS;
    for (uint64_t w = 0; w < full; w++)
        n += __builtin_popcountll(__atomic_load_n(&bm[w], __ATOMIC_RELAXED));
    if (nbits % WORD_BITS)
        n += __builtin_popcountll(__atomic_load_n(&bm[full], __ATOMIC_RELAXED) &
                                  word_mask(0, nbits % WORD_BITS));
    return n;
}

/* First bit in [start, nbits) whose value equals `want`; nbits if none.
 * Words are inverted when looking for a clear bit, so one scan serves both. */
static uint64_t next_bit(const uint64_t *bm, uint64_t nbits, uint64_t start, int want)
{
    if (start >= nbits)
        return nbits;
    uint64_t flip = want ? 0 : ~0ULL;
    uint64_t w = start / WORD_BITS;
    uint64_t word = (__atomic_load_n(&bm[w], __ATOMIC_ACQUIRE) ^ flip) & ~((1ULL << (start % WORD_BITS)) - 1);
    uint64_t last = (nbits - 1) / WORD_BITS;
    while (!word) {
        if (++w > last)
            return nbits;
        word = __atomic_load_n(&bm[w], __ATOMIC_ACQUIRE) ^ flip;
    }
    uint64_t bit = w * WORD_BITS + (uint64_t)__builtin_ctzll(word);
    return bit < nbits ? bit : nbits;
}

uint64_t mig_bitmap_next_clear(const uint64_t *bm, uint64_t nbits, uint64_t start)
{
    return next_bit(bm, nbits, start, 0);
}

uint64_t mig_bitmap_next_set(const uint64_t *bm, uint64_t nbits, uint64_t start)
{
    return next_bit(bm, nbits, start, 1);
}

uint64_t *mig_bitmap_map(int fd, uint64_t size)
{
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    return p == MAP_FAILED ? NULL : p;
}

void mig_bitmap_unmap(uint64_t *bm, uint64_t size)
{
    munmap(bm, size);
}

uint32_t mig_bitmap_claim(const uint64_t *received, uint64_t *asked, uint64_t start, uint64_t stop,
                          uint64_t max_pages, uint32_t max_runs, uint64_t *runs, uint64_t *next)
{
    uint32_t n = 0;
    uint64_t pages = 0, bit = start;
    while (bit < stop && pages < max_pages) {
        uint64_t w = bit / WORD_BITS;
        unsigned lo = bit % WORD_BITS;
        unsigned hi = stop - w * WORD_BITS < WORD_BITS ? (unsigned)(stop - w * WORD_BITS) : WORD_BITS;
        uint64_t avail = ~(__atomic_load_n(&received[w], __ATOMIC_ACQUIRE) |
                           __atomic_load_n(&asked[w], __ATOMIC_ACQUIRE)) & word_mask(lo, hi);
        while (avail && pages < max_pages) {
            unsigned from = (unsigned)__builtin_ctzll(avail);
            uint64_t rest = ~(avail >> from);
            unsigned len = rest ? (unsigned)__builtin_ctzll(rest) : WORD_BITS - from;
            if (len > max_pages - pages)
                len = (unsigned)(max_pages - pages);
            uint64_t first = w * WORD_BITS + from;
            int extends = n && runs[2 * n - 2] + runs[2 * n - 1] == first;
            if (!extends && n == max_runs) {
                *next = first;
                return n;
            }
            uint64_t m = word_mask(from, from + len);
            avail &= ~m;
            uint64_t prev = __atomic_fetch_or(&asked[w], m, __ATOMIC_ACQ_REL);
            if (prev & m) { /* raced with another claimer: give back what this call set, leave the rest */
                __atomic_fetch_and(&asked[w], ~(m & ~prev), __ATOMIC_RELEASE);
                continue;
            }
            if (extends) {
                runs[2 * n - 1] += len;
            } else {
                runs[2 * n] = first;
                runs[2 * n + 1] = len;
                n++;
            }
            pages += len;
            bit = first + len;
        }
        if (pages < max_pages)
            bit = w * WORD_BITS + hi;
    }
    *next = bit;
    return n;
}
