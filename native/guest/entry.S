/*
 * Multiboot entry of the KVM guest image (see guest.c for what it runs).
 *
 * A multiboot loader (QEMU's -kernel, or our VMM) enters _start32 in 32-bit
 * protected mode, paging off, EAX = 0x2BADB002, EBX = the multiboot info.
 * We build identity-mapped page tables (2 MiB pages, U bit at every level:
 * the workload runs at CPL3), switch to long mode and call kmain().
 * Secondary vCPUs enter _ap32 the same way with ESI = their index (our VMM
 * starts them there; under QEMU the real-mode trampoline below gets them
 * there after INIT-SIPI-SIPI).
 */
#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0x00010002          /* memory info, a.out kludge */
#define KSTACK 16384

    .section .multiboot, "a"
    .align 4
mb_header:
    .long MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)
    .long mb_header, __load_start, __load_end, __bss_end, _start32

    .text
    .code32
    .globl _start32
_start32:
    cli
    cld
    mov %ebx, mb_info
    /* PML4[0] -> PDPT; PDPT[0..3] -> PD0..3; PDn[i] = 2 MiB page: 4 GiB identity */
    lea pml4, %edi
    lea pdpt, %eax
    or $7, %eax
    mov %eax, (%edi)
    lea pdpt, %edi
    lea pd, %eax
    or $7, %eax
    mov $4, %ecx
1:  mov %eax, (%edi)
    add $4096, %eax
    add $8, %edi
    loop 1b
    lea pd, %edi
    mov $0x87, %eax
    mov $2048, %ecx
2:  mov %eax, (%edi)
    add $0x200000, %eax
    add $8, %edi
    loop 2b
    xor %esi, %esi                   /* the bootstrap vCPU is number 0 */
    .globl _ap32
_ap32:
    cli
    lgdt gdt_ptr
    mov $0x620, %eax                 /* PAE | OSFXSR | OSXMMEXCPT */
    mov %eax, %cr4
    lea pml4, %eax
    mov %eax, %cr3
    mov $0xC0000080, %ecx            /* EFER.LME */
    rdmsr
    or $0x100, %eax
    wrmsr
    mov $0x80050033, %eax            /* PG | AM | WP | NE | ET | MP | PE */
    mov %eax, %cr0
    ljmp $0x08, $start64

    .code64
start64:
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %esi, %edi                   /* kmain(cpu) */
    mov %rdi, %rax
    inc %rax
    imul $KSTACK, %rax
    lea kstacks(%rip), %rsp
    add %rax, %rsp
    call kmain
3:  jmp 3b

/* enter_user(rip, rsp, arg): iretq to CPL3 with IOPL 3 (port I/O allowed). */
    .globl enter_user
enter_user:
    mov $0x23, %eax
    mov %eax, %ds
    mov %eax, %es
    pushq $0x23
    pushq %rsi
    pushq $0x3002
    pushq $0x1b
    pushq %rdi
    mov %rdx, %rdi
    iretq

/*
 * AP trampoline for QEMU (real mode, copied to 0x8000 by kmain): protected
 * mode, then _ap32 with ESI = a fresh vCPU index.
 */
    .code16
    .globl tramp_start, tramp_end
tramp_start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    lgdtl 0x8000 + (tramp_gdt_ptr - tramp_start)
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $0x28, $(0x8000 + (tramp32 - tramp_start))
    .code32
tramp32:
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov $1, %esi
    lock xadd %esi, next_cpu
    mov $_ap32, %eax                 /* absolute: this code runs from its copy at 0x8000 */
    jmp *%eax
    .align 8
tramp_gdt_ptr:
    .word gdt_end - gdt - 1
    .long gdt
tramp_end:

    .data
    .align 16
gdt:
    .quad 0
    .quad 0x00AF9B000000FFFF          /* 0x08 kernel code, 64-bit */
    .quad 0x00CF93000000FFFF          /* 0x10 kernel data */
    .quad 0x00AFFB000000FFFF          /* 0x18 (selector 0x1b) user code, 64-bit, DPL 3 */
    .quad 0x00CFF3000000FFFF          /* 0x20 (selector 0x23) user data, DPL 3 */
    .quad 0x00CF9B000000FFFF          /* 0x28 kernel code, 32-bit (trampoline) */
gdt_end:
    .align 8
gdt_ptr:
    .word gdt_end - gdt - 1
    .long gdt
    .globl mb_info, next_cpu
mb_info:
    .long 0
next_cpu:
    .long 1

    .bss
    .align 4096
pml4: .skip 4096
pdpt: .skip 4096
pd:   .skip 4 * 4096
    .globl kstacks
kstacks: .skip KSTACK * 16

    .section .note.GNU-stack, "", @progbits
