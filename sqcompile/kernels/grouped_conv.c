/* Grouped (and depthwise) integer convolutions on CPU, as direct loops over NCHW planes; see
 * sqcompile/kernels/cpu_grouped_conv.py.
 *
 * Every tensor is contiguous, its spatial dims taken as three (D, H, W: a 1-d conv is
 * D = H = 1, a 2-d one D = 1):
 *   x  int8  [N, C,    D,  H,  W ]      the input
 *   w  int8  [Cout, C / G, KD, KH, KW]  the weight, groups of Cout / G output channels
 *   y  int32 [N, Cout, OD, OH, OW]      y[n, co, o] = sum over c of the group, taps t of
 *                                       w[co, c, t] * x[n, c, o * s + t * d - p] (zero outside)
 * and the two gradients of that sum, for an int8 output gradient e [N, Cout, OD, OH, OW]:
 *   input gradient  int32 [N, C, D, H, W]     dx[n, c, i] = sum over co of the group, taps t, o
 *                                             with o * s + t * d - p = i of w[co, c, t] * e[n, co, o]
 *   weight gradient int64 [Cout, C / G, KD, KH, KW]   dw[co, c, t] = sum over n, o of
 *                                             e[n, co, o] * x[n, g * C/G + c, o * s + t * d - p]
 *
 * Exact integer sums: an output or input-gradient element adds (C / G) * taps products of
 * at most 128 * 128 (the caller keeps that below 2^31); the weight gradient adds each row's
 * products in int32 (a row has at most OW <= 2^17 of them) into an int64.
 *
 * A depthwise conv is a stencil over each (sample, channel) plane: the forward and the input
 * gradient take one output plane per task (OpenMP over N * Cout, resp. N * C planes: no two
 * tasks write the same element), the weight gradient one output channel per task.  The
 * innermost loops run along W over a range where every tap is inside the input, with unit
 * stride at stride 1, which the compiler vectorizes (int8 -> int32 multiply-adds).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int64_t n, c, cout, g;               /* batch, input / output channels, groups */
    int64_t in[3], k[3], out[3];         /* spatial sizes (D, H, W) */
    int64_t s[3], p[3], d[3];            /* stride, padding, dilation */
} conv_t;

/* The outputs o in [lo, hi) whose input position o * s + t * d - p lies in [0, size). */
static void valid_range(int64_t size, int64_t out, int64_t s, int64_t off, int64_t *lo, int64_t *hi) {
    /* off = t * d - p;  need 0 <= o * s + off < size */
    int64_t a = off >= 0 ? 0 : (-off + s - 1) / s;
    int64_t b = size - off <= 0 ? 0 : (size - off + s - 1) / s;
    *lo = a;
    *hi = b < out ? b : out;
    if (*hi < *lo) *hi = *lo;
}

static void load(conv_t *cv, const int64_t *dims) {
    cv->n = dims[0]; cv->c = dims[1]; cv->cout = dims[2]; cv->g = dims[3];
    for (int i = 0; i < 3; i++) {
        cv->in[i] = dims[4 + i]; cv->k[i] = dims[7 + i]; cv->out[i] = dims[10 + i];
        cv->s[i] = dims[13 + i]; cv->p[i] = dims[16 + i]; cv->d[i] = dims[19 + i];
    }
}

/* Stride 1 in every dim: the planes are laid out on the padded grid (pitch Wp = W + 2 pw,
 * Hp = H + 2 ph per depth slice) and a tap is one offset along the flattened grid, so each tap
 * is one long loop over the whole plane.  Output positions live at the grid's first OD x OH x
 * OW corner (their padded input position is o + t * d); the grid's other positions compute
 * values nobody reads (forward) or carry zeros (the gradients' e).  `tail` zeros after a
 * plane cover the largest tap offset. */
static int all_unit_stride(const conv_t *cv) { return cv->s[0] == 1 && cv->s[1] == 1 && cv->s[2] == 1; }

static int64_t grid_size(const conv_t *cv, int64_t *hp, int64_t *wp) {
    *hp = cv->in[1] + 2 * cv->p[1];
    *wp = cv->in[2] + 2 * cv->p[2];
    return (cv->in[0] + 2 * cv->p[0]) * *hp * *wp;
}

/* the taps' offsets along the flattened grid; returns the largest */
static int64_t tap_offsets(const conv_t *cv, int64_t hp, int64_t wp, int64_t *offs) {
    int64_t t = 0, top = 0;
    for (int64_t kd = 0; kd < cv->k[0]; kd++)
    for (int64_t kh = 0; kh < cv->k[1]; kh++)
    for (int64_t kw = 0; kw < cv->k[2]; kw++) {
        offs[t] = (kd * cv->d[0] * hp + kh * cv->d[1]) * wp + kw * cv->d[2];
        if (offs[t] > top) top = offs[t];
        t++;
    }
    return top;
}

/* an int8 plane [D, H, W] onto the zeroed grid (int32) at (ld, lh, lw) */
static void to_grid(int32_t *restrict g, const int8_t *restrict x, const int64_t *size, int64_t hp, int64_t wp,
                    int64_t ld, int64_t lh, int64_t lw) {
    for (int64_t i = 0; i < size[0]; i++)
    for (int64_t j = 0; j < size[1]; j++) {
        int32_t *row = g + ((i + ld) * hp + j + lh) * wp + lw;
        const int8_t *src = x + (i * size[1] + j) * size[2];
        for (int64_t k = 0; k < size[2]; k++) row[k] = src[k];
    }
}

/* the rows [D, H, W] of the grid at (ld, lh, lw), out of it */
static void from_grid(int32_t *restrict y, const int32_t *restrict g, const int64_t *size, int64_t hp, int64_t wp,
                      int64_t ld, int64_t lh, int64_t lw) {
    for (int64_t i = 0; i < size[0]; i++)
    for (int64_t j = 0; j < size[1]; j++)
        memcpy(y + (i * size[1] + j) * size[2], g + ((i + ld) * hp + j + lh) * wp + lw, (size_t)size[2] * 4);
}

/* out[j] += wv * in[j] over n positions (the flat loops; unit stride, vectorized) */
static inline void flat_madd(int32_t *restrict out, const int32_t *restrict in, int32_t wv, int64_t n) {
    for (int64_t j = 0; j < n; j++) out[j] += wv * in[j];
}

static inline int64_t flat_dot(const int32_t *restrict a, const int32_t *restrict b, int64_t n) {
    int64_t total = 0;
    for (int64_t j0 = 0; j0 < n; j0 += 65536) {     /* int32 sums of at most 2^16 products */
        const int64_t j1 = j0 + 65536 < n ? j0 + 65536 : n;
        int32_t acc = 0;
        for (int64_t j = j0; j < j1; j++) acc += a[j] * b[j];
        total += acc;
    }
    return total;
}

typedef struct {
    int64_t hp, wp, grid, span, taps, cg, og, in_plane, out_plane;
    int64_t *offs;
} flat_t;

/* the flat layout of a stride-1 conv; span: the flat index of the last output + 1 (the last
 * output plus the largest tap offset is the grid's last position, so no read leaves it) */
static int flat_plan(const conv_t *cv, flat_t *f) {
    f->grid = grid_size(cv, &f->hp, &f->wp);
    f->span = ((cv->out[0] - 1) * f->hp + cv->out[1] - 1) * f->wp + cv->out[2];
    f->taps = cv->k[0] * cv->k[1] * cv->k[2];
    f->cg = cv->c / cv->g;
    f->og = cv->cout / cv->g;
    f->in_plane = cv->in[0] * cv->in[1] * cv->in[2];
    f->out_plane = cv->out[0] * cv->out[1] * cv->out[2];
    f->offs = malloc((size_t)f->taps * sizeof(int64_t));
    if (!f->offs) return 0;
    tap_offsets(cv, f->hp, f->wp, f->offs);
    return 1;
}

static int flat_forward(const conv_t *cv, const int8_t *x, const int8_t *w, int32_t *y, int threads) {
    flat_t f;
    if (!flat_plan(cv, &f)) return 0;
    int ok = 1;
    #pragma omp parallel num_threads(threads)
    {
        int32_t *xg = malloc((size_t)f.grid * 4), *acc = malloc((size_t)f.span * 4);
        if (!xg || !acc) { ok = 0; }
        #pragma omp for schedule(static)
        for (int64_t task = 0; task < cv->n * cv->cout; task++) {
            if (!xg || !acc) continue;
            const int64_t n = task / cv->cout, co = task % cv->cout, g = co / f.og;
            memset(acc, 0, (size_t)f.span * 4);
            for (int64_t c = 0; c < f.cg; c++) {
                memset(xg, 0, (size_t)f.grid * 4);
                to_grid(xg, x + (n * cv->c + g * f.cg + c) * f.in_plane, cv->in, f.hp, f.wp, cv->p[0], cv->p[1],
                        cv->p[2]);
                const int8_t *wp = w + (co * f.cg + c) * f.taps;
                for (int64_t t = 0; t < f.taps; t++)
                    if (wp[t]) flat_madd(acc, xg + f.offs[t], wp[t], f.span);
            }
            from_grid(y + task * f.out_plane, acc, cv->out, f.hp, f.wp, 0, 0, 0);
        }
        free(xg);
        free(acc);
    }
    free(f.offs);
    return ok;
}

static int flat_input_grad(const conv_t *cv, const int8_t *e, const int8_t *w, int32_t *dx, int threads) {
    flat_t f;
    if (!flat_plan(cv, &f)) return 0;
    int ok = 1;
    #pragma omp parallel num_threads(threads)
    {
        int32_t *dg = malloc((size_t)f.grid * 4), *eg = malloc((size_t)f.span * 4);
        if (!dg || !eg) { ok = 0; }
        #pragma omp for schedule(static)
        for (int64_t task = 0; task < cv->n * cv->c; task++) {
            if (!dg || !eg) continue;
            const int64_t n = task / cv->c, ci = task % cv->c, g = ci / f.cg, c = ci % f.cg;
            memset(dg, 0, (size_t)f.grid * 4);
            for (int64_t j = 0; j < f.og; j++) {
                const int64_t co = g * f.og + j;
                memset(eg, 0, (size_t)f.span * 4);     /* the grid's other positions carry zeros */
                to_grid(eg, e + (n * cv->cout + co) * f.out_plane, cv->out, f.hp, f.wp, 0, 0, 0);
                const int8_t *wp = w + (co * f.cg + c) * f.taps;
                for (int64_t t = 0; t < f.taps; t++)
                    if (wp[t]) flat_madd(dg + f.offs[t], eg, wp[t], f.span);
            }
            from_grid(dx + task * f.in_plane, dg, cv->in, f.hp, f.wp, cv->p[0], cv->p[1], cv->p[2]);
        }
        free(dg);
        free(eg);
    }
    free(f.offs);
    return ok;
}

static int flat_weight(const conv_t *cv, const int8_t *e, const int8_t *x, int64_t *dw, int threads) {
    flat_t f;
    if (!flat_plan(cv, &f)) return 0;
    int ok = 1;
    #pragma omp parallel num_threads(threads)
    {
        int32_t *xg = malloc((size_t)f.grid * 4), *eg = malloc((size_t)f.span * 4);
        if (!xg || !eg) { ok = 0; }
        #pragma omp for schedule(static)
        for (int64_t co = 0; co < cv->cout; co++) {
            if (!xg || !eg) continue;
            const int64_t g = co / f.og;
            int64_t *wp = dw + co * f.cg * f.taps;
            memset(wp, 0, (size_t)(f.cg * f.taps) * sizeof(int64_t));
            for (int64_t n = 0; n < cv->n; n++) {
                memset(eg, 0, (size_t)f.span * 4);
                to_grid(eg, e + (n * cv->cout + co) * f.out_plane, cv->out, f.hp, f.wp, 0, 0, 0);
                for (int64_t c = 0; c < f.cg; c++) {
                    memset(xg, 0, (size_t)f.grid * 4);
                    to_grid(xg, x + (n * cv->c + g * f.cg + c) * f.in_plane, cv->in, f.hp, f.wp, cv->p[0], cv->p[1],
                            cv->p[2]);
                    for (int64_t t = 0; t < f.taps; t++) wp[c * f.taps + t] += flat_dot(eg, xg + f.offs[t], f.span);
                }
            }
        }
        free(xg);
        free(eg);
    }
    free(f.offs);
    return ok;
}

/* y (one row of OW) += wv * x row, over the outputs whose input is inside the row */
static inline void row_madd(int32_t *restrict y, const int8_t *restrict x, int32_t wv, int64_t lo, int64_t hi,
                            int64_t s, int64_t off) {
    if (s == 1) {   /* pointers moved to lo first: off may be negative */
        const int8_t *xs = x + lo + off;
        int32_t *ys = y + lo;
        for (int64_t i = 0; i < hi - lo; i++) ys[i] += wv * (int32_t)xs[i];
    } else {
        for (int64_t o = lo; o < hi; o++) y[o] += wv * (int32_t)x[o * s + off];
    }
}

/* x row (input gradient) += wv * e row, scattered back through the stride */
static inline void row_scatter(int32_t *restrict x, const int8_t *restrict e, int32_t wv, int64_t lo, int64_t hi,
                               int64_t s, int64_t off) {
    if (s == 1) {
        int32_t *xs = x + lo + off;
        const int8_t *es = e + lo;
        for (int64_t i = 0; i < hi - lo; i++) xs[i] += wv * (int32_t)es[i];
    } else {
        for (int64_t o = lo; o < hi; o++) x[o * s + off] += wv * (int32_t)e[o];
    }
}

/* sum over the row's valid outputs of e[o] * x[o * s + off] */
static inline int64_t row_dot(const int8_t *restrict e, const int8_t *restrict x, int64_t lo, int64_t hi, int64_t s,
                              int64_t off) {
    int32_t acc = 0;
    if (s == 1) {
        const int8_t *xs = x + lo + off, *es = e + lo;
        for (int64_t i = 0; i < hi - lo; i++) acc += (int32_t)es[i] * (int32_t)xs[i];
    } else {
        for (int64_t o = lo; o < hi; o++) acc += (int32_t)e[o] * (int32_t)x[o * s + off];
    }
    return acc;
}

int sq_grouped_conv_forward(const int8_t *x, const int8_t *w, int32_t *y, const int64_t *dims, int threads) {
    conv_t cv;
    load(&cv, dims);
    if (all_unit_stride(&cv)) return flat_forward(&cv, x, w, y, threads);
    const int64_t cg = cv.c / cv.g, og = cv.cout / cv.g;
    const int64_t taps = cv.k[0] * cv.k[1] * cv.k[2];
    const int64_t in_plane = cv.in[0] * cv.in[1] * cv.in[2], out_plane = cv.out[0] * cv.out[1] * cv.out[2];
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t task = 0; task < cv.n * cv.cout; task++) {
        const int64_t n = task / cv.cout, co = task % cv.cout, g = co / og;
        int32_t *yp = y + task * out_plane;
        memset(yp, 0, (size_t)out_plane * sizeof(int32_t));
        for (int64_t c = 0; c < cg; c++) {
            const int8_t *xp = x + (n * cv.c + g * cg + c) * in_plane;
            const int8_t *wp = w + (co * cg + c) * taps;
            for (int64_t kd = 0; kd < cv.k[0]; kd++)
            for (int64_t kh = 0; kh < cv.k[1]; kh++)
            for (int64_t kw = 0; kw < cv.k[2]; kw++) {
                const int32_t wv = wp[(kd * cv.k[1] + kh) * cv.k[2] + kw];
                if (wv == 0) continue;
                int64_t d0, d1, h0, h1, w0, w1;
                const int64_t od_off = kd * cv.d[0] - cv.p[0], oh_off = kh * cv.d[1] - cv.p[1],
                              ow_off = kw * cv.d[2] - cv.p[2];
                valid_range(cv.in[0], cv.out[0], cv.s[0], od_off, &d0, &d1);
                valid_range(cv.in[1], cv.out[1], cv.s[1], oh_off, &h0, &h1);
                valid_range(cv.in[2], cv.out[2], cv.s[2], ow_off, &w0, &w1);
                for (int64_t od = d0; od < d1; od++)
                for (int64_t oh = h0; oh < h1; oh++) {
                    const int8_t *xr = xp + ((od * cv.s[0] + od_off) * cv.in[1] + oh * cv.s[1] + oh_off) * cv.in[2];
                    row_madd(yp + (od * cv.out[1] + oh) * cv.out[2], xr, wv, w0, w1, cv.s[2], ow_off);
                }
            }
        }
    }
    return 1;
}

int sq_grouped_conv_input_grad(const int8_t *e, const int8_t *w, int32_t *dx, const int64_t *dims, int threads) {
    conv_t cv;
    load(&cv, dims);
    if (all_unit_stride(&cv)) return flat_input_grad(&cv, e, w, dx, threads);
    const int64_t cg = cv.c / cv.g, og = cv.cout / cv.g;
    const int64_t taps = cv.k[0] * cv.k[1] * cv.k[2];
    const int64_t in_plane = cv.in[0] * cv.in[1] * cv.in[2], out_plane = cv.out[0] * cv.out[1] * cv.out[2];
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t task = 0; task < cv.n * cv.c; task++) {
        const int64_t n = task / cv.c, ci = task % cv.c, g = ci / cg, c = ci % cg;
        int32_t *xp = dx + task * in_plane;
        memset(xp, 0, (size_t)in_plane * sizeof(int32_t));
        for (int64_t j = 0; j < og; j++) {
            const int64_t co = g * og + j;
            const int8_t *ep = e + (n * cv.cout + co) * out_plane;
            const int8_t *wp = w + (co * cg + c) * taps;
            for (int64_t kd = 0; kd < cv.k[0]; kd++)
            for (int64_t kh = 0; kh < cv.k[1]; kh++)
            for (int64_t kw = 0; kw < cv.k[2]; kw++) {
                const int32_t wv = wp[(kd * cv.k[1] + kh) * cv.k[2] + kw];
                if (wv == 0) continue;
                int64_t d0, d1, h0, h1, w0, w1;
                const int64_t od_off = kd * cv.d[0] - cv.p[0], oh_off = kh * cv.d[1] - cv.p[1],
                              ow_off = kw * cv.d[2] - cv.p[2];
                valid_range(cv.in[0], cv.out[0], cv.s[0], od_off, &d0, &d1);
                valid_range(cv.in[1], cv.out[1], cv.s[1], oh_off, &h0, &h1);
                valid_range(cv.in[2], cv.out[2], cv.s[2], ow_off, &w0, &w1);
                for (int64_t od = d0; od < d1; od++)
                for (int64_t oh = h0; oh < h1; oh++) {
                    int32_t *xr = xp + ((od * cv.s[0] + od_off) * cv.in[1] + oh * cv.s[1] + oh_off) * cv.in[2];
                    row_scatter(xr, ep + (od * cv.out[1] + oh) * cv.out[2], wv, w0, w1, cv.s[2], ow_off);
                }
            }
        }
    }
    return 1;
}

int sq_grouped_conv_weight(const int8_t *e, const int8_t *x, int64_t *dw, const int64_t *dims, int threads) {
    conv_t cv;
    load(&cv, dims);
    if (all_unit_stride(&cv)) return flat_weight(&cv, e, x, dw, threads);
    const int64_t cg = cv.c / cv.g, og = cv.cout / cv.g;
    const int64_t taps = cv.k[0] * cv.k[1] * cv.k[2];
    const int64_t in_plane = cv.in[0] * cv.in[1] * cv.in[2], out_plane = cv.out[0] * cv.out[1] * cv.out[2];
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t co = 0; co < cv.cout; co++) {
        const int64_t g = co / og;
        int64_t *wp = dw + co * cg * taps;
        memset(wp, 0, (size_t)(cg * taps) * sizeof(int64_t));
        for (int64_t n = 0; n < cv.n; n++) {
            const int8_t *ep = e + (n * cv.cout + co) * out_plane;
            for (int64_t c = 0; c < cg; c++) {
                const int8_t *xp = x + (n * cv.c + g * cg + c) * in_plane;
                for (int64_t kd = 0; kd < cv.k[0]; kd++)
                for (int64_t kh = 0; kh < cv.k[1]; kh++)
                for (int64_t kw = 0; kw < cv.k[2]; kw++) {
                    int64_t d0, d1, h0, h1, w0, w1, acc = 0;
                    const int64_t od_off = kd * cv.d[0] - cv.p[0], oh_off = kh * cv.d[1] - cv.p[1],
                                  ow_off = kw * cv.d[2] - cv.p[2];
                    valid_range(cv.in[0], cv.out[0], cv.s[0], od_off, &d0, &d1);
                    valid_range(cv.in[1], cv.out[1], cv.s[1], oh_off, &h0, &h1);
                    valid_range(cv.in[2], cv.out[2], cv.s[2], ow_off, &w0, &w1);
                    for (int64_t od = d0; od < d1; od++)
                    for (int64_t oh = h0; oh < h1; oh++) {
                        const int8_t *xr = xp + ((od * cv.s[0] + od_off) * cv.in[1] + oh * cv.s[1] + oh_off) * cv.in[2];
                        acc += row_dot(ep + (od * cv.out[1] + oh) * cv.out[2], xr, w0, w1, cv.s[2], ow_off);
                    }
                    wp[c * taps + (kd * cv.k[1] + kh) * cv.k[2] + kw] += acc;
                }
            }
        }
    }
    return 1;
}
