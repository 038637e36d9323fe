# Native hashing primitives (blake3_impl.h), for other Cython modules:
#
#     from stemedb._hash cimport stm_blake3, stm_blake3_many, stm_crc32c
#
# A module that cimports these must also compile ext/stemedb/blake3_impl.c
# (setup.py does so); the functions are reentrant and need no GIL.

from libc.stdint cimport uint8_t, uint32_t


cdef extern from "blake3_impl.h" nogil:
    # BLAKE3 (hash mode) of data[0:len] into out[0:32].
    void stm_blake3(const uint8_t *data, size_t len, uint8_t *out)
    # out[32*i : 32*i+32] = BLAKE3 of inputs[i][0:lens[i]], for i < n.
    void stm_blake3_many(const uint8_t * const *inputs, const size_t *lens, size_t n, uint8_t *out)
    # CRC-32C; crc=0 to start, a previous result to continue.
    uint32_t stm_crc32c(uint32_t crc, const uint8_t *data, size_t len)
