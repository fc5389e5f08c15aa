/* REAP's case, a function's working set: a foreign process speaking
 * Firecracker's UFFD handshake that touches a fixed part of its memory in
 * random order, as a restored function's first invocation does.
 *
 * usage: uffd_ws_client SOCKET IMAGE SEED WS_PERCENT
 *
 * Maps anonymous memory the size of IMAGE, registers it with a userfaultfd,
 * sends it to SOCKET, waits for the agent's ready byte (its working set in,
 * as a VMM resumes its guest), then reads one byte of each page of the top
 * WS_PERCENT of the image (where a sequential push comes last) in an order
 * fixed by SEED. Prints {"ws_pages", "ws_ms", "touch_ms"}: ws_ms from the
 * handshake to the last page touched (what a cold start costs: the wait for
 * the ready byte included), touch_ms from the ready byte. Then waits for a
 * line on stdin (the restore done), checks every page against the image,
 * prints {"pages", "bad"} and exits 0 only if none is bad. C, not Python,
 * so that the client's own time per page does not hide the faults' cost. */
#define _GNU_SOURCE
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>

#include "handshake.h"

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static uint64_t xorshift(uint64_t *x)
{
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    return *x;
}

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: %s SOCKET IMAGE SEED WS_PERCENT\n", argv[0]);
        return 2;
    }
    long page = sysconf(_SC_PAGESIZE);
    uint64_t rng = strtoull(argv[3], NULL, 10) * 0x9E3779B97F4A7C15ULL + 1;
    int percent = atoi(argv[4]);
    int img = open(argv[2], O_RDONLY);
    struct stat st;
    if (img < 0 || fstat(img, &st) < 0)
        die("image");
    size_t size = (size_t)st.st_size, npages = size / (size_t)page;
    size_t nws = npages * (size_t)percent / 100, first = npages - nws;
    uint8_t *image = mmap(NULL, size, PROT_READ, MAP_PRIVATE, img, 0);
    uint8_t *mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    size_t *order = malloc(nws * sizeof(*order));
    if (image == MAP_FAILED || mem == MAP_FAILED || !order)
        die("mmap");
    for (size_t i = 0; i < nws; i++)
        order[i] = first + i;
    for (size_t i = nws; i > 1; i--) {
        size_t j = (size_t)(xorshift(&rng) % i), t = order[i - 1];
        order[i - 1] = order[j];
        order[j] = t;
    }

    double t0 = now_ms();
    int s = uffd_handshake(argv[1], mem, size, page, 0);
    char ready;
    if (recv(s, &ready, 1, 0) != 1)
        die("ready byte");
    double t1 = now_ms();
    volatile uint8_t sink = 0;
    for (size_t i = 0; i < nws; i++)
        sink ^= mem[order[i] * (size_t)page];
    double t2 = now_ms();
    printf("{\"ws_pages\": %zu, \"ws_ms\": %.3f, \"touch_ms\": %.3f}\n", nws, t2 - t0, t2 - t1);
    fflush(stdout);

    char line[64];
    if (!fgets(line, sizeof(line), stdin))
        die("stdin");
    size_t bad = 0;
    for (size_t p = 0; p < npages; p++)
        bad += memcmp(mem + p * (size_t)page, image + p * (size_t)page, (size_t)page) != 0;
    printf("{\"pages\": %zu, \"bad\": %zu}\n", npages, bad);
    close(s);
    return bad ? 1 : 0;
}
