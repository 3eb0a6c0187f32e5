/* Batched access counting for the migration daemon: one epoch's block reads (the KV cache's access log, chunk by
 * chunk) aggregated per block in one pass, with no Python per access. Compiled on first use by
 * tieremu/native/build.py, called from tieremu/daemon/daemon.py (EventBatch.counts); the numpy path there
 * (AccessCounts.of over _first_per_step) is the reference it must equal exactly (tests/test_daemon_counts.py).
 *
 * Input: the epoch's chunks, each one read of a sequence's blocks at one layer: `meta` holds (step, layer, seq,
 * length) per chunk, `block` and `tier` the chunks' block ids and tier indexes concatenated in log order.
 * With `first_per_step` set (all-layers blocks: reading a block's layers 0..L-1 in one step is one access) only
 * the first read of each block per (step, seq) is kept, as _first_per_step keeps it.
 *
 * Output (caller's buffers; every one holds n entries, n = all reads): `out64` is eight int64 columns of n
 * (row-major, column c at out64 + c*n): per row block, count, first, last, request, layer; per kept access row,
 * request. `out16` is three int16 columns: per row tier (of its last access), first_tier; per kept access its
 * tier. Rows are the distinct blocks ordered by their last access, as AccessCounts.of orders them. Returns the
 * number of kept accesses in the low 32 bits and of rows in the high 32 bits, or -1 when memory ran out. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { ROW_BLOCK, ROW_COUNT, ROW_FIRST, ROW_LAST, ROW_REQUEST, ROW_LAYER, ACC_ROW, ACC_REQUEST };
enum { ROW_TIER, ROW_FIRST_TIER, ACC_TIER };

static inline uint64_t mix(uint64_t x) { /* splitmix64's finaliser: spreads consecutive ids over the table */
    x ^= x >> 30; x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27; x *= 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static uint64_t table_size(int64_t n) { /* a power of two at least twice n (load <= 1/2) */
    uint64_t size = 16;
    while (size < (uint64_t)n * 2) size <<= 1;
    return size;
}

int64_t count_accesses(const int64_t *meta, int64_t chunks, const int64_t *block, const int16_t *tier, int64_t n,
                       int first_per_step, int64_t *out64, int16_t *out16) {
    if (n <= 0) return 0;
    uint64_t size = table_size(n), mask = size - 1;
    /* rows: block -> row in first-seen order (slot holds row + 1; 0 = empty) */
    int64_t *row_slot = calloc(size, sizeof *row_slot);
    /* seen: (step, seq, block) -> 1, only when deduplicating; the triple is kept to compare on collisions */
    int64_t *seen = first_per_step ? malloc(size * 3 * sizeof *seen) : NULL;
    uint8_t *used = first_per_step ? calloc(size, 1) : NULL;
    int64_t *fs = malloc((size_t)n * 7 * sizeof *fs); /* per first-seen row: block count first last request layer
                                                         new id; then per kept access its first-seen row */
    int16_t *fs16 = malloc((size_t)n * 2 * sizeof *fs16); /* per first-seen row: tier, first tier */
    int64_t *acc_fs = malloc((size_t)n * sizeof *acc_fs);
    if (!row_slot || (first_per_step && (!seen || !used)) || !fs || !fs16 || !acc_fs) {
        free(row_slot); free(seen); free(used); free(fs); free(fs16); free(acc_fs);
        return -1;
    }
    int64_t *fs_block = fs, *fs_count = fs + n, *fs_first = fs + 2 * n, *fs_last = fs + 3 * n,
            *fs_request = fs + 4 * n, *fs_layer = fs + 5 * n, *fs_new = fs + 6 * n;
    int16_t *fs_tier = fs16, *fs_first_tier = fs16 + n;
    int64_t *acc_request = out64 + ACC_REQUEST * n;
    int16_t *acc_tier = out16 + ACC_TIER * n;
    int64_t kept = 0, rows = 0, pos = 0;
    for (int64_t c = 0; c < chunks; c++) {
        int64_t step = meta[4 * c], layer = meta[4 * c + 1], seq = meta[4 * c + 2], len = meta[4 * c + 3];
        uint64_t head = mix((uint64_t)step * 0x9e3779b97f4a7c15ULL ^ (uint64_t)seq);
        for (int64_t j = 0; j < len; j++, pos++) {
            int64_t b = block[pos];
            int16_t t = tier[pos];
            if (first_per_step) {
                uint64_t h = mix(head ^ (uint64_t)b) & mask;
                int dup = 0;
                while (used[h]) {
                    int64_t *e = seen + 3 * h;
                    if (e[0] == step && e[1] == seq && e[2] == b) { dup = 1; break; }
                    h = (h + 1) & mask;
                }
                if (dup) continue;
                used[h] = 1;
                seen[3 * h] = step; seen[3 * h + 1] = seq; seen[3 * h + 2] = b;
            }
            uint64_t h = mix((uint64_t)b) & mask;
            int64_t r;
            for (;;) {
                int64_t s = row_slot[h];
                if (s == 0) {
                    r = rows++;
                    row_slot[h] = r + 1;
                    fs_block[r] = b; fs_count[r] = 0; fs_first[r] = kept; fs_first_tier[r] = t;
                    break;
                }
                if (fs_block[s - 1] == b) { r = s - 1; break; }
                h = (h + 1) & mask;
            }
            fs_count[r]++;
            fs_last[r] = kept; fs_tier[r] = t; fs_request[r] = seq; fs_layer[r] = layer;
            acc_fs[kept] = r; acc_tier[kept] = t; acc_request[kept] = seq;
            kept++;
        }
    }
    /* Rows by last access: walking the kept accesses in order, a row's last access numbers it. */
    int64_t next = 0;
    for (int64_t k = 0; k < kept; k++) {
        int64_t r = acc_fs[k];
        if (fs_last[r] != k) continue;
        int64_t o = next++;
        fs_new[r] = o;
        out64[ROW_BLOCK * n + o] = fs_block[r];
        out64[ROW_COUNT * n + o] = fs_count[r];
        out64[ROW_FIRST * n + o] = fs_first[r];
        out64[ROW_LAST * n + o] = k;
        out64[ROW_REQUEST * n + o] = fs_request[r];
        out64[ROW_LAYER * n + o] = fs_layer[r];
        out16[ROW_TIER * n + o] = fs_tier[r];
        out16[ROW_FIRST_TIER * n + o] = fs_first_tier[r];
    }
    int64_t *acc_row = out64 + ACC_ROW * n;
    for (int64_t k = 0; k < kept; k++) acc_row[k] = fs_new[acc_fs[k]];
    free(row_slot); free(seen); free(used); free(fs); free(fs16); free(acc_fs);
    return kept | (rows << 32);
}
