/* Independent reference pointer chase (lmbench lat_mem_rd style), written apart from tieremu's kernels:
 * Sattolo's algorithm builds one random cycle over every 64-byte line; prints ns per load for each repeat.
 * usage: chase SIZE_BYTES HUGEPAGES(0|1) SECONDS_PER_REPEAT REPEATS */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static uint64_t rng = 88172645463325252ull;
static uint64_t next_rand(void) { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return rng; }

int main(int argc, char **argv) {
    if (argc != 5) { fprintf(stderr, "usage: chase SIZE HUGE SECONDS REPEATS\n"); return 2; }
    size_t size = strtoull(argv[1], 0, 10), n = size / 64;
    int huge = atoi(argv[2]), repeats = atoi(argv[4]);
    double seconds = atof(argv[3]);
    size_t align = 2u << 20;
    char *raw = mmap(0, size + align, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) { perror("mmap"); return 1; }
    char *buf = (char *)(((uintptr_t)raw + align - 1) & ~(uintptr_t)(align - 1));
    madvise(buf, size, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
    memset(buf, 1, size);
    size_t *perm = malloc(n * sizeof *perm);
    for (size_t i = 0; i < n; i++) perm[i] = i;
    for (size_t i = n - 1; i > 0; i--) {  /* Sattolo: j < i gives a single cycle */
        size_t j = next_rand() % i, t = perm[i];
        perm[i] = perm[j]; perm[j] = t;
    }
    for (size_t i = 0; i < n; i++) *(void **)(buf + i * 64) = buf + perm[i] * 64;
    free(perm);
    void **p = (void **)buf;
    size_t steps = 1 << 20;
    double t0 = now();
    for (size_t i = 0; i < steps; i++) p = (void **)*p;
    double per = (now() - t0) / steps;
    steps = (size_t)(seconds / per);
    for (size_t i = 0; i < steps; i++) p = (void **)*p;  /* warm-up */
    for (int r = 0; r < repeats; r++) {
        t0 = now();
        for (size_t i = 0; i < steps; i++) p = (void **)*p;
        printf("%.3f\n", (now() - t0) / steps * 1e9);
    }
    fprintf(stderr, "%p\n", (void *)p);  /* keeps the chain live */
    return 0;
}
