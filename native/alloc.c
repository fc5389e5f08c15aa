/* Allocator settings (see alloc.h).
 *
 * gRPC and Python allocate a fresh buffer for every megabyte-sized message.
 * glibc serves those with mmap and returns them with munmap, so every
 * message pays a page fault and a page clear per 4 KiB: measured here, that
 * halves bulk throughput. A higher mmap threshold keeps such buffers in the
 * heap and reuses them; a bounded trim threshold and arena count keep the
 * memory the heap holds on to small. */
#include <errno.h>
#include <malloc.h>

#include "alloc.h"

int mig_tune_malloc(int64_t mmap_threshold, int64_t trim_threshold, int arena_max)
{
    if (mmap_threshold <= 0 || trim_threshold <= 0 || arena_max <= 0)
        return -EINVAL;
    if (!mallopt(M_MMAP_THRESHOLD, (int)mmap_threshold) || !mallopt(M_TRIM_THRESHOLD, (int)trim_threshold) ||
        !mallopt(M_ARENA_MAX, arena_max))
        return -EINVAL;
    return 0;
}
