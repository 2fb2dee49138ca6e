/* RMSNorm over rows of fp32 activations, for CPUs with AVX2 + FMA (built by cpu_build.py):
 *
 *   y[m, :] = w ⊙ (x[m, :] · 1/sqrt(mean(x[m, :]²) + eps))
 *
 * the formula of Llama's RMSNorm (and its relatives) in fp32, in one pass over a row for the
 * sum of squares and one for the output. Why: a decoding step's norm is a 576..8192-element row,
 * where torch's five separate operations each pay a dispatch cost larger than the arithmetic.
 * cpu_rmsnorm.py checks a model's norm against this formula before it replaces it.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

static void rms_norm_row(const float *x, const float *w, float *y, int64_t D, float eps) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= D; k += 16) {
        const __m256 a = _mm256_loadu_ps(x + k), b = _mm256_loadu_ps(x + k + 8);
        s0 = _mm256_fmadd_ps(a, a, s0);
        s1 = _mm256_fmadd_ps(b, b, s1);
    }
    s0 = _mm256_add_ps(s0, s1);
    __m128 t = _mm_add_ps(_mm256_castps256_ps128(s0), _mm256_extractf128_ps(s0, 1));
    t = _mm_add_ps(t, _mm_movehl_ps(t, t));
    t = _mm_add_ss(t, _mm_movehdup_ps(t));
    float ss = _mm_cvtss_f32(t);
    for (; k < D; k++) ss += x[k] * x[k];
    const float r = 1.f / sqrtf(ss / (float)D + eps);
    const __m256 vr = _mm256_set1_ps(r);
    for (k = 0; k + 8 <= D; k += 8)
        _mm256_storeu_ps(y + k, _mm256_mul_ps(_mm256_loadu_ps(w + k), _mm256_mul_ps(_mm256_loadu_ps(x + k), vr)));
    for (; k < D; k++) y[k] = w[k] * (x[k] * r);
}

/* x, y [M, D] contiguous; w [D]; rows split across threads when there are many */
void gptq_rms_norm(const float *x, const float *w, float *y, int64_t M, int64_t D, float eps, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (M >= 64)
    for (int64_t m = 0; m < M; m++) rms_norm_row(x + m * D, w, y + m * D, D, eps);
}
