/* KV block compression kernels: int8 and int4 (two per byte) with one scale per group, and fp8 (e4m3fn) with one
 * scale per group. Compiled on first use by tieremu/native/build.py, called from tieremu/kv/compress.py.
 *
 * Input is float32, laid out as n_groups contiguous groups of `group` elements (the caller transposes first when a
 * group is not contiguous, as KIVI's per-channel keys). Every quantizer is symmetric: the scale is the group's
 * absolute maximum over the largest code (127, 7, 448), rounded UP to bfloat16 so that it is stored in two bytes
 * and no scaled value leaves the code range. Scales are stored as bfloat16 bit patterns (uint16).
 *
 * Each quantizer first scans for NaN and Inf and returns the index of the first one (+1) without writing a
 * code for that group: the caller refuses the block. 0 means done. */
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

/* Scan one group; returns 1 + index of the first non-finite element, or 0 with *amax set. */
static inline int64_t group_absmax(const float *x, int64_t n, float *amax) {
    float m = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        float a = fabsf(x[i]);
        if (!(a <= 3.4028235e38f)) return i + 1;  /* NaN fails every comparison; Inf is above FLT_MAX */
        m = a > m ? a : m;
    }
    *amax = m;
    return 0;
}

/* ---- int8 / int4 ------------------------------------------------------------------------------------------ */

/* bits 8: one int8 code per element. bits 4: codes -7..7 stored +8 (1..15), element 2i in the low nibble of byte i,
 * element 2i+1 in the high nibble; `group` must then be even. Returns 0, or 1 + the flat index of a non-finite. */
int64_t quant_int(const float *x, int64_t n_groups, int64_t group, int bits, uint8_t *codes, uint16_t *scales) {
    const float qmax = bits == 8 ? 127.0f : 7.0f;
    for (int64_t g = 0; g < n_groups; g++) {
        const float *xg = x + g * group;
        float amax;
        int64_t bad = group_absmax(xg, group, &amax);
        if (bad) return g * group + bad;
        uint16_t sh = bf16_ceil(amax / qmax);
        /* amax/qmax may round down in float32; make sure the stored scale times qmax covers amax. */
        while (bf16_to_float(sh) * qmax < amax) sh++;
        scales[g] = sh;
        float s = bf16_to_float(sh);
        /* Divide, not multiply by 1/s: 1/s overflows for a subnormal scale (a group of tiny values). */
        float d = s > 0.0f ? s : 1.0f;
        if (bits == 8) {
            int8_t *q = (int8_t *)codes + g * group;
            for (int64_t i = 0; i < group; i++) {
                float v = nearbyintf(xg[i] / d);
                v = v > qmax ? qmax : (v < -qmax ? -qmax : v);
                q[i] = (int8_t)v;
            }
        } else {
            uint8_t *q = codes + g * (group / 2);
            for (int64_t i = 0; i < group; i += 2) {
                float a = nearbyintf(xg[i] / d), b = nearbyintf(xg[i + 1] / d);
                a = a > qmax ? qmax : (a < -qmax ? -qmax : a);
                b = b > qmax ? qmax : (b < -qmax ? -qmax : b);
                q[i / 2] = (uint8_t)((int)a + 8) | (uint8_t)(((int)b + 8) << 4);
            }
        }
    }
    return 0;
}

void dequant_int(const uint8_t *codes, const uint16_t *scales, int64_t n_groups, int64_t group, int bits,
                 float *out) {
    for (int64_t g = 0; g < n_groups; g++) {
        float s = bf16_to_float(scales[g]);
        float *o = out + g * group;
        if (bits == 8) {
            const int8_t *q = (const int8_t *)codes + g * group;
            for (int64_t i = 0; i < group; i++) o[i] = (float)q[i] * s;
        } else {
            const uint8_t *q = codes + g * (group / 2);
            for (int64_t i = 0; i < group; i += 2) {
                o[i] = (float)((int)(q[i / 2] & 0x0F) - 8) * s;
                o[i + 1] = (float)((int)(q[i / 2] >> 4) - 8) * s;
            }
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

/* Scale per group = absmax / 448 rounded up to bf16; codes are e4m3fn of x / scale. */
int64_t quant_fp8(const float *x, int64_t n_groups, int64_t group, uint8_t *codes, uint16_t *scales) {
    for (int64_t g = 0; g < n_groups; g++) {
        const float *xg = x + g * group;
        float amax;
        int64_t bad = group_absmax(xg, group, &amax);
        if (bad) return g * group + bad;
        uint16_t sh = bf16_ceil(amax / 448.0f);
        while (bf16_to_float(sh) * 448.0f < amax) sh++;
        scales[g] = sh;
        float s = bf16_to_float(sh);
        float d = s > 0.0f ? s : 1.0f;
        uint8_t *q = codes + g * group;
        for (int64_t i = 0; i < group; i++) q[i] = e4m3_of(xg[i] / d);
    }
    return 0;
}

/* The plain conversion (no scale), for checking e4m3_of against torch's float8_e4m3fn. */
void e4m3_encode(const float *x, int64_t n, uint8_t *out) {
    for (int64_t i = 0; i < n; i++) out[i] = e4m3_of(x[i]);
}

void dequant_fp8(const uint8_t *codes, const uint16_t *scales, int64_t n_groups, int64_t group, float *out) {
    if (!e4m3_ready) e4m3_table();  /* idempotent: two threads racing write the same values */
    for (int64_t g = 0; g < n_groups; g++) {
        float s = bf16_to_float(scales[g]);
        const uint8_t *q = codes + g * group;
        float *o = out + g * group;
        for (int64_t i = 0; i < group; i++) o[i] = E4M3_TABLE[q[i]] * s;
    }
}
