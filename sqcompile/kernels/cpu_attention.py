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
over it.  ``cpu_attention.c`` does each one row at a time, in cache, with AVX-512 (or its portable build: :mod:`~.native`); the
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
import os
from typing import Optional, Tuple

import torch

from .. import numerics as N
from .. import ops
from . import native, pool
from .cpu_quant import batched

SOURCE = os.path.join(os.path.dirname(__file__), "cpu_attention.c")


@functools.lru_cache(maxsize=None)
def status() -> Tuple[bool, Optional[str]]:
    """``(usable, reason)`` for the kernels on this machine (checked and built once)."""
    return native.status(native.simd_build()[2], _library)


@functools.lru_cache(maxsize=None)
def _library(cflags: Optional[Tuple[str, ...]] = None) -> ctypes.CDLL:
    """The kernels built with ``cflags`` (``None``: those of :func:`~.native.simd_build`)."""
    lib = native.build(SOURCE, list(cflags) if cflags else native.simd_build()[1], "the CPU attention kernel")
    i64, ptr, f32, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
    lib.sq_attention_probs.restype = None
    lib.sq_attention_probs.argtypes = [ptr, ptr, ptr, f32, i64, i64, i64, i32, f32, ptr, ptr, ptr, ptr, i32]
    lib.sq_attention_probs_backward.restype = None
    lib.sq_attention_probs_backward.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, f32, i64, i64, i64, ptr, i32]
    return lib


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
    """:func:`attention_probs_reference` on the C kernel (``cpu_attention.c``) for int32
    ``scores`` ``[..., L, S]`` on CPU; ``sa`` broadcasts to ``[..., L, 1]``, ``sb`` to ``[...,
    1, S]``.  Runs the reference where :func:`status` says the kernel cannot."""
    if scores.device.type != "cpu" or scores.dtype != torch.int32 or not status()[0] or scores.numel() == 0:
        return attention_probs_reference(scores, sa, sb, scale, causal, bits)
    (B, L, S), sa2, sb2 = batched(scores, sa, sb)
    acc = scores.contiguous()
    p = pool.OUTPUTS.empty(scores.shape, torch.float32)
    q = pool.OUTPUTS.empty(scores.shape, torch.int8)
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
    """:func:`attention_probs_backward_reference` on the C kernel for int32 ``dp`` ``[...,
    L, S]`` (``sa`` broadcasting to ``[..., L, 1]``, ``sb`` to ``[..., 1, S]``, ``p`` float32 of
    ``dp``'s shape, ``mask`` boolean broadcasting to it or None): the gradient of attention's
    scores, ``dS``, in one pass over each row.  The reference where the kernel cannot run."""
    if dp.device.type != "cpu" or dp.dtype != torch.int32 or p.dtype != torch.float32 or not status()[0] or \
            dp.numel() == 0:
        return attention_probs_backward_reference(dp, sa, sb, p, mask, scale)
    (B, L, S), sa2, sb2 = batched(dp, sa, sb)
    acc, probs = dp.contiguous(), p.contiguous()
    m, m_stride = _mask_rows(mask, dp.shape)
    ds = pool.OUTPUTS.empty(dp.shape, torch.float32)
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


__all__ = ["attention_probs", "attention_probs_reference", "attention_probs_backward",
           "attention_probs_backward_reference", "status", "SOURCE"]
