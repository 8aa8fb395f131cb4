"""Quantized attention's softmax on CPU as one kernel (``sqcompile::attention_probs``,
:mod:`sqcompile.kernels.cpu_attention`) and the pass that puts it in forward graphs
(:mod:`sqcompile.backends.cpu_attention`).

* the AVX-512 kernel against the unfused ops it replaces (``attention_probs_reference``:
  dequantize, scale, causal mask, softmax, ``P``'s per-row quantizer), over shapes whose rows
  are not multiples of the vector width, causal and not, with non-finite scores;
* the backward kernel (``attention_probs_backward``: dequantize ``dP``, softmax backward,
  mask, scale) against the unfused ops, with and without a mask, with one or two scales;
* the ops' schemas and fake implementations (``opcheck``), and their fallback to the reference;
* compiled attention with the pass against ``fusion=False``: the same outputs and gradients,
  under eager and Inductor, with the regions recorded (forward and backward); where the pass
  must leave the graph alone (another mask, stats, attention kept in float, a machine
  without the kernel).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sqcompile import numerics as N
from sqcompile.backends import cpu_attention as pass_module
from sqcompile.backends.cpu_quant import LABEL
from sqcompile.decisions import records_for
from sqcompile.kernels import cpu_attention as CA
from sqcompile.kernels import native

OK, WHY = CA.status()
needs_kernel = pytest.mark.skipif(not OK, reason=f"the CPU attention kernel cannot run here: {WHY}")


def test_kernels_build_where_the_cpu_can_run_them():
    """Skipping the kernels' tests is for machines that are not Linux on x86-64 (or an
    ``SQCOMPILE_CPU_SIMD=avx512`` on a CPU without it), not for kernels that fail to build or load."""
    if native.status(native.simd_build()[2], lambda: None)[0]:
        assert OK, WHY


def _inputs(shape, seed, spread=3000, scale=0.01):
    g = torch.Generator().manual_seed(seed)
    *lead, L, S = shape
    acc = torch.randint(-spread, spread + 1, shape, dtype=torch.int32, generator=g)
    sa = torch.rand(*lead, L, 1, generator=g) * scale
    sb = torch.rand(*lead, 1, S, generator=g) * scale
    return acc, sa, sb


def _assert_matches_reference(got, ref, bits):
    """P, its maxima and scales within 8 ulps (the exp of each and the order of the row sum
    differ); q equal but where P sat that close to a rounding boundary (then one step apart,
    at most one value in 10**4)."""
    p, q, q_scale, amax = got
    rp, rq, rs, ra = ref
    for a, b in ((p, rp), (q_scale, rs), (amax, ra)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-30, equal_nan=True)
    differ = q != rq
    assert int(differ.sum()) <= max(1, q.numel() // 10_000)
    assert (q.int() - rq.int())[differ].abs().max().item() <= 1 if differ.any() else True
    assert q.abs().max() <= N.qmax(bits)


@needs_kernel
@pytest.mark.parametrize("shape, causal", [((3, 17, 19), True), ((2, 5, 40), False), ((2, 3, 40, 33), True),
                                           ((1, 33, 7), True), ((4, 1, 1), False), ((2, 64, 256), True)])
@pytest.mark.parametrize("bits", [5, 8])
def test_kernel_matches_the_unfused_ops(shape, causal, bits):
    acc, sa, sb = _inputs(shape, seed=sum(shape) + bits)
    got = CA.attention_probs(acc, sa, sb, 0.125, causal, bits)
    ref = CA.attention_probs_reference(acc, sa, sb, 0.125, causal, bits)
    _assert_matches_reference(got, ref, bits)
    assert [t.shape for t in got] == [t.shape for t in ref]
    assert [t.dtype for t in got] == [t.dtype for t in ref]
    if causal:     # the masked keys: probability 0, quantized 0
        L, S = shape[-2:]
        hidden = ~torch.ones(L, S, dtype=torch.bool).tril()
        assert not got[0][..., hidden].any() and not got[1][..., hidden].any()


@needs_kernel
@settings(max_examples=40, deadline=None)
@given(L=st.integers(1, 40), S=st.integers(1, 70), causal=st.booleans(), bits=st.integers(2, 8),
       scale=st.floats(1e-6, 4.0), spread=st.integers(0, 30000), seed=st.integers(0, 2 ** 16))
def test_kernel_matches_the_unfused_ops_on_random_rows(L, S, causal, bits, scale, spread, seed):
    """Rows of any length (the 16-lane tails), scores from flat (all equal) to peaked."""
    acc, sa, sb = _inputs((2, L, S), seed, spread=spread)
    _assert_matches_reference(CA.attention_probs(acc, sa, sb, scale, causal, bits),
                              CA.attention_probs_reference(acc, sa, sb, scale, causal, bits), bits)


@needs_kernel
def test_rows_with_non_finite_scores_are_nan_as_unfused():
    """A NaN row scale, and an infinite column scale (overflowing scores): the unfused softmax
    gives a row with a NaN or a +inf score P NaN throughout, q 0, NaN scale and maximum; a
    -inf score is a masked one (probability 0)."""
    acc, sa, sb = _inputs((2, 4, 20), seed=3)
    sa[0, 1] = float("nan")
    sb[1, 0, 3] = float("inf")
    acc[1, 2:, 3] = torch.tensor([1, -1], dtype=torch.int32)     # key 3: +inf in row 2, -inf in row 3
    acc[1, :2, 3] = 0          # 0 * inf = NaN in rows 0 and 1 (causal: key 3 is masked there)
    got = CA.attention_probs(acc, sa, sb, 0.5, False, 5)
    ref = CA.attention_probs_reference(acc, sa, sb, 0.5, False, 5)
    _assert_matches_reference(got, ref, 5)
    nan_rows = got[0].isnan().all(-1)
    assert nan_rows.tolist() == [[False, True, False, False], [True, True, True, False]]
    assert not got[0].isnan().any(-1)[~nan_rows].any()
    assert not got[1][nan_rows].any() and got[2][nan_rows].isnan().all() and got[3][nan_rows].isnan().all()
    assert got[0][1, 3, 3] == 0 and got[1][1, 3, 3] == 0
    causal = CA.attention_probs(acc, sa, sb, 0.5, True, 5)     # only row 3 sees key 3 (-inf)
    _assert_matches_reference(causal, CA.attention_probs_reference(acc, sa, sb, 0.5, True, 5), 5)
    assert causal[0].isnan().all(-1).tolist() == [[False, True, False, False], [False, False, False, False]]


def _backward_inputs(shape, seed, mask_kind):
    acc, sa, sb = _inputs(shape, seed)
    dp, _, _ = _inputs(shape, seed + 1)
    L, S = shape[-2:]
    p = CA.attention_probs_reference(acc, sa, sb, 0.3, mask_kind == "causal", 5)[0]
    mask = {"causal": ~torch.ones(L, S, dtype=torch.bool).tril(), "none": None,
            "random": torch.rand(L, S, generator=torch.Generator().manual_seed(seed)) > 0.6}[mask_kind]
    return dp, sa, sb, p, mask


@needs_kernel
@pytest.mark.parametrize("shape", [(3, 17, 19), (2, 3, 20, 33), (2, 64, 256), (1, 1, 1)])
@pytest.mark.parametrize("mask_kind", ["causal", "none", "random"])
@pytest.mark.parametrize("scales", ["both", "rows", "columns"])
def test_backward_kernel_matches_the_unfused_ops(shape, mask_kind, scales):
    """``dS`` within a few ulps of the unfused ops' (the row sum's order differs) relative to
    the row's largest term; exactly 0 where masked."""
    dp, sa, sb, p, mask = _backward_inputs(shape, sum(shape), mask_kind)
    sa, sb = (sa, sb) if scales == "both" else (sa, None) if scales == "rows" else (None, sb)
    got = CA.attention_probs_backward(dp, sa, sb, p, mask, 0.3)
    ref = CA.attention_probs_backward_reference(dp, sa, sb, p, mask, 0.3)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    g = dp.float() * (1.0 if sa is None else sa) * (1.0 if sb is None else sb)
    bound = 1e-6 * ((g * p).abs().sum(-1, keepdim=True) * p).amax(-1, keepdim=True) * 0.3
    assert ((got - ref).abs() <= bound + 1e-6 * ref.abs()).all()
    if mask is not None:
        assert not got[..., mask].any()


def test_ops_schema_and_fake_implementation():
    acc, sa, sb = _inputs((2, 6, 9), seed=1)
    torch.library.opcheck(torch.ops.sqcompile.attention_probs.default, (acc, sa, sb, 0.25, True, 5),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    dp, sa, sb, p, mask = _backward_inputs((2, 6, 9), 3, "causal")
    for args in ((dp, sa, sb, p, mask, 0.25), (dp, sa, None, p, None, 0.5)):
        torch.library.opcheck(torch.ops.sqcompile.attention_probs_backward.default, args,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_ops_run_the_reference_where_the_kernel_cannot(monkeypatch):
    monkeypatch.setattr(CA, "status", lambda: (False, "no AVX-512 here"))
    acc, sa, sb = _inputs((2, 6, 9), seed=2)
    got = torch.ops.sqcompile.attention_probs(acc, sa, sb, 0.25, True, 5)
    ref = CA.attention_probs_reference(acc, sa, sb, 0.25, True, 5)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    dp, sa, sb, p, mask = _backward_inputs((2, 6, 9), 4, "causal")
    assert torch.equal(torch.ops.sqcompile.attention_probs_backward(dp, sa, sb, p, mask, 0.25),
                       CA.attention_probs_backward_reference(dp, sa, sb, p, mask, 0.25))


# ---------------------------------------------------------------------------------------------
# The lowering pass
# ---------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Self-attention over ``[B, T, 64]`` in 2 heads of 32; ``mask``: None, "causal" or a
    boolean ``[T, T]`` tensor."""

    def __init__(self, mask="causal"):
        super().__init__()
        self.qkv, self.proj, self.mask = nn.Linear(64, 192), nn.Linear(64, 64), mask

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, 2, D // 2).permute(2, 0, 3, 1, 4)
        mask = self.mask if isinstance(self.mask, torch.Tensor) else None
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.mask == "causal")
        return self.proj(a.transpose(1, 2).reshape(B, T, D))


def _step(model, x, options):
    torch._dynamo.reset()
    model = copy.deepcopy(model)
    compiled = torch.compile(model, backend="shiftquant", options=options)
    torch.manual_seed(1)               # the same stochastic-rounding seeds in both runs
    out = compiled(x)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, \
        records_for(list(model.parameters()))[-1]


def _labels(record):
    """The attention regions (not the gradient quantizers', :mod:`sqcompile.backends.cpu_quant`)."""
    return [r.label for r in record.regions if r.label != LABEL]


@needs_kernel
@pytest.mark.parametrize("inner", ["eager", "inductor"])
@pytest.mark.parametrize("mask", ["causal", None])
def test_compiled_attention_takes_the_kernel_and_trains_as_unfused(inner, mask):
    torch.manual_seed(0)
    model, x = Attention(mask), torch.randn(2, 37, 64)
    out, grads, rec = _step(model, x, {"inner": inner})
    ref_out, ref_grads, ref_rec = _step(model, x, {"inner": inner, "fusion": False})
    labels = [f"dequant+scale{'+causal' if mask else ''}+softmax+quantize",
              f"dequant+softmax_backward{'+mask' if mask else ''}+scale"]
    assert _labels(rec) == labels and not _labels(ref_rec)
    # under Inductor, dS (and every GEMM output's gradient) goes to the gradient quantizer kernel
    assert ("sqcompile.shiftquant_outer_pair(" in rec.graphs["backward_fused"]) == (inner == "inductor")
    forward, backward = rec.regions[:2]
    assert (forward.stage, backward.stage) == ("forward", "backward")
    assert (forward.kernel, backward.kernel) == (pass_module.KERNEL, pass_module.BACKWARD_KERNEL)
    assert forward.decision is not None and backward.decision == forward.decision
    assert "sqcompile.attention_probs(" in rec.graphs["forward_fused"]
    assert "aten._softmax(" not in rec.graphs["forward_fused"]
    assert "sqcompile.attention_probs_backward(" in rec.graphs["backward_fused"]
    assert "aten._softmax_backward_data(" not in rec.graphs["backward_fused"]
    # P differs from the unfused softmax by ulps (exp), which reach the outputs and gradients
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6)


@needs_kernel
def test_inference_graph_takes_the_kernel():
    torch.manual_seed(0)
    model, x = Attention(), torch.randn(2, 20, 64)
    compiled = torch.compile(copy.deepcopy(model), backend="shiftquant")
    with torch.no_grad():
        out = compiled(x)
    rec = records_for(list(compiled.parameters()))[-1]
    assert _labels(rec) == ["dequant+scale+causal+softmax+quantize"] and rec.regions[0].stage == "inference"
    torch._dynamo.reset()
    ref = torch.compile(copy.deepcopy(model), backend="shiftquant", options={"fusion": False})
    with torch.no_grad():
        torch.testing.assert_close(out, ref(x), rtol=1e-5, atol=1e-6)


@needs_kernel
def test_dynamic_shapes_take_the_kernel():
    torch.manual_seed(0)
    model = Attention()
    compiled = torch.compile(copy.deepcopy(model), backend="shiftquant", dynamic=True)
    for T in (17, 29):
        x = torch.randn(2, T, 64)
        compiled(x).square().mean().backward()
    rec = records_for(list(compiled.parameters()))[-1]
    assert "sqcompile.attention_probs(" in rec.graphs["forward_fused"]


@pytest.mark.parametrize("case", ["stats", "attention float", "fusion off", "no kernel"])
def test_graph_left_alone(case, monkeypatch):
    """Per-op statistics (the observed ``P`` quantizer is not the one the kernel replaces: no
    forward region; the softmax backward still fuses), attention kept in float, the
    ``fusion`` option off, or a machine where the kernels cannot run: no region, no op."""
    torch.manual_seed(0)
    options = {"collect_stats": True} if case == "stats" else \
        {"overrides": {"*:scaled_dot_product_attention": None}} if case == "attention float" else \
        {"fusion": False} if case == "fusion off" else {}
    if case == "no kernel":
        monkeypatch.setattr(CA, "status", lambda: (False, "no AVX-512 here"))
    _, _, rec = _step(Attention(), torch.randn(2, 12, 64), options)
    if case == "stats":
        assert _labels(rec) == (["dequant+softmax_backward+mask+scale"] if OK else [])
        assert "sqcompile.attention_probs(" not in rec.graphs.get("forward_fused", "")
        return
    assert not _labels(rec)
    assert "sqcompile.attention_probs" not in rec.graphs.get("forward_fused", "") + rec.graphs.get("backward_fused", "")


@needs_kernel
def test_a_boolean_mask_fuses_only_the_backward():
    """A user's boolean mask: the forward's masked softmax stays as it is (the kernel knows the
    causal mask only); its backward is the same softmax backward, masked by that tensor."""
    torch.manual_seed(0)
    T = 12
    model, x = Attention(torch.rand(T, T) > 0.3), torch.randn(2, T, 64)
    out, grads, rec = _step(model, x, {})
    ref_out, ref_grads, _ = _step(model, x, {"fusion": False})
    assert _labels(rec) == ["dequant+softmax_backward+mask+scale"]
    assert torch.equal(out, ref_out)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6)
