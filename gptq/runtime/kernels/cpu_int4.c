/* 4-bit weights on x86 CPUs with AVX2, FMA and F16C (no bf16 arithmetic needed).
 *
 * Built at first use by gptq/kernels/cpu_int4.py (cc -O3 -mavx2 -mfma -mf16c -fopenmp) and called
 * through ctypes; the plain-torch reference is kernels/reference.py:int4_rows_matmul_reference.
 *
 * Weight layout ("rows of 64-code chunks"): row n of W (one output feature) is K/64 chunks of
 * 32 bytes, read as 16 little-endian 16-bit words; nibble t (bits 4t..4t+3) of word j holds the code
 * of column 64c + 16t + j. A shift and a mask then give 16 codes as 16-bit lanes in column order,
 * with no shuffle instruction. Dequantized, as GPTQ defines it:
 *
 *   W[n, k] = scale[n, g]·(q[n, k] − zero[n, g]),   g = k / G
 *
 * with scale in fp16 (the checkpoint's own values) and zero an integer code, G a multiple of 32
 * (a group may end in the middle of a chunk) and K a multiple of 64 (the caller sorts act-order
 * inputs so that groups are contiguous).
 *
 * Small batches (decoding): each activation row is rounded to int16 per group, x ≈ xs[g]·xq
 * (error ≤ 2^-16 of the group's largest |x|, ~100x finer than bf16 activations), so that
 *
 *   y[m, n] = Σ_g scale[n, g]·xs[g]·(Σ_{k∈g} xq[k]·q[n, k] − zero[n, g]·Σ_{k∈g} xq[k])
 *
 * where the inner sums are exact int32 (_mm256_madd_epi16: 16 products per instruction; a lane
 * holds at most G/8 products of ≤ 15·32767, so G ≤ 32768 cannot overflow). An fp32 FMA kernel
 * that converts every code to float measured ~2x slower, and the previous layout (16 bytes per 32
 * codes, widened with vpmovzxbw) ~1.3x slower: the loop is bound by instructions, not memory.
 * Output rows are split across OpenMP threads. Long prompts dequantize instead (below).
 */
#include <immintrin.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* the 64 codes of one chunk as eight vectors of 8 floats, in column order */
static inline void decode64(const uint8_t *p, __m256 out[8]) {
    const __m256i v = _mm256_loadu_si256((const __m256i *)p), mask = _mm256_set1_epi16(0x000F);
    for (int t = 0; t < 4; t++) {
        const __m256i q = _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(4 * t)), mask);
        out[2 * t] = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(q)));
        out[2 * t + 1] = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(q, 1)));
    }
}

/* [Σ a[0], Σ a[1], ..., Σ a[7]]: eight int32 vectors summed across lanes, exactly */
static inline __m256i hsum8_epi32(const __m256i *a) {
    const __m256i u0 = _mm256_hadd_epi32(_mm256_hadd_epi32(a[0], a[1]), _mm256_hadd_epi32(a[2], a[3]));
    const __m256i u1 = _mm256_hadd_epi32(_mm256_hadd_epi32(a[4], a[5]), _mm256_hadd_epi32(a[6], a[7]));
    return _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20), _mm256_permute2x128_si256(u0, u1, 0x31));
}

/* one output row against one activation row, quantized to int16 per group: codes and
 * activations meet in _mm256_madd_epi16 (16 products per instruction, exact in int32). A group
 * may end after any half chunk (32 codes); its int32 lanes are set aside in gacc, and the groups
 * are scaled eight at a time at the end (one vector of scales, zeros and activation sums),
 * instead of one broadcast and scalar zero term per group. gacc holds ng + 8 vectors. */
static inline float row_dot(const int16_t *xq, const float *xs, const float *xqsum, const uint8_t *w,
                            const uint16_t *sc, const uint8_t *zr, int64_t K, int64_t G, __m256i *gacc) {
    const __m256i mask = _mm256_set1_epi16(0x000F);
    const int64_t ng = K / G;
    __m256i acc = _mm256_setzero_si256();
    int64_t g = 0, left = G;
#define GPTQ_END_OF_HALF                 \
    if ((left -= 32) == 0) {             \
        gacc[g++] = acc;                 \
        acc = _mm256_setzero_si256();    \
        left = G;                        \
    }
    for (int64_t k = 0; k < K; k += 64) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(w + k / 2));
        const __m256i *x = (const __m256i *)(xq + k);
        acc = _mm256_add_epi32(acc, _mm256_add_epi32(
            _mm256_madd_epi16(_mm256_and_si256(v, mask), _mm256_loadu_si256(x)),
            _mm256_madd_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 4), mask), _mm256_loadu_si256(x + 1))));
        GPTQ_END_OF_HALF
        acc = _mm256_add_epi32(acc, _mm256_add_epi32(
            _mm256_madd_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 8), mask), _mm256_loadu_si256(x + 2)),
            _mm256_madd_epi16(_mm256_srli_epi16(v, 12), _mm256_loadu_si256(x + 3))));
        GPTQ_END_OF_HALF
    }
#undef GPTQ_END_OF_HALF
    /* Σ_g scale[g]·xs[g]·(dot[g] − zero[g]·xqsum[g]) */
    __m256 total = _mm256_setzero_ps();
    int64_t g0 = 0;
    for (; g0 + 8 <= ng; g0 += 8) {
        const __m256 dot = _mm256_cvtepi32_ps(hsum8_epi32(gacc + g0));
        const __m256 s = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sc + g0))),
                                       _mm256_loadu_ps(xs + g0));
        const __m256 z = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(zr + g0))));
        total = _mm256_fmadd_ps(s, _mm256_fnmadd_ps(z, _mm256_loadu_ps(xqsum + g0), dot), total);
    }
    float tail = 0.f;
    for (; g0 < ng; g0++) {
        const __m256i a = gacc[g0];
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
        tail += _cvtsh_ss(sc[g0]) * xs[g0] * ((float)_mm_cvtsi128_si32(s4) - (float)zr[g0] * xqsum[g0]);
    }
    return hsum(total) + tail;
}

/* activations per group of G: x ≈ xs[g]·xq with xq = round(x / xs[g]) ∈ [−32767, 32767]
 * (relative error ≤ 2^-16 of the group's largest |x|); xqsum[g] = Σ xq over the group (as float) */
static void quantize_x(const float *x, int64_t K, int64_t G, int16_t *xq, float *xs, float *xqsum) {
    const __m256 sign = _mm256_set1_ps(-0.f);
    for (int64_t g = 0; g < K / G; g++) {
        __m256 m = _mm256_setzero_ps();
        for (int64_t k = g * G; k < (g + 1) * G; k += 8)
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + k)));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        const float amax = fmaxf(_mm_cvtss_f32(m4), _mm_cvtss_f32(_mm_movehdup_ps(m4)));
        const float scale = amax > 0.f ? amax / 32767.f : 1.f, inv = 1.f / scale;
        const __m256 vinv = _mm256_set1_ps(inv);
        const __m256i lim = _mm256_set1_epi32(32767), nlim = _mm256_set1_epi32(-32767);
        __m256i sum = _mm256_setzero_si256();
        for (int64_t k = g * G; k < (g + 1) * G; k += 16) {  /* round to nearest even, as lrintf */
            __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k), vinv));
            __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 8), vinv));
            a = _mm256_max_epi32(_mm256_min_epi32(a, lim), nlim);
            b = _mm256_max_epi32(_mm256_min_epi32(b, lim), nlim);
            sum = _mm256_add_epi32(sum, _mm256_add_epi32(a, b));
            /* packs interleaves 128-bit lanes: a0-3 b0-3 a4-7 b4-7 → a0-7 b0-7 */
            _mm256_storeu_si256((__m256i *)(xq + k), _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8));
        }
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
        xs[g] = scale;
        xqsum[g] = (float)_mm_cvtsi128_si32(s4);
    }
}

/* One layer (or several layers reading the same input, their rows stacked): bound once, so a
 * decoding step passes four pointers, not eleven arguments. Output j holds rows ends[j-1]..ends[j]. */
#define GPTQ_MAX_OUTPUTS 4
typedef struct {
    const uint8_t *w;      /* [N, K/2] codes, rows of 64-code chunks */
    const uint16_t *scale; /* [N, K/G] fp16 bits */
    const uint8_t *zero;   /* [N, K/G] */
    int64_t K, N, G, nout;
    int64_t ends[GPTQ_MAX_OUTPUTS];
} gptq_int4_plan;

/* y_j [M, n_j] = x [M, K] · Ŵ[rows of output j]ᵀ for j < nout (y1..y3 unused beyond nout) */
void gptq_int4_matmul(const gptq_int4_plan *p, const float *x, int64_t M, int threads,
                      float *y0, float *y1, float *y2, float *y3) {
    const int64_t K = p->K, N = p->N, G = p->G, ng = K / G;
    float *ys[GPTQ_MAX_OUTPUTS] = {y0, y1, y2, y3};
    int16_t stack_q[8192];
    float stack_s[256], stack_sum[256];
    const int small = M * K <= 8192 && M * ng <= 256;
    int16_t *xq = small ? stack_q : (int16_t *)malloc(sizeof(int16_t) * (size_t)(M * K));
    float *xs = small ? stack_s : (float *)malloc(sizeof(float) * (size_t)(M * ng));
    float *xqsum = small ? stack_sum : (float *)malloc(sizeof(float) * (size_t)(M * ng));
    for (int64_t m = 0; m < M; m++) quantize_x(x + m * K, K, G, xq + m * K, xs + m * ng, xqsum + m * ng);
#pragma omp parallel num_threads(threads)
    {
        __m256i gacc[ng + 8]; /* per thread: one int32 vector per group of the row at hand */
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            int j = 0;
            while (n >= p->ends[j]) j++;
            const int64_t start = j ? p->ends[j - 1] : 0, width = p->ends[j] - start;
            const uint8_t *wn = p->w + n * (K / 2);
            for (int64_t m = 0; m < M; m++)
                ys[j][m * width + n - start] = row_dot(xq + m * K, xs + m * ng, xqsum + m * ng, wn,
                                                       p->scale + n * ng, p->zero + n * ng, K, G, gacc);
        }
    }
    if (!small) {
        free(xq);
        free(xs);
        free(xqsum);
    }
}

/* Ŵ [N, K] fp32 (nn.Linear's layout) for long prompts, which then run one dense matmul */
void gptq_int4_dequant(const uint8_t *w, const uint16_t *scale, const uint8_t *zero, float *out,
                       int64_t K, int64_t N, int64_t G, int threads) {
    const int64_t ng = K / G;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t k = 0; k < K; k += 64) {
            __m256 q[8];
            decode64(w + n * (K / 2) + k / 2, q);
            for (int i = 0; i < 8; i++) { /* s·(q − z): q − z is exact, one rounding as the reference */
                const int64_t g = n * ng + (k + 8 * i) / G;
                const __m256 s = _mm256_set1_ps(_cvtsh_ss(scale[g])), z = _mm256_set1_ps((float)zero[g]);
                _mm256_storeu_ps(out + n * K + k + 8 * i, _mm256_mul_ps(s, _mm256_sub_ps(q[i], z)));
            }
        }
    }
}
