/* Quantized attention on CPU, one row of scores at a time (AVX-512 F/BW/VL): the softmax and
 * P's quantizer (sq_attention_probs), the softmax's backward (sq_attention_probs_backward)
 * and dS's two outer-scaled ShiftQuants (sq_ds_ranges, sq_ds_quantize); see
 * sqcompile/kernels/cpu_attention.py.
 *
 * sq_attention_probs: for each row of int32 scores acc[row, 0:S] (the int8 product Q K^T),
 * with the row's scale sa[row] and the columns' scales sb[batch, s]:
 *
 *     x = (float(acc) * (sa * sb)) * c        the dequantized, scaled scores
 *     x = -inf where s > l (causal)           the mask
 *     P = exp(x - max x) / sum exp(x - max x) the softmax          -> P (float32)
 *     amax = max P = 1 / sum                  (the row's max has exp(0) = 1)
 *     scale = amax / qmax; q = clamp(rne(P / (scale or 1)), -qmax, qmax)   -> q (int8)
 *
 * each operation in the order and precision of the unfused ops (sqcompile.ops.quantized_sdpa
 * and numerics.quantize), so the results are theirs except for exp: ours is within 1 ulp of
 * the exact value (range reduction x = n ln2 + r, |r| <= ln2/2, degree-7 polynomial), as
 * PyTorch's vectorized exp is, but not bit for bit the same.  A row whose unmasked scores
 * hold a NaN, or whose maximum is infinite, gives what the unfused ops give: P all NaN, q 0,
 * scale and amax NaN.  One pass over the row computes the maximum, one the exponentials and
 * their sum, one P and q: the row stays in the first cache level; masked entries are
 * written as zeros without computing them.
 *
 * Rows are shared among `threads` OpenMP threads (torch's own pool: -fopenmp links the
 * libgomp torch loaded).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

static inline __m512 exp_nonpositive(__m512 x) {
    /* exp(x) for x <= 0 or x = -inf; below -104 the result is 0 (the float32 exp underflows
       there), between -104 and -87.3 it is a subnormal, as the exact value rounds. */
    const __m512 lo = _mm512_set1_ps(-104.0f);
    __m512 xc = _mm512_max_ps(x, lo);
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), xc);     /* exact */
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    __m512 y = _mm512_scalef_ps(p, n);                 /* p * 2**n, subnormals rounded */
    __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
    return _mm512_mask_blend_ps(under, y, _mm512_setzero_ps());
}

static inline __mmask16 lanes(int64_t from, int64_t to) {
    /* the lanes of the 16 elements at `from` that lie below `to` */
    int64_t n = to - from;
    return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1u);
}

static void one_row(const int32_t *a, float sa, const float *sb, float c, int64_t S, int64_t n, float qmax,
                    float *p, int8_t *q, float *scale_out, float *amax_out) {
    /* n: the unmasked prefix of the row (S without a mask) */
    const __m512 vsa = _mm512_set1_ps(sa), vc = _mm512_set1_ps(c), ninf = _mm512_set1_ps(-INFINITY);
    __m512 vmax = ninf;
    __mmask16 nan = 0;
    int64_t s;
    for (s = 0; s < n; s += 16) {
        __mmask16 m = lanes(s, n);
        __m512 v = _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(m, a + s));
        v = _mm512_mul_ps(_mm512_mul_ps(v, _mm512_mul_ps(vsa, _mm512_maskz_loadu_ps(m, sb + s))), vc);
        nan |= _mm512_mask_cmp_ps_mask(m, v, v, _CMP_UNORD_Q);
        v = _mm512_mask_blend_ps(m, ninf, v);
        _mm512_mask_storeu_ps(p + s, m, v);
        vmax = _mm512_max_ps(vmax, v);
    }
    float mx = _mm512_reduce_max_ps(vmax);
    if (nan || !isfinite(mx)) {        /* x - max is NaN somewhere in the unfused softmax: all NaN */
        const __m512 vnan = _mm512_set1_ps(NAN);
        for (s = 0; s < S; s += 16) {
            __mmask16 m = lanes(s, S);
            _mm512_mask_storeu_ps(p + s, m, vnan);
            _mm512_mask_cvtepi32_storeu_epi8(q + s, m, _mm512_setzero_si512());
        }
        *scale_out = NAN;
        *amax_out = NAN;
        return;
    }
    const __m512 vm = _mm512_set1_ps(mx);
    __m512 vsum = _mm512_setzero_ps();
    for (s = 0; s < n; s += 16) {
        __mmask16 m = lanes(s, n);
        __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p + s), vm));
        e = _mm512_maskz_mov_ps(m, e);
        _mm512_mask_storeu_ps(p + s, m, e);
        vsum = _mm512_add_ps(vsum, e);
    }
    float sum = _mm512_reduce_add_ps(vsum);
    float amax = 1.0f / sum;            /* = max P: rounding is monotone and the max e is 1 */
    float scale = amax / qmax;
    float divisor = scale == 0.0f ? 1.0f : scale;
    const __m512 vs = _mm512_set1_ps(sum), vd = _mm512_set1_ps(divisor);
    const __m512 hi = _mm512_set1_ps(qmax), lo = _mm512_set1_ps(-qmax);
    for (s = 0; s < n; s += 16) {
        __mmask16 m = lanes(s, n);
        __m512 pv = _mm512_div_ps(_mm512_maskz_loadu_ps(m, p + s), vs);
        _mm512_mask_storeu_ps(p + s, m, pv);
        __m512 v = _mm512_roundscale_ps(_mm512_div_ps(pv, vd), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
        _mm512_mask_cvtepi32_storeu_epi8(q + s, m, _mm512_cvtps_epi32(v));
    }
    const __m512 zero = _mm512_setzero_ps();
    for (s = n; s < S; s += 16) {      /* masked: exp(-inf) / sum = 0, which quantizes to 0 */
        __mmask16 m = lanes(s, S);
        _mm512_mask_storeu_ps(p + s, m, zero);
        _mm512_mask_cvtepi32_storeu_epi8(q + s, m, _mm512_setzero_si512());
    }
    *scale_out = isfinite(scale) ? scale : NAN;
    *amax_out = amax;
}

/* acc [B, L, S] int32, sa [B, L], sb [B, S] float32 (contiguous); P [B, L, S], q [B, L, S],
   scale_out and amax_out [B, L]. */
void sq_attention_probs(const int32_t *acc, const float *sa, const float *sb, float c, int64_t B, int64_t L,
                        int64_t S, int causal, float qmax, float *P, int8_t *q, float *scale_out, float *amax_out,
                        int threads) {
    int64_t rows = B * L;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 16)
    for (int64_t row = 0; row < rows; row++) {
        int64_t b = row / L, l = row % L;
        int64_t n = causal ? (l + 1 < S ? l + 1 : S) : S;
        one_row(acc + row * S, sa[row], sb + b * S, c, S, n, qmax, P + row * S, q + row * S, scale_out + row,
                amax_out + row);
    }
}

/* The softmax's backward, per row: with g = float(acc) * (sa * sb) (dP, dequantized) and the
   probabilities P,
       dS = ((g * P) - P * sum(g * P)) -> 0 where mask -> * c
   in the order of the unfused ops (aten._softmax_backward_data's decomposition, masked_fill,
   the scale's multiply); only the row sum's order of additions differs.  acc [B, L, S]
   int32, sa [B, L], sb [B, S], P [B, L, S] float32; mask (may be NULL) bytes [., L, S] with
   batch stride mask_bstride (0: one mask for all); dS [B, L, S]. */
static void one_row_backward(const int32_t *a, float sa, const float *sb, const float *p, const uint8_t *mask,
                             float c, int64_t S, float *ds) {
    const __m512 vsa = _mm512_set1_ps(sa);
    __m512 vsum = _mm512_setzero_ps();
    int64_t s;
    for (s = 0; s < S; s += 16) {      /* the masked entries are in the sum too, as unfused */
        __mmask16 m = lanes(s, S);
        __m512 g = _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(m, a + s));
        g = _mm512_mul_ps(g, _mm512_mul_ps(vsa, _mm512_maskz_loadu_ps(m, sb + s)));
        __m512 gp = _mm512_mul_ps(g, _mm512_maskz_loadu_ps(m, p + s));
        _mm512_mask_storeu_ps(ds + s, m, gp);
        vsum = _mm512_add_ps(vsum, gp);
    }
    const __m512 vt = _mm512_set1_ps(_mm512_reduce_add_ps(vsum)), vc = _mm512_set1_ps(c);
    for (s = 0; s < S; s += 16) {
        __mmask16 m = lanes(s, S), keep = m;
        if (mask)
            keep = _mm512_mask_cmpeq_epi32_mask(m, _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, mask + s)),
                                                _mm512_setzero_si512());
        __m512 d = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, ds + s), _mm512_mul_ps(_mm512_maskz_loadu_ps(m, p + s), vt));
        d = _mm512_maskz_mov_ps(keep, d);                  /* masked_fill(mask, 0) */
        _mm512_mask_storeu_ps(ds + s, m, _mm512_mul_ps(d, vc));
    }
}

void sq_attention_probs_backward(const int32_t *acc, const float *sa, const float *sb, const float *P,
                                 const uint8_t *mask, int64_t mask_bstride, float c, int64_t B, int64_t L, int64_t S,
                                 float *dS, int threads) {
    int64_t rows = B * L;
#pragma omp parallel for num_threads(threads) schedule(static, 16)
    for (int64_t row = 0; row < rows; row++) {
        int64_t b = row / L, l = row % L;
        const uint8_t *m = mask ? mask + b * mask_bstride + l * S : 0;
        one_row_backward(acc + row * S, sa[row], sb + b * S, P + row * S, m, c, S, dS + row * S);
    }
}

/* The two ShiftQuants of attention's dS with their outer scales (grad_outer_scale), as the
   graph composes them (sqcompile.ops.shiftquant_outer over numerics.shiftquant, lowered for
   Inductor with numerics.hash_noise): for dQ = dS K along its columns, with K's column scales
   pk as prescale and one outer maximum per row; for dK = dS^T Q along its rows, with Q's row
   scales pq and one outer maximum per column.  Each value is computed as those ops compute
   it (the same multiplies, IEEE divisions, NaN-propagating maxima, the same hash), so the
   results are theirs bit for bit.  ds [B, L, S], pk [B, S], pq [B, L] float32; the batch
   entries are spread over the threads, one entry's rows in order within a thread. */
static inline __m512 max_nan(__m512 acc, __m512 v) {
    /* max(acc, v), NaN once either has been NaN (torch's amax) */
    __m512 m = _mm512_max_ps(v, acc);                  /* acc where either is NaN */
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), m, v);
}

static inline float one_if_zero(float r) { return r == 0.0f ? 1.0f : r; }

static inline float reduce_max_nan(__m512 v) {
    if (_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q))
        return NAN;
    return _mm512_reduce_max_ps(v);
}

/* Pass 1: outer maxima (rows of |dS pk|, columns of |dS pq|; 0 taken as 1); pass 2: the
   channel ranges of the quotients (columns of |dS pk / outer_c|, rows of |dS pq / outer_r|). */
void sq_ds_ranges(const float *ds, const float *pk, const float *pq, int64_t B, int64_t L, int64_t S,
                  float *outer_c, float *outer_r, float *ranges_c, float *ranges_r, int threads) {
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t b = 0; b < B; b++) {
        const float *pkb = pk + b * S;
        float *oc = outer_c + b * L, *orr = outer_r + b * S, *rc = ranges_c + b * S, *rr = ranges_r + b * L;
        int64_t s;
        for (s = 0; s < S; s += 16)
            _mm512_mask_storeu_ps(orr + s, lanes(s, S), _mm512_setzero_ps());
        for (int64_t l = 0; l < L; l++) {
            const float *row = ds + (b * L + l) * S;
            __m512 vq = _mm512_set1_ps(pq[b * L + l]), mc = _mm512_setzero_ps();
            for (s = 0; s < S; s += 16) {
                __mmask16 m = lanes(s, S);
                __m512 x = _mm512_maskz_loadu_ps(m, row + s);
                __m512 yc = _mm512_abs_ps(_mm512_mul_ps(x, _mm512_maskz_loadu_ps(m, pkb + s)));
                __m512 yr = _mm512_abs_ps(_mm512_mul_ps(x, vq));
                mc = max_nan(mc, _mm512_maskz_mov_ps(m, yc));
                _mm512_mask_storeu_ps(orr + s, m, max_nan(_mm512_maskz_loadu_ps(m, orr + s), yr));
            }
            oc[l] = one_if_zero(reduce_max_nan(mc));
        }
        for (s = 0; s < S; s++) {
            orr[s] = one_if_zero(orr[s]);
            rc[s] = 0.0f;
        }
        for (int64_t l = 0; l < L; l++) {
            const float *row = ds + (b * L + l) * S;
            __m512 vq = _mm512_set1_ps(pq[b * L + l]), voc = _mm512_set1_ps(oc[l]), mr = _mm512_setzero_ps();
            for (s = 0; s < S; s += 16) {
                __mmask16 m = lanes(s, S);
                __m512 x = _mm512_maskz_loadu_ps(m, row + s);
                __m512 qc = _mm512_div_ps(_mm512_mul_ps(x, _mm512_maskz_loadu_ps(m, pkb + s)), voc);
                __m512 qr = _mm512_div_ps(_mm512_mul_ps(x, vq), _mm512_mask_loadu_ps(_mm512_set1_ps(1.0f), m, orr + s));
                _mm512_mask_storeu_ps(rc + s, m, max_nan(_mm512_maskz_loadu_ps(m, rc + s), _mm512_abs_ps(qc)));
                mr = max_nan(mr, _mm512_maskz_mov_ps(m, _mm512_abs_ps(qr)));
            }
            rr[l] = reduce_max_nan(mr);
        }
    }
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

static inline __m512i expand(__m512 x, __m512 scale, __m512 mult, __m512 u, __m512 qmax) {
    /* numerics.quantize_values (stochastic) then q * multiplier: floor(x / scale + u),
       clamped, NaN -> 0 (scale 0 divides as 1) */
    __m512 d = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(scale, _mm512_setzero_ps(), _CMP_EQ_OQ), scale,
                                    _mm512_set1_ps(1.0f));
    __m512 q = _mm512_roundscale_ps(_mm512_add_ps(_mm512_div_ps(x, d), u), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __mmask16 nan = _mm512_cmp_ps_mask(q, q, _CMP_UNORD_Q);
    q = _mm512_min_ps(_mm512_max_ps(q, _mm512_sub_ps(_mm512_setzero_ps(), qmax)), qmax);
    q = _mm512_mask_blend_ps(nan, q, _mm512_setzero_ps());
    return _mm512_cvtps_epi32(_mm512_mul_ps(q, mult));
}

/* Pass 3: both quantizations; scale_* and mult_* are shift_params' per-channel scales and
   multipliers (columns [B, S], rows [B, L]); seed_* numerics.hash_noise's seeds, already
   multiplied by its spreading constant. */
void sq_ds_quantize(const float *ds, const float *pk, const float *pq, const float *outer_c, const float *outer_r,
                    const float *scale_c, const float *mult_c, const float *scale_r, const float *mult_r,
                    int32_t seed_c, int32_t seed_r, float qmax, int64_t B, int64_t L, int64_t S, int8_t *e_c,
                    int8_t *e_r, int threads) {
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i vsc = _mm512_set1_epi32(seed_c), vsr = _mm512_set1_epi32(seed_r);
    const __m512 vqmax = _mm512_set1_ps(qmax);
#pragma omp parallel for num_threads(threads) schedule(dynamic, 16)
    for (int64_t row = 0; row < B * L; row++) {
        int64_t b = row / L;
        const float *x = ds + row * S, *pkb = pk + b * S, *orr = outer_r + b * S;
        const float *sc = scale_c + b * S, *mc = mult_c + b * S;
        const __m512 vq = _mm512_set1_ps(pq[row]), voc = _mm512_set1_ps(outer_c[row]);
        const __m512 vsr_ = _mm512_set1_ps(scale_r[row]), vmr = _mm512_set1_ps(mult_r[row]);
        for (int64_t s = 0; s < S; s += 16) {
            __mmask16 m = lanes(s, S);
            __m512 v = _mm512_maskz_loadu_ps(m, x + s);
            __m512i index = _mm512_add_epi32(_mm512_set1_epi32((int32_t)(uint32_t)(row * S + s)), lane);
            __m512 qc = _mm512_div_ps(_mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, pkb + s)), voc);
            __m512i ec = expand(qc, _mm512_maskz_loadu_ps(m, sc + s), _mm512_maskz_loadu_ps(m, mc + s),
                                hash_noise(index, vsc), vqmax);
            _mm512_mask_cvtepi32_storeu_epi8(e_c + row * S + s, m, ec);
            __m512 qr = _mm512_div_ps(_mm512_mul_ps(v, vq), _mm512_mask_loadu_ps(_mm512_set1_ps(1.0f), m, orr + s));
            __m512i er = expand(qr, vsr_, vmr, hash_noise(index, vsr), vqmax);
            _mm512_mask_cvtepi32_storeu_epi8(e_r + row * S + s, m, er);
        }
    }
}
