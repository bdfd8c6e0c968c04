/* moelite's CPU kernels for reading weights at memory speed: matrix-vector products over 16- or 32-bit weights
   with float32 activations, for a few rows at once, and SwiGLU experts over (token, expert) pairs in one call.

   Built at first use by moelite/core/native.py with the system C compiler (-O3 -mavx2 -mfma -mf16c -fopenmp) and
   loaded with ctypes; used only on CPUs with AVX2, FMA and F16C. Each weight is read once per call whatever the
   number of rows (at most MAX_ROWS), converted to float32 in registers, and multiplied with float32 activations:
   the result equals a float32 product over the same weights, up to summation order.

   Weight-only quantized weights (compressed-tensors' pack-quantized layout, symmetric, per-group scales) take
   another route: the activations are quantized to int8 in blocks of 32 (one float scale per block, as llama.cpp's
   Q8 activations), the weights stay packed in memory, and each block of 32 is an integer dot product (AVX2
   maddubs) scaled by weight scale x activation scale. 8-bit: byte = q + 128. 4-bit: byte b of a row holds
   elements 2b (low nibble) and 2b+1 (high nibble), each q + 8; the activations of a 4-bit row are stored with each
   block's even elements first, then its odd ones, to match the nibbles' order (the AVX-512 build groups four
   blocks: see QGROUP4).

   Shape legend: O output features, I input features, N rows (tokens), H hidden, E expert intermediate, P pairs.
   Weight dtypes: 0 float32, 1 bfloat16, 2 float16, 8 int8 (packed), 4 int4 (packed). Row pointers: `x[n]` is row n of the input, `y[n]` row n of the
   output. Threads: OpenMP, `threads` given by the caller (torch.get_num_threads()), split over output features. */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_ROWS 8

/* Built twice by native.py: with AVX2 only, and (on CPUs that have them) with AVX-512 F/BW/VL, AVX-512 BF16 and
   AVX-512 VNNI. The second build multiplies bf16 weights with bf16-rounded activations (vdpbf16ps, float32
   accumulation: the numerics of llama.cpp's and transformers' bf16 products) and quantized blocks with vpdpbusd. */
#if defined(__AVX512BF16__) && defined(__AVX512VL__) && defined(__AVX512BW__)
#define BF16DOT 1
#else
#define BF16DOT 0
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define VNNI 1
#else
#define VNNI 0
#endif

enum { F32 = 0, BF16 = 1, F16 = 2, Q4 = 4, Q8 = 8 }; /* Q4, Q8: the value is the bits (quant_blocks takes it as such) */
#define QBLOCK 32
/* Quantized rows: software prefetch this many bytes ahead of each row's reads. Their integer work per byte leaves
   too few loads in flight for the hardware prefetcher alone: on a Zen 4 core, one thread over 8 int8 experts of
   Qwen3-30B-A3B shape read 13-16 GB/s at 1 KiB ahead and 24-27 GB/s at 8 KiB (about the next block of rows);
   16-bit rows gained nothing from it and take none. */
#ifndef PREFETCH
#define PREFETCH 8192
#endif

static inline __m256 load8(const void *w, int64_t i, int dt) {
    switch (dt) {
    case BF16: {
        __m128i v = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + i));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
    }
    case F16: return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + i)));
    default: return _mm256_loadu_ps((const float *)w + i);
    }
}

static inline float load1(const void *w, int64_t i, int dt) {
    switch (dt) {
    case BF16: {
        uint32_t b = (uint32_t)((const uint16_t *)w)[i] << 16;
        float f;
        memcpy(&f, &b, 4);
        return f;
    }
    case F16: return _cvtsh_ss(((const uint16_t *)w)[i]);
    default: return ((const float *)w)[i];
    }
}

static inline float hsum(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

static inline size_t esize(int dt) { return dt == F32 ? 4 : 2; }

/* R weight rows (o .. o+R-1) against N input rows: acc[r][n]. R * N <= 8 accumulators, plus a second set of
   accumulators for N == 1 (one row alone would be a single dependency chain). The caller passes constants for R
   and N, so the compiler unrolls both loops and keeps the accumulators in registers. */
static inline __attribute__((always_inline)) void block(const char *w0, int64_t ldw_bytes, int dt, int64_t I,
                                                        const float *const *x, int R, int N, float *res) {
    __m256 acc[8], acc2[8];
    for (int k = 0; k < 8; k++) acc[k] = acc2[k] = _mm256_setzero_ps();
    int64_t i = 0;
    if (N == 1) {
        for (; i + 16 <= I; i += 16) {
            __m256 x0 = _mm256_loadu_ps(x[0] + i), x1 = _mm256_loadu_ps(x[0] + i + 8);
            for (int r = 0; r < R; r++) {
                acc[r] = _mm256_fmadd_ps(load8(w0 + r * ldw_bytes, i, dt), x0, acc[r]);
                acc2[r] = _mm256_fmadd_ps(load8(w0 + r * ldw_bytes, i + 8, dt), x1, acc2[r]);
            }
        }
    }
    for (; i + 8 <= I; i += 8) {
        for (int r = 0; r < R; r++) {
            __m256 wv = load8(w0 + r * ldw_bytes, i, dt);
            for (int n = 0; n < N; n++) acc[r * N + n] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x[n] + i), acc[r * N + n]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int n = 0; n < N; n++) {
            float s = hsum(_mm256_add_ps(acc[r * N + n], acc2[r * N + n]));
            for (int64_t j = i; j < I; j++) s += load1(w0 + r * ldw_bytes, j, dt) * x[n][j];
            res[r * N + n] = s;
        }
}

static inline void store(float *const *y, const float *alpha, int64_t o, const float *res, int N) {
    for (int n = 0; n < N; n++) {
        if (alpha) y[n][o] += alpha[n] * res[n];
        else y[n][o] = res[n];
    }
}

/* Weight rows per block for N input rows: enough independent accumulators, at most 8 of them. */
static inline int rows_for(int N) { return N <= 2 ? 4 : N <= 4 ? 2 : 1; }

static inline float bf16_to_f32(uint16_t v) {
    uint32_t b = (uint32_t)v << 16;
    float f;
    memcpy(&f, &b, 4);
    return f;
}

/* A row of activations rounded to bf16 (round to nearest even), for the bf16 dot-product kernel. */
static void to_bf16(const float *x, int64_t I, uint16_t *xb) {
    int64_t i = 0;
#if BF16DOT
    for (; i + 32 <= I; i += 32)
        _mm512_storeu_si512((__m512i *)(xb + i),
                            (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(x + i)));
#endif
    for (; i < I; i++) {
        uint32_t b;
        memcpy(&b, x + i, 4);
        b += 0x7FFF + ((b >> 16) & 1);
        xb[i] = (uint16_t)(b >> 16);
    }
}

#if BF16DOT
/* `block` for bf16 weights against bf16 activation rows xb: vdpbf16ps, 32 weights per instruction. */
static inline __attribute__((always_inline)) void block_bf(const char *w0, int64_t ldw_bytes, int64_t I,
                                                           const uint16_t *const *xb, int R, int N, float *res) {
    __m512 acc[8], acc2[8];
    for (int k = 0; k < 8; k++) acc[k] = acc2[k] = _mm512_setzero_ps();
    int64_t i = 0;
    if (N == 1) {
        for (; i + 64 <= I; i += 64) {
            __m512bh x0 = (__m512bh)_mm512_loadu_si512(xb[0] + i), x1 = (__m512bh)_mm512_loadu_si512(xb[0] + i + 32);
            for (int r = 0; r < R; r++) {
                const uint16_t *wr = (const uint16_t *)(w0 + r * ldw_bytes) + i;
                acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_loadu_si512(wr), x0);
                acc2[r] = _mm512_dpbf16_ps(acc2[r], (__m512bh)_mm512_loadu_si512(wr + 32), x1);
            }
        }
    }
    for (; i + 32 <= I; i += 32) {
        for (int r = 0; r < R; r++) {
            __m512bh wv = (__m512bh)_mm512_loadu_si512((const uint16_t *)(w0 + r * ldw_bytes) + i);
            for (int n = 0; n < N; n++)
                acc[r * N + n] = _mm512_dpbf16_ps(acc[r * N + n], wv, (__m512bh)_mm512_loadu_si512(xb[n] + i));
        }
    }
    for (int r = 0; r < R; r++)
        for (int n = 0; n < N; n++) {
            float s = _mm512_reduce_add_ps(_mm512_add_ps(acc[r * N + n], acc2[r * N + n]));
            const uint16_t *wr = (const uint16_t *)(w0 + r * ldw_bytes);
            for (int64_t j = i; j < I; j++) s += bf16_to_f32(wr[j]) * bf16_to_f32(xb[n][j]);
            res[r * N + n] = s;
        }
}
#define BLOCK(W, LD, DT, I, X, XB, R, N, RES)                                                                   \
    do {                                                                                                         \
        if ((DT) == BF16 && (XB)) block_bf(W, LD, I, XB, R, N, RES);                                             \
        else block(W, LD, DT, I, X, R, N, RES);                                                                  \
    } while (0)
#else
#define BLOCK(W, LD, DT, I, X, XB, R, N, RES) block(W, LD, DT, I, X, R, N, RES)
#endif

/* Rows [o, o + rows_for(N)) of w (clipped at O) against N input rows, stored through `store`. */
#define CASE(NN)                                                                                                 \
    case NN:                                                                                                     \
        if (o + rows_for(NN) <= O) {                                                                             \
            if (NN == 1)                                                                                         \
                for (int r = 0; r < rows_for(NN); r++)                                                           \
                    BLOCK(w + (o + r) * ldw_b, ldw_b, dt, I, x, xb, 1, 1, res + r);                              \
            else BLOCK(w + o * ldw_b, ldw_b, dt, I, x, xb, rows_for(NN), NN, res);                               \
            for (int r = 0; r < rows_for(NN); r++) store(y, alpha, o + r, res + r * NN, NN);                     \
        } else                                                                                                   \
            for (; o < O; o++) {                                                                                 \
                BLOCK(w + o * ldw_b, ldw_b, dt, I, x, xb, 1, NN, res);                                          \
                store(y, alpha, o, res, NN);                                                                     \
            }                                                                                                    \
        break;

/* xb: the rows of x rounded to bf16 (NULL: not used); bf16 weights use them where this build has BF16DOT. */
static void row_block(const char *w, int dt, int64_t o, int64_t O, int64_t I, int64_t ldw_b, const float *const *x,
                      const uint16_t *const *xb, int N, float *const *y, const float *alpha) {
    float res[8];
    (void)xb;
    switch (N) { CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8) }
}

/* Whether bf16 weights of this build take bf16 activations (1: the AVX-512 BF16 build). */
int ml_bf16_dot(void) { return BF16DOT; }

/* y[n] = w @ x[n] (alpha NULL) or y[n] += alpha[n] * (w @ x[n]); w [O, I] with row stride ldw (elements),
   N <= MAX_ROWS. */
void ml_gemv(const void *w, int dt, int64_t O, int64_t I, int64_t ldw, const float *const *x, int N,
             float *const *y, const float *alpha, int threads) {
    if (N < 1 || N > MAX_ROWS) return;
    int64_t R = rows_for(N), blocks = (O + R - 1) / R, ldw_b = ldw * (int64_t)esize(dt);
    uint16_t *xb[MAX_ROWS], *buf = NULL;
    int use_bf = BF16DOT && dt == BF16;
    if (use_bf) {
        buf = malloc(sizeof(uint16_t) * N * I);
        if (!buf) return;
        for (int n = 0; n < N; n++) to_bf16(x[n], I, xb[n] = buf + n * I);
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++)
        row_block((const char *)w, dt, b * R, O, I, ldw_b, x, use_bf ? (const uint16_t *const *)xb : NULL, N, y,
                  alpha);
    free(buf);
}

/* ---- quantized weights ------------------------------------------------------------------------------------------- */

/* A weight matrix: rows of `w` (ldw bytes apart), dtype dt; quantized: scales [O, I/G] in sdt, lds bytes per row. */
typedef struct {
    const char *w;
    int64_t ldw;
    int dt;
    const char *s;
    int64_t lds;
    int sdt;
    int64_t G;
} wmat_t;

static inline int is_quant(int dt) { return dt == Q4 || dt == Q8; }

/* The 512-bit VNNI build reads 4-bit weights four blocks (64 packed bytes) per step: its activations of a 4-bit
   row are stored in groups of four blocks, the group's four blocks' even elements (16 each), then their odd ones,
   so that the low nibbles of one 64-byte load line up with the first 64 bytes and the high nibbles with the next
   64; a row's last nb % 4 blocks are stored one by one (evens, then odds). */
#if VNNI && defined(__AVX512F__) && defined(__AVX512BW__)
#define QGROUP4 1
#else
#define QGROUP4 0
#endif

/* One row of activations quantized: q[i] int8 in blocks of 32 (4-bit weights: each block's even elements, then its
   odd ones); per block two floats: s[2b] the block's scale d (max |x| / 127) and s[2b + 1] = d * bias * sum(q),
   bias = the offset of the stored weights (128 for 8-bit, 8 for 4-bit), which the VNNI kernel takes off once per
   block instead of re-signing every byte. */
static void quant_blocks(const float *x, int64_t b0, int64_t b1, int64_t nb, int bits, int8_t *q, float *s) {
#if QGROUP4
    const int64_t nb4 = nb - nb % 4; /* blocks in whole groups of four */
#else
    (void)nb;
#endif
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    /* per 128-bit lane: its even bytes, then its odd ones */
    const __m256i evens_odds = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                                0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    for (int64_t b = b0; b < b1; b++) {
        const float *xb = x + b * QBLOCK;
        __m256 v[4];
        for (int k = 0; k < 4; k++) v[k] = _mm256_loadu_ps(xb + 8 * k);
        __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                 _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        float amax = _mm_cvtss_f32(h);
        float d = amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
        const __m256 idv = _mm256_set1_ps(id);
        __m256i qi[4]; /* round to nearest even, as lrintf in the default rounding mode */
        for (int k = 0; k < 4; k++) qi[k] = _mm256_cvtps_epi32(_mm256_mul_ps(v[k], idv));
        __m256i sum = _mm256_add_epi32(_mm256_add_epi32(qi[0], qi[1]), _mm256_add_epi32(qi[2], qi[3]));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
        /* 32 int32 -> 32 int8 in element order (the packs interleave 128-bit lanes; the permute undoes it) */
        __m256i q8 = _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]), _mm256_packs_epi32(qi[2], qi[3]));
        q8 = _mm256_permutevar8x32_epi32(q8, order);
        if (bits == 4) /* each block's even elements, then its odd ones */
            q8 = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(q8, evens_odds), 0xD8);
#if QGROUP4
        if (bits == 4 && b < nb4) { /* in a group of four: the group's evens (64 bytes), then its odds */
            int8_t *g = q + (b / 4) * 128 + (b % 4) * 16;
            _mm_storeu_si128((__m128i *)g, _mm256_castsi256_si128(q8));
            _mm_storeu_si128((__m128i *)(g + 64), _mm256_extracti128_si256(q8, 1));
        } else
#endif
            _mm256_storeu_si256((__m256i *)(q + b * QBLOCK), q8);
        s[2 * b] = d;
        s[2 * b + 1] = d * (float)(bits == 4 ? 8 : 128) * (float)_mm_cvtsi128_si32(s4);
    }
}

static void quant_row(const float *x, int64_t I, int bits, int8_t *q, float *s) {
    quant_blocks(x, 0, I / QBLOCK, I / QBLOCK, bits, q, s);
}

#if VNNI
/* 32 weights of row `wr` from element i as stored (unsigned: q + 128, or q + 8 for 4-bit). */
static inline __m256i qload_u(const uint8_t *wr, int64_t i, int dt) {
    if (dt == Q8) return _mm256_loadu_si256((const __m256i *)(wr + i));
    __m128i v = _mm_loadu_si128((const __m128i *)(wr + i / 2)), m = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m));
}
#else
/* 32 signed weights of row `wr` starting at element i. */
static inline __m256i qload(const uint8_t *wr, int64_t i, int dt) {
    if (dt == Q8) return _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(wr + i)), _mm256_set1_epi8((char)0x80));
    __m128i v = _mm_loadu_si128((const __m128i *)(wr + i / 2)), m = _mm_set1_epi8(0x0F);
    __m128i lo = _mm_and_si128(v, m), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m);
    return _mm256_sub_epi8(_mm256_set_m128i(hi, lo), _mm256_set1_epi8(8));
}
#endif

/* R quantized weight rows (o .. o+R-1) against N quantized activation rows: res[r * N + n]. VNNI: one vpdpbusd of
   the stored (unsigned) bytes and the int8 activations per block, less the block's bias term; AVX2: the bytes are
   re-signed and multiplied with maddubs + madd. */
static inline __attribute__((always_inline)) void qblock(const wmat_t *m, int64_t o, int64_t i0, int64_t I,
                                                         int8_t *const *xq, float *const *xs, int R, int N,
                                                         float *res) {
    __m256 acc[8];
    float corr[8] = {0};
    for (int k = 0; k < 8; k++) acc[k] = _mm256_setzero_ps();
#if !VNNI
    const __m256i ones = _mm256_set1_epi16(1);
#endif
    for (int64_t i = i0; i < I; i += QBLOCK) {
        int64_t b = i / QBLOCK;
        for (int r = 0; r < R; r++) {
            const uint8_t *wr = (const uint8_t *)m->w + (o + r) * m->ldw;
            _mm_prefetch((const char *)wr + i * m->dt / 8 + PREFETCH, _MM_HINT_T0);
            float ws = load1(m->s + (o + r) * m->lds, i / m->G, m->sdt);
#if VNNI
            __m256i u = qload_u(wr, i, m->dt);
            for (int n = 0; n < N; n++) {
                __m256i d = _mm256_dpbusd_epi32(_mm256_setzero_si256(), u,
                                                _mm256_loadu_si256((const __m256i *)(xq[n] + i)));
                acc[r * N + n] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(ws * xs[n][2 * b]),
                                                 acc[r * N + n]);
                corr[r * N + n] += ws * xs[n][2 * b + 1];
            }
#else
            __m256i q = qload(wr, i, m->dt);
            __m256i aq = _mm256_sign_epi8(q, q);
            for (int n = 0; n < N; n++) {
                __m256i xv = _mm256_loadu_si256((const __m256i *)(xq[n] + i));
                __m256i d = _mm256_madd_epi16(_mm256_maddubs_epi16(aq, _mm256_sign_epi8(xv, q)), ones);
                acc[r * N + n] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(ws * xs[n][2 * b]),
                                                 acc[r * N + n]);
            }
#endif
        }
    }
    for (int k = 0; k < R * N; k++) res[k] = hsum(acc[k]) - corr[k];
}

#if QGROUP4 /* the 512-bit VNNI build */
/* qblock over 512-bit steps of STEP blocks, the 64 bytes of one load: 8-bit two blocks, one vpdpbusd per row and
   token, its lanes 0-7 the first block's and 8-15 the second's; 4-bit four blocks, the low and the high nibbles
   each one vpdpbusd into the same 16 lanes, four per block (the activations' group layout, QGROUP4). Per lane:
   ws * (xs * dot - corr / lanes per block); the steps' weight scales go into their lanes with one vpermw (bf16
   scales of group 32, the layout `moelite quantize` writes: one load per step), any others one by one. Blocks past
   the last whole step go through qblock. The 256-bit loop is bound by its integer work on a Zen 4 core (about 16
   bytes per 3 cycles); this one, at two threads, by memory. */
static inline __attribute__((always_inline)) void qblock512(const wmat_t *m, int64_t o, int64_t I,
                                                            int8_t *const *xq, float *const *xs, int R, int N,
                                                            float *res, const int DT, const int FAST_WS) {
    /* DT and FAST_WS are constants at every call (QBLK): the loop carries no test of the weight format, and its
       addresses are row pointers hoisted out of it and advanced by a constant step (computed per step from the
       struct, they cost as many scalar instructions as the vector work and made int4 no faster than int8: int4
       expert kernel time per token on the real-shape checkpoint 4.4-4.6 -> 3.75 ms) */
    const int STEP = DT == Q4 ? 4 : 2, LANES = 16 / STEP;
    __m512 acc[8];
    for (int k = 0; k < 8; k++) acc[k] = _mm512_setzero_ps();
    /* lane -> its block in the step; its activation scale and bias term at 2 x and 2 x + 1 of the step's xs */
    const __m512i lane_block = DT == Q4 ? _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0)
                                        : _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i idx_d = _mm512_add_epi32(lane_block, lane_block);
    const __m512i idx_c = _mm512_add_epi32(idx_d, _mm512_set1_epi32(1));
    /* 16-bit lane j (the high half of 32-bit lane j / 2) takes the bf16 scale of that lane's block */
    const __m512i idx_w = DT == Q4 ? _mm512_set_epi16(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2,
                                                      1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0)
                                   : _mm512_set_epi16(1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
                                                      0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512 per_lane = _mm512_set1_ps(1.0f / (float)LANES);
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const int64_t IS = I - I % (STEP * QBLOCK), G = m->G;
    const int sdt = m->sdt;
    const uint8_t *wr[8];
    const char *sr[8];
    for (int r = 0; r < R; r++) {
        wr[r] = (const uint8_t *)m->w + (o + r) * m->ldw;
        sr[r] = m->s + (o + r) * m->lds;
    }
    const int8_t *xr[8];
    const float *sx[8];
    for (int n = 0; n < N; n++) {
        xr[n] = xq[n];
        sx[n] = xs[n];
    }
    for (int64_t i = 0; i < IS; i += STEP * QBLOCK) {
        __m512 xsv[8], cv[8];
        for (int n = 0; n < N; n++) {
            __m512 s = DT == Q4 ? _mm512_castps256_ps512(_mm256_loadu_ps(sx[n])) /* d0, c0, .. d3, c3 */
                                : _mm512_castps128_ps512(_mm_loadu_ps(sx[n]));  /* d0, c0, d1, c1 */
            xsv[n] = _mm512_permutexvar_ps(idx_d, s);
            cv[n] = _mm512_mul_ps(_mm512_permutexvar_ps(idx_c, s), per_lane);
        }
        for (int r = 0; r < R; r++) {
            _mm_prefetch((const char *)wr[r] + PREFETCH, _MM_HINT_T0);
            __m512 wsv;
            if (FAST_WS) {
                __m128i s;
                if (DT == Q4) {
                    s = _mm_loadl_epi64((const __m128i *)sr[r]);
                } else {
                    int32_t two;
                    memcpy(&two, sr[r], 4);
                    s = _mm_cvtsi32_si128(two);
                }
                sr[r] += 2 * STEP;
                wsv = _mm512_castsi512_ps(
                    _mm512_maskz_permutexvar_epi16((__mmask32)0xAAAAAAAAu, idx_w, _mm512_castsi128_si512(s)));
            } else {
                float t[4] = {0};
                for (int k = 0; k < STEP; k++) t[k] = load1(sr[r], (i + k * QBLOCK) / G, sdt);
                wsv = _mm512_permutexvar_ps(lane_block, _mm512_castps128_ps512(_mm_loadu_ps(t)));
            }
            const __m512i v = _mm512_loadu_si512((const void *)wr[r]);
            wr[r] += 64;
            const __m512i lo = DT == Q4 ? _mm512_and_si512(v, m4) : v;
            const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4); /* 4-bit only */
            for (int n = 0; n < N; n++) {
                __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512((const void *)xr[n]));
                if (DT == Q4) d = _mm512_dpbusd_epi32(d, hi, _mm512_loadu_si512((const void *)(xr[n] + 64)));
                __m512 t = _mm512_fmsub_ps(_mm512_cvtepi32_ps(d), xsv[n], cv[n]);
                acc[r * N + n] = _mm512_fmadd_ps(t, wsv, acc[r * N + n]);
            }
        }
        for (int n = 0; n < N; n++) {
            xr[n] += STEP * QBLOCK;
            sx[n] += 2 * STEP;
        }
    }
    float tail[8] = {0};
    if (IS < I) qblock(m, o, IS, I, xq, xs, R, N, tail);
    for (int k = 0; k < R * N; k++) res[k] = _mm512_reduce_add_ps(acc[k]) + tail[k];
}
/* qblock512 specialised on the weight format: 8- or 4-bit, bf16 scales of group 32 (one 32-bit load per two
   blocks) or any other scales */
#define QBLK(m, o, I, xq, xs, R, N, res)                                                                         \
    do {                                                                                                         \
        const int fast_ = (m)->sdt == BF16 && (m)->G == QBLOCK;                                                  \
        if ((m)->dt == Q8) {                                                                                     \
            if (fast_) qblock512(m, o, I, xq, xs, R, N, res, Q8, 1);                                             \
            else qblock512(m, o, I, xq, xs, R, N, res, Q8, 0);                                                   \
        } else if (fast_) qblock512(m, o, I, xq, xs, R, N, res, Q4, 1);                                         \
        else qblock512(m, o, I, xq, xs, R, N, res, Q4, 0);                                                       \
    } while (0)
#else
#define QBLK(m, o, I, xq, xs, R, N, res) qblock(m, o, 0, I, xq, xs, R, N, res)
#endif

/* One token (NN == 1): the rows one after the other, each one sequential stream, rather than rows_for(1) rows side
   by side; the hardware prefetcher follows one stream better than four interleaved ones (int8 experts of the
   real-shape checkpoint: 9.2-9.7 -> 4.7-7.0 ms of kernel time per token on a Zen 4 core pair; int4, bound by its
   integer work, unchanged). The 16/32-bit rows (CASE) do the same (bf16: 16.0 -> 12.9 ms). */
#define QCASE(NN)                                                                                                \
    case NN:                                                                                                     \
        if (o + rows_for(NN) <= O) {                                                                             \
            if (NN == 1) for (int r = 0; r < rows_for(NN); r++) QBLK(m, o + r, I, xq, xs, 1, 1, res + r);         \
            else QBLK(m, o, I, xq, xs, rows_for(NN), NN, res);                                                   \
            for (int r = 0; r < rows_for(NN); r++) store(y, alpha, o + r, res + r * NN, NN);                     \
        } else                                                                                                   \
            for (; o < O; o++) {                                                                                 \
                QBLK(m, o, I, xq, xs, 1, NN, res);                                                               \
                store(y, alpha, o, res, NN);                                                                     \
            }                                                                                                    \
        break;

static void qrow_block(const wmat_t *m, int64_t o, int64_t O, int64_t I, int8_t *const *xq, float *const *xs, int N,
                       float *const *y, const float *alpha) {
    float res[8];
    switch (N) { QCASE(1) QCASE(2) QCASE(3) QCASE(4) QCASE(5) QCASE(6) QCASE(7) QCASE(8) }
}

/* Rows [o, o + rows_for(N)) (clipped at O) of any weight matrix: float rows x (and their bf16 copies xb, or NULL),
   or quantized rows xq / xs. */
static inline void rows(const wmat_t *m, int64_t o, int64_t O, int64_t I, const float *const *x,
                        const uint16_t *const *xb, int8_t *const *xq, float *const *xs, int N, float *const *y,
                        const float *alpha) {
    if (is_quant(m->dt)) qrow_block(m, o, O, I, xq, xs, N, y, alpha);
    else row_block(m->w, m->dt, o, O, I, m->ldw, x, xb, N, y, alpha);
}

/* Bytes of scratch ml_qgemv needs for N rows of I inputs. */
int64_t ml_qgemv_scratch(int64_t N, int64_t I) { return N * I + N * (I / QBLOCK) * 8 + 64; }

/* ml_gemv for quantized weights (dt Q8 or Q4; I a multiple of 32 and of G): the rows of x are quantized into
   `scratch` (ml_qgemv_scratch bytes) first. */
void ml_qgemv(const void *w, int dt, int64_t O, int64_t I, int64_t ldw_b, const void *s, int sdt, int64_t lds_b,
              int64_t G, const float *const *x, int N, float *const *y, const float *alpha, char *scratch,
              int threads) {
    if (N < 1 || N > MAX_ROWS || !is_quant(dt) || I % QBLOCK || G % QBLOCK) return;
    wmat_t m = {(const char *)w, ldw_b, dt, (const char *)s, lds_b, sdt, G};
    int8_t *xq[MAX_ROWS];
    float *xs[MAX_ROWS];
    float *sbase = (float *)(((uintptr_t)scratch + N * I + 63) & ~(uintptr_t)63);
    for (int n = 0; n < N; n++) {
        xq[n] = (int8_t *)scratch + n * I;
        xs[n] = sbase + n * 2 * (I / QBLOCK);
        quant_row(x[n], I, dt, xq[n], xs[n]);
    }
    int64_t R = rows_for(N), blocks = (O + R - 1) / R;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) qrow_block(&m, b * R, O, I, xq, xs, N, y, alpha);
}

static inline float silu(float v) { return v / (1.0f + expf(-v)); }

typedef struct {
    int64_t slot, first, n, blocks_before;
} group_t;

/* Bytes of scratch ml_swiglu_pairs needs for P pairs over N tokens. */
int64_t ml_swiglu_scratch(int64_t P, int64_t N, int64_t H, int64_t E) {
    return P * 3 * E * 4 + N * H + N * (H / QBLOCK) * 8 + P * E + P * (E / QBLOCK) * 8 + N * H * 2 + P * E * 2
           + 7 * 64;
}

static char *carve(char **at, int64_t bytes) {
    char *p = (char *)(((uintptr_t)*at + 63) & ~(uintptr_t)63);
    *at = p + bytes;
    return p;
}

/* SwiGLU experts over pairs, grouped by slot (the caller sorts pairs by slot; a group holds at most MAX_ROWS
   pairs, a slot with more tokens forms several groups):
       out[tok[p]] += wt[p] * down[s] @ (silu(gate[s] @ x[tok[p]]) * (up[s] @ x[tok[p]]))
   gate_up: slot s at gate_up + s * gu_stride bytes, [2E, H] (gate rows first); down: [H, E] at s * dn_stride bytes.
   Quantized (dt Q8/Q4): their scales at gu_scale + s * gus_stride ([2E, H/G]) and dn_scale + s * dns_stride
   ([H, E/G]), in sdt; x [N, H] is quantized first, and so are the activations. bf16 slots in the BF16DOT build: x
   and the activations are rounded to bf16. scratch: ml_swiglu_scratch bytes.
   Three phases over every thread, two barriers in all: the gate/up rows of every group (one work list, so the reads
   stream without a pause per expert), the activations, then the down rows: each thread owns a range of output
   features across all groups (no lock to accumulate into `out`) and reads its range of each group's rows, one
   group after the other (one contiguous stretch of memory per group, which the hardware prefetcher follows). */
void ml_swiglu_pairs(const void *gate_up, int64_t gu_stride, const void *gu_scale, int64_t gus_stride,
                     const void *down, int64_t dn_stride, const void *dn_scale, int64_t dns_stride, int dt, int sdt,
                     int64_t G, int64_t H, int64_t E, const float *x, int64_t N, const int64_t *slots,
                     const int64_t *tok, const float *wt, int64_t P, float *out, char *scratch, int threads) {
    int quant = is_quant(dt), use_bf = BF16DOT && dt == BF16;
    if (quant && (H % QBLOCK || E % QBLOCK || G % QBLOCK)) return;
    group_t *groups = malloc(sizeof(group_t) * (P + 1));
    void **ptrs = malloc(sizeof(void *) * P * 10);
    if (!groups || !ptrs) goto done;
    const float **xr = (const float **)ptrs;
    float **hr = (float **)(ptrs + P), **ar = (float **)(ptrs + 2 * P), **yr = (float **)(ptrs + 3 * P);
    int8_t **xq = (int8_t **)(ptrs + 4 * P), **aq = (int8_t **)(ptrs + 5 * P);
    float **xs = (float **)(ptrs + 6 * P), **as_ = (float **)(ptrs + 7 * P);
    uint16_t **xbr = (uint16_t **)(ptrs + 8 * P), **abr = (uint16_t **)(ptrs + 9 * P);
    char *at = scratch;
    float *h = (float *)carve(&at, P * 3 * E * 4);
    int8_t *xq_all = NULL, *aq_all = NULL;
    float *xs_all = NULL, *as_all = NULL;
    uint16_t *xb_all = NULL, *ab_all = NULL;
    if (quant) {
        xq_all = (int8_t *)carve(&at, N * H);
        xs_all = (float *)carve(&at, N * (H / QBLOCK) * 8);
        aq_all = (int8_t *)carve(&at, P * E);
        as_all = (float *)carve(&at, P * (E / QBLOCK) * 8);
    }
    if (use_bf) {
        xb_all = (uint16_t *)carve(&at, N * H * 2);
        ab_all = (uint16_t *)carve(&at, P * E * 2);
    }
    int64_t Gn = 0, total = 0;
    for (int64_t p = 0; p < P;) {
        int64_t q = p;
        while (q < P && slots[q] == slots[p] && q - p < MAX_ROWS) q++;
        groups[Gn] = (group_t){slots[p], p, q - p, total};
        total += (2 * E + rows_for((int)(q - p)) - 1) / rows_for((int)(q - p));
        Gn++;
        p = q;
    }
    for (int64_t p = 0; p < P; p++) {
        xr[p] = x + tok[p] * H;
        hr[p] = h + p * 3 * E; /* [2E] gate and up */
        ar[p] = hr[p] + 2 * E; /* [E] activation */
        yr[p] = out + tok[p] * H;
        if (quant) {
            xq[p] = xq_all + tok[p] * H;
            xs[p] = xs_all + tok[p] * 2 * (H / QBLOCK);
            aq[p] = aq_all + p * E;
            as_[p] = as_all + p * 2 * (E / QBLOCK);
        }
        xbr[p] = use_bf ? xb_all + tok[p] * H : NULL;
        abr[p] = use_bf ? ab_all + p * E : NULL;
    }
    int64_t es = quant ? 1 : (int64_t)esize(dt);
    int64_t gu_ld = quant ? H * dt / 8 : H * es, dn_ld = quant ? E * dt / 8 : E * es;
#pragma omp parallel num_threads(threads)
    {
        if (quant) {
#pragma omp for schedule(static)
            for (int64_t n = 0; n < N; n++) quant_row(x + n * H, H, dt, xq_all + n * H, xs_all + n * 2 * (H / QBLOCK));
        } else if (use_bf) {
#pragma omp for schedule(static)
            for (int64_t n = 0; n < N; n++) to_bf16(x + n * H, H, xb_all + n * H);
        }
        int64_t g = 0;
#pragma omp for schedule(static)
        for (int64_t b = 0; b < total; b++) {
            while (g + 1 < Gn && groups[g + 1].blocks_before <= b) g++;
            while (groups[g].blocks_before > b) g--;
            const group_t *gr = &groups[g];
            int64_t o = (b - gr->blocks_before) * rows_for((int)gr->n);
            wmat_t m = {(const char *)gate_up + gr->slot * gu_stride, gu_ld, dt,
                        quant ? (const char *)gu_scale + gr->slot * gus_stride : NULL, (H / (G ? G : 1)) * esize(sdt),
                        sdt, G};
            rows(&m, o, 2 * E, H, xr + gr->first, use_bf ? (const uint16_t *const *)xbr + gr->first : NULL,
                 xq + gr->first, xs + gr->first, (int)gr->n, hr + gr->first, NULL);
        }
        if (quant) {
#pragma omp for schedule(static)
            for (int64_t j = 0; j < P * (E / QBLOCK); j++) {
                int64_t p = j / (E / QBLOCK), e0 = (j % (E / QBLOCK)) * QBLOCK;
                for (int64_t e = e0; e < e0 + QBLOCK; e++) ar[p][e] = silu(hr[p][e]) * hr[p][E + e];
                quant_blocks(ar[p], e0 / QBLOCK, e0 / QBLOCK + 1, E / QBLOCK, dt, aq[p], as_[p]);
            }
        } else {
#pragma omp for schedule(static)
            for (int64_t j = 0; j < P * (E / 32 + 1); j++) {
                int64_t p = j / (E / 32 + 1), e0 = (j % (E / 32 + 1)) * 32, e1 = e0 + 32 < E ? e0 + 32 : E;
                for (int64_t e = e0; e < e1; e++) ar[p][e] = silu(hr[p][e]) * hr[p][E + e];
                if (use_bf && e1 > e0) to_bf16(ar[p] + e0, e1 - e0, abr[p] + e0);
            }
        }
        int64_t R = 4, blocks = (H + R - 1) / R;
        int nt = omp_get_num_threads(), t = omp_get_thread_num();
        int64_t b0 = blocks * t / nt, b1 = blocks * (t + 1) / nt;
        for (int64_t k = 0; k < Gn; k++) {
            const group_t *gr = &groups[k];
            wmat_t m = {(const char *)down + gr->slot * dn_stride, dn_ld, dt,
                        quant ? (const char *)dn_scale + gr->slot * dns_stride : NULL,
                        (E / (G ? G : 1)) * esize(sdt), sdt, G};
            for (int64_t b = b0; b < b1; b++)
                for (int64_t o = b * R; o < b * R + R && o < H; o += rows_for((int)gr->n))
                    rows(&m, o, b * R + R < H ? b * R + R : H, E, (const float *const *)ar + gr->first,
                         use_bf ? (const uint16_t *const *)abr + gr->first : NULL, aq + gr->first,
                         as_ + gr->first, (int)gr->n, yr + gr->first, wt + gr->first);
        }
    }
done:
    free(groups); free(ptrs);
}
