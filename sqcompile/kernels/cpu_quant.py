"""CPU quantizers fused with what produces their input, as C kernels (``cpu_quant.c``,
AVX-512 or the portable build of :mod:`~.native`): ``sqcompile::shiftquant_outer_pair``,
``sqcompile::gelu_quantize``, ``sqcompile::gelu_shiftquant`` and ``sqcompile::gelu_backward``.

:func:`shiftquant_outer_pair`: with ``grad_outer_scale`` (the default), the backward of a
quantized GEMM ``Y = A B`` quantizes ``dY`` twice (:func:`sqcompile.ops.shiftquant_outer`):
for ``dA = dY B^T`` with ShiftQuant channels along ``dY``'s columns, prescaled by ``B``'s
scales, with one outer maximum per row; for ``dB = A^T dY`` along its rows, prescaled by
``A``'s, one maximum per column.  Inductor compiles each into three loops over ``dY`` (outer
maxima, the quotients' channel ranges, the quantization: six in all), and fuses ``dY``'s
producer into each of them: a GELU's backward (with its ``erf``), a softmax's, the
dequantization of the next GEMM's gradient -- recomputed six times.  The kernel computes both
from ``dY`` written once, in three passes, bit for bit what the graph's ops compute (the same
multiplies, IEEE divisions, NaN-propagating maxima and
:func:`~sqcompile.numerics.hash_noise` noise with the same two seeds).  With ``conv``, a
convolution's output gradient ``[N, C, *S]`` (:class:`sqcompile.ops._QuantConv`'s pair:
``dW``'s channels per sample and position with one outer maximum per output channel, ``dX``'s
per sample and output channel with one per sample; :func:`pair_dims`): the same passes over
``[N, C, prod S]``, the first one's maxima reduced once more.

:func:`gelu_quantize`: a Linear's dequantize + bias + GELU + the next GEMM's per-row
quantizer, one row at a time in cache (Inductor's loop evaluated the GELU twice per value:
once for the row's maximum, once to quantize).  :func:`gelu_shiftquant`: the same with the
next GEMM's input quantizer of ``act_groups`` (one outer scale per row, ShiftQuant over the
columns), where Inductor's loops evaluated the GELU twice as well.

:func:`gelu_backward`: that GELU's backward on the dequantized gradient the next GEMM's
backward produces, with the bias gradient's column sums on the way (Inductor's loop evaluated
``erf`` and a second ``exp`` per value, then summed the columns in a pass of its own).

The lowering passes of :mod:`sqcompile.backends.cpu_quant` put them in the graphs.
"""
from __future__ import annotations

import ctypes
import functools
import math
import os
from typing import List, Optional, Tuple

import torch

from .. import numerics as N
from .. import ops
from . import native, pool

SOURCE = os.path.join(os.path.dirname(__file__), "cpu_quant.c")


@functools.lru_cache(maxsize=None)
def status() -> Tuple[bool, Optional[str]]:
    """``(usable, reason)`` for the kernels on this machine (checked and built once)."""
    return native.status(native.simd_build()[2], _library)


@functools.lru_cache(maxsize=None)
def _library(cflags: Optional[Tuple[str, ...]] = None) -> ctypes.CDLL:
    """The kernels built with ``cflags`` (``None``: those of :func:`~.native.simd_build`)."""
    lib = native.build(SOURCE, list(cflags) if cflags else native.simd_build()[1], "the CPU quantizer kernels")
    i64, ptr, f32, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
    lib.sq_outer_pair_ranges.restype = None
    lib.sq_outer_pair_ranges.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, i32, ptr, ptr, ptr, ptr, ptr, i32]
    lib.sq_outer_pair_quantize.restype = None
    lib.sq_outer_pair_quantize.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i32, i32, f32, i64, i64,
                                           i64, ptr, ptr, i32]
    lib.sq_shift_params.restype = None
    lib.sq_shift_params.argtypes = [ptr, i64, i32, f32, ptr, ptr, ptr]
    lib.sq_gelu_quantize.restype = ctypes.c_int
    lib.sq_gelu_quantize.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, f32, ptr, ptr, ptr, ptr, i32]
    lib.sq_shiftquant_quotients.restype = None
    lib.sq_shiftquant_quotients.argtypes = [ptr, ptr, i64, i64, i64, i64, i32, f32, ptr, ptr, ptr, ptr, ptr, i32]
    lib.sq_gelu_shiftquant.restype = None
    lib.sq_gelu_shiftquant.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, i32, i64, i32, f32, ptr, ptr, ptr, ptr, ptr,
                                       ptr, ptr, ptr, ptr, i32]
    lib.sq_gelu_backward.restype = None
    lib.sq_gelu_backward.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, ptr, ptr, ptr, i32]
    return lib


def batched(x: torch.Tensor, row_scale: Optional[torch.Tensor], col_scale: Optional[torch.Tensor]):
    """``(B, L, S)`` of ``x`` ``[..., L, S]``, and the scales as contiguous ``[B, L]`` /
    ``[B, S]`` float32 (``row_scale`` broadcasts to ``[..., L, 1]``, ``col_scale`` to ``[...,
    1, S]``; None: ones, by which the kernels multiply exactly)."""
    *lead, L, S = x.shape
    B = math.prod(lead)
    one = torch.ones((), dtype=torch.float32)
    rows = (one if row_scale is None else row_scale.to(torch.float32)).expand(*lead, L, 1).reshape(B, L).contiguous()
    cols = (one if col_scale is None else col_scale.to(torch.float32)).expand(*lead, 1, S).reshape(B, S).contiguous()
    return (B, L, S), rows, cols


def _spread_seed(seed: torch.Tensor) -> int:
    """:func:`sqcompile.numerics.hash_noise`'s seed as it enters the hash: the int32 seed times
    its spreading constant, wrapped to int32."""
    v = (int(seed) & 0xFFFFFFFF) * 668265263 & 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def pair_dims(nd: int, conv: bool) -> Tuple[Tuple[List[int], List[int]], Tuple[List[int], List[int]]]:
    """``((channels, outer), (channels, outer))`` of the two quantizations of a pair, "cols"
    then "rows": the channel dims of each ShiftQuant and the dims its outer maxima keep.  A
    GEMM's ``dY`` ``[..., L, S]``: the columns (and the leading dims) are the channels of the
    one, whose maxima are per row, and the other way round.  A convolution's ``[N, C, *S]``
    (``conv``): its ``dW``'s channels are (sample, position), one maximum per output channel;
    its ``dX``'s (sample, output channel), one per sample (:class:`sqcompile.ops._QuantConv`)."""
    if conv:
        return ([0, *range(2, nd)], [1]), ([0, 1], [0])
    cols, rows = list(range(nd - 2)) + [nd - 1], list(range(nd - 1))
    return (cols, rows), (rows, cols)


def shiftquant_outer_pair_reference(dy: torch.Tensor, pk: torch.Tensor, pq: torch.Tensor, bits: int, groups: int,
                                    seeds: Tuple[torch.Tensor, torch.Tensor],
                                    conv: bool = False) -> Tuple[torch.Tensor, ...]:
    """The graph's two ShiftQuants of ``dY`` ``[..., L, S]`` with outer scales, as lowered for
    Inductor (:func:`sqcompile.ops.shiftquant_outer` over :func:`sqcompile.numerics.shiftquant`
    with :func:`~sqcompile.numerics.hash_noise` noise of ``seeds``): along the columns with
    prescale ``pk`` (``[..., 1, S]``) and one outer maximum per row, along the rows with
    prescale ``pq`` (``[..., L, 1]``) and one per column; the leading dims are channels of
    both.  ``(e_cols, base_cols, outer_cols, e_rows, base_rows, outer_rows)``.  With ``conv``,
    a convolution's output gradient ``[N, C, *S]``: "cols" is its ``dW``'s quantization
    (prescale ``pk`` ``[N, 1, ...]``, one outer maximum per output channel), "rows" its
    ``dX``'s (``pq`` ``[1, C, 1, ...]``, one per sample; :func:`pair_dims`)."""
    out = []
    for pre, (channels, outer_dims), seed in zip((pk, pq), pair_dims(dy.dim(), conv), seeds):
        y = dy * pre
        r = N.safe_div_scale(N.amax(y, outer_dims))
        x = y / r
        g, mult, scale, base = N.shift_params(N.amax(x, channels), bits, groups)
        q = N.shiftquant_with_params(x, bits, groups, g, mult, scale, base, "stochastic",
                                     N.hash_noise(x.shape, seed, x.device))
        out += [q.expanded, q.base_scale, r]
    return tuple(out)


def _shift_params(lib: ctypes.CDLL, ranges: torch.Tensor, bits: int, groups: int):
    """``(multiplier, scale, base)`` of :func:`sqcompile.numerics.shift_params` over the
    contiguous float32 ``ranges`` (flat, one per channel) on the C kernel, bit for bit."""
    mult, scale, base = torch.empty_like(ranges), torch.empty_like(ranges), torch.empty((), dtype=torch.float32)
    lib.sq_shift_params(ranges.data_ptr(), ranges.numel(), groups, float(N.qmax(bits)), mult.data_ptr(),
                        scale.data_ptr(), base.data_ptr())
    return mult, scale, base


def _chunks(B: int, L: int, threads: int) -> int:
    """Row chunks per batch entry for the passes that reduce over rows: enough for two
    tasks a thread, never fewer than 16 rows a chunk."""
    return max(1, min(-(-2 * threads // B), L // 16))


def shiftquant_outer_pair(dy: torch.Tensor, pk: torch.Tensor, pq: torch.Tensor, bits: int, groups: int,
                          seeds: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                          conv: bool = False) -> Tuple[torch.Tensor, ...]:
    """:func:`shiftquant_outer_pair_reference` on the C kernel, bit for bit, in three
    passes over ``dy`` (float32 ``[..., L, S]`` on CPU, or with ``conv`` a convolution's
    ``[N, C, *S]``): the outer maxima, the quotients'
    channel ranges, both quantizations, with ``shift_params`` between the second and the
    third.  ``seeds`` default to two drawn from torch's generator, columns first.  Runs the
    reference where :func:`status` says the kernel cannot, or where ``bits`` / ``groups`` do
    not fit int8."""
    if seeds is None:
        seeds = (N.draw_seed(dy.device), N.draw_seed(dy.device))
    if dy.device.type != "cpu" or dy.dtype != torch.float32 or dy.dim() < (3 if conv else 2) or not status()[0] or \
            dy.numel() == 0 or not N.fits_int8(bits, groups):
        return shiftquant_outer_pair_reference(dy, pk, pq, bits, groups, seeds, conv)
    if conv:        # [N, C, P]: the samples are the batch, pk one scale per sample, pq per output channel
        n, c = dy.shape[:2]
        (B, L, S), pq2, pk2 = batched(dy.reshape(n, c, -1), pq.reshape(-1, c, 1), pk.reshape(-1, 1, 1))
    else:
        (B, L, S), pq2, pk2 = batched(dy, pq, pk)
    x = dy.contiguous()
    threads = torch.get_num_threads()
    chunks = _chunks(B, L, threads)
    f32 = dict(dtype=torch.float32)
    outer_c, ranges_r = torch.empty(B, L, **f32), torch.empty(B, L, **f32)
    outer_r, ranges_c = torch.empty(B, S, **f32), torch.empty(B, S, **f32)
    work = torch.empty(chunks * B * S, **f32)      # the row chunks' column maxima
    lib = _library()
    lib.sq_outer_pair_ranges(x.data_ptr(), pk2.data_ptr(), pq2.data_ptr(), B, L, S, chunks, int(conv),
                             work.data_ptr(), outer_c.data_ptr(), outer_r.data_ptr(), ranges_c.data_ptr(),
                             ranges_r.data_ptr(), threads)
    (mult_c, scale_c, base_c), (mult_r, scale_r, base_r) = (_shift_params(lib, r, bits, groups)
                                                            for r in (ranges_c, ranges_r))
    e_c, e_r = pool.OUTPUTS.empty(dy.shape, torch.int8), pool.OUTPUTS.empty(dy.shape, torch.int8)
    c = (scale_c, mult_c, scale_r, mult_r)
    lib.sq_outer_pair_quantize(x.data_ptr(), pk2.data_ptr(), pq2.data_ptr(), outer_c.data_ptr(), outer_r.data_ptr(),
                               *(t.data_ptr() for t in c), _spread_seed(seeds[0]), _spread_seed(seeds[1]),
                               float(N.qmax(bits)), B, L, S, e_c.data_ptr(), e_r.data_ptr(), threads)
    if conv:        # the outer maxima as the graph's amax keeps them: [1, C, 1..] and [N, 1, 1..]
        ones = [1] * (dy.dim() - 2)
        outer_c, outer_r = outer_c[0].view(1, L, *ones), outer_r[:, 0].contiguous().view(B, 1, *ones)
    else:
        lead = dy.shape[:-2]
        outer_c, outer_r = outer_c.view(*lead, L, 1), outer_r.view(*lead, 1, S)
    return e_c, N._finite_or_nan(base_c), outer_c, e_r, N._finite_or_nan(base_r), outer_r


@ops.custom_op("sqcompile::shiftquant_outer_pair")
def shiftquant_outer_pair_op(dy: torch.Tensor, pk: torch.Tensor, pq: torch.Tensor, seed_cols: torch.Tensor,
                             seed_rows: torch.Tensor, bits: int, groups: int, conv: bool = False
                             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                        torch.Tensor]:
    """``dY`` ShiftQuant-ed both ways with outer scales (:func:`shiftquant_outer_pair`) with the
    seeds given (``sqcompile::random_seed`` nodes of the graph, drawn where the two quantizers
    drew theirs): ``(e_cols, base_cols, outer_cols, e_rows, base_rows, outer_rows)``."""
    return shiftquant_outer_pair(dy, pk, pq, bits, groups, (seed_cols, seed_rows), conv)


@shiftquant_outer_pair_op.register_fake
def _(dy, pk, pq, seed_cols, seed_rows, bits, groups, conv=False):
    e = dy.new_empty(dy.shape, dtype=N.expanded_dtype(bits, groups))
    f = dy.new_empty((), dtype=torch.float32)
    if conv:
        ones = [1] * (dy.dim() - 2)
        return (e, f, dy.new_empty((1, dy.shape[1], *ones)), torch.empty_like(e), torch.empty_like(f),
                dy.new_empty((dy.shape[0], 1, *ones)))
    *lead, L, S = dy.shape
    return (e, f, dy.new_empty((*lead, L, 1)), torch.empty_like(e), torch.empty_like(f), dy.new_empty((*lead, 1, S)))


def gelu_quantize_reference(acc: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor, bias: Optional[torch.Tensor],
                            bits: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The unfused ops :func:`gelu_quantize` stands for: ``pre = acc.float() * (sa * sb) [+
    bias]``, ``h = gelu(pre)``, ``(q, q_scale) = numerics.quantize(h, bits, rows, nearest)``,
    ``amax = max |h|`` per row: ``(pre, q, q_scale, amax)``."""
    pre = _gelu_pre(acc, sa, sb, bias)
    h = torch.nn.functional.gelu(pre)
    rows = list(range(h.dim() - 1))
    q, q_scale = N.quantize(h, bits, rows, "nearest")
    return pre, q, q_scale, N.amax(h, rows)


def gelu_quantize(acc: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor, bias: Optional[torch.Tensor],
                  bits: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`gelu_quantize_reference` on the C kernel (``cpu_quant.c``) for int32 ``acc``
    ``[..., M, N]`` on CPU (``sa`` broadcasting to ``[..., M, 1]``, ``sb`` to ``[..., 1, N]``,
    ``bias`` ``[N]`` or None): ``pre`` bit for bit, the GELU to a few ulps (its ``erf`` is
    PyTorch's vectorized CPU formula over our ``exp``), so ``q`` equal but where a value lies
    that close to a rounding boundary.  Runs the reference where the kernel cannot."""
    if acc.device.type != "cpu" or acc.dtype != torch.int32 or acc.dim() < 2 or not status()[0] or \
            acc.numel() == 0 or (bias is not None and bias.dtype != torch.float32):
        return gelu_quantize_reference(acc, sa, sb, bias, bits)
    (B, M, cols), sa2, sb2 = batched(acc, sa, sb)
    a = acc.contiguous()
    b = None if bias is None else bias.reshape(cols).contiguous()
    pre = pool.OUTPUTS.empty(acc.shape, torch.float32)
    q = pool.OUTPUTS.empty(acc.shape, torch.int8)
    row_shape = (*acc.shape[:-1], 1)
    q_scale, amax = torch.empty(row_shape, dtype=torch.float32), torch.empty(row_shape, dtype=torch.float32)
    if _library().sq_gelu_quantize(a.data_ptr(), sa2.data_ptr(), sb2.data_ptr(), None if b is None else b.data_ptr(),
                                   B, M, cols, float(N.qmax(bits)), pre.data_ptr(), q.data_ptr(), q_scale.data_ptr(),
                                   amax.data_ptr(), torch.get_num_threads()) != 0:
        raise MemoryError(f"sqcompile::gelu_quantize: no memory for a row buffer of {cols} floats")
    return pre, q, q_scale, amax


@ops.custom_op("sqcompile::gelu_quantize")
def gelu_quantize_op(acc: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor, bias: Optional[torch.Tensor],
                     bits: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Linear's dequantize + bias + GELU + the next GEMM's per-row quantizer as one op
    (:func:`gelu_quantize`): ``(pre, q, q_scale, amax)``."""
    return gelu_quantize(acc, sa, sb, bias, bits)


@gelu_quantize_op.register_fake
def _(acc, sa, sb, bias, bits):
    row_shape = (*acc.shape[:-1], 1)
    return (acc.new_empty(acc.shape, dtype=torch.float32), acc.new_empty(acc.shape, dtype=torch.int8),
            acc.new_empty(row_shape, dtype=torch.float32), acc.new_empty(row_shape, dtype=torch.float32))


def _gelu_pre(acc: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``acc.float() * (sa * sb) [+ bias]``, as the graph dequantizes a Linear's result."""
    pre = acc.to(torch.float32) * (sa * sb)
    return pre if bias is None else pre + bias


def gelu_shiftquant_reference(acc: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor, bias: Optional[torch.Tensor],
                              bits: int, groups: int, per_batch: bool = False
                              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The unfused ops :func:`gelu_shiftquant` stands for: ``pre`` and ``h = gelu(pre)`` as in
    :func:`gelu_quantize_reference`, then :func:`sqcompile.ops.shiftquant_outer`'s composition
    with nearest rounding over ``h`` as ``[C, rows, N]`` (``C`` the batch entries of ``acc``
    with ``per_batch``, else 1): ``r`` = max ``|h|`` per row (0 taken as 1), ShiftQuant of
    ``h / r`` with one channel per (entry, column).  ``(pre, e, base, r)``, ``e`` and ``r``
    (``[..., M, 1]``) shaped as ``acc``."""
    pre = _gelu_pre(acc, sa, sb, bias)
    h = torch.nn.functional.gelu(pre)
    h3 = h.reshape(math.prod(acc.shape[:-2]) if per_batch else 1, -1, acc.shape[-1])
    r = N.safe_div_scale(N.amax(h3, [0, 1]))
    q = N.shiftquant(h3 / r, bits, groups, [0, 2], "nearest")
    return pre, q.expanded.view(acc.shape), q.base_scale, r.view(*acc.shape[:-1], 1)


def gelu_shiftquant(acc: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor, bias: Optional[torch.Tensor], bits: int,
                    groups: int, per_batch: bool = False
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`gelu_shiftquant_reference` on the C kernel (``cpu_quant.c``) for int32 ``acc``
    ``[..., M, N]`` on CPU (scales and bias as :func:`gelu_quantize`'s): ``pre`` bit for bit,
    the GELU to a few ulps as in :func:`gelu_quantize`, and the rest the composition's
    arithmetic on the kernel's GELU values, so ``e`` equal but where a value (or a channel's
    range, for its group) lies that close to a boundary.  Two passes over the rows; the
    quotients ``h / r`` wait in a buffer of ``acc``'s size between them.  Runs the reference
    where the kernel cannot, or where ``bits`` / ``groups`` do not fit int8."""
    if acc.device.type != "cpu" or acc.dtype != torch.int32 or acc.dim() < 2 or not status()[0] or \
            acc.numel() == 0 or (bias is not None and bias.dtype != torch.float32) or not N.fits_int8(bits, groups):
        return gelu_shiftquant_reference(acc, sa, sb, bias, bits, groups, per_batch)
    (B, M, cols), sa2, sb2 = batched(acc, sa, sb)
    a = acc.contiguous()
    b = None if bias is None else bias.reshape(cols).contiguous()
    C = B if per_batch else 1
    threads = torch.get_num_threads()
    chunks = _chunks(C, B * M // C, threads)
    pre, e = pool.OUTPUTS.empty(acc.shape, torch.float32), pool.OUTPUTS.empty(acc.shape, torch.int8)
    outer = torch.empty((*acc.shape[:-1], 1), dtype=torch.float32)
    x, work, ends = quotient_buffers(acc.shape, C, chunks)
    _library().sq_gelu_shiftquant(a.data_ptr(), sa2.data_ptr(), sb2.data_ptr(), None if b is None else b.data_ptr(),
                                  B, M, cols, int(per_batch), chunks, groups, float(N.qmax(bits)), pre.data_ptr(),
                                  x.data_ptr(), outer.data_ptr(), work.data_ptr(), *(t.data_ptr() for t in ends),
                                  e.data_ptr(), threads)
    return pre, e, N._finite_or_nan(ends[3]), outer


def quotient_buffers(shape, batches: int, chunks: int) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]:
    """What ``sq_shiftquant_quotients`` (the end of :func:`gelu_shiftquant` and of the L1
    norm's ``act_groups`` mode) works in, for quotients of ``shape`` ``[..., N]`` in
    ``batches`` channel batches: the quotients, ``[batches, chunks, N]`` partial column
    maxima (zeros), and ``(ranges, mult, scale, base)``, ``[batches, N]`` but ``base``."""
    cols = shape[-1]
    f32 = dict(dtype=torch.float32)
    ranges = torch.empty(batches * cols, **f32)
    return (pool.OUTPUTS.empty(shape, torch.float32), torch.zeros(batches * chunks * cols, **f32),
            [ranges, torch.empty_like(ranges), torch.empty_like(ranges), torch.empty((), **f32)])


def shiftquant_quotients(x: torch.Tensor, work: torch.Tensor, ends: List[torch.Tensor], batches: int, bits: int,
                         groups: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(e, base)`` of the outer-scaled ShiftQuant over the columns of the quotients ``x``
    (contiguous ``[..., N]``, ``batches`` channel batches of its rows) whose partial column
    maxima are ``work`` (``[batches, chunks, N]``) on the C kernel (``sq_shiftquant_quotients``,
    numerics.shift_params and nearest rounding, bit for bit), with :func:`quotient_buffers`'
    ``ends``."""
    cols = x.shape[-1]
    rows = x.numel() // cols
    e = pool.OUTPUTS.empty(x.shape, torch.int8)
    _library().sq_shiftquant_quotients(x.data_ptr(), work.data_ptr(), batches, work.numel() // (batches * cols),
                                       rows // batches, cols, groups, float(N.qmax(bits)),
                                       *(t.data_ptr() for t in ends), e.data_ptr(), torch.get_num_threads())
    return e, N._finite_or_nan(ends[3])


@ops.custom_op("sqcompile::gelu_shiftquant")
def gelu_shiftquant_op(acc: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor, bias: Optional[torch.Tensor],
                       bits: int, groups: int, per_batch: bool
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Linear's dequantize + bias + GELU + the next GEMM's input quantizer with
    ``act_groups`` as one op (:func:`gelu_shiftquant`): ``(pre, e, base, outer)``."""
    return gelu_shiftquant(acc, sa, sb, bias, bits, groups, per_batch)


@gelu_shiftquant_op.register_fake
def _(acc, sa, sb, bias, bits, groups, per_batch):
    return (acc.new_empty(acc.shape, dtype=torch.float32),
            acc.new_empty(acc.shape, dtype=N.expanded_dtype(bits, groups)),
            acc.new_empty((), dtype=torch.float32), acc.new_empty((*acc.shape[:-1], 1), dtype=torch.float32))


SUM_ROWS = 64
"""Rows per partial sum of :func:`gelu_backward`'s column sums (``SUM_ROWS`` of
``cpu_quant.c``, which sizes ``work`` from it): the chunk of the graph's own split column sums
(:data:`sqcompile.backends.lowering.COLUMN_SUM_CHUNK`), so both add in the same order."""


def gelu_backward_reference(acc: torch.Tensor, sa: Optional[torch.Tensor], sb: Optional[torch.Tensor],
                            pre: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The unfused ops :func:`gelu_backward` stands for: ``g = acc.float() * (sa * sb)``
    (a missing scale is 1), ``dx = gelu_backward(g, pre)`` (the exact GELU's), and ``dx``
    summed over every dim but the last: ``(dx, sums)``."""
    g = acc.to(torch.float32)
    scale = sa if sb is None else sb if sa is None else sa * sb
    if scale is not None:
        g = g * scale
    dx = torch.ops.aten.gelu_backward(g, pre.reshape(acc.shape))
    return dx, dx.sum(list(range(dx.dim() - 1)))


def gelu_backward(acc: torch.Tensor, sa: Optional[torch.Tensor], sb: Optional[torch.Tensor],
                  pre: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`gelu_backward_reference` on the C kernel (``cpu_quant.c``) for int32 ``acc``
    ``[..., M, N]`` on CPU (``sa`` broadcasting to ``[..., M, 1]``, ``sb`` to ``[..., 1, N]``,
    ``pre`` float32 with ``acc``'s number of elements, read in ``acc``'s row-major order): the
    dequantized gradient bit for bit, the GELU's derivative to a few ulps (PyTorch's vectorized
    ``erf`` formula, and its ``exp`` shared with the density), the sums over fixed chunks of
    :data:`SUM_ROWS` rows, then the chunks (the order of the graph's split column sums), the
    same for any thread count.  Runs the reference where the kernel cannot."""
    if acc.device.type != "cpu" or acc.dtype != torch.int32 or acc.dim() < 2 or not status()[0] or \
            acc.numel() == 0 or pre.dtype != torch.float32 or pre.numel() != acc.numel():
        return gelu_backward_reference(acc, sa, sb, pre)
    (B, M, cols), sa2, sb2 = batched(acc, sa, sb)
    a, p = acc.contiguous(), pre.contiguous()
    out = pool.OUTPUTS.empty(acc.shape, torch.float32)
    sums = torch.empty(cols, dtype=torch.float32)
    work = torch.empty(-(-(B * M) // SUM_ROWS) * cols, dtype=torch.float32)
    _library().sq_gelu_backward(a.data_ptr(), sa2.data_ptr(), sb2.data_ptr(), p.data_ptr(), B, M, cols,
                                out.data_ptr(), sums.data_ptr(), work.data_ptr(), torch.get_num_threads())
    return out, sums


@ops.custom_op("sqcompile::gelu_backward")
def gelu_backward_op(acc: torch.Tensor, sa: Optional[torch.Tensor], sb: Optional[torch.Tensor],
                     pre: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """A GELU's backward on a dequantized GEMM gradient, with its column sums, as one op
    (:func:`gelu_backward`): ``(dx, sums)``, ``dx`` shaped as ``acc``, ``sums`` ``[N]``."""
    return gelu_backward(acc, sa, sb, pre)


@gelu_backward_op.register_fake
def _(acc, sa, sb, pre):
    return acc.new_empty(acc.shape, dtype=torch.float32), acc.new_empty((acc.shape[-1],), dtype=torch.float32)


__all__ = ["batched", "gelu_backward", "gelu_backward_reference", "gelu_quantize", "gelu_quantize_reference",
           "gelu_shiftquant", "gelu_shiftquant_reference", "quotient_buffers", "shiftquant_outer_pair",
           "shiftquant_outer_pair_reference", "shiftquant_quotients", "status", "SOURCE", "SUM_ROWS"]
