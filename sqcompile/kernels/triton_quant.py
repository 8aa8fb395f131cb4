"""Triton quantizers: symmetric per-tensor / per-row / per-column quantization and ShiftQuant.

The numerics are :mod:`sqcompile.numerics`' (the tests compare bit for bit with nearest
rounding); this module only decides how to walk memory.

Every quantizer sees its input as a 3-D view ``[A, C, L]`` with explicit strides:

* ``C`` indexes the *channels*: one scale (quantize) or one range (ShiftQuant) each;
* ``L`` is the reduced axis the channel's amax runs over;
* ``A`` is an outer axis that is either *kept* (its index is part of the channel:
  ``channel = a * C + c``) or *reduced* like ``L``.

:func:`_plan` maps ``keep_dims`` / ``channel_dims`` onto that view by merging adjacent dims
(size-1 dims are ignored).  The patterns the ops use all map without a copy, including
transposed (``weight.t()``) operands:

==========================================  ============  =====================================
op call                                     pattern       view ``[A, C, L]``
==========================================  ============  =====================================
quantize keep ``[]``                        R             ``[1, 1, numel]`` over the storage
quantize keep ``[0, 1]`` on ``[B, M, K]``   K R           ``[1, B*M, K]`` (per row)
quantize keep ``[0, 2]`` on ``[B, K, N]``   K R K         ``[B, N, K]``, A kept (per column)
quantize keep ``[0]`` on ``[Cout, ...]``    K R           ``[1, Cout, rest]``
shiftquant ``[0, 2]`` on ``[B, M, N]``      K R K         ``[B, N, M]``, A kept
shiftquant ``[0, 1]`` on ``[B, M, N]``      K R           ``[1, B*M, N]``
shiftquant ``[1]`` on ``[N, C, H, W]``      R K R         ``[N, C, H*W]``, A reduced
shiftquant ``[0, 2, 3]`` on ``[N, C, H, W]`` K R K        ``[N, H*W, C]``, A kept
==========================================  ============  =====================================

Anything else (four or more alternating segments, dims that do not merge) is permuted
kept-dims-first and copied once, then handled as ``K R`` -- except by :func:`quantize`, which
first tries to read ``x`` where it lies with an outer axis in two levels
(:func:`_in_place_plan`): the ``[B, H, L, D]`` heads split off a projection, whose ``B`` and
``H`` do not nest in memory, per row (``K K K R``) or per column (``K K R K``), written to the
layout ``empty_like(x)`` gives (what the ops' fake implementations say) or to a given ``out``.

Kernels (one per function, block sizes as ``tl.constexpr``):

* :func:`_quantize_fused_kernel` -- amax and quantization in one program per block of
  channels: rows of up to 8192 contiguous elements are loaded once and kept in registers
  (:func:`_one_tile`); longer ones take two loops over ``L``, the amax, then a re-read of the
  same rows (from L2 on a GPU) to quantize them.  One pass over HBM; used when the batch axis is kept
  and there are enough channel blocks to fill the device (per-row activations, weights).
* :func:`_absmax_kernel` -- one reduction pass; programs split each channel's ``L`` and
  combine their maxima (and the max over channels) with integer atomic maxima on the float
  bits, which is exact in any order.
* :func:`_quantize_kernel` -- the quantize pass after :func:`_absmax_kernel`.
* :func:`_shiftquant_kernel` -- ShiftQuant's group assignment, quantization and expansion
  ``q << (G-1-g)`` in one pass after :func:`_absmax_kernel`.  ShiftQuant needs the
  global range ``R`` before any element can be quantized, so it is always two passes.
* :func:`_absmax_pair_kernel` and :func:`_shiftquant_pair_kernel` -- both ShiftQuants of a
  gradient that feeds two GEMMs (along its columns and along its rows,
  :func:`shiftquant_pair`): one pass for both sets of ranges, one pass quantizing each tile
  both ways, where two separate quantizers take two passes each.
* The same two kernels run ``grad_outer_scale``'s quantizer (:func:`shiftquant_outer`, and
  :func:`shiftquant_pair` with ``outer=True``): the range kernel twice (``OUTER`` 1: each
  row's and column's maximum of the prescaled gradient; 2: the channel ranges of the
  quotients by them), the pair kernel quantizing the quotients it forms in registers and
  writing the scales ``base * r``; for one quantizer only one side runs (``COLS`` / ``ROWS``).
* :func:`_dequantize_kernel` -- ``q * scale`` with broadcasting, written in the output dtype.

Conventions shared with :mod:`sqcompile.numerics`:

* divisions are IEEE round-to-nearest (``tl.math.div_rn``; Triton's ``/`` is approximate on
  CUDA), round-half-to-even is the GPU's ``cvt.rni`` conversion, in the interpreter the
  ``(v + 1.5 * 2**23) - 1.5 * 2**23`` identity (exact for ``|v| < 2**22``; ``v`` is clamped
  to ``[-qmax, qmax]`` first: clamping to integer bounds commutes with rounding), so nearest
  rounding is bit-exact with the reference (:func:`round_half_even`);
* the amax reductions use IEEE ``maximum`` (NaN-propagating, :func:`_max_nan`, on the GPU
  and in the interpreter alike) and take a NaN amax as ``+inf``; a non-finite amax gives a
  NaN scale and zero integers, exactly as the reference;
* ShiftQuant's group ``min(G-1, floor(log2(R / r)))`` is the largest ``j <= G-1`` with
  ``r * 2**j <= R``, read off the difference of the two ranges' float bits (the exponent
  field counts powers of two; denormal ranges are scaled into the normal range first), so
  this is exactly :func:`sqcompile.numerics.shift_groups` without a ``log2`` or ``frexp``.

Stochastic rounding draws 8 random bits per element, ``u = (k + 0.5) / 256`` like
:func:`sqcompile.numerics.uniform_noise` (mean exactly 1/2, so rounding is unbiased to
2**-9 of a step), from one Philox call (``tl.randint4x``: 128 bits) per 16 consecutive
elements along the view's contiguous axis (``L``, or ``C`` where the channels are contiguous
in memory: :attr:`_View.noise_along_c`): Philox per element would make the quantizers
compute-bound on a GPU, and drawn along the other axis the noise would have to be transposed
to the layout of the loaded tile, through shared memory.  The noise of an element is a
function of ``(seed, its position in the [A, C, L] view, which axis is contiguous)`` only, so
it does not depend on block sizes or on which kernel path ran: the fused kernels that
quantize a tensor in registers (the ShiftQuant pair, the fused attention) draw what the
standalone quantizers draw on the tensor in memory.  The seed is drawn on the
device from torch's generator (:func:`draw_seed`) and read by the kernels from memory, so
``torch.manual_seed`` makes runs reproducible, no launch waits on the host, and CUDA-graph
replays draw fresh seeds.  (Counters are 32-bit: tensors beyond 2**36 elements would reuse noise.)
"""
from __future__ import annotations

import functools
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import triton
import triton.language as tl

from .. import numerics as N
from .. import ops
from .triton_ops import _interpret_requested, pair_dims, triton_version

_FLT_MAX = tl.constexpr(3.4028234663852886e38)
_ROUND_MAGIC = tl.constexpr(12582912.0)   # 1.5 * 2**23: (v + M) - M rounds half to even for |v| < 2**22
_NOISE_OFFSET = tl.constexpr(0.001953125)  # 2**-9: half of a noise byte's step (1/256)
_MAX_GRID_YZ = 65535        # CUDA limit on grid dims 1 and 2
# Divisors outside [2**-100, 2**100] are prescaled by 2**+-64 (:func:`_multipliers`);
# ShiftQuant's base scales below 2**-100 or above 2**64 likewise (:func:`_shift_multipliers`).
_SMALL_DIVISOR = tl.constexpr(7.888609052210118e-31)
_LARGE_DIVISOR = tl.constexpr(1.2676506002282294e30)
_LARGE_BASE = tl.constexpr(18446744073709551616.0)                # 2**64
# ShiftQuant's ranges below 2**-62 are scaled by 2**64 before their bits are compared
# (:func:`_shift_group`): every nonzero one is then a normal number.
_SMALL_RANGE = tl.constexpr(2.168404344971009e-19)
_RANGE_PRESCALE = tl.constexpr(18446744073709551616.0)
# Nearest rounding divides with FMAs (:func:`_div_by`) where ``tl.fma`` rounds once: compiled
# kernels, and Triton's interpreter from 3.9 on (3.6's computes ``x * y + z`` in two roundings).
_FMA_DIVISION = tl.constexpr(not _interpret_requested() or triton_version() >= (3, 9))


# --------------------------------------------------------------------------------------------
# Shared device functions (the numerics, written once)
# --------------------------------------------------------------------------------------------

@triton.jit
def _is_finite(x):
    return tl.abs(x) <= _FLT_MAX


@triton.jit
def _abs_nan_as_inf(x):
    """``|x|`` in float32 with NaN mapped to +inf (for per-channel values)."""
    a = tl.abs(x.to(tl.float32))
    return tl.where(a == a, a, float("inf"))


@triton.jit
def _max_nan(a, b):
    """``max(a, b)``, NaN when either is (IEEE 754-2019 ``maximum``): one ``max.NaN`` on a
    GPU, and what Triton's interpreter computes too (a plain ``tl.maximum`` drops NaN on both).
    Max-reductions of ``|x|`` with it are NaN when any value is, so NaN is mapped to +inf
    per channel after the reduction, not per element before it (two instructions an element
    in every range pass and quantizer)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _absmax(x, axis: tl.constexpr):
    """``max |x|`` along ``axis`` in float32, NaN when any value is NaN (:func:`_max_nan`;
    :func:`_scale_of` and :func:`_combine_ranges` map it)."""
    return tl.reduce(tl.abs(x.to(tl.float32)), axis, _max_nan)


@triton.jit
def _scale_of(amax, QMAX: tl.constexpr):
    """numerics.quantize's scale: ``amax / qmax`` (IEEE division), NaN where not finite."""
    scale = tl.math.div_rn(amax, QMAX * 1.0)
    return tl.where(_is_finite(scale), scale, float("nan"))


@triton.jit
def _multipliers(scale):
    """Per-channel ``(divisor, pre, inv)`` for :func:`_quantize_values`: one IEEE division
    per channel, none per element.

    ``divisor`` is the scale, or 1 where the scale is 0 (those values are 0), as
    numerics.quantize_with_scale, times ``pre``: ``2**64`` for divisors below ``2**-100``,
    ``2**-64`` above ``2**100``, else 1, so that the reciprocal ``inv = 1 / divisor``
    (correctly rounded) and every intermediate of :func:`_div_by` stay normal numbers
    (``x * pre`` is exact where it matters: ``|x| <= qmax * scale``, and an ``x`` it makes
    subnormal is below ``2**-60`` scales, which rounds to 0 either way).  Both roundings use
    them: stochastic rounding multiplies by ``inv`` (it cannot match the reference's noise
    anyway), nearest rounding divides exactly with :func:`_div_by`."""
    divisor = tl.where(scale == 0.0, 1.0, scale)
    pre = tl.where(divisor < _SMALL_DIVISOR, 18446744073709551616.0,
                   tl.where(divisor > _LARGE_DIVISOR, 5.421010862427522e-20, 1.0))
    divisor = divisor * pre
    inv = tl.math.div_rn(1.0, divisor)
    return divisor, pre, inv


@triton.jit
def _div_by(a, b, inv):
    """``a / b`` correctly rounded (IEEE ``div.rn``), given ``inv``, the correctly rounded
    ``1 / b``: ``q = a * inv`` is within an ulp of the quotient, the FMA gives its remainder
    ``a - q * b`` exactly, and one more FMA ``q + r * inv`` rounds to the correctly rounded
    quotient (Markstein's theorem; as IA-64 divides).  Holds while nothing under- or
    overflows, which :func:`_multipliers`' ``pre`` ensures for the quotients that matter
    (``|a / b| >= 2**-30``; smaller ones round to 0 either way).  Three FMA-pipe instructions
    per element where ``div_rn`` costs a reciprocal on the special-function unit, a dozen
    more and a slow-path branch: on a GPU the 16-bit per-row quantizer was
    instruction-bound, not memory-bound.  ``tests/test_triton_kernels.py`` checks it
    against torch's division on quotients next to every rounding boundary."""
    q = a * inv
    r = tl.fma(-q, b, a)
    return tl.fma(r, inv, q)


@triton.jit
def _round_magic(v):
    """``v`` (``|v| < 2**22``) rounded half to even, as int32: ``(v + 1.5 * 2**23) - 1.5 * 2**23``
    (three instructions; what Triton's interpreter can run)."""
    return ((v + _ROUND_MAGIC) - _ROUND_MAGIC).to(tl.int32)


@triton.jit
def _round_cvt(v):
    """``v`` rounded half to even, as int32: one ``cvt.rni.s32.f32`` on a GPU, where the
    identity costs three instructions.  Inline PTX: libdevice's ``float2int_rn`` is the same
    instruction, but the call left the ``dK``/``dV`` attention kernel 8 bytes of spills."""
    return tl.inline_asm_elementwise("cvt.rni.s32.f32 $0, $1;", "=r,r", [v], dtype=tl.int32, is_pure=True, pack=1)


# Round half to even to int32: the conversion instruction on a GPU, the magic-number identity
# (the same integers for the clamped quotients it sees) in the interpreter.
round_half_even = _round_magic if type(_round_cvt).__name__ == "InterpretedFunction" else _round_cvt


@triton.jit
def _quantize_values(x, divisor, pre, inv, noise, QMAX: tl.constexpr, STOCHASTIC: tl.constexpr,
                     CVT: tl.constexpr = True):
    """``clamp(round(x / scale), -qmax, qmax)`` as int32 (numerics.quantize_with_scale), with
    the per-channel multipliers of :func:`_multipliers` (broadcast to the tile).

    A quotient is NaN only in a channel whose scale is NaN (a NaN or infinite value makes its
    amax, hence its scale, non-finite), where the reference gives 0: such channels are
    clamped to ``[0, 0]`` (:func:`_quantize_clamped`), so the bound, computed once per
    channel, is the whole NaN handling; no test per element."""
    return _quantize_clamped(x, divisor, pre, inv, tl.where(_is_finite(divisor), QMAX * 1.0, 0.0), noise, STOCHASTIC,
                             CVT)


@triton.jit
def _quantize_clamped(x, divisor, pre, inv, bound, noise, STOCHASTIC: tl.constexpr, CVT: tl.constexpr = True):
    """:func:`_quantize_values` with the clamp's ``bound`` given: ``qmax``, or 0 where the
    divisor is not finite (per channel, or one scalar where the caller knows it for all).

    Clamps before rounding (equivalent for integer bounds, and keeps the rounding identity
    exact); ``tl.minimum`` / ``tl.maximum`` return the other operand for a NaN (PTX ``min`` /
    ``max``, numpy's ``fmin`` / ``fmax`` in the interpreter), so NaN quotients, which only a
    zero bound sees, become 0.  Stochastic rounding adds the noise bytes ``k``
    (:func:`_uniform_noise`) as ``floor(v + (k + 0.5) / 256)``, computed as
    ``floor((v + 2**-9) + k / 256)``: the half-step offset rides on the scaling multiply
    (one FMA, one rounding) and the clamp's bounds move with it (the floor stays within
    ``[-bound, bound]``), so the noise costs one FMA per element, not an add, a multiply and
    an add.  Nearest rounding is :func:`round_half_even`, or with ``CVT`` false the
    magic-number identity on the GPU too (the same integers: for a kernel at the register
    limit whose allocation the conversion instruction happens to upset)."""
    if STOCHASTIC:
        v = tl.fma(x.to(tl.float32) * pre, inv, _NOISE_OFFSET)
        v = tl.minimum(tl.maximum(v, _NOISE_OFFSET - bound), bound + _NOISE_OFFSET)
        return tl.floor(tl.fma(noise, 1.0 / 256.0, v)).to(tl.int32)
    if _FMA_DIVISION:
        v = _div_by(x.to(tl.float32) * pre, divisor, inv)
    else:
        v = tl.math.div_rn(x.to(tl.float32) * pre, divisor)
    v = tl.minimum(tl.maximum(v, -bound), bound)
    if CVT:
        return round_half_even(v)
    return _round_magic(v)


@triton.jit
def _interleave4(w0, w1, w2, w3, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Four ``[ROWS, COLS]`` blocks -> ``[ROWS, 4 * COLS]`` with element ``4j + t`` = ``w_t[j]``."""
    x = tl.join(tl.join(w0, w2), tl.join(w1, w3))          # [ROWS, COLS, 2, 2]
    return tl.reshape(x, (ROWS, 4 * COLS))


@triton.jit
def _bytes_of(w, ROWS: tl.constexpr, COLS: tl.constexpr):
    """uint32 ``[ROWS, COLS]`` -> its bytes as ``[ROWS, 4 * COLS]`` (element ``4j + t``: byte t)."""
    return _interleave4(w & 255, (w >> 8) & 255, (w >> 16) & 255, w >> 24, ROWS, COLS)


@triton.jit
def _uniform_noise(seed, rows, l0, L, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
                   BROADCAST: tl.constexpr = False):
    """The noise bytes ``k`` (0..255, as float32) of the tile ``rows x [l0, l0 + BLOCK_L)``:
    the U[0, 1) noise ``(k + 0.5) / 256`` that :func:`_quantize_values` adds.

    ``rows`` are the tile's logical row ids (the index along the other axis, see
    :func:`_tile_noise`); ``l0`` is a multiple of 16.  One Philox call (128 bits) per 16
    consecutive elements of a row, counter ``row * cdiv(L, 16) + l // 16``.

    Element ``16 j + 4 b + t`` of the tile is byte ``b`` of word ``t`` of call ``j``, put in
    place two ways, the same bytes either way:

    * ``tl.join`` and a reshape (the default): register moves where the tile's layout
      matches, but the L1 norm backward's ``[2, 1024]`` over 8 warps moved them through
      shared memory (23 barriers a tile in its sm_90 code);
    * ``BROADCAST``: each call's words broadcast over its 16 elements and selected per
      element, never through shared memory, but with Triton 3.6 (the H200 machine's) it
      doubled the transposed ShiftQuant pair's code (1640 -> 3576 SASS instructions; ran
      2-3x slower there, 2026-11-30) and added ~8 instructions a score to the attention's
      backward with 3.9.  Only the L1 norm backward takes it.
    """
    G: tl.constexpr = BLOCK_L // 16
    n_groups = (L + 15) // 16
    g = l0 // 16 + tl.arange(0, G)
    ctr = (rows.to(tl.int64)[:, None] * n_groups + g[None, :]).to(tl.uint32)
    r0, r1, r2, r3 = tl.randint4x(seed, ctr)
    if BROADCAST:
        e = tl.arange(0, 16)
        t = (e % 4)[None, None, :]
        shift = ((e // 4) * 8).to(tl.uint32)[None, None, :]
        w = tl.where(t == 0, r0[:, :, None],
                     tl.where(t == 1, r1[:, :, None], tl.where(t == 2, r2[:, :, None], r3[:, :, None])))
        k = tl.reshape((w >> shift) & 255, (BLOCK_C, BLOCK_L))
    else:
        k = _interleave4(_bytes_of(r0, BLOCK_C, G), _bytes_of(r1, BLOCK_C, G), _bytes_of(r2, BLOCK_C, G),
                         _bytes_of(r3, BLOCK_C, G), BLOCK_C, 4 * G)
    return k.to(tl.float32)


@triton.jit
def _tile_noise(seed, a, c0, l0, C, L, ALONG_C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """The noise of the tile ``[c0, c0 + BLOCK_C) x [l0, l0 + BLOCK_L)`` of batch ``a`` of an
    ``[A, C, L]`` view, as ``[BLOCK_C, BLOCK_L]``: 16 elements per Philox call along ``L``, or
    along ``C`` with ``ALONG_C`` (the view's contiguous axis; ``c0`` / ``l0`` multiples of 16
    along it).  Drawn along the axis the tile's registers are laid out along, the transpose
    is a relabelling, not a trip through shared memory."""
    if ALONG_C:
        return tl.trans(_uniform_noise(seed, a * L + l0 + tl.arange(0, BLOCK_L), c0, C, BLOCK_L, BLOCK_C))
    return _uniform_noise(seed, a * C + c0 + tl.arange(0, BLOCK_C), l0, L, BLOCK_C, BLOCK_L)


@triton.jit
def _quantize_tile(x, q_ptrs, mask, divisor, pre, inv, seed_ptr, a, c0, l0, C, L, QMAX: tl.constexpr,
                   STOCHASTIC: tl.constexpr, NOISE_ALONG_C: tl.constexpr, BLOCK_C: tl.constexpr,
                   BLOCK_L: tl.constexpr):
    """Quantize the loaded tile ``x`` (``[c0, ...) x [l0, ...)`` of batch ``a``) with its
    channels' multipliers and store it as int8 at ``q_ptrs``."""
    if STOCHASTIC:
        noise = _tile_noise(tl.load(seed_ptr), a, c0, l0, C, L, NOISE_ALONG_C, BLOCK_C, BLOCK_L)
    else:
        noise = 0.0
    q = _quantize_values(x, divisor[:, None], pre[:, None], inv[:, None], noise, QMAX, STOCHASTIC)
    tl.store(q_ptrs, q.to(tl.int8), mask=mask)


@triton.jit
def _cast_rtne_bits(x, dtype: tl.constexpr):
    """``x.to(dtype)`` with float32 -> bfloat16 rounded to nearest even by integer ops, NaN
    kept NaN (as ``0x7FC0``): the interpreter's
    :func:`cast_rtne`, since Triton's interpreter truncates that cast (and its "rtne" mode
    does not round ties to even)."""
    if dtype == tl.bfloat16:
        u = x.to(tl.float32).to(tl.uint32, bitcast=True)
        u = (u + (((u >> 16) & 1) + 0x7FFF)) >> 16
        u = tl.where(x == x, u, 0x7FC0)
        return u.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


@triton.jit
def _cast_native(x, dtype: tl.constexpr):
    """``x.to(dtype)``: on a GPU float32 -> bfloat16 is one ``cvt.rn`` (to nearest even; two
    values per instruction), NaN as torch's CUDA conversion gives it."""
    return x.to(dtype)


# ``x.to(dtype)`` with torch's rounding (to nearest even) on every backend: the native
# conversion on a GPU, integer ops in the interpreter.  The integer form costs ~8 instructions
# per value where the conversion costs one or half of one (sm_90 SASS), in every kernel that
# writes a 16-bit float: region epilogues round after each op, as eager does.
cast_rtne = _cast_rtne_bits if type(_cast_native).__name__ == "InterpretedFunction" else _cast_native


@triton.jit
def _tile_offsets(a, offs_c, offs_l, stride_a, stride_c, stride_l, INT64: tl.constexpr):
    """Element offsets of the tile ``offs_c x offs_l`` in batch ``a`` of the view; int32
    arithmetic (cheaper) unless the view spans 2**31 elements."""
    if INT64:
        a = a.to(tl.int64)
        offs_c = offs_c.to(tl.int64)
        offs_l = offs_l.to(tl.int64)
    return a * stride_a + offs_c[:, None] * stride_c + offs_l[None, :] * stride_l


@triton.jit
def _outer_offsets(a, offs_c, offs_l, A2, stride_a, stride_a2, stride_c, stride_l, INT64: tl.constexpr):
    """:func:`_tile_offsets` with a two-level outer axis: ``a = a1 * A2 + a2`` lies at
    ``a1 * stride_a + a2 * stride_a2`` (``A2`` is 1, a constant after Triton's specialization,
    for every view but a transposed head split's, :func:`_in_place_plan`)."""
    if INT64:
        a = a.to(tl.int64)
        offs_c = offs_c.to(tl.int64)
        offs_l = offs_l.to(tl.int64)
    return (a // A2) * stride_a + (a % A2) * stride_a2 + offs_c[:, None] * stride_c + offs_l[None, :] * stride_l


@triton.jit
def _q_offsets(x_offs, a, offs_c, offs_l, A2, q_stride_a, q_stride_a2, q_stride_c, q_stride_l, INT64: tl.constexpr,
               SAME_LAYOUT: tl.constexpr):
    """The output's element offsets: the input's (``SAME_LAYOUT``) or at the output's strides."""
    if SAME_LAYOUT:
        return x_offs
    return _outer_offsets(a, offs_c, offs_l, A2, q_stride_a, q_stride_a2, q_stride_c, q_stride_l, INT64)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

@triton.jit
def _quantize_fused_kernel(x_ptr, q_ptr, scale_ptr, C, L, stride_a, stride_c, stride_l, A2, stride_a2, q_stride_a,
                           q_stride_a2, q_stride_c, q_stride_l, seed_ptr, QMAX: tl.constexpr, STOCHASTIC: tl.constexpr,
                           NOISE_ALONG_C: tl.constexpr, INT64: tl.constexpr, SAME_LAYOUT: tl.constexpr,
                           BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, ONE_TILE: tl.constexpr):
    """Per-channel amax + quantize for ``BLOCK_C`` channels of batch ``a`` (A kept).

    Grid: ``(cdiv(C, BLOCK_C), A)``.  ``q`` has ``x``'s strides (``SAME_LAYOUT``) or its own
    (``q_stride_*``); both may split ``A`` in two levels (:func:`_outer_offsets`).
    ``ONE_TILE`` (``BLOCK_L >= L``): the channels are loaded once and stay in registers.
    Otherwise the first loop keeps the rows in L2 (``evict_last``) for the second, which reads
    them for the last time."""
    pid_c = tl.program_id(0)
    a = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    rows = a * C + offs_c
    if ONE_TILE:
        offs_l = tl.arange(0, BLOCK_L)
        mask = mask_c[:, None] & (offs_l < L)[None, :]
        offs = _outer_offsets(a, offs_c, offs_l, A2, stride_a, stride_a2, stride_c, stride_l, INT64)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first")
        scale = _scale_of(_absmax(x, 1), QMAX)
        tl.store(scale_ptr + rows, scale, mask=mask_c)
        divisor, pre, inv = _multipliers(scale)
        q_offs = _q_offsets(offs, a, offs_c, offs_l, A2, q_stride_a, q_stride_a2, q_stride_c, q_stride_l, INT64,
                            SAME_LAYOUT)
        _quantize_tile(x, q_ptr + q_offs, mask, divisor, pre, inv, seed_ptr, a, pid_c * BLOCK_C, 0, C, L, QMAX,
                       STOCHASTIC, NOISE_ALONG_C, BLOCK_C, BLOCK_L)
        return
    acc = tl.zeros((BLOCK_C, BLOCK_L), dtype=tl.float32)      # reduced once, after the loop
    for l0 in range(0, L, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        mask = mask_c[:, None] & (offs_l < L)[None, :]
        x = tl.load(x_ptr + _outer_offsets(a, offs_c, offs_l, A2, stride_a, stride_a2, stride_c, stride_l, INT64),
                    mask=mask, other=0.0, eviction_policy="evict_last")
        acc = _max_nan(acc, tl.abs(x.to(tl.float32)))
    scale = _scale_of(tl.reduce(acc, 1, _max_nan), QMAX)
    tl.store(scale_ptr + rows, scale, mask=mask_c)
    divisor, pre, inv = _multipliers(scale)
    for l0 in range(0, L, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        mask = mask_c[:, None] & (offs_l < L)[None, :]
        offs = _outer_offsets(a, offs_c, offs_l, A2, stride_a, stride_a2, stride_c, stride_l, INT64)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first")
        q_offs = _q_offsets(offs, a, offs_c, offs_l, A2, q_stride_a, q_stride_a2, q_stride_c, q_stride_l, INT64,
                            SAME_LAYOUT)
        _quantize_tile(x, q_ptr + q_offs, mask, divisor, pre, inv, seed_ptr, a, pid_c * BLOCK_C, l0, C, L, QMAX,
                       STOCHASTIC, NOISE_ALONG_C, BLOCK_C, BLOCK_L)


@triton.jit
def _combine_ranges(ranges_ptr, channel, amax, mask, prescale_ptr, PRESCALE: tl.constexpr):
    """Atomic max of the channel maxima ``amax`` (NaN where a value was NaN; times
    ``|prescale|`` when given: exactly the amax of the product, rounding being monotone) into
    the int32 float bits at ``ranges_ptr + channel``, NaN (also from ``inf * 0``) as +inf;
    returns the largest of them, as bits.  Non-negative floats order like their bits, so the
    result is exact in any order."""
    if PRESCALE:
        amax = amax * tl.load(prescale_ptr + channel, mask=mask, other=0.0)
    amax = _abs_nan_as_inf(amax)
    bits = tl.where(mask, amax, 0.0).to(tl.int32, bitcast=True)
    tl.atomic_max(ranges_ptr + channel, bits, mask=mask, sem="relaxed")
    return tl.max(bits, axis=0)


@triton.jit
def _absmax_kernel(x_ptr, ranges_ptr, prescale_ptr, C, L, stride_a, stride_c, stride_l, A2, stride_a2, l_per_split,
                   n_channels, A_KEPT: tl.constexpr, PRESCALE: tl.constexpr, INT64: tl.constexpr, BLOCK_C: tl.constexpr,
                   BLOCK_L: tl.constexpr):
    """Channel amax (NaN as +inf) over ``[split * l_per_split, ...)`` of ``L``, combined across
    programs in ``ranges`` (int32 ``[n_channels + 1]``, zeroed, holding float32 bits) with an
    integer atomic max, times ``|prescale|`` with ``PRESCALE`` (:func:`_combine_ranges`).  The
    last slot gets the max over all channels.

    Grid: ``(cdiv(C, BLOCK_C), n_split, A)``; ``channel = a * C + c`` (A kept) or ``c``; ``A``
    in two levels as :func:`_outer_offsets` reads it."""
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    a = tl.program_id(2)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    l_start = split * l_per_split
    l_end = tl.minimum(l_start + l_per_split, L)
    acc = tl.zeros((BLOCK_C, BLOCK_L), dtype=tl.float32)      # reduced once, after the loop
    for l0 in range(l_start, l_end, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        mask = mask_c[:, None] & (offs_l < l_end)[None, :]
        x = tl.load(x_ptr + _outer_offsets(a, offs_c, offs_l, A2, stride_a, stride_a2, stride_c, stride_l, INT64),
                    mask=mask, other=0.0)
        acc = _max_nan(acc, tl.abs(x.to(tl.float32)))
    amax = tl.reduce(acc, 1, _max_nan)
    if A_KEPT:
        channel = a * C + offs_c
    else:
        channel = offs_c
    top = _combine_ranges(ranges_ptr, channel, amax, mask_c, prescale_ptr, PRESCALE)
    tl.atomic_max(ranges_ptr + n_channels, top, sem="relaxed")


@triton.jit
def _split_tile(n_cblocks, C, A_KEPT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """This program's tile in the split kernels' grid ``(n_cblocks * cdiv(L, BLOCK_L), A)``:
    ``(pid, a, c0, l0, offs_c, offs_l, mask_c, channel)``: its first channel and position,
    their ranges, and ``channel`` the index into the per-channel ranges (``a * C + c`` when
    the outer axis is kept)."""
    pid = tl.program_id(0)
    a = tl.program_id(1)
    c0 = (pid % n_cblocks) * BLOCK_C
    l0 = (pid // n_cblocks) * BLOCK_L
    offs_c = c0 + tl.arange(0, BLOCK_C)
    offs_l = l0 + tl.arange(0, BLOCK_L)
    if A_KEPT:
        channel = a * C + offs_c
    else:
        channel = offs_c
    return pid, a, c0, l0, offs_c, offs_l, offs_c < C, channel


@triton.jit
def _quantize_kernel(x_ptr, q_ptr, range_ptr, scale_ptr, C, L, stride_a, stride_c, stride_l, A2, stride_a2,
                     q_stride_a, q_stride_a2, q_stride_c, q_stride_l, n_cblocks, seed_ptr, QMAX: tl.constexpr,
                     A_KEPT: tl.constexpr, STOCHASTIC: tl.constexpr, NOISE_ALONG_C: tl.constexpr, INT64: tl.constexpr,
                     SAME_LAYOUT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """Quantize one ``[BLOCK_C, BLOCK_L]`` tile with its channels' ranges (from
    :func:`_absmax_kernel`); the first tile of each channel block writes the scales.  The
    layouts as in :func:`_quantize_fused_kernel`.

    Grid: ``(n_cblocks * cdiv(L, BLOCK_L), A)``."""
    pid, a, c0, l0, offs_c, offs_l, mask_c, channel = _split_tile(n_cblocks, C, A_KEPT, BLOCK_C, BLOCK_L)
    scale = _scale_of(tl.load(range_ptr + channel, mask=mask_c, other=0.0), QMAX)
    writer = l0                     # the first tile of each channel block writes the scales
    if not A_KEPT:
        writer += a
    if writer == 0:
        tl.store(scale_ptr + channel, scale, mask=mask_c)
    divisor, pre, inv = _multipliers(scale)
    mask = mask_c[:, None] & (offs_l < L)[None, :]
    offs = _outer_offsets(a, offs_c, offs_l, A2, stride_a, stride_a2, stride_c, stride_l, INT64)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    q_offs = _q_offsets(offs, a, offs_c, offs_l, A2, q_stride_a, q_stride_a2, q_stride_c, q_stride_l, INT64, SAME_LAYOUT)
    _quantize_tile(x, q_ptr + q_offs, mask, divisor, pre, inv, seed_ptr, a, c0, l0, C, L, QMAX, STOCHASTIC,
                   NOISE_ALONG_C, BLOCK_C, BLOCK_L)


@triton.jit
def _shift_group(r, R, GROUPS: tl.constexpr):
    """numerics.shift_groups: ``min(G-1, floor(log2(R / r)))``; zero ranges and non-finite
    ``R`` -> G-1.  For positive normal floats ``r * 2**j <= R`` exactly when the bits satisfy
    ``bits(r) + j * 2**23 <= bits(R)`` (a power of two adds to the exponent field; an
    overflowing ``r * 2**j`` exceeds ``R`` either way), so the group is
    ``min(G-1, (bits(R) - bits(r)) >> 23)``: three integer ops per channel instead of a
    multiply and a compare per rung.  Ranges are first scaled by ``2**64`` (exact) when ``R``
    is below ``2**-62``, which makes every nonzero one normal."""
    f = tl.where(R < _SMALL_RANGE, _RANGE_PRESCALE, 1.0)
    Rb = (R * f).to(tl.int32, bitcast=True)
    rb = (r * f).to(tl.int32, bitcast=True)
    g = tl.minimum((Rb - rb) >> 23, GROUPS - 1)
    g = tl.where(r > 0.0, g, GROUPS - 1)
    return tl.where(_is_finite(R), g, GROUPS - 1)


@triton.jit
def _base_of(R, GROUPS: tl.constexpr, QMAX: tl.constexpr):
    """numerics' base scale ``R / 2**(G-1) / qmax``: the first division a multiplication by
    ``2**-(G-1)`` (both are the correctly rounded ``R * 2**-(G-1)``, subnormal results
    included), the second an IEEE division."""
    return tl.math.div_rn(R * (0.5 ** (GROUPS - 1)), QMAX * 1.0)


@triton.jit
def _pow2(e):
    """``2.0 ** e`` for integer ``e`` in ``[-126, 127]``, exactly (built from its exponent bits)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _shift_multipliers(base, shift):
    """:func:`_multipliers` of the group scales ``base * 2**shift`` (``shift`` in 0..G-1 per
    channel, ``base`` one scalar per quantizer), with one division per program and a few
    integer ops per channel.  ``pre`` is chosen once, from ``base``: ``2**64`` below
    ``2**-100``, ``2**-64`` above ``2**64`` (``base * 2**shift`` then stays within ``2**100``
    for every ``shift`` the groups allow), so every divisor ``base * pre * 2**shift`` and
    reciprocal ``(1 / (base * pre)) * 2**-shift`` is a normal number, exactly a power of two
    times the one correctly rounded division; with all values normal the quotient does not
    depend on the prescale, so this is the per-channel rule's result bit for bit.  A zero
    ``base`` (every range 0, so every value 0) divides by ``2**shift``, as the reference
    divides zero scales by 1; a NaN or infinite one gives NaN or 0 quotients, which the
    quantizer maps to 0, as the reference.  Per-channel work is what a tile replicates in
    every thread holding a channel (a thread of the 64 x 64 pair tile holds 16 columns):
    the earlier per-channel prescales cost ~30 instructions per channel, this 6."""
    b = tl.where(base == 0.0, 1.0, base)
    e_pre = tl.where(b < _SMALL_DIVISOR, 64, tl.where(b > _LARGE_BASE, -64, 0))
    pre = _pow2(e_pre)
    bp = b * pre                                                # exact, a normal number
    inv_bp = tl.math.div_rn(1.0, bp)                            # the one division
    return bp * _pow2(shift), pre, inv_bp * _pow2(-shift)


@triton.jit
def _shift_expand(x, r, R, base, noise, QMAX: tl.constexpr, GROUPS: tl.constexpr, STOCHASTIC: tl.constexpr):
    """ShiftQuant's expanded integers ``q << (G-1-g)`` (int32) of the tile ``x`` whose channels
    have the ranges ``r`` (broadcast along the reduced axis: ``[C, 1]`` or ``[1, C]``): group
    ``g`` from ``r`` and ``R``, quantization with ``s_g = base * 2**(G-1-g)``."""
    shift = (GROUPS - 1) - _shift_group(r, R, GROUPS)
    divisor, pre, inv = _shift_multipliers(base, shift)
    # every group's divisor is finite exactly when the base is (:func:`_shift_multipliers`):
    # one bound for the tile
    bound = tl.where(_is_finite(base), QMAX * 1.0, 0.0)
    return _quantize_clamped(x, divisor, pre, inv, bound, noise, STOCHASTIC) << shift


@triton.jit
def _shiftquant_kernel(x_ptr, e_ptr, range_ptr, rmax_ptr, base_ptr, prescale_ptr, C, L, stride_a, stride_c, stride_l,
                       out_stride_c, out_stride_l, n_cblocks, seed_ptr,
                       QMAX: tl.constexpr, GROUPS: tl.constexpr, A_KEPT: tl.constexpr, STOCHASTIC: tl.constexpr,
                       NOISE_ALONG_C: tl.constexpr, PRESCALE: tl.constexpr, INT64: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """ShiftQuant one tile: group of each channel, quantization with ``s_g = base * 2**(G-1-g)``
    and expansion ``e = q << (G-1-g)`` written in ``e_ptr``'s dtype (int8 or int16), at the
    output strides ``out_stride_c`` / ``out_stride_l`` (``x``'s, or its last two dims swapped
    in memory: see :func:`shiftquant`'s ``transposed``).
    ``PRESCALE``: the tile is first multiplied (float32) by its channels' factors; the
    ranges passed in are already those of the product.

    Grid: ``(n_cblocks * cdiv(L, BLOCK_L), A)``; program (0, 0) writes the base scale."""
    pid, a, c0, l0, offs_c, offs_l, mask_c, channel = _split_tile(n_cblocks, C, A_KEPT, BLOCK_C, BLOCK_L)
    R = tl.load(rmax_ptr)
    base = _base_of(R, GROUPS, QMAX)
    if (pid == 0) & (a == 0):
        tl.store(base_ptr, tl.where(_is_finite(base), base, float("nan")))
    mask = mask_c[:, None] & (offs_l < L)[None, :]
    offs = _tile_offsets(a, offs_c, offs_l, stride_a, stride_c, stride_l, INT64)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if PRESCALE:
        x = x.to(tl.float32) * tl.load(prescale_ptr + channel, mask=mask_c, other=0.0)[:, None]
    if STOCHASTIC:
        noise = _tile_noise(tl.load(seed_ptr), a, c0, l0, C, L, NOISE_ALONG_C, BLOCK_C, BLOCK_L)
    else:
        noise = 0.0
    e = _shift_expand(x, tl.load(range_ptr + channel, mask=mask_c, other=0.0)[:, None], R, base, noise, QMAX,
                      GROUPS, STOCHASTIC)
    out = _tile_offsets(a, offs_c, offs_l, stride_a, out_stride_c, out_stride_l, INT64)
    tl.store(e_ptr + out, e.to(e_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pair_tiles(x, a, offs_m, offs_n, mask_m, mask_n, M, N, A, pc_ptr, pr_ptr, outer_ptr, PRESCALE_C: tl.constexpr,
                PRESCALE_R: tl.constexpr, DIVIDE: tl.constexpr):
    """``(xc, xr)``: the float32 tile as the column quantizer sees it (times its per-column
    prescale) and as the row quantizer sees it (times its per-row prescale).  ``DIVIDE``
    (:func:`shiftquant_outer`): each is then divided (IEEE) by its outer maximum, ``xc`` by
    its row's (the row maxima of ``x * pc``), ``xr`` by its column's (the column maxima of
    ``x * pr``), read from ``outer_ptr`` (float32, :func:`_absmax_pair_kernel`'s layout,
    filled by its ``OUTER == 1`` pass), 0 taken as 1 (:func:`sqcompile.numerics.safe_div_scale`),
    with one IEEE division per row and column and three FMAs per element (:func:`_divide`)."""
    xc = x
    if PRESCALE_C:
        xc = x * tl.load(pc_ptr + a * N + offs_n, mask=mask_n, other=0.0)[None, :]
    xr = x
    if PRESCALE_R:
        xr = x * tl.load(pr_ptr + a * M + offs_m, mask=mask_m, other=0.0)[:, None]
    if DIVIDE:
        dc, prc, ic = _multipliers(tl.load(outer_ptr + A * N + 1 + a * M + offs_m, mask=mask_m, other=1.0))
        dr, prr, ir = _multipliers(tl.load(outer_ptr + a * N + offs_n, mask=mask_n, other=1.0))
        xc = _divide(xc * prc[:, None], dc[:, None], ic[:, None])
        xr = _divide(xr * prr[None, :], dr[None, :], ir[None, :])
    return xc, xr


@triton.jit
def _divide(a, divisor, inv):
    """``a / divisor`` correctly rounded, with :func:`_multipliers`' ``divisor`` and ``inv``
    (``a`` already times its ``pre``): :func:`_div_by` where FMAs round once, else ``div_rn``.
    Exact where it matters: for quotients below ``2**-30`` (which every quantizer rounds to
    0, and which only ever decide a channel's group where it is the last one already),
    and for infinite divisors (a non-finite gradient, whose scales are NaN in any case)."""
    if _FMA_DIVISION:
        return _div_by(a, divisor, inv)
    return tl.math.div_rn(a, divisor)


@triton.jit
def _absmax_pair_kernel(x_ptr, ranges_ptr, pc_ptr, pr_ptr, outer_ptr, M, N, stride_a, stride_m, stride_n, A2,
                        stride_a2, m_per_split, PRESCALE_C: tl.constexpr, PRESCALE_R: tl.constexpr,
                        OUTER: tl.constexpr, COL_MAX: tl.constexpr, ROW_MAX: tl.constexpr, INT64: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Both channel ranges of ``x`` ``[A, M, N]`` from one read (:func:`shiftquant_pair`): the
    column amax (channel ``a * N + n``, over ``m``) and the row amax (channel ``a * M + m``,
    over ``n``), NaN as +inf, each times its ``|prescale|`` when given, combined across
    programs with integer atomic maxima on the float bits (exact in any order) in
    ``ranges`` (int32, zeroed; :func:`_combine_ranges`): ``[A*N]`` column ranges, their max,
    ``[A*M]`` row ranges, their max.  A program owns ``BLOCK_N`` columns over ``m_per_split``
    rows: the column maxima stay in registers over its loop, the row maxima of each tile go
    out by atomics.  ``COL_MAX`` / ``ROW_MAX``: which of the two are computed.

    ``OUTER`` (:func:`shiftquant_outer`'s two range passes, the prescales applied in the
    tile): 1, the outer maxima -- the column maxima of ``x * pr`` (the row quantizer's, one
    per column) and the row maxima of ``x * pc`` (the column quantizer's, one per row); 2,
    the channel ranges of the quotients :func:`_pair_tiles` forms with them (``outer_ptr``).

    Grid: ``(cdiv(N, BLOCK_N), n_split, A)``; ``A`` in two levels as :func:`_outer_offsets`
    reads it."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    a = tl.program_id(2)
    A = tl.num_programs(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    m_start = split * m_per_split
    m_end = tl.minimum(m_start + m_per_split, M)
    rows_ptr = ranges_ptr + A * N + 1
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)      # column maxima, reduced after the loop
    row_max = tl.full((), 0, tl.int32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < m_end
        x = tl.load(x_ptr + _outer_offsets(a, offs_m, offs_n, A2, stride_a, stride_a2, stride_m, stride_n, INT64),
                    mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        if OUTER == 0:
            vc = tl.abs(x)
            vr = vc
        else:
            xc, xr = _pair_tiles(x, a, offs_m, offs_n, mask_m, mask_n, M, N, A, pc_ptr, pr_ptr, outer_ptr,
                                 PRESCALE_C, PRESCALE_R, OUTER == 2)
            if OUTER == 1:
                vc = tl.abs(xr)
                vr = tl.abs(xc)
            else:
                vc = tl.abs(xc)
                vr = tl.abs(xr)
        if COL_MAX:
            acc = _max_nan(acc, vc)
        if ROW_MAX:
            top = _combine_ranges(rows_ptr, a * M + offs_m, tl.reduce(vr, 1, _max_nan), mask_m, pr_ptr,
                                  PRESCALE_R and OUTER == 0)
            row_max = tl.maximum(row_max, top)
    if ROW_MAX:
        tl.atomic_max(rows_ptr + A * M, row_max, sem="relaxed")
    if COL_MAX:
        top = _combine_ranges(ranges_ptr, a * N + offs_n, tl.reduce(acc, 0, _max_nan), mask_n, pc_ptr,
                              PRESCALE_C and OUTER == 0)
        tl.atomic_max(ranges_ptr + A * N, top, sem="relaxed")


@triton.jit
def _pair_base(rmax_ptr, base_ptr, outer_ptr, scale_ptr, index, mask, store_base, store_scales, QMAX: tl.constexpr,
               GROUPS: tl.constexpr, OUTER: tl.constexpr):
    """One quantizer of :func:`_shiftquant_pair_kernel`: ``(R, base)`` from its ranges' max at
    ``rmax_ptr``; ``store_base``: stores the base (NaN where not finite, as numerics) at
    ``base_ptr``; with ``OUTER`` and ``store_scales``, the scales ``base * r`` of the outer
    indices ``index`` (``r`` at ``outer_ptr``, 0 taken as 1) at ``scale_ptr``."""
    R = tl.load(rmax_ptr)
    base = _base_of(R, GROUPS, QMAX)
    stored = tl.where(_is_finite(base), base, float("nan"))
    if store_base:
        tl.store(base_ptr, stored)
    if OUTER:
        if store_scales:
            r = tl.load(outer_ptr + index, mask=mask, other=1.0)
            tl.store(scale_ptr + index, stored * tl.where(r == 0, 1.0, r), mask=mask)
    return R, base


@triton.jit
def _shiftquant_pair_kernel(x_ptr, ec_ptr, er_ptr, ranges_ptr, bc_ptr, br_ptr, pc_ptr, pr_ptr, outer_ptr, sc_ptr, sr_ptr,
                            M, N, stride_a, stride_m, stride_n, er_stride_m, er_stride_n, A2, stride_a2,
                            out_stride_a, ec_stride_m, n_mblocks, seed_c_ptr, seed_r_ptr, QMAX: tl.constexpr,
                            GROUPS: tl.constexpr, STOCHASTIC: tl.constexpr, COLUMNS_NOISE_ALONG_N: tl.constexpr,
                            PRESCALE_C: tl.constexpr, PRESCALE_R: tl.constexpr, OUTER: tl.constexpr,
                            COLS: tl.constexpr, ROWS: tl.constexpr, INT64: tl.constexpr,
                            SAME_LAYOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Both ShiftQuants of one ``[BLOCK_M, BLOCK_N]`` tile of ``x`` ``[A, M, N]``, read once:
    along its columns (channel ``a * N + n``; ``ec`` at ``x``'s strides with ``SAME_LAYOUT``,
    else at ``out_stride_a`` / ``ec_stride_m`` / ``x``'s ``stride_n``) and along its rows
    (channel ``a * M + m``; ``er`` at ``out_stride_a`` / ``er_stride_m`` / ``er_stride_n``,
    ``x``'s or transposed).  ``x``'s ``A`` may lie in two levels (:func:`_outer_offsets`: a
    transposed head split's gradient, read in place).  ``COLS`` / ``ROWS``: which of the two.
    Each is computed exactly as :func:`_shiftquant_kernel` computes it on its own ``[A, C, L]``
    view, noise included (the column quantizer's view is ``[A, N, M]``, the row quantizer's
    ``[A, M, N]``), so the results are the two separate calls' bit for bit
    (``COLUMNS_NOISE_ALONG_N``: the column view's :attr:`_View.noise_along_c`; true unless
    ``M`` or ``N`` is 1, and then both quantizers draw along ``N``, as ``x`` is loaded).  ``ranges``:
    float32 ``[A*N]`` column ranges, their max, ``[A*M]`` row ranges, their max (the layout
    :func:`_absmax_pair_kernel` fills).

    ``OUTER`` (:func:`shiftquant_outer`): each quantizes its tile divided by its outer maxima
    (``outer_ptr``, :func:`_pair_tiles`), and the programs of the first column block (row
    block) write the column quantizer's row scales ``sc = base_c * r`` (the row quantizer's
    column scales ``sr``).

    Grid: ``(n_mblocks * cdiv(N, BLOCK_N), A)``; program (0, 0) writes the two base scales."""
    pid = tl.program_id(0)
    a = tl.program_id(1)
    pid_m = pid % n_mblocks
    pid_n = pid // n_mblocks
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]
    A = tl.num_programs(1)
    rc_ptr = ranges_ptr
    rr_ptr = ranges_ptr + A * N + 1
    x_offs = _outer_offsets(a, offs_m, offs_n, A2, stride_a, stride_a2, stride_m, stride_n, INT64)
    x = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)
    xc, xr = _pair_tiles(x, a, offs_m, offs_n, mask_m, mask_n, M, N, A, pc_ptr, pr_ptr, outer_ptr, PRESCALE_C,
                         PRESCALE_R, OUTER)
    if COLS:
        Rc, base_c = _pair_base(rc_ptr + A * N, bc_ptr, outer_ptr + A * N + 1, sc_ptr, a * M + offs_m, mask_m,
                                (pid == 0) & (a == 0), pid_n == 0, QMAX, GROUPS, OUTER)
        if STOCHASTIC:
            noise_c = tl.trans(_tile_noise(tl.load(seed_c_ptr), a, pid_n * BLOCK_N, pid_m * BLOCK_M, N, M,
                                           COLUMNS_NOISE_ALONG_N, BLOCK_N, BLOCK_M))
        else:
            noise_c = 0.0
        ec = _shift_expand(xc, tl.load(rc_ptr + a * N + offs_n, mask=mask_n, other=0.0)[None, :], Rc,
                           base_c, noise_c, QMAX, GROUPS, STOCHASTIC)
        if SAME_LAYOUT:
            ec_offs = x_offs
        else:
            ec_offs = _tile_offsets(a, offs_m, offs_n, out_stride_a, ec_stride_m, stride_n, INT64)
        tl.store(ec_ptr + ec_offs, ec.to(ec_ptr.dtype.element_ty), mask=mask)
    if ROWS:
        Rr, base_r = _pair_base(rr_ptr + A * M, br_ptr, outer_ptr, sr_ptr, a * N + offs_n, mask_n,
                                (pid == 0) & (a == 0), pid_m == 0, QMAX, GROUPS, OUTER)
        if STOCHASTIC:
            noise_r = _tile_noise(tl.load(seed_r_ptr), a, pid_m * BLOCK_M, pid_n * BLOCK_N, M, N, False, BLOCK_M,
                                  BLOCK_N)
        else:
            noise_r = 0.0
        er = _shift_expand(xr, tl.load(rr_ptr + a * M + offs_m, mask=mask_m, other=0.0)[:, None], Rr,
                           base_r, noise_r, QMAX, GROUPS, STOCHASTIC)
        tl.store(er_ptr + _tile_offsets(a, offs_m, offs_n, out_stride_a, er_stride_m, er_stride_n, INT64),
                 er.to(er_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequantize_kernel(q_ptr, s_ptr, out_ptr, D1, D2, sq0, sq1, sq2, ss0, ss1, ss2, so0, so1, so2, n_blocks2,
                       BLOCK_1: tl.constexpr, BLOCK_2: tl.constexpr):
    """``out = q * s`` over a broadcast 3-D view ``[D0, D1, D2]`` (strides may be 0).

    Grid: ``(cdiv(D1, BLOCK_1) * n_blocks2, D0)``."""
    pid = tl.program_id(0)
    i0 = tl.program_id(1).to(tl.int64)
    offs_1 = (pid // n_blocks2) * BLOCK_1 + tl.arange(0, BLOCK_1)
    offs_2 = (pid % n_blocks2) * BLOCK_2 + tl.arange(0, BLOCK_2)
    mask = (offs_1 < D1)[:, None] & (offs_2 < D2)[None, :]
    o1 = offs_1.to(tl.int64)[:, None]
    o2 = offs_2.to(tl.int64)[None, :]
    q = tl.load(q_ptr + i0 * sq0 + o1 * sq1 + o2 * sq2, mask=mask, other=0)
    s = tl.load(s_ptr + i0 * ss0 + o1 * ss1 + o2 * ss2, mask=mask, other=0.0)
    out = q.to(tl.float32) * s
    tl.store(out_ptr + i0 * so0 + o1 * so1 + o2 * so2, cast_rtne(out, out_ptr.dtype.element_ty), mask=mask)


INTERPRETED = type(_quantize_kernel).__name__ == "InterpretedFunction"
"""Were the kernels defined for Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import)?"""


# --------------------------------------------------------------------------------------------
# Host side: views, tiles, launchers
# --------------------------------------------------------------------------------------------

class _View(NamedTuple):
    """``x`` as ``[A, C, L]`` (see the module docstring); ``perm``: the kept-first permutation
    the work tensor was copied in (``None``: ``work`` is ``x`` or its dense copy)."""

    work: torch.Tensor
    shape: Tuple[int, int, int]
    strides: Tuple[int, int, int]
    a_kept: bool
    perm: Optional[List[int]]
    # :func:`_in_place_plan`'s views only: ``A`` in two levels, ``a = i1 * a2 + i2`` with
    # ``i1`` at ``strides[0]`` and ``i2 < a2`` at ``stride_a2`` (the input's, the output's),
    # and the output's ``(a, c, l)`` strides where they are not the input's.
    a2: int = 1
    stride_a2: Tuple[int, int] = (0, 0)
    out_strides: Optional[Tuple[int, int, int]] = None

    @property
    def n_channels(self) -> int:
        A, C, _ = self.shape
        return A * C if self.a_kept else C

    @property
    def int64(self) -> bool:
        """Do element offsets reach 2**31 (int64 index arithmetic in the kernels)?"""
        A, C, L = self.shape
        if self.out_strides is None:
            return _reaches_2_31(self.shape, self.strides)
        shape = (A // self.a2, self.a2, C, L)
        (sa, sc, sl), (oa, oc, ol) = self.strides, self.out_strides
        return _reaches_2_31(shape, (sa, self.stride_a2[0], sc, sl)) or \
            _reaches_2_31(shape, (oa, self.stride_a2[1], oc, ol))

    def layout_args(self) -> tuple:
        """The quantize kernels' layout arguments after ``C, L``: the input's strides, the
        two-level ``A``, the output's strides (unused where ``SAME_LAYOUT``)."""
        out = self.strides if self.out_strides is None else self.out_strides
        return (*self.strides, self.a2, self.stride_a2[0], out[0], self.stride_a2[1], *out[1:])

    @property
    def noise_along_c(self) -> bool:
        """Are the channels the contiguous axis in memory (``L`` is not)?  Then the kernels load
        tiles laid out along ``C`` and draw stochastic rounding's noise 16 channels at a time
        (the module docstring); otherwise 16 positions of ``L`` at a time."""
        return self.strides[1] == 1 and self.strides[2] != 1


@functools.lru_cache(maxsize=4096)
def _reaches_2_31(shape: Tuple[int, ...], strides: Tuple[int, ...]) -> bool:
    return sum((n - 1) * abs(s) for n, s in zip(shape, strides)) >= 2 ** 31


def _dense(x: torch.Tensor) -> bool:
    """Non-overlapping and dense: some permutation of ``x``'s dims is contiguous."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(x.shape, x.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _merge(x: torch.Tensor, dims: Sequence[int]) -> Optional[Tuple[int, int]]:
    """(size, stride) of ``dims`` (adjacent among the non-size-1 dims) merged into one, or
    ``None`` when their strides do not nest."""
    size, stride = x.shape[dims[-1]], x.stride(dims[-1])
    for d in reversed(dims[:-1]):
        if x.stride(d) != stride * size:
            return None
        size *= x.shape[d]
    return size, stride


def _plan(x: torch.Tensor, keep_dims: Sequence[int], in_place: bool = False,
          out_strides: Optional[Tuple[int, ...]] = None) -> _View:
    """``x`` as its ``[A, C, L]`` view; ``in_place``: where that view would take a copy, read
    ``x`` where it lies if :func:`_in_place_plan` can (the quantize kernels only), and with
    ``out_strides`` (an output's layout other than ``empty_like(x)``'s) always try that."""
    nd = x.dim()
    if out_strides is not None and (not _dense(x) or tuple(out_strides) != tuple(x.stride())):
        view = _in_place_plan(x, {d % nd for d in keep_dims}, out_strides)
        if view is not None:
            return view
    view = _dense_plan(x, keep_dims)
    if in_place and (view.perm is not None or view.work.stride() != x.stride()):
        return _in_place_plan(x, {d % nd for d in keep_dims}) or view
    return view


def _in_place_plan(x: torch.Tensor, keep: set, out_strides: Optional[Tuple[int, ...]] = None) -> Optional[_View]:
    """A view of ``x`` read where it lies, written to an output at ``out_strides`` (default
    ``empty_like(x)``'s: ``x``'s own when it is dense, else dense in the order of ``x``'s
    strides), with ``A`` in up to two levels, or ``None``.  Adjacent dims merge where they
    nest in both layouts, then::

        K K K R  ->  A = (K, K) kept, C = K, L = R    per row of [B, H, L, D] heads split
        K K R K  ->  A = (K, K) kept, C = K, L = R    per column of the same
        K K R    ->  A = K kept, C = K, L = R
        K R K, K R, R K  as :func:`_plan`

    The head split of a ``[B, L, H*D]`` projection, ``.view(B, L, H, D).transpose(1, 2)`` (or
    the q/k/v slices of a fused ``qkv`` projection) is ``[B, H, L, D]`` with ``B`` and ``H``
    not nesting: the copy the other views take of it reads and writes the whole tensor once
    more before the quantizer reads it.  The noise of stochastic rounding is that of the same
    ``[A, C, L]`` view of a contiguous copy wherever the contiguous axis is the same."""
    out = torch.empty_like(x) if out_strides is None else torch.empty_strided(x.shape, out_strides, device="meta")
    groups: List[List] = []       # [kept, size, x stride, out stride]
    for d in range(x.dim()):
        size = x.shape[d]
        if size == 1:
            continue
        kept, xs, os_ = d in keep, x.stride(d), out.stride(d)
        last = groups[-1] if groups else None
        if last and last[0] == kept and last[2] == xs * size and last[3] == os_ * size:
            last[1:] = [last[1] * size, xs, os_]
        else:
            groups.append([kept, size, xs, os_])
    pattern = "".join("K" if g[0] else "R" for g in groups)
    outer = None
    if pattern in ("KKKR", "KKRK"):
        outer, inner, *rest = groups
        c, l = rest if pattern == "KKKR" else rest[::-1]
    elif pattern in ("KKR", "KRK"):
        inner, *rest = groups
        c, l = rest if pattern == "KKR" else rest[::-1]
    elif pattern in ("KR", "RK"):
        c, l = groups if pattern == "KR" else groups[::-1]
        return _View(x, (1, c[1], l[1]), (0, c[2], l[2]), False, None, out_strides=(0, c[3], l[3]))
    else:
        return None
    if outer is None:
        return _View(x, (inner[1], c[1], l[1]), (inner[2], c[2], l[2]), True, None, out_strides=(inner[3], c[3], l[3]))
    return _View(x, (outer[1] * inner[1], c[1], l[1]), (outer[2], c[2], l[2]), True, None, a2=inner[1],
                 stride_a2=(inner[2], inner[3]), out_strides=(outer[3], c[3], l[3]))


def _dense_plan(x: torch.Tensor, keep_dims: Sequence[int]) -> _View:
    nd = x.dim()
    keep = {d % nd for d in keep_dims} if nd else set()
    if not _dense(x):       # walk a dense copy laid out as empty_like(x), the outputs' layout
        x = torch.empty_like(x)
    dims = [d for d in range(nd) if x.shape[d] != 1]
    if not any(d in keep for d in dims):
        # One scale for the whole tensor: walk the (dense) storage flat.  Outputs made with
        # empty_like(x) have the same strides, hence the same flat order.
        return _View(x, (1, 1, x.numel()), (0, 0, 1), False, None)
    segments: List[Tuple[bool, List[int]]] = []
    for d in dims:
        if segments and segments[-1][0] == (d in keep):
            segments[-1][1].append(d)
        else:
            segments.append((d in keep, [d]))
    merged = [_merge(x, ds) for _, ds in segments]
    if len(segments) > 3 or any(m is None for m in merged):
        kept = [d for d in range(nd) if d in keep]
        perm = kept + [d for d in range(nd) if d not in keep]
        view = _dense_plan(x.permute(perm).contiguous(), range(len(kept)))
        return view._replace(perm=perm)
    pattern = "".join("K" if k else "R" for k, _ in segments)
    (s0, t0), *rest = merged
    if pattern == "K":
        return _View(x, (1, s0, 1), (0, t0, 1), False, None)
    (s1, t1), = rest[:1]
    if pattern == "KR":
        return _View(x, (1, s0, s1), (0, t0, t1), False, None)
    if pattern == "RK":
        return _View(x, (1, s1, s0), (0, t1, t0), False, None)
    (s2, t2), = rest[1:]
    if pattern == "KRK":
        return _View(x, (s0, s2, s1), (t0, t2, t1), True, None)
    return _View(x, (s0, s1, s2), (t0, t1, t2), False, None)   # "RKR"


def _restore(view: _View, out_work: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The kernels' output in ``x``'s shape (and strides, as ``empty_like(x)`` gives them)."""
    if view.perm is None:
        return out_work
    out = torch.empty_like(x, dtype=out_work.dtype)
    inverse = [0] * len(view.perm)
    for i, d in enumerate(view.perm):
        inverse[d] = i
    out.copy_(out_work.permute(inverse))
    return out


class _Tile(NamedTuple):
    block_c: int
    block_l: int
    num_warps: int


def _tile(view: _View) -> _Tile:
    """Tile shape: 4096 elements on a GPU, long along whichever axis is contiguous in memory
    (so loads coalesce); smaller in the interpreter, where every element costs CPU time.
    The contiguous axis's block stays a multiple of 16 (the noise is drawn 16 elements at a
    time along it).

    Measured on an H200 (8192 x 8192 bf16, one of several sweeps): rows of 2 x 2048 with 4
    warps beat 4 x 1024 by ~20% for per-row quantization; channel-contiguous views do best
    at 128 x 32 with 4 warps; the per-tensor walk at 4096 with 8 warps."""
    _, C, L = view.shape
    total = 512 if INTERPRETED else 4096
    np2_c, np2_l = next_power_of_2(C), next_power_of_2(L)
    if C == 1:                                   # one scale for the tensor: long 1-D tiles
        return _Tile(1, max(16, min(np2_l, total)), 4 if INTERPRETED else 8)
    if view.noise_along_c:                       # channels contiguous: wide along C
        block_c = max(16, min(32 if INTERPRETED else 128, np2_c))
        return _Tile(block_c, max(16, min(np2_l, total // block_c)), 4)
    block_l = max(16, min(np2_l, total // 2))    # reduced axis contiguous (rows): 2 x 2048
    return _Tile(max(1, min(np2_c, total // block_l)), block_l, 4)


def _one_tile(view: _View) -> Optional[_Tile]:
    """A tile holding whole channels (``block_l >= L``), for rows contiguous along ``L`` up to
    :data:`ONE_TILE_MAX` elements: the one-pass kernel then reads each element once, from
    registers, instead of twice (the second time from L2, which still costs bandwidth)."""
    _, C, L = view.shape
    if view.strides[2] != 1 or L > ONE_TILE_MAX or C == 1:
        return None
    block_l = max(16, next_power_of_2(L))
    total = 512 if INTERPRETED else 4096
    return _Tile(max(1, min(next_power_of_2(C), total // block_l)), block_l, 8 if block_l >= 8192 else 4)


# Longest row a one-tile program holds (8192: 32 values per thread with 8 warps); small in
# the interpreter, so its tests run both kernels' paths.
ONE_TILE_MAX = 64 if INTERPRETED else 8192


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for the launchers.  ``triton.cdiv`` (like ``triton.next_power_of_2``) is
    a constexpr function whose host-side wrapper costs ~3 us a call, and the launchers of a
    quantizer made half a dozen such calls, on the path that bounds a GPU step without CUDA
    graphs."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` (1 for ``n <= 1``), as :func:`cdiv`, without the wrapper."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


@functools.lru_cache(maxsize=None)
def _device_programs(device: torch.device, per_sm: int = 4) -> int:
    """How many programs keep the device busy (``per_sm`` per multiprocessor: a few waves);
    4 in the interpreter, so the tests exercise several splits."""
    if INTERPRETED or device.type != "cuda":
        return 4
    return per_sm * torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=4096)
def _cached_plan(shape: Tuple[int, ...], strides: Tuple[int, ...], dims: Tuple[int, ...],
                 in_place: bool = False, out_strides: Optional[Tuple[int, ...]] = None
                 ) -> Tuple[_View, _Tile, Optional[_Tile]]:
    """:func:`_plan`, :func:`_tile` and :func:`_one_tile` for a layout, worked out once on a
    meta tensor (the host side of a launch is what bounds small quantizers on a GPU)."""
    view = _plan(torch.empty_strided(shape, strides, device="meta"), dims, in_place, out_strides)
    return view, _tile(view), _one_tile(view)


def _view_and_tile(x: torch.Tensor, dims: Sequence[int], in_place: bool = False,
                   out_strides: Optional[Tuple[int, ...]] = None) -> Tuple[_View, _Tile, Optional[_Tile]]:
    """``x`` as its ``[A, C, L]`` view (copied where the cached plan copies), its tile and its
    one-tile tile (``None`` where rows do not fit one)."""
    view, tile, one = _cached_plan(tuple(x.shape), tuple(x.stride()), tuple(dims), in_place, out_strides)
    if view.out_strides is not None:
        work = x
    elif view.perm is not None:
        work = x.permute(view.perm).contiguous()
    elif view.work.stride() != x.stride():      # not dense: the plan walks a dense copy
        work = torch.empty_like(x).copy_(x)
    else:
        work = x
    return view._replace(work=work), tile, one


def draw_seed(device: torch.device) -> torch.Tensor:
    """A Philox seed (int64 ``[1]`` in ``[0, 2**31 - 1)``) drawn *on* ``device`` from torch's
    generator for it: ``torch.manual_seed`` reproduces it, nothing waits on the device, and
    under CUDA-graph capture each replay draws a new seed (torch's CUDA generator is
    graph-safe), so stochastic rounding stays stochastic in captured graphs."""
    return N.draw_seed(device, (1,))


def _seed_arg(seed: Union[None, int, torch.Tensor], stochastic: bool, device: torch.device,
              placeholder: torch.Tensor) -> torch.Tensor:
    """The kernels' ``seed_ptr``: a drawn or given seed; for nearest rounding any tensor
    (``placeholder``): the kernels compile the load away."""
    if not stochastic:
        return placeholder
    if seed is None:
        return draw_seed(device)
    if isinstance(seed, torch.Tensor):
        return seed.to(device=device, dtype=torch.int64).reshape(1)
    return torch.tensor([seed], dtype=torch.int64, device=device)


def _check_grid(view: _View) -> None:
    if view.shape[0] > _MAX_GRID_YZ:
        raise ValueError(f"triton quantizers: outer extent {view.shape[0]} exceeds the grid limit {_MAX_GRID_YZ}")


def channel_ranges(view: _View, tile: _Tile,
                   prescale: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(ranges, rmax)``: the per-channel amax of the view (float32 ``[n_channels]``, NaN as
    +inf; times ``|prescale|`` per channel when given, a float32 ``[n_channels]`` in the view's
    channel order) and their max (a 0-d tensor), from one pass and one zero fill."""
    A, C, L = view.shape
    grid, l_per_split = _range_grid(view.shape, tile, view.work.device)
    bits = torch.zeros(view.n_channels + 1, dtype=torch.int32, device=view.work.device)
    _absmax_kernel[grid](
        view.work, bits, bits if prescale is None else prescale, C, L, *view.strides, view.a2, view.stride_a2[0],
        l_per_split, view.n_channels,
        A_KEPT=view.a_kept, PRESCALE=prescale is not None, INT64=view.int64, BLOCK_C=tile.block_c,
        BLOCK_L=tile.block_l, num_warps=tile.num_warps)
    ranges = bits.view(torch.float32)
    return ranges[:-1], ranges[-1]


@functools.lru_cache(maxsize=4096)
def _range_grid(shape: Tuple[int, int, int], tile: _Tile, device: torch.device) -> Tuple[Tuple[int, int, int], int]:
    """:func:`_absmax_kernel`'s grid and ``l_per_split`` for a view shape: enough programs to
    fill the device, each channel's ``L`` split between them."""
    A, C, L = shape
    n_cblocks = cdiv(C, tile.block_c)
    n_lblocks = cdiv(L, tile.block_l)
    n_split = max(1, min(n_lblocks, _device_programs(device) // max(1, A * n_cblocks)))
    l_per_split = cdiv(n_lblocks, n_split) * tile.block_l
    return (n_cblocks, cdiv(L, l_per_split), A), l_per_split


def _use_fused(view: _View, tile: _Tile) -> bool:
    """One-pass kernel when each program can own whole channels: the batch axis is kept,
    there are several channels, and enough channel blocks to fill the device."""
    A, C, L = view.shape
    if C == 1 or (A > 1 and not view.a_kept):
        return False
    return A * cdiv(C, tile.block_c) >= _device_programs(view.work.device) // 4 and L <= 2 ** 16


def quantize(x: torch.Tensor, bits: int, keep_dims: Sequence[int], stochastic: bool, *,
             seed: Union[None, int, torch.Tensor] = None, fused: Optional[bool] = None,
             out: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`sqcompile.numerics.quantize` on Triton: ``(q int8 like x, scale float32)``.

    ``x`` is read where it lies wherever :func:`_in_place_plan` maps it (a transposed head
    split ``[B, H, L, D]`` included), else copied first.  ``q`` has ``empty_like(x)``'s
    layout, or is ``out`` (an int8 tensor shaped like ``x``, any strides) when given.
    ``seed``: Philox seed for stochastic rounding, an int or a device tensor (default:
    :func:`draw_seed`); ``fused``:
    force (True) or forbid (False) the one-pass kernel (default: :func:`_use_fused`)."""
    qmax = N.qmax(bits)
    scale_shape = ops._scale_shape(x, keep_dims)
    if x.numel() == 0:   # nothing to launch; the reference handles the degenerate shapes
        q, scale = N.quantize(x, bits, keep_dims, "stochastic" if stochastic else "nearest")
        return (q if out is None else out.copy_(q)), scale
    view, tile, one = _view_and_tile(x, keep_dims, True, None if out is None else tuple(out.stride()))
    _check_grid(view)
    if out is not None and view.out_strides is None and (view.perm is not None or out.stride() != view.work.stride()):
        q, scale = quantize(x, bits, keep_dims, stochastic, seed=seed, fused=fused)    # no view writes out
        return out.copy_(q), scale
    # x's layout (:func:`_in_place_plan`), the work copy's, or the given one
    q = torch.empty_like(view.work, dtype=torch.int8) if out is None else out
    scale = torch.empty(view.n_channels, dtype=torch.float32, device=x.device)
    seed = _seed_arg(seed, stochastic, x.device, scale)
    A, C, L = view.shape
    if fused is None:
        fused = _use_fused(view, tile)
    if fused and (A == 1 or view.a_kept):
        tile = one or tile
        _quantize_fused_kernel[(cdiv(C, tile.block_c), A)](
            view.work, q, scale, C, L, *view.layout_args(), seed, QMAX=qmax, STOCHASTIC=stochastic,
            NOISE_ALONG_C=view.noise_along_c, INT64=view.int64, SAME_LAYOUT=view.out_strides is None,
            BLOCK_C=tile.block_c, BLOCK_L=tile.block_l,
            ONE_TILE=one is not None, num_warps=tile.num_warps)
    else:
        ranges = channel_ranges(view, tile)[0]
        n_cblocks = cdiv(C, tile.block_c)
        _quantize_kernel[(n_cblocks * cdiv(L, tile.block_l), A)](
            view.work, q, ranges, scale, C, L, *view.layout_args(), n_cblocks, seed, QMAX=qmax, A_KEPT=view.a_kept,
            STOCHASTIC=stochastic, NOISE_ALONG_C=view.noise_along_c, INT64=view.int64,
            SAME_LAYOUT=view.out_strides is None, BLOCK_C=tile.block_c,
            BLOCK_L=tile.block_l, num_warps=tile.num_warps)
    return _restore(view, q, x), scale.reshape(scale_shape)


def shiftquant(x: torch.Tensor, bits: int, groups: int, channel_dims: Sequence[int], stochastic: bool, *,
               seed: Union[None, int, torch.Tensor] = None,
               prescale: Optional[torch.Tensor] = None, ranges: Optional[torch.Tensor] = None,
               transposed: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`sqcompile.numerics.shiftquant` on Triton: ``(expanded like x, base scale)``.

    ``expanded`` is int8 when :func:`sqcompile.numerics.fits_int8` else int16; the base scale
    is a float32 scalar tensor, NaN when the input holds NaN or Inf.  ``prescale`` (one factor
    per channel) is applied in registers: the ranges of ``x * prescale`` are ``x``'s ranges
    times ``|prescale|`` exactly (rounding is monotone and symmetric), so neither pass reads
    more than ``x``.  ``ranges``: ``x``'s channel ranges (``max |x|`` per channel, NaN as
    +inf, float32, row-major over the channel dims) when the producer of ``x`` computed them
    (a fused GEMM region's epilogue): the range pass is skipped.  ``transposed``: ``expanded``
    is stored with its last two dims swapped in memory (``.mT`` is contiguous), for a GEMM
    that reads it transposed and wants its reduction dim contiguous (a Linear's ``dW``
    gradient, attention's ``dS`` for ``dK``); only for a contiguous ``x`` ``[..., M, N]``
    with one channel per row of each matrix, else ``ValueError``."""
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    qmax = N.qmax(bits)
    if x.numel() == 0:
        r = N.shiftquant(x, bits, groups, channel_dims, "stochastic" if stochastic else "nearest", prescale=prescale)
        return r.expanded, r.base_scale
    edtype = N.expanded_dtype(bits, groups)
    view, tile, _ = _view_and_tile(x, channel_dims)
    _check_grid(view)
    qtile = tile
    if transposed:
        why = transposed_unsupported(x, channel_dims)
        if why:
            raise ValueError(f"shiftquant(transposed=True): {why}")
        qtile = _TRANSPOSED_TILE
    prescale = _prescale_vector(x, prescale, channel_dims)
    if ranges is None:
        ranges, rmax = channel_ranges(view, tile, prescale)
    else:
        ranges, rmax = _given_ranges(ranges, view.n_channels, prescale)
    A, C, L = view.shape
    if transposed:       # [A, M, N] stored [A, N, M]: element (a, m, n) at a * M * N + n * M + m
        view = _matrices(x)
        A, C, L = view.shape
        e = _transposed_empty(x, edtype)
        out_strides = (1, C)
    else:
        e = torch.empty_like(view.work, dtype=edtype)
        out_strides = view.strides[1:]
    base = torch.empty((), dtype=torch.float32, device=x.device)
    seed = _seed_arg(seed, stochastic, x.device, base)
    n_cblocks = cdiv(C, qtile.block_c)
    _shiftquant_kernel[(n_cblocks * cdiv(L, qtile.block_l), A)](
        view.work, e, ranges, rmax, base, ranges if prescale is None else prescale, C, L, *view.strides,
        *out_strides, n_cblocks, seed, QMAX=qmax, GROUPS=groups, A_KEPT=view.a_kept, STOCHASTIC=stochastic,
        NOISE_ALONG_C=view.noise_along_c, PRESCALE=prescale is not None, INT64=view.int64, BLOCK_C=qtile.block_c,
        BLOCK_L=qtile.block_l, num_warps=qtile.num_warps)
    return (e if transposed else _restore(view, e, x)), base


def _prescale_vector(x: torch.Tensor, prescale: Optional[torch.Tensor],
                     channel_dims: Sequence[int]) -> Optional[torch.Tensor]:
    """ShiftQuant's prescale as one float32 factor per channel, in the views' channel order
    (row-major over the kept dims).  The usual prescale (a GEMM operand's float32 scales,
    shaped like the channels) is only viewed: this runs on every backward ShiftQuant."""
    if prescale is None:
        return None
    shape = ops._scale_shape(x, channel_dims)
    if list(prescale.shape) != shape:
        N.check_prescale(x, prescale, channel_dims)
        prescale = prescale.expand(shape)
    if prescale.dtype != torch.float32 or prescale.device != x.device:
        prescale = prescale.to(device=x.device, dtype=torch.float32)
    return prescale.reshape(-1).contiguous()


def _given_ranges(ranges: torch.Tensor, n_channels: int,
                  prescale: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(ranges, rmax)`` from ranges a producer computed (times ``|prescale|``, exact)."""
    if ranges.numel() != n_channels:
        raise ValueError(f"shiftquant: {ranges.numel()} given ranges for {n_channels} channels")
    ranges = ranges.reshape(-1).to(torch.float32)
    if prescale is not None:
        ranges = ranges * prescale.abs()
    return ranges, ranges.amax()


def _transposed_empty(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized tensor shaped like ``x`` whose last two dims are swapped in memory
    (``.mT`` is contiguous): the output layout of the transposed ShiftQuant stores."""
    return torch.empty_like(x.mT, dtype=dtype, memory_format=torch.contiguous_format).mT


def _matrices(x: torch.Tensor) -> _View:
    """A contiguous ``[..., M, N]`` tensor as ``[A, M, N]`` with the batch kept: channel
    ``a * M + m`` and the noise of each element are those of the ``[1, A*M, N]`` view that
    :func:`_plan` makes for per-row channels, so kernels may use either."""
    M, N_ = x.shape[-2:]
    A = x.numel() // max(1, M * N_)
    if A > _MAX_GRID_YZ:
        raise ValueError(f"triton quantizers: {A} matrices exceed the grid limit {_MAX_GRID_YZ}")
    return _View(x, (A, M, N_), (M * N_, N_, 1), True, None)


# Square tiles when the store runs along the other dim than the load: rows of 64 loaded
# (128 bytes of bf16), columns of 64 stored; Triton converts between the two layouts.
_TRANSPOSED_TILE = _Tile(16, 16, 4) if INTERPRETED else _Tile(64, 64, 4)


def transposed_unsupported(x: torch.Tensor, channel_dims: Sequence[int]) -> Optional[str]:
    """Why :func:`shiftquant` cannot store ``x``'s expanded form transposed (``None``: it can):
    ``x`` must be a contiguous ``[..., M, N]`` tensor and its channels the rows of each matrix
    (every dim but the last; dims of size 1 may be left out)."""
    if x.dim() < 2 or not x.is_contiguous():
        return f"x must be a contiguous [..., M, N] tensor, got shape {tuple(x.shape)} strides {tuple(x.stride())}"
    nd = x.dim()
    kept = {d % nd for d in channel_dims}
    if nd - 1 in kept or any(d not in kept and x.shape[d] != 1 for d in range(nd - 1)):
        return f"channel_dims {list(channel_dims)} are not one channel per row"
    return None


def pair_unsupported(x: torch.Tensor) -> Optional[str]:
    """Why :func:`shiftquant_pair` cannot take ``x`` (``None``: it can)."""
    if x.dim() < 2 or not x.is_contiguous():
        return f"x must be a contiguous [..., M, N] tensor, got shape {tuple(x.shape)} strides {tuple(x.stride())}"
    if x.numel() // max(1, x.shape[-2] * x.shape[-1]) > _MAX_GRID_YZ:
        return f"{x.numel() // (x.shape[-2] * x.shape[-1])} matrices exceed the grid limit {_MAX_GRID_YZ}"
    return None


def shiftquant_pair(x: torch.Tensor, bits: int, groups: int, stochastic: bool, *,
                    seeds: Tuple[Union[None, int, torch.Tensor], Union[None, int, torch.Tensor]] = (None, None),
                    prescales: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]] = (None, None),
                    ranges: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]] = (None, None),
                    rows_transposed: bool = False,
                    outer: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both ShiftQuants of a gradient that feeds two GEMMs, from one read of it per pass:
    ``x`` ``[..., M, N]`` along its columns and along its rows (:func:`~sqcompile.kernels.triton_ops.pair_dims`), as
    ``(e_cols, base_cols, e_rows, base_rows)``.

    A Linear's output gradient ``dY`` is quantized along its columns for ``dX = dY W`` and
    along its rows for ``dW = dY^T X``; attention's ``dS`` along its columns for ``dQ = dS K``
    and along its rows for ``dK = dS^T Q``.  Two :func:`shiftquant` calls read ``x`` four
    times (two range passes, two quantize passes); this reads it twice (one pass computes
    both sets of ranges, one quantizes both ways), or once when the producer gave both
    ``ranges``.  Each result is bit for bit what :func:`shiftquant` returns for its channel
    dims with the same ``seeds`` / ``prescales`` / ``ranges`` entry (``rows_transposed`` as
    its ``transposed``); seeds left ``None`` are drawn, columns first.
    ``x`` must be contiguous (:func:`pair_unsupported`, else ``ValueError``), or (the fused
    attention's ``dO``) ``[B, H, M, N]`` with ``N`` contiguous and any other strides, read
    where it lies; the results are then contiguous (``e_rows`` transposed).

    ``outer=True``: the two :func:`shiftquant_outer` of ``x`` instead, ``(e_cols, s_cols,
    e_rows, s_rows)`` with their outer scales (``[..., M, 1]`` and ``[..., 1, N]``), bit for
    bit the two separate calls, from three reads of ``x`` (``ranges`` must be left ``None``)."""
    heads = x.dim() == 4 and not x.is_contiguous() and x.stride(-1) == 1 and x.numel() > 0
    why = None if heads else pair_unsupported(x)
    if why:
        raise ValueError(f"shiftquant_pair: {why}")
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    if outer and (ranges[0] is not None or ranges[1] is not None):
        raise ValueError("shiftquant_pair: ranges cannot be given with outer=True (they are those of x / its outer maxima)")
    dims = pair_dims(x.dim())
    if x.numel() == 0:
        if outer:
            return (*shiftquant_outer(x, bits, groups, dims[0], dims[1], stochastic, prescale=prescales[0]),
                    *shiftquant_outer(x, bits, groups, dims[1], dims[0], stochastic, prescale=prescales[1]))
        return (*shiftquant(x, bits, groups, dims[0], stochastic, prescale=prescales[0]),
                *shiftquant(x, bits, groups, dims[1], stochastic, prescale=prescales[1]))
    if heads:   # [A, M, N] with A = B * H in two levels; written contiguous
        B, H, M, N_ = x.shape
        view = _View(x, (B * H, M, N_), (x.stride(0), x.stride(2), 1), True, None, a2=H,
                     stride_a2=(x.stride(1), 0), out_strides=(M * N_, N_, 1))
        if B * H > _MAX_GRID_YZ:
            raise ValueError(f"shiftquant_pair: {B * H} matrices exceed the grid limit {_MAX_GRID_YZ}")
    else:
        view = _matrices(x)
    return _pair(x, view, bits, groups, stochastic, seeds, prescales, ranges, rows_transposed, outer, (True, True))


def _pair(x: torch.Tensor, view: _View, bits: int, groups: int, stochastic: bool, seeds, prescales, ranges,
          rows_transposed: bool, outer: bool, sides: Tuple[bool, bool]) -> tuple:
    """The launches of :func:`shiftquant_pair` (both ``sides``) and :func:`shiftquant_outer`
    (one side: ``(e, scale)`` of the columns or of the rows; the other side's outputs are
    neither allocated nor written)."""
    A, M, N_ = view.shape
    cols, rows = sides
    dims = pair_dims(x.dim())
    pre_c, pre_r = (_prescale_vector(x, p, d) if side else None for p, d, side in zip(prescales, dims, sides))
    base_c, base_r = (torch.empty((), dtype=torch.float32, device=x.device) for _ in range(2))
    seed_c = _seed_arg(seeds[0], stochastic and cols, x.device, base_c)     # drawn as two separate calls draw them
    seed_r = _seed_arg(seeds[1], stochastic and rows, x.device, base_r)
    geometry = _pair_geometry(view.shape, x.device, rows_transposed)
    outer_maxima = base_c
    if outer:
        outer_maxima = _pair_ranges(view, geometry, pre_c, pre_r, 1, (rows, cols))
        ranges = _pair_ranges(view, geometry, pre_c, pre_r, 2, sides, outer_maxima)
    elif ranges[0] is None or ranges[1] is None:
        ranges = _pair_ranges(view, geometry, pre_c, pre_r, 0, sides)
    else:
        (rc, rcmax), (rr, rrmax) = _given_ranges(ranges[0], A * N_, pre_c), _given_ranges(ranges[1], A * M, pre_r)
        ranges = torch.cat([rc, rcmax.reshape(1), rr, rrmax.reshape(1)])
    edtype = N.expanded_dtype(bits, groups)
    heads = view.out_strides is not None     # read where it lies, written contiguous (one head too)

    def expanded() -> torch.Tensor:       # at x's strides, contiguous for heads read in place
        return torch.empty(x.shape, dtype=edtype, device=x.device) if heads else torch.empty_like(x, dtype=edtype)
    e_cols = expanded() if cols else base_c                     # base_c: a pointer the kernel does not write
    e_rows = (_transposed_empty(x, edtype) if rows_transposed else expanded()) if rows else base_c
    rows_strides = (1, M) if rows and rows_transposed else (N_, 1)
    if outer:       # the outer scales; without them, the base scales
        lead = list(x.shape[:-2])
        s_cols = torch.empty(lead + [M, 1], dtype=torch.float32, device=x.device) if cols else base_c
        s_rows = torch.empty(lead + [1, N_], dtype=torch.float32, device=x.device) if rows else base_r
    else:
        s_cols, s_rows = base_c, base_r
    tile = geometry.tile
    _shiftquant_pair_kernel[geometry.grid](
        x, e_cols, e_rows, ranges, base_c, base_r,
        base_c if pre_c is None else pre_c, base_r if pre_r is None else pre_r, outer_maxima, s_cols, s_rows,
        M, N_, *view.strides, *rows_strides, view.a2, view.stride_a2[0], M * N_, N_, geometry.n_mblocks, seed_c,
        seed_r, QMAX=N.qmax(bits), GROUPS=groups, STOCHASTIC=stochastic,
        COLUMNS_NOISE_ALONG_N=geometry.columns_noise_along_n, PRESCALE_C=pre_c is not None,
        PRESCALE_R=pre_r is not None, OUTER=outer, COLS=cols, ROWS=rows, INT64=view.int64, SAME_LAYOUT=not heads,
        BLOCK_M=tile.block_c, BLOCK_N=tile.block_l, num_warps=tile.num_warps)
    if cols and rows:
        return e_cols, s_cols, e_rows, s_rows
    return (e_cols, s_cols) if cols else (e_rows, s_rows)


def outer_reciprocals(maxima: torch.Tensor) -> torch.Tensor:
    """``[2, n]`` float32 for outer maxima ``[n]``: each one with 0 taken as 1 (the outer
    scale's factor, :func:`sqcompile.numerics.safe_div_scale`) and its correctly rounded
    reciprocal (of at least the smallest normal float, so that it is finite), for the fused
    attention's backward, which multiplies by it where :func:`shiftquant_outer` divides: a
    correctly rounded division per element there (three more values live per element of a
    tile, or a per-column divisor, pre-factor and reciprocal) spilled the ``dK``/``dV``
    kernel's registers on sm_90.  The product is within an ulp of the quotient."""
    r = torch.where(maxima == 0, torch.ones_like(maxima), maxima)
    return torch.stack([r, 1.0 / r.clamp_min(torch.finfo(torch.float32).tiny)])


def outer_unsupported(x: torch.Tensor, channel_dims: Sequence[int], outer_dims: Sequence[int]) -> Optional[str]:
    """Why :func:`shiftquant_outer` runs on ``x`` only by composition (``None``: it runs its
    own kernels): ``x`` must be a contiguous ``[..., M, N]`` tensor quantized along its columns
    (``outer_dims`` its rows: the batch dims and ``M``) or along its rows (``outer_dims`` the
    batch dims and ``N``; :func:`~sqcompile.kernels.triton_ops.pair_dims`)."""
    why = pair_unsupported(x)
    if why:
        return why
    nd = x.dim()
    dims, outer = sorted(d % nd for d in channel_dims), sorted(d % nd for d in outer_dims)
    cols, rows = pair_dims(nd)
    if (dims, outer) not in ((cols, rows), (rows, cols)):
        return (f"channel_dims {list(channel_dims)} and outer_dims {list(outer_dims)} are not the columns and rows "
                f"(or rows and columns) of x {tuple(x.shape)}")
    return None


def shiftquant_outer(x: torch.Tensor, bits: int, groups: int, channel_dims: Sequence[int], outer_dims: Sequence[int],
                     stochastic: bool, *, seed: Union[None, int, torch.Tensor] = None,
                     prescale: Optional[torch.Tensor] = None, transposed: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`sqcompile.ops.shiftquant_outer` on Triton (``grad_outer_scale``): ShiftQuant of
    ``y / r``, ``y = x * prescale`` and ``r`` the maximum of ``|y|`` per index of
    ``outer_dims`` (0 taken as 1), returned as ``(expanded, base * r)``.

    For a contiguous ``[..., M, N]`` ``x`` quantized along its columns with one ``r`` per row,
    or the other way round (:func:`outer_unsupported`), three passes, each reading ``x`` once:
    the outer maxima, the channel ranges of the quotients, and the quantization (the
    programs of the first block also write the scales ``base * r``); the quotients are
    formed in registers, never stored.  Bit for bit the composition
    :func:`sqcompile.ops.shiftquant_outer` over :func:`shiftquant` (same ``seed``: the noise of
    an element depends on its position only), which runs for any other layout.
    ``transposed`` as :func:`shiftquant`'s (channels the rows, ``x`` contiguous)."""
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    if transposed:
        why = transposed_unsupported(x, channel_dims)
        if why:
            raise ValueError(f"shiftquant_outer(transposed=True): {why}")
    if x.numel() == 0 or outer_unsupported(x, channel_dims, outer_dims):
        quantizer = functools.partial(_seeded_shiftquant, seed=seed, transposed=transposed)
        return ops.shiftquant_outer(quantizer, x, bits, groups, channel_dims, outer_dims, stochastic, prescale)
    cols = sorted(d % x.dim() for d in channel_dims) == pair_dims(x.dim())[0]
    return _pair(x, _matrices(x), bits, groups, stochastic, (seed, seed), (prescale, prescale), (None, None),
                 transposed, True, (cols, not cols))


def _seeded_shiftquant(x, bits, groups, channel_dims, stochastic, prescale=None, *, seed=None, transposed=False):
    """:func:`shiftquant` with the quantizer signature :func:`sqcompile.ops.shiftquant_outer` calls."""
    return shiftquant(x, bits, groups, channel_dims, stochastic, seed=seed, prescale=prescale, transposed=transposed)


class _PairGeometry(NamedTuple):
    tile: _Tile                          # the quantize pass's tile (block_c: rows, block_l: columns)
    grid: Tuple[int, int]                # its grid
    n_mblocks: int
    range_grid: Tuple[int, int, int]     # the range pass's grid,
    range_block: Tuple[int, int]         # its (BLOCK_M, BLOCK_N)
    m_per_split: int                     # and its rows per program
    columns_noise_along_n: bool          # the column quantizer's view draws its noise along N


@functools.lru_cache(maxsize=4096)
def _pair_geometry(shape: Tuple[int, int, int], device: torch.device, rows_transposed: bool) -> _PairGeometry:
    """Tiles and grids of :func:`shiftquant_pair`'s two kernels for an ``[A, M, N]`` shape,
    worked out once per shape.  The range pass: strips of ``BLOCK_N`` columns, split along
    the rows between enough programs to fill the device."""
    A, M, N_ = shape
    tile = _PAIR_TILES[rows_transposed]
    n_mblocks = cdiv(M, tile.block_c)
    block_n = max(16, min(next_power_of_2(N_), 32 if INTERPRETED else 256))
    # 8192 values a step on a GPU (32 x 256): each step's row maxima and their atomics cost the
    # same whatever its rows hold; sm_90: 19.3 instructions a value at 16 x 256, 13.1 here
    # (below the ~15.6 a read-only bf16 stream allows), 128 registers, no spills
    block_m = (128 if INTERPRETED else 8192) // block_n
    n_nblocks, n_rblocks = cdiv(N_, block_n), cdiv(M, block_m)
    n_split = max(1, min(n_rblocks, _device_programs(device) // (A * n_nblocks)))
    m_per_split = cdiv(n_rblocks, n_split) * block_m
    return _PairGeometry(tile, (n_mblocks * cdiv(N_, tile.block_l), A), n_mblocks,
                         (n_nblocks, cdiv(M, m_per_split), A), (block_m, block_n), m_per_split,
                         columns_noise_along_n(A, M, N_))


@functools.lru_cache(maxsize=4096)
def columns_noise_along_n(A: int, M: int, N_: int) -> bool:
    """Does :func:`shiftquant` along the columns of a contiguous ``[A, M, N]`` tensor (channel
    ``a * N + n``) draw its noise along ``N`` (:attr:`_View.noise_along_c`)?  For kernels that
    quantize such a tensor along its columns in registers (the ShiftQuant pair, the fused
    attention's ``dS``) and must draw the noise :func:`shiftquant` draws: true unless ``M`` or
    ``N`` is 1, read off the view :func:`_plan` makes so that the two cannot disagree."""
    return _cached_plan((A, M, N_), (M * N_, N_, 1), (0, 2))[0].noise_along_c


def _pair_ranges(view: _View, geometry: _PairGeometry, pre_c: Optional[torch.Tensor], pre_r: Optional[torch.Tensor],
                 outer: int = 0, sides: Tuple[bool, bool] = (True, True),
                 outer_maxima: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The column ranges, their max, the row ranges and their max of the ``[A, M, N]`` view in
    one float32 tensor, from one pass (:func:`_absmax_pair_kernel`, its ``OUTER``
    pass ``outer``) and one zero fill; ``sides``: whether the column maxima and the row
    maxima are computed (the others stay 0)."""
    A, M, N_ = view.shape
    bits = torch.zeros(A * N_ + 1 + A * M + 1, dtype=torch.int32, device=view.work.device)
    block_m, block_n = geometry.range_block
    _absmax_pair_kernel[geometry.range_grid](
        view.work, bits, bits if pre_c is None else pre_c, bits if pre_r is None else pre_r,
        bits if outer_maxima is None else outer_maxima, M, N_, *view.strides, view.a2, view.stride_a2[0],
        geometry.m_per_split, PRESCALE_C=pre_c is not None, PRESCALE_R=pre_r is not None, OUTER=outer,
        COL_MAX=sides[0], ROW_MAX=sides[1], INT64=view.int64, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=pair_range_warps(outer))
    return bits.view(torch.float32)


def pair_range_warps(outer: int) -> int:
    """Warps of :func:`_absmax_pair_kernel`'s programs (steps of 32 x 256 values on a GPU).
    The pass over ``grad_outer_scale``'s quotients (``outer`` 2) keeps more alive: over 4
    warps it needs 255 registers a thread, and Triton 3.6 (the H200 machine's) spills 56 bytes
    there; over 8 it takes 178 (3.6: 196), no spills, the same instructions per value in its
    loop (21.8-22.0 with 3.9, 23.9-24.1 with 3.6) and the same 8 warps per SM (one program of
    8 warps where two of 4 fitted).  ``python benchmarks/sass_counts.py --only "range pass"``."""
    return 8 if outer == 2 else 4


# The pair kernel's tiles (block_c: rows M, block_l: columns N), by whether the row
# quantizer's output is stored transposed: 32 x 128 either way on a GPU, wide along the
# contiguous N.  Stored transposed, each column of the tile is then 32 contiguous bytes
# (a whole memory sector) where the square 64 x 64 tile wrote 64; counted for sm_90 the
# square tile issued 57.0 instructions per element against 51.0 (16 columns per thread, each
# column's per-channel work replicated in every thread holding it).  Not timed yet: part 2
# of benchmarks/gpu.py times the pair with both tiles.  The interpreter's keep the masked
# edges of small tensors exercised.
_PAIR_TILES = {True: _TRANSPOSED_TILE if INTERPRETED else _Tile(32, 128, 4),
               False: _Tile(16, 32, 4) if INTERPRETED else _Tile(32, 128, 4)}


def _collapse(shape: Sequence[int], strides: Sequence[Sequence[int]]) -> List[Tuple[int, List[int]]]:
    """Merge adjacent dims whose strides nest in every tensor; drop size-1 dims."""
    out: List[Tuple[int, List[int]]] = []
    for d, size in enumerate(shape):
        if size == 1:
            continue
        st = [s[d] for s in strides]
        if out and all(prev == cur * size for prev, cur in zip(out[-1][1], st)):
            out[-1] = (out[-1][0] * size, st)
        else:
            out.append((size, st))
    return out


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q * scale`` (broadcasting, float32 arithmetic) in ``dtype``, contiguous."""
    shape = torch.broadcast_shapes(q.shape, scale.shape)
    out = torch.empty(shape, dtype=dtype, device=q.device)
    if out.numel() == 0:
        return out
    qe, se = q.expand(shape), scale.expand(shape)
    dims = _collapse(shape, [qe.stride(), se.stride(), out.stride()])
    if len(dims) > 3 or (len(dims) == 3 and dims[0][0] > _MAX_GRID_YZ):
        qe, se = qe.contiguous(), se.contiguous()
        dims = _collapse(shape, [qe.stride(), se.stride(), out.stride()])
    dims = [(1, [0, 0, 0])] * (3 - len(dims)) + dims
    (d0, st0), (d1, st1), (d2, st2) = dims
    block_2 = min(1024 if not INTERPRETED else 256, next_power_of_2(d2))
    block_1 = min(next_power_of_2(d1), max(1, (4096 if not INTERPRETED else 512) // block_2))
    n_blocks2 = cdiv(d2, block_2)
    _dequantize_kernel[(cdiv(d1, block_1) * n_blocks2, d0)](
        qe, se, out, d1, d2, st0[0], st1[0], st2[0], st0[1], st1[1], st2[1], st0[2], st1[2], st2[2], n_blocks2,
        BLOCK_1=block_1, BLOCK_2=block_2, num_warps=4)
    return out


__all__ = ["quantize", "shiftquant", "shiftquant_pair", "shiftquant_outer", "dequantize", "channel_ranges", "draw_seed", "INTERPRETED"]
