/* KV block compression kernels: int8 and int4 (two per byte) with one scale per group, and fp8 (e4m3fn) with one
 * scale per group. Compiled on first use by tieremu/native/build.py, called from tieremu/kv/compress.py.
 *
 * A block is K and V of one layer, [2, tokens, kv_heads, head_dim] in float32, bfloat16 or float16 (`dtype` 0, 1,
 * 2), read and written in place in that layout: a part's groups are addressed by strides (element g*gstride +
 * i*estride of the part is value i of group g), so KIVI's per-channel keys need no transposed copy. Every quantizer is symmetric: the scale is the group's
 * absolute maximum over the largest code (127, 7, 448), rounded UP to bfloat16 so that it is stored in two bytes
 * and no scaled value leaves the code range. Scales are stored as bfloat16 bit patterns (uint16).
 *
 * compress_blocks first scans all its input for NaN and Inf and returns the index of the first one (+1) before
 * writing anything: the caller refuses the blocks. 0 means done.
 *
 * Compressed blocks are addressed one pointer each (they sit at scattered arena slots); `geom` gives each part's
 * layout: {codes offset, scales offset, groups, group size, group stride, element stride}, K's six then V's. `kind`
 * is 8 (int8), 4 (int4) or 0 (fp8). */
/* Vectorize the per-value loops (this file only: the probe kernels keep -O2, their loops are timed as written). */
#pragma GCC optimize("O3")
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline uint32_t bits_of(float x) { uint32_t b; memcpy(&b, &x, 4); return b; }
static inline float float_of(uint32_t b) { float x; memcpy(&x, &b, 4); return x; }

/* The smallest bfloat16 >= s (s >= 0 and finite): truncate, then step up one bf16 ulp if anything was cut. */
static inline uint16_t bf16_ceil(float s) {
    uint32_t b = bits_of(s);
    uint32_t hi = b >> 16;
    if (b & 0xFFFFu) hi += 1;  /* cannot overflow to Inf: s <= FLT_MAX / 7 here */
    return (uint16_t)hi;
}

static inline float bf16_to_float(uint16_t h) { return float_of((uint32_t)h << 16); }

static inline float load(const void *x, int dtype, int64_t i) {
    if (dtype == 0) return ((const float *)x)[i];
    if (dtype == 1) return bf16_to_float(((const uint16_t *)x)[i]);
    return (float)((const _Float16 *)x)[i];
}

static inline void store(void *x, int dtype, int64_t i, float v) {
    if (dtype == 0) {
        ((float *)x)[i] = v;
    } else if (dtype == 1) {  /* round to nearest even (values are finite) */
        uint32_t b = bits_of(v);
        ((uint16_t *)x)[i] = (uint16_t)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
    } else {  /* a scale rounded up may carry the largest value just past float16's range */
        v = v > 65504.0f ? 65504.0f : (v < -65504.0f ? -65504.0f : v);
        ((_Float16 *)x)[i] = (_Float16)v;
    }
}

/* Gather a group into float32 (the quantizers then run on contiguous floats) and return its absolute maximum. */
static inline float gather(const void *x, int dtype, int64_t first, int64_t n, int64_t estride, float *out) {
    float m = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        float v = load(x, dtype, first + i * estride);
        out[i] = v;
        float a = fabsf(v);
        m = a > m ? a : m;
    }
    return m;
}

/* The smallest bf16 scale with scale * qmax >= amax. */
static inline uint16_t scale_for(float amax, float qmax) {
    uint16_t sh = bf16_ceil(amax / qmax);
    while (bf16_to_float(sh) * qmax < amax) sh++;  /* amax / qmax may have rounded down in float32 */
    return sh;
}

/* ---- int8 / int4 ------------------------------------------------------------------------------------------ */

/* One group of n float32 values. bits 8: one int8 code per value. bits 4: codes -7..7 stored +8 (1..15), value 2i
 * in the low nibble of byte i, value 2i+1 in the high nibble (n is even). */
static void quant_int(const float *xg, int64_t n, float amax, int bits, uint8_t *codes, uint16_t *scale) {
    const float qmax = bits == 8 ? 127.0f : 7.0f;
    uint16_t sh = scale_for(amax, qmax);
    memcpy(scale, &sh, 2);
    float s = bf16_to_float(sh);
    /* Divide, not multiply by 1/s: 1/s overflows for a subnormal scale (a group of tiny values). */
    float d = s > 0.0f ? s : 1.0f;
    if (bits == 8) {
        int8_t *q = (int8_t *)codes;
        for (int64_t i = 0; i < n; i++) {
            float v = nearbyintf(xg[i] / d);
            v = v > qmax ? qmax : (v < -qmax ? -qmax : v);
            q[i] = (int8_t)v;
        }
    } else {
        for (int64_t i = 0; i < n; i += 2) {
            float a = nearbyintf(xg[i] / d), b = nearbyintf(xg[i + 1] / d);
            a = a > qmax ? qmax : (a < -qmax ? -qmax : a);
            b = b > qmax ? qmax : (b < -qmax ? -qmax : b);
            codes[i / 2] = (uint8_t)((int)a + 8) | (uint8_t)(((int)b + 8) << 4);
        }
    }
}

static void dequant_int(const uint8_t *codes, const uint16_t *scale, int64_t n, int bits, float *out) {
    uint16_t sh;
    memcpy(&sh, scale, 2);
    float s = bf16_to_float(sh);
    if (bits == 8) {
        const int8_t *q = (const int8_t *)codes;
        for (int64_t i = 0; i < n; i++) out[i] = (float)q[i] * s;
    } else {
        for (int64_t i = 0; i < n; i += 2) {
            out[i] = (float)((int)(codes[i / 2] & 0x0F) - 8) * s;
            out[i + 1] = (float)((int)(codes[i / 2] >> 4) - 8) * s;
        }
    }
}

/* ---- fp8 e4m3fn ------------------------------------------------------------------------------------------- */

/* float32 -> e4m3fn byte, round to nearest even, saturating at 448 (|x| <= 448 after scaling, so saturation only
 * guards rounding). e4m3fn: bias 7, no infinities, 0x7F/0xFF are NaN, largest finite 0x7E = 448. */
static inline uint8_t e4m3_of(float x) {
    uint8_t sign = (uint8_t)((bits_of(x) >> 24) & 0x80);
    float a = fabsf(x);
    if (a >= 464.0f) return sign | 0x7E;
    if (a < 0.015625f) {  /* below 2^-6: subnormal, steps of 2^-9; a code of 8 is 2^-6, the smallest normal */
        return sign | (uint8_t)nearbyintf(a * 512.0f);
    }
    int e = (int)((bits_of(a) >> 23) & 0xFF) - 127;  /* -6 .. 8 */
    float m = nearbyintf((float_of((bits_of(a) & 0x007FFFFFu) | 0x3F800000u) - 1.0f) * 8.0f);  /* 0 .. 8 */
    if (m >= 8.0f) { m = 0.0f; e += 1; }
    if (e > 8 || (e == 8 && m > 6.0f)) return sign | 0x7E;
    return sign | (uint8_t)((e + 7) << 3) | (uint8_t)m;
}

static float E4M3_TABLE[256];
static int e4m3_ready = 0;

static void e4m3_table(void) {
    for (int c = 0; c < 256; c++) {
        int e = (c >> 3) & 0xF, m = c & 7;
        float v = e == 0 ? ldexpf((float)m, -9) : ldexpf(1.0f + (float)m / 8.0f, e - 7);
        if ((c & 0x7F) == 0x7F) v = NAN;
        E4M3_TABLE[c] = (c & 0x80) ? -v : v;
    }
    e4m3_ready = 1;
}

/* Scale = absmax / 448 rounded up to bf16; codes are e4m3fn of x / scale. */
static void quant_fp8(const float *xg, int64_t n, float amax, uint8_t *codes, uint16_t *scale) {
    uint16_t sh = scale_for(amax, 448.0f);
    memcpy(scale, &sh, 2);
    float s = bf16_to_float(sh);
    float d = s > 0.0f ? s : 1.0f;
    for (int64_t i = 0; i < n; i++) codes[i] = e4m3_of(xg[i] / d);
}

static void dequant_fp8(const uint8_t *codes, const uint16_t *scale, int64_t n, float *out) {
    uint16_t sh;
    memcpy(&sh, scale, 2);
    float s = bf16_to_float(sh);
    for (int64_t i = 0; i < n; i++) out[i] = E4M3_TABLE[codes[i]] * s;
}

/* The plain conversion (no scale), for checking e4m3_of against torch's float8_e4m3fn. */
void e4m3_encode(const float *x, int64_t n, uint8_t *out) {
    for (int64_t i = 0; i < n; i++) out[i] = e4m3_of(x[i]);
}

/* ---- whole blocks ----------------------------------------------------------------------------------------- */

#define MAX_GROUP 4096  /* values per group (head_dim or block_tokens): its float32 copy lives on the stack */

/* x: n blocks [2, tokens, kv_heads, head_dim] of `dtype`, back to back (`part_elems` values per part). Block b is
 * written at addrs[b]. Returns 1 + the flat index into x of the first NaN or Inf, having written nothing; -1 for a
 * group larger than MAX_GROUP; 0 when done. */
int64_t compress_blocks(const void *x, int dtype, int64_t n, int64_t part_elems, int kind, const int64_t *geom,
                        const int64_t *addrs) {
    for (int64_t i = 0; i < n * 2 * part_elems; i++)
        if (!(fabsf(load(x, dtype, i)) <= 3.4028235e38f)) return i + 1;  /* NaN fails every comparison */
    if (geom[3] > MAX_GROUP || geom[9] > MAX_GROUP) return -1;
    float buf[MAX_GROUP];
    for (int64_t b = 0; b < n; b++) {
        uint8_t *base = (uint8_t *)(intptr_t)addrs[b];
        for (int p = 0; p < 2; p++) {
            const int64_t *gp = geom + 6 * p;
            int64_t first = (2 * b + p) * part_elems, group = gp[3];
            int64_t code_bytes = kind == 4 ? group / 2 : group;
            for (int64_t g = 0; g < gp[2]; g++) {
                float amax = gather(x, dtype, first + g * gp[4], group, gp[5], buf);
                uint8_t *codes = base + gp[0] + g * code_bytes;
                uint16_t *scale = (uint16_t *)(void *)(base + gp[1]) + g;
                if (kind == 0) quant_fp8(buf, group, amax, codes, scale);
                else quant_int(buf, group, amax, kind, codes, scale);
            }
        }
    }
    return 0;
}

/* The inverse: block b read at addrs[b], written into out (blocks back to back, `dtype`, the layout above). */
int64_t decompress_blocks(const int64_t *addrs, int64_t n, int kind, const int64_t *geom, void *out, int dtype,
                          int64_t part_elems) {
    if (kind == 0 && !e4m3_ready) e4m3_table();  /* idempotent: two threads racing write the same values */
    if (geom[3] > MAX_GROUP || geom[9] > MAX_GROUP) return -1;
    float buf[MAX_GROUP];
    for (int64_t b = 0; b < n; b++) {
        const uint8_t *base = (const uint8_t *)(intptr_t)addrs[b];
        for (int p = 0; p < 2; p++) {
            const int64_t *gp = geom + 6 * p;
            int64_t first = (2 * b + p) * part_elems, group = gp[3];
            int64_t code_bytes = kind == 4 ? group / 2 : group;
            for (int64_t g = 0; g < gp[2]; g++) {
                const uint8_t *codes = base + gp[0] + g * code_bytes;
                const uint16_t *scale = (const uint16_t *)(const void *)(base + gp[1]) + g;
                if (kind == 0) dequant_fp8(codes, scale, group, buf);
                else dequant_int(codes, scale, group, kind, buf);
                int64_t at = first + g * gp[4];
                if (dtype == 0 && gp[5] == 1) memcpy((float *)out + at, buf, (size_t)group * 4);
                else for (int64_t i = 0; i < group; i++) store(out, dtype, at + i * gp[5], buf[i]);
            }
        }
    }
    return 0;
}
