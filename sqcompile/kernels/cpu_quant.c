/* CPU quantizers fused with what produces their input (AVX-512 F/BW/VL); see
 * sqcompile/kernels/cpu_quant.py.  First a GEMM output's gradient quantized for both of its
 * backward GEMMs (sq_outer_pair_ranges, sq_outer_pair_quantize): the two ShiftQuants with
 * outer scales (grad_outer_scale) of dY [B, L, S], as the graph composes them
 * (sqcompile.ops.shiftquant_outer over numerics.shiftquant, lowered for Inductor with
 * numerics.hash_noise).  Then a Linear's GELU with the next GEMM's input quantizer
 * (sq_gelu_quantize per row, sq_gelu_shiftquant with act_groups; further down).
 *
 *   "cols", for dX = dY W (the product over S):  y = dY * pk (the other operand's scales per
 *       column, pk [B, S]); outer_c = max |y| per row (0 taken as 1); x = y / outer_c;
 *       ShiftQuant of x with one channel per column (ranges_c = max |x| per column);
 *   "rows", for dW = dY^T X (the product over L): y = dY * pq (per row, pq [B, L]);
 *       outer_r = max |y| per column; x = y / outer_r; one channel per row.
 *
 * A convolution's output gradient [N, C, P] (`conv`, B = N, L = C, S = P positions) has the
 * same two quantizations with coarser outer maxima: its dW's ("cols": a channel per sample
 * and position, pk the input's scale per sample) one per output channel over the whole
 * batch, outer_c[l] = max over b of the rows' maxima; its dX's ("rows": a channel per
 * sample and output channel, pq the weight's scale per output channel) one per sample,
 * outer_r[b] = max over s of the columns' maxima.  A maximum of maxima is the maximum, so
 * pass 1 reduces its maxima once more (0 taken as 1 only then) and broadcasts them back into
 * outer_c [B, L] and outer_r [B, S]: passes 2 and 3 are the same.
 *
 * Each value is computed as those ops compute it (the same multiplies, IEEE divisions,
 * NaN-propagating maxima, the same hash), so the results are theirs bit for bit.  Three
 * passes over dY: the outer maxima (sq_outer_pair_ranges, pass 1), the channel ranges of the
 * quotients (pass 2), and, after numerics.shift_params has turned the ranges into
 * per-channel scales and multipliers, both quantizations (sq_outer_pair_quantize).
 *
 * The passes that reduce over rows (column maxima) give each thread a chunk of rows and a
 * partial maximum per column in `work` [B, chunks, S], combined afterwards: a maximum does
 * not depend on the order, so any number of threads gives the same bits.
 */
#include <math.h>
#include <stdlib.h>

#include "avx512.h"

static inline float one_if_zero(float r) { return r == 0.0f ? 1.0f : r; }

static void fill(float *p, int64_t n, float value) {
    for (int64_t s = 0; s < n; s += 16)
        _mm512_mask_storeu_ps(p + s, lanes(s, n), _mm512_set1_ps(value));
}

/* out[b, s] = max over the chunks of work[b, chunk, s] (then 0 -> 1 when `ones`). */
static void combine(const float *work, int64_t B, int64_t chunks, int64_t S, int ones, float *out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < B; b++) {
        for (int64_t s = 0; s < S; s += 16) {
            __mmask16 m = lanes(s, S);
            __m512 acc = _mm512_maskz_loadu_ps(m, work + b * chunks * S + s);
            for (int64_t c = 1; c < chunks; c++)
                acc = max_nan(acc, _mm512_maskz_loadu_ps(m, work + (b * chunks + c) * S + s));
            if (ones)
                acc = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(acc, _mm512_setzero_ps(), _CMP_EQ_OQ), acc,
                                           _mm512_set1_ps(1.0f));
            _mm512_mask_storeu_ps(out + b * S + s, m, acc);
        }
    }
}

static inline float max_nan1(float a, float b) { return isnan(a) || isnan(b) ? NAN : a > b ? a : b; }

/* A convolution's outer maxima from pass 1's (see the top): outer_c [B, L] := its maximum
 * over b, outer_r [B, S] := its maximum over s, each then 0 -> 1. */
static void coarse_outer(float *outer_c, float *outer_r, int64_t B, int64_t L, int64_t S) {
    for (int64_t l = 0; l < L; l++) {
        float m = outer_c[l];
        for (int64_t b = 1; b < B; b++) m = max_nan1(m, outer_c[b * L + l]);
        for (int64_t b = 0; b < B; b++) outer_c[b * L + l] = one_if_zero(m);
    }
    for (int64_t b = 0; b < B; b++) {
        float m = outer_r[b * S];
        for (int64_t s = 1; s < S; s++) m = max_nan1(m, outer_r[b * S + s]);
        fill(outer_r + b * S, S, one_if_zero(m));
    }
}

/* Rows [first, last) of batch entry b; `chunks` split each entry's L rows. */
static inline void chunk_rows(int64_t task, int64_t L, int64_t chunks, int64_t *b, int64_t *first, int64_t *last) {
    int64_t c = task % chunks;
    *b = task / chunks;
    *first = L * c / chunks;
    *last = L * (c + 1) / chunks;
}

/* Pass 1: outer maxima (rows of |dY pk| -> outer_c [B, L], columns of |dY pq| -> outer_r
   [B, S]; 0 taken as 1); pass 2: the channel ranges of the quotients (columns of
   |dY pk / outer_c| -> ranges_c [B, S], rows of |dY pq / outer_r| -> ranges_r [B, L]).
   work: chunks * B * S floats. */
void sq_outer_pair_ranges(const float *dy, const float *pk, const float *pq, int64_t B, int64_t L, int64_t S,
                          int64_t chunks, int conv, float *work, float *outer_c, float *outer_r, float *ranges_c,
                          float *ranges_r, int threads) {
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t task = 0; task < B * chunks; task++) {
        int64_t b, first, last;
        chunk_rows(task, L, chunks, &b, &first, &last);
        const float *pkb = pk + b * S;
        float *col = work + task * S;
        fill(col, S, 0.0f);
        for (int64_t l = first; l < last; l++) {
            const float *row = dy + (b * L + l) * S;
            __m512 vq = _mm512_set1_ps(pq[b * L + l]), mc = _mm512_setzero_ps();
            for (int64_t s = 0; s < S; s += 16) {
                __mmask16 m = lanes(s, S);
                __m512 x = _mm512_maskz_loadu_ps(m, row + s);
                __m512 yc = _mm512_abs_ps(_mm512_mul_ps(x, _mm512_maskz_loadu_ps(m, pkb + s)));
                __m512 yr = _mm512_abs_ps(_mm512_mul_ps(x, vq));
                mc = max_nan(mc, _mm512_maskz_mov_ps(m, yc));
                _mm512_mask_storeu_ps(col + s, m, max_nan(_mm512_maskz_loadu_ps(m, col + s), yr));
            }
            outer_c[b * L + l] = conv ? reduce_max_nan(mc) : one_if_zero(reduce_max_nan(mc));
        }
    }
    combine(work, B, chunks, S, !conv, outer_r, threads);
    if (conv)
        coarse_outer(outer_c, outer_r, B, L, S);
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t task = 0; task < B * chunks; task++) {
        int64_t b, first, last;
        chunk_rows(task, L, chunks, &b, &first, &last);
        const float *pkb = pk + b * S, *orr = outer_r + b * S;
        float *col = work + task * S;
        fill(col, S, 0.0f);
        for (int64_t l = first; l < last; l++) {
            const float *row = dy + (b * L + l) * S;
            __m512 vq = _mm512_set1_ps(pq[b * L + l]), voc = _mm512_set1_ps(outer_c[b * L + l]);
            __m512 mr = _mm512_setzero_ps();
            for (int64_t s = 0; s < S; s += 16) {
                __mmask16 m = lanes(s, S);
                __m512 x = _mm512_maskz_loadu_ps(m, row + s);
                __m512 qc = _mm512_div_ps(_mm512_mul_ps(x, _mm512_maskz_loadu_ps(m, pkb + s)), voc);
                __m512 qr = _mm512_div_ps(_mm512_mul_ps(x, vq), _mm512_mask_loadu_ps(_mm512_set1_ps(1.0f), m, orr + s));
                _mm512_mask_storeu_ps(col + s, m, max_nan(_mm512_maskz_loadu_ps(m, col + s), _mm512_abs_ps(qc)));
                mr = max_nan(mr, _mm512_maskz_mov_ps(m, _mm512_abs_ps(qr)));
            }
            ranges_r[b * L + l] = reduce_max_nan(mr);
        }
    }
    combine(work, B, chunks, S, 0, ranges_c, threads);
}

/* numerics.shift_params over n channel ranges, bit for bit: R = the largest range (NaN if any
 * is), each channel's group g = the count of j in 1 .. groups-1 with r * 2^j <= R (groups-1
 * everywhere when R is not finite), mult = 2^(groups-1-g), scale = base * mult, and
 * *base = R / 2^(groups-1) / qmax (IEEE divisions; the first is exact).  The op's dozen
 * tensor ops over a conv's dW ranges (N x P channels) took half a millisecond a call. */
void sq_shift_params(const float *ranges, int64_t n, int groups, float qmax, float *mult, float *scale,
                     float *base) {
    float pow2[31];                               /* groups fit int8 (fits_int8): far fewer than 31 */
    for (int j = 0; j < groups; j++) pow2[j] = (float)(1u << j);
    float R = n ? ranges[0] : 0.0f;
    for (int64_t i = 1; i < n; i++) R = max_nan1(R, ranges[i]);
    const float b = R / pow2[groups - 1] / qmax;
    const int finite = isfinite(R);
    for (int64_t i = 0; i < n; i++) {
        int g = groups - 1;
        if (finite) {
            g = 0;
            for (int j = 1; j < groups; j++) g += ranges[i] * pow2[j] <= R;
        }
        mult[i] = pow2[groups - 1 - g];
        scale[i] = b * mult[i];
    }
    *base = b;
}

SQ_VEC __m512 divisor(__m512 scale) {          /* numerics.safe_div_scale: a scale of 0 divides as 1 */
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(scale, _mm512_setzero_ps(), _CMP_EQ_OQ), scale,
                                _mm512_set1_ps(1.0f));
}

SQ_VEC __m512i clamp_expand(__m512 q, __m512 mult, __m512 qmax) {
    /* numerics.quantize_values' clamp (NaN -> 0) of rounded quotients q, then q * multiplier */
    __mmask16 nan = _mm512_cmp_ps_mask(q, q, _CMP_UNORD_Q);
    q = _mm512_min_ps(_mm512_max_ps(q, _mm512_sub_ps(_mm512_setzero_ps(), qmax)), qmax);
    q = _mm512_mask_blend_ps(nan, q, _mm512_setzero_ps());
    return _mm512_cvtps_epi32(_mm512_mul_ps(q, mult));
}

SQ_VEC __m512i expand(__m512 x, __m512 scale, __m512 mult, __m512 u, __m512 qmax) {
    /* numerics.quantize_values (stochastic) then q * multiplier: floor(x / scale + u),
       clamped, NaN -> 0 (scale 0 divides as 1).  IEEE divisions, as the graph's: a reciprocal
       with one FMA correction (Markstein's, exact where nothing underflows) and a range check
       per vector measured 30% slower on this CPU's divider. */
    __m512 q = _mm512_roundscale_ps(_mm512_add_ps(_mm512_div_ps(x, divisor(scale)), u),
                                    _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    return clamp_expand(q, mult, qmax);
}

SQ_VEC __m512i expand_nearest(__m512 x, __m512 scale, __m512 mult, __m512 qmax) {
    /* the same with nearest rounding (torch.round: half to even) */
    __m512 q = _mm512_roundscale_ps(_mm512_div_ps(x, divisor(scale)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return clamp_expand(q, mult, qmax);
}

/* Pass 3: both quantizations; scale_* and mult_* are shift_params' per-channel scales and
   multipliers (columns [B, S], rows [B, L]); seed_* numerics.hash_noise's seeds, already
   multiplied by its spreading constant.  e_c, e_r [B, L, S] int8. */
void sq_outer_pair_quantize(const float *dy, const float *pk, const float *pq, const float *outer_c,
                            const float *outer_r, const float *scale_c, const float *mult_c, const float *scale_r,
                            const float *mult_r, int32_t seed_c, int32_t seed_r, float qmax, int64_t B, int64_t L,
                            int64_t S, int8_t *e_c, int8_t *e_r, int threads) {
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i vsc = _mm512_set1_epi32(seed_c), vsr = _mm512_set1_epi32(seed_r);
    const __m512i lanes_c = hash_lanes(seed_c), lanes_r = hash_lanes(seed_r);
    const int aligned = S % 16 == 0;     /* every vector's first index a multiple of 16 */
    const __m512 vqmax = _mm512_set1_ps(qmax);
#pragma omp parallel for num_threads(threads) schedule(dynamic, 16)
    for (int64_t row = 0; row < B * L; row++) {
        int64_t b = row / L;
        const float *x = dy + row * S, *pkb = pk + b * S, *orr = outer_r + b * S;
        const float *sc = scale_c + b * S, *mc = mult_c + b * S;
        const __m512 vq = _mm512_set1_ps(pq[row]), voc = _mm512_set1_ps(outer_c[row]);
        const __m512 vsr_ = _mm512_set1_ps(scale_r[row]), vmr = _mm512_set1_ps(mult_r[row]);
        for (int64_t s = 0; s < S; s += 16) {
            __mmask16 m = lanes(s, S);
            __m512 v = _mm512_maskz_loadu_ps(m, x + s);
            const uint32_t base = (uint32_t)(row * S + s);
            __m512i index = _mm512_add_epi32(_mm512_set1_epi32((int32_t)base), lane);
            __m512 uc = aligned ? hash_noise_aligned(base, seed_c, lanes_c) : hash_noise(index, vsc);
            __m512 ur = aligned ? hash_noise_aligned(base, seed_r, lanes_r) : hash_noise(index, vsr);
            __m512 qc = _mm512_div_ps(_mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, pkb + s)), voc);
            __m512i ec = expand(qc, _mm512_maskz_loadu_ps(m, sc + s), _mm512_maskz_loadu_ps(m, mc + s), uc, vqmax);
            _mm512_mask_cvtepi32_storeu_epi8(e_c + row * S + s, m, ec);
            __m512 qr = _mm512_div_ps(_mm512_mul_ps(v, vq), _mm512_mask_loadu_ps(_mm512_set1_ps(1.0f), m, orr + s));
            __m512i er = expand(qr, vsr_, vmr, ur, vqmax);
            _mm512_mask_cvtepi32_storeu_epi8(e_r + row * S + s, m, er);
        }
    }
}

/* ------------------------------------------------------------------------------------------
 * A Linear's GELU and the next GEMM's input quantizer (sq_gelu_quantize): for each row of
 * int32 accumulators acc[row, 0:N] (the int8 product X W), with the row's scale sa[row], the
 * columns' scales sb[batch, n] and the bias (may be NULL):
 *
 *     pre = float(acc) * (sa * sb) + bias                 -> pre (float32, saved for backward)
 *     h = (pre * 0.5) * (1 + erf(pre * sqrt(1/2)))        GELU, as Inductor decomposes it
 *     amax = max |h|; scale = amax / qmax; q = clamp(rne(h / (scale or 1)), -qmax, qmax)
 *                                                         -> q (int8), scale, amax per row
 *
 * in the order and precision of the unfused ops (each multiply and add rounded: built with
 * -ffp-contract=off), except for erf: PyTorch's vectorized CPU erf (Abramowitz & Stegun
 * 7.1.26 with its coefficients, as at::vec computes it) over our exp, within an ulp of
 * Sleef's, so h agrees to a few ulps and q but where a value lies that close to a rounding
 * boundary.  A row holding a NaN gives q 0, scale and amax NaN, as numerics.quantize does.
 * h lives in a row buffer in cache; pre and q are written once.
 * ------------------------------------------------------------------------------------------ */
SQ_VEC __m512 xor_ps(__m512 a, __m512 b) {            /* without AVX512-DQ's _mm512_xor_ps */
    return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(a), _mm512_castps_si512(b)));
}

/* erf(x), and in *e the exp(-x^2) it is computed from */
SQ_VEC __m512 erf_exp(__m512 x, __m512 *e) {
    const __m512 one = _mm512_set1_ps(1.0f), neg_zero = _mm512_set1_ps(-0.0f);
    __m512 ax = _mm512_abs_ps(x), sign = xor_ps(x, ax);
    __m512 t = _mm512_div_ps(one, _mm512_fmadd_ps(_mm512_set1_ps(0.3275911f), ax, one));
    __m512 r = _mm512_fmadd_ps(_mm512_set1_ps(1.061405429f), t, _mm512_set1_ps(-1.453152027f));
    r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(1.421413741f));
    r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(-0.284496736f));
    r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(0.254829592f));
    *e = exp_nonpositive(xor_ps(neg_zero, _mm512_mul_ps(x, x)));
    __m512 v = _mm512_fmadd_ps(_mm512_mul_ps(xor_ps(neg_zero, *e), t), r, one);
    return xor_ps(sign, v);
}

SQ_VEC __m512 erf_vec(__m512 x) {
    __m512 e;
    return erf_exp(x, &e);
}

SQ_VEC __m512 dequant_bias(const int32_t *a, __m512 vsa, const float *sb, const float *bias, int64_t n,
                           __mmask16 m) {
    /* pre = float(acc) * (sa * sb) [+ bias] at the 16 columns from n */
    __m512 x = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(m, a + n)),
                             _mm512_mul_ps(vsa, _mm512_maskz_loadu_ps(m, sb + n)));
    return bias ? _mm512_add_ps(x, _mm512_maskz_loadu_ps(m, bias + n)) : x;
}

SQ_VEC __m512 gelu_vec(__m512 x) {                    /* (x * 0.5) * (1 + erf(x * sqrt(1/2))) */
    return _mm512_mul_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.5f)),
                         _mm512_add_ps(_mm512_set1_ps(1.0f),
                                       erf_vec(_mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752440f)))));
}

/* One row: pre (stored), h = gelu(pre) into h[0:N]; returns max |h|, NaN if any h is NaN. */
static float gelu_row_values(const int32_t *a, float sa, const float *sb, const float *bias, int64_t N, float *pre,
                             float *h) {
    const __m512 vsa = _mm512_set1_ps(sa);
    __m512 vmax = _mm512_setzero_ps();
    __mmask16 nan = 0;
    for (int64_t n = 0; n < N; n += 16) {
        __mmask16 m = lanes(n, N);
        __m512 x = dequant_bias(a, vsa, sb, bias, n, m);
        _mm512_mask_storeu_ps(pre + n, m, x);
        __m512 g = _mm512_maskz_mov_ps(m, gelu_vec(x));
        _mm512_mask_storeu_ps(h + n, m, g);
        nan |= _mm512_cmp_ps_mask(g, g, _CMP_UNORD_Q);
        vmax = _mm512_max_ps(vmax, _mm512_abs_ps(g));
    }
    return nan ? NAN : _mm512_reduce_max_ps(vmax);
}

static void gelu_row(const int32_t *a, float sa, const float *sb, const float *bias, int64_t N, float qmax,
                     float *pre, float *h, int8_t *q, float *scale_out, float *amax_out) {
    float amax = gelu_row_values(a, sa, sb, bias, N, pre, h);
    float scale = amax / qmax;
    const __m512 vs = _mm512_set1_ps(scale), one = _mm512_set1_ps(1.0f), vqmax = _mm512_set1_ps(qmax);
    for (int64_t n = 0; n < N; n += 16) {
        __mmask16 m = lanes(n, N);
        _mm512_mask_cvtepi32_storeu_epi8(q + n, m, expand_nearest(_mm512_maskz_loadu_ps(m, h + n), vs, one, vqmax));
    }
    *scale_out = isfinite(scale) ? scale : NAN;
    *amax_out = amax;
}

/* acc [B, M, N] int32, sa [B, M], sb [B, N], bias [N] or NULL; pre [B, M, N], q [B, M, N],
   scale_out and amax_out [B, M]. */
int sq_gelu_quantize(const int32_t *acc, const float *sa, const float *sb, const float *bias, int64_t B, int64_t M,
                     int64_t N, float qmax, float *pre, int8_t *q, float *scale_out, float *amax_out, int threads) {
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *h = aligned_alloc(64, (size_t)((N + 15) / 16 * 16) * sizeof(float));
        if (!h) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 16)
        for (int64_t row = 0; row < B * M; row++) {
            if (!h)
                continue;
            int64_t b = row / M;
            gelu_row(acc + row * N, sa[row], sb + b * N, bias, N, qmax, pre + row * N, h, q + row * N,
                     scale_out + row, amax_out + row);
        }
        free(h);
    }
    return failed ? -1 : 0;
}

/* The second half of an outer-scaled ShiftQuant over the columns (act_groups), from the
 * quotients x [C * MC, N] (y / its row's maximum; C channel batches of MC rows each) and
 * their partial column maxima work [C, chunks, N] (any split of each batch's rows, NaN
 * propagating): ranges [C, N], numerics.shift_params over them (mult, scale [C, N], *base)
 * and e = clamp(rne(x / (scale or 1)), -qmax, qmax) * mult as int8.  sq_gelu_shiftquant
 * below and the L1 norm's forward (cpu_norm.c, with its per-thread maxima) end with it. */
void sq_shiftquant_quotients(const float *x, const float *work, int64_t C, int64_t chunks, int64_t MC, int64_t N,
                             int groups, float qmax, float *ranges, float *mult, float *scale, float *base,
                             int8_t *e, int threads) {
    combine(work, C, chunks, N, 0, ranges, threads);
    sq_shift_params(ranges, C * N, groups, qmax, mult, scale, base);
    const __m512 vqmax = _mm512_set1_ps(qmax);
#pragma omp parallel for num_threads(threads) schedule(dynamic, 16)
    for (int64_t row = 0; row < C * MC; row++) {
        const float *xr = x + row * N, *sc = scale + row / MC * N, *mu = mult + row / MC * N;
        for (int64_t n = 0; n < N; n += 16) {
            __mmask16 m = lanes(n, N);
            __m512i v = expand_nearest(_mm512_maskz_loadu_ps(m, xr + n), _mm512_maskz_loadu_ps(m, sc + n),
                                       _mm512_maskz_loadu_ps(m, mu + n), vqmax);
            _mm512_mask_cvtepi32_storeu_epi8(e + row * N + n, m, v);
        }
    }
}

/* ------------------------------------------------------------------------------------------
 * The same GELU with ShiftQuant for the next GEMM (sq_gelu_shiftquant; the act_groups option):
 * the next GEMM's input quantized as sqcompile.ops.shiftquant_outer composes it with nearest
 * rounding, one outer scale per row and ShiftQuant over the columns:
 *
 *     pre, h as above                                     -> pre
 *     r = max |h| per row, 0 taken as 1                   -> outer [B, M]
 *     x = h / r
 *     ranges[c, n] = max |x[row, n]| over the rows of channel batch c: acc's batch entry b
 *                    (per_batch) or all B * M rows (a Linear's [1, rows, N])
 *     mult, scale, *base = numerics.shift_params(ranges)  (sq_shift_params)
 *     e = clamp(rne(x / (scale or 1)), -qmax, qmax) * mult  -> e (int8: groups fit int8)
 *
 * Two passes over the rows: the first computes a row's pre, h (kept in x), its maximum, then
 * x = h / r in place while the row is in cache, and the chunk's column maxima (work [C,
 * chunks, N], combined as in sq_outer_pair_ranges: any thread count, the same bits); the
 * second quantizes x (sq_shiftquant_quotients).  Each value as the graph's ops compute it
 * but h (the GELU's erf, as in sq_gelu_quantize), so the results are the composition's on
 * the kernel's h bit for bit.
 * ------------------------------------------------------------------------------------------ */
void sq_gelu_shiftquant(const int32_t *acc, const float *sa, const float *sb, const float *bias, int64_t B, int64_t M,
                        int64_t N, int per_batch, int64_t chunks, int groups, float qmax, float *pre, float *x,
                        float *outer, float *work, float *ranges, float *mult, float *scale, float *base, int8_t *e,
                        int threads) {
    const int64_t C = per_batch ? B : 1, MC = B * M / C;      /* channel batches, rows in each */
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t task = 0; task < C * chunks; task++) {
        int64_t c, first, last;
        chunk_rows(task, MC, chunks, &c, &first, &last);
        float *col = work + task * N;
        fill(col, N, 0.0f);
        for (int64_t row = c * MC + first; row < c * MC + last; row++) {
            float *xr = x + row * N;
            const float r = one_if_zero(gelu_row_values(acc + row * N, sa[row], sb + row / M * N, bias, N,
                                                        pre + row * N, xr));
            const __m512 vr = _mm512_set1_ps(r);
            outer[row] = r;
            for (int64_t n = 0; n < N; n += 16) {
                __mmask16 m = lanes(n, N);
                __m512 q = _mm512_maskz_mov_ps(m, _mm512_div_ps(_mm512_maskz_loadu_ps(m, xr + n), vr));
                _mm512_mask_storeu_ps(xr + n, m, q);
                _mm512_mask_storeu_ps(col + n, m, max_nan(_mm512_maskz_loadu_ps(m, col + n), _mm512_abs_ps(q)));
            }
        }
    }
    sq_shiftquant_quotients(x, work, C, chunks, MC, N, groups, qmax, ranges, mult, scale, base, e, threads);
}

/* ------------------------------------------------------------------------------------------
 * A GELU's backward on a dequantized GEMM result (sq_gelu_backward): for int32 accumulators
 * acc[row, 0:N] (the int8 product giving the GELU output's gradient), the row's scale
 * sa[row], the columns' scales sb[batch, n] and the GELU's saved input pre[row, n]:
 *
 *     g = float(acc) * (sa * sb)                          the gradient, as the graph dequantizes it
 *     dx = g * (0.5 * (1 + erf(pre / sqrt 2)) + pre * exp(-pre^2 / 2) / sqrt(2 pi))
 *                                                         -> out (float32)
 *     sums[n] = sum over every row of dx[row, n]          (a bias gradient; sums may be NULL)
 *
 * g bit for bit; the GELU's derivative to a few ulps: erf is PyTorch's vectorized CPU formula
 * (as in sq_gelu_quantize), and the density's exp is the one erf computes, exp(-(pre/sqrt 2)^2),
 * where the graph evaluates exp(pre * pre * -0.5) again (an ulp or two apart in the argument).
 * The sums run over fixed chunks of SUM_ROWS rows (rows in order within a chunk, then the
 * chunks in order), so any thread count gives the same bits; work holds chunks * N floats.
 * SUM_ROWS is cpu_quant.py's SUM_ROWS, a constant here: passed as an argument, it let the
 * plain-C portable build's compiler order the sums' additions otherwise, and a NaN sum came out
 * with another sign bit than the AVX-512 build's (tests/test_native.py).
 * ------------------------------------------------------------------------------------------ */
#define SUM_ROWS 64

SQ_VEC __m512 gelu_derivative(__m512 x) {
    __m512 e, erf = erf_exp(_mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752440f)), &e);
    __m512 cdf = _mm512_mul_ps(_mm512_add_ps(erf, _mm512_set1_ps(1.0f)), _mm512_set1_ps(0.5f));
    __m512 pdf = _mm512_mul_ps(e, _mm512_set1_ps(0.3989422804014327f));
    return _mm512_add_ps(cdf, _mm512_mul_ps(x, pdf));
}

/* acc, pre, out [B, M, N]; sa [B, M], sb [B, N]; sums [N] or NULL; work [cdiv(B * M, SUM_ROWS), N]. */
void sq_gelu_backward(const int32_t *acc, const float *sa, const float *sb, const float *pre, int64_t B, int64_t M,
                      int64_t N, float *out, float *sums, float *work, int threads) {
    const int64_t rows = B * M, chunks = (rows + SUM_ROWS - 1) / SUM_ROWS;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t first = c * SUM_ROWS, last = first + SUM_ROWS < rows ? first + SUM_ROWS : rows;
        float *col = work + c * N;
        if (sums)
            fill(col, N, 0.0f);
        for (int64_t row = first; row < last; row++) {
            const int32_t *a = acc + row * N;
            const float *p = pre + row * N, *sbb = sb + (row / M) * N;
            float *o = out + row * N;
            const __m512 vsa = _mm512_set1_ps(sa[row]);
            for (int64_t n = 0; n < N; n += 16) {
                __mmask16 m = lanes(n, N);
                __m512 g = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(m, a + n)),
                                         _mm512_mul_ps(vsa, _mm512_maskz_loadu_ps(m, sbb + n)));
                __m512 dx = _mm512_mul_ps(g, gelu_derivative(_mm512_maskz_loadu_ps(m, p + n)));
                _mm512_mask_storeu_ps(o + n, m, dx);
                if (sums)
                    _mm512_mask_storeu_ps(col + n, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, col + n), dx));
            }
        }
    }
    if (!sums)
        return;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n += 16) {
        __mmask16 m = lanes(n, N);
        __m512 total = _mm512_setzero_ps();
        for (int64_t c = 0; c < chunks; c++)
            total = _mm512_add_ps(total, _mm512_maskz_loadu_ps(m, work + c * N + n));
        _mm512_mask_storeu_ps(sums + n, m, total);
    }
}
