/* Helpers shared by both ends of the native data plane (see dp_common.h). */
#define _GNU_SOURCE
#include "dp_common.h"

#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "mix.h"

int64_t dp_mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* ------------------------------------------------------------------ digest */

/* The digest (dp_common.h, docs/protocol.md "Digest"): 8 lanes over 64-byte
 * stripes, 16 stripes a block, the lanes scrambled after each block. The
 * key of lane i in stripe s of a block is KEY[s + i]; SCRAMBLE[i] is lane
 * i's scramble key; ACC0 the lanes' start. The constants are mix64(P1 *
 * (j + 1)): KEY j = 0..22, SCRAMBLE j = 24..31; ACC0: mix64(P2 * (i + 1)). */
#define DG_LANES 8
#define DG_STRIPE 64
#define DG_BLOCK_STRIPES 16
#define DG_PRIME32 0x9E3779B1u

static const uint64_t KEY[DG_BLOCK_STRIPES + DG_LANES - 1] = {
    0xE220A8397B1DCDAFULL, 0x6E789E6AA1B965F4ULL, 0x06C45D188009454FULL, 0xF88BB8A8724C81ECULL,
    0x1B39896A51A8749BULL, 0x53CB9F0C747EA2EAULL, 0x2C829ABE1F4532E1ULL, 0xC584133AC916AB3CULL,
    0x3EE5789041C98AC3ULL, 0xF3B8488C368CB0A6ULL, 0x657EECDD3CB13D09ULL, 0xC2D326E0055BDEF6ULL,
    0x8621A03FE0BBDB7BULL, 0x8E1F7555983AA92FULL, 0xB54E0F1600CC4D19ULL, 0x84BB3F97971D80ABULL,
    0x7D29825C75521255ULL, 0xC3CF17102B7F7F86ULL, 0x3466E9A083914F64ULL, 0xD81A8D2B5A4485ACULL,
    0xDB01602B100B9ED7ULL, 0xA9038A921825F10DULL, 0xEDF5F1D90DCA2F6AULL,
};
static const uint64_t SCRAMBLE[DG_LANES] = {
    0xDD7C01D4F5407269ULL, 0x935E82F1DB4C4F7BULL, 0x69B82EBC92233300ULL, 0x40D29EB57DE1D510ULL,
    0xA2F09DABB45C6316ULL, 0xEE521D7A0F4D3872ULL, 0xF16952EE72F3454FULL, 0x377D35DEA8E40225ULL,
};
static const uint64_t ACC0[DG_LANES] = {
    0x68850AC74E2E5A26ULL, 0xD1CB87AADEB44DAFULL, 0xA07B6A36284AF890ULL, 0xB739CFF4C8A80399ULL,
    0x20EDA02AB453A378ULL, 0xD7AE97858BEDCE43ULL, 0x03D879F0DF41B6D0ULL, 0x0851628B5D15FDF2ULL,
};

#if defined(__x86_64__)
#include <immintrin.h>

/* SSE2 (every x86-64): two lanes a register. */
static void fold_sse2(uint64_t acc[DG_LANES], const uint8_t *p, size_t n, unsigned s)
{
    __m128i a[4];
    for (int j = 0; j < 4; j++)
        a[j] = _mm_loadu_si128((const __m128i *)(acc + 2 * j));
    const __m128i prime = _mm_set1_epi32((int)DG_PRIME32);
    for (; n; n--, p += DG_STRIPE) {
        for (int j = 0; j < 4; j++) {
            __m128i d = _mm_loadu_si128((const __m128i *)(p + 16 * j));
            __m128i dk = _mm_xor_si128(d, _mm_loadu_si128((const __m128i *)(KEY + s + 2 * j)));
            __m128i prod = _mm_mul_epu32(dk, _mm_srli_epi64(dk, 32));
            /* lane i gets word i ^ 1: swap the two 64-bit halves */
            a[j] = _mm_add_epi64(a[j], _mm_add_epi64(prod, _mm_shuffle_epi32(d, _MM_SHUFFLE(1, 0, 3, 2))));
        }
        if (++s == DG_BLOCK_STRIPES) {
            s = 0;
            for (int j = 0; j < 4; j++) {
                __m128i x = _mm_xor_si128(_mm_xor_si128(a[j], _mm_srli_epi64(a[j], 47)),
                                          _mm_loadu_si128((const __m128i *)(SCRAMBLE + 2 * j)));
                __m128i lo = _mm_mul_epu32(x, prime), hi = _mm_mul_epu32(_mm_srli_epi64(x, 32), prime);
                a[j] = _mm_add_epi64(lo, _mm_slli_epi64(hi, 32));
            }
        }
    }
    for (int j = 0; j < 4; j++)
        _mm_storeu_si128((__m128i *)(acc + 2 * j), a[j]);
}

/* AVX2: four lanes a register. */
__attribute__((target("avx2"))) static inline __m256i step_avx2(__m256i a, __m256i d, __m256i k)
{
    __m256i dk = _mm256_xor_si256(d, k);
    __m256i prod = _mm256_mul_epu32(dk, _mm256_srli_epi64(dk, 32));
    return _mm256_add_epi64(a, _mm256_add_epi64(prod, _mm256_shuffle_epi32(d, _MM_SHUFFLE(1, 0, 3, 2))));
}

__attribute__((target("avx2"))) static inline __m256i scramble_avx2(__m256i a, __m256i k)
{
    const __m256i prime = _mm256_set1_epi32((int)DG_PRIME32);
    __m256i x = _mm256_xor_si256(_mm256_xor_si256(a, _mm256_srli_epi64(a, 47)), k);
    __m256i lo = _mm256_mul_epu32(x, prime), hi = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), prime);
    return _mm256_add_epi64(lo, _mm256_slli_epi64(hi, 32));
}

__attribute__((target("avx2"))) static void fold_avx2(uint64_t acc[DG_LANES], const uint8_t *p, size_t n, unsigned s)
{
    __m256i a0 = _mm256_loadu_si256((const __m256i *)acc), a1 = _mm256_loadu_si256((const __m256i *)(acc + 4));
    for (; n; n--, p += DG_STRIPE) {
        a0 = step_avx2(a0, _mm256_loadu_si256((const __m256i *)p), _mm256_loadu_si256((const __m256i *)(KEY + s)));
        a1 = step_avx2(a1, _mm256_loadu_si256((const __m256i *)(p + 32)),
                       _mm256_loadu_si256((const __m256i *)(KEY + s + 4)));
        if (++s == DG_BLOCK_STRIPES) {
            s = 0;
            a0 = scramble_avx2(a0, _mm256_loadu_si256((const __m256i *)SCRAMBLE));
            a1 = scramble_avx2(a1, _mm256_loadu_si256((const __m256i *)(SCRAMBLE + 4)));
        }
    }
    _mm256_storeu_si256((__m256i *)acc, a0);
    _mm256_storeu_si256((__m256i *)(acc + 4), a1);
}

static void (*fold)(uint64_t acc[DG_LANES], const uint8_t *p, size_t n, unsigned s) = fold_sse2;

__attribute__((constructor)) static void pick_fold(void)
{
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2"))
        fold = fold_avx2;
}
#else
/* Fold n whole stripes at p into acc, the first being stripe `s` of its
 * block (0..15): the definition, which the SSE2 and AVX2 versions compute
 * two and four lanes at a time. */
static void fold(uint64_t acc[DG_LANES], const uint8_t *p, size_t n, unsigned s)
{
    for (; n; n--, p += DG_STRIPE) {
        for (int i = 0; i < DG_LANES; i++) {
            uint64_t d = load64(p + 8 * i), dk = d ^ KEY[s + i];
            acc[i ^ 1] += d;
            acc[i] += (dk & 0xFFFFFFFFu) * (dk >> 32);
        }
        if (++s == DG_BLOCK_STRIPES) {
            s = 0;
            for (int i = 0; i < DG_LANES; i++)
                acc[i] = (acc[i] ^ (acc[i] >> 47) ^ SCRAMBLE[i]) * DG_PRIME32;
        }
    }
}
#endif

void dp_digest_init(struct dp_digest *d)
{
    memcpy(d->acc, ACC0, sizeof d->acc);
    d->len = 0;
}

void dp_digest_update(struct dp_digest *d, const void *data, size_t len)
{
    const uint8_t *p = data;
    size_t have = d->len % DG_STRIPE;
    unsigned s = (unsigned)(d->len / DG_STRIPE % DG_BLOCK_STRIPES);  /* the next stripe to fold */
    d->len += len;
    if (have) {
        size_t take = DG_STRIPE - have < len ? DG_STRIPE - have : len;
        memcpy(d->carry + have, p, take);
        p += take;
        len -= take;
        if (have + take < DG_STRIPE)
            return;
        fold(d->acc, d->carry, 1, s);
        s = (s + 1) % DG_BLOCK_STRIPES;
    }
    fold(d->acc, p, len / DG_STRIPE, s);
    memcpy(d->carry, p + (len & ~(size_t)(DG_STRIPE - 1)), len % DG_STRIPE);
}

static uint64_t finish(const uint64_t acc[DG_LANES], uint64_t size)
{
    uint64_t f = size * P3 + P4;
    for (int i = 0; i < DG_LANES; i++)
        f = rotl64(f ^ acc[i], 27) * P1;
    return mix64(f);
}

uint64_t dp_digest_final(const struct dp_digest *d)
{
    uint64_t acc[DG_LANES];
    memcpy(acc, d->acc, sizeof acc);
    size_t tail = d->len % DG_STRIPE;
    if (tail) {  /* the last partial stripe, zero-padded, in its place */
        uint8_t last[DG_STRIPE] = {0};
        memcpy(last, d->carry, tail);
        fold(acc, last, 1, (unsigned)(d->len / DG_STRIPE % DG_BLOCK_STRIPES));
    }
    return finish(acc, d->len);
}

uint64_t mig_digest(const uint8_t *mem, uint64_t size)
{
    struct dp_digest d;
    dp_digest_init(&d);
    if (!mem)  /* the digest of `size` bytes never seen: the lanes untouched */
        return finish(d.acc, size);
    dp_digest_update(&d, mem, size);
    return dp_digest_final(&d);
}

uint64_t mig_digest_iov(const struct iovec *iov, int n)
{
    struct dp_digest d;
    dp_digest_init(&d);
    for (int i = 0; i < n; i++)
        dp_digest_update(&d, iov[i].iov_base, iov[i].iov_len);
    return dp_digest_final(&d);
}

/* -------------------------------------------------------------------- zstd */

/* The few zstd declarations we use (zstd.h, stable API since 1.4). */
typedef struct { const void *src; size_t size, pos; } zstd_in;
typedef struct { void *dst; size_t size, pos; } zstd_out;
enum { ZSTD_c_compressionLevel = 100, ZSTD_c_contentSizeFlag = 200, ZSTD_c_checksumFlag = 201 };
enum { ZSTD_e_continue = 0, ZSTD_e_end = 2 };
enum { ZSTD_reset_session_only = 1 };
#define ZSTD_CONTENTSIZE_ERROR (0ULL - 2)

static struct {
    ZSTD_CCtx *(*createCCtx)(void);
    size_t (*freeCCtx)(ZSTD_CCtx *);
    size_t (*setParameter)(ZSTD_CCtx *, int, int);
    size_t (*reset)(ZSTD_CCtx *, int);
    size_t (*setPledgedSrcSize)(ZSTD_CCtx *, unsigned long long);
    size_t (*compressStream2)(ZSTD_CCtx *, zstd_out *, zstd_in *, int);
    size_t (*compressBound)(size_t);
    ZSTD_DCtx *(*createDCtx)(void);
    size_t (*freeDCtx)(ZSTD_DCtx *);
    size_t (*decompressDCtx)(ZSTD_DCtx *, void *, size_t, const void *, size_t);
    unsigned long long (*getFrameContentSize)(const void *, size_t);
    size_t (*findFrameCompressedSize)(const void *, size_t);
    unsigned (*isError)(size_t);
    const char *(*getErrorName)(size_t);
} Z;
static int zstd_ok;
static char zstd_why[256];
static pthread_once_t zstd_once = PTHREAD_ONCE_INIT;

static void zstd_load(void)
{
    void *lib = dlopen("libzstd.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        snprintf(zstd_why, sizeof zstd_why, "%s", dlerror());
        return;
    }
    struct { void **slot; const char *name; } syms[] = {
        {(void **)&Z.createCCtx, "ZSTD_createCCtx"},
        {(void **)&Z.freeCCtx, "ZSTD_freeCCtx"},
        {(void **)&Z.setParameter, "ZSTD_CCtx_setParameter"},
        {(void **)&Z.reset, "ZSTD_CCtx_reset"},
        {(void **)&Z.setPledgedSrcSize, "ZSTD_CCtx_setPledgedSrcSize"},
        {(void **)&Z.compressStream2, "ZSTD_compressStream2"},
        {(void **)&Z.compressBound, "ZSTD_compressBound"},
        {(void **)&Z.createDCtx, "ZSTD_createDCtx"},
        {(void **)&Z.freeDCtx, "ZSTD_freeDCtx"},
        {(void **)&Z.decompressDCtx, "ZSTD_decompressDCtx"},
        {(void **)&Z.getFrameContentSize, "ZSTD_getFrameContentSize"},
        {(void **)&Z.findFrameCompressedSize, "ZSTD_findFrameCompressedSize"},
        {(void **)&Z.isError, "ZSTD_isError"},
        {(void **)&Z.getErrorName, "ZSTD_getErrorName"},
    };
    for (size_t i = 0; i < sizeof syms / sizeof syms[0]; i++) {
        *syms[i].slot = dlsym(lib, syms[i].name);
        if (!*syms[i].slot) {
            snprintf(zstd_why, sizeof zstd_why, "libzstd.so.1 lacks %s", syms[i].name);
            return;  /* the library stays loaded: harmless, and dlclose races other threads */
        }
    }
    zstd_ok = 1;
}

int dp_zstd_available(void)
{
    pthread_once(&zstd_once, zstd_load);
    return zstd_ok;
}

const char *dp_zstd_why_not(void)
{
    return dp_zstd_available() ? NULL : zstd_why;
}

ZSTD_CCtx *dp_zstd_cctx(int level)
{
    if (!dp_zstd_available())
        return NULL;
    ZSTD_CCtx *c = Z.createCCtx();
    if (c && (Z.isError(Z.setParameter(c, ZSTD_c_compressionLevel, level)) ||
              Z.isError(Z.setParameter(c, ZSTD_c_checksumFlag, 1)) ||
              Z.isError(Z.setParameter(c, ZSTD_c_contentSizeFlag, 1)))) {
        Z.freeCCtx(c);
        return NULL;
    }
    return c;
}

void dp_zstd_free_cctx(ZSTD_CCtx *c)
{
    if (c)
        Z.freeCCtx(c);
}

ZSTD_DCtx *dp_zstd_dctx(void)
{
    return dp_zstd_available() ? Z.createDCtx() : NULL;
}

void dp_zstd_free_dctx(ZSTD_DCtx *d)
{
    if (d)
        Z.freeDCtx(d);
}

size_t dp_zstd_bound(size_t src_len)
{
    return dp_zstd_available() ? Z.compressBound(src_len) : src_len + (src_len >> 7) + 512;
}

int64_t dp_zstd_compress_iov(ZSTD_CCtx *c, void *dst, size_t cap, const struct iovec *iov, int n, size_t total,
                             const char **err)
{
    size_t r = Z.reset(c, ZSTD_reset_session_only);
    if (!Z.isError(r))
        r = Z.setPledgedSrcSize(c, total);
    zstd_out out = {dst, cap, 0};
    for (int i = 0; i < n && !Z.isError(r); i++) {
        zstd_in in = {iov[i].iov_base, iov[i].iov_len, 0};
        int last = i == n - 1;
        do
            r = Z.compressStream2(c, &out, &in, last ? ZSTD_e_end : ZSTD_e_continue);
        while (!Z.isError(r) && (last ? r != 0 : in.pos < in.size) && out.pos < out.size);
        if (!Z.isError(r) && (last ? r != 0 : in.pos < in.size)) {
            *err = "zstd output buffer too small";
            return -1;
        }
    }
    if (n == 0) {  /* an empty frame */
        zstd_in in = {"", 0, 0};
        r = Z.compressStream2(c, &out, &in, ZSTD_e_end);
    }
    if (Z.isError(r)) {
        *err = Z.getErrorName(r);
        return -1;
    }
    return (int64_t)out.pos;
}

int dp_zstd_decompress(ZSTD_DCtx *d, void *dst, size_t want, const void *src, size_t src_len, const char **err)
{
    size_t frame = Z.findFrameCompressedSize(src, src_len);
    if (Z.isError(frame) || frame != src_len) {
        *err = Z.isError(frame) ? Z.getErrorName(frame) : "data is not exactly one zstd frame";
        return -1;
    }
    unsigned long long content = Z.getFrameContentSize(src, src_len);
    if (content != want) {
        *err = content >= ZSTD_CONTENTSIZE_ERROR ? "zstd frame without its content size"
                                                 : "zstd frame content size is not raw_len";
        return -1;
    }
    size_t r = Z.decompressDCtx(d, dst, want, src, src_len);
    if (Z.isError(r) || r != want) {
        *err = Z.isError(r) ? Z.getErrorName(r) : "zstd frame decompressed to the wrong size";
        return -1;
    }
    return 0;
}

/* --------------------------------------------------------------------- I/O */

ssize_t dp_read_full(int fd, void *buf, size_t len)
{
    size_t got = 0;
    while (got < len) {
        size_t want = len - got < DP_IO_MAX ? len - got : DP_IO_MAX;
        ssize_t r = recv(fd, (uint8_t *)buf + got, want, MSG_WAITALL);
        if (r > 0)
            got += (size_t)r;
        else if (r == 0)
            return (ssize_t)got;
        else if (errno != EINTR)
            return -errno;
    }
    return (ssize_t)got;
}

int dp_send_iov(int fd, struct iovec *iov, int n)
{
    while (n > 0) {
        int k = 0;
        size_t bytes = 0, cut = 0;
        while (k < n && k < IOV_MAX && bytes < DP_IO_MAX)
            bytes += iov[k++].iov_len;
        if (bytes > DP_IO_MAX) { /* the last iovec goes in part this time */
            cut = bytes - DP_IO_MAX;
            iov[k - 1].iov_len -= cut;
        }
        struct msghdr msg = {.msg_iov = iov, .msg_iovlen = (size_t)k};
        ssize_t w = sendmsg(fd, &msg, MSG_NOSIGNAL);
        iov[k - 1].iov_len += cut;
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        while (n > 0 && (size_t)w >= iov->iov_len) {
            w -= (ssize_t)iov->iov_len;
            iov++, n--;
        }
        if (n > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + w;
            iov->iov_len -= (size_t)w;
        }
    }
    return 0;
}

int dp_send_full(int fd, const void *buf, size_t len)
{
    struct iovec iov = {(void *)buf, len};
    return dp_send_iov(fd, &iov, 1);
}

/* ----------------------------------------------------------------- sockets */

static int setopt(int fd, int level, int name, int value)
{
    return setsockopt(fd, level, name, &value, sizeof value) ? -errno : 0;
}

static long sysctl_value(const char *path)
{
    char text[32] = {0};
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, text, sizeof text - 1);
    close(fd);
    return n > 0 ? strtol(text, NULL, 10) : 0;
}

int dp_tune_socket(int fd, int bulk)
{
    int r = setopt(fd, IPPROTO_TCP, TCP_NODELAY, 1);
    if (!r) r = setopt(fd, SOL_SOCKET, SO_KEEPALIVE, 1);
    if (!r) r = setopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, 1);
    if (!r) r = setopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, 1);
    if (!r) r = setopt(fd, IPPROTO_TCP, TCP_KEEPCNT, 2);
    if (!r) r = setopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, DP_USER_TIMEOUT_MS);
    if (!r && bulk) {
        /* A size set by hand turns the kernel's autotuning off: only where
         * the limit lets the buffer be that large, never an error. */
        if (sysctl_value("/proc/sys/net/core/wmem_max") >= DP_BULK_SOCKBUF)
            setopt(fd, SOL_SOCKET, SO_SNDBUF, DP_BULK_SOCKBUF);
        if (sysctl_value("/proc/sys/net/core/rmem_max") >= DP_BULK_SOCKBUF)
            setopt(fd, SOL_SOCKET, SO_RCVBUF, DP_BULK_SOCKBUF);
    }
    return r;
}

static int resolve(const char *host, uint16_t port, int passive, struct addrinfo **out)
{
    char service[8];
    snprintf(service, sizeof service, "%u", port);
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICSERV | (passive ? AI_PASSIVE : 0)};
    int r = getaddrinfo(host && *host ? host : NULL, service, &hints, out);
    if (r == EAI_SYSTEM)
        return -errno;
    return r ? -EADDRNOTAVAIL : 0;
}

int dp_listen(const char *host, uint16_t port, uint16_t *bound_port)
{
    struct addrinfo *ai;
    int r = resolve(host, port, 1, &ai);
    if (r)
        return r;
    int fd = -1;
    r = -EADDRNOTAVAIL;
    for (struct addrinfo *a = ai; a; a = a->ai_next) {
        fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
        if (fd < 0) {
            r = -errno;
            continue;
        }
        if (!setopt(fd, SOL_SOCKET, SO_REUSEADDR, 1) && !bind(fd, a->ai_addr, a->ai_addrlen) && !listen(fd, 64))
            break;
        r = -errno;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(ai);
    if (fd < 0)
        return r;
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    getsockname(fd, (struct sockaddr *)&ss, &sl);
    *bound_port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                                 : ((struct sockaddr_in *)&ss)->sin_port);
    return fd;
}

static int connect_one(const struct addrinfo *a, int timeout_ms)
{
    int fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, a->ai_protocol);
    if (fd < 0)
        return -errno;
    int r = connect(fd, a->ai_addr, a->ai_addrlen) ? -errno : 0;
    if (r == -EINPROGRESS) {
        struct pollfd p = {.fd = fd, .events = POLLOUT};
        int64_t deadline = dp_mono_ns() + (int64_t)timeout_ms * 1000000;
        int n;
        do {
            int left = (int)((deadline - dp_mono_ns()) / 1000000);
            n = poll(&p, 1, left > 0 ? left : 0);
        } while (n < 0 && errno == EINTR);
        int err = 0;
        socklen_t el = sizeof err;
        if (n == 0)
            r = -ETIMEDOUT;
        else if (n < 0 || getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el))
            r = -errno;
        else
            r = -err;
    }
    if (!r && fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK))
        r = -errno;
    if (r) {
        close(fd);
        return r;
    }
    return fd;
}

int dp_connect(const char *host, uint16_t port, int timeout_ms, int bulk)
{
    struct addrinfo *ai;
    int r = resolve(host, port, 0, &ai);
    if (r)
        return r;
    int fd = -ECONNREFUSED;
    for (struct addrinfo *a = ai; a; a = a->ai_next) {
        fd = connect_one(a, timeout_ms);
        if (fd >= 0)
            break;
    }
    freeaddrinfo(ai);
    if (fd >= 0 && (r = dp_tune_socket(fd, bulk))) {
        close(fd);
        return r;
    }
    return fd;
}

int dp_peer_is_local(int fd)
{
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    if (getpeername(fd, (struct sockaddr *)&ss, &sl))
        return 0;
    if (ss.ss_family == AF_INET)
        ((struct sockaddr_in *)&ss)->sin_port = 0;
    else if (ss.ss_family == AF_INET6)
        ((struct sockaddr_in6 *)&ss)->sin6_port = 0;
    else
        return ss.ss_family == AF_UNIX;
    /* An address is this host's when a socket can bind to it here: loopback
     * and this namespace's own addresses (as rpc.is_local_peer says). */
    int s = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0)
        return 0;
    int local = bind(s, (struct sockaddr *)&ss, sl) == 0;
    close(s);
    return local;
}

int dp_key_equal(const uint8_t *a, const uint8_t *b, size_t len)
{
    volatile uint8_t diff = 0;
    for (size_t i = 0; i < len; i++)
        diff |= a[i] ^ b[i];
    return diff == 0;
}

void dp_thread_for_bulk(const char *name)
{
    pthread_setname_np(pthread_self(), name);
    struct sched_param sp = {0};
    sched_setscheduler(0, SCHED_BATCH, &sp); /* 0: the calling thread */
}

void dp_thread_for_faults(const char *name)
{
    pthread_setname_np(pthread_self(), name);
    struct sched_param sp = {.sched_priority = 1};
    if (pthread_setschedparam(pthread_self(), SCHED_FIFO, &sp))
        setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), -10);
}
