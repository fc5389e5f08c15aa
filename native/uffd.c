/* userfaultfd wrappers, the fault-reading step and the batch installer.
 *
 * cffi releases the GIL around each of these calls, so the fault loop and the
 * installs run GIL-free; Python only decides what to fetch and when. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stddef.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "bitmap.h"
#include "uffd.h"
#include "pages.h"

/* How long an install keeps retrying -EAGAIN without progress. The kernel
 * says -EAGAIN while the guest's mm is changing (a non-cooperative event such
 * as UFFD_EVENT_REMOVE is waiting to be read): normally a matter of
 * microseconds, but if nobody reads the event it never ends, and a bounded
 * retry turns that into an error instead of a hang. */
#define EAGAIN_RETRY_NS (500 * 1000 * 1000LL)

/* Messages read per read(): 128 * 32 bytes of stack. */
#define MSG_BATCH 128

/* Zero runs on hugetlbfs go through UFFDIO_COPY from this much read-only
 * anonymous memory (UFFDIO_ZEROPAGE does not support hugetlbfs). Never
 * written, so it only ever maps the shared zero page. A multiple of 2 MiB;
 * pages larger than it (1 GiB) get -EINVAL. */
#define ZERO_AREA_SIZE (32ULL << 20)

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* An ioctl said EAGAIN (the mm is changing): yield and retry, unless no
 * progress was made for EAGAIN_RETRY_NS since the first EAGAIN (*deadline
 * is 0 until then; callers reset it to 0 on progress). */
static int eagain_budget_spent(int64_t *deadline)
{
    int64_t now = (int64_t)mono_ns();
    if (!*deadline)
        *deadline = now + EAGAIN_RETRY_NS;
    else if (now > *deadline)
        return 1;
    sched_yield();
    return 0;
}

int mig_uffd_open(int nonblock)
{
    int flags = O_CLOEXEC | (nonblock ? O_NONBLOCK : 0);
    int fd = (int)syscall(__NR_userfaultfd, flags);
    if (fd >= 0)
        return fd;
    if (errno != EPERM && errno != ENOSYS)
        return -errno;
    /* vm.unprivileged_userfaultfd=0 without CAP_SYS_PTRACE, or a seccomp
     * filter: /dev/userfaultfd is governed by file permissions instead. */
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev < 0)
        return -errno;
    fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
    int err = errno;
    close(dev);
    return fd >= 0 ? fd : -err;
}

int mig_uffd_api(int fd, uint64_t features, uint64_t *features_out, uint64_t *ioctls_out)
{
    struct uffdio_api api = {.api = UFFD_API, .features = features};
    if (ioctl(fd, UFFDIO_API, &api) < 0)
        return -errno;
    *features_out = api.features;
    *ioctls_out = api.ioctls;
    return 0;
}

int mig_uffd_probe(uint64_t *features_out, uint64_t *ioctls_out)
{
    /* UFFDIO_API works once per fd; with features = 0 the kernel reports
     * every feature it supports, so probe on a throwaway fd. */
    int fd = mig_uffd_open(1);
    if (fd < 0)
        return fd;
    int r = mig_uffd_api(fd, 0, features_out, ioctls_out);
    close(fd);
    return r;
}

int mig_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls_out)
{
    struct uffdio_register reg = {.range = {.start = start, .len = len}, .mode = mode};
    if (ioctl(fd, UFFDIO_REGISTER, &reg) < 0)
        return -errno;
    *ioctls_out = reg.ioctls;
    return 0;
}

int mig_uffd_unregister(int fd, uint64_t start, uint64_t len)
{
    struct uffdio_range range = {.start = start, .len = len};
    return ioctl(fd, UFFDIO_UNREGISTER, &range) < 0 ? -errno : 0;
}

int mig_uffd_wake(int fd, uint64_t start, uint64_t len)
{
    struct uffdio_range range = {.start = start, .len = len};
    return ioctl(fd, UFFDIO_WAKE, &range) < 0 ? -errno : 0;
}

int mig_uffd_writeprotect(int fd, uint64_t start, uint64_t len, uint64_t mode)
{
    struct uffdio_writeprotect wp = {.range = {.start = start, .len = len}, .mode = mode};
    return ioctl(fd, UFFDIO_WRITEPROTECT, &wp) < 0 ? -errno : 0;
}

/* Fill [dst, dst + len) with UFFDIO_COPY from src, or UFFDIO_ZEROPAGE when
 * src is NULL. The kernel stops at the first page already present and says
 * -EAGAIN with the bytes done (or -EEXIST when none were): resume after the
 * bytes done, skip a present page (counted in *eexist: a push and a fault
 * raced, the page is there, which is all we want), and retry -EAGAIN without
 * progress for up to EAGAIN_RETRY_NS. Waiters of skipped pages are woken once
 * at the end unless the mode says DONTWAKE (the same bit for both ioctls).
 * Returns the bytes newly filled, or -errno. */
static int64_t fill(int fd, uint64_t dst, const uint8_t *src, uint64_t len, uint64_t mode,
                    uint32_t page_size, uint64_t *eexist, uint64_t *ioctls)
{
    uint64_t off = 0, skipped = 0;
    int64_t done = 0, deadline = 0;
    while (off < len) {
        int64_t n;
        int err = 0;
        if (src) {
            struct uffdio_copy c = {.dst = dst + off, .src = (uint64_t)(uintptr_t)(src + off),
                                    .len = len - off, .mode = mode};
            if (ioctl(fd, UFFDIO_COPY, &c) < 0)
                err = errno;
            n = c.copy;
        } else {
            struct uffdio_zeropage z = {.range = {.start = dst + off, .len = len - off}, .mode = mode};
            if (ioctl(fd, UFFDIO_ZEROPAGE, &z) < 0)
                err = errno;
            n = z.zeropage;
        }
        ++*ioctls;
        if (n > 0) {
            done += n;
            off += (uint64_t)n;
            deadline = 0;
        } else if (err == EEXIST) {
            off += page_size;
            skipped++;
        } else if (err == EAGAIN) {
            if (eagain_budget_spent(&deadline))
                return -EAGAIN;
        } else if (err) {
            return -err;
        }
    }
    if (skipped && !(mode & UFFDIO_COPY_MODE_DONTWAKE))
        mig_uffd_wake(fd, dst, len);
    *eexist += skipped;
    return done;
}

int64_t mig_uffd_copy(int fd, uint64_t dst, const void *src, uint64_t len, uint64_t mode, uint32_t page_size)
{
    uint64_t eexist = 0, ioctls = 0;
    return fill(fd, dst, src, len, mode, page_size, &eexist, &ioctls);
}

int64_t mig_uffd_zeropage(int fd, uint64_t start, uint64_t len, uint64_t mode, uint32_t page_size)
{
    uint64_t eexist = 0, ioctls = 0;
    return fill(fd, start, NULL, len, mode, page_size, &eexist, &ioctls);
}

int64_t mig_uffd_move(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode)
{
    uint64_t off = 0;
    int64_t deadline = 0;
    while (off < len) {
        struct uffdio_move m = {.dst = dst + off, .src = src + off, .len = len - off, .mode = mode};
        int err = ioctl(fd, UFFDIO_MOVE, &m) < 0 ? errno : 0;
        if (m.move > 0) {
            off += (uint64_t)m.move;
            deadline = 0;
        } else if (err == EAGAIN) {
            if (eagain_budget_spent(&deadline))
                return -EAGAIN;
        } else if (err) {
            return -err;
        }
    }
    return (int64_t)off;
}

/* ---- region table ---- */

static const struct mig_region *region_of_addr(const struct mig_region *r, int n, uint64_t addr)
{
    for (int i = 0; i < n; i++)
        if (addr >= r[i].base && addr - r[i].base < r[i].size)
            return &r[i];
    return NULL;
}

static const struct mig_region *region_of_page(const struct mig_region *r, int n, uint32_t page_size,
                                               uint64_t page)
{
    for (int i = 0; i < n; i++)
        if (page >= r[i].first_page && page - r[i].first_page < r[i].size / page_size)
            return &r[i];
    return NULL;
}

/* ---- fault loop step ---- */

/* Record one fault on `page`: a new entry, or one more waiter on an entry
 * from this call (searched newest first: bursts hit the same page). */
static void add_fault(uint64_t page, uint64_t t_ns, uint64_t *pages, uint32_t *waiters, uint64_t *t,
                      int *n)
{
    for (int i = *n - 1; i >= 0; i--) {
        if (pages[i] == page) {
            waiters[i]++;
            return;
        }
    }
    pages[*n] = page;
    waiters[*n] = 1;
    t[*n] = t_ns;
    ++*n;
}

int mig_read_faults(int fd, const struct mig_region *regions, int nregions, uint32_t page_size,
                    const uint64_t *bitmap, uint64_t *out_pages, uint32_t *out_waiters,
                    uint64_t *out_t_ns, int max_out, int timeout_ms, struct mig_fault_stats *stats)
{
    struct pollfd pfd = {.fd = fd, .events = POLLIN};
    int r = poll(&pfd, 1, timeout_ms);
    if (r <= 0)
        return r < 0 ? -errno : 0;

    struct uffd_msg msgs[MSG_BATCH];
    int n = 0;
    int64_t budget = 4LL * max_out;
    for (;;) {
        /* Each message adds at most one page, so never read more than the
         * room left in out_*: a message read is a fault we must answer. */
        int64_t want = max_out - n;
        if (want > budget)
            want = budget;
        if (want > MSG_BATCH)
            want = MSG_BATCH;
        if (want <= 0)
            break;
        ssize_t got = read(fd, msgs, (size_t)want * sizeof(struct uffd_msg));
        if (got < 0) {
            /* EAGAIN: another reader drained the queue after our poll. */
            if (n || errno == EAGAIN)
                break;
            return -errno;
        }
        uint64_t now = mono_ns();
        int64_t k = got / (ssize_t)sizeof(struct uffd_msg);
        budget -= k;
        stats->msgs += (uint64_t)k;
        for (int64_t i = 0; i < k; i++) {
            const struct uffd_msg *m = &msgs[i];
            uint64_t addr = m->arg.pagefault.address & ~((uint64_t)page_size - 1);
            const struct mig_region *reg =
                m->event == UFFD_EVENT_PAGEFAULT ? region_of_addr(regions, nregions, addr) : NULL;
            if (!reg) {
                stats->other_events++;
                continue;
            }
            uint64_t page = reg->first_page + (addr - reg->base) / page_size;
            if (mig_bitmap_test(bitmap, page)) {
                /* Installed after this thread faulted but before we read
                 * the message. The installer woke it already unless it
                 * used DONTWAKE; a wake costs little, a lost one hangs the
                 * guest. A failed wake has nobody to wake: ignore it. */
                mig_uffd_wake(fd, addr, page_size);
                stats->woken++;
                continue;
            }
            add_fault(page, now, out_pages, out_waiters, out_t_ns, &n);
        }
        if (k < want)
            break; /* the queue is drained */
        /* The buffer filled: more may be queued. Check before reading again
         * so that a blocking fd never blocks here. */
        if (poll(&pfd, 1, 0) <= 0)
            break;
    }
    return n;
}

/* ---- batch installer ---- */

static const uint8_t *zero_area;

static void map_zero_area(void)
{
    void *p = mmap(NULL, ZERO_AREA_SIZE, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    zero_area = p == MAP_FAILED ? NULL : p;
}

/* Zero-fill [dst, dst + len): UFFDIO_ZEROPAGE for base pages; for huge pages
 * UFFDIO_COPY from the zero area, ZERO_AREA_SIZE at a time. */
static int64_t fill_zero(int fd, uint64_t dst, uint64_t len, uint32_t page_size, uint64_t *eexist,
                         uint64_t *ioctls)
{
    if (page_size <= (uint64_t)sysconf(_SC_PAGESIZE))
        return fill(fd, dst, NULL, len, 0, page_size, eexist, ioctls);
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, map_zero_area);
    if (!zero_area)
        return -ENOMEM;
    if (page_size > ZERO_AREA_SIZE)
        return -EINVAL;
    int64_t done = 0;
    for (uint64_t off = 0; off < len; off += ZERO_AREA_SIZE) {
        uint64_t chunk = len - off < ZERO_AREA_SIZE ? len - off : ZERO_AREA_SIZE;
        int64_t r = fill(fd, dst + off, zero_area, chunk, 0, page_size, eexist, ioctls);
        if (r < 0)
            return r;
        done += r;
    }
    return done;
}

/* Install global pages [page, page + n), all zero (src NULL) or all data
 * (src = the bytes of page `page`): skip pages set in the bitmap, one ioctl
 * per piece that is clear in the bitmap and within one region, then set the
 * piece's bits. Returns pages newly installed or -errno. */
static int64_t install_run(int fd, const struct mig_region *regions, int nregions, uint32_t page_size,
                           uint64_t *bitmap, uint64_t page, uint64_t n, const uint8_t *src,
                           struct mig_install_stats *st)
{
    const uint64_t first = page, end = page + n;
    int64_t installed = 0;
    while (page < end) {
        uint64_t clear = mig_bitmap_next_clear(bitmap, end, page);
        st->skipped += clear - page;
        page = clear;
        if (page == end)
            break;
        const struct mig_region *reg = region_of_page(regions, nregions, page_size, page);
        if (!reg)
            return -EINVAL;
        uint64_t stop = reg->first_page + reg->size / page_size;
        uint64_t piece_end = mig_bitmap_next_set(bitmap, stop < end ? stop : end, page);
        uint64_t addr = reg->base + (page - reg->first_page) * page_size;
        uint64_t len = (piece_end - page) * page_size;
        int64_t r = src ? fill(fd, addr, src + (page - first) * page_size, len, 0, page_size, &st->eexist,
                               &st->ioctls)
                        : fill_zero(fd, addr, len, page_size, &st->eexist, &st->ioctls);
        if (r < 0)
            return r;
        r /= page_size;
        if (src)
            st->copied += (uint64_t)r;
        else
            st->zeroed += (uint64_t)r;
        installed += r;
        mig_bitmap_set(bitmap, page, piece_end - page);
        page = piece_end;
    }
    return installed;
}

/* Do the zero runs (see mig_zero_pages) and the data length (one page per
 * non-zero page) describe `count` pages? */
static int shape_ok(uint32_t count, const uint32_t *zero_runs, uint32_t nzero_runs, uint32_t page_size,
                    uint64_t data_len)
{
    uint32_t bad;
    int64_t zero_pages = mig_zero_pages(count, zero_runs, nzero_runs, &bad);
    return zero_pages >= 0 && (count - (uint64_t)zero_pages) * page_size == data_len;
}

/* mig_install once the shape is known to be sound. */
static int64_t install_pages(int fd, const struct mig_region *regions, int nregions, uint32_t page_size,
                             uint64_t *bitmap, uint64_t first_page, uint32_t count, const uint32_t *zero_runs,
                             uint32_t nzero_runs, const uint8_t *data, struct mig_install_stats *st)
{
    int64_t installed = 0;
    uint64_t p = 0;
    uint32_t z = 0;
    while (p < count) {
        int zero = z < nzero_runs && zero_runs[2 * z] == p;
        uint64_t end = zero ? p + zero_runs[2 * z + 1] : z < nzero_runs ? zero_runs[2 * z] : count;
        int64_t r = install_run(fd, regions, nregions, page_size, bitmap, first_page + p, end - p,
                                zero ? NULL : data, st);
        if (r < 0)
            return r;
        installed += r;
        if (zero)
            z++;
        else
            data += (end - p) * page_size;
        p = end;
    }
    st->done_ns = mono_ns();
    return installed;
}

int64_t mig_install(int fd, const struct mig_region *regions, int nregions, uint32_t page_size,
                    uint64_t *bitmap, uint64_t first_page, uint32_t count,
                    const uint32_t *zero_runs, uint32_t nzero_runs, const uint8_t *data,
                    uint64_t data_len, struct mig_install_stats *st)
{
    if (!shape_ok(count, zero_runs, nzero_runs, page_size, data_len))
        return -EINVAL;
    return install_pages(fd, regions, nregions, page_size, bitmap, first_page, count, zero_runs, nzero_runs, data,
                         st);
}

int64_t mig_install_batch(int fd, const struct mig_region *regions, int nregions, uint32_t page_size,
                          uint64_t *bitmap, uint64_t npages, const uint8_t *buf, uint64_t len, uint32_t *runs,
                          uint32_t max_runs, struct mig_batch *b, struct mig_install_stats *st)
{
    memset(st, 0, sizeof(*st));
    int r = mig_parse_batch(buf, len, b, runs, max_runs);
    if (r < 0)
        return -EBADMSG;
    if (b->encoding != 0)
        return -EPROTONOSUPPORT;
    uint64_t data_bytes;
    uint32_t bad_run;
    if (mig_check_batch(b, runs, npages, page_size, &data_bytes, &bad_run) != MIG_BATCH_OK ||
        b->data_len != data_bytes || b->data_digest != b->checksum)
        return -EBADMSG;
    return install_pages(fd, regions, nregions, page_size, bitmap, b->first_page, b->count, runs,
                         b->nzero_runs / 2, buf + b->data_off, st);
}

/* ---- dirty tracking ---- */

int mig_pagemap_scan_chunk(int pagemap_fd, uint64_t start, uint64_t end, struct page_region *vec,
                           uint32_t vec_len, uint64_t *walk_end)
{
    struct pm_scan_arg arg = {
        .size = sizeof(arg),
        .flags = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
        .start = start,
        .end = end,
        .vec = (uint64_t)(uintptr_t)vec,
        .vec_len = vec_len,
        .category_mask = PAGE_IS_WRITTEN,
        .return_mask = PAGE_IS_WRITTEN,
    };
    int got = ioctl(pagemap_fd, PAGEMAP_SCAN, &arg);
    if (got < 0)
        return -errno;
    *walk_end = arg.walk_end;
    return got;
}

int mig_pagemap_scan_written(int pagemap_fd, uint64_t start, uint64_t end, uint64_t *out_ranges,
                             uint32_t max_ranges, uint64_t *walk_end)
{
    /* Scan in chunks of page_regions on the stack, continuing from where
     * the kernel stopped, and merge regions that touch across chunks. */
    struct page_region vec[128];
    uint32_t n = 0;
    *walk_end = start;
    while (*walk_end < end && n < max_ranges) {
        uint32_t room = max_ranges - n;
        int got = mig_pagemap_scan_chunk(pagemap_fd, *walk_end, end, vec, room < 128 ? room : 128, walk_end);
        if (got < 0)
            return got;
        for (int i = 0; i < got; i++) {
            if (n && out_ranges[2 * n - 1] == vec[i].start) {
                out_ranges[2 * n - 1] = vec[i].end;
            } else {
                out_ranges[2 * n] = vec[i].start;
                out_ranges[2 * n + 1] = vec[i].end;
                n++;
            }
        }
    }
    return (int)n;
}
