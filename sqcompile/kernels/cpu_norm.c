/* The fully-quantized L1 norm on CPU (AVX-512 F/BW/VL); see sqcompile/kernels/cpu_norm.py.
 *
 * x is viewed as [A, R1, B, R2] (contiguous float32); one slice is the pair (a, b), reduced
 * over r1 and r2: its n = R1 * R2 elements are R1 rows of R2 adjacent values, B * R2 apart.
 * BatchNorm on [N, C, *S] is [1, N, C, prod S], InstanceNorm [N * C, 1, 1, prod S], a
 * LayerNorm / RMSNorm without affine over a row [rows, 1, 1, D].  The affine (w, bias) is one
 * value per slice.  The formulas are sqcompile.norms._L1Norm's:
 *
 *   forward   amax = max |x|; scale = amax / qmax (NaN where not finite); q = clamp(rne(x /
 *             (scale or 1)), -qmax, qmax), NaN -> 0; xc = q * scale;
 *             total = sum xc; mean = total / n (0 when not centered); deviation = sum |xc - mean|;
 *             sigma = l1_scale * (deviation / n); inv = 1 / sqrt(sigma^2 + eps);
 *             y = (xc - mean) * inv * w + bias
 *   backward  dy quantized per slice at grad bits with stochastic rounding (the noise of
 *             numerics.hash_noise over x's flat index): dyd = floor(dy / s + u) * s;
 *             xhat = (xc - mean) * inv; S1 = sum dyd, S2 = sum dyd * xhat, S3 = sum sign(xhat);
 *             g = dyd * w; proj = (l1_scale * sigma * inv) * (w * S2 / n);
 *             dx = (g - w * S1 / n - proj * (sign(xhat) - S3 / n)) * inv   (centered)
 *             dx = (g - proj * sign(xhat)) * inv                          (not centered)
 *             S1 and S2 per slice are the bias's and the weight's gradients before they are
 *             summed over the slices that share a parameter.
 *
 * The quantizers are numerics.quantize's bit for bit (IEEE divisions, round half to even /
 * floor, NaN-propagating maxima); the sums run in float32 lanes added into a double per row,
 * so they differ from the graph's (another order of additions) by rounding only.
 *
 * One slice is one task (OpenMP over the A * B slices).  The forward makes four passes over
 * a slice (maxima; quantize and sum; deviation; output), the backward three (maxima of dy;
 * quantize dy and the three sums; dx): a slice of an image's channel (a few KiB to a few
 * hundred KiB) stays in cache, so each reaches memory about once, where the compiled graph's
 * loops made about seven passes over the whole tensor each way.
 */
#include <math.h>
#include <stdlib.h>

#include "avx512.h"

static inline __m512 max_nan(__m512 acc, __m512 v) {
    __m512 m = _mm512_max_ps(v, acc);
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), m, v);
}

static inline float reduce_max_nan(__m512 v) {
    if (_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q))
        return NAN;
    return _mm512_reduce_max_ps(v);
}

static inline __m512 sign_ps(__m512 v) {
    /* torch.sign: -1, 0, 1, NaN for NaN */
    __m512 one = _mm512_set1_ps(1.0f);
    __m512 s = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_GT_OQ), _mm512_setzero_ps(), one);
    s = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ), s, _mm512_set1_ps(-1.0f));
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), s, v);
}

static inline __m512 hash_noise(__m512i index, __m512i seed) {
    /* numerics.hash_noise: MurmurHash3's finalizer over (index ^ seed) * golden, in int32 */
    __m512i h = _mm512_mullo_epi32(_mm512_xor_si512(index, seed), _mm512_set1_epi32((int32_t)0x9E3779B1));
    h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
    h = _mm512_mullo_epi32(h, _mm512_set1_epi32((int32_t)0x85EBCA6B));
    h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 13));
    h = _mm512_mullo_epi32(h, _mm512_set1_epi32((int32_t)0xC2B2AE35));
    h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
    __m512 k = _mm512_cvtepi32_ps(_mm512_srli_epi32(h, 24));
    return _mm512_mul_ps(_mm512_add_ps(k, _mm512_set1_ps(0.5f)), _mm512_set1_ps(1.0f / 256.0f));
}

static inline __m512 quantize(__m512 x, __m512 div, __m512 qmax, int rounding) {
    /* numerics.quantize_values: clamp(round(x / div), -qmax, qmax), NaN -> 0 */
    __m512 q = _mm512_roundscale_ps(_mm512_div_ps(x, div), rounding | _MM_FROUND_NO_EXC);
    __mmask16 nan = _mm512_cmp_ps_mask(q, q, _CMP_UNORD_Q);
    q = _mm512_min_ps(_mm512_max_ps(q, _mm512_sub_ps(_mm512_setzero_ps(), qmax)), qmax);
    return _mm512_mask_blend_ps(nan, q, _mm512_setzero_ps());
}

static inline float finite_or_nan(float s) { return isfinite(s) ? s : NAN; }

static inline __m512 load_q(const int8_t *p, __mmask16 m) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
}

typedef struct {
    int64_t A, R1, B, R2;
} layout;

/* the offset of slice s's first element, and of one row from the next */
static inline int64_t slice_base(layout L, int64_t s) {
    return (s / L.B) * L.R1 * L.B * L.R2 + (s % L.B) * L.R2;
}

static float slice_amax(const float *x, layout L, int64_t base) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t r = 0; r < L.R1; r++) {
        const float *row = x + base + r * L.B * L.R2;
        for (int64_t i = 0; i < L.R2; i += 16) {
            __mmask16 m = lanes(i, L.R2);
            acc = max_nan(acc, _mm512_abs_ps(_mm512_maskz_loadu_ps(m, row + i)));
        }
    }
    return reduce_max_nan(acc);
}

/* 1 / sqrt(sigma^2 + eps) as norms._inv_denominator computes it, from the slice's sums */
static inline float inv_denominator(float deviation, float n, float l1_scale, float eps, float *sigma) {
    *sigma = l1_scale * (deviation / n);
    return 1.0f / sqrtf(*sigma * *sigma + eps);
}

void sq_l1_norm_forward(const float *x, const float *w, const float *bias, int64_t A, int64_t R1, int64_t B,
                        int64_t R2, int center, float l1_scale, float eps, float qmax, float *y, int8_t *q,
                        float *amax, float *total, float *deviation, int threads) {
    const layout L = {A, R1, B, R2};
    const float n = (float)(R1 * R2);
    const __m512 vqmax = _mm512_set1_ps(qmax);
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t s = 0; s < A * B; s++) {
        const int64_t base = slice_base(L, s), step = B * R2;
        const float a = slice_amax(x, L, base);
        const float scale = a / qmax, out_scale = finite_or_nan(scale);
        const __m512 vdiv = _mm512_set1_ps(scale == 0.0f ? 1.0f : scale), vs = _mm512_set1_ps(out_scale);
        double sum = 0.0;
        for (int64_t r = 0; r < R1; r++) {
            __m512 acc = _mm512_setzero_ps();
            for (int64_t i = 0; i < R2; i += 16) {
                __mmask16 m = lanes(i, R2);
                int64_t o = base + r * step + i;
                __m512 v = quantize(_mm512_maskz_loadu_ps(m, x + o), vdiv, vqmax, _MM_FROUND_TO_NEAREST_INT);
                _mm512_mask_cvtepi32_storeu_epi8(q + o, m, _mm512_cvtps_epi32(v));
                acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(m, _mm512_mul_ps(v, vs)));
            }
            sum += _mm512_reduce_add_ps(acc);
        }
        const float t = (float)sum, mean = center ? t / n : 0.0f;
        const __m512 vmean = _mm512_set1_ps(mean);
        double dev = 0.0;
        for (int64_t r = 0; r < R1; r++) {
            __m512 acc = _mm512_setzero_ps();
            for (int64_t i = 0; i < R2; i += 16) {
                __mmask16 m = lanes(i, R2);
                __m512 z = _mm512_sub_ps(_mm512_mul_ps(load_q(q + base + r * step + i, m), vs), vmean);
                acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(m, _mm512_abs_ps(z)));
            }
            dev += _mm512_reduce_add_ps(acc);
        }
        float sigma;
        const float d = (float)dev, inv = inv_denominator(d, n, l1_scale, eps, &sigma);
        const __m512 vinv = _mm512_set1_ps(inv), vw = _mm512_set1_ps(w ? w[s] : 1.0f);
        const __m512 vb = _mm512_set1_ps(bias ? bias[s] : 0.0f);
        for (int64_t r = 0; r < R1; r++) {
            for (int64_t i = 0; i < R2; i += 16) {
                __mmask16 m = lanes(i, R2);
                int64_t o = base + r * step + i;
                __m512 v = _mm512_mul_ps(_mm512_sub_ps(_mm512_mul_ps(load_q(q + o, m), vs), vmean), vinv);
                if (w)
                    v = _mm512_mul_ps(v, vw);
                if (bias)
                    v = _mm512_add_ps(v, vb);
                _mm512_mask_storeu_ps(y + o, m, v);
            }
        }
        amax[s] = a;
        total[s] = t;
        deviation[s] = d;
    }
}

/* seed: numerics.hash_noise's seed times its spreading constant, wrapped to int32.
   dx may be NULL (only the parameter sums); sum_dy, sum_dyx: S1 and S2 per slice. */
int sq_l1_norm_backward(const float *dy, const int8_t *q, const float *amax, const float *total,
                        const float *deviation, const float *w, int64_t A, int64_t R1, int64_t B, int64_t R2,
                        int center, float l1_scale, float eps, float qmax_x, float qmax_g, int32_t seed, float *dx,
                        float *sum_dy, float *sum_dyx, int threads) {
    const layout L = {A, R1, B, R2};
    const float n = (float)(R1 * R2);
    const __m512 vqmax = _mm512_set1_ps(qmax_g);
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i vseed = _mm512_set1_epi32(seed);
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        int8_t *dq = dx ? (int8_t *)malloc((size_t)(R1 * R2)) : NULL;
        if (dx && !dq) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t s = 0; s < A * B; s++) {
            if (dx && !dq)
                continue;
            const int64_t base = slice_base(L, s), step = B * R2;
            const float xs = finite_or_nan(amax[s] / qmax_x), mean = center ? total[s] / n : 0.0f;
            float sigma;
            const float inv = inv_denominator(deviation[s], n, l1_scale, eps, &sigma);
            const __m512 vxs = _mm512_set1_ps(xs), vmean = _mm512_set1_ps(mean), vinv = _mm512_set1_ps(inv);
            const float ga = slice_amax(dy, L, base), gscale = ga / qmax_g;
            const __m512 vdiv = _mm512_set1_ps(gscale == 0.0f ? 1.0f : gscale);
            const __m512 vgs = _mm512_set1_ps(finite_or_nan(gscale));
            double s1 = 0.0, s2 = 0.0, s3 = 0.0;
            for (int64_t r = 0; r < R1; r++) {
                __m512 a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
                for (int64_t i = 0; i < R2; i += 16) {
                    __mmask16 m = lanes(i, R2);
                    int64_t o = base + r * step + i;
                    __m512i index = _mm512_add_epi32(_mm512_set1_epi32((int32_t)(uint32_t)o), lane);
                    __m512 v = _mm512_div_ps(_mm512_maskz_loadu_ps(m, dy + o), vdiv);
                    v = _mm512_add_ps(v, hash_noise(index, vseed));
                    v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
                    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
                    v = _mm512_min_ps(_mm512_max_ps(v, _mm512_sub_ps(_mm512_setzero_ps(), vqmax)), vqmax);
                    v = _mm512_mask_blend_ps(nan, v, _mm512_setzero_ps());
                    if (dq)
                        _mm_mask_storeu_epi8(dq + r * R2 + i, m, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v)));
                    __m512 g = _mm512_maskz_mov_ps(m, _mm512_mul_ps(v, vgs));
                    __m512 xh = _mm512_mul_ps(_mm512_sub_ps(_mm512_mul_ps(load_q(q + o, m), vxs), vmean), vinv);
                    a1 = _mm512_add_ps(a1, g);
                    a2 = _mm512_add_ps(a2, _mm512_maskz_mov_ps(m, _mm512_mul_ps(g, xh)));
                    a3 = _mm512_add_ps(a3, _mm512_maskz_mov_ps(m, sign_ps(xh)));
                }
                s1 += _mm512_reduce_add_ps(a1);
                s2 += _mm512_reduce_add_ps(a2);
                s3 += _mm512_reduce_add_ps(a3);
            }
            sum_dy[s] = (float)s1;
            sum_dyx[s] = (float)s2;
            if (!dx)
                continue;
            const float wv = w ? w[s] : 1.0f;
            const float mean_g = center ? wv * (float)s1 / n : 0.0f, mean_sgn = center ? (float)s3 / n : 0.0f;
            const float proj = (l1_scale * sigma * inv) * (wv * (float)s2 / n);
            const __m512 vw = _mm512_set1_ps(wv), vmg = _mm512_set1_ps(mean_g), vms = _mm512_set1_ps(mean_sgn);
            const __m512 vproj = _mm512_set1_ps(proj);
            for (int64_t r = 0; r < R1; r++) {
                for (int64_t i = 0; i < R2; i += 16) {
                    __mmask16 m = lanes(i, R2);
                    int64_t o = base + r * step + i;
                    __m512 g = _mm512_mul_ps(_mm512_mul_ps(load_q(dq + r * R2 + i, m), vgs), vw);
                    __m512 xh = _mm512_mul_ps(_mm512_sub_ps(_mm512_mul_ps(load_q(q + o, m), vxs), vmean), vinv);
                    __m512 sg = _mm512_sub_ps(sign_ps(xh), vms);
                    g = _mm512_sub_ps(_mm512_sub_ps(g, vmg), _mm512_mul_ps(vproj, sg));
                    _mm512_mask_storeu_ps(dx + o, m, _mm512_mul_ps(g, vinv));
                }
            }
        }
        free(dq);
    }
    return failed;
}
