/* The native data plane's source: serves one run's pages from the guest's
 * memfd to destinations that hold the run's key (docs/protocol.md, "Native
 * data plane"). Python starts it, reads its counters and stops it; page
 * bytes never reach Python. */
#ifndef MIGRATE_DP_SOURCE_H
#define MIGRATE_DP_SOURCE_H

#include <stdint.h>

#include "dp_wire.h"

/* cffi: begin */
enum mig_dp_compress { MIG_DP_COMPRESS_NEVER = 0, MIG_DP_COMPRESS_ALWAYS = 1, MIG_DP_COMPRESS_AUTO = 2 };

/* Read with atomic loads by mig_dp_source_counters. */
struct mig_dp_source_counters {
    uint64_t connections;        /* accepted with the right key */
    uint64_t rejected;           /* dropped before or at the hello: key, magic, version, kind, silence, too many */
    uint64_t bad_requests;       /* connections closed for a malformed or out-of-range request */
    uint64_t requests, pages;    /* bulk connections' requests and pages served */
    uint64_t fault_requests, fault_pages;
    uint64_t zero_pages;         /* pages sent as zero runs */
    uint64_t bytes;              /* wire bytes of batches sent (counted as handed to the socket) */
    uint64_t compressed_batches;
    uint64_t sends;              /* sendmsg calls that carried batches (many one-page batches go in one) */
    uint64_t hole_queries;       /* asks of the memfd where its data is (SEEK_DATA, then SEEK_HOLE) */
};

struct mig_dp_source;

/* Map `size` bytes of memfd read-only and listen on host:port (port 0:
 * any). key: DP_KEY_LEN bytes. compress: enum mig_dp_compress; level: zstd's.
 * Returns NULL with *err = errno value on failure. The server starts
 * "live": the guest may write its memory, so every page is copied before
 * it is checksummed and sent; mig_dp_source_set_live(s, 0) once the guest
 * stopped here (switchover, or an image nobody writes) sends pages straight
 * from the mapping. */
struct mig_dp_source *mig_dp_source_start(int memfd, uint64_t size, uint32_t page_size, const char *host,
                                          uint16_t port, const uint8_t *key, int compress, int level, int *err);
uint16_t mig_dp_source_port(const struct mig_dp_source *s);
void mig_dp_source_set_live(struct mig_dp_source *s, int live);
void mig_dp_source_counters(const struct mig_dp_source *s, struct mig_dp_source_counters *out);
/* Stop: shut every socket down, join every thread, unmap, free. Returns
 * promptly whatever the peers do. *final (if not NULL) gets the last
 * counters. */
void mig_dp_source_stop(struct mig_dp_source *s, struct mig_dp_source_counters *final);

/* A raw TCP stream for the benchmark's baseline: send `total` bytes from
 * buf (len bytes, sent again and again), or read and discard `total` bytes.
 * Return the bytes moved or -errno. */
int64_t mig_dp_raw_send(int fd, const uint8_t *buf, uint64_t len, uint64_t total);
int64_t mig_dp_raw_recv(int fd, uint64_t total);
/* cffi: end */

#endif
