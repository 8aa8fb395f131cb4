"""int8 GEMMs on AVX2's byte multiply-adds (``VPMADDUBSW``): our own kernel
(``avx2_int8.c``) for CPUs with neither AMX nor VNNI, where oneDNN's s8s8 ``_int_mm`` has no
int8 units to run on (35x slower than float32 there).

``VPMADDUBSW`` multiplies unsigned by signed bytes, 32 multiply-adds an instruction, into
saturating int16 pair sums.  The kernel offsets B by its own ``max |B|`` (and takes the
offset back out with A's row sums) and adds pair sums in int16 only as many times as the
operands' magnitudes allow, so the result is exact -- bit-equal to ``torch._int_mm`` -- for
every product with ``max|A| * max|B| <= 8191`` (:data:`MAX_MAGNITUDE_PRODUCT`): every GEMM
of 4- to 6-bit training (a 4-bit operand against any int8 one; at 6 bits the largest, a
weight gradient's, is ShiftQuant's 124 against unsigned activations' 63).  It measures both
magnitudes first and refuses a product above the bound (at 7 and 8 bits: 126 x 127, 127 x
127), which :func:`sqcompile.kernels.cpu.int8_mm_cpu` then runs on the float engine.

The same library runs the stride-1 convolutions' implicit GEMMs
(``sq_avx2_int8_implicit``: :func:`sqcompile.kernels.amx.int8_conv` and ``int8_conv_weight``
with ``gemm="avx2"``, the tables the AMX kernel takes), so convolutions need no im2col
columns on these CPUs either.

Measured on an AMD EPYC (Zen 3) core, 2026-12-02: 80-90 G multiply-adds/s on the
transformer block's shapes, about 2.5x torch's float32 ``matmul`` there (see
``benchmarks/cpu_gemm.py``).  Built like our other C kernels (:mod:`.native`).

**The VNNI build** (``variant="vnni"``, ``SQCOMPILE_CPU_GEMM=vnni``; CPUs with AVX-512 VNNI):
the same source with ``-DSQ_VNNI``.  ``VPDPBUSD`` adds 4 unsigned x signed byte products
into an int32 lane, so nothing saturates: B is offset by 128, no magnitudes are measured and
nothing is refused.  Its micro-kernel runs on ZMM registers with 32-column strips: on a Zen 4
core (AMD EPYC, 2026-12-02) YMM ``VPDPBUSD`` issues twice a cycle and ZMM once, the same
multiply-adds, yet the 6-row loop reached 176 G multiply-adds/s from L1 on YMM against 224 on
ZMM (a scratch C loop over L1-resident packed operands); units of 12 rows x 512 columns were
the best of a sweep.  Over the transformer block's products (``benchmarks/cpu_gemm.py``, 1
thread) it ran at 4.89x fp32 ``matmul`` summed against oneDNN ``_int_mm``'s 5.46x, so ``auto``
keeps plain GEMMs on oneDNN and gives this build the stride-1 convolutions, whose implicit
GEMMs read the input in place where oneDNN needs im2col columns
(:func:`sqcompile.kernels.amx.conv_engine`, :data:`sqcompile.kernels.cpu.VNNI_MAX_WASTE`).

**Implicit A read in place** (both builds): a block of 6 rows of an implicit GEMM's A that lie
one ``ld`` apart (every row block of a convolution's input grid, a weight gradient's channel
rows of one tap) is read where it is, 64-byte k step by k step through the tap table
(``micro_steps``), its row sums taken in a read-only pass; the others (past M, across two
taps) are packed as whole rows.  Packing had copied each row once per tap: 40 MB for a 3x3
convolution of ``[16, 64, 64, 64]``, whose forward went from 22.5 to 9.5 ms.  The AVX2 build
reads in place only where its int16 sums last a whole reduction chunk (``max|A| * max|B| <=
63``, as 4-bit signed inputs against 4-bit weights: 7 x 7).
"""
from __future__ import annotations

import ctypes
import functools
import os
from typing import Optional, Tuple

import torch

from . import native

SOURCE = os.path.join(os.path.dirname(__file__), "avx2_int8.c")
CFLAGS = ["-O3", "-fPIC", "-shared", "-fopenmp", "-mavx2"]
CPU_FLAGS = frozenset({"avx2"})
VARIANTS = {
    "avx2": (CFLAGS, CPU_FLAGS, "AVX2"),
    "vnni": (CFLAGS + ["-DSQ_VNNI", "-mavx512f", "-mavx512vl", "-mavx512vnni"],
             frozenset({"avx2", "avx512f", "avx512vl", "avx512_vnni"}), "AVX-512 VNNI"),
}
"""The two builds of ``avx2_int8.c``: ``variant -> (compiler flags, CPU flags, name)``.
``vnni`` (``-DSQ_VNNI``) runs the same packing and blocking with ``VPDPBUSD`` on ZMM
registers and 32-column strips: int32 sums that never saturate, so it takes every product
(no magnitude bound, nothing measured first; B offset by 128)."""
MAX_MAGNITUDE_PRODUCT = 8191
"""The kernel runs a product exactly when ``max|A| * max|B|`` is at most this: then one
``VPMADDUBSW`` lane, ``2 * (2 max|B|) * max|A|``, fits int16."""
REFUSED = 2
"""What the kernel returns for a product above :data:`MAX_MAGNITUDE_PRODUCT` (nothing written)."""


def _variant(variant: str):
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: expected one of {', '.join(VARIANTS)}")
    return VARIANTS[variant]


@functools.lru_cache(maxsize=None)
def status(variant: str = "avx2") -> Tuple[bool, Optional[str]]:
    """``(usable, reason)`` for the kernel's ``variant`` build on this machine (checked and
    built once)."""
    return native.status(set(_variant(variant)[1]), lambda: _library(variant))


@functools.lru_cache(maxsize=None)
def _library(variant: str = "avx2") -> ctypes.CDLL:
    cflags, _, name = _variant(variant)
    lib = native.build(SOURCE, cflags, f"the {name} int8 kernel")
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.sq_avx2_int8_mm.restype = ctypes.c_int
    lib.sq_avx2_int8_mm.argtypes = [ptr, i64, i64, i64, ptr, i64, i64, i64, ptr, i64, i64, i64, i64, ctypes.c_int]
    lib.sq_avx2_release_workspace.restype = None
    lib.sq_avx2_int8_implicit.restype = ctypes.c_int
    lib.sq_avx2_int8_implicit.argtypes = [ptr, i64, i64, ptr, i64, ptr, i64, ptr, i64, i64, ptr, i64, ctypes.c_int]
    lib.sq_copy_layout.restype = None               # the implicit convolutions' layout copies (amx.py)
    lib.sq_copy_layout.argtypes = [ptr, ptr, ptr, ctypes.c_int, ptr, ptr, ctypes.c_int]
    lib.sq_wgrad_layout.restype = None
    lib.sq_wgrad_layout.argtypes = [ptr, i64, i64, i64, i64, ptr, ctypes.c_int]
    return lib


def int8_mm(a: torch.Tensor, b: torch.Tensor, variant: str = "avx2") -> Optional[torch.Tensor]:
    """Exact ``a @ b`` for int8 ``[..., M, K]`` and ``[..., K, N]`` (batch dims broadcast) as
    int32 ``[..., M, N]``, or (``avx2`` only) ``None`` when ``max|a| * max|b|`` exceeds
    :data:`MAX_MAGNITUDE_PRODUCT` (the caller runs it elsewhere).  Operands of any strides
    are read in place.  The caller keeps ``K`` within :data:`sqcompile.ops.MAX_INT32_TERMS`."""
    from .amx import batched_operand, int8_mm_output

    name = _variant(variant)[2]
    out, batch = int8_mm_output(a, b, name)
    ok, why = status(variant)
    if not ok:
        raise RuntimeError(f"the {name} int8 kernel is not usable: {why}")
    M, K, N = a.shape[-2], a.shape[-1], b.shape[-1]
    if out.numel() == 0 or K == 0:
        return out.zero_()
    if not batch:
        a3, sab, b3, sbb = a, 0, b, 0
    else:
        (a3, sab), (b3, sbb) = (batched_operand(t, batch, unit_stride=False) for t in (a, b))
    rc = _library(variant).sq_avx2_int8_mm(
        a3.data_ptr(), sab, a3.stride(-2), a3.stride(-1), b3.data_ptr(), sbb, b3.stride(-2), b3.stride(-1),
        out.data_ptr(), out.numel() // (M * N), M, N, K, torch.get_num_threads())
    if rc == REFUSED:
        return None
    if rc != 0:
        raise MemoryError(f"{name} int8_mm: could not allocate packing buffers for {M}x{K}x{N}")
    return out


def release_workspace() -> None:
    """Free the calling thread's packing workspaces (kept between calls, as the AMX kernel's),
    each build's that is loaded."""
    for variant in VARIANTS:
        if status(variant)[0]:
            _library(variant).sq_avx2_release_workspace()
