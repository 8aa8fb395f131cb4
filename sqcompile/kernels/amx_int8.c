/* int8 x int8 -> int32 GEMM on Intel AMX (TDPBSSD), for sqcompile's CPU integer path.
 *
 * C[b] = A[b] @ B[b] for a batch of products: A [M, K] and B [K, N] each row- or
 * column-major (one unit stride, any other stride), C [M, N] contiguous int32.  The result
 * is the exact integer product: each int32 lane accumulates at most K products, and the
 * caller keeps K * 127 * 128 below 2**31 (ops.MAX_INT32_TERMS; quantized values are never
 * -128).
 *
 * Layout.  An AMX tile holds at most 16 rows of 64 bytes.  TDPBSSD multiplies an A tile
 * (16 rows x 64 int8 of K) by a B tile in "VNNI" order (16 rows, each holding 16 columns x 4
 * consecutive k) into a 16 x 16 int32 C tile.  B is packed on every call into that order,
 * zero-padded to whole tiles.  A row-major A whose K is whole tiles is read in place (only
 * a last block of fewer than 32 rows is copied); any other A is packed into 32-row blocks
 * (transposed on the way when column-major).  Each 32 x 32 block of C is held in four tile
 * registers (2 A tiles x 2 B tiles) over a reduction chunk and stored straight into C.
 *
 * Implicit GEMMs (sq_amx_int8_implicit, below): the same blocks with A read in place at
 * offsets from tables, which is how convolutions run without im2col columns; and the layout
 * copies around them (sq_copy_layout, sq_wgrad_layout).
 *
 * Threads: OpenMP over (batch, 32-row block, 128-column panel), and over lines of tiles
 * while packing; the library links the libgomp that torch loaded, so it shares torch's
 * thread pool.  The caller passes torch.get_num_threads().
 *
 * Build: cc -O2 -fPIC -shared -fopenmp -mamx-tile -mamx-int8 -mavx512f -mavx512bw.
 */
#include <immintrin.h>
#include <stdint.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "conv_layout.h"
#include "int8_pack.h"

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

#define TILE_K 64          /* bytes of K in one A tile row */
#define TILE_N 16          /* int32 columns in one C tile */
#define TILE_BYTES 1024    /* 16 rows x 64 bytes */
#define PANEL_BYTES (1 << 20)   /* packed B per N panel (a unit of parallel work): see panel_tiles */
#define MIN_PANEL_TILES 8       /* 128 columns */
#define ACC_PANEL_TILES 32      /* the widest panel whose partial sums wait in acc (64 KiB) */
#define LAZY_B_BYTES (4 << 20)  /* packed B beyond this is packed a panel at a time */
#ifndef KC_TILES
#define KC_TILES 8         /* k tiles per reduction chunk: 32 x 512 bytes of A in L1 */
#endif

typedef struct {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* Ask the kernel for permission to use the AMX tile data state (Linux >= 5.16).
 * Returns 0 on success. */
int sq_amx_init(void) {
    return (int)syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA);
}

static void load_config(void) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int t = 0; t < 8; ++t) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
}

static inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

void sq_amx_release_workspace(void) { release_workspace(); }

/* Pack tile (j, kb) of one B [K, N] (strides sk, sn) into VNNI order: ``tile`` (1 KiB) holds
 * tile[r * 64 + c * 4 + t] = B[kb * 64 + r * 4 + t][j * 16 + c], zero outside B.  Whole tiles
 * of a row-major B are packed by pack_b_kline instead.  Packed B keeps the tiles of N tiles
 * j0 .. j1 (a panel, or all of B) in order, tile (j, kb) at ((j - j0) * KB + kb) * 1024. */
static void pack_b_tile(const int8_t *B, int64_t sk, int64_t sn, int64_t K, int64_t N, int64_t j, int64_t kb,
                        int8_t *tile) {
    const int64_t n0 = j * TILE_N, k0 = kb * TILE_K;
    const int full = (n0 + TILE_N <= N) && (k0 + TILE_K <= K);
    if (full && sk == 1 && sn < (INT32_MAX / 16)) {
        /* columns of B are contiguous: 4 consecutive k of a column are one int32, and a tile
         * row gathers one such int32 from each of the 16 columns. */
        const __m512i cols = _mm512_mullo_epi32(
            _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32((int)sn));
        for (int r = 0; r < 16; ++r)
            _mm512_storeu_si512(tile + r * 64, _mm512_i32gather_epi32(cols, B + n0 * sn + k0 + 4 * r, 1));
    } else {
        for (int r = 0; r < 16; ++r)
            for (int c = 0; c < 16; ++c)
                for (int t = 0; t < 4; ++t) {
                    const int64_t k = k0 + 4 * r + t, n = n0 + c;
                    tile[r * 64 + c * 4 + t] = (k < K && n < N) ? B[k * sk + n * sn] : 0;
                }
    }
}

/* Pack tile pair (mb, kb) of one A [M, K] (strides sm, sk) into the 2 KiB at ``t`` (packed
 * operands keep it at (mb * KB + kb) * 2048): rows mb * 32 .. + 32 of columns kb * 64 .. + 64,
 * zero outside A.  A column-major A
 * (sm == 1: a transposed view, such as the dW GEMM's activations) is transposed on the way:
 * 4 rows of k are interleaved into int32 lanes (as for B), then that 16 x 32 int32 block is
 * transposed. */
static void pack_a_tile(const int8_t *A, int64_t sm, int64_t sk, int64_t M, int64_t K, int64_t mb, int64_t kb,
                        int8_t *t) {
    const int64_t m0 = mb * 32, k0 = kb * TILE_K;
    const int kk = (int)(K - k0 < TILE_K ? K - k0 : TILE_K);
    if (sk == 1) {
        for (int r = 0; r < 32; ++r) {
            const int64_t m = m0 + r;
            if (m < M && kk == TILE_K) {
                _mm512_storeu_si512(t + r * 64, _mm512_loadu_si512(A + m * sm + k0));
            } else {
                memset(t + r * 64, 0, 64);
                if (m < M) memcpy(t + r * 64, A + m * sm + k0, kk);
            }
        }
    } else if (m0 + 32 <= M && kk == TILE_K) {
        int32_t quad[16][32] __attribute__((aligned(64)));   /* [k / 4][m]: 4 k per lane */
        for (int g = 0; g < 16; ++g)
            for (int h = 0; h < 2; ++h)
                sq_interleave4(A + (k0 + 4 * g) * sk + m0 + 16 * h, sk, (int8_t *)&quad[g][16 * h]);
        int32_t *t32 = (int32_t *)t;
        for (int r = 0; r < 32; ++r)
            for (int g = 0; g < 16; ++g) t32[r * 16 + g] = quad[g][r];
    } else {
        for (int r = 0; r < 32; ++r)
            for (int c = 0; c < 64; ++c)
                t[r * 64 + c] = (m0 + r < M && c < kk) ? A[(m0 + r) * sm + (k0 + c) * sk] : 0;
    }
}

/* Pack a whole operand, one "line" of tiles per call, in the order that reads its memory
 * contiguously: a line runs along the operand's contiguous dimension (so consecutive tiles
 * continue the same memory rows) and the lines are what threads share out.
 *   A row-major: line = 32-row block mb, tiles along k;  A column-major: line = k tile kb,
 *   tiles along m.  B row-major: line = k tile kb, tiles along n;  B column-major: line =
 *   N tile j, tiles along k. */
static int64_t a_lines(int64_t sk, int64_t M, int64_t K) { return sk == 1 ? cdiv(M, 32) : cdiv(K, TILE_K); }
static int64_t b_lines(int64_t sn, int64_t K, int64_t N) { return sn == 1 ? cdiv(K, TILE_K) : cdiv(N, TILE_N); }

static void pack_a_line(const int8_t *A, int64_t sm, int64_t sk, int64_t M, int64_t K, int64_t line, int8_t *out) {
    const int64_t KB = cdiv(K, TILE_K), along = sk == 1 ? KB : cdiv(M, 32);
    for (int64_t i = 0; i < along; ++i) {
        const int64_t mb = sk == 1 ? line : i, kb = sk == 1 ? i : line;
        pack_a_tile(A, sm, sk, M, K, mb, kb, out + (mb * KB + kb) * 2 * TILE_BYTES);
    }
}

/* The tiles (j, kb) of N tiles j0 .. j1 and one k tile kb of a row-major B into packed B
 * ``out`` (starting at N tile j0).  A whole k tile goes 4 rows at a time across the N tiles,
 * so the 4 source rows stay in L1 (the tile's 64 rows of a wide B would not). */
static void pack_b_kline(const int8_t *B, int64_t sk, int64_t K, int64_t N, int64_t kb, int64_t j0, int64_t j1,
                         int8_t *out) {
    const int64_t KB = cdiv(K, TILE_K);
    int64_t j = j0;
    if ((kb + 1) * TILE_K <= K) {
        const int64_t whole = j1 < N / TILE_N ? j1 : N / TILE_N;    /* N tiles without a ragged edge */
        for (int r = 0; r < 16; ++r)
            for (int64_t jj = j0; jj < whole; ++jj)
                sq_interleave4(B + (kb * TILE_K + 4 * r) * sk + jj * TILE_N, sk,
                               out + ((jj - j0) * KB + kb) * TILE_BYTES + r * 64);
        if (whole > j) j = whole;
    }
    for (; j < j1; ++j)
        pack_b_tile(B, sk, 1, K, N, j, kb, out + ((j - j0) * KB + kb) * TILE_BYTES);
}

static void pack_b_line(const int8_t *B, int64_t sk, int64_t sn, int64_t K, int64_t N, int64_t line, int8_t *out) {
    const int64_t KB = cdiv(K, TILE_K), NT = cdiv(N, TILE_N);
    if (sn == 1) {
        pack_b_kline(B, sk, K, N, line, 0, NT, out);
        return;
    }
    for (int64_t kb = 0; kb < KB; ++kb)
        pack_b_tile(B, sk, sn, K, N, line, kb, out + (line * KB + kb) * TILE_BYTES);
}

/* Packed B of N tiles j0 .. j1 (one panel) into ``out``. */
static void pack_b_panel(const int8_t *B, int64_t sk, int64_t sn, int64_t K, int64_t N, int64_t j0, int64_t j1,
                         int8_t *out) {
    const int64_t KB = cdiv(K, TILE_K);
    if (sn == 1)
        for (int64_t kb = 0; kb < KB; ++kb) pack_b_kline(B, sk, K, N, kb, j0, j1, out);
    else
        for (int64_t j = j0; j < j1; ++j)
            for (int64_t kb = 0; kb < KB; ++kb)
                pack_b_tile(B, sk, sn, K, N, j, kb, out + ((j - j0) * KB + kb) * TILE_BYTES);
}

/* Where one 32-row block of A is read from: in place (a row-major A whose K is whole tiles:
 * rows ``ld`` apart, the next k step 64 bytes on) or packed (rows 64 bytes apart, k steps of
 * 2 KiB).  ``half``: offset of the block's second 16-row tile. */
typedef struct {
    const int8_t *p;
    int64_t ld, kstep, half;
    const int64_t *koff;    /* implicit-GEMM convolutions: byte offset of k step kb (else kb * kstep) */
} a_view;

static inline const int8_t *a_step(a_view A, int64_t kb) {
    return A.koff ? A.p + A.koff[kb] : A.p + kb * A.kstep;
}

static inline void prefetch_step(const int8_t *a, int64_t ld, int64_t half, const int8_t *b0, const int8_t *b1) {
    for (int l = 0; l < 16; ++l) {
        _mm_prefetch((const char *)(a + l * ld), _MM_HINT_T0);
        _mm_prefetch((const char *)(a + half + l * ld), _MM_HINT_T0);
        _mm_prefetch((const char *)(b0 + l * 64), _MM_HINT_T0);
        _mm_prefetch((const char *)(b1 + l * 64), _MM_HINT_T0);
    }
}

/* Accumulate k tiles kb0 .. kb1 of one 32 x 32 block: A block ``A`` times N tiles
 * j0, j0 + 1 of packed B.  The four C tiles start from zero (``acc`` NULL) or from ``acc``
 * (row stride ``ldacc`` int32) and end in ``out`` (row stride ``ldout``). */
static inline void block(a_view A, const int8_t *b0, const int8_t *b1, int64_t kb0, int64_t kb1,
                         const int32_t *acc, int64_t ldacc, int32_t *out, int64_t ldout,
                         const int8_t *next_a, const int8_t *next_b0, const int8_t *next_b1) {
    if (acc) {
        _tile_loadd(0, acc, ldacc * 4);
        _tile_loadd(1, acc + 16, ldacc * 4);
        _tile_loadd(2, acc + 16 * ldacc, ldacc * 4);
        _tile_loadd(3, acc + 16 * ldacc + 16, ldacc * 4);
    } else {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
    }
    for (int64_t kb = kb0; kb < kb1; ++kb) {
        const int8_t *a = a_step(A, kb);
        /* Bring the next step's tiles into L1 while this one computes (after the last step:
         * the first step of the next block).  Measured: without it TILELOADD stalls even on
         * lines already in L1, and the loop runs at a third of the TDPBSSD rate. */
        if (kb + 1 < kb1)
            prefetch_step(a_step(A, kb + 1), A.ld, A.half, b0 + (kb + 1) * TILE_BYTES, b1 + (kb + 1) * TILE_BYTES);
        else if (next_a)
            prefetch_step(next_a, A.ld, A.half, next_b0, next_b1);
        _tile_loadd(4, a, A.ld);
        _tile_loadd(5, a + A.half, A.ld);
        _tile_loadd(6, b0 + kb * TILE_BYTES, 64);
        _tile_loadd(7, b1 + kb * TILE_BYTES, 64);
        _tile_dpbssd(0, 4, 6);
        _tile_dpbssd(1, 4, 7);
        _tile_dpbssd(2, 5, 6);
        _tile_dpbssd(3, 5, 7);
    }
    _tile_stored(0, out, ldout * 4);
    _tile_stored(1, out + 16, ldout * 4);
    _tile_stored(2, out + 16 * ldout, ldout * 4);
    _tile_stored(3, out + 16 * ldout + 16, ldout * 4);
}

/* N tiles per panel.  A thread's consecutive units share one panel of packed B (in L2) and
 * each writes 32 rows of it into C; a wider panel writes longer runs of each C row, which
 * costs fewer TLB misses and write streams (C rows are 4-8 KiB apart: a 128-column panel
 * stored 512 bytes to each of 32 pages a block).  Measured, one core, 1 thread: a panel of
 * about 1 MiB of packed B (2048 columns at K = 512, 512 at K = 2048, 256 at K = 4096) ran
 * 1.2-1.6x faster than 128 columns on the transformer's products; 2 MiB (L2's size) was
 * slower again.  Never narrower than 128 columns, no wider than ACC_PANEL_TILES when partial
 * sums must wait (K beyond one chunk), and narrowed while there are fewer than four units a
 * thread. */
static int64_t panel_tiles(int64_t KB, int64_t NT, int64_t row_units, int threads) {
    int64_t p = PANEL_BYTES / (KB * TILE_BYTES);
    if (KB > KC_TILES && p > ACC_PANEL_TILES) p = ACC_PANEL_TILES;
    p &= ~(int64_t)1;
    while (p > MIN_PANEL_TILES && row_units * cdiv(NT, p) < 4 * (int64_t)threads) p /= 2;
    return p < MIN_PANEL_TILES ? MIN_PANEL_TILES : p & ~(int64_t)1;
}

/* One unit of work: rows m0 .. m0 + 32 and N tiles j0 .. j1 of one product, ``Bp`` their
 * packed B (tile (j, kb) at ((j - j0) * KB + kb) * 1024).  The reduction runs in chunks of
 * KC_TILES k tiles so the A chunk (32 x 64 * KC_TILES bytes) stays in L1 while the panel's N
 * tiles pass over it; partial sums wait in ``acc`` (32 rows of the panel's columns; with a
 * single chunk, 32 x 32 for a block at the edges of C). */
static void unit(a_view A, const int8_t *Bp, int64_t KB, int64_t NT, int64_t j0, int64_t j1,
                 int32_t *C, int rows, int64_t N, int32_t *acc) {
    /* a lone last N tile is computed as a pair too: room for whole pairs */
    const int64_t ldacc = KB > KC_TILES ? ((j1 - j0 + 1) & ~(int64_t)1) * TILE_N : 32;
    for (int64_t kb0 = 0; kb0 < KB; kb0 += KC_TILES) {
        const int64_t kb1 = kb0 + KC_TILES < KB ? kb0 + KC_TILES : KB;
        const int last = kb1 == KB;
        for (int64_t j = j0; j < j1; j += 2) {
            const int8_t *b0 = Bp + (j - j0) * KB * TILE_BYTES;
            const int8_t *b1 = (j + 1 < NT) ? b0 + KB * TILE_BYTES : b0;  /* lone last tile */
            int32_t *a = KB > KC_TILES ? acc + (j - j0) * TILE_N : acc;
            const int cols = (int)(N - j * TILE_N < 32 ? N - j * TILE_N : 32);
            const int direct = last && rows == 32 && cols == 32;
            /* the step after this block: the next N pair of this chunk, or the next chunk */
            const int64_t nj = j + 2 < j1 ? j + 2 : j0, nk = j + 2 < j1 ? kb0 : kb1;
            const int8_t *nb0 = Bp + (nj - j0) * KB * TILE_BYTES + nk * TILE_BYTES;
            const int8_t *na = (j + 2 < j1 || !last) ? a_step(A, nk) : NULL;
            block(A, b0, b1, kb0, kb1, kb0 ? a : NULL, ldacc, direct ? C + j * TILE_N : a, direct ? N : ldacc,
                  na, nb0, (nj + 1 < NT) ? nb0 + KB * TILE_BYTES : nb0);
            if (last && !direct)
                for (int r = 0; r < rows; ++r) memcpy(C + r * N + j * TILE_N, a + r * ldacc, cols * 4);
        }
    }
}

/* C[b] = A[b] @ B[b], b < batch.  Strides are in elements; A and B each need one unit stride
 * (row- or column-major), C is contiguous [batch, M, N].  sab / sbb: batch strides of A and B (0 broadcasts). */
int sq_amx_int8_mm(const int8_t *A, int64_t sab, int64_t sam, int64_t sak,
                   const int8_t *B, int64_t sbb, int64_t sk, int64_t sn,
                   int32_t *C, int64_t batch, int64_t M, int64_t N, int64_t K, int threads) {
    const int64_t KB = cdiv(K, TILE_K), NT = cdiv(N, TILE_N), MB = cdiv(M, 32);
    /* A row-major A whose K is whole tiles is read in place (packing it costs a pass over A,
     * as much as the products themselves when N is small: 2x on a 64-channel conv's GEMM);
     * only a last block of fewer than 32 rows is copied, zero-padded.  Long rows that many
     * N panels re-read are still packed (their tiles span pages: ~8% slower in place at
     * K = 2048 with 4 panels). */
    const int64_t PT = panel_tiles(KB, NT, batch * MB, threads);
    const int a_direct = sak == 1 && K % TILE_K == 0 && (K <= 1024 || NT <= 2 * PT);
    const int64_t tail = a_direct && M % 32 ? MB - 1 : -1;   /* the copied block, if any */
    const int64_t packed_b = KB * NT * TILE_BYTES;
    const int64_t packed_a = a_direct ? (tail >= 0 ? KB * 2 * TILE_BYTES : 0) : MB * KB * 2 * TILE_BYTES;
    const int64_t nb = sbb == 0 ? 1 : batch;           /* distinct B operands to pack */
    const int64_t na = sab == 0 ? 1 : batch;
    /* A packed B beyond LAZY_B_BYTES (twice L2) is packed a panel at a time, by the thread
     * that needs the panel, into a buffer of its own that stays in L2: packed all at once, it
     * went out to memory and came back (fc2's dW in benchmarks/cpu_gemm.py: 7.2 -> 5.9 ms). */
    const int lazy = packed_b * nb > LAZY_B_BYTES;
    const size_t ws = (size_t)((lazy ? 0 : packed_b * nb) + packed_a * na);
    int8_t *Bp = ws ? workspace(ws) : NULL;
    if (ws && !Bp) return -1;
    int8_t *Ap = Bp + (lazy ? 0 : packed_b * nb);
    const int64_t NP = cdiv(NT, PT);
    const int64_t units = batch * MB * NP;
    const int64_t la = a_direct ? (tail >= 0 ? KB : 0) : a_lines(sak, M, K), lb = lazy ? 0 : b_lines(sn, K, N);
    int failed = 0;
    #pragma omp parallel num_threads(threads)
    {
        #pragma omp for schedule(static) nowait
        for (int64_t u = 0; u < nb * lb; ++u)
            pack_b_line(B + (u / lb) * sbb, sk, sn, K, N, u % lb, Bp + (u / lb) * packed_b);
        #pragma omp for schedule(static)
        for (int64_t u = 0; u < na * la; ++u) {
            const int8_t *a = A + (u / la) * sab;
            int8_t *out = Ap + (u / la) * packed_a;
            if (a_direct) pack_a_tile(a, sam, sak, M, K, tail, u % la, out + (u % la) * 2 * TILE_BYTES);
            else pack_a_line(a, sam, sak, M, K, u % la, out);
        }
        load_config();
        int32_t acc[32 * ACC_PANEL_TILES * TILE_N] __attribute__((aligned(64)));
        int8_t *panel = lazy ? sq_grow(&sq_panel, (size_t)(PT * KB * TILE_BYTES)) : NULL;
        int64_t packed = -1;                            /* the (B operand, panel) in ``panel`` */
        if (lazy && !panel) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t u = 0; u < units; ++u) {
            /* panel-major: consecutive units of a thread share one packed B panel (in L2). */
            const int64_t b = u / (MB * NP), rem = u % (MB * NP);
            const int64_t p = rem / MB, mb = rem % MB;
            const int64_t j0 = p * PT, j1 = j0 + PT < NT ? j0 + PT : NT, bb = sbb == 0 ? 0 : b;
            const int8_t *ap = Ap + (sab == 0 ? 0 : b * packed_a);
            const a_view av = a_direct && mb != tail
                ? (a_view){A + b * sab + mb * 32 * sam, sam, TILE_K, 16 * sam, NULL}
                : (a_view){a_direct ? ap : ap + mb * KB * 2 * TILE_BYTES, 64, 2 * TILE_BYTES, TILE_BYTES, NULL};
            const int8_t *bp = panel;
            if (!lazy)
                bp = Bp + bb * packed_b + j0 * KB * TILE_BYTES;
            else if (!panel)
                continue;
            else if (packed != bb * NP + p) {
                pack_b_panel(B + bb * sbb, sk, sn, K, N, j0, j1, panel);
                packed = bb * NP + p;
            }
            const int rows = (int)(M - mb * 32 < 32 ? M - mb * 32 : 32);
            unit(av, bp, KB, NT, j0, j1, C + b * M * N + mb * 32 * N, rows, N, acc);
        }
        _tile_release();
    }
    return failed ? -1 : 0;
}

/* Implicit GEMMs: products whose A is read in place from an operand it is not laid out as,
 * the convolutions' products without im2col columns (sqcompile/kernels/amx.py builds the
 * tables).  C [MB * 32, N] = A B, where the 32-row block mb of A starts at byte moff[mb]
 * of X, its rows ``ld`` bytes apart, and its k step kb (64 bytes of each row) koff[kb]
 * bytes further on.  B [KB * 64, N] (strides sk, sn) holds zero rows wherever a step's bytes
 * do not belong to the product.  Every byte read -- up to moff[mb] + 31 * ld + koff[kb] +
 * 64 -- must lie inside X: the caller pads.
 *
 *   Forward (and input gradient) at stride 1: row m of the product is position m of the
 *   zero-padded input's grid ([N, *padded sizes], channels innermost, ld = C), and the input
 *   under tap t is position m + off(t): moff[mb] = 32 * mb * C, koff = the taps' byte
 *   offsets (the k taps of the last dim at dilation 1 are adjacent: k * C bytes share steps).
 *   Grid positions in the padding are computed and ignored.
 *
 *   Weight gradient at stride 1: dW[t, c, :] = sum over positions m of X[c, m + off(t)] *
 *   dY[m, :] with X channel-major ([C, grid positions], ld bytes a channel) and dY on the
 *   same grid (zero where no output is): row block mb is 32 channels of one tap, moff[mb] =
 *   c0 * ld + off(t), koff[kb] = 64 * kb. */
int sq_amx_int8_implicit(const int8_t *X, int64_t ld, const int64_t *moff, int64_t MB, const int64_t *koff,
                         int64_t KB, const int8_t *B, int64_t sk, int64_t sn, int32_t *C, int64_t N, int threads) {
    const int64_t K = KB * TILE_K, NT = cdiv(N, TILE_N), PT = panel_tiles(KB, NT, MB, threads), NP = cdiv(NT, PT);
    const int64_t lb = b_lines(sn, K, N);
    int8_t *Bp = workspace((size_t)(KB * NT * TILE_BYTES));
    if (!Bp) return -1;
    #pragma omp parallel num_threads(threads)
    {
        #pragma omp for schedule(static)
        for (int64_t u = 0; u < lb; ++u) pack_b_line(B, sk, sn, K, N, u, Bp);
        load_config();
        int32_t acc[32 * ACC_PANEL_TILES * TILE_N] __attribute__((aligned(64)));
        #pragma omp for schedule(static)
        for (int64_t u = 0; u < MB * NP; ++u) {
            const int64_t p = u / MB, mb = u % MB;
            const a_view av = {X + moff[mb], ld, 0, 16 * ld, koff};
            const int64_t j0 = p * PT;
            unit(av, Bp + j0 * KB * TILE_BYTES, KB, NT, j0, j0 + PT < NT ? j0 + PT : NT, C + mb * 32 * N, 32, N, acc);
        }
        _tile_release();
    }
    return 0;
}
