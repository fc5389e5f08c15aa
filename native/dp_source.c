/* The native data plane's source (see dp_source.h, docs/protocol.md).
 *
 * One accept thread; one thread per accepted connection, which reads the
 * hello, then requests, and answers each with batches built straight from
 * a read-only mapping of the guest's memfd: zero pages become runs, the
 * other pages are checksummed where they are, while the scan has them hot,
 * and sent from the mapping (no copy but the kernel's), or compressed into
 * a per-connection buffer. A batch carries up to DP_BATCH_PAGES pages of
 * a request's runs, however many runs that takes, and batches are queued
 * and sent many to a sendmsg (struct outq): a scattered request costs one
 * header, checksum and sendmsg per full batch, not one per run. */
#define _GNU_SOURCE
#include "dp_source.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <unistd.h>

#include "bitmap.h"
#include "dp_common.h"
#include "pages.h"

/* A hello must arrive this soon after the connection is accepted. */
#define HELLO_TIMEOUT_S 2
/* Connections served at once; more are dropped at accept (counted rejected). */
#define MAX_CONNECTIONS 64

/* "auto" compression (the policy of migrate/source/bulk_server.py):
 * compressed / raw above STOP_RATIO: send raw, probing one batch in
 * PROBE_EVERY; zstd's speed assumed until measured; compress only when it
 * saves WORTH_IT of the bytes. */
#define STOP_RATIO 0.9
#define PROBE_EVERY 32
#define COMPRESS_BPS_GUESS 400e6
#define WORTH_IT 0.92

/* The outgoing queue's budget: a sendmsg goes once this many bytes or
 * batches are queued (or the request is answered). A full 128-page batch
 * is sent alone; small batches (short requests) go many to a sendmsg. */
#define OUT_BYTES (256u << 10)
#define OUT_BATCHES 64
#define OUT_IOVS 1024  /* IOV_MAX */

#define ADD(field, n) __atomic_fetch_add(&s->counters.field, (n), __ATOMIC_RELAXED)

struct conn {
    struct mig_dp_source *s;
    int fd;
    pthread_t tid;
    int done;                   /* the thread has ended: join it (under s->mu) */
    struct conn *next;
};

struct mig_dp_source {
    const uint8_t *mem;
    uint64_t size, npages;
    uint32_t page_size;
    uint8_t key[DP_KEY_LEN];
    int compress, level;
    int holes_fd;               /* our own open file of the memfd, for SEEK_DATA (-1: none) */
    uint64_t *known_data;       /* pages found to hold data while frozen (see holes_at; NULL: none) */
    int listen_fd;
    uint16_t port;
    pthread_t accept_tid;
    int live;                   /* atomic: the guest may write its memory now (mig_dp_source_set_live) */
    int stopping;               /* under mu */
    pthread_mutex_t mu;
    struct conn *conns;         /* under mu */
    int nconns;
    struct mig_dp_source_counters counters;
};

/* ------------------------------------------------------------- compression */

/* Per bulk connection: the "auto" policy's moving averages and zstd's room. */
struct squeeze {
    ZSTD_CCtx *cctx;
    uint8_t *buf;
    size_t cap;
    int local_peer;
    double compress_bps, ratio;
    double send_s_per_byte;     /* how long the last sendmsg took, per byte it sent */
    unsigned skipped;
};

static int should_compress(const struct mig_dp_source *s, struct squeeze *z, uint32_t raw_len)
{
    if (!z->cctx || raw_len == 0)
        return 0;
    if (s->compress != MIG_DP_COMPRESS_AUTO)
        return s->compress == MIG_DP_COMPRESS_ALWAYS;
    if (z->local_peer)  /* a loopback "link" is memory: compressing takes the CPU the peer needs */
        return 0;
    if (z->ratio > STOP_RATIO) {
        if (++z->skipped < PROBE_EVERY)
            return 0;
        z->skipped = 0;
    }
    /* The link is the bottleneck when sending this would take longer than compressing it. */
    return raw_len * z->send_s_per_byte > raw_len / z->compress_bps;
}

/* Compress the batch's data into z->buf: 1 and the frame's length in *out_len when it is worth sending so. */
static int squeeze_batch(struct squeeze *z, const struct iovec *data, int n, uint32_t raw_len, uint32_t *out_len)
{
    const char *err;
    int64_t t0 = dp_mono_ns();
    int64_t len = dp_zstd_compress_iov(z->cctx, z->buf, z->cap, data, n, raw_len, &err);
    double seconds = (dp_mono_ns() - t0) / 1e9;
    if (len < 0)
        return 0;  /* zstd failing is not the peer's problem: this batch goes raw */
    if (seconds > 0)
        z->compress_bps = 0.8 * z->compress_bps + 0.2 * raw_len / seconds;
    z->ratio = 0.8 * z->ratio + 0.2 * (double)len / raw_len;
    if (len >= WORTH_IT * raw_len)
        return 0;  /* sent raw: *out_len stays raw_len */
    *out_len = (uint32_t)len;
    return 1;
}

/* Start a thread with every signal blocked: signals are the Python main
 * thread's business, and our blocking calls then never see EINTR. */
static int spawn(pthread_t *tid, void *(*fn)(void *), void *arg)
{
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int r = pthread_create(tid, NULL, fn, arg);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return r;
}

/* ------------------------------------------------------------------- holes */

/* Pages never written (or discarded) are holes in the memfd: zero pages
 * that reading through the mapping would allocate, here, one by one. So a
 * batch asks the file where its data is (SEEK_DATA / SEEK_HOLE: a few
 * syscalls a batch, never one a page) and sends holes as zero runs without
 * touching them. Only where data lies is remembered (a stale answer there
 * costs an allocation, never a wrong page); a hole is asked about every
 * time, since the guest may have written it since.
 *
 * SEEK_HOLE walks the file from the page to the next hole: the whole file,
 * for a guest that wrote all its RAM. Each connection's window starts
 * empty, and a request behind it (a fault, the cursor jumping back) asks
 * again; so once the guest is frozen here (its memory final: what held data
 * still does), every extent of data found goes into known_data, shared by
 * all connections, and the file is walked once a migration, not once a
 * connection or a jump. */
#define HOLE_QUERIES_PER_RUN 8

struct holes {
    uint64_t data_lo, data_hi;  /* pages [data_lo, data_hi) held data when last asked */
    int budget;                 /* queries this run of the batch may still make */
};

/* How many pages from `page` (not past `limit`) are holes: 0 when it holds
 * data, or when we may not ask. */
static uint64_t holes_at(struct mig_dp_source *s, struct holes *h, uint64_t page, uint64_t limit)
{
    if (s->holes_fd < 0 || (page >= h->data_lo && page < h->data_hi) || h->budget <= 0 ||
        (s->known_data && mig_bitmap_test(s->known_data, page)))
        return 0;
    h->budget--;
    ADD(hole_queries, 1);
    int frozen = !__atomic_load_n(&s->live, __ATOMIC_ACQUIRE);  /* before asking: the answer is final */
    const uint64_t ps = s->page_size;
    off_t data = lseek(s->holes_fd, (off_t)(page * ps), SEEK_DATA);
    if (data < 0)
        return errno == ENXIO ? limit - page : 0;  /* ENXIO: no data from there on */
    uint64_t data_page = (uint64_t)data / ps;
    if (data_page > page)
        return (data_page < limit ? data_page : limit) - page;
    off_t hole = lseek(s->holes_fd, data, SEEK_HOLE);
    h->data_lo = page;
    h->data_hi = hole > data ? ((uint64_t)hole + ps - 1) / ps : page + 1;
    if (frozen && s->known_data)
        mig_bitmap_set(s->known_data, h->data_lo, (h->data_hi < s->npages ? h->data_hi : s->npages) - h->data_lo);
    return 0;
}

/* ----------------------------------------------------------------- serving */

/* A batch's header, its page runs and its zero runs, contiguous: one iovec
 * on the wire. */
struct frame {
    struct dp_batch h;
    /* nruns struct dp_run, then the zero runs' pairs: at most one zero run per two pages, plus one */
    _Alignas(8) uint8_t tail[DP_BATCH_PAGES * sizeof(struct dp_run) + (DP_BATCH_PAGES + 2) * sizeof(uint32_t)];
};

/* Batches built and not yet sent: their frames, the iovecs that send them
 * (frames, then data straight from the mapping or from zstd's buffer), and
 * what the counters get once they are sent. */
struct outq {
    struct frame *frames;       /* OUT_BATCHES */
    struct iovec iov[OUT_IOVS];
    int nframes, niov;
    uint64_t bytes, pages, zero, compressed;
    uint8_t *bounce;            /* live: the queued batches' copied pages (allocated when first needed) */
    size_t bounce_used, bounce_cap;
};

/* Send what is queued. Returns 0 or -errno. Counted before it is sent, so
 * a peer that has received it reads counters that include it. */
static int flush(struct mig_dp_source *s, int fd, struct squeeze *z, struct outq *q, int fault)
{
    if (!q->niov)
        return 0;
    ADD(zero_pages, q->zero);
    ADD(bytes, q->bytes);
    ADD(compressed_batches, q->compressed);
    ADD(sends, 1);
    if (fault)
        ADD(fault_pages, q->pages);
    else
        ADD(pages, q->pages);
    int64_t t0 = dp_mono_ns();
    int r = dp_send_iov(fd, q->iov, q->niov);
    if (z)
        z->send_s_per_byte = (dp_mono_ns() - t0) / 1e9 / q->bytes;
    q->nframes = q->niov = 0;
    q->bytes = q->pages = q->zero = q->compressed = 0;
    q->bounce_used = 0;
    return r;
}

/* Ask the CPU for a page (its first PREFETCH_BYTES) ahead of the zero
 * check and the checksum: the hardware prefetcher stops at a page boundary,
 * so without this every page starts with a TLB and a cache miss each (most
 * of a scattered set's cost at the source). The next page is asked for
 * while one is read; a run's first page also RUNS_AHEAD runs of the batch earlier, since
 * one short run (a scattered set's 1.2 pages) is over before DRAM answers
 * (source CPU per MiB of a scattered set 0.30-0.33 -> 0.26-0.27 ms). */
#define PREFETCH_BYTES 4096u
#define RUNS_AHEAD 4

static void prefetch_page(const uint8_t *page, uint32_t page_size)
{
    uint32_t len = page_size < PREFETCH_BYTES ? page_size : PREFETCH_BYTES;
    for (uint32_t off = 0; off < len; off += 64)
        __builtin_prefetch(page + off, 0, 3);
}

/* The pages a request's runs still owe, in order: runs[i] from page p on. */
struct owed {
    const struct dp_run *runs;
    uint32_t nruns, i;
    uint64_t p;
};

/* Take the next batch's page runs from what is owed: at most `most` pages,
 * each a piece of one of the request's runs (never two merged: the
 * destination finds each piece within a run it asked for). Returns the
 * pages taken; *n gets the runs. */
static uint32_t take_runs(struct owed *o, uint32_t most, struct dp_run *out, uint32_t *n)
{
    uint32_t pages = 0, k = 0;
    while (o->i < o->nruns && pages < most) {
        uint64_t end = o->runs[o->i].first_page + o->runs[o->i].count;
        uint32_t take = end - o->p < most - pages ? (uint32_t)(end - o->p) : most - pages;
        out[k++] = (struct dp_run){.first_page = o->p, .count = take};
        pages += take;
        o->p += take;
        if (o->p == end && ++o->i < o->nruns)
            o->p = o->runs[o->i].first_page;
    }
    *n = k;
    return pages;
}

/* Queue the pages of `nruns` page runs (count pages in all, at most
 * dp_batch_pages) as one batch, sending the queue when it is full; `next` is
 * the first page of the batch after it (or UINT64_MAX), prefetched while
 * this one is read. A scattered set goes out in full batches: one header,
 * checksum and verification per batch, not per run. Returns 0 or -errno. */
static int send_batch(struct mig_dp_source *s, int fd, struct squeeze *z, struct holes *holes, struct outq *q,
                      uint64_t req_id, const struct dp_run *pruns, uint32_t nruns, uint32_t count, uint64_t next,
                      int fault)
{
    const uint32_t ps = s->page_size;
    struct frame *f = &q->frames[q->nframes];
    f->h = (struct dp_batch){.magic = DP_BATCH_MAGIC, .encoding = DP_RAW, .req_id = req_id, .nruns = nruns,
                             .count = count};
    memcpy(f->tail, pruns, nruns * sizeof *pruns);
    uint32_t *zruns = (uint32_t *)(f->tail + nruns * sizeof *pruns);
    struct iovec *data = &q->iov[q->niov + 1];  /* after the frame's own iovec */
    /* A guest still running here may write a page between its checksum and
     * the send (the kernel copies it out of the mapping then): the batch's
     * pages are copied first and the copy is checksummed and sent. A torn
     * copy is no harm: the write is in the next dirty scan and the page is
     * sent again. Once the guest stopped here, pages go straight out of the
     * mapping. */
    uint8_t *copy = __atomic_load_n(&s->live, __ATOMIC_ACQUIRE) ? q->bounce + q->bounce_used : NULL;
    struct dp_digest digest;
    dp_digest_init(&digest);
    dp_digest_update(&digest, pruns, nruns * sizeof *pruns);
    int ndata = 0;
    uint32_t nzero = 0, zero = 0, at = 0;  /* at: the batch's page number of the run's first page */
    for (uint32_t k = 0; k < nruns; at += pruns[k].count, k++) {
        const uint64_t first = pruns[k].first_page, end = first + pruns[k].count;
        const uint8_t *base = s->mem + first * ps;
        if (k + RUNS_AHEAD < nruns)  /* a short run is over before DRAM answers: ask well ahead */
            prefetch_page(s->mem + pruns[k + RUNS_AHEAD].first_page * ps, ps);
        holes->budget = HOLE_QUERIES_PER_RUN;
        for (uint32_t i = 0, n; first + i < end; i += n) {
            const uint8_t *page = base + (uint64_t)i * ps;
            n = (uint32_t)holes_at(s, holes, first + i, end);
            uint64_t ahead = first + i + 1 < end ? first + i + 1 : k + 1 < nruns ? pruns[k + 1].first_page : next;
            if (!n && ahead < s->npages)
                prefetch_page(s->mem + ahead * ps, ps);
            if (n || mig_page_is_zero(page, ps)) {
                n = n ? n : 1;
                if (nzero && zruns[2 * nzero - 2] + zruns[2 * nzero - 1] == at + i) {
                    zruns[2 * nzero - 1] += n;
                } else {
                    zruns[2 * nzero] = at + i;
                    zruns[2 * nzero + 1] = n;
                    nzero++;
                }
                zero += n;
                continue;
            }
            n = 1;
            if (copy) {
                memcpy(copy, page, ps);
                page = copy;
                copy += ps;
                q->bounce_used += ps;
            }
            dp_digest_update(&digest, page, ps);  /* while the zero check has it in cache */
            struct iovec *last = ndata ? &data[ndata - 1] : NULL;
            if (last && (const uint8_t *)last->iov_base + last->iov_len == page)
                last->iov_len += ps;
            else
                data[ndata++] = (struct iovec){(void *)page, ps};
        }
    }
    dp_digest_update(&digest, zruns, nzero * 2 * sizeof *zruns);
    f->h.nzero_pairs = nzero;
    f->h.raw_len = (count - zero) * ps;
    f->h.data_len = f->h.raw_len;
    f->h.checksum = dp_digest_final(&digest);
    int squeezed = !fault && should_compress(s, z, f->h.raw_len) &&
                   squeeze_batch(z, data, ndata, f->h.raw_len, &f->h.data_len);
    if (squeezed) {
        f->h.encoding = DP_ZSTD;
        data[0] = (struct iovec){z->buf, f->h.data_len};
        ndata = 1;
        q->compressed++;
    }
    size_t head = sizeof f->h + nruns * sizeof *pruns + nzero * 2 * sizeof *zruns;
    q->iov[q->niov] = (struct iovec){f, head};
    q->niov += 1 + ndata;
    q->nframes++;
    q->bytes += head + f->h.data_len;
    q->pages += count;
    q->zero += zero;
    /* Full, or the next batch might not fit, or zstd's buffer is about to be reused: send. */
    if (squeezed || q->bytes >= OUT_BYTES || q->nframes == OUT_BATCHES || q->niov + 1 + DP_BATCH_PAGES > OUT_IOVS)
        return flush(s, fd, z, q, fault);
    return 0;
}

/* Read and check one request; 1: its runs are in runs[0..*nruns), 0: the
 * peer closed between requests, -1: the connection ends (broken, or a bad
 * request: counted). */
static int read_request(struct mig_dp_source *s, int fd, struct dp_request *req, struct dp_run *runs)
{
    ssize_t n = dp_read_full(fd, req, sizeof *req);
    if (n == 0)
        return 0;
    if (n != (ssize_t)sizeof *req)
        return -1;
    if (req->magic != DP_REQ_MAGIC || req->nruns == 0 || req->nruns > DP_MAX_RUNS) {
        ADD(bad_requests, 1);
        return -1;
    }
    size_t len = (size_t)req->nruns * sizeof *runs;
    if (dp_read_full(fd, runs, len) != (ssize_t)len)
        return -1;
    uint64_t total = 0;
    for (uint32_t i = 0; i < req->nruns; i++) {
        total += runs[i].count;
        if (runs[i].count == 0 || runs[i].first_page >= s->npages || runs[i].count > s->npages - runs[i].first_page ||
            total > DP_MAX_REQUEST_PAGES) {
            ADD(bad_requests, 1);
            return -1;
        }
    }
    return 1;
}

/* Room for one more batch of `count` pages; live, its copies must fit the
 * bounce buffer (allocated at the first live batch): send the queue first
 * if they do not. Returns 0 or -errno. */
static int make_room(struct mig_dp_source *s, int fd, struct squeeze *z, struct outq *q, uint32_t count, int fault)
{
    if (!__atomic_load_n(&s->live, __ATOMIC_ACQUIRE))
        return 0;
    if (!q->bounce) {
        q->bounce_cap = OUT_BYTES + (size_t)dp_batch_pages(s->page_size) * s->page_size;
        if (!(q->bounce = malloc(q->bounce_cap)))
            return -ENOMEM;
    }
    if (q->bounce_used + (size_t)count * s->page_size > q->bounce_cap)
        return flush(s, fd, z, q, fault);
    return 0;
}

static void serve(struct mig_dp_source *s, int fd, int fault, struct squeeze *z)
{
    struct dp_request req;
    struct dp_run runs[DP_MAX_RUNS], pruns[DP_BATCH_PAGES];
    struct holes holes = {0};
    const uint32_t most = dp_batch_pages(s->page_size);
    struct outq *q = calloc(1, sizeof *q);
    if (!q || !(q->frames = malloc(OUT_BATCHES * sizeof *q->frames))) {
        free(q);
        return;  /* out of memory: the destination sees the connection close and reconnects */
    }
    while (read_request(s, fd, &req, runs) > 0) {
        ADD(requests, !fault);
        ADD(fault_requests, fault);
        int err = 0;
        struct owed owed = {.runs = runs, .nruns = req.nruns, .p = runs[0].first_page};
        while (owed.i < owed.nruns && !err) {
            uint32_t nruns, count = take_runs(&owed, most, pruns, &nruns);
            uint64_t next = owed.i < owed.nruns ? owed.p : UINT64_MAX;
            err = make_room(s, fd, z, q, count, fault);
            if (!err)
                err = send_batch(s, fd, z, &holes, q, req.req_id, pruns, nruns, count, next, fault);
        }
        if (err || flush(s, fd, z, q, fault))  /* a request answered: nothing of it waits */
            break;
    }
    free(q->bounce);
    free(q->frames);
    free(q);
}

/* The hello: 1 and the kind, or 0 (counted rejected). */
static int hello(struct mig_dp_source *s, int fd, uint32_t *kind)
{
    /* One recv: its timeout bounds the whole hello (a peer dribbling bytes
     * gets no fresh timeout per byte); our threads block every signal. */
    struct timeval tv = {.tv_sec = HELLO_TIMEOUT_S};
    struct dp_hello h;
    memset(&h, 0, sizeof h);
    int ok = !setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) &&
             recv(fd, &h, sizeof h, MSG_WAITALL) == (ssize_t)sizeof h && !memcmp(h.magic, DP_MAGIC, DP_MAGIC_LEN) &&
             h.version == DP_VERSION && (h.kind == DP_KIND_BULK || h.kind == DP_KIND_FAULT);
    ok = dp_key_equal(h.key, s->key, DP_KEY_LEN) & ok;  /* compared whatever else was wrong */
    if (!ok) {
        ADD(rejected, 1);
        return 0;
    }
    struct timeval forever = {0};
    struct dp_hello_reply reply = {.status = 0, .page_size = s->page_size, .npages = s->npages};
    memcpy(reply.magic, DP_MAGIC, DP_MAGIC_LEN);
    if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &forever, sizeof forever) ||
        dp_tune_socket(fd, h.kind == DP_KIND_BULK) || dp_send_full(fd, &reply, sizeof reply))
        return 0;
    ADD(connections, 1);
    *kind = h.kind;
    return 1;
}

static void *conn_main(void *arg)
{
    struct conn *c = arg;
    struct mig_dp_source *s = c->s;
    uint32_t kind;
    if (hello(s, c->fd, &kind)) {
        if (kind == DP_KIND_FAULT) { /* short and bounded: ahead of everything else on this host */
            dp_thread_for_faults("dps-fault");
            serve(s, c->fd, 1, NULL);
        } else {
            dp_thread_for_bulk("dps-bulk");
            struct squeeze z = {.compress_bps = COMPRESS_BPS_GUESS, .ratio = 0.5, .local_peer = dp_peer_is_local(c->fd)};
            if (s->compress != MIG_DP_COMPRESS_NEVER && (z.cctx = dp_zstd_cctx(s->level))) {
                z.cap = dp_zstd_bound((size_t)DP_BATCH_PAGES * s->page_size);
                z.buf = malloc(z.cap);
            }
            if (!z.buf) {
                dp_zstd_free_cctx(z.cctx);
                z.cctx = NULL;
            }
            serve(s, c->fd, 0, &z);
            dp_zstd_free_cctx(z.cctx);
            free(z.buf);
        }
    }
    shutdown(c->fd, SHUT_RDWR);
    pthread_mutex_lock(&s->mu);
    c->done = 1;
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

/* Join and free ended connections (all of them when `all`, after shutting
 * their sockets down). Called with s->mu held; drops it while joining. */
static void reap(struct mig_dp_source *s, int all)
{
    struct conn **pp = &s->conns;
    while (*pp) {
        struct conn *c = *pp;
        if (!c->done && !all) {
            pp = &c->next;
            continue;
        }
        *pp = c->next;
        s->nconns--;
        shutdown(c->fd, SHUT_RDWR);
        pthread_mutex_unlock(&s->mu);
        pthread_join(c->tid, NULL);
        close(c->fd);
        free(c);
        pthread_mutex_lock(&s->mu);
        pp = &s->conns;
    }
}

static void *accept_main(void *arg)
{
    struct mig_dp_source *s = arg;
    for (;;) {
        int fd = accept4(s->listen_fd, NULL, NULL, SOCK_CLOEXEC);
        pthread_mutex_lock(&s->mu);
        if (s->stopping) {
            pthread_mutex_unlock(&s->mu);
            if (fd >= 0)
                close(fd);
            return NULL;
        }
        reap(s, 0);
        if (fd < 0) {
            pthread_mutex_unlock(&s->mu);
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM)
                usleep(100000);  /* out of something: do not spin */
            continue;
        }
        struct conn *c = s->nconns < MAX_CONNECTIONS ? calloc(1, sizeof *c) : NULL;
        if (c) {
            *c = (struct conn){.s = s, .fd = fd, .next = s->conns};
            if (spawn(&c->tid, conn_main, c)) {
                free(c);
                c = NULL;
            } else {
                s->conns = c;
                s->nconns++;
            }
        }
        pthread_mutex_unlock(&s->mu);
        if (!c) {
            ADD(rejected, 1);
            close(fd);
        }
    }
}

struct mig_dp_source *mig_dp_source_start(int memfd, uint64_t size, uint32_t page_size, const char *host,
                                          uint16_t port, const uint8_t *key, int compress, int level, int *err)
{
    if (page_size == 0 || page_size % 64 || size % page_size || size == 0 || page_size > (1u << 24)) {
        *err = EINVAL;
        return NULL;
    }
    struct mig_dp_source *s = calloc(1, sizeof *s);
    if (!s) {
        *err = ENOMEM;
        return NULL;
    }
    s->size = size;
    s->npages = size / page_size;
    s->page_size = page_size;
    s->compress = compress;
    s->level = level;
    s->live = 1;  /* until told otherwise, the guest may be writing */
    memcpy(s->key, key, DP_KEY_LEN);
    pthread_mutex_init(&s->mu, NULL);
    void *mem = mmap(NULL, size, PROT_READ, MAP_SHARED, memfd, 0);
    if (mem == MAP_FAILED) {
        *err = errno;
        goto fail;
    }
    s->mem = mem;
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", memfd);
    s->holes_fd = open(path, O_RDONLY | O_CLOEXEC);  /* a file offset of our own for lseek */
    s->known_data = calloc((s->npages + 63) / 64, sizeof(uint64_t));  /* none: every connection asks the file */
    s->listen_fd = dp_listen(host, port, &s->port);
    if (s->listen_fd < 0) {
        *err = -s->listen_fd;
        goto fail_holes;
    }
    int r = spawn(&s->accept_tid, accept_main, s);
    if (r) {
        *err = r;
        close(s->listen_fd);
        goto fail_holes;
    }
    return s;
fail_holes:
    if (s->holes_fd >= 0)
        close(s->holes_fd);
    free(s->known_data);
fail:
    if (s->mem)
        munmap((void *)s->mem, size);
    pthread_mutex_destroy(&s->mu);
    free(s);
    return NULL;
}

void mig_dp_source_set_live(struct mig_dp_source *s, int live)
{
    __atomic_store_n(&s->live, !!live, __ATOMIC_RELEASE);
    /* Frozen with every block allocated (a guest that wrote all its RAM):
     * there is no hole to find, and SEEK_HOLE would walk the whole file. */
    struct stat st;
    if (!live && s->known_data && s->holes_fd >= 0 && !fstat(s->holes_fd, &st) &&
        (uint64_t)st.st_blocks * 512 >= s->size)
        mig_bitmap_set(s->known_data, 0, s->npages);
}

uint16_t mig_dp_source_port(const struct mig_dp_source *s)
{
    return s->port;
}

void mig_dp_source_counters(const struct mig_dp_source *s, struct mig_dp_source_counters *out)
{
    const uint64_t *in = (const uint64_t *)&s->counters;
    uint64_t *o = (uint64_t *)out;
    for (size_t i = 0; i < sizeof *out / sizeof(uint64_t); i++)
        o[i] = __atomic_load_n(&in[i], __ATOMIC_RELAXED);
}

void mig_dp_source_stop(struct mig_dp_source *s, struct mig_dp_source_counters *final)
{
    pthread_mutex_lock(&s->mu);
    s->stopping = 1;
    pthread_mutex_unlock(&s->mu);
    shutdown(s->listen_fd, SHUT_RDWR);  /* wakes accept() */
    pthread_join(s->accept_tid, NULL);
    close(s->listen_fd);
    pthread_mutex_lock(&s->mu);
    reap(s, 1);
    pthread_mutex_unlock(&s->mu);
    if (final)
        mig_dp_source_counters(s, final);
    munmap((void *)s->mem, s->size);
    if (s->holes_fd >= 0)
        close(s->holes_fd);
    free(s->known_data);
    pthread_mutex_destroy(&s->mu);
    free(s);
}

/* ------------------------------------------------------------ raw baseline */

int64_t mig_dp_raw_send(int fd, const uint8_t *buf, uint64_t len, uint64_t total)
{
    uint64_t sent = 0;
    while (sent < total) {
        uint64_t n = total - sent < len ? total - sent : len;
        int r = dp_send_full(fd, buf, n);
        if (r)
            return r;
        sent += n;
    }
    return (int64_t)sent;
}

int64_t mig_dp_raw_recv(int fd, uint64_t total)
{
    enum { SINK = 1 << 20 };
    uint8_t *sink = malloc(SINK);
    if (!sink)
        return -ENOMEM;
    int64_t got = 0;
    while ((uint64_t)got < total) {
        ssize_t n = recv(fd, sink, total - got < SINK ? total - got : SINK, 0);
        if (n <= 0 && (n == 0 || errno != EINTR)) {
            got = n == 0 ? -ECONNRESET : -errno;
            break;
        }
        got += n > 0 ? n : 0;
    }
    free(sink);
    return got;
}
