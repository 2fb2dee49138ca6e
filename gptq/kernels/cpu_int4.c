/* 4-bit weights on x86 CPUs with AVX2, FMA and F16C (no bf16 arithmetic needed).
 *
 * Built at first use by gptq/kernels/cpu_int4.py (cc -O3 -mavx2 -mfma -mf16c -fopenmp) and called
 * through ctypes; the plain-torch reference is kernels/reference.py:int4_rows_matmul_reference.
 *
 * Weight layout ("rows of 32-code chunks"): row n of W (one output feature) is K/32 chunks of
 * 16 bytes; byte j of a chunk holds the code of column 32c + j in its low nibble and of column
 * 32c + 16 + j in its high nibble. Dequantized, as GPTQ defines it:
 *
 *   W[n, k] = scale[n, g]·(q[n, k] − zero[n, g]),   g = k / G
 *
 * with scale in fp16 (the checkpoint's own values) and zero an integer code, G a multiple of 32
 * (the caller sorts act-order inputs so that groups are contiguous).
 *
 * Small batches (decoding): each activation row is rounded to int16 per group, x ≈ xs[g]·xq
 * (error ≤ 2^-16 of the group's largest |x|, ~100x finer than bf16 activations), so that
 *
 *   y[m, n] = Σ_g scale[n, g]·xs[g]·(Σ_{k∈g} xq[k]·q[n, k] − zero[n, g]·Σ_{k∈g} xq[k])
 *
 * where the inner sums are exact int32 (_mm256_madd_epi16: 16 products per instruction; a lane
 * holds at most G/8 products of ≤ 15·32767, so G ≤ 32768 cannot overflow). An fp32 FMA kernel
 * that converts every code to float measured ~2x slower: compute-bound, not memory-bound.
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

/* the 32 codes of one chunk as four vectors of 8 floats: columns 0-7, 8-15, 16-23, 24-31 */
static inline void decode32(const uint8_t *p, __m256 out[4]) {
    const __m128i v = _mm_loadu_si128((const __m128i *)p);
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(v, mask);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
    out[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    out[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
    out[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    out[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
}

/* one output row against one activation row, quantized to int16 per group: codes and
 * activations meet in _mm256_madd_epi16 (16 products per instruction, exact in int32) */
static inline float row_dot(const int16_t *xq, const float *xs, const int32_t *xqsum, const uint8_t *w,
                            const uint16_t *sc, const uint8_t *zr, int64_t K, int64_t G) {
    __m256 total = _mm256_setzero_ps();
    float zterm = 0.f;
    const int64_t ng = K / G, cpg = G / 32;
    const __m128i mask = _mm_set1_epi8(0x0F);
    for (int64_t g = 0; g < ng; g++) {
        __m256i a0 = _mm256_setzero_si256(), a1 = _mm256_setzero_si256();
        for (int64_t c = 0; c < cpg; c++) {
            const int64_t k = (g * cpg + c) * 32;
            const __m128i v = _mm_loadu_si128((const __m128i *)(w + k / 2));
            const __m256i lo = _mm256_cvtepu8_epi16(_mm_and_si128(v, mask));                   /* cols 0-15 */
            const __m256i hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(v, 4), mask)); /* 16-31 */
            a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(lo, _mm256_loadu_si256((const __m256i *)(xq + k))));
            a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(hi, _mm256_loadu_si256((const __m256i *)(xq + k + 16))));
        }
        const float s = _cvtsh_ss(sc[g]) * xs[g];
        total = _mm256_fmadd_ps(_mm256_set1_ps(s), _mm256_cvtepi32_ps(_mm256_add_epi32(a0, a1)), total);
        zterm += s * (float)zr[g] * (float)xqsum[g];
    }
    return hsum(total) - zterm;
}

/* activations per group of G: x ≈ xs[g]·xq with xq = round(x / xs[g]) ∈ [−32767, 32767]
 * (relative error ≤ 2^-16 of the group's largest |x|); xqsum[g] = Σ xq over the group */
static void quantize_x(const float *x, int64_t K, int64_t G, int16_t *xq, float *xs, int32_t *xqsum) {
    for (int64_t g = 0; g < K / G; g++) {
        float amax = 0.f;
        for (int64_t k = g * G; k < (g + 1) * G; k++) amax = fmaxf(amax, fabsf(x[k]));
        const float scale = amax > 0.f ? amax / 32767.f : 1.f, inv = 1.f / scale;
        int32_t sum = 0;
        for (int64_t k = g * G; k < (g + 1) * G; k++) {
            long r = lrintf(x[k] * inv);
            r = r > 32767 ? 32767 : (r < -32767 ? -32767 : r);
            xq[k] = (int16_t)r;
            sum += (int32_t)r;
        }
        xs[g] = scale;
        xqsum[g] = sum;
    }
}

/* y [M, N] = x [M, K] · Ŵᵀ; w [N, K/2], scale [N, K/G] fp16 bits, zero [N, K/G] */
void gptq_int4_matmul(const float *x, const uint8_t *w, const uint16_t *scale, const uint8_t *zero, float *y,
                      int64_t M, int64_t K, int64_t N, int64_t G, int threads) {
    const int64_t ng = K / G;
    int16_t *xq = (int16_t *)malloc(sizeof(int16_t) * (size_t)(M * K));
    float *xs = (float *)malloc(sizeof(float) * (size_t)(M * ng));
    int32_t *xqsum = (int32_t *)malloc(sizeof(int32_t) * (size_t)(M * ng));
    for (int64_t m = 0; m < M; m++) quantize_x(x + m * K, K, G, xq + m * K, xs + m * ng, xqsum + m * ng);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *wn = w + n * (K / 2);
        for (int64_t m = 0; m < M; m++)
            y[m * N + n] = row_dot(xq + m * K, xs + m * ng, xqsum + m * ng, wn, scale + n * ng, zero + n * ng, K, G);
    }
    free(xq);
    free(xs);
    free(xqsum);
}

/* Ŵ [N, K] fp32 (nn.Linear's layout) for long prompts, which then run one dense matmul */
void gptq_int4_dequant(const uint8_t *w, const uint16_t *scale, const uint8_t *zero, float *out,
                       int64_t K, int64_t N, int64_t G, int threads) {
    const int64_t ng = K / G, cpg = G / 32;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t g = 0; g < ng; g++) {
            const __m256 s = _mm256_set1_ps(_cvtsh_ss(scale[n * ng + g]));
            const __m256 z = _mm256_set1_ps((float)zero[n * ng + g]);
            for (int64_t c = 0; c < cpg; c++) {
                const int64_t k = (g * cpg + c) * 32;
                __m256 q[4];
                decode32(w + n * (K / 2) + k / 2, q);
                for (int i = 0; i < 4; i++) /* s·(q − z): q − z is exact, one rounding as the reference */
                    _mm256_storeu_ps(out + n * K + k + 8 * i, _mm256_mul_ps(s, _mm256_sub_ps(q[i], z)));
            }
        }
    }
}
