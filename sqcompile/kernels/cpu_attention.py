"""Quantized attention's softmax on CPU as C kernels: ``sqcompile::attention_probs``,
``sqcompile::attention_probs_backward`` and ``sqcompile::attention_ds_quantize``.

The unfused quantized attention (:func:`sqcompile.ops.quantized_sdpa`) dequantizes the int32
scores of ``Q K^T``, scales, masks and softmaxes them, and quantizes the probabilities ``P``
per row for ``P V``.  Inductor compiles that chain into five loop nests over the scores
(their causal mask and the row/column scales keep them apart; see the README's "CPU speed"),
which write and re-read the float scores several times: on a transformer step (8 heads of
64, sequence 256) that loop was 15% of the step and took 8x what :func:`attention_probs`
takes.  Its backward (dequantize ``dP``, softmax backward, mask, scale) was recomputed by
each loop of the ``dS`` quantizers that read it; :func:`attention_probs_backward` writes
``dS`` once, and :func:`ds_quantize` runs its two outer-scaled ShiftQuants in three passes
over it.  ``cpu_attention.c`` does each one row at a time, in cache, with AVX-512; the
lowering pass :mod:`sqcompile.backends.cpu_attention` puts them in the graphs.

The results are the unfused ops' except for ``exp``, which is within an ulp of the exact
value but not bit for bit PyTorch's (Inductor's and eager PyTorch's differ from each other
the same way), and the order of each row's sum: ``P`` and ``dS`` agree to a few ulps, and
``P``'s int8 quantization only where a value lands that close to a rounding boundary.
:func:`ds_quantize` has no ``exp``: it is the graph's composition bit for bit.  The
``*_reference`` functions are the unfused computations, which the ops run where the
kernels cannot (:func:`status`).
"""
from __future__ import annotations

import ctypes
import functools
import math
import os
import platform
from typing import Optional, Tuple

import torch

from .. import numerics as N
from .. import ops
from . import native, pool

SOURCE = os.path.join(os.path.dirname(__file__), "cpu_attention.c")
CFLAGS = ["-O2", "-fPIC", "-shared", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl"]
CPU_FLAGS = {"avx512f", "avx512bw", "avx512vl"}


@functools.lru_cache(maxsize=None)
def status() -> Tuple[bool, Optional[str]]:
    """``(usable, reason)`` for the kernels on this machine (checked and built once)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False, f"needs Linux on x86-64 (this is {platform.system()} on {platform.machine()})"
    missing = CPU_FLAGS - native.cpu_flags()
    if missing:
        return False, f"this CPU lacks {', '.join(sorted(missing))}"
    try:
        _library()
    except (OSError, RuntimeError) as e:
        return False, str(e)
    return True, None


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL:
    lib = native.build(SOURCE, CFLAGS, "the CPU attention kernel")
    i64, ptr, f32, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
    lib.sq_attention_probs.restype = None
    lib.sq_attention_probs.argtypes = [ptr, ptr, ptr, f32, i64, i64, i64, i32, f32, ptr, ptr, ptr, ptr, i32]
    lib.sq_attention_probs_backward.restype = None
    lib.sq_attention_probs_backward.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, f32, i64, i64, i64, ptr, i32]
    lib.sq_ds_ranges.restype = None
    lib.sq_ds_ranges.argtypes = [ptr, ptr, ptr, i64, i64, i64, ptr, ptr, ptr, ptr, i32]
    lib.sq_ds_quantize.restype = None
    lib.sq_ds_quantize.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i32, i32, f32, i64, i64, i64, ptr, ptr,
                                   i32]
    return lib


def _rows(scores: torch.Tensor, sa: Optional[torch.Tensor], sb: Optional[torch.Tensor]):
    """``(B, L, S)`` of the scores ``[..., L, S]``, and the scales as contiguous ``[B, L]`` /
    ``[B, S]`` float32 (``sa`` broadcasts to ``[..., L, 1]``, ``sb`` to ``[..., 1, S]``; None:
    ones, by which the kernels multiply exactly)."""
    *lead, L, S = scores.shape
    B = math.prod(lead)
    one = torch.ones((), dtype=torch.float32)
    sa = (one if sa is None else sa.to(torch.float32)).expand(*lead, L, 1).reshape(B, L).contiguous()
    sb = (one if sb is None else sb.to(torch.float32)).expand(*lead, 1, S).reshape(B, S).contiguous()
    return (B, L, S), sa, sb


def _recycled(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized contiguous ``shape`` tensor of ``dtype`` (4 or 1 bytes) from the pool of
    recycled outputs (:mod:`.pool`: no page faults on the large per-step tensors)."""
    n = math.prod(shape)
    words = n if dtype.itemsize == 4 else (n + 3) // 4
    return pool.OUTPUTS.empty((words,)).view(dtype)[:n].view(shape)


def _dequantized(acc: torch.Tensor, sa: Optional[torch.Tensor], sb: Optional[torch.Tensor]) -> torch.Tensor:
    """``acc.float() * (sa * sb)`` as the unfused graph computes it (with one of the two
    scales, by that one alone)."""
    scales = sb if sa is None else sa if sb is None else sa * sb
    return acc.to(torch.float32) if scales is None else acc.to(torch.float32) * scales


def attention_probs_reference(scores: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor, scale: float, causal: bool,
                              bits: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The unfused ops :func:`attention_probs` stands for: ``P = softmax(mask((scores * (sa *
    sb)) * scale))`` over the last dim, ``(q, q_scale) = numerics.quantize(P, bits, rows,
    nearest)``, ``amax = max |P|`` per row: ``(P, q, q_scale, amax)``."""
    x = _dequantized(scores, sa, sb) * scale
    if causal:
        L, S = x.shape[-2:]
        x = x.masked_fill(~torch.ones(L, S, dtype=torch.bool, device=x.device).tril(), float("-inf"))
    p = torch.softmax(x, dim=-1)
    rows = list(range(p.dim() - 1))
    q, q_scale = N.quantize(p, bits, rows, "nearest")
    return p, q, q_scale, N.amax(p, rows)


def attention_probs(scores: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor, scale: float, causal: bool,
                    bits: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`attention_probs_reference` on the AVX-512 kernel (``cpu_attention.c``) for int32
    ``scores`` ``[..., L, S]`` on CPU; ``sa`` broadcasts to ``[..., L, 1]``, ``sb`` to ``[...,
    1, S]``.  Runs the reference where :func:`status` says the kernel cannot."""
    if scores.device.type != "cpu" or scores.dtype != torch.int32 or not status()[0] or scores.numel() == 0:
        return attention_probs_reference(scores, sa, sb, scale, causal, bits)
    (B, L, S), sa2, sb2 = _rows(scores, sa, sb)
    acc = scores.contiguous()
    p = _recycled(scores.shape, torch.float32)
    q = _recycled(scores.shape, torch.int8)
    row_shape = (*scores.shape[:-1], 1)
    q_scale = torch.empty(row_shape, dtype=torch.float32)
    amax = torch.empty(row_shape, dtype=torch.float32)
    _library().sq_attention_probs(acc.data_ptr(), sa2.data_ptr(), sb2.data_ptr(), float(scale), B, L, S, int(causal),
                                  float(N.qmax(bits)), p.data_ptr(), q.data_ptr(), q_scale.data_ptr(),
                                  amax.data_ptr(), torch.get_num_threads())
    return p, q, q_scale, amax


@ops.custom_op("sqcompile::attention_probs")
def attention_probs_op(scores: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor, scale: float, causal: bool,
                       bits: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantized attention's dequantize + scale + mask + softmax + ``P`` quantizer as one op
    (:func:`attention_probs`): ``(P, q, q_scale, amax)``."""
    return attention_probs(scores, sa, sb, scale, causal, bits)


@attention_probs_op.register_fake
def _(scores, sa, sb, scale, causal, bits):
    row_shape = (*scores.shape[:-1], 1)
    return (scores.new_empty(scores.shape, dtype=torch.float32), scores.new_empty(scores.shape, dtype=torch.int8),
            scores.new_empty(row_shape, dtype=torch.float32), scores.new_empty(row_shape, dtype=torch.float32))


def _mask_rows(mask: Optional[torch.Tensor], shape) -> Tuple[Optional[torch.Tensor], int]:
    """A boolean ``mask`` broadcast to ``[..., L, S]`` as uint8 ``[Bm, L, S]`` and its batch
    stride (0: one ``[L, S]`` mask for every batch); ``(None, 0)`` for no mask."""
    if mask is None:
        return None, 0
    *lead, L, S = shape
    m = mask.to(torch.bool)
    if m.dim() <= 2 or all(n == 1 for n in m.shape[:-2]):
        return m.expand(L, S).to(torch.uint8).contiguous(), 0
    m = m.expand(*lead, L, S).reshape(-1, L, S).to(torch.uint8).contiguous()
    return m, L * S


def attention_probs_backward_reference(dp: torch.Tensor, sa: Optional[torch.Tensor], sb: Optional[torch.Tensor],
                                       p: torch.Tensor,
                                       mask: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """The unfused ops :func:`attention_probs_backward` stands for: with ``g = dp * (sa * sb)``
    (the dequantized gradient of ``P``; a None scale is left out), ``aten._softmax_backward_data(g, p)`` as decomposed
    (``g * p - p * sum(g * p)`` over the last dim), ``masked_fill(mask, 0)``, times ``scale``."""
    g = _dequantized(dp, sa, sb)
    gp = g * p
    ds = gp - p * gp.sum(-1, keepdim=True)
    if mask is not None:
        ds = ds.masked_fill(mask, 0.0)
    return ds * scale


def attention_probs_backward(dp: torch.Tensor, sa: Optional[torch.Tensor], sb: Optional[torch.Tensor], p: torch.Tensor,
                             mask: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """:func:`attention_probs_backward_reference` on the AVX-512 kernel for int32 ``dp`` ``[...,
    L, S]`` (``sa`` broadcasting to ``[..., L, 1]``, ``sb`` to ``[..., 1, S]``, ``p`` float32 of
    ``dp``'s shape, ``mask`` boolean broadcasting to it or None): the gradient of attention's
    scores, ``dS``, in one pass over each row.  The reference where the kernel cannot run."""
    if dp.device.type != "cpu" or dp.dtype != torch.int32 or p.dtype != torch.float32 or not status()[0] or \
            dp.numel() == 0:
        return attention_probs_backward_reference(dp, sa, sb, p, mask, scale)
    (B, L, S), sa2, sb2 = _rows(dp, sa, sb)
    acc, probs = dp.contiguous(), p.contiguous()
    m, m_stride = _mask_rows(mask, dp.shape)
    ds = _recycled(dp.shape, torch.float32)
    _library().sq_attention_probs_backward(acc.data_ptr(), sa2.data_ptr(), sb2.data_ptr(), probs.data_ptr(),
                                           None if m is None else m.data_ptr(), m_stride, float(scale), B, L, S,
                                           ds.data_ptr(), torch.get_num_threads())
    return ds


@ops.custom_op("sqcompile::attention_probs_backward")
def attention_probs_backward_op(dp: torch.Tensor, sa: Optional[torch.Tensor], sb: Optional[torch.Tensor], p: torch.Tensor,
                                mask: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """Quantized attention's ``dP`` dequantize + softmax backward + mask + scale as one op
    (:func:`attention_probs_backward`): ``dS``."""
    return attention_probs_backward(dp, sa, sb, p, mask, scale)


@attention_probs_backward_op.register_fake
def _(dp, sa, sb, p, mask, scale):
    return dp.new_empty(dp.shape, dtype=torch.float32)


def _spread_seed(seed: torch.Tensor) -> int:
    """:func:`sqcompile.numerics.hash_noise`'s seed as it enters the hash: the int32 seed times
    its spreading constant, wrapped to int32."""
    v = (int(seed) & 0xFFFFFFFF) * 668265263 & 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def ds_quantize_reference(ds: torch.Tensor, pk: torch.Tensor, pq: torch.Tensor, bits: int, groups: int,
                          seeds: Tuple[torch.Tensor, torch.Tensor]) -> Tuple[torch.Tensor, ...]:
    """The graph's two ShiftQuants of attention's ``dS`` ``[..., L, S]`` with outer scales,
    as lowered for Inductor (:func:`sqcompile.ops.shiftquant_outer` over
    :func:`sqcompile.numerics.shiftquant` with :func:`~sqcompile.numerics.hash_noise` noise of
    ``seeds``): along the columns with prescale ``pk`` (``[..., 1, S]``) and one outer maximum
    per row, along the rows with prescale ``pq`` (``[..., L, 1]``) and one per column.
    ``(e_cols, base_cols, outer_cols, e_rows, base_rows, outer_rows)``."""
    nd = ds.dim()
    cols, rows = list(range(nd - 2)) + [nd - 1], list(range(nd - 1))
    out = []
    for pre, channels, outer_dims, seed in ((pk, cols, rows, seeds[0]), (pq, rows, cols, seeds[1])):
        y = ds * pre
        r = N.safe_div_scale(N.amax(y, outer_dims))
        x = y / r
        g, mult, scale, base = N.shift_params(N.amax(x, channels), bits, groups)
        q = N.shiftquant_with_params(x, bits, groups, g, mult, scale, base, "stochastic",
                                     N.hash_noise(x.shape, seed, x.device))
        out += [q.expanded, q.base_scale, r]
    return tuple(out)


def ds_quantize(ds: torch.Tensor, pk: torch.Tensor, pq: torch.Tensor, bits: int, groups: int,
                seeds: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> Tuple[torch.Tensor, ...]:
    """:func:`ds_quantize_reference` on the AVX-512 kernels, bit for bit, in three passes over
    ``dS`` (the outer maxima, the quotients' channel ranges, both quantizations) with
    ``shift_params`` between the second and the third; ``seeds`` default to two drawn from
    torch's generator, columns first (as the graph's two quantizers draw them)."""
    if seeds is None:
        seeds = (N.draw_seed(ds.device), N.draw_seed(ds.device))
    if ds.device.type != "cpu" or ds.dtype != torch.float32 or not status()[0] or ds.numel() == 0 or \
            not N.fits_int8(bits, groups):
        return ds_quantize_reference(ds, pk, pq, bits, groups, seeds)
    (B, L, S), pq2, pk2 = _rows(ds, pq, pk)
    x = ds.contiguous()
    f32 = dict(dtype=torch.float32)
    outer_c, ranges_r = torch.empty(B, L, **f32), torch.empty(B, L, **f32)
    outer_r, ranges_c = torch.empty(B, S, **f32), torch.empty(B, S, **f32)
    lib, threads = _library(), torch.get_num_threads()
    lib.sq_ds_ranges(x.data_ptr(), pk2.data_ptr(), pq2.data_ptr(), B, L, S, outer_c.data_ptr(), outer_r.data_ptr(),
                     ranges_c.data_ptr(), ranges_r.data_ptr(), threads)
    *lead, _, _ = ds.shape
    _, mult_c, scale_c, base_c = torch.ops.sqcompile.shift_params(ranges_c.view(*lead, 1, S), bits, groups)
    _, mult_r, scale_r, base_r = torch.ops.sqcompile.shift_params(ranges_r.view(*lead, L, 1), bits, groups)
    e_c, e_r = _recycled(ds.shape, torch.int8), _recycled(ds.shape, torch.int8)
    c = [t.contiguous() for t in (scale_c, mult_c, scale_r, mult_r)]
    lib.sq_ds_quantize(x.data_ptr(), pk2.data_ptr(), pq2.data_ptr(), outer_c.data_ptr(), outer_r.data_ptr(),
                       *(t.data_ptr() for t in c), _spread_seed(seeds[0]), _spread_seed(seeds[1]),
                       float(N.qmax(bits)), B, L, S, e_c.data_ptr(), e_r.data_ptr(), threads)
    return (e_c, N._finite_or_nan(base_c), outer_c.view(*lead, L, 1), e_r, N._finite_or_nan(base_r),
            outer_r.view(*lead, 1, S))


@ops.custom_op("sqcompile::attention_ds_quantize")
def ds_quantize_op(ds: torch.Tensor, pk: torch.Tensor, pq: torch.Tensor, seed_cols: torch.Tensor,
                   seed_rows: torch.Tensor, bits: int,
                   groups: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention's ``dS`` ShiftQuant-ed both ways with outer scales (:func:`ds_quantize`) with
    the seeds given (``sqcompile::random_seed`` nodes of the graph, drawn where the two
    quantizers drew theirs): ``(e_cols, base_cols, outer_cols, e_rows, base_rows, outer_rows)``."""
    return ds_quantize(ds, pk, pq, bits, groups, (seed_cols, seed_rows))


@ds_quantize_op.register_fake
def _(ds, pk, pq, seed_cols, seed_rows, bits, groups):
    *lead, L, S = ds.shape
    e = ds.new_empty(ds.shape, dtype=N.expanded_dtype(bits, groups))
    f = ds.new_empty((), dtype=torch.float32)
    return (e, f, ds.new_empty((*lead, L, 1)), torch.empty_like(e), torch.empty_like(f), ds.new_empty((*lead, 1, S)))


__all__ = ["attention_probs", "attention_probs_reference", "attention_probs_backward",
           "attention_probs_backward_reference", "ds_quantize", "ds_quantize_reference", "status", "SOURCE"]
