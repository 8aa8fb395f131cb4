"""Custom ops and the quantized autograd functions the rewrite passes call.

Layering: this module knows the *op schemas*, their fake (meta) implementations and
reference implementations built on :mod:`sqcompile.numerics`.  Faster device implementations
are registered onto the same ops by :mod:`sqcompile.kernels` with
``CustomOp.register_kernel``; nothing here imports a kernel module.

The ops stay visible as single nodes in the forward and backward ATen graphs that
AOTAutograd produces (``torch.ops.sqcompile.quantize``, ``.shiftquant``, ``.int8_mm``, ...),
so the report can show them and the lowering can fuse them.

Training formulation (a GEMM ``C[m,n] = sum_k A[m,k] B[k,n]``, batched over a leading dim):

* forward: ``A`` quantized per row (``act_bits``), ``B`` per column (``weight_bits`` for a
  Linear/conv weight, ``act_bits`` for an activation), nearest rounding.  Both scales factor
  out of the sum, and the int8 operands are what is saved for backward.
* ``dA = dC B^T`` reduces over ``n``: ``B``'s per-column scale is folded into the gradient,
  ``G = dC * s_B[n]``, which is then ShiftQuant-ed along ``n`` (stochastic rounding); the
  product is formed inside the quantizer (its ``prescale``), never written to memory.
* ``dB = A^T dC`` reduces over ``m``: ``G' = dC * s_A[m]``, ShiftQuant-ed along ``m``.

So both backward GEMMs consume the saved int8 forward operands unchanged and the gradient in
ShiftQuant's expanded integer form: every GEMM of training is an integer GEMM.
"""
from __future__ import annotations

import contextvars
import functools
import math
import sys
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import torch
from torch.fx.experimental.symbolic_shapes import guard_or_false

from . import decisions
from . import numerics as N

LIB = "sqcompile"
# Quantizers may round stochastically: tag them so compilers never merge two calls or
# recompute one in backward (the noise would differ).
_RANDOM = (torch.Tag.nondeterministic_seeded,)
# int8 x int8 products summed in int32 overflow past this many terms (127*127*2**17 < 2**31).
MAX_INT32_TERMS = 2 ** 17


# --------------------------------------------------------------------------------------------
# Op registration
# --------------------------------------------------------------------------------------------

_LIBRARY = torch.library.Library(LIB, "FRAGMENT")


class CustomOp:
    """``sqcompile::<name>``, defined from a Python function with :class:`torch.library.Library`.

    We do not use ``torch.library.custom_op``: its Python dispatch wrappers (autograd
    wrapper, Dynamo-disable, argument checks) cost about 40 us per call, as much as our whole
    quantizer launch and more than many of its kernels on a GPU.  Here the function is the
    ``CompositeExplicitAutograd`` kernel (every device), :meth:`register_kernel` overrides it
    for one device type, and :meth:`register_fake` gives the shape function compilers trace
    with.  The ops are functional and have no autograd formula: they run inside our
    ``autograd.Function`` s and compiled graphs, on tensors that do not require grad.
    Calling the object calls the op through the dispatcher (``torch.ops.sqcompile.<name>``).
    """

    def __init__(self, fn: Callable, name: str, tags=()):
        self.name = name
        self.__doc__ = fn.__doc__
        _LIBRARY.define(name + torch.library.infer_schema(fn, mutates_args=()), tags=tags)
        _LIBRARY.impl(name, fn, "CompositeExplicitAutograd")

    @property
    def op(self):
        return getattr(torch.ops.sqcompile, self.name)

    def __call__(self, *args, **kwargs):
        return self.op(*args, **kwargs)

    def register_fake(self, fake: Callable) -> Callable:
        torch.library.register_fake(f"{LIB}::{self.name}", fake, lib=_LIBRARY)
        return fake

    def register_kernel(self, device_type: str) -> Callable:
        """Decorator: ``fn`` runs the op for tensors on ``device_type`` ("cpu", "cuda")."""
        def register(fn: Callable) -> Callable:
            _LIBRARY.impl(self.name, fn, device_type.upper())
            return fn
        return register


def custom_op(qualname: str, tags=()) -> Callable[[Callable], CustomOp]:
    """Decorator: define the op ``qualname`` (``"sqcompile::name"``) from a type-annotated
    function (schema inferred as by ``torch.library.custom_op``); see :class:`CustomOp`."""
    namespace, name = qualname.split("::")
    if namespace != LIB:
        raise ValueError(f"sqcompile ops live in the {LIB!r} namespace, got {qualname!r}")
    return lambda fn: CustomOp(fn, name, tags)


# --------------------------------------------------------------------------------------------
# Primitive custom ops
# --------------------------------------------------------------------------------------------

@custom_op(f"{LIB}::quantize", tags=_RANDOM)
def quantize(x: torch.Tensor, bits: int, keep_dims: List[int], stochastic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric ``bits``-bit quantization, one scale per index of ``keep_dims``."""
    return N.quantize(x, bits, keep_dims, "stochastic" if stochastic else "nearest")


@quantize.register_fake
def _quantize_fake(x, bits, keep_dims, stochastic):
    return torch.empty_like(x, dtype=torch.int8), x.new_empty(_scale_shape(x, keep_dims), dtype=torch.float32)


@custom_op(f"{LIB}::shiftquant", tags=_RANDOM)
def shiftquant(x: torch.Tensor, bits: int, groups: int, channel_dims: List[int], stochastic: bool,
               prescale: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ShiftQuant along ``channel_dims`` of ``x`` (times ``prescale``, one float32 factor per
    channel, when given); returns (expanded integers, base scale)."""
    r = N.shiftquant(x, bits, groups, channel_dims, "stochastic" if stochastic else "nearest", prescale=prescale)
    return r.expanded, r.base_scale


@shiftquant.register_fake
def _shiftquant_fake(x, bits, groups, channel_dims, stochastic, prescale=None):
    if prescale is not None:
        N.check_prescale(x, prescale, channel_dims)
    return torch.empty_like(x, dtype=N.expanded_dtype(bits, groups)), x.new_empty((), dtype=torch.float32)


@custom_op(f"{LIB}::shift_params")
def shift_params(ranges: torch.Tensor, bits: int, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel ShiftQuant parameters (:func:`numerics.shift_params`) as one opaque op."""
    g, multiplier, scale, base = N.shift_params(ranges, bits, groups)
    return g, multiplier, scale, base.clone()


@shift_params.register_fake
def _(ranges, bits, groups):
    return (torch.empty_like(ranges, dtype=torch.int64), torch.empty_like(ranges), torch.empty_like(ranges),
            ranges.new_empty(()))


@custom_op(f"{LIB}::random_seed", tags=_RANDOM)
def random_seed(device: torch.device) -> torch.Tensor:
    """A fresh random int64 scalar in ``[0, 2**31 - 1)`` on ``device``, for the counter-based
    noise of quantizers lowered to Inductor (:func:`sqcompile.numerics.hash_noise`).

    An opaque op on purpose: as an inlined ``torch.randint``, Inductor's CPU code generator
    recomputed the seed (one scalar Philox ``randint64_cpu`` call) inside the quantizer's loop
    for every 16 elements, which made each stochastic quantizer ~2x slower; as an extern call
    it is computed once into a buffer the fused loop reads.  It takes no tensor: one would
    force the quantizer's input to be materialized instead of recomputed inside that loop."""
    return N.draw_seed(device)


@random_seed.register_fake
def _(device):
    return torch.empty((), dtype=torch.int64, device=device)


@custom_op(f"{LIB}::dequantize")
def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q * scale`` in ``dtype``, contiguous whatever ``q``'s layout, in every kernel family
    and in compiled graphs (``backends/lowering.py``): a traced graph views the result at the
    strides the fake implementation gives, and an L1 norm's backward dequantized a
    transposed gradient into a transposed tensor the Linear before it then failed to view."""
    return N.dequantize(q, scale, dtype).contiguous()


@dequantize.register_fake
def _(q, scale, dtype):
    return torch.empty(torch.broadcast_shapes(q.shape, scale.shape), dtype=dtype, device=q.device)


@custom_op(f"{LIB}::int8_mm")
def int8_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact integer product of int8 (or int16) ``[..., M, K] @ [..., K, N]`` -> int32.

    Reference implementation: float64 matmul, exact for every product this package forms
    (the reduction is split so partial sums stay below 2**31).  Devices register faster
    kernels (oneDNN ``torch._int_mm`` on CPU, Triton on CUDA).
    """
    return (a.double() @ b.double()).to(torch.int32)


@int8_mm.register_fake
def _(a, b):
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return a.new_empty((*batch, a.shape[-2], b.shape[-1]), dtype=torch.int32)


@custom_op(f"{LIB}::channels_last")
def channels_last(q: torch.Tensor) -> torch.Tensor:
    """A copy of ``q`` (``[N, C, *S]``) with ``C`` the innermost dim in memory (channels-last
    for any number of spatial dims).  An op of its own so that a fusing compiler stores the
    tensor it copies (the integers a quantizer computed) instead of recomputing it for every
    element of the copy's consumers (:func:`_channels_last`)."""
    return q.movedim(1, -1).clone(memory_format=torch.contiguous_format).movedim(-1, 1)


@channels_last.register_fake
def _(q):
    return torch.empty_like(q.movedim(1, -1), memory_format=torch.contiguous_format).movedim(-1, 1)


@custom_op(f"{LIB}::int8_conv")
def int8_conv(x: torch.Tensor, w: torch.Tensor, padding: List[int], dilation: List[int]) -> torch.Tensor:
    """Exact integer convolution at stride 1 (groups 1): int8 ``x`` ``[N, C, *S]`` and ``w``
    ``[Cout, C, *k]``, zero padding ``padding`` on both sides of each spatial dim, ->
    int32 ``[N, Cout, *O]``, ``O = S + 2 p - d (k - 1)``.

    The result is a view into the output grid of the padded input (``[N, *(S + 2 p), Cout]``,
    channels innermost; :func:`conv_grid_output`), as the implicit-GEMM kernel
    computes it (:func:`sqcompile.kernels.amx.int8_conv`: every grid position is a row of
    its product, those in the padding are computed and left unread).  This reference
    implementation is the im2col GEMM, placed in the same layout (:func:`im2col_int8_conv`)."""
    return im2col_int8_conv(x, w, padding, dilation)


def im2col_int8_conv(x: torch.Tensor, w: torch.Tensor, padding, dilation) -> torch.Tensor:
    """:func:`int8_conv` as an im2col GEMM on ``int8_mm`` (the reference; any device)."""
    n, cout, out_sizes = x.shape[0], w.shape[0], conv_output_sizes(x.shape[2:], w.shape[2:], padding, dilation)
    cols, _ = _im2col(x, w.shape[2:], [1] * len(padding), padding, dilation)
    acc = int8_mm(cols, _flat_weight(w).t()).reshape(n, *out_sizes, cout).movedim(-1, 1)
    out = conv_grid_output(x, w, padding, dilation, torch.empty)
    return out.copy_(acc)


@int8_conv.register_fake
def _(x, w, padding, dilation):
    return conv_grid_output(x, w, padding, dilation, torch.empty)


@custom_op(f"{LIB}::int8_conv_weight")
def int8_conv_weight(e: torch.Tensor, x: torch.Tensor, kernel: List[int], padding: List[int],
                     dilation: List[int]) -> torch.Tensor:
    """The exact integer weight gradient of a stride-1 convolution (groups 1): int8 ``e``
    (the output gradient, ``[N, Cout, *O]``) and ``x`` (``[N, C, *S]``) -> int32
    ``[Cout, C, *kernel]`` (contiguous), ``dW[co, c, k] = sum over n, o of e[n, co, o] *
    x_padded[n, c, o + k d]``.  The caller keeps ``N * prod(S + 2 p)`` within
    :data:`MAX_INT32_TERMS`.  Reference: the im2col GEMM on ``int8_mm``; on CPUs with AMX an
    implicit GEMM (:func:`sqcompile.kernels.amx.int8_conv_weight`)."""
    return im2col_int8_conv_weight(e, x, kernel, padding, dilation)


def check_conv_weight_operands(e: torch.Tensor, x: torch.Tensor, kernel, padding, dilation) -> None:
    """``ValueError`` unless ``e`` has the shape of the output gradient of ``x``'s stride-1
    convolution with ``kernel`` (every implementation of :func:`int8_conv_weight` asks: the
    implicit GEMM would otherwise read ``e`` on the wrong grid)."""
    want = [x.shape[0], e.shape[1] if e.dim() > 1 else -1, *conv_output_sizes(list(x.shape[2:]), kernel, padding,
                                                                                dilation)]
    if e.dim() != x.dim() or list(e.shape) != want:
        raise ValueError(f"int8_conv_weight: e has shape {tuple(e.shape)}, but the output gradient of the convolution "
                         f"of x {tuple(x.shape)} with kernel {list(kernel)}, padding {list(padding)} and dilation "
                         f"{list(dilation)} has shape {tuple(want)} ([N, Cout, *O])")


def im2col_int8_conv_weight(e: torch.Tensor, x: torch.Tensor, kernel, padding, dilation) -> torch.Tensor:
    """:func:`int8_conv_weight` as an im2col GEMM on ``int8_mm`` (the reference; any device)."""
    check_conv_weight_operands(e, x, kernel, padding, dilation)
    cols, _ = _im2col(x, kernel, [1] * len(kernel), padding, dilation)     # [N*L, k*C]
    e2 = e.movedim(1, -1).reshape(-1, e.shape[1])                          # [N*L, Cout]
    dw = int8_mm(e2.t(), cols)                                             # [Cout, k*C]
    return dw.reshape(e.shape[1], *kernel, x.shape[1]).movedim(-1, 1).contiguous()


@int8_conv_weight.register_fake
def _(e, x, kernel, padding, dilation):
    return e.new_empty((e.shape[1], x.shape[1], *kernel), dtype=torch.int32)


@custom_op(f"{LIB}::int8_grouped_conv")
def int8_grouped_conv(x: torch.Tensor, w: torch.Tensor, stride: List[int], padding: List[int], dilation: List[int],
                      groups: int) -> torch.Tensor:
    """Exact integer grouped convolution (any ``groups``, depthwise included): int8 ``x``
    ``[N, C, *S]`` and ``w`` ``[Cout, C / groups, *k]`` -> int32 ``[N, Cout, *O]``,
    contiguous.  The caller keeps ``prod(w.shape[1:])`` within :data:`MAX_INT32_TERMS`.
    Reference: a float64 convolution (exact: every partial sum is an integer below 2**53);
    on CPU a C kernel of direct loops over the planes
    (:mod:`sqcompile.kernels.cpu_grouped_conv`)."""
    return grouped_conv_reference(x, w, stride, padding, dilation, groups)


def grouped_conv_reference(x, w, stride, padding, dilation, groups) -> torch.Tensor:
    """:func:`int8_grouped_conv` as a float64 convolution (any device)."""
    return torch.ops.aten.convolution(x.double(), w.double(), None, stride, padding, dilation, False,
                                      [0] * len(stride), groups).to(torch.int32)


@int8_grouped_conv.register_fake
def _(x, w, stride, padding, dilation, groups):
    return x.new_empty((x.shape[0], w.shape[0], *strided_conv_output_sizes(x.shape[2:], w.shape[2:], stride, padding,
                                                                           dilation)), dtype=torch.int32)


@custom_op(f"{LIB}::int8_grouped_conv_input_grad")
def int8_grouped_conv_input_grad(e: torch.Tensor, w: torch.Tensor, input_sizes: List[int], stride: List[int],
                                 padding: List[int], dilation: List[int], groups: int) -> torch.Tensor:
    """The exact integer input gradient of :func:`int8_grouped_conv`: int8 ``e``
    ``[N, Cout, *O]`` (the output gradient) and ``w`` -> int32 ``input_sizes``
    (``[N, C, *S]``), contiguous.  Reference: float64 ``convolution_backward``."""
    return grouped_conv_input_grad_reference(e, w, input_sizes, stride, padding, dilation, groups)


def grouped_conv_input_grad_reference(e, w, input_sizes, stride, padding, dilation, groups) -> torch.Tensor:
    """:func:`int8_grouped_conv_input_grad` as a float64 ``convolution_backward``."""
    x = e.new_empty(input_sizes, dtype=torch.float64)
    return torch.ops.aten.convolution_backward(e.double(), x, w.double(), None, stride, padding, dilation, False,
                                               [0] * len(stride), groups, [True, False, False])[0].to(torch.int32)


@int8_grouped_conv_input_grad.register_fake
def _(e, w, input_sizes, stride, padding, dilation, groups):
    return e.new_empty(input_sizes, dtype=torch.int32)


@custom_op(f"{LIB}::int8_grouped_conv_weight")
def int8_grouped_conv_weight(e: torch.Tensor, x: torch.Tensor, kernel: List[int], stride: List[int],
                             padding: List[int], dilation: List[int], groups: int) -> torch.Tensor:
    """The exact integer weight gradient of :func:`int8_grouped_conv`: int8 ``e``
    ``[N, Cout, *O]`` and ``x`` ``[N, C, *S]`` -> int64 ``[Cout, C / groups, *kernel]``
    (a sum over the batch and the positions: int64, which no batch overflows).  Reference:
    float64 ``convolution_backward`` (exact below 2**53)."""
    return grouped_conv_weight_reference(e, x, kernel, stride, padding, dilation, groups)


def grouped_conv_weight_reference(e, x, kernel, stride, padding, dilation, groups) -> torch.Tensor:
    """:func:`int8_grouped_conv_weight` as a float64 ``convolution_backward``."""
    w = x.new_empty((e.shape[1], x.shape[1] // groups, *kernel), dtype=torch.float64)
    return torch.ops.aten.convolution_backward(e.double(), x.double(), w, None, stride, padding, dilation, False,
                                               [0] * len(stride), groups, [False, True, False])[1].to(torch.int64)


@int8_grouped_conv_weight.register_fake
def _(e, x, kernel, stride, padding, dilation, groups):
    return e.new_empty((e.shape[1], x.shape[1] // groups, *kernel), dtype=torch.int64)


def strided_conv_output_sizes(sizes, kernel, stride, padding, dilation) -> list:
    """Spatial output sizes of a convolution (PyTorch's formula)."""
    return [(s + 2 * p - d * (k - 1) - 1) // st + 1 for s, k, st, p, d in zip(sizes, kernel, stride, padding, dilation)]


def conv_output_sizes(sizes, kernel, padding, dilation) -> list:
    """Spatial output sizes of a stride-1 convolution."""
    return [s + 2 * p - d * (k - 1) for s, k, p, d in zip(sizes, kernel, padding, dilation)]


def conv_grid_output(x: torch.Tensor, w: torch.Tensor, padding, dilation, alloc: Callable,
                     extra: int = 0) -> torch.Tensor:
    """:func:`int8_conv`'s int32 result for ``x`` and ``w``: a ``[N, Cout, *O]`` view of
    a buffer ``alloc((numel,), dtype=torch.int32, device=...)`` holding the whole padded grid
    ``[N, *(S + 2 p), Cout]`` and ``extra`` more elements."""
    n, cout = x.shape[0], w.shape[0]
    grid = [s + 2 * p for s, p in zip(x.shape[2:], padding)]
    out_sizes = conv_output_sizes(x.shape[2:], w.shape[2:], padding, dilation)
    buf = alloc((_prod(grid) * n * cout + extra,), dtype=torch.int32, device=x.device)
    return buf.as_strided((n, cout, *out_sizes), (_prod(grid) * cout, 1, *row_major_strides(grid, cout)))


def row_major_strides(sizes, inner: int = 1) -> list:
    """Strides of a row-major array of ``sizes`` whose elements are ``inner`` apart."""
    strides = [inner] * len(sizes)
    for d in reversed(range(len(sizes) - 1)):
        strides[d] = strides[d + 1] * sizes[d + 1]
    return strides


class KernelSet(NamedTuple):
    """The primitive ops one implementation family provides (same schemas as the ops above).

    ``"torch"`` is the default family; :mod:`sqcompile.kernels` registers others (``"triton"``)
    with :func:`register_kernel_set`.  The quantized autograd functions below look their
    primitives up here, so the family chosen for a node shows in its graphs as op names."""

    quantize: Callable
    shiftquant: Callable
    dequantize: Callable
    int8_mm: Callable
    # ``(qa, sa, qb, sb, dtype) -> (qa @ qb) * sa * sb`` in ``dtype`` with the dequantization
    # in the GEMM's epilogue (int8 operands, one int32-safe reduction).  Used in eager mode
    # and in graphs compiled with region fusion off (:func:`_epilogue_in_gemm`): with fusion
    # on, graphs keep ``int8_mm`` + elementwise ops, which region fusion turns into one
    # generated kernel with the whole epilogue chain.  ``None``: the family has none.
    scaled_mm: Optional[Callable] = None
    # ``(x, bits, groups, channel_dims, outer_dims, stochastic, prescale) -> (e, s)``:
    # :func:`shiftquant_outer` in the family's own kernels.  ``None``: the composition of
    # :func:`shiftquant_outer` over the family's ``shiftquant`` (the torch family: a fusing
    # compiler makes its elementwise ops and reductions into loops of its own).
    shiftquant_outer: Optional[Callable] = None
    # ``(qx, qw, padding, dilation) -> int32``: :func:`int8_conv`, a stride-1 integer
    # convolution without im2col columns, for CPU tensors (its kernel is the AMX implicit
    # GEMM; without AMX the reference im2col GEMM runs inside the op).  ``None``: stride-1
    # convolutions are im2col GEMMs on ``int8_mm`` (the Triton family: its region fusion
    # works on ``int8_mm`` graphs).
    int8_conv: Optional[Callable] = None
    # ``(e, qx, kernel, padding, dilation) -> int32``: :func:`int8_conv_weight`, the
    # stride-1 weight gradient without im2col columns.  ``None``: an im2col GEMM.
    int8_conv_weight: Optional[Callable] = None


KERNEL_SETS: Dict[str, KernelSet] = {}


def register_kernel_set(name: str, kernels: KernelSet) -> None:
    KERNEL_SETS[name] = kernels


def kernel_set(name: str) -> KernelSet:
    try:
        return KERNEL_SETS[name]
    except KeyError:
        raise ValueError(f"no kernel family {name!r} is registered (have: {sorted(KERNEL_SETS)}); "
                         "import sqcompile.kernels to register the built-in ones") from None


register_kernel_set("torch", KernelSet(
    torch.ops.sqcompile.quantize, torch.ops.sqcompile.shiftquant, torch.ops.sqcompile.dequantize,
    torch.ops.sqcompile.int8_mm, int8_conv=torch.ops.sqcompile.int8_conv,
    int8_conv_weight=torch.ops.sqcompile.int8_conv_weight))


# --------------------------------------------------------------------------------------------
# Observing variants (collect_stats=True): same results, plus measured quality per op
# --------------------------------------------------------------------------------------------

@custom_op(f"{LIB}::quantize_observed", tags=_RANDOM)
def quantize_observed(x: torch.Tensor, bits: int, keep_dims: List[int], stochastic: bool, key: str,
                      role: str) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize` that also records the SQNR of its result under ``key``/``role``."""
    q, scale = N.quantize(x, bits, keep_dims, "stochastic" if stochastic else "nearest")
    decisions.observe(key, role, N.sqnr_terms(x, N.dequantize(q, scale)), bits=bits)
    return q, scale


quantize_observed.register_fake(lambda x, bits, keep_dims, stochastic, key, role:
                                _quantize_fake(x, bits, keep_dims, stochastic))


@custom_op(f"{LIB}::shiftquant_observed", tags=_RANDOM)
def shiftquant_observed(x: torch.Tensor, bits: int, groups: int, channel_dims: List[int], stochastic: bool,
                        key: str, role: str, prescale: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`shiftquant` that also records SQNR, the per-tensor SQNR at the same bits (the
    baseline ShiftQuant must beat) and the fraction of channels in each group."""
    rounding = "stochastic" if stochastic else "nearest"
    x = N.apply_prescale(x, prescale, channel_dims)
    r = N.shiftquant(x, bits, groups, channel_dims, rounding)
    decisions.observe(key, role, N.sqnr_terms(x, r.dequantize()), bits=bits, groups=groups,
                      per_tensor=N.sqnr_terms(x, N.fake_quantize(x.float(), bits, (), rounding)),
                      occupancy=torch.bincount(r.group.flatten(), minlength=groups).tolist())
    return r.expanded, r.base_scale


shiftquant_observed.register_fake(lambda x, bits, groups, channel_dims, stochastic, key, role, prescale=None:
                                  _shiftquant_fake(x, bits, groups, channel_dims, stochastic, prescale))


def _quantize(ks: "KernelSet", stats: Optional[str], role: str, x, bits, keep_dims, stochastic):
    if stats is None:
        return ks.quantize(x, bits, keep_dims, stochastic)
    return torch.ops.sqcompile.quantize_observed(x, bits, keep_dims, stochastic, stats, role)


def _shiftquant(ks: "KernelSet", stats: Optional[str], role: str, x, bits, groups, channel_dims, prescale=None,
                stochastic: bool = True):
    """ShiftQuant of ``x * prescale`` (the product is formed inside the quantizer); stochastic
    rounding for gradients, nearest for activations (``act_groups``)."""
    if stats is None:
        return ks.shiftquant(x, bits, groups, channel_dims, stochastic, prescale)
    return torch.ops.sqcompile.shiftquant_observed(x, bits, groups, channel_dims, stochastic, stats, role, prescale)


def _quantize_act(ks: "KernelSet", stats: Optional[str], x, bits, keep_dims, channel_dims, groups: int):
    """``(q, s)``: the quantized activation of a GEMM, ``s`` one scale per index of ``keep_dims``
    (a GEMM row, a conv's sample), nearest rounding.

    ``groups > 1`` (``act_groups``): :func:`shiftquant_outer` with those scales as its outer
    scale and ShiftQuant over ``channel_dims`` (the features / input channels the product sums
    over, per batch entry): a channel whose range is 2, 4, ... times below the largest gets
    steps 2, 4, ... times finer (the larger channels' integers are shifted left instead), so
    it keeps its resolution where one scale per row would round it to a few levels (a
    depthwise conv's output channels, the outlier features of a transformer), and ``q`` is
    still one integer tensor with one scale per row.
    The caller picks ``groups`` so that ``q`` fits int8 (:func:`sqcompile.config.act_groups_for`)."""
    if groups <= 1:
        return _quantize(ks, stats, "act", x, bits, keep_dims, False)
    return _shiftquant_outer(ks, stats, "act", x, bits, groups, channel_dims, keep_dims, False)


def _scale_shape(x: torch.Tensor, keep_dims: Sequence[int]) -> list:
    keep = {d % x.dim() for d in keep_dims} if x.dim() else set()
    return [s if d in keep else 1 for d, s in enumerate(x.shape)]


# --------------------------------------------------------------------------------------------
# Integer GEMM with int32 overflow protection and int16 operands
# --------------------------------------------------------------------------------------------

def integer_matmul(a: torch.Tensor, b: torch.Tensor, int8_mm: Callable = None) -> torch.Tensor:
    """``a @ b`` for integer operands, returned as float32 holding the exact integer result.

    * int16 operands (ShiftQuant's expanded form when it does not fit int8) are split in two
      int8 digits, ``e = hi * 128 + lo``, and computed as two int8 GEMMs combined by a shift.
    * Reductions longer than :data:`MAX_INT32_TERMS` are split and their int32 partial sums
      added in float64 so int32 never overflows.

    ``int8_mm`` is the kernel family's int8 GEMM (default ``torch.ops.sqcompile.int8_mm``).
    """
    mm = int8_mm or torch.ops.sqcompile.int8_mm
    if a.dtype == torch.int16:
        hi, lo = _split_int16(a)
        return integer_matmul(hi, b, mm) * 128.0 + integer_matmul(lo, b, mm)
    if b.dtype == torch.int16:
        hi, lo = _split_int16(b)
        return integer_matmul(a, hi, mm) * 128.0 + integer_matmul(a, lo, mm)
    K = a.shape[-1]
    if K <= MAX_INT32_TERMS:
        return mm(a, b).float()
    acc = None
    for k0 in range(0, K, MAX_INT32_TERMS):
        part = mm(a[..., k0:k0 + MAX_INT32_TERMS], b[..., k0:k0 + MAX_INT32_TERMS, :])
        acc = part.double() if acc is None else acc + part.double()
    return acc.float()


def _split_int16(e: torch.Tensor):
    """``e = hi * 128 + lo`` with int8 digits; |e| <= 127*128 keeps |hi| <= 127, |lo| <= 64."""
    e32 = e.to(torch.int32)
    hi = torch.div(e32 + 64, 128, rounding_mode="floor")
    lo = e32 - hi * 128
    return hi.to(torch.int8), lo.to(torch.int8)


# --------------------------------------------------------------------------------------------
# Quantized matmul (linear, matmul, bmm share it)
# --------------------------------------------------------------------------------------------

def _gemm(ks: KernelSet, qa, sa, qb, sb, integer: bool, dtype):
    """``(sa * qa) @ (sb * qb)``: ``sa`` per row of ``qa``, ``sb`` per column of ``qb``
    (``None``: the operand carries no scale, its gradient partner holds it)."""
    if integer:
        if ks.scaled_mm is not None and _epilogue_in_gemm() and qa.dtype == qb.dtype == torch.int8 \
                and qa.shape[-1] <= MAX_INT32_TERMS:
            one = None if sa is not None and sb is not None else torch.ones((), device=qa.device)
            return ks.scaled_mm(qa, one if sa is None else sa, qb, one if sb is None else sb, dtype)
        scale = sa if sb is None else sb if sa is None else sa * sb
        return (integer_matmul(qa, qb, ks.int8_mm) * scale).to(dtype)
    return _dequant(ks, qa, sa, dtype) @ _dequant(ks, qb, sb, dtype)


def _tracing() -> bool:
    """Is a graph being traced?  Detected both ways torch versions expose it (Dynamo's flag;
    the tracing context AOTAutograd runs in)."""
    return torch.compiler.is_compiling() or torch._guards.TracingContext.try_get() is not None


def _epilogue_in_gemm() -> bool:
    """Dequantize in the GEMM's own epilogue (the family's ``scaled_mm``)?  Yes in eager mode
    and in compiled graphs with region fusion off; no while a graph is traced for region
    fusion (:mod:`sqcompile.backends.fusion`), which needs ``int8_mm`` and the elementwise ops
    after it as separate nodes to fuse the whole chain (bias, activation, residual) into one
    kernel."""
    if not _tracing():
        return True
    fusion = sys.modules.get("sqcompile.backends.fusion")
    return fusion is not None and not fusion.enabled()


def _saves_maxima(ks: KernelSet) -> bool:
    """Does a quantized GEMM save its operands' channel maxima for backward, rather than their
    scales?  Yes for the torch family while a graph is traced: a fusing compiler (Inductor)
    computes the maxima in the quantizer's own loop, whereas a saved scale (a per-row value
    derived from them) is an output of the compiled forward, which Inductor's CPU code
    generator computes in a loop of its own that splits the loop over rows it shares with
    the operand's producer -- the L1 norm before a Linear, the softmax before ``P @ V`` --
    into one pass over memory per reduction.  The backward derives the scales with the
    quantizer's own expression (:func:`numerics.scale_of_amax`): the same bits."""
    return ks.quantize is torch.ops.sqcompile.quantize and _tracing()


def _dequant(ks: KernelSet, q, scale, dtype):
    if scale is None:
        return q.to(dtype)
    return ks.dequantize(q, scale, dtype)


class _QuantMatmul(torch.autograd.Function):
    """``a [B, M, K] @ b [B, K, N]`` with quantized operands and ShiftQuant-ed gradients."""

    @staticmethod
    def forward(ctx, a, b, a_bits, b_bits, grad_bits, groups, integer, kernels, stats, b_role, outer=False,
                a_groups=1):
        ks = kernel_set(kernels)
        qa, sa = _quantize_act(ks, stats, a, a_bits, [0, 1], [0, 2], a_groups)   # per (batch, row)
        qb, sb = _quantize(ks, stats, b_role, b, b_bits, [0, 2], False)    # per (batch, column)
        ctx.maxima = (a_bits, b_bits) if _saves_maxima(ks) and a_groups <= 1 else None
        if ctx.maxima is None:
            ctx.save_for_backward(qa, sa, qb, sb)
        else:
            ctx.save_for_backward(qa, N.amax(a, [0, 1]), qb, N.amax(b, [0, 2]))
        ctx.cfg = (grad_bits, groups, integer, ks, stats, a.dtype, b.dtype, outer)
        ctx.needs = ctx.needs_input_grad[:2]
        ctx.col_major = (_col_major(a), _col_major(b))
        return _gemm(ks, qa, sa, qb, sb, integer, a.dtype)

    @staticmethod
    def backward(ctx, dy):
        qa, sa, qb, sb = ctx.saved_tensors
        if ctx.maxima is not None:
            sa, sb = (N.scale_of_amax(m, bits) for m, bits in zip((sa, sb), ctx.maxima))
        grad_bits, groups, integer, ks, stats, a_dtype, b_dtype, outer = ctx.cfg
        da = db = None
        # Each gradient is produced in its input's memory order (a column-major input, such as
        # a Linear's ``weight.t()`` or attention's ``K^T``, gets (dX^T)^T), so the view
        # backward that follows is free instead of a transposing copy.
        a_cm, b_cm = ctx.col_major
        if ctx.needs[0]:   # dA = (dY * sB) @ qB^T, reduction over n
            e, s = _gradient(ks, stats, "grad_dx", dy, grad_bits, groups, [0, 2], sb, [0, 1] if outer else None)
            if a_cm:
                da = _gemm(ks, qb, None, e.transpose(-1, -2), _t(s), integer, a_dtype).transpose(-1, -2)
            else:
                da = _gemm(ks, e, s, qb.transpose(-1, -2), None, integer, a_dtype)
        if ctx.needs[1]:   # dB = qA^T @ (dY * sA), reduction over m
            e, s = _gradient(ks, stats, "grad_dw", dy, grad_bits, groups, [0, 1], sa, [0, 2] if outer else None)
            if b_cm:
                db = _gemm(ks, e.transpose(-1, -2), _t(s), qa, None, integer, b_dtype).transpose(-1, -2)
            else:
                db = _gemm(ks, qa.transpose(-1, -2), None, e, s, integer, b_dtype)
        return da, db, *[None] * 10


def _gradient(ks: KernelSet, stats: Optional[str], role: str, dy, bits, groups, channel_dims, prescale,
              outer_dims: Optional[List[int]]):
    """``(e, s)``: ShiftQuant of ``dy * prescale`` for a backward GEMM whose reduction runs
    over ``channel_dims``; ``s`` is the GEMM's scale for ``e``.

    ``outer_dims`` (``grad_outer_scale=True``): the dims that stay in the GEMM's output (the
    batch and the free axis: tokens for ``dX``, output features for ``dW``), for
    :func:`shiftquant_outer`: ``s`` is then one factor per row (``dX``) or column (``dW``) of
    the product, which the GEMM applies in its epilogue as it does the forward's per-row
    scales."""
    if outer_dims is None:
        return _shiftquant(ks, stats, role, dy, bits, groups, channel_dims, prescale=prescale)
    return _shiftquant_outer(ks, stats, role, dy, bits, groups, channel_dims, outer_dims, True, prescale)


def _shiftquant_outer(ks: KernelSet, stats: Optional[str], role: str, x, bits, groups, channel_dims, outer_dims,
                      stochastic: bool, prescale=None):
    """:func:`shiftquant_outer` on the family's own kernel where it has one (and no statistics
    are collected), else composed around its ShiftQuant (observed under ``role`` with
    ``stats``): a gradient's (stochastic) and, with ``act_groups``, an activation's (nearest)."""
    if stats is None and ks.shiftquant_outer is not None:
        return ks.shiftquant_outer(x, bits, groups, channel_dims, outer_dims, stochastic, prescale)
    quantizer = functools.partial(_shiftquant_as, ks, stats, role)
    return shiftquant_outer(quantizer, x, bits, groups, channel_dims, outer_dims, stochastic, prescale)


def _shiftquant_as(ks, stats, role, x, bits, groups, channel_dims, stochastic, prescale=None):
    return _shiftquant(ks, stats, role, x, bits, groups, channel_dims, prescale=prescale, stochastic=stochastic)


def shiftquant_outer(quantizer: Callable, x: torch.Tensor, bits: int, groups: int, channel_dims: Sequence[int],
                     outer_dims: Sequence[int], stochastic: bool, prescale: Optional[torch.Tensor] = None):
    """ShiftQuant with an outer scale (``grad_outer_scale``): ``(e, base * r)`` for
    ``y = x * prescale``, ``r`` the maximum of ``|y|`` per index of ``outer_dims`` (the dims a
    GEMM's output keeps; 0 taken as 1, so an all-zero row stays zero) and ``(e, base)`` the
    ShiftQuant (``quantizer``, :func:`shiftquant`'s signature) of ``y / r``.

    ShiftQuant groups the *reduction* axis under one base scale for the whole tensor; a scale
    per *free* index (per token for ``dX = dY W``, per output feature for ``dW = dY^T X``)
    factors out of the integer GEMM into its epilogue, so the integer GEMM is the same and a
    token whose gradient is small no longer shares its steps with the largest."""
    y = N.apply_prescale(x, prescale, channel_dims).float()
    r = N.safe_div_scale(N.amax(y, outer_dims))
    e, s = quantizer(y / r, bits, groups, channel_dims, stochastic)
    return e, s * r


def _t(s: torch.Tensor) -> torch.Tensor:
    """A GEMM scale for the transposed operand: rows become columns (a scalar stays)."""
    return s.transpose(-1, -2) if s.dim() >= 2 else s


def _col_major(t: torch.Tensor) -> bool:
    """Are ``t``'s matrices (last two dims) stored column by column (a transposed view)?

    A layout preference only, so a size or stride not known at trace time (the data-dependent
    row count of a mixture-of-experts' routed tokens) answers "no" instead of guarding."""
    return t.dim() >= 2 and all(guard_or_false(c) for c in (
        t.shape[-1] > 1, t.shape[-2] > 1, t.stride(-2) == 1, t.stride(-1) != 1))


def _flatten_batch(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``[B, M, K]``; column-major matrices (attention's ``K^T``) stay column-major
    when the flattening has to copy, so no transposing copy is made in either direction."""
    if _col_major(t):
        return t.transpose(-1, -2).reshape(-1, t.shape[-1], t.shape[-2]).transpose(-1, -2)
    return t.reshape(-1, *t.shape[-2:])


def _autocast_like(fn):
    """Give a quantized op's result the dtype PyTorch gives it under ``torch.autocast``: every
    op decorated here (linear, matmul / mm / bmm, addmm / baddbmm, einsum, conv, attention)
    is on autocast's lower-precision list, so inside an enabled autocast region its result is
    in the autocast dtype (bfloat16 on CPU by default), and code after it (a dtype check, a
    bf16 activation kept for memory) sees what it would see in eager mode.  The quantizers
    and GEMMs run with autocast off: the integer products are exact whatever the float
    dtype, and a simulated GEMM would otherwise be cast to bfloat16 before it multiplies.

    Outside autocast, float operands of different dtypes are refused as PyTorch's op refuses
    them (a float32 batch into a bfloat16 model): quantized, they would otherwise run.  Only
    a graph's call is checked, not these ops' calls of each other (autocast is off in those)."""
    operands = 3 if fn.__name__ == "quantized_sdpa" else None        # not the attention mask

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        if _NESTED.get():
            return fn(*args, **kwargs)
        device = next(a for a in args if isinstance(a, torch.Tensor)).device.type
        token = _NESTED.set(True)
        try:
            if not torch.is_autocast_enabled(device):
                _check_dtypes(fn.__name__, args[:operands])
                return fn(*args, **kwargs)
            with torch.autocast(device, enabled=False):
                y = fn(*args, **kwargs)
            return y.to(torch.get_autocast_dtype(device)) if y.is_floating_point() else y
        finally:
            _NESTED.reset(token)
    return wrapped


_NESTED = contextvars.ContextVar("sqcompile_quantized_op_nested", default=False)


def _check_dtypes(name: str, args) -> None:
    dtypes = [a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
    if len(set(dtypes)) > 1:
        raise RuntimeError(f"expected the operands of {name[len('quantized_'):]} to have the same dtype (as "
                           f"PyTorch requires without autocast), but got "
                           f"{', '.join(str(d).replace('torch.', '') for d in dtypes)}")


@_autocast_like
def quantized_matmul(a, b, *, a_bits: int, b_bits: int, grad_bits: int, groups: int, integer: bool,
                     kernels: str = "torch", stats: Optional[str] = None, outer_scale: bool = False,
                     a_groups: int = 1):
    """``torch.matmul`` semantics (1-D operands, broadcasting batch dims) with quantization.
    ``a_groups`` > 1: ``a``'s ShiftQuant groups over its columns (``act_groups``, see
    :func:`_quantize_act`)."""
    if a.dim() == 0 or b.dim() == 0:
        raise ValueError("quantized_matmul needs operands with at least one dim")
    squeeze_m = a.dim() == 1
    squeeze_n = b.dim() == 1
    if squeeze_m:
        a = a.unsqueeze(0)
    if squeeze_n:
        b = b.unsqueeze(-1)
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a3 = _flatten_batch(a.expand(*batch, *a.shape[-2:]))
    b3 = _flatten_batch(b.expand(*batch, *b.shape[-2:]))
    if a3.shape[0] != b3.shape[0]:
        raise RuntimeError("quantized_matmul: batch shapes do not broadcast")  # pragma: no cover
    y = _QuantMatmul.apply(a3, b3, a_bits, b_bits, grad_bits, groups, integer, kernels, stats, "act_b", outer_scale,
                           a_groups)
    y = y.reshape(*batch, y.shape[-2], y.shape[-1])
    if squeeze_m:        # before n: a 1-d by 1-d product (a dot) leaves a 0-dim result
        y = y.squeeze(-2)
    if squeeze_n:
        y = y.squeeze(-1)
    return y


@_autocast_like
def quantized_linear(x, weight, bias=None, *, a_bits: int, w_bits: int, grad_bits: int, groups: int,
                     integer: bool, kernels: str = "torch", stats: Optional[str] = None, outer_scale: bool = False,
                     a_groups: int = 1):
    """``F.linear`` with quantized activations (per token; with ``a_groups`` > 1 also ShiftQuant
    over the input features, :func:`_quantize_act`), weights (per output feature) and
    ShiftQuant-ed gradients.  The bias is added in float.  A 1-d ``weight`` ``[in]`` is
    ``F.linear``'s dot-product form (``[..., in] -> [...]``): one output feature."""
    if weight.dim() == 1:
        y = quantized_linear(x, weight.unsqueeze(0), None, a_bits=a_bits, w_bits=w_bits, grad_bits=grad_bits,
                             groups=groups, integer=integer, kernels=kernels, stats=stats,
                             outer_scale=outer_scale, a_groups=a_groups).squeeze(-1)
        return y if bias is None else y + bias
    lead = x.shape[:-1]
    x3 = x.reshape(1, -1, x.shape[-1])
    y = _QuantMatmul.apply(x3, weight.t().unsqueeze(0), a_bits, w_bits, grad_bits, groups, integer, kernels, stats,
                          "weight", outer_scale, a_groups)
    y = y.reshape(*lead, weight.shape[0])
    return y if bias is None else y + bias


@_autocast_like
def quantized_addmm(inp, a, b, *, beta=1, alpha=1, a_bits, b_bits, grad_bits, groups, integer, kernels="torch",
                    stats=None, outer_scale=False, a_groups=1):
    """``torch.addmm`` / ``torch.baddbmm``: ``beta * inp + alpha * (a @ b)``."""
    y = quantized_matmul(a, b, a_bits=a_bits, b_bits=b_bits, grad_bits=grad_bits, groups=groups, integer=integer,
                         kernels=kernels, stats=stats, outer_scale=outer_scale, a_groups=a_groups)
    if alpha != 1:
        y = y * alpha
    if beta == 0:
        return y
    return y + (inp if beta == 1 else beta * inp)


# --------------------------------------------------------------------------------------------
# Quantized convolution
# --------------------------------------------------------------------------------------------

class _QuantConv(torch.autograd.Function):
    """N-d convolution with quantized input (one scale per sample: each row of the im2col
    GEMM belongs to one sample, so the scale factors out of its sums as a row scale), weight
    (per output channel) and ShiftQuant-ed gradients: along output channels for ``dX``, along
    (batch, positions) for ``dW`` (the input's per-sample scale folded in first, as a Linear's
    per-row scale).  Integer execution uses an int8 im2col GEMM (``groups == 1``); grouped
    and depthwise convolutions use :func:`int8_grouped_conv` and its two gradients, direct
    loops over the NCHW planes (a depthwise conv's reduction is only its taps: nothing for a
    GEMM to do).

    ``dX``'s ShiftQuant takes one range per (sample, output channel), not per output channel:
    the expanded integers share one base scale whatever the grouping, so the integer GEMM is
    the same, and a sample whose gradient is a few times smaller than the batch's largest (a
    well-classified one, under cross-entropy) gets its own rungs of the ladder instead of the
    steps of the largest sample's channels (``benchmarks/quant_error.py``, a small CNN's conv
    gradients at 4 bits, G=4: SQNR 5.2 -> 11.1 dB, past the 7.0 dB of exact per-channel
    scales, which no integer GEMM can apply).  With ``outer`` (``grad_outer_scale``) ``dX`` also
    gets one scale per sample (a row scale of its GEMM; per position it would not factor,
    every output position sums several input positions) and ``dW`` one per output channel.

    ``transposed`` (``conv_transpose``, weight ``[Cin, Cout / groups, *k]``): the same
    quantizers on the same tensors -- the output gradient plays the same two roles -- with the
    products exchanged: the forward is a convolution's input gradient
    (:func:`im2col_conv_input_grad` of ``x`` through ``W`` read as a ``Cout -> Cin``
    convolution's weight), ``dX`` that convolution's forward (:func:`im2col_conv` of ``dY``)
    and ``dW`` its weight gradient with the operands' roles swapped (``x`` the gradient side,
    ``dY`` the im2col side).  The weight's scale is per index of its dim 1, the output channel
    (the scale that factors out of the forward's sums); with ``groups > 1`` (simulated) the
    output channels at the same index of each group share it."""

    @staticmethod
    def forward(ctx, x, w, a_bits, w_bits, grad_bits, groups, integer, kernels, stats, stride, padding, dilation,
                conv_groups, outer=False, transposed=False, output_padding=None, a_groups=1):
        ks = kernel_set(kernels)
        qx, sx = _quantize_act(ks, stats, x, a_bits, [0], [0, 1], a_groups)     # one scale per sample
        grouped = conv_groups > 1       # integer: direct loops over NCHW planes (int8_grouped_conv)
        if integer and not grouped:
            qx = _gather_layout(ks, qx, stride)
        qw, sw = _quantize(ks, stats, "weight", w, w_bits, [1] if transposed else [0], False)
        ctx.save_for_backward(qx, sx, qw, sw)
        output_padding = list(output_padding or [0] * len(stride))
        ctx.cfg = (grad_bits, groups, integer, ks, stats, stride, padding, dilation, conv_groups, x.dtype, w.dtype,
                   outer, transposed, output_padding)
        ctx.needs = ctx.needs_input_grad[:2]
        if integer:
            channel_scale = sx * sw.reshape(1, -1, *[1] * (x.dim() - 2))     # per sample x per output channel
            if transposed:
                out_shape = [x.shape[0], w.shape[1], *_conv_transpose_sizes(x.shape[2:], w.shape[2:], stride,
                                                                            padding, dilation, output_padding)]
                acc = im2col_conv_input_grad(ks, qx, qw, out_shape, stride, padding, dilation)
            elif grouped:
                acc = int8_grouped_conv(qx, qw, list(stride), list(padding), list(dilation), conv_groups).float()
            else:
                acc = im2col_conv(ks, qx, qw, stride, padding, dilation)
            return (acc * channel_scale).to(x.dtype).contiguous(memory_format=_conv_memory_format(x, w))
        xd = ks.dequantize(qx, sx, x.dtype)
        wd = ks.dequantize(qw, sw, w.dtype)
        y = torch.ops.aten.convolution(xd, wd, None, stride, padding, dilation, transposed, output_padding, conv_groups)
        return y.contiguous(memory_format=_conv_memory_format(x, w))     # xd is contiguous whatever x was

    @staticmethod
    def backward(ctx, dy):
        qx, sx, qw, sw = ctx.saved_tensors
        (grad_bits, groups, integer, ks, stats, stride, padding, dilation, conv_groups, x_dtype, w_dtype, outer,
         transposed, output_padding) = ctx.cfg
        sw = sw.reshape(-1)
        if transposed and conv_groups > 1:        # one scale per index within a group: per output channel
            sw = sw.repeat(conv_groups)
        spatial = list(range(2, dy.dim()))
        conv = dict(stride=stride, padding=padding, dilation=dilation, transposed=transposed,
                    output_padding=output_padding, conv_groups=conv_groups)
        dx = dw = None
        if ctx.needs[0]:   # reduction over output channels (and taps): ranges per (sample, channel)
            e, s = _gradient(ks, stats, "grad_dx", dy, grad_bits, groups, [0, 1],
                             sw.reshape(1, -1, *[1] * len(spatial)), [0] if outer else None)
            if integer and conv_groups > 1:
                acc = int8_grouped_conv_input_grad(e, qw, list(qx.shape), list(stride), list(padding), list(dilation),
                                                   conv_groups).float()
                dx = (acc * s).to(x_dtype).contiguous(memory_format=_conv_memory_format(dy, qw))
            elif integer:
                e = _gather_layout(ks, e, stride)
                if transposed:
                    acc = im2col_conv(ks, e, qw, stride, padding, dilation)
                else:
                    acc = im2col_conv_input_grad(ks, e, qw, qx.shape, stride, padding, dilation)
                dx = (acc * s).to(x_dtype).contiguous(memory_format=_conv_memory_format(dy, qw))
            else:
                dx = _conv_backward(_dequant(ks, e, s, torch.float32), qx.float(), qw.float(), mask=(True, False),
                                    **conv)[0].to(x_dtype).contiguous(memory_format=_conv_memory_format(dy, qw))
        if ctx.needs[1]:   # reduction over (batch, output positions); with ``outer``, a scale per output channel
            e, s = _gradient(ks, stats, "grad_dw", dy, grad_bits, groups, [0, *spatial], sx, [1] if outer else None)
            if integer and conv_groups > 1:   # int64 sums over the batch
                dw = int8_grouped_conv_weight(e, qx, list(qw.shape[2:]), list(stride), list(padding), list(dilation),
                                              conv_groups)
                dw = (dw.double() * s.reshape(-1, *[1] * len(spatial) + [1])).to(w_dtype)
            elif integer:
                e = _gather_layout(ks, e, stride)
                if transposed:   # dW[ci, co, k] = sum over (n, l) of x[n, ci, l] dY[n, co, l*s + k*d - p]
                    dw = im2col_conv_weight_grad(ks, qx, e, qw.shape, stride, padding, dilation)
                    dw = dw * s.reshape(1, -1, *[1] * len(spatial))
                else:
                    dw = im2col_conv_weight_grad(ks, e, qx, qw.shape, stride, padding, dilation)
                    dw = dw * s.reshape(-1, *[1] * len(spatial) + [1])
                dw = dw.to(w_dtype)
            else:
                dw = _conv_backward(_dequant(ks, e, s, torch.float32), qx.float(), qw.float(), mask=(False, True),
                                    **conv)[1].to(w_dtype)
        return dx, dw, *[None] * 15


def _conv_transpose_sizes(sizes, kernel, stride, padding, dilation, output_padding):
    """Spatial output sizes of a transposed convolution (PyTorch's formula)."""
    return [(i - 1) * s - 2 * p + d * (k - 1) + op + 1
            for i, k, s, p, d, op in zip(sizes, kernel, stride, padding, dilation, output_padding)]


def _gather_layout(ks: KernelSet, q: torch.Tensor, stride) -> torch.Tensor:
    """The int8 conv operand ``q`` in the layout its products read: as it is when the
    family's implicit-GEMM ops take every product of a stride-1 conv (``int8_conv`` and
    ``int8_conv_weight`` copy their operands onto their padded grids from any layout, in C),
    else channels-last (:func:`_channels_last`, for the im2col gathers).

    Decision: the quantizer that makes ``q`` writes it in its source's layout.  Asked for
    channels-last, Inductor fused the quantizer of an NCHW norm's output into a loop that
    stored its int8 values one byte at a time, 64 bytes apart (a U-Net's 64-channel maps),
    for a copy the implicit ops make again anyway."""
    if _implicit(ks.int8_conv, q, q, stride) and _implicit(ks.int8_conv_weight, q, q, stride):
        return q
    return _channels_last(q)


def _channels_last(q: torch.Tensor) -> torch.Tensor:
    """``q`` (``[N, C, *S]``) stored channels-last, as the int8 im2col GEMMs gather it: each
    tap reads ``C`` adjacent bytes.  A copy by the opaque :func:`channels_last` when ``q`` is
    not stored so: as a plain ``contiguous()`` Inductor inlined the quantizer that makes
    ``q`` into the gather, recomputing it (noise hash included) once per tap, and a ResNet
    step ran 3x slower."""
    return q if q.movedim(1, -1).is_contiguous() else channels_last(q)


def _conv_memory_format(x: torch.Tensor, w: torch.Tensor) -> torch.memory_format:
    """The memory format PyTorch's own convolution gives its output (and input gradient):
    channels-last when a 4-d (5-d) input or weight is stored channels-last (channels-last-3d),
    else contiguous.

    The int8 im2col GEMM produces channels-last values (``[N * L, Cout]``), and returning
    them as such was wrong twice over: user code that views a conv's output
    (``y.view(n, -1)``) failed, and AOTAutograd, which coerces incoming gradients only to
    the standard memory formats, handed the backward graph a gradient whose strides were
    not the traced ones (a 3-d ``[N, C, L]`` tensor has no channels-last format).  Under
    Inductor the layout change fuses into the dequantize; run eagerly it is one copy."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if fmt is not None and any(t.dim() == x.dim() and not t.is_contiguous() and t.is_contiguous(memory_format=fmt)
                               for t in (x, w)):
        return fmt
    return torch.contiguous_format


def _conv_backward(dy, x, w, *, stride, padding, dilation, transposed, output_padding, conv_groups, mask):
    return torch.ops.aten.convolution_backward(
        dy, x, w, None, stride, padding, dilation, transposed, output_padding, conv_groups, [*mask, False])


def _im2col(q: torch.Tensor, kernel, stride, padding, dilation):
    """int8 im2col in channels-last order: ``[N, C, *S]`` -> ``[N * L, prod(kernel) * C]``.

    Columns are ordered (taps..., channel) so every gathered run is ``C`` contiguous bytes of
    the channels-last input, which compilers copy with vector loads; the weights are
    flattened the same way by :func:`_flat_weight`."""
    nd = len(kernel)
    q = q.movedim(1, -1)                                                    # [N, *S, C]
    if any(padding):
        q = torch.nn.functional.pad(q, [0, 0] + [p for pad in reversed(padding) for p in (pad, pad)])
    view = q
    for d in range(nd):   # unfold each spatial dim: [N, O1.., C, W1..] (W_d = dilated window)
        view = view.unfold(1 + d, dilation[d] * (kernel[d] - 1) + 1, stride[d])
    index = [slice(None)] * (2 + nd) + [slice(None, None, dilation[d]) for d in range(nd)]
    view = view[tuple(index)]                                               # every dilation-th tap
    n, c = view.shape[0], view.shape[1 + nd]
    out_sizes = view.shape[1:1 + nd]
    perm = [0, *range(1, 1 + nd), *range(2 + nd, 2 + 2 * nd), 1 + nd]      # [N, O.., k.., C]
    cols = view.permute(perm).reshape(n * _prod(out_sizes), _prod(kernel) * c)
    return cols, out_sizes


def _flat_weight(w: torch.Tensor) -> torch.Tensor:
    """``[Cout, C, *k]`` -> ``[Cout, prod(k) * C]`` in :func:`_im2col`'s column order."""
    return w.movedim(1, -1).reshape(w.shape[0], -1)


def _prod(xs):
    """Product of sizes; symbolic sizes stay symbolic (no int(): it would specialize)."""
    p = 1
    for v in xs:
        p = p * v
    return p


def im2col_conv(ks: KernelSet, qx, qw, stride, padding, dilation):
    """Integer convolution (groups == 1) as one int8 GEMM; float32 holding exact integers.
    At stride 1 the family's :func:`int8_conv` when it has one (an implicit GEMM on CPUs
    with AMX: no columns written)."""
    if _implicit_conv(ks, qx, qw, stride):
        # the weight channels-innermost, as the kernel's k steps read it: made by the compiled
        # graph's loop that quantizes (forward) or flips (input gradient) the weight
        qw = qw.movedim(1, -1).contiguous().movedim(-1, 1)
        return ks.int8_conv(qx, qw, list(padding), list(dilation)).float()
    kernel = qw.shape[2:]
    cols, out_sizes = _im2col(qx, kernel, stride, padding, dilation)
    acc = integer_matmul(cols, _flat_weight(qw).t(), ks.int8_mm)                      # [N*L, Cout]
    n = qx.shape[0]
    return acc.reshape(n, *out_sizes, qw.shape[0]).movedim(-1, 1)


def im2col_conv_weight_grad(ks: KernelSet, e, qx, w_shape, stride, padding, dilation):
    """``dW = e^T @ im2col(qx)`` as one integer GEMM (reduction over batch and positions).
    At stride 1 the family's :func:`int8_conv_weight` when it has one (no columns), over
    slices of the batch whose grids keep the int32 sums exact."""
    per_sample = _prod([s + 2 * p for s, p in zip(qx.shape[2:], padding)])
    if _implicit(ks.int8_conv_weight, e, qx, stride) and per_sample <= MAX_INT32_TERMS:
        args = (list(w_shape[2:]), list(padding), list(dilation))
        if qx.shape[0] * per_sample <= MAX_INT32_TERMS:
            return ks.int8_conv_weight(e, qx, *args).float()
        step = MAX_INT32_TERMS // per_sample
        return sum(ks.int8_conv_weight(e[i:i + step], qx[i:i + step], *args).double()
                   for i in range(0, qx.shape[0], step)).float()
    cols, _ = _im2col(qx, w_shape[2:], stride, padding, dilation)         # [N*L, k*C]
    e2 = e.movedim(1, -1).reshape(-1, e.shape[1])                          # [N*L, Cout]
    dw = integer_matmul(e2.t(), cols, ks.int8_mm)                          # [Cout, k*C]
    return dw.reshape(w_shape[0], *w_shape[2:], w_shape[1]).movedim(-1, 1)


def im2col_conv_input_grad(ks: KernelSet, e, qw, x_shape, stride, padding, dilation):
    """``dX`` as integer convolutions (float32 holding the exact integers).  Stride 1: one
    im2col GEMM (:func:`_dilated_conv_input_grad`); larger strides: one GEMM per output
    phase over only the taps that reach it (:func:`_strided_conv_input_grad`)."""
    if any(st > 1 for st in stride):
        return _strided_conv_input_grad(ks, e, qw, x_shape, stride, padding, dilation)
    return _dilated_conv_input_grad(ks, e, qw, x_shape, stride, padding, dilation)


def _dilated_conv_input_grad(ks: KernelSet, e, qw, x_shape, stride, padding, dilation):
    """The transposed convolution of ``e`` written as a plain one -- ``e`` dilated by the
    stride (zeros in between), padded by ``dilation * (k - 1) - padding`` (negative pads
    crop), convolved with the spatially flipped, in/out-swapped weights at stride 1 -- so it
    is one int8 im2col GEMM and no overlapping taps have to be summed afterwards (``fold`` is
    a slow scatter-add).  Used for stride 1 (nothing to dilate); for larger strides it does
    ``prod(stride)`` times the necessary work and stays as the reference the phase split is
    tested against."""
    nd = len(x_shape) - 2
    kernel = qw.shape[2:]
    if any(st > 1 for st in stride):
        dilated = e.new_zeros((*e.shape[:2], *[(o - 1) * st + 1 for o, st in zip(e.shape[2:], stride)]))
        dilated[(slice(None), slice(None), *[slice(None, None, st) for st in stride])] = e
        e = dilated
    pads = []
    for d in reversed(range(nd)):            # F.pad wants the last dim first
        left = dilation[d] * (kernel[d] - 1) - padding[d]
        right = x_shape[2 + d] - (e.shape[2 + d] + left - dilation[d] * (kernel[d] - 1))
        pads += [left, right]
    w_t = qw.flip(list(range(2, 2 + nd))).transpose(0, 1)                  # [Cin, Cout, k...]
    if all(v >= 0 for v in pads) and pads[::2] == pads[1::2]:     # stride 1: the conv pads symmetrically
        return im2col_conv(ks, e, w_t, [1] * nd, pads[::2][::-1], dilation)
    e = torch.nn.functional.pad(e, pads)
    return im2col_conv(ks, e, w_t, [1] * nd, [0] * nd, dilation)


def _strided_conv_input_grad(ks: KernelSet, e, qw, x_shape, stride, padding, dilation):
    """``dX`` of a strided convolution split by output phase (sub-pixel decomposition).

    Along a dim with stride ``s``, padding ``p`` and dilation ``d``, ``dX[i]`` receives
    ``e[o] * w[k]`` exactly when ``i = o*s + k*d - p``.  For the inputs of one phase
    ``i = j*s + r`` only the taps with ``(r + p - k*d) % s == 0`` contribute, each reading
    ``e[j + t_k]`` with ``t_k = (r + p - k*d) / s``: a stride-1 correlation of the undilated
    gradient with a sub-kernel.  So each phase is one int8 im2col GEMM over its taps only,
    and together they do ``1/prod(s)`` of the work of convolving the zero-dilated gradient
    (whose gathers also cost Inductor per-element index arithmetic).  Same exact integers
    as :func:`_dilated_conv_input_grad`; phases are written into their strided slices of
    the (channels-last) result."""
    nd = len(stride)
    n, cin = x_shape[0], x_shape[1]
    X, O, kernel = list(x_shape[2:]), list(e.shape[2:]), list(qw.shape[2:])
    per_dim = []                                   # per dim: [(r, J, [(k, t), ...]), ...]
    lo, hi = [], []                                # padding of e so every j + t is in range
    for d in range(nd):
        s, p, dl = stride[d], padding[d], dilation[d]
        phases = []
        for r in range(s):
            J = (X[d] - r + s - 1) // s
            taps = [(k, (r + p - k * dl) // s) for k in range(kernel[d]) if (r + p - k * dl) % s == 0]
            phases.append((r, J, taps if J > 0 else []))
        ts = [(t, J) for _, J, taps in phases for _, t in taps]
        lo.append(max([0] + [-t for t, _ in ts]))
        hi.append(max([0] + [t + J - O[d] for t, J in ts]))
        per_dim.append(phases)
    el = e.movedim(1, -1)                                                  # [N, O.., Cout]
    if any(lo) or any(hi):
        el = torch.nn.functional.pad(el, [0, 0] + [v for d in reversed(range(nd)) for v in (lo[d], hi[d])])
    out = torch.zeros((n, *X, cin), dtype=torch.float32, device=e.device)
    for combo in _product(per_dim):
        sizes = [J for _, J, _ in combo]
        tap_sets = [taps for _, _, taps in combo]
        if any(not t for t in tap_sets):
            continue                                 # no tap reaches this phase: stays zero
        if _implicit_conv(ks, el, qw.transpose(0, 1), len(qw.shape[2:]) * [1]):
            acc = _phase_conv(ks, el, qw, tap_sets, sizes, lo, stride, dilation)
        else:
            cols, weights = [], []
            for taps in _product(tap_sets):
                index = [slice(None)] + [slice(t + lo[d], t + lo[d] + sizes[d]) for d, (_, t) in enumerate(taps)]
                cols.append(el[tuple(index)])                                  # [N, J.., Cout]
                weights.append(qw[(slice(None), slice(None), *[k for k, _ in taps])])   # [Cout, Cin]
            a = _stack(cols, -2).reshape(n * _prod(sizes), len(cols) * qw.shape[0])
            b = _stack(weights, 0).reshape(len(weights) * qw.shape[0], cin)
            acc = integer_matmul(a, b, ks.int8_mm).reshape(n, *sizes, cin)
        out[(slice(None), *[slice(r, None, stride[d]) for d, (r, _, _) in enumerate(combo)])] = acc
    return out.movedim(-1, 1)


def _phase_conv(ks: KernelSet, el, qw, tap_sets, sizes, lo, stride, dilation):
    """One phase of :func:`_strided_conv_input_grad` as the family's stride-1 ``int8_conv``
    (no columns): along each dim the phase's taps read ``e[j + t_k]`` with ``t_k`` an
    arithmetic progression (step ``dilation / gcd(stride, dilation)`` as ``k`` steps by
    ``stride / gcd``), so the phase is a correlation of a slice of ``e`` with those taps of
    the weight, in order of ``t``, at that dilation.  ``[N, J.., Cin]`` float32."""
    index, ks_per_dim, dil = [slice(None)], [], []
    for d, taps in enumerate(tap_sets):
        taps = sorted(taps, key=lambda kt: kt[1])                         # t ascending
        step = dilation[d] // math.gcd(stride[d], dilation[d])
        start = taps[0][1] + lo[d]
        index.append(slice(start, start + sizes[d] + step * (len(taps) - 1)))
        ks_per_dim.append([k for k, _ in taps])
        dil.append(step)
    w = qw
    for d, kd in enumerate(ks_per_dim):                                   # [Cout, Cin, taps..]
        w = w.index_select(2 + d, torch.tensor(kd, device=qw.device)) if kd != list(range(qw.shape[2 + d])) else w
    acc = im2col_conv(ks, el[tuple(index)].movedim(-1, 1), w.transpose(0, 1), [1] * len(sizes), [0] * len(sizes), dil)
    return acc.movedim(1, -1)


def _implicit_conv(ks: KernelSet, qx, qw, stride) -> bool:
    """Whether :func:`im2col_conv` runs the family's ``int8_conv`` for these operands."""
    return _implicit(ks.int8_conv, qx, qw, stride) and _prod(qw.shape[1:]) <= MAX_INT32_TERMS


def _implicit(op: Optional[Callable], a, b, stride) -> bool:
    """Whether the family's implicit-GEMM conv ``op`` (``int8_conv`` / ``int8_conv_weight``)
    takes this stride-1 product of the int8 CPU tensors ``a`` and ``b``."""
    return op is not None and a.device.type == "cpu" and all(st == 1 for st in stride) \
        and a.dtype == b.dtype == torch.int8


def _stack(tensors, dim: int) -> torch.Tensor:
    """``torch.stack``, but one tensor is unsqueezed: PyTorch's stack copies it into a
    contiguous result while Inductor's decomposition (``unsqueeze`` + ``cat``) returns a view
    at the input's strides, so a ``reshape`` traced as a view of the one became a view the
    other cannot take (``decompose_for_inductor`` retraces the graph with it): a strided
    conv whose phase has one tap, once its gradient arrived NCHW."""
    return tensors[0].unsqueeze(dim) if len(tensors) == 1 else torch.stack(tensors, dim=dim)


def _product(lists):
    """Cartesian product of lists, as lists (the order of :func:`itertools.product`)."""
    result = [[]]
    for items in lists:
        result = [prev + [item] for prev in result for item in items]
    return result


def integer_conv_supported(nd: int, conv_groups: int, transposed: bool = False, stride=None,
                           output_padding=None, device: Optional[str] = None) -> Optional[str]:
    """None if the integer conv path handles this conv, else the reason it does not.

    Grouped convolutions run integer on CPU (``device`` ``"cpu"`` or not given: the C kernels
    of :mod:`sqcompile.kernels.cpu_grouped_conv`).  Decision: on other devices they stay
    simulated, since their integer ops would be float64 convolutions there (exact, but no
    faster than the float32 conv of the simulated path); grouped transposed convolutions stay
    simulated everywhere."""
    kind = "transposed convolution" if transposed else "convolution"
    if conv_groups != 1 and transposed:
        return f"grouped {kind} (groups={conv_groups}) has no integer formulation yet"
    if conv_groups != 1 and device not in (None, "cpu"):
        return f"grouped {kind} (groups={conv_groups}) runs integer only on CPU (this one is on {device})"
    if transposed and stride is not None and output_padding is not None and any(
            op >= st for op, st in zip(_ntuple(output_padding, nd), _ntuple(stride, nd))):
        return "transposed convolution with output_padding >= stride has no integer formulation yet"
    return None


def _ntuple(v, n):
    if isinstance(v, int):
        return [v] * n
    v = list(v)
    return v * n if len(v) == 1 else v


@_autocast_like
def quantized_conv(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, nd: int,
                   a_bits: int, w_bits: int, grad_bits: int, sq_groups: int, integer: bool,
                   kernels: str = "torch", stats: Optional[str] = None, outer_scale: bool = False,
                   a_groups: int = 1):
    """``F.conv{nd}d`` with quantized input/weight and ShiftQuant-ed gradients.

    ``padding`` may be an int, a tuple or ``"valid"``/``"same"`` as in PyTorch.  ``outer_scale``
    (``grad_outer_scale``): the ``dW`` GEMM's gradient gets one scale per output channel (its
    free axis), ``dX``'s one per sample (not per position: each output position sums several
    input positions, so a per-position scale would not factor out).  ``a_groups`` > 1
    (``act_groups``): the input's per-sample scale with ShiftQuant over its channels, one range
    per (sample, channel) (:func:`_quantize_act`)."""
    unbatched = x.dim() == nd + 1
    if unbatched:
        x = x.unsqueeze(0)
    stride, dilation = _ntuple(stride, nd), _ntuple(dilation, nd)
    if isinstance(padding, str):
        padding = _string_padding(padding, weight.shape[2:], dilation)
    padding = _ntuple(padding, nd)
    if isinstance(padding[0], tuple):  # "same" with uneven padding: pad explicitly
        x = torch.nn.functional.pad(x, [p for lr in reversed(padding) for p in lr])
        padding = [0] * nd
    y = _QuantConv.apply(x, weight, a_bits, w_bits, grad_bits, sq_groups, integer, kernels, stats, stride, padding,
                         dilation, groups, outer_scale, False, None, a_groups)
    if bias is not None:
        y = y + bias.reshape(1, -1, *[1] * nd)
    return y.squeeze(0) if unbatched else y


@_autocast_like
def quantized_conv_transpose(x, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1, *,
                             nd: int, a_bits: int, w_bits: int, grad_bits: int, sq_groups: int, integer: bool,
                             kernels: str = "torch", stats: Optional[str] = None, outer_scale: bool = False,
                             a_groups: int = 1):
    """``F.conv_transpose{nd}d`` (same arguments, same order) with the quantizers of
    :func:`quantized_conv`: input per sample, weight per output channel, the output gradient
    ShiftQuant-ed with ranges per (sample, channel) for ``dX`` and per (sample, position) for
    ``dW``.  ``integer``: int8 im2col GEMMs (``groups == 1``, ``output_padding < stride``;
    :func:`integer_conv_supported` says why not otherwise)."""
    unbatched = x.dim() == nd + 1
    if unbatched:
        x = x.unsqueeze(0)
    stride, padding, dilation = _ntuple(stride, nd), _ntuple(padding, nd), _ntuple(dilation, nd)
    output_padding = _ntuple(output_padding, nd)
    why_not = integer_conv_supported(nd, groups, True, stride, output_padding) if integer else None
    if why_not:
        raise ValueError(f"quantized_conv_transpose(integer=True): {why_not}")
    y = _QuantConv.apply(x, weight, a_bits, w_bits, grad_bits, sq_groups, integer, kernels, stats, stride, padding,
                         dilation, groups, outer_scale, True, output_padding, a_groups)
    if bias is not None:
        y = y + bias.reshape(1, -1, *[1] * nd)
    return y.squeeze(0) if unbatched else y


def _string_padding(mode: str, kernel, dilation):
    if mode == "valid":
        return [0] * len(kernel)
    if mode != "same":
        raise ValueError(f"padding must be 'valid', 'same' or numbers, got {mode!r}")
    pads = []
    for k, d in zip(kernel, dilation):
        total = d * (k - 1)
        left = total // 2
        pads.append(left if total % 2 == 0 else (left, total - left))
    if any(isinstance(p, tuple) for p in pads):
        return [p if isinstance(p, tuple) else (p, p) for p in pads]
    return pads


# --------------------------------------------------------------------------------------------
# Attention and einsum, expressed through quantized_matmul
# --------------------------------------------------------------------------------------------

_FUSED_ATTENTION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_FUSED_HEAD_DIM = 256


def fused_attention_unsupported(query, key, value, attn_mask=None, dropout_p: float = 0.0, *, grad_bits: int,
                                groups: int) -> Optional[str]:
    """Why the fused attention kernels (:mod:`sqcompile.kernels.triton_attention`) cannot run
    this ``scaled_dot_product_attention`` (``None``: they can).  Takes tensors or anything
    with ``shape`` and ``dtype`` (the rewrite passes check example values)."""
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
            return f"an attn_mask of dtype {attn_mask.dtype} (bool masks and masks of the query's dtype fuse)"
        if getattr(attn_mask, "requires_grad", False):
            return "an attn_mask that requires grad (the fused kernels give it none)"
    if dropout_p:
        return "dropout"
    if query.dtype not in _FUSED_ATTENTION_DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        return f"dtypes {query.dtype}/{key.dtype}/{value.dtype} (all float32, bfloat16 or float16 fuse)"
    if len(query.shape) < 2 or len(key.shape) < 2 or len(value.shape) < 2:
        return "operands with fewer than two dims"
    if value.shape[-1] != query.shape[-1]:
        return f"a value head dim {value.shape[-1]} different from the query's {query.shape[-1]}"
    if query.shape[-1] > MAX_FUSED_HEAD_DIM:
        return f"head dim {query.shape[-1]} > {MAX_FUSED_HEAD_DIM}"
    if not N.fits_int8(grad_bits, groups):
        return f"grad_bits={grad_bits} with groups={groups} (ShiftQuant's expanded gradient would need int16)"
    return None


class _FusedAttention(torch.autograd.Function):
    """Quantized attention over ``[B, H, L, D]`` operands as the fused Triton ops
    ``sqcompile::triton_attention`` / ``triton_attention_backward``."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale, causal, act_bits, p_bits, grad_bits, groups, outer):
        out, *saved = torch.ops.sqcompile.triton_attention(q, k, v, mask, scale, causal, act_bits, p_bits)
        ctx.save_for_backward(*saved, mask)
        ctx.cfg = (scale, causal, p_bits, grad_bits, groups, outer)       # the backward quantizes P only
        return out

    @staticmethod
    def backward(ctx, grad_out):
        dq, dk, dv = torch.ops.sqcompile.triton_attention_backward(grad_out, *ctx.saved_tensors, *ctx.cfg)
        return dq, dk, dv, None, None, None, None, None, None, None, None


def _fused_sdpa(query, key, value, attn_mask, scale, is_causal, act_bits, p_bits, grad_bits, groups, outer):
    # [B, H, L, D] with every outer batch dim in B: the kernels read the operands at their
    # strides (the head split of a projection is not copied) and lay the output out as the
    # query is (a transposed head split's output stored [B, L, H, D])
    batch = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])
    heads = batch[-1] if batch else 1
    q4, k4, v4 = (t.expand(*batch, *t.shape[-2:]).reshape(-1, heads, *t.shape[-2:]) for t in (query, key, value))
    mask = None
    if attn_mask is not None:   # [O, H, L, S] over the flattened batch, broadcast dims kept as strides 0
        mask = attn_mask.expand(*batch, query.shape[-2], key.shape[-2])
        mask = mask.reshape(-1, heads, *mask.shape[-2:])
    out = _FusedAttention.apply(q4, k4, v4, mask, float(scale), bool(is_causal), act_bits, p_bits, grad_bits, groups,
                                bool(outer))
    return out.reshape(*batch, *out.shape[-2:])


@_autocast_like
def quantized_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False, *, act_bits: int, grad_bits: int, groups: int, integer: bool,
                   kernels: str = "torch", stats: Optional[str] = None, fused: bool = False,
                   p_bits: Optional[int] = None, outer_scale: bool = False):
    """``F.scaled_dot_product_attention`` in its math form, with both GEMMs (``Q K^T`` and
    ``P V``) quantized at ``act_bits``, the probabilities ``P`` at ``p_bits`` (default
    ``act_bits``; ``act_bits + 1`` is their unsigned ``act_bits``-bit quantizer, see
    :mod:`sqcompile.passes.signs`); softmax, masking and dropout stay in float.  With
    ``stats``, each GEMM records under its own part (:data:`sqcompile.decisions.SDPA_PARTS`).

    ``fused``: run it as the fused Triton attention (:mod:`sqcompile.kernels.triton_attention`)
    where :func:`fused_attention_unsupported` allows (integer execution with the ``"triton"``
    kernel family, no stats), else as the ops below."""
    L, S = query.shape[-2], key.shape[-2]
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    p_bits = act_bits if p_bits is None else p_bits
    if enable_gqa and key.dim() >= 3 and key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(rep, dim=-3)
        value = value.repeat_interleave(rep, dim=-3)
    if fused and integer and kernels == "triton" and stats is None and \
            fused_attention_unsupported(query, key, value, attn_mask, dropout_p, grad_bits=grad_bits,
                                        groups=groups) is None:
        return _fused_sdpa(query, key, value, attn_mask, scale, is_causal, act_bits, p_bits, grad_bits, groups,
                           outer_scale)
    q = dict(grad_bits=grad_bits, groups=groups, integer=integer, kernels=kernels, outer_scale=outer_scale)
    qk_stats, pv_stats = (None, None) if stats is None else \
        (decisions.part_key(stats, part) for part in decisions.SDPA_PARTS)
    scores = quantized_matmul(query, key.transpose(-2, -1), a_bits=act_bits, b_bits=act_bits, stats=qk_stats,
                              **q) * scale
    if is_causal:
        causal = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    # PyTorch's attention gives a query row whose every key is masked probabilities of 0
    # (``_safe_softmax``), where a plain softmax gives NaN that reaches every gradient of V
    probs = torch.softmax(scores, dim=-1) if attn_mask is None else torch.ops.aten._safe_softmax(scores, -1)
    if dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, dropout_p, training=True)
    return quantized_matmul(probs, value, a_bits=p_bits, b_bits=act_bits, stats=pv_stats, **q)


# Glue of nn.MultiheadAttention split into quantized GEMMs (sqcompile.passes.composite): the
# projections are linear nodes and the attention an sdpa node; these functions connect them.

def mha_heads(x, num_heads: int):
    """``[L, N, E]`` -> ``[N, H, L, E / H]`` as a view (no copy: the quantizers read any layout)."""
    return x.unflatten(-1, (num_heads, -1)).permute(1, 2, 0, 3)


def mha_merge_heads(x):
    """``[N, H, L, D]`` -> ``[L, N, H * D]``, the layout ``F.multi_head_attention_forward``'s
    output projection reads."""
    return x.permute(2, 0, 1, 3).flatten(-2)


def mha_attention_mask(attn_mask, key_padding_mask, query, key, num_heads: int):
    """``attn_mask`` and ``key_padding_mask`` merged as ``F.multi_head_attention_forward``
    merges them, for ``scaled_dot_product_attention`` over ``[N, H, L, S]``: both canonicalized
    to additive masks of ``query``'s dtype (``True`` / ``-inf`` = masked out) and summed; a
    2-d ``attn_mask`` ``[L, S]`` or ``[N * H, L, S]`` is shaped ``[1 | N, H, L, S]`` and the
    padding mask ``[N, 1, 1, S]`` (broadcast, not expanded).  ``query`` ``[L, N, E]`` and
    ``key`` ``[S, N, E_k]`` are the batched inputs."""
    bsz, src_len = query.shape[1], key.shape[0]
    if key_padding_mask is not None and key_padding_mask.dim() == 1:      # an unbatched call
        key_padding_mask = key_padding_mask.unsqueeze(0)
    F = torch.nn.functional
    kpm = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                            other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                            target_type=query.dtype)
    mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                             target_type=query.dtype, check_other=False)
    if kpm is not None:
        kpm = kpm.view(bsz, 1, 1, src_len)
    if mask is None:
        return kpm
    if mask.dim() == 2:
        mask = mask.view(1, 1, *mask.shape)
    elif mask.size(0) == 1:
        mask = mask.unsqueeze(0)
    else:
        mask = mask.view(bsz, num_heads, -1, src_len)
    return mask if kpm is None else mask + kpm


def mha_result(out):
    """What ``F.multi_head_attention_forward`` returns without attention weights."""
    return out, None


def parse_einsum(equation: str, n_operands: int):
    """``(inputs, output)`` index strings of an einsum, or a string saying why the quantized
    path does not handle it (it needs exactly two operands, no ellipsis, no repeated index
    inside one operand)."""
    eq = equation.replace(" ", "")
    if n_operands != 2:
        return f"einsum with {n_operands} operands (only two-operand contractions are GEMMs)"
    if "..." in eq:
        return "einsum with an ellipsis"
    lhs, _, out = eq.partition("->")
    inputs = lhs.split(",")
    if len(inputs) != 2:
        return "einsum equation does not name two operands"
    if not _:
        counts = {c: lhs.count(c) for c in lhs if c.isalpha()}
        out = "".join(sorted(c for c, k in counts.items() if k == 1))
    if any(len(set(s)) != len(s) for s in (*inputs, out)):
        return "einsum with a repeated index inside one operand (a diagonal)"
    return inputs, out


@_autocast_like
def quantized_einsum(equation: str, a, b, *, a_bits: int, b_bits: int, grad_bits: int, groups: int,
                     integer: bool, kernels: str = "torch", stats: Optional[str] = None, outer_scale: bool = False,
                     a_groups: int = 1):
    """Two-operand ``torch.einsum`` as one batched quantized GEMM: indices are sorted into
    batch (both operands and output), contracted (both, not output) and free ones."""
    parsed = parse_einsum(equation, 2)
    if isinstance(parsed, str):
        raise ValueError(parsed)
    (ia, ib), out = parsed
    for idx in [c for c in ia if c not in ib and c not in out]:   # summed in one operand only
        a, ia = a.sum(ia.index(idx)), ia.replace(idx, "")
    for idx in [c for c in ib if c not in ia and c not in out]:
        b, ib = b.sum(ib.index(idx)), ib.replace(idx, "")
    batch = [c for c in ia if c in ib and c in out]
    contr = [c for c in ia if c in ib and c not in out]
    a_free = [c for c in ia if c not in ib]
    b_free = [c for c in ib if c not in ia]
    size = {**{c: a.shape[ia.index(c)] for c in ia}, **{c: b.shape[ib.index(c)] for c in ib}}
    A = a.permute([ia.index(c) for c in batch + a_free + contr]).reshape(
        _prod(size[c] for c in batch), _prod(size[c] for c in a_free), _prod(size[c] for c in contr))
    B = b.permute([ib.index(c) for c in batch + contr + b_free]).reshape(
        _prod(size[c] for c in batch), _prod(size[c] for c in contr), _prod(size[c] for c in b_free))
    y = quantized_matmul(A, B, a_bits=a_bits, b_bits=b_bits, grad_bits=grad_bits, groups=groups,
                         integer=integer, kernels=kernels, stats=stats, outer_scale=outer_scale, a_groups=a_groups)
    order = batch + a_free + b_free
    y = y.reshape([size[c] for c in order])
    return y.permute([order.index(c) for c in out])


# --------------------------------------------------------------------------------------------
# Recurrent layers (torch.lstm / gru / rnn_tanh / rnn_relu), unrolled over time with quantized GEMMs
# --------------------------------------------------------------------------------------------

RNN_MODES = ("lstm", "gru", "rnn_tanh", "rnn_relu")


def rnn_unsupported(mode: str, params, has_biases: bool, num_layers: int, bidirectional: bool) -> Optional[str]:
    """None if :func:`quantized_rnn` handles this layer, else why it stays float."""
    if mode not in RNN_MODES:
        return f"{mode} is not quantized"
    if not isinstance(params, (list, tuple)) or not isinstance(has_biases, bool):   # the (data, batch_sizes, ...) form
        return "packed sequences (PackedSequence input) are not unrolled"
    per = (4 if has_biases else 2)
    if len(params) != per * num_layers * (2 if bidirectional else 1):
        return "LSTM with proj_size has no quantized formulation yet"
    return None


def rnn_cell_step(mode: str, gi, gh, hx):
    """One step of a recurrent cell from its two projections ``gi = x W_ih^T + b_ih`` and
    ``gh = h W_hh^T + b_hh``, in the order of operations of PyTorch's cells (``aten/src/ATen/
    native/RNN.cpp``: ``LSTMCell``, ``GRUCell``, ``SimpleCell``).  ``hx`` is ``(h, c)`` for
    ``"lstm"`` (returns ``(h', c')``), else ``h`` (returns ``h'``).  Gates and nonlinearities
    are float; also the glue of ``nn.LSTMCell`` / ``GRUCell`` / ``RNNCell`` split into two
    quantized linears (:mod:`sqcompile.passes.composite`)."""
    if mode == "lstm":
        i, f, g, o = (gh + gi).chunk(4, dim=-1)
        c = torch.sigmoid(f) * hx[1] + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    if mode == "gru":                                   # b_hn inside r * (h W_hn^T + b_hn)
        ir, iz, in_ = gi.chunk(3, dim=-1)
        hr, hz, hn = gh.chunk(3, dim=-1)
        r, z = torch.sigmoid(hr + ir), torch.sigmoid(hz + iz)
        n = torch.tanh(in_ + hn * r)
        return (hx - n) * z + n
    if mode == "rnn_tanh":
        return torch.tanh(gh + gi)
    if mode == "rnn_relu":
        return torch.relu(gh + gi)
    raise ValueError(f"unknown recurrent cell mode {mode!r}")


def quantized_rnn(mode: str, input, hx, params, has_biases: bool, num_layers: int, dropout: float, train: bool,
                  bidirectional: bool, batch_first: bool, *, a_bits: int, w_bits: int, grad_bits: int, groups: int,
                  integer: bool, kernels: str = "torch", stats: Optional[str] = None, outer_scale: bool = False):
    """``torch.lstm`` / ``torch.gru`` / ``torch.rnn_tanh`` / ``torch.rnn_relu`` with every GEMM
    quantized: the input projection of all time steps is one quantized linear per layer and
    direction, the recurrent projection one per step.  Gates, cell state and nonlinearities
    stay in float.  Returns what the torch function returns: ``(output, h_n, c_n)`` for LSTM,
    ``(output, h_n)`` for the others."""
    q = dict(a_bits=a_bits, w_bits=w_bits, grad_bits=grad_bits, groups=groups, integer=integer, kernels=kernels,
             stats=stats, outer_scale=outer_scale)
    lstm = mode == "lstm"
    h0, c0 = (hx[0], hx[1]) if lstm else (hx, None)
    unbatched = input.dim() == 2                                # [T, F] whatever batch_first says
    x = input
    if unbatched:
        x, batch_first = input.unsqueeze(1), False
        h0 = h0.unsqueeze(1)
        c0 = c0.unsqueeze(1) if c0 is not None else None
    if batch_first:
        x = x.transpose(0, 1)                                   # [T, B, F]
    dirs = 2 if bidirectional else 1
    per = 4 if has_biases else 2
    h_n, c_n = [], []
    for layer in range(num_layers):
        outs = []
        for d in range(dirs):
            idx = layer * dirs + d
            w_ih, w_hh, *b = params[idx * per:(idx + 1) * per]
            b_ih, b_hh = (b[0], b[1]) if has_biases else (None, None)
            seq = x.flip(0) if d == 1 else x
            T, B = seq.shape[0], seq.shape[1]
            gi = quantized_linear(seq.reshape(T * B, -1), w_ih, b_ih, **q).reshape(T, B, -1)
            h, c = h0[idx], (c0[idx] if lstm else None)
            ys = []
            for t in range(T):
                gh = quantized_linear(h, w_hh, b_hh, **q)
                if lstm:
                    h, c = rnn_cell_step(mode, gi[t], gh, (h, c))
                else:
                    h = rnn_cell_step(mode, gi[t], gh, h)
                ys.append(h)
            y = _stack(ys, 0)
            outs.append(y.flip(0) if d == 1 else y)
            h_n.append(h)
            if lstm:
                c_n.append(c)
        x = torch.cat(outs, dim=-1) if dirs == 2 else outs[0]
        if dropout > 0 and train and layer < num_layers - 1:
            x = torch.nn.functional.dropout(x, dropout, training=True)
    out = x.transpose(0, 1) if batch_first else x
    h_n, c_n = _stack(h_n, 0), (_stack(c_n, 0) if lstm else None)   # [layers * dirs, B, H]
    if unbatched:
        out = out.squeeze(1)
        h_n = h_n.squeeze(1)
        c_n = c_n.squeeze(1) if lstm else None
    return (out, h_n, c_n) if lstm else (out, h_n)
