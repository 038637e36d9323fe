/* BLAKE3 and CRC-32C, see blake3_impl.h.
 *
 * BLAKE3 in brief (from the specification): the input is split into 1024-byte
 * chunks of sixteen 64-byte blocks. A chunk's blocks are compressed in turn,
 * starting from the key (the IV in hash mode), with the chunk index as the
 * counter, CHUNK_START on the first block and CHUNK_END on the last. Chunk
 * chaining values are then combined pairwise by PARENT compressions into a
 * binary tree whose left subtrees are always complete; the last compression
 * (the only one for a single chunk) also carries ROOT, and its output is the
 * digest.
 *
 * Every compression here, chunk block or parent, goes through one driver
 * (hash_batch) that runs up to MAX_LANES independent one-chunk inputs side by
 * side: lane l holds input l and the state is transposed, word-major, so one
 * SIMD register holds the same state word of every lane. The SIMD "step"
 * functions compress one block in all lanes at once; the driver decides, per
 * lane and per block, which bytes, block length and flags to feed in, and
 * masks off lanes whose input has already ended. That one mechanism serves the
 * hot path (many short records), the chunks of a long input (consecutive
 * counters) and the parent nodes of its tree (a parent's 64-byte block is two
 * adjacent chaining values).
 */
#include "blake3_impl.h"

#include <string.h>

/* STM_NO_SIMD builds only the portable code; the tests use it to check the
 * fallback of non-x86 machines on x86 too. */
#if defined(__x86_64__) && !defined(STM_NO_SIMD)
#include <immintrin.h>
#define STM_X86 1
#endif

#define BLOCK_LEN 64
#define CHUNK_LEN 1024
#define MAX_LANES 8

/* Chunks hashed per subtree of a long input before its chaining value joins
 * the stack; a power of two, so that every subtree but the last is complete. */
#define SUBTREE_CHUNKS 64
/* A subtree covers 2^16 bytes, so a 64-bit length has fewer than 2^48 of
 * them; the stack holds one entry per set bit of the count of complete
 * subtrees, plus the newest one before it merges: at most 49. */
#define MAX_DEPTH 49

/* stm_blake3_many sorts inputs by block count within windows of this many,
 * so that a batch's lanes mostly end on the same block and few sit idle. */
#define SORT_WINDOW 512

enum {
    CHUNK_START = 1 << 0,
    CHUNK_END = 1 << 1,
    PARENT = 1 << 2,
    ROOT = 1 << 3,
};

static const uint32_t IV[8] = {
    0x6A09E667u, 0xBB67AE85u, 0x3C6EF372u, 0xA54FF53Au,
    0x510E527Fu, 0x9B05688Cu, 0x1F83D9ABu, 0x5BE0CD19u,
};

/* Message word order of each of the 7 rounds: the spec applies the
 * permutation {2,6,3,10,7,0,4,13,1,11,12,5,9,14,15,8} after every round;
 * indexing through this table does the same without moving any data. */
static const uint8_t MSG_SCHEDULE[7][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8},
    {3, 4, 10, 12, 13, 2, 7, 14, 6, 5, 9, 0, 11, 15, 8, 1},
    {10, 7, 12, 9, 14, 3, 13, 15, 4, 0, 11, 2, 5, 8, 1, 6},
    {12, 13, 9, 11, 15, 10, 14, 8, 7, 2, 5, 3, 0, 1, 6, 4},
    {9, 14, 11, 5, 8, 12, 15, 1, 13, 3, 0, 10, 2, 6, 4, 7},
    {11, 15, 5, 0, 1, 9, 8, 6, 14, 10, 2, 12, 3, 4, 7, 13},
};

/* Fed to lanes that have no block left; their result is discarded. */
static const uint8_t ZERO_BLOCK[BLOCK_LEN];

/* One round: G on the four columns, then on the four diagonals. Shared by
 * the scalar and SIMD code, which differ only in G and in the word type. */
#define ROUND(G, v, m, s)                                                                  \
    do {                                                                                   \
        G(v, 0, 4, 8, 12, m[s[0]], m[s[1]]);                                               \
        G(v, 1, 5, 9, 13, m[s[2]], m[s[3]]);                                               \
        G(v, 2, 6, 10, 14, m[s[4]], m[s[5]]);                                              \
        G(v, 3, 7, 11, 15, m[s[6]], m[s[7]]);                                              \
        G(v, 0, 5, 10, 15, m[s[8]], m[s[9]]);                                              \
        G(v, 1, 6, 11, 12, m[s[10]], m[s[11]]);                                            \
        G(v, 2, 7, 8, 13, m[s[12]], m[s[13]]);                                             \
        G(v, 3, 4, 9, 14, m[s[14]], m[s[15]]);                                             \
    } while (0)

static inline uint32_t load32_le(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline void store32_le(uint8_t *p, uint32_t w)
{
    p[0] = (uint8_t)w;
    p[1] = (uint8_t)(w >> 8);
    p[2] = (uint8_t)(w >> 16);
    p[3] = (uint8_t)(w >> 24);
}

static inline size_t blocks_of(size_t len)
{
    /* An empty input is still one (empty) block. */
    return len == 0 ? 1 : (len + BLOCK_LEN - 1) / BLOCK_LEN;
}

/* ------------------------------------------------------------------------ */
/* Lanes: the transposed state shared by the driver and the step functions. */

typedef struct {
    uint32_t h[8][MAX_LANES]; /* chaining value word j of lane l is h[j][l] */
    uint32_t counter_lo[MAX_LANES];
    uint32_t counter_hi[MAX_LANES];
    uint32_t block_len[MAX_LANES];
    uint32_t flags[MAX_LANES];
    uint32_t active[MAX_LANES]; /* all ones: keep this step's result */
    const uint8_t *msg[MAX_LANES]; /* 64 readable bytes per lane */
} lanes_t;

/* Compresses the current block of every lane (h = compress(h, msg, ...))
 * for the lanes marked active, leaving the others untouched. */
typedef void (*step_fn)(lanes_t *s);

typedef struct {
    step_fn step;
    size_t lanes;
} kernel_t;

/* What a batch of inputs is, beyond its bytes. */
typedef struct {
    uint64_t counter;      /* counter of the first input */
    uint64_t counter_step; /* 1 for consecutive chunks of one input, else 0 */
    uint32_t flags;        /* on every block */
    uint32_t flags_start;  /* added on an input's first block */
    uint32_t flags_end;    /* added on an input's last block */
} job_t;

/* ---------------------------------------------------------------- scalar */

static inline uint32_t rotr32(uint32_t w, unsigned c)
{
    return (w >> c) | (w << (32 - c));
}

static inline void g_portable(uint32_t v[16], int a, int b, int c, int d, uint32_t x, uint32_t y)
{
    v[a] = v[a] + v[b] + x;
    v[d] = rotr32(v[d] ^ v[a], 16);
    v[c] = v[c] + v[d];
    v[b] = rotr32(v[b] ^ v[c], 12);
    v[a] = v[a] + v[b] + y;
    v[d] = rotr32(v[d] ^ v[a], 8);
    v[c] = v[c] + v[d];
    v[b] = rotr32(v[b] ^ v[c], 7);
}

/* The lanes one after the other; the fallback where no SIMD path exists and
 * the cheapest way to finish a batch of one or two inputs. */
static void step_portable(lanes_t *s)
{
    for (size_t l = 0; l < MAX_LANES; l++) {
        if (!s->active[l])
            continue;
        uint32_t m[16], v[16];
        for (int i = 0; i < 16; i++)
            m[i] = load32_le(s->msg[l] + 4 * i);
        for (int i = 0; i < 8; i++)
            v[i] = s->h[i][l];
        for (int i = 0; i < 4; i++)
            v[8 + i] = IV[i];
        v[12] = s->counter_lo[l];
        v[13] = s->counter_hi[l];
        v[14] = s->block_len[l];
        v[15] = s->flags[l];
        for (int r = 0; r < 7; r++)
            ROUND(g_portable, v, m, MSG_SCHEDULE[r]);
        for (int i = 0; i < 8; i++)
            s->h[i][l] = v[i] ^ v[i + 8];
    }
}

#ifdef STM_X86
/* ---------------------------------------------------------------- SSE4.1 */
/* Four lanes per 128-bit register. SSSE3's pshufb does the rotations by 16
 * and 8 in one instruction; SSE4.1 adds the blend used for lane masking. */

#define SSE41 __attribute__((target("sse4.1")))

SSE41 static inline __m128i rotr16_sse41(__m128i x)
{
    return _mm_shuffle_epi8(x, _mm_setr_epi8(2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
}

SSE41 static inline __m128i rotr8_sse41(__m128i x)
{
    return _mm_shuffle_epi8(x, _mm_setr_epi8(1, 2, 3, 0, 5, 6, 7, 4, 9, 10, 11, 8, 13, 14, 15, 12));
}

SSE41 static inline __m128i rotr_sse41(__m128i x, int c)
{
    return _mm_or_si128(_mm_srli_epi32(x, c), _mm_slli_epi32(x, 32 - c));
}

SSE41 static inline void g_sse41(__m128i v[16], int a, int b, int c, int d, __m128i x, __m128i y)
{
    v[a] = _mm_add_epi32(_mm_add_epi32(v[a], v[b]), x);
    v[d] = rotr16_sse41(_mm_xor_si128(v[d], v[a]));
    v[c] = _mm_add_epi32(v[c], v[d]);
    v[b] = rotr_sse41(_mm_xor_si128(v[b], v[c]), 12);
    v[a] = _mm_add_epi32(_mm_add_epi32(v[a], v[b]), y);
    v[d] = rotr8_sse41(_mm_xor_si128(v[d], v[a]));
    v[c] = _mm_add_epi32(v[c], v[d]);
    v[b] = rotr_sse41(_mm_xor_si128(v[b], v[c]), 7);
}

/* r[l] holds four consecutive words of lane l; afterwards r[j] holds word j
 * of every lane. */
SSE41 static inline void transpose4_sse41(__m128i r[4])
{
    __m128i t0 = _mm_unpacklo_epi32(r[0], r[1]);
    __m128i t1 = _mm_unpackhi_epi32(r[0], r[1]);
    __m128i t2 = _mm_unpacklo_epi32(r[2], r[3]);
    __m128i t3 = _mm_unpackhi_epi32(r[2], r[3]);
    r[0] = _mm_unpacklo_epi64(t0, t2);
    r[1] = _mm_unpackhi_epi64(t0, t2);
    r[2] = _mm_unpacklo_epi64(t1, t3);
    r[3] = _mm_unpackhi_epi64(t1, t3);
}

SSE41 static void step_sse41(lanes_t *s)
{
    __m128i m[16], v[16];
    for (int q = 0; q < 4; q++) {
        for (int l = 0; l < 4; l++)
            m[4 * q + l] = _mm_loadu_si128((const __m128i *)(s->msg[l] + 16 * q));
        transpose4_sse41(&m[4 * q]);
    }
    for (int i = 0; i < 8; i++)
        v[i] = _mm_loadu_si128((const __m128i *)s->h[i]);
    for (int i = 0; i < 4; i++)
        v[8 + i] = _mm_set1_epi32((int)IV[i]);
    v[12] = _mm_loadu_si128((const __m128i *)s->counter_lo);
    v[13] = _mm_loadu_si128((const __m128i *)s->counter_hi);
    v[14] = _mm_loadu_si128((const __m128i *)s->block_len);
    v[15] = _mm_loadu_si128((const __m128i *)s->flags);
    for (int r = 0; r < 7; r++)
        ROUND(g_sse41, v, m, MSG_SCHEDULE[r]);
    __m128i keep = _mm_loadu_si128((const __m128i *)s->active);
    for (int i = 0; i < 8; i++) {
        __m128i old = _mm_loadu_si128((const __m128i *)s->h[i]);
        __m128i h = _mm_xor_si128(v[i], v[i + 8]);
        _mm_storeu_si128((__m128i *)s->h[i], _mm_blendv_epi8(old, h, keep));
    }
}

/* ------------------------------------------------------------------ AVX2 */
/* Eight lanes per 256-bit register; otherwise the same as SSE4.1. pshufb
 * works within each 128-bit half, hence the repeated shuffle pattern. */

#define AVX2 __attribute__((target("avx2")))

AVX2 static inline __m256i rotr16_avx2(__m256i x)
{
    return _mm256_shuffle_epi8(x, _mm256_setr_epi8(2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12,
                                                   13, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15,
                                                   12, 13));
}

AVX2 static inline __m256i rotr8_avx2(__m256i x)
{
    return _mm256_shuffle_epi8(x, _mm256_setr_epi8(1, 2, 3, 0, 5, 6, 7, 4, 9, 10, 11, 8, 13, 14, 15,
                                                   12, 1, 2, 3, 0, 5, 6, 7, 4, 9, 10, 11, 8, 13, 14,
                                                   15, 12));
}

AVX2 static inline __m256i rotr_avx2(__m256i x, int c)
{
    return _mm256_or_si256(_mm256_srli_epi32(x, c), _mm256_slli_epi32(x, 32 - c));
}

AVX2 static inline void g_avx2(__m256i v[16], int a, int b, int c, int d, __m256i x, __m256i y)
{
    v[a] = _mm256_add_epi32(_mm256_add_epi32(v[a], v[b]), x);
    v[d] = rotr16_avx2(_mm256_xor_si256(v[d], v[a]));
    v[c] = _mm256_add_epi32(v[c], v[d]);
    v[b] = rotr_avx2(_mm256_xor_si256(v[b], v[c]), 12);
    v[a] = _mm256_add_epi32(_mm256_add_epi32(v[a], v[b]), y);
    v[d] = rotr8_avx2(_mm256_xor_si256(v[d], v[a]));
    v[c] = _mm256_add_epi32(v[c], v[d]);
    v[b] = rotr_avx2(_mm256_xor_si256(v[b], v[c]), 7);
}

/* r[l] holds eight consecutive words of lane l; afterwards r[j] holds word j
 * of every lane. 32-bit and 64-bit interleaves transpose the 4x4 blocks
 * within each 128-bit half, then the halves are exchanged. */
AVX2 static inline void transpose8_avx2(__m256i r[8])
{
    __m256i t[8], u[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; i++) {
        u[4 * i + 0] = _mm256_unpacklo_epi64(t[4 * i + 0], t[4 * i + 2]);
        u[4 * i + 1] = _mm256_unpackhi_epi64(t[4 * i + 0], t[4 * i + 2]);
        u[4 * i + 2] = _mm256_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm256_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int j = 0; j < 4; j++) {
        r[j] = _mm256_permute2x128_si256(u[j], u[4 + j], 0x20);
        r[j + 4] = _mm256_permute2x128_si256(u[j], u[4 + j], 0x31);
    }
}

AVX2 static void step_avx2(lanes_t *s)
{
    __m256i m[16], v[16];
    for (int half = 0; half < 2; half++) {
        for (int l = 0; l < 8; l++)
            m[8 * half + l] = _mm256_loadu_si256((const __m256i *)(s->msg[l] + 32 * half));
        transpose8_avx2(&m[8 * half]);
    }
    for (int i = 0; i < 8; i++)
        v[i] = _mm256_loadu_si256((const __m256i *)s->h[i]);
    for (int i = 0; i < 4; i++)
        v[8 + i] = _mm256_set1_epi32((int)IV[i]);
    v[12] = _mm256_loadu_si256((const __m256i *)s->counter_lo);
    v[13] = _mm256_loadu_si256((const __m256i *)s->counter_hi);
    v[14] = _mm256_loadu_si256((const __m256i *)s->block_len);
    v[15] = _mm256_loadu_si256((const __m256i *)s->flags);
    for (int r = 0; r < 7; r++)
        ROUND(g_avx2, v, m, MSG_SCHEDULE[r]);
    __m256i keep = _mm256_loadu_si256((const __m256i *)s->active);
    for (int i = 0; i < 8; i++) {
        __m256i old = _mm256_loadu_si256((const __m256i *)s->h[i]);
        __m256i h = _mm256_xor_si256(v[i], v[i + 8]);
        _mm256_storeu_si256((__m256i *)s->h[i], _mm256_blendv_epi8(old, h, keep));
    }
}
#endif /* STM_X86 */

/* ---------------------------------------------------------------- driver */

/* The usable kernels, widest first. Asked on every call rather than cached:
 * __builtin_cpu_supports only reads what libgcc filled in at load time, and
 * keeping no cache keeps this free of shared mutable state. The portable
 * kernel, always last, runs any number of lanes without waste. */
static size_t available_kernels(kernel_t k[3])
{
    size_t n = 0;
#ifdef STM_X86
    if (__builtin_cpu_supports("avx2"))
        k[n++] = (kernel_t){step_avx2, 8};
    if (__builtin_cpu_supports("sse4.1"))
        k[n++] = (kernel_t){step_sse41, 4};
#endif
    k[n++] = (kernel_t){step_portable, MAX_LANES};
    return n;
}

/* Hashes n <= k->lanes inputs of at most one chunk each, input l in lane l,
 * and writes each one's 32-byte output (chaining value, or the digest when
 * flags_end has ROOT) to out[l]. */
static void hash_batch(const kernel_t *k, const uint8_t *const *in, const size_t *len, size_t n,
                       const job_t *job, uint8_t *const *out)
{
    lanes_t s;
    uint8_t pad[MAX_LANES][BLOCK_LEN];
    size_t nblocks[MAX_LANES];
    size_t steps = 0;

    for (size_t l = 0; l < MAX_LANES; l++) {
        for (int i = 0; i < 8; i++)
            s.h[i][l] = IV[i];
        uint64_t counter = job->counter + l * job->counter_step;
        s.counter_lo[l] = (uint32_t)counter;
        s.counter_hi[l] = (uint32_t)(counter >> 32);
        nblocks[l] = l < n ? blocks_of(len[l]) : 0; /* lanes past n stay idle */
        if (nblocks[l] > steps)
            steps = nblocks[l];
    }

    for (size_t b = 0; b < steps; b++) {
        for (size_t l = 0; l < k->lanes; l++) {
            if (b >= nblocks[l]) {
                s.msg[l] = ZERO_BLOCK;
                s.block_len[l] = 0;
                s.flags[l] = 0;
                s.active[l] = 0;
                continue;
            }
            size_t rest = len[l] - b * BLOCK_LEN;
            if (rest >= BLOCK_LEN) {
                s.msg[l] = in[l] + b * BLOCK_LEN;
                s.block_len[l] = BLOCK_LEN;
            } else {
                /* The last, partial block is zero-padded; copying it also
                 * keeps the SIMD loads inside the caller's buffer. */
                if (rest)
                    memcpy(pad[l], in[l] + b * BLOCK_LEN, rest);
                memset(pad[l] + rest, 0, BLOCK_LEN - rest);
                s.msg[l] = pad[l];
                s.block_len[l] = (uint32_t)rest;
            }
            s.flags[l] = job->flags | (b == 0 ? job->flags_start : 0) |
                         (b + 1 == nblocks[l] ? job->flags_end : 0);
            s.active[l] = UINT32_MAX;
        }
        k->step(&s);
    }

    for (size_t l = 0; l < n; l++)
        for (int i = 0; i < 8; i++)
            store32_le(out[l] + 4 * i, s.h[i][l]);
}

/* hash_batch over any number of inputs: full batches on the widest kernel,
 * then the remainder on the widest kernel it fills more than half of. */
static void hash_inputs(const uint8_t *const *in, const size_t *len, size_t n, const job_t *job,
                        uint8_t *const *out)
{
    kernel_t ks[3];
    size_t nk = available_kernels(ks);
    job_t j = *job;
    for (size_t i = 0; i < nk && n > 0; i++) {
        size_t lanes = ks[i].lanes;
        while (n >= lanes || (n > 0 && (2 * n > lanes || i + 1 == nk))) {
            size_t take = n < lanes ? n : lanes;
            hash_batch(&ks[i], in, len, take, &j, out);
            in += take;
            len += take;
            out += take;
            n -= take;
            j.counter += take * j.counter_step;
        }
    }
}

/* ------------------------------------------------------------------ tree */

static void parent_cv(const uint8_t left[32], const uint8_t right[32], uint32_t flags,
                      uint8_t out[32])
{
    uint8_t block[BLOCK_LEN];
    memcpy(block, left, 32);
    memcpy(block + 32, right, 32);
    const uint8_t *in = block;
    size_t len = BLOCK_LEN;
    job_t job = {0, 0, PARENT | flags, 0, 0};
    hash_inputs(&in, &len, 1, &job, &out);
}

/* Chaining value of the subtree over len > 0 bytes starting at chunk number
 * first_chunk, or the digest of the whole input when root is set (then the
 * subtree is the whole input and has at least two chunks). Builds the tree
 * bottom-up: pairing neighbours level by level, an odd last node moving up
 * unchanged, yields exactly the spec's tree with complete left subtrees. */
static void subtree_cv(const uint8_t *data, size_t len, uint64_t first_chunk, int root,
                       uint8_t out[32])
{
    uint8_t cvs[2][SUBTREE_CHUNKS][32];
    const uint8_t *in[SUBTREE_CHUNKS];
    size_t lens[SUBTREE_CHUNKS];
    uint8_t *outs[SUBTREE_CHUNKS];

    size_t count = 0;
    do {
        size_t off = count * CHUNK_LEN;
        in[count] = data + off;
        lens[count] = len - off < CHUNK_LEN ? len - off : CHUNK_LEN;
        outs[count] = cvs[0][count];
    } while (++count * CHUNK_LEN < len);
    job_t chunks = {first_chunk, 1, 0, CHUNK_START, CHUNK_END};
    hash_inputs(in, lens, count, &chunks, outs);

    int cur = 0;
    while (count > 1) {
        size_t pairs = count / 2;
        for (size_t i = 0; i < pairs; i++) {
            in[i] = cvs[cur][2 * i]; /* left and right CV are adjacent: one block */
            lens[i] = BLOCK_LEN;
            outs[i] = cvs[1 - cur][i];
        }
        job_t parents = {0, 0, PARENT | (root && count == 2 ? ROOT : 0), 0, 0};
        hash_inputs(in, lens, pairs, &parents, outs);
        if (count % 2)
            memcpy(cvs[1 - cur][pairs], cvs[cur][count - 1], 32);
        count = pairs + count % 2;
        cur = 1 - cur;
    }
    memcpy(out, cvs[cur][0], 32);
}

void stm_blake3(const uint8_t *data, size_t len, uint8_t out[32])
{
    if (len <= CHUNK_LEN) {
        job_t job = {0, 0, 0, CHUNK_START, CHUNK_END | ROOT};
        hash_inputs(&data, &len, 1, &job, &out);
        return;
    }

    /* Long input: complete subtrees of SUBTREE_CHUNKS chunks are merged on a
     * stack the way binary counting carries (after subtree t, as many merges
     * as t+1 has trailing zero bits); the last subtree, possibly partial, is
     * then folded into everything left on the stack, the final merge being
     * the root. */
    const size_t subtree_len = (size_t)SUBTREE_CHUNKS * CHUNK_LEN;
    uint8_t stack[MAX_DEPTH][32];
    size_t depth = 0;
    uint64_t t = 0;
    while (len > subtree_len) {
        subtree_cv(data, subtree_len, t * SUBTREE_CHUNKS, 0, stack[depth++]);
        for (uint64_t done = ++t; done % 2 == 0; done /= 2) {
            parent_cv(stack[depth - 2], stack[depth - 1], 0, stack[depth - 2]);
            depth--;
        }
        data += subtree_len;
        len -= subtree_len;
    }
    if (depth == 0) {
        subtree_cv(data, len, 0, 1, out);
        return;
    }
    uint8_t cv[32];
    subtree_cv(data, len, t * SUBTREE_CHUNKS, 0, cv);
    while (depth > 0) {
        parent_cv(stack[depth - 1], cv, depth == 1 ? ROOT : 0, cv);
        depth--;
    }
    memcpy(out, cv, 32);
}

void stm_blake3_many(const uint8_t *const *inputs, const size_t *lens, size_t n, uint8_t *out)
{
    static const job_t job = {0, 0, 0, CHUNK_START, CHUNK_END | ROOT};
    const uint8_t *in[SORT_WINDOW];
    size_t len[SORT_WINDOW];
    uint8_t *outs[SORT_WINDOW];

    for (size_t base = 0; base < n; base += SORT_WINDOW) {
        size_t w = n - base < SORT_WINDOW ? n - base : SORT_WINDOW;

        /* Counting sort of the window's one-chunk inputs by block count
         * (1..16); longer inputs are hashed on their own. */
        size_t start[CHUNK_LEN / BLOCK_LEN + 2] = {0};
        for (size_t i = base; i < base + w; i++) {
            if (lens[i] > CHUNK_LEN)
                stm_blake3(inputs[i], lens[i], out + 32 * i);
            else
                start[blocks_of(lens[i]) + 1]++;
        }
        for (size_t b = 1; b < CHUNK_LEN / BLOCK_LEN + 2; b++)
            start[b] += start[b - 1];
        size_t m = start[CHUNK_LEN / BLOCK_LEN + 1];
        for (size_t i = base; i < base + w; i++) {
            if (lens[i] > CHUNK_LEN)
                continue;
            size_t pos = start[blocks_of(lens[i])]++;
            in[pos] = inputs[i];
            len[pos] = lens[i];
            outs[pos] = out + 32 * i;
        }
        hash_inputs(in, len, m, &job, outs);
    }
}

/* ---------------------------------------------------------------- CRC-32C */

#define CRC32C_POLY 0x82F63B78u /* Castagnoli polynomial, bit-reversed */

/* Slicing-by-8 tables: crc_table[k][b] is the CRC of byte b followed by k
 * zero bytes. Filled once while the library loads, before any caller can
 * run, so readers never race the writer. */
static uint32_t crc_table[8][256];

__attribute__((constructor)) static void crc32c_init_tables(void)
{
    for (uint32_t b = 0; b < 256; b++) {
        uint32_t c = b;
        for (int i = 0; i < 8; i++)
            c = (c >> 1) ^ (CRC32C_POLY & (0u - (c & 1)));
        crc_table[0][b] = c;
    }
    for (int k = 1; k < 8; k++)
        for (uint32_t b = 0; b < 256; b++)
            crc_table[k][b] = (crc_table[k - 1][b] >> 8) ^ crc_table[0][crc_table[k - 1][b] & 0xFF];
}

/* Both paths work on the raw (pre-inverted) register; stm_crc32c does the
 * inversions, which is what makes results chain. */
static uint32_t crc32c_portable(uint32_t crc, const uint8_t *p, size_t len)
{
    for (; len >= 8; p += 8, len -= 8) {
        uint32_t lo = crc ^ load32_le(p);
        uint32_t hi = load32_le(p + 4);
        crc = crc_table[7][lo & 0xFF] ^ crc_table[6][(lo >> 8) & 0xFF] ^
              crc_table[5][(lo >> 16) & 0xFF] ^ crc_table[4][lo >> 24] ^
              crc_table[3][hi & 0xFF] ^ crc_table[2][(hi >> 8) & 0xFF] ^
              crc_table[1][(hi >> 16) & 0xFF] ^ crc_table[0][hi >> 24];
    }
    for (; len > 0; p++, len--)
        crc = (crc >> 8) ^ crc_table[0][(crc ^ *p) & 0xFF];
    return crc;
}

#ifdef STM_X86
/* The SSE4.2 crc32 instruction implements exactly this polynomial. */
__attribute__((target("sse4.2"))) static uint32_t crc32c_sse42(uint32_t crc, const uint8_t *p,
                                                              size_t len)
{
    uint64_t c = crc;
    for (; len >= 8; p += 8, len -= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c = _mm_crc32_u64(c, w);
    }
    crc = (uint32_t)c;
    for (; len > 0; p++, len--)
        crc = _mm_crc32_u8(crc, *p);
    return crc;
}
#endif

uint32_t stm_crc32c(uint32_t crc, const uint8_t *data, size_t len)
{
#ifdef STM_X86
    if (__builtin_cpu_supports("sse4.2"))
        return ~crc32c_sse42(~crc, data, len);
#endif
    return ~crc32c_portable(~crc, data, len);
}
