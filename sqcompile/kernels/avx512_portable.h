/* The AVX-512 intrinsics our C kernels use (cpu_attention.c, cpu_norm.c, cpu_quant.c), in
   portable C over GCC / clang vector extensions: the "portable" build of those kernels
   (sqcompile/kernels/native.py), for CPUs without AVX-512 (AVX2 machines: AMD Zen 2 / 3,
   Intel client parts), where the compiler maps each 16-lane operation onto the vector units it
   has.

   Each function computes what the instruction computes, lane by lane, so that the portable
   build gives the AVX-512 build's results bit for bit (tests/test_native.py compares the two
   where the CPU has AVX-512):
   - max / min return the second operand when either is NaN or both are equal (MAXPS);
   - a float -> int32 conversion rounds to nearest even and gives INT32_MIN where the value is
     NaN or out of range (CVTPS2DQ);
   - masked loads read, and masked stores write, only the lanes in the mask (the kernels rely on
     it at the end of a row);
   - the horizontal reductions combine the lanes in the order of GCC's _mm512_reduce_*_ps;
   - fmadd rounds once (fmaf).
   Only the predicates and rounding modes the kernels use are defined: another one is a
   compile error (an undeclared name), not a silent wrong answer. */
#ifndef SQCOMPILE_AVX512_PORTABLE_H
#define SQCOMPILE_AVX512_PORTABLE_H
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float __m512 __attribute__((vector_size(64)));
typedef int32_t __m512i __attribute__((vector_size(64)));
typedef double __m512d __attribute__((vector_size(64)));
typedef float __m256 __attribute__((vector_size(32)));
typedef double __m256d __attribute__((vector_size(32)));
typedef int8_t __m128i __attribute__((vector_size(16)));
typedef uint8_t sq_u8x16 __attribute__((vector_size(16)));
typedef uint32_t sq_u32x16 __attribute__((vector_size(64)));
typedef uint16_t __mmask16;
typedef uint8_t __mmask8;

#define _MM_FROUND_TO_NEAREST_INT 0x00
#define _MM_FROUND_TO_NEG_INF 0x01
#define _MM_FROUND_TO_POS_INF 0x02
#define _MM_FROUND_TO_ZERO 0x03
#define _MM_FROUND_NO_EXC 0x08
#define _CMP_EQ_OQ 0x00
#define _CMP_UNORD_Q 0x03
#define _CMP_LT_OQ 0x11
#define _CMP_GT_OQ 0x1e

#define SQ_INLINE static inline __attribute__((always_inline))
#define SQ_LANES16(e) {e(0), e(1), e(2), e(3), e(4), e(5), e(6), e(7), e(8), e(9), e(10), e(11), e(12), e(13), \
                       e(14), e(15)}

/* ---- masks: a 16-bit mask <-> a lane selector (-1 / 0 per lane) ---- */
#define SQ_BIT(i) (1 << (i))
SQ_INLINE __m512i sq_selector16(unsigned m) {
    const __m512i bit = SQ_LANES16(SQ_BIT);
    return (((__m512i){0} + (int32_t)m) & bit) != 0;
}
SQ_INLINE __mmask16 sq_mask16(__m512i lanes) {
    /* the mask of the lanes that are -1 (a comparison's result) */
    const __m512i bit = SQ_LANES16(SQ_BIT);
    __m512i b = lanes & bit;
    unsigned m = 0;
    for (int i = 0; i < 16; i++)
        m |= (unsigned)b[i];
    return (__mmask16)m;
}
#undef SQ_BIT

/* ---- set, load, store ---- */
SQ_INLINE __m512 _mm512_setzero_ps(void) { return (__m512){0}; }
SQ_INLINE __m512i _mm512_setzero_si512(void) { return (__m512i){0}; }
#define SQ_SAME(i) x
SQ_INLINE __m512 _mm512_set1_ps(float x) { return (__m512)SQ_LANES16(SQ_SAME); }
SQ_INLINE __m512i _mm512_set1_epi32(int32_t x) { return (__m512i)SQ_LANES16(SQ_SAME); }
#undef SQ_SAME
SQ_INLINE __m512i _mm512_set_epi32(int e15, int e14, int e13, int e12, int e11, int e10, int e9, int e8, int e7,
                                   int e6, int e5, int e4, int e3, int e2, int e1, int e0) {
    return (__m512i){e0, e1, e2, e3, e4, e5, e6, e7, e8, e9, e10, e11, e12, e13, e14, e15};
}
SQ_INLINE __m512 _mm512_loadu_ps(const void *p) { __m512 r; memcpy(&r, p, sizeof r); return r; }
SQ_INLINE void _mm512_storeu_ps(void *p, __m512 v) { memcpy(p, &v, sizeof v); }

#define SQ_MASKED_LOAD(name, vec, mask_t, elem, full, lanes)                                         \
    SQ_INLINE vec name(vec src, mask_t m, const void *p) {                                       \
        if (m == (mask_t)(full)) { vec r; memcpy(&r, p, sizeof r); return r; }                   \
        for (int i = 0; i < (lanes); i++)                                                        \
            if (m >> i & 1) src[i] = ((const elem *)p)[i];                                       \
        return src;                                                                              \
    }
SQ_MASKED_LOAD(_mm512_mask_loadu_ps, __m512, __mmask16, float, 0xFFFF, 16)
SQ_MASKED_LOAD(sq_mask_loadu_epi32, __m512i, __mmask16, int32_t, 0xFFFF, 16)
SQ_MASKED_LOAD(sq_mask_loadu_pd, __m512d, __mmask8, double, 0xFF, 8)
SQ_MASKED_LOAD(sq_mask_loadu_epi8, __m128i, __mmask16, int8_t, 0xFFFF, 16)
#undef SQ_MASKED_LOAD
SQ_INLINE __m512 _mm512_maskz_loadu_ps(__mmask16 m, const void *p) { return _mm512_mask_loadu_ps((__m512){0}, m, p); }
SQ_INLINE __m512i _mm512_maskz_loadu_epi32(__mmask16 m, const void *p) { return sq_mask_loadu_epi32((__m512i){0}, m, p); }
SQ_INLINE __m512d _mm512_maskz_loadu_pd(__mmask8 m, const void *p) { return sq_mask_loadu_pd((__m512d){0}, m, p); }
SQ_INLINE __m128i _mm_maskz_loadu_epi8(__mmask16 m, const void *p) { return sq_mask_loadu_epi8((__m128i){0}, m, p); }

#define SQ_MASKED_STORE(name, vec, mask_t, elem, full, lanes)                                        \
    SQ_INLINE void name(void *p, mask_t m, vec v) {                                              \
        if (m == (mask_t)(full)) { memcpy(p, &v, sizeof v); return; }                            \
        for (int i = 0; i < (lanes); i++)                                                        \
            if (m >> i & 1) ((elem *)p)[i] = v[i];                                               \
    }
SQ_MASKED_STORE(_mm512_mask_storeu_ps, __m512, __mmask16, float, 0xFFFF, 16)
SQ_MASKED_STORE(_mm512_mask_storeu_pd, __m512d, __mmask8, double, 0xFF, 8)
SQ_MASKED_STORE(_mm_mask_storeu_epi8, __m128i, __mmask16, int8_t, 0xFFFF, 16)
#undef SQ_MASKED_STORE

/* ---- moves, blends, casts ---- */
SQ_INLINE __m512 _mm512_castsi512_ps(__m512i v) { return (__m512)v; }
SQ_INLINE __m512i _mm512_castps_si512(__m512 v) { return (__m512i)v; }
SQ_INLINE __m512d _mm512_castps_pd(__m512 v) { return (__m512d)v; }
SQ_INLINE __m256 _mm256_castpd_ps(__m256d v) { return (__m256)v; }
SQ_INLINE __m256 _mm512_castps512_ps256(__m512 v) { __m256 r; memcpy(&r, &v, sizeof r); return r; }
SQ_INLINE __m256d _mm512_extractf64x4_pd(__m512d v, int hi) {
    __m256d r;
    memcpy(&r, (const char *)&v + (hi & 1) * sizeof r, sizeof r);
    return r;
}
SQ_INLINE __m512 _mm512_mask_blend_ps(__mmask16 m, __m512 a, __m512 b) {
    __m512i s = sq_selector16(m);
    return (__m512)((s & (__m512i)b) | (~s & (__m512i)a));
}
SQ_INLINE __m512 _mm512_maskz_mov_ps(__mmask16 m, __m512 a) { return (__m512)(sq_selector16(m) & (__m512i)a); }

/* ---- float arithmetic ---- */
SQ_INLINE __m512 _mm512_add_ps(__m512 a, __m512 b) { return a + b; }
SQ_INLINE __m512 _mm512_sub_ps(__m512 a, __m512 b) { return a - b; }
SQ_INLINE __m512 _mm512_mul_ps(__m512 a, __m512 b) { return a * b; }
SQ_INLINE __m512 _mm512_div_ps(__m512 a, __m512 b) { return a / b; }
SQ_INLINE __m512d _mm512_add_pd(__m512d a, __m512d b) { return a + b; }
SQ_INLINE __m512 _mm512_abs_ps(__m512 a) { return (__m512)((__m512i)a & 0x7FFFFFFF); }
SQ_INLINE __m512 _mm512_xor_ps(__m512 a, __m512 b) { return (__m512)((__m512i)a ^ (__m512i)b); }
SQ_INLINE __m512 _mm512_max_ps(__m512 a, __m512 b) { return _mm512_mask_blend_ps(sq_mask16(a > b), b, a); }
SQ_INLINE __m512 _mm512_min_ps(__m512 a, __m512 b) { return _mm512_mask_blend_ps(sq_mask16(a < b), b, a); }
SQ_INLINE __m512 _mm512_fmadd_ps(__m512 a, __m512 b, __m512 c) {
    for (int i = 0; i < 16; i++)
        c[i] = fmaf(a[i], b[i], c[i]);
    return c;
}
SQ_INLINE __m512 _mm512_fnmadd_ps(__m512 a, __m512 b, __m512 c) { return _mm512_fmadd_ps(-a, b, c); }
SQ_INLINE __m512 _mm512_scalef_ps(__m512 a, __m512 b) {
    /* a * 2**floor(b), rounded once (the kernels pass integral b of modest size) */
    for (int i = 0; i < 16; i++) {
        float e = floorf(b[i]);
        a[i] = isnan(e) ? NAN : ldexpf(a[i], e < -1000.0f ? -1000 : e > 1000.0f ? 1000 : (int)e);
    }
    return a;
}
SQ_INLINE __m512 _mm512_roundscale_ps(__m512 a, int mode) {
    /* only the rounding mode (scale 0): nearest even, down, up, toward zero */
    for (int i = 0; i < 16; i++)
        switch (mode & 3) {
            case _MM_FROUND_TO_NEAREST_INT: a[i] = nearbyintf(a[i]); break;
            case _MM_FROUND_TO_NEG_INF: a[i] = floorf(a[i]); break;
            case _MM_FROUND_TO_POS_INF: a[i] = ceilf(a[i]); break;
            default: a[i] = truncf(a[i]); break;
        }
    return a;
}
SQ_INLINE __mmask16 _mm512_cmp_ps_mask(__m512 a, __m512 b, int predicate) {
    switch (predicate) {
        case _CMP_EQ_OQ: return sq_mask16(a == b);
        case _CMP_LT_OQ: return sq_mask16(a < b);
        case _CMP_GT_OQ: return sq_mask16(a > b);
        case _CMP_UNORD_Q: return sq_mask16((a != a) | (b != b));
        default: abort();       /* a predicate the kernels do not use */
    }
}
SQ_INLINE __mmask16 _mm512_mask_cmp_ps_mask(__mmask16 m, __m512 a, __m512 b, int predicate) {
    return m & _mm512_cmp_ps_mask(a, b, predicate);
}

/* ---- horizontal reductions, in the order of GCC's _mm512_reduce_{add,max}_ps ---- */
SQ_INLINE float _mm512_reduce_add_ps(__m512 v) {
    float t3[8], t6[4];
    for (int i = 0; i < 8; i++)
        t3[i] = v[i + 8] + v[i];
    for (int i = 0; i < 4; i++)
        t6[i] = t3[i + 4] + t3[i];
    return (t6[0] + t6[2]) + (t6[1] + t6[3]);
}
SQ_INLINE float sq_maxps(float a, float b) { return a > b ? a : b; }
SQ_INLINE float _mm512_reduce_max_ps(__m512 v) {
    float t3[8], t6[4];
    for (int i = 0; i < 8; i++)
        t3[i] = sq_maxps(v[i + 8], v[i]);
    for (int i = 0; i < 4; i++)
        t6[i] = sq_maxps(t3[i + 4], t3[i]);
    return sq_maxps(sq_maxps(t6[0], t6[2]), sq_maxps(t6[1], t6[3]));
}

/* ---- integers and conversions ---- */
SQ_INLINE __m512i _mm512_add_epi32(__m512i a, __m512i b) { return (__m512i)((sq_u32x16)a + (sq_u32x16)b); }
SQ_INLINE __m512i _mm512_mullo_epi32(__m512i a, __m512i b) { return (__m512i)((sq_u32x16)a * (sq_u32x16)b); }
SQ_INLINE __m512i _mm512_xor_si512(__m512i a, __m512i b) { return a ^ b; }
SQ_INLINE __m512i _mm512_srli_epi32(__m512i a, unsigned n) {
    return n > 31 ? (__m512i){0} : (__m512i)((sq_u32x16)a >> n);
}
SQ_INLINE __mmask16 _mm512_mask_cmpeq_epi32_mask(__mmask16 m, __m512i a, __m512i b) { return m & sq_mask16(a == b); }
SQ_INLINE __m512 _mm512_cvtepi32_ps(__m512i a) { return __builtin_convertvector(a, __m512); }
SQ_INLINE __m512i _mm512_cvtps_epi32(__m512 a) {
    __m512i r;
    for (int i = 0; i < 16; i++) {
        float x = nearbyintf(a[i]);
        r[i] = x >= -2147483648.0f && x < 2147483648.0f ? (int32_t)x : INT32_MIN;
    }
    return r;
}
SQ_INLINE __m512d _mm512_cvtps_pd(__m256 a) { return __builtin_convertvector(a, __m512d); }
SQ_INLINE __m512i _mm512_cvtepi8_epi32(__m128i a) { return __builtin_convertvector(a, __m512i); }
SQ_INLINE __m512i _mm512_cvtepu8_epi32(__m128i a) { return __builtin_convertvector((sq_u8x16)a, __m512i); }
SQ_INLINE __m128i _mm512_cvtepi32_epi8(__m512i a) {
    /* truncation to the low byte (VPMOVDB) */
    return (__m128i)__builtin_convertvector((sq_u32x16)a & 0xFF, sq_u8x16);
}
SQ_INLINE void _mm512_mask_cvtepi32_storeu_epi8(void *p, __mmask16 m, __m512i a) {
    _mm_mask_storeu_epi8(p, m, _mm512_cvtepi32_epi8(a));
}

#undef SQ_LANES16
#endif
