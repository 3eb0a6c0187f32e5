/* Measurement kernels for tieremu's probes, compiled on first use by tieremu/probe/native.py.
 *
 * Each kernel times itself with CLOCK_MONOTONIC around its own loop, so Python and ctypes overheads stay out
 * of the figures. ctypes releases the GIL for the duration of each call, which lets several pinned threads run
 * these in parallel. */
#include <stdint.h>
#include <string.h>
#include <time.h>

static inline uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

/* ---- pointer chase --------------------------------------------------------------------------------------- */

/* Link elements base + order[i]*stride into one cycle following order (a permutation of 0..n-1). */
void chase_link(char *base, const uint64_t *order, uint64_t n, uint64_t stride) {
    for (uint64_t i = 0; i + 1 < n; i++)
        *(void **)(base + order[i] * stride) = base + order[i + 1] * stride;
    *(void **)(base + order[n - 1] * stride) = base + order[0] * stride;
}

/* Follow the chain for steps loads (a multiple of 16); every load depends on the one before, so elapsed/steps
 * is the load-to-use latency. *end keeps the chain live so the compiler cannot drop the loop. */
uint64_t chase(void *start, uint64_t steps, void **end) {
    void **p = (void **)start;
    uint64_t t0 = now_ns();
    for (uint64_t i = 0; i < steps; i += 16) {
#define HOP p = (void **)*p;
        HOP HOP HOP HOP HOP HOP HOP HOP HOP HOP HOP HOP HOP HOP HOP HOP
#undef HOP
    }
    uint64_t t1 = now_ns();
    *end = p;
    return t1 - t0;
}

/* The chase above with a TSC read every 16 loads: a block of 16 that took longer than `gap` ticks had the thread
 * descheduled (preempted by another task, or its vCPU stolen by the host) and says nothing about memory, so its
 * time and loads are left out. stats as chase_paced's: ticks left out, gaps, loads left out, longest block in ticks. gap = 0 leaves nothing out. Returns elapsed ns, the left-out time included. */
uint64_t chase_gapped(void *start, uint64_t steps, uint64_t gap, void **end, uint64_t *stats);

/* Steps from start until the chain returns to start (0 if it does not within limit). */
uint64_t chase_cycle_length(void *start, uint64_t limit) {
    void **p = (void **)*(void **)start;
    uint64_t steps = 1;
    while (p != (void **)start && steps < limit) {
        p = (void **)*p;
        steps++;
    }
    return p == (void **)start ? steps : 0;
}

/* ---- bandwidth -------------------------------------------------------------------------------------------- */

/* Read every word, iters times; eight accumulators keep the loads independent. Returns elapsed ns. */
uint64_t bw_read(const uint64_t *a, uint64_t words, uint64_t iters, uint64_t *sink) {
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0;
    uint64_t t0 = now_ns();
    for (uint64_t it = 0; it < iters; it++) {
        for (uint64_t i = 0; i + 8 <= words; i += 8) {
            s0 += a[i]; s1 += a[i + 1]; s2 += a[i + 2]; s3 += a[i + 3];
            s4 += a[i + 4]; s5 += a[i + 5]; s6 += a[i + 6]; s7 += a[i + 7];
        }
    }
    uint64_t t1 = now_ns();
    *sink = s0 + s1 + s2 + s3 + s4 + s5 + s6 + s7;
    return t1 - t0;
}

uint64_t bw_write(uint64_t *a, uint64_t words, uint64_t iters) {
    uint64_t t0 = now_ns();
    for (uint64_t it = 0; it < iters; it++) {
        for (uint64_t i = 0; i < words; i++)
            a[i] = it + i;
        __asm__ volatile("" : : "r"(a) : "memory");
    }
    return now_ns() - t0;
}

uint64_t bw_copy(void *dst, const void *src, uint64_t bytes, uint64_t iters) {
    uint64_t t0 = now_ns();
    for (uint64_t it = 0; it < iters; it++) {
        memcpy(dst, src, bytes);
        __asm__ volatile("" : : "r"(dst) : "memory");
    }
    return now_ns() - t0;
}

/* STREAM triad: a = b + s * c. */
uint64_t bw_triad(double *a, const double *b, const double *c, double s, uint64_t n, uint64_t iters) {
    uint64_t t0 = now_ns();
    for (uint64_t it = 0; it < iters; it++) {
        for (uint64_t i = 0; i < n; i++)
            a[i] = b[i] + s * c[i];
        __asm__ volatile("" : : "r"(a) : "memory");
    }
    return now_ns() - t0;
}

/* ---- background traffic for loaded latency ---------------------------------------------------------------- */

/* Burn time without touching memory or the clock: reading the clock in a tight loop (and PAUSE loops, which
 * hypervisors trap) on one vCPU was measured to triple a pointer chase's latency on the other. Returns elapsed
 * ns so the caller can calibrate iterations per ns. */
static inline uint64_t spin_iters(uint64_t iters) {
    uint64_t x = iters;
    for (uint64_t i = 0; i < iters; i++)
        __asm__ volatile("" : "+r"(x));
    return x;
}

uint64_t spin(uint64_t iters) {
    uint64_t t0 = now_ns();
    spin_iters(iters);
    return now_ns() - t0;
}

/* Stream over buf (words 64-bit words, whole cache lines) in groups of read_lines reads then write_lines
 * writes, spinning delay_iters after every 64 lines, until *stop becomes non-zero. Reports bytes touched (64
 * per line read or written) and elapsed ns, so the caller knows the bandwidth this intensity really generated. */
void traffic(uint64_t *buf, uint64_t words, uint32_t read_lines, uint32_t write_lines, uint64_t delay_iters,
             volatile int *stop, uint64_t *bytes_out, uint64_t *ns_out, uint64_t *sink) {
    const uint64_t lines = words / 8;
    const uint32_t group = read_lines + write_lines;
    uint64_t line = 0, done = 0, acc = 0, since_pause = 0;
    uint64_t t0 = now_ns();
    while (!*stop) {
        for (uint32_t g = 0; g < group; g++) {
            uint64_t *l = buf + line * 8;
            if (g < read_lines) {
                acc += l[0] + l[1] + l[2] + l[3] + l[4] + l[5] + l[6] + l[7];
            } else {
                l[0] = acc; l[1] = acc; l[2] = acc; l[3] = acc; l[4] = acc; l[5] = acc; l[6] = acc; l[7] = acc;
            }
            if (++line == lines)
                line = 0;
        }
        done += group;
        since_pause += group;
        if (since_pause >= 64) {
            since_pause = 0;
            if (delay_iters)
                acc += spin_iters(delay_iters);
        }
    }
    *ns_out = now_ns() - t0;
    *bytes_out = done * 64;
    *sink = acc;
}

/* ---- delay injection for emulated tiers --------------------------------------------------------------------- */

static inline uint64_t tsc(void) {
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

/* TSC ticks per nanosecond, measured against CLOCK_MONOTONIC over about `ns` nanoseconds. The TSC of x86 CPUs
 * this runs on is invariant (it ticks at a fixed rate whatever the core clock does), which is why delays are
 * counted in ticks: a count of instructions would stretch and shrink with the CPU frequency. */
double tsc_per_ns(uint64_t ns) {
    uint64_t t0 = now_ns(), c0 = tsc(), t1;
    do {
        t1 = now_ns();
    } while (t1 - t0 < ns);
    return (double)(tsc() - c0) / (double)(t1 - t0);
}

/* A pointer chase whose every load is followed by `adds` dependent adds on the loaded address before the next
 * load can issue (the address is their result). No fence and one clock read per 16 loads, so it can add a few
 * nanoseconds where chase_paced's fixed cost per load is already too much; the cost per add moves with the core
 * clock, so callers tune the count on the chain itself, just before they measure. Descheduled blocks (over `gap`
 * ticks) are left out and counted in stats, laid out as chase_paced's. Returns elapsed ns. */
uint64_t chase_spun(void *start, uint64_t steps, uint64_t adds, uint64_t gap, void **end, uint64_t *stats) {
    void **p = (void **)start;
    uint64_t excluded = 0, gaps = 0, loads = 0, longest = 0, block = 0;
    uint64_t t0 = now_ns();
    uint64_t mark = tsc();
    for (uint64_t i = 0; i < steps; i++) {
        uintptr_t v = (uintptr_t)*p;
        for (uint64_t k = 0; k < adds; k++)
            __asm__ volatile("add $0, %0" : "+r"(v));
        p = (void **)v;
        /* every 16 loads (and at the end) a clock read leaves descheduled blocks out, as chase_gapped does */
        if (++block == 16 || i + 1 == steps) {
            const uint64_t now = tsc(), took = now - mark;
            if (took > longest)
                longest = took;
            if (gap && took > gap) {
                excluded += took;
                gaps++;
                loads += block;
            }
            mark = now;
            block = 0;
        }
    }
    uint64_t t1 = now_ns();
    *end = p;
    stats[0] = excluded;
    stats[1] = gaps;
    stats[2] = loads;
    stats[3] = longest;
    return t1 - t0;
}

/* Busy-wait `ticks` TSC ticks (no syscall, no sleep); returns the ns actually waited. */
uint64_t wait_ticks(uint64_t ticks) {
    uint64_t t0 = now_ns();
    const uint64_t until = tsc() + ticks;
    while (tsc() < until)
        ;
    return now_ns() - t0;
}

/* A pointer chase paced to a latency: load i+1 issues no earlier than `ticks` TSC ticks after load i was due,
 * on an absolute schedule, so each dependent access takes the target as long as the host memory is faster. The
 * lfence starts the wait only once the load has completed. A load that comes in late (a DRAM hiccup, an
 * interrupt) is repaid by shorter waits after it, as the bandwidth pacer repays its debt, so the average
 * converges on the target instead of on target + noise (an open-loop wait missed 3x and 4x by 6-10% here); at most
 * `slack` ticks of lateness are carried, so a long hiccup is not followed by a burst at host speed.
 * Two clock reads further apart than `gap` ticks (far above any memory access) had the thread descheduled
 * between them: preempted by another task, or its vCPU stolen. That interval is left out of both the schedule and
 * the measure (the schedule shifts by it; a load it held is not counted): repaying it would take up to `slack` and no more,
 * and a preemption of milliseconds would otherwise stay in the mean (3.8x measured where 2.2x was asked on a loaded
 * 2-vCPU VM). A host slower than the target is never hidden: its loads are late by nanoseconds, not by `gap`.
 * stats[0] gets the ticks left out, stats[1] the gaps, stats[2] the loads left out, stats[3] the longest interval
 * between two clock reads in ticks. gap = 0 leaves nothing out. With ticks = 0 it is a chase with a fence and a
 * clock read per load: the floor below which targets cannot be paced (callers use chase_spun there). Returns elapsed ns, the left-out time included. */
uint64_t chase_paced(void *start, uint64_t steps, uint64_t ticks, uint64_t slack, uint64_t gap, void **end,
                     uint64_t *stats) {
    void **p = (void **)start;
    uint64_t excluded = 0, gaps = 0, loads = 0, longest = 0;
    uint64_t t0 = now_ns();
    uint64_t due = tsc(), last = due;
/* Every clock read checks the interval since the one before: most of a paced chase's time is spent waiting, so
 * that is where a preemption usually lands, not in the load. */
#define GAP_CHECK(now)                          \
    do {                                        \
        const uint64_t d_ = (now) - last;       \
        last = (now);                           \
        if (d_ > longest)                       \
            longest = d_;                       \
        if (gap && d_ > gap) {                  \
            excluded += d_;                     \
            gaps++;                             \
            due += d_;                          \
            if (in_load)                        \
                loads++;                        \
        }                                       \
    } while (0)
    for (uint64_t i = 0; i < steps; i++) {
        uintptr_t v = (uintptr_t)*p;
        __asm__ volatile("lfence" : "+r"(v) : : "memory");
        uint64_t now = tsc();
        int in_load = 1;
        const uint64_t before = loads;
        GAP_CHECK(now);
        if (loads == before)
            due += ticks; /* a load left out (its interval held a gap) takes no slot of the schedule */
        in_load = 0;
        while (now < due) {
            now = tsc();
            GAP_CHECK(now);
        }
        if (now - due > slack)
            due = now - slack;
        p = (void **)v;
    }
#undef GAP_CHECK
    uint64_t t1 = now_ns();
    *end = p;
    stats[0] = excluded;
    stats[1] = gaps;
    stats[2] = loads;
    stats[3] = longest;
    return t1 - t0;
}

uint64_t chase_gapped(void *start, uint64_t steps, uint64_t gap, void **end, uint64_t *stats) {
    void **p = (void **)start;
    uint64_t excluded = 0, gaps = 0, loads = 0, longest = 0;
    uint64_t t0 = now_ns();
    uint64_t mark = tsc();
    for (uint64_t i = 0; i < steps; i += 16) {
#define HOP p = (void **)*p;
        HOP HOP HOP HOP HOP HOP HOP HOP HOP HOP HOP HOP HOP HOP HOP HOP
#undef HOP
        /* rdtsc is not ordered with the loads: a block is timed to within a few loads, plenty against `gap` */
        const uint64_t now = tsc();
        const uint64_t took = now - mark;
        if (took > longest)
            longest = took;
        if (gap && took > gap) {
            excluded += took;
            gaps++;
            loads += 16;
        }
        mark = now;
    }
    uint64_t t1 = now_ns();
    *end = p;
    stats[0] = excluded;
    stats[1] = gaps;
    stats[2] = loads;
    stats[3] = longest;
    return t1 - t0;
}

/* Streams paced to a bandwidth: after each chunk, spin off the time the chunk was too fast for
 * ns_per_byte (counted bytes: 1x for read and write, 2x for copy, as the unpaced kernels count); with
 * ns_per_byte <= 0 the same loop runs unpaced (no clock reads at all): the path of a tier asked for no slowdown.
 * kind 0 reads src, 1 writes dst, 2 copies src to dst. Returns elapsed ns; *injected_ns gets the spin time. */
uint64_t bw_paced(int kind, void *dst, const void *src, uint64_t bytes, uint64_t iters, uint64_t chunk,
                  double ns_per_byte, double ticks_per_ns, uint64_t *injected_ns, uint64_t *sink) {
    const uint64_t counted = kind == 2 ? 2 * chunk : chunk;
    const double chunk_target = counted * ns_per_byte;
    const int paced = ns_per_byte > 0;
    uint64_t acc = 0, injected = 0;
    double debt = 0;
    uint64_t t0 = now_ns(), mark = t0;
    for (uint64_t it = 0; it < iters; it++) {
        for (uint64_t off = 0; off + chunk <= bytes; off += chunk) {
            if (kind == 0) {
                const uint64_t *a = (const uint64_t *)((const char *)src + off);
                for (uint64_t i = 0; i < chunk / 8; i += 8)
                    acc += a[i] + a[i + 1] + a[i + 2] + a[i + 3] + a[i + 4] + a[i + 5] + a[i + 6] + a[i + 7];
            } else if (kind == 1) {
                uint64_t *a = (uint64_t *)((char *)dst + off);
                for (uint64_t i = 0; i < chunk / 8; i++)
                    a[i] = it + i;
            } else {
                memcpy((char *)dst + off, (const char *)src + off, chunk);
            }
            __asm__ volatile("" : : "r"(dst) : "memory");
            if (!paced)
                continue;
            /* One clock read per chunk; the shortfall (or overshoot) carries forward so the average rate
             * converges on the target. */
            uint64_t now = now_ns();
            debt += chunk_target - (double)(now - mark);
            mark = now;
            if (debt > 0) {
                const uint64_t until = tsc() + (uint64_t)(debt * ticks_per_ns);
                while (tsc() < until)
                    ;
                uint64_t after = now_ns();
                injected += after - mark;
                debt -= (double)(after - mark);
                mark = after;
            }
        }
    }
    uint64_t elapsed = now_ns() - t0;
    *injected_ns = injected;
    *sink = acc;
    return elapsed;
}

/* ---- paged attention for decode ------------------------------------------------------------------------------- */

#include <math.h>

/* One query token of one sequence attending to its K and V where they lie, with no gather copy: token t's K row
 * for KV head h is at k_blocks[t / block_tokens] + ((t % block_tokens) * kv_heads + h) * head_dim floats, its V row
 * v_offset floats further (blocks may sit in any tier's arena). q and out are [kv_heads][group][head_dim] (each KV
 * head's query heads together); scores is scratch of group * length floats. Every K and V row is read once per
 * KV head and serves the whole query group. fp32. */
typedef float v8f __attribute__((vector_size(32)));

static inline v8f load8(const float *p) {
    v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline float sum8(v8f v) {
    return v[0] + v[1] + v[2] + v[3] + v[4] + v[5] + v[6] + v[7];
}

typedef int32_t v8i __attribute__((vector_size(32)));

/* e^x for x <= 0 on 8 lanes (softmax after subtracting the maximum): x = n ln2 + r, e^r by a degree-6 polynomial
 * on |r| <= ln2/2, 2^n through the exponent bits. Relative error about 2e-7; scalar expf cost most of the kernel. */
static inline v8f exp8_nonpositive(v8f x) {
    const v8f lo = {-87.f, -87.f, -87.f, -87.f, -87.f, -87.f, -87.f, -87.f};
    const v8i below = x < lo;  /* lanes of -1 where x < lo (a vector ?: is C++ only) */
    x = (v8f)((below & (v8i)lo) | (~below & (v8i)x));
    const v8f t = x * 1.44269504088896341f - 0.5f;
    const v8i n = __builtin_convertvector(t, v8i);  /* truncation toward zero: rounds x log2(e) for x <= 0 */
    const v8f nf = __builtin_convertvector(n, v8f);
    const v8f r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
    v8f p = r * (1.f / 720) + 1.f / 120;
    p = p * r + 1.f / 24;
    p = p * r + 1.f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    return p * (v8f)((n + 127) << 23);
}

/* head_dim must be a multiple of 8: rows are handled as 8-float vectors (GCC vector extensions, so the dot
 * products do not wait on one scalar accumulator). */
void paged_decode_attention(const int64_t *k_blocks, int64_t v_offset, int64_t length, int64_t block_tokens,
                            int64_t kv_heads, int64_t group, int64_t head_dim, const float *q, float scale,
                            float *out, float *scores) {
    const int64_t rows = kv_heads * group, nblocks = (length + block_tokens - 1) / block_tokens;
    /* Pass 1, K in storage order (block, token, head): one score per query head and token. */
    for (int64_t b = 0, t = 0; b < nblocks; b++) {
        const float *kb = (const float *)k_blocks[b];
        for (int64_t i = 0; i < block_tokens && t < length; i++, t++) {
            for (int64_t h = 0; h < kv_heads; h++) {
                const float *k = kb + (i * kv_heads + h) * head_dim;
                for (int64_t g = 0; g < group; g++) {
                    const float *qg = q + (h * group + g) * head_dim;
                    v8f a0 = {0}, a1 = {0};
                    int64_t d = 0;
                    for (; d + 16 <= head_dim; d += 16) {
                        a0 += load8(qg + d) * load8(k + d);
                        a1 += load8(qg + d + 8) * load8(k + d + 8);
                    }
                    if (d < head_dim)
                        a0 += load8(qg + d) * load8(k + d);
                    scores[(h * group + g) * length + t] = sum8(a0 + a1) * scale;
                }
            }
        }
    }
    /* Softmax per query head. */
    for (int64_t r = 0; r < rows; r++) {
        float *s = scores + r * length, top = s[0], sum = 0.f;
        for (int64_t t = 1; t < length; t++)
            top = s[t] > top ? s[t] : top;
        int64_t t = 0;
        v8f acc = {0};
        for (; t + 8 <= length; t += 8) {
            v8f e = exp8_nonpositive(load8(s + t) - top);
            memcpy(s + t, &e, sizeof e);
            acc += e;
        }
        sum = sum8(acc);
        for (; t < length; t++) {
            s[t] = expf(s[t] - top);
            sum += s[t];
        }
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < length; t++)
            s[t] *= inv;
        memset(out + r * head_dim, 0, head_dim * sizeof(float));
    }
    /* Pass 2, V in storage order: weighted sum per query head. */
    for (int64_t b = 0, t = 0; b < nblocks; b++) {
        const float *vb = (const float *)k_blocks[b] + v_offset;
        for (int64_t i = 0; i < block_tokens && t < length; i++, t++) {
            for (int64_t h = 0; h < kv_heads; h++) {
                const float *v = vb + (i * kv_heads + h) * head_dim;
                for (int64_t g = 0; g < group; g++) {
                    const float w = scores[(h * group + g) * length + t];
                    float *o = out + (h * group + g) * head_dim;
                    for (int64_t d = 0; d < head_dim; d += 8) {
                        v8f acc = load8(o + d) + w * load8(v + d);
                        memcpy(o + d, &acc, sizeof acc);
                    }
                }
            }
        }
    }
}
