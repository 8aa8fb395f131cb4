/* Helpers shared by the int8 GEMM kernels (amx_int8.c, avx2_int8.c): the packing workspace
 * and the VNNI-order interleave.  Each library gets its own copy (static). */
#ifndef SQCOMPILE_INT8_PACK_H
#define SQCOMPILE_INT8_PACK_H

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

/* The packed operands live in one workspace per calling thread that only grows: allocating
 * and freeing it per call would page-fault it in anew every time (large blocks come straight
 * from mmap), which costs as much as the packing itself. */
typedef struct {
    void *ptr;
    size_t size;
} sq_buffer;

static __thread sq_buffer sq_ws;      /* the packed operands of the calling thread's call */
static __thread sq_buffer sq_panel;   /* a thread's packed B panel (amx_int8.c packs them lazily) */

static inline void *sq_grow(sq_buffer *buf, size_t bytes) {
    if (bytes > buf->size) {
        free(buf->ptr);
        buf->size = 0;
        bytes = (bytes + (1 << 21) - 1) & ~((size_t)(1 << 21) - 1);   /* whole 2 MiB */
        buf->ptr = aligned_alloc(64, bytes);
        if (!buf->ptr) return NULL;
        buf->size = bytes;
    }
    return buf->ptr;
}

static inline void *workspace(size_t bytes) { return sq_grow(&sq_ws, bytes); }

/* Free the calling thread's buffers (tests; long-lived processes after a large call). */
static inline void release_workspace(void) {
    free(sq_ws.ptr);
    free(sq_panel.ptr);
    sq_ws = (sq_buffer){NULL, 0};
    sq_panel = (sq_buffer){NULL, 0};
}

/* 16 bytes from each of 4 rows (``p``, ``p + stride``, ...) interleaved into 64 bytes:
 * out[4 * c + t] = row t [c], i.e. the 4 rows' bytes of column c form int32 lane c (the
 * "VNNI" order both kernels' packed operands use). */
static inline void sq_interleave4(const int8_t *p, int64_t stride, void *out) {
    const __m128i a0 = _mm_loadu_si128((const __m128i *)p);
    const __m128i a1 = _mm_loadu_si128((const __m128i *)(p + stride));
    const __m128i a2 = _mm_loadu_si128((const __m128i *)(p + 2 * stride));
    const __m128i a3 = _mm_loadu_si128((const __m128i *)(p + 3 * stride));
    const __m128i t0 = _mm_unpacklo_epi8(a0, a1), t1 = _mm_unpackhi_epi8(a0, a1);
    const __m128i t2 = _mm_unpacklo_epi8(a2, a3), t3 = _mm_unpackhi_epi8(a2, a3);
    __m128i *o = (__m128i *)out;
    _mm_storeu_si128(o + 0, _mm_unpacklo_epi16(t0, t2));
    _mm_storeu_si128(o + 1, _mm_unpackhi_epi16(t0, t2));
    _mm_storeu_si128(o + 2, _mm_unpacklo_epi16(t1, t3));
    _mm_storeu_si128(o + 3, _mm_unpackhi_epi16(t1, t3));
}

#endif
