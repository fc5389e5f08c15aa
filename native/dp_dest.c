/* The native data plane, destination side (see dp_dest.h).
 *
 * Bulk path: a requester thread plans requests from a cursor over the
 * received bitmap and the `asked` bitmap (a page is claimed with an atomic
 * test-and-set, so neither path asks for a page the other has in flight) and
 * keeps a window in flight; a receiver thread reads frames into slots of a
 * ring (small frames packed many to a slot, from a staging buffer: one
 * recv() for many of them; a large frame's data read straight into its
 * slot); two installer threads verify each frame completely and install it
 * (UFFDIO_COPY / UFFDIO_ZEROPAGE runs, or pwrite() into the memfd), then set
 * the bitmap bits. A frame is installed only once fully received and
 * verified: a peer that dies mid-batch leaves no half-installed page.
 *
 * Fault path: one thread polls the userfaultfd and its own connection.
 *
 * Link loss (error, EOF, or a blackhole noticed by TCP_USER_TIMEOUT and
 * keepalive): the requests in flight are written off (their pages' asked
 * bits cleared), and the path reconnects with backoff until its recovery
 * timeout; the bitmap stays the truth. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "bitmap.h"
#include "dirty.h"
#include "dp_common.h"
#include "dp_dest.h"
#include "dp_wire.h"
#include "pages.h"

/* ---- limits ---- */

#define WINDOW_BYTES (8u << 20)    /* pages asked and not yet installed, in bytes */
#define WINDOW_REQUESTS 64
/* A native fault at random on a page the bulk path has in flight waits for
 * it only when less than this much data comes before it (the bulk's earlier
 * requests and the pages ahead of it in its own: ~0.1 ms at the bulk's
 * rate, about a fault's round trip); deeper in the window the fault path
 * asks the page itself at once (one page on the wire twice), so the window
 * stays whole while the guest faults at random. A sequential walk
 * (walking()) waits and narrows the window instead: asking each page it
 * meets in the window walks the window page by page (seq-write, 2 vCPUs:
 * 9534 pages asked so, 3 % of the guest's pages came twice). */
#define FAULT_WAIT_AHEAD_BYTES (256u << 10)
#define WALK_FAULTS 4              /* a fault at most WALK_PAGES after one of the last WALK_FAULTS: a walk */
#define WALK_PAGES (2 * NEIGHBOURHOOD)
/* While faults that wait for any page the bulk has in flight come
 * (mig_dpd_jump: the gRPC fault path's, and a native sequential walk), the
 * window shrinks to this: such a fault waits behind what is in flight
 * before its page, and a whole window's traffic delays the gRPC path's
 * replies (its p99 under the bulk went from ~1.3x to 2-8x its bulk-off p99
 * with the window whole). */
#define FAULTING_WINDOW_BYTES (1u << 20)
#define FAULTING_NS 20000000       /* "while the guest faults": a fault (a jump) within this long */
/* While the guest faults at random, the window holds what the bulk brings in
 * this long (at least FAULTING_WINDOW_BYTES), fitted to how long its
 * requests took to be answered: a page in flight is no fault's prefetch, and
 * a bulk the CPUs starve (guests that run, a drain: 30-90 MiB/s) would hold
 * a whole window's pages for 0.1-0.3 s, the guests faulting on them one by
 * one; a bulk at full speed keeps its whole window (~3.5 ms of traffic). */
#define WINDOW_DELAY_NS 5000000
/* The windows count data: a zero page costs no bytes on the wire, no buffer and
 * (lazy, or a hole in pre-copy) no install, so they grow by 1 / (the share of
 * data among the pages installed lately), at most ZERO_STRETCH times. A zero
 * region moves at the request rate, not at a data window per round trip. */
#define ZERO_STRETCH 64
#define SHARE_ONE 1024             /* data_share's scale */
#define REQ_SLOTS 128              /* > WINDOW_REQUESTS: a request id's slot is free when it is reused */
#define NSLOTS 8                   /* ring of receive slots */
#define STAGE_BYTES (64u << 10)    /* receiver's staging buffer for headers and small frames */
#define FRAME_ALIGN 64             /* a frame's data starts 64-byte aligned in its slot */
#define MAX_REFUSED 100
#define NEIGHBOURHOOD 16           /* pages a fault path prefetches by default: the fault's aligned block */
#define FAULT_REQS 1024            /* fault path: requests in flight (a power of two) */
#define MAX_WAITING 4096           /* fault path: faults waiting for their page */
#define FAULTS_PER_READ 256
/* fault path: room for the requests of one read's faults (each page alone, then its neighbourhood) */
#define FAULT_OUT_BYTES (FAULTS_PER_READ * (2 * sizeof(struct dp_request) + (1 + MIG_DPD_MAX_NEIGHBOURHOOD) * sizeof(struct dp_run)))
#define CONNECT_TIMEOUT_MS 1000    /* also bounds how long a stop waits for a connection attempt */
#define HELLO_TIMEOUT_MS 1000
#define FAULT_PATIENCE_NS 500000   /* a fault waits this long for a page the bulk path asked, then asks itself */
#define FIRST_CONNECT_S 5.0        /* mig_dpd_*_new keeps trying this long */
#define BACKOFF_MIN_MS 50
#define BACKOFF_MAX_MS 1000

enum role { ROLE_BULK, ROLE_FAULT };
enum link_state { LINK_UP, LINK_DOWN };

/* ---- small helpers ---- */

static void add(uint64_t *c, uint64_t v)
{
    __atomic_fetch_add(c, v, __ATOMIC_RELAXED);
}

static void put(uint64_t *c, uint64_t v)
{
    __atomic_store_n(c, v, __ATOMIC_RELAXED);
}

static uint64_t get(const uint64_t *c)
{
    return __atomic_load_n(c, __ATOMIC_RELAXED);
}

static void deadline_in(struct timespec *ts, uint64_t ns)
{
    clock_gettime(CLOCK_MONOTONIC, ts);
    uint64_t t = (uint64_t)ts->tv_nsec + ns;
    ts->tv_sec += (time_t)(t / 1000000000ULL);
    ts->tv_nsec = (long)(t % 1000000000ULL);
}

/* ---- the connection to the source ---- */

struct link {
    char host[256];
    uint16_t port;
    uint8_t key[DP_KEY_LEN];
    uint32_t kind;
    uint32_t page_size;
    uint64_t npages;
    double recovery_s;
    int stopfd; /* eventfd: readable once the path stops */
};

static int stopped(const struct link *l)
{
    struct pollfd p = {.fd = l->stopfd, .events = POLLIN};
    return poll(&p, 1, 0) > 0;
}

/* Sleep ms unless the path stops first (returns 1 then). */
static int nap(const struct link *l, int ms)
{
    struct pollfd p = {.fd = l->stopfd, .events = POLLIN};
    return poll(&p, 1, ms) > 0;
}

/* One connection attempt: connect, tune, hello. Returns the socket or
 * -errno with a reason in why. */
static int dial(const struct link *l, char *why, size_t why_len)
{
    int fd = dp_connect(l->host, l->port, CONNECT_TIMEOUT_MS, l->kind == DP_KIND_BULK);
    if (fd < 0) {
        snprintf(why, why_len, "connect: %s", strerror(-fd));
        return fd;
    }
    int r;
    struct timeval tv = {.tv_sec = HELLO_TIMEOUT_MS / 1000, .tv_usec = (HELLO_TIMEOUT_MS % 1000) * 1000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    struct dp_hello hello = {.version = DP_VERSION, .kind = l->kind};
    memcpy(hello.magic, DP_MAGIC, DP_MAGIC_LEN);
    memcpy(hello.key, l->key, DP_KEY_LEN);
    struct dp_hello_reply reply;
    r = dp_send_full(fd, &hello, sizeof(hello));
    if (!r) {
        ssize_t n = dp_read_full(fd, &reply, sizeof(reply));
        r = n == (ssize_t)sizeof(reply) ? 0 : n < 0 ? (int)n : -ECONNRESET;
    }
    if (r) {
        snprintf(why, why_len, "hello: %s", r == -ECONNRESET ? "the source closed the connection (wrong key?)"
                                                              : r == -EAGAIN ? "no reply" : strerror(-r));
    } else if (memcmp(reply.magic, DP_MAGIC, DP_MAGIC_LEN) || reply.status) {
        snprintf(why, why_len, "hello refused (status %u)", reply.status);
        r = -EPROTO;
    } else if (reply.page_size != l->page_size || reply.npages != l->npages) {
        snprintf(why, why_len, "the source serves %llu pages of %u bytes, not %llu of %u",
                 (unsigned long long)reply.npages, reply.page_size, (unsigned long long)l->npages, l->page_size);
        r = -EPROTO;
    }
    if (r) {
        close(fd);
        return r;
    }
    tv.tv_sec = tv.tv_usec = 0;
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    return fd;
}

/* Connect with backoff (50 ms doubling to 1 s) for up to limit_s seconds.
 * Returns the socket, or -errno with the last reason in why (-ECANCELED
 * when the path stops). */
static int redial(const struct link *l, double limit_s, char *why, size_t why_len)
{
    uint64_t give_up = (uint64_t)dp_mono_ns() + (uint64_t)(limit_s * 1e9);
    int backoff = BACKOFF_MIN_MS;
    for (;;) {
        if (stopped(l))
            return -ECANCELED;
        int fd = dial(l, why, why_len);
        if (fd >= 0 || fd == -ECANCELED)
            return fd;
        if ((uint64_t)dp_mono_ns() >= give_up)
            return fd;
        if (nap(l, backoff))
            return -ECANCELED;
        backoff = backoff * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : backoff * 2;
    }
}

/* ---- frames ---- */

/* Does a batch header frame sanely (sizes within bounds)? If not, the
 * stream cannot be followed any further. */
static int framing_ok(const struct dp_batch *b, uint32_t max_data)
{
    return b->magic == DP_BATCH_MAGIC && b->count >= 1 && b->count <= DP_BATCH_PAGES && b->nruns >= 1 &&
           b->nruns <= b->count && b->nzero_pairs <= DP_BATCH_PAGES / 2 + 1 && b->data_len <= max_data &&
           b->raw_len <= max_data;
}

/* The bytes between a frame's header and its data: page runs, zero runs. */
static uint64_t frame_runs_len(const struct dp_batch *b)
{
    return sizeof(struct dp_run) * (uint64_t)b->nruns + 8ull * b->nzero_pairs;
}

static uint64_t frame_len(const struct dp_batch *b)
{
    return sizeof(*b) + frame_runs_len(b) + b->data_len;
}

/* The k-th page run of a frame (read whole: a frame may lie unaligned). */
static struct dp_run frame_run(const uint8_t *frame, uint32_t k)
{
    struct dp_run r;
    memcpy(&r, frame + sizeof(struct dp_batch) + k * sizeof(r), sizeof(r));
    return r;
}

/* ---- the handle ---- */

struct req {
    uint64_t id;      /* 0: slot free */
    uint64_t t_ns;    /* bulk: when it was sent */
    uint32_t total;   /* pages asked */
    uint32_t due;     /* pages still to come */
    uint32_t nruns;
    uint32_t at;      /* the run the last frame settled fell in: the source answers runs in order */
    struct dp_run *runs;
};

struct slot {
    uint8_t *buf;
    uint32_t nframes;
    uint32_t len;
    uint32_t *offs; /* frame offsets */
};

struct waiting {      /* fault path: a fault whose page is not in yet */
    uint64_t page, t_ns;
    uint32_t waiters;
    uint32_t asked;   /* the fault path asked for the page itself */
};

struct mig_dpd {
    int role;
    struct link link;
    int target_fd, to_memfd;
    struct mig_space *space; /* the userfaultfd's (NULL into a memfd): its region table and lock */
    uint32_t page_size;
    uint64_t npages;
    uint64_t *received, *asked;
    uint32_t batch_pages; /* most pages a batch may carry */
    uint32_t max_data;    /* most data bytes a frame may carry */
    uint32_t slot_bytes;
    struct mig_dpd_counters c;
    char error[512];
    int failed;           /* error is set (read with acquire) */

    pthread_mutex_t mu;
    pthread_cond_t cond;  /* any state change: waiters re-check */
    pthread_cond_t ended; /* mig_dpd_wait's: the round ended, or the path finished (not every frame's wakeup) */
    int fd;               /* the connection; -1 while down */
    int sending;          /* requester threads in send() on fd */
    int stopping;
    int finished;         /* threads must exit */
    uint64_t down_since;  /* when the last byte arrived before a loss */
    uint64_t last_rx_ns;
    uint64_t refused;

    /* bulk */
    int started, has_receiver, has_requester;
    pthread_t requester, receiver, installers[2];
    int ninstallers;
    struct req reqs[REQ_SLOTS];
    struct dp_run *run_store;
    uint32_t nreq;
    uint64_t inflight_pages, next_id;
    uint64_t window_pages, request_pages;
    uint64_t data_share;      /* of the pages installed lately, the data ones, in SHARE_ONE-ths (a moving average) */
    uint64_t cursor, jump_to; /* jump_to: UINT64_MAX when none */
    uint64_t jumped_ns;       /* when mig_dpd_jump last moved the cursor */
    uint64_t followed_ns;     /* when a fault last moved it */
    uint64_t fit_pages;       /* the window fitted to WINDOW_DELAY_NS (0: not yet measured) */
    struct dp_run *planq;     /* the plan queue (a ring of MIG_DPD_PLAN_RUNS, allocated on first use) */
    uint32_t pq_head, pq_len;
    int plan_only;            /* ask only what the plan queue names (the cursor waits) */
    int round_active, stop_asking;
    int dry;                  /* the last plan found nothing to ask */
    int rounds;               /* pull rounds begun (a memfd target's later rounds rewrite stale pages) */
    uint32_t watched;         /* faults waiting for pages this bulk path asked: its installs are signalled */
    int installed_fd;         /* eventfd: the bulk path installed pages while `watched` (the fault path polls it) */
    uint64_t rate, round_deadline, round_t0, round_bytes0;
    struct slot slots[NSLOTS];
    int free_slots[NSLOTS], nfree;
    int queue[NSLOTS], qhead, qlen;
    int busy;             /* installers working on a slot */

    /* fault */
    struct mig_dpd *bulk;
    pthread_t faulter;
    struct req freqs[FAULT_REQS];
    struct dp_run *frun_store;
    struct waiting *waiting;
    uint32_t nwaiting;
    uint64_t *samples;
    uint64_t nsamples;
    uint64_t nb;          /* neighbourhood: pages | shape << 16 | (uint32_t)stride << 32, set by a policy */
    uint64_t *pf;         /* pages this path prefetched, not yet counted as hits */
    uint64_t *history;    /* the newest faults (MIG_DPD_HISTORY), written at history_head */
    uint64_t history_head;
};

/* The round ended, or the path finished: wake every waiter, mig_dpd_wait's
 * too (only then: woken by every slot installed, it cost a pre-copy round
 * of a scattered set a futex call and a lock per frame). (lock held) */
static void announce_end(struct mig_dpd *h)
{
    pthread_cond_broadcast(&h->cond);
    pthread_cond_broadcast(&h->ended);
}

__attribute__((format(printf, 2, 3))) static void fail(struct mig_dpd *h, const char *fmt, ...)
{
    pthread_mutex_lock(&h->mu);
    if (!h->failed) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(h->error, sizeof(h->error), fmt, ap);
        va_end(ap);
        __atomic_store_n(&h->failed, 1, __ATOMIC_RELEASE);
    }
    h->finished = 1;
    if (h->fd >= 0)
        shutdown(h->fd, SHUT_RDWR);
    announce_end(h);
    pthread_mutex_unlock(&h->mu);
}

/* Clear the asked bits of a request's pages: they will be asked again. */
static void forget(struct mig_dpd *h, const struct req *r)
{
    for (uint32_t i = 0; i < r->nruns; i++)
        mig_bitmap_clear(h->asked, r->runs[i].first_page, r->runs[i].count);
}

/* Does the request cover pages [first, first + count) within one run?
 * The search starts at the run the last frame fell in: frames come in the
 * order of the runs, so a request of n one-page runs costs O(n), not O(n^2). */
static int covers(struct req *r, uint64_t first, uint32_t count)
{
    for (uint32_t k = 0, i = r->at < r->nruns ? r->at : 0; k < r->nruns; k++, i = i + 1 < r->nruns ? i + 1 : 0)
        if (first >= r->runs[i].first_page && first + count <= r->runs[i].first_page + r->runs[i].count) {
            r->at = i;
            return 1;
        }
    return 0;
}

/* ---- faults waiting for the bulk path's pages ---- */

/* Tell the bulk path how many faults wait for pages it asked for. */
static void set_watched(struct mig_dpd *bulk, uint32_t n)
{
    if (bulk)
        __atomic_store_n(&bulk->watched, n, __ATOMIC_RELEASE);
}

/* Installed pages: the fault path looks at once if faults wait for the bulk
 * path's pages (UFFDIO_COPY has woken the guest: the fault's latency ends
 * now, not when the fault path next wakes, and its patience does not run
 * out on a page already in, which it would ask for again). */
static void signal_installed(struct mig_dpd *h)
{
    uint64_t one = 1;
    if (__atomic_load_n(&h->watched, __ATOMIC_ACQUIRE) && write(h->installed_fd, &one, sizeof(one)) < 0)
        return; /* the counter is full: the fault path has plenty to read */
}

/* ---- verify and install one frame ---- */

enum verdict { INSTALLED, REFUSED };

struct installer_ctx {
    ZSTD_DCtx *dctx;      /* made at the first compressed frame */
    uint8_t *scratch;     /* decompressed data */
    uint64_t lat_done_ns; /* when the last install finished */
};

/* Write a piece of a verified frame into the memfd (pre-copy, before the
 * switch), then set its bits. Adds to *st. Returns 0 or -errno. */
static int write_piece(struct mig_dpd *h, const struct mig_piece *pc, struct mig_install_stats *st)
{
    const uint64_t ps = h->page_size, len = pc->count * ps;
    if (!pc->src) {
        /* The first round finds holes; a later one may find a stale copy (its bit cleared, not
         * punched: precopy.unmark), which a zero page must not leave behind. */
        int err = h->rounds > 1 ? mig_punch_pages(h->target_fd, pc->page, pc->count, ps) : 0;
        if (err)
            return err;
        st->zeroed += pc->count;
    }
    for (uint64_t off = 0; pc->src && off < len;) {
        ssize_t n = pwrite(h->target_fd, pc->src + off, len - off, (off_t)(pc->page * ps + off));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return n < 0 ? -errno : -EIO;
        off += (uint64_t)n;
    }
    st->copied += pc->src ? pc->count : 0;
    mig_bitmap_set(h->received, pc->page, pc->count);
    return 0;
}

/* Put a verified frame's pieces in place: into the userfaultfd, all under
 * one hold of the space's lock (mig_install_pieces), or written into the
 * memfd. Adds to *st. Returns 0 or -errno. */
static int place_pieces(struct mig_dpd *h, const struct mig_piece *pieces, uint32_t n, struct mig_install_stats *st)
{
    if (!h->to_memfd) {
        int64_t r = mig_install_pieces(h->space, h->received, pieces, n, st);
        return r < 0 ? (int)r : 0;
    }
    for (uint32_t i = 0; i < n; i++) {
        int r = write_piece(h, &pieces[i], st);
        if (r < 0)
            return r;
    }
    return 0;
}

/* Verify a whole frame (shape, page runs, sizes, zstd frame, checksum) and
 * install its runs in order, each with its share of the zero runs and of
 * the data. Returns INSTALLED, REFUSED, or -errno when installing failed.
 * *st gets what the install did. */
static int install_frame(struct mig_dpd *h, struct installer_ctx *ctx, const uint8_t *frame,
                         struct mig_install_stats *st, struct dp_batch *hdr)
{
    memcpy(hdr, frame, sizeof(*hdr));
    if (hdr->count > h->batch_pages) /* framing_ok bounds the rest: nruns <= count, nzero_pairs */
        return REFUSED;
    struct dp_run pruns[DP_BATCH_PAGES];
    uint32_t zero[2 * (DP_BATCH_PAGES / 2 + 1)];
    const uint8_t *at = frame + sizeof(*hdr);
    memcpy(pruns, at, hdr->nruns * sizeof(*pruns));
    memcpy(zero, at + hdr->nruns * sizeof(*pruns), 8ull * hdr->nzero_pairs);
    const uint8_t *payload = at + frame_runs_len(hdr);
    uint64_t pages = 0;
    for (uint32_t k = 0; k < hdr->nruns; k++) {
        const struct dp_run *r = &pruns[k];
        if (r->count == 0 || r->first_page >= h->npages || r->count > h->npages - r->first_page)
            return REFUSED;
        pages += r->count;
    }
    uint32_t bad;
    int64_t zero_pages = mig_zero_pages(hdr->count, zero, hdr->nzero_pairs, &bad);
    uint64_t need = zero_pages < 0 ? 0 : (hdr->count - (uint64_t)zero_pages) * h->page_size;
    if (pages != hdr->count || zero_pages < 0 || hdr->raw_len != need)
        return REFUSED;
    const uint8_t *data = payload;
    if (hdr->encoding == DP_ZSTD) {
        const char *why;
        if (!ctx->dctx) /* at the first compressed frame: a path never sent one (a loopback peer's, a fault
                         * path's) never loads zstd nor sets a context up while pages wait */
            ctx->dctx = dp_zstd_dctx();
        if (!ctx->dctx || dp_zstd_decompress(ctx->dctx, ctx->scratch, need, payload, hdr->data_len, &why))
            return REFUSED;
        data = ctx->scratch;
    } else if (hdr->encoding != DP_RAW || hdr->data_len != need) {
        return REFUSED;
    }
    struct dp_digest d;
    dp_digest_init(&d);
    dp_digest_update(&d, pruns, hdr->nruns * sizeof(*pruns));
    dp_digest_update(&d, data, need);
    dp_digest_update(&d, zero, 8ull * hdr->nzero_pairs);
    if (dp_digest_final(&d) != hdr->checksum)
        return REFUSED;
    memset(st, 0, sizeof(*st));
    /* Cut into pieces, in the frame's page order (numbered from 0 over its
     * runs): a stretch of one run that is all zero (a zero run may span runs)
     * or all data; at most one a page. A scattered set's runs of a page or
     * two cost one ioctl each and no more: no per-run check, copy of zero
     * runs, clock read or lock. */
    struct mig_piece pieces[DP_BATCH_PAGES];
    uint32_t npieces = 0, z = 0, base = 0; /* base: the frame's number of run k's first page */
    for (uint32_t k = 0; k < hdr->nruns; base += pruns[k].count, k++) {
        const uint32_t end = base + pruns[k].count;
        for (uint32_t p = base, stop; p < end; p = stop) {
            while (z < hdr->nzero_pairs && zero[2 * z] + zero[2 * z + 1] <= p)
                z++;
            int is_zero = z < hdr->nzero_pairs && zero[2 * z] <= p;
            stop = z < hdr->nzero_pairs ? (is_zero ? zero[2 * z] + zero[2 * z + 1] : zero[2 * z]) : end;
            stop = stop < end ? stop : end;
            pieces[npieces++] = (struct mig_piece){pruns[k].first_page + (p - base), stop - p, is_zero ? NULL : data};
            data += is_zero ? 0 : (uint64_t)(stop - p) * h->page_size;
        }
    }
    int r = place_pieces(h, pieces, npieces, st);
    if (r < 0)
        return r;
    st->done_ns = (uint64_t)dp_mono_ns();
    return INSTALLED;
}

/* Count what installing `batches` batches did (st: their sums). */
static void count_install(struct mig_dpd *h, const struct mig_install_stats *st, uint64_t batches)
{
    uint64_t installed = st->copied + st->zeroed;
    add(&h->c.pages, installed);
    add(&h->c.zero, st->zeroed);
    add(&h->c.zero_lazy, st->lazy);
    add(&h->c.bytes_pages, installed * h->page_size);
    add(&h->c.duplicates, st->skipped + st->eexist);
    add(&h->c.batches, batches);
}

/* A refused frame: count it; past MAX_REFUSED the path fails. (lock held) */
static int refuse(struct mig_dpd *h, const struct dp_batch *b)
{
    add(&h->c.refused, 1);
    if (++h->refused <= MAX_REFUSED)
        return 0;
    pthread_mutex_unlock(&h->mu);
    fail(h, "the source at %s:%u sent %d corrupt batches (the last of %u pages, for request %llu); gave up",
         h->link.host, h->link.port, MAX_REFUSED + 1, b->count, (unsigned long long)b->req_id);
    pthread_mutex_lock(&h->mu);
    return -1;
}

/* ---- bulk: planning ---- */

/* Runs of set bits of a word: calls emit(first_page, count) for each, in
 * order, merging with the previous run across words. */
static uint32_t append_runs(struct dp_run *runs, uint32_t nruns, uint64_t base, uint64_t bits)
{
    while (bits) {
        unsigned s = (unsigned)__builtin_ctzll(bits);
        uint64_t shifted = bits >> s;
        unsigned len = ~shifted ? (unsigned)__builtin_ctzll(~shifted) : 64 - s;
        uint64_t first = base + s;
        if (nruns && runs[nruns - 1].first_page + runs[nruns - 1].count == first)
            runs[nruns - 1].count += len;
        else
            runs[nruns++] = (struct dp_run){.first_page = first, .count = len};
        bits &= len + s >= 64 ? 0 : ~0ULL << (s + len);
    }
    return nruns;
}

/* Runs a word's bits would add after a run ending at page prev_end. */
static unsigned runs_in(uint64_t bits, uint64_t base, uint64_t prev_end)
{
    unsigned n = (unsigned)__builtin_popcountll(bits & ~(bits << 1));
    if ((bits & 1) && prev_end == base)
        n--;
    return n;
}

/* The lowest bits of `bits` holding at most max_pages pages and adding at
 * most max_runs runs. */
static uint64_t take_bits(uint64_t bits, uint64_t base, uint64_t prev_end, uint64_t max_pages, unsigned max_runs)
{
    if ((uint64_t)__builtin_popcountll(bits) <= max_pages && runs_in(bits, base, prev_end) <= max_runs)
        return bits;
    uint64_t out = 0;
    uint64_t pages = 0;
    unsigned runs = 0;
    while (bits && pages < max_pages) {
        unsigned s = (unsigned)__builtin_ctzll(bits);
        uint64_t one = 1ULL << s;
        int joins = (out & (one >> 1) && s) || (!out && s == 0 && prev_end == base);
        if (!joins && runs == max_runs)
            break;
        runs += !joins;
        out |= one;
        bits &= ~one;
        pages++;
    }
    return out;
}

/* Pages of word w neither received nor asked, within mask. */
static uint64_t unasked(const struct mig_dpd *h, uint64_t w, uint64_t mask)
{
    uint64_t avail = mask & ~__atomic_load_n(&h->received[w], __ATOMIC_ACQUIRE) &
                     ~__atomic_load_n(&h->asked[w], __ATOMIC_ACQUIRE);
    if (w == (h->npages - 1) / 64 && h->npages % 64)
        avail &= ~(~0ULL << (h->npages % 64));
    return avail;
}

/* Claim what fits a request of max_pages pages and DP_MAX_RUNS runs of
 * `avail` (pages of word w) and append it to runs. *got gets the bits
 * claimed (0: none: taken by the other path meanwhile). Returns 0, or
 * CLAIM_FULL when the request can take nothing more (*got 0). (A separate
 * status, not a sentinel value of the bits: a whole word claimed is all ones.) */
#define CLAIM_FULL 1
static int claim_word(struct mig_dpd *h, uint64_t w, uint64_t avail, struct dp_run *runs, uint32_t *nruns,
                      uint64_t *pages, uint64_t max_pages, uint64_t *got_out)
{
    *got_out = 0;
    if (*pages >= max_pages || *nruns >= DP_MAX_RUNS)
        return CLAIM_FULL;
    uint64_t base = w * 64;
    uint64_t prev_end = *nruns ? runs[*nruns - 1].first_page + runs[*nruns - 1].count : UINT64_MAX;
    uint64_t want = take_bits(avail, base, prev_end, max_pages - *pages, DP_MAX_RUNS - *nruns);
    uint64_t got = want & ~__atomic_fetch_or(&h->asked[w], want, __ATOMIC_ACQ_REL);
    if (!got)
        return 0;
    if (runs_in(got, base, prev_end) > DP_MAX_RUNS - *nruns) { /* the fault path split a run: give it all back */
        __atomic_fetch_and(&h->asked[w], ~got, __ATOMIC_RELEASE);
        return CLAIM_FULL;
    }
    *nruns = append_runs(runs, *nruns, base, got);
    *pages += (uint64_t)__builtin_popcountll(got);
    *got_out = got;
    return 0;
}

/* Claim the missing, unasked pages of [first, end) in order; returns the
 * page where the request filled up (end when the range is done). */
static uint64_t claim_range(struct mig_dpd *h, uint64_t first, uint64_t end, struct dp_run *runs, uint32_t *nruns,
                            uint64_t *pages, uint64_t max_pages)
{
    for (uint64_t w = first / 64; w * 64 < end; w++) {
        uint64_t mask = ~0ULL;
        if (w == first / 64)
            mask &= ~0ULL << (first % 64);
        if (end < w * 64 + 64)
            mask &= ~(~0ULL << (end % 64));
        uint64_t avail = unasked(h, w, mask);
        if (!avail)
            continue;
        uint64_t got;
        if (claim_word(h, w, avail, runs, nruns, pages, max_pages, &got) == CLAIM_FULL)
            return w * 64 > first ? w * 64 : first;
        if (got && (*pages >= max_pages || *nruns >= DP_MAX_RUNS)) /* full: go on after its last page */
            return w * 64 + 64 - (uint64_t)__builtin_clzll(got);
    }
    return end;
}

/* Take ranges from the plan queue, in order, until the request is full. (lock held) */
static void take_planned(struct mig_dpd *h, struct dp_run *runs, uint32_t *nruns, uint64_t *pages, uint64_t max_pages)
{
    while (h->pq_len && *pages < max_pages && *nruns < DP_MAX_RUNS) {
        struct dp_run *r = &h->planq[h->pq_head];
        uint64_t end = r->first_page + r->count, before = *pages;
        uint64_t stop = claim_range(h, r->first_page, end, runs, nruns, pages, max_pages);
        add(&h->c.planned, *pages - before);
        if (stop < end) {
            r->count = (uint32_t)(end - stop);
            r->first_page = stop;
            return;
        }
        h->pq_head = (h->pq_head + 1) % MIG_DPD_PLAN_RUNS;
        h->pq_len--;
    }
}

/* Claim up to max_pages missing, unasked pages into at most DP_MAX_RUNS
 * runs: the plan queue's first, else from the cursor on (wrapping once);
 * returns the number of runs. (lock held) */
static uint32_t plan(struct mig_dpd *h, struct dp_run *runs, uint64_t max_pages, uint64_t *npages_out)
{
    uint64_t jump = __atomic_exchange_n(&h->jump_to, UINT64_MAX, __ATOMIC_RELAXED);
    if (jump != UINT64_MAX && jump < h->npages)
        h->cursor = jump;
    uint64_t nwords = (h->npages + 63) / 64, pages = 0;
    uint32_t nruns = 0;
    take_planned(h, runs, &nruns, &pages, max_pages);
    uint64_t start = h->cursor / 64;
    if (!nruns && !h->plan_only) { /* the cursor, when the queue gave nothing */
        for (uint64_t i = 0; i <= nwords; i++) {
            uint64_t w = (start + i) % nwords, mask = ~0ULL;
            if (i == 0)
                mask = ~0ULL << (h->cursor % 64);
            else if (i == nwords)
                mask = (h->cursor % 64) ? ~(~0ULL << (h->cursor % 64)) : 0;
            uint64_t avail = unasked(h, w, mask);
            uint64_t got = 0;
            if (avail && claim_word(h, w, avail, runs, &nruns, &pages, max_pages, &got) == CLAIM_FULL)
                break;
            if (!got)
                continue;
            h->cursor = w * 64 + 64 - (uint64_t)__builtin_clzll(got);
            if (h->cursor >= h->npages)
                h->cursor = 0;
        }
    }
    *npages_out = pages;
    return nruns;
}

/* ---- bulk: the requester ---- */

static int bitmap_full(const struct mig_dpd *h)
{
    return mig_bitmap_count(h->received, h->npages) == h->npages;
}

/* Has the round ended? (lock held) The bitmap is counted only when it may
 * be full (nothing of ours in flight, or nothing left to ask): counting
 * it on every wakeup cost the requester O(guest size) per request. */
static int round_over(struct mig_dpd *h, uint64_t now)
{
    if ((h->nreq == 0 || h->dry) && bitmap_full(h))
        return 1;
    return h->nreq == 0 && (h->stop_asking || (h->round_deadline && now >= h->round_deadline));
}

static void end_round(struct mig_dpd *h)
{
    h->round_active = 0;
    if (!h->to_memfd) { /* the bulk path after the switch: every page is in, the threads go */
        put(&h->c.done, 1);
        h->finished = 1;
        if (h->fd >= 0)
            shutdown(h->fd, SHUT_RDWR);
    }
    announce_end(h);
}

/* Was *t_ns (a stamp another thread writes) within FAULTING_NS of now? (A
 * stamp later than now, written meanwhile, is.) */
static int lately(uint64_t now, const uint64_t *t_ns)
{
    return (int64_t)(now - __atomic_load_n(t_ns, __ATOMIC_RELAXED)) < (int64_t)FAULTING_NS;
}

static void *requester_main(void *arg)
{
    struct mig_dpd *h = arg;
    dp_thread_for_bulk("dpd-request");
    uint8_t msg[sizeof(struct dp_request) + DP_MAX_RUNS * sizeof(struct dp_run)];
    pthread_mutex_lock(&h->mu);
    while (!h->finished) {
        uint64_t now = (uint64_t)dp_mono_ns();
        if (!h->round_active || h->fd < 0) {
            pthread_cond_wait(&h->cond, &h->mu);
            continue;
        }
        if (round_over(h, now)) {
            end_round(h);
            continue;
        }
        struct timespec ts;
        uint64_t window = h->window_pages, per_request = h->request_pages;
        if (lately(now, &h->jumped_ns)) {
            uint64_t faulting = FAULTING_WINDOW_BYTES / h->page_size ? FAULTING_WINDOW_BYTES / h->page_size : 1;
            window = faulting < window ? faulting : window;
            per_request = per_request < window / 2 ? per_request : (window / 2 ? window / 2 : 1);
        }
        if (!h->rate) { /* paced, a request is a slice of time: keep it so */
            uint64_t share = h->data_share > SHARE_ONE / ZERO_STRETCH ? h->data_share : SHARE_ONE / ZERO_STRETCH;
            window = window * SHARE_ONE / share;
            per_request = per_request * SHARE_ONE / share;
            per_request = per_request < DP_MAX_REQUEST_PAGES ? per_request : DP_MAX_REQUEST_PAGES;
            if (h->fit_pages && h->fit_pages < window && lately(now, &h->followed_ns)) {
                window = h->fit_pages;
                per_request = per_request < window / 2 ? per_request : (window / 2 ? window / 2 : 1);
            }
        }
        uint64_t room = window > h->inflight_pages ? window - h->inflight_pages : 0;
        uint64_t least = per_request < DP_BATCH_PAGES ? per_request : DP_BATCH_PAGES;
        if (!h->nreq)
            room = per_request; /* an empty window takes one whole request */
        if (h->stop_asking || (h->round_deadline && now >= h->round_deadline) || h->nreq >= WINDOW_REQUESTS ||
            room < least) {
            deadline_in(&ts, 2000000); /* the deadline, or pages installed by another path */
            pthread_cond_timedwait(&h->cond, &h->mu, &ts);
            continue;
        }
        if (h->rate) {
            double ahead = (double)(get(&h->c.bytes_wire) - h->round_bytes0) / (double)h->rate -
                           (double)(now - h->round_t0) / 1e9;
            if (ahead > 0) {
                deadline_in(&ts, (uint64_t)(ahead * 1e9));
                pthread_cond_timedwait(&h->cond, &h->mu, &ts);
                continue;
            }
        }
        if (room > per_request)
            room = per_request;
        struct req *r = &h->reqs[h->next_id % REQ_SLOTS];
        uint64_t npages;
        uint32_t nruns = plan(h, r->runs, room, &npages);
        h->dry = !nruns;
        if (!nruns) { /* every missing page is asked: wait for installs, or for the fault path */
            deadline_in(&ts, 2000000);
            pthread_cond_timedwait(&h->cond, &h->mu, &ts);
            continue;
        }
        r->id = h->next_id++;
        r->t_ns = now;
        r->total = r->due = (uint32_t)npages;
        r->nruns = nruns;
        r->at = 0;
        h->nreq++;
        h->inflight_pages += npages;
        struct dp_request rq = {.magic = DP_REQ_MAGIC, .nruns = nruns, .req_id = r->id};
        memcpy(msg, &rq, sizeof(rq));
        memcpy(msg + sizeof(rq), r->runs, nruns * sizeof(struct dp_run));
        int fd = h->fd;
        h->sending++;
        pthread_mutex_unlock(&h->mu);
        int err = dp_send_full(fd, msg, sizeof(rq) + nruns * sizeof(struct dp_run));
        add(&h->c.requests, 1);
        pthread_mutex_lock(&h->mu);
        h->sending--;
        if (err && h->fd == fd)
            shutdown(fd, SHUT_RDWR); /* the receiver notices and recovers */
        pthread_cond_broadcast(&h->cond);
    }
    pthread_mutex_unlock(&h->mu);
    return NULL;
}

/* ---- bulk: the receiver ---- */

/* Hand the slot being filled to the installers. (lock held) */
static void hand_off(struct mig_dpd *h, int *cur)
{
    if (*cur < 0 || !h->slots[*cur].nframes)
        return;
    h->queue[(h->qhead + h->qlen) % NSLOTS] = *cur;
    h->qlen++;
    *cur = -1;
    pthread_cond_broadcast(&h->cond);
}

/* A free slot, waiting for one; -1 when the path stops. (lock held) */
static int take_slot(struct mig_dpd *h)
{
    while (!h->nfree && !h->finished)
        pthread_cond_wait(&h->cond, &h->mu);
    if (h->finished)
        return -1;
    int s = h->free_slots[--h->nfree];
    h->slots[s].nframes = 0;
    h->slots[s].len = 0;
    return s;
}

/* The connection broke (reason in why): wait until nothing uses it, write
 * off the requests in flight, reconnect. Returns the new socket, or -1 when
 * the path stops or fails. (lock held; released while reconnecting) */
static int recover(struct mig_dpd *h, int *cur, const char *why)
{
    hand_off(h, cur); /* whole frames received before the break are installed */
    if (h->fd >= 0)
        shutdown(h->fd, SHUT_RDWR);
    if (h->finished)
        return -1;
    uint64_t lost_at = (uint64_t)dp_mono_ns();
    put(&h->c.link_down, 1);
    add(&h->c.outages, 1);
    h->down_since = h->last_rx_ns ? h->last_rx_ns : lost_at;
    while ((h->sending || h->qlen || h->busy) && !h->finished)
        pthread_cond_wait(&h->cond, &h->mu);
    for (int i = 0; i < REQ_SLOTS; i++) {
        if (h->reqs[i].id) {
            forget(h, &h->reqs[i]);
            h->reqs[i].id = 0;
        }
    }
    h->nreq = 0;
    h->inflight_pages = 0;
    close(h->fd);
    h->fd = -1;
    pthread_cond_broadcast(&h->cond);
    char reason[512];
    snprintf(reason, sizeof(reason), "%s", why);
    pthread_mutex_unlock(&h->mu);
    double left = h->link.recovery_s - (double)((uint64_t)dp_mono_ns() - lost_at) / 1e9;
    int fd = redial(&h->link, left > 0 ? left : 0, reason, sizeof(reason));
    if (fd < 0 && fd != -ECANCELED)
        fail(h, "lost the source at %s:%u: %s (for %g s; gave up, the guest stays paused)", h->link.host,
             h->link.port, reason, h->link.recovery_s);
    pthread_mutex_lock(&h->mu);
    if (fd < 0 || h->finished) {
        if (fd >= 0)
            close(fd);
        return -1;
    }
    h->fd = fd;
    add(&h->c.paused_ns, (uint64_t)dp_mono_ns() - h->down_since);
    put(&h->c.link_down, 0);
    pthread_cond_broadcast(&h->cond);
    return fd;
}

/* How many bytes the staging buffer must hold before the receiver goes on
 * with its first `have` bytes: a header, or a small frame whole (so a slot
 * keeps filling while frames arrive, and is handed to the installers only
 * when the stream pauses or it is full: one wakeup per slot, not per recv). */
static uint64_t staged_need(const struct mig_dpd *h, const uint8_t *staged, uint32_t have)
{
    if (have < sizeof(struct dp_batch))
        return sizeof(struct dp_batch);
    struct dp_batch b;
    memcpy(&b, staged, sizeof(b));
    uint64_t flen = frame_len(&b);
    return framing_ok(&b, h->max_data) && flen <= STAGE_BYTES / 2 ? flen : sizeof(b);
}

static void *receiver_main(void *arg)
{
    struct mig_dpd *h = arg;
    dp_thread_for_bulk("dpd-receive");
    uint8_t *stage = malloc(STAGE_BYTES);
    uint32_t lo = 0, hi = 0, read_size = STAGE_BYTES;
    int cur = -1;
    pthread_mutex_lock(&h->mu);
    int fd = h->fd;
    pthread_mutex_unlock(&h->mu);
    const char *why = NULL;
    char whybuf[128];
    while (stage) {
        if (why) {
            pthread_mutex_lock(&h->mu);
            fd = recover(h, &cur, why);
            pthread_mutex_unlock(&h->mu);
            if (fd < 0)
                break;
            why = NULL;
            lo = hi = 0; /* a partial frame of the lost connection is dropped */
        }
        if (hi - lo < staged_need(h, stage + lo, hi - lo)) {
            if (lo) {
                memmove(stage, stage + lo, hi - lo);
                hi -= lo;
                lo = 0;
            }
            uint32_t want = read_size < STAGE_BYTES - hi ? read_size : STAGE_BYTES - hi;
            ssize_t n = recv(fd, stage + hi, want, MSG_DONTWAIT);
            if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) { /* about to block: let the installers go */
                pthread_mutex_lock(&h->mu);
                hand_off(h, &cur);
                pthread_mutex_unlock(&h->mu);
                n = recv(fd, stage + hi, want, 0);
            }
            if (n <= 0) {
                if (n < 0 && errno == EINTR)
                    continue;
                snprintf(whybuf, sizeof(whybuf), "%s", n ? strerror(errno) : "connection closed");
                why = whybuf;
                continue;
            }
            hi += (uint32_t)n;
            add(&h->c.bytes_wire, (uint64_t)n);
            h->last_rx_ns = (uint64_t)dp_mono_ns();
            continue;
        }
        struct dp_batch b;
        memcpy(&b, stage + lo, sizeof(b));
        if (!framing_ok(&b, h->max_data)) {
            pthread_mutex_lock(&h->mu);
            int gave_up = refuse(h, &b);
            pthread_mutex_unlock(&h->mu);
            if (gave_up)
                break;
            why = "a frame that cannot be followed (bad magic or sizes)";
            continue;
        }
        uint64_t flen = frame_len(&b), pre = flen - b.data_len, have = hi - lo;
        /* The slot being filled is the receiver's alone: the lock only to hand it off or take another. */
        struct slot *s = cur >= 0 ? &h->slots[cur] : NULL;
        uint64_t off = s ? ((s->len + pre + FRAME_ALIGN - 1) / FRAME_ALIGN * FRAME_ALIGN) - pre : 0;
        int full = s && (off + flen > h->slot_bytes || s->nframes == h->slot_bytes / 4096);
        if (!s || full || have < flen) {
            pthread_mutex_lock(&h->mu);
            hand_off(h, &cur); /* full, or this frame needs a blocking read: let the others go first */
            if (cur < 0)       /* (an empty slot is kept) */
                cur = take_slot(h);
            pthread_mutex_unlock(&h->mu);
            if (cur < 0)
                break;
            s = &h->slots[cur];
            off = FRAME_ALIGN - pre % FRAME_ALIGN;
        }
        uint64_t copy = have < flen ? have : flen;
        memcpy(s->buf + off, stage + lo, copy);
        lo += (uint32_t)copy;
        if (copy < flen) {
            ssize_t r = dp_read_full(fd, s->buf + off + copy, flen - copy);
            if (r != (ssize_t)(flen - copy)) {
                snprintf(whybuf, sizeof(whybuf), "%s", r >= 0 ? "connection closed mid-batch" : strerror((int)-r));
                why = whybuf;
                continue; /* the partial frame stays out of the slot: never installed */
            }
            add(&h->c.bytes_wire, flen - copy);
            h->last_rx_ns = (uint64_t)dp_mono_ns();
        }
        s->offs[s->nframes++] = (uint32_t)off;
        s->len = (uint32_t)(off + flen);
        /* After a large frame, read the next header alone (its data goes straight into a slot). */
        read_size = flen > STAGE_BYTES / 4 ? 4096 : STAGE_BYTES;
    }
    if (!stage)
        fail(h, "the bulk path's receiver: out of memory");
    free(stage);
    pthread_mutex_lock(&h->mu);
    hand_off(h, &cur);
    h->finished = 1;
    announce_end(h);
    pthread_mutex_unlock(&h->mu);
    return NULL;
}

/* ---- bulk: the installers ---- */

/* Account a frame's pages (header b, the frame at `frame`) to its request.
 * (lock held) Returns 0, or -1 when the frame does not belong to a request
 * in flight. */
static int settle(struct mig_dpd *h, struct req *table, uint32_t nslots, const struct dp_batch *b,
                  const uint8_t *frame, int refused)
{
    struct req *r = &table[b->req_id % nslots];
    if (!r->id || r->id != b->req_id || b->count > r->due)
        return -1;
    for (uint32_t k = 0; k < b->nruns; k++) {
        struct dp_run run = frame_run(frame, k);
        if (!covers(r, run.first_page, run.count))
            return -1;
    }
    for (uint32_t k = 0; refused && k < b->nruns; k++) {
        struct dp_run run = frame_run(frame, k);
        mig_bitmap_clear(h->asked, run.first_page, run.count);
    }
    r->due -= b->count;
    if (!r->due)
        r->id = 0;
    return 0;
}

/* A frame an installer is done with: its header and verdict, settled with
 * the rest of its slot under one lock. */
struct installed {
    struct dp_batch b;
    const uint8_t *frame; /* in its slot, until the slot is settled */
    int verdict;
};

/* A request came back whole after age_ns: fit the window to WINDOW_DELAY_NS
 * (what is in flight scales with it), halfway each time, within
 * [FAULTING_WINDOW_BYTES, the window stretched for zero pages]. (lock held) */
static void fit_window(struct mig_dpd *h, uint64_t age_ns)
{
    uint64_t floor = FAULTING_WINDOW_BYTES / h->page_size ? FAULTING_WINDOW_BYTES / h->page_size : 1;
    uint64_t ceiling = h->window_pages * ZERO_STRETCH, w = h->fit_pages ? h->fit_pages : h->window_pages;
    uint64_t want = age_ns ? (uint64_t)((double)w * WINDOW_DELAY_NS / (double)age_ns) : ceiling;
    w = (w + (want < 2 * w ? want : 2 * w)) / 2;
    h->fit_pages = w < floor ? floor : w > ceiling ? ceiling : w;
}

/* Settle a slot's frames with their requests: one lock and one wakeup per
 * slot, not per frame. (lock held) */
static void settle_slot(struct mig_dpd *h, const struct installed *done, uint32_t n)
{
    uint64_t now = (uint64_t)dp_mono_ns();
    for (uint32_t i = 0; i < n; i++) {
        const struct dp_batch *b = &done[i].b;
        int refused = done[i].verdict == REFUSED;
        int known = settle(h, h->reqs, REQ_SLOTS, b, done[i].frame, refused) == 0;
        if (!refused && b->count) {
            uint64_t data = b->raw_len / h->page_size * SHARE_ONE / b->count;
            h->data_share += data / 8 - h->data_share / 8; /* over the last ~8 frames */
        }
        if (known) {
            const struct req *r = &h->reqs[b->req_id % REQ_SLOTS];
            h->inflight_pages -= b->count;
            if (!r->id) {
                h->nreq--;
                fit_window(h, now - r->t_ns);
            }
        }
        if (refused && !refuse(h, b) && !known && h->fd >= 0)
            shutdown(h->fd, SHUT_RDWR); /* cannot tell whose pages these were: start over */
    }
}

static void *installer_main(void *arg)
{
    struct mig_dpd *h = arg;
    dp_thread_for_bulk("dpd-install");
    struct installer_ctx ctx = {.scratch = malloc(h->max_data)};
    struct installed *done = malloc((h->slot_bytes / 4096 + 1) * sizeof(*done));
    pthread_mutex_lock(&h->mu);
    for (;;) {
        while (!h->qlen && !h->finished)
            pthread_cond_wait(&h->cond, &h->mu);
        if (!h->qlen)
            break; /* finished, and nothing left to install */
        int si = h->queue[h->qhead];
        h->qhead = (h->qhead + 1) % NSLOTS;
        h->qlen--;
        h->busy++;
        pthread_mutex_unlock(&h->mu);
        struct slot *s = &h->slots[si];
        struct mig_install_stats sum = {0};
        uint32_t n = 0, installed = 0;
        for (uint32_t i = 0; i < s->nframes; i++) {
            struct mig_install_stats st;
            struct dp_batch b = {0};
            const uint8_t *frame = s->buf + s->offs[i];
            int v = ctx.scratch && done ? install_frame(h, &ctx, frame, &st, &b) : -ENOMEM;
            if (v < 0) {
                fail(h, "installing %u pages from page %llu from the source failed: %s", b.count,
                     (unsigned long long)frame_run(frame, 0).first_page, strerror(-v));
                break;
            }
            done[n++] = (struct installed){.b = b, .frame = frame, .verdict = v};
            if (v == INSTALLED) {
                signal_installed(h);
                sum.copied += st.copied;
                sum.zeroed += st.zeroed;
                sum.skipped += st.skipped;
                sum.eexist += st.eexist;
                sum.lazy += st.lazy;
                installed++;
            }
        }
        count_install(h, &sum, installed);
        pthread_mutex_lock(&h->mu);
        settle_slot(h, done, n);
        h->busy--;
        h->free_slots[h->nfree++] = si;
        pthread_cond_broadcast(&h->cond);
    }
    pthread_mutex_unlock(&h->mu);
    if (ctx.dctx)
        dp_zstd_free_dctx(ctx.dctx);
    free(ctx.scratch);
    free(done);
    return NULL;
}

/* ---- construction ---- */

static struct mig_dpd *new_handle(int role, const char *host, int port, const uint8_t *key, int target_fd,
                                  int to_memfd, struct mig_space *space, uint32_t page_size,
                                  uint64_t npages, uint64_t *received, uint64_t *asked, double recovery_s,
                                  char *err, uint32_t err_len)
{
    struct mig_dpd *h = calloc(1, sizeof(*h));
    if (!h) {
        snprintf(err, err_len, "out of memory");
        return NULL;
    }
    h->role = role;
    snprintf(h->link.host, sizeof(h->link.host), "%s", host);
    h->link.port = (uint16_t)port;
    memcpy(h->link.key, key, DP_KEY_LEN);
    h->link.kind = role == ROLE_BULK ? DP_KIND_BULK : DP_KIND_FAULT;
    h->link.page_size = page_size;
    h->link.npages = npages;
    h->link.recovery_s = recovery_s;
    h->link.stopfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    h->installed_fd = role == ROLE_BULK ? eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK) : -1;
    h->target_fd = target_fd;
    h->to_memfd = to_memfd;
    h->page_size = page_size;
    h->npages = npages;
    h->received = received;
    h->asked = asked;
    h->batch_pages = dp_batch_pages(page_size);
    uint64_t raw = (uint64_t)h->batch_pages * page_size;
    h->max_data = (uint32_t)(raw + raw / 128 + 4096); /* room for an incompressible zstd frame */
    h->fd = -1;
    h->jump_to = UINT64_MAX;
    h->data_share = SHARE_ONE; /* until frames say otherwise, every page is data */
    pthread_mutex_init(&h->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&h->cond, &ca);
    pthread_cond_init(&h->ended, &ca);
    pthread_condattr_destroy(&ca);
    h->space = space;
    if (h->link.stopfd < 0 || (role == ROLE_BULK && h->installed_fd < 0)) {
        snprintf(err, err_len, "out of resources: %s", strerror(errno));
        mig_dpd_free(h);
        return NULL;
    }
    char why[256];
    int fd = redial(&h->link, FIRST_CONNECT_S, why, sizeof(why));
    if (fd < 0) {
        snprintf(err, err_len, "cannot reach the source's data plane at %s:%d: %s", host, port, why);
        mig_dpd_free(h);
        return NULL;
    }
    h->fd = fd;
    return h;
}

struct mig_dpd *mig_dpd_bulk_new(const char *host, int port, const uint8_t *key, int target_fd, int to_memfd,
                                 struct mig_space *space, uint32_t page_size,
                                 uint64_t npages, uint64_t *received, uint64_t *asked, double recovery_s,
                                 char *err, uint32_t err_len)
{
    struct mig_dpd *h = new_handle(ROLE_BULK, host, port, key, target_fd, to_memfd, space, page_size,
                                   npages, received, asked, recovery_s, err, err_len);
    if (!h)
        return NULL;
    h->next_id = 1; /* id 0 marks a free request slot */
    h->run_store = calloc(REQ_SLOTS * DP_MAX_RUNS, sizeof(struct dp_run));
    h->slot_bytes = (uint32_t)(sizeof(struct dp_batch) + DP_BATCH_PAGES * sizeof(struct dp_run) +
                               8 * (DP_BATCH_PAGES / 2 + 1) + h->max_data + 2 * FRAME_ALIGN + STAGE_BYTES);
    int ok = h->run_store != NULL;
    for (int i = 0; i < REQ_SLOTS && ok; i++)
        h->reqs[i].runs = h->run_store + (size_t)i * DP_MAX_RUNS;
    for (int i = 0; i < NSLOTS && ok; i++) {
        size_t len = (h->slot_bytes + 4095) / 4096 * 4096;
        h->slots[i].buf = aligned_alloc(4096, len);
        h->slots[i].offs = calloc(h->slot_bytes / 4096 + 1, sizeof(uint32_t));
        ok = h->slots[i].buf && h->slots[i].offs;
#ifdef MADV_POPULATE_WRITE
        /* Their pages now, before the switch, not faulted in one by one by the first receives
         * while the guest waits (~1300 faults, ~1 ms; a short scattered set's pull ~1 %).
         * Best effort: an older kernel says EINVAL and the receives fault them in. */
        if (ok)
            madvise(h->slots[i].buf, len, MADV_POPULATE_WRITE);
#endif
        h->free_slots[h->nfree++] = i;
    }
    if (!ok) {
        snprintf(err, err_len, "out of memory for the receive buffers");
        mig_dpd_free(h);
        return NULL;
    }
    return h;
}

/* Pace the requests at `rate` bytes/s (0: none), counted from now: a raised
 * rate does not burst to make up for a slower past, a lowered one does not
 * stall to pay for a faster past. Under a rate a request carries ~50 ms of
 * traffic, so pacing stays fine-grained. (lock held) */
static void set_pace(struct mig_dpd *h, uint64_t rate)
{
    h->rate = rate;
    h->round_t0 = (uint64_t)dp_mono_ns();
    h->round_bytes0 = get(&h->c.bytes_wire);
    uint64_t window = WINDOW_BYTES / h->page_size, per_req = window / 4;
    if (rate) {
        uint64_t paced = (uint64_t)(rate * 0.05) / h->page_size;
        per_req = paced < 16 ? 16 : paced < per_req ? paced : per_req;
        window = 2 * per_req < window ? 2 * per_req : window;
    }
    h->request_pages = per_req ? per_req : 1;
    h->window_pages = window > h->request_pages ? window : h->request_pages;
}

int mig_dpd_round(struct mig_dpd *h, uint64_t max_bandwidth, double deadline_s)
{
    pthread_mutex_lock(&h->mu);
    int r = 0;
    if (__atomic_load_n(&h->failed, __ATOMIC_ACQUIRE) || h->finished) {
        r = -EPIPE;
    } else if (h->round_active) {
        r = -EBUSY;
    } else {
        /* Pre-copy: nothing is in flight between rounds, and pages discarded
         * since the last one are asked again. (A bulk path into the
         * userfaultfd has one round, its asked bits shared with the fault path.) */
        if (h->to_memfd)
            memset(h->asked, 0, (h->npages + 63) / 64 * 8);
        h->cursor = 0;
        h->rounds++;
        set_pace(h, max_bandwidth);
        h->round_deadline = deadline_s > 0 ? h->round_t0 + (uint64_t)(deadline_s * 1e9) : 0;
        h->stop_asking = 0;
        h->dry = 0;
        h->round_active = 1;
        if (!h->started) {
            h->started = 1;
            r = pthread_create(&h->receiver, NULL, receiver_main, h);
            h->has_receiver = !r;
            if (!r)
                h->has_requester = !(r = pthread_create(&h->requester, NULL, requester_main, h));
            for (int i = 0; i < 2 && !r; i++)
                if (!(r = pthread_create(&h->installers[i], NULL, installer_main, h)))
                    h->ninstallers++;
            if (r) { /* the threads that did start are joined by mig_dpd_stop */
                snprintf(h->error, sizeof(h->error), "cannot start the bulk path's threads: %s", strerror(r));
                __atomic_store_n(&h->failed, 1, __ATOMIC_RELEASE);
                h->finished = 1;
                r = -r;
            }
        }
        announce_end(h); /* a round begun (its threads look), or failed to */
    }
    pthread_mutex_unlock(&h->mu);
    return r;
}

void mig_dpd_set_bandwidth(struct mig_dpd *h, uint64_t max_bandwidth)
{
    pthread_mutex_lock(&h->mu);
    set_pace(h, max_bandwidth);
    pthread_cond_broadcast(&h->cond); /* a requester waiting out the old pace looks again */
    pthread_mutex_unlock(&h->mu);
}

uint64_t mig_dpd_bandwidth(struct mig_dpd *h)
{
    pthread_mutex_lock(&h->mu);
    uint64_t rate = h->rate;
    pthread_mutex_unlock(&h->mu);
    return rate;
}

int mig_dpd_wait(struct mig_dpd *h, int timeout_ms)
{
    struct timespec ts;
    deadline_in(&ts, (uint64_t)timeout_ms * 1000000ULL);
    pthread_mutex_lock(&h->mu);
    while (h->round_active && !h->finished && !h->failed)
        if (pthread_cond_timedwait(&h->ended, &h->mu, &ts) == ETIMEDOUT)
            break;
    int r = h->failed ? -1 : (!h->round_active || h->finished) ? 1 : 0;
    pthread_mutex_unlock(&h->mu);
    return r;
}

void mig_dpd_stop_asking(struct mig_dpd *h)
{
    pthread_mutex_lock(&h->mu);
    h->stop_asking = 1;
    pthread_cond_broadcast(&h->cond);
    pthread_mutex_unlock(&h->mu);
}

/* Go on asking from page (the guest faults there: see WINDOW_DELAY_NS). */
static void follow(struct mig_dpd *h, uint64_t page)
{
    __atomic_store_n(&h->jump_to, page, __ATOMIC_RELAXED);
    __atomic_store_n(&h->followed_ns, (uint64_t)dp_mono_ns(), __ATOMIC_RELAXED);
}

void mig_dpd_jump(struct mig_dpd *h, uint64_t page)
{
    follow(h, page);
    __atomic_store_n(&h->jumped_ns, (uint64_t)dp_mono_ns(), __ATOMIC_RELAXED);
}

/* Where page falls in request r: the pages of r before it (its runs are
 * answered in order), or UINT32_MAX when r does not ask it. */
static uint64_t offset_in(const struct req *r, uint64_t page)
{
    uint64_t before = 0;
    for (uint32_t i = 0; i < r->nruns; i++) {
        const struct dp_run *run = &r->runs[i];
        if (page >= run->first_page && page < run->first_page + run->count)
            return before + (page - run->first_page);
        before += run->count;
    }
    return UINT32_MAX;
}

/* How much data the bulk path still receives before page: the pages of its
 * earlier requests in flight and those before the page in its own (the
 * source answers in order), in bytes, zero pages weighed as the stream
 * lately carried them; UINT64_MAX when no request in flight asks the page. */
static uint64_t ahead_of(struct mig_dpd *h, uint64_t page)
{
    pthread_mutex_lock(&h->mu);
    uint64_t id = 0, pages = 0;
    for (int i = 0; i < REQ_SLOTS && !id; i++) {
        const struct req *r = &h->reqs[i];
        uint64_t at = r->id ? offset_in(r, page) : UINT32_MAX;
        if (at != UINT32_MAX) {
            id = r->id;
            uint64_t settled = r->total - r->due; /* its first pages, in */
            pages = at > settled ? at - settled : 0;
        }
    }
    for (int i = 0; i < REQ_SLOTS && id; i++) /* the source answers requests in order */
        if (h->reqs[i].id && h->reqs[i].id < id)
            pages += h->reqs[i].due;
    uint64_t share = h->data_share > SHARE_ONE / ZERO_STRETCH ? h->data_share : SHARE_ONE / ZERO_STRETCH;
    pthread_mutex_unlock(&h->mu);
    return id ? pages * h->page_size * share / SHARE_ONE : UINT64_MAX;
}

void mig_dpd_watch(struct mig_dpd *h, uint32_t faults)
{
    set_watched(h, faults);
}

int mig_dpd_installed_fd(const struct mig_dpd *h)
{
    return h->installed_fd;
}

const struct mig_dpd_counters *mig_dpd_counters(struct mig_dpd *h)
{
    return &h->c;
}

const char *mig_dpd_error(struct mig_dpd *h)
{
    return __atomic_load_n(&h->failed, __ATOMIC_ACQUIRE) ? h->error : NULL;
}

/* ---- the fault path ---- */

static void record_latency(struct mig_dpd *h, uint64_t lat_ns, uint32_t waiters)
{
    uint64_t us = lat_ns / 1000;
    int bucket = us ? 63 - __builtin_clzll(us) : 0;
    add(&h->c.hist[bucket < 32 ? bucket : 31], 1);
    add(&h->c.resolved, 1);
    add(&h->c.lat_sum_ns, lat_ns);
    add(&h->c.blocked_ns, lat_ns * waiters);
    if (lat_ns > get(&h->c.lat_max_ns))
        put(&h->c.lat_max_ns, lat_ns);
    __atomic_store_n(&h->samples[h->nsamples % MIG_DPD_SAMPLES], lat_ns, __ATOMIC_RELAXED);
    __atomic_store_n(&h->nsamples, h->nsamples + 1, __ATOMIC_RELEASE);
}

/* Resolve the waiting faults whose page is in (done_ns: when it was
 * installed, 0 for now). With `ask`, collect the pages to ask for alone: a
 * page nobody asks for any more (its request was written off), or one the
 * bulk path asked for that is still not in after FAULT_PATIENCE_NS (a slow,
 * paced bulk window must not hold a fault up: one page asked twice is
 * cheaper). Returns 1 while faults still wait. */
static int settle_waiting(struct mig_dpd *h, uint64_t done_ns, struct dp_run *ask, uint32_t *nask)
{
    uint64_t now = done_ns ? done_ns : (uint64_t)dp_mono_ns();
    uint32_t kept = 0, own = 0; /* own: waiting faults whose page this path asked itself */
    for (uint32_t i = 0; i < h->nwaiting; i++) {
        struct waiting *w = &h->waiting[i];
        if (mig_bitmap_test(h->received, w->page)) {
            record_latency(h, now > w->t_ns ? now - w->t_ns : 0, w->waiters);
            continue;
        }
        if (ask && *nask < DP_MAX_RUNS) {
            uint64_t bit = 1ULL << (w->page % 64);
            int claimed = !(__atomic_fetch_or(&h->asked[w->page / 64], bit, __ATOMIC_ACQ_REL) & bit);
            if (claimed || (!w->asked && now - w->t_ns > FAULT_PATIENCE_NS)) {
                ask[(*nask)++] = (struct dp_run){.first_page = w->page, .count = 1};
                w->asked = 1;
            }
        }
        h->waiting[kept++] = *w;
        own += w->asked;
    }
    h->nwaiting = kept;
    set_watched(h->bulk, kept - own);
    return kept > 0;
}

/* How long the fault path may sleep: until the first waiting fault's
 * patience with the bulk path runs out (to the nanosecond: poll()'s
 * milliseconds held such a fault up to twice the patience), at most 1 ms
 * while faults wait (a page whose request was written off is asked again
 * then), 50 ms when none does. */
static struct timespec fault_sleep(const struct mig_dpd *h)
{
    uint64_t ns = h->nwaiting ? 1000000 : 50000000, now = (uint64_t)dp_mono_ns();
    for (uint32_t i = 0; i < h->nwaiting; i++) {
        const struct waiting *w = &h->waiting[i];
        if (!w->asked) {
            uint64_t due = w->t_ns + FAULT_PATIENCE_NS, left = due > now ? due - now : 0;
            ns = left < ns ? left : ns;
        }
    }
    return (struct timespec){.tv_sec = (time_t)(ns / 1000000000ULL), .tv_nsec = (long)(ns % 1000000000ULL)};
}

/* Record a request of the fault path in flight and append it to out. */
static size_t fault_request(struct mig_dpd *h, uint8_t *out, const struct dp_run *runs, uint32_t nruns, uint32_t pages)
{
    uint64_t id = ++h->next_id;
    struct req *r = &h->freqs[id % FAULT_REQS];
    if (r->id) { /* FAULT_REQS in flight: the oldest is long gone; ask its pages again later */
        forget(h, r);
        r->id = 0;
    }
    r->id = id;
    r->due = pages;
    r->nruns = nruns;
    r->at = 0;
    memcpy(r->runs, runs, nruns * sizeof(*runs));
    struct dp_request rq = {.magic = DP_REQ_MAGIC, .nruns = nruns, .req_id = id};
    memcpy(out, &rq, sizeof(rq));
    memcpy(out + sizeof(rq), runs, nruns * sizeof(*runs));
    add(&h->c.requests, 1);
    return sizeof(rq) + nruns * sizeof(*runs);
}

/* The neighbourhood setting: pages, shape and stride. */
static void neighbourhood(const struct mig_dpd *h, uint32_t *pages, uint32_t *shape, int64_t *stride)
{
    uint64_t nb = __atomic_load_n(&h->nb, __ATOMIC_RELAXED);
    *pages = (uint32_t)(nb & 0xffff);
    *shape = (uint32_t)((nb >> 16) & 0xff);
    *stride = (int32_t)(uint32_t)(nb >> 32);
    if (*shape == MIG_NB_ALIGNED || *stride == 0)
        *stride = 1;
}

/* The k-th page of page's neighbourhood (k from 0), or UINT64_MAX when it
 * falls outside the guest or is the page itself. */
static uint64_t neighbour(const struct mig_dpd *h, uint64_t page, uint32_t pages, uint32_t shape, int64_t stride,
                          uint32_t k)
{
    int64_t q;
    switch (shape) {
    case MIG_NB_FORWARD:
        q = (int64_t)page + (int64_t)(k + 1) * stride;
        break;
    case MIG_NB_BACKWARD:
        q = (int64_t)page - (int64_t)(k + 1) * stride;
        break;
    case MIG_NB_AROUND:
        q = (int64_t)page + (k % 2 ? -1 : 1) * (int64_t)(k / 2 + 1) * stride;
        break;
    default:
        q = (int64_t)(page - page % pages + k);
        break;
    }
    return q < 0 || (uint64_t)q >= h->npages || (uint64_t)q == page ? UINT64_MAX : (uint64_t)q;
}

/* Claim the missing, unasked pages of page's neighbourhood (the policy's
 * shape, see mig_dpd_set_neighbourhood) as runs, and mark them prefetched. */
static uint32_t claim_neighbourhood(struct mig_dpd *h, uint64_t page, struct dp_run *runs, uint32_t *npages)
{
    uint32_t want, shape;
    int64_t stride;
    neighbourhood(h, &want, &shape, &stride);
    uint32_t nruns = 0;
    uint64_t got = 0;
    for (uint32_t k = 0; k < want; k++) {
        uint64_t q = neighbour(h, page, want, shape, stride, k), bit = 1ULL << (q % 64);
        if (q == UINT64_MAX || mig_bitmap_test(h->received, q) ||
            (__atomic_fetch_or(&h->asked[q / 64], bit, __ATOMIC_ACQ_REL) & bit))
            continue;
        mig_bitmap_set(h->pf, q, 1);
        got++;
        struct dp_run *last = nruns ? &runs[nruns - 1] : NULL;
        if (last && last->first_page + last->count == q)
            last->count++;
        else if (last && q + 1 == last->first_page)
            last->first_page = q, last->count++;
        else
            runs[nruns++] = (struct dp_run){.first_page = q, .count = 1};
    }
    add(&h->c.prefetched, got);
    *npages = (uint32_t)got;
    return nruns;
}

/* A fault on page: count the prefetched pages it shows were used (the page
 * itself, on its way; the prefetched pages right before and after it,
 * stride apart, which the guest went through without faulting). */
static void count_hits(struct mig_dpd *h, uint64_t page)
{
    uint32_t want, shape;
    int64_t stride;
    neighbourhood(h, &want, &shape, &stride);
    if (stride < 0)
        stride = -stride;
    uint64_t hits = 0;
    if (mig_bitmap_test(h->pf, page)) {
        mig_bitmap_clear(h->pf, page, 1);
        hits++;
    }
    for (int dir = -1; dir <= 1; dir += 2) {
        for (int64_t k = 1, q; k <= MIG_DPD_MAX_NEIGHBOURHOOD; k++) {
            q = (int64_t)page + dir * k * stride;
            if (q < 0 || (uint64_t)q >= h->npages || !mig_bitmap_test(h->pf, (uint64_t)q))
                break;
            mig_bitmap_clear(h->pf, (uint64_t)q, 1);
            hits++;
        }
    }
    add(&h->c.prefetch_hits, hits);
}

uint64_t mig_dpd_count_used(struct mig_dpd *h, const uint64_t *used, uint64_t nbits)
{
    uint64_t hits = mig_bitmap_take(h->pf, used, nbits < h->npages ? nbits : h->npages);
    add(&h->c.prefetch_hits, hits);
    return hits;
}

/* Is page, asked by the bulk path, too far back in its window to wait for
 * (FAULT_WAIT_AHEAD_BYTES)? Not when no bulk request asks it: this path's
 * own request brings it. */
static int far_back(struct mig_dpd *h, uint64_t page)
{
    uint64_t ahead = h->bulk ? ahead_of(h->bulk, page) : UINT64_MAX;
    return ahead != UINT64_MAX && ahead > FAULT_WAIT_AHEAD_BYTES;
}

/* Does a fault on page go on with a sequential walk (a step forward of at
 * most WALK_PAGES from one of the last WALK_FAULTS faults)? */
static int walking(const struct mig_dpd *h, uint64_t page)
{
    for (uint64_t k = 1; k <= WALK_FAULTS && k <= h->history_head; k++) {
        uint64_t q = h->history[(h->history_head - k) % MIG_DPD_HISTORY];
        if (page > q && page - q <= WALK_PAGES)
            return 1;
    }
    return 0;
}

/* Requests for new faults: each page alone, then its neighbourhood (a page
 * the bulk path has in flight waits for it unless far_back and not walking). */
static size_t on_faults(struct mig_dpd *h, const uint64_t *pages, const uint32_t *waiters, const uint64_t *t_ns,
                        int n, uint8_t *out, size_t room)
{
    size_t len = 0;
    for (int i = 0; i < n; i++) {
        uint64_t p = pages[i];
        int walk = walking(h, p);
        add(&h->c.faults, 1);
        __atomic_store_n(&h->history[h->history_head % MIG_DPD_HISTORY], p, __ATOMIC_RELAXED);
        __atomic_store_n(&h->history_head, h->history_head + 1, __ATOMIC_RELEASE);
        count_hits(h, p);
        struct waiting *w = h->nwaiting < MAX_WAITING ? &h->waiting[h->nwaiting++] : NULL;
        if (w)
            *w = (struct waiting){.page = p, .t_ns = t_ns[i], .waiters = waiters[i]};
        if (h->bulk && walk)
            mig_dpd_jump(h->bulk, p);
        else if (h->bulk)
            follow(h->bulk, p); /* the window fitted to the bulk's pace: see WINDOW_DELAY_NS */
        if (len + 2 * sizeof(struct dp_request) + (1 + MIG_DPD_MAX_NEIGHBOURHOOD) * sizeof(struct dp_run) > room)
            continue; /* asked on the next turn (settle_waiting) */
        uint64_t bit = 1ULL << (p % 64);
        int claimed = !(__atomic_fetch_or(&h->asked[p / 64], bit, __ATOMIC_ACQ_REL) & bit);
        int deep = !claimed && !walk && far_back(h, p);
        if (claimed || deep) {
            struct dp_run one = {.first_page = p, .count = 1};
            len += fault_request(h, out + len, &one, 1, 1);
            add(&h->c.asked_in_flight, (uint64_t)deep);
            if (w)
                w->asked = 1;
        }
        struct dp_run runs[MIG_DPD_MAX_NEIGHBOURHOOD];
        uint32_t npages;
        uint32_t nruns = claim_neighbourhood(h, p, runs, &npages);
        if (nruns)
            len += fault_request(h, out + len, runs, nruns, npages);
    }
    return len;
}

/* The fault connection broke: write off its requests, reconnect. Returns
 * the new socket or -1 (stopped or failed). */
static int fault_recover(struct mig_dpd *h, int fd, uint64_t last_rx, const char *why)
{
    pthread_mutex_lock(&h->mu);
    h->fd = -1; /* unpublished before the close: a stop never shuts down a reused descriptor */
    pthread_mutex_unlock(&h->mu);
    close(fd);
    if (stopped(&h->link))
        return -1;
    uint64_t lost_at = (uint64_t)dp_mono_ns();
    put(&h->c.link_down, 1);
    add(&h->c.outages, 1);
    for (int i = 0; i < FAULT_REQS; i++) {
        if (h->freqs[i].id) {
            forget(h, &h->freqs[i]);
            h->freqs[i].id = 0;
        }
    }
    char reason[512];
    snprintf(reason, sizeof(reason), "%s", why);
    fd = redial(&h->link, h->link.recovery_s, reason, sizeof(reason));
    if (fd < 0) {
        if (fd != -ECANCELED)
            fail(h, "lost the source at %s:%u: %s (for %g s; gave up, the guest stays paused)", h->link.host,
                 h->link.port, reason, h->link.recovery_s);
        return -1;
    }
    pthread_mutex_lock(&h->mu);
    if (h->stopping) {
        close(fd);
        fd = -1;
    } else {
        h->fd = fd;
    }
    pthread_mutex_unlock(&h->mu);
    add(&h->c.paused_ns, (uint64_t)dp_mono_ns() - (last_rx ? last_rx : lost_at));
    put(&h->c.link_down, 0);
    return fd;
}

/* Verify and install whole frames in buf[*lo, *hi). Returns 0, or -1 with
 * why set when the stream is broken (or the path failed). */
static int fault_frames(struct mig_dpd *h, struct installer_ctx *ctx, uint8_t *buf, uint32_t *lo, uint32_t hi,
                        const char **why)
{
    while (hi - *lo >= sizeof(struct dp_batch)) {
        struct dp_batch b;
        memcpy(&b, buf + *lo, sizeof(b));
        if (!framing_ok(&b, h->max_data)) {
            *why = "a frame that cannot be followed (bad magic or sizes)";
            pthread_mutex_lock(&h->mu);
            refuse(h, &b);
            pthread_mutex_unlock(&h->mu);
            return -1;
        }
        uint64_t flen = frame_len(&b);
        if (hi - *lo < flen)
            break;
        struct mig_install_stats st;
        const uint8_t *frame = buf + *lo;
        int v = install_frame(h, ctx, frame, &st, &b);
        *lo += (uint32_t)flen;
        if (v < 0) {
            fail(h, "installing %u faulted pages from page %llu failed: %s", b.count,
                 (unsigned long long)frame_run(frame, 0).first_page, strerror(-v));
            *why = h->error;
            return -1;
        }
        int known = settle(h, h->freqs, FAULT_REQS, &b, frame, v == REFUSED) == 0;
        if (v == REFUSED) {
            pthread_mutex_lock(&h->mu);
            int gave_up = refuse(h, &b);
            pthread_mutex_unlock(&h->mu);
            if (gave_up || !known) {
                *why = gave_up ? h->error : "a corrupt batch of unknown request";
                return -1;
            }
            continue; /* its pages are asked again by settle_waiting */
        }
        count_install(h, &st, 1);
        settle_waiting(h, st.done_ns, NULL, NULL);
    }
    return 0;
}

static void *faulter_main(void *arg)
{
    struct mig_dpd *h = arg;
    dp_thread_for_faults("dpd-fault");
    uint32_t cap = 2 * (h->max_data + 4096);
    uint8_t *buf = malloc(cap);
    uint8_t *out = malloc(FAULT_OUT_BYTES);
    struct installer_ctx ctx = {.scratch = malloc(h->max_data)};
    uint64_t pages[FAULTS_PER_READ], t_ns[FAULTS_PER_READ];
    uint32_t waiters[FAULTS_PER_READ];
    struct mig_fault_stats fst = {0};
    uint32_t lo = 0, hi = 0;
    uint64_t last_rx = 0;
    pthread_mutex_lock(&h->mu);
    int fd = h->fd;
    pthread_mutex_unlock(&h->mu);
    const char *why = NULL;
    if (!buf || !out || !ctx.scratch) {
        fail(h, "the fault path could not start: out of memory");
        goto out;
    }
    while (!why || (fd = fault_recover(h, fd, last_rx, why)) >= 0) {
        if (why) {
            why = NULL;
            lo = hi = 0;
        }
        size_t len = 0;
        struct pollfd p[5] = {{.fd = h->target_fd, .events = POLLIN}, {.fd = fd, .events = POLLIN},
                              {.fd = h->link.stopfd, .events = POLLIN},
                              {.fd = mig_space_wakefd(h->space), .events = POLLIN},
                              {.fd = h->bulk ? h->bulk->installed_fd : -1, .events = POLLIN}};
        struct timespec sleep_for = fault_sleep(h);
        int n = ppoll(p, 5, &sleep_for, NULL);
        if (n < 0 && errno != EINTR) {
            fail(h, "fault path: poll: %s", strerror(errno));
            break;
        }
        if (p[2].revents)
            break;
        uint64_t signals; /* the bulk path installed pages: settle_waiting below looks at them */
        if (p[4].revents && read(p[4].fd, &signals, sizeof(signals)) < 0)
            signals = 0; /* (EAGAIN: read already) */
        if (p[1].revents) {
            if (hi == cap || (lo && cap - hi < h->max_data + 4096)) {
                memmove(buf, buf + lo, hi - lo);
                hi -= lo;
                lo = 0;
            }
            ssize_t got = recv(fd, buf + hi, cap - hi, MSG_DONTWAIT);
            if (got <= 0 && !(got < 0 && (errno == EAGAIN || errno == EINTR))) {
                why = got ? strerror(errno) : "connection closed";
                continue;
            }
            if (got > 0) {
                hi += (uint32_t)got;
                add(&h->c.bytes_wire, (uint64_t)got);
                last_rx = (uint64_t)dp_mono_ns();
                if (fault_frames(h, &ctx, buf, &lo, hi, &why) < 0) {
                    if (__atomic_load_n(&h->failed, __ATOMIC_ACQUIRE))
                        break;
                    continue;
                }
                if (lo == hi)
                    lo = hi = 0;
            }
        }
        if (p[0].revents || mig_space_stashed(h->space)) {
            int k = mig_read_faults(h->space, h->received, pages, waiters,
                                    t_ns, FAULTS_PER_READ, 0, -1, &fst);
            if (k < 0 && k != -EINTR && k != -EAGAIN) {
                fail(h, "fault path: reading faults: %s", strerror(-k));
                break;
            }
            put(&h->c.woken, fst.woken);
            if (k > 0)
                len = on_faults(h, pages, waiters, t_ns, k, out, FAULT_OUT_BYTES);
        }
        if (h->nwaiting) {
            struct dp_run again[DP_MAX_RUNS];
            uint32_t nagain = 0;
            settle_waiting(h, 0, again, &nagain);
            for (uint32_t i = 0; i < nagain && len + 64 <= FAULT_OUT_BYTES; i++)
                len += fault_request(h, out + len, &again[i], 1, 1);
        }
        if (len) {
            int err = dp_send_full(fd, out, len);
            if (err)
                why = strerror(-err);
        }
    }
out:
    set_watched(h->bulk, 0);
    pthread_mutex_lock(&h->mu);
    h->fd = -1;
    pthread_mutex_unlock(&h->mu);
    if (fd >= 0)
        close(fd);
    if (ctx.dctx)
        dp_zstd_free_dctx(ctx.dctx);
    free(ctx.scratch);
    free(out);
    free(buf);
    return NULL;
}

struct mig_dpd *mig_dpd_fault_new(const char *host, int port, const uint8_t *key, struct mig_space *space,
                                  uint32_t page_size,
                                  uint64_t npages, uint64_t *received, uint64_t *asked, struct mig_dpd *bulk,
                                  double recovery_s, char *err, uint32_t err_len)
{
    struct mig_dpd *h = new_handle(ROLE_FAULT, host, port, key, mig_space_fd(space), 0, space, page_size, npages,
                                   received, asked, recovery_s, err, err_len);
    if (!h)
        return NULL;
    h->bulk = bulk;
    h->frun_store = calloc(FAULT_REQS * MIG_DPD_MAX_NEIGHBOURHOOD, sizeof(struct dp_run));
    h->waiting = calloc(MAX_WAITING, sizeof(*h->waiting));
    h->samples = calloc(MIG_DPD_SAMPLES, sizeof(uint64_t));
    h->pf = calloc((npages + 63) / 64, sizeof(uint64_t));
    h->history = calloc(MIG_DPD_HISTORY, sizeof(uint64_t));
    mig_dpd_set_neighbourhood(h, NEIGHBOURHOOD, MIG_NB_ALIGNED, 1);
    int r = h->frun_store && h->waiting && h->samples && h->pf && h->history ? 0 : ENOMEM;
    for (int i = 0; i < FAULT_REQS && !r; i++)
        h->freqs[i].runs = h->frun_store + (size_t)i * MIG_DPD_MAX_NEIGHBOURHOOD;
    if (!r)
        r = pthread_create(&h->faulter, NULL, faulter_main, h);
    if (r) {
        snprintf(err, err_len, "cannot start the fault path: %s", strerror(r));
        mig_dpd_free(h);
        return NULL;
    }
    h->started = 1;
    return h;
}

uint64_t mig_dpd_samples(struct mig_dpd *h, uint64_t *out, uint64_t max)
{
    if (!h->samples)
        return 0;
    uint64_t n = __atomic_load_n(&h->nsamples, __ATOMIC_ACQUIRE);
    uint64_t have = n < MIG_DPD_SAMPLES ? n : MIG_DPD_SAMPLES;
    if (have > max)
        have = max;
    for (uint64_t i = 0; i < have; i++)
        out[i] = __atomic_load_n(&h->samples[(n - have + i) % MIG_DPD_SAMPLES], __ATOMIC_RELAXED);
    return have;
}

/* ---- stop and free ---- */

void mig_dpd_stop(struct mig_dpd *h)
{
    pthread_mutex_lock(&h->mu);
    if (h->stopping) {
        pthread_mutex_unlock(&h->mu);
        return;
    }
    h->stopping = 1;
    h->finished = 1;
    if (h->link.stopfd >= 0) {
        uint64_t one = 1;
        if (write(h->link.stopfd, &one, sizeof(one)) < 0) { /* an eventfd write does not fail here */
        }
    }
    if (h->fd >= 0)
        shutdown(h->fd, SHUT_RDWR);
    announce_end(h);
    int started = h->started;
    pthread_mutex_unlock(&h->mu);
    if (started && h->role == ROLE_FAULT)
        pthread_join(h->faulter, NULL);
    if (h->has_receiver)
        pthread_join(h->receiver, NULL);
    if (h->has_requester)
        pthread_join(h->requester, NULL);
    for (int i = 0; i < h->ninstallers; i++)
        pthread_join(h->installers[i], NULL);
    if (h->fd >= 0) {
        close(h->fd);
        h->fd = -1;
    }
    h->round_active = 0;
}

void mig_dpd_free(struct mig_dpd *h)
{
    if (!h)
        return;
    mig_dpd_stop(h);
    if (h->link.stopfd >= 0)
        close(h->link.stopfd);
    if (h->installed_fd >= 0)
        close(h->installed_fd);
    for (int i = 0; i < NSLOTS; i++) {
        free(h->slots[i].buf);
        free(h->slots[i].offs);
    }
    free(h->run_store);
    free(h->frun_store);
    free(h->waiting);
    free(h->samples);
    free(h->pf);
    free(h->history);
    free(h->planq);
    pthread_cond_destroy(&h->cond);
    pthread_cond_destroy(&h->ended);
    pthread_mutex_destroy(&h->mu);
    free(h);
}

/* ---- policy hooks ---- */

uint32_t mig_dpd_plan(struct mig_dpd *h, const uint64_t *ranges, uint32_t n)
{
    pthread_mutex_lock(&h->mu);
    if (!h->planq)
        h->planq = calloc(MIG_DPD_PLAN_RUNS, sizeof(*h->planq));
    uint32_t taken = 0;
    for (; h->planq && taken < n && h->pq_len < MIG_DPD_PLAN_RUNS; taken++) {
        uint64_t first = ranges[2 * taken], count = ranges[2 * taken + 1];
        if (first >= h->npages || !count)
            continue;
        if (count > h->npages - first)
            count = h->npages - first;
        if (count > UINT32_MAX)
            count = UINT32_MAX;
        h->planq[(h->pq_head + h->pq_len++) % MIG_DPD_PLAN_RUNS] =
            (struct dp_run){.first_page = first, .count = (uint32_t)count};
    }
    pthread_cond_broadcast(&h->cond);
    pthread_mutex_unlock(&h->mu);
    return taken;
}

void mig_dpd_plan_only(struct mig_dpd *h, int on)
{
    pthread_mutex_lock(&h->mu);
    h->plan_only = on;
    pthread_cond_broadcast(&h->cond);
    pthread_mutex_unlock(&h->mu);
}

uint32_t mig_dpd_plan_len(struct mig_dpd *h)
{
    pthread_mutex_lock(&h->mu);
    uint32_t n = h->pq_len;
    pthread_mutex_unlock(&h->mu);
    return n;
}

void mig_dpd_plan_clear(struct mig_dpd *h)
{
    pthread_mutex_lock(&h->mu);
    h->pq_len = 0;
    pthread_mutex_unlock(&h->mu);
}

void mig_dpd_set_neighbourhood(struct mig_dpd *h, uint32_t pages, uint32_t shape, int32_t stride)
{
    if (pages > MIG_DPD_MAX_NEIGHBOURHOOD)
        pages = MIG_DPD_MAX_NEIGHBOURHOOD;
    if (shape > MIG_NB_AROUND)
        shape = MIG_NB_ALIGNED;
    uint64_t nb = (uint64_t)pages | (uint64_t)shape << 16 | (uint64_t)(uint32_t)stride << 32;
    __atomic_store_n(&h->nb, nb, __ATOMIC_RELAXED);
}

uint64_t mig_dpd_history(struct mig_dpd *h, uint64_t *pos, uint64_t *out, uint64_t max, uint64_t *lost)
{
    *lost = 0;
    if (!h->history)
        return 0;
    uint64_t head = __atomic_load_n(&h->history_head, __ATOMIC_ACQUIRE);
    if (head - *pos > MIG_DPD_HISTORY) {
        *lost = head - MIG_DPD_HISTORY - *pos;
        *pos = head - MIG_DPD_HISTORY;
    }
    uint64_t n = head - *pos < max ? head - *pos : max;
    for (uint64_t i = 0; i < n; i++)
        out[i] = __atomic_load_n(&h->history[(*pos + i) % MIG_DPD_HISTORY], __ATOMIC_RELAXED);
    /* entries the writer overwrote while they were copied are dropped */
    uint64_t now = __atomic_load_n(&h->history_head, __ATOMIC_ACQUIRE), skip = 0;
    if (now > MIG_DPD_HISTORY && now - MIG_DPD_HISTORY > *pos)
        skip = now - MIG_DPD_HISTORY - *pos;
    if (skip > n)
        skip = n;
    if (skip) {
        memmove(out, out + skip, (n - skip) * sizeof(*out));
        *lost += skip;
    }
    *pos += n;
    return n - skip;
}
