/* The native data plane's wire format (docs/protocol.md, "Native data plane").
 *
 * One TCP connection per path (bulk, fault), little-endian fixed-size
 * structs. The destination drives: it says hello with the run's one-time
 * key, then sends requests (each many runs of pages); the source answers
 * each run with batches of at most DP_BATCH_PAGES contiguous pages, under
 * the same rules as the protobuf PageBatch: zero pages as runs, the other
 * pages in order, raw or one zstd frame, checksum = mig_digest of the raw
 * data. Shared by dp_source.c and dp_dest.c. */
#ifndef MIGRATE_DP_WIRE_H
#define MIGRATE_DP_WIRE_H

#include <stdint.h>

#define DP_MAGIC "MIGDP\0\0\1"
#define DP_MAGIC_LEN 8
/* cffi: begin */
/* 3: batches carry many page runs, and their checksum covers the runs (2: one
 * run a batch, the vectorised mig_digest; 1: the four-lane multiply chain). */
#define DP_VERSION 3
#define DP_KEY_LEN 32
/* cffi: end */

enum dp_kind { DP_KIND_BULK = 1, DP_KIND_FAULT = 2 };
enum dp_encoding { DP_RAW = 0, DP_ZSTD = 1 };

/* Limits: runs in one request, pages in one request, pages in one batch. */
/* cffi: begin */
#define DP_MAX_RUNS 256
#define DP_MAX_REQUEST_PAGES 4096
#define DP_BATCH_PAGES 128
/* cffi: end */
/* Of pages larger than 4 KiB a batch carries at most this many bytes (and one page at least). */
#define DP_BATCH_BYTES (512u << 10)

/* The most pages a batch of page_size pages may carry. */
static inline uint32_t dp_batch_pages(uint32_t page_size)
{
    uint32_t n = page_size ? DP_BATCH_BYTES / page_size : 1;
    return n > DP_BATCH_PAGES ? DP_BATCH_PAGES : n ? n : 1;
}

#define DP_REQ_MAGIC 0x54535152u   /* "RQST" */
#define DP_BATCH_MAGIC 0x48435442u /* "BTCH" */

struct dp_hello {            /* destination -> source, first bytes of a connection */
    char magic[DP_MAGIC_LEN];
    uint32_t version;
    uint32_t kind;           /* enum dp_kind */
    uint8_t key[DP_KEY_LEN];
};

struct dp_hello_reply {      /* source -> destination */
    char magic[DP_MAGIC_LEN];
    uint32_t status;         /* 0: accepted */
    uint32_t page_size;
    uint64_t npages;
};

struct dp_run {
    uint64_t first_page;
    uint32_t count;
    uint32_t pad;
};

struct dp_request {          /* destination -> source, followed by nruns struct dp_run */
    uint32_t magic;          /* DP_REQ_MAGIC */
    uint32_t nruns;
    uint64_t req_id;
};

struct dp_batch {            /* source -> destination, followed by the page runs, the zero runs and the data */
    uint32_t magic;          /* DP_BATCH_MAGIC */
    uint32_t encoding;       /* enum dp_encoding */
    uint64_t req_id;
    uint32_t nruns;          /* struct dp_run that follow: 1..count */
    uint32_t pad;            /* 0 */
    uint32_t count;          /* pages covered (the runs' sum), 1..dp_batch_pages(page size) */
    uint32_t nzero_pairs;    /* (start, len) uint32 pairs over the runs' pages numbered in order from 0 */
    uint32_t raw_len;        /* non-zero pages * page_size */
    uint32_t data_len;       /* bytes of data that follow the zero runs */
    uint64_t checksum;       /* mig_digest of the page runs, the raw data and the zero runs, in that order */
};

_Static_assert(sizeof(struct dp_hello) == 48, "dp_hello layout");
_Static_assert(sizeof(struct dp_hello_reply) == 24, "dp_hello_reply layout");
_Static_assert(sizeof(struct dp_run) == 16, "dp_run layout");
_Static_assert(sizeof(struct dp_request) == 16, "dp_request layout");
_Static_assert(sizeof(struct dp_batch) == 48, "dp_batch layout");

#endif
