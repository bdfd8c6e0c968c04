/* moelite's CPU kernels for reading weights at memory speed: matrix-vector products over 16- or 32-bit weights
   with float32 activations, for a few rows at once, and SwiGLU experts over (token, expert) pairs in one call.

   Built at first use by moelite/core/native.py with the system C compiler (-O3 -mavx2 -mfma -mf16c -fopenmp) and
   loaded with ctypes; used only on CPUs with AVX2, FMA and F16C. Each weight is read once per call whatever the
   number of rows (at most MAX_ROWS), converted to float32 in registers, and multiplied with float32 activations:
   the result equals a float32 product over the same weights, up to summation order.

   Shape legend: O output features, I input features, N rows (tokens), H hidden, E expert intermediate, P pairs.
   Weight dtypes: 0 float32, 1 bfloat16, 2 float16. Row pointers: `x[n]` is row n of the input, `y[n]` row n of the
   output. Threads: OpenMP, `threads` given by the caller (torch.get_num_threads()), split over output features. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_ROWS 8

enum { F32 = 0, BF16 = 1, F16 = 2 };

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

/* Rows [o, o + rows_for(N)) of w (clipped at O) against N input rows, stored through `store`. */
#define CASE(NN)                                                                                                 \
    case NN:                                                                                                     \
        if (o + rows_for(NN) <= O) {                                                                             \
            block(w + o * ldw_b, ldw_b, dt, I, x, rows_for(NN), NN, res);                                        \
            for (int r = 0; r < rows_for(NN); r++) store(y, alpha, o + r, res + r * NN, NN);                     \
        } else                                                                                                   \
            for (; o < O; o++) {                                                                                 \
                block(w + o * ldw_b, ldw_b, dt, I, x, 1, NN, res);                                               \
                store(y, alpha, o, res, NN);                                                                     \
            }                                                                                                    \
        break;

static void row_block(const char *w, int dt, int64_t o, int64_t O, int64_t I, int64_t ldw_b, const float *const *x,
                      int N, float *const *y, const float *alpha) {
    float res[8];
    switch (N) { CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8) }
}

/* y[n] = w @ x[n] (alpha NULL) or y[n] += alpha[n] * (w @ x[n]); w [O, I] with row stride ldw (elements),
   N <= MAX_ROWS. */
void ml_gemv(const void *w, int dt, int64_t O, int64_t I, int64_t ldw, const float *const *x, int N,
             float *const *y, const float *alpha, int threads) {
    if (N < 1 || N > MAX_ROWS) return;
    int64_t R = rows_for(N), blocks = (O + R - 1) / R, ldw_b = ldw * (int64_t)esize(dt);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) row_block((const char *)w, dt, b * R, O, I, ldw_b, x, N, y, alpha);
}

static inline float silu(float v) { return v / (1.0f + expf(-v)); }

typedef struct {
    int64_t slot, first, n, blocks_before;
} group_t;

/* SwiGLU experts over pairs, grouped by slot (the caller sorts pairs by slot; a group holds at most MAX_ROWS
   pairs, a slot with more tokens forms several groups):
       out[tok[p]] += wt[p] * down[s] @ (silu(gate[s] @ x[tok[p]]) * (up[s] @ x[tok[p]]))
   gate_up: slot s at gate_up + s * gu_stride elements, [2E, H] (gate rows first); down: [H, E] at s * dn_stride.
   scratch: float32 [P * 3E]. Three phases over every thread, two barriers in all: the gate/up rows of every group
   (one work list, so the reads stream without a pause per expert), the activations, then the down rows: each thread
   owns a range of output features across all groups, so accumulating into `out` needs no lock. */
void ml_swiglu_pairs(const void *gate_up, const void *down, int dt, int64_t gu_stride, int64_t dn_stride, int64_t H,
                     int64_t E, const float *x, const int64_t *slots, const int64_t *tok, const float *wt, int64_t P,
                     float *out, float *scratch, int threads) {
    int64_t es = (int64_t)esize(dt);
    group_t *groups = malloc(sizeof(group_t) * (P + 1));
    const float **xr = malloc(sizeof(float *) * P);
    float **hr = malloc(sizeof(float *) * P), **ar = malloc(sizeof(float *) * P), **yr = malloc(sizeof(float *) * P);
    if (!groups || !xr || !hr || !ar || !yr) goto done;
    int64_t G = 0, total = 0;
    for (int64_t p = 0; p < P;) {
        int64_t q = p;
        while (q < P && slots[q] == slots[p] && q - p < MAX_ROWS) q++;
        groups[G] = (group_t){slots[p], p, q - p, total};
        total += (2 * E + rows_for((int)(q - p)) - 1) / rows_for((int)(q - p));
        G++;
        p = q;
    }
    for (int64_t p = 0; p < P; p++) {
        xr[p] = x + tok[p] * H;
        hr[p] = scratch + p * 3 * E; /* [2E] gate and up */
        ar[p] = hr[p] + 2 * E;       /* [E] activation */
        yr[p] = out + tok[p] * H;
    }
#pragma omp parallel num_threads(threads)
    {
        int64_t g = 0;
#pragma omp for schedule(static)
        for (int64_t b = 0; b < total; b++) {
            while (g + 1 < G && groups[g + 1].blocks_before <= b) g++;
            while (groups[g].blocks_before > b) g--;
            const group_t *gr = &groups[g];
            int64_t o = (b - gr->blocks_before) * rows_for((int)gr->n);
            row_block((const char *)gate_up + gr->slot * gu_stride * es, dt, o, 2 * E, H, H * es, xr + gr->first,
                      (int)gr->n, hr + gr->first, NULL);
        }
#pragma omp for schedule(static)
        for (int64_t j = 0; j < P * E; j++) {
            int64_t p = j / E, e = j % E;
            ar[p][e] = silu(hr[p][e]) * hr[p][E + e];
        }
        int64_t R = 4, blocks = (H + R - 1) / R;
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            for (int64_t k = 0; k < G; k++) {
                const group_t *gr = &groups[k];
                const char *dw = (const char *)down + gr->slot * dn_stride * es;
                for (int64_t o = b * R; o < b * R + R && o < H; o += rows_for((int)gr->n))
                    row_block(dw, dt, o, b * R + R < H ? b * R + R : H, E, E * es,
                              (const float *const *)ar + gr->first, (int)gr->n, yr + gr->first, wt + gr->first);
            }
        }
    }
done:
    free(groups); free(xr); free(hr); free(ar); free(yr);
}
