/* Synthetic guest content and workloads (see workload.c). */
#ifndef MIGRATE_WORKLOAD_H
#define MIGRATE_WORKLOAD_H
#include <stdint.h>

/* cffi: begin */
enum {
    MIG_WL_SEQ_READ = 0,
    MIG_WL_SEQ_WRITE = 1,
    MIG_WL_RANDOM_READ = 2,
    MIG_WL_RANDOM_WRITE = 3,
    MIG_WL_HOTSET = 4,
    MIG_WL_ZIPF = 5,
    MIG_WL_IDLE = 6,
    MIG_WL_BALLOON = 7,
    MIG_WL_COUNT = 8,
};

typedef struct {
    uint64_t ops_done;
    uint64_t ops_target;
    uint64_t rng;
    uint64_t acc;
    int64_t first_op_ns;   /* CLOCK_REALTIME of the first op after the last start, 0 if none */
    int64_t last_op_ns;    /* CLOCK_REALTIME when the thread last stopped (pause or finish), 0 if never */
    uint64_t first_page;   /* the thread's slice of pages */
    uint64_t npages;
} mig_wl_thread_state;

struct mig_wl;

void mig_fill_realistic(uint8_t *mem, uint64_t size, uint32_t page_size, uint64_t seed);
void mig_fill_random(uint8_t *mem, uint64_t size, uint64_t seed);

struct mig_wl *mig_wl_new(uint8_t *mem, uint64_t size, uint32_t page_size, int workload_id,
                          uint64_t seed, uint64_t total_ops, uint32_t nthreads, double ops_per_sec);
int mig_wl_start(struct mig_wl *h);
int mig_wl_pause(struct mig_wl *h);
void mig_wl_free(struct mig_wl *h);
/* The guest's own discards (the balloon workload's MADV_REMOVE), which neither
 * async write-protect tracking nor a snapshot's write-protect sees: a zap is no
 * write. With `removed` set (a page bitmap, NULL to stop), each discard sets
 * its pages' bits once the range is gone; with `fn` set (NULL to detach), each
 * discard first calls fn(ctx, addr, len): a live snapshot's
 * mig_snap_before_discard, which saves the range's unsaved pages (a function
 * pointer, so that this synthetic-guest extension links nothing of the
 * production one). Either call waits for discards in flight, so after a
 * detach nothing uses the old one. */
typedef void (*mig_wl_discard_fn)(void *ctx, const uint8_t *addr, uint64_t len);
void mig_wl_watch_discards(struct mig_wl *h, uint64_t *removed);
void mig_wl_before_discard(struct mig_wl *h, mig_wl_discard_fn fn, void *ctx);
uint32_t mig_wl_nthreads(struct mig_wl *h);
int mig_wl_get_thread_state(struct mig_wl *h, uint32_t i, mig_wl_thread_state *out);
int mig_wl_set_thread_state(struct mig_wl *h, uint32_t i, uint64_t ops_done, uint64_t rng, uint64_t acc);
/* Stop thread i after `target` of its ops (no more than its share; paused only): a reference
 * run to exactly the op counts a snapshot recorded. */
int mig_wl_limit_thread(struct mig_wl *h, uint32_t i, uint64_t target);
uint64_t mig_wl_ops_done(struct mig_wl *h);
uint64_t mig_wl_ops_total(struct mig_wl *h);
int mig_wl_finished(struct mig_wl *h);
int mig_wl_running(struct mig_wl *h);
int mig_wl_wait_finished(struct mig_wl *h, int64_t timeout_ms);
/* cffi: end */
int64_t mig_realtime_ns(void);
#endif
