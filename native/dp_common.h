/* Helpers shared by both ends of the native data plane (dp_source.c,
 * dp_dest.c): the memory digest, streaming over pieces; zstd loaded at run
 * time; full reads and writes; socket setup; key comparison. */
#ifndef MIGRATE_DP_COMMON_H
#define MIGRATE_DP_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

/* ---- digest ----
 * mig_digest (protocol 2; docs/protocol.md, "Digest"): eight 64-bit lanes
 * over 64-byte stripes, in the manner of NH and XXH3: each 8-byte word w
 * (lane i, keyed with k) adds lo32(w ^ k) * hi32(w ^ k) to lane i and w
 * itself to lane i ^ 1; after every 16 stripes (1 KiB) each lane is
 * scrambled (xorshift, a key, a multiply by an odd 32-bit prime). The keys
 * differ per stripe of a block, and the scramble makes blocks' order
 * matter, so moved data changes the digest. A last partial stripe is
 * zero-padded; the length, then each lane, go into the final mix.
 * Everything is 32x32->64 multiplies, adds and shifts: SSE2 and AVX2
 * compute 2 and 4 lanes an instruction (the AVX2 version is picked at load
 * time where the CPU has it).
 *
 * A change confined to one word moves lane i ^ 1 by exactly the word's
 * difference, and no later step (adds, bijective scrambles) can undo that;
 * the final mix of the eight lanes into 64 bits makes a different digest
 * as good as certain (a collision ~2^-64), not guaranteed as with
 * protocol 1's one-multiply-chain digest, which ran at a third of the
 * speed.
 *
 * struct dp_digest computes the same digest over the data fed in any number
 * of pieces (dp_digest_update), so a batch's checksum is computed over the
 * pages where they are, with no copy: the digest of the concatenation. */
/* cffi: begin */
struct dp_digest {
    uint64_t acc[8];
    uint64_t len;        /* bytes fed so far */
    uint8_t carry[64];   /* the last len % 64 bytes, not yet folded in */
};

uint64_t mig_digest(const uint8_t *mem, uint64_t size);
void dp_digest_init(struct dp_digest *d);
void dp_digest_update(struct dp_digest *d, const void *data, size_t len);
uint64_t dp_digest_final(const struct dp_digest *d);
/* cffi: end */
/* mig_digest of the concatenation of n iovecs. */
uint64_t mig_digest_iov(const struct iovec *iov, int n);

/* ---- zstd, loaded with dlopen("libzstd.so.1") on first use ----
 * Nothing of zstd is needed to build; without the library at run time
 * dp_zstd_available() is 0 and the plane runs uncompressed. */
/* cffi: begin */
int dp_zstd_available(void);
/* Why zstd is not available (dlopen's message), or NULL when it is. */
const char *dp_zstd_why_not(void);
/* cffi: end */

typedef struct ZSTD_CCtx_s ZSTD_CCtx;
typedef struct ZSTD_DCtx_s ZSTD_DCtx;

/* A compression context set up for the level, with the frame carrying its
 * content size and a content checksum (as PageBatch frames do). NULL when
 * zstd is unavailable or out of memory. */
ZSTD_CCtx *dp_zstd_cctx(int level);
void dp_zstd_free_cctx(ZSTD_CCtx *c);
ZSTD_DCtx *dp_zstd_dctx(void);
void dp_zstd_free_dctx(ZSTD_DCtx *d);
/* The most a frame of src_len bytes may take. */
size_t dp_zstd_bound(size_t src_len);
/* Compress the concatenation of n iovecs (total bytes in all) into one
 * frame at dst (cap bytes, at least dp_zstd_bound(total)). Returns the
 * frame's length, or -1 (*err gets zstd's message, static). */
int64_t dp_zstd_compress_iov(ZSTD_CCtx *c, void *dst, size_t cap, const struct iovec *iov, int n, size_t total,
                             const char **err);
/* Decompress exactly one frame of src_len bytes that must hold exactly
 * want bytes of content (its header says so, its checksum matches) into
 * dst. Returns 0, or -1 with *err set (static text). */
int dp_zstd_decompress(ZSTD_DCtx *d, void *dst, size_t want, const void *src, size_t src_len, const char **err);

/* ---- I/O ----
 * All retry EINTR and never raise SIGPIPE. */
/* Most bytes one recv() or sendmsg() moves: the kernel copies a call's data
 * (and, on loopback, runs the receiver's TCP for a send) with no preemption
 * point under PREEMPT_NONE, so a fault thread woken on that CPU waits for
 * the whole copy. Native faults' p99 under the bulk, quiet machine,
 * alternated runs: 181-225 us with whole 512 KiB frames, 138-233 at 256 KiB
 * (the bulk as fast), 125-196 at 128 KiB (the bulk 5-10 % slower).
 * docs/performance.md, session 11. */
#define DP_IO_MAX (256u << 10)
/* Read exactly len bytes, DP_IO_MAX at a time: returns len, the bytes read
 * before EOF (< len), or -errno. */
ssize_t dp_read_full(int fd, void *buf, size_t len);
/* Send exactly the iovecs' bytes, DP_IO_MAX at a time; iov is updated in place (consumed).
 * Returns 0 or -errno. */
int dp_send_iov(int fd, struct iovec *iov, int n);
int dp_send_full(int fd, const void *buf, size_t len);

/* ---- sockets ----
 * Tune a connected data socket: TCP_NODELAY, keepalive (1 s idle, 0.5 s
 * interval rounded to the kernel's 1 s unit, 2 probes), TCP_USER_TIMEOUT
 * 1500 ms, so a dead peer is noticed within ~2 s; bulk sockets get
 * DP_BULK_SOCKBUF kernel buffers where net.core.[rw]mem_max allow that
 * much (else autotuning stays). Returns 0 or -errno. */
#define DP_USER_TIMEOUT_MS 1500
#define DP_BULK_SOCKBUF (4 << 20)
int dp_tune_socket(int fd, int bulk);
/* A listening TCP socket bound to host:port (IPv4 or IPv6 literal or
 * name; port 0 = any), close-on-exec; *bound_port gets the port. Returns
 * the fd or -errno (-EAI_* values are mapped to -EADDRNOTAVAIL). */
int dp_listen(const char *host, uint16_t port, uint16_t *bound_port);
/* A TCP connection to host:port within timeout_ms, tuned (dp_tune_socket).
 * Returns the fd or -errno. */
int dp_connect(const char *host, uint16_t port, int timeout_ms, int bulk);
/* Is fd's peer an address of this host (loopback, or one we can bind)? */
int dp_peer_is_local(int fd);

/* Compare two keys in time independent of where they differ: 1 if equal. */
int dp_key_equal(const uint8_t *a, const uint8_t *b, size_t len);

int64_t dp_mono_ns(void);

/* The calling thread's name and priority. Bulk threads run SCHED_BATCH (a
 * bulk thread never preempts a thread that wakes) at the niceness of the
 * thread that started them: they compete with the guests as equals. On the
 * source those are the guests a drain moves next, on the destination the
 * guests already moved; niced (+10, weight 110 against a guest's 1024), a
 * busy guest took ~90 % of a core from the bulk and a drain's runs grew
 * with each guest moved (performance.md, "Bulk priority in a drain").
 * Fault threads are short and bounded and stay above both: real-time
 * (SCHED_FIFO 1) where allowed, else nice -10. Best effort both. */
void dp_thread_for_bulk(const char *name);
void dp_thread_for_faults(const char *name);

#endif
