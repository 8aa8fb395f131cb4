"""The Triton kernel family as custom ops, and the ``"triton"`` :class:`~sqcompile.ops.KernelSet`.

``sqcompile::triton_quantize``, ``triton_shiftquant``, ``triton_dequantize`` and
``triton_int8_mm`` have exactly the schemas and semantics of the generic ops in
:mod:`sqcompile.ops` (``quantize``, ``shiftquant``, ``dequantize``, ``int8_mm``); their fake
implementations *are* the generic ops' (the fake impl calls the generic op, which under
FakeTensorMode dispatches to its own fake), so shapes, dtypes and strides cannot drift apart,
and the quantizers carry the same ``nondeterministic_seeded`` tag (``ops._RANDOM``).
They stay distinct ops, not kernels registered onto the generic ones, so a graph shows which
family each node uses and the ``"torch"`` family stays available next to ``"triton"``.
``triton_l1_norm`` / ``triton_l1_norm_quantized`` / ``triton_l1_norm_backward`` have no
generic twin: they are one-kernel versions of :mod:`sqcompile.norms`' L1 norm over rows,
called by it when the norm's kernel family is ``"triton"``
(:mod:`sqcompile.kernels.triton_norm`).

The kernels are launched from plain op bodies (:func:`sqcompile.ops.custom_op`, a low-overhead
``torch.library`` registration; ``triton_op`` cannot be traced under Triton's CPU interpreter).  They run on CUDA tensors, and on CPU tensors only
through Triton's interpreter (``TRITON_INTERPRET=1``, slow, meant for tests).  The kernel
modules are imported on first use, not here: ``@triton.jit`` decides between compiled and
interpreted kernels when the module defining them is imported, so importing this module early
(``sqcompile.kernels`` does) never fixes that choice, and never fails on a CPU-only machine.
"""
from __future__ import annotations

import functools
import importlib
import math
import os
from typing import List, Optional, Tuple

import torch

from .. import ops

UNAVAILABLE = "Triton needs CUDA, or TRITON_INTERPRET=1 to run its interpreter on CPU"


@functools.lru_cache(maxsize=None)
def triton_version() -> Tuple[int, int]:
    """The installed Triton's ``(major, minor)``, read from its package metadata (no import;
    ``(0, 0)`` when unknown).  Some kernel choices depend on it (``triton_fused.store_from_reduced``,
    ``triton_quant``'s division)."""
    from importlib import metadata
    try:
        major, minor, *_ = metadata.version("triton").split(".")
        return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)
    except (metadata.PackageNotFoundError, ValueError):
        return (0, 0)


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_available() -> Tuple[bool, str]:
    """``(True, what runs the kernels)`` or ``(False, why not)``.

    True on CUDA; on a CPU-only machine only when ``TRITON_INTERPRET=1`` is set (before the
    kernel modules are first imported)."""
    try:
        import triton  # noqa: F401
    except ImportError as e:  # pragma: no cover - triton is a dependency
        return False, f"Triton is not importable: {e}"
    if torch.cuda.is_available():
        return True, f"CUDA ({torch.cuda.get_device_name()})"
    if not _interpret_requested():
        return False, UNAVAILABLE
    quant = importlib.import_module(".triton_quant", __package__)
    if not quant.INTERPRETED:
        return False, ("TRITON_INTERPRET=1 was set after the Triton kernels were defined; set it before "
                       "the first Triton op runs (e.g. in conftest.py or the environment)")
    return True, "Triton interpreter on CPU (TRITON_INTERPRET=1; slow, for tests)"


@functools.lru_cache(maxsize=None)      # looked up once: every op call goes through these
def _quant():
    return importlib.import_module(".triton_quant", __package__)


@functools.lru_cache(maxsize=None)
def _gemm():
    return importlib.import_module(".triton_gemm", __package__)


def _check_device(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.device.type == "cuda":
            continue
        ok, reason = triton_available() if t.device.type == "cpu" else (False, "only CUDA and CPU are supported")
        if not ok:
            raise RuntimeError(f"sqcompile Triton kernels cannot run on {t.device}: {reason}")


@ops.custom_op("sqcompile::triton_quantize", tags=ops._RANDOM)
def triton_quantize(x: torch.Tensor, bits: int, keep_dims: List[int], stochastic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``sqcompile::quantize`` on Triton."""
    _check_device(x)
    return _quant().quantize(x, bits, keep_dims, stochastic)


@triton_quantize.register_fake
def _(x, bits, keep_dims, stochastic):
    return torch.ops.sqcompile.quantize(x, bits, keep_dims, stochastic)


@ops.custom_op("sqcompile::triton_shiftquant", tags=ops._RANDOM)
def triton_shiftquant(x: torch.Tensor, bits: int, groups: int, channel_dims: List[int], stochastic: bool,
                      prescale: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``sqcompile::shiftquant`` on Triton."""
    _check_device(x)
    return _quant().shiftquant(x, bits, groups, channel_dims, stochastic, prescale=prescale)


@triton_shiftquant.register_fake
def _(x, bits, groups, channel_dims, stochastic, prescale=None):
    return torch.ops.sqcompile.shiftquant(x, bits, groups, channel_dims, stochastic, prescale)


@ops.custom_op("sqcompile::triton_shiftquant_fused", tags=ops._RANDOM)
def triton_shiftquant_fused(x: torch.Tensor, ranges: Optional[torch.Tensor], bits: int, groups: int,
                            channel_dims: List[int], stochastic: bool, prescale: Optional[torch.Tensor] = None,
                            transposed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``sqcompile::shiftquant`` as the lowering passes rewrite it (:mod:`sqcompile.backends.fusion`):
    ``ranges``, when given, are ``x``'s channel ranges (``max |x|`` per channel over the other
    dims, NaN as +inf, float32, row-major over ``channel_dims``) computed by its producer, a
    fused GEMM region (one pass over ``x`` instead of two); ``transposed`` stores the result
    with its last two dims swapped in memory, for the GEMM that reads it transposed."""
    _check_device(x, *([] if ranges is None else [ranges]))
    return _quant().shiftquant(x, bits, groups, channel_dims, stochastic, prescale=prescale, ranges=ranges,
                               transposed=transposed)


@triton_shiftquant_fused.register_fake
def _(x, ranges, bits, groups, channel_dims, stochastic, prescale=None, transposed=False):
    e, base = torch.ops.sqcompile.shiftquant(x, bits, groups, channel_dims, stochastic, prescale)
    return (e.mT.contiguous().mT if transposed else e), base


def pair_dims(nd: int) -> Tuple[List[int], List[int]]:
    """The channel dims of :func:`triton_shiftquant_pair`'s two quantizers of an ``nd``-dim
    tensor: the columns of each matrix (every dim but the second to last) and its rows
    (every dim but the last)."""
    lead = list(range(nd - 2))
    return lead + [nd - 1], lead + [nd - 2]


@ops.custom_op("sqcompile::triton_shiftquant_outer", tags=ops._RANDOM)
def triton_shiftquant_outer(x: torch.Tensor, bits: int, groups: int, channel_dims: List[int], outer_dims: List[int],
                            stochastic: bool, prescale: Optional[torch.Tensor] = None,
                            transposed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sqcompile.ops.shiftquant_outer` on Triton (``grad_outer_scale``;
    :func:`~sqcompile.kernels.triton_quant.shiftquant_outer`): ``(expanded, base * r)``.
    ``transposed`` as in :func:`triton_shiftquant_fused`."""
    _check_device(x)
    return _quant().shiftquant_outer(x, bits, groups, channel_dims, outer_dims, stochastic, prescale=prescale,
                                     transposed=transposed)


@triton_shiftquant_outer.register_fake
def _(x, bits, groups, channel_dims, outer_dims, stochastic, prescale=None, transposed=False):
    quantizer = torch.ops.sqcompile.shiftquant
    e, s = ops.shiftquant_outer(quantizer, x, bits, groups, channel_dims, outer_dims, stochastic, prescale)
    return (e.mT.contiguous().mT if transposed else e), s


@ops.custom_op("sqcompile::triton_shiftquant_pair", tags=ops._RANDOM)
def triton_shiftquant_pair(x: torch.Tensor, cols_ranges: Optional[torch.Tensor], rows_ranges: Optional[torch.Tensor],
                           bits: int, groups: int, stochastic: bool, cols_prescale: Optional[torch.Tensor] = None,
                           rows_prescale: Optional[torch.Tensor] = None, rows_transposed: bool = False,
                           outer: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two ``sqcompile::shiftquant`` of one contiguous ``x`` ``[..., M, N]`` as the lowering
    passes merge them (:mod:`sqcompile.backends.fusion`): along its columns (channel dims
    every dim but the second to last) and along its rows (every dim but the last), reading
    ``x`` once per pass: ``(e_cols, base_cols, e_rows, base_rows)``.  ``*_ranges`` and
    ``rows_transposed`` as in :func:`triton_shiftquant_fused`.  ``outer``: two
    :func:`triton_shiftquant_outer` instead (one scale per row for the columns' quantizer,
    per column for the rows'; no ranges given)."""
    _check_device(x, *[r for r in (cols_ranges, rows_ranges) if r is not None])
    return _quant().shiftquant_pair(x, bits, groups, stochastic, prescales=(cols_prescale, rows_prescale),
                                    ranges=(cols_ranges, rows_ranges), rows_transposed=rows_transposed, outer=outer)


@triton_shiftquant_pair.register_fake
def _(x, cols_ranges, rows_ranges, bits, groups, stochastic, cols_prescale=None, rows_prescale=None,
      rows_transposed=False, outer=False):
    cols, rows = pair_dims(x.dim())
    if outer:
        e_cols, s_cols = torch.ops.sqcompile.triton_shiftquant_outer(x, bits, groups, cols, rows, stochastic,
                                                                     cols_prescale)
        e_rows, s_rows = torch.ops.sqcompile.triton_shiftquant_outer(x, bits, groups, rows, cols, stochastic,
                                                                     rows_prescale, rows_transposed)
        return e_cols, s_cols, e_rows, s_rows
    e_cols, base_cols = torch.ops.sqcompile.shiftquant(x, bits, groups, cols, stochastic, cols_prescale)
    e_rows, base_rows = torch.ops.sqcompile.shiftquant(x, bits, groups, rows, stochastic, rows_prescale)
    return e_cols, base_cols, (e_rows.mT.contiguous().mT if rows_transposed else e_rows), base_rows


@ops.custom_op("sqcompile::triton_dequantize")
def triton_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``sqcompile::dequantize`` on Triton."""
    _check_device(q, scale)
    return _quant().dequantize(q, scale, dtype)


@triton_dequantize.register_fake
def _(q, scale, dtype):
    return torch.ops.sqcompile.dequantize(q, scale, dtype)


@ops.custom_op("sqcompile::triton_int8_mm")
def triton_int8_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sqcompile::int8_mm`` on Triton (operands with >= 2 dims, batch dims broadcast)."""
    _check_device(a, b)
    return _int8_mm(a, b)


def _int8_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int16 operands (ShiftQuant's wide expanded form) are split into int8 digits,
    ``e = hi * 128 + lo`` (``ops._split_int16``), and the two products combined in int32."""
    if a.dtype == torch.int16:
        hi, lo = ops._split_int16(a)
        return _int8_mm(hi, b) * 128 + _int8_mm(lo, b)
    if b.dtype == torch.int16:
        hi, lo = ops._split_int16(b)
        return _int8_mm(a, hi) * 128 + _int8_mm(a, lo)
    return _gemm().int8_mm(a, b)


@triton_int8_mm.register_fake
def _(a, b):
    return torch.ops.sqcompile.int8_mm(a, b)


@ops.custom_op("sqcompile::triton_scaled_int8_mm")
def triton_scaled_int8_mm(qa: torch.Tensor, sa: torch.Tensor, qb: torch.Tensor, sb: torch.Tensor,
                          dtype: torch.dtype) -> torch.Tensor:
    """``(qa @ qb) * sa * sb`` in ``dtype``: int8 GEMM with the dequantization in its epilogue
    (``sa`` broadcasts to ``[..., M, 1]``, ``sb`` to ``[..., 1, N]``; float32 arithmetic)."""
    _check_device(qa, qb, sa, sb)
    return _gemm().scaled_int8_mm(qa, sa, qb, sb, out_dtype=dtype)


@triton_scaled_int8_mm.register_fake
def _(qa, sa, qb, sb, dtype):
    batch = torch.broadcast_shapes(qa.shape[:-2], qb.shape[:-2])
    return qa.new_empty((*batch, qa.shape[-2], qb.shape[-1]), dtype=dtype)


@functools.lru_cache(maxsize=None)
def _norm():
    return importlib.import_module(".triton_norm", __package__)


@ops.custom_op("sqcompile::triton_l1_norm")
def triton_l1_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], norm_bits: int,
                   center: bool, l1_scale: float, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                      torch.Tensor, torch.Tensor]:
    """Fully-quantized L1 norm of each row of ``x`` ``[R, L]``: ``(y, q, scale, mean, inv)``
    (:mod:`sqcompile.kernels.triton_norm`)."""
    _check_device(x)
    return _norm().l1_norm(x, weight, bias, norm_bits, center, l1_scale, eps)


def _rows_like(x: torch.Tensor, n: int) -> List[torch.Tensor]:
    return [x.new_empty((x.shape[0], 1), dtype=torch.float32) for _ in range(n)]


@triton_l1_norm.register_fake
def _(x, weight, bias, norm_bits, center, l1_scale, eps):
    return (torch.empty_like(x), torch.empty_like(x, dtype=torch.int8), *_rows_like(x, 3))


@ops.custom_op("sqcompile::triton_l1_norm_quantized")
def triton_l1_norm_quantized(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                             norm_bits: int, center: bool, l1_scale: float, eps: float,
                             out_bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                     torch.Tensor, torch.Tensor]:
    """:func:`triton_l1_norm` whose output is quantized per row (nearest, ``out_bits``) in the
    kernel: ``(qy, sy, q, scale, mean, inv)``; the float output is never written."""
    _check_device(x)
    return _norm().l1_norm_quantized(x, weight, bias, norm_bits, center, l1_scale, eps, out_bits)


@triton_l1_norm_quantized.register_fake
def _(x, weight, bias, norm_bits, center, l1_scale, eps, out_bits):
    q = torch.empty_like(x, dtype=torch.int8)
    qy, sy, scale, mean, inv = torch.empty_like(q), *_rows_like(x, 4)
    return qy, sy, q, scale, mean, inv


@ops.custom_op("sqcompile::triton_l1_norm_backward", tags=ops._RANDOM)
def triton_l1_norm_backward(dy: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor,
                            inv: torch.Tensor, weight: Optional[torch.Tensor], grad_bits: int, center: bool,
                            l1_scale: float, need_weight_grad: bool,
                            need_bias_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dweight, dbias)`` of :func:`triton_l1_norm` (the gradient quantized per row with
    stochastic rounding first); ``dweight`` / ``dbias`` are float32 ``[L]``, empty when not needed."""
    _check_device(dy)
    return _norm().l1_norm_backward(dy, q, scale, mean, inv, weight, grad_bits, center, l1_scale,
                                    need_weight_grad, need_bias_grad)


@triton_l1_norm_backward.register_fake
def _(dy, q, scale, mean, inv, weight, grad_bits, center, l1_scale, need_weight_grad, need_bias_grad):
    L = dy.shape[-1]
    sums = [dy.new_empty((L if need else 0,), dtype=torch.float32) for need in (need_weight_grad, need_bias_grad)]
    return (torch.empty_like(dy, memory_format=torch.contiguous_format), *sums)


@ops.custom_op("sqcompile::triton_l1_norm_backward_residual", tags=ops._RANDOM)
def triton_l1_norm_backward_residual(dy: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor,
                                     inv: torch.Tensor, weight: Optional[torch.Tensor], residual: torch.Tensor,
                                     grad_bits: int, center: bool, l1_scale: float, need_weight_grad: bool,
                                     need_bias_grad: bool, ranges: bool, sums: bool
                                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                torch.Tensor]:
    """:func:`triton_l1_norm_backward` with the residual gradient added in the kernel, as the
    lowering puts it in place of the norm's backward and the add after it
    (:mod:`sqcompile.backends.norm_fusion`): ``(dx + residual, dweight, dbias, column ranges,
    row ranges, column sums)``, the last three of the sum (ShiftQuant ranges, float32; its
    sum over the rows in its dtype) where ``ranges`` / ``sums`` ask, else empty."""
    _check_device(dy, residual)
    return _norm().l1_norm_backward_residual(dy, q, scale, mean, inv, weight, residual, grad_bits, center, l1_scale,
                                             need_weight_grad, need_bias_grad, ranges, sums)


@triton_l1_norm_backward_residual.register_fake
def _(dy, q, scale, mean, inv, weight, residual, grad_bits, center, l1_scale, need_weight_grad, need_bias_grad,
      ranges, sums):
    R, L = dy.shape
    f32 = torch.float32
    return (torch.empty_like(dy, memory_format=torch.contiguous_format),
            *[dy.new_empty((L if need else 0,), dtype=f32) for need in (need_weight_grad, need_bias_grad)],
            dy.new_empty((L if ranges else 0,), dtype=f32), dy.new_empty((R if ranges else 0,), dtype=f32),
            dy.new_empty((L if sums else 0,)))


@functools.lru_cache(maxsize=None)
def _attention():
    return importlib.import_module(".triton_attention", __package__)


@ops.custom_op("sqcompile::triton_attention")
def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
                     causal: bool, bits: int, p_bits: Optional[int] = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                torch.Tensor, torch.Tensor]:
    """Fused quantized attention over ``[B, H, L, D]`` / ``[B, H, S, D]`` / ``[B, H, S, D]`` (any
    strides; or the same without ``B``), with an optional boolean or additive ``mask`` ``[O,
    H_in, L, S]`` (``O * H_in == B * H``; strides 0 where it broadcasts)
    (:mod:`sqcompile.kernels.triton_attention`): ``(out, qq, sq, qk, sk, qv, sv, stats)``, the
    output (laid out by ``attention_out``) and what :func:`triton_attention_backward` needs
    (the int8 operands contiguous).  ``bits``: ``Q``, ``K`` and ``V``'s; ``p_bits``: the
    probabilities' (default ``bits``)."""
    _check_device(q, k, v)
    return _attention().attention_forward(q, k, v, mask, scale, causal, bits, p_bits=p_bits)


@triton_attention.register_fake
def _(q, k, v, mask, scale, causal, bits, p_bits=None):
    out = _attention().attention_out(q if q.dim() == 4 else q.unsqueeze(0))
    i8, f32 = torch.int8, torch.float32
    return (out if q.dim() == 4 else out.squeeze(0), q.new_empty(q.shape, dtype=i8),
            q.new_empty((*q.shape[:-1], 1), dtype=f32), k.new_empty(k.shape, dtype=i8),
            k.new_empty((*k.shape[:-1], 1), dtype=f32), v.new_empty(v.shape, dtype=i8),
            v.new_empty((*v.shape[:-2], 1, v.shape[-1]), dtype=f32),
            q.new_empty((3, q.numel() // (q.shape[-2] * q.shape[-1]), q.shape[-2]), dtype=f32))


@ops.custom_op("sqcompile::triton_attention_backward", tags=ops._RANDOM)
def triton_attention_backward(grad_out: torch.Tensor, qq: torch.Tensor, sq: torch.Tensor, qk: torch.Tensor,
                              sk: torch.Tensor, qv: torch.Tensor, sv: torch.Tensor, stats: torch.Tensor,
                              mask: Optional[torch.Tensor], scale: float, causal: bool, bits: int, grad_bits: int,
                              groups: int, outer: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of :func:`triton_attention`, its gradients ShiftQuant-ed with
    stochastic rounding (``outer``: with ``grad_outer_scale``'s outer scales); ``bits`` are
    the probabilities' (``Q``, ``K``, ``V`` come quantized)."""
    _check_device(grad_out, qq, qk, qv)
    return _attention().attention_backward(grad_out, qq, sq, qk, sk, qv, sv, stats, mask, scale, causal, bits,
                                           grad_bits, groups, outer=outer)


@triton_attention_backward.register_fake
def _(grad_out, qq, sq, qk, sk, qv, sv, stats, mask, scale, causal, bits, grad_bits, groups, outer=False):
    return (qq.new_empty(qq.shape, dtype=grad_out.dtype), qk.new_empty(qk.shape, dtype=grad_out.dtype),
            qv.new_empty(qv.shape, dtype=grad_out.dtype))


@ops.custom_op("sqcompile::triton_attention_backward_packed", tags=ops._RANDOM)
def triton_attention_backward_packed(grad_out: torch.Tensor, qq: torch.Tensor, sq: torch.Tensor, qk: torch.Tensor,
                                     sk: torch.Tensor, qv: torch.Tensor, sv: torch.Tensor, stats: torch.Tensor,
                                     mask: Optional[torch.Tensor], scale: float, causal: bool, bits: int,
                                     grad_bits: int, groups: int, size: List[int], offsets: List[int],
                                     strides: List[int], ranges: bool = False, sums: bool = False,
                                     outer: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`triton_attention_backward`'s ``dq``, ``dk`` and ``dv`` written into one new
    contiguous tensor of ``size``: gradient ``i`` (``dq``, ``dk``, ``dv``) at element offset
    ``offsets[i]`` with strides ``strides[4 * i: 4 * i + 4]`` (``dk``'s and ``dv``'s the same),
    the three covering it.  A fused ``qkv`` projection's output gradient, which autograd
    otherwise assembles from the three with copies (``select_backward`` and adds, or
    ``cat``, then a contiguous copy; :mod:`sqcompile.backends.attention_grads` puts this op
    in their place).  ``(packed, feature ranges, token ranges, feature sums)``: with
    ``ranges``, the ShiftQuant ranges of ``packed`` seen as ``[tokens, features]`` (float32
    ``[features]``, ``[tokens]``, NaN as +inf) from the kernels' epilogues, for its two
    quantizers (``triton_shiftquant_fused``), else two empty tensors; with ``sums``,
    ``packed`` summed over the tokens (``[features]`` in its dtype, accumulated in float32:
    the projection's bias gradient), else an empty tensor.  ``outer`` as in
    :func:`triton_attention_backward`."""
    _check_device(grad_out, qq, qk, qv)
    _check_packing(qq, qk, size, offsets, strides)
    packed = grad_out.new_empty(size)
    grads = tuple(packed.as_strided(qq.shape, strides[4 * i: 4 * i + 4], offsets[i]) for i in range(3))
    tokens, features = _packed_ranges_shape(qq, size)
    dev, f32 = grad_out.device, torch.float32
    found = torch.zeros(features + tokens, dtype=torch.int32, device=dev) if ranges else None
    total = torch.empty(features, dtype=f32, device=dev) if sums else None
    _attention().attention_backward(grad_out, qq, sq, qk, sk, qv, sv, stats, mask, scale, causal, bits, grad_bits,
                                    groups, grads=grads, grad_ranges=found, grad_sums=total, outer=outer)
    total = total.to(grad_out.dtype) if sums else grad_out.new_empty((0,))
    if not ranges:
        return packed, grad_out.new_empty((0,), dtype=f32), grad_out.new_empty((0,), dtype=f32), total
    found = found.view(f32)
    return packed, found[:features].clone(), found[features:].clone(), total     # outputs must not alias


def _packed_ranges_shape(qq: torch.Tensor, size: List[int]) -> Tuple[int, int]:
    """``(tokens, features)`` of a packed gradient of ``size`` for ``qq`` ``[B, H, L, D]``."""
    tokens = qq.shape[0] * qq.shape[2]
    return tokens, math.prod(size) // tokens if isinstance(tokens, torch.SymInt) or tokens else 0


@triton_attention_backward_packed.register_fake
def _(grad_out, qq, sq, qk, sk, qv, sv, stats, mask, scale, causal, bits, grad_bits, groups, size, offsets, strides,
      ranges=False, sums=False, outer=False):
    tokens, features = _packed_ranges_shape(qq, size)
    f32 = torch.float32
    return (grad_out.new_empty(size), grad_out.new_empty((features if ranges else 0,), dtype=f32),
            grad_out.new_empty((tokens if ranges else 0,), dtype=f32), grad_out.new_empty((features if sums else 0,)))


def _check_packing(qq: torch.Tensor, qk: torch.Tensor, size: List[int], offsets: List[int],
                   strides: List[int]) -> None:
    """``ValueError`` unless three gradients shaped like ``qq`` (4-D, as many keys as queries) can
    fill a tensor of ``size`` at ``offsets`` / ``strides`` (element counts, non-negative
    strides, every element in bounds, ``dk``'s strides ``dv``'s; overlaps are the caller's,
    :mod:`sqcompile.backends.attention_grads`, to rule out)."""
    numel = math.prod(size)
    if qq.dim() != 4 or qq.shape != qk.shape or len(offsets) != 3 or len(strides) != 12 or 3 * qq.numel() != numel:
        raise ValueError(f"triton_attention_backward_packed: 3 gradients of shape {tuple(qq.shape)} (keys "
                         f"{tuple(qk.shape)}) cannot fill size {list(size)} with {len(offsets)} offsets and "
                         f"{len(strides)} strides")
    for i in range(3):
        st = strides[4 * i: 4 * i + 4]
        end = offsets[i] + sum((n - 1) * s for n, s in zip(qq.shape, st))
        if offsets[i] < 0 or min(st) < 0 or end >= numel:
            raise ValueError(f"triton_attention_backward_packed: gradient {i} at offset {offsets[i]}, strides {st} "
                             f"leaves a tensor of size {list(size)}")
    if strides[4:8] != strides[8:]:
        raise ValueError(f"triton_attention_backward_packed: dk and dv need the same strides, got {strides[4:8]} "
                         f"and {strides[8:]}")


ops.register_kernel_set("triton", ops.KernelSet(
    torch.ops.sqcompile.triton_quantize, torch.ops.sqcompile.triton_shiftquant,
    torch.ops.sqcompile.triton_dequantize, torch.ops.sqcompile.triton_int8_mm,
    torch.ops.sqcompile.triton_scaled_int8_mm, torch.ops.sqcompile.triton_shiftquant_outer))
