/* The native data plane's destination side (see dp_dest.c, docs/protocol.md
 * "Native data plane"): C threads that ask the source for pages over TCP,
 * verify the batches and install them, never handing page bytes to Python.
 *
 * One handle per path: a bulk path (pulls every missing page; into a
 * userfaultfd after the switch, or pwrite()s into the guest's memfd during
 * pre-copy rounds) or a fault path (serves a userfaultfd's faults). Python
 * starts and stops them and reads their counters. */
#ifndef MIGRATE_DP_DEST_H
#define MIGRATE_DP_DEST_H

#include <stdint.h>

#include "uffd.h"

/* cffi: begin */
/* Counters of one path, updated atomically by its threads while Python reads
 * them (aligned 64-bit words). The fault fields stay 0 on a bulk path. */
struct mig_dpd_counters {
    uint64_t pages;       /* pages installed by this path */
    uint64_t zero;        /* of which zero pages */
    uint64_t bytes_wire;  /* bytes received (frames, headers included) */
    uint64_t bytes_pages; /* pages installed * page size */
    uint64_t batches;     /* batches installed */
    uint64_t refused;     /* batches refused (verification failed) */
    uint64_t duplicates;  /* pages received that were already in place */
    uint64_t requests;    /* requests sent */
    uint64_t link_down;   /* 1 while the connection is down */
    uint64_t outages;     /* connections lost */
    uint64_t paused_ns;   /* time from the last byte received to the reconnect, summed */
    uint64_t done;        /* bulk: every page is in */
    uint64_t faults;      /* fault path: faults read on missing pages */
    uint64_t woken;       /* fault path: faults on pages already in, woken at once */
    uint64_t resolved;    /* fault path: faults whose page arrived */
    uint64_t blocked_ns;  /* fault path: latency * waiting threads, summed */
    uint64_t lat_sum_ns;
    uint64_t lat_max_ns;
    uint64_t hist[32];    /* fault latency, log2 µs buckets (bucket 0 also holds < 1 µs) */
    /* policy hooks (below) */
    uint64_t planned;       /* bulk: pages asked because the plan queue named them */
    uint64_t prefetched;    /* fault path: neighbour pages asked with a fault */
    uint64_t prefetch_hits; /* fault path: prefetched pages the guest went on to use (see mig_dpd_set_neighbourhood) */
    uint64_t zero_lazy;     /* of the zero pages, those only marked received (mig_space_lazy_zero) */
    uint64_t asked_in_flight; /* fault path: faults on a page deep in the bulk's window, asked at once */
};

/* Latency samples a fault path keeps (the newest). */
#define MIG_DPD_SAMPLES 65536

struct mig_dpd;

/* A bulk path connected to the source at host:port (hello with `key`,
 * DP_KEY_LEN bytes), installing into `target_fd`: a userfaultfd over
 * `space` (to_memfd 0: target_fd is the space's fd) or the guest's memfd
 * (to_memfd 1, space NULL).
 * received (npages bits) is the run's bitmap, asked (npages bits, all clear)
 * the pages asked and not yet installed, shared with a fault path. Nothing
 * moves until mig_dpd_round. NULL on failure, with a message in err. */
struct mig_dpd *mig_dpd_bulk_new(const char *host, int port, const uint8_t *key, int target_fd, int to_memfd,
                                 struct mig_space *space, uint32_t page_size,
                                 uint64_t npages, uint64_t *received, uint64_t *asked, double recovery_s,
                                 char *err, uint32_t err_len);

/* Start a round on a bulk path: pull every page whose received bit is clear,
 * at most max_bandwidth bytes/s (0: no limit), asking nothing after
 * deadline_s seconds (0: none). A bulk path into a userfaultfd has one round,
 * that ends when every page is in; a pre-copy path has one per pull.
 * -EBUSY while a round runs, -EPIPE once the path failed. */
int mig_dpd_round(struct mig_dpd *h, uint64_t max_bandwidth, double deadline_s);

/* Pace the running round (and the next) at max_bandwidth bytes/s (0: no
 * limit), counted from now; a fault path is never paced. */
void mig_dpd_set_bandwidth(struct mig_dpd *h, uint64_t max_bandwidth);

/* The pace in force, bytes/s (0: none). */
uint64_t mig_dpd_bandwidth(struct mig_dpd *h);

/* Wait up to timeout_ms for the round to end: 1 ended, 0 still running, -1
 * the path failed (mig_dpd_error says why). */
int mig_dpd_wait(struct mig_dpd *h, int timeout_ms);

/* Ask nothing more in this round (it ends once what was asked is in). */
void mig_dpd_stop_asking(struct mig_dpd *h);

/* Go on asking from `page` (a fault path outside this module calls this
 * where the guest faults), with the window narrowed while such faults come:
 * they wait for the pages in flight, and a whole window's traffic delays
 * their own replies. (The native fault path's faults at random move the
 * cursor, fit the window to the bulk's pace and ask a page deep in it
 * themselves, see dp_dest.c.) */
void mig_dpd_jump(struct mig_dpd *h, uint64_t page);

/* Faults that wait for pages this bulk path asked (a fault path outside this
 * module says how many): while any do, each install signals the eventfd
 * mig_dpd_installed_fd returns, for that fault path to poll. */
void mig_dpd_watch(struct mig_dpd *h, uint32_t faults);
int mig_dpd_installed_fd(const struct mig_dpd *h);

/* A fault path: reads the faults of the userfaultfd of `space`, asks the source
 * (host:port, a connection of kind fault) for each missing page, then its
 * aligned 16-page neighbourhood, installs the replies, and moves `bulk`'s
 * cursor (may be NULL) to the fault. asked is shared with `bulk` (the same
 * bitmap) or its own. Serves at once. NULL on failure, message in err. */
struct mig_dpd *mig_dpd_fault_new(const char *host, int port, const uint8_t *key, struct mig_space *space,
                                  uint32_t page_size,
                                  uint64_t npages, uint64_t *received, uint64_t *asked, struct mig_dpd *bulk,
                                  double recovery_s, char *err, uint32_t err_len);

/* The newest fault latency samples (ns), oldest first, at most max: returns how many. */
uint64_t mig_dpd_samples(struct mig_dpd *h, uint64_t *out, uint64_t max);

const struct mig_dpd_counters *mig_dpd_counters(struct mig_dpd *h);

/* Why the path stopped serving, or NULL while it serves. */
const char *mig_dpd_error(struct mig_dpd *h);

/* Stop every thread (prompt: sockets are shut down), install what was fully
 * received, close the connection. Idempotent. */
void mig_dpd_stop(struct mig_dpd *h);

/* mig_dpd_stop, then free the handle. */
void mig_dpd_free(struct mig_dpd *h);

/* ---- policy hooks (docs/architecture.md "Push and prefetch policies") ----
 * A policy runs in Python on its own thread, never on the fault path: it
 * reads the fault history in batches, queues page ranges for the bulk path
 * and sets the shape of the neighbourhood the fault path fetches itself. */

#define MIG_DPD_PLAN_RUNS 4096        /* ranges the plan queue holds */
#define MIG_DPD_HISTORY 65536         /* faults the history ring holds (the newest) */
#define MIG_DPD_MAX_NEIGHBOURHOOD 128 /* most pages fetched with one fault */

/* Neighbourhood shapes: the fault's aligned block of `pages`; `pages` pages
 * after it (page + stride, + 2 stride, ...); before it; both sides, nearest
 * first. */
enum { MIG_NB_ALIGNED = 0, MIG_NB_FORWARD = 1, MIG_NB_BACKWARD = 2, MIG_NB_AROUND = 3 };

/* Bulk path: queue n ranges (pairs first_page, count) to ask next, in that
 * order, before the cursor's; pages received or asked meanwhile are skipped.
 * Returns the ranges taken (fewer once the queue is full). */
uint32_t mig_dpd_plan(struct mig_dpd *h, const uint64_t *ranges, uint32_t n);

/* Bulk path: with `on`, ask only what the plan queue names; the cursor (the
 * push of everything else) waits until it is off again. */
void mig_dpd_plan_only(struct mig_dpd *h, int on);

/* Bulk path: ranges still queued. */
uint32_t mig_dpd_plan_len(struct mig_dpd *h);

/* Bulk path: drop every range queued (the cursor takes over). */
void mig_dpd_plan_clear(struct mig_dpd *h);

/* Fault path: fetch `pages` (0..MIG_DPD_MAX_NEIGHBOURHOOD, clipped) with
 * each fault, in `shape`, every `stride`-th page (1: contiguous; ignored by
 * MIG_NB_ALIGNED). Applies from the next fault on. A prefetched page counts
 * as a hit when the guest later faults on it while it is on its way, or
 * faults on a page right past it (stride apart, either side: the guest went
 * through it without faulting); a prefetched page the guest touches and
 * then leaves for somewhere else is not seen, so hits are a lower bound. */
void mig_dpd_set_neighbourhood(struct mig_dpd *h, uint32_t pages, uint32_t shape, int32_t stride);

/* Fault path: count as hits the prefetched pages (not yet counted) whose
 * bits are set in `used` (nbits bits): pages the guest was seen to use
 * without faulting, e.g. written ones found by mig_scan_dirty when the
 * installs write-protect (mig_space_set_install_wp). Returns the new hits. */
uint64_t mig_dpd_count_used(struct mig_dpd *h, const uint64_t *used, uint64_t nbits);

/* Fault path: the pages faulted on (missing ones, in the order read) from
 * position *pos on, at most max into out; *pos advances past them, and
 * *lost gets how many were overwritten before this read (a reader behind by
 * more than MIG_DPD_HISTORY). Returns how many were copied. */
uint64_t mig_dpd_history(struct mig_dpd *h, uint64_t *pos, uint64_t *out, uint64_t max, uint64_t *lost);
/* cffi: end */

#endif
