/* float16 weights × fp32 activations for a few rows (the float16 output head while decoding), for
 * CPUs with AVX2 + FMA + F16C (built by cpu_build.py):
 *
 *   y[m, n] = Σ_k x[m, k] · w[n, k]
 *
 * each weight converted to fp32 exactly (vcvtph2ps) and multiplied in fp32, so the activations are
 * not rounded to fp16 first. Why: torch's fp16 matrix-vector product is slower on these CPUs
 * (bench cpu-kernel: 1.24 against 1.08 ms for SmolLM2's 49152 × 576 head), and the head is the
 * largest single matrix of a small model. Output rows are split across OpenMP threads.
 */
#include <immintrin.h>
#include <stdint.h>

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __m256 load_f16(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }

static float dot_f16(const float *x, const uint16_t *w, int64_t K) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        a0 = _mm256_fmadd_ps(load_f16(w + k), _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(load_f16(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
        a2 = _mm256_fmadd_ps(load_f16(w + k + 16), _mm256_loadu_ps(x + k + 16), a2);
        a3 = _mm256_fmadd_ps(load_f16(w + k + 24), _mm256_loadu_ps(x + k + 24), a3);
    }
    for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(load_f16(w + k), _mm256_loadu_ps(x + k), a0);
    float s = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; k < K; k++) s += x[k] * _cvtsh_ss(w[k]);
    return s;
}

/* y [M, N] = x [M, K] · wᵀ, w [N, K] fp16 bits */
void gptq_f16_matmul(const float *x, const uint16_t *w, float *y, int64_t M, int64_t K, int64_t N, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++)
        for (int64_t m = 0; m < M; m++) y[m * N + n] = dot_f16(x + m * K, w + n * K, K);
}
