/*
 * Synthetic guest: realistic memory content and a
 * deterministic multi-threaded workload engine.
 *
 * Determinism contract: each workload thread owns a disjoint slice of pages
 * and a fixed share of the operations; everything an op does is derived from
 * the thread's RNG state and ops counter.  So the final memory is a pure
 * function of (initial memory, size, page size, workload, seed, total ops,
 * threads), however the threads interleave, and however often they are
 * paused, exported (ops_done, rng, acc) and re-imported elsewhere.
 *
 * All entry points are called by cffi with the GIL released.
 */
#define _GNU_SOURCE
#include "workload.h"
#include "bitmap.h"
#include "mix.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define GOLDEN 0x9E3779B97F4A7C15ULL

/* ------------------------------------------------------------------ utils */

/* splitmix64: the whole RNG state is one u64, easy to export. */
static inline uint64_t rng_next(uint64_t *s)
{
    *s += GOLDEN;
    return mix64(*s);
}

/* Uniform in [0, n) from a uniform 64-bit value (multiply-high). */
static inline uint64_t bounded(uint64_t r, uint64_t n)
{
    return (uint64_t)(((unsigned __int128)r * n) >> 64);
}

static inline uint64_t mulhi(uint64_t a, uint64_t b)
{
    return (uint64_t)(((unsigned __int128)a * b) >> 64);
}

int64_t mig_realtime_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static struct timespec ns_to_ts(int64_t ns)
{
    struct timespec ts = {.tv_sec = ns / 1000000000LL, .tv_nsec = ns % 1000000000LL};
    return ts;
}

/* ------------------------------------------------------------------- fill */

/* Text tokens: exactly 8 bytes each so a page is written a word at a time. */
static const char TOKENS[64][9] = {
    "the     ", "of the  ", "and     ", "to      ", "in a    ", "is      ", "that    ", "for     ",
    "memory  ", "page    ", "kernel  ", "process ", "thread  ", "buffer  ", "request ", "server  ",
    "client  ", "data    ", "value   ", "return  ", "error.  ", "file    ", "system  ", "network ",
    "packet  ", "cache   ", "with    ", "from    ", "this    ", "which   ", "when    ", "will    ",
    "not     ", "are     ", "have    ", "been    ", "would   ", "could   ", "should  ", "there   ",
    "their   ", "about   ", "into    ", "time,   ", "user    ", "over    ", "after   ", "before  ",
    "migrate ", "guest   ", "host    ", "state   ", "fault   ", "handler ", "stream  ", "channel ",
    "config  ", "update  ", "record  ", "index   ", "table   ", "query   ", "result  ", "\n       ",
};

static uint64_t TOKEN_WORDS[64];
static pthread_once_t tokens_once = PTHREAD_ONCE_INIT;

static void tokens_init(void)
{
    for (int i = 0; i < 64; i++)
        TOKEN_WORDS[i] = load64((const uint8_t *)TOKENS[i]);
}

static void fill_page(uint8_t *p, uint32_t page_size, uint64_t seed, uint64_t page)
{
    uint64_t s = mix64(seed * P2 + page * GOLDEN + 0x5851F42D4C957F2DULL);
    uint64_t kind = bounded(rng_next(&s), 100);
    uint32_t nwords = page_size / 8;
    if (kind < 15) {                       /* zero page */
        memset(p, 0, page_size);
    } else if (kind < 55) {                /* text-like: 8-byte tokens, 8 bits of entropy each */
        uint32_t w = 0;
        while (w < nwords) {
            uint64_t r = rng_next(&s);
            for (int k = 0; k < 8 && w < nwords; k++, w++) {
                uint64_t t = TOKEN_WORDS[r & 63];
                switch ((r >> 6) & 3) {     /* variants: as is, Capitalized, "word,", "word." */
                case 1: t ^= 0x20; break;
                case 2: t = (t & 0x00FFFFFFFFFFFFFFULL) | ((uint64_t)',' << 56); break;
                case 3: t = (t & 0x00FFFFFFFFFFFFFFULL) | ((uint64_t)'.' << 56); break;
                }
                r >>= 8;
                store64(p + (uint64_t)w * 8, t);
            }
        }
    } else if (kind < 80) {                /* structured records: 32 bytes each */
        uint64_t base_id = page * 97;
        uint64_t ptr = 0x00007f3a00000000ULL + (page << 12);
        uint32_t w = 0;
        for (uint64_t k = 0; w < nwords; k++) {
            uint64_t r = rng_next(&s);
            uint64_t rec[4];
            rec[0] = base_id + k;
            rec[1] = (r & 1023) | (((r >> 10) & 3) << 32);
            rec[2] = ptr + ((r >> 12) & 63) * 48;
            rec[3] = ((r >> 18) & 7) == 0 ? ((r >> 21) & 0xffff) : 0;
            for (int j = 0; j < 4 && w < nwords; j++, w++)
                store64(p + (uint64_t)w * 8, rec[j]);
        }
    } else {                               /* incompressible */
        for (uint32_t w = 0; w < nwords; w++)
            store64(p + (uint64_t)w * 8, rng_next(&s));
    }
    /* page sizes that are not a multiple of 8 do not exist; be safe anyway */
    for (uint32_t b = nwords * 8; b < page_size; b++)
        p[b] = 0;
}

struct fill_job {
    uint8_t *mem;
    uint32_t page_size;
    uint64_t seed, first, last;
};

static void *fill_thread(void *arg)
{
    struct fill_job *j = arg;
    for (uint64_t pg = j->first; pg < j->last; pg++)
        fill_page(j->mem + pg * j->page_size, j->page_size, j->seed, pg);
    return NULL;
}

void mig_fill_realistic(uint8_t *mem, uint64_t size, uint32_t page_size, uint64_t seed)
{
    if (!mem || page_size == 0)
        return;
    pthread_once(&tokens_once, tokens_init);
    uint64_t npages = size / page_size;
    struct fill_job jobs[2] = {
        {mem, page_size, seed, 0, npages / 2},
        {mem, page_size, seed, npages / 2, npages},
    };
    pthread_t t;
    int threaded = size >= (32ULL << 20) && pthread_create(&t, NULL, fill_thread, &jobs[1]) == 0;
    if (threaded) {
        fill_thread(&jobs[0]);
        pthread_join(t, NULL);
    } else {
        jobs[0].last = npages;
        fill_thread(&jobs[0]);
    }
    /* trailing partial page (size not a page multiple): zero */
    if (npages * page_size < size)
        memset(mem + npages * page_size, 0, size - npages * page_size);
}

/* Incompressible content, for measuring transfers without compression's help. */
void mig_fill_random(uint8_t *mem, uint64_t size, uint64_t seed)
{
    uint64_t s = mix64(seed ^ 0x52414e444f4dULL);
    uint64_t i = 0;
    for (; i + 8 <= size; i += 8) {
        uint64_t r = rng_next(&s);
        memcpy(mem + i, &r, 8);
    }
    for (; i < size; i++)
        mem[i] = (uint8_t)rng_next(&s);
}

/* -------------------------------------------------------------- workloads */

/* A throttled thread that fell this far behind (e.g. blocked on faults)
 * does not burst to catch up: its schedule restarts from now. */
#define MAX_LAG_NS 100000000LL

struct wl_thread {
    struct mig_wl *wl;
    uint32_t idx;
    int started;
    pthread_t tid;
    uint64_t first_page, npages, target;
    _Atomic uint64_t ops_done;
    uint64_t rng, acc;
    _Atomic int64_t first_op_ns, last_op_ns;
    char pad[64];
};

struct mig_wl {
    uint8_t *mem;
    uint64_t size, total_ops;
    uint32_t page_size, n;
    int workload;
    uint64_t seed;
    double rate;                 /* per thread, ops/s; 0 = unlimited */
    _Atomic int stop;
    int running;
    pthread_mutex_t ctl;         /* serializes start/pause/free/set_state */
    pthread_mutex_t mu;          /* protects sleeping and finishing */
    pthread_cond_t cv;           /* wakes sleeping (throttled) threads on pause */
    pthread_cond_t done_cv;      /* signalled when a thread finishes */
    struct wl_thread *t;
    /* Who must hear of a discard (mig_wl_watch_discards, mig_wl_attach_snapshot); a discard
     * holds the read side through its madvise, so a detach waits for discards in flight. */
    pthread_rwlock_t discard_lock;
    uint64_t *removed;
    mig_wl_discard_fn before_discard;
    void *before_discard_ctx;
};

static inline uint8_t *page_ptr(struct wl_thread *th, uint64_t p)
{
    return th->wl->mem + (th->first_page + p) * (uint64_t)th->wl->page_size;
}

static inline void op_write(struct wl_thread *th, uint8_t *page, uint64_t r, uint64_t done)
{
    uint32_t words = th->wl->page_size / 8;
    uint32_t n = 1 + (uint32_t)(r & 7);                /* 8..64 bytes */
    uint64_t off = bounded(r, words - n + 1);
    uint64_t *w = (uint64_t *)(page + off * 8);
    uint64_t v = r ^ (done * P3);
    for (uint32_t k = 0; k < n; k++)
        w[k] = mix64(v + k * GOLDEN);
}

static inline uint64_t op_read(struct wl_thread *th, uint8_t *page, uint64_t r, uint64_t acc)
{
    uint32_t words = th->wl->page_size / 8;
    uint64_t off = bounded(r, words);
    uint64_t v = *(volatile uint64_t *)(page + off * 8);
    return rotl64(acc ^ v, 5) * P2 + 1;
}

/* Balloon: pages [p, p + n) of the thread's slice are given back, as a
 * balloon driver inflating does. MADV_REMOVE frees them from the memfd (or
 * hugetlbfs file) behind a shared mapping; memory it cannot free (a private
 * mapping) is zeroed instead, so the range reads as zeros either way and the
 * run stays deterministic. */
static inline void op_discard(struct wl_thread *th, uint64_t p, uint64_t n)
{
    struct mig_wl *wl = th->wl;
    uint64_t len = n * wl->page_size;
    pthread_rwlock_rdlock(&wl->discard_lock);
    if (wl->before_discard) /* a live snapshot saves what it has not saved yet first */
        wl->before_discard(wl->before_discard_ctx, page_ptr(th, p), len);
    if (madvise(page_ptr(th, p), len, MADV_REMOVE) != 0)
        memset(page_ptr(th, p), 0, len);
    if (wl->removed)       /* after the zap: a scan that takes the bit sees the page's zeros */
        mig_bitmap_set(wl->removed, th->first_page + p, n);
    pthread_rwlock_unlock(&wl->discard_lock);
}

/* One operation; returns the new accumulator. */
static inline uint64_t do_op(struct wl_thread *th, uint64_t done, uint64_t *rng, uint64_t acc)
{
    uint64_t np = th->npages, p, r;
    switch (th->wl->workload) {
    case MIG_WL_SEQ_READ:
        r = rng_next(rng);
        return op_read(th, page_ptr(th, done % np), r, acc);
    case MIG_WL_SEQ_WRITE:
        r = rng_next(rng);
        op_write(th, page_ptr(th, done % np), r, done);
        return acc;
    case MIG_WL_RANDOM_READ:
        p = bounded(rng_next(rng), np);
        r = rng_next(rng);
        return op_read(th, page_ptr(th, p), r, acc);
    case MIG_WL_RANDOM_WRITE:
        p = bounded(rng_next(rng), np);
        r = rng_next(rng);
        op_write(th, page_ptr(th, p), r, done);
        return acc;
    case MIG_WL_HOTSET:
    case MIG_WL_ZIPF: {
        uint64_t u = rng_next(rng);
        if (th->wl->workload == MIG_WL_HOTSET) {
            uint64_t hot = np / 10 ? np / 10 : 1;
            uint64_t v = rng_next(rng);
            if (bounded(u, 10) < 9 || hot >= np)   /* 90% of accesses on 10% of pages */
                p = bounded(v, hot);
            else
                p = hot + bounded(v, np - hot);
        } else {
            /* x = u^4 on [0,1): density ~ x^-3/4, a cheap heavy skew */
            uint64_t u2 = mulhi(u, u);
            p = mulhi(mulhi(u2, u2), np);
        }
        r = rng_next(rng);
        if ((r >> 62) != 0) {                       /* 75% writes */
            op_write(th, page_ptr(th, p), r, done);
            return acc;
        }
        return op_read(th, page_ptr(th, p), r, acc);
    }
    case MIG_WL_BALLOON: {                          /* 1 op in 16 discards up to 16 pages, the rest reuse */
        uint64_t u = rng_next(rng);
        r = rng_next(rng);
        if (bounded(u, 16) == 0) {
            uint64_t n = 1 + bounded(r, np < 16 ? np : 16);
            op_discard(th, bounded(rng_next(rng), np - n + 1), n);
            return acc;
        }
        p = bounded(rng_next(rng), np);
        if ((r >> 62) == 0)                         /* 25% reads (zeros on a discarded page) */
            return op_read(th, page_ptr(th, p), r, acc);
        op_write(th, page_ptr(th, p), r, done);
        return acc;
    }
    default:                                        /* idle: touches nothing */
        return acc;
    }
}

/* Sleep until mono time `due` unless a pause is requested; returns 1 if stopping. */
static int sleep_until(struct mig_wl *wl, int64_t due)
{
    int stop = 0;
    pthread_mutex_lock(&wl->mu);
    while (!(stop = atomic_load(&wl->stop)) && mono_ns() < due) {
        struct timespec ts = ns_to_ts(due);
        pthread_cond_timedwait(&wl->cv, &wl->mu, &ts);
    }
    pthread_mutex_unlock(&wl->mu);
    return stop;
}

static void *wl_run(void *arg)
{
    struct wl_thread *th = arg;
    struct mig_wl *wl = th->wl;
    uint64_t done = atomic_load_explicit(&th->ops_done, memory_order_relaxed);
    uint64_t target = th->target, rng = th->rng, acc = th->acc;
    double rate = wl->rate;
    uint64_t every = 1;
    if (rate > 0) {
        double e = rate / 2000.0;                   /* check the clock ~2000 times/s */
        every = e < 1 ? 1 : e > 256 ? 256 : (uint64_t)e;
    }
    int64_t t0 = mono_ns();
    uint64_t base = done;
    if (done < target)
        atomic_store(&th->first_op_ns, mig_realtime_ns());
    while (done < target) {
        if (atomic_load_explicit(&wl->stop, memory_order_relaxed))
            break;
        if (rate > 0 && (done - base) % every == 0) {
            int64_t now = mono_ns();
            int64_t due = t0 + (int64_t)((double)(done - base) * 1e9 / rate);
            if (now - due > MAX_LAG_NS) {
                t0 = now;
                base = done;
            } else if (now < due && sleep_until(wl, due)) {
                break;
            }
        }
        acc = do_op(th, done, &rng, acc);
        done++;
        atomic_store_explicit(&th->ops_done, done, memory_order_release);
    }
    th->rng = rng;
    th->acc = acc;
    atomic_store(&th->last_op_ns, mig_realtime_ns());
    if (done >= target) {
        pthread_mutex_lock(&wl->mu);
        pthread_cond_broadcast(&wl->done_cv);
        pthread_mutex_unlock(&wl->mu);
    }
    return NULL;
}

struct mig_wl *mig_wl_new(uint8_t *mem, uint64_t size, uint32_t page_size, int workload_id,
                          uint64_t seed, uint64_t total_ops, uint32_t nthreads, double ops_per_sec)
{
    if (!mem || page_size < 64 || page_size % 8 || size == 0 || size % page_size ||
        workload_id < 0 || workload_id >= MIG_WL_COUNT || nthreads < 1 || nthreads > 4096 ||
        !(ops_per_sec >= 0) || size / page_size < nthreads) {
        errno = EINVAL;
        return NULL;
    }
    struct mig_wl *wl = calloc(1, sizeof(*wl));
    struct wl_thread *t = calloc(nthreads, sizeof(*t));
    if (!wl || !t) {
        free(wl);
        free(t);
        errno = ENOMEM;
        return NULL;
    }
    wl->mem = mem;
    wl->size = size;
    wl->page_size = page_size;
    wl->workload = workload_id;
    wl->seed = seed;
    wl->total_ops = total_ops;
    wl->n = nthreads;
    wl->rate = ops_per_sec / nthreads;
    wl->t = t;
    pthread_mutex_init(&wl->ctl, NULL);
    pthread_mutex_init(&wl->mu, NULL);
    pthread_rwlock_init(&wl->discard_lock, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&wl->cv, &ca);
    pthread_cond_init(&wl->done_cv, &ca);
    pthread_condattr_destroy(&ca);
    uint64_t npages = size / page_size;
    for (uint32_t i = 0; i < nthreads; i++) {
        struct wl_thread *th = &t[i];
        th->wl = wl;
        th->idx = i;
        th->first_page = npages * i / nthreads;
        th->npages = npages * (i + 1) / nthreads - th->first_page;
        th->target = total_ops / nthreads + (i < total_ops % nthreads ? 1 : 0);
        uint64_t s = seed * P1 ^ ((uint64_t)(workload_id + 1) * P3) ^ ((uint64_t)(i + 1) * P4);
        th->rng = rng_next(&s);
        th->acc = 0;
    }
    return wl;
}

uint32_t mig_wl_nthreads(struct mig_wl *h) { return h ? h->n : 0; }

int mig_wl_start(struct mig_wl *h)
{
    if (!h)
        return -EINVAL;
    pthread_mutex_lock(&h->ctl);
    if (h->running) {
        pthread_mutex_unlock(&h->ctl);
        return -EBUSY;
    }
    atomic_store(&h->stop, 0);
    int err = 0;
    for (uint32_t i = 0; i < h->n; i++) {
        struct wl_thread *th = &h->t[i];
        th->started = 0;
        if (atomic_load(&th->ops_done) >= th->target)
            continue;
        int rc = pthread_create(&th->tid, NULL, wl_run, th);
        if (rc) {
            err = -rc;
            break;
        }
        th->started = 1;
    }
    h->running = 1;
    pthread_mutex_unlock(&h->ctl);
    if (err)
        mig_wl_pause(h);
    return err;
}

int mig_wl_pause(struct mig_wl *h)
{
    if (!h)
        return -EINVAL;
    pthread_mutex_lock(&h->ctl);
    if (h->running) {
        pthread_mutex_lock(&h->mu);
        atomic_store(&h->stop, 1);
        pthread_cond_broadcast(&h->cv);
        pthread_mutex_unlock(&h->mu);
        for (uint32_t i = 0; i < h->n; i++) {
            if (h->t[i].started) {
                pthread_join(h->t[i].tid, NULL);
                h->t[i].started = 0;
            }
        }
        h->running = 0;
        atomic_store(&h->stop, 0);
    }
    pthread_mutex_unlock(&h->ctl);
    return 0;
}

void mig_wl_watch_discards(struct mig_wl *h, uint64_t *removed)
{
    pthread_rwlock_wrlock(&h->discard_lock);
    h->removed = removed;
    pthread_rwlock_unlock(&h->discard_lock);
}

void mig_wl_before_discard(struct mig_wl *h, mig_wl_discard_fn fn, void *ctx)
{
    pthread_rwlock_wrlock(&h->discard_lock);
    h->before_discard = fn;
    h->before_discard_ctx = ctx;
    pthread_rwlock_unlock(&h->discard_lock);
}

void mig_wl_free(struct mig_wl *h)
{
    if (!h)
        return;
    mig_wl_pause(h);
    pthread_cond_destroy(&h->cv);
    pthread_cond_destroy(&h->done_cv);
    pthread_mutex_destroy(&h->mu);
    pthread_mutex_destroy(&h->ctl);
    pthread_rwlock_destroy(&h->discard_lock);
    free(h->t);
    free(h);
}

int mig_wl_get_thread_state(struct mig_wl *h, uint32_t i, mig_wl_thread_state *out)
{
    if (!h || !out || i >= h->n)
        return -EINVAL;
    struct wl_thread *th = &h->t[i];
    out->ops_done = atomic_load_explicit(&th->ops_done, memory_order_acquire);
    out->ops_target = th->target;
    out->rng = th->rng;          /* exact only while paused */
    out->acc = th->acc;
    out->first_op_ns = atomic_load(&th->first_op_ns);
    out->last_op_ns = atomic_load(&th->last_op_ns);
    out->first_page = th->first_page;
    out->npages = th->npages;
    return 0;
}

int mig_wl_set_thread_state(struct mig_wl *h, uint32_t i, uint64_t ops_done, uint64_t rng, uint64_t acc)
{
    if (!h || i >= h->n)
        return -EINVAL;
    pthread_mutex_lock(&h->ctl);
    int rc = 0;
    if (h->running)
        rc = -EBUSY;
    else if (ops_done > h->t[i].target)
        rc = -ERANGE;
    else {
        atomic_store(&h->t[i].ops_done, ops_done);
        h->t[i].rng = rng;
        h->t[i].acc = acc;
    }
    pthread_mutex_unlock(&h->ctl);
    return rc;
}

int mig_wl_limit_thread(struct mig_wl *h, uint32_t i, uint64_t target)
{
    if (!h || i >= h->n)
        return -EINVAL;
    pthread_mutex_lock(&h->ctl);
    int rc = h->running ? -EBUSY : target > h->t[i].target ? -ERANGE : 0;
    if (!rc)
        h->t[i].target = target;
    pthread_mutex_unlock(&h->ctl);
    return rc;
}

uint64_t mig_wl_ops_done(struct mig_wl *h)
{
    uint64_t sum = 0;
    if (h)
        for (uint32_t i = 0; i < h->n; i++)
            sum += atomic_load_explicit(&h->t[i].ops_done, memory_order_relaxed);
    return sum;
}

uint64_t mig_wl_ops_total(struct mig_wl *h) { return h ? h->total_ops : 0; }

int mig_wl_finished(struct mig_wl *h)
{
    if (!h)
        return 0;
    for (uint32_t i = 0; i < h->n; i++)
        if (atomic_load_explicit(&h->t[i].ops_done, memory_order_relaxed) < h->t[i].target)
            return 0;
    return 1;
}

int mig_wl_running(struct mig_wl *h) { return h ? h->running : 0; }

int mig_wl_wait_finished(struct mig_wl *h, int64_t timeout_ms)
{
    if (!h)
        return 0;
    int64_t due = mono_ns() + (timeout_ms < 0 ? 0 : timeout_ms) * 1000000LL;
    pthread_mutex_lock(&h->mu);
    int fin;
    while (!(fin = mig_wl_finished(h)) && mono_ns() < due) {
        struct timespec ts = ns_to_ts(due);
        pthread_cond_timedwait(&h->done_cv, &h->mu, &ts);
    }
    pthread_mutex_unlock(&h->mu);
    return fin;
}
