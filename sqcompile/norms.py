"""Fully-quantized L1 normalization: BatchNorm, LayerNorm, GroupNorm, InstanceNorm and RMSNorm.

The L1 norm replaces the standard deviation by the mean absolute deviation (the paper's
"fully-quantized L1 normalization"):

    sigma = c * mean|x - mean|                                        (centered kinds)
    y = gamma * (x - mean) / sqrt(sigma**2 + eps) + beta
    sigma = c * mean|x|,  y = gamma * x / sqrt(sigma**2 + eps)        (RMSNorm analogue)

with ``c = l1_scale`` (default ``sqrt(pi/2)``: a Gaussian input gets the same scale as the L2
norm).  ``sigma`` is the L1 estimate of the standard deviation; it takes the place of the
L2 norm's standard deviation and nothing else changes: ``eps`` is the module's own and sits
under the root, as in the L2 norm.

Decision (``eps`` under the root): the first form, ``(x - mean) / (sigma + sqrt(eps))``, had
the same floor for a constant slice but shrank every slice whose deviation is small: by 12%
at ``sigma = 0.025`` (a transformer's residual stream at its usual 0.02 init), where the L2
norm's ``sqrt(sigma**2 + eps)`` moves by 0.8%.  On the char transformer of
``benchmarks/accuracy.py`` trained with float L1 norms, the validation loss was 0.84% above
the L2 norm's with that form and 0.40% with this one (compiled, six seeds; eager, three
seeds: 1.7% and 0.55%).  ``sigma + eps`` with the module's ``eps`` trained as well (0.6%,
eager) but floors a constant slice's denominator at ``eps`` (its gradient scaled by
``1 / eps``, 1e5, where the L2 norm has 316), and a slice whose deviation is below half a
quantization step is constant after the 8-bit input quantizer.

One formula for all kinds
-------------------------
Every kind is the same computation over *slices*: ``x`` is viewed so that one slice is the set
of elements indexed by the reduction ``dims`` at a fixed index of the other (``keep``) dims,
and ``weight`` / ``bias`` are viewed to broadcast against it:

=========== ============================== ============== =================================
kind        layout given to the math       reduction dims one slice (= one input scale)
=========== ============================== ============== =================================
batch norm  ``x [N, C, *S]``               ``0, 2, ...``  a channel
layer norm  ``x [*, *normalized_shape]``   trailing       a row / token
group norm  ``x [N, G, C/G, *S]``          ``2, 3, ...``  an (N, group) pair
instance    ``x [N, C, *S]``               ``2, 3, ...``  an (N, channel) pair
rms norm    ``x [*, *normalized_shape]``   trailing       a row / token (not centered)
=========== ============================== ============== =================================

:class:`_L1Norm` holds the forward formula and the hand-derived backward.  With
``xhat = (x - mean) / s``, ``s = sqrt(sigma**2 + eps)`` and ``g = dL/dxhat = dy * gamma``, the slice's
statistics give (``n`` elements per slice, ``sign(0) = 0``)::

    d mean|x - mean| / dx_i = (sign(z_i) - mean(sign z)) / n,     z = x - mean
    ds / d mean|x - mean| = c * sigma / s
    dL/dx = (g - mean(g) - c * (sigma / s) * mean(g * xhat) * (sign(xhat) - mean(sign xhat))) / s

(the RMS form drops both ``mean`` corrections; with fixed statistics, batch norm in eval mode,
``dL/dx = g / s``).  ``sign(xhat)`` stands where the L2 norm has ``xhat`` itself.

Quantization (``norm_bits`` / ``grad_bits``)
---------------------------------------------
* Forward: the norm's input is quantized with ``torch.ops.sqcompile.quantize`` (nearest
  rounding, ``norm_bits``) with one scale per slice; the statistics and the output are computed
  from the dequantized values, and the int8 tensor and its channel maxima are what is saved
  for backward (not the float input).
* Backward: straight-through for the input quantizer (the gradient is the one of the float
  formula evaluated at the quantized input), and the incoming ``grad_output`` is quantized with
  stochastic rounding at ``grad_bits`` (default ``norm_bits``), again one scale per slice, before
  it is used for ``dx``, ``dgamma`` and ``dbeta``.
* ``norm_bits=None``: the float path (no input quantization), used by ``gradcheck``; a
  ``grad_bits`` given explicitly still quantizes the gradient.
* ``stats``: a key from :func:`sqcompile.decisions.stats_key` (``collect_stats=True``): both
  quantizers then also record their SQNR (roles ``norm_in`` and ``norm_grad``), which the
  precision report shows on the norm's row.

Statistics are computed in float32 for float16/bfloat16 inputs (float64 stays float64) and
the output has the input's dtype.  A zero-deviation slice (constant, or all zero) gives
``sigma = 0`` and the output ``beta``; ``eps`` keeps it finite (the denominator is at least
``sqrt(eps)``, as in the L2 norm).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch

from . import numerics as N
from . import ops as _ops  # noqa: F401  (registers torch.ops.sqcompile.quantize / dequantize)

L1_SCALE = math.sqrt(math.pi / 2)

ShapeLike = Union[int, Sequence[int], torch.Size]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types and float32, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def _quantize_dequantize(x: torch.Tensor, bits: int, keep: list, stochastic: bool, dtype: torch.dtype,
                         stats: Optional[str] = None, role: str = ""):
    """(int8, scale, dequantized in ``dtype``) with one scale per index of ``keep``; with a
    ``stats`` key (``collect_stats=True``) the quantizer also records its SQNR as ``role``."""
    if stats is None:
        q, scale = torch.ops.sqcompile.quantize(x, bits, keep, stochastic)
    else:
        q, scale = torch.ops.sqcompile.quantize_observed(x, bits, keep, stochastic, stats, role)
    return q, scale, torch.ops.sqcompile.dequantize(q, scale, dtype)


def _inv_denominator(sigma: torch.Tensor, eps: float) -> torch.Tensor:
    """``1 / sqrt(sigma**2 + eps)``: the L1 norm's scale factor (``eps`` under the root)."""
    return 1.0 / torch.sqrt(sigma * sigma + eps)


class _L1Norm(torch.autograd.Function):
    """The L1 norm of ``x`` over ``dims`` with a broadcast affine, and its hand backward.

    ``mean`` / ``sigma``: fixed statistics (broadcastable, eval-mode batch norm) or ``None`` to
    use the slice's own.  Returns ``(y, mean, sigma)``: the statistics actually computed
    (``keepdim`` shape, compute dtype, non-differentiable) or ``None`` when they were given or,
    for ``mean``, when ``center`` is False.

    What is saved for backward are the slices' reductions as the forward computed them -- the
    input's channel maxima (not its quantization scale), the sum and the absolute-deviation
    sum (not the mean and ``1 / sqrt(sigma**2 + eps)``) -- and the backward derives the rest with the
    forward's own expressions, so the values are the same bits.  Saving derived per-slice
    values made them outputs of the compiled forward, and Inductor's CPU code generator then
    computed each of them in a loop of its own between the row passes: four passes over the
    whole input (two of them reading it in float from memory) instead of one loop over rows
    that reads each row once.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mean, sigma, dims: Tuple[int, ...], center: bool, l1_scale: float,
                eps: float, norm_bits: Optional[int], grad_bits: Optional[int], stats: Optional[str]):
        cdtype = _compute_dtype(x.dtype)
        keep = [d for d in range(x.dim()) if d not in dims]
        if norm_bits is None:
            xc = x.to(cdtype)
            saved_x, saved_amax = x, None
        else:
            saved_x, _, xc = _quantize_dequantize(x, norm_bits, keep, False, cdtype, stats, "norm_in")
            saved_amax = N.amax(x, keep)     # the quantizer's own maxima (a compiler computes them once)

        batch_stats = sigma is None
        if batch_stats:
            n = math.prod([x.shape[d] for d in dims])
            total = xc.sum(dims, keepdim=True) if center else None
            mean = total / n if center else None
            z = xc - mean if center else xc
            deviation = z.abs().sum(dims, keepdim=True)
            sigma = l1_scale * (deviation / n)
            saved_stats = (total, deviation)
        else:
            mean, sigma = mean.to(cdtype), sigma.to(cdtype)
            z = xc - mean
            saved_stats = (mean, sigma)
        xhat = z * _inv_denominator(sigma, eps)

        y = xhat if weight is None else xhat * weight.to(cdtype)
        if bias is not None:
            y = y + bias.to(cdtype)

        ctx.save_for_backward(saved_x, saved_amax, *saved_stats, weight)
        bias_meta = None if bias is None else (bias.shape, bias.dtype)
        ctx.cfg = (dims, keep, center, l1_scale, eps, batch_stats, norm_bits, grad_bits, x.dtype, cdtype, bias_meta,
                   stats)
        if not batch_stats:
            return y.to(x.dtype), None, None
        ctx.mark_non_differentiable(*[t for t in (mean, sigma) if t is not None])
        return y.to(x.dtype), mean, sigma

    @staticmethod
    def backward(ctx, dy, _dmean, _dsigma):
        saved_x, saved_amax, first, second, weight = ctx.saved_tensors
        dims, keep, center, l1_scale, eps, batch_stats, norm_bits, grad_bits, x_dtype, cdtype, bias_meta, stats = \
            ctx.cfg
        if saved_amax is None:
            xc = saved_x.to(cdtype)
        else:
            xc = torch.ops.sqcompile.dequantize(saved_x, N.scale_of_amax(saved_amax, norm_bits), cdtype)
        if batch_stats:         # the forward's expressions, on its sums
            n = math.prod([saved_x.shape[d] for d in dims])
            mean = first / n if center else None
            sigma = l1_scale * (second / n)
        else:
            mean, sigma = first, second
        inv = _inv_denominator(sigma, eps)
        xhat = (xc - mean if mean is not None else xc) * inv

        if grad_bits is None:
            dy = dy.to(cdtype)
        else:
            dy = _quantize_dequantize(dy, grad_bits, keep, True, cdtype, stats, "norm_grad")[2]

        dx = dweight = dbias = None
        if ctx.needs_input_grad[0]:
            g = dy if weight is None else dy * weight.to(cdtype)
            if batch_stats:
                # d sqrt(sigma^2 + eps)/dx = (sigma / s) * c * (sign z - mean(sign z)) / n over the
                # slice, sign z = sign xhat
                proj = (l1_scale * sigma * inv) * (g * xhat).mean(dims, keepdim=True)
                sgn = torch.sign(xhat)
                if center:
                    g = g - g.mean(dims, keepdim=True)
                    sgn = sgn - sgn.mean(dims, keepdim=True)
                g = g - proj * sgn
            dx = (g * inv).to(x_dtype)
        if weight is not None and ctx.needs_input_grad[1]:
            dweight = (dy * xhat).sum_to_size(weight.shape).to(weight.dtype)
        if bias_meta is not None and ctx.needs_input_grad[2]:
            dbias = dy.sum_to_size(bias_meta[0]).to(bias_meta[1])
        return dx, dweight, dbias, None, None, None, None, None, None, None, None, None


class _CpuL1Norm(torch.autograd.Function):
    """:class:`_L1Norm` with batch statistics on the C kernels of
    :mod:`sqcompile.kernels.cpu_norm` (``kernels="cpu"``): the same formula, quantizers and
    saved values (the int8 input, its maxima, the sums), one op forward and one backward.
    The gradient's stochastic rounding draws :func:`~sqcompile.numerics.hash_noise` noise from a
    ``sqcompile::random_seed`` of the backward graph."""

    @staticmethod
    def forward(ctx, x, weight, bias, dims: Tuple[int, ...], center: bool, l1_scale: float, eps: float,
                norm_bits: int, grad_bits: int):
        y, q, amax, total, deviation = torch.ops.sqcompile.cpu_l1_norm(x, weight, bias, list(dims), center, l1_scale,
                                                                       eps, norm_bits)
        ctx.save_for_backward(q, amax, total, deviation, weight)
        ctx.cfg = (dims, center, l1_scale, eps, norm_bits, grad_bits, None if bias is None else bias.shape)
        n = math.prod([x.shape[d] for d in dims])
        mean = total / n if center else None
        sigma = l1_scale * (deviation / n)
        ctx.mark_non_differentiable(*[t for t in (mean, sigma) if t is not None])
        return y, mean, sigma

    @staticmethod
    def backward(ctx, dy, _dmean, _dsigma):
        q, amax, total, deviation, weight = ctx.saved_tensors
        dims, center, l1_scale, eps, norm_bits, grad_bits, bias_shape = ctx.cfg
        seed = torch.ops.sqcompile.random_seed(dy.device)
        dx, sum_dy, sum_dyx = torch.ops.sqcompile.cpu_l1_norm_backward(
            dy, q, amax, total, deviation, weight, seed, list(dims), center, l1_scale, eps, norm_bits, grad_bits,
            ctx.needs_input_grad[0])
        dweight = sum_dyx.sum_to_size(weight.shape) if weight is not None and ctx.needs_input_grad[1] else None
        dbias = sum_dy.sum_to_size(bias_shape) if bias_shape is not None and ctx.needs_input_grad[2] else None
        return dx if ctx.needs_input_grad[0] else None, dweight, dbias, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------
# The same norm over rows, on the Triton kernels (kernels="triton")
# --------------------------------------------------------------------------------------------

TRITON_MAX_ROW = 8192
"""Longest row (elements per slice) the Triton L1 norm takes: one program holds whole rows."""
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_unsupported(dtype: torch.dtype, row: int, norm_bits: Optional[int], stats: Optional[str]) -> Optional[str]:
    """Why a LayerNorm / RMSNorm-kind L1 norm with rows of ``row`` elements cannot run on the
    Triton kernels (:mod:`sqcompile.kernels.triton_norm`), or ``None`` when it can."""
    if norm_bits is None:
        return "float L1 norm (quantize=False) has no Triton kernel"
    if stats is not None:
        return "collect_stats=True observes the quantizers one by one"
    if dtype not in _TRITON_DTYPES:
        return f"{dtype} input (the kernels take float32, bfloat16 and float16)"
    if row > TRITON_MAX_ROW:
        return f"rows of {row} elements (a program holds a whole row: at most {TRITON_MAX_ROW})"
    return None


class _TritonRowL1Norm(torch.autograd.Function):
    """:class:`_L1Norm` over the trailing ``row`` elements (LayerNorm / RMSNorm kinds) as one
    Triton kernel forward and one backward: the same formula and quantizers, the saved
    tensors ``q, scale, mean, inv`` of the kernels instead of the int8 input and statistics."""

    @staticmethod
    def forward(ctx, x, weight, bias, row: int, center: bool, l1_scale: float, eps: float, norm_bits: int,
                grad_bits: int):
        flat = [None if t is None else t.reshape(row).contiguous() for t in (weight, bias)]
        y, q, scale, mean, inv = torch.ops.sqcompile.triton_l1_norm(
            x.reshape(-1, row).contiguous(), flat[0], flat[1], norm_bits, center, l1_scale, eps)
        ctx.save_for_backward(q, scale, mean, inv, flat[0])
        ctx.cfg = (x.shape, center, l1_scale, grad_bits,
                   [None if t is None else (t.shape, t.dtype) for t in (weight, bias)])
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        q, scale, mean, inv, weight = ctx.saved_tensors
        shape, center, l1_scale, grad_bits, metas = ctx.cfg
        need = [meta is not None and ctx.needs_input_grad[i + 1] for i, meta in enumerate(metas)]
        dx, dweight, dbias = torch.ops.sqcompile.triton_l1_norm_backward(
            dy.reshape(q.shape), q, scale, mean, inv, weight, grad_bits, center, l1_scale, need[0], need[1])
        grads = [g.view(meta[0]).to(meta[1]) if n else None for g, n, meta in zip((dweight, dbias), need, metas)]
        return (dx.view(shape) if ctx.needs_input_grad[0] else None, *grads, None, None, None, None, None, None)


def _row_norm(x, weight, bias, dims, *, center, l1_scale, eps, norm_bits, grad_bits, stats, kernels):
    """A LayerNorm / RMSNorm-kind L1 norm on the kernel family ``kernels``."""
    _check_kernels(kernels, ("torch", "cpu", "triton"))
    if kernels != "triton":
        return _l1_norm(x, weight, bias, dims, center=center, l1_scale=l1_scale, eps=eps,
                        norm_bits=norm_bits, grad_bits=grad_bits, stats=stats, kernels=kernels)[0]
    _check_bits("norm_bits", norm_bits)
    _check_bits("grad_bits", grad_bits)
    row = math.prod([x.shape[d] for d in dims])
    why = triton_unsupported(x.dtype, row, norm_bits, stats)
    if why is not None:
        raise ValueError(f"kernels='triton': {why}")
    return _TritonRowL1Norm.apply(x, weight, bias, row, center, float(l1_scale), float(eps), norm_bits,
                                  norm_bits if grad_bits is None else grad_bits)


# --------------------------------------------------------------------------------------------
# The four kinds: each is a view of x, weight and bias onto the layout of _L1Norm
# --------------------------------------------------------------------------------------------

def _check_kernels(kernels, allowed) -> None:
    if kernels not in allowed:
        raise ValueError(f"kernels must be one of {', '.join(map(repr, allowed))}, got {kernels!r}")


def cpu_unsupported(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                    dims: Sequence[int], norm_bits: Optional[int], stats: Optional[str]) -> Optional[str]:
    """Why the L1 norm of ``x`` over ``dims`` (``weight`` / ``bias`` viewed to broadcast
    against it) cannot run on the C kernels (``kernels="cpu"``), or ``None`` when it can
    (:func:`sqcompile.kernels.cpu_norm.unsupported`)."""
    from .kernels import cpu_norm
    return cpu_norm.unsupported(x, weight, bias, dims, norm_bits, stats)


def cpu_kernel_unsupported(kind: str, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                           norm_bits: Optional[int], stats: Optional[str], *, num_groups: Optional[int] = None,
                           normalized_shape: Optional[ShapeLike] = None) -> Optional[str]:
    """:func:`cpu_unsupported` for the norm ``kind`` (``"batch_norm"``, ``"instance_norm"``,
    ``"group_norm"`` with ``num_groups``, ``"layer_norm"`` / ``"rms_norm"`` with
    ``normalized_shape``) of ``x`` with the module's ``weight`` / ``bias``, viewed as that
    kind's function views them: what the rewriting pass asks before it passes
    ``kernels="cpu"``."""
    nd = x.dim()
    if kind in ("batch_norm", "instance_norm"):
        dims = (0, *range(2, nd)) if kind == "batch_norm" else tuple(range(2, nd))
        return cpu_unsupported(x, _channel_view(weight, nd), _channel_view(bias, nd), dims, norm_bits, stats)
    if kind in ("layer_norm", "rms_norm"):
        return cpu_unsupported(x, weight, bias, _normalized_dims(x, normalized_shape, kind), norm_bits, stats)
    if kind != "group_norm":
        raise ValueError(f"cpu_kernel_unsupported: kind must be 'batch_norm', 'instance_norm', 'group_norm', "
                         f"'layer_norm' or 'rms_norm', got {kind!r}")
    n, c = x.shape[0], x.shape[1]
    grouped = [1, num_groups, c // num_groups, *[1] * (nd - 2)]
    w, b = (None if t is None else t.reshape(grouped) for t in (weight, bias))
    xg = x.reshape(n, num_groups, c // num_groups, *x.shape[2:])
    return cpu_unsupported(xg, w, b, tuple(range(2, nd + 1)), norm_bits, stats)


def _check_bits(name: str, bits) -> None:
    if bits is None:
        return
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"{name} must be None or an int in 2..8, got {bits!r}")


def _l1_norm(x, weight, bias, dims, *, center, l1_scale, eps, norm_bits, grad_bits, mean=None, sigma=None,
             stats=None, kernels="torch"):
    """``(y, mean, sigma)``; ``kernels="cpu"``: on the C kernels when the norm uses batch
    statistics and :func:`cpu_unsupported` allows, else (eval, or a shape they do not take)
    on the ops of :class:`_L1Norm`."""
    _check_kernels(kernels, ("torch", "cpu"))
    _check_bits("norm_bits", norm_bits)
    _check_bits("grad_bits", grad_bits)
    if grad_bits is None:
        grad_bits = norm_bits
    if kernels == "cpu" and sigma is None and cpu_unsupported(x, weight, bias, dims, norm_bits, stats) is None:
        return _CpuL1Norm.apply(x, weight, bias, tuple(dims), center, float(l1_scale), float(eps), norm_bits,
                                grad_bits)
    return _L1Norm.apply(x, weight, bias, mean, sigma, tuple(dims), center, float(l1_scale), float(eps),
                         norm_bits, grad_bits, stats)


def _channel_view(t: Optional[torch.Tensor], ndim: int) -> Optional[torch.Tensor]:
    """A per-channel vector ``[C]`` viewed as ``[1, C, 1, ...]`` against an ``ndim``-d input."""
    return None if t is None else t.reshape(1, -1, *[1] * (ndim - 2))


def _with_running_stats(x, w, b, dims, running_mean, running_var, kw) -> torch.Tensor:
    """``x`` normalized with fixed per-channel statistics (eval): ``(x - running_mean) /
    sqrt(running_var + eps)``, ``running_var`` holding the squared L1 scale."""
    mean = _channel_view(running_mean, x.dim())
    sigma = _channel_view(running_var, x.dim()).sqrt()
    return _l1_norm(x, w, b, dims, mean=mean, sigma=sigma, **kw)[0]


def _update_running_stats(running_mean, running_var, mean, sigma, momentum: float, per_channel) -> None:
    """``running = (1 - momentum) * running + momentum * batch`` in place for each buffer given,
    the batch's values being ``per_channel(mean)`` and ``per_channel(sigma**2)`` (``[C]``)."""
    for buf, stat in ((running_mean, mean), (running_var, sigma * sigma)):
        if buf is None:
            continue
        with torch.no_grad():
            buf.mul_(1.0 - momentum).add_(per_channel(stat).to(buf.dtype), alpha=momentum)


def l1_batch_norm(x: torch.Tensor, running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                  weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                  training: bool = False, momentum: Optional[float] = 0.1, eps: float = 1e-5, *,
                  l1_scale: float = L1_SCALE, norm_bits: Optional[int], grad_bits: Optional[int] = None,
                  stats: Optional[str] = None, kernels: str = "torch") -> torch.Tensor:
    """L1 batch norm with the semantics of ``F.batch_norm`` (``x`` is ``[N, C]``, ``[N, C, L]``,
    ``[N, C, H, W]`` or ``[N, C, D, H, W]``): statistics per channel over (N, spatial).

    * Batch statistics are used when ``training`` or when a running buffer is ``None``
      (``track_running_stats=False``).  Then, if the buffers are given, they are updated in
      place: ``running = (1 - momentum) * running + momentum * batch``.  ``momentum`` is the
      float factor; for PyTorch's cumulative moving average (``momentum=None`` on the module)
      the caller passes ``1 / num_batches_tracked``, as ``nn.BatchNorm`` already does when it
      calls ``F.batch_norm``.
    * Otherwise (eval with buffers) the running statistics are used and nothing is updated.

    Decision: ``running_var`` holds the square of the L1 scale estimate,
    ``(l1_scale * mean|x - mean|)**2`` (no Bessel-like correction: it is the value training
    normalized with), so the module's state_dict keys are unchanged and the buffer stays a
    variance-like estimate an L2 BatchNorm could still use.  Eval mode normalizes with
    ``(x - running_mean) / sqrt(running_var + eps)``, PyTorch's eval formula.  ``weight`` /
    ``bias`` may be ``None`` (``affine=False``).

    Quantization (``norm_bits``, ``grad_bits``): one scale per channel; see the module docstring.
    ``kernels="cpu"``: batch statistics on the C kernels where they take the input
    (:func:`cpu_unsupported`); ``"torch"``: the ops of :class:`_L1Norm`.
    """
    if x.dim() < 2:
        raise ValueError(f"l1_batch_norm expects an input with at least 2 dims [N, C, ...], got {tuple(x.shape)}")
    ndim = x.dim()
    dims = (0, *range(2, ndim))
    kw = dict(center=True, l1_scale=l1_scale, eps=eps, norm_bits=norm_bits, grad_bits=grad_bits, stats=stats,
              kernels=kernels)
    w, b = _channel_view(weight, ndim), _channel_view(bias, ndim)
    use_batch_stats = training or running_mean is None or running_var is None
    if not use_batch_stats:
        return _with_running_stats(x, w, b, dims, running_mean, running_var, kw)

    if math.prod(x.shape[:1] + x.shape[2:]) <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
    if momentum is None and (running_mean is not None or running_var is not None):
        raise ValueError("l1_batch_norm: momentum=None; pass the cumulative-average factor "
                         "1 / num_batches_tracked as nn.BatchNorm does")
    y, mean, sigma = _l1_norm(x, w, b, dims, **kw)
    _update_running_stats(running_mean, running_var, mean, sigma, momentum, lambda stat: stat.reshape(-1))
    return y


def _normalized_dims(x: torch.Tensor, normalized_shape: ShapeLike, fn: str) -> Tuple[int, ...]:
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    k = len(shape)
    if k == 0 or x.dim() < k or tuple(x.shape[x.dim() - k:]) != shape:
        raise ValueError(f"{fn}: normalized_shape {list(shape)} does not match the trailing dims of an "
                         f"input of shape {tuple(x.shape)}")
    return tuple(range(x.dim() - k, x.dim()))


def l1_layer_norm(x: torch.Tensor, normalized_shape: ShapeLike, weight: Optional[torch.Tensor] = None,
                  bias: Optional[torch.Tensor] = None, eps: float = 1e-5, *, l1_scale: float = L1_SCALE,
                  norm_bits: Optional[int], grad_bits: Optional[int] = None,
                  stats: Optional[str] = None, kernels: str = "torch") -> torch.Tensor:
    """L1 layer norm with the semantics of ``F.layer_norm``: statistics over the trailing
    ``normalized_shape`` dims, one input/gradient scale per row (token).  ``kernels="triton"``:
    one Triton kernel forward and one backward (see :func:`triton_unsupported` for what they
    take; anything else raises ``ValueError``); ``"cpu"``: the C kernels where they take the
    norm (:func:`cpu_unsupported`: without affine), else the ops of :class:`_L1Norm`."""
    dims = _normalized_dims(x, normalized_shape, "l1_layer_norm")
    return _row_norm(x, weight, bias, dims, center=True, l1_scale=l1_scale, eps=eps,
                     norm_bits=norm_bits, grad_bits=grad_bits, stats=stats, kernels=kernels)


def l1_group_norm(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None,
                  bias: Optional[torch.Tensor] = None, eps: float = 1e-5, *, l1_scale: float = L1_SCALE,
                  norm_bits: Optional[int], grad_bits: Optional[int] = None,
                  stats: Optional[str] = None, kernels: str = "torch") -> torch.Tensor:
    """L1 group norm with the semantics of ``F.group_norm`` (``x`` is ``[N, C, *S]``):
    statistics over (C / num_groups channels x spatial) per (N, group), affine per channel; one
    input/gradient scale per (N, group).  ``kernels``: as :func:`l1_batch_norm` (the C kernels
    take a group norm without affine)."""
    if x.dim() < 2 or x.shape[1] % num_groups != 0:
        raise ValueError(f"l1_group_norm: {num_groups} groups do not divide the channels of an input "
                         f"of shape {tuple(x.shape)}")
    n, c, spatial = x.shape[0], x.shape[1], tuple(x.shape[2:])
    xg = x.reshape(n, num_groups, c // num_groups, *spatial)
    grouped = [1, num_groups, c // num_groups, *[1] * len(spatial)]
    w = None if weight is None else weight.reshape(grouped)
    b = None if bias is None else bias.reshape(grouped)
    y = _l1_norm(xg, w, b, tuple(range(2, xg.dim())), center=True, l1_scale=l1_scale, eps=eps,
                 norm_bits=norm_bits, grad_bits=grad_bits, stats=stats, kernels=kernels)[0]
    return y.reshape(x.shape)


def l1_instance_norm(x: torch.Tensor, running_mean: Optional[torch.Tensor] = None,
                     running_var: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None,
                     bias: Optional[torch.Tensor] = None, use_input_stats: bool = True, momentum: Optional[float] = 0.1,
                     eps: float = 1e-5, *, l1_scale: float = L1_SCALE, norm_bits: Optional[int],
                     grad_bits: Optional[int] = None, stats: Optional[str] = None,
                     kernels: str = "torch") -> torch.Tensor:
    """L1 instance norm with the semantics of ``F.instance_norm`` (``x`` is ``[N, C, *S]`` with
    at least one spatial dim): statistics per (sample, channel) over the spatial dims, affine per
    channel; one input/gradient scale per (sample, channel).

    * ``use_input_stats`` (``nn.InstanceNorm`` passes ``training or not track_running_stats``):
      each instance's own statistics.  Given buffers are then updated in place with the batch's
      mean of the instances' statistics, ``running = (1 - momentum) * running + momentum *
      mean_n(stat)``, as PyTorch does; ``running_var`` holds the square of the L1 scale estimate,
      as :func:`l1_batch_norm`'s does (PyTorch's holds the unbiased variance).
    * Otherwise (eval of a module with ``track_running_stats=True``) the running statistics,
      per channel: ``(x - running_mean) / sqrt(running_var + eps)``, and nothing is updated.

    ``kernels``: as :func:`l1_batch_norm`.
    """
    if x.dim() < 3:
        raise ValueError(f"l1_instance_norm expects an input [N, C, *spatial] with at least one spatial dim, "
                         f"got {tuple(x.shape)}")
    ndim = x.dim()
    dims = tuple(range(2, ndim))
    kw = dict(center=True, l1_scale=l1_scale, eps=eps, norm_bits=norm_bits, grad_bits=grad_bits, stats=stats,
              kernels=kernels)
    w, b = _channel_view(weight, ndim), _channel_view(bias, ndim)
    if not use_input_stats:
        if running_mean is None or running_var is None:
            raise ValueError("l1_instance_norm: use_input_stats=False needs running_mean and running_var")
        return _with_running_stats(x, w, b, dims, running_mean, running_var, kw)

    if math.prod(x.shape[2:]) <= 1:
        raise ValueError(f"Expected more than 1 spatial element when training, got input size {tuple(x.shape)}")
    if momentum is None and (running_mean is not None or running_var is not None):
        raise ValueError("l1_instance_norm: momentum=None with running buffers; pass a float factor "
                         "(nn.InstanceNorm passes 0.0 for momentum=None)")
    y, mean, sigma = _l1_norm(x, w, b, dims, **kw)
    _update_running_stats(running_mean, running_var, mean, sigma, momentum,
                          lambda stat: stat.reshape(x.shape[0], x.shape[1]).mean(0))    # the batch's mean
    return y


def l1_rms_norm(x: torch.Tensor, normalized_shape: ShapeLike, weight: Optional[torch.Tensor] = None,
                eps: Optional[float] = None, *, l1_scale: float = L1_SCALE, norm_bits: Optional[int],
                grad_bits: Optional[int] = None, stats: Optional[str] = None, kernels: str = "torch") -> torch.Tensor:
    """L1 RMSNorm analogue, ``weight * x / sqrt((l1_scale * mean|x|)**2 + eps)`` over the trailing
    ``normalized_shape`` dims, with the semantics of ``F.rms_norm`` (``eps=None``:
    ``torch.finfo(x.dtype).eps``); one input/gradient scale per row (token).  ``kernels``: as
    :func:`l1_layer_norm`."""
    dims = _normalized_dims(x, normalized_shape, "l1_rms_norm")
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    return _row_norm(x, weight, None, dims, center=False, l1_scale=l1_scale, eps=eps,
                     norm_bits=norm_bits, grad_bits=grad_bits, stats=stats, kernels=kernels)
