/* Helpers shared by our AVX-512 kernels (cpu_attention.c, cpu_quant.c). */
#ifndef SQCOMPILE_AVX512_H
#define SQCOMPILE_AVX512_H
#include <immintrin.h>
#include <stdint.h>

static inline __mmask16 lanes(int64_t from, int64_t to) {
    /* the lanes of the 16 elements at `from` that lie below `to` */
    int64_t n = to - from;
    return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1u);
}

#endif
