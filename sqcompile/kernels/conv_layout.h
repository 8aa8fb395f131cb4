/* The layout copies around the implicit-GEMM convolutions, shared by the int8 GEMM kernels
 * (amx_int8.c, avx2_int8.c: each library exports its own copy, built with its own flags). */
#ifndef SQCOMPILE_CONV_LAYOUT_H
#define SQCOMPILE_CONV_LAYOUT_H

#include <emmintrin.h>
#include <stdint.h>
#include <string.h>

/* d[j * ds + i] = s[i * ss + j] for a 16 x 16 block of bytes: four rounds of unpacks pair
 * registers (2i, 2i + 1) into elements twice as wide each round; after the fourth, register k
 * holds column bitrev4(k), its rows in order. */
static inline void transpose16(const int8_t *s, int64_t ss, int8_t *d, int64_t ds) {
    static const int column[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};
    __m128i x[16], t[16];
    for (int i = 0; i < 16; ++i) x[i] = _mm_loadu_si128((const __m128i *)(s + i * ss));
#define SQ_UNPACK_ROUND(lo, hi)                                        \
    for (int i = 0; i < 8; ++i) {                                      \
        t[i] = lo(x[2 * i], x[2 * i + 1]);                             \
        t[i + 8] = hi(x[2 * i], x[2 * i + 1]);                         \
    }                                                                  \
    for (int i = 0; i < 16; ++i) x[i] = t[i];
    SQ_UNPACK_ROUND(_mm_unpacklo_epi8, _mm_unpackhi_epi8)
    SQ_UNPACK_ROUND(_mm_unpacklo_epi16, _mm_unpackhi_epi16)
    SQ_UNPACK_ROUND(_mm_unpacklo_epi32, _mm_unpackhi_epi32)
    SQ_UNPACK_ROUND(_mm_unpacklo_epi64, _mm_unpackhi_epi64)
#undef SQ_UNPACK_ROUND
    for (int k = 0; k < 16; ++k) _mm_storeu_si128((__m128i *)(d + column[k] * ds), x[k]);
}

/* dst[w * dw + c * dc] = src[w * sw + c * sc] for w < W, c < C: one [W, C] slab of int8,
 * either side channels-innermost or not.  Contiguous rows are copied whole; a transpose
 * between unit strides (NCHW <-> channels-last) goes 16 x 16 bytes at a time through SSE2
 * registers (byte by byte, the U-Net step spent 7% of its time here on a Zen 4 core), other
 * transposing slabs through 64 x 64 blocks that stay in L1. */
static void copy_slab(const int8_t *src, int64_t sw, int64_t sc, int8_t *dst, int64_t dw, int64_t dc,
                      int64_t W, int64_t C) {
    if (sc == 1 && dc == 1) {
        if (sw == C && dw == C) memcpy(dst, src, (size_t)(W * C));
        else for (int64_t w = 0; w < W; ++w) memcpy(dst + w * dw, src + w * sw, (size_t)C);
        return;
    }
    if (sw == 1 && dw == 1) {
        for (int64_t c = 0; c < C; ++c) memcpy(dst + c * dc, src + c * sc, (size_t)W);
        return;
    }
    int64_t W16 = 0, C16 = 0;                     /* the part done in 16 x 16 blocks */
    if ((sw == 1 && dc == 1) || (sc == 1 && dw == 1)) {
        W16 = W - W % 16;
        C16 = C - C % 16;
        for (int64_t w0 = 0; w0 < W16; w0 += 16)
            for (int64_t c0 = 0; c0 < C16; c0 += 16) {
                if (sw == 1) transpose16(src + c0 * sc + w0, sc, dst + w0 * dw + c0, dw);
                else transpose16(src + w0 * sw + c0, sw, dst + c0 * dc + w0, dc);
            }
        for (int64_t w = 0; w < W16; ++w)         /* the channels past C16 */
            for (int64_t c = C16; c < C; ++c) dst[w * dw + c * dc] = src[w * sw + c * sc];
    }
    for (int64_t w0 = W16; w0 < W; w0 += 64)      /* the rest (every row where W16 = 0) */
        for (int64_t c0 = 0; c0 < C; c0 += 64) {
            const int64_t w1 = w0 + 64 < W ? w0 + 64 : W, c1 = c0 + 64 < C ? c0 + 64 : C;
            if (dc == 1)
                for (int64_t w = w0; w < w1; ++w)
                    for (int64_t c = c0; c < c1; ++c) dst[w * dw + c] = src[w * sw + c * sc];
            else
                for (int64_t c = c0; c < c1; ++c)
                    for (int64_t w = w0; w < w1; ++w) dst[w * dw + c * dc] = src[w * sw + c * sc];
        }
}

/* Copy int8 x [N, C, S_0 .. S_{nd-1}] (element strides ``sstr`` in that order) to ``dst``
 * (element strides ``dstr``, same order): the layout changes around the implicit GEMMs (into
 * the zero-padded grid channels-last, or channel-major), one [S_last, C] slab per thread
 * step.  torch's strided copy took 10 ms for a transposing [16, 64, 64, 64] copy that this
 * does in a fraction of that. */
void sq_copy_layout(const int8_t *src, const int64_t *sizes, const int64_t *sstr, int nd, int8_t *dst,
                    const int64_t *dstr, int threads) {
    int64_t rows = sizes[0];
    for (int d = 0; d < nd - 1; ++d) rows *= sizes[2 + d];
    const int64_t W = sizes[1 + nd], C = sizes[1];
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        int64_t rem = r, so = 0, doff = 0;
        for (int d = nd - 2; d >= 0; --d) {       /* the leading spatial dims, last first */
            const int64_t i = rem % sizes[2 + d];
            rem /= sizes[2 + d];
            so += i * sstr[2 + d];
            doff += i * dstr[2 + d];
        }
        so += rem * sstr[0];
        doff += rem * dstr[0];
        copy_slab(src + so, sstr[1 + nd], sstr[1], dst + doff, dstr[1 + nd], dstr[1], W, C);
    }
}

/* The weight gradient's implicit GEMM computes dW as [taps, Cp, Cout] (Cp >= C rows a tap);
 * PyTorch's weights are [Cout, C, taps]: dst[(co * C + c) * taps + t] = src[(t * Cp + c) * Cout + co].
 * Sixteen channels at a time: for each output channel their 16 x taps values are one
 * contiguous run of dst, read from 16 x taps source lines that stay in L1 while co moves
 * along them. */
void sq_wgrad_layout(const int32_t *src, int64_t taps, int64_t C, int64_t Cp, int64_t Cout, int32_t *dst,
                     int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c0 = 0; c0 < C; c0 += 16) {
        const int64_t c1 = c0 + 16 < C ? c0 + 16 : C;
        for (int64_t co = 0; co < Cout; ++co) {
            int32_t *d = dst + (co * C + c0) * taps;
            for (int64_t c = c0; c < c1; ++c)
                for (int64_t t = 0; t < taps; ++t) *d++ = src[(t * Cp + c) * Cout + co];
        }
    }
}

#endif
