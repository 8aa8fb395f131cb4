"""Grouped and depthwise integer convolutions on CPU (``grouped_conv.c``): the CPU kernels of
``sqcompile::int8_grouped_conv``, ``int8_grouped_conv_input_grad`` and
``int8_grouped_conv_weight`` (:mod:`sqcompile.ops`, whose float64 references they equal bit
for bit: both are exact integer sums).

Why direct loops, not GEMMs: a depthwise conv (MobileNet's, ConvNeXt's) has one input
channel per group, so as an im2col GEMM its reduction is just the taps (9 for 3x3) -- no
work for a GEMM kernel, and each group a GEMM of its own.  As loops over each NCHW plane the
int8 operands are read where they are and nothing is copied into another layout: PyTorch's
float depthwise conv on NCHW operands runs 5-7x slower than on channels-last ones
(``[32, 144, 32, 32]``, 3x3, one thread: 47.7 against 6.8 ms forward), and the simulated
path handed it NCHW operands (or, after Inductor's layout choices, ``[N, H, C, W]`` ones it
copied first).  Each plane is placed on its zero-padded grid split by the stride into phase
planes (``grouped_conv.c``), where every tap is one offset: a tap is one long loop over the
plane, which the compiler vectorizes, whatever the stride, dilation and padding.  Small
planes of depthwise convs (below :data:`LANES_BELOW` outputs) go 16 channels of a sample at a
time, stored channel-innermost in the same phase layout, vectorized across the channels.

Spatial dims are taken as three (1-d and 2-d convs have leading sizes of 1).  The kernels
take int8 operands whose forward and input-gradient sums have at most
:data:`~sqcompile.ops.MAX_INT32_TERMS` terms (the weight gradient adds int32 partial sums
into int64); anything else (int16 ShiftQuant digits, longer sums, a build that failed) runs
the reference.  Outputs come from the output pool (:mod:`~sqcompile.kernels.pool`: a fresh
19 MB int32 output page-faulted for as long as the forward took).  Built as the other C
kernels (:mod:`~sqcompile.kernels.native`, the build of
:func:`~sqcompile.kernels.native.simd_build` at ``-O3``).
"""
from __future__ import annotations

import ctypes
import functools
import math
import os
from typing import List, Optional, Sequence, Tuple

import torch

from .. import ops
from . import native, pool

SOURCE = os.path.join(os.path.dirname(__file__), "grouped_conv.c")
LANES_BELOW = 256
"""Depthwise convs whose output planes have fewer positions than this (below 16x16) run on
the kernels' channel-block path (16 channels of a sample together, vectorized across the
channels); larger planes and other grouped convs run plane by plane."""


@functools.lru_cache(maxsize=None)
def status() -> Tuple[bool, Optional[str]]:
    """``(usable, reason)`` for the kernels on this machine (checked and built once)."""
    return native.status(native.simd_build()[2], _library)


def cflags() -> List[str]:
    """The build's flags: :func:`~.native.simd_build`'s, at ``-O3`` (integer code only: no
    rounding for the optimizer to change)."""
    return [f for f in native.simd_build()[1] if not f.startswith("-O")] + ["-O3"]


@functools.lru_cache(maxsize=None)
def _library(flags: Optional[Tuple[str, ...]] = None) -> ctypes.CDLL:
    lib = native.build(SOURCE, list(flags) if flags else cflags(), "the CPU grouped-convolution kernels")
    ptr = ctypes.c_void_p
    for name in ("sq_grouped_conv_forward", "sq_grouped_conv_input_grad", "sq_grouped_conv_weight"):
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int       # 0: out of memory
        fn.argtypes = [ptr, ptr, ptr, ptr, ctypes.c_int]
    return lib


def _three(v: Sequence[int], fill: int) -> List[int]:
    """Spatial values as (D, H, W): 1-d and 2-d convs padded in front with ``fill``."""
    return [fill] * (3 - len(v)) + list(v)


def dims(x_shape, w_shape, out_sizes, stride, padding, dilation, groups) -> torch.Tensor:
    """The kernels' ``dims`` argument (int64): ``[N, C, Cout, G, in(3), k(3), out(3),
    stride(3), padding(3), dilation(3), LANES_BELOW]``."""
    n, c, cout = x_shape[0], x_shape[1], w_shape[0]
    values = [n, c, cout, groups, *_three(x_shape[2:], 1), *_three(w_shape[2:], 1), *_three(out_sizes, 1),
              *_three(stride, 1), *_three(padding, 0), *_three(dilation, 1), LANES_BELOW]
    return torch.tensor([int(v) for v in values], dtype=torch.int64)


def check(x_shape, w_shape, e_shape, stride, padding, dilation, groups) -> List[int]:
    """The output sizes of the convolution of ``x_shape`` with ``w_shape``; ``ValueError``
    unless the shapes belong together (``e_shape``, when given, the output gradient's): the
    kernels index by them and would read past the tensors otherwise."""
    nd = len(x_shape) - 2
    if len(w_shape) != nd + 2 or not (len(stride) == len(padding) == len(dilation) == nd) or groups < 1 \
            or x_shape[1] != w_shape[1] * groups or w_shape[0] % groups:
        raise ValueError(f"grouped convolution: input {tuple(x_shape)} and weight {tuple(w_shape)} with groups={groups}, "
                         f"stride {list(stride)}, padding {list(padding)}, dilation {list(dilation)} do not match "
                         f"([N, C, *S] and [Cout, C / groups, *k], Cout a multiple of groups)")
    out = ops.strided_conv_output_sizes(x_shape[2:], w_shape[2:], stride, padding, dilation)
    if any(o < 1 for o in out):
        raise ValueError(f"grouped convolution: input {tuple(x_shape)} with kernel {tuple(w_shape[2:])}, padding "
                         f"{list(padding)} and dilation {list(dilation)} has an empty output {out}")
    if e_shape is not None and list(e_shape) != [x_shape[0], w_shape[0], *out]:
        raise ValueError(f"grouped convolution: the output gradient has shape {tuple(e_shape)}, the convolution's "
                         f"output {(x_shape[0], w_shape[0], *out)}")
    return out


def _fits(a: torch.Tensor, b: torch.Tensor, terms: int) -> bool:
    """Whether the C kernels take these operands: int8, 1-3 spatial dims, int32-safe sums."""
    return (a.dtype == b.dtype == torch.int8 and 3 <= a.dim() <= 5 and terms <= ops.MAX_INT32_TERMS
            and status()[0])


def _run(name: str, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    a, b = a.contiguous(), b.contiguous()
    if not getattr(_library(), name)(a.data_ptr(), b.data_ptr(), out.data_ptr(), d.data_ptr(), torch.get_num_threads()):
        raise MemoryError(f"{name}: out of memory for its planes' buffers")
    return out


@ops.int8_grouped_conv.register_kernel("cpu")
def int8_grouped_conv_cpu(x, w, stride, padding, dilation, groups):
    out_sizes = check(x.shape, w.shape, None, stride, padding, dilation, groups)
    if not _fits(x, w, math.prod(w.shape[1:])):
        return ops.grouped_conv_reference(x, w, stride, padding, dilation, groups)
    y = pool.OUTPUTS.empty((x.shape[0], w.shape[0], *out_sizes), torch.int32)
    return _run("sq_grouped_conv_forward", x, w, y, dims(x.shape, w.shape, out_sizes, stride, padding, dilation, groups))


@ops.int8_grouped_conv_input_grad.register_kernel("cpu")
def int8_grouped_conv_input_grad_cpu(e, w, input_sizes, stride, padding, dilation, groups):
    # an input element sums, per output channel of its group, the taps that reach it
    check(input_sizes, w.shape, e.shape, stride, padding, dilation, groups)
    terms = (w.shape[0] // groups) * math.prod(w.shape[2:])
    if not _fits(e, w, terms):
        return ops.grouped_conv_input_grad_reference(e, w, input_sizes, stride, padding, dilation, groups)
    dx = pool.OUTPUTS.empty(list(input_sizes), torch.int32)
    return _run("sq_grouped_conv_input_grad", e, w, dx,
                dims(input_sizes, w.shape, e.shape[2:], stride, padding, dilation, groups))


@ops.int8_grouped_conv_weight.register_kernel("cpu")
def int8_grouped_conv_weight_cpu(e, x, kernel, stride, padding, dilation, groups):
    w_shape = (e.shape[1], x.shape[1] // groups, *kernel)
    check(x.shape, w_shape, e.shape, stride, padding, dilation, groups)
    if not _fits(e, x, 0):     # int32 partial sums of at most 2**16 products, added in int64
        return ops.grouped_conv_weight_reference(e, x, kernel, stride, padding, dilation, groups)
    dw = torch.empty(w_shape, dtype=torch.int64)
    return _run("sq_grouped_conv_weight", e, x, dw, dims(x.shape, w_shape, e.shape[2:], stride, padding, dilation,
                                                          groups))


__all__ = ["SOURCE", "cflags", "check", "dims", "int8_grouped_conv_cpu", "int8_grouped_conv_input_grad_cpu",
           "int8_grouped_conv_weight_cpu", "status"]
