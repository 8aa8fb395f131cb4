/* Helpers shared by our AVX-512 kernels (cpu_attention.c, cpu_norm.c, cpu_quant.c).  Built
   with -DSQCOMPILE_PORTABLE, the intrinsics come from avx512_portable.h (portable C) instead
   of the compiler's AVX-512 ones: the build for CPUs without AVX-512 (kernels/native.py). */
#ifndef SQCOMPILE_AVX512_H
#define SQCOMPILE_AVX512_H
#ifdef SQCOMPILE_PORTABLE
#include "avx512_portable.h"
#else
#include <immintrin.h>
#endif
#include <math.h>
#include <stdint.h>

/* Vector helpers are inlined even where the compiler would not: in the portable build a
   512-bit value is a 64-byte struct, and a call passes it through memory (hash_noise as a
   call cost the gradients' quantizer a third of its time on an AVX2 CPU). */
#define SQ_VEC static inline __attribute__((always_inline))

SQ_VEC __mmask16 lanes(int64_t from, int64_t to) {
    /* the lanes of the 16 elements at `from` that lie below `to` */
    int64_t n = to - from;
    return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1u);
}

SQ_VEC __m512 max_nan(__m512 acc, __m512 v) {
    /* max(acc, v), NaN once either has been NaN (torch's amax) */
    __m512 m = _mm512_max_ps(v, acc);                  /* acc where either is NaN */
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), m, v);
}

SQ_VEC float reduce_max_nan(__m512 v) {
    if (_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q))
        return NAN;
    return _mm512_reduce_max_ps(v);
}

SQ_VEC __m512 exp_nonpositive(__m512 x) {
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

#define SQ_GOLDEN 0x9E3779B1u

/* numerics.hash_noise from h = (index ^ seed) * golden (int32 products wrap): MurmurHash3's
   finalizer, then the top 8 bits as (k + 0.5) / 256 */
SQ_VEC __m512 hash_finish(__m512i h) {
    h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
    h = _mm512_mullo_epi32(h, _mm512_set1_epi32((int32_t)0x85EBCA6B));
    h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 13));
    h = _mm512_mullo_epi32(h, _mm512_set1_epi32((int32_t)0xC2B2AE35));
    h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
    __m512 k = _mm512_cvtepi32_ps(_mm512_srli_epi32(h, 24));
    return _mm512_mul_ps(_mm512_add_ps(k, _mm512_set1_ps(0.5f)), _mm512_set1_ps(1.0f / 256.0f));
}

SQ_VEC __m512 hash_noise(__m512i index, __m512i seed) {
    /* numerics.hash_noise: MurmurHash3's finalizer over (index ^ seed) * golden, in int32 */
    return hash_finish(_mm512_mullo_epi32(_mm512_xor_si512(index, seed), _mm512_set1_epi32((int32_t)SQ_GOLDEN)));
}

/* hash_noise at the 16 indices base + lane for a base that is a multiple of 16, without its
   first vector multiply: index ^ seed = (base ^ (seed & ~15)) + (lane ^ (seed & 15)), the two
   terms' bits apart, so the product by golden is a scalar product plus the per-lane vector
   (lane ^ (seed & 15)) * golden of hash_lanes, bit for bit (products wrap mod 2^32). */
SQ_VEC __m512i hash_lanes(int32_t seed) {
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    return _mm512_mullo_epi32(_mm512_xor_si512(lane, _mm512_set1_epi32(seed & 15)),
                              _mm512_set1_epi32((int32_t)SQ_GOLDEN));
}

SQ_VEC __m512 hash_noise_aligned(uint32_t base, int32_t seed, __m512i lanes) {
    const uint32_t h = (base ^ ((uint32_t)seed & ~15u)) * SQ_GOLDEN;
    return hash_finish(_mm512_add_epi32(_mm512_set1_epi32((int32_t)h), lanes));
}

#endif
