"""Reference quantizers in plain PyTorch: the single source of truth for the numerics.

Every kernel (oneDNN, Triton) and every op in :mod:`sqcompile.ops` is tested against these
functions.  They favour clarity over speed, but are vectorized (no Python loops over channels
or groups) so they are also usable as the ``"simulate"`` implementation.

Conventions
-----------
* Symmetric ``b``-bit quantization, ``2 <= b <= 8``: ``qmax = 2**(b-1) - 1``,
  ``scale = amax / qmax``, ``q = clamp(round(x / scale), -qmax, qmax)``.
* ``keep_dims``: the dims along which a scale varies (one scale per index of those dims);
  the amax is taken over all the other dims.  ``()`` means one scale per tensor.
* Unsigned ``b``-bit quantization of a tensor without negative values (a ReLU's output;
  :mod:`sqcompile.passes.signs`): ``qmax = 2**b - 1``, which is ``qmax(b + 1)``, so on such a
  tensor it *is* the symmetric ``(b + 1)``-bit quantizer; callers pass ``bits = b + 1``.
* Rounding: ``"nearest"`` (round half to even) for weights and activations; ``"stochastic"``
  (``floor(x / scale + u)`` with ``u`` uniform in [0, 1)) for gradients.
* A zero tensor (or slice) has scale 0 and quantizes to 0 without dividing by zero.
* A non-finite amax (NaN or Inf in the input) gives a NaN scale, so the dequantized tensor is
  NaN and non-finite values propagate as in float training (a GradScaler sees them); they are
  never silently zeroed.

ShiftQuant
----------
Along the reduction axis ``k`` of the GEMM that consumes ``x`` (``channel_dims`` name the dims
that index ``k``): channel range ``r_k = max |x[..., k, ...]|``, ``R = max_k r_k``; group
``g(k) = min(G-1, floor(log2(R / r_k)))`` (zero channels go to ``G-1``); group scale
``s_g = R / 2**g / qmax``.  In expanded integer form ``e = q << (G-1-g(k))`` with the single
base scale ``s_{G-1}``: ``x ~= s_{G-1} * e``, so one plain integer GEMM on ``e`` computes the
grouped product exactly.  ``e`` fits int8 iff ``qmax * 2**(G-1) <= 127``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from torch.fx.experimental.symbolic_shapes import guard_or_false

ROUNDINGS = ("nearest", "stochastic")


def qmax(bits: int) -> int:
    """Largest quantized magnitude of a symmetric ``bits``-bit integer: 4 bits -> 7."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    return 2 ** (bits - 1) - 1


def expanded_max(bits: int, groups: int) -> int:
    """Largest magnitude of ShiftQuant's expanded integers: ``qmax * 2**(groups-1)``."""
    return qmax(bits) * 2 ** (groups - 1)


def fits_int8(bits: int, groups: int) -> bool:
    """Can ShiftQuant's expanded form be stored in int8 (one plain int8 GEMM)?

    4 bits: up to 5 groups; 5 bits: 4; 6 bits: 3; 7 bits: 2; 8 bits: 1.
    """
    return expanded_max(bits, groups) <= 127


def expanded_dtype(bits: int, groups: int) -> torch.dtype:
    """The dtype of ShiftQuant's expanded form: int8 where it fits (:func:`fits_int8`), else int16."""
    return torch.int8 if fits_int8(bits, groups) else torch.int16


def _reduce_dims(x: torch.Tensor, keep_dims: Sequence[int]) -> list:
    keep = {d % x.dim() for d in keep_dims} if x.dim() else set()
    return [d for d in range(x.dim()) if d not in keep]


def amax(x: torch.Tensor, keep_dims: Sequence[int] = ()) -> torch.Tensor:
    """max |x| over every dim but ``keep_dims`` (kept as size-1 dims), in float32."""
    dims = _reduce_dims(x, keep_dims)
    a = x.detach().abs().float()
    if not dims:
        return a
    if any(guard_or_false(x.shape[d] == 0) for d in dims):    # an empty batch: maxima 0 (scale 0)
        return a.new_zeros([1 if d in dims else s for d, s in enumerate(x.shape)])
    unknown = [d for d in dims if not guard_or_false(x.shape[d] != 0)]
    if unknown:
        # a size known only at run time (a data-dependent count of tokens, as a routed
        # expert's), which may be 0: the max over the values and one slice of zeros, which is
        # the same for |x| >= 0 and 0 for no values, without guarding on the size
        d = unknown[0]
        a = torch.cat([a, a.new_zeros([1 if i == d else s for i, s in enumerate(a.shape)])], dim=d)
    return a.amax(dim=dims, keepdim=True)


def uniform_noise(shape, device=None) -> torch.Tensor:
    """Cheap U[0, 1) noise for stochastic rounding, with 8 random bits per element.

    ``torch.rand`` costs about as much as the whole quantizer on CPU, so we draw one int64
    per 8 elements and use its bytes.  ``random_()`` leaves bit 63 at zero, which would bias
    every eighth byte; ``r ^ (r << 1)`` makes every byte uniform again (each output byte is an
    invertible or surjective linear function of independent uniform bits).  Values are
    ``(k + 0.5) / 256`` so the mean is exactly 1/2 and rounding is biased by at most 2**-9 of a
    quantization step.
    """
    shape = tuple(shape)
    n = 1
    for s in shape:
        n *= s
    words = torch.empty((n + 7) // 8, dtype=torch.int64, device=device).random_()
    words ^= words << 1
    k = words.view(torch.uint8)[:n].view(shape)
    return (k.float() + 0.5) * (1.0 / 256.0)


SEED_BOUND = 2 ** 31 - 1


def draw_seed(device=None, shape=()) -> torch.Tensor:
    """A fresh int64 seed in ``[0, SEED_BOUND)`` for :func:`hash_noise` and the Triton
    quantizers, drawn from torch's generator for ``device`` (``torch.manual_seed`` reproduces
    it; on CUDA it is drawn on the device, so nothing waits on it)."""
    return torch.randint(0, SEED_BOUND, shape, dtype=torch.int64, device=device)


def hash_noise(shape, seed, device=None) -> torch.Tensor:
    """Counter-based U[0, 1) noise: a hash of (element index, ``seed``), 8 bits per element.

    The same role as :func:`uniform_noise`, but computed from the index alone, so a fusing
    compiler (Inductor) generates it inside the quantizer's loop with a few integer ops instead
    of a separate random-number pass (Inductor's ``rand`` costs ~5x the whole quantizer on
    CPU).  The hash is the 32-bit MurmurHash3 finalizer over ``(index ^ seed) * golden`` in
    int32 arithmetic (products wrap modulo 2**32; right shifts are made logical by masking).
    The xor comes first on purpose: Inductor folds ``arange * constant`` into an index
    expression, which overflows int32 index math in its Triton code, but it cannot fold an xor;
    values are ``(k + 0.5) / 256`` as in :func:`uniform_noise`.  ``seed``: an int or an int
    tensor.  Indices wrap past 2**32 elements (harmless: the noise only needs to be uniform).
    """
    shape = tuple(shape)
    n = 1
    for s in shape:
        n *= s
    seed = torch.as_tensor(seed, device=device).to(torch.int32) * 668265263   # 0x27D4EB2F spreads nearby seeds
    h = (torch.arange(n, dtype=torch.int32, device=device).view(shape) ^ seed) * -1640531535   # 0x9E3779B1
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * -2048144789                                                                      # 0x85EBCA6B
    h = h ^ ((h >> 13) & 0x7FFFF)
    h = h * -1028477387                                                                      # 0xC2B2AE35
    h = h ^ ((h >> 16) & 0xFFFF)
    return (((h >> 24) & 0xFF).float() + 0.5) * (1.0 / 256.0)


def round_values(v: torch.Tensor, rounding: str, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    if rounding == "nearest":
        return torch.round(v)
    if rounding == "stochastic":
        u = uniform_noise(v.shape, v.device) if noise is None else noise
        return torch.floor(v + u)
    raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")


def safe_div_scale(scale: torch.Tensor) -> torch.Tensor:
    """The scale, 1 where it is 0 (the values there are 0 too, so they still quantize to 0).
    Subnormal scales (amax below ``qmax * 2**-126``) are divided by as they are: an earlier
    clamp to the smallest normal float changed their quotients."""
    return scale.masked_fill(scale == 0, 1.0)


def divide(a: torch.Tensor, divisor: float) -> torch.Tensor:
    """``a / divisor`` correctly rounded (IEEE) on every device.  PyTorch's CUDA kernels
    multiply by the reciprocal when the divisor is a Python number (``a * (1 / d)``, one
    ulp off for some ``a``: seen on an H200 as scales one ulp from the Triton kernels',
    2026-11-30); dividing by a tensor divides.  The divisor tensor is filled on the device
    (no host copy, so CUDA graph capture works)."""
    return a / a.new_full((), divisor)


def _finite_or_nan(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(scale), scale, torch.full_like(scale, float("nan")))


def quantize_values(x: torch.Tensor, scale: torch.Tensor, bits: int, rounding: str = "nearest",
                    noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``clamp(round(x / scale), -qmax, qmax)`` as float32 integers.  NaN inputs become 0
    here; the caller's NaN scale carries them (see the module docstring)."""
    m = qmax(bits)
    v = x.float() / safe_div_scale(scale)
    q = round_values(v, rounding, noise).clamp(-m, m)
    return torch.where(q == q, q, 0.0)            # NaN -> 0 (cheaper than nan_to_num)


def quantize_with_scale(x: torch.Tensor, scale: torch.Tensor, bits: int, rounding: str = "nearest",
                        noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`quantize_values` as int8."""
    return quantize_values(x, scale, bits, rounding, noise).to(torch.int8)


def quantize(x: torch.Tensor, bits: int, keep_dims: Sequence[int] = (), rounding: str = "nearest",
             noise: Optional[torch.Tensor] = None):
    """Symmetric quantization with one scale per index of ``keep_dims``.

    Returns ``(q, scale)``: ``q`` int8 with ``x``'s shape, ``scale`` float32 broadcastable to
    it (size 1 along the reduced dims), so ``dequantize(q, scale) ~= x``.
    """
    a = amax(x, keep_dims)
    q = quantize_with_scale(x, divide(a, qmax(bits)), bits, rounding, noise)
    return q, scale_of_amax(a, bits)


def scale_of_amax(a: torch.Tensor, bits: int) -> torch.Tensor:
    """The scale :func:`quantize` returns for channel maxima ``a`` (:func:`amax`), bit for
    bit: for callers that keep the maxima (a reduction's result) rather than the scale."""
    return _finite_or_nan(divide(a, qmax(bits)))


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale).to(dtype)


def fake_quantize(x: torch.Tensor, bits: int, keep_dims: Sequence[int] = (), rounding: str = "nearest",
                  noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Quantize-dequantize in ``x``'s dtype."""
    q, s = quantize(x, bits, keep_dims, rounding, noise)
    return dequantize(q, s, x.dtype)


@dataclass
class ShiftQuantized:
    """ShiftQuant's result.

    ``expanded``: integers ``q << (G-1-g)`` (int8 when :func:`fits_int8`, else int16);
    ``base_scale``: scalar float32 tensor ``s_{G-1}``; ``q``: the per-group integers
    (int8, ``|q| <= qmax``); ``group``: each element's group index (int64, broadcastable
    to ``x``, size 1 along the non-channel dims).
    """

    expanded: torch.Tensor
    base_scale: torch.Tensor
    q: torch.Tensor
    group: torch.Tensor
    bits: int
    groups: int

    def group_scales(self) -> torch.Tensor:
        """``s_g`` for g = 0..G-1 (float32), each ``base_scale * 2**(G-1-g)`` exactly."""
        shifts = torch.arange(self.groups - 1, -1, -1, device=self.base_scale.device)
        return self.base_scale * torch.pow(2.0, shifts.float())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.expanded.float() * self.base_scale).to(dtype)


def shift_groups(ranges: torch.Tensor, groups: int) -> torch.Tensor:
    """Group index of each channel range: ``min(G-1, floor(log2(R / r)))``, exactly.

    ``floor(log2(R / r))`` counts the rungs ``j >= 1`` with ``r * 2**j <= R``; multiplying by a
    power of two is exact in floating point, so channels whose range sits exactly on a
    boundary land in the right group (a float ``log2`` can miss by one there), and the
    computation is a handful of compares that a fusing compiler vectorizes.  Zero ranges
    satisfy every compare and land in ``G-1``, as does everything when ``R`` is not finite.
    """
    R = ranges.max() if ranges.numel() else ranges.new_zeros(())
    g = torch.zeros(ranges.shape, dtype=torch.int64, device=ranges.device)
    for j in range(1, groups):
        g = g + (ranges * (2.0 ** j) <= R).long()
    return torch.where(torch.isfinite(R), g, torch.full_like(g, groups - 1))


def shift_params(ranges: torch.Tensor, bits: int, groups: int):
    """Per-channel ShiftQuant parameters from the channel ranges.

    Returns ``(group, multiplier, scale, base)``: each channel's group ``g``, its shift as a
    float multiplier ``2**(G-1-g)`` (``expanded = q * multiplier``), its scale
    ``s_g = base * multiplier`` (an exact power of two times the base) and the base scale
    ``s_{G-1} = R / 2**(G-1) / qmax``.  The CPU gradient-pair kernel computes the same in C
    (``kernels/cpu_quant.c:sq_shift_params``; ``tests/test_cpu_quant.py`` ties the two bit for
    bit): a change here goes there too.
    """
    R = ranges.max() if ranges.numel() else ranges.new_zeros(())
    g = shift_groups(ranges, groups)
    multiplier = torch.pow(2.0, ((groups - 1) - g).float())
    base = divide(R / (2 ** (groups - 1)), qmax(bits))   # / 2**k: exact either way
    return g, multiplier, base * multiplier, base


def shiftquant(x: torch.Tensor, bits: int, groups: int, channel_dims: Sequence[int],
               rounding: str = "stochastic", noise: Optional[torch.Tensor] = None,
               prescale: Optional[torch.Tensor] = None) -> ShiftQuantized:
    """ShiftQuant ``x`` with channels indexed by ``channel_dims`` (the GEMM's reduction axis).

    Channels are grouped by range on a power-of-two ladder below the largest range ``R``;
    group ``g`` uses the scale ``R / 2**g / qmax``.  See the module docstring.

    ``prescale``: quantize ``x.float() * prescale`` instead, a float32 product; ``prescale``
    holds one factor per channel (it broadcasts to ``x`` and is constant along the reduced
    dims).  The backward GEMMs fold the other operand's per-channel scale into the gradient
    this way, and a kernel can apply it on the fly instead of materializing the product.
    """
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    x = apply_prescale(x, prescale, channel_dims)
    g, multiplier, scale, base = shift_params(amax(x, channel_dims), bits, groups)
    return shiftquant_with_params(x, bits, groups, g, multiplier, scale, base, rounding, noise)


def apply_prescale(x: torch.Tensor, prescale: Optional[torch.Tensor], channel_dims: Sequence[int]) -> torch.Tensor:
    """``x.float() * prescale`` (``x`` when ``prescale`` is None), checking that ``prescale``
    has one value per channel: size 1 on every dim outside ``channel_dims``, no extra dims."""
    if prescale is None:
        return x
    check_prescale(x, prescale, channel_dims)
    return x.float() * prescale.float()


def check_prescale(x: torch.Tensor, prescale: torch.Tensor, channel_dims: Sequence[int]) -> None:
    """Raise ``ValueError`` unless ``prescale`` is one factor per channel of ``x``."""
    keep = {d % x.dim() for d in channel_dims} if x.dim() else set()
    lead = prescale.dim() - x.dim()
    # raise only for sizes known to be wrong (a data-dependent size is not checked while traced)
    if lead > 0 or any(guard_or_false(n != 1) and (d - lead not in keep or guard_or_false(n != x.shape[d - lead]))
                       for d, n in enumerate(prescale.shape)):
        raise ValueError(f"prescale of shape {tuple(prescale.shape)} is not one factor per channel of x "
                         f"{tuple(x.shape)} with channel dims {list(channel_dims)}")


def shiftquant_with_params(x, bits, groups, g, multiplier, scale, base, rounding="stochastic", noise=None):
    """The elementwise half of :func:`shiftquant`, given :func:`shift_params`' results."""
    q = quantize_values(x, scale, bits, rounding, noise)
    edtype = expanded_dtype(bits, groups)
    expanded = (q * multiplier).to(edtype)         # q << (G-1-g), exact in float
    return ShiftQuantized(expanded, _finite_or_nan(base), q.to(torch.int8), g, bits, groups)


def quantize_per_channel(x: torch.Tensor, bits: int, channel_dims: Sequence[int],
                         rounding: str = "nearest", noise: Optional[torch.Tensor] = None):
    """One scale per reduction channel: the error floor ShiftQuant approaches (no integer GEMM
    can apply these scales, which is why ShiftQuant exists)."""
    return quantize(x, bits, channel_dims, rounding, noise)


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).pow(2).mean())


def sqnr_terms(reference: torch.Tensor, approx: torch.Tensor) -> Tuple[float, float]:
    """``(|x|^2, |x - x_q|^2)``, in float64: the two sums :func:`sqnr_db` divides (the
    statistics pool them over the calls of one step before dividing, :func:`sqnr_from`)."""
    ref = reference.detach().double()
    return float(ref.pow(2).sum()), float((ref - approx.detach().double()).pow(2).sum())


def sqnr_from(signal: float, noise: float) -> float:
    """``10 log10(signal / noise)`` in dB; ``inf`` when there is no noise (an exact
    quantization, a zero tensor), ``-inf`` for noise on a zero signal."""
    if noise == 0:
        return float("inf")
    if signal == 0:
        return float("-inf")
    return 10 * math.log10(signal / noise) if signal > 0 and noise > 0 else float("nan")


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(|x|^2 / |x - x_q|^2)`` in dB."""
    return sqnr_from(*sqnr_terms(reference, approx))
