/* A foreign process speaking Firecracker's UFFD handshake, with non-cooperative
 * events enabled (as Firecracker does when a balloon is configured), that
 * changes its memory while it is being restored.
 *
 * usage: uffd_events_client SOCKET IMAGE [leave]
 *
 * Maps anonymous memory the size of IMAGE, registers it with a userfaultfd
 * (EVENT_REMOVE | EVENT_REMAP | EVENT_UNMAP | EVENT_FORK), sends it to SOCKET, then: discards pages
 * [100, 400) at once (before they arrive), reads [1000, 1300) and discards
 * them (after they arrived), moves [1500, 1800) elsewhere with mremap, and
 * reads every page: a discarded page must be zeros, every other page the
 * image's bytes (the moved ones at their new address). Prints
 * {"pages": N, "bad": K} and exits 0 only if K is 0.
 * With "leave", after the discards and the move it reads nothing: once a
 * line comes on stdin it forks (the child exits at once) and unmaps all its
 * memory, whatever has not arrived yet; prints {"pages": N, "bad": 0}. */
#define _GNU_SOURCE
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "handshake.h"

#define DISCARD_EARLY_FIRST 100
#define DISCARD_EARLY_END 400
#define DISCARD_LATE_FIRST 1000
#define DISCARD_LATE_END 1300
#define MOVE_FIRST 1500
#define MOVE_END 1800

int main(int argc, char **argv)
{
    int leave = argc == 4 && strcmp(argv[3], "leave") == 0;
    if (argc != 3 && !leave) {
        fprintf(stderr, "usage: %s SOCKET IMAGE [leave]\n", argv[0]);
        return 2;
    }
    long page = sysconf(_SC_PAGESIZE);
    int img = open(argv[2], O_RDONLY);
    struct stat st;
    if (img < 0 || fstat(img, &st) < 0)
        die("image");
    size_t size = (size_t)st.st_size, npages = size / (size_t)page;
    if (npages < MOVE_END)
        die("image too small");
    uint8_t *image = mmap(NULL, size, PROT_READ, MAP_PRIVATE, img, 0);
    uint8_t *mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (image == MAP_FAILED || mem == MAP_FAILED)
        die("mmap");

    int s = uffd_handshake(argv[1], mem, size, page, UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_EVENT_REMAP |
                                                     UFFD_FEATURE_EVENT_UNMAP | UFFD_FEATURE_EVENT_FORK);

    /* A balloon inflating before the pages arrive... */
    if (madvise(mem + DISCARD_EARLY_FIRST * page, (DISCARD_EARLY_END - DISCARD_EARLY_FIRST) * page, MADV_DONTNEED))
        die("madvise early");
    /* ...and after they did. */
    volatile uint8_t sink = 0;
    for (size_t p = DISCARD_LATE_FIRST; p < DISCARD_LATE_END; p++)
        sink ^= mem[p * page];
    if (madvise(mem + DISCARD_LATE_FIRST * page, (DISCARD_LATE_END - DISCARD_LATE_FIRST) * page, MADV_DONTNEED))
        die("madvise late");
    /* A range moved while it is restored. */
    size_t move_len = (MOVE_END - MOVE_FIRST) * page;
    uint8_t *dst = mmap(NULL, move_len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (dst == MAP_FAILED ||
        mremap(mem + MOVE_FIRST * page, move_len, move_len, MREMAP_MAYMOVE | MREMAP_FIXED, dst) != dst)
        die("mremap");
    if (leave) {
        char go[16];
        if (!fgets(go, sizeof(go), stdin))
            die("stdin");
        pid_t child = fork();
        if (child == 0)
            _exit(0);
        int status;
        if (child < 0 || waitpid(child, &status, 0) != child || !WIFEXITED(status) || WEXITSTATUS(status))
            die("fork");
        if (munmap(mem, size) || munmap(dst, move_len))
            die("munmap");
        printf("{\"pages\": %zu, \"bad\": 0}\n", npages);
        close(s);
        return 0;
    }

    static uint8_t zero[1 << 16];
    size_t bad = 0;
    for (size_t p = 0; p < npages; p++) {
        int discarded = (p >= DISCARD_EARLY_FIRST && p < DISCARD_EARLY_END) ||
                        (p >= DISCARD_LATE_FIRST && p < DISCARD_LATE_END);
        const uint8_t *at = p >= MOVE_FIRST && p < MOVE_END ? dst + (p - MOVE_FIRST) * page : mem + p * page;
        bad += memcmp(at, discarded ? zero : image + p * page, (size_t)page) != 0;
    }
    printf("{\"pages\": %zu, \"bad\": %zu}\n", npages, bad);
    close(s);
    return bad ? 1 : 0;
}
