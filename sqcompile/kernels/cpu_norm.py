"""The fully-quantized L1 norm as two C kernels (``cpu_norm.c``, AVX-512): the forward
``sqcompile::cpu_l1_norm`` and the backward ``sqcompile::cpu_l1_norm_backward``.

Under Inductor the L1 norm of :mod:`sqcompile.norms` (its input quantizer, statistics,
output, and in the backward the gradient's stochastic quantizer and the three reductions of
``dx``) became loops that each pass over the whole tensor: about seven each way, 12-13 ms
forward + backward for an InstanceNorm's ``[16, 32, 64, 64]``, twice PyTorch's L2 norm under
the same compiler.  The kernels take one slice (one scale, one set of statistics) at a time
while it is in cache: four passes over it forward, three backward.

The input is viewed as ``[A, R1, B, R2]`` (:func:`slice_layout`): a slice is an index
``(a, b)``, reduced over ``r1`` and ``r2``, its rows of ``R2`` adjacent values.  The affine
must be one value per slice (BatchNorm / InstanceNorm, a LayerNorm without affine);
:func:`unsupported` says when a norm cannot run here, and :mod:`sqcompile.norms` then keeps
its graph of ops.

:func:`l1_norm_reference` / :func:`l1_norm_backward_reference` are what the kernels compute,
in PyTorch ops (the quantizers of :mod:`sqcompile.numerics`, the gradient's noise
:func:`~sqcompile.numerics.hash_noise`): ``q``, the maxima and the quantized gradient are
theirs bit for bit; the sums (and what depends on them) differ by rounding only, as the
kernels add in another order (float32 lanes into a double per row).
"""
from __future__ import annotations

import ctypes
import functools
import math
import os
from typing import List, Optional, Sequence, Tuple

import torch

from .. import numerics as N
from .. import ops
from . import native, pool
from .cpu_quant import _spread_seed

SOURCE = os.path.join(os.path.dirname(__file__), "cpu_norm.c")
MIN_ROW = 16
"""Shortest run of adjacent values (``R2``) the kernels take: they vectorize along it."""


@functools.lru_cache(maxsize=None)
def status() -> Tuple[bool, Optional[str]]:
    """``(usable, reason)`` for the kernels on this machine (checked and built once)."""
    return native.status(native.AVX512_CPU_FLAGS, _library)


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL:
    lib = native.build(SOURCE, native.AVX512_CFLAGS, "the CPU L1-norm kernels")
    i64, ptr, f32, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
    lib.sq_l1_norm_forward.restype = None
    lib.sq_l1_norm_forward.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, i32, f32, f32, f32, ptr, ptr, ptr, ptr,
                                       ptr, i32]
    lib.sq_l1_norm_backward.restype = ctypes.c_int
    lib.sq_l1_norm_backward.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i32, f32, f32, f32, f32,
                                        ctypes.c_int32, ptr, ptr, ptr, i32]
    return lib


def slice_layout(shape: Sequence[int], dims: Sequence[int]) -> Optional[List[int]]:
    """``[A, R1, B, R2]`` for a contiguous tensor of ``shape`` reduced over ``dims``: the
    trailing reduced dims are ``R2``, the kept dims before them ``B``, the reduced dims before
    those ``R1`` and the rest ``A`` (each 1 when it has no dims).  ``None`` when the dims do
    not fall into those four blocks."""
    blocks, sizes = [True, False, True, False], [1, 1, 1, 1]      # R2, B, R1, A: from the last dim
    k = 0
    for d in reversed(range(len(shape))):
        while k < 4 and blocks[k] != (d in dims):
            k += 1
        if k == 4:
            return None
        sizes[k] *= shape[d]
    return sizes[::-1]


def unsupported(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                dims: Sequence[int], norm_bits: Optional[int], stats: Optional[str]) -> Optional[str]:
    """Why this L1 norm (batch statistics) cannot run on the kernels, or ``None``."""
    if norm_bits is None:
        return "float L1 norm (quantize=False)"
    if stats is not None:
        return "collect_stats=True observes the quantizers one by one"
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return f"{x.dtype} on {x.device.type} (the kernels take float32 on CPU)"
    if not all(isinstance(s, int) for s in x.shape):
        return "symbolic sizes"
    if not x.is_contiguous():
        return "the input is not contiguous"
    layout = slice_layout(x.shape, dims)
    if layout is None:
        return f"reduction dims {tuple(dims)} of a {x.dim()}-d input are not one (kept, reduced, kept, reduced) layout"
    if layout[3] < MIN_ROW:
        return f"runs of {layout[3]} adjacent values (the kernels vectorize along runs of at least {MIN_ROW})"
    if x.numel() >= 2 ** 31:
        return "2**31 elements or more (the gradient's noise indexes in int32)"
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != torch.float32 or t.dim() != x.dim() or any(t.shape[d] != 1 for d in dims)):
            return f"the {name} is not one float32 value per slice"
    usable, why = status()
    return None if usable else why


def _per_slice(t: Optional[torch.Tensor], shape, dims) -> Optional[torch.Tensor]:
    """A per-slice parameter (broadcasting to ``shape``, size 1 along ``dims``) as a
    contiguous ``[A * B]`` vector."""
    if t is None:
        return None
    keep = [1 if d in dims else s for d, s in enumerate(shape)]
    return t.expand(keep).contiguous().reshape(-1)


def l1_norm_reference(x, weight, bias, dims: List[int], center: bool, l1_scale: float, eps: float, bits: int):
    """``(y, q, amax, total, deviation)``: :class:`sqcompile.norms._L1Norm`'s forward over
    ``dims`` with batch statistics, in PyTorch ops (float32); the last three keep ``dims``."""
    keep = [d for d in range(x.dim()) if d not in dims]
    n = math.prod([x.shape[d] for d in dims])
    amax = N.amax(x, keep)
    q, scale = N.quantize(x, bits, keep)
    xc = N.dequantize(q, scale)
    total = xc.sum(dims, keepdim=True)
    z = xc - total / n if center else xc
    deviation = z.abs().sum(dims, keepdim=True)
    sigma = l1_scale * (deviation / n)
    y = z * (1.0 / torch.sqrt(sigma * sigma + eps))
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y, q, amax, total, deviation


def l1_norm_backward_reference(dy, q, amax, total, deviation, weight, seed, dims: List[int], center: bool,
                               l1_scale: float, eps: float, norm_bits: int, grad_bits: int):
    """``(dx, sum_dy, sum_dyx)``: :class:`sqcompile.norms._L1Norm`'s backward from the
    forward's saved values, ``dy`` quantized with :func:`~sqcompile.numerics.hash_noise` of
    ``seed``; the sums per slice (``dims`` kept), before they are summed over the slices that
    share a parameter."""
    keep = [d for d in range(dy.dim()) if d not in dims]
    n = math.prod([dy.shape[d] for d in dims])
    xc = N.dequantize(q, N.scale_of_amax(amax, norm_bits))
    sigma = l1_scale * (deviation / n)
    inv = 1.0 / torch.sqrt(sigma * sigma + eps)
    xhat = (xc - total / n if center else xc) * inv
    dq, dscale = N.quantize(dy, grad_bits, keep, "stochastic", N.hash_noise(dy.shape, seed, dy.device))
    dyd = N.dequantize(dq, dscale)
    g = dyd if weight is None else dyd * weight
    proj = (l1_scale * sigma * inv) * (g * xhat).mean(dims, keepdim=True)
    sgn = torch.sign(xhat)
    if center:
        g = g - g.mean(dims, keepdim=True)
        sgn = sgn - sgn.mean(dims, keepdim=True)
    dx = (g - proj * sgn) * inv
    return dx, dyd.sum(dims, keepdim=True), (dyd * xhat).sum(dims, keepdim=True)


def _stat_shape(shape, dims) -> List[int]:
    return [1 if d in dims else s for d, s in enumerate(shape)]


@ops.custom_op("sqcompile::cpu_l1_norm")
def cpu_l1_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], dims: List[int],
                center: bool, l1_scale: float, eps: float, bits: int
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The quantized L1 norm's forward on the C kernel: ``(y, q, amax, total, deviation)`` as
    :func:`l1_norm_reference` (the input's int8 ``q`` and per-slice maxima, sum and absolute
    deviation are what the backward takes).  ``x`` float32, contiguous, with
    :func:`slice_layout`; ``weight`` / ``bias`` one value per slice or None."""
    layout = slice_layout(x.shape, dims)
    x = x.contiguous()
    y = torch.empty_like(x)
    q = pool.OUTPUTS.empty(x.shape, torch.int8)
    stat = [torch.empty(_stat_shape(x.shape, dims), dtype=torch.float32) for _ in range(3)]
    if x.numel() == 0:
        return (y, q, *(t.zero_() for t in stat))
    w, b = _per_slice(weight, x.shape, dims), _per_slice(bias, x.shape, dims)
    _library().sq_l1_norm_forward(
        x.data_ptr(), None if w is None else w.data_ptr(), None if b is None else b.data_ptr(), *layout,
        int(center), l1_scale, eps, float(N.qmax(bits)), y.data_ptr(), q.data_ptr(), *(t.data_ptr() for t in stat),
        torch.get_num_threads())
    return (y, q, *stat)


@cpu_l1_norm.register_fake
def _(x, weight, bias, dims, center, l1_scale, eps, bits):
    stat = _stat_shape(x.shape, dims)
    return (torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape, dtype=torch.int8),
            x.new_empty(stat), x.new_empty(stat), x.new_empty(stat))


@ops.custom_op("sqcompile::cpu_l1_norm_backward")
def cpu_l1_norm_backward(dy: torch.Tensor, q: torch.Tensor, amax: torch.Tensor, total: torch.Tensor,
                         deviation: torch.Tensor, weight: Optional[torch.Tensor], seed: torch.Tensor, dims: List[int],
                         center: bool, l1_scale: float, eps: float, norm_bits: int, grad_bits: int, need_dx: bool
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The quantized L1 norm's backward on the C kernel: ``(dx, sum_dy, sum_dyx)`` as
    :func:`l1_norm_backward_reference` (``dx`` empty when not ``need_dx``)."""
    layout = slice_layout(dy.shape, dims)
    dy = dy.contiguous()
    dx = torch.empty_like(dy) if need_dx else dy.new_empty((0,))
    s1, s2 = (torch.empty(_stat_shape(dy.shape, dims), dtype=torch.float32) for _ in range(2))
    if dy.numel() == 0:
        return dx, s1.zero_(), s2.zero_()
    w = _per_slice(weight, dy.shape, dims)
    failed = _library().sq_l1_norm_backward(
        dy.data_ptr(), q.contiguous().data_ptr(), *(t.contiguous().data_ptr() for t in (amax, total, deviation)),
        None if w is None else w.data_ptr(), *layout, int(center), l1_scale, eps, float(N.qmax(norm_bits)),
        float(N.qmax(grad_bits)), _spread_seed(seed), dx.data_ptr() if need_dx else None, s1.data_ptr(),
        s2.data_ptr(), torch.get_num_threads())
    if failed:
        raise MemoryError(f"sqcompile::cpu_l1_norm_backward: no memory for a slice of {dy.numel() // s1.numel()} bytes")
    return dx, s1, s2


@cpu_l1_norm_backward.register_fake
def _(dy, q, amax, total, deviation, weight, seed, dims, center, l1_scale, eps, norm_bits, grad_bits, need_dx):
    stat = _stat_shape(dy.shape, dims)
    dx = torch.empty_like(dy, memory_format=torch.contiguous_format) if need_dx else dy.new_empty((0,))
    return dx, dy.new_empty(stat), dy.new_empty(stat)


__all__ = ["cpu_l1_norm", "cpu_l1_norm_backward", "l1_norm_backward_reference", "l1_norm_reference", "slice_layout",
           "status", "unsupported", "SOURCE"]
