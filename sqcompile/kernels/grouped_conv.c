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
 * Exact integer sums: an output or input-gradient element adds at most 2^17 products of
 * magnitude below 2^14 (the caller checks), the weight gradient adds int32 sums of at most
 * 2^16 products into an int64.
 *
 * The layout that makes every tap one long loop ("phase planes"): a plane is placed on its
 * zero-padded grid (G = S + 2 p per dim) split by the stride into s_d * s_h * s_w phase
 * planes, the positions with the same remainders mod s, each Q = ceil(G / s) per dim.  Output
 * o and tap t read grid position o * s + t * d, i.e. phase (t * d) mod s at index
 * o + (t * d) div s: with the outputs laid out at the phase planes' pitch (flat index
 * j = (od * QH + oh) * QW + ow), a tap is one offset, and out[j] += w[t] * phase[j + off[t]]
 * one loop over the whole plane.  The positions j that are no output (ow >= OW, oh >= OH)
 * compute values nobody reads (forward) or carry zeros (the gradients' e); `tail` zeros after
 * the buffer cover their reads past it.  At stride 1 there is one phase plane, the grid.
 *
 * One task is one output plane (the forward: OpenMP over N * Cout planes; the input gradient:
 * N * C planes; the weight gradient: one output channel), so no two tasks write one element;
 * small depthwise planes go by blocks of channels instead (below).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int64_t n, c, cout, g;               /* batch, input / output channels, groups */
    int64_t in[3], k[3], out[3];         /* spatial sizes (D, H, W) */
    int64_t s[3], p[3], d[3];            /* stride, padding, dilation */
    int64_t lanes_below;                 /* depthwise convs with fewer outputs a plane: channel blocks */
} conv_t;

typedef struct {
    int64_t q[3];                        /* a phase plane's sizes */
    int64_t phase;                       /* elements of one phase plane */
    int64_t buffer;                      /* the phase planes and the tail */
    int64_t span;                        /* flat index of the last output + 1 */
    int64_t taps, cg, og, in_plane, out_plane;
    int64_t *offs;                       /* each tap's offset into the buffer */
    int64_t top;                         /* the largest of them */
} plan_t;

static void load(conv_t *cv, const int64_t *dims) {
    cv->n = dims[0]; cv->c = dims[1]; cv->cout = dims[2]; cv->g = dims[3];
    for (int i = 0; i < 3; i++) {
        cv->in[i] = dims[4 + i]; cv->k[i] = dims[7 + i]; cv->out[i] = dims[10 + i];
        cv->s[i] = dims[13 + i]; cv->p[i] = dims[16 + i]; cv->d[i] = dims[19 + i];
    }
    cv->lanes_below = dims[22];
}

static int make_plan(const conv_t *cv, plan_t *f) {
    for (int i = 0; i < 3; i++) f->q[i] = (cv->in[i] + 2 * cv->p[i] + cv->s[i] - 1) / cv->s[i];
    f->phase = f->q[0] * f->q[1] * f->q[2];
    f->span = ((cv->out[0] - 1) * f->q[1] + cv->out[1] - 1) * f->q[2] + cv->out[2];
    f->taps = cv->k[0] * cv->k[1] * cv->k[2];
    f->cg = cv->c / cv->g;
    f->og = cv->cout / cv->g;
    f->in_plane = cv->in[0] * cv->in[1] * cv->in[2];
    f->out_plane = cv->out[0] * cv->out[1] * cv->out[2];
    f->offs = malloc((size_t)f->taps * sizeof(int64_t));
    if (!f->offs) return 0;
    int64_t t = 0, top = 0;
    for (int64_t kd = 0; kd < cv->k[0]; kd++)
    for (int64_t kh = 0; kh < cv->k[1]; kh++)
    for (int64_t kw = 0; kw < cv->k[2]; kw++) {
        const int64_t a = kd * cv->d[0], b = kh * cv->d[1], c = kw * cv->d[2];
        const int64_t which = ((a % cv->s[0]) * cv->s[1] + b % cv->s[1]) * cv->s[2] + c % cv->s[2];
        f->offs[t] = which * f->phase + ((a / cv->s[0]) * f->q[1] + b / cv->s[1]) * f->q[2] + c / cv->s[2];
        if (f->offs[t] > top) top = f->offs[t];
        t++;
    }
    f->top = top;
    f->buffer = cv->s[0] * cv->s[1] * cv->s[2] * f->phase;
    if (top + f->span > f->buffer) f->buffer = top + f->span;     /* the tail */
    return 1;
}

/* the buffer position of padded-grid position (a, b, c) */
static inline int64_t at(const conv_t *cv, const plan_t *f, int64_t a, int64_t b, int64_t c) {
    const int64_t which = ((a % cv->s[0]) * cv->s[1] + b % cv->s[1]) * cv->s[2] + c % cv->s[2];
    return which * f->phase + ((a / cv->s[0]) * f->q[1] + b / cv->s[1]) * f->q[2] + c / cv->s[2];
}

/* Grid columns c = pw + k of one input row (k < W) by W-phase r = c mod sw: the first such
 * column, their count; consecutive ones lie next to each other in phase plane r. */
static inline int64_t phase_run(const conv_t *cv, int64_t r, int64_t *first) {
    const int64_t sw = cv->s[2], pw = cv->p[2];
    const int64_t c0 = pw + ((r - pw % sw) % sw + sw) % sw;
    *first = c0;
    return c0 < pw + cv->in[2] ? (pw + cv->in[2] - 1 - c0) / sw + 1 : 0;
}

/* an int8 input plane [D, H, W] into the zeroed phase buffer (at its padding) */
static void to_phases(const conv_t *cv, const plan_t *f, int32_t *restrict buf, const int8_t *restrict x) {
    memset(buf, 0, (size_t)f->buffer * 4);
    for (int64_t i = 0; i < cv->in[0]; i++)
    for (int64_t j = 0; j < cv->in[1]; j++) {
        const int8_t *src = x + (i * cv->in[1] + j) * cv->in[2];
        for (int64_t r = 0; r < cv->s[2]; r++) {
            int64_t c0;
            const int64_t count = phase_run(cv, r, &c0), sw = cv->s[2];
            int32_t *row = buf + at(cv, f, i + cv->p[0], j + cv->p[1], c0);
            const int8_t *from = src + (c0 - cv->p[2]);
            for (int64_t k = 0; k < count; k++) row[k] = from[k * sw];
        }
    }
}

/* the input-gradient plane [D, H, W] out of the phase buffer */
static void from_phases(const conv_t *cv, const plan_t *f, int32_t *restrict dx, const int32_t *restrict buf) {
    for (int64_t i = 0; i < cv->in[0]; i++)
    for (int64_t j = 0; j < cv->in[1]; j++) {
        int32_t *dst = dx + (i * cv->in[1] + j) * cv->in[2];
        for (int64_t r = 0; r < cv->s[2]; r++) {
            int64_t c0;
            const int64_t count = phase_run(cv, r, &c0), sw = cv->s[2];
            const int32_t *row = buf + at(cv, f, i + cv->p[0], j + cv->p[1], c0);
            int32_t *to = dst + (c0 - cv->p[2]);
            for (int64_t k = 0; k < count; k++) to[k * sw] = row[k];
        }
    }
}

/* an output(-gradient) plane [OD, OH, OW] at the phase pitch (zeros elsewhere), int8 -> int32 */
static void to_pitch(const conv_t *cv, const plan_t *f, int32_t *restrict buf, const int8_t *restrict e) {
    memset(buf, 0, (size_t)f->span * 4);
    for (int64_t i = 0; i < cv->out[0]; i++)
    for (int64_t j = 0; j < cv->out[1]; j++) {
        int32_t *row = buf + (i * f->q[1] + j) * f->q[2];
        const int8_t *src = e + (i * cv->out[1] + j) * cv->out[2];
        for (int64_t k = 0; k < cv->out[2]; k++) row[k] = src[k];
    }
}

/* the output plane out of the pitch layout */
static void from_pitch(const conv_t *cv, const plan_t *f, int32_t *restrict y, const int32_t *restrict buf) {
    for (int64_t i = 0; i < cv->out[0]; i++)
    for (int64_t j = 0; j < cv->out[1]; j++)
        memcpy(y + (i * cv->out[1] + j) * cv->out[2], buf + (i * f->q[1] + j) * f->q[2], (size_t)cv->out[2] * 4);
}

/* acc[j] += sum over taps of w[t] * in[j + off[t]], j < n: one loop over the plane a tap (a
 * block of outputs kept in registers across the taps was 2-3x slower: GCC kept it in memory) */
static void taps_gather(int32_t *restrict acc, const int32_t *restrict in, const int8_t *restrict w,
                        const int64_t *restrict off, int64_t taps, int64_t n) {
    for (int64_t t = 0; t < taps; t++) {
        const int32_t wv = w[t];
        const int32_t *restrict src = in + off[t];
        if (wv)
            for (int64_t j = 0; j < n; j++) acc[j] += wv * src[j];
    }
}

/* out[j + off] += wv * in[j] over j < n (the input gradient's scatter, one tap) */
static inline void tap_scatter(int32_t *restrict out, const int32_t *restrict in, int32_t wv, int64_t n) {
    for (int64_t j = 0; j < n; j++) out[j] += wv * in[j];
}

static inline int64_t dot(const int32_t *restrict a, const int32_t *restrict b, int64_t n) {
    int64_t total = 0;
    for (int64_t j0 = 0; j0 < n; j0 += 65536) {     /* int32 sums of at most 2^16 products */
        const int64_t j1 = j0 + 65536 < n ? j0 + 65536 : n;
        int32_t acc = 0;
        for (int64_t j = j0; j < j1; j++) acc += a[j] * b[j];
        total += acc;
    }
    return total;
}

/* One task: an output plane (forward), an input-gradient plane, or an output channel's
 * weight gradient; `grid` holds a phase buffer, `pitch` a plane at the phase pitch. */
typedef void (*task_fn)(const conv_t *cv, const plan_t *f, int32_t *grid, int32_t *pitch, int64_t task,
                        const int8_t *a, const int8_t *b, void *out);

static void forward_task(const conv_t *cv, const plan_t *f, int32_t *xb, int32_t *acc, int64_t task,
                         const int8_t *x, const int8_t *w, void *out) {
    const int64_t n = task / cv->cout, co = task % cv->cout, g = co / f->og;
    memset(acc, 0, (size_t)f->span * 4);
    for (int64_t c = 0; c < f->cg; c++) {
        to_phases(cv, f, xb, x + (n * cv->c + g * f->cg + c) * f->in_plane);
        taps_gather(acc, xb, w + (co * f->cg + c) * f->taps, f->offs, f->taps, f->span);
    }
    from_pitch(cv, f, (int32_t *)out + task * f->out_plane, acc);
}

static void input_grad_task(const conv_t *cv, const plan_t *f, int32_t *db, int32_t *eb, int64_t task,
                            const int8_t *e, const int8_t *w, void *out) {
    const int64_t n = task / cv->c, ci = task % cv->c, g = ci / f->cg, c = ci % f->cg;
    memset(db, 0, (size_t)f->buffer * 4);
    for (int64_t j = 0; j < f->og; j++) {
        const int64_t co = g * f->og + j;
        to_pitch(cv, f, eb, e + (n * cv->cout + co) * f->out_plane);
        const int8_t *wp = w + (co * f->cg + c) * f->taps;
        for (int64_t t = 0; t < f->taps; t++)
            if (wp[t]) tap_scatter(db + f->offs[t], eb, wp[t], f->span);
    }
    from_phases(cv, f, (int32_t *)out + task * f->in_plane, db);
}

static void weight_task(const conv_t *cv, const plan_t *f, int32_t *xb, int32_t *eb, int64_t co,
                        const int8_t *e, const int8_t *x, void *out) {
    const int64_t g = co / f->og;
    int64_t *wp = (int64_t *)out + co * f->cg * f->taps;
    memset(wp, 0, (size_t)(f->cg * f->taps) * sizeof(int64_t));
    for (int64_t n = 0; n < cv->n; n++) {
        to_pitch(cv, f, eb, e + (n * cv->cout + co) * f->out_plane);
        for (int64_t c = 0; c < f->cg; c++) {
            to_phases(cv, f, xb, x + (n * cv->c + g * f->cg + c) * f->in_plane);
            for (int64_t t = 0; t < f->taps; t++) wp[c * f->taps + t] += dot(eb, xb + f->offs[t], f->span);
        }
    }
}

/* Small planes of a depthwise conv (one input and one output channel a group,
 * below `lanes_below` outputs a plane): a plane of 8x8 or 4x4 makes every tap loop a few
 * vectors long, and the per-plane work (the grid, the loop set-ups) costs more than the taps
 * (2-3.5x the time below on [32, 384, 8, 8] and [32, 960, 4, 4]).  There the kernels take
 * LANES channels of one sample together, stored channel-innermost in the phase layout ("lanes":
 * element p of lane l at p * LANES + l), and vectorize across the channels: each tap a multiply-add of LANES
 * channels at one position, with the channels' weights per tap. */
#define LANES 16

/* lanes <-> planes: `count` planes, `stride` elements apart from `first`, and the lanes'
 * buffer, element p of lane l at p * LANES + l: the input's phase buffer (`grid`: input
 * planes, at their padding) or the pitch layout (output planes).  A plane row (i, j) is one
 * run of buffer positions pos.. holding plane elements k0, k0 + step, ... (per W-phase on
 * the grid of a strided conv). */
typedef struct { int64_t pos, k0, step, n; } run_t;

static int64_t row_runs(const conv_t *cv, const plan_t *f, int grid, int64_t i, int64_t j, run_t *runs) {
    if (!grid) {
        runs[0] = (run_t){(i * f->q[1] + j) * f->q[2], 0, 1, cv->out[2]};
        return 1;
    }
    if (cv->s[0] == 1 && cv->s[1] == 1 && cv->s[2] == 1) {    /* one phase, the grid: no divisions */
        runs[0] = (run_t){((i + cv->p[0]) * f->q[1] + j + cv->p[1]) * f->q[2] + cv->p[2], 0, 1, cv->in[2]};
        return 1;
    }
    for (int64_t r = 0; r < cv->s[2]; r++) {
        int64_t c0;
        const int64_t n = phase_run(cv, r, &c0);
        runs[r] = (run_t){n ? at(cv, f, i + cv->p[0], j + cv->p[1], c0) : 0, c0 - cv->p[2], cv->s[2], n};
    }
    return cv->s[2];
}

static void planes_to_lanes(const conv_t *cv, const plan_t *f, int32_t *restrict buf, const int8_t *restrict first,
                            int64_t stride, int grid, int64_t count) {
    const int64_t *size = grid ? cv->in : cv->out;
    run_t runs[cv->s[2]];
    for (int64_t i = 0; i < size[0]; i++)
    for (int64_t j = 0; j < size[1]; j++) {
        const int64_t src = (i * size[1] + j) * size[2], nr = row_runs(cv, f, grid, i, j, runs);
        for (int64_t r = 0; r < nr; r++) {
            int32_t *row = buf + runs[r].pos * LANES;
            const int8_t *from = first + src + runs[r].k0;
            for (int64_t t = 0; t < runs[r].n; t++)
                for (int64_t l = 0; l < count; l++) row[t * LANES + l] = from[l * stride + t * runs[r].step];
        }
    }
}

static void lanes_to_planes(const conv_t *cv, const plan_t *f, int32_t *restrict first, const int32_t *restrict buf,
                            int64_t stride, int grid, int64_t count) {
    const int64_t *size = grid ? cv->in : cv->out;
    run_t runs[cv->s[2]];
    for (int64_t i = 0; i < size[0]; i++)
    for (int64_t j = 0; j < size[1]; j++) {
        const int64_t dst = (i * size[1] + j) * size[2], nr = row_runs(cv, f, grid, i, j, runs);
        for (int64_t r = 0; r < nr; r++) {
            const int32_t *row = buf + runs[r].pos * LANES;
            int32_t *to = first + dst + runs[r].k0;
            for (int64_t t = 0; t < runs[r].n; t++)
                for (int64_t l = 0; l < count; l++) to[l * stride + t * runs[r].step] = row[t * LANES + l];
        }
    }
}

/* each tap's weights of the lanes' channels (zero past `count`) */
static void lanes_weights(const plan_t *f, int32_t *restrict wl, const int8_t *restrict w, int64_t c0, int64_t count) {
    for (int64_t t = 0; t < f->taps; t++)
        for (int64_t l = 0; l < LANES; l++) wl[t * LANES + l] = l < count ? w[(c0 + l) * f->taps + t] : 0;
}

/* out[j] = sum over taps of w[t] * in[j + sign * off[t]] for j < n, LANES channels at a time */
static void lanes_gather(int32_t *restrict out, const int32_t *restrict in, const int32_t *restrict wl,
                         const plan_t *f, int64_t sign, int64_t n) {
    for (int64_t j = 0; j < n; j++) {
        int32_t sum[LANES] = {0};
        for (int64_t t = 0; t < f->taps; t++) {
            const int32_t *src = in + (j + sign * f->offs[t]) * LANES, *wt = wl + t * LANES;
            for (int l = 0; l < LANES; l++) sum[l] += wt[l] * src[l];
        }
        memcpy(out + j * LANES, sum, sizeof sum);
    }
}

/* the task's sample and first channel, its channel count, its lanes' weights */
#define LANES_TASK(wl)                                                                              \
    const int64_t blocks = (cv->c + LANES - 1) / LANES, n = task / blocks, c0 = task % blocks * LANES; \
    const int64_t count = cv->c - c0 < LANES ? cv->c - c0 : LANES;                                  \
    int32_t wl[f->taps * LANES];                                                                    \
    lanes_weights(f, wl, w, c0, count)

static void lanes_forward_task(const conv_t *cv, const plan_t *f, int32_t *xb, int32_t *acc, int64_t task,
                               const int8_t *x, const int8_t *w, void *out) {
    LANES_TASK(wl);
    memset(xb, 0, (size_t)f->buffer * LANES * 4);
    planes_to_lanes(cv, f, xb, x + (n * cv->c + c0) * f->in_plane, f->in_plane, 1, count);
    lanes_gather(acc, xb, wl, f, 1, f->span);
    lanes_to_planes(cv, f, (int32_t *)out + (n * cv->cout + c0) * f->out_plane, acc, f->out_plane, 0, count);
}

/* The input gradient is a gather too: buffer position p sums w[t] * e[p - off[t]] (the transpose of
 * the forward's relation, on the same layout);
 * e sits `top` positions into its buffer, zeros before and after it, so every read is inside. */
static void lanes_input_grad_task(const conv_t *cv, const plan_t *f, int32_t *db, int32_t *eb, int64_t task,
                                  const int8_t *e, const int8_t *w, void *out) {
    LANES_TASK(wl);
    memset(eb, 0, (size_t)(f->top + f->buffer) * LANES * 4);
    planes_to_lanes(cv, f, eb + f->top * LANES, e + (n * cv->cout + c0) * f->out_plane, f->out_plane, 0, count);
    lanes_gather(db, eb + f->top * LANES, wl, f, -1, f->buffer);
    lanes_to_planes(cv, f, (int32_t *)out + (n * cv->c + c0) * f->in_plane, db, f->in_plane, 1, count);
}

static void lanes_weight_task(const conv_t *cv, const plan_t *f, int32_t *xb, int32_t *eb, int64_t block,
                              const int8_t *e, const int8_t *x, void *out) {
    const int64_t c0 = block * LANES, count = cv->c - c0 < LANES ? cv->c - c0 : LANES;
    int64_t total[f->taps * LANES];
    memset(total, 0, sizeof total);
    for (int64_t n = 0; n < cv->n; n++) {
        memset(eb, 0, (size_t)f->span * LANES * 4);
        memset(xb, 0, (size_t)f->buffer * LANES * 4);
        planes_to_lanes(cv, f, eb, e + (n * cv->cout + c0) * f->out_plane, f->out_plane, 0, count);
        planes_to_lanes(cv, f, xb, x + (n * cv->c + c0) * f->in_plane, f->in_plane, 1, count);
        for (int64_t t = 0; t < f->taps; t++) {
            int32_t sum[LANES] = {0};      /* a sample's plane: at most 2^16 products (the caller's bound) */
            for (int64_t j = 0; j < f->span; j++) {
                const int32_t *a = eb + j * LANES, *b = xb + (j + f->offs[t]) * LANES;
                for (int l = 0; l < LANES; l++) sum[l] += a[l] * b[l];
            }
            for (int l = 0; l < LANES; l++) total[t * LANES + l] += sum[l];
        }
    }
    int64_t *dw = out;
    for (int64_t l = 0; l < count; l++)
        for (int64_t t = 0; t < f->taps; t++) dw[(c0 + l) * f->taps + t] = total[t * LANES + l];
}

enum { PER_OUTPUT_PLANE, PER_INPUT_PLANE, PER_OUTPUT_CHANNEL, PER_SAMPLE_LANES, PER_LANES };

/* the tasks over OpenMP threads, each thread with its two buffers; 0 when one could not be
 * allocated, else 1 */
static int run_tasks(const int64_t *dims, int kind, task_fn fn, const int8_t *a, const int8_t *b, void *out,
                     int threads) {
    conv_t cv;
    plan_t f;
    load(&cv, dims);
    if (!make_plan(&cv, &f)) return 0;
    const int64_t blocks = (cv.c + LANES - 1) / LANES;
    const int64_t tasks = kind == PER_OUTPUT_PLANE ? cv.n * cv.cout : kind == PER_INPUT_PLANE ? cv.n * cv.c
                        : kind == PER_OUTPUT_CHANNEL ? cv.cout : kind == PER_SAMPLE_LANES ? cv.n * blocks : blocks;
    const int64_t width = kind >= PER_SAMPLE_LANES ? LANES : 1;
    const int64_t pitch_size = kind >= PER_SAMPLE_LANES ? f.top + f.buffer : f.span;   /* >= span */
    int ok = 1;
    #pragma omp parallel num_threads(threads)
    {
        int32_t *grid = malloc((size_t)(f.buffer * width) * 4), *pitch = malloc((size_t)(pitch_size * width) * 4);
        if (!grid || !pitch) {
            #pragma omp atomic write
            ok = 0;
        }
        #pragma omp for schedule(static)
        for (int64_t task = 0; task < tasks; task++)
            if (grid && pitch) fn(&cv, &f, grid, pitch, task, a, b, out);
        free(grid);
        free(pitch);
    }
    free(f.offs);
    return ok;
}

/* depthwise (one input and one output channel a group) with small output planes */
static int lanes(const int64_t *dims) {
    conv_t cv;
    load(&cv, dims);
    return cv.c == cv.g && cv.cout == cv.g && cv.out[0] * cv.out[1] * cv.out[2] < cv.lanes_below
        && cv.k[0] * cv.k[1] * cv.k[2] <= 1024      /* the taps' lane weights live on the stack */
        /* the weight gradient's per-sample sums in int32: at most 2^16 products */
        && (cv.in[0] + 2 * cv.p[0]) * (cv.in[1] + 2 * cv.p[1]) * (cv.in[2] + 2 * cv.p[2]) <= 65536;
}

int sq_grouped_conv_forward(const int8_t *x, const int8_t *w, int32_t *y, const int64_t *dims, int threads) {
    if (lanes(dims)) return run_tasks(dims, PER_SAMPLE_LANES, lanes_forward_task, x, w, y, threads);
    return run_tasks(dims, PER_OUTPUT_PLANE, forward_task, x, w, y, threads);
}

int sq_grouped_conv_input_grad(const int8_t *e, const int8_t *w, int32_t *dx, const int64_t *dims, int threads) {
    if (lanes(dims)) return run_tasks(dims, PER_SAMPLE_LANES, lanes_input_grad_task, e, w, dx, threads);
    return run_tasks(dims, PER_INPUT_PLANE, input_grad_task, e, w, dx, threads);
}

int sq_grouped_conv_weight(const int8_t *e, const int8_t *x, int64_t *dw, const int64_t *dims, int threads) {
    if (lanes(dims)) return run_tasks(dims, PER_LANES, lanes_weight_task, e, x, dw, threads);
    return run_tasks(dims, PER_OUTPUT_CHANNEL, weight_task, e, x, dw, threads);
}
