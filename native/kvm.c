/*
 * The VMM of the kvm guest kind: a VM over the runner's guest RAM (one KVM
 * memory slot on the memfd mapping), one thread per vCPU, and no device but
 * a port-I/O channel (the ports of native/guest/guest.c).
 *
 * On a destination the RAM is registered with userfaultfd MISSING before
 * any vCPU runs: a vCPU touching a missing page blocks inside KVM_RUN
 * (KVM's get_user_pages -> handle_userfault) until the agent installs it.
 * That sleep is what blocked_ns measures: the thread's wall time inside its
 * run loop minus its CPU time minus its run-queue wait
 * (/proc/thread-self/schedstat). The guest never halts, so the thread
 * sleeps only on missing pages.
 *
 * Pausing follows KVM's rule: immediate_exit = 1 plus a signal to each vCPU
 * thread (a handler without SA_RESTART makes KVM_RUN return EINTR), then one
 * more KVM_RUN with immediate_exit set so a pending port I/O completes and
 * the registers are exact.
 *
 * Every entry point is called by cffi with the GIL released.
 */
#define _GNU_SOURCE
#include "kvm.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define PORT_TEXT 0xe9
#define PORT_OPS 0x7e0
#define PORT_DONE 0x7e1
#define PORT_APS 0x7e2
#define KICK_SIGNAL SIGUSR2
#define MAX_VCPUS 16
#define TEXT_MAX 4096
#define BLOCKED_EVERY_NS 5000000LL   /* re-read schedstat at most this often */

static const uint32_t MSR_LIST[] = {
    0x174, 0x175, 0x176,                             /* SYSENTER_CS/ESP/EIP */
    0x277,                                           /* PAT */
    0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084, /* STAR, LSTAR, CSTAR, SFMASK */
    0xC0000100, 0xC0000101, 0xC0000102,             /* FS_BASE, GS_BASE, KERNEL_GS_BASE */
};
#define NMSR (sizeof(MSR_LIST) / sizeof(MSR_LIST[0]))

struct vcpu {
    struct mig_kvm *vm;
    uint32_t idx;
    int fd;
    struct kvm_run *run;
    pthread_t thread;
    int started;                     /* a thread exists (joined by pause) */
    _Atomic uint64_t ops, blocked_ns, run_ns;
    _Atomic int tid, active, finished, error;
};

struct mig_kvm {
    int kvm_fd, vm_fd;
    uint32_t n;
    int run_size, xsave_size;
    pthread_mutex_t mu;              /* start/pause/AP wake-up */
    _Atomic int stop;
    int running;
    struct vcpu *v;
    pthread_mutex_t text_mu;
    char text[TEXT_MAX];
    uint32_t textlen;
    char err[256];
};

/* ----------------------------------------------------------------- helpers */

static int64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void kick_handler(int sig) { (void)sig; }

static void install_kick(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = kick_handler;    /* no SA_RESTART: KVM_RUN returns EINTR */
    sigemptyset(&sa.sa_mask);
    sigaction(KICK_SIGNAL, &sa, NULL);
}

static void set_err(struct mig_kvm *vm, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    pthread_mutex_lock(&vm->text_mu);
    if (!vm->err[0])
        vsnprintf(vm->err, sizeof(vm->err), fmt, ap);
    pthread_mutex_unlock(&vm->text_mu);
    va_end(ap);
}

/* cpu ns + run-queue wait ns of the calling thread. */
static int64_t busy_ns(void)
{
    char buf[128];
    int fd = open("/proc/thread-self/schedstat", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = 0;
    unsigned long long cpu = 0, wait = 0;
    sscanf(buf, "%llu %llu", &cpu, &wait);
    return (int64_t)(cpu + wait);
}

static void flat32(struct kvm_segment *s, int code, uint16_t sel)
{
    memset(s, 0, sizeof(*s));
    s->limit = 0xffffffff;
    s->selector = sel;
    s->present = 1;
    s->db = 1;
    s->s = 1;
    s->g = 1;
    s->type = code ? 11 : 3;
}

/* The multiboot machine state: 32-bit protected mode, flat segments, paging off. */
static int enter32(struct vcpu *c, uint32_t eip, uint32_t eax, uint32_t ebx, uint32_t esi)
{
    struct kvm_sregs sr;
    if (ioctl(c->fd, KVM_GET_SREGS, &sr) < 0)
        return -errno;
    flat32(&sr.cs, 1, 0x08);
    flat32(&sr.ds, 0, 0x10);
    sr.es = sr.fs = sr.gs = sr.ss = sr.ds;
    sr.cr0 = 0x11;                   /* PE | ET */
    sr.cr3 = sr.cr4 = sr.efer = 0;
    if (ioctl(c->fd, KVM_SET_SREGS, &sr) < 0)
        return -errno;
    struct kvm_regs r;
    memset(&r, 0, sizeof(r));
    r.rip = eip;
    r.rax = eax;
    r.rbx = ebx;
    r.rsi = esi;
    r.rflags = 2;
    return ioctl(c->fd, KVM_SET_REGS, &r) < 0 ? -errno : 0;
}

/* ------------------------------------------------------------------ vCPUs */

static void *vcpu_loop(void *arg);

static int spawn(struct vcpu *c)
{
    c->run->immediate_exit = 0;
    int rc = pthread_create(&c->thread, NULL, vcpu_loop, c);
    if (rc)
        return -rc;
    c->started = 1;
    return 0;
}

/* PORT_APS: the guest's bootstrap vCPU wakes the others at `entry`. */
static void wake_aps(struct mig_kvm *vm, uint32_t entry)
{
    pthread_mutex_lock(&vm->mu);
    for (uint32_t i = 1; i < vm->n; i++) {
        struct vcpu *c = &vm->v[i];
        if (atomic_load(&c->active))
            continue;
        int rc = enter32(c, entry, 0, 0, i);
        if (rc) {
            set_err(vm, "vCPU %u: cannot set its entry state: %s", i, strerror(-rc));
            atomic_store(&c->error, 1);
            continue;
        }
        atomic_store(&c->active, 1);
        if (!atomic_load(&vm->stop) && vm->running && (rc = spawn(c)))
            set_err(vm, "vCPU %u: cannot start its thread: %s", i, strerror(-rc));
    }
    pthread_mutex_unlock(&vm->mu);
}

static void text_byte(struct mig_kvm *vm, uint8_t b)
{
    pthread_mutex_lock(&vm->text_mu);
    if (vm->textlen < TEXT_MAX)
        vm->text[vm->textlen++] = (char)b;
    pthread_mutex_unlock(&vm->text_mu);
}

/* One KVM_EXIT_IO; returns 1 when the vCPU is done. */
static int port_io(struct vcpu *c)
{
    struct kvm_run *r = c->run;
    uint8_t *data = (uint8_t *)r + r->io.data_offset;
    if (r->io.direction == KVM_EXIT_IO_IN) {
        memset(data, 0xff, (size_t)r->io.size * r->io.count);
        return 0;
    }
    for (uint32_t k = 0; k < r->io.count; k++, data += r->io.size) {
        uint32_t v = 0;
        memcpy(&v, data, r->io.size < 4 ? r->io.size : 4);
        switch (r->io.port) {
        case PORT_OPS:
            atomic_fetch_add(&c->ops, v);
            break;
        case PORT_DONE:
            atomic_store(&c->finished, 1);
            return 1;
        case PORT_APS:
            wake_aps(c->vm, v);
            break;
        case PORT_TEXT:
            text_byte(c->vm, (uint8_t)v);
            break;
        default:
            break;
        }
    }
    return 0;
}

static void fail(struct vcpu *c, const char *what)
{
    struct kvm_regs regs;
    uint64_t rip = ioctl(c->fd, KVM_GET_REGS, &regs) == 0 ? regs.rip : 0;
    set_err(c->vm, "vCPU %u stopped: %s (rip 0x%llx)", c->idx, what, (unsigned long long)rip);
    atomic_store(&c->error, 1);
}

static void *vcpu_loop(void *arg)
{
    struct vcpu *c = arg;
    struct mig_kvm *vm = c->vm;
    atomic_store(&c->tid, (int)syscall(SYS_gettid));
    int64_t t0 = mono_ns(), b0 = busy_ns(), last = t0;
    uint64_t blocked0 = atomic_load(&c->blocked_ns), run0 = atomic_load(&c->run_ns);
    int done = 0;
    while (!done && !atomic_load(&vm->stop)) {
        if (ioctl(c->fd, KVM_RUN, 0) < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            char what[96];
            snprintf(what, sizeof(what), "KVM_RUN failed: %s", strerror(errno));
            fail(c, what);
            break;
        }
        switch (c->run->exit_reason) {
        case KVM_EXIT_IO:
            done = port_io(c);
            break;
        case KVM_EXIT_INTR:
            break;
        case KVM_EXIT_SHUTDOWN:
            fail(c, "the guest triple-faulted");
            done = 1;
            break;
        case KVM_EXIT_HLT:
            fail(c, "the guest halted");
            done = 1;
            break;
        default: {
            char what[64];
            snprintf(what, sizeof(what), "unexpected KVM exit %u", c->run->exit_reason);
            fail(c, what);
            done = 1;
        }
        }
        int64_t now = mono_ns();
        if (now - last >= BLOCKED_EVERY_NS) {
            int64_t asleep = (now - t0) - (busy_ns() - b0);
            atomic_store(&c->blocked_ns, blocked0 + (uint64_t)(asleep > 0 ? asleep : 0));
            atomic_store(&c->run_ns, run0 + (uint64_t)(now - t0));
            last = now;
        }
    }
    if (!atomic_load(&c->error)) {  /* complete a pending port I/O: exact registers */
        c->run->immediate_exit = 1;
        ioctl(c->fd, KVM_RUN, 0);
    }
    int64_t now = mono_ns(), asleep = (now - t0) - (busy_ns() - b0);
    atomic_store(&c->blocked_ns, blocked0 + (uint64_t)(asleep > 0 ? asleep : 0));
    atomic_store(&c->run_ns, run0 + (uint64_t)(now - t0));
    atomic_store(&c->tid, 0);
    return NULL;
}

/* -------------------------------------------------------------------- VM */

static void vm_free(struct mig_kvm *vm);

static int set_cpuid(struct mig_kvm *vm, int vcpu_fd)
{
    for (int nent = 64; nent <= 4096; nent *= 2) {
        struct kvm_cpuid2 *cp = calloc(1, sizeof(*cp) + nent * sizeof(struct kvm_cpuid_entry2));
        if (!cp)
            return -ENOMEM;
        cp->nent = nent;
        if (ioctl(vm->kvm_fd, KVM_GET_SUPPORTED_CPUID, cp) < 0) {
            int e = errno;
            free(cp);
            if (e == E2BIG)
                continue;
            return -e;
        }
        int rc = ioctl(vcpu_fd, KVM_SET_CPUID2, cp) < 0 ? -errno : 0;
        free(cp);
        return rc;
    }
    return -E2BIG;
}

struct mig_kvm *mig_kvm_new(const char *device, uint8_t *mem, uint64_t size, uint32_t nvcpus, char *err, size_t errlen)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, install_kick);
    if (nvcpus < 1 || nvcpus > MAX_VCPUS) {
        snprintf(err, errlen, "a kvm guest has 1 to %d vCPUs, not %u", MAX_VCPUS, nvcpus);
        return NULL;
    }
    struct mig_kvm *vm = calloc(1, sizeof(*vm));
    if (!vm) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    vm->kvm_fd = vm->vm_fd = -1;
    vm->n = nvcpus;
    pthread_mutex_init(&vm->mu, NULL);
    pthread_mutex_init(&vm->text_mu, NULL);
    vm->v = calloc(nvcpus, sizeof(*vm->v));
    if (!vm->v) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    for (uint32_t i = 0; i < nvcpus; i++)
        vm->v[i].fd = -1;
    if ((vm->kvm_fd = open(device, O_RDWR | O_CLOEXEC)) < 0) {
        snprintf(err, errlen, "%s is not usable: %s", device, strerror(errno));
        goto fail;
    }
    if (ioctl(vm->kvm_fd, KVM_GET_API_VERSION, 0) != KVM_API_VERSION) {
        snprintf(err, errlen, "%s does not speak KVM API version %d", device, KVM_API_VERSION);
        goto fail;
    }
    if ((vm->vm_fd = ioctl(vm->kvm_fd, KVM_CREATE_VM, 0)) < 0) {
        snprintf(err, errlen, "%s cannot create a VM: %s", device, strerror(errno));
        goto fail;
    }
    ioctl(vm->vm_fd, KVM_SET_TSS_ADDR, 0xfffbd000UL);  /* VMX wants it; others ignore it */
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = size, .userspace_addr = (uint64_t)(uintptr_t)mem,
    };
    if (ioctl(vm->vm_fd, KVM_SET_USER_MEMORY_REGION, &region) < 0) {
        snprintf(err, errlen, "KVM refuses guest RAM of %llu bytes: %s", (unsigned long long)size, strerror(errno));
        goto fail;
    }
    int xs = ioctl(vm->vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_XSAVE2);
    vm->xsave_size = xs > (int)sizeof(struct kvm_xsave) ? xs : (int)sizeof(struct kvm_xsave);
    vm->run_size = ioctl(vm->kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (vm->run_size < (int)sizeof(struct kvm_run)) {
        snprintf(err, errlen, "KVM_GET_VCPU_MMAP_SIZE failed: %s", strerror(errno));
        goto fail;
    }
    for (uint32_t i = 0; i < nvcpus; i++) {
        struct vcpu *c = &vm->v[i];
        c->vm = vm;
        c->idx = i;
        if ((c->fd = ioctl(vm->vm_fd, KVM_CREATE_VCPU, i)) < 0) {
            snprintf(err, errlen, "KVM cannot create vCPU %u: %s", i, strerror(errno));
            goto fail;
        }
        int rc = set_cpuid(vm, c->fd);
        if (rc) {
            snprintf(err, errlen, "KVM_SET_CPUID2 on vCPU %u: %s", i, strerror(-rc));
            goto fail;
        }
        c->run = mmap(NULL, vm->run_size, PROT_READ | PROT_WRITE, MAP_SHARED, c->fd, 0);
        if (c->run == MAP_FAILED) {
            c->run = NULL;
            snprintf(err, errlen, "cannot map vCPU %u's run area: %s", i, strerror(errno));
            goto fail;
        }
    }
    return vm;
fail:
    vm_free(vm);
    return NULL;
}

/* Everything mig_kvm_new made (on its failure; a runner exits with its VM). */
static void vm_free(struct mig_kvm *vm)
{
    if (!vm)
        return;
    mig_kvm_pause(vm);
    for (uint32_t i = 0; vm->v && i < vm->n; i++) {
        if (vm->v[i].run)
            munmap(vm->v[i].run, vm->run_size);
        if (vm->v[i].fd >= 0)
            close(vm->v[i].fd);
    }
    if (vm->vm_fd >= 0)
        close(vm->vm_fd);
    if (vm->kvm_fd >= 0)
        close(vm->kvm_fd);
    pthread_mutex_destroy(&vm->mu);
    pthread_mutex_destroy(&vm->text_mu);
    free(vm->v);
    free(vm);
}

int mig_kvm_boot(struct mig_kvm *vm, uint32_t entry, uint32_t mbi)
{
    int rc = enter32(&vm->v[0], entry, 0x2BADB002, mbi, 0);
    if (!rc)
        atomic_store(&vm->v[0].active, 1);
    return rc;
}

int mig_kvm_start(struct mig_kvm *vm)
{
    pthread_mutex_lock(&vm->mu);
    if (vm->running) {
        pthread_mutex_unlock(&vm->mu);
        return -EBUSY;
    }
    atomic_store(&vm->stop, 0);
    vm->running = 1;
    int rc = 0;
    for (uint32_t i = 0; i < vm->n && !rc; i++) {
        struct vcpu *c = &vm->v[i];
        if (atomic_load(&c->active) && !atomic_load(&c->finished) && !atomic_load(&c->error))
            rc = spawn(c);
    }
    pthread_mutex_unlock(&vm->mu);
    if (rc)
        mig_kvm_pause(vm);
    return rc;
}

int mig_kvm_pause(struct mig_kvm *vm)
{
    pthread_mutex_lock(&vm->mu);
    atomic_store(&vm->stop, 1);
    for (uint32_t i = 0; i < vm->n; i++) {
        struct vcpu *c = &vm->v[i];
        if (c->started) {
            c->run->immediate_exit = 1;
            pthread_kill(c->thread, KICK_SIGNAL);
        }
    }
    pthread_mutex_unlock(&vm->mu);
    for (uint32_t i = 0; i < vm->n; i++) {  /* no thread starts once stop is set */
        struct vcpu *c = &vm->v[i];
        if (c->started) {
            pthread_join(c->thread, NULL);
            c->started = 0;
        }
    }
    pthread_mutex_lock(&vm->mu);
    vm->running = 0;
    pthread_mutex_unlock(&vm->mu);
    return 0;
}

int mig_kvm_running(struct mig_kvm *vm) { return vm->running; }

int mig_kvm_info(struct mig_kvm *vm, uint32_t i, mig_kvm_vcpu_info *out)
{
    if (i >= vm->n)
        return -EINVAL;
    struct vcpu *c = &vm->v[i];
    out->ops = atomic_load(&c->ops);
    out->blocked_ns = atomic_load(&c->blocked_ns);
    out->run_ns = atomic_load(&c->run_ns);
    out->tid = atomic_load(&c->tid);
    out->active = atomic_load(&c->active);
    out->finished = atomic_load(&c->finished);
    out->error = atomic_load(&c->error);
    return 0;
}

int mig_kvm_set_progress(struct mig_kvm *vm, uint32_t i, uint64_t ops, int active, int finished)
{
    if (i >= vm->n || vm->running)
        return -EINVAL;
    atomic_store(&vm->v[i].ops, ops);
    atomic_store(&vm->v[i].active, active);
    atomic_store(&vm->v[i].finished, finished);
    return 0;
}

/* --------------------------------------------------------- vCPU state I/O */

static const struct {
    unsigned long get, set;
    int size;
} PARTS[MIG_KVM_PARTS] = {
    [MIG_KVM_REGS] = {KVM_GET_REGS, KVM_SET_REGS, sizeof(struct kvm_regs)},
    [MIG_KVM_SREGS] = {KVM_GET_SREGS, KVM_SET_SREGS, sizeof(struct kvm_sregs)},
    [MIG_KVM_XSAVE] = {KVM_GET_XSAVE2, KVM_SET_XSAVE, 0},
    [MIG_KVM_XCRS] = {KVM_GET_XCRS, KVM_SET_XCRS, sizeof(struct kvm_xcrs)},
    [MIG_KVM_EVENTS] = {KVM_GET_VCPU_EVENTS, KVM_SET_VCPU_EVENTS, sizeof(struct kvm_vcpu_events)},
};

int mig_kvm_part_size(struct mig_kvm *vm, int part)
{
    if (part < 0 || part >= MIG_KVM_PARTS)
        return -EINVAL;
    return part == MIG_KVM_XSAVE ? vm->xsave_size : PARTS[part].size;
}

int mig_kvm_get_part(struct mig_kvm *vm, uint32_t i, int part, uint8_t *buf, uint32_t len)
{
    int size = mig_kvm_part_size(vm, part);
    if (size < 0 || i >= vm->n || len != (uint32_t)size || vm->running)
        return -EINVAL;
    unsigned long req = PARTS[part].get;
    if (part == MIG_KVM_XSAVE && size == (int)sizeof(struct kvm_xsave))
        req = KVM_GET_XSAVE;
    memset(buf, 0, len);
    return ioctl(vm->v[i].fd, req, buf) < 0 ? -errno : size;
}

int mig_kvm_set_part(struct mig_kvm *vm, uint32_t i, int part, const uint8_t *buf, uint32_t len)
{
    int size = mig_kvm_part_size(vm, part);
    if (size < 0 || i >= vm->n || len != (uint32_t)size || vm->running)
        return -EINVAL;
    return ioctl(vm->v[i].fd, PARTS[part].set, buf) < 0 ? -errno : 0;
}

/* One MSR through KVM_GET_MSRS / KVM_SET_MSRS; 0 if KVM has it. */
static int msr_io(int fd, unsigned long req, uint32_t index, uint64_t *data)
{
    struct {
        struct kvm_msrs h;
        struct kvm_msr_entry e;
    } one;
    memset(&one, 0, sizeof(one));
    one.h.nmsrs = 1;
    one.e.index = index;
    one.e.data = *data;
    if (ioctl(fd, req, &one) != 1)
        return -1;
    *data = one.e.data;
    return 0;
}

int mig_kvm_get_msrs(struct mig_kvm *vm, uint32_t i, uint32_t *index, uint64_t *data, uint32_t max)
{
    if (i >= vm->n || vm->running)
        return -EINVAL;
    uint32_t n = 0;
    for (uint32_t k = 0; k < NMSR && n < max; k++) {
        uint64_t v = 0;
        if (msr_io(vm->v[i].fd, KVM_GET_MSRS, MSR_LIST[k], &v) == 0) {  /* only the MSRs this KVM has */
            index[n] = MSR_LIST[k];
            data[n++] = v;
        }
    }
    return (int)n;
}

int mig_kvm_set_msrs(struct mig_kvm *vm, uint32_t i, const uint32_t *index, const uint64_t *data, uint32_t n)
{
    if (i >= vm->n || vm->running)
        return -EINVAL;
    for (uint32_t k = 0; k < n; k++) {
        uint64_t v = data[k];
        if (msr_io(vm->v[i].fd, KVM_SET_MSRS, index[k], &v))
            return -(int)(k + 1);
    }
    return 0;
}

/* Drain the guest's text output (PORT_TEXT) into buf; returns the bytes copied. */
int mig_kvm_text(struct mig_kvm *vm, char *buf, uint32_t len)
{
    pthread_mutex_lock(&vm->text_mu);
    uint32_t n = vm->textlen < len ? vm->textlen : len;
    memcpy(buf, vm->text, n);
    memmove(vm->text, vm->text + n, vm->textlen - n);
    vm->textlen -= n;
    pthread_mutex_unlock(&vm->text_mu);
    return (int)n;
}

int mig_kvm_error(struct mig_kvm *vm, char *buf, uint32_t len)
{
    pthread_mutex_lock(&vm->text_mu);
    int n = snprintf(buf, len, "%s", vm->err);
    pthread_mutex_unlock(&vm->text_mu);
    return n;
}
