/* int8 x int8 -> int32 GEMM on AVX2 (VPMADDUBSW), for CPUs without VNNI or AMX.
 *
 * C[b] = A[b] @ B[b] for a batch of products: A [M, K] and B [K, N] with any strides, C
 * [M, N] contiguous int32.  The result is the exact integer product, bit-equal to
 * torch._int_mm -- or the call refuses (returns 2) and the caller takes another engine.
 *
 * Why: VPMADDUBSW multiplies 32 unsigned bytes by 32 signed bytes and adds adjacent pairs
 * into 16 int16 lanes -- 32 multiply-adds an instruction, four times an AVX2 float32 FMA's 8
 * (measured on an AMD EPYC (Zen 3) core: 138 G multiply-adds/s with VPADDW against 47 for
 * VFMADD231PS).  Two catches, both handled exactly:
 *
 * * one operand must be unsigned.  B is stored offset by its own magnitude bound
 *   ``off = max |B|``: ``B + off`` lies in [0, 2 off] <= 254, and
 *   ``A (B + off) = A B + off * rowsum(A)``, so each C row starts from ``-off * rowsum(A)``;
 * * the int16 pair sums saturate.  A pair is at most ``2 * 2 off * max |A|`` in magnitude;
 *   the call refuses unless that is <= 32767, i.e. ``max|A| * max|B| <= 8191``, which every
 *   product of 4- to 6-bit training meets (a 4-bit operand against any int8 one; at 6 bits
 *   ShiftQuant's 124 against unsigned activations' 63).  7- and 8-bit products can refuse
 *   (126 x 127, 127 x 127): the caller runs them elsewhere.
 *   Within the bound, ``T = 32767 / pair bound`` pair sums may be added in int16 before they
 *   are widened to int32 (VPMADDWD by ones) -- one widening per T steps, not per step.
 *
 * Layout.  B is packed (offset, as unsigned bytes) into strips of 16 columns: for each group
 * of 4 consecutive k, 64 bytes [16 columns][4 k] -- two YMM registers of 8 columns, each
 * int32 lane one column's 4 bytes, so VPMADDUBSW then VPMADDWD sum 4 k of one column.  A is
 * packed into blocks of MR rows: for each group of 4 k, MR x 4 bytes, each row's 4 bytes
 * broadcast to every lane; its row sums are taken from the packed blocks.  K is zero-padded
 * to whole groups (A's zeros cancel B's offset), M and N to whole blocks (computed, not
 * stored).  Any strides: row-major B and column-major A (a weight gradient's) are packed 16
 * bytes at a time, other layouts byte by byte.  The implicit GEMMs' A (a convolution's) is
 * read in place where a block's rows lie one stride apart, else packed as whole rows
 * (pack_a_implicit); the micro-kernel takes a row stride and a group step for either.
 *
 * Blocking: a unit of work is MC rows x one N panel of PANEL strips; the reduction runs in
 * chunks of KC groups so a strip's chunk (KC x 64 bytes) stays in L1 while the unit's row
 * blocks pass over it.  The micro-kernel (assembly) holds MR x 16 int16 sums in 2 MR
 * registers and adds them, widened, into int32 sums in a small array in L1.
 *
 * Threads: OpenMP (the libgomp torch loaded) over rows and strips while measuring and
 * packing, and over (batch, row block, panel) units while multiplying.
 *
 * The VNNI build (-DSQ_VNNI) swaps the micro-kernel's rows for VPDPBUSD on ZMM registers
 * (int32 sums: no bound, nothing measured or refused, B offset by 128) and the strips for 32
 * columns; packing and blocking are shared.
 *
 * Build: cc -O3 -fPIC -shared -fopenmp -mavx2 (VNNI: plus -DSQ_VNNI -mavx512f -mavx512vl
 * -mavx512vnni).
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "conv_layout.h"
#include "int8_pack.h"

#define MR 6               /* rows of the micro-kernel (micro_pass, block_sums): 12 int16 registers + 2 of B + 2 */
#ifdef SQ_VNNI
#define NR 32              /* columns of a strip: two ZMM registers of 16 */
#else
#define NR 16              /* columns of a strip: two YMM registers of 8 */
#endif
#define GROUP_BYTES (NR * 4)
#ifndef KC
#define KC 128             /* 4-k groups per reduction chunk: 8 KiB of a strip (VNNI: 16 KiB) */
#endif
#ifdef SQ_VNNI             /* the best of a sweep on a Zen 4 core (avx2.py, "The VNNI build") */
#ifndef MC
#define MC (2 * MR)
#endif
#ifndef PANEL
#define PANEL 16           /* 512 columns */
#endif
#endif
#ifndef MC
#define MC (8 * MR)        /* rows of a unit of work */
#endif
#ifndef PANEL
#define PANEL 8            /* strips of a unit of work (128 columns) */
#endif

#define REFUSED 2
_Static_assert(KC % 16 == 0, "chunks of whole 64-byte k steps (micro_steps)");

static inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

void sq_avx2_release_workspace(void) { release_workspace(); }

static inline int abs8(int8_t v) { return v < 0 ? -v : v; }

#ifndef SQ_VNNI            /* the magnitudes only bound the int16 sums */
/* The largest |A| over rows m0 .. m1 (loops the compiler vectorizes for either unit stride). */
static int a_max(const int8_t *A, int64_t sm, int64_t sk, int64_t m0, int64_t m1, int64_t K) {
    int best = 0;
    if (sk == 1) {
        for (int64_t m = m0; m < m1; ++m) {
            const int8_t *row = A + m * sm;
            for (int64_t k = 0; k < K; ++k) best = abs8(row[k]) > best ? abs8(row[k]) : best;
        }
    } else {
        for (int64_t k = 0; k < K; ++k) {
            const int8_t *col = A + k * sk;
            for (int64_t m = m0; m < m1; ++m) best = abs8(col[m * sm]) > best ? abs8(col[m * sm]) : best;
        }
    }
    return best;
}
#endif

/* The row sums of one packed A block ([G][MR][4] bytes) into ``sums`` [MR] (exact: K <= 2**24).
 * Four groups are 24 int32 words, three registers in which word w always holds row w % 6:
 * each word's 4 bytes summed by VPMADDUBSW with ones then VPMADDWD with ones. */
static void block_sums(const int8_t *blk, int64_t G, int32_t *sums) {
    const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
    __m256i acc[3] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
    int64_t g = 0;
    for (; g + 4 <= G; g += 4)
        for (int i = 0; i < 3; ++i) {
            const __m256i x = _mm256_loadu_si256((const __m256i *)(blk + g * MR * 4 + 32 * i));
            acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, x), ones16));
        }
    int32_t lanes[24];
    for (int i = 0; i < 3; ++i) _mm256_storeu_si256((__m256i *)(lanes + 8 * i), acc[i]);
    for (int r = 0; r < MR; ++r) sums[r] = lanes[r] + lanes[r + 6] + lanes[r + 12] + lanes[r + 18];
    for (; g < G; ++g)
        for (int r = 0; r < MR; ++r)
            for (int t = 0; t < 4; ++t) sums[r] += blk[(g * MR + r) * 4 + t];
}

#ifndef SQ_VNNI
/* The largest |B| over columns n0 .. n1. */
static int b_max(const int8_t *B, int64_t sk, int64_t sn, int64_t K, int64_t n0, int64_t n1) {
    int best = 0;
    if (sn == 1) {
        for (int64_t k = 0; k < K; ++k) {
            const int8_t *row = B + k * sk;
            for (int64_t n = n0; n < n1; ++n) best = abs8(row[n]) > best ? abs8(row[n]) : best;
        }
    } else {
        for (int64_t n = n0; n < n1; ++n) {
            const int8_t *col = B + n * sn;
            for (int64_t k = 0; k < K; ++k) best = abs8(col[k * sk]) > best ? abs8(col[k * sk]) : best;
        }
    }
    return best;
}
#endif

/* Pack strip s of B (columns NR s ..) into ``out`` [G groups][NR][4] as B + off, unsigned;
 * zero (then offset) outside B -- those columns are never stored, those k meet A's zeros. */
static void pack_b_strip(const int8_t *B, int64_t sk, int64_t sn, int64_t K, int64_t N, int64_t s, int off,
                         uint8_t *out) {
    const int64_t G = cdiv(K, 4), n0 = s * NR;
    const int cols = (int)min64(NR, N - n0);
    if (sn == 1 && cols == NR) {
        const __m128i o = _mm_set1_epi8((char)off);
        for (int64_t g = 0; g < G; ++g) {
            uint8_t *dst = out + g * GROUP_BYTES;
            if (4 * g + 4 <= K) {
                for (int h = 0; h < NR / 16; ++h) sq_interleave4(B + 4 * g * sk + n0 + 16 * h, sk, dst + 64 * h);
            } else {                        /* the last, partial group: its rows past K are zeros */
                int8_t rows[4][NR] = {{0}};
                for (int64_t k = 4 * g; k < K; ++k) memcpy(rows[k - 4 * g], B + k * sk + n0, NR);
                for (int h = 0; h < NR / 16; ++h) sq_interleave4(&rows[0][16 * h], NR, dst + 64 * h);
            }
            for (int i = 0; i < NR / 4; ++i) {   /* the offset, bytewise: the interleave only moves bytes */
                __m128i *q = (__m128i *)dst + i;
                _mm_storeu_si128(q, _mm_add_epi8(_mm_loadu_si128(q), o));
            }
        }
        return;
    }
    if (sk == 1 && K % 4 == 0) {            /* column-major: each column's 4 k are one int32 */
        for (int c = 0; c < NR; ++c) {
            if (c < cols) {
                const int8_t *col = B + (n0 + c) * sn;
                for (int64_t g = 0; g < G; ++g) {
                    uint32_t v;
                    memcpy(&v, col + 4 * g, 4);
                    v = ((v & 0x7f7f7f7fu) + 0x01010101u * (uint32_t)off) ^ (v & 0x80808080u);  /* bytewise + off */
                    memcpy(out + g * GROUP_BYTES + 4 * c, &v, 4);
                }
            } else {
                for (int64_t g = 0; g < G; ++g) memset(out + g * GROUP_BYTES + 4 * c, off, 4);
            }
        }
        return;
    }
    for (int64_t g = 0; g < G; ++g)
        for (int c = 0; c < NR; ++c)
            for (int t = 0; t < 4; ++t) {
                const int64_t k = 4 * g + t;
                const int v = (c < cols && k < K) ? B[k * sk + (n0 + c) * sn] : 0;
                out[g * GROUP_BYTES + 4 * c + t] = (uint8_t)(v + off);
            }
}

#define A_CHUNK 48         /* rows of A a column-major pack step takes: 8 blocks, 3 x 16 bytes */

/* Pack the A_CHUNK rows from block mb on of a column-major A (``sm == 1``, all of them in A,
 * K a multiple of 4): each group's 4 columns interleaved 16 rows at a time, every block's
 * 6 rows then one 24-byte copy. */
static void pack_a_chunk_colmajor(const int8_t *A, int64_t sk, int64_t K, int64_t mb, int8_t *out) {
    const int64_t G = K / 4, m0 = mb * MR;
    uint8_t t[A_CHUNK * 4];
    for (int64_t g = 0; g < G; ++g) {
        for (int i = 0; i < A_CHUNK / 16; ++i) sq_interleave4(A + m0 + 16 * i + 4 * g * sk, sk, t + 64 * i);
        for (int j = 0; j < A_CHUNK / MR; ++j) memcpy(out + ((mb + j) * G + g) * MR * 4, t + j * MR * 4, MR * 4);
    }
}

/* Pack row block mb of A (rows MR mb ..) into ``out`` [G groups][MR][4], zero outside A. */
static void pack_a_block(const int8_t *A, int64_t sm, int64_t sk, int64_t M, int64_t K, int64_t mb, int8_t *out) {
    const int64_t G = cdiv(K, 4), m0 = mb * MR;
    const int rows = (int)min64(MR, M - m0);
    if (sk == 1) {
        for (int r = 0; r < MR; ++r) {
            const int8_t *row = A + (m0 + r) * sm;
            if (r >= rows) {
                for (int64_t g = 0; g < G; ++g) memset(out + (g * MR + r) * 4, 0, 4);
                continue;
            }
            for (int64_t g = 0; g < K / 4; ++g) memcpy(out + (g * MR + r) * 4, row + 4 * g, 4);
            if (K % 4) {
                int8_t last[4] = {0, 0, 0, 0};
                memcpy(last, row + 4 * (K / 4), K % 4);
                memcpy(out + ((G - 1) * MR + r) * 4, last, 4);
            }
        }
        return;
    }
    for (int64_t g = 0; g < G; ++g)
        for (int r = 0; r < MR; ++r)
            for (int t = 0; t < 4; ++t) {
                const int64_t k = 4 * g + t;
                out[(g * MR + r) * 4 + t] = (r < rows && k < K) ? A[(m0 + r) * sm + k * sk] : 0;
            }
}

/* One pass of the micro-kernel, written out in assembly: GCC kept too few of the 12 int16
 * sums in registers (it hoists the 6 broadcasts) and spilled the rest every step, at half
 * this speed.  Registers (V: ymm, or zmm in the VNNI build): V0-11 the sums of rows 0-5
 * (even: the strip's first half of columns, odd: its second), V12-13 the strip's bytes of
 * one group, V14 a row's broadcast 4 bytes, V15 the product (then VPMADDWD's ones).  Runs
 * ``n`` >= 1 groups from zero, then adds the sums (widened to int32) into ``acc`` [6][NR].
 *
 * The VNNI build's rows are VPDPBUSD instead: 4 unsigned by 4 signed bytes added into an
 * int32 lane (wrapping, never saturating), so its sums are int32 from the start.  It runs on
 * ZMM registers: on a Zen 4 core YMM VPDPBUSD issues twice a cycle, as many multiply-adds as
 * ZMM's once, but this loop's YMM form reached 176 G multiply-adds/s from L1 against 224. */
#ifdef SQ_VNNI
#define SQ_V "zmm"
#define SQ_XOR "vpxord"
#define SQ_LOAD "vmovdqu32"
#define SQ_ROW(addr, even, odd) \
    "vpbroadcastd " addr ", %%zmm14\n\t" \
    "vpdpbusd %%zmm14, %%zmm12, %%zmm" #even "\n\t" \
    "vpdpbusd %%zmm14, %%zmm13, %%zmm" #odd "\n\t"
#define SQ_ONES ""
#define SQ_WIDEN(i) \
    "vpaddd " #i "*%c[vb](%[acc]), %%zmm" #i ", %%zmm" #i "\n\t" \
    "vmovdqu32 %%zmm" #i ", " #i "*%c[vb](%[acc])\n\t"
#else
#define SQ_V "ymm"
#define SQ_XOR "vpxor"
#define SQ_LOAD "vmovdqu"
#define SQ_ROW(addr, even, odd) \
    "vpbroadcastd " addr ", %%ymm14\n\t" \
    "vpmaddubsw %%ymm14, %%ymm12, %%ymm15\n\t" \
    "vpaddw %%ymm15, %%ymm" #even ", %%ymm" #even "\n\t" \
    "vpmaddubsw %%ymm14, %%ymm13, %%ymm15\n\t" \
    "vpaddw %%ymm15, %%ymm" #odd ", %%ymm" #odd "\n\t"
#define SQ_ONES                 /* ymm15 = int16 ones, VPMADDWD's multiplier */ \
    "vpcmpeqw %%ymm15, %%ymm15, %%ymm15\n\t" \
    "vpsrlw $15, %%ymm15, %%ymm15\n\t"
#define SQ_WIDEN(i) \
    "vpmaddwd %%ymm15, %%ymm" #i ", %%ymm" #i "\n\t" \
    "vpaddd " #i "*%c[vb](%[acc]), %%ymm" #i ", %%ymm" #i "\n\t" \
    "vmovdqu %%ymm" #i ", " #i "*%c[vb](%[acc])\n\t"
#endif
#define SQ_ZERO(i) SQ_XOR " %%" SQ_V #i ", %%" SQ_V #i ", %%" SQ_V #i "\n\t"
#define SQ_ZERO_SUMS \
    SQ_ZERO(0) SQ_ZERO(1) SQ_ZERO(2) SQ_ZERO(3) SQ_ZERO(4) SQ_ZERO(5) \
    SQ_ZERO(6) SQ_ZERO(7) SQ_ZERO(8) SQ_ZERO(9) SQ_ZERO(10) SQ_ZERO(11)
/* one group: B's two registers, then the 6 rows at a, a + rs, a + 2 rs, a3 = a + 3 rs, ... */
#define SQ_GROUP \
    SQ_LOAD " (%[b]), %%" SQ_V "12\n\t" \
    SQ_LOAD " %c[vb](%[b]), %%" SQ_V "13\n\t" \
    SQ_ROW("(%[a])", 0, 1) SQ_ROW("(%[a],%[rs],1)", 2, 3) SQ_ROW("(%[a],%[rs],2)", 4, 5) \
    SQ_ROW("(%[a3])", 6, 7) SQ_ROW("(%[a3],%[rs],1)", 8, 9) SQ_ROW("(%[a3],%[rs],2)", 10, 11)
#define SQ_ADD_SUMS \
    SQ_ONES \
    SQ_WIDEN(0) SQ_WIDEN(1) SQ_WIDEN(2) SQ_WIDEN(3) SQ_WIDEN(4) SQ_WIDEN(5) \
    SQ_WIDEN(6) SQ_WIDEN(7) SQ_WIDEN(8) SQ_WIDEN(9) SQ_WIDEN(10) SQ_WIDEN(11)
#define SQ_CLOBBERS \
    "memory", "cc", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", \
    "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15"

static inline void micro_pass(const int8_t *a, int64_t rs, int64_t gs, const uint8_t *b, int64_t n, int32_t *acc) {
    const int8_t *a3 = a + 3 * rs;
    __asm__ volatile(
        SQ_ZERO_SUMS
        "1:\n\t"
        SQ_GROUP
        "add %[gs], %[a]\n\t"
        "add %[gs], %[a3]\n\t"
        "add %[gb], %[b]\n\t"
        "dec %[n]\n\t"
        "jnz 1b\n\t"
        SQ_ADD_SUMS
        : [a] "+r"(a), [a3] "+r"(a3), [b] "+r"(b), [n] "+r"(n)
        : [acc] "r"(acc), [rs] "r"(rs), [gs] "r"(gs), [vb] "i"(NR * 2), [gb] "i"(GROUP_BYTES)
        : SQ_CLOBBERS);
}

/* acc[r][0..NR-1] += sum over groups g < G of A block row r x strip columns, in int16 for up
 * to ``T`` groups at a time between widenings.  Row r's 4 bytes of group g at a + r rs + g gs. */
static inline void micro(const int8_t *a, int64_t rs, int64_t gs, const uint8_t *b, int64_t G, int T,
                         int32_t acc[MR][NR]) {
    for (int64_t g0 = 0; g0 < G; g0 += T)
        micro_pass(a + g0 * gs, rs, gs, b + g0 * GROUP_BYTES, min64(T, G - g0), &acc[0][0]);
}

/* Where the rows of A come from: a strided matrix (p, sm, sk), or, for the implicit GEMMs
 * (``moff`` set), tables as sq_amx_int8_implicit's: row m at p + moff[m / 32] + (m % 32) * ld,
 * its 64-byte k step kb koff[kb] bytes further on. */
typedef struct {
    const int8_t *p;
    int64_t sm, sk;
    const int64_t *moff, *koff;
    int64_t ld;
} a_src;

/* Where row block mb of an implicit A starts when its MR rows lie one ``ld`` apart (read in
 * place: a convolution's input grid, a weight gradient's channel rows of one tap), else NULL
 * (packed: a block past M, or across two taps' tables). */
static inline const int8_t *inplace_block(const a_src *A, int64_t M, int64_t mb) {
    const int64_t m0 = mb * MR, m1 = m0 + MR - 1;
    if (m1 >= M || A->moff[m1 / 32] - A->moff[m0 / 32] != (m1 / 32 - m0 / 32) * 32 * A->ld) return NULL;
    return A->p + A->moff[m0 / 32] + (m0 % 32) * A->ld;
}

/* micro_pass over ``nkb`` 64-byte k steps of an A read in place: row r's step j at
 * base + r rs + koff[j] (16 groups each, contiguous), B's groups contiguous from ``b``.  The
 * caller keeps 16 nkb groups within the int16 sums' widening period. */
static inline void micro_steps(const int8_t *base, int64_t rs, const int64_t *koff, int64_t nkb, const uint8_t *b,
                               int32_t *acc) {
    const int64_t rs3 = 3 * rs;
    const int8_t *a, *a3;
    int64_t n;
    __asm__ volatile(
        SQ_ZERO_SUMS
        "2:\n\t"
        "mov (%[ko]), %[a]\n\t"
        "add %[base], %[a]\n\t"
        "lea (%[a],%[rs3]), %[a3]\n\t"
        "mov $16, %[n]\n\t"
        "1:\n\t"
        SQ_GROUP
        "add $4, %[a]\n\t"
        "add $4, %[a3]\n\t"
        "add %[gb], %[b]\n\t"
        "dec %[n]\n\t"
        "jnz 1b\n\t"
        "add $8, %[ko]\n\t"
        "dec %[nkb]\n\t"
        "jnz 2b\n\t"
        SQ_ADD_SUMS
        : [a] "=&r"(a), [a3] "=&r"(a3), [n] "=&r"(n), [b] "+r"(b), [ko] "+r"(koff), [nkb] "+r"(nkb)
        : [base] "r"(base), [rs] "r"(rs), [rs3] "r"(rs3), [acc] "r"(acc), [vb] "i"(NR * 2), [gb] "i"(GROUP_BYTES)
        : SQ_CLOBBERS);
}

/* One unit: row blocks mb0 .. mb1 and strips s0 .. s1 of one product, the reduction in chunks
 * of KC groups; accumulators wait in ``acc`` [MC / MR][PANEL][MR][NR].  An implicit ``A``'s
 * packed blocks hold whole rows (pack_a_implicit), others interleaved groups; with ``inplace``
 * the implicit ``A``'s blocks are read where it has them (micro_steps) when inplace_block
 * says so. */
static void unit(const int8_t *Ap, const a_src *A, int inplace, const uint8_t *Bp,
                 const int32_t *rowsum, int off, int64_t G, int T, int64_t mb0, int64_t mb1, int64_t s0, int64_t s1,
                 int32_t *C, int64_t M, int64_t N, int32_t (*acc)[PANEL][MR][NR]) {
    const int rows = A->moff != NULL;
    const int64_t rs = rows ? 4 * G : 4, gs = rows ? 4 : 4 * MR;
    for (int64_t mb = mb0; mb < mb1; ++mb)
        for (int64_t s = s0; s < s1; ++s)
            for (int r = 0; r < MR; ++r) {
                const int64_t m = mb * MR + r;
                /* A (B + off) - off rowsum(A): wrapping int32 arithmetic, exact mod 2**32, and
                 * the true product fits int32 */
                const int32_t start = m < M ? (int32_t)(0u - (uint32_t)off * (uint32_t)rowsum[m]) : 0;
                for (int c = 0; c < NR; ++c) acc[mb - mb0][s - s0][r][c] = start;
            }
    for (int64_t g0 = 0; g0 < G; g0 += KC) {
        const int64_t g1 = min64(g0 + KC, G);
        for (int64_t s = s0; s < s1; ++s)
            for (int64_t mb = mb0; mb < mb1; ++mb) {
                const int8_t *base = inplace ? inplace_block(A, M, mb) : NULL;
                if (base)
                    micro_steps(base, A->ld, A->koff + g0 / 16, (g1 - g0) / 16, Bp + (s * G + g0) * GROUP_BYTES,
                                &acc[mb - mb0][s - s0][0][0]);
                else
                    micro(Ap + mb * G * MR * 4 + g0 * gs, rs, gs, Bp + (s * G + g0) * GROUP_BYTES, g1 - g0, T,
                          acc[mb - mb0][s - s0]);
            }
    }
    for (int64_t mb = mb0; mb < mb1; ++mb)
        for (int64_t s = s0; s < s1; ++s) {
            const int cols = (int)min64(NR, N - s * NR);
            for (int r = 0; r < MR && mb * MR + r < M; ++r)
                memcpy(C + (mb * MR + r) * N + s * NR, acc[mb - mb0][s - s0][r], cols * 4);
        }
}


/* Pack row block mb of an implicit A (K whole 64-byte steps) as whole rows, [MR][K] bytes
 * (the micro-kernel reads either layout; interleaving groups here cost 4-byte copies, 40% of
 * the VNNI build's time in a U-Net's convolutions), and its row sums into ``sums`` [MR];
 * ``out`` NULL: the sums only (a block read in place). */
static void pack_a_implicit(const a_src *A, int64_t M, int64_t K, int64_t mb, int8_t *out, int32_t *sums) {
    const int64_t KB = K / 64;
    const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
    for (int r = 0; r < MR; ++r) {
        const int64_t m = mb * MR + r;
        int8_t *dst = out ? out + r * K : NULL;
        sums[r] = 0;
        if (m >= M) {
            if (dst) memset(dst, 0, K);
            continue;
        }
        const int8_t *row = A->p + A->moff[m / 32] + (m % 32) * A->ld;
        __m256i acc = _mm256_setzero_si256();
        for (int64_t kb = 0; kb < KB; ++kb)
            for (int h = 0; h < 2; ++h) {
                const __m256i x = _mm256_loadu_si256((const __m256i *)(row + A->koff[kb] + 32 * h));
                if (dst) _mm256_storeu_si256((__m256i *)(dst + 64 * kb + 32 * h), x);
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, x), ones16));
            }
        int32_t lanes[8];
        _mm256_storeu_si256((__m256i *)lanes, acc);
        for (int i = 0; i < 8; ++i) sums[r] += lanes[i];
    }
}

/* The product once max |A| is known (every call measures max |B| itself): refuses above the
 * bound, packs, multiplies.  sab: A's batch stride (0: shared; always 0 for an implicit A). */
static int gemm(a_src A, int64_t sab, int amax, const int8_t *B, int64_t sbb, int64_t sk, int64_t sn,
                int32_t *C, int64_t batch, int64_t M, int64_t N, int64_t K, int threads) {
    const int64_t G = cdiv(K, 4), MB = cdiv(M, MR), S = cdiv(N, NR);
    const int64_t na = sab == 0 ? 1 : batch, nb = sbb == 0 ? 1 : batch;
#ifdef SQ_VNNI
    /* int32 sums never saturate: no bound to check, and B + 128 is unsigned for any int8 B */
    const int bmax = 128;
    (void)amax;
#else
    int bmax = 0;
    #pragma omp parallel for num_threads(threads) schedule(static) reduction(max : bmax)
    for (int64_t u = 0; u < nb * S; ++u) {
        const int64_t b = u / S, s = u % S;
        const int v = b_max(B + b * sbb, sk, sn, K, s * NR, min64(s * NR + NR, N));
        bmax = v > bmax ? v : bmax;
    }
    if ((int64_t)amax * bmax > 8191) return REFUSED;
#endif
    const size_t packed_a = (size_t)(MB * G * MR * 4), packed_b = (size_t)(S * G * GROUP_BYTES);
    const size_t sums = (size_t)(na * MB * MR) * sizeof(int32_t);
    uint8_t *ws = workspace(packed_b * nb + packed_a * na + sums + 64);
    if (!ws) return -1;
    uint8_t *Bp = ws;
    int8_t *Ap = (int8_t *)(ws + packed_b * nb);
    int32_t *rowsum = (int32_t *)(((uintptr_t)(Ap + packed_a * na) + 63) & ~(uintptr_t)63);
    const int off = bmax;
#ifdef SQ_VNNI
    const int T = 1 << 30;                            /* micro() runs whole chunks of KC groups */
#else
    const int pair = 4 * amax * bmax;                 /* |one VPMADDUBSW lane| <= pair <= 32764 */
    const int T = pair == 0 ? 1 << 30 : 32767 / pair;
#endif
    /* An implicit A's blocks are read in place (inplace_block) where a chunk's steps fit the
     * int16 sums' widening period: always in the VNNI build */
    const int inplace = A.moff && T >= KC;
    const int64_t units_m = cdiv(MB, MC / MR), units_n = cdiv(S, PANEL);
    #pragma omp parallel num_threads(threads)
    {
        #pragma omp for schedule(static) nowait
        for (int64_t u = 0; u < nb * S; ++u)
            pack_b_strip(B + (u / S) * sbb, sk, sn, K, N, u % S, off, Bp + (u / S) * packed_b + (u % S) * G * GROUP_BYTES);
        /* a column-major A goes A_CHUNK rows at a time where whole chunks lie in A */
        const int chunked = !A.moff && A.sm == 1 && K % 4 == 0;
        const int64_t per = A_CHUNK / MR, chunks = chunked ? M / A_CHUNK : 0, lone = MB - chunks * per;
        #pragma omp for schedule(static)
        for (int64_t u = 0; u < na * (chunks + lone); ++u) {
            const int64_t b = u / (chunks + lone), i = u % (chunks + lone);
            const int64_t mb0 = i < chunks ? i * per : chunks * per + (i - chunks), mb1 = i < chunks ? mb0 + per : mb0 + 1;
            int8_t *out = Ap + b * packed_a;
            if (A.moff) {
                const int8_t *base = inplace ? inplace_block(&A, M, mb0) : NULL;
                pack_a_implicit(&A, M, K, mb0, base ? NULL : out + mb0 * G * MR * 4, rowsum + mb0 * MR);
                continue;
            }
            if (i < chunks) pack_a_chunk_colmajor(A.p + b * sab, A.sk, K, mb0, out);
            else pack_a_block(A.p + b * sab, A.sm, A.sk, M, K, mb0, out + mb0 * G * MR * 4);
            for (int64_t mb = mb0; mb < mb1; ++mb)
                block_sums(out + mb * G * MR * 4, G, rowsum + (b * MB + mb) * MR);
        }
        static __thread int32_t acc[MC / MR][PANEL][MR][NR] __attribute__((aligned(64)));
        #pragma omp for schedule(static)
        for (int64_t u = 0; u < batch * units_n * units_m; ++u) {
            /* panel-major: a thread's consecutive units share one panel of B */
            const int64_t b = u / (units_n * units_m), rem = u % (units_n * units_m);
            const int64_t p = rem / units_m, q = rem % units_m;
            const int64_t mb0 = q * (MC / MR), s0 = p * PANEL;
            unit(Ap + (sab == 0 ? 0 : b * packed_a), &A, inplace, Bp + (sbb == 0 ? 0 : b * packed_b),
                 rowsum + (sab == 0 ? 0 : b * MB * MR), off, G, T, mb0, min64(mb0 + MC / MR, MB), s0, min64(s0 + PANEL, S),
                 C + b * M * N, M, N, acc);
        }
    }
    return 0;
}

/* C[b] = A[b] @ B[b], b < batch.  Strides in elements, any (sab / sbb: batch strides, 0
 * broadcasts one operand); C contiguous [batch, M, N].  Returns 0, -1 when the workspace
 * cannot be allocated, REFUSED (2) when max|A| * max|B| > 8191 (nothing written). */
int sq_avx2_int8_mm(const int8_t *A, int64_t sab, int64_t sam, int64_t sak,
                    const int8_t *B, int64_t sbb, int64_t sk, int64_t sn,
                    int32_t *C, int64_t batch, int64_t M, int64_t N, int64_t K, int threads) {
    int amax = 0;
#ifndef SQ_VNNI
    const int64_t na = sab == 0 ? 1 : batch, arows = 64, la = cdiv(M, arows);
    #pragma omp parallel for num_threads(threads) schedule(static) reduction(max : amax)
    for (int64_t u = 0; u < na * la; ++u) {
        const int64_t m0 = (u % la) * arows;
        const int v = a_max(A + (u / la) * sab, sam, sak, m0, min64(m0 + arows, M), K);
        amax = v > amax ? v : amax;
    }
#endif
    const a_src src = {A, sam, sak, NULL, NULL, 0};
    return gemm(src, sab, amax, B, sbb, sk, sn, C, batch, M, N, K, threads);
}

/* Implicit GEMMs, as sq_amx_int8_implicit (amx_int8.c, whose comment describes the tables
 * the convolutions pass): C [MB * 32, N] = A B with A's 32-row block mb at X + moff[mb], rows
 * ``ld`` bytes apart, its 64-byte k step kb koff[kb] bytes on; B [KB * 64, N].  ``xlen``:
 * the bytes of X, whose largest magnitude bounds A's.  Returns as sq_avx2_int8_mm. */
int sq_avx2_int8_implicit(const int8_t *X, int64_t xlen, int64_t ld, const int64_t *moff, int64_t MB,
                          const int64_t *koff, int64_t KB, const int8_t *B, int64_t sk, int64_t sn, int32_t *C,
                          int64_t N, int threads) {
    int amax = 0;
#ifndef SQ_VNNI
    const int64_t step = 1 << 16;
    #pragma omp parallel for num_threads(threads) schedule(static) reduction(max : amax)
    for (int64_t u = 0; u < cdiv(xlen, step); ++u) {
        const int v = a_max(X + u * step, 0, 1, 0, 1, min64(step, xlen - u * step));
        amax = v > amax ? v : amax;
    }
#endif
    const a_src src = {X, 0, 0, moff, koff, ld};
    return gemm(src, 0, amax, B, 0, sk, sn, C, 1, MB * 32, N, KB * 64, threads);
}
