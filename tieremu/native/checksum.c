/* The block transport's end-to-end checksum: CRC-32C (Castagnoli, the iSCSI / SCTP / ext4 polynomial), with the
 * SSE4.2 crc32 instruction, 8 bytes per step: ~8 GB/s here against zlib's software CRC-32 at ~3.4 GB/s, which at
 * 10 Gb/s (1.25 GB/s) was a third of a pull's CPU on each end. */
#include <stdint.h>
#include <string.h>
#include <nmmintrin.h>

/* The CRC-32C of p[0..n) continued from `crc` (0 to start; the result of the previous piece to extend it). */
uint32_t crc32c_update(uint32_t crc, const uint8_t *p, uint64_t n) {
    uint64_t c = ~crc;
    while (n && ((uintptr_t)p & 7)) {
        c = _mm_crc32_u8((uint32_t)c, *p++);
        n--;
    }
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c = _mm_crc32_u64(c, w);
        p += 8;
        n -= 8;
    }
    while (n) {
        c = _mm_crc32_u8((uint32_t)c, *p++);
        n--;
    }
    return ~(uint32_t)c;
}
