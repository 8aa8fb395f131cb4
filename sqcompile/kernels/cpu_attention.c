/* Quantized attention on CPU, one row of scores at a time (AVX-512 F/BW/VL): the softmax and
 * P's quantizer (sq_attention_probs) and the softmax's backward (sq_attention_probs_backward);
 * see sqcompile/kernels/cpu_attention.py.  (dS's two outer-scaled ShiftQuants are
 * cpu_quant.c's, which quantizes every GEMM's output gradient so.)
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
#include <math.h>

#include "avx512.h"

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
