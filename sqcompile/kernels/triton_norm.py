"""Triton kernels of the fully-quantized L1 norm over rows (LayerNorm and RMSNorm kinds).

:mod:`sqcompile.norms` defines the math (and the torch implementation every other case
uses); these kernels compute the same thing for the case that matters on a GPU: the norm runs
over the trailing ``L`` elements of each row of a contiguous ``[R, L]`` tensor, ``L`` up to
:data:`sqcompile.norms.TRITON_MAX_ROW`, so one program holds whole rows in registers and reads
each element once.

Forward (:func:`l1_norm`), per row, in float32 whatever the input dtype:

1. ``q, s = quantize(x, norm_bits)`` with one scale per row, nearest rounding: bit-exact with
   :func:`sqcompile.numerics.quantize` (the device functions are
   :mod:`~sqcompile.kernels.triton_quant`'s);
2. ``xc = q * s``; ``mean = sum(xc) / L`` (centered kinds); ``sigma = c * sum|xc - mean| / L``;
   ``inv = 1 / sqrt(sigma**2 + eps)``; ``y = (xc - mean) * inv * weight + bias``, rounded to ``x``'s
   dtype;
3. with ``out_bits`` (:func:`l1_norm_quantized`, what the fusion pass uses when the norm's
   only consumers quantize its output per row for a GEMM): ``y`` is not written; the kernel
   quantizes the rounded ``y`` per row (nearest, ``out_bits``) and writes int8 and the row
   scales, bit-exact with ``triton_quantize(y, out_bits, rows, nearest)`` on the ``y`` the
   plain kernel writes.

Written: ``q`` (int8) and the per-row ``scale``, ``mean``, ``inv`` (float32 ``[R, 1]``) that
the backward reads, instead of the float input.

Backward (:func:`l1_norm_backward`): the incoming gradient is quantized per row at
``grad_bits`` with stochastic rounding (the noise of ``triton_quantize`` for the same seed and
layout: element ``(r, l)`` of an ``[R, L]`` tensor gets the same draw), dequantized, and
``dx = (g - mean(g) - c * (sigma * inv) * mean(g * xhat) * (sign(xhat) - mean(sign xhat))) * inv``
with ``g = dy * weight`` and ``sigma * inv = c * mean|xhat|`` (the RMS kind drops the two mean
corrections; :mod:`sqcompile.norms` derives it).  ``dweight = sum_rows dy * xhat`` and
``dbias = sum_rows dy`` are summed per program over its rows in registers, then over programs
with ``torch.sum`` (deterministic).
:func:`l1_norm_backward_residual` also adds the residual stream's gradient to ``dx`` in the
kernel (a pre-norm block's ``residual + dx``, which is all that is written) and can give that
sum's ShiftQuant ranges (per row, and per column by an integer atomic max) and its column
sums (per program, like ``dbias``), for the Linear whose output gradient it is
(:mod:`sqcompile.backends.norm_fusion`).

Reductions run in a different order than torch's, so ``y``, ``mean``, ``inv`` and the
gradients agree with :mod:`sqcompile.norms` to float32 rounding, not bit for bit; the
integers and scales of the input quantizer are exact.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import triton
import triton.language as tl

from .. import numerics as N
from ..norms import triton_unsupported
from .triton_quant import (INTERPRETED, _abs_nan_as_inf, _absmax, _combine_ranges, _device_programs, _max_nan,
                           _multipliers, _quantize_values, _scale_of, _seed_arg, _uniform_noise, cast_rtne, cdiv,
                           next_power_of_2)


@triton.jit
def _quantize_rows(x, mask, QMAX: tl.constexpr):
    """Per-row nearest quantization of the tile ``x``: ``(q int32, scale [BLOCK_R])``."""
    scale = _scale_of(_absmax(tl.where(mask, x.to(tl.float32), 0.0), 1), QMAX)
    divisor, pre, inv = _multipliers(scale)
    q = _quantize_values(x, divisor[:, None], pre[:, None], inv[:, None], 0.0, QMAX, False)
    return tl.where(mask, q, 0), scale


@triton.jit
def _l1_norm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, q_ptr, s_ptr, mean_ptr, inv_ptr, qy_ptr, sy_ptr, R, L,
                    l1_scale, eps,
                    QMAX: tl.constexpr, OUT_QMAX: tl.constexpr, CENTER: tl.constexpr, HAS_W: tl.constexpr,
                    HAS_B: tl.constexpr, OUT_Q: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    """Rows ``[pid * BLOCK_R, ...)``: see the module docstring.  ``OUT_Q``: write ``qy, sy``
    (``y`` quantized per row with ``OUT_QMAX``) instead of ``y``."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_L)
    mask_r = rows < R
    mask_l = cols < L
    mask = mask_r[:, None] & mask_l[None, :]
    offs = rows.to(tl.int64)[:, None] * L + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    q, scale = _quantize_rows(x, mask, QMAX)
    tl.store(q_ptr + offs, q.to(tl.int8), mask=mask)
    tl.store(s_ptr + rows, scale, mask=mask_r)
    xc = tl.where(mask, q.to(tl.float32) * scale[:, None], 0.0)          # numerics.dequantize
    if CENTER:
        mean = tl.math.div_rn(tl.sum(xc, axis=1), L * 1.0)
        z = tl.where(mask, xc - mean[:, None], 0.0)
    else:
        mean = tl.zeros((BLOCK_R,), dtype=tl.float32)
        z = xc
    sigma = l1_scale * tl.math.div_rn(tl.sum(tl.abs(z), axis=1), L * 1.0)
    inv = tl.math.div_rn(1.0, tl.sqrt_rn(sigma * sigma + eps))
    tl.store(mean_ptr + rows, mean, mask=mask_r)
    tl.store(inv_ptr + rows, inv, mask=mask_r)
    y = z * inv[:, None]
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=mask_l, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(b_ptr + cols, mask=mask_l, other=0.0).to(tl.float32)[None, :]
    if OUT_Q:
        # quantize y as the unfused graph would: y rounded to its dtype (x's) first
        y = cast_rtne(y, x_ptr.dtype.element_ty)
        qy, sy = _quantize_rows(y, mask, OUT_QMAX)
        tl.store(qy_ptr + offs, qy.to(tl.int8), mask=mask)
        tl.store(sy_ptr + rows, sy, mask=mask_r)
    else:
        tl.store(y_ptr + offs, cast_rtne(y, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add2(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _add4(a0, a1, a2, a3, b0, b1, b2, b3):
    return a0 + b0, a1 + b1, a2 + b2, a3 + b3


@triton.jit
def _l1_norm_backward_kernel(dy_ptr, q_ptr, s_ptr, mean_ptr, inv_ptr, w_ptr, dx_ptr, dw_ptr, db_ptr, seed_ptr,
                             res_ptr, cr_ptr, rr_ptr, cs_ptr, R, L, l1_scale, n_programs,
                             GQMAX: tl.constexpr, CENTER: tl.constexpr, HAS_W: tl.constexpr,
                             NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, RESIDUAL: tl.constexpr,
                             RANGES: tl.constexpr, SUMS: tl.constexpr,
                             BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    """Row blocks ``pid, pid + n_programs, ...``; writes ``dx`` and this program's partial
    column sums ``dw[pid]`` / ``db[pid]`` (see the module docstring).  ``RESIDUAL``: writes
    ``dx + residual`` (each rounded to the dtype, as the add after the norm's backward does)
    instead of ``dx``; ``RANGES``: that output's ``max |.|`` per column (an integer atomic
    max of the float bits into ``cr``, NaN as +inf) and per row (``rr``); ``SUMS``: its
    partial column sums ``cs[pid]``."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_L)
    mask_l = cols < L
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=mask_l, other=0.0).to(tl.float32)
    seed = tl.load(seed_ptr)
    # per-element partial sums, reduced over the rows once at the end: a reduction across
    # warps costs a shared-memory round trip and barriers, and the H200 showed this kernel
    # waiting on such latency (see BACKWARD_PER_THREAD); the row statistics likewise go
    # through one reduction of four values instead of four
    dw = tl.zeros((BLOCK_R, BLOCK_L), dtype=tl.float32)
    db = tl.zeros((BLOCK_R, BLOCK_L), dtype=tl.float32)
    cmax = tl.zeros((BLOCK_R, BLOCK_L), dtype=tl.float32)     # |.| maxima, reduced over the rows at the end
    csum = tl.zeros((BLOCK_R, BLOCK_L), dtype=tl.float32)
    for start in range(pid * BLOCK_R, R, n_programs * BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        mask_r = rows < R
        mask = mask_r[:, None] & mask_l[None, :]
        offs = rows.to(tl.int64)[:, None] * L + cols[None, :]
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0)
        # stochastic per-row quantization of the gradient (triton_quantize's noise), dequantized
        gscale = _scale_of(_absmax(tl.where(mask, dy.to(tl.float32), 0.0), 1), GQMAX)
        divisor, pre, ginv = _multipliers(gscale)
        noise = _uniform_noise(seed, rows, 0, L, BLOCK_R, BLOCK_L, True)    # in registers (see there)
        dq = _quantize_values(dy, divisor[:, None], pre[:, None], ginv[:, None], noise, GQMAX, True)
        dyc = tl.where(mask, dq.to(tl.float32) * gscale[:, None], 0.0)
        # the saved input, dequantized, and xhat
        xc = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.float32) * tl.load(s_ptr + rows, mask=mask_r,
                                                                                 other=0.0)[:, None]
        inv = tl.load(inv_ptr + rows, mask=mask_r, other=0.0)
        if CENTER:
            xc = xc - tl.load(mean_ptr + rows, mask=mask_r, other=0.0)[:, None]
        xhat = tl.where(mask, xc * inv[:, None], 0.0)
        if NEED_DW:
            dw += dyc * xhat
        if NEED_DB:
            db += dyc
        g = dyc
        if HAS_W:
            g = g * w[None, :]
        sgn = tl.where(xhat > 0.0, 1.0, tl.where(xhat < 0.0, -1.0, 0.0))
        if CENTER:
            abs_sum, proj_sum, g_sum, sgn_sum = tl.reduce((tl.abs(xhat), g * xhat, g, sgn), 1, _add4)
            g = g - tl.math.div_rn(g_sum, L * 1.0)[:, None]
            sgn = sgn - tl.math.div_rn(sgn_sum, L * 1.0)[:, None]
        else:
            abs_sum, proj_sum = tl.reduce((tl.abs(xhat), g * xhat), 1, _add2)
        # ds / d mean|z| = c * sigma / s, and sigma / s = c * mean|xhat| (xhat = z / s)
        ratio = l1_scale * tl.math.div_rn(abs_sum, L * 1.0)
        proj = l1_scale * ratio * tl.math.div_rn(proj_sum, L * 1.0)
        g = g - proj[:, None] * sgn
        dx = cast_rtne(g * inv[:, None], dx_ptr.dtype.element_ty)
        if RESIDUAL:
            dx = cast_rtne(dx.to(tl.float32) + tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32),
                           dx_ptr.dtype.element_ty)
        tl.store(dx_ptr + offs, dx, mask=mask)
        if RANGES or SUMS:
            out = tl.where(mask, dx.to(tl.float32), 0.0)
            if RANGES:
                tl.store(rr_ptr + rows, _abs_nan_as_inf(_absmax(out, 1)), mask=mask_r)
                cmax = _max_nan(cmax, tl.abs(out))
            if SUMS:
                csum += out
    if NEED_DW:
        tl.store(dw_ptr + pid * L + cols, tl.sum(dw, axis=0), mask=mask_l)
    if NEED_DB:
        tl.store(db_ptr + pid * L + cols, tl.sum(db, axis=0), mask=mask_l)
    if RANGES:
        _combine_ranges(cr_ptr, cols, tl.reduce(cmax, 0, _max_nan), mask_l, cr_ptr, False)
    if SUMS:
        tl.store(cs_ptr + pid * L + cols, tl.sum(csum, axis=0), mask=mask_l)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------

FORWARD_PER_THREAD = 32       # values of a tile per thread (see _block)
# The backward's launch geometry, from ``benchmarks/gpu.py --parts 4`` on the H200
# (2026-11-30; [8192, 1024] bf16, weight and bias gradients, the kernel alone).  Before its
# per-iteration reductions and noise moved to registers: 8 values per thread (8 warps over
# two rows) 0.143 ms, 16 (4 warps) 0.216-0.271 ms.  Since: 4 / 8 / 16 values per thread
# 0.077 / 0.072 / 0.068 ms with at most 4 programs per SM (each looping over row blocks
# beyond that, one partial row of the weight / bias / column sums per program), 0.093-0.122
# ms with up to 16 (64 had been slower too).  8 keeps half of 16's registers for the
# residual / ranges / sums variant.  That is ~14% of copy bandwidth for its essential
# traffic (the forward: ~40%): the README's GPU section.
BACKWARD_PER_THREAD = 8
BACKWARD_PROGRAMS_PER_SM = 4


def _block(L: int, elements: int, per_thread: int) -> Tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_L, num_warps)``: whole rows, about ``elements`` values a program
    (fewer in the interpreter, where every element costs CPU time), at most ``per_thread`` of
    a tile's values in each thread (4 to 16 warps).

    Chosen from what the kernels compile to for sm_90 (``ptxas -v`` and ``cuobjdump``, rows of
    64 to 8192; ``tests/test_triton_norms.py`` checks the spills), not yet from timings
    (``benchmarks/gpu.py --parts 4``).  Each row's statistics (four reductions, a few IEEE
    divisions) cost the same whatever the row holds per thread, so more values per thread
    cost fewer instructions per value, and the norm kernels are instruction-bound before
    they are memory-bound (a bf16 stream at the H200's bandwidth leaves ~21-28 issues per
    value).  Forward: 32 values per thread (one warp per row of 1024) issue 67-70
    instructions per value against 94-102 with 8, with 72-80 registers (no spills) and still
    ~50 KB of loads in flight per SM (24 at 8 per thread), more than the bandwidth-latency
    product (~22 KB).  Backward (its Philox noise and the saved values keep more alive):
    16 values per thread issue 85-102 instructions per value against 117-138 with 8 (123-168
    registers, no spills; 32 would take 252), yet 8 ran 1.5x faster on the H200: the
    backward waits on latency, not on issue (see BACKWARD_PER_THREAD)."""
    block_l = max(16, next_power_of_2(L))
    if INTERPRETED:
        elements = 256
    block_r = max(1, min(64, elements // block_l))
    warps = min(16, max(4, block_r * block_l // (32 * per_thread)))
    return block_r, block_l, warps


# No FMA contraction (Triton contracts ``a * b + c`` by default): the unfused graph rounds the
# product first, e.g. the backward's ``dx = g * inv`` before ``dx + residual``, which an H200
# run (2026-11-30) showed one ulp off in float32 with contraction on.
_EXACT = {} if INTERPRETED else {"enable_fp_fusion": False}


def _check(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], bits: int) -> Tuple[int, int]:
    if x.dim() != 2 or not x.is_contiguous():
        raise ValueError(f"triton L1 norm: x must be a contiguous [rows, L] tensor, got {tuple(x.shape)} "
                         f"with strides {x.stride()}")
    R, L = x.shape
    why = triton_unsupported(x.dtype, L, bits, None)
    if why is not None:
        raise ValueError(f"triton L1 norm: unsupported {why}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.shape != (L,) or not t.is_contiguous()):
            raise ValueError(f"triton L1 norm: {name} must be a contiguous [{L}] tensor, got {tuple(t.shape)}")
    return R, L


def _forward(x, weight, bias, norm_bits, center, l1_scale, eps, out_bits):
    R, L = _check(x, weight, bias, norm_bits)
    dev = x.device
    q = torch.empty_like(x, dtype=torch.int8)
    scale, mean, inv = (torch.empty((R, 1), dtype=torch.float32, device=dev) for _ in range(3))
    if out_bits is None:
        y, qy, sy = torch.empty_like(x), q, scale           # qy / sy: unused pointers
    else:
        y = x                                               # unused pointer
        qy = torch.empty_like(x, dtype=torch.int8)
        sy = torch.empty((R, 1), dtype=torch.float32, device=dev)
    if R:
        block_r, block_l, warps = _block(L, 4096, FORWARD_PER_THREAD)
        _l1_norm_kernel[(cdiv(R, block_r),)](
            x, x if weight is None else weight, x if bias is None else bias, y, q, scale, mean, inv, qy, sy, R, L,
            float(l1_scale), float(eps), QMAX=N.qmax(norm_bits), OUT_QMAX=N.qmax(out_bits or 8), CENTER=center,
            HAS_W=weight is not None, HAS_B=bias is not None, OUT_Q=out_bits is not None,
            BLOCK_R=block_r, BLOCK_L=block_l, num_warps=warps, **_EXACT)
    return y, qy, sy, q, scale, mean, inv


def l1_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], norm_bits: int,
            center: bool, l1_scale: float, eps: float):
    """``(y, q, scale, mean, inv)`` of the L1 norm of each row of ``x`` ``[R, L]`` (see the
    module docstring); ``mean`` is 0 for the RMS kind (``center=False``)."""
    y, _, _, q, scale, mean, inv = _forward(x, weight, bias, norm_bits, center, l1_scale, eps, None)
    return y, q, scale, mean, inv


def l1_norm_quantized(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                      norm_bits: int, center: bool, l1_scale: float, eps: float, out_bits: int):
    """``(qy, sy, q, scale, mean, inv)``: :func:`l1_norm` whose output is quantized per row
    (nearest, ``out_bits``) in the kernel instead of being written."""
    _, qy, sy, q, scale, mean, inv = _forward(x, weight, bias, norm_bits, center, l1_scale, eps, out_bits)
    return qy, sy, q, scale, mean, inv


def l1_norm_backward(dy: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor, inv: torch.Tensor,
                     weight: Optional[torch.Tensor], grad_bits: int, center: bool, l1_scale: float,
                     need_weight_grad: bool, need_bias_grad: bool, *,
                     seed: Union[None, int, torch.Tensor] = None):
    """``(dx, dweight, dbias)`` (float32 ``[L]`` sums, empty when not needed) from the saved
    ``q, scale, mean, inv`` of :func:`l1_norm` (see the module docstring).  ``seed``: the
    stochastic rounding's Philox seed (default: drawn on the device from torch's generator)."""
    return _backward(dy, q, scale, mean, inv, weight, grad_bits, center, l1_scale, need_weight_grad,
                     need_bias_grad, None, False, False, seed)[:3]


def l1_norm_backward_residual(dy: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor,
                              inv: torch.Tensor, weight: Optional[torch.Tensor], residual: torch.Tensor,
                              grad_bits: int, center: bool, l1_scale: float, need_weight_grad: bool,
                              need_bias_grad: bool, ranges: bool, sums: bool, *,
                              seed: Union[None, int, torch.Tensor] = None):
    """``(dx + residual, dweight, dbias, column ranges, row ranges, column sums)``:
    :func:`l1_norm_backward` with the residual gradient added in the kernel (``residual``
    ``[R, L]`` of ``dy``'s dtype; ``dx`` itself is not written), bit for bit the unfused add.
    With ``ranges``, that output's ShiftQuant ranges (float32 ``[L]`` per column and ``[R]``
    per row, ``max |.|``, NaN as +inf, exact); with ``sums``, its sum over the rows (``[L]``,
    float32 accumulation rounded once to its dtype: a Linear's bias gradient).  Empty where
    not asked."""
    if residual.shape != dy.shape or residual.dtype != dy.dtype:
        raise ValueError(f"l1_norm_backward_residual: residual must be {tuple(dy.shape)} {dy.dtype} like dy, "
                         f"got {tuple(residual.shape)} {residual.dtype}")
    return _backward(dy, q, scale, mean, inv, weight, grad_bits, center, l1_scale, need_weight_grad,
                     need_bias_grad, residual.contiguous(), ranges, sums, seed)


def _backward(dy, q, scale, mean, inv, weight, grad_bits, center, l1_scale, need_weight_grad, need_bias_grad,
              residual, ranges, sums, seed):
    dy = dy.contiguous()
    R, L = _check(dy, weight, None, grad_bits)
    dev, f32 = dy.device, torch.float32
    dx = torch.empty_like(dy)
    empty = torch.empty((0,), dtype=f32, device=dev)
    cols = torch.zeros((L,), dtype=torch.int32, device=dev) if ranges else empty
    rows = torch.empty((R,), dtype=f32, device=dev) if ranges else empty
    if R == 0:
        zeros = torch.zeros((L,), dtype=f32, device=dev)
        return (dx if residual is None else residual.clone(), zeros if need_weight_grad else empty,
                zeros if need_bias_grad else empty, cols.view(f32), rows,
                zeros.to(dy.dtype) if sums else empty.to(dy.dtype))
    block_r, block_l, warps = _block(L, 2048, BACKWARD_PER_THREAD)
    programs = min(cdiv(R, block_r), _device_programs(dev, BACKWARD_PROGRAMS_PER_SM))
    dw, db, cs = (torch.empty((programs, L), dtype=f32, device=dev) if need else empty
                  for need in (need_weight_grad, need_bias_grad, sums))
    seed = _seed_arg(seed, True, dev, empty)
    _l1_norm_backward_kernel[(programs,)](
        dy, q, scale, mean, inv, dy if weight is None else weight, dx, dw, db, seed,
        dy if residual is None else residual, cols, rows, cs, R, L, float(l1_scale), programs,
        GQMAX=N.qmax(grad_bits), CENTER=center, HAS_W=weight is not None, NEED_DW=need_weight_grad,
        NEED_DB=need_bias_grad, RESIDUAL=residual is not None, RANGES=ranges, SUMS=sums,
        BLOCK_R=block_r, BLOCK_L=block_l, num_warps=warps, **_EXACT)
    return (dx, dw.sum(0) if need_weight_grad else empty, db.sum(0) if need_bias_grad else empty, cols.view(f32),
            rows, cs.sum(0).to(dy.dtype) if sums else empty.to(dy.dtype))
