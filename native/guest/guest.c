/*
 * The KVM guest image's program: a deterministic workload on guest RAM,
 * one slice per vCPU, run at CPL3 (under PVM, CPL0 code is emulated one
 * instruction at a time; CPL3 runs natively).
 *
 * The same image boots under our VMM (migrate.guest.kvm) and under
 * `qemu-system-x86_64 -kernel`: parameters come from the multiboot command
 * line (`workload=W seed=S ops=N vcpus=V [vmm=1]`), results go out through
 * port I/O:
 *   - PORT_OPS  (out32): ops done since the previous report, every REPORT_EVERY ops
 *   - PORT_DONE (out32): this vCPU's workload is over (it then spins)
 *   - PORT_APS  (out32): with vmm=1, the 32-bit entry of secondary vCPUs
 *                        (our VMM starts them there; QEMU's get INIT-SIPI-SIPI)
 *   - PORT_TEXT (0xe9, QEMU's isa-debugcon): text lines: at the start
 *     "start pages <hex> ops_done <address of the per-vCPU ops counters>";
 *     vCPU 0, once every
 *     vCPU is done, writes "digest <16 hex>\n".
 *
 * Memory: the image at 1 MiB, the workload region from WL_BASE to 2 MiB
 * below the end of RAM (QEMU's firmware keeps tables there), split in whole
 * pages between the vCPUs like the synthetic engine's threads
 * (native/workload.c). Each vCPU first fills its slice (about one page in
 * eight zero: written, as QEMU's RAM is not all zero) then runs its share
 * of the ops. The digest is the four-lane digest below (protocol 1's
 * mig_digest) of each slice, combined with each vCPU's read accumulator: a
 * pure function of (size, workload, seed, ops, vcpus), however the run is
 * paused, saved and resumed.
 */
#include <stdint.h>
#include "../mix.h"

#define PORT_TEXT 0xe9
#define PORT_OPS 0x7e0
#define PORT_DONE 0x7e1
#define PORT_APS 0x7e2
#define WL_BASE (4ULL << 20)
#define TOP_RESERVE (2ULL << 20)
#define PAGE 4096ULL
#define MAX_CPUS 16
#define USTACK 65536
#define REPORT_EVERY 4096
#define GOLDEN 0x9E3779B97F4A7C15ULL

enum { WL_SEQ_READ, WL_SEQ_WRITE, WL_RANDOM_READ, WL_RANDOM_WRITE, WL_HOTSET, WL_ZIPF, WL_IDLE, WL_COUNT };
static const char *const NAMES[WL_COUNT] = {
    "seq-read", "seq-write", "random-read", "random-write", "hotset", "zipf", "idle",
};

struct mb_info {
    uint32_t flags, mem_lower, mem_upper, boot_device, cmdline;
};

struct params {
    uint64_t seed, ops, first_page, npages;
    uint32_t workload, ncpu, vmm;
};

extern uint32_t mb_info;
extern char _ap32[], tramp_start[], tramp_end[];
void enter_user(void (*fn)(uint64_t), uint64_t rsp, uint64_t arg) __attribute__((noreturn));

static struct params P;
static uint64_t slice_digest[MAX_CPUS], slice_acc[MAX_CPUS];
/* Ops done per vCPU, stored at every report: QEMU's monitor reads them (scripts/compare_qemu.py). */
static volatile uint64_t ops_done[MAX_CPUS];
static uint32_t finished_cpus;
static uint8_t ustacks[MAX_CPUS][USTACK] __attribute__((aligned(4096)));

/* ------------------------------------------------------------- port I/O */

static inline void outl(uint16_t port, uint32_t v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }

static void puts_port(const char *s)
{
    while (*s)
        outb(PORT_TEXT, (uint8_t)*s++);
}

static void put_hex(uint64_t v)
{
    char buf[17];
    for (int i = 15; i >= 0; i--, v >>= 4)
        buf[i] = "0123456789abcdef"[v & 15];
    buf[16] = 0;
    puts_port(buf);
}

/* ------------------------------------------------------------ boot (CPL0) */

static int word_is(const char *s, const char *key, const char **val)
{
    while (*key)
        if (*s++ != *key++)
            return 0;
    *val = s;
    return 1;
}

static uint64_t parse_u64(const char *s)
{
    uint64_t v = 0;
    while (*s >= '0' && *s <= '9')
        v = v * 10 + (uint64_t)(*s++ - '0');
    return v;
}

static int name_is(const char *s, const char *name)
{
    while (*name)
        if (*s++ != *name++)
            return 0;
    return *s == 0 || *s == ' ';
}

static void parse_params(const struct mb_info *mbi)
{
    P.seed = 1;
    P.ops = 1000000;
    P.workload = WL_RANDOM_WRITE;
    P.ncpu = 1;
    if (mbi->flags & 4) {
        const char *s = (const char *)(uintptr_t)mbi->cmdline, *v;
        while (*s) {
            if (word_is(s, "seed=", &v))
                P.seed = parse_u64(v);
            else if (word_is(s, "ops=", &v))
                P.ops = parse_u64(v);
            else if (word_is(s, "vcpus=", &v))
                P.ncpu = (uint32_t)parse_u64(v);
            else if (word_is(s, "vmm=", &v))
                P.vmm = (uint32_t)parse_u64(v);
            else if (word_is(s, "workload=", &v))
                for (uint32_t w = 0; w < WL_COUNT; w++)
                    if (name_is(v, NAMES[w]))
                        P.workload = w;
            while (*s && *s != ' ')
                s++;
            while (*s == ' ')
                s++;
        }
    }
    if (P.ncpu < 1 || P.ncpu > MAX_CPUS)
        P.ncpu = 1;
    /* QEMU reports 128 KiB less than its -m (firmware's), our VMM all of it: round up to 1 MiB */
    uint64_t end = ((1ULL << 20) + (uint64_t)mbi->mem_upper * 1024 + (1ULL << 20) - 1) & ~((1ULL << 20) - 1);
    P.first_page = WL_BASE / PAGE;
    P.npages = end > WL_BASE + TOP_RESERVE ? (end - TOP_RESERVE - WL_BASE) / PAGE : 0;
}

static void delay(uint32_t n)
{
    for (volatile uint32_t i = 0; i < n; i++)
        ;
}

/* QEMU: wake the other vCPUs with INIT-SIPI-SIPI into the real-mode trampoline at 0x8000. */
static void start_aps_lapic(void)
{
    volatile uint32_t *icr_lo = (volatile uint32_t *)0xFEE00300, *icr_hi = (volatile uint32_t *)0xFEE00310;
    uint8_t *dst = (uint8_t *)0x8000;
    for (char *p = tramp_start; p < tramp_end; p++)
        *dst++ = (uint8_t)*p;
    *icr_hi = 0;
    *icr_lo = 0x000C4500;            /* INIT, all excluding self */
    delay(2000);
    for (int i = 0; i < 2; i++) {
        *icr_lo = 0x000C4608;        /* STARTUP, vector 0x08: 0x8000 */
        delay(200);
    }
}

static void user_main(uint64_t cpu) __attribute__((noreturn));

void kmain(uint32_t cpu)
{
    if (cpu == 0) {
        parse_params((const struct mb_info *)(uintptr_t)mb_info);
        if (P.ncpu > 1) {
            if (P.vmm)
                outl(PORT_APS, (uint32_t)(uintptr_t)_ap32);
            else
                start_aps_lapic();
        }
    }
    if (cpu >= P.ncpu)               /* a vCPU beyond vcpus= (QEMU -smp larger) */
        for (;;)
            __asm__ volatile("cli; hlt");
    enter_user(user_main, (uint64_t)(uintptr_t)&ustacks[cpu][USTACK], cpu);
}

/* ----------------------------------------------------------- workload (CPL3) */

static inline uint64_t rng_next(uint64_t *s)
{
    *s += GOLDEN;
    return mix64(*s);
}

static inline uint64_t mulhi(uint64_t a, uint64_t b) { return (uint64_t)(((unsigned __int128)a * b) >> 64); }

static inline uint64_t *page_at(uint64_t page) { return (uint64_t *)(uintptr_t)(page * PAGE); }

static void fill_page(uint64_t page)
{
    uint64_t kind = mix64(P.seed * P1 ^ page);
    uint64_t *w = page_at(page), s = P.seed * P2 + page * (PAGE / 8);
    for (uint64_t i = 0; i < PAGE / 8; i++)  /* zero written too: RAM under QEMU is not all zero */
        w[i] = (kind & 7) == 0 ? 0 : (kind & 1) ? mix64(s + i) : (mix64(s + (i & ~7ULL)) & 0x7f7f7f7f7f7f7f7fULL);
}

static inline void op_write(uint64_t page, uint64_t r, uint64_t done)
{
    uint32_t n = 1 + (uint32_t)(r & 7), words = PAGE / 8;
    uint64_t off = mulhi(r, words - n + 1);
    uint64_t *w = page_at(page) + off, v = r ^ (done * P3);
    for (uint32_t k = 0; k < n; k++)
        w[k] = mix64(v + k * GOLDEN);
}

static inline uint64_t op_read(uint64_t page, uint64_t r, uint64_t acc)
{
    uint64_t v = *(volatile uint64_t *)(page_at(page) + mulhi(r, PAGE / 8));
    return rotl64(acc ^ v, 5) * P2 + 1;
}

static inline uint64_t do_op(uint64_t first, uint64_t np, uint64_t done, uint64_t *rng, uint64_t acc)
{
    uint64_t p, r, u, v;
    switch (P.workload) {
    case WL_SEQ_READ:
        return op_read(first + done % np, rng_next(rng), acc);
    case WL_SEQ_WRITE:
        op_write(first + done % np, rng_next(rng), done);
        return acc;
    case WL_RANDOM_READ:
        p = mulhi(rng_next(rng), np);
        return op_read(first + p, rng_next(rng), acc);
    case WL_RANDOM_WRITE:
        p = mulhi(rng_next(rng), np);
        op_write(first + p, rng_next(rng), done);
        return acc;
    case WL_HOTSET:
    case WL_ZIPF:
        u = rng_next(rng);
        if (P.workload == WL_HOTSET) {
            uint64_t hot = np / 10 ? np / 10 : 1;
            v = rng_next(rng);
            p = (mulhi(u, 10) < 9 || hot >= np) ? mulhi(v, hot) : hot + mulhi(v, np - hot);
        } else {
            uint64_t u2 = mulhi(u, u);
            p = mulhi(mulhi(u2, u2), np);
        }
        r = rng_next(rng);
        if ((r >> 62) != 0) {
            op_write(first + p, r, done);
            return acc;
        }
        return op_read(first + p, r, acc);
    default:
        return acc;
    }
}

#define LANE(h, w) ((h) = rotl64((h) ^ ((w) * P1), 31) * P2)

/* Protocol 1's mig_digest() of whole 32-byte blocks (slices are whole
 * pages): scalar code, since the guest has no SSE state set up; its own
 * function, compared only with itself. */
static uint64_t digest_range(const uint64_t *w, uint64_t bytes)
{
    uint64_t h[4] = {0x243F6A8885A308D3ULL, 0x13198A2E03707344ULL, 0xA4093822299F31D0ULL, 0x082EFA98EC4E6C89ULL};
    for (uint64_t i = 0; i < bytes / 8; i += 4) {
        LANE(h[0], w[i]);
        LANE(h[1], w[i + 1]);
        LANE(h[2], w[i + 2]);
        LANE(h[3], w[i + 3]);
    }
    uint64_t f = bytes * P3 + P4;
    for (int i = 0; i < 4; i++)
        f = rotl64(f ^ h[i], 27) * P1;
    return mix64(f);
}

static void user_main(uint64_t cpu)
{
    uint64_t n = P.ncpu;
    uint64_t first = P.first_page + P.npages * cpu / n;
    uint64_t np = P.first_page + P.npages * (cpu + 1) / n - first;
    uint64_t target = P.ops / n + (cpu < P.ops % n ? 1 : 0);
    uint64_t s = P.seed * P1 ^ ((uint64_t)(P.workload + 1) * P3) ^ ((cpu + 1) * P4);
    uint64_t rng = rng_next(&s), acc = 0, done = 0;
    if (cpu == 0) {
        puts_port("start pages ");
        put_hex(P.npages);
        puts_port(" ops_done ");
        put_hex((uint64_t)(uintptr_t)ops_done);
        puts_port("\n");
    }
    for (uint64_t p = first; p < first + np; p++)
        fill_page(p);
    if (np == 0)
        target = 0;
    while (done < target) {
        acc = do_op(first, np, done, &rng, acc);
        if ((++done & (REPORT_EVERY - 1)) == 0) {
            ops_done[cpu] = done;
            outl(PORT_OPS, REPORT_EVERY);
        }
    }
    ops_done[cpu] = done;
    outl(PORT_OPS, (uint32_t)(done & (REPORT_EVERY - 1)));
    slice_digest[cpu] = digest_range(page_at(first), np * PAGE);
    slice_acc[cpu] = acc;
    __atomic_add_fetch(&finished_cpus, 1, __ATOMIC_ACQ_REL);
    if (cpu == 0) {                  /* always vCPU 0: what is left on the stacks is deterministic */
        while (__atomic_load_n(&finished_cpus, __ATOMIC_ACQUIRE) != n)
            __asm__ volatile("pause");
        uint64_t d = P4 ^ n;
        for (uint64_t i = 0; i < n; i++)
            d = mix64(mix64(d ^ slice_digest[i]) ^ slice_acc[i] * P1);
        puts_port("digest ");
        put_hex(d);
        puts_port("\n");
    }
    outl(PORT_DONE, (uint32_t)cpu);
    for (;;)
        __asm__ volatile("pause");
}
