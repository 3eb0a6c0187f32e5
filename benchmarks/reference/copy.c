/* Independent reference copy bandwidth: plain memcpy between two touched buffers; prints GB/s of bytes copied
 * (not the STREAM 2x) for each repeat. usage: copy SIZE_BYTES REPEATS */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: copy SIZE REPEATS\n"); return 2; }
    size_t size = strtoull(argv[1], 0, 10);
    int repeats = atoi(argv[2]);
    char *a = malloc(size), *b = malloc(size);
    memset(a, 1, size);
    memset(b, 2, size);
    memcpy(b, a, size);  /* warm-up */
    for (int r = 0; r < repeats; r++) {
        double t0 = now();
        memcpy(b, a, size);
        __asm__ volatile("" : : "r"(b) : "memory");
        printf("%.3f\n", size / (now() - t0) / 1e9);
    }
    return b[size / 2] == 1 ? 0 : 1;
}
