"""Fused integer attention: ``softmax(Q K^T * scale) V`` with both GEMMs in int8 and nothing
of size ``[L, S]`` ever written to memory, forward and backward.

The unfused quantized attention (:func:`sqcompile.ops.quantized_sdpa`) runs ``Q K^T`` and
``P V`` as two quantized GEMMs with a float softmax between them, so the scores ``S``, the
probabilities ``P`` and their int8 form, and in the backward ``dP``, ``dS`` and ShiftQuant's
two results of ``dS`` all go through memory (about 27 bytes per score per training step in
bf16).  These kernels keep every ``[L, S]`` tile in registers, in the manner of
FlashAttention, recomputing ``Q K^T`` where a later pass needs it (int8 GEMMs run at twice
the bf16 rate; memory does not):

* :func:`_attention_fwd_kernel` (one program per block of queries): pass 1 over the keys finds
  each row's max ``m`` and exponential sum ``l`` (online softmax); pass 2 recomputes the
  scores, forms ``P = exp(S - m) * (1 / l)`` and its per-row int8 quantization, and accumulates
  ``qP @ qV`` in int32.  A row's largest probability is ``exp(0) / l = 1 / l``, so its
  quantization scale is known before any of its probabilities are: this is what lets the
  per-row quantizer of ``P`` live inside the kernel.  Writes ``O`` and ``(m, l, scale_P)``
  per row.
* :func:`_attention_ranges_kernel` (per block of queries): ShiftQuant of the score gradient
  ``dS`` needs every channel's range before any element is quantized -- along keys for
  ``dQ = dS K`` (a column's range runs over *all* queries) and along queries for
  ``dK = dS^T Q``.  This pass recomputes ``P`` and ``dP = dO V^T`` to get each row's
  ``delta = sum(P * dP)``, then ``dS = P dP - P delta`` tile by tile to get both sets of
  ranges (row maxima in registers, column maxima by integer atomic max on the float bits,
  exact in any order; the layout of :func:`~sqcompile.kernels.triton_quant.shiftquant_pair`).
* :func:`_attention_bwd_kv_kernel` (one program per block of keys): recomputes ``P``, ``qP``,
  ``dP`` and ``dS`` per tile, ShiftQuants ``dS`` along the queries with the global ranges
  (the quantizers' own device functions, noise included), and accumulates ``dV = qP^T eO``
  and ``dK = eS_rows^T qQ`` in int32 registers.
* :func:`_attention_bwd_q_kernel` (one program per block of queries): the same recomputation,
  ``dS`` ShiftQuant-ed along the keys, ``dQ = eS_cols qK``.  A separate kernel rather than
  atomic adds from the key blocks: with both quantized ``dS`` tiles live the key-block kernel
  spilled registers on sm_90, and one more ``Q K^T`` / ``dO V^T`` recomputation costs less
  than ``L / 64`` atomic read-modify-writes of every ``dQ`` element.

Every ``tl.dot`` reads its second operand K-major (Hopper's 8-bit MMA wants that): ``qV``
for ``qP qV``, ``qQ``, ``qK`` and ``dO``'s row quantization for the backward GEMMs that
reduce over the sequence are stored with the sequence contiguous (small int8 relayouts).

Numerics: the unfused path's, operation by operation (quantizers, dequantization order,
rounding to the input dtype wherever it rounds, IEEE divisions in the quantizers), except for
the order in which a row's exponential sum ``l`` is accumulated (online, block by block), the
``exp`` implementation and the softmax's division (a multiplication by ``1 / l``: within an
ulp, see :func:`_probabilities`).  So an element of ``qP`` or of a ShiftQuant result differs
from the unfused path only where its value sits within a rounding of a rounding boundary;
the tests measure that against a reference built from :mod:`sqcompile.numerics`
(``tests/test_triton_attention.py``).
Stochastic rounding of ``dS`` draws exactly the noise the unfused pair of quantizers draws
for the same element and seed.

``grad_outer_scale`` (``outer=True``, ``OUTER`` in the kernels): ``dO``'s pair of quantizers
takes its outer scales (:func:`~sqcompile.kernels.triton_quant.shiftquant_pair`), so ``dP``'s
rows and ``dV``'s columns are scaled per row / column; ``dS``'s need its maxima per query row
and per key column before its channel ranges, hence two range passes (one more recomputation
of ``S`` and ``dP`` per tile), and the backward kernels divide each tile by them -- by
multiplying with their reciprocals (within an ulp of the unfused path's quotient; a
correctly rounded division per element spilled the ``dK``/``dV`` kernel's registers) -- and
scale ``dQ``'s and ``dK``'s rows by them.

Masks: ``is_causal`` (top-left aligned, as PyTorch's) and an ``attn_mask``, boolean (False:
masked) or additive of the query's dtype, broadcast over batch and heads by strides of 0
(a padding mask ``[B, 1, 1, S]`` is read as such, never expanded in memory); every pass
that recomputes the scores reads its tile of the mask.

Limits (:func:`sqcompile.ops.fused_attention_unsupported` says which applies; the caller
then takes the unfused path): no dropout, no float mask of another dtype or one that needs
a gradient, equal query and value head dims up to 256, ShiftQuant's expanded gradient must
fit int8 (:func:`sqcompile.numerics.fits_int8`).
"""
from __future__ import annotations

import functools
from typing import Dict, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import numerics as N
from .triton_quant import (INTERPRETED, _base_of, _combine_ranges, _matrices, _max_nan, _multipliers,
                           _pair_geometry, _pair_ranges, _quantize_values, _scale_of, _seed_arg, _shift_expand,
                           _tile_noise, _uniform_noise, cast_rtne, cdiv, columns_noise_along_n, next_power_of_2,
                           outer_reciprocals, quantize, shiftquant_pair)
from .triton_gemm import autotune_enabled, relayout
from .triton_ops import triton_version

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
# The head-dim-128 dK/dV kernel is at the register limit, where how P is rounded moves spills
# (sm_90 ptxas, a padding mask, the 128 x 64 tile): with the conversion instruction Triton 3.9
# spills 16 bytes and 3.6 none; with the magic-number identity 3.9 none and 3.6 76.
_P_CVT_AT_D128 = tl.constexpr(triton_version() < (3, 9))


# --------------------------------------------------------------------------------------------
# Device functions: one tile of the recomputed forward
# --------------------------------------------------------------------------------------------

@triton.jit
def _rounded(x, DTYPE: tl.constexpr):
    """``x`` rounded to the attention's dtype (where the unfused path stores a tensor), as float32."""
    return cast_rtne(x, DTYPE).to(tl.float32)


@triton.jit
def _mask_base(mask_ptr, b, H_in, s_mo, s_mi):
    """Where (batch, head) ``b`` of the flattened ``BH`` starts in the mask ``[O, H_in, L, S]``
    (strides 0 along broadcast dims)."""
    b = b.to(tl.int64)
    return mask_ptr + (b // H_in) * s_mo + (b % H_in) * s_mi


@triton.jit
def _scores(qq, sq, kk, sk, offs_m, offs_n, L, S, scale, mask_base, s_ml, s_ms, CAUSAL: tl.constexpr,
            MASK: tl.constexpr, DTYPE: tl.constexpr, EDGE: tl.constexpr):
    """The scores tile ``(qQ qK^T) * sQ * sK`` (the GEMM's epilogue, rounded to the dtype) times
    ``scale`` (rounded again), ``-inf`` where masked: columns past ``S``; with ``CAUSAL``,
    keys after the query (``n > m``); with ``MASK == 1`` where the boolean mask (as uint8) is
    0; with ``MASK == 2`` the float mask is added (rounded to the dtype), as the unfused ops
    do.  ``EDGE`` False: the caller knows that every key of the tile is below ``S`` and,
    with ``CAUSAL``, at or before every query of it (an interior tile: no bounds or causal
    test per score; see :func:`_interior_keys`)."""
    acc = tl.dot(qq, tl.trans(kk))
    s = _rounded(acc.to(tl.float32) * sq[:, None] * sk[None, :], DTYPE)
    s = _rounded(s * scale, DTYPE)
    if EDGE:
        valid = (offs_n < S)[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
    if MASK != 0:
        outside = (offs_m >= L)[:, None]
        if EDGE:
            inside = valid & ~outside
        else:
            inside = ~outside
        m = tl.load(mask_base + offs_m[:, None] * s_ml + offs_n[None, :] * s_ms, mask=inside, other=0)
        if MASK == 1:
            keep = (m != 0) | outside                # rows past L (never stored) stay finite
            if EDGE:
                valid = valid & keep
            else:
                valid = keep
        else:
            s = _rounded(s + m.to(tl.float32), DTYPE)
    if EDGE or MASK == 1:
        s = tl.where(valid, s, float("-inf"))
    return s


@triton.jit
def _probabilities(s, m, l, DTYPE: tl.constexpr):
    """``P = exp(S - m) * (1 / l)`` rounded to the dtype (the unfused softmax's output).

    One IEEE division per row instead of per element: an fp32 division is a long instruction
    sequence on the GPU, and the kernels form ``P`` five times per score.  ``exp(...) * (1/l)``
    is within an ulp of ``exp(...) / l`` before the rounding to the dtype (Inductor's softmax
    divides with Triton's approximate ``/`` anyway), and the row's largest value is exactly
    ``1/l``, the quantization scale's input (:func:`_p_scale`)."""
    inv = tl.math.div_rn(1.0, l)
    return _rounded(tl.exp(s - m[:, None]) * inv[:, None], DTYPE)


@triton.jit
def _empty_rows_as_zeros(m, l):
    """The row statistics ``(m, l)`` with a row whose every key is masked (``m = -inf``,
    ``l = 0``) given ``(0, +inf)``: :func:`_probabilities` then computes ``exp(-inf) * 0 = 0``
    and :func:`_p_scale` a zero scale, so such a row's probabilities, output and gradients are
    0, as PyTorch's attention softmax (``_safe_softmax``) gives them, not NaN.  Applied once
    per row where the forward has reduced them, before they are used or stored for the
    backward kernels (which then need no test of their own: an earlier per-tile test spilled
    the head-dim-128 ``dK``/``dV`` kernel)."""
    empty = l == 0.0
    return tl.where(empty, 0.0, m), tl.where(empty, float("inf"), l)


@triton.jit
def _recomputed_p(qq, sq, kk, sk, offs_m, offs_n, L, S, scale, mask_base, s_ml, s_ms, m, l, CAUSAL: tl.constexpr,
                  MASK: tl.constexpr, DTYPE: tl.constexpr, EDGE: tl.constexpr):
    """The probabilities tile from the scores (:func:`_scores`) and the rows' ``m``, ``l``."""
    s = _scores(qq, sq, kk, sk, offs_m, offs_n, L, S, scale, mask_base, s_ml, s_ms, CAUSAL, MASK, DTYPE, EDGE)
    return _probabilities(s, m, l, DTYPE)


@triton.jit
def _p_scale(l, QMAX: tl.constexpr, DTYPE: tl.constexpr):
    """The per-row scale of ``P``'s quantization: its largest value ``exp(0) / l`` over qmax."""
    return _scale_of(_rounded(tl.math.div_rn(1.0, l), DTYPE), QMAX)


@triton.jit
def _quantized_p(p, sp, QMAX: tl.constexpr, CVT: tl.constexpr = True):
    """``P``'s int8 per-row quantization (nearest) with the row scales ``sp`` (``CVT``: see
    :func:`triton_quant._quantize_clamped`)."""
    divisor, pre, inv = _multipliers(sp)
    return _quantize_values(p, divisor[:, None], pre[:, None], inv[:, None], 0.0, QMAX, False, CVT).to(tl.int8)


@triton.jit
def _score_grad(p, dp, delta, scale, DTYPE: tl.constexpr):
    """The gradient of the GEMM ``Q K^T``'s output: the softmax backward ``P dP - P delta``
    (PyTorch's decomposition, which Inductor compiles; rounded to the dtype) times ``scale``
    (rounded again)."""
    ds = _rounded(p * dp - p * delta[:, None], DTYPE)
    return _rounded(ds * scale, DTYPE)


@triton.jit
def _prob_grad(eo_c, vv, base_o):
    """``dP = eO_cols qV^T * base`` (the GEMM's epilogue), before rounding to the dtype."""
    return tl.dot(eo_c, tl.trans(vv)).to(tl.float32) * base_o


@triton.jit
def _o_scale(bo_ptr, row, mask_m, OUTER: tl.constexpr):
    """The scale of ``dO``'s column quantizer for ``dP``: its base (a scalar), or with ``OUTER``
    one per query row (``[rows, 1]``)."""
    if OUTER:
        scale = tl.load(bo_ptr + row, mask=mask_m, other=0.0)[:, None]
    else:
        scale = tl.load(bo_ptr)
    return scale


@triton.jit
def _by_outer(x, outer_ptr, index, mask, n, ROWS: tl.constexpr):
    """``x`` times the reciprocals of the outer maxima of its rows (``ROWS``) or columns at
    ``index`` (``grad_outer_scale``; row 1 of the ``[2, n]`` of
    :func:`~sqcompile.kernels.triton_quant.outer_reciprocals`): within an ulp of the
    quotient the unfused path's quantizer forms, as the fused attention is within float
    rounding of it elsewhere (the exponential sum's order, ``exp``, the softmax's division)."""
    inv = tl.load(outer_ptr + n + index, mask=mask, other=1.0)
    if ROWS:
        y = x * inv[:, None]
    else:
        y = x * inv[None, :]
    return y


@triton.jit
def _outer_scale(base, outer_ptr, index, mask, OUTER: tl.constexpr):
    """A backward GEMM's output scale for its rows at ``index``: the ShiftQuant base, times
    each row's outer maximum (0 taken as 1: row 0 of :func:`~sqcompile.kernels.triton_quant.outer_reciprocals`)
    with ``OUTER`` (``[rows, 1]``)."""
    if OUTER:
        scale = (base * tl.load(outer_ptr + index, mask=mask, other=1.0))[:, None]
    else:
        scale = base
    return scale


@triton.jit
def _query_block(q_ptr, eo_ptr, sq_ptr, mask_ptr, H_in, s_mo, s_mi, s_qb, s_qm, s_qd, s_eb, s_em, s_ed, L, S, D,
                 CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """What a backward kernel over blocks of queries starts from: ``(b, mask base, offs_m,
    offs_d, mask_m, row ids, qQ tile, eO_cols tile, sQ, end of the keys to visit)``."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < L
    row = b * L + offs_m
    qq = _load_rows(q_ptr, b, offs_m, offs_d, s_qb, s_qm, s_qd, L, D)
    eo = _load_rows(eo_ptr, b, offs_m, offs_d, s_eb, s_em, s_ed, L, D)
    sq = tl.load(sq_ptr + row, mask=mask_m, other=0.0)
    n_end = S
    if CAUSAL:
        n_end = tl.minimum(S, (pid_m + 1) * BLOCK_M)
    return b, _mask_base(mask_ptr, b, H_in, s_mo, s_mi), offs_m, offs_d, mask_m, row, qq, eo, sq, n_end


@triton.jit
def _key_tile(qq, sq, eo, base_o, k_ptr, v_ptr, sk_ptr, b, offs_m, offs_n, offs_d, s_kb, s_kn, s_kd, s_vb, s_vn,
              s_vd, L, S, D, scale, mask_base, s_ml, s_ms, m, l, CAUSAL: tl.constexpr, MASK: tl.constexpr,
              DTYPE: tl.constexpr, EDGE: tl.constexpr):
    """For a query block's kernels, the key tile ``offs_n``: ``(P, dP, sK)`` with ``P``
    recomputed (0 on rows past ``L``) and ``dP = eO_cols qV^T * base`` rounded to the dtype."""
    kk = _load_rows(k_ptr, b, offs_n, offs_d, s_kb, s_kn, s_kd, S, D)
    sk = tl.load(sk_ptr + b * S + offs_n, mask=offs_n < S, other=0.0)
    p = _recomputed_p(qq, sq, kk, sk, offs_m, offs_n, L, S, scale, mask_base, s_ml, s_ms, m, l, CAUSAL, MASK, DTYPE,
                      EDGE)
    p = tl.where((offs_m < L)[:, None], p, 0.0)
    dp = _rounded(_prob_grad(eo, _load_rows(v_ptr, b, offs_n, offs_d, s_vb, s_vn, s_vd, S, D), base_o), DTYPE)
    return p, dp, sk


@triton.jit
def _load_rows(ptr, b, offs, offs_d, stride_b, stride_r, stride_d, R, D):
    mask = (offs < R)[:, None] & (offs_d < D)[None, :]
    return tl.load(ptr + b * stride_b + offs[:, None] * stride_r + offs_d[None, :] * stride_d, mask=mask, other=0)


@triton.jit
def _interior_keys(pid_m, S, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Where query block ``pid_m``'s interior key tiles end: tiles ``[0, end)`` of ``BLOCK_N``
    keys hold no key past ``S`` and, with ``CAUSAL``, none after the block's first query, so
    their scores need no masking (all but the diagonal and the last tiles: 4 in 5 to 7 in 8 of a
    causal 1024-token sequence's tiles); the kernels visit them first, as before, so every
    row's running sums keep their order."""
    end = S
    if CAUSAL:
        end = tl.minimum(S, pid_m * BLOCK_M + 1)
    return end // BLOCK_N * BLOCK_N


@triton.jit
def _interior_queries(pid_n, m_start, L, S, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For key block ``pid_n``, whose query tiles start at ``m_start``: ``(lo, hi)``, both on
    that grid of ``BLOCK_M``, such that the tiles in ``[lo, hi)`` need no masking (every
    query below ``L`` and, with ``CAUSAL``, at or after the block's last key; none when the
    block reaches past ``S``).  The edge tiles are those in ``[m_start, lo)`` (the
    diagonal) and at most one partial tile from ``hi``."""
    full = tl.maximum(L - m_start, 0) // BLOCK_M           # tiles wholly below L
    first = 0
    if CAUSAL:
        first = tl.maximum(pid_n * BLOCK_N + BLOCK_N - 1 - m_start + BLOCK_M - 1, 0) // BLOCK_M
    if pid_n * BLOCK_N + BLOCK_N > S:
        first = full
    return m_start + tl.minimum(first, full) * BLOCK_M, m_start + full * BLOCK_M


# --------------------------------------------------------------------------------------------
# Loop bodies (each inlined twice by its kernel: for interior tiles and for edge tiles)
# --------------------------------------------------------------------------------------------

@triton.jit
def _row_stats_step(m, l, qq, sq, k_ptr, sk_ptr, b, offs_m, offs_n, offs_d, s_kb, s_kn, s_kd, L, S, D, scale,
                    mask_base, s_ml, s_ms, CAUSAL: tl.constexpr, MASK: tl.constexpr, DTYPE: tl.constexpr,
                    EDGE: tl.constexpr):
    """The forward's first pass over a key tile: the rows' running max ``m`` and exponential
    sum ``l`` updated."""
    kk = _load_rows(k_ptr, b, offs_n, offs_d, s_kb, s_kn, s_kd, S, D)
    sk = tl.load(sk_ptr + b * S + offs_n, mask=offs_n < S, other=0.0)
    s = _scores(qq, sq, kk, sk, offs_m, offs_n, L, S, scale, mask_base, s_ml, s_ms, CAUSAL, MASK, DTYPE, EDGE)
    m_new = tl.maximum(m, tl.max(s, axis=1))
    # while a row has seen only masked keys (m = -inf, l = 0), exponentiate against 0
    # rather than -inf: exp(-inf - -inf) would make l NaN for good
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, l * tl.exp(m - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), axis=1)


@triton.jit
def _output_step(acc, qq, sq, k_ptr, v_ptr, sk_ptr, b, offs_m, offs_n, offs_d, s_kb, s_kn, s_kd, s_vb, s_vn, s_vd, L,
                 S, D, scale, mask_base, s_ml, s_ms, m, l, sp, QMAX: tl.constexpr, CAUSAL: tl.constexpr,
                 MASK: tl.constexpr, DTYPE: tl.constexpr, EDGE: tl.constexpr):
    """The forward's second pass over a key tile: ``qP qV`` added to ``acc``."""
    kk = _load_rows(k_ptr, b, offs_n, offs_d, s_kb, s_kn, s_kd, S, D)
    sk = tl.load(sk_ptr + b * S + offs_n, mask=offs_n < S, other=0.0)
    p = _recomputed_p(qq, sq, kk, sk, offs_m, offs_n, L, S, scale, mask_base, s_ml, s_ms, m, l, CAUSAL, MASK, DTYPE,
                      EDGE)
    vv = _load_rows(v_ptr, b, offs_n, offs_d, s_vb, s_vn, s_vd, S, D)
    return acc + tl.dot(_quantized_p(p, sp, QMAX), vv)


@triton.jit
def _delta_step(delta, qq, sq, eo, base_o, k_ptr, v_ptr, sk_ptr, b, offs_m, offs_n, offs_d, s_kb, s_kn, s_kd, s_vb,
                s_vn, s_vd, L, S, D, scale, mask_base, s_ml, s_ms, m, l, CAUSAL: tl.constexpr, MASK: tl.constexpr,
                DTYPE: tl.constexpr, EDGE: tl.constexpr):
    """The ranges kernel's first pass over a key tile: ``sum(P * dP)`` added to ``delta``."""
    p, dp, sk = _key_tile(qq, sq, eo, base_o, k_ptr, v_ptr, sk_ptr, b, offs_m, offs_n, offs_d, s_kb, s_kn, s_kd, s_vb,
                          s_vn, s_vd, L, S, D, scale, mask_base, s_ml, s_ms, m, l, CAUSAL, MASK, DTYPE, EDGE)
    return delta + tl.sum(p * dp, axis=1)


@triton.jit
def _ranges_step(row_amax, cols_top, ranges_ptr, outer_ptr, qq, sq, eo, base_o, k_ptr, v_ptr, sk_ptr, b, offs_m,
                 mask_m, offs_n, offs_d, s_kb, s_kn, s_kd, s_vb, s_vn, s_vd, L, S, D, scale, mask_base, s_ml, s_ms, m,
                 l, delta, CAUSAL: tl.constexpr, MASK: tl.constexpr, DTYPE: tl.constexpr, EDGE: tl.constexpr,
                 OUTER: tl.constexpr):
    """The ranges kernel's second pass over a key tile: ``|dS|`` maxed into the rows'
    ``row_amax`` and, by atomics, into the key columns' ranges (``cols_top``: their max).

    ``OUTER`` (``grad_outer_scale``, :func:`~sqcompile.kernels.triton_quant.shiftquant_outer`'s
    passes, the prescales applied in the tile): 1, the outer maxima -- of ``dS sQ`` (the row
    quantizer's values) per key column, of ``dS sK`` (the column quantizer's) per query row;
    2, the ranges of the quotients by them (:func:`_by_outer`): of ``dS sK`` divided per row,
    per column, and of ``dS sQ`` divided per column, per row."""
    p, dp, sk = _key_tile(qq, sq, eo, base_o, k_ptr, v_ptr, sk_ptr, b, offs_m, offs_n, offs_d, s_kb, s_kn, s_kd, s_vb,
                          s_vn, s_vd, L, S, D, scale, mask_base, s_ml, s_ms, m, l, CAUSAL, MASK, DTYPE, EDGE)
    mask_n = offs_n < S
    g = _score_grad(p, dp, delta, scale, DTYPE).to(tl.float32)
    if EDGE:
        g = tl.where(mask_m[:, None] & mask_n[None, :], g, 0.0)
    else:
        g = tl.where(mask_m[:, None], g, 0.0)
    if OUTER == 0:
        gc = tl.abs(g)
        gr = gc
    elif OUTER == 1:
        gc = tl.abs(g * sq[:, None])
        gr = tl.abs(g * sk[None, :])
    else:
        n = (S + L) * tl.num_programs(1) + 2
        gc = tl.abs(_by_outer(g * sk[None, :], outer_ptr, S * tl.num_programs(1) + 1 + b * L + offs_m, mask_m, n, True))
        gr = tl.abs(_by_outer(g * sq[:, None], outer_ptr, b * S + offs_n, mask_n, n, False))
    top = _combine_ranges(ranges_ptr, b * S + offs_n, tl.reduce(gc, 0, _max_nan), mask_n, sk_ptr, OUTER == 0)
    return _max_nan(row_amax, tl.reduce(gr, 1, _max_nan)), tl.maximum(cols_top, top)


@triton.jit
def _dq_step(acc, qq, sq, eo_c, base_oc, k_ptr, v_ptr, sk_ptr, kt_ptr, ranges_ptr, outer_ptr, seed_ptr, b, n0, offs_m,
             mask_m, offs_d, s_kb, s_kn, s_kd, s_vb, s_vn, s_vd, s_ktb, s_ktn, s_ktd, L, S, D, scale, mask_base, s_ml,
             s_ms, m, l, delta, Rc, base_c, GRAD_QMAX: tl.constexpr, GROUPS: tl.constexpr, STOCHASTIC: tl.constexpr,
             COLUMNS_NOISE_ALONG_S: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr, DTYPE: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EDGE: tl.constexpr, OUTER: tl.constexpr):
    """The ``dQ`` kernel over the key tile at ``n0``: ``eS_cols qK`` added to ``acc``
    (``OUTER``: ``dS sK`` divided by its rows' outer maxima first, ``outer_ptr``)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < S
    p, dp, sk = _key_tile(qq, sq, eo_c, base_oc, k_ptr, v_ptr, sk_ptr, b, offs_m, offs_n, offs_d, s_kb, s_kn, s_kd,
                          s_vb, s_vn, s_vd, L, S, D, scale, mask_base, s_ml, s_ms, m, l, CAUSAL, MASK, DTYPE, EDGE)
    g = _score_grad(p, dp, delta, scale, DTYPE)
    if STOCHASTIC:
        noise = tl.trans(_tile_noise(tl.load(seed_ptr), b, n0, tl.program_id(0) * BLOCK_M, S, L,
                                     COLUMNS_NOISE_ALONG_S, BLOCK_N, BLOCK_M))
    else:
        noise = 0.0
    r_cols = tl.load(ranges_ptr + b * S + offs_n, mask=mask_n, other=0.0)
    x = g * sk[None, :]
    if OUTER:
        x = _by_outer(x, outer_ptr, S * tl.num_programs(1) + 1 + b * L + offs_m, mask_m,
                      (S + L) * tl.num_programs(1) + 2, True)
    e_c = _shift_expand(x, r_cols[None, :], Rc, base_c, noise, GRAD_QMAX, GROUPS, STOCHASTIC)
    if EDGE:
        e_c = tl.where(mask_m[:, None] & mask_n[None, :], e_c, 0)
    else:
        e_c = tl.where(mask_m[:, None], e_c, 0)
    return acc + tl.dot(e_c.to(tl.int8), _load_rows(kt_ptr, b, offs_n, offs_d, s_ktb, s_ktn, s_ktd, S, D))


@triton.jit
def _dkdv_step(acc_dk, acc_dv, m0, kk, vv, sk, offs_n, mask_n, offs_d, q_ptr, qt_ptr, sq_ptr, stats_ptr, eoc_ptr,
               eor_ptr, delta_ptr, rr_ptr, seed_ptr, b, pid_n, L, S, D, BH, s_qb, s_qm, s_qd, s_qtb, s_qtm, s_qtd,
               s_eb, s_em, s_ed, s_rb, s_rm, s_rd, scale, mask_base, s_ml, s_ms, boc_ptr, Rr, base_r, outer_ptr,
               QMAX: tl.constexpr, GRAD_QMAX: tl.constexpr, GROUPS: tl.constexpr,
               STOCHASTIC: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr, DTYPE: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EDGE: tl.constexpr, OUTER: tl.constexpr):
    """The ``dK``/``dV`` kernel over the query tile at ``m0``: ``qP^T eO_rows`` added to
    ``acc_dv``, ``eS_rows^T qQ`` to ``acc_dk`` (``OUTER``: ``dS sQ`` divided by its columns'
    outer maxima first, ``outer_ptr``; ``dO``'s column quantizer's scales are per row)."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < L
    row = b * L + offs_m
    qq = _load_rows(q_ptr, b, offs_m, offs_d, s_qb, s_qm, s_qd, L, D)
    sq = tl.load(sq_ptr + row, mask=mask_m, other=0.0)
    m, l, sp, delta = _row_stats(stats_ptr, delta_ptr, row, mask_m, BH, L)
    p = _recomputed_p(qq, sq, kk, sk, offs_m, offs_n, L, S, scale, mask_base, s_ml, s_ms, m, l, CAUSAL, MASK, DTYPE,
                      EDGE)
    if EDGE:
        p = tl.where(mask_m[:, None], p, 0.0)
    eo_r = _load_rows(eor_ptr, b, offs_m, offs_d, s_rb, s_rm, s_rd, L, D)
    acc_dv += tl.dot(tl.trans(_quantized_p(p, sp, QMAX, (offs_d.shape[0] <= 64) or _P_CVT_AT_D128)), eo_r)
    eo_c = _load_rows(eoc_ptr, b, offs_m, offs_d, s_eb, s_em, s_ed, L, D)
    g = _score_grad(p, _rounded(_prob_grad(eo_c, vv, _o_scale(boc_ptr, row, mask_m, OUTER)), DTYPE), delta, scale,
                    DTYPE)
    if STOCHASTIC:
        noise = _uniform_noise(tl.load(seed_ptr), row, pid_n * BLOCK_N, S, BLOCK_M, BLOCK_N)
    else:
        noise = 0.0
    r_rows = tl.load(rr_ptr + row, mask=mask_m, other=0.0)
    x = g * sq[:, None]
    if OUTER:
        x = _by_outer(x, outer_ptr, b * S + offs_n, mask_n, (S + L) * BH + 2, False)
    e_r = _shift_expand(x, r_rows[:, None], Rr, base_r, noise, GRAD_QMAX, GROUPS, STOCHASTIC)
    if EDGE:
        e_r = tl.where(mask_m[:, None] & mask_n[None, :], e_r, 0)
    acc_dk += tl.dot(tl.trans(e_r.to(tl.int8)), _load_rows(qt_ptr, b, offs_m, offs_d, s_qtb, s_qtm, s_qtd, L, D))
    return acc_dk, acc_dv


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["tune_key"])
def _attention_fwd_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, H_in, s_mo, s_mi, s_ml, s_ms, sq_ptr, sk_ptr, sv_ptr, o_ptr,
                          stats_ptr, L, S, D, BH, s_qb, s_qm, s_qd, s_kb, s_kn, s_kd, s_vb, s_vn, s_vd, s_ob, s_om,
                          s_od, H_o, s_oh, scale, tune_key, QMAX: tl.constexpr, CAUSAL: tl.constexpr,
                          MASK: tl.constexpr, DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    """One block of queries of one (batch, head): ``O`` and the row statistics ``(m, l, sP)``
    in ``stats`` ``[3, BH, L]``.  Grid: ``(cdiv(L, BLOCK_M), BH)``.  ``O``'s (batch, head)
    ``b`` lies at ``(b // H_o) * s_ob + (b % H_o) * s_oh`` (``H_o`` 1 for ``[BH, L, D]``;
    the heads for an output stored ``[B, L, H, D]``, :func:`attention_out`)."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    mb = _mask_base(mask_ptr, b, H_in, s_mo, s_mi)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < L
    qq = _load_rows(q_ptr, b, offs_m, offs_d, s_qb, s_qm, s_qd, L, D)
    sq = tl.load(sq_ptr + b * L + offs_m, mask=mask_m, other=0.0)
    n_end = S
    if CAUSAL:
        n_end = tl.minimum(S, (pid_m + 1) * BLOCK_M)
    n_mid = _interior_keys(pid_m, S, CAUSAL, BLOCK_M, BLOCK_N)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(0, n_mid, BLOCK_N):
        m, l = _row_stats_step(m, l, qq, sq, k_ptr, sk_ptr, b, offs_m, n0 + tl.arange(0, BLOCK_N), offs_d, s_kb, s_kn,
                               s_kd, L, S, D, scale, mb, s_ml, s_ms, CAUSAL, MASK, DTYPE, False)
    for n0 in range(n_mid, n_end, BLOCK_N):
        m, l = _row_stats_step(m, l, qq, sq, k_ptr, sk_ptr, b, offs_m, n0 + tl.arange(0, BLOCK_N), offs_d, s_kb, s_kn,
                               s_kd, L, S, D, scale, mb, s_ml, s_ms, CAUSAL, MASK, DTYPE, True)
    m, l = _empty_rows_as_zeros(m, l)
    sp = _p_scale(l, QMAX, DTYPE)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.int32)
    for n0 in range(0, n_mid, BLOCK_N):
        acc = _output_step(acc, qq, sq, k_ptr, v_ptr, sk_ptr, b, offs_m, n0 + tl.arange(0, BLOCK_N), offs_d, s_kb, s_kn,
                           s_kd, s_vb, s_vn, s_vd, L, S, D, scale, mb, s_ml, s_ms, m, l, sp, QMAX, CAUSAL, MASK, DTYPE,
                           False)
    for n0 in range(n_mid, n_end, BLOCK_N):
        acc = _output_step(acc, qq, sq, k_ptr, v_ptr, sk_ptr, b, offs_m, n0 + tl.arange(0, BLOCK_N), offs_d, s_kb, s_kn,
                           s_kd, s_vb, s_vn, s_vd, L, S, D, scale, mb, s_ml, s_ms, m, l, sp, QMAX, CAUSAL, MASK, DTYPE,
                           True)
    sv = tl.load(sv_ptr + b * D + offs_d, mask=offs_d < D, other=0.0)
    out = acc.to(tl.float32) * sp[:, None] * sv[None, :]
    o_mask = mask_m[:, None] & (offs_d < D)[None, :]
    o_base = (b // H_o) * s_ob + (b % H_o) * s_oh
    tl.store(o_ptr + o_base + offs_m[:, None] * s_om + offs_d[None, :] * s_od, cast_rtne(out, DTYPE), mask=o_mask)
    row = b * L + offs_m
    tl.store(stats_ptr + row, m, mask=mask_m)
    tl.store(stats_ptr + BH * L + row, l, mask=mask_m)
    tl.store(stats_ptr + 2 * BH * L + row, sp, mask=mask_m)


@triton.jit(do_not_specialize=["tune_key"])
def _attention_ranges_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, H_in, s_mo, s_mi, s_ml, s_ms, sq_ptr, sk_ptr, stats_ptr,
                             eo_ptr, bo_ptr, delta_ptr, ranges_ptr, outer_ptr, L, S, D, BH, s_qb, s_qm, s_qd, s_kb,
                             s_kn, s_kd, s_vb, s_vn, s_vd, s_eb, s_em, s_ed, scale, tune_key, CAUSAL: tl.constexpr,
                             MASK: tl.constexpr, DTYPE: tl.constexpr, OUTER: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One block of queries: ``delta = sum(P * dP)`` per row, then the ranges of ``dS`` (times
    ``sK`` per key column, times ``sQ`` per query row) into ``ranges`` (int32 float bits,
    zeroed): ``[BH*S]`` column ranges, their max, ``[BH*L]`` row ranges, their max.
    Grid: ``(cdiv(L, BLOCK_M), BH)``.

    ``OUTER`` (``grad_outer_scale``): 1, the outer maxima in that layout instead (per key
    column those of the row quantizer, per query row the column quantizer's:
    :func:`_ranges_step`), ``dO``'s column scales one per row; 2, the ranges of the
    quotients by them (``outer_ptr``: pass 1's maxima and their reciprocals,
    :func:`~sqcompile.kernels.triton_quant.outer_reciprocals`), ``delta`` read from pass 1."""
    b, mb, offs_m, offs_d, mask_m, row, qq, eo, sq, n_end = _query_block(
        q_ptr, eo_ptr, sq_ptr, mask_ptr, H_in, s_mo, s_mi, s_qb, s_qm, s_qd, s_eb, s_em, s_ed, L, S, D, CAUSAL, BLOCK_M,
        BLOCK_D)
    base_o = _o_scale(bo_ptr, row, mask_m, OUTER)
    m = tl.load(stats_ptr + row, mask=mask_m, other=0.0)
    l = tl.load(stats_ptr + BH * L + row, mask=mask_m, other=1.0)
    n_mid = _interior_keys(tl.program_id(0), S, CAUSAL, BLOCK_M, BLOCK_N)
    if OUTER == 2:
        delta = tl.load(delta_ptr + row, mask=mask_m, other=0.0)
    else:
        delta = tl.zeros((BLOCK_M,), tl.float32)
        for n0 in range(0, n_mid, BLOCK_N):
            delta = _delta_step(delta, qq, sq, eo, base_o, k_ptr, v_ptr, sk_ptr, b, offs_m, n0 + tl.arange(0, BLOCK_N),
                                offs_d, s_kb, s_kn, s_kd, s_vb, s_vn, s_vd, L, S, D, scale, mb, s_ml, s_ms, m, l,
                                CAUSAL, MASK, DTYPE, False)
        for n0 in range(n_mid, n_end, BLOCK_N):
            delta = _delta_step(delta, qq, sq, eo, base_o, k_ptr, v_ptr, sk_ptr, b, offs_m, n0 + tl.arange(0, BLOCK_N),
                                offs_d, s_kb, s_kn, s_kd, s_vb, s_vn, s_vd, L, S, D, scale, mb, s_ml, s_ms, m, l,
                                CAUSAL, MASK, DTYPE, True)
        tl.store(delta_ptr + row, delta, mask=mask_m)
    row_amax = tl.zeros((BLOCK_M,), tl.float32)
    cols_top = tl.full((), 0, tl.int32)
    for n0 in range(0, n_mid, BLOCK_N):
        row_amax, cols_top = _ranges_step(row_amax, cols_top, ranges_ptr, outer_ptr, qq, sq, eo, base_o, k_ptr, v_ptr,
                                          sk_ptr, b, offs_m, mask_m, n0 + tl.arange(0, BLOCK_N), offs_d, s_kb, s_kn,
                                          s_kd, s_vb, s_vn, s_vd, L, S, D, scale, mb, s_ml, s_ms, m, l, delta, CAUSAL,
                                          MASK, DTYPE, False, OUTER)
    for n0 in range(n_mid, n_end, BLOCK_N):
        row_amax, cols_top = _ranges_step(row_amax, cols_top, ranges_ptr, outer_ptr, qq, sq, eo, base_o, k_ptr, v_ptr,
                                          sk_ptr, b, offs_m, mask_m, n0 + tl.arange(0, BLOCK_N), offs_d, s_kb, s_kn,
                                          s_kd, s_vb, s_vn, s_vd, L, S, D, scale, mb, s_ml, s_ms, m, l, delta, CAUSAL,
                                          MASK, DTYPE, True, OUTER)
    cols_ptr = ranges_ptr
    rows_ptr = ranges_ptr + BH * S + 1
    tl.atomic_max(cols_ptr + BH * S, cols_top, sem="relaxed")
    top = _combine_ranges(rows_ptr, row, row_amax, mask_m, sq_ptr, OUTER == 0)
    tl.atomic_max(rows_ptr + BH * L, top, sem="relaxed")


@triton.jit
def _row_stats(stats_ptr, delta_ptr, row, mask_m, BH, L):
    """A block of rows' ``(m, l, scale_P, delta)``."""
    m = tl.load(stats_ptr + row, mask=mask_m, other=0.0)
    l = tl.load(stats_ptr + BH * L + row, mask=mask_m, other=1.0)
    sp = tl.load(stats_ptr + 2 * BH * L + row, mask=mask_m, other=0.0)
    delta = tl.load(delta_ptr + row, mask=mask_m, other=0.0)
    return m, l, sp, delta


@triton.jit
def _gradient_ranges(rng_ptr, v, b, offs_r, offs_d, mask_r, H_d, s_dh, R, D, N_feat, f0):
    """The ShiftQuant ranges of a fused projection's gradient, ``[tokens, N_feat]`` (the packed
    ``dq`` / ``dk`` / ``dv``, a token's features contiguous), from the stored tile ``v``
    ``[rows, D]`` of (batch, head) ``b``: integer atomic maxima of ``|v|`` (NaN as +inf,
    :func:`~sqcompile.kernels.triton_quant._combine_ranges`) per feature column ``f0 + head *
    s_dh + d`` at ``rng_ptr`` and per token ``batch * R + row`` at ``rng_ptr + N_feat``."""
    mask_d = offs_d < D
    a = tl.where(mask_r[:, None] & mask_d[None, :], tl.abs(v), 0.0)
    _combine_ranges(rng_ptr, f0 + (b % H_d) * s_dh + offs_d, tl.reduce(a, 0, _max_nan), mask_d, rng_ptr, False)
    _combine_ranges(rng_ptr + N_feat, (b // H_d) * R + offs_r, tl.reduce(a, 1, _max_nan), mask_r, rng_ptr, False)


@triton.jit
def _gradient_sums(sum_ptr, v, b, pid, offs_r, offs_d, mask_r, H_d, s_dh, D, N_feat, f0, n_slots,
                   BLOCK: tl.constexpr, SLOT: tl.constexpr):
    """The bias gradient of a fused projection (its packed gradient summed over the tokens):
    this program's float32 column sums of the stored tile ``v`` ``[BLOCK rows, D]`` of (batch,
    head) ``b``, for features ``f0 + head * s_dh + d``, in slot ``pid * BLOCK // SLOT`` of its
    batch's ``n_slots = cdiv(rows, SLOT)`` rows of ``[B * n_slots, N_feat]`` partial sums; the
    program's other slots get zeros.  So every launch writes every slot whatever its
    ``BLOCK`` (a multiple of ``SLOT``, the smallest candidate): the autotuner's runs leave no
    stale partials, and no zero fill is needed.  One ``sum`` over the slots finishes it
    (deterministic: no atomics)."""
    total = tl.sum(tl.where(mask_r[:, None] & (offs_d < D)[None, :], v, 0.0), 0)
    first = pid * (BLOCK // SLOT)
    ptrs = sum_ptr + ((b // H_d) * n_slots + first) * N_feat + f0 + (b % H_d) * s_dh + offs_d
    # (the slot test folded into the column bound: the interpreter rejects a block mask and'd
    # with a scalar one)
    tl.store(ptrs, total, mask=offs_d < tl.where(first < n_slots, D, 0))
    for j in tl.static_range(1, BLOCK // SLOT):
        tl.store(ptrs + j * N_feat, tl.zeros_like(total), mask=offs_d < tl.where(first + j < n_slots, D, 0))


@triton.jit(do_not_specialize=["tune_key"])
def _attention_bwd_kv_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, H_in, s_mo, s_mi, s_ml, s_ms, qt_ptr, sq_ptr, sk_ptr,
                             stats_ptr, eoc_ptr, boc_ptr, eor_ptr, bor_ptr, delta_ptr, ranges_ptr, outer_ptr,
                             seed_ptr, dk_ptr, dv_ptr, L, S, D, BH, s_qb, s_qm, s_qd, s_kb, s_kn, s_kd, s_vb, s_vn,
                             s_vd, s_qtb, s_qtm, s_qtd, s_eb, s_em, s_ed, s_rb, s_rm, s_rd, s_db, s_dn, s_dd, H_d, s_dh,
                             rng_ptr, N_feat, f0_k, f0_v, sum_ptr, n_slots, scale, tune_key, QMAX: tl.constexpr,
                             GRAD_QMAX: tl.constexpr, GROUPS: tl.constexpr, STOCHASTIC: tl.constexpr,
                             CAUSAL: tl.constexpr, MASK: tl.constexpr, DTYPE: tl.constexpr, RANGES: tl.constexpr,
                             SUMS: tl.constexpr, SLOT: tl.constexpr, OUTER: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One block of keys: ``dV = qP^T eO_rows`` and ``dK = eS_rows^T qQ`` over all queries,
    written in the dtype (``dK`` and ``dV`` at the same strides; a (batch, head) ``b`` at
    ``(b // H_d) * s_db + (b % H_d) * s_dh``, as the forward's output).  Grid:
    ``(cdiv(S, BLOCK_N), BH)``.

    ``qt`` is ``qQ`` again, stored with the queries contiguous, and ``eor`` is stored that way
    too: both GEMMs reduce over the queries, and Hopper's 8-bit MMA reads its second operand
    K-major (``qQ`` as stored serves the scores, which reduce over ``D``).

    ``OUTER`` (``grad_outer_scale``): ``dS``'s row quantizer divides by the outer maxima per
    key (``outer_ptr``), ``dK``'s rows are scaled by them, ``dV``'s columns by ``dO``'s row
    quantizer's scales (``bor``, one per head-dim column) and ``dP``'s rows by its column
    quantizer's (``boc``, one per query)."""
    pid_n = tl.program_id(0)
    b = tl.program_id(1)
    mb = _mask_base(mask_ptr, b, H_in, s_mo, s_mi)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < S
    kk = _load_rows(k_ptr, b, offs_n, offs_d, s_kb, s_kn, s_kd, S, D)
    vv = _load_rows(v_ptr, b, offs_n, offs_d, s_vb, s_vn, s_vd, S, D)
    sk = tl.load(sk_ptr + b * S + offs_n, mask=mask_n, other=0.0)
    rr_ptr = ranges_ptr + BH * S + 1
    Rr = tl.load(rr_ptr + BH * L)
    base_r = _base_of(Rr, GROUPS, GRAD_QMAX)
    acc_dk = tl.zeros((BLOCK_N, BLOCK_D), tl.int32)
    acc_dv = tl.zeros((BLOCK_N, BLOCK_D), tl.int32)
    m_start = 0
    if CAUSAL:
        m_start = (pid_n * BLOCK_N) // BLOCK_M * BLOCK_M
    if BLOCK_D > 64:
        # at the register limit already (a second copy of the loop body spills): every tile
        # takes the masked path.  (Folding this loop into the edge loop below, with lo = hi
        # = m_start, spills 44-56 bytes here and 8 at head dim 64 with a mask: kept apart.)
        for m0 in range(m_start, L, BLOCK_M):
            acc_dk, acc_dv = _dkdv_step(acc_dk, acc_dv, m0, kk, vv, sk, offs_n, mask_n, offs_d, q_ptr, qt_ptr, sq_ptr,
                                        stats_ptr, eoc_ptr, eor_ptr, delta_ptr, rr_ptr, seed_ptr, b, pid_n, L, S, D, BH,
                                        s_qb, s_qm, s_qd, s_qtb, s_qtm, s_qtd, s_eb, s_em, s_ed, s_rb, s_rm, s_rd, scale,
                                        mb, s_ml, s_ms, boc_ptr, Rr, base_r, outer_ptr, QMAX, GRAD_QMAX,
                                        GROUPS, STOCHASTIC, CAUSAL, MASK, DTYPE, BLOCK_M, BLOCK_N, True, OUTER)
    else:
        # interior query tiles [lo, hi) unmasked; the edge ones (the diagonal before them,
        # a partial tile after) in one more loop: integer sums, so the order does not matter
        lo, hi = _interior_queries(pid_n, m_start, L, S, CAUSAL, BLOCK_M, BLOCK_N)
        for m0 in range(lo, hi, BLOCK_M):
            acc_dk, acc_dv = _dkdv_step(acc_dk, acc_dv, m0, kk, vv, sk, offs_n, mask_n, offs_d, q_ptr, qt_ptr, sq_ptr,
                                        stats_ptr, eoc_ptr, eor_ptr, delta_ptr, rr_ptr, seed_ptr, b, pid_n, L, S, D, BH,
                                        s_qb, s_qm, s_qd, s_qtb, s_qtm, s_qtd, s_eb, s_em, s_ed, s_rb, s_rm, s_rd, scale,
                                        mb, s_ml, s_ms, boc_ptr, Rr, base_r, outer_ptr, QMAX, GRAD_QMAX,
                                        GROUPS, STOCHASTIC, CAUSAL, MASK, DTYPE, BLOCK_M, BLOCK_N, False, OUTER)
        n_diagonal = (lo - m_start) // BLOCK_M
        for i in range(0, n_diagonal + (L > hi).to(tl.int32)):      # the diagonal, then a partial tile
            m0 = tl.where(i < n_diagonal, m_start + i * BLOCK_M, hi + (i - n_diagonal) * BLOCK_M)
            acc_dk, acc_dv = _dkdv_step(acc_dk, acc_dv, m0, kk, vv, sk, offs_n, mask_n, offs_d, q_ptr, qt_ptr, sq_ptr,
                                        stats_ptr, eoc_ptr, eor_ptr, delta_ptr, rr_ptr, seed_ptr, b, pid_n, L, S, D, BH,
                                        s_qb, s_qm, s_qd, s_qtb, s_qtm, s_qtd, s_eb, s_em, s_ed, s_rb, s_rm, s_rd, scale,
                                        mb, s_ml, s_ms, boc_ptr, Rr, base_r, outer_ptr, QMAX, GRAD_QMAX,
                                        GROUPS, STOCHASTIC, CAUSAL, MASK, DTYPE, BLOCK_M, BLOCK_N, True, OUTER)
    out_mask = mask_n[:, None] & (offs_d < D)[None, :]
    out = (b // H_d) * s_db + (b % H_d) * s_dh + offs_n[:, None] * s_dn + offs_d[None, :] * s_dd
    dk = cast_rtne(acc_dk.to(tl.float32) * _outer_scale(base_r, outer_ptr, b * S + offs_n, mask_n, OUTER), DTYPE)
    tl.store(dk_ptr + out, dk, mask=out_mask)
    if RANGES:      # dk's ranges before dv is formed: fewer values live (both at once spilled)
        _gradient_ranges(rng_ptr, dk.to(tl.float32), b, offs_n, offs_d, mask_n, H_d, s_dh, S, D, N_feat, f0_k)
    if SUMS:
        _gradient_sums(sum_ptr, dk.to(tl.float32), b, pid_n, offs_n, offs_d, mask_n, H_d, s_dh, D, N_feat, f0_k,
                       n_slots, BLOCK_N, SLOT)
    if OUTER:
        dv_scale = tl.load(bor_ptr + b * D + offs_d, mask=offs_d < D, other=0.0)[None, :]
    else:
        dv_scale = tl.load(bor_ptr)
    dv = cast_rtne(acc_dv.to(tl.float32) * dv_scale, DTYPE)
    tl.store(dv_ptr + out, dv, mask=out_mask)
    if RANGES:
        _gradient_ranges(rng_ptr, dv.to(tl.float32), b, offs_n, offs_d, mask_n, H_d, s_dh, S, D, N_feat, f0_v)
    if SUMS:
        _gradient_sums(sum_ptr, dv.to(tl.float32), b, pid_n, offs_n, offs_d, mask_n, H_d, s_dh, D, N_feat, f0_v,
                       n_slots, BLOCK_N, SLOT)


@triton.jit(do_not_specialize=["tune_key"])
def _attention_bwd_q_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, H_in, s_mo, s_mi, s_ml, s_ms, kt_ptr, sq_ptr, sk_ptr,
                            stats_ptr, eoc_ptr, boc_ptr, delta_ptr, ranges_ptr, outer_ptr, seed_ptr, dq_ptr, L, S, D,
                            BH, s_qb, s_qm, s_qd, s_kb, s_kn, s_kd, s_vb, s_vn, s_vd, s_ktb, s_ktn, s_ktd, s_eb, s_em,
                            s_ed,
                            s_db, s_dm, s_dd, H_d, s_dh, rng_ptr, N_feat, f0_q, sum_ptr, n_slots, scale, tune_key,
                            GRAD_QMAX: tl.constexpr,
                            GROUPS: tl.constexpr, STOCHASTIC: tl.constexpr, COLUMNS_NOISE_ALONG_S: tl.constexpr,
                            CAUSAL: tl.constexpr, MASK: tl.constexpr, DTYPE: tl.constexpr, RANGES: tl.constexpr,
                            SUMS: tl.constexpr, SLOT: tl.constexpr, OUTER: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One block of queries: ``dQ = eS_cols qK`` over all keys, written in the dtype (a
    separate kernel from :func:`_attention_bwd_kv_kernel`, which would otherwise add its
    share of every ``dQ`` row by atomics and spill registers with both quantized ``dS`` tiles
    live).  ``kt`` is ``qK`` stored with the keys contiguous (K-major for ``eS qK``).
    ``COLUMNS_NOISE_ALONG_S``: ``dS``'s column quantizer draws its noise along the keys, as
    :func:`~sqcompile.kernels.triton_quant.shiftquant` does on a ``[BH, L, S]`` tensor
    (:func:`~sqcompile.kernels.triton_quant.columns_noise_along_n`).
    ``OUTER`` (``grad_outer_scale``): ``dS``'s column quantizer divides by the outer maxima
    per query (``outer_ptr``), ``dQ``'s rows are scaled by them, ``dP``'s by ``dO``'s.
    Grid: ``(cdiv(L, BLOCK_M), BH)``."""
    b, mb, offs_m, offs_d, mask_m, row, qq, eo_c, sq, n_end = _query_block(
        q_ptr, eoc_ptr, sq_ptr, mask_ptr, H_in, s_mo, s_mi, s_qb, s_qm, s_qd, s_eb, s_em, s_ed, L, S, D, CAUSAL,
        BLOCK_M, BLOCK_D)
    m, l, sp, delta = _row_stats(stats_ptr, delta_ptr, row, mask_m, BH, L)
    base_oc = _o_scale(boc_ptr, row, mask_m, OUTER)
    Rc = tl.load(ranges_ptr + BH * S)
    base_c = _base_of(Rc, GROUPS, GRAD_QMAX)
    n_mid = _interior_keys(tl.program_id(0), S, CAUSAL, BLOCK_M, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.int32)
    for n0 in range(0, n_mid, BLOCK_N):
        acc = _dq_step(acc, qq, sq, eo_c, base_oc, k_ptr, v_ptr, sk_ptr, kt_ptr, ranges_ptr, outer_ptr, seed_ptr, b, n0,
                       offs_m, mask_m, offs_d, s_kb, s_kn, s_kd, s_vb, s_vn, s_vd, s_ktb, s_ktn, s_ktd, L, S, D, scale,
                       mb, s_ml, s_ms, m, l, delta, Rc, base_c, GRAD_QMAX, GROUPS, STOCHASTIC, COLUMNS_NOISE_ALONG_S,
                       CAUSAL, MASK, DTYPE, BLOCK_M, BLOCK_N, False, OUTER)
    for n0 in range(n_mid, n_end, BLOCK_N):
        acc = _dq_step(acc, qq, sq, eo_c, base_oc, k_ptr, v_ptr, sk_ptr, kt_ptr, ranges_ptr, outer_ptr, seed_ptr, b, n0,
                       offs_m, mask_m, offs_d, s_kb, s_kn, s_kd, s_vb, s_vn, s_vd, s_ktb, s_ktn, s_ktd, L, S, D, scale,
                       mb, s_ml, s_ms, m, l, delta, Rc, base_c, GRAD_QMAX, GROUPS, STOCHASTIC, COLUMNS_NOISE_ALONG_S,
                       CAUSAL, MASK, DTYPE, BLOCK_M, BLOCK_N, True, OUTER)
    out = (b // H_d) * s_db + (b % H_d) * s_dh + offs_m[:, None] * s_dm + offs_d[None, :] * s_dd
    dq = cast_rtne(acc.to(tl.float32) * _outer_scale(base_c, outer_ptr, BH * S + 1 + row, mask_m, OUTER), DTYPE)
    tl.store(dq_ptr + out, dq, mask=mask_m[:, None] & (offs_d < D)[None, :])
    if RANGES:
        _gradient_ranges(rng_ptr, dq.to(tl.float32), b, offs_m, offs_d, mask_m, H_d, s_dh, L, D, N_feat, f0_q)
    if SUMS:
        _gradient_sums(sum_ptr, dq.to(tl.float32), b, tl.program_id(0), offs_m, offs_d, mask_m, H_d, s_dh, D, N_feat,
                       f0_q, n_slots, BLOCK_M, SLOT)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------

class Tile(NamedTuple):
    block_m: int          # queries: per program (forward, ranges, dQ) or per loop step (dK, dV)
    block_n: int          # keys: per loop step (forward, ranges, dQ) or per program (dK, dV)
    num_warps: int
    num_stages: int


# The candidate tiles on a GPU, per kernel and head-dim class (BLOCK_D <= 64, BLOCK_D > 64),
# autotuned per (L, S, D) at the first call (``SQCOMPILE_AUTOTUNE=0``: the first one).  Each
# compiles for sm_90 with every ``tl.dot`` a warpgroup MMA (``wgmma``; 32-row tiles fell back
# to ``mma.sync``) and no register spills (Triton 3.9; Triton 3.6 spills 36-52 bytes in the
# head-dim-128 ``dK``/``dV`` kernel's 64 x 64 tile, which sits at the register limit: one
# pipeline stage there; see ``_P_CVT_AT_D128``).  Where a kernel feeds a tile it computed to
# an MMA as the first operand (``P`` in the forward's second pass, ``P^T`` and ``dS^T`` for
# ``dV``/``dK``, ``dS`` for ``dQ``), 8 warps need 128 rows: over 64 rows both warpgroups
# compute the whole tile (the loop body issues as many instructions as 128 x 64's,
# ``benchmarks/sass_counts.py``), so those kernels try
# 128 rows / 8 warps first: 128 x 64, but 128 x 32 for ``dQ`` at head dim 128, where 128 x 64
# spills 40 bytes with a padding mask (72 instructions per score against 122 for 64 x 64);
# 64 x 64 over 4 warps does not repeat work either (the forward's first choice at head dim
# 64; ``dQ``'s second at head dim 64 since 2026-11-30, in place of 64 x 64 over 8 warps,
# which repeats it: 113 instructions a score against 59-61, 244-246 registers, no spills with
# Triton 3.6 or 3.9, two programs per SM where 128 x 64 fits one; ``dK``/``dV`` over 4 warps
# spills 36-160 bytes).  ``tests/test_triton_attention.py`` checks them with
# ``ptxas``.  Not chosen from timings: the autotuner times them on the GPU.
GPU_TILES = {
    "fwd": ([Tile(64, 64, 4, 2), Tile(128, 64, 8, 2)], [Tile(128, 64, 8, 2), Tile(64, 64, 8, 2)]),
    "ranges": ([Tile(64, 64, 4, 2), Tile(128, 64, 8, 2)], [Tile(64, 64, 8, 2), Tile(128, 64, 8, 2)]),
    "dkdv": ([Tile(128, 64, 8, 2), Tile(64, 64, 8, 2)], [Tile(128, 64, 8, 1), Tile(64, 64, 8, 1)]),
    "dq": ([Tile(128, 64, 8, 2), Tile(64, 64, 4, 2)], [Tile(128, 32, 8, 2), Tile(64, 64, 8, 2)]),
    # with grad_outer_scale (``OUTER``): its per-key reciprocals (one more value per column of
    # the tile) spill 100 bytes at head dim 64 in 128 x 64 / 2 stages, none in 64 x 64 / 1 stage
    # (8 with a padding mask); at head dim 128 every candidate spills, 48 bytes the least
    # (sm_90, Triton 3.9).  Not timed on a GPU.
    "dkdv_outer": ([Tile(64, 64, 8, 1), Tile(128, 64, 8, 1)], [Tile(128, 64, 8, 1), Tile(64, 64, 8, 2)]),
}
# In Triton's interpreter (tests): small tiles, so masked edges and several blocks are exercised.
INTERPRETER_TILE = Tile(16, 16, 1, 1)
_KERNELS = {"fwd": _attention_fwd_kernel, "ranges": _attention_ranges_kernel, "dkdv": _attention_bwd_kv_kernel,
            "dq": _attention_bwd_q_kernel, "dkdv_outer": _attention_bwd_kv_kernel}
_PROGRAMS_ALONG = {"fwd": "BLOCK_M", "ranges": "BLOCK_M", "dq": "BLOCK_M", "dkdv": "BLOCK_N", "dkdv_outer": "BLOCK_N"}
_ARG_NAMES = {name: kernel.arg_names for name, kernel in _KERNELS.items()}


def _block_d(D: int, device: torch.device) -> int:
    """The head dim rounded up to a power of two: at least 32 on a GPU (an int8 ``tl.dot``
    needs a reduction of 32 there), 16 in the interpreter."""
    return max(16 if INTERPRETED or device.type != "cuda" else 32, next_power_of_2(D))


def _prune(configs, named_args, **kwargs):
    return configs if autotune_enabled() else configs[:1]


@functools.lru_cache(maxsize=None)
def _tuned(name: str, wide: bool):
    configs = [triton.Config({"BLOCK_M": t.block_m, "BLOCK_N": t.block_n}, num_warps=t.num_warps,
                             num_stages=t.num_stages) for t in GPU_TILES[name][wide]]
    return triton.autotune(configs, key=["D", "tune_key"], prune_configs_by={"early_config_prune": _prune})(
        _KERNELS[name])


def _tune_key(L: int, S: int) -> int:
    """With ``D``, the kernels' autotuning key (an argument they do not read): the query and
    key lengths rounded up to powers of two, so that training on sequences of changing length
    autotunes once per power of two, not once per length."""
    return (max(L, 1) - 1).bit_length() * 64 + (max(S, 1) - 1).bit_length()


def _launch(name: str, extent: int, BH: int, args: tuple, consts: dict, device: torch.device,
            tiles: Optional[Dict[str, Tile]]) -> None:
    """Launch kernel ``name`` over ``cdiv(extent, block) x BH`` programs: with ``tiles[name]``
    when given (tests), the interpreter's tile on CPU, else autotuned over :data:`GPU_TILES`.
    Every candidate is safe to run repeatedly while the autotuner times it (outputs are
    overwritten; the ranges pass's atomic maxima give the same result again)."""
    along = _PROGRAMS_ALONG[name]
    names = _ARG_NAMES[name]
    args = (*args, _tune_key(args[names.index("L")], args[names.index("S")]))     # ``args`` end at ``scale``
    tile = _tile_for(name, device, tiles)
    if tile is None:
        _tuned(name, consts["BLOCK_D"] > 64)[lambda meta: (cdiv(extent, meta[along]), BH)](*args, **consts)
        return
    sizes = {"BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n}
    _KERNELS[name][(cdiv(extent, sizes[along]), BH)](*args, **sizes, num_warps=tile.num_warps,
                                                     num_stages=tile.num_stages, **consts)


def _tile_for(name: str, device: torch.device, tiles: Optional[Dict[str, Tile]]) -> Optional[Tile]:
    """Kernel ``name``'s tile: ``tiles[name]`` when given (tests), the interpreter's on CPU,
    ``None`` where :func:`_launch` autotunes over :data:`GPU_TILES`."""
    if tiles is not None:
        return tiles[name] if name in tiles else tiles[name.split("_")[0]]
    return INTERPRETER_TILE if INTERPRETED or device.type != "cuda" else None


def _sequence_contiguous(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[BH, R, D]`` copied so that its ``R`` dim is contiguous (a tiled relayout; a few
    MB at transformer sizes), for the GEMMs that reduce over the sequence: Hopper's 8-bit
    MMA reads its second operand K-major, and Triton transposes any other layout through
    registers at a fraction of the speed (``triton_gemm._k_major``)."""
    if x.stride(1) == 1:
        return x
    return relayout(x, torch.empty((x.shape[0], x.shape[2], x.shape[1]), dtype=x.dtype,
                                   device=x.device).transpose(1, 2))


def _rows(x: torch.Tensor):
    return x.stride(0), x.stride(1), x.stride(2)


def _outer_rows(x: torch.Tensor):
    """The strides of ``[B, H, R, D]`` (or ``[BH, R, D]``) ``x`` as the kernels that write such
    an output take them: ``(s_b, s_r, s_d, H, s_h)``, a (batch, head) ``b`` at ``(b // H) *
    s_b + (b % H) * s_h``."""
    x = _heads(x)
    return x.stride(0), x.stride(2), x.stride(3), x.shape[1], x.stride(1)


def _mask_args(mask: Optional[torch.Tensor], placeholder: torch.Tensor) -> Tuple[tuple, int]:
    """The kernels' mask arguments ``(mask, H_in, s_mo, s_mi, s_ml, s_ms)`` and ``MASK`` kind
    (0: none, 1: boolean, read as uint8; 2: float, added) for a mask ``[O, H_in, L, S]``."""
    if mask is None:
        return (placeholder, 1, 0, 0, 0, 0), 0
    kind = 1 if mask.dtype == torch.bool else 2
    if kind == 1:
        mask = mask.view(torch.uint8)
    return (mask, mask.shape[1], *mask.stride()), kind


def attention_out(query: torch.Tensor) -> torch.Tensor:
    """The output of :func:`attention_forward` for ``query`` ``[B, H, L, D]`` (uninitialized):
    stored ``[B, L, H, D]`` (and returned as its ``[B, H, L, D]`` view) where the query's
    heads lie inside its sequence, as in the head split of a projection,
    ``x.view(B, L, H, D).transpose(1, 2)``; the model's ``out.transpose(1, 2).reshape(B, L,
    H * D)`` is then a view, not a copy.  Else contiguous.  (Also the op's fake.)"""
    B, H, L, D = query.shape
    if H > 1 and L > 1 and query.stride(1) < query.stride(2):
        return query.new_empty((B, L, H, D)).transpose(1, 2)
    return query.new_empty((B, H, L, D))


def _heads(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, L, D]`` as is; ``[BH, L, D]`` as ``[1, BH, L, D]``."""
    return x if x.dim() == 4 else x.unsqueeze(0)


def attention_forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Optional[torch.Tensor],
                      scale: float, causal: bool, bits: int, tiles: Optional[Dict[str, Tile]] = None,
                      p_bits: Optional[int] = None):
    """``[B, H, L, D]``, ``[B, H, S, D]``, ``[B, H, S, D]`` (or the same without ``B``) ->
    ``(out, qq, sq, qk, sk, qv, sv, stats)``: the output and what the backward needs (the int8
    operands, contiguous, their float32 scales, and the row statistics ``[3, B*H, L]``: max,
    exponential sum, ``P``'s scale).  The operands are read where they lie, whatever their
    strides (the q / k / v slices of a fused projection included); the output is laid out by
    :func:`attention_out`.  ``mask``: ``None`` or ``[O, H_in, L, S]`` with ``O * H_in == B*H``
    (strides 0 where it broadcasts), boolean (False: masked) or of the query's dtype (added
    to the scores).  ``bits``: ``Q``'s, ``K``'s and ``V``'s; ``p_bits``: the probabilities'
    (default ``bits``; :func:`attention_backward` takes them as its ``bits``).  ``tiles``: a
    :class:`Tile` per kernel name instead of the interpreter's or the autotuned ones (tests)."""
    q4, k4, v4 = _heads(query), _heads(key), _heads(value)
    B, H, L, D = q4.shape
    S = k4.shape[2]
    BH = B * H
    quantized = [quantize(x, bits, dims, False, out=torch.empty(x.shape, dtype=torch.int8, device=x.device))
                 for x, dims in ((q4, [0, 1, 2]), (k4, [0, 1, 2]), (v4, [0, 1, 3]))]
    (qq, sq), (qk, sk), (qv, sv) = quantized
    qq3, qk3 = qq.view(BH, L, D), qk.view(BH, S, D)
    qv_t = _sequence_contiguous(qv.view(BH, S, D))          # the second operand of qP qV, K-major
    out = attention_out(q4)
    stats = torch.empty((3, BH, L), dtype=torch.float32, device=query.device)
    margs, kind = _mask_args(mask, stats)
    _launch("fwd", L, BH, (qq3, qk3, qv_t, *margs, sq, sk, sv, out, stats, L, S, D, BH, *_rows(qq3), *_rows(qk3),
                           *_rows(qv_t), *_outer_rows(out), scale),
            dict(QMAX=N.qmax(bits if p_bits is None else p_bits), CAUSAL=causal, MASK=kind, DTYPE=_TL_DTYPES[query.dtype],
                 BLOCK_D=_block_d(D, query.device)), query.device, tiles)
    results = (out, qq, sq, qk, sk, qv, sv)
    if query.dim() == 3:
        results = tuple(t.squeeze(0) for t in results)
    return (*results, stats)


def attention_backward(grad_out: torch.Tensor, qq, sq, qk, sk, qv, sv, stats, mask: Optional[torch.Tensor],
                       scale: float, causal: bool, bits: int, grad_bits: int, groups: int, stochastic: bool = True,
                       seeds: Tuple = (None, None, None, None), tiles: Optional[Dict[str, Tile]] = None,
                       grads: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
                       grad_ranges: Optional[torch.Tensor] = None, grad_sums: Optional[torch.Tensor] = None,
                       outer: bool = False):
    """``(dq, dk, dv)`` of :func:`attention_forward` (the same ``mask``).  ``grad_out`` is
    ShiftQuant-ed both ways first (:func:`~sqcompile.kernels.triton_quant.shiftquant_pair`:
    along ``D`` for ``dP = dO V^T``, along queries for ``dV = P^T dO``), then the three
    kernels run.  ``seeds``: ``dO``'s two quantizers', then ``dS``'s (columns, rows); ``None``
    entries are drawn in that order, as the unfused path draws them.  ``grads``: the three
    ``[B, H, L, D]`` tensors to write them into (any strides, ``dk``'s and ``dv``'s the same:
    views of one fused projection's gradient, ``sqcompile::triton_attention_backward_packed``);
    default contiguous.  ``grad_ranges``: with ``grads`` laid out as one ``[tokens, N]``
    gradient at storage offset 0 (a token's ``N`` features contiguous, ``N`` the grads'
    sequence stride), an int32
    ``[N + tokens]`` zeroed tensor that gets the float bits of its ShiftQuant ranges (per
    feature, then per token; :func:`_gradient_ranges`), as a GEMM region's epilogue gives
    them, so that its quantizers skip their range pass.  ``grad_sums``: with ``grads`` laid
    out so and covering all ``N`` features, a float32 ``[N]`` tensor that gets that gradient
    summed over the tokens (the projection's bias gradient; :func:`_gradient_sums`).

    ``outer`` (``grad_outer_scale``): every gradient quantizer with its outer scale
    (:func:`~sqcompile.kernels.triton_quant.shiftquant_outer`), as the unfused path's GEMMs
    take it: ``dO``'s pair with ``outer=True``; ``dS``'s outer maxima and then the ranges of
    its quotients by them take two range passes over the tiles (one more recomputation of
    the scores and of ``dP``)."""
    B, H, L, D = _heads(qq).shape
    S = qk.shape[-2]
    BH = B * H
    qq, sq, qk, sk, qv = qq.view(BH, L, D), sq.view(BH, L, 1), qk.view(BH, S, D), sk.view(BH, S, 1), qv.view(BH, S, D)
    sv = sv.view(BH, 1, D)
    dtype = grad_out.dtype
    dev = grad_out.device
    sp = stats[2].reshape(BH, L, 1)
    # dO read where it lies ([B, L, H, D] as the gradient of attention_out's layout), quantized
    # into contiguous [B, H, L, D] (rows transposed)
    go = _heads(grad_out)
    if go.stride(-1) != 1:
        go = go.contiguous()
    eo_c, bo_c, eo_r, bo_r = shiftquant_pair(go, grad_bits, groups, stochastic, seeds=seeds[:2],
                                             prescales=(sv.view(B, H, 1, D), sp.view(B, H, L, 1)),
                                             rows_transposed=True, outer=outer)
    eo_c, eo_r = eo_c.view(BH, L, D), eo_r.view(BH, L, D)
    seed_c = _seed_arg(seeds[2], stochastic, dev, bo_c)
    seed_r = _seed_arg(seeds[3], stochastic, dev, bo_c)
    ranges = torch.zeros(BH * S + 1 + BH * L + 1, dtype=torch.int32, device=dev)
    delta = torch.empty((BH, L), dtype=torch.float32, device=dev)
    margs, kind = _mask_args(mask, delta)
    common = dict(CAUSAL=causal, MASK=kind, DTYPE=_TL_DTYPES[dtype], BLOCK_D=_block_d(D, dev))
    outer_maxima = torch.zeros_like(ranges) if outer else ranges       # OUTER 0: any pointer
    # grad_outer_scale: the outer maxima (into their buffer), then the quotients' ranges
    passes = ((1, outer_maxima), (2, ranges)) if outer else ((0, ranges),)
    for pass_, found in passes:
        if pass_ == 2:      # the maxima as the kernels divide by them
            outer_maxima = outer_reciprocals(outer_maxima.view(torch.float32))
        _launch("ranges", L, BH, (qq, qk, qv, *margs, sq, sk, stats, eo_c, bo_c, delta, found,
                                  outer_maxima.view(torch.float32), L, S, D, BH, *_rows(qq), *_rows(qk), *_rows(qv),
                                  *_rows(eo_c), scale), dict(common, OUTER=pass_), dev, tiles)
    ranges = ranges.view(torch.float32)
    if grads is None:
        shape = (B, H) if grad_out.dim() == 4 else (BH,)
        dq = torch.empty((*shape, L, D), dtype=dtype, device=dev)
        dk = torch.empty((*shape, S, D), dtype=dtype, device=dev)
        dv = torch.empty_like(dk)
    else:
        dq, dk, dv = grads
        if _heads(dk).stride() != _heads(dv).stride():
            raise ValueError(f"attention_backward: dk and dv must have the same strides, got {dk.stride()} "
                             f"and {dv.stride()}")
    n_feat = _heads(dq).stride(2)
    rng = grad_ranges
    offsets = (0, 0, 0)
    if rng is not None or grad_sums is not None:
        if grads is None or any(_heads(t).stride(0) != L * n_feat or t.stride(-1) != 1 or t.storage_offset() +
                                (H - 1) * _heads(t).stride(1) + D > n_feat for t in grads) or L != S:
            raise ValueError("attention_backward: grad_ranges and grad_sums need grads laid out as one "
                             "[tokens, features] gradient")
        if grad_sums is not None and (3 * H * D != n_feat or grad_sums.shape != (n_feat,)
                                      or grad_sums.dtype != torch.float32):
            raise ValueError(f"attention_backward: grad_sums must be float32 [{n_feat}] and the three gradients "
                             f"must cover all {n_feat} features")
        offsets = [t.storage_offset() for t in grads]
    # In the epilogues, but at head dims above 64: there the dK/dV kernel sits at the register
    # limit and its ranges epilogue spilled (16 bytes, a reload per loop step, Triton 3.9);
    # one range pass over the packed gradient after the kernels instead (what the quantizers'
    # own range pass would read), and likewise one sum.
    in_kernel = common["BLOCK_D"] <= 64
    ranges_in_kernel = rng is not None and in_kernel
    if not ranges_in_kernel:
        rng = delta                             # RANGES off: any pointer
    sums_in_kernel = grad_sums is not None and in_kernel
    dkdv = "dkdv_outer" if outer else "dkdv"
    slot = _sum_slot(tiles, dev, common["BLOCK_D"] > 64, dkdv) if sums_in_kernel else 1     # SLOT: unused without
    n_slots = cdiv(L, slot)
    parts = torch.empty((B * n_slots, n_feat), dtype=torch.float32, device=dev) if sums_in_kernel else delta
    qq_t, qk_t = _sequence_contiguous(qq), _sequence_contiguous(qk)
    common.update(GRAD_QMAX=N.qmax(grad_bits), GROUPS=groups, STOCHASTIC=stochastic, OUTER=outer)
    _launch(dkdv, S, BH, (qq, qk, qv, *margs, qq_t, sq, sk, stats, eo_c, bo_c, eo_r, bo_r, delta, ranges, outer_maxima,
                            seed_r, dk,
                            dv, L, S, D, BH, *_rows(qq), *_rows(qk), *_rows(qv), *_rows(qq_t), *_rows(eo_c),
                            *_rows(eo_r), *_outer_rows(dk), rng, n_feat, *offsets[1:], parts, n_slots, scale),
            dict(common, QMAX=N.qmax(bits), RANGES=ranges_in_kernel, SUMS=sums_in_kernel, SLOT=slot), dev, tiles)
    _launch("dq", L, BH, (qq, qk, qv, *margs, qk_t, sq, sk, stats, eo_c, bo_c, delta, ranges, outer_maxima, seed_c, dq,
                          L, S, D, BH,
                          *_rows(qq), *_rows(qk), *_rows(qv), *_rows(qk_t), *_rows(eo_c), *_outer_rows(dq), rng, n_feat,
                          offsets[0], parts, n_slots, scale),
            dict(common, COLUMNS_NOISE_ALONG_S=columns_noise_along_n(BH, L, S), RANGES=ranges_in_kernel,
                 SUMS=sums_in_kernel, SLOT=slot), dev, tiles)
    tokens = B * L
    flat = dq.as_strided((1, tokens, n_feat), (tokens * n_feat, n_feat, 1), 0) if grads is not None else None
    if grad_ranges is not None and not ranges_in_kernel:      # the packed gradient's ranges, in one pass
        found = _pair_ranges(_matrices(flat), _pair_geometry((1, tokens, n_feat), dev, False), None, None)
        out = grad_ranges.view(torch.float32)
        out[:n_feat] = found[:n_feat]
        out[n_feat:] = found[n_feat + 1: n_feat + 1 + tokens]
    if grad_sums is not None:
        torch.sum(parts if sums_in_kernel else flat[0], 0, dtype=torch.float32, out=grad_sums)
    return dq, dk, dv


def _sum_slot(tiles: Optional[Dict[str, Tile]], device: torch.device, wide: bool, dkdv: str = "dkdv") -> int:
    """The rows of one partial-sum slot of :func:`_gradient_sums`: the smallest block of rows a
    ``dQ`` or ``dK``/``dV`` program (kernel ``dkdv``'s tiles) may cover (every candidate a
    multiple of it)."""
    blocks = []
    for name in ("dq", dkdv):
        tile = _tile_for(name, device, tiles)
        field = _PROGRAMS_ALONG[name].lower()      # "block_m" / "block_n"
        blocks += [getattr(t, field) for t in ([tile] if tile else GPU_TILES[name][wide])]
    slot = min(blocks)
    assert all(b % slot == 0 for b in blocks), blocks
    return slot
