/* Allocator settings for processes that move many megabyte-sized buffers
 * (see alloc.c). */
#ifndef MIGRATE_ALLOC_H
#define MIGRATE_ALLOC_H

#include <stdint.h>

/* cffi: begin */
/* Serve allocations below mmap_threshold bytes from the heap, give free heap
 * memory back only above trim_threshold, and use at most arena_max malloc
 * arenas. Returns 0, or -EINVAL naming nothing more: glibc refused a value. */
int mig_tune_malloc(int64_t mmap_threshold, int64_t trim_threshold, int arena_max);
/* cffi: end */

#endif
