"""The fused integer attention (:mod:`sqcompile.kernels.triton_attention`).

References:

* a quantized attention written here from :mod:`sqcompile.numerics` primitives and torch
  float ops, with nearest rounding in the backward (the kernels' ``stochastic=False``), so
  the comparison is value for value: it differs from the kernels only by the order of a
  row's exponential sum, the ``exp`` implementation and the softmax's division (the kernels
  multiply by ``1 / l``), i.e. float rounding;
* the unfused quantized attention (``ops.quantized_sdpa`` with the same Triton quantizers
  and GEMMs), with stochastic rounding and the same seeds: the fused backward draws the
  noise the unfused quantizers draw, element for element.

Without CUDA everything runs in Triton's CPU interpreter on small shapes that are not
multiples of the tiles (masked edges); ``ptxas`` checks the GPU tile candidates for sm_90
(warpgroup MMA, spills, shared memory; slow).
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import sqcompile
from sqcompile import numerics as N
from sqcompile import ops
from sqcompile.decisions import records_for
from sqcompile.kernels.triton_ops import triton_available
from sqcompile.passes.quantize_gemms import FUSED_ATTENTION

from models import Block, assert_steps_match, rel

AVAILABLE, WHY = triton_available()
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=WHY)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _ta():
    from sqcompile.kernels import triton_attention
    return triton_attention


def _shiftquant(x, bits, groups, dims, prescale, outer):
    """``(expanded, scale)``: nearest-rounding ShiftQuant from numerics, with ``outer`` (the
    other matrix dim's index) through ``ops.shiftquant_outer``'s composition."""
    def plain(y, b, g, d, stochastic, prescale=None):
        r = N.shiftquant(y, b, g, d, "nearest", prescale=prescale)
        return r.expanded, r.base_scale
    if not outer:
        return plain(x, bits, groups, dims, False, prescale)
    return ops.shiftquant_outer(plain, x, bits, groups, dims, [0, 3 - dims[1]], False, prescale)


def reference(q, k, v, do, scale, causal, bits, grad_bits, groups, mask=None, outer=False):
    """Quantized attention forward and backward (nearest rounding) from numerics, in float32;
    ``mask`` boolean (False: masked) or float (added), broadcastable to the scores; ``outer``:
    every gradient quantizer with ``grad_outer_scale``'s outer scale."""
    qq, sq = N.quantize(q, bits, [0, 1])
    qk, sk = N.quantize(k, bits, [0, 1])
    qv, sv = N.quantize(v, bits, [0, 2])
    s = (qq.float() @ qk.float().mT) * sq * sk.mT * scale
    if causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    p = torch.softmax(s, dim=-1)
    qp, sp = N.quantize(p, bits, [0, 1])
    o = (qp.float() @ qv.float()) * sp * sv
    do_c, do_cs = _shiftquant(do, grad_bits, groups, [0, 2], sv, outer)
    do_r, do_rs = _shiftquant(do, grad_bits, groups, [0, 1], sp, outer)
    dp = (do_c.float() @ qv.float().mT) * do_cs
    dv = (qp.float().mT @ do_r.float()) * do_rs
    ds = (p * dp - p * (p * dp).sum(-1, keepdim=True)) * scale
    ds_c, ds_cs = _shiftquant(ds, grad_bits, groups, [0, 2], sk.mT, outer)
    ds_r, ds_rs = _shiftquant(ds, grad_bits, groups, [0, 1], sq, outer)
    dq = (ds_c.float() @ qk.float()) * ds_cs
    dk = (ds_r.float().mT @ qq.float()) * ds_rs.mT
    return o, dq, dk, dv


def _assert_matches(actual, expected, name):
    """Equal up to float rounding: every element within a few units of the dtype's last place
    (1e-5 relative in float32), but for the rare one a rounding boundary moved by one
    quantization step (at most 1% of them, each within 5% of the tensor's largest value).

    On a GPU at most 5% in bfloat16: there the unfused softmax is PyTorch's CUDA kernel, whose
    ``exp`` differs from the fused kernels' in more scores' last bits, and one moved rounding
    of ``dS`` moves a whole row of ``dQ`` (an H200 run, 2026-11-30: 97.2-98.0% of ``dQ``
    close in three bfloat16 cases, every element within the 5% bound)."""
    rtol = 1e-5 if actual.dtype == torch.float32 else 2 * torch.finfo(actual.dtype).eps
    least = 0.95 if DEVICE == "cuda" and actual.dtype != torch.float32 else 0.99
    actual, expected = actual.float().cpu(), expected.float().cpu()
    err = (actual - expected).abs()
    close = err <= rtol * expected.abs() + 1e-6 * expected.abs().max()
    assert close.float().mean() >= least, (name, float(close.float().mean()))
    assert float(err.max()) <= 0.05 * float(expected.abs().max()), (name, float(err.max()))


def _tiles(fwd_m, fwd_n, bwd_m, bwd_n):
    """Interpreter tiles other than the default 16x16: the query-block kernels' and dK/dV's."""
    Tile = _ta().Tile
    forward = Tile(fwd_m, fwd_n, 1, 1)
    return {"fwd": forward, "ranges": forward, "dq": forward, "dkdv": Tile(bwd_m, bwd_n, 1, 1)}


def _mask(kind, BH, L, S, g):
    """A mask for the kernels, ``[O, H, L, S]`` with broadcast dims as strides 0: a padding
    mask per (batch, head) row of keys (boolean; the first 20 keys masked in row 0, so its
    first tiles are all masked; the last key always kept, so no row is fully masked), or
    one additive float bias shared by all."""
    if kind == "bool":
        keep = torch.rand(BH, 1, 1, S, generator=g) > 0.3
        keep[0, ..., :20] = False
        keep[..., -1] = True
        return keep.expand(BH, 1, L, S)
    return torch.randn(1, 1, L, S, generator=g).expand(BH, 1, L, S)


@pytest.mark.parametrize("BH,L,S,D,causal,bits,tiles,mask,outer", [
    (3, 37, 45, 24, False, 8, None, None, False),
    (2, 40, 40, 16, True, 8, None, None, False),
    (2, 33, 50, 40, False, 4, None, "bool", False),
    (2, 45, 45, 16, True, 4, (16, 32, 32, 16), None, False),       # forward and backward tiles differ
    (1, 50, 30, 8, True, 6, (32, 16, 16, 32), "float", False),     # L > S, causal, head dim padded to 16
    (2, 33, 50, 40, False, 4, None, "bool", True),                 # grad_outer_scale
    (2, 45, 45, 16, True, 6, (16, 32, 32, 16), None, True),
])
def test_kernels_match_the_numerics_reference(BH, L, S, D, causal, bits, tiles, mask, outer):
    g = torch.Generator().manual_seed(BH * 100 + L)
    q, k, v, do = (torch.randn(BH, n, D, generator=g) for n in (L, S, S, L))
    m4 = None if mask is None else _mask(mask, BH, L, S, g)
    scale = D ** -0.5
    t = None if tiles is None or DEVICE == "cuda" else _tiles(*tiles)     # a GPU's int8 dot needs K >= 32
    ta = _ta()
    dev = None if m4 is None else m4.to(DEVICE)
    out, *saved = ta.attention_forward(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), dev, scale, causal, bits, tiles=t)
    if outer:       # tokens whose gradient is far below the others', which the outer scale resolves
        do[:, ::4] *= 1e-3
    grads = ta.attention_backward(do.to(DEVICE), *saved, dev, scale, causal, bits, 4, 4, stochastic=False, tiles=t,
                                  outer=outer)
    ref = reference(q, k, v, do, scale, causal, bits, 4, 4, None if m4 is None else m4.reshape(BH, L, S), outer)
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), ref):
        _assert_matches(a, b, name)
    if outer:       # and not the plain quantizers' result (on the small tokens' rows of dQ)
        plain = reference(q, k, v, do, scale, causal, bits, 4, 4, None if m4 is None else m4.reshape(BH, L, S))
        small = (slice(None), slice(None, None, 4))
        assert rel(grads[0].cpu()[small], plain[1][small]) > 2 * rel(grads[0].cpu()[small], ref[1][small]) + 1e-3
    stats = saved[-1]
    s = (N.dequantize(*N.quantize(q, bits, [0, 1])) @ N.dequantize(*N.quantize(k, bits, [0, 1])).mT) * scale
    if causal:
        s = s.masked_fill(~torch.ones(L, S, dtype=torch.bool).tril(), float("-inf"))
    if m4 is not None:
        m3 = m4.reshape(BH, L, S)
        s = s.masked_fill(~m3, float("-inf")) if m3.dtype == torch.bool else s + m3
    torch.testing.assert_close(stats[0].cpu(), s.amax(-1), rtol=1e-5, atol=1e-5)                  # row max
    torch.testing.assert_close(stats[1].cpu(), torch.exp(s - s.amax(-1, keepdim=True)).sum(-1),   # exp sum
                               rtol=1e-5, atol=0)


def test_autotuned_launch_path(monkeypatch):
    """The GPU's launch path (``triton.autotune`` over ``GPU_TILES``, grids from the chosen
    tile), run in the interpreter with its first candidate (``SQCOMPILE_AUTOTUNE=0``: no
    timing), against the reference."""
    ta = _ta()
    monkeypatch.setenv("SQCOMPILE_AUTOTUNE", "0")
    monkeypatch.setattr(ta, "INTERPRETER_TILE", None)
    g = torch.Generator().manual_seed(9)
    BH, L, S, D = 1, 70, 70, 16
    q, k, v, do = (torch.randn(BH, n, D, generator=g) for n in (L, S, S, L))
    out, *saved = ta.attention_forward(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), None, 0.25, True, 8)
    grads = ta.attention_backward(do.to(DEVICE), *saved, None, 0.25, True, 8, 4, 4, stochastic=False)
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), reference(q, k, v, do, 0.25, True, 8, 4, 4)):
        _assert_matches(a, b, name)


@pytest.mark.parametrize("H,L,D", [(3, 29, 16), (2, 11, 72)])
def test_kernels_read_a_head_split_in_place_and_write_gradients_where_asked(H, L, D):
    """The operands as the q / k / v slices of a fused projection's heads (``[B, L, 3, H, D]``
    seen as ``[B, H, L, D]``): the forward reads them where they lie and stores its output
    ``[B, L, H, D]``; the backward takes that layout's gradient and writes ``dq``, ``dk``,
    ``dv`` into one ``[B, L, 3, H, D]`` tensor, with its ShiftQuant ranges and its sum over
    the tokens (in the kernels' epilogues up to head dim 64, by a pass over it above).  Every
    value is the one contiguous ``[BH, L, D]`` copies give, bit for bit, stochastic rounding
    included (the same seeds); the sums agree with float64 ones to float32 rounding, also
    when the ``dQ`` programs cover two partial-sum slots (the second written as zeros)."""
    ta = _ta()
    g = torch.Generator().manual_seed(11)
    B = 2
    qkv = torch.randn(B, L, 3, H, D, generator=g).to(DEVICE)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    do = torch.randn(B, L, H, D, generator=g).to(DEVICE).transpose(1, 2)
    out, *saved = ta.attention_forward(q, k, v, None, D ** -0.5, True, 4)
    ref_out, *ref_saved = ta.attention_forward(*(t.reshape(B * H, L, D) for t in (q, k, v)), None, D ** -0.5, True, 4)
    assert out.shape == (B, H, L, D) and out.transpose(1, 2).is_contiguous()
    assert saved[0].is_contiguous() and saved[4].is_contiguous()
    for a, b in zip((out, *saved), (ref_out, *ref_saved)):
        assert torch.equal(a.reshape(b.shape), b)
    packed = torch.full((B, L, 3, H, D), float("nan"), device=DEVICE)
    grads = tuple(packed[:, :, i].transpose(1, 2) for i in range(3))
    seeds = (1, 2, 3, 4)
    ranges = torch.zeros(3 * H * D + B * L, dtype=torch.int32, device=DEVICE)
    sums = torch.full((3 * H * D,), float("nan"), device=DEVICE)
    ta.attention_backward(do, *saved, None, D ** -0.5, True, 4, 4, 4, seeds=seeds, grads=grads, grad_ranges=ranges,
                          grad_sums=sums)
    ref = ta.attention_backward(do.reshape(B * H, L, D), *ref_saved, None, D ** -0.5, True, 4, 4, 4, seeds=seeds)
    for a, b in zip(grads, ref):
        assert torch.equal(a.reshape(b.shape), b)
    # the ShiftQuant ranges of the packed gradient as [tokens, features]: exact maxima
    flat, ranges = packed.reshape(B * L, 3 * H * D), ranges.view(torch.float32)
    assert torch.equal(ranges[:3 * H * D], flat.abs().amax(0)) and torch.equal(ranges[3 * H * D:], flat.abs().amax(1))
    # its sum over the tokens (the projection's bias gradient)
    torch.testing.assert_close(sums.double(), flat.double().sum(0), rtol=1e-5, atol=1e-5)
    if D <= 64:      # dQ over 32 queries a program, dK/dV over 16 keys: slots of 16, two per dQ program
        # (on a GPU tiles of 32 and 64: an int8 ``tl.dot`` reduces over at least 32 there)
        tile = ta.INTERPRETER_TILE if DEVICE == "cpu" else ta.Tile(32, 32, 4, 1)
        again = torch.full_like(sums, float("nan"))
        ta.attention_backward(do, *saved, None, D ** -0.5, True, 4, 4, 4, seeds=seeds, grads=grads, grad_sums=again,
                              tiles={"ranges": tile, "dkdv": tile, "dq": tile._replace(block_m=2 * tile.block_m)})
        assert torch.equal(packed.reshape(B * L, -1), flat)
        torch.testing.assert_close(again.double(), flat.double().sum(0), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="tokens, features"):
        ta.attention_backward(do, *saved, None, D ** -0.5, True, 4, 4, 4, grad_ranges=ranges)
    with pytest.raises(ValueError, match="same strides"):
        ta.attention_backward(do, *saved, None, D ** -0.5, True, 4, 4, 4, grads=(grads[0], grads[1], ref[2]))
    with pytest.raises(ValueError, match="grad_sums must be float32"):
        ta.attention_backward(do, *saved, None, D ** -0.5, True, 4, 4, 4, grads=grads, grad_sums=sums[1:])


def _sdpa(q, k, v, fused, seed, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    torch.manual_seed(seed)
    out = ops.quantized_sdpa(q, k, v, act_bits=4, grad_bits=4, groups=4, integer=True, kernels="triton", fused=fused,
                             **kw)
    weight = torch.linspace(-1, 1, out.shape[-1], device=out.device, dtype=out.dtype)
    grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
    return (out.detach(), *grads)


@pytest.mark.parametrize("dtype,causal,gqa,mask,queries,outer", [(torch.float32, True, True, None, 21, False),
                                                                 (torch.bfloat16, False, False, "padding", 21, False),
                                                                 (torch.bfloat16, False, False, "bias", 21, False),
                                                                 (torch.float32, False, False, None, 1, False),
                                                                 (torch.bfloat16, True, False, "padding", 21, True)])
def test_fused_equals_unfused_quantized_sdpa_with_the_same_seeds(dtype, causal, gqa, mask, queries, outer):
    """Stochastic rounding in both: the fused backward draws the unfused quantizers' seeds in
    their order and each element's noise, so the results agree up to float rounding.  Masks
    as models pass them: a boolean padding mask ``[B, 1, 1, S]``, an additive bias ``[L, S]``.
    One query: ``dS`` ``[BH, 1, S]``, whose column quantizer draws its noise along the queries
    (``columns_noise_along_n``), not along the keys as for longer sequences.  With
    ``grad_outer_scale`` (``outer_scale``) both take the outer scales."""
    g = torch.Generator().manual_seed(7)
    B, H, L, D = 2, 2, 21, 16
    qkv = torch.randn(B, L, 3, H, D, generator=g).to(DEVICE, dtype)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))     # strided views, as after a qkv split
    if gqa:
        k, v = k[:, :1], v[:, :1]
    q = q[:, :, :queries]
    kw = dict(is_causal=causal, enable_gqa=gqa, outer_scale=outer)
    if mask == "padding":
        keep = torch.ones(B, 1, 1, L, dtype=torch.bool)
        keep[0, ..., 15:] = False           # right padding
        keep[1, ..., :17] = False           # left padding: whole tiles of keys masked
        kw["attn_mask"] = keep.to(DEVICE)
    elif mask == "bias":
        kw["attn_mask"] = torch.randn(L, L, generator=g).to(DEVICE, dtype)
    fused = _sdpa(q, k, v, True, 3, **kw)
    unfused = _sdpa(q, k, v, False, 3, **kw)
    for name, a, b in zip(("out", "dq", "dk", "dv"), fused, unfused):
        assert a.shape == b.shape and a.dtype == b.dtype
        _assert_matches(a, b, name)


@pytest.mark.parametrize("p_bits", [5, 8])
def test_fused_equals_unfused_with_unsigned_probabilities(p_bits):
    """``P`` quantized unsigned at 4 bits (``p_bits=5``: levels ``0..15``) or at 7 (``8``)
    with ``Q``, ``K``, ``V`` at 4 bits, fused as unfused; and not as with ``P`` at 4 bits."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 19, 16, generator=g).to(DEVICE) for _ in range(3))
    fused = _sdpa(q, k, v, True, 3, is_causal=True, p_bits=p_bits)
    unfused = _sdpa(q, k, v, False, 3, is_causal=True, p_bits=p_bits)
    signed = _sdpa(q, k, v, False, 3, is_causal=True)
    for name, a, b in zip(("out", "dq", "dk", "dv"), fused, unfused):
        _assert_matches(a, b, name)
    assert not torch.allclose(fused[0], signed[0])


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_query_rows_with_every_key_masked_are_zero_as_in_pytorch(mask_dtype):
    """Left padding with a causal mask leaves the padded queries no key: PyTorch's attention
    gives those rows 0 and finite gradients everywhere (``_safe_softmax``); so do the unfused
    quantized attention (both kernel families) and the fused kernels, which agree with each
    other as in the test above.  (A plain softmax gives NaN rows, and the NaN reached every
    element of ``dV``.)"""
    g = torch.Generator().manual_seed(11)
    B, H, L, D = 2, 2, 21, 16
    q, k, v = (torch.randn(B, H, L, D, generator=g).to(DEVICE) for _ in range(3))
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[0, :18] = False                                   # more than a whole tile of padded queries
    keep = torch.ones(L, L, dtype=torch.bool).tril() & valid[:, None, None, :]      # [B, 1, L, L]
    mask = keep if mask_dtype == torch.bool else torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    mask = mask.to(DEVICE)
    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
    eager = F.scaled_dot_product_attention(qr, kr, vr, attn_mask=mask)
    weight = torch.linspace(-1, 1, D, device=DEVICE)
    eager_grads = torch.autograd.grad((eager * weight).sum(), (qr, kr, vr))
    assert not eager[0, :, :18].any()
    fused = _sdpa(q, k, v, True, 3, attn_mask=mask)
    unfused = _sdpa(q, k, v, False, 3, attn_mask=mask)
    torch.manual_seed(3)
    torch_family = ops.quantized_sdpa(*(t.detach().clone().requires_grad_() for t in (q, k, v)), attn_mask=mask,
                                      act_bits=8, grad_bits=8, groups=1, integer=True, kernels="torch")
    for name, a, b in zip(("out", "dq", "dk", "dv"), fused, unfused):
        assert torch.isfinite(a).all() and torch.isfinite(b).all(), name
        _assert_matches(a, b, name)
    for out in (fused[0], unfused[0], torch_family):
        assert not out[0, :, :18].any()
    assert rel(torch_family.detach(), eager.detach()) < 0.05
    assert all(rel(a, b) < 0.5 for a, b in zip(fused[1:], eager_grads))     # 4-bit gradients: loose


def test_stochastic_rounding_is_reproducible_and_seeded():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 20, 16, generator=g).to(DEVICE) for _ in range(3))
    first, again, other = (_sdpa(q, k, v, True, seed) for seed in (11, 11, 12))
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.equal(first[1], other[1])        # dQ: dS's noise
    assert torch.equal(first[0], other[0])            # the forward has no noise


def test_unfused_when_the_kernels_cannot_run_it():
    q, k, v = (torch.randn(1, 2, 20, 16, device=DEVICE) for _ in range(3))
    bias = torch.randn(20, 20, device=DEVICE, requires_grad=True)
    kw = dict(grad_bits=4, groups=4)
    assert ops.fused_attention_unsupported(q, k, v, **kw) is None
    assert ops.fused_attention_unsupported(q, k, v, bias.detach() > 0, **kw) is None
    assert ops.fused_attention_unsupported(q, k, v, bias.detach(), **kw) is None
    assert "requires grad" in ops.fused_attention_unsupported(q, k, v, bias, **kw)
    assert "float64" in ops.fused_attention_unsupported(q, k, v, bias.detach().double(), **kw)
    assert "dropout" in ops.fused_attention_unsupported(q, k, v, None, 0.1, **kw)
    assert "int16" in ops.fused_attention_unsupported(q, k, v, grad_bits=8, groups=4)
    assert "head dim" in ops.fused_attention_unsupported(q, k, v[..., :8], **kw)
    assert "dtypes" in ops.fused_attention_unsupported(q, k.half(), v, **kw)
    # quantized_sdpa asked to fuse such an attention runs the unfused ops, with the same result,
    # and the learned bias gets its gradient
    results = []
    for fused in (True, False):
        bias.grad = None
        torch.manual_seed(1)
        out = ops.quantized_sdpa(q, k, v, bias, act_bits=4, grad_bits=4, groups=4, integer=True, kernels="triton",
                                 fused=fused)
        out.sum().backward()
        results.append((out.detach(), bias.grad.clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_custom_ops_pass_opcheck():
    q, k, v = (torch.randn(3, n, 16, device=DEVICE) for n in (20, 24, 24))
    mask = (torch.rand(1, 1, 20, 24, device=DEVICE) > 0.3).expand(3, 1, 20, 24)
    out, *saved = torch.ops.sqcompile.triton_attention(q, k, v, None, 0.25, True, 4)
    do = torch.randn_like(out)
    for op, args in [
        (torch.ops.sqcompile.triton_attention.default, (q, k, v, None, 0.25, True, 4)),
        (torch.ops.sqcompile.triton_attention.default, (q.transpose(0, 1).contiguous().transpose(0, 1), k, v, mask,
                                                        0.5, False, 8)),
        (torch.ops.sqcompile.triton_attention_backward.default, (do, *saved, None, 0.25, True, 4, 4, 4)),
        (torch.ops.sqcompile.triton_attention_backward.default, (do, *saved, None, 0.25, True, 4, 4, 4, True)),
    ]:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    # a fused projection's heads, read in place; the packed gradient [B, L, 3, H, D]
    qkv = torch.randn(2, 20, 3, 2, 16, device=DEVICE)
    heads = [qkv[:, :, i].transpose(1, 2) for i in range(3)]
    out, *saved = torch.ops.sqcompile.triton_attention(*heads, None, 0.25, True, 4)
    do = torch.randn(2, 20, 2, 16, device=DEVICE).transpose(1, 2)
    strides = [1920, 16, 96, 1] * 3      # (b, h, l, d) in [B, L, 3, H, D]
    torch.library.opcheck(torch.ops.sqcompile.triton_attention.default, (*heads, None, 0.25, True, 4),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    # with its ranges and sums; put in place after AOTAutograd (a lowering pass), so never traced by it
    torch.library.opcheck(torch.ops.sqcompile.triton_attention_backward_packed.default,
                          (do, *saved, None, 0.25, True, 4, 4, 4, [2, 20, 3, 2, 16], [0, 32, 64], strides, True, True),
                          test_utils=("test_schema", "test_faketensor"))
    packed = torch.ops.sqcompile.triton_attention_backward_packed
    for size, offsets, strides, what in [([2, 20, 3, 2, 16], [0, 32, 2000], [1920, 16, 96, 1] * 3, "leaves"),
                                         ([2, 20, 2, 2, 16], [0, 32, 64], [1920, 16, 96, 1] * 3, "cannot fill"),
                                         ([2, 20, 3, 2, 16], [0, 32, 64], [1920, 16, 96, 1] * 2 + [1920, 96, 16, 1],
                                          "same strides")]:
        with pytest.raises(ValueError, match=what):
            packed(do, *saved, None, 0.25, True, 4, 4, 4, size, offsets, strides)


# ---------------------------------------------------------------------------------------------
# The backend: option, rewrite, report
# ---------------------------------------------------------------------------------------------

_OPTIONS = {"kernels": "triton", "execution": "integer", "inner": "eager"}


def _compiled_step(model, x, **options):
    torch._dynamo.reset()
    model = copy.deepcopy(model).to(DEVICE)
    compiled = torch.compile(model, backend="shiftquant", options={**_OPTIONS, **options})
    torch.manual_seed(1)
    out = compiled(x.to(DEVICE))
    out.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return out.detach(), grads, records_for(list(model.parameters()))[-1], compiled


def test_backend_runs_attention_fused_and_reports_it():
    torch.manual_seed(0)
    block, x = Block(sdpa=True), torch.randn(2, 16, 32)
    out, grads, rec, compiled = _compiled_step(block, x, fused_attention=True, inner="inductor")
    ref_out, ref_grads, ref_rec, _ = _compiled_step(block, x, fused_attention=False)
    assert "sqcompile.triton_attention(" in rec.graphs["forward"]
    assert "sqcompile.triton_attention_backward(" in rec.graphs["backward"] and rec.inner == "inductor"
    assert "triton_attention" not in ref_rec.graphs["forward"] + ref_rec.graphs["backward"]
    (sdpa,) = [d for d in rec.decisions if d.op == "scaled_dot_product_attention"]
    assert sdpa.region == FUSED_ATTENTION and sdpa.execution == "triton"
    assert FUSED_ATTENTION in str(sqcompile.report(compiled))
    assert rel(out, ref_out) < 1e-5
    for name in grads:
        assert rel(grads[name], ref_grads[name]) < 1e-4, name


class _FusedProjection(torch.nn.Module):
    """q, k and v from one Linear, split into heads as timm does (``view`` + ``permute``) or
    as nanoGPT does (``split`` + ``view`` + ``transpose``)."""

    def __init__(self, style: str, d: int = 32, heads: int = 2):
        super().__init__()
        self.style, self.heads = style, heads
        self.inp, self.qkv, self.proj = torch.nn.Linear(d, d), torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)

    def forward(self, x):
        B, L, C = x.shape
        x = self.inp(x)             # so that qkv's input gradient is needed: its dY quantized both ways
        if self.style == "permute":
            q, k, v = self.qkv(x).view(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        else:
            q, k, v = (t.view(B, L, self.heads, C // self.heads).transpose(1, 2) for t in self.qkv(x).split(C, 2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, L, C))


@pytest.mark.parametrize("style", ["permute", "split"])
def test_backend_reads_qkv_heads_in_place_and_writes_their_gradient_in_place(style, monkeypatch):
    """With the fused attention nothing copies the heads: the forward graph has no copy of
    q / k / v or of the output, and the backward's assembly of the projection's gradient
    (``select_backward`` and adds, or ``cat``, and copies) becomes
    ``triton_attention_backward_packed`` (:mod:`sqcompile.backends.attention_grads`).  The
    results are those with the assembly left in the graph, bit for bit.  (ShiftQuant alone, so
    that the attention's kernels also give the ranges of the projection's gradient; with
    ``grad_outer_scale``: :func:`test_outer_gradient_scale_runs_fused`.)"""
    from sqcompile.backends import attention_grads, lowering
    torch.manual_seed(0)
    model, x = _FusedProjection(style), torch.randn(2, 24, 32)
    out, grads, rec, _ = _compiled_step(model, x, fused_attention=True, grad_outer_scale=False)
    assert "aten.clone" not in rec.graphs["forward"] and "sqcompile.triton_attention(" in rec.graphs["forward"]
    backward = rec.graphs["backward_fused"]
    assert "sqcompile.triton_attention_backward_packed(" in backward
    assert not any(op in backward for op in ("select_backward", "aten.cat", "aten.clone", "triton_attention_backward("))
    # the projection's dY pair takes its ranges from the attention's kernels, proj's dY has none
    pairs = [line for line in backward.splitlines() if "sqcompile.triton_shiftquant_pair(" in line]
    assert len(pairs) == 2 and sum(", None, None, " in line for line in pairs) == 1
    assert [r.label for r in rec.regions].count(attention_grads.LABEL) == 1
    # the bias gradients: qkv's from the attention's kernels, inp's from qkv's dX region,
    # proj's (of the graph's input gradient) the graph's own sum
    assert backward.count("aten.sum.dim_IntList(") == 1
    monkeypatch.setattr(lowering, "pack_attention_gradients", lambda gm, *args: gm)
    ref_out, ref_grads, ref_rec, _ = _compiled_step(model, x, fused_attention=True, grad_outer_scale=False)
    assert ("select_backward" if style == "permute" else "aten.cat") in ref_rec.graphs["backward"]
    assert attention_grads.LABEL not in [r.label for r in ref_rec.regions]
    assert ref_rec.graphs["backward_fused"].count("aten.sum.dim_IntList(") == 2
    assert torch.equal(out, ref_out)
    for name in grads:
        if name == "qkv.bias":          # summed in another order
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-7)
        else:
            assert torch.equal(grads[name], ref_grads[name]), name


@pytest.mark.parametrize("style", ["permute", "split"])
def test_backend_compiles_a_symbolic_sequence_length_with_the_fused_attention(style):
    """``dynamic=True``: one graph for every sequence length, the attention fused, the GEMM
    regions too, and the ``qkv`` gradient written in place by the attention's kernels
    (:mod:`sqcompile.backends.attention_grads` computes the places' symbolic strides and
    offsets; the pass used to fail on hashing a symbolic size, then left autograd's assembly):
    the results are those of static compiles at each length, bit for bit."""
    torch.manual_seed(0)
    model = _FusedProjection(style)
    xs = [torch.randn(2, length, 32) for length in (24, 20)]
    references = [_compiled_step(model, x, fused_attention=True)[:2] for x in xs]
    torch._dynamo.reset()
    dynamic = copy.deepcopy(model).to(DEVICE)
    compiled = torch.compile(dynamic, backend="shiftquant", dynamic=True,
                             options={**_OPTIONS, "fused_attention": True})
    assert_steps_match(compiled, dynamic, xs, references, DEVICE)
    records = records_for(list(dynamic.parameters()))
    assert len(records) == 1 and "sqcompile.triton_attention(" in records[0].graphs["forward"]
    assert "sqcompile.triton_attention_backward(" in records[0].graphs["backward"]
    assert records[0].regions and "triton_int8_mm(" not in records[0].graphs["backward_fused"]
    assert "triton_attention_backward_packed(" in records[0].graphs["backward_fused"]
    assert any(r.label == "attention_backward+qkv_gradient" for r in records[0].regions)


class _BiasedAttention(torch.nn.Module):
    """Attention with a padding mask, or with a learned additive bias (which the fused kernels
    cannot give a gradient)."""

    def __init__(self, learned_bias: bool):
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)
        self.bias = torch.nn.Parameter(torch.randn(12, 12) / 4) if learned_bias else None

    def forward(self, x, keep):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        mask = keep[:, None, None, :] if self.bias is None else self.bias
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_backend_fuses_a_padded_attention_and_keeps_a_learned_bias_unfused():
    x, keep = torch.randn(2, 12, 16), torch.ones(2, 12, dtype=torch.bool)
    keep[1, 9:] = False
    results = {}
    for learned in (False, True):
        for fused in (True, False):
            torch._dynamo.reset()
            torch.manual_seed(0)
            model = _BiasedAttention(learned).to(DEVICE)
            compiled = torch.compile(model, backend="shiftquant", options={
                "kernels": "triton", "execution": "integer", "inner": "eager", "fused_attention": fused})
            torch.manual_seed(1)
            out = compiled(x.to(DEVICE), keep.to(DEVICE))
            out.square().mean().backward()
            rec = records_for(list(model.parameters()))[-1]
            (sdpa,) = [d for d in rec.decisions if d.op == "scaled_dot_product_attention"]
            results[learned, fused] = out.detach(), {n: p.grad for n, p in model.named_parameters()}, sdpa, rec
    _, _, sdpa, rec = results[False, True]
    assert sdpa.region == FUSED_ATTENTION and "sqcompile.triton_attention(" in rec.graphs["forward"]
    _, grads, sdpa, rec = results[True, True]
    assert sdpa.note == "unfused attention: an attn_mask that requires grad (the fused kernels give it none)"
    assert "triton_attention" not in rec.graphs["forward"] and grads["bias"].abs().sum() > 0
    for learned in (False, True):
        (out, grads, _, _), (ref_out, ref_grads, _, _) = results[learned, True], results[learned, False]
        assert rel(out, ref_out) < 1e-5
        assert all(rel(grads[n], ref_grads[n]) < 1e-4 for n in grads)


class _TimmAttention(torch.nn.Module):
    """timm's ViT attention, written out: the scale on ``q``, a dropout of 0 on the weights;
    ``weights=True`` also returns the attention weights (a second use: not rewritten)."""

    def __init__(self, weights: bool = False):
        super().__init__()
        self.qkv, self.drop, self.weights = torch.nn.Linear(32, 96), torch.nn.Dropout(0.0), weights

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, 4, 8).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q * 8 ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        out = self.drop(attn) @ v
        return (out, attn) if self.weights else out


def _attention_rows(rec):
    return [(d.op, d.region, d.note) for d in rec.decisions if d.op in ("matmul", "scaled_dot_product_attention")]


@pytest.mark.parametrize("model", ["block", "timm"])
def test_attention_written_out_runs_fused(model):
    """``softmax(q @ k^T * scale [masked]) @ v`` as two matmuls becomes one fused attention
    (passes.attention), with the explicit ops' results up to float rounding."""
    from sqcompile.passes.attention import NOTE
    torch.manual_seed(0)
    block, x = (Block(), torch.randn(2, 16, 32)) if model == "block" else (_TimmAttention(), torch.randn(2, 8, 32))
    out, grads, rec, _ = _compiled_step(block, x, fused_attention=True)
    ref_out, ref_grads, ref_rec, _ = _compiled_step(block, x, fused_attention=False)
    assert _attention_rows(rec) == [("scaled_dot_product_attention", FUSED_ATTENTION, NOTE)]
    assert [op for op, _, _ in _attention_rows(ref_rec)] == ["matmul", "matmul"]
    assert "sqcompile.triton_attention(" in rec.graphs["forward"]
    assert rel(out, ref_out) < 1e-5
    for name in grads:
        assert rel(grads[name], ref_grads[name]) < 1e-4, name


def test_attention_written_out_stays_when_it_cannot_be_one_op():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 32)
    # the weights are used twice (returned too)
    torch._dynamo.reset()
    model = _TimmAttention(weights=True).to(DEVICE)
    torch.compile(model, backend="shiftquant", options={**_OPTIONS, "fused_attention": True})(x.to(DEVICE))
    assert [r[0] for r in _attention_rows(records_for(list(model.parameters()))[-1])] == ["matmul", "matmul"]
    # matmuls treated unlike attention by an override
    torch._dynamo.reset()
    model = _TimmAttention().to(DEVICE)
    torch.compile(model, backend="shiftquant", options={**_OPTIONS, "fused_attention": True,
                                                        "overrides": {"*:matmul": {"act_bits": 8}}})(x.to(DEVICE))
    assert [r[0] for r in _attention_rows(records_for(list(model.parameters()))[-1])] == ["matmul", "matmul"]


def _forward_record(model, x, **options):
    """The compile record of ``model``'s forward alone (the decisions are taken there)."""
    torch._dynamo.reset()
    model = copy.deepcopy(model).to(DEVICE)
    with torch.no_grad():
        torch.compile(model, backend="shiftquant", options={**_OPTIONS, **options})(x.to(DEVICE))
    return records_for(list(model.parameters()))[-1]


def test_outer_gradient_scale_runs_fused():
    """``grad_outer_scale=True``: the fused kernels take the outer scales too (the report says
    ``outer scale``), and a compiled training step with them matches the unfused ops'
    (stochastic rounding, the same seeds) up to float rounding; with a packed ``qkv``
    projection the attention gradient is still written in place."""
    torch.manual_seed(0)
    block, x = Block(sdpa=True), torch.randn(2, 16, 32)
    out, grads, rec, compiled = _compiled_step(block, x, fused_attention=True, grad_outer_scale=True)
    ref_out, ref_grads, ref_rec, _ = _compiled_step(block, x, fused_attention=False, grad_outer_scale=True)
    assert "sqcompile.triton_attention_backward(" in rec.graphs["backward"]
    assert "triton_attention" not in ref_rec.graphs["backward"]
    (sdpa,) = [d for d in rec.decisions if d.op == "scaled_dot_product_attention"]
    assert sdpa.region == FUSED_ATTENTION and sdpa.grad_quantizer.endswith(", outer scale")
    assert rel(out, ref_out) < 1e-5
    for name in grads:
        assert rel(grads[name], ref_grads[name]) < 1e-4, name
    model, x = _FusedProjection("split"), torch.randn(2, 16, 32)
    _, grads, rec, _ = _compiled_step(model, x, fused_attention=True, grad_outer_scale=True)
    _, ref_grads, _, _ = _compiled_step(model, x, fused_attention=False, grad_outer_scale=True)
    assert "sqcompile.triton_attention_backward_packed(" in rec.graphs["backward_fused"]
    for name in grads:
        assert rel(grads[name], ref_grads[name]) < 1e-4, name


def test_option_defaults_and_errors():
    torch.manual_seed(0)
    block, x = Block(sdpa=True), torch.randn(2, 8, 32)
    rec = _forward_record(block, x)                        # None: fused on CUDA only
    (sdpa,) = [d for d in rec.decisions if d.op == "scaled_dot_product_attention"]
    assert (sdpa.region == FUSED_ATTENTION) == (DEVICE == "cuda")
    rec = _forward_record(block, x, collect_stats=True, fused_attention=True)
    (sdpa,) = [d for d in rec.decisions if d.op == "scaled_dot_product_attention"]
    assert sdpa.note.startswith("unfused attention: collect_stats")
    with pytest.raises(ValueError, match="fused_attention"):
        sqcompile.Config(fused_attention="yes")
    with pytest.raises(ValueError, match="fused_attention"):
        sqcompile.Config(kernels="torch", fused_attention=True)
    with pytest.raises(ValueError, match="fused_attention"):
        sqcompile.Config(overrides={"attn": {"kernels": "torch", "fused_attention": True}})


# ---------------------------------------------------------------------------------------------
# Hopper: the GPU tiles compile without spills (ptxas, no GPU needed)
# ---------------------------------------------------------------------------------------------

_HOPPER_SCRIPT = r"""
import json, sm90
from sqcompile.kernels import triton_attention as ta

jobs = []
for d in (64, 128):
    for name, (kernel, signature, constexprs) in sm90.attention_kernels().items():
        for i, t in enumerate(ta.GPU_TILES[name][d > 64]):
            # causal (a decoder), and for the first choice also with a boolean padding mask
            for causal, masked in ((True, 0), (False, 1))[:2 if i == 0 else 1]:
                key = f"{name} d={d} {t.block_m}x{t.block_n}/{t.num_warps}w/{t.num_stages}s{' mask' * masked}"
                consts = dict(constexprs, CAUSAL=causal, MASK=masked, BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=d)
                if "RANGES" in consts:      # a fused projection's gradient ranges and bias sums: up to d 64
                    consts["RANGES"] = consts["SUMS"] = d <= 64
                    if consts["OUTER"]:     # (with grad_outer_scale its quantizers take no ranges)
                        consts["RANGES"] = False
                jobs.append((key, kernel, signature, consts, t))
            if i == 0 and name in ("ranges", "dq"):      # with grad_outer_scale, on their own tiles
                consts = dict(constexprs, CAUSAL=True, MASK=0, BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=d,
                              OUTER=2 if name == "ranges" else True)
                if "RANGES" in consts:
                    consts["RANGES"], consts["SUMS"] = False, d <= 64
                key = f"{name} d={d} {t.block_m}x{t.block_n}/{t.num_warps}w/{t.num_stages}s outer"
                jobs.append((key, kernel, signature, consts, t))


def compile_one(job):
    key, kernel, signature, consts, t = job
    r = sm90.compile_sm90(kernel, signature, consts, num_warps=t.num_warps, num_stages=t.num_stages)
    return key, (r["spilled"], r["ptx"].count("mma.sync"), r["shared"])


print(json.dumps(dict(sm90.parallel(compile_one, jobs))))
"""


@pytest.mark.slow
def test_gpu_tiles_compile_for_hopper_to_warpgroup_mma_without_spills():
    """What a real launch compiles for sm_90, for every autotuning candidate (``GPU_TILES``):
    every ``tl.dot`` a warpgroup MMA (no ``mma.sync``: 32-row tiles fall back to it) and no
    register spills, but in the head-dim-128 ``dK``/``dV`` kernel, at the register limit: its
    first candidate (the one used without autotuning) at most one register, the other at most
    64 bytes, and its ``grad_outer_scale`` variant (``dkdv_outer``) at most 64 bytes (see
    ``triton_attention.GPU_TILES``); shared memory well within a Hopper SM's 227 KiB."""
    pytest.importorskip("triton.backends.nvidia")
    import sm90
    result = json.loads(sm90.run(_HOPPER_SCRIPT).strip().splitlines()[-1])
    assert len(result) == sum(len(tiles) + 1 + (name in ("ranges", "dq")) for name, pair in _ta().GPU_TILES.items()
                              for tiles in pair), result
    for name, (spilled, legacy_mma, shared) in result.items():
        assert legacy_mma == 0 and shared <= 160 * 1024, (name, result)
        first = _ta().GPU_TILES["dkdv"][1][0]
        allowed = 0 if not name.startswith(("dkdv d=128", "dkdv_outer")) else (
            4 if name.startswith(f"dkdv d=128 {first.block_m}x{first.block_n}/") else 64)
        assert spilled <= allowed, (name, result)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_gpu_packed_gradient_sums_with_autotuned_tiles(monkeypatch):
    """The bias gradient of a packed ``qkv`` gradient with every candidate tile timed by the
    autotuner first (each writes the partial-sum slots its rows cover): float64 sums of the
    packed gradient, to float32 rounding."""
    monkeypatch.setenv("SQCOMPILE_AUTOTUNE", "1")
    ta = _ta()
    g = torch.Generator().manual_seed(12)
    B, H, L, D = 2, 8, 300, 64
    qkv = torch.randn(B, L, 3, H, D, generator=g).cuda().bfloat16()
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    do = torch.randn(B, L, H, D, generator=g).cuda().bfloat16().transpose(1, 2)
    out, *saved = ta.attention_forward(q, k, v, None, D ** -0.5, True, 4)
    packed = torch.empty(B, L, 3, H, D, device="cuda", dtype=torch.bfloat16)
    sums = torch.empty(3 * H * D, device="cuda")
    ta.attention_backward(do, *saved, None, D ** -0.5, True, 4, 4, 4, grads=tuple(
        packed[:, :, i].transpose(1, 2) for i in range(3)), grad_sums=sums)
    expected = packed.reshape(B * L, -1).double().sum(0)
    torch.testing.assert_close(sums.double(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_gpu_fused_equals_unfused_at_a_real_shape():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 8, 300, 64, generator=g).cuda().bfloat16() for _ in range(3))
    fused = _sdpa(q, k, v, True, 5, is_causal=True)
    unfused = _sdpa(q, k, v, False, 5, is_causal=True)
    for name, a, b in zip(("out", "dq", "dk", "dv"), fused, unfused):
        _assert_matches(a, b, name)
