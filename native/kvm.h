/* A minimal KVM VMM for the kvm guest kind (see kvm.c). */
#ifndef MIGRATE_KVM_H
#define MIGRATE_KVM_H
#include <stddef.h>
#include <stdint.h>

/* cffi: begin */
struct mig_kvm;

enum { MIG_KVM_REGS, MIG_KVM_SREGS, MIG_KVM_XSAVE, MIG_KVM_XCRS, MIG_KVM_EVENTS, MIG_KVM_PARTS };

typedef struct {
    uint64_t ops;          /* ops the vCPU reported (PORT_OPS) */
    uint64_t blocked_ns;   /* asleep inside KVM_RUN: waiting on missing pages */
    uint64_t run_ns;       /* wall time in the run loop */
    int32_t tid;           /* its thread's id while running, else 0 */
    int32_t active;        /* started (the bootstrap vCPU, or an AP the guest woke) */
    int32_t finished;      /* reported PORT_DONE */
    int32_t error;         /* an unexpected exit stopped it (see mig_kvm_error) */
} mig_kvm_vcpu_info;

struct mig_kvm *mig_kvm_new(const char *device, uint8_t *mem, uint64_t size, uint32_t nvcpus, char *err, size_t errlen);
int mig_kvm_boot(struct mig_kvm *vm, uint32_t entry, uint32_t mbi);
int mig_kvm_start(struct mig_kvm *vm);
int mig_kvm_pause(struct mig_kvm *vm);
int mig_kvm_running(struct mig_kvm *vm);
int mig_kvm_info(struct mig_kvm *vm, uint32_t i, mig_kvm_vcpu_info *out);
int mig_kvm_set_progress(struct mig_kvm *vm, uint32_t i, uint64_t ops, int active, int finished);
int mig_kvm_part_size(struct mig_kvm *vm, int part);
int mig_kvm_get_part(struct mig_kvm *vm, uint32_t i, int part, uint8_t *buf, uint32_t len);
int mig_kvm_set_part(struct mig_kvm *vm, uint32_t i, int part, const uint8_t *buf, uint32_t len);
int mig_kvm_get_msrs(struct mig_kvm *vm, uint32_t i, uint32_t *index, uint64_t *data, uint32_t max);
int mig_kvm_set_msrs(struct mig_kvm *vm, uint32_t i, const uint32_t *index, const uint64_t *data, uint32_t n);
int mig_kvm_text(struct mig_kvm *vm, char *buf, uint32_t len);
int mig_kvm_error(struct mig_kvm *vm, char *buf, uint32_t len);
/* cffi: end */
#endif
