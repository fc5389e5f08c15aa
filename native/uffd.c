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
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
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
 * raced, the page is there, which is all we want). -EAGAIN without progress
 * (an event waits to be read) is retried for up to EAGAIN_RETRY_NS, or, with
 * `covered` (not NULL), ends the call: *covered says how many bytes from dst
 * on are in place (filled or found present), so the caller can read the event
 * and go on. With `covered`, -ENOENT (the process moved or unmapped the range
 * under this call) ends it the same way: the caller re-reads the region table. Waiters of skipped pages are woken once at the end unless the
 * mode says DONTWAKE (the same bit for both ioctls). Returns the bytes newly
 * filled, or -errno. */
static int64_t fill(int fd, uint64_t dst, const uint8_t *src, uint64_t len, uint64_t mode,
                    uint32_t page_size, uint64_t *eexist, uint64_t *ioctls, uint64_t *covered)
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
        } else if (err == EAGAIN || (err == ENOENT && covered)) {
            if (covered)
                break;
            if (eagain_budget_spent(&deadline))
                return -EAGAIN;
        } else if (err) {
            return -err;
        }
    }
    if (skipped && !(mode & UFFDIO_COPY_MODE_DONTWAKE))
        mig_uffd_wake(fd, dst, off);
    *eexist += skipped;
    if (covered)
        *covered = off;
    return done;
}

int64_t mig_uffd_copy(int fd, uint64_t dst, const void *src, uint64_t len, uint64_t mode, uint32_t page_size)
{
    uint64_t eexist = 0, ioctls = 0;
    return fill(fd, dst, src, len, mode, page_size, &eexist, &ioctls, NULL);
}

int64_t mig_uffd_zeropage(int fd, uint64_t start, uint64_t len, uint64_t mode, uint32_t page_size)
{
    uint64_t eexist = 0, ioctls = 0;
    return fill(fd, start, NULL, len, mode, page_size, &eexist, &ioctls, NULL);
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

/* ---- the space: region table, lock, events ---- */

/* Fault messages an installer read while pumping events, kept for the next
 * mig_read_faults. Each blocked guest thread has at most one fault pending,
 * so this is far more than a guest has threads. */
#define STASH_MSGS 1024

struct mig_space {
    pthread_rwlock_t lock;        /* installers read, the event handler writes (see uffd.h) */
    int fd;
    int wakefd;                   /* eventfd: faults were stashed */
    int events;                   /* the fd may carry non-cooperative events */
    int lazy_zero;                /* zero runs are marked, not installed (mig_space_lazy_zero) */
    uint64_t features;
    int install_wp;               /* installs write-protect what they fill (mig_space_set_install_wp) */
    uint32_t page_size;
    int nregions;
    struct mig_region *regions;   /* changed by REMAP and UNMAP, under the write lock */
    struct mig_event_stats ev;
    uint32_t nstash;
    struct uffd_msg stash[STASH_MSGS];
};

#define EVENT_FEATURES \
    (UFFD_FEATURE_EVENT_FORK | UFFD_FEATURE_EVENT_REMAP | UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_EVENT_UNMAP)

/* The features the creator of fd enabled: the "API:" line of its fdinfo
 * (api:features:ioctls, in hex). Returns -1 when it cannot be read. */
static int64_t fd_features(int fd)
{
    char path[64], buf[512];
    snprintf(path, sizeof(path), "/proc/self/fdinfo/%d", fd);
    int f = open(path, O_RDONLY | O_CLOEXEC);
    if (f < 0)
        return -1;
    ssize_t n = read(f, buf, sizeof(buf) - 1);
    close(f);
    if (n <= 0)
        return -1;
    buf[n] = 0;
    const char *api = strstr(buf, "API:");
    unsigned long long version, features;
    if (!api || sscanf(api + 4, " %llx:%llx", &version, &features) != 2)
        return -1;
    return (int64_t)(features & 0x7fffffffULL); /* bit 31 is the kernel's own "initialized" mark */
}

struct mig_space *mig_space_new(int fd, const struct mig_region *regions, int nregions, uint32_t page_size)
{
    struct mig_space *s = calloc(1, sizeof(*s));
    if (!s)
        return NULL;
    int64_t features = fd_features(fd);
    s->features = features < 0 ? 0 : (uint64_t)features;
    s->events = features < 0 || (features & EVENT_FEATURES); /* unknown: assume it may */
    s->regions = calloc((size_t)(nregions > 0 ? nregions : 1), sizeof(*regions));
    s->wakefd = s->events ? eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK) : -1; /* only pump() stashes */
    if (!s->regions || (s->events && s->wakefd < 0)) {
        if (s->wakefd >= 0)
            close(s->wakefd);
        free(s->regions);
        free(s);
        return NULL;
    }
    memcpy(s->regions, regions, (size_t)nregions * sizeof(*regions));
    s->nregions = nregions;
    s->fd = fd;
    s->page_size = page_size;
    pthread_rwlockattr_t a;
    pthread_rwlockattr_init(&a);
    /* The event handler must not starve behind a stream of installs. */
    pthread_rwlockattr_setkind_np(&a, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&s->lock, &a);
    pthread_rwlockattr_destroy(&a);
    return s;
}

void mig_space_set_install_wp(struct mig_space *s, int on)
{
    __atomic_store_n(&s->install_wp, on ? 1 : 0, __ATOMIC_RELAXED);
}

/* The mode of every install into the space: write-protecting while a policy watches writes. */
static uint64_t install_mode(const struct mig_space *s)
{
    return __atomic_load_n(&s->install_wp, __ATOMIC_RELAXED) ? UFFDIO_COPY_MODE_WP : 0;
}

void mig_space_lazy_zero(struct mig_space *s, int on)
{
    s->lazy_zero = on;
}

void mig_space_free(struct mig_space *s)
{
    if (!s)
        return;
    pthread_rwlock_destroy(&s->lock);
    if (s->wakefd >= 0)
        close(s->wakefd);
    free(s->regions);
    free(s);
}

int mig_space_fd(const struct mig_space *s)
{
    return s->fd;
}

uint64_t mig_space_features(const struct mig_space *s)
{
    return s->features;
}

void mig_space_events(struct mig_space *s, struct mig_event_stats *out)
{
    pthread_rwlock_rdlock(&s->lock);
    *out = s->ev;
    pthread_rwlock_unlock(&s->lock);
}

int mig_space_regions(struct mig_space *s, struct mig_region *out, int max)
{
    pthread_rwlock_rdlock(&s->lock);
    int n = s->nregions;
    memcpy(out, s->regions, (size_t)(n < max ? n : max) * sizeof(*out));
    pthread_rwlock_unlock(&s->lock);
    return n;
}

int mig_space_wakefd(const struct mig_space *s)
{
    return s->wakefd;
}

int mig_space_stashed(struct mig_space *s)
{
    return __atomic_load_n(&s->nstash, __ATOMIC_ACQUIRE) > 0;
}

static const struct mig_region *region_of_addr(const struct mig_space *s, uint64_t addr)
{
    for (int i = 0; i < s->nregions; i++)
        if (addr >= s->regions[i].base && addr - s->regions[i].base < s->regions[i].size)
            return &s->regions[i];
    return NULL;
}

static const struct mig_region *region_of_page(const struct mig_space *s, uint64_t page)
{
    for (int i = 0; i < s->nregions; i++)
        if (page >= s->regions[i].first_page && page - s->regions[i].first_page < s->regions[i].size / s->page_size)
            return &s->regions[i];
    return NULL;
}

/* Mark the image pages mapped in [start, end) received (they will never be
 * fetched or installed) and, with `cut`, take them out of the table, or
 * with `move`, move them to `to` + their offset from start. Returns the pages
 * concerned, or -ENOMEM. Call with the write lock held. */
static int64_t rework(struct mig_space *s, uint64_t *bitmap, uint64_t start, uint64_t end, int mark, int cut,
                      int move, uint64_t to)
{
    struct mig_region *out = NULL;
    int n = 0;
    if (cut || move) {
        out = calloc((size_t)s->nregions * 3, sizeof(*out));
        if (!out)
            return -ENOMEM;
    }
    int64_t pages = 0;
    for (int i = 0; i < s->nregions; i++) {
        struct mig_region r = s->regions[i];
        uint64_t lo = r.base > start ? r.base : start, hi = r.base + r.size < end ? r.base + r.size : end;
        if (lo >= hi) {
            if (out)
                out[n++] = r;
            continue;
        }
        uint64_t first = r.first_page + (lo - r.base) / s->page_size, count = (hi - lo) / s->page_size;
        pages += (int64_t)count;
        if (mark)
            mig_bitmap_set(bitmap, first, count);
        if (!out)
            continue;
        if (lo > r.base)
            out[n++] = (struct mig_region){.base = r.base, .size = lo - r.base, .first_page = r.first_page};
        if (move)
            out[n++] = (struct mig_region){.base = to + (lo - start), .size = hi - lo, .first_page = first};
        if (hi < r.base + r.size)
            out[n++] = (struct mig_region){.base = hi, .size = r.base + r.size - hi,
                                           .first_page = first + count};
    }
    if (out) {
        free(s->regions);
        s->regions = out;
        s->nregions = n;
    }
    return pages;
}

/* Handle the events among msgs[0, k) (write lock held) and keep the faults,
 * in order, at the front. Threads that may wait on an event's range are woken:
 * their page is now received without being installed, or lives elsewhere, so
 * they must fault again to be served. Returns the faults kept. */
static int handle_events(struct mig_space *s, uint64_t *bitmap, struct uffd_msg *msgs, int k,
                         struct mig_fault_stats *stats)
{
    int nf = 0;
    for (int i = 0; i < k; i++) {
        const struct uffd_msg *m = &msgs[i];
        uint64_t start = 0, end = 0;
        int64_t pages = 0;
        switch (m->event) {
        case UFFD_EVENT_PAGEFAULT:
            msgs[nf++] = *m;
            continue;
        case UFFD_EVENT_REMOVE: /* the kernel zaps the range once this is read */
        case UFFD_EVENT_UNMAP: { /* already unmapped: out of the table too */
            int unmap = m->event == UFFD_EVENT_UNMAP;
            start = m->arg.remove.start;
            end = m->arg.remove.end;
            pages = rework(s, bitmap, start, end, 1, unmap, 0, 0);
            ++*(unmap ? &s->ev.unmap : &s->ev.remove);
            *(unmap ? &s->ev.unmapped_pages : &s->ev.removed_pages) += pages > 0 ? (uint64_t)pages : 0;
            break;
        }
        case UFFD_EVENT_REMAP: /* already moved */
            start = m->arg.remap.from;
            end = start + m->arg.remap.len;
            pages = rework(s, bitmap, start, end, 0, 0, 1, m->arg.remap.to);
            mig_uffd_wake(s->fd, m->arg.remap.to, m->arg.remap.len);
            s->ev.remap++;
            s->ev.remapped_pages += pages > 0 ? (uint64_t)pages : 0;
            break;
        case UFFD_EVENT_FORK: /* refused: see docs/architecture.md "Non-cooperative events" */
            close((int)m->arg.fork.ufd);
            s->ev.fork++;
            break;
        default:
            stats->other_events++;
            break;
        }
        if (pages < 0) /* out of memory for the new table: the old one stays, and the run goes on */
            stats->other_events++;
        if (end > start)
            mig_uffd_wake(s->fd, start, end - start);
    }
    return nf;
}

static int readable(int fd)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    return poll(&p, 1, 0) > 0;
}

/* Read up to `want` messages into msgs: the stashed ones first. Returns how
 * many, or -errno. Call with the lock held (for writing if events). */
static int take_msgs(struct mig_space *s, struct uffd_msg *msgs, int want)
{
    int k = (int)s->nstash < want ? (int)s->nstash : want;
    if (k) {
        memcpy(msgs, s->stash, (size_t)k * sizeof(*msgs));
        memmove(s->stash, s->stash + k, (size_t)(s->nstash - (uint32_t)k) * sizeof(*msgs));
        __atomic_store_n(&s->nstash, s->nstash - (uint32_t)k, __ATOMIC_RELEASE);
    }
    if (k == want || !readable(s->fd))
        return k;
    ssize_t got = read(s->fd, msgs + k, (size_t)(want - k) * sizeof(*msgs));
    if (got < 0)
        /* EAGAIN: another reader drained the queue after our poll. */
        return k || errno == EAGAIN ? k : -errno;
    return k + (int)(got / (ssize_t)sizeof(*msgs));
}

/* An installer was told -EAGAIN: an event waits to be read. Read what is
 * pending, handle its events, stash its faults for mig_read_faults. */
static void pump(struct mig_space *s, uint64_t *bitmap)
{
    if (!s->events) {
        sched_yield();
        return;
    }
    struct mig_fault_stats unused = {0};
    pthread_rwlock_wrlock(&s->lock);
    int room = STASH_MSGS - (int)s->nstash;
    if (room > 0 && readable(s->fd)) {
        struct uffd_msg *fresh = s->stash + s->nstash;
        ssize_t got = read(s->fd, fresh, (size_t)room * sizeof(*fresh));
        if (got > 0) {
            int nf = handle_events(s, bitmap, fresh, (int)(got / (ssize_t)sizeof(*fresh)), &unused);
            __atomic_store_n(&s->nstash, s->nstash + (uint32_t)nf, __ATOMIC_RELEASE);
            uint64_t one = 1;
            if (nf && write(s->wakefd, &one, sizeof(one)) < 0) { /* an eventfd write does not fail here */
            }
        }
    }
    pthread_rwlock_unlock(&s->lock);
    if (room <= 0)
        sched_yield();
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

static int64_t fill_zero(int fd, uint64_t dst, uint64_t len, uint32_t page_size, uint64_t mode, uint64_t *eexist,
                         uint64_t *ioctls, uint64_t *covered);

/* Pages a fault on a lazy zero page fills ahead of it (base pages): a guest
 * that touches one page of a zero region goes on to the next ones, and each
 * fault costs the guest thread a round trip through the fault loop. */
#define ZERO_AHEAD 64

/* After a zero page went into the hole at `addr` (page `page` of region
 * `reg`): the same for the pages after it in its aligned ZERO_AHEAD block
 * that are received (a clear bit is a page still to come: never zeros).
 * Pages present already (data installed) are stepped over, one ioctl each
 * (EEXIST): a block where data and zero pages alternate costs up to
 * ZERO_AHEAD ioctls of ~1 us, each sparing the guest a later fault's round
 * trip. Best effort: what it leaves is served when faulted on. */
static void zero_ahead(struct mig_space *s, const uint64_t *bitmap, const struct mig_region *reg, uint64_t addr,
                       uint64_t page)
{
    uint64_t block_end = (page / ZERO_AHEAD + 1) * ZERO_AHEAD, reg_end = reg->first_page + reg->size / s->page_size;
    uint64_t end = mig_bitmap_next_clear(bitmap, block_end < reg_end ? block_end : reg_end, page + 1);
    if (end <= page + 1 || s->page_size > (uint64_t)sysconf(_SC_PAGESIZE))
        return;
    uint64_t eexist = 0, ioctls = 0, covered = 0;
    int64_t r = fill_zero(s->fd, addr + s->page_size, (end - page - 1) * s->page_size, s->page_size, install_mode(s),
                          &eexist, &ioctls, &covered);
    if (r > 0)
        s->ev.zero_served += (uint64_t)r / s->page_size;
}

/* A fault on a page that needs no fetching: one received already (installed
 * after the thread faulted: a zero page attempt finds it present and wakes the
 * thread; or a lazy zero page, a hole until now: it and zero_ahead's pages go
 * in write-protected where installs are), one discarded since it was received
 * (REMOVE, a punched hole: it
 * is missing again, and a discarded page reads as zeros), or an address
 * outside every region (memory that is not the image's: zeros). A zero page
 * that meets -EAGAIN is put off: the kernel says so from an event's start
 * until its own thread runs on after we read it, so the faulting thread is
 * woken to fault again, and tried again when that fault is read. */
static void serve_zero(struct mig_space *s, const uint64_t *bitmap, const struct mig_region *reg, uint64_t addr,
                       uint64_t page, struct mig_fault_stats *stats)
{
    uint64_t eexist = 0, ioctls = 0, covered = 0;
    int64_t r = fill_zero(s->fd, addr, s->page_size, s->page_size, install_mode(s), &eexist, &ioctls, &covered);
    if (r > 0) {
        s->ev.zero_served++;
        if (reg)
            zero_ahead(s, bitmap, reg, addr, page);
    } else if (eexist) {
        stats->woken++;
    } else if (!covered && r == 0) {
        s->ev.deferred++;
        mig_uffd_wake(s->fd, addr, s->page_size);
    }
    /* Any other error (the range is gone, the process exited) leaves nobody to serve. */
}

int mig_read_faults(struct mig_space *s, uint64_t *bitmap, uint64_t *out_pages, uint32_t *out_waiters,
                    uint64_t *out_t_ns, int max_out, int timeout_ms, int wake_fd, struct mig_fault_stats *stats)
{
    uint64_t drained;
    if (!mig_space_stashed(s)) {
        struct pollfd pfd[3] = {{.fd = s->fd, .events = POLLIN}, {.fd = s->wakefd, .events = POLLIN},
                                {.fd = wake_fd, .events = POLLIN}};
        int r = poll(pfd, 3, timeout_ms);
        if (r <= 0)
            return r < 0 ? -errno : 0;
        if (pfd[2].revents && read(wake_fd, &drained, sizeof(drained)) < 0) { /* EAGAIN: read already */
        }
        if (!pfd[0].revents && !pfd[1].revents)
            return 0;
    }
    if (s->wakefd >= 0 && read(s->wakefd, &drained, sizeof(drained)) < 0) { /* EAGAIN: nothing was stashed */
    }

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
        if (s->events)
            pthread_rwlock_wrlock(&s->lock);
        else
            pthread_rwlock_rdlock(&s->lock);
        int k = take_msgs(s, msgs, (int)want);
        if (k < 0) {
            pthread_rwlock_unlock(&s->lock);
            if (n)
                break;
            return k;
        }
        uint64_t now = mono_ns();
        budget -= k;
        stats->msgs += (uint64_t)k;
        int nf = handle_events(s, bitmap, msgs, k, stats);
        for (int i = 0; i < nf; i++) {
            uint64_t addr = msgs[i].arg.pagefault.address & ~((uint64_t)s->page_size - 1);
            const struct mig_region *reg = region_of_addr(s, addr);
            uint64_t page = reg ? reg->first_page + (addr - reg->base) / s->page_size : 0;
            if (!reg || mig_bitmap_test(bitmap, page))
                serve_zero(s, bitmap, reg, addr, page, stats);
            else
                add_fault(page, now, out_pages, out_waiters, out_t_ns, &n);
        }
        pthread_rwlock_unlock(&s->lock);
        if (k < want)
            break; /* the queue is drained */
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

/* Zero-fill [dst, dst + len): UFFDIO_ZEROPAGE for base pages; for huge pages,
 * or when `mode` write-protects (UFFDIO_ZEROPAGE has no such mode), UFFDIO_COPY
 * from the zero area, ZERO_AREA_SIZE at a time. `covered` as for fill. */
static int64_t fill_zero(int fd, uint64_t dst, uint64_t len, uint32_t page_size, uint64_t mode, uint64_t *eexist,
                         uint64_t *ioctls, uint64_t *covered)
{
    if (page_size <= (uint64_t)sysconf(_SC_PAGESIZE) && !(mode & UFFDIO_COPY_MODE_WP))
        return fill(fd, dst, NULL, len, 0, page_size, eexist, ioctls, covered);
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, map_zero_area);
    if (!zero_area)
        return -ENOMEM;
    if (page_size > ZERO_AREA_SIZE)
        return -EINVAL;
    int64_t done = 0;
    for (uint64_t off = 0; off < len; off += ZERO_AREA_SIZE) {
        uint64_t chunk = len - off < ZERO_AREA_SIZE ? len - off : ZERO_AREA_SIZE, part = chunk;
        int64_t r = fill(fd, dst + off, zero_area, chunk, mode, page_size, eexist, ioctls, covered ? &part : NULL);
        if (r < 0)
            return r;
        done += r;
        if (covered)
            *covered = off + part;
        if (part < chunk)
            break;
    }
    return done;
}

/* Install pages [page, page + n), all zero (src NULL) or all data (src:
 * their bytes), with the space's read lock held (see uffd.h): skip pages
 * set in the bitmap, one ioctl per stretch that is clear in the bitmap and
 * within one region, then set the stretch's bits. On -EAGAIN the lock is
 * dropped, the pending event read (pump), and the lock taken again; it is
 * held on return whatever happened. *reg: the region of the last piece (a
 * scattered set's next run is most likely in it; NULL: look it up). */
static int64_t piece_locked(struct mig_space *s, uint64_t *bitmap, uint64_t page, uint64_t n, const uint8_t *src,
                            uint64_t mode, const struct mig_region **reg, struct mig_install_stats *st)
{
    const uint64_t first = page, end = page + n;
    const uint32_t ps = s->page_size;
    int64_t installed = 0, deadline = 0;
    while (page < end) {
        uint64_t clear = n == 1 ? page + mig_bitmap_test(bitmap, page) : mig_bitmap_next_clear(bitmap, end, page);
        st->skipped += clear - page;
        page = clear;
        if (page == end)
            break;
        if (!*reg || page < (*reg)->first_page || page - (*reg)->first_page >= (*reg)->size / ps)
            *reg = region_of_page(s, page);
        if (!*reg)
            return -EINVAL;
        uint64_t stop = (*reg)->first_page + (*reg)->size / ps;
        uint64_t piece_end = n == 1 ? end : mig_bitmap_next_set(bitmap, stop < end ? stop : end, page);
        uint64_t addr = (*reg)->base + (page - (*reg)->first_page) * ps;
        uint64_t len = (piece_end - page) * ps, covered = 0;
        if (!src && s->lazy_zero) {
            /* The hole reads as zeros already. Bits first, then the wake: a thread that faulted
             * before the bits were set faults again and finds the page received. */
            mig_bitmap_set(bitmap, page, piece_end - page);
            mig_uffd_wake(s->fd, addr, len);
            st->ioctls++;
            st->zeroed += piece_end - page;
            st->lazy += piece_end - page;
            installed += (int64_t)(piece_end - page);
            page = piece_end;
            continue;
        }
        int64_t r = src ? fill(s->fd, addr, src + (page - first) * ps, len, mode, ps, &st->eexist, &st->ioctls,
                               &covered)
                        : fill_zero(s->fd, addr, len, ps, mode, &st->eexist, &st->ioctls, &covered);
        if (r < 0)
            return r;
        r /= ps;
        if (src)
            st->copied += (uint64_t)r;
        else
            st->zeroed += (uint64_t)r;
        installed += r;
        mig_bitmap_set(bitmap, page, covered / ps);
        page += covered / ps;
        if (covered)
            deadline = 0;
        if (page < piece_end) { /* -EAGAIN: an event waits to be read */
            pthread_rwlock_unlock(&s->lock);
            int spent = eagain_budget_spent(&deadline);
            if (!spent)
                pump(s, bitmap);
            pthread_rwlock_rdlock(&s->lock);
            *reg = NULL; /* the event may have moved the regions */
            if (spent)
                return -EAGAIN;
        }
    }
    return installed;
}

/* Pieces installed under one hold of the read lock. The fault reader takes
 * the write lock for every read: it waits for at most this many pieces (~30
 * µs of a scattered set's one-page pieces, a contiguous frame's one ioctl
 * ~150 µs), and the lock costs two atomic operations per this many pieces
 * instead of per piece. */
#define PIECES_PER_HOLD 16

/* Before the i-th piece of a hold: every PIECES_PER_HOLD pieces, drop the
 * read lock and take it again, letting a waiting fault reader in (its
 * events may change the regions: *reg is forgotten). */
static void let_the_reader_in(struct mig_space *s, uint64_t i, const struct mig_region **reg)
{
    if (i && i % PIECES_PER_HOLD == 0) {
        pthread_rwlock_unlock(&s->lock);
        pthread_rwlock_rdlock(&s->lock);
        *reg = NULL;
    }
}

int64_t mig_install_pieces(struct mig_space *s, uint64_t *bitmap, const struct mig_piece *pieces, uint32_t n,
                           struct mig_install_stats *st)
{
    const uint64_t mode = install_mode(s);
    const struct mig_region *reg = NULL;
    int64_t installed = 0;
    pthread_rwlock_rdlock(&s->lock);
    for (uint32_t i = 0; i < n && installed >= 0; i++) {
        let_the_reader_in(s, i, &reg);
        int64_t r = piece_locked(s, bitmap, pieces[i].page, pieces[i].count, pieces[i].src, mode, &reg, st);
        installed = r < 0 ? r : installed + r;
    }
    pthread_rwlock_unlock(&s->lock);
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
static int64_t install_pages(struct mig_space *s, uint64_t *bitmap, uint64_t first_page, uint32_t count,
                             const uint32_t *zero_runs, uint32_t nzero_runs, const uint8_t *data,
                             struct mig_install_stats *st)
{
    const uint64_t mode = install_mode(s);
    const struct mig_region *reg = NULL;
    int64_t installed = 0;
    uint64_t p = 0;
    uint32_t z = 0;
    pthread_rwlock_rdlock(&s->lock);
    for (uint64_t i = 0; p < count; i++) {
        let_the_reader_in(s, i, &reg);
        int zero = z < nzero_runs && zero_runs[2 * z] == p;
        uint64_t end = zero ? p + zero_runs[2 * z + 1] : z < nzero_runs ? zero_runs[2 * z] : count;
        int64_t r = piece_locked(s, bitmap, first_page + p, end - p, zero ? NULL : data, mode, &reg, st);
        if (r < 0) {
            installed = r;
            break;
        }
        installed += r;
        if (zero)
            z++;
        else
            data += (end - p) * s->page_size;
        p = end;
    }
    pthread_rwlock_unlock(&s->lock);
    if (installed >= 0)
        st->done_ns = mono_ns();
    return installed;
}

int64_t mig_install(struct mig_space *s, uint64_t *bitmap, uint64_t first_page, uint32_t count,
                    const uint32_t *zero_runs, uint32_t nzero_runs, const uint8_t *data,
                    uint64_t data_len, struct mig_install_stats *st)
{
    if (!shape_ok(count, zero_runs, nzero_runs, s->page_size, data_len))
        return -EINVAL;
    return install_pages(s, bitmap, first_page, count, zero_runs, nzero_runs, data, st);
}

int64_t mig_install_batch(struct mig_space *s, uint64_t *bitmap, uint64_t npages, const uint8_t *buf, uint64_t len,
                          uint32_t *runs, uint32_t max_runs, struct mig_batch *b, struct mig_install_stats *st)
{
    memset(st, 0, sizeof(*st));
    int r = mig_parse_batch(buf, len, b, runs, max_runs);
    if (r < 0)
        return -EBADMSG;
    if (b->encoding != 0)
        return -EPROTONOSUPPORT;
    uint64_t data_bytes;
    uint32_t bad_run;
    if (mig_check_batch(b, runs, npages, s->page_size, &data_bytes, &bad_run) != MIG_BATCH_OK ||
        b->data_len != data_bytes || b->data_digest != b->checksum)
        return -EBADMSG;
    return install_pages(s, bitmap, b->first_page, b->count, runs, b->nzero_runs / 2, buf + b->data_off, st);
}

int64_t mig_install_batches(struct mig_space *s, uint64_t *bitmap, uint64_t npages, const uint8_t *buf,
                            uint64_t len, uint8_t field_key, uint64_t *pos, uint32_t *runs, uint32_t max_runs,
                            struct mig_batch *b, uint64_t *ids, uint32_t max_ids, int64_t *err,
                            struct mig_install_stats *st)
{
    memset(st, 0, sizeof(*st));
    *err = 0;
    uint32_t n = 0;
    while (*pos < len && n < max_ids) {
        uint64_t blen;
        int64_t at = mig_next_field(buf, len, *pos, field_key, &blen);
        if (at < 0) {
            *err = -EBADMSG;
            break;
        }
        struct mig_install_stats one;
        int64_t r = mig_install_batch(s, bitmap, npages, buf + at, blen, runs, max_runs, b, &one);
        if (r < 0) {
            *err = r;
            break;
        }
        st->copied += one.copied;
        st->zeroed += one.zeroed;
        st->skipped += one.skipped;
        st->eexist += one.eexist;
        st->ioctls += one.ioctls;
        st->lazy += one.lazy;
        st->done_ns = one.done_ns;
        ids[2 * n] = b->req_id;
        ids[2 * n + 1] = b->count;
        n++;
        *pos = (uint64_t)at + blen;
    }
    return n;
}

/* ---- dirty tracking: PAGEMAP_SCAN ---- */

/* One PAGEMAP_SCAN: pages of [start, end) written since they were last
 * write-protected, into vec (at most vec_len regions), protected again by the
 * same call. Returns the number of regions or -errno; *walk_end is where the
 * kernel stopped. */
static int pagemap_scan_chunk(int pagemap_fd, uint64_t start, uint64_t end, struct page_region *vec,
                              uint32_t vec_len, uint64_t categories, uint64_t *walk_end)
{
    struct pm_scan_arg arg = {
        .size = sizeof(arg),
        .flags = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
        .start = start,
        .end = end,
        .vec = (uint64_t)(uintptr_t)vec,
        .vec_len = vec_len,
        .category_mask = categories,
        .return_mask = PAGE_IS_WRITTEN,
    };
    int got = ioctl(pagemap_fd, PAGEMAP_SCAN, &arg);
    if (got < 0)
        return -errno;
    *walk_end = arg.walk_end;
    return got;
}

#define SCAN_VEC 512

/* mig_scan_dirty and mig_scan_written_present: the pages of every category in `categories`. */
static int64_t scan_into(int pagemap_fd, uint64_t base, uint64_t len, uint32_t page_size, uint64_t *bitmap,
                         uint64_t first_page, uint64_t categories)
{
    struct page_region vec[SCAN_VEC];
    uint64_t pos = base, end = base + len;
    int64_t found = 0;
    while (pos < end) {
        uint64_t walk_end = pos;
        int got = pagemap_scan_chunk(pagemap_fd, pos, end, vec, SCAN_VEC, categories, &walk_end);
        if (got < 0)
            return got;
        for (int i = 0; i < got; i++) {
            uint64_t first = (vec[i].start - base) / page_size;
            uint64_t count = (vec[i].end - vec[i].start) / page_size;
            mig_bitmap_set(bitmap, first_page + first, count);
            found += count;
        }
        if (walk_end <= pos)
            return -EIO;  /* the kernel made no progress: never spin */
        pos = walk_end;
    }
    return found;
}

int64_t mig_scan_dirty(int pagemap_fd, uint64_t base, uint64_t len, uint32_t page_size,
                       uint64_t *bitmap, uint64_t first_page)
{
    return scan_into(pagemap_fd, base, len, page_size, bitmap, first_page, PAGE_IS_WRITTEN);
}

int64_t mig_scan_written_present(int pagemap_fd, uint64_t base, uint64_t len, uint32_t page_size,
                                 uint64_t *bitmap, uint64_t first_page)
{
    return scan_into(pagemap_fd, base, len, page_size, bitmap, first_page, PAGE_IS_WRITTEN | PAGE_IS_PRESENT);
}
