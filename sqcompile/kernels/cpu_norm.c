/* The fully-quantized L1 norm on CPU (AVX-512 F/BW/VL); see sqcompile/kernels/cpu_norm.py.
 *
 * x is viewed as [A, R1, B, R2] (contiguous float32); one slice is the pair (a, b), reduced
 * over r1 and r2: its n = R1 * R2 elements are R1 rows of R2 adjacent values, B * R2 apart.
 * BatchNorm on [N, C, *S] is [1, N, C, prod S], InstanceNorm [N * C, 1, 1, prod S], a
 * LayerNorm / RMSNorm over a row [1, 1, rows, D].  The affine (w, bias) is either one value
 * per slice (row_affine = 0: BatchNorm, InstanceNorm) or one per position r2 along the rows,
 * the same for every slice (row_affine = 1: LayerNorm, RMSNorm).  The formulas are
 * sqcompile.norms._L1Norm's:
 *
 *   forward   amax = max |x|; scale = amax / qmax (NaN where not finite); q = clamp(rne(x /
 *             (scale or 1)), -qmax, qmax), NaN -> 0; xc = q * scale;
 *             total = sum xc; mean = total / n (0 when not centered); deviation = sum |xc - mean|;
 *             sigma = l1_scale * (deviation / n); inv = 1 / sqrt(sigma^2 + eps);
 *             y = (xc - mean) * inv * w + bias
 *   backward  dy quantized per slice at grad bits with stochastic rounding (the noise of
 *             numerics.hash_noise over x's flat index): dyd = floor(dy / s + u) * s;
 *             xhat = (xc - mean) * inv; g = dyd * w;
 *             Sg = sum g, Sgx = sum g * xhat, Ss = sum sign(xhat); proj = (l1_scale * sigma * inv) * Sgx / n;
 *             dx = (g - Sg / n - proj * (sign(xhat) - Ss / n)) * inv   (centered)
 *             dx = (g - proj * sign(xhat)) * inv                      (not centered)
 *             and the parameters' gradients: sum dyd (bias) and sum dyd * xhat (weight), per
 *             slice (row_affine = 0; the caller sums the slices that share a parameter) or
 *             per position r2 over all slices (row_affine = 1: each chunk of slices sums
 *             into its own row of `work`, then the chunks are added in order, so the result
 *             does not depend on the thread count).
 *
 * The quantizers are numerics.quantize's bit for bit (IEEE divisions, round half to even /
 * floor, NaN-propagating maxima); the sums run in float32 lanes added into a double per row,
 * so they differ from the graph's (another order of additions) by rounding only.
 *
 * Fused with the next GEMM's per-row quantizer (sq_l1_norm_forward with yq; a LayerNorm's
 * slices are rows, R1 = 1): y, held in a row buffer, is also quantized per slice as
 * numerics.quantize does (nearest), and written only when something else reads it.  With
 * act_groups's quantizer instead (yx), the row's maximum and quotients, quantized afterwards
 * by cpu_quant.c's sq_shiftquant_quotients.  With a
 * residual, the backward writes dx + residual (a pre-norm block's residual add).
 *
 * One slice is one task (OpenMP over the A * B slices).  The forward makes four passes over
 * a slice (maxima; quantize and sum; deviation; output), the backward three (maxima of dy;
 * quantize dy and the three sums; dx): a slice of an image's channel (a few KiB to a few
 * hundred KiB) stays in cache, so each reaches memory about once, where the compiled graph's
 * loops made about seven passes over the whole tensor each way.
 */
#include <math.h>
#include <omp.h>
#include <stdlib.h>

#include "avx512.h"

SQ_VEC __m512 sign_ps(__m512 v) {
    /* torch.sign: -1, 0, 1, NaN for NaN */
    __m512 one = _mm512_set1_ps(1.0f);
    __m512 s = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_GT_OQ), _mm512_setzero_ps(), one);
    s = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ), s, _mm512_set1_ps(-1.0f));
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), s, v);
}

SQ_VEC __m512 quantize(__m512 x, __m512 div, __m512 qmax, int rounding) {
    /* numerics.quantize_values: clamp(round(x / div), -qmax, qmax), NaN -> 0 */
    __m512 q = _mm512_roundscale_ps(_mm512_div_ps(x, div), rounding | _MM_FROUND_NO_EXC);
    __mmask16 nan = _mm512_cmp_ps_mask(q, q, _CMP_UNORD_Q);
    q = _mm512_min_ps(_mm512_max_ps(q, _mm512_sub_ps(_mm512_setzero_ps(), qmax)), qmax);
    return _mm512_mask_blend_ps(nan, q, _mm512_setzero_ps());
}

static inline float finite_or_nan(float s) { return isfinite(s) ? s : NAN; }

SQ_VEC __m512 load_q(const int8_t *p, __mmask16 m) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
}

typedef struct {
    int64_t A, R1, B, R2;
} layout;

/* the offset of slice s's first element, and of one row from the next */
static inline int64_t slice_base(layout L, int64_t s) {
    return (s / L.B) * L.R1 * L.B * L.R2 + (s % L.B) * L.R2;
}

/* The slice's first pass, the one that reads it from memory: each row also asks for the
 * next one (a BatchNorm's rows are an image's channel planes, a slice's rows one image apart:
 * the hardware prefetchers stop at the end of each; interleaved A/B on a Zen 4 core,
 * [32, 64, 32, 32]: forward 1.11-1.13x, backward 1.06-1.08x, no change on slices in cache). */
static float slice_amax(const float *x, layout L, int64_t base) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t r = 0; r < L.R1; r++) {
        const float *row = x + base + r * L.B * L.R2;
        const float *next = r + 1 < L.R1 ? row + L.B * L.R2 : NULL;
        for (int64_t i = 0; i < L.R2; i += 16) {
            __mmask16 m = lanes(i, L.R2);
            if (next)
                __builtin_prefetch(next + i, 0, 3);
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

/* y_out: where y goes (may be NULL when yq or yx is set).  With yq (then R1 must be 1), y is
   also quantized per slice at qmax_y, as the next GEMM's per-row quantizer would: yq (int8),
   its maxima to y_amax and scales to y_scale.  With yx instead (R1 = 1; act_groups), the
   first half of the next GEMM's outer-scaled ShiftQuant over the columns: each row's maximum
   (0 taken as 1) to y_amax, the quotients y / it to yx [slices, R2], and their column maxima
   into ywork [threads, R2] (zeros on entry; one row of partial maxima a thread), from which
   cpu_quant.c's sq_shiftquant_quotients quantizes.  Returns nonzero when a thread's row
   buffer could not be allocated. */
int sq_l1_norm_forward(const float *x, const float *w, const float *bias, int row_affine, int64_t A, int64_t R1,
                       int64_t B, int64_t R2, int center, float l1_scale, float eps, float qmax, float *y_out,
                       int8_t *q, float *amax, float *total, float *deviation, int8_t *yq, float qmax_y,
                       float *y_amax, float *y_scale, float *yx, float *ywork, int threads) {
    const layout L = {A, R1, B, R2};
    const float n = (float)(R1 * R2);
    const __m512 vqmax = _mm512_set1_ps(qmax), vqmax_y = _mm512_set1_ps(qmax_y);
    const int rows = yq || yx;             /* y held a row at a time, for its quantizer */
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *row = rows ? (float *)malloc((size_t)R2 * sizeof(float)) : NULL;
        float *col = yx ? ywork + (int64_t)omp_get_thread_num() * R2 : NULL;
        if (rows && !row) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t s = 0; s < A * B; s++) {
            if (rows && !row)
                continue;
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
            const __m512 vinv = _mm512_set1_ps(inv);
            const __m512 vw = _mm512_set1_ps(w && !row_affine ? w[s] : 1.0f);
            const __m512 vb = _mm512_set1_ps(bias && !row_affine ? bias[s] : 0.0f);
            __m512 yacc = _mm512_setzero_ps();
            for (int64_t r = 0; r < R1; r++) {
                for (int64_t i = 0; i < R2; i += 16) {
                    __mmask16 m = lanes(i, R2);
                    int64_t o = base + r * step + i;
                    __m512 v = _mm512_mul_ps(_mm512_sub_ps(_mm512_mul_ps(load_q(q + o, m), vs), vmean), vinv);
                    if (w)
                        v = _mm512_mul_ps(v, row_affine ? _mm512_maskz_loadu_ps(m, w + i) : vw);
                    if (bias)
                        v = _mm512_add_ps(v, row_affine ? _mm512_maskz_loadu_ps(m, bias + i) : vb);
                    if (rows) {
                        _mm512_mask_storeu_ps(row + i, m, v);
                        yacc = max_nan(yacc, _mm512_maskz_mov_ps(m, _mm512_abs_ps(v)));
                    }
                    if (y_out)
                        _mm512_mask_storeu_ps(y_out + o, m, v);
                }
            }
            if (yq) {       /* numerics.quantize of the row y, as the next GEMM's per-row quantizer */
                const float ya = reduce_max_nan(yacc), ys = ya / qmax_y;
                const __m512 ydiv = _mm512_set1_ps(ys == 0.0f ? 1.0f : ys);
                for (int64_t i = 0; i < R2; i += 16) {
                    __mmask16 m = lanes(i, R2);
                    __m512 v = quantize(_mm512_maskz_loadu_ps(m, row + i), ydiv, vqmax_y, _MM_FROUND_TO_NEAREST_INT);
                    _mm512_mask_cvtepi32_storeu_epi8(yq + base + i, m, _mm512_cvtps_epi32(v));
                }
                y_amax[s] = ya;
                y_scale[s] = finite_or_nan(ys);
            }
            if (yx) {       /* sqcompile.ops.shiftquant_outer's row maximum and quotients */
                const float r = reduce_max_nan(yacc);
                const __m512 vr = _mm512_set1_ps(r == 0.0f ? 1.0f : r);
                for (int64_t i = 0; i < R2; i += 16) {
                    __mmask16 m = lanes(i, R2);
                    __m512 v = _mm512_maskz_mov_ps(m, _mm512_div_ps(_mm512_maskz_loadu_ps(m, row + i), vr));
                    _mm512_mask_storeu_ps(yx + base + i, m, v);
                    _mm512_mask_storeu_ps(col + i, m, max_nan(_mm512_maskz_loadu_ps(m, col + i), _mm512_abs_ps(v)));
                }
                y_amax[s] = r == 0.0f ? 1.0f : r;
            }
            amax[s] = a;
            total[s] = t;
            deviation[s] = d;
        }
        free(row);
    }
    return failed;
}

SQ_VEC void add_to_doubles(double *col, __m512 v, __mmask16 m) {
    /* col[0:16] += v, in double, the lanes of m */
    __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
    __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    __mmask8 ml = (__mmask8)(m & 0xFF), mh = (__mmask8)(m >> 8);
    _mm512_mask_storeu_pd(col, ml, _mm512_add_pd(_mm512_maskz_loadu_pd(ml, col), lo));
    _mm512_mask_storeu_pd(col + 8, mh, _mm512_add_pd(_mm512_maskz_loadu_pd(mh, col + 8), hi));
}

SQ_VEC __m512 affine_of(const float *w, int row_affine, float per_slice, int64_t i, __mmask16 m) {
    return row_affine ? _mm512_maskz_loadu_ps(m, w + i) : _mm512_set1_ps(per_slice);
}

/* seed: numerics.hash_noise's seed times its spreading constant, wrapped to int32.  dx may be
   NULL (only the parameter sums); with `residual` (same layout as dx) dx is written with it
   added (a pre-norm block's residual gradient).  Parameter sums: row_affine = 0: sum_dy, sum_dyx [A * B]
   per slice; row_affine = 1: work [chunks, 2, R2] doubles, zeroed by the caller, each chunk's
   column sums (dyd, then dyd * xhat), which sq_l1_norm_chunk_sums adds up.  Returns nonzero
   when a thread's buffer could not be allocated. */
int sq_l1_norm_backward(const float *dy, const int8_t *q, const float *amax, const float *total,
                        const float *deviation, const float *w, int row_affine, int64_t A, int64_t R1, int64_t B,
                        int64_t R2, int center, float l1_scale, float eps, float qmax_x, float qmax_g, int32_t seed,
                        const float *residual, float *dx, float *sum_dy, float *sum_dyx, double *work, int64_t chunks,
                        int threads) {
    const layout L = {A, R1, B, R2};
    const float n = (float)(R1 * R2);
    const int64_t slices = A * B;
    const __m512 vqmax = _mm512_set1_ps(qmax_g);
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i vseed = _mm512_set1_epi32(seed), seed_lanes = hash_lanes(seed);
    const int aligned = R2 % 16 == 0;       /* every vector's first index a multiple of 16 */
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        /* the slice's quantized gradient (int8), and its g = dyd * w in row-affine mode */
        int8_t *dq = (int8_t *)malloc((size_t)(R1 * R2));
        if (!dq) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t c = 0; c < chunks; c++) {
            if (!dq)
                continue;
            double *col_dy = row_affine ? work + c * 2 * R2 : NULL, *col_dyx = row_affine ? col_dy + R2 : NULL;
            for (int64_t s = slices * c / chunks; s < slices * (c + 1) / chunks; s++) {
                const int64_t base = slice_base(L, s), step = B * R2;
                const float xs = finite_or_nan(amax[s] / qmax_x), mean = center ? total[s] / n : 0.0f;
                float sigma;
                const float inv = inv_denominator(deviation[s], n, l1_scale, eps, &sigma);
                const __m512 vxs = _mm512_set1_ps(xs), vmean = _mm512_set1_ps(mean), vinv = _mm512_set1_ps(inv);
                const float ga = slice_amax(dy, L, base), gscale = ga / qmax_g;
                const __m512 vdiv = _mm512_set1_ps(gscale == 0.0f ? 1.0f : gscale);
                const __m512 vgs = _mm512_set1_ps(finite_or_nan(gscale));
                const float ws = w && !row_affine ? w[s] : 1.0f;
                double s1 = 0.0, s2 = 0.0, sg = 0.0, sgx = 0.0, ss = 0.0;
                for (int64_t r = 0; r < R1; r++) {
                    __m512 a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
                    __m512 a4 = _mm512_setzero_ps(), a5 = _mm512_setzero_ps();
                    for (int64_t i = 0; i < R2; i += 16) {
                        __mmask16 m = lanes(i, R2);
                        int64_t o = base + r * step + i;
                        __m512i index = _mm512_add_epi32(_mm512_set1_epi32((int32_t)(uint32_t)o), lane);
                        __m512 v = _mm512_div_ps(_mm512_maskz_loadu_ps(m, dy + o), vdiv);
                        v = _mm512_add_ps(v, aligned ? hash_noise_aligned((uint32_t)o, seed, seed_lanes)
                                                     : hash_noise(index, vseed));
                        v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
                        __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
                        v = _mm512_min_ps(_mm512_max_ps(v, _mm512_sub_ps(_mm512_setzero_ps(), vqmax)), vqmax);
                        v = _mm512_mask_blend_ps(nan, v, _mm512_setzero_ps());
                        _mm_mask_storeu_epi8(dq + r * R2 + i, m, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v)));
                        __m512 d = _mm512_maskz_mov_ps(m, _mm512_mul_ps(v, vgs));
                        __m512 xh = _mm512_mul_ps(_mm512_sub_ps(_mm512_mul_ps(load_q(q + o, m), vxs), vmean), vinv);
                        __m512 dxh = _mm512_maskz_mov_ps(m, _mm512_mul_ps(d, xh));
                        a1 = _mm512_add_ps(a1, d);
                        a2 = _mm512_add_ps(a2, dxh);
                        a3 = _mm512_add_ps(a3, _mm512_maskz_mov_ps(m, sign_ps(xh)));
                        if (row_affine) {       /* g = dyd * w varies along the row */
                            __m512 wv = affine_of(w, 1, 1.0f, i, m);
                            a4 = _mm512_add_ps(a4, _mm512_mul_ps(d, wv));
                            a5 = _mm512_add_ps(a5, _mm512_mul_ps(dxh, wv));
                            add_to_doubles(col_dy + i, d, m);
                            add_to_doubles(col_dyx + i, dxh, m);
                        }
                    }
                    s1 += _mm512_reduce_add_ps(a1);
                    s2 += _mm512_reduce_add_ps(a2);
                    ss += _mm512_reduce_add_ps(a3);
                    if (row_affine) {
                        sg += _mm512_reduce_add_ps(a4);
                        sgx += _mm512_reduce_add_ps(a5);
                    }
                }
                if (!row_affine) {
                    sum_dy[s] = (float)s1;
                    sum_dyx[s] = (float)s2;
                    sg = ws * (float)s1;        /* g = dyd * w with w constant over the slice */
                    sgx = ws * (float)s2;
                }
                if (!dx)
                    continue;
                const float mean_g = center ? (float)sg / n : 0.0f, mean_sgn = center ? (float)ss / n : 0.0f;
                const float proj = (l1_scale * sigma * inv) * ((float)sgx / n);
                const __m512 vmg = _mm512_set1_ps(mean_g), vms = _mm512_set1_ps(mean_sgn);
                const __m512 vproj = _mm512_set1_ps(proj);
                for (int64_t r = 0; r < R1; r++) {
                    for (int64_t i = 0; i < R2; i += 16) {
                        __mmask16 m = lanes(i, R2);
                        int64_t o = base + r * step + i;
                        __m512 g = _mm512_mul_ps(_mm512_mul_ps(load_q(dq + r * R2 + i, m), vgs),
                                                 w ? affine_of(w, row_affine, ws, i, m) : _mm512_set1_ps(1.0f));
                        __m512 xh = _mm512_mul_ps(_mm512_sub_ps(_mm512_mul_ps(load_q(q + o, m), vxs), vmean), vinv);
                        __m512 sgn = _mm512_sub_ps(sign_ps(xh), vms);
                        g = _mm512_sub_ps(_mm512_sub_ps(g, vmg), _mm512_mul_ps(vproj, sgn));
                        g = _mm512_mul_ps(g, vinv);
                        if (residual)
                            g = _mm512_add_ps(g, _mm512_maskz_loadu_ps(m, residual + o));
                        _mm512_mask_storeu_ps(dx + o, m, g);
                    }
                }
            }
        }
        free(dq);
    }
    return failed;
}

/* sum_dy[r2], sum_dyx[r2] = sums over the chunks, in order, of work[c, 0 / 1, r2] */
void sq_l1_norm_chunk_sums(const double *work, int64_t chunks, int64_t R2, float *sum_dy, float *sum_dyx) {
    for (int64_t k = 0; k < 2; k++)
        for (int64_t i = 0; i < R2; i++) {
            double acc = 0.0;
            for (int64_t c = 0; c < chunks; c++)
                acc += work[(c * 2 + k) * R2 + i];
            (k ? sum_dyx : sum_dy)[i] = (float)acc;
        }
}
