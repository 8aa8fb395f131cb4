/* The AVX-512 intrinsics our C kernels use (cpu_attention.c, cpu_norm.c, cpu_quant.c), for
   CPUs without AVX-512: the "portable" build of those kernels (sqcompile/kernels/native.py).
   A 512-bit vector is two 256-bit halves; with -mavx2 -mfma each operation is one or two AVX2
   instructions (movemask, maskload / maskstore, round, cvtps2dq, fmadd, max), elsewhere plain
   C over GCC / clang vector extensions.  The AVX-512 names are macros for the sq_* functions
   below, so the kernels' source is unchanged.

   Each function computes what the AVX-512 instruction computes, lane by lane, so that the
   portable build gives the AVX-512 build's results bit for bit (tests/test_native.py compares
   the two where the CPU has AVX-512):
   - max / min return the second operand when either is NaN or both are equal (MAXPS);
   - a float -> int32 conversion rounds to nearest even and gives INT32_MIN where the value is
     NaN or out of range (CVTPS2DQ);
   - masked loads read, and masked stores write, only the lanes in the mask (the kernels rely on
     it at the end of a row);
   - the horizontal reductions combine the lanes in the order of GCC's _mm512_reduce_*_ps;
   - fmadd rounds once;
   - scalef(a, b) = a * 2**floor(b) rounded once wherever a * 2**(floor(b) + 64) is a normal
     float, floor(b) clamped to [-150, 60]: the kernels' exp, with |a| near 1 and floor(b) in
     [-150, 0], is inside that range.
   Only the predicates and rounding modes the kernels use are defined: another one is a
   compile error (an undeclared name) or an abort, not a silent wrong answer. */
#ifndef SQCOMPILE_AVX512_PORTABLE_H
#define SQCOMPILE_AVX512_PORTABLE_H
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__)
#define SQ_AVX2 1
#include <immintrin.h>
#endif

#ifndef _MM_FROUND_TO_NEAREST_INT
#define _MM_FROUND_TO_NEAREST_INT 0x00
#define _MM_FROUND_TO_NEG_INF 0x01
#define _MM_FROUND_TO_POS_INF 0x02
#define _MM_FROUND_TO_ZERO 0x03
#define _MM_FROUND_NO_EXC 0x08
#endif
#ifndef _CMP_EQ_OQ
#define _CMP_EQ_OQ 0x00
#define _CMP_UNORD_Q 0x03
#define _CMP_LT_OQ 0x11
#define _CMP_GT_OQ 0x1e
#endif

typedef float sq_f8 __attribute__((vector_size(32)));
typedef float sq_f4 __attribute__((vector_size(16)));
typedef int32_t sq_i8 __attribute__((vector_size(32)));
typedef uint32_t sq_u8 __attribute__((vector_size(32)));
typedef double sq_d4 __attribute__((vector_size(32)));
typedef int64_t sq_l4 __attribute__((vector_size(32)));
typedef int8_t sq_b16 __attribute__((vector_size(16)));
typedef int8_t sq_b8 __attribute__((vector_size(8)));
typedef uint8_t sq_ub8 __attribute__((vector_size(8)));
typedef struct { sq_f8 h[2]; } sq_m512;
typedef struct { sq_i8 h[2]; } sq_m512i;
typedef struct { sq_d4 h[2]; } sq_m512d;
typedef uint16_t sq_mask16;
typedef uint8_t sq_mask8;

#define SQ static inline __attribute__((always_inline))
#define SQ_HALVES(k) for (int k = 0; k < 2; k++)

/* ---- masks: bits <-> lane selectors (-1 / 0 per lane) ---- */
SQ sq_i8 sq_sel8(unsigned bits) {
    const sq_i8 bit = {1, 2, 4, 8, 16, 32, 64, 128};
    return (((sq_i8){0} + (int32_t)bits) & bit) != 0;
}
SQ sq_l4 sq_sel4(unsigned bits) {
    const sq_l4 bit = {1, 2, 4, 8};
    return (((sq_l4){0} + (int64_t)bits) & bit) != 0;
}
SQ unsigned sq_bits8(sq_i8 lanes) {
#ifdef SQ_AVX2
    return (unsigned)_mm256_movemask_ps((__m256)lanes);
#else
    unsigned m = 0;
    for (int i = 0; i < 8; i++)
        m |= (unsigned)(lanes[i] & 1) << i;
    return m;
#endif
}
SQ sq_mask16 sq_bits16(sq_i8 lo, sq_i8 hi) { return (sq_mask16)(sq_bits8(lo) | sq_bits8(hi) << 8); }
SQ sq_f8 sq_select(sq_i8 s, sq_f8 a, sq_f8 b) { return (sq_f8)((s & (sq_i8)b) | (~s & (sq_i8)a)); }  /* s ? b : a */

/* ---- set, load, store ---- */
SQ sq_m512 sq_setzero_ps(void) { sq_m512 r = {{{0}, {0}}}; return r; }
SQ sq_m512i sq_setzero_si512(void) { sq_m512i r = {{{0}, {0}}}; return r; }
SQ sq_m512 sq_set1_ps(float x) { sq_f8 v = {x, x, x, x, x, x, x, x}; sq_m512 r = {{v, v}}; return r; }
SQ sq_m512i sq_set1_epi32(int32_t x) { sq_i8 v = {x, x, x, x, x, x, x, x}; sq_m512i r = {{v, v}}; return r; }
SQ sq_m512i sq_set_epi32(int e15, int e14, int e13, int e12, int e11, int e10, int e9, int e8, int e7, int e6, int e5,
                         int e4, int e3, int e2, int e1, int e0) {
    sq_m512i r = {{{e0, e1, e2, e3, e4, e5, e6, e7}, {e8, e9, e10, e11, e12, e13, e14, e15}}};
    return r;
}
SQ sq_m512 sq_loadu_ps(const void *p) { sq_m512 r; memcpy(&r, p, sizeof r); return r; }
SQ void sq_storeu_ps(void *p, sq_m512 v) { memcpy(p, &v, sizeof v); }

/* masked loads and stores of float / double halves: whole halves copied, partial ones through
   AVX2's maskload / maskstore (which touch only the lanes in the mask) or lane by lane */
#ifdef SQ_AVX2
#define SQ_PART_LOAD(dst, src, bits, lanes, sel, maskload) dst = (__typeof__(dst))maskload(src, (__m256i)sel(bits))
#define SQ_PART_STORE(dst, v, bits, lanes, sel, maskstore, vtype) maskstore(dst, (__m256i)sel(bits), (vtype)(v))
#else
#define SQ_PART_LOAD(dst, src, bits, lanes, sel, maskload) \
    for (int i = 0; i < (lanes); i++) if ((bits) >> i & 1) dst[i] = (src)[i]
#define SQ_PART_STORE(dst, v, bits, lanes, sel, maskstore, vtype) \
    for (int i = 0; i < (lanes); i++) if ((bits) >> i & 1) (dst)[i] = (v)[i]
#endif
#define SQ_MASKED(name_load, name_store, vec, mask_t, elem, lanes, sel, maskload, maskstore, vtype)        \
    SQ vec name_load(mask_t m, const void *p) {                                                       \
        const elem *f = (const elem *)p;                                                              \
        vec r;                                                                                        \
        memset(&r, 0, sizeof r);                                                                      \
        SQ_HALVES(k) {                                                                                \
            unsigned bits = m >> (lanes) * k & ((1u << (lanes)) - 1);                                 \
            if (bits == (1u << (lanes)) - 1)                                                          \
                memcpy(&r.h[k], f + (lanes) * k, sizeof r.h[k]);                                      \
            else if (bits)                                                                            \
                SQ_PART_LOAD(r.h[k], f + (lanes) * k, bits, lanes, sel, maskload);                    \
        }                                                                                             \
        return r;                                                                                     \
    }                                                                                                 \
    SQ void name_store(void *p, mask_t m, vec v) {                                                    \
        elem *f = (elem *)p;                                                                          \
        SQ_HALVES(k) {                                                                                \
            unsigned bits = m >> (lanes) * k & ((1u << (lanes)) - 1);                                 \
            if (bits == (1u << (lanes)) - 1)                                                          \
                memcpy(f + (lanes) * k, &v.h[k], sizeof v.h[k]);                                      \
            else if (bits)                                                                            \
                SQ_PART_STORE(f + (lanes) * k, v.h[k], bits, lanes, sel, maskstore, vtype);           \
        }                                                                                             \
    }
SQ_MASKED(sq_maskz_loadu_ps, sq_mask_storeu_ps, sq_m512, sq_mask16, float, 8, sq_sel8, _mm256_maskload_ps,
          _mm256_maskstore_ps, __m256)
SQ_MASKED(sq_maskz_loadu_pd, sq_mask_storeu_pd, sq_m512d, sq_mask8, double, 4, sq_sel4, _mm256_maskload_pd,
          _mm256_maskstore_pd, __m256d)
#undef SQ_MASKED
#undef SQ_PART_LOAD
#undef SQ_PART_STORE
SQ sq_m512i sq_maskz_loadu_epi32(sq_mask16 m, const void *p) {
    sq_m512 r = sq_maskz_loadu_ps(m, p);
    sq_m512i i = {{(sq_i8)r.h[0], (sq_i8)r.h[1]}};
    return i;
}
SQ sq_b16 sq_maskz_loadu_epi8(sq_mask16 m, const void *p) {
    sq_b16 r = {0};
    if (m == 0xFFFF)
        memcpy(&r, p, sizeof r);
    else
        for (int i = 0; i < 16; i++)
            if (m >> i & 1) r[i] = ((const int8_t *)p)[i];
    return r;
}
SQ void sq_mask_storeu_epi8(void *p, sq_mask16 m, sq_b16 v) {
    if (m == 0xFFFF)
        memcpy(p, &v, sizeof v);
    else
        for (int i = 0; i < 16; i++)
            if (m >> i & 1) ((int8_t *)p)[i] = v[i];
}

/* ---- moves, blends, casts ---- */
SQ sq_m512 sq_castsi512_ps(sq_m512i v) { sq_m512 r = {{(sq_f8)v.h[0], (sq_f8)v.h[1]}}; return r; }
SQ sq_m512i sq_castps_si512(sq_m512 v) { sq_m512i r = {{(sq_i8)v.h[0], (sq_i8)v.h[1]}}; return r; }
SQ sq_m512d sq_castps_pd(sq_m512 v) { sq_m512d r = {{(sq_d4)v.h[0], (sq_d4)v.h[1]}}; return r; }
SQ sq_f8 sq_castpd_ps256(sq_d4 v) { return (sq_f8)v; }
SQ sq_f8 sq_castps512_ps256(sq_m512 v) { return v.h[0]; }
SQ sq_d4 sq_extractf64x4_pd(sq_m512d v, int hi) { return v.h[hi & 1]; }
SQ sq_m512 sq_mask_blend_ps(sq_mask16 m, sq_m512 a, sq_m512 b) {
    SQ_HALVES(k) a.h[k] = sq_select(sq_sel8(m >> 8 * k & 0xFF), a.h[k], b.h[k]);
    return a;
}
SQ sq_m512 sq_mask_loadu_ps(sq_m512 src, sq_mask16 m, const void *p) {
    return sq_mask_blend_ps(m, src, sq_maskz_loadu_ps(m, p));
}
SQ sq_m512 sq_maskz_mov_ps(sq_mask16 m, sq_m512 a) {
    SQ_HALVES(k) a.h[k] = (sq_f8)(sq_sel8(m >> 8 * k & 0xFF) & (sq_i8)a.h[k]);
    return a;
}

/* ---- float arithmetic ---- */
#define SQ_LANEWISE(name, type, op) \
    SQ type name(type a, type b) { SQ_HALVES(k) a.h[k] = a.h[k] op b.h[k]; return a; }
SQ_LANEWISE(sq_add_ps, sq_m512, +)
SQ_LANEWISE(sq_sub_ps, sq_m512, -)
SQ_LANEWISE(sq_mul_ps, sq_m512, *)
SQ_LANEWISE(sq_div_ps, sq_m512, /)
SQ_LANEWISE(sq_add_pd, sq_m512d, +)
SQ_LANEWISE(sq_xor_si512, sq_m512i, ^)
#undef SQ_LANEWISE
SQ sq_m512 sq_abs_ps(sq_m512 a) {
    SQ_HALVES(k) a.h[k] = (sq_f8)((sq_i8)a.h[k] & 0x7FFFFFFF);
    return a;
}
SQ sq_m512 sq_xor_ps(sq_m512 a, sq_m512 b) {
    SQ_HALVES(k) a.h[k] = (sq_f8)((sq_i8)a.h[k] ^ (sq_i8)b.h[k]);
    return a;
}
SQ sq_m512 sq_max_ps(sq_m512 a, sq_m512 b) {
#ifdef SQ_AVX2
    SQ_HALVES(k) a.h[k] = (sq_f8)_mm256_max_ps((__m256)a.h[k], (__m256)b.h[k]);
#else
    SQ_HALVES(k) a.h[k] = sq_select(a.h[k] > b.h[k], b.h[k], a.h[k]);
#endif
    return a;
}
SQ sq_m512 sq_min_ps(sq_m512 a, sq_m512 b) {
#ifdef SQ_AVX2
    SQ_HALVES(k) a.h[k] = (sq_f8)_mm256_min_ps((__m256)a.h[k], (__m256)b.h[k]);
#else
    SQ_HALVES(k) a.h[k] = sq_select(a.h[k] < b.h[k], b.h[k], a.h[k]);
#endif
    return a;
}
SQ sq_m512 sq_fmadd_ps(sq_m512 a, sq_m512 b, sq_m512 c) {
#ifdef SQ_AVX2
    SQ_HALVES(k) c.h[k] = (sq_f8)_mm256_fmadd_ps((__m256)a.h[k], (__m256)b.h[k], (__m256)c.h[k]);
#else
    SQ_HALVES(k) for (int i = 0; i < 8; i++) c.h[k][i] = fmaf(a.h[k][i], b.h[k][i], c.h[k][i]);
#endif
    return c;
}
SQ sq_m512 sq_fnmadd_ps(sq_m512 a, sq_m512 b, sq_m512 c) {
    SQ_HALVES(k) a.h[k] = -a.h[k];
    return sq_fmadd_ps(a, b, c);
}
SQ sq_f8 sq_round8(sq_f8 a, int mode) {
#ifdef SQ_AVX2
    switch (mode & 3) {     /* constant where the kernels call it: one instruction */
        case _MM_FROUND_TO_NEAREST_INT: return (sq_f8)_mm256_round_ps((__m256)a, 0x08);
        case _MM_FROUND_TO_NEG_INF: return (sq_f8)_mm256_round_ps((__m256)a, 0x09);
        case _MM_FROUND_TO_POS_INF: return (sq_f8)_mm256_round_ps((__m256)a, 0x0A);
        default: return (sq_f8)_mm256_round_ps((__m256)a, 0x0B);
    }
#else
    for (int i = 0; i < 8; i++)
        switch (mode & 3) {
            case _MM_FROUND_TO_NEAREST_INT: a[i] = nearbyintf(a[i]); break;
            case _MM_FROUND_TO_NEG_INF: a[i] = floorf(a[i]); break;
            case _MM_FROUND_TO_POS_INF: a[i] = ceilf(a[i]); break;
            default: a[i] = truncf(a[i]); break;
        }
    return a;
#endif
}
SQ sq_m512 sq_roundscale_ps(sq_m512 a, int mode) {
    /* only the rounding mode (scale 0): nearest even, down, up, toward zero */
    SQ_HALVES(k) a.h[k] = sq_round8(a.h[k], mode);
    return a;
}
SQ sq_m512 sq_scalef_ps(sq_m512 a, sq_m512 b) {
    /* a * 2**(n + 64) is exact (a power of two in the normal range), the * 2**-64 rounds once */
    const sq_f8 lo = {-150, -150, -150, -150, -150, -150, -150, -150}, hi = {60, 60, 60, 60, 60, 60, 60, 60};
    const sq_f8 down = {0x1p-64f, 0x1p-64f, 0x1p-64f, 0x1p-64f, 0x1p-64f, 0x1p-64f, 0x1p-64f, 0x1p-64f};
    SQ_HALVES(k) {
        sq_f8 n = sq_round8(b.h[k], _MM_FROUND_TO_NEG_INF);
        n = sq_select(n < lo, n, lo);
        n = sq_select(n > hi, n, hi);
        sq_i8 e = (__builtin_convertvector(n, sq_i8) + (127 + 64)) << 23;
        a.h[k] = a.h[k] * (sq_f8)e * down;
    }
    return a;
}
SQ sq_mask16 sq_cmp_ps_mask(sq_m512 a, sq_m512 b, int predicate) {
    switch (predicate) {
        case _CMP_EQ_OQ: return sq_bits16(a.h[0] == b.h[0], a.h[1] == b.h[1]);
        case _CMP_LT_OQ: return sq_bits16(a.h[0] < b.h[0], a.h[1] < b.h[1]);
        case _CMP_GT_OQ: return sq_bits16(a.h[0] > b.h[0], a.h[1] > b.h[1]);
        case _CMP_UNORD_Q:
            return sq_bits16((a.h[0] != a.h[0]) | (b.h[0] != b.h[0]), (a.h[1] != a.h[1]) | (b.h[1] != b.h[1]));
        default: abort();       /* a predicate the kernels do not use */
    }
}
SQ sq_mask16 sq_mask_cmp_ps_mask(sq_mask16 m, sq_m512 a, sq_m512 b, int predicate) {
    return m & sq_cmp_ps_mask(a, b, predicate);
}

/* ---- horizontal reductions, in the order of GCC's _mm512_reduce_{add,max}_ps ---- */
SQ float sq_reduce_add_ps(sq_m512 v) {
    sq_f8 t3 = v.h[1] + v.h[0];
    float t6[4] = {t3[4] + t3[0], t3[5] + t3[1], t3[6] + t3[2], t3[7] + t3[3]};
    return (t6[0] + t6[2]) + (t6[1] + t6[3]);
}
SQ float sq_max1(float a, float b) { return a > b ? a : b; }
SQ float sq_reduce_max_ps(sq_m512 v) {
    float t6[4];
    for (int i = 0; i < 4; i++)
        t6[i] = sq_max1(sq_max1(v.h[1][i + 4], v.h[0][i + 4]), sq_max1(v.h[1][i], v.h[0][i]));
    return sq_max1(sq_max1(t6[0], t6[2]), sq_max1(t6[1], t6[3]));
}

/* ---- integers and conversions ---- */
SQ sq_m512i sq_add_epi32(sq_m512i a, sq_m512i b) {
    SQ_HALVES(k) a.h[k] = (sq_i8)((sq_u8)a.h[k] + (sq_u8)b.h[k]);
    return a;
}
SQ sq_m512i sq_mullo_epi32(sq_m512i a, sq_m512i b) {
    SQ_HALVES(k) a.h[k] = (sq_i8)((sq_u8)a.h[k] * (sq_u8)b.h[k]);
    return a;
}
SQ sq_m512i sq_srli_epi32(sq_m512i a, unsigned n) {
    SQ_HALVES(k) a.h[k] = n > 31 ? (sq_i8){0} : (sq_i8)((sq_u8)a.h[k] >> n);
    return a;
}
SQ sq_mask16 sq_mask_cmpeq_epi32_mask(sq_mask16 m, sq_m512i a, sq_m512i b) {
    return m & sq_bits16(a.h[0] == b.h[0], a.h[1] == b.h[1]);
}
SQ sq_m512 sq_cvtepi32_ps(sq_m512i a) {
    sq_m512 r;
    SQ_HALVES(k) r.h[k] = __builtin_convertvector(a.h[k], sq_f8);
    return r;
}
SQ sq_m512i sq_cvtps_epi32(sq_m512 a) {
    sq_m512i r;
#ifdef SQ_AVX2
    SQ_HALVES(k) r.h[k] = (sq_i8)_mm256_cvtps_epi32((__m256)a.h[k]);
#else
    SQ_HALVES(k) for (int i = 0; i < 8; i++) {
        float x = nearbyintf(a.h[k][i]);
        r.h[k][i] = x >= -2147483648.0f && x < 2147483648.0f ? (int32_t)x : INT32_MIN;
    }
#endif
    return r;
}
/* widening conversions: each half of the input to one half of the output */
#define SQ_WIDEN(name, out_t, in_t, half_t, lane_t)                                                        \
    SQ out_t name(in_t a) {                                                                            \
        half_t half[2];                                                                                \
        memcpy(half, &a, sizeof half);                                                                 \
        out_t r = {{__builtin_convertvector(half[0], lane_t), __builtin_convertvector(half[1], lane_t)}}; \
        return r;                                                                                      \
    }
SQ_WIDEN(sq_cvtps_pd, sq_m512d, sq_f8, sq_f4, sq_d4)
SQ_WIDEN(sq_cvtepi8_epi32, sq_m512i, sq_b16, sq_b8, sq_i8)
SQ_WIDEN(sq_cvtepu8_epi32, sq_m512i, sq_b16, sq_ub8, sq_i8)
#undef SQ_WIDEN
SQ sq_b16 sq_cvtepi32_epi8(sq_m512i a) {
    /* truncation to the low byte (VPMOVDB) */
#ifdef SQ_AVX2
    /* each 128-bit lane's four low bytes to its first 4 bytes, then those words together */
    const __m256i low = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                         0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    const __m256i words = _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4);
    __m128i half[2];
    SQ_HALVES(k) half[k] = _mm256_castsi256_si128(
        _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8((__m256i)a.h[k], low), words));
    sq_b16 r = (sq_b16)_mm_unpacklo_epi64(half[0], half[1]);
    return r;
#else
    sq_ub8 half[2];
    SQ_HALVES(k) half[k] = __builtin_convertvector((sq_u8)a.h[k] & 0xFF, sq_ub8);
    sq_b16 r;
    memcpy(&r, half, sizeof r);
    return r;
#endif
}
SQ void sq_mask_cvtepi32_storeu_epi8(void *p, sq_mask16 m, sq_m512i a) { sq_mask_storeu_epi8(p, m, sq_cvtepi32_epi8(a)); }

#undef SQ_HALVES
#undef SQ

/* The AVX-512 names the kernels use. */
#define __m512 sq_m512
#define __m512i sq_m512i
#define __m512d sq_m512d
#define __mmask16 sq_mask16
#define __mmask8 sq_mask8
#define _mm512_setzero_ps sq_setzero_ps
#define _mm512_setzero_si512 sq_setzero_si512
#define _mm512_set1_ps sq_set1_ps
#define _mm512_set1_epi32 sq_set1_epi32
#define _mm512_set_epi32 sq_set_epi32
#define _mm512_loadu_ps sq_loadu_ps
#define _mm512_storeu_ps sq_storeu_ps
#define _mm512_mask_loadu_ps sq_mask_loadu_ps
#define _mm512_maskz_loadu_ps sq_maskz_loadu_ps
#define _mm512_maskz_loadu_epi32 sq_maskz_loadu_epi32
#define _mm512_mask_storeu_ps sq_mask_storeu_ps
#define _mm512_maskz_loadu_pd sq_maskz_loadu_pd
#define _mm512_mask_storeu_pd sq_mask_storeu_pd
#define _mm_maskz_loadu_epi8 sq_maskz_loadu_epi8
#define _mm_mask_storeu_epi8 sq_mask_storeu_epi8
#define _mm512_castsi512_ps sq_castsi512_ps
#define _mm512_castps_si512 sq_castps_si512
#define _mm512_castps_pd sq_castps_pd
#define _mm256_castpd_ps sq_castpd_ps256
#define _mm512_castps512_ps256 sq_castps512_ps256
#define _mm512_extractf64x4_pd sq_extractf64x4_pd
#define _mm512_mask_blend_ps sq_mask_blend_ps
#define _mm512_maskz_mov_ps sq_maskz_mov_ps
#define _mm512_add_ps sq_add_ps
#define _mm512_sub_ps sq_sub_ps
#define _mm512_mul_ps sq_mul_ps
#define _mm512_div_ps sq_div_ps
#define _mm512_add_pd sq_add_pd
#define _mm512_abs_ps sq_abs_ps
#define _mm512_xor_ps sq_xor_ps
#define _mm512_max_ps sq_max_ps
#define _mm512_min_ps sq_min_ps
#define _mm512_fmadd_ps sq_fmadd_ps
#define _mm512_fnmadd_ps sq_fnmadd_ps
#define _mm512_roundscale_ps sq_roundscale_ps
#define _mm512_scalef_ps sq_scalef_ps
#define _mm512_cmp_ps_mask sq_cmp_ps_mask
#define _mm512_mask_cmp_ps_mask sq_mask_cmp_ps_mask
#define _mm512_reduce_add_ps sq_reduce_add_ps
#define _mm512_reduce_max_ps sq_reduce_max_ps
#define _mm512_add_epi32 sq_add_epi32
#define _mm512_mullo_epi32 sq_mullo_epi32
#define _mm512_xor_si512 sq_xor_si512
#define _mm512_srli_epi32 sq_srli_epi32
#define _mm512_mask_cmpeq_epi32_mask sq_mask_cmpeq_epi32_mask
#define _mm512_cvtepi32_ps sq_cvtepi32_ps
#define _mm512_cvtps_epi32 sq_cvtps_epi32
#define _mm512_cvtps_pd sq_cvtps_pd
#define _mm512_cvtepi8_epi32 sq_cvtepi8_epi32
#define _mm512_cvtepu8_epi32 sq_cvtepu8_epi32
#define _mm512_cvtepi32_epi8 sq_cvtepi32_epi8
#define _mm512_mask_cvtepi32_storeu_epi8 sq_mask_cvtepi32_storeu_epi8
#endif
