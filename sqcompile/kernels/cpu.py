"""CPU kernels: exact int8 GEMMs, on our AMX kernel (:mod:`.amx`) where the CPU has AMX-int8,
on oneDNN's ``torch._int_mm`` where it has VNNI, else on our AVX2 kernel (:mod:`.avx2`), else
as float32 GEMMs (:func:`float_int8_mm`); ``SQCOMPILE_CPU_GEMM`` chooses
(:func:`.amx.engine`).  Stride-1 convolutions as implicit GEMMs on the AMX kernel or a build
of the AVX2 one (VNNI or AVX2: :func:`.amx.conv_engine`), or as im2col GEMMs.  Large outputs
come from recycled buffers (:mod:`.pool`)."""
from __future__ import annotations

import math

import torch

from .. import ops
from . import amx, avx2, pool


@ops.int8_mm.register_kernel("cpu")
def int8_mm_cpu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 ``[..., M, K] @ [..., K, N]`` -> int32."""
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        return (a.double() @ b.double()).to(torch.int32)   # int16 operands: exact reference
    chosen = amx.engine(rows=a.shape[-2])
    if chosen == "amx":
        return amx.int8_mm(a, b)
    if chosen in avx2.VARIANTS:
        out = avx2.int8_mm(a, b, chosen)
        return out if out is not None else float_int8_mm(a, b)   # avx2, two 8-bit operands: beyond its int16 sums
    if chosen == "float":
        return float_int8_mm(a, b)
    return onednn_int8_mm(a, b)


AVX2_MAX_WASTE = 1.45
"""The AVX2 kernel runs a convolution as an implicit GEMM only when that GEMM is at most this
many times the im2col GEMM's size (:func:`implicit_waste`): the implicit one computes every
position of the padded grid and pads each run of taps to 64 bytes (the weight gradient: the
channels to 32), and saves writing the columns.  Measured on an AMD EPYC (Zen 3) core,
``benchmarks/cpu_conv.py`` (2026-12-02): at 1.06-1.42 the implicit GEMMs were up to 2.9x
faster than im2col's (level with them at 1.27, a 16x16 stage), at 1.56 and above (the 8x8
and 4x4 grids of a ResNet's last stages, a 1-channel first layer) slower, up to 2.5x.  The
AMX kernel always takes them."""


def implicit_waste(x_shape, kernel, padding, dilation, weight: bool = False) -> float:
    """How many times the im2col GEMM's multiply-adds the implicit GEMM of a stride-1
    convolution of an ``x_shape`` input with ``kernel`` makes (``weight``: of its weight
    gradient) -- the padded grid's positions, the taps' runs padded to 64-byte steps
    (:func:`.amx.conv_steps`), the weight gradient's channels padded to 32."""
    n, c, sizes = x_shape[0], x_shape[1], list(x_shape[2:])
    grid = math.prod(s + 2 * p for s, p in zip(sizes, padding))
    out = math.prod(ops.conv_output_sizes(sizes, kernel, padding, dilation))
    if n * c * out == 0:
        return 1.0
    if weight:
        return (32 * -(-c // 32) / c) * (64 * -(-(n * grid) // 64)) / (n * out)
    offsets, _ = amx.conv_steps(c, sizes, kernel, padding, dilation)
    return grid * len(offsets) * 64 / (out * c * math.prod(kernel))


VNNI_MAX_WASTE = 1.45
"""As :data:`AVX2_MAX_WASTE` for the VNNI build of that kernel, which ``auto`` takes for the
convolutions of CPUs with VNNI but no AMX (their plain GEMMs stay on oneDNN's ``_int_mm``,
faster there: 5.46x against 4.89x fp32 ``matmul`` over a transformer block's products on a
Zen 4 core).  Measured on an AMD EPYC (Zen 4) core, ``benchmarks/cpu_conv.py`` (2026-12-02),
against the im2col GEMM on oneDNN (both implicit GEMMs read their rows in place: the input
grid, the channel rows of each tap): up to 1.42 the implicit GEMMs were 1.3-4.7x faster than
im2col's (64x64 and 32x32 grids; a 32-channel input, whose runs pad 96 bytes to 128), at 1.27
(16x16 grids) level with them (1.04-1.16x), from 1.56 on (8x8 grids and smaller) slower
(0.4-0.8x)."""
MAX_WASTE = {"amx": math.inf, "vnni": VNNI_MAX_WASTE, "avx2": AVX2_MAX_WASTE}
"""Each implicit-GEMM kernel's bound on :func:`implicit_waste` (the AMX kernel takes every
stride-1 convolution)."""


def _implicit_gemm(engine: str, x_shape, kernel, padding, dilation, weight: bool) -> bool:
    """Whether the CPU op runs this convolution (``weight``: its weight gradient) as an implicit
    GEMM on ``engine``."""
    bound = MAX_WASTE.get(engine)
    if bound is None:
        return False
    return bound == math.inf or implicit_waste(x_shape, kernel, padding, dilation, weight) <= bound


@ops.int8_conv.register_kernel("cpu")
def int8_conv_cpu(x: torch.Tensor, w: torch.Tensor, padding, dilation) -> torch.Tensor:
    """Stride-1 integer convolution: an implicit GEMM on the AMX kernel or a build of the AVX2
    one when :func:`.amx.conv_engine` is one of them (those where :func:`implicit_waste` is
    within :data:`MAX_WASTE`; the AVX2 build within its magnitude bound), else the reference
    im2col GEMM."""
    if x.dtype == w.dtype == torch.int8:
        chosen = amx.conv_engine(rows=x.shape[0] * math.prod(x.shape[2:]))
        if _implicit_gemm(chosen, x.shape, list(w.shape[2:]), padding, dilation, weight=False):
            out = amx.int8_conv(x, w, padding, dilation, gemm=chosen)
            if out is not None:
                return out
    return ops.im2col_int8_conv(x, w, padding, dilation)


@ops.int8_conv_weight.register_kernel("cpu")
def int8_conv_weight_cpu(e: torch.Tensor, x: torch.Tensor, kernel, padding, dilation) -> torch.Tensor:
    """A stride-1 convolution's weight gradient: an implicit GEMM as :func:`int8_conv_cpu`
    decides, else the reference im2col GEMM."""
    ops.check_conv_weight_operands(e, x, kernel, padding, dilation)
    if e.dtype == x.dtype == torch.int8:
        chosen = amx.conv_engine(rows=x.shape[1] * math.prod(kernel))
        if _implicit_gemm(chosen, x.shape, list(kernel), padding, dilation, weight=True):
            out = amx.int8_conv_weight(e, x, kernel, padding, dilation, gemm=chosen)
            if out is not None:
                return out
    return ops.im2col_int8_conv_weight(e, x, kernel, padding, dilation)


FLOAT_CHUNK = 1024
"""Longest reduction :func:`float_int8_mm` gives one float32 GEMM: 1024 products of int8
values, each at most ``128 * 128 = 2**14`` in magnitude, sum to at most ``2**24``, and float32
holds every integer up to ``2**24``: each partial sum the GEMM forms, in whatever order, is
exact."""


def float_int8_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int8 ``[..., M, K] @ [..., K, N]`` -> int32 as float32 GEMMs (the ``float``
    engine: CPUs whose oneDNN ``_int_mm`` has no int8 units): the reduction in chunks of
    :data:`FLOAT_CHUNK`, each chunk's exact result converted to int32 and added, so the result
    is ``torch._int_mm``'s bit for bit."""
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"int8_mm: shapes {tuple(a.shape)} and {tuple(b.shape)} do not chain")
    K = a.shape[-1]
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    out = pool.OUTPUTS.empty((*batch, a.shape[-2], b.shape[-1]))
    if K == 0 or out.numel() == 0:
        return out.zero_()
    part = pool.OUTPUTS.empty(out.shape, torch.float32)
    for k in range(0, K, FLOAT_CHUNK):
        torch.matmul(_as_float(a[..., k:k + FLOAT_CHUNK]), _as_float(b[..., k:k + FLOAT_CHUNK, :]), out=part)
        if k == 0:
            out.copy_(part)
        else:
            out.add_(part.to(torch.int32))
    return out


def _as_float(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, in a recycled buffer: a fresh one of attention's ``P`` cost three
    times the conversion itself in page faults (36 of 46 ms for ``[16, 8, 256, 256]``)."""
    return pool.OUTPUTS.empty(t.shape, torch.float32).copy_(t)


def onednn_int8_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch._int_mm`` (2-D, so batched products loop over the batch; each slice is one
    oneDNN call)."""
    if a.dim() == 2 and b.dim() == 2:
        return torch._int_mm(_dense_strides(a), _dense_strides(b), out=pool.OUTPUTS.empty((a.shape[0], b.shape[1])))
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a3 = a.expand(*batch, *a.shape[-2:]).reshape(math.prod(batch), *a.shape[-2:])
    b3 = b.expand(*batch, *b.shape[-2:]).reshape(math.prod(batch), *b.shape[-2:])
    out = pool.OUTPUTS.empty((a3.shape[0], a3.shape[1], b3.shape[2]))
    for i in range(a3.shape[0]):
        torch._int_mm(_dense_strides(a3[i]), _dense_strides(b3[i]), out=out[i])
    return out.reshape(*batch, a.shape[-2], b.shape[-1])


def _dense_strides(t: torch.Tensor) -> torch.Tensor:
    """The 2-D ``t`` with the stride of a size-1 dim set to what a dense layout gives it (a
    view of the same memory: that stride addresses nothing).  oneDNN takes an operand's stride
    as its leading dimension even along a dim of size 1, and one below the row (or column)
    length made it read other memory: a ``[1, 18]`` row with stride 9, as the im2col views of
    a convolution with one output channel or one input tap give, came back as garbage."""
    m, n = t.shape
    if m != 1 and n != 1:
        return t
    s0, s1 = t.stride()
    if m == 1 and n == 1:
        return t.as_strided((1, 1), (1, 1))
    if m == 1:                    # one row: row-major if its elements are adjacent, else column-major
        return t.as_strided((1, n), (n, 1) if s1 == 1 else (1, s1))
    return t.as_strided((m, 1), (1, m) if s0 == 1 else (s0, 1))
