/* The layout copies around the implicit-GEMM convolutions, shared by the int8 GEMM kernels
 * (amx_int8.c, avx2_int8.c: each library exports its own copy, built with its own flags). */
#ifndef SQCOMPILE_CONV_LAYOUT_H
#define SQCOMPILE_CONV_LAYOUT_H

#include <stdint.h>
#include <string.h>

/* dst[w * dw + c * dc] = src[w * sw + c * sc] for w < W, c < C: one [W, C] slab of int8,
 * either side channels-innermost or not.  Contiguous rows are copied whole; a transposing
 * slab goes through 64 x 64 blocks that stay in L1. */
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
    for (int64_t w0 = 0; w0 < W; w0 += 64)
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
