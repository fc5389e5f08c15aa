/*
 * Live snapshot of this process's guest RAM with synchronous userfaultfd
 * write-protect (the way QEMU's background-snapshot works).
 *
 * The caller registered [base, base + size) with UFFDIO_REGISTER_MODE_WP
 * (no WP_ASYNC) and write-protected all of it at one instant, the guest
 * paused: from then on a guest write to a protected page blocks the writing
 * thread and queues a WP fault message. Two threads save the RAM as it was
 * at that instant into out_fd (offset = addr - base):
 *
 * - the fault thread reads WP faults and, for each, saves that page first
 *   (pwrite from the mapping, which stays readable), THEN unprotects it
 *   (UFFDIO_WRITEPROTECT mode 0 wakes the writer). Unprotecting first would
 *   let the writer change the page before it is saved.
 * - the stream thread walks the pages in order, chunk by chunk: copies each
 *   page it claims into its buffer, writes the chunk's runs, and unprotects
 *   the chunk in runs of pages that are saved, skipping any page the fault
 *   thread is still writing (that thread unprotects it itself).
 *
 * Who saves a page is decided by one atomic byte per page: 0 nobody yet,
 * 1 being copied by the thread that moved it from 0, 2 captured (its bytes
 * are in the file or in the stream's buffer, on their way to the file).
 * A fault on a page in state 1 waits for that one page's copy only: the
 * stream claims and copies page by page into memory, and writes afterwards,
 * so a fault never waits behind a chunk's pwrite. Page bytes never go
 * through Python; Python starts, polls and frees.
 */
#define _GNU_SOURCE
#include "snapshot.h"
#include "dp_common.h"
#include "uffd.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#define FAULT_BATCH 64
/* Give up retrying an UFFDIO_WRITEPROTECT that keeps saying EAGAIN (mm changing) after this long. */
#define WP_RETRY_NS 10000000000LL

enum { PAGE_UNSAVED = 0, PAGE_COPYING = 1, PAGE_SAVED = 2 };

struct mig_snap {
    int uffd, out_fd, stop_fd;
    uint8_t *base;
    uint64_t size, npages;
    uint32_t page_size, chunk;
    _Atomic uint8_t *state;
    pthread_t fault_tid, stream_tid;
    _Atomic int cancel, error, done;
    _Atomic uint64_t streamed, faulted, discarded, wp_faults, waited, blocked_ns, max_blocked_ns, bytes;
    int64_t t_start, t_end;
    pthread_mutex_t mu;
    pthread_cond_t cv;
};

static int64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void fail(struct mig_snap *s, int err)
{
    int none = 0;
    atomic_compare_exchange_strong(&s->error, &none, err);
}

static int write_all(int fd, const uint8_t *p, uint64_t len, uint64_t off)
{
    while (len) {
        ssize_t n = pwrite(fd, p, len, (off_t)off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            return -EIO;
        p += n;
        off += (uint64_t)n;
        len -= (uint64_t)n;
    }
    return 0;
}

/* Clear write protection on [first, first + count) pages, waking their writers. */
static int unprotect(struct mig_snap *s, uint64_t first, uint64_t count)
{
    int64_t deadline = 0;
    for (;;) {
        int rc = mig_uffd_writeprotect(s->uffd, (uint64_t)(uintptr_t)(s->base + first * s->page_size),
                                       count * s->page_size, 0);
        if (rc != -EAGAIN)
            return rc;
        int64_t now = mono_ns();
        if (!deadline)
            deadline = now + WP_RETRY_NS;
        else if (now > deadline)
            return rc;
        sched_yield();
    }
}

/* Make sure page p is in the image (saving it now if nobody has), counting a save in *saved_by.
 * On a page the stream is copying into its buffer: wait for that one page's memcpy. */
static void save_page(struct mig_snap *s, uint64_t p, _Atomic uint64_t *saved_by)
{
    uint8_t expect = PAGE_UNSAVED;
    if (atomic_compare_exchange_strong(&s->state[p], &expect, PAGE_COPYING)) {
        int rc = write_all(s->out_fd, s->base + p * s->page_size, s->page_size, p * s->page_size);
        if (rc)
            fail(s, rc);
        atomic_store_explicit(&s->state[p], PAGE_SAVED, memory_order_release);
        atomic_fetch_add_explicit(saved_by, 1, memory_order_relaxed);
        atomic_fetch_add_explicit(&s->bytes, s->page_size, memory_order_relaxed);
    } else if (expect == PAGE_COPYING) {
        atomic_fetch_add_explicit(&s->waited, 1, memory_order_relaxed);
        while (atomic_load_explicit(&s->state[p], memory_order_acquire) != PAGE_SAVED)
            sched_yield();
    }
}

/* The fault path: make sure page p is saved, then unprotect it. */
static void fault_on(struct mig_snap *s, uint64_t p)
{
    save_page(s, p, &s->faulted);
    int rc = unprotect(s, p, 1);
    if (rc)
        fail(s, rc);
}

void mig_snap_before_discard(struct mig_snap *s, const uint8_t *addr, uint64_t len)
{
    if (addr < s->base || (uint64_t)(addr - s->base) + len > s->size)
        return;
    uint64_t end = (uint64_t)(addr - s->base) + len;
    for (uint64_t p = (uint64_t)(addr - s->base) / s->page_size; p * s->page_size < end; p++)
        save_page(s, p, &s->discarded);
}

static void *fault_loop(void *arg)
{
    struct mig_snap *s = arg;
    /* A guest thread waits on each of its faults: above the stream and the guest, as the data planes'. */
    dp_thread_for_faults("snap-fault");
    struct uffd_msg msgs[FAULT_BATCH];
    struct pollfd pfd[2] = {{.fd = s->uffd, .events = POLLIN}, {.fd = s->stop_fd, .events = POLLIN}};
    for (;;) {
        if (poll(pfd, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            fail(s, -errno);
            break;
        }
        if (pfd[1].revents)
            break;
        ssize_t n = read(s->uffd, msgs, sizeof(msgs));
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR)
                continue;
            fail(s, -errno);
            break;
        }
        int64_t t0 = mono_ns();
        for (ssize_t i = 0; i < n / (ssize_t)sizeof(msgs[0]); i++) {
            if (msgs[i].event != UFFD_EVENT_PAGEFAULT || !(msgs[i].arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP))
                continue;
            uint64_t addr = msgs[i].arg.pagefault.address;
            uint64_t base = (uint64_t)(uintptr_t)s->base;
            if (addr < base || addr >= base + s->size)
                continue;
            atomic_fetch_add_explicit(&s->wp_faults, 1, memory_order_relaxed);
            fault_on(s, (addr - base) / s->page_size);
            uint64_t dt = (uint64_t)(mono_ns() - t0);
            atomic_fetch_add_explicit(&s->blocked_ns, dt, memory_order_relaxed);
            if (dt > atomic_load_explicit(&s->max_blocked_ns, memory_order_relaxed))
                atomic_store_explicit(&s->max_blocked_ns, dt, memory_order_relaxed);
        }
    }
    return NULL;
}

/* Unprotect the runs of saved pages in [first, first + count); pages still being copied by the
 * fault thread are skipped: it unprotects them once they are in the file. */
static int unprotect_saved(struct mig_snap *s, uint64_t first, uint64_t count)
{
    uint64_t i = 0;
    while (i < count) {
        while (i < count && atomic_load_explicit(&s->state[first + i], memory_order_acquire) != PAGE_SAVED)
            i++;
        uint64_t start = i;
        while (i < count && atomic_load_explicit(&s->state[first + i], memory_order_acquire) == PAGE_SAVED)
            i++;
        if (i > start) {
            int rc = unprotect(s, first + start, i - start);
            if (rc)
                return rc;
        }
    }
    return 0;
}

/* Save one chunk: claim and copy page by page, write the claimed runs, unprotect. */
static int stream_chunk(struct mig_snap *s, uint8_t *buf, uint8_t *mine, uint64_t first, uint64_t count)
{
    uint32_t ps = s->page_size;
    for (uint64_t i = 0; i < count; i++) {
        uint8_t expect = PAGE_UNSAVED;
        mine[i] = atomic_compare_exchange_strong(&s->state[first + i], &expect, PAGE_COPYING);
        if (mine[i]) {
            memcpy(buf + i * ps, s->base + (first + i) * ps, ps);
            atomic_store_explicit(&s->state[first + i], PAGE_SAVED, memory_order_release);
        }
    }
    uint64_t i = 0, got = 0;
    while (i < count) {
        while (i < count && !mine[i])
            i++;
        uint64_t start = i;
        while (i < count && mine[i])
            i++;
        if (i > start) {
            int rc = write_all(s->out_fd, buf + start * ps, (i - start) * ps, (first + start) * ps);
            if (rc)
                return rc;
            got += i - start;
        }
    }
    atomic_fetch_add_explicit(&s->streamed, got, memory_order_relaxed);
    atomic_fetch_add_explicit(&s->bytes, got * ps, memory_order_relaxed);
    return unprotect_saved(s, first, count);
}

static void *stream_loop(void *arg)
{
    struct mig_snap *s = arg;
    /* Bulk work, as the data planes' bulk threads: SCHED_BATCH at the runner's niceness (dp_common.h
     * says why not niced), so it never preempts a thread that wakes, the fault thread least. */
    dp_thread_for_bulk("snap-stream");
    uint8_t *buf = malloc((size_t)s->chunk * s->page_size);
    uint8_t *mine = malloc(s->chunk);
    if (!buf || !mine)
        fail(s, -ENOMEM);
    for (uint64_t c = 0; c < s->npages && !atomic_load(&s->error) && !atomic_load(&s->cancel); c += s->chunk) {
        uint64_t n = s->npages - c < s->chunk ? s->npages - c : s->chunk;
        int rc = stream_chunk(s, buf, mine, c, n);
        if (rc)
            fail(s, rc);
    }
    free(buf);
    free(mine);
    if (atomic_load(&s->cancel))
        fail(s, -ECANCELED);
    if (!atomic_load(&s->error) && fdatasync(s->out_fd) < 0 && errno != EINVAL)
        fail(s, -errno);
    /* Stop the fault thread; whatever happened, no guest thread may stay blocked. */
    uint64_t one = 1;
    if (write(s->stop_fd, &one, sizeof(one)) < 0)
        fail(s, -errno);
    pthread_join(s->fault_tid, NULL);
    if (atomic_load(&s->error))
        unprotect(s, 0, s->npages);
    pthread_mutex_lock(&s->mu);
    s->t_end = mono_ns();
    atomic_store(&s->done, 1);
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

struct mig_snap *mig_snap_start(int uffd, int out_fd, uint8_t *base, uint64_t size, uint32_t page_size,
                                uint32_t chunk_pages)
{
    if (uffd < 0 || out_fd < 0 || !base || page_size == 0 || size == 0 || size % page_size || chunk_pages == 0) {
        errno = EINVAL;
        return NULL;
    }
    struct mig_snap *s = calloc(1, sizeof(*s));
    if (!s) {
        errno = ENOMEM;
        return NULL;
    }
    s->uffd = uffd;
    s->out_fd = out_fd;
    s->base = base;
    s->size = size;
    s->page_size = page_size;
    s->npages = size / page_size;
    s->chunk = chunk_pages;
    s->state = calloc(s->npages, 1);
    s->stop_fd = eventfd(0, EFD_CLOEXEC);
    pthread_mutex_init(&s->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&s->cv, &ca);
    pthread_condattr_destroy(&ca);
    int err = !s->state ? ENOMEM : s->stop_fd < 0 ? errno : 0;
    s->t_start = mono_ns();
    if (!err && (err = pthread_create(&s->fault_tid, NULL, fault_loop, s)) == 0 &&
        (err = pthread_create(&s->stream_tid, NULL, stream_loop, s)) != 0) {
        uint64_t one = 1;  /* the fault thread runs: stop it */
        if (write(s->stop_fd, &one, sizeof(one)) < 0)
            err = errno;
        pthread_join(s->fault_tid, NULL);
    }
    if (err) {
        if (s->stop_fd >= 0)
            close(s->stop_fd);
        free((void *)s->state);
        pthread_cond_destroy(&s->cv);
        pthread_mutex_destroy(&s->mu);
        free(s);
        errno = err;
        return NULL;
    }
    return s;
}

int mig_snap_wait(struct mig_snap *s, int64_t timeout_ms)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    int64_t due = (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec + (timeout_ms < 0 ? 0 : timeout_ms) * 1000000LL;
    ts.tv_sec = due / 1000000000LL;
    ts.tv_nsec = due % 1000000000LL;
    pthread_mutex_lock(&s->mu);
    while (!atomic_load(&s->done))
        if (pthread_cond_timedwait(&s->cv, &s->mu, &ts) == ETIMEDOUT)
            break;
    int done = atomic_load(&s->done);
    pthread_mutex_unlock(&s->mu);
    return done;
}

void mig_snap_stats(struct mig_snap *s, struct mig_snap_stats *out)
{
    memset(out, 0, sizeof(*out));
    out->pages_total = s->npages;
    out->pages_streamed = atomic_load(&s->streamed);
    out->pages_faulted = atomic_load(&s->faulted);
    out->pages_discarded = atomic_load(&s->discarded);
    out->pages_saved = out->pages_streamed + out->pages_faulted + out->pages_discarded;
    out->wp_faults = atomic_load(&s->wp_faults);
    out->waited = atomic_load(&s->waited);
    out->blocked_ns = atomic_load(&s->blocked_ns);
    out->max_blocked_ns = atomic_load(&s->max_blocked_ns);
    out->bytes_written = atomic_load(&s->bytes);
    out->done = atomic_load(&s->done);
    out->error = atomic_load(&s->error);
    out->elapsed_ns = (uint64_t)((out->done ? s->t_end : mono_ns()) - s->t_start);
}

void mig_snap_free(struct mig_snap *s)
{
    if (!s)
        return;
    atomic_store(&s->cancel, 1);
    pthread_join(s->stream_tid, NULL);
    close(s->stop_fd);
    free((void *)s->state);
    pthread_cond_destroy(&s->cv);
    pthread_mutex_destroy(&s->mu);
    free(s);
}
