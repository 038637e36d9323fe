/* Native BLAKE3 (hash mode, 32-byte output) and CRC-32C for the storage core.
 *
 * Written from the BLAKE3 specification; checked against the reference
 * implementation by tests/test_hash.py. Every function is reentrant: all
 * working state is on the stack and nothing global changes after the library
 * is loaded, so any thread may call them without the GIL. CPU features are detected at run time, so the code
 * is built for baseline x86-64 and still uses SSE4.1/AVX2/SSE4.2 when present.
 */
#ifndef STEMEDB_BLAKE3_IMPL_H
#define STEMEDB_BLAKE3_IMPL_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* BLAKE3 of data[0:len] (default hash mode), any length. */
void stm_blake3(const uint8_t *data, size_t len, uint8_t out[32]);

/* BLAKE3 of n independent inputs; the digest of inputs[i][0:lens[i]] goes to
 * out[32*i : 32*i+32]. Inputs of at most one chunk (1024 bytes) are hashed
 * several at a time in SIMD lanes; longer ones go through stm_blake3. */
void stm_blake3_many(const uint8_t *const *inputs, const size_t *lens, size_t n, uint8_t *out);

/* CRC-32C (Castagnoli, reflected, init and final XOR 0xFFFFFFFF). Pass crc=0
 * to start; pass a previous result to continue over the following bytes. */
uint32_t stm_crc32c(uint32_t crc, const uint8_t *data, size_t len);

#ifdef __cplusplus
}
#endif

#endif /* STEMEDB_BLAKE3_IMPL_H */
