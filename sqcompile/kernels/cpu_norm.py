"""The fully-quantized L1 norm as two C kernels (``cpu_norm.c``, AVX-512 or the portable build of
:mod:`~sqcompile.kernels.native`): the forward
``sqcompile::cpu_l1_norm`` and the backward ``sqcompile::cpu_l1_norm_backward``.  A
LayerNorm's / RMSNorm's forward also quantizes its output for the next GEMMs
(``sqcompile::cpu_l1_norm_quantized`` per row, ``sqcompile::cpu_l1_norm_shiftquant`` with
``act_groups``; :mod:`sqcompile.backends.norm_fusion` puts them in the graphs).

Under Inductor the L1 norm of :mod:`sqcompile.norms` (its input quantizer, statistics,
output, and in the backward the gradient's stochastic quantizer and the three reductions of
``dx``) became loops that each pass over the whole tensor: about seven each way, 12-13 ms
forward + backward for an InstanceNorm's ``[16, 32, 64, 64]``, twice PyTorch's L2 norm under
the same compiler.  The kernels take one slice (one scale, one set of statistics) at a time
while it is in cache: four passes over it forward, three backward.

The input is viewed as ``[A, R1, B, R2]`` (:func:`slice_layout`): a slice is an index
``(a, b)``, reduced over ``r1`` and ``r2``, its rows of ``R2`` adjacent values.  The affine
is one value per slice (BatchNorm, InstanceNorm) or one per position along the rows
(LayerNorm, RMSNorm: :func:`affine_mode`); :func:`unsupported` says when a norm cannot run
here (a GroupNorm's per-channel affine, channels-last inputs, ...), and
:mod:`sqcompile.norms` then keeps its graph of ops.  The rewriting pass puts BatchNorm,
InstanceNorm and GroupNorm without affine on the kernels, not LayerNorm / RMSNorm (see
:func:`sqcompile.passes.l1_norms._cpu_kernels` for why); ``kernels="cpu"`` asks for them
in :mod:`sqcompile.norms`' functions.

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
from . import cpu_quant, native, pool
from .cpu_quant import _spread_seed

SOURCE = os.path.join(os.path.dirname(__file__), "cpu_norm.c")
MIN_ROW = 16
"""Shortest run of adjacent values (``R2``) the kernels take: they vectorize along it."""
CHUNKS = 64
"""Chunks of slices whose column sums a LayerNorm-like backward adds separately (then in
order): the parameter gradients do not depend on the thread count."""


@functools.lru_cache(maxsize=None)
def status() -> Tuple[bool, Optional[str]]:
    """``(usable, reason)`` for the kernels on this machine (checked and built once)."""
    return native.status(native.simd_build()[2], _library)


@functools.lru_cache(maxsize=None)
def _library(cflags: Optional[Tuple[str, ...]] = None) -> ctypes.CDLL:
    """The kernels built with ``cflags`` (``None``: those of :func:`~.native.simd_build`)."""
    lib = native.build(SOURCE, list(cflags) if cflags else native.simd_build()[1], "the CPU L1-norm kernels")
    i64, ptr, f32, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
    lib.sq_l1_norm_forward.restype = ctypes.c_int
    lib.sq_l1_norm_forward.argtypes = [ptr, ptr, ptr, i32, i64, i64, i64, i64, i32, f32, f32, f32, ptr, ptr, ptr,
                                       ptr, ptr, ptr, f32, ptr, ptr, ptr, ptr, i32]
    lib.sq_l1_norm_backward.restype = ctypes.c_int
    lib.sq_l1_norm_backward.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, i32, i64, i64, i64, i64, i32, f32, f32, f32,
                                        f32, ctypes.c_int32, ptr, ptr, ptr, ptr, ptr, i64, i32]
    lib.sq_l1_norm_chunk_sums.restype = None
    lib.sq_l1_norm_chunk_sums.argtypes = [ptr, i64, i64, ptr, ptr]
    return lib


def _blocks(shape: Sequence[int], dims: Sequence[int]) -> Optional[List[int]]:
    """Each dim's block in ``[A, R1, B, R2]`` (0-3, see :func:`slice_layout`), or ``None``."""
    pattern, block, k = [True, False, True, False], [], 0      # R2, B, R1, A: from the last dim
    for d in reversed(range(len(shape))):
        while k < 4 and pattern[k] != (d in dims):
            k += 1
        if k == 4:
            return None
        block.append(3 - k)
    return block[::-1]


def slice_layout(shape: Sequence[int], dims: Sequence[int]) -> Optional[List[int]]:
    """``[A, R1, B, R2]`` for a contiguous tensor of ``shape`` reduced over ``dims``: the
    trailing reduced dims are ``R2``, the kept dims before them ``B``, the reduced dims before
    those ``R1`` and the rest ``A`` (each 1 when it has no dims).  ``None`` when the dims do
    not fall into those four blocks."""
    block = _blocks(shape, dims)
    if block is None:
        return None
    sizes = [1, 1, 1, 1]
    for d, k in enumerate(block):
        sizes[k] *= shape[d]
    return sizes


def param_sum_shape(shape: Sequence[int], dims: Sequence[int], row: bool) -> List[int]:
    """The shape of the backward's parameter sums: per slice (``dims`` kept as 1), or with
    ``row`` per position along the rows (1 everywhere but the ``R2`` dims)."""
    block = _blocks(shape, dims)
    return [s if (block[d] == 3 if row else d not in dims) else 1 for d, s in enumerate(shape)]


def affine_mode(shape: Sequence[int], dims: Sequence[int], t: Optional[torch.Tensor]) -> Optional[str]:
    """``"slice"`` when the parameter ``t`` (broadcasting against ``shape``) is one value per
    slice, ``"row"`` when it is one per position along the rows (``R2``) shared by all
    slices (a LayerNorm's), ``None`` otherwise (or when there is no parameter)."""
    if t is None or t.dim() > len(shape):
        return None
    full = [1] * (len(shape) - t.dim()) + list(t.shape)
    block = _blocks(shape, dims)
    if all(full[d] == 1 for d in dims):
        return "slice"
    if block is not None and all(full[d] == (shape[d] if block[d] == 3 else 1) for d in range(len(shape))):
        return "row"
    return None


def unsupported(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                dims: Sequence[int], norm_bits: Optional[int], stats: Optional[str]) -> Optional[str]:
    """Why this L1 norm (batch statistics) cannot run on the kernels, or ``None``.

    Symbolic sizes (``dynamic=True``) are taken: the checks on sizes below (the rows' length,
    the element count, the affine's shape) then become guards of the compiled graph, so an
    input outside them recompiles, and that graph keeps the norm on its ops."""
    if norm_bits is None:
        return "float L1 norm (quantize=False)"
    if stats is not None:
        return "collect_stats=True observes the quantizers one by one"
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return f"{x.dtype} on {x.device.type} (the kernels take float32 on CPU)"
    if not x.is_contiguous():
        return "the input is not contiguous"
    layout = slice_layout(x.shape, dims)
    if layout is None:
        return f"reduction dims {tuple(dims)} of a {x.dim()}-d input are not one (kept, reduced, kept, reduced) layout"
    if layout[3] < MIN_ROW:
        return f"runs of {layout[3]} adjacent values (the kernels vectorize along runs of at least {MIN_ROW})"
    if x.numel() >= 2 ** 31:
        return "2**31 elements or more (the gradient's noise indexes in int32)"
    modes = set()
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        mode = affine_mode(x.shape, dims, t)
        if t.dtype != torch.float32 or mode is None:
            return f"the {name} is neither one float32 value per slice nor one per position along the rows"
        modes.add(mode)
    if len(modes) > 1 or (modes == {"row"} and weight is None):
        return "the weight and the bias are not both per slice or both per position along the rows"
    usable, why = status()
    return None if usable else why


def _flat(t: Optional[torch.Tensor], shape, dims) -> Tuple[Optional[torch.Tensor], bool]:
    """``(values, row)``: a parameter as the kernels read it, a contiguous ``[A * B]`` vector
    (per slice) or ``[R2]`` (per position along the rows, ``row``)."""
    if t is None:
        return None, False
    row = affine_mode(shape, dims, t) == "row"
    return t.expand(param_sum_shape(shape, dims, row)).contiguous().reshape(-1), row


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
    ``seed``; the sums (the bias's and the weight's gradients) of :func:`param_sum_shape`:
    per slice, or per position along the rows when ``weight`` is a LayerNorm's (summed
    over the slices that share a parameter by the caller)."""
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
    shape = param_sum_shape(dy.shape, dims, affine_mode(dy.shape, dims, weight) == "row")
    return dx, dyd.sum_to_size(shape), (dyd * xhat).sum_to_size(shape)


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _forward(x, weight, bias, dims, center, l1_scale, eps, bits, out_bits: Optional[int], write_y: bool = True,
             out_groups: int = 1):
    """Run the forward kernel: ``(y, q, amax, total, deviation)``, or with ``out_bits``
    ``(yq, y_scale, y_amax, y, q, amax, total, deviation)``, ``y`` quantized per slice
    (``y`` empty unless ``write_y``), or with ``out_groups > 1`` too ``(e, base, outer, y,
    ...)``: ``y`` quantized as the next GEMM's ``act_groups`` quantizer
    (:func:`cpu_l1_norm_shiftquant`)."""
    layout = slice_layout(x.shape, dims)
    x = x.contiguous()
    q = pool.OUTPUTS.empty(x.shape, torch.int8)
    stat_shape = param_sum_shape(x.shape, dims, False)
    stat = [torch.empty(stat_shape, dtype=torch.float32) for _ in range(3)]
    y = pool.OUTPUTS.empty(x.shape, torch.float32) if write_y else x.new_empty((0,))
    shift = out_bits is not None and out_groups > 1
    if out_bits is None:
        outs = (y,)
    elif shift:             # e and base come from sq_shiftquant_quotients after the kernel
        outs = (None, None, torch.empty(stat_shape), y)
    else:
        outs = (pool.OUTPUTS.empty(x.shape, torch.int8), torch.empty(stat_shape), torch.empty(stat_shape), y)
    if x.numel() == 0:
        if shift:
            outs = (x.new_zeros(x.shape, dtype=torch.int8), x.new_full((), float("nan")), outs[2].zero_(), y)
            return (*outs, q, *(t.zero_() for t in stat))
        return (*(t.zero_() for t in outs), q, *(t.zero_() for t in stat))
    yq, y_scale, y_amax = outs[:3] if out_bits is not None else (None, None, None)
    threads = torch.get_num_threads()
    rows = (x.numel() // layout[3], layout[3])            # y's rows, as the next GEMM's [1, rows, row]
    yx, work, ends = cpu_quant.quotient_buffers(rows, 1, threads) if shift else (None, None, None)
    (w, row), (b, _) = _flat(weight, x.shape, dims), _flat(bias, x.shape, dims)
    failed = _library().sq_l1_norm_forward(
        x.data_ptr(), _ptr(w), _ptr(b), int(row), *layout, int(center), l1_scale, eps, float(N.qmax(bits)),
        y.data_ptr() if write_y else None, q.data_ptr(), *(t.data_ptr() for t in stat), _ptr(yq),
        float(N.qmax(out_bits or bits)), _ptr(y_amax), _ptr(y_scale), _ptr(yx), _ptr(work), threads)
    if failed:
        raise MemoryError(f"sqcompile::cpu_l1_norm_quantized: no memory for a row of {layout[3]} floats")
    if shift:
        e, base = cpu_quant.shiftquant_quotients(yx, work, ends, 1, out_bits, out_groups)
        outs = (e.view(x.shape), base, *outs[2:])
    return (*outs, q, *stat)


@ops.custom_op("sqcompile::cpu_l1_norm")
def cpu_l1_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], dims: List[int],
                center: bool, l1_scale: float, eps: float, bits: int
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The quantized L1 norm's forward on the C kernel: ``(y, q, amax, total, deviation)`` as
    :func:`l1_norm_reference` (the input's int8 ``q`` and per-slice maxima, sum and absolute
    deviation are what the backward takes).  ``x`` float32, contiguous, with
    :func:`slice_layout`; ``weight`` / ``bias`` one value per slice or per position along the
    rows (:func:`affine_mode`), or None."""
    return _forward(x, weight, bias, dims, center, l1_scale, eps, bits, None)


@cpu_l1_norm.register_fake
def _(x, weight, bias, dims, center, l1_scale, eps, bits):
    stat = param_sum_shape(x.shape, dims, False)
    return (torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape, dtype=torch.int8),
            x.new_empty(stat), x.new_empty(stat), x.new_empty(stat))


def rows_only(shape: Sequence[int], dims: Sequence[int]) -> bool:
    """Is each slice of the L1 norm over ``dims`` one run of adjacent values (``R1 == 1``:
    a LayerNorm's or RMSNorm's rows), what :func:`cpu_l1_norm_quantized` takes?"""
    layout = slice_layout(shape, dims)
    return layout is not None and layout[1] == 1


@ops.custom_op("sqcompile::cpu_l1_norm_quantized")
def cpu_l1_norm_quantized(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                          dims: List[int], center: bool, l1_scale: float, eps: float, bits: int, out_bits: int,
                          write_y: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                  torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`cpu_l1_norm` whose output ``y`` also goes straight into the next GEMM's
    per-row quantizer (``numerics.quantize(y, out_bits, rows)``, nearest): ``(yq, y_scale,
    y_amax, y, q, amax, total, deviation)``, ``yq`` / ``y_scale`` that quantizer's results bit
    for bit, ``y_amax`` its row maxima, ``y`` written only when ``write_y`` (else empty: the
    quantizer was its only reader).  The slices must be rows (:func:`rows_only`)."""
    if not rows_only(x.shape, dims):
        raise ValueError(f"cpu_l1_norm_quantized: dims {list(dims)} of a {tuple(x.shape)} input are not rows")
    return _forward(x, weight, bias, dims, center, l1_scale, eps, bits, out_bits, write_y)


@cpu_l1_norm_quantized.register_fake
def _(x, weight, bias, dims, center, l1_scale, eps, bits, out_bits, write_y):
    stat = param_sum_shape(x.shape, dims, False)
    y = torch.empty_like(x, memory_format=torch.contiguous_format) if write_y else x.new_empty((0,))
    return (x.new_empty(x.shape, dtype=torch.int8), x.new_empty(stat), x.new_empty(stat), y,
            x.new_empty(x.shape, dtype=torch.int8), x.new_empty(stat), x.new_empty(stat), x.new_empty(stat))


@ops.custom_op("sqcompile::cpu_l1_norm_shiftquant")
def cpu_l1_norm_shiftquant(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                           dims: List[int], center: bool, l1_scale: float, eps: float, bits: int, out_bits: int,
                           out_groups: int, write_y: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                    torch.Tensor, torch.Tensor, torch.Tensor,
                                                                    torch.Tensor, torch.Tensor]:
    """:func:`cpu_l1_norm_quantized` with the next GEMM's ``act_groups`` quantizer instead of
    the per-row one: :func:`sqcompile.ops.shiftquant_outer`'s composition with nearest
    rounding over ``y`` as ``[1, rows, D]`` (each row's maximum, 0 taken as 1, then ShiftQuant
    of the quotients with ``out_groups`` groups and one channel per column):
    ``(e, base, outer, y, q, amax, total, deviation)``, ``e`` / ``base`` / ``outer`` that
    composition's results on the kernel's ``y`` bit for bit (``outer`` ``[..., 1]``, as
    ``amax``).  The slices must be rows (:func:`rows_only`); ``out_bits`` and ``out_groups``
    must fit int8 (:func:`sqcompile.numerics.fits_int8`)."""
    if not rows_only(x.shape, dims):
        raise ValueError(f"cpu_l1_norm_shiftquant: dims {list(dims)} of a {tuple(x.shape)} input are not rows")
    if out_groups < 2 or not N.fits_int8(out_bits, out_groups):
        raise ValueError(f"cpu_l1_norm_shiftquant: out_groups={out_groups} at out_bits={out_bits} is not 2 or "
                         "more groups whose expanded integers fit int8")
    return _forward(x, weight, bias, dims, center, l1_scale, eps, bits, out_bits, write_y, out_groups)


@cpu_l1_norm_shiftquant.register_fake
def _(x, weight, bias, dims, center, l1_scale, eps, bits, out_bits, out_groups, write_y):
    stat = param_sum_shape(x.shape, dims, False)
    y = torch.empty_like(x, memory_format=torch.contiguous_format) if write_y else x.new_empty((0,))
    return (x.new_empty(x.shape, dtype=torch.int8), x.new_empty(()), x.new_empty(stat), y,
            x.new_empty(x.shape, dtype=torch.int8), x.new_empty(stat), x.new_empty(stat), x.new_empty(stat))


@ops.custom_op("sqcompile::cpu_l1_norm_backward")
def cpu_l1_norm_backward(dy: torch.Tensor, q: torch.Tensor, amax: torch.Tensor, total: torch.Tensor,
                         deviation: torch.Tensor, weight: Optional[torch.Tensor], seed: torch.Tensor, dims: List[int],
                         center: bool, l1_scale: float, eps: float, norm_bits: int, grad_bits: int, need_dx: bool,
                         residual: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The quantized L1 norm's backward on the C kernel: ``(dx, sum_dy, sum_dyx)`` as
    :func:`l1_norm_backward_reference` (``dx`` empty when not ``need_dx``).  With
    ``residual`` (float32, ``dy``'s shape), ``dx + residual`` in place of ``dx``: the add of a
    pre-norm block's residual gradient, bit for bit, without writing ``dx`` first."""
    layout = slice_layout(dy.shape, dims)
    dy = dy.contiguous()
    dx = pool.OUTPUTS.empty(dy.shape, torch.float32) if need_dx else dy.new_empty((0,))
    w, row = _flat(weight, dy.shape, dims)
    sum_dy, sum_dyx = (torch.zeros(param_sum_shape(dy.shape, dims, row), dtype=torch.float32) for _ in range(2))
    if dy.numel() == 0:
        return dx, sum_dy, sum_dyx
    if residual is not None and (not need_dx or residual.shape != dy.shape or residual.dtype != torch.float32):
        raise ValueError(f"cpu_l1_norm_backward: residual must be a float32 tensor of dy's shape {tuple(dy.shape)} "
                         f"(and need_dx true), got {residual.dtype} {tuple(residual.shape)}")
    residual = None if residual is None else residual.contiguous()
    slices = layout[0] * layout[2]
    chunks = min(slices, CHUNKS) if row else slices
    work = torch.zeros((chunks, 2, layout[3]) if row else (0,), dtype=torch.float64)
    lib = _library()
    failed = lib.sq_l1_norm_backward(
        dy.data_ptr(), q.contiguous().data_ptr(), *(t.contiguous().data_ptr() for t in (amax, total, deviation)),
        _ptr(w), int(row), *layout, int(center), l1_scale, eps, float(N.qmax(norm_bits)), float(N.qmax(grad_bits)),
        _spread_seed(seed), _ptr(residual), dx.data_ptr() if need_dx else None, sum_dy.data_ptr(), sum_dyx.data_ptr(),
        work.data_ptr(), chunks, torch.get_num_threads())
    if failed:
        raise MemoryError(f"sqcompile::cpu_l1_norm_backward: no memory for a slice of {layout[1] * layout[3]} bytes")
    if row:
        lib.sq_l1_norm_chunk_sums(work.data_ptr(), chunks, layout[3], sum_dy.data_ptr(), sum_dyx.data_ptr())
    return dx, sum_dy, sum_dyx


@cpu_l1_norm_backward.register_fake
def _(dy, q, amax, total, deviation, weight, seed, dims, center, l1_scale, eps, norm_bits, grad_bits, need_dx,
      residual=None):
    shape = param_sum_shape(dy.shape, dims, affine_mode(dy.shape, dims, weight) == "row")
    dx = torch.empty_like(dy, memory_format=torch.contiguous_format) if need_dx else dy.new_empty((0,))
    return dx, dy.new_empty(shape), dy.new_empty(shape)


__all__ = ["affine_mode", "cpu_l1_norm", "cpu_l1_norm_backward", "cpu_l1_norm_quantized", "l1_norm_backward_reference",
           "l1_norm_reference", "param_sum_shape", "rows_only", "slice_layout", "status", "unsupported", "SOURCE"]
