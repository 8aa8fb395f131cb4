"""The CPU quantizer kernels (:mod:`sqcompile.kernels.cpu_quant`) and the passes that put
them in the graphs (:mod:`sqcompile.backends.cpu_quant`): a GEMM output's gradient quantized
for both backward GEMMs (``sqcompile::shiftquant_outer_pair``), a Linear's GELU with the
next GEMM's input quantizer (``sqcompile::gelu_quantize``, ``sqcompile::gelu_shiftquant``), and
that GELU's backward (``sqcompile::gelu_backward``).

* the kernel bit for bit against the graph's composition of the two outer-scaled
  ShiftQuants as lowered for Inductor (``hash_noise`` with the same seeds), over shapes and
  magnitudes (hypothesis), at several thread counts (the row chunks of the column maxima),
  with zero, NaN and infinite gradients;
* the op's schema and fake implementation (``opcheck``), its fallback to the reference;
* compiled models with the pass against ``fusion=False``: the same outputs and gradients
  bit for bit (a Linear-GELU-Linear block, a conv net, dynamic shapes; the biases' sums to
  rounding), the regions recorded on the GEMMs' decisions; where the pass must leave the
  graph alone;
* ``gelu_quantize`` against the unfused ops (dequantize, bias, ``F.gelu``, ``numerics.quantize``):
  the pre-activation bit for bit, the quantized GELU equal but at rounding boundaries, over
  shapes (hypothesis), without a bias, with non-finite rows; compiled MLPs with its pass
  against ``fusion=False``, and where it must not apply (``tanh`` GELU, the GELU read by
  something else);
* ``gelu_shiftquant`` (``act_groups``) against the composition: bit for bit where the GELU is
  exact in both (``|pre| >= 7.8``), at two thread counts, with non-finite values; within the
  GELU's ulps elsewhere (hypothesis); compiled MLPs (a Linear's, a batched GEMM's per-entry
  channels) against ``fusion=False``, and the layout it does not take.
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
from sqcompile.backends import cpu_quant as pass_module
from sqcompile.decisions import records_for
from sqcompile.kernels import cpu_quant as CQ
from sqcompile.kernels import native

from models import Block

OK, WHY = CQ.status()
needs_kernel = pytest.mark.skipif(not OK, reason=f"the CPU quantizer kernels cannot run here: {WHY}")


def test_kernel_builds_where_the_cpu_can_run_it():
    """Skipping the kernel's tests is for machines that are not Linux on x86-64 (or an
    ``SQCOMPILE_CPU_SIMD=avx512`` on a CPU without it), not for a kernel that fails to build or load."""
    if native.status(native.simd_build()[2], lambda: None)[0]:
        assert OK, WHY


def _inputs(shape, seed, spread=50.0):
    g = torch.Generator().manual_seed(seed)
    *lead, L, S = shape
    dy = torch.randn(shape, generator=g) * 1e-3
    dy[..., ::3] *= spread                             # channels of several magnitudes: all groups
    pk = torch.rand(*lead, 1, S, generator=g)
    pq = torch.rand(*lead, L, 1, generator=g)
    return dy, pk, pq


def _assert_bitwise(got, ref):
    assert len(got) == len(ref) == 6
    for a, b in zip(got, ref):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.equal(a, b) or torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


@needs_kernel
@pytest.mark.parametrize("shape", [(3, 17, 19), (2, 3, 7, 33), (2, 64, 256), (1, 1, 1), (40, 24), (1, 300, 48)])
@pytest.mark.parametrize("bits, groups", [(4, 4), (8, 1), (5, 3)])
def test_kernel_matches_the_graphs_composition_bit_for_bit(shape, bits, groups):
    dy, pk, pq = _inputs(shape, sum(shape) + bits)
    seeds = (torch.tensor(12345), torch.tensor(2 ** 31 - 2))
    got = CQ.shiftquant_outer_pair(dy, pk, pq, bits, groups, seeds)
    _assert_bitwise(got, CQ.shiftquant_outer_pair_reference(dy, pk, pq, bits, groups, seeds))
    swapped = CQ.shiftquant_outer_pair(dy, pk, pq, bits, groups, (seeds[1], seeds[0]))
    assert not torch.equal(got[0], swapped[0]) or dy.numel() < 9     # the seeds reach the noise


@needs_kernel
@settings(max_examples=30, deadline=None)
@given(lead=st.sampled_from([(), (1,), (3,), (2, 2)]), L=st.integers(1, 90), S=st.integers(1, 70),
       bits=st.integers(2, 8), spread=st.sampled_from([1.0, 1e3, 1e-20]), threads=st.integers(1, 3),
       seed=st.integers(0, 2 ** 16))
def test_kernel_matches_the_reference_on_random_shapes(lead, L, S, bits, spread, threads, seed):
    """Tails of the 16-lane vectors, one or several batch entries, magnitudes down to
    subnormal products, and 1-3 threads (the column maxima's row chunks)."""
    dy, pk, pq = _inputs((*lead, L, S), seed, spread)
    dy *= spread
    seeds = (torch.tensor(seed), torch.tensor(seed + 1))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = CQ.shiftquant_outer_pair(dy, pk, pq, bits, 4 if bits <= 5 else 1, seeds)
    finally:
        torch.set_num_threads(before)
    _assert_bitwise(got, CQ.shiftquant_outer_pair_reference(dy, pk, pq, bits, 4 if bits <= 5 else 1, seeds))


@needs_kernel
def test_magnitudes_over_the_whole_float_range_bit_for_bit():
    """Gradients from 2^-140 (subnormal) to 2^120 in one tensor, large enough that every
    rounding path of the divisions and the noise is taken many times."""
    g = torch.Generator().manual_seed(11)
    dy = torch.randn(3, 160, 96, generator=g) * torch.exp2(torch.randint(-140, 120, (3, 160, 96), generator=g).float())
    pk = torch.rand(3, 1, 96, generator=g) * 2
    pq = torch.rand(3, 160, 1, generator=g) * 2
    for bits, groups in ((4, 4), (8, 1)):
        seeds = (torch.tensor(bits), torch.tensor(-bits))
        _assert_bitwise(CQ.shiftquant_outer_pair(dy, pk, pq, bits, groups, seeds),
                        CQ.shiftquant_outer_pair_reference(dy, pk, pq, bits, groups, seeds))


@needs_kernel
def test_thread_counts_give_the_same_bits():
    """One batch entry of many rows: its column maxima are reduced over row chunks, as many as
    the threads need; any split gives the same maxima."""
    dy, pk, pq = _inputs((1, 517, 80), 3)
    seeds = (torch.tensor(1), torch.tensor(2))
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(CQ.shiftquant_outer_pair(dy, pk, pq, 4, 4, seeds))
    finally:
        torch.set_num_threads(before)
    assert CQ._chunks(1, 517, 3) == 6 and CQ._chunks(128, 256, 2) == 1
    for other in results[1:]:
        _assert_bitwise(other, results[0])


@needs_kernel
def test_zero_nan_and_infinite_gradients():
    """A zero row and column (outer maximum 0, taken as 1), a NaN and an infinity: what the
    graph's composition gives, bit for bit (NaN bases, zero integers where it has them)."""
    dy, pk, pq = _inputs((2, 9, 21), 7)
    dy[0, 2] = 0.0
    dy[1, :, 4] = 0.0
    dy[0, 5, 6] = float("nan")
    dy[1, 3, 2] = float("inf")
    seeds = (torch.tensor(5), torch.tensor(6))
    got = CQ.shiftquant_outer_pair(dy, pk, pq, 4, 4, seeds)
    _assert_bitwise(got, CQ.shiftquant_outer_pair_reference(dy, pk, pq, 4, 4, seeds))
    e_cols, base_cols, outer_cols, e_rows, base_rows, outer_rows = got
    assert base_cols.isnan() and base_rows.isnan()          # the NaN reaches every range's maximum
    assert outer_cols[0, 2, 0] == 1.0 and outer_rows[1, 0, 4] == 1.0      # the zero row and column


def _conv_inputs(shape, seed, spread=50.0):
    """A convolution's output gradient ``[N, C, *S]`` with samples and channels of several
    magnitudes, the input's scale per sample (``dW``'s prescale) and the weight's per output
    channel (``dX``'s)."""
    g = torch.Generator().manual_seed(seed)
    ones = [1] * (len(shape) - 2)
    dy = torch.randn(shape, generator=g) * 1e-3
    dy[:, ::3] *= spread
    dy[::2] *= 0.01
    return dy, torch.rand(shape[0], 1, *ones, generator=g), torch.rand(1, shape[1], *ones, generator=g)


@needs_kernel
@pytest.mark.parametrize("shape", [(2, 16, 6, 6), (3, 40, 7, 9), (4, 64, 8, 8), (2, 5, 13), (2, 8, 3, 4, 5),
                                   (1, 1, 1, 1), (5, 3, 1, 17)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_conv_gradient_pair_matches_the_graphs_composition_bit_for_bit(shape, threads):
    """``conv=True``: a convolution's ``dW`` quantization (channels: sample and position, one
    outer maximum per output channel over the batch) and ``dX``'s (channels: sample and output
    channel, one per sample), 1-3 threads (the row chunks of the first pass's maxima)."""
    dy, pk, pq = _conv_inputs(shape, sum(shape))
    seeds = (torch.tensor(777), torch.tensor(-5))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = CQ.shiftquant_outer_pair(dy, pk, pq, 4, 4, seeds, conv=True)
    finally:
        torch.set_num_threads(before)
    ref = CQ.shiftquant_outer_pair_reference(dy, pk, pq, 4, 4, seeds, conv=True)
    _assert_bitwise(got, ref)
    assert got[2].shape == (1, shape[1], *[1] * (len(shape) - 2))      # dW's outer maxima: per output channel
    assert got[5].shape == (shape[0], *[1] * (len(shape) - 1))         # dX's: per sample
    if dy.numel() > 1:     # not the GEMM's pair: its outer maxima are per row and per column
        assert not torch.equal(got[0], CQ.shiftquant_outer_pair(dy.reshape(*shape[:2], -1), pk.reshape(-1, 1, 1),
                                                                pq.reshape(1, -1, 1), 4, 4, seeds)[0].view(shape))


@needs_kernel
@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 5), c=st.integers(1, 40), spatial=st.lists(st.integers(1, 12), min_size=1, max_size=3),
       bits=st.integers(2, 8), spread=st.sampled_from([1.0, 1e3, 1e-20]), seed=st.integers(0, 2 ** 16))
def test_conv_gradient_pair_matches_the_reference_on_random_shapes(n, c, spatial, bits, spread, seed):
    """1-3 spatial dims, rows (positions) not whole vectors, one sample or one channel,
    magnitudes down to subnormal products, 2-8 bits."""
    dy, pk, pq = _conv_inputs((n, c, *spatial), seed, spread)
    dy *= spread
    seeds = (torch.tensor(seed), torch.tensor(seed + 1))
    groups = 4 if bits <= 5 else 1
    _assert_bitwise(CQ.shiftquant_outer_pair(dy, pk, pq, bits, groups, seeds, conv=True),
                    CQ.shiftquant_outer_pair_reference(dy, pk, pq, bits, groups, seeds, conv=True))


@needs_kernel
def test_conv_gradient_pair_with_zero_nan_and_infinite_gradients():
    """A zero sample and a zero output channel (their outer maxima 0, taken as 1), a NaN, an
    infinity; at 8 bits too."""
    dy, pk, pq = _conv_inputs((3, 12, 5, 7), 9)
    dy[1] = 0.0
    dy[:, 4] = 0.0
    for bits, groups in ((4, 4), (8, 1)):
        seeds = (torch.tensor(bits), torch.tensor(3))
        got = CQ.shiftquant_outer_pair(dy, pk, pq, bits, groups, seeds, conv=True)
        _assert_bitwise(got, CQ.shiftquant_outer_pair_reference(dy, pk, pq, bits, groups, seeds, conv=True))
        assert got[2][0, 4, 0, 0] == 1.0 and got[5][1, 0, 0, 0] == 1.0
    dy[0, 2, 1, 1], dy[2, 7, 0, 3] = float("nan"), float("inf")
    seeds = (torch.tensor(1), torch.tensor(2))
    _assert_bitwise(CQ.shiftquant_outer_pair(dy, pk, pq, 4, 4, seeds, conv=True),
                    CQ.shiftquant_outer_pair_reference(dy, pk, pq, 4, 4, seeds, conv=True))


def test_op_schema_and_fake_implementation():
    dy, pk, pq = _inputs((2, 6, 9), 5)
    torch.library.opcheck(torch.ops.sqcompile.shiftquant_outer_pair.default,
                          (dy, pk, pq, torch.tensor(3), torch.tensor(4), 4, 4),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    dy, pk, pq = _conv_inputs((2, 6, 5, 3), 5)
    torch.library.opcheck(torch.ops.sqcompile.shiftquant_outer_pair.default,
                          (dy, pk, pq, torch.tensor(3), torch.tensor(4), 4, 4, True),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_op_runs_the_reference_where_the_kernel_cannot(monkeypatch):
    monkeypatch.setattr(CQ, "status", lambda: (False, "no AVX-512 here"))
    dy, pk, pq = _inputs((2, 6, 9), 6)
    seeds = (torch.tensor(7), torch.tensor(8))
    got = torch.ops.sqcompile.shiftquant_outer_pair(dy, pk, pq, *seeds, 4, 4)
    _assert_bitwise(got, CQ.shiftquant_outer_pair_reference(dy, pk, pq, 4, 4, seeds))


# ---------------------------------------------------------------------------------------------
# The lowering pass
# ---------------------------------------------------------------------------------------------

class MLP(nn.Module):
    """A transformer's feed-forward block with its residual: Linear, GELU, Linear."""

    def __init__(self, d=48, hidden=96, bias=True):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, hidden, bias=bias), nn.Linear(hidden, d, bias=bias)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(x)))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def _step(model, x, options, dynamic=None):
    torch._dynamo.reset()
    model = copy.deepcopy(model)
    compiled = torch.compile(model, backend="shiftquant", options=options, dynamic=dynamic)
    x = x.clone().requires_grad_()     # every GEMM's dX is computed: dY quantized both ways
    torch.manual_seed(1)               # the same stochastic-rounding seeds in both runs
    out = compiled(x)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return out.detach(), dict(grads, input=x.grad), records_for(list(model.parameters()))[-1]


def _regions(record):
    return [r for r in record.regions if r.label == pass_module.LABEL]


@pytest.fixture
def no_gelu_kernel(monkeypatch):
    """The GELU kernels off (their ``erf`` differs from Inductor's by ulps), so that a step with
    the gradient quantizer kernel can be compared bit for bit with ``fusion=False``."""
    from sqcompile.backends import lowering
    monkeypatch.setattr(lowering, "fuse_gelu_quantizers", lambda gm, *args: gm)
    monkeypatch.setattr(lowering, "fuse_gelu_backwards", lambda gm, *args: gm)


def _assert_same_training(model, x, options=None, dynamic=None):
    """The step with the pass and with ``fusion=False``: equal bit for bit (but the order of
    the biases' sums); the record."""
    options = dict(options or {}, inner="inductor")
    out, grads, rec = _step(model, x, options, dynamic)
    ref_out, ref_grads, ref_rec = _step(model, x, dict(options, fusion=False), dynamic)
    assert not _regions(ref_rec)
    assert torch.equal(out, ref_out)
    for name in grads:
        if name.endswith("bias"):       # a sum over dY, which Inductor may order another way
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-6, atol=1e-9)   # once dY is written
        else:
            assert torch.equal(grads[name], ref_grads[name]), name
    return rec


@needs_kernel
def test_mlp_trains_bit_for_bit_as_unfused_with_a_region_per_gemm(no_gelu_kernel):
    torch.manual_seed(0)
    rec = _assert_same_training(MLP(), torch.randn(2, 37, 48))
    regions = _regions(rec)
    assert len(regions) == 2                                  # fc2's dY, fc1's (after GELU's backward)
    assert {r.stage for r in regions} == {"backward"} and {r.kernel for r in regions} == {pass_module.KERNEL}
    assert {r.module_path for r in regions} == {"fc1", "fc2"}
    decided = {d.node: d for d in rec.decisions}
    for r in regions:
        assert r.decision in decided and decided[r.decision].module_path == r.module_path
        assert pass_module.LABEL in decided[r.decision].region
    graph = rec.graphs["backward_fused"]
    assert graph.count("sqcompile.shiftquant_outer_pair(") == 2 and "sqcompile.shiftquant(" not in graph


@needs_kernel
def test_transformer_block_trains_bit_for_bit_with_and_without_the_kernel(no_gelu_kernel, monkeypatch):
    """A pre-norm block (L1 norms, causal SDPA with the attention kernels, GELU MLP): the
    gradients of qkv, proj, fc1, fc2, ``dS`` and the attention's output quantized in pairs,
    every other fusion the same in both runs: the pair kernel changes no bit, and its seeds
    are drawn in the graph's order of random ops."""
    from sqcompile.backends import lowering
    torch.manual_seed(0)
    model, x = Block(d=32, heads=2, sdpa=True), torch.randn(2, 19, 32)
    out, grads, rec = _step(model, x, {"inner": "inductor"})
    assert len(_regions(rec)) >= 5
    monkeypatch.setattr(lowering, "fuse_gradient_quantizers", lambda gm, *args: gm)
    ref_out, ref_grads, ref_rec = _step(model, x, {"inner": "inductor"})
    assert not _regions(ref_rec)
    assert torch.equal(out, ref_out)
    for name in grads:
        assert torch.equal(grads[name], ref_grads[name]), name


@needs_kernel
def test_conv_net_trains_bit_for_bit_as_unfused():
    """The Linear's ``dY`` and both convolutions' (``conv=True``: a stride-1 conv's gradient
    feeds the implicit GEMMs, the stride-2 one's the im2col GEMMs), each region on its layer's
    decision."""
    torch.manual_seed(0)
    rec = _assert_same_training(ConvNet(), torch.randn(2, 3, 12, 12))
    assert sorted(r.module_path for r in _regions(rec)) == ["conv1", "conv2", "fc"]
    graph = rec.graphs["backward_fused"]
    pairs = [line for line in graph.splitlines() if "= sqcompile.shiftquant_outer_pair(" in line]
    assert len(pairs) == 3 and "sqcompile.shiftquant(" not in graph
    assert sorted(line.endswith(", True)") for line in pairs) == [False, True, True]    # conv=True for the convs


@needs_kernel
def test_dynamic_shapes_train_bit_for_bit_as_unfused(no_gelu_kernel):
    torch.manual_seed(0)
    model = MLP()
    for T in (17, 29):
        rec = _assert_same_training(model, torch.randn(2, T, 48), dynamic=True)
        assert len(_regions(rec)) == 2


@pytest.mark.parametrize("case", ["eager", "no outer scale", "fusion off", "no kernel"])
def test_graph_left_alone(case, monkeypatch):
    """Under ``inner="eager"`` (the quantizers draw their noise another way), without
    ``grad_outer_scale`` (no outer-scaled pair), with ``fusion=False``, or on a machine where
    the kernel cannot run: no region, no op."""
    options = {"inner": "eager"} if case == "eager" else \
        {"inner": "inductor", "grad_outer_scale": False} if case == "no outer scale" else \
        {"inner": "inductor", "fusion": False} if case == "fusion off" else {"inner": "inductor"}
    if case == "no kernel":
        monkeypatch.setattr(CQ, "status", lambda: (False, "no AVX-512 here"))
    torch.manual_seed(0)
    _, grads, rec = _step(MLP(), torch.randn(2, 9, 48), options)
    assert not _regions(rec)
    assert "shiftquant_outer_pair" not in rec.graphs.get("backward_fused", "")
    assert all(g.isfinite().all() for g in grads.values())


# ---------------------------------------------------------------------------------------------
# The GELU kernel
# ---------------------------------------------------------------------------------------------

def _gelu_inputs(shape, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    *lead, M, N = shape
    acc = torch.randint(-3000, 3000, shape, dtype=torch.int32, generator=g)
    sa = torch.rand(*lead, M, 1, generator=g) * 1e-3
    sb = torch.rand(*lead, 1, N, generator=g) * 1e-3
    return acc, sa, sb, (torch.randn(N, generator=g) * 0.5 if bias else None)


def _assert_gelu_close(got, ref, bits):
    pre, q, scale, amax = got
    assert all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(got, ref))
    # the multiplies and the add, as unfused: bit for bit (NaN where the unfused has NaN)
    torch.testing.assert_close(pre, ref[0], rtol=0, atol=0, equal_nan=True)
    # GELU is x (1 + erf(x / sqrt 2)) / 2, and two erfs -- ours (A&S 7.1.26, 1.5e-7 from the
    # exact erf, evaluated in float over our exp) and PyTorch's (the same formula over its exp
    # in vectors, libm's erf in a scalar tail) -- differ by up to ~5.4e-7 (2400 random rows),
    # which for negative x, where 1 + erf cancels, is many ulps of the result.  So the row
    # maximum and the scale may move by 1e-6 |x| (erf within 2e-6) on top of 1e-6 relative;
    # a wrong formula misses by orders of magnitude more.
    row_x = pre.abs().nan_to_num(0, 0, 0).amax(-1, keepdim=True)
    for got_v, ref_v, per in ((amax, ref[3], 1.0), (scale, ref[2], float(N.qmax(bits)))):
        both_nan = got_v.isnan() & ref_v.isnan()
        bound = 1e-6 * ref_v.abs() + 1e-6 * row_x / per
        assert ((got_v - ref_v).abs() <= bound).logical_or(both_nan).all(), (got_v - ref_v).abs().max()
    differ = q != ref[1]
    # a value this close to a rounding boundary moves one step; about 1 in 10^6
    assert (q.int() - ref[1].int()).abs().max() <= 1 and differ.sum() <= max(2, q.numel() // 100000)
    assert q.abs().max() <= N.qmax(bits)


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 300, 97), (2, 7, 33), (3, 5, 16), (1, 1, 1), (40, 2048)])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("bias", [True, False])
def test_gelu_kernel_matches_the_unfused_ops(shape, bits, bias):
    args = _gelu_inputs(shape, sum(shape) + bits, bias)
    _assert_gelu_close(CQ.gelu_quantize(*args, bits), CQ.gelu_quantize_reference(*args, bits), bits)


@needs_kernel
@settings(max_examples=25, deadline=None)
@given(lead=st.sampled_from([(), (1,), (2,)]), M=st.integers(1, 40), N_=st.integers(1, 90), bits=st.integers(2, 8),
       spread=st.sampled_from([1e-6, 1e-3, 1e-1]), seed=st.integers(0, 2 ** 16))
def test_gelu_kernel_on_random_shapes_and_ranges(lead, M, N_, bits, spread, seed):
    """Vector tails, batch entries, pre-activations from ~0 (GELU's linear part) to large
    (its saturated parts, where erf's exp underflows)."""
    acc, sa, sb, bias = _gelu_inputs((*lead, M, N_), seed)
    sa = sa * spread * 1e3
    _assert_gelu_close(CQ.gelu_quantize(acc, sa, sb, bias, bits), CQ.gelu_quantize_reference(acc, sa, sb, bias, bits),
                       bits)


@needs_kernel
def test_gelu_kernel_rows_with_non_finite_values():
    """A NaN and an infinite scale: those rows give q 0 and NaN scales, as numerics.quantize."""
    acc, sa, sb, bias = _gelu_inputs((2, 6, 37), 9)
    sa[0, 2, 0] = float("nan")
    sa[1, 4, 0] = float("inf")
    got, ref = CQ.gelu_quantize(acc, sa, sb, bias, 4), CQ.gelu_quantize_reference(acc, sa, sb, bias, 4)
    _assert_gelu_close(got, ref, 4)
    assert got[2][0, 2].isnan() and got[2][1, 4].isnan() and (got[1][0, 2] == 0).all()


def test_gelu_op_schema_fake_implementation_and_fallback(monkeypatch):
    args = _gelu_inputs((2, 6, 9), 5)
    for a in (args, (*args[:3], None)):
        torch.library.opcheck(torch.ops.sqcompile.gelu_quantize.default, (*a, 4),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    monkeypatch.setattr(CQ, "status", lambda: (False, "no AVX-512 here"))
    for a, b in zip(torch.ops.sqcompile.gelu_quantize(*args, 4), CQ.gelu_quantize_reference(*args, 4)):
        assert torch.equal(a, b)


class GeluUsedTwice(MLP):
    def forward(self, x):
        h = F.gelu(self.fc1(x))
        return x + self.fc2(h) + h[..., :48]


class TanhMLP(MLP):
    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def _assert_within_gelu_ulps(out, grads, ref_out, ref_grads):
    """A step with a GELU kernel against the unfused one: the GELU's ulps reach the outputs
    and gradients, no more."""
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-7)


def _gelu_regions(record):
    return [r for r in record.regions if r.label.endswith("gelu+quantize")]


def _shift_regions(record):
    return [r for r in record.regions if r.label.endswith("gelu+shiftquant")]


@needs_kernel
@pytest.mark.parametrize("inner, bias", [("eager", True), ("inductor", True), ("inductor", False)])
def test_compiled_mlp_takes_the_gelu_kernel_and_trains_as_unfused(inner, bias):
    torch.manual_seed(0)
    model, x = MLP(bias=bias), torch.randn(2, 37, 48)
    out, grads, rec = _step(model, x, {"inner": inner})
    ref_out, ref_grads, ref_rec = _step(model, x, {"inner": inner, "fusion": False})
    (region,) = _gelu_regions(rec)
    assert not _gelu_regions(ref_rec)
    label = "dequant+bias+gelu+quantize" if bias else "dequant+gelu+quantize"
    assert (region.label, region.stage, region.module_path, region.kernel) == \
        (label, "forward", "fc1", pass_module.GELU_KERNEL)
    assert region.decision is not None and "gelu+quantize" in {d.node: d for d in rec.decisions}[region.decision].region
    assert "sqcompile.gelu_quantize(" in rec.graphs["forward_fused"] and "aten.gelu(" not in rec.graphs["forward_fused"]
    _assert_within_gelu_ulps(out, grads, ref_out, ref_grads)


@needs_kernel
@pytest.mark.parametrize("act_groups", [1, 4])
def test_inference_and_dynamic_shapes_take_the_gelu_kernel(act_groups):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, options = MLP(), {"act_groups": act_groups}
    compiled = torch.compile(copy.deepcopy(model), backend="shiftquant", options=options, dynamic=True)
    unfused = torch.compile(copy.deepcopy(model), backend="shiftquant", options={**options, "fusion": False},
                            dynamic=True)
    with torch.no_grad():
        for T in (17, 29):
            x = torch.randn(2, T, 48)
            torch.testing.assert_close(compiled(x), unfused(x), rtol=1e-5, atol=1e-6)
    rec = records_for(list(compiled.parameters()))[-1]
    regions = _gelu_regions(rec) if act_groups == 1 else _shift_regions(rec)
    assert [r.stage for r in regions] == ["inference"]


@needs_kernel
@pytest.mark.parametrize("act_groups", [1, 4])
def test_dynamic_shapes_training_takes_the_gelu_kernel(act_groups):
    """``dynamic=True``: the forward graph reads the GELU output's sizes (``sym_size``); the
    pass computes them from the kernel's outputs and fuses, and training follows the unfused
    graph within the GELU's ulps at each length."""
    torch.manual_seed(0)
    model = MLP()
    for T in (17, 29):
        options = {"inner": "inductor", "act_groups": act_groups}
        x = torch.randn(2, T, 48)
        out, grads, rec = _step(model, x, options, dynamic=True)
        ref_out, ref_grads, _ = _step(model, x, {**options, "fusion": False}, dynamic=True)
        regions = _gelu_regions(rec) if act_groups == 1 else _shift_regions(rec)
        assert [r.stage for r in regions] == ["forward"] and "sym_size" in rec.graphs["forward"]
        _assert_within_gelu_ulps(out, grads, ref_out, ref_grads)


@pytest.mark.parametrize("model", [GeluUsedTwice, TanhMLP])
def test_gelu_left_alone(model):
    """The GELU's output read by something besides the quantizer, or the tanh GELU: no region."""
    torch.manual_seed(0)
    _, grads, rec = _step(model(), torch.randn(2, 9, 48), {})
    assert not _gelu_regions(rec) and "gelu_quantize" not in rec.graphs.get("forward_fused", "")
    assert all(g.isfinite().all() for g in grads.values())


# ---------------------------------------------------------------------------------------------
# The GELU kernel with ShiftQuant (act_groups)
# ---------------------------------------------------------------------------------------------

SHIFT_WIDTHS = [(2, 7), (4, 4), (4, 5), (6, 3), (8, 1)]       # (bits, groups) that fit int8


def _exact_gelu_inputs(shape, seed):
    """Pre-activations whose GELU both formulas evaluate exactly: every ``|pre| >= 7.8``, where
    ``erf(pre / sqrt 2)`` is +-1 in float32, so ``gelu(pre)`` is ``pre`` or -0.  The positive
    columns' ranges spread over 2^0 .. 2^6 (every group of the ladder), the negative columns'
    are 0 (the last group)."""
    g = torch.Generator().manual_seed(seed)
    *lead, M, N_ = shape
    acc = torch.randint(0, 3000, shape, dtype=torch.int32, generator=g)
    sa = torch.rand(*lead, M, 1, generator=g) * 1e-2 + 1e-2
    ladder = 2.0 ** (torch.arange(N_) % 7)
    sb = (torch.rand(*lead, 1, N_, generator=g) + 1) * 1e-3 * ladder
    sign = torch.where(torch.rand(N_, generator=g) < 0.3, -1.0, 1.0)
    return acc, sa, sb, sign * 8 * ladder


@needs_kernel
@pytest.mark.parametrize("shape, per_batch", [((1, 300, 97), False), ((3, 20, 33), True), ((3, 20, 33), False),
                                              ((2, 1, 16), True), ((50, 5), False)])
@pytest.mark.parametrize("bits, groups", SHIFT_WIDTHS)
def test_gelu_shiftquant_kernel_equals_the_composition_where_the_gelu_is_exact(shape, per_batch, bits, groups):
    """Where the GELU leaves no ulps to differ, everything else (row maxima, quotients, the
    channels' ranges per batch entry or over all rows, shift_params, nearest rounding) is the
    composition's bit for bit, at any thread count."""
    args = _exact_gelu_inputs(shape, sum(shape) + bits)
    ref = CQ.gelu_shiftquant_reference(*args, bits, groups, per_batch)
    threads = torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            got = CQ.gelu_shiftquant(*args, bits, groups, per_batch)
            for a, b in zip(got, ref):
                assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    finally:
        torch.set_num_threads(threads)
    used = ref[1][ref[1] != 0].int().abs()
    if groups > 1:              # the ladder is used: values shifted above qmax, values of finer groups
        assert used.max() > N.qmax(bits) and (used % 2 ** (groups - 1) != 0).any()


@needs_kernel
@pytest.mark.parametrize("where", ["nan", "inf"])
def test_gelu_shiftquant_kernel_with_non_finite_values(where):
    """A NaN anywhere makes every range NaN: all of ``e`` 0 and the base NaN, as the
    composition; an infinite row scale the same (its quotients inf / inf).  That row's outer
    maximum is inf here where eager ATen's GELU of inf is NaN (the kernel's is Inductor's
    formula, ``inf * 0.5 * (1 + erf(inf))``); its scale, the base times it, is NaN either way."""
    acc, sa, sb, bias = _exact_gelu_inputs((2, 6, 37), 4)
    sa[1, 2, 0] = float(where)
    (pre, e, base, outer), ref = CQ.gelu_shiftquant(acc, sa, sb, bias, 4, 4), \
        CQ.gelu_shiftquant_reference(acc, sa, sb, bias, 4, 4)
    for a, b in ((pre, ref[0]), (e, ref[1]), (base, ref[2])):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert base.isnan() and (e == 0).all()
    assert ref[3][1, 2].isnan() and (outer[1, 2].isinf() if where == "inf" else outer[1, 2].isnan())
    outer[1, 2], ref[3][1, 2] = 0, 0
    assert torch.equal(outer, ref[3])


@needs_kernel
@settings(max_examples=25, deadline=None)
@given(lead=st.sampled_from([(), (1,), (2,)]), M=st.integers(1, 40), N_=st.integers(1, 90),
       width=st.sampled_from(SHIFT_WIDTHS), per_batch=st.booleans(), spread=st.sampled_from([1e-6, 1e-3, 1e-1]),
       seed=st.integers(0, 2 ** 16))
def test_gelu_shiftquant_kernel_on_random_shapes_and_ranges(lead, M, N_, width, per_batch, spread, seed):
    """Any GELU values (its linear, curved and saturated parts): ``pre`` bit for bit, the rest
    within the GELU's ulps (see ``_assert_gelu_close``): each row's maximum, and ``e`` equal but
    for values that close to a rounding boundary (one step of their group)."""
    bits, groups = width
    acc, sa, sb, bias = _gelu_inputs((*lead, M, N_), seed)
    sa = sa * spread * 1e3
    pre, e, base, outer = CQ.gelu_shiftquant(acc, sa, sb, bias, bits, groups, per_batch)
    ref = CQ.gelu_shiftquant_reference(acc, sa, sb, bias, bits, groups, per_batch)
    assert torch.equal(pre, ref[0]) and torch.equal(base, ref[2])   # (the largest quotient is 1 or 0)
    row_x = pre.abs().amax(-1, keepdim=True)
    assert ((outer - ref[3]).abs() <= 1e-6 * ref[3] + 1e-6 * row_x).all()
    step = 2 ** (groups - 1)            # one step of the coarsest group, in e's units
    assert (e.int() - ref[1].int()).abs().max() <= step and (e != ref[1]).sum() <= max(3, e.numel() // 2000)
    assert e.abs().max() <= N.qmax(bits) * step


def test_gelu_shiftquant_op_schema_fake_implementation_and_fallback(monkeypatch):
    args = _gelu_inputs((2, 6, 9), 5)
    for a in (args, (*args[:3], None)):
        for per_batch in (False, True):
            torch.library.opcheck(torch.ops.sqcompile.gelu_shiftquant.default, (*a, 4, 4, per_batch),
                                  test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    monkeypatch.setattr(CQ, "status", lambda: (False, "no AVX-512 here"))
    for a, b in zip(torch.ops.sqcompile.gelu_shiftquant(*args, 4, 4, True),
                    CQ.gelu_shiftquant_reference(*args, 4, 4, True)):
        assert torch.equal(a, b)


class BatchedMLP(nn.Module):
    """``gelu(x @ w1) @ w2`` with a weight per batch entry: ShiftQuant's channels are per entry."""

    def __init__(self, d=48, hidden=96, batch=2):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(batch, d, hidden) / d ** 0.5)
        self.w2 = nn.Parameter(torch.randn(batch, hidden, d) / hidden ** 0.5)

    def forward(self, x):
        return x + torch.matmul(F.gelu(torch.matmul(x, self.w1)), self.w2)


class LinearIntoBatched(nn.Module):
    """A Linear's GELU into a GEMM per batch entry: the Linear's rows are one batch, the next
    GEMM's channels are per entry -- a layout the kernel does not take."""

    def __init__(self, d=48, hidden=96, batch=2):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.w2 = nn.Parameter(torch.randn(batch, hidden, d) / hidden ** 0.5)

    def forward(self, x):
        return x + torch.matmul(F.gelu(self.fc1(x)), self.w2)


@needs_kernel
@pytest.mark.parametrize("model, inner, label", [
    (MLP, "eager", "dequant+bias+gelu+shiftquant"), (MLP, "inductor", "dequant+bias+gelu+shiftquant"),
    (BatchedMLP, "inductor", "dequant+gelu+shiftquant"), (LinearIntoBatched, "inductor", None)])
def test_compiled_mlp_with_act_groups_takes_the_shiftquant_kernel_and_trains_as_unfused(model, inner, label):
    torch.manual_seed(0)
    model, x = model(), torch.randn(2, 37, 48)
    options = {"inner": inner, "act_groups": 4}
    out, grads, rec = _step(model, x, options)
    ref_out, ref_grads, ref_rec = _step(model, x, {**options, "fusion": False})
    assert not _shift_regions(ref_rec) and "aten.gelu(" in ref_rec.graphs["forward"]
    if label is None:
        assert not _shift_regions(rec) and "gelu_shiftquant" not in rec.graphs.get("forward_fused", "")
    else:
        (region,) = _shift_regions(rec)
        assert (region.label, region.stage, region.kernel) == (label, "forward", pass_module.GELU_SHIFT_KERNEL)
        assert region.decision is not None
        assert "sqcompile.gelu_shiftquant(" in rec.graphs["forward_fused"]
        assert "aten.gelu(" not in rec.graphs["forward_fused"]
    _assert_within_gelu_ulps(out, grads, ref_out, ref_grads)


# ---------------------------------------------------------------------------------------------
# The GELU backward kernel
# ---------------------------------------------------------------------------------------------

def _gelu_backward_inputs(shape, seed, spread=2.0):
    g = torch.Generator().manual_seed(seed)
    *lead, M, N = shape
    acc = torch.randint(-3000, 3000, shape, dtype=torch.int32, generator=g)
    sa = torch.rand(*lead, M, 1, generator=g) * 1e-3
    sb = torch.rand(*lead, 1, N, generator=g) * 1e-3
    return acc, sa, sb, torch.randn(shape, generator=g) * spread


def _assert_gelu_backward_close(got, ref, acc, sa, sb):
    dx, sums = got
    assert all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(got, ref))
    # GELU's derivative Phi(x) + x phi(x) through two erfs 1.5e-7 from the exact one (ours and
    # PyTorch's, see _assert_gelu_close) and an exp an ulp or two apart in its argument: within
    # 5e-7 of the gradient it multiplies (measured up to 3.3e-7); a wrong dequantization or
    # formula misses by orders of magnitude more
    g = acc.double() * (1.0 if sa is None else sa.double()) * (1.0 if sb is None else sb.double())
    ok = (dx.double() - ref[0].double()).abs() <= 5e-7 * g.abs()
    assert ok.logical_or(dx.isnan() & ref[0].isnan()).all(), (dx - ref[0]).abs().max()
    # the column sums: within the terms' own bounds plus float32 rounding of their magnitudes
    per_column = (5e-7 * g.abs().expand(dx.shape) + 1e-6 * dx.abs().double()).reshape(-1, dx.shape[-1]).sum(0)
    assert ((sums.double() - ref[1].double()).abs() <= per_column).logical_or(sums.isnan() & ref[1].isnan()).all()


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 300, 97), (2, 7, 33), (3, 5, 16), (1, 1, 1), (130, 2048)])
@pytest.mark.parametrize("scales", ["both", "rows", "cols"])
def test_gelu_backward_kernel_matches_the_unfused_ops(shape, scales):
    acc, sa, sb, pre = _gelu_backward_inputs(shape, sum(shape))
    sa, sb = (None if scales == "cols" else sa), (None if scales == "rows" else sb)
    _assert_gelu_backward_close(CQ.gelu_backward(acc, sa, sb, pre), CQ.gelu_backward_reference(acc, sa, sb, pre),
                                acc, sa, sb)


@needs_kernel
@settings(max_examples=25, deadline=None)
@given(lead=st.sampled_from([(), (1,), (3,)]), M=st.integers(1, 150), N_=st.integers(1, 90),
       spread=st.sampled_from([1e-3, 1.0, 30.0]), seed=st.integers(0, 2 ** 16))
def test_gelu_backward_kernel_on_random_shapes_and_ranges(lead, M, N_, spread, seed):
    """Vector tails, batch entries, more than one 64-row chunk of the sums, pre-activations
    from ~0 to GELU's saturated parts (where the exp underflows)."""
    acc, sa, sb, pre = _gelu_backward_inputs((*lead, M, N_), seed, spread)
    _assert_gelu_backward_close(CQ.gelu_backward(acc, sa, sb, pre), CQ.gelu_backward_reference(acc, sa, sb, pre),
                                acc, sa, sb)


def test_gelu_backward_sums_in_the_graphs_chunks():
    """The kernel's chunk (a constant in C, which the Python side sizes ``work`` from) is the
    graph's split column sums' chunk."""
    import re
    from sqcompile.backends.lowering import COLUMN_SUM_CHUNK
    with open(CQ.SOURCE) as f:
        (c_rows,) = re.findall(r"^#define SUM_ROWS (\d+)$", f.read(), flags=re.M)
    assert CQ.SUM_ROWS == int(c_rows) == COLUMN_SUM_CHUNK


@needs_kernel
def test_gelu_backward_sums_are_the_same_bits_for_any_thread_count():
    acc, sa, sb, pre = _gelu_backward_inputs((1, 1000, 70), 3)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(CQ.gelu_backward(acc, sa, sb, pre))
    finally:
        torch.set_num_threads(threads)
    for dx, sums in results[1:]:
        assert torch.equal(dx, results[0][0]) and torch.equal(sums, results[0][1])


@needs_kernel
def test_gelu_backward_non_finite_values():
    """A NaN or infinite pre-activation or scale gives what the unfused ops give there."""
    acc, sa, sb, pre = _gelu_backward_inputs((2, 6, 37), 9)
    pre[0, 1, 3], pre[1, 2, 5], pre[1, 3, 6] = float("nan"), float("inf"), -float("inf")
    sa[0, 4, 0] = float("nan")
    dx, sums = CQ.gelu_backward(acc, sa, sb, pre)
    ref, ref_sums = CQ.gelu_backward_reference(acc, sa, sb, pre)
    assert torch.equal(dx.isnan(), ref.isnan()) and torch.equal(sums.isnan(), ref_sums.isnan())
    finite = ref.isfinite()
    assert torch.equal(dx.isfinite(), finite)
    torch.testing.assert_close(dx[finite], ref[finite], rtol=1e-5, atol=1e-9)


def test_gelu_backward_op_schema_fake_implementation_and_fallback(monkeypatch):
    acc, sa, sb, pre = _gelu_backward_inputs((2, 6, 9), 5)
    for a in ((acc, sa, sb, pre), (acc, sa, None, pre), (acc, None, sb, pre)):
        torch.library.opcheck(torch.ops.sqcompile.gelu_backward.default, a,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    monkeypatch.setattr(CQ, "status", lambda: (False, "no AVX-512 here"))
    for a, b in zip(torch.ops.sqcompile.gelu_backward(acc, sa, sb, pre), CQ.gelu_backward_reference(acc, sa, sb, pre)):
        assert torch.equal(a, b)


def _gelu_backward_regions(record):
    return [r for r in record.regions if "gelu_backward" in r.label]


@needs_kernel
@pytest.mark.parametrize("bias", [True, False])
def test_compiled_mlp_takes_the_gelu_backward_kernel_and_trains_as_unfused(bias):
    torch.manual_seed(0)
    model, x = MLP(bias=bias), torch.randn(2, 37, 48)
    out, grads, rec = _step(model, x, {"inner": "inductor"})
    ref_out, ref_grads, ref_rec = _step(model, x, {"inner": "inductor", "fusion": False})
    (region,) = _gelu_backward_regions(rec)
    assert not _gelu_backward_regions(ref_rec)
    # fc2's input gradient, dequantized into the GELU's backward; fc1's bias gradient summed there
    label = "dequant+gelu_backward+sum" if bias else "dequant+gelu_backward"
    assert (region.label, region.stage, region.module_path, region.kernel) == \
        (label, "backward", "fc2", pass_module.GELU_BACKWARD_KERNEL)
    graph = rec.graphs["backward_fused"]
    assert "sqcompile.gelu_backward(" in graph and "aten.gelu_backward(" not in graph
    assert "sqcompile.shiftquant_outer_pair(" in graph           # the result quantized as before
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    for name in grads:                                           # GELU's ulps reach the gradients
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-7)


@needs_kernel
def test_dynamic_shapes_take_the_gelu_backward_kernel():
    """Symbolic token counts: the kernel with the bias gradient's sums (the column sums are
    matched on the sizes' expressions, as static sizes are)."""
    torch.manual_seed(0)
    model = MLP()
    for T in (17, 29):
        x = torch.randn(2, T, 48)
        _, grads, rec = _step(model, x, {"inner": "inductor"}, dynamic=True)
        _, ref_grads, _ = _step(model, x, {"inner": "inductor", "fusion": False}, dynamic=True)
        assert [r.label for r in _gelu_backward_regions(rec)] == ["dequant+gelu_backward+sum"]
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-7)


class TransposedGelu(MLP):
    """The GELU on a transposed Linear output: its gradient reaches the GELU's backward through
    a transpose of the dequantized product (the pass takes only reshapes between the two: the
    kernel pairs ``acc`` and ``pre`` element by element in order)."""

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(x).transpose(-1, -2)).transpose(-1, -2))


@needs_kernel
def test_gelu_backward_through_a_transpose_trains_as_unfused():
    torch.manual_seed(0)
    model, x = TransposedGelu(), torch.randn(2, 37, 48)
    _, grads, rec = _step(model, x, {"inner": "inductor"})
    _, ref_grads, _ = _step(model, x, {"inner": "inductor", "fusion": False})
    assert not _gelu_backward_regions(rec)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_tanh_gelu_backward_left_alone(inner):
    torch.manual_seed(0)
    _, grads, rec = _step(TanhMLP(), torch.randn(2, 9, 48), {"inner": inner})
    assert not _gelu_backward_regions(rec) and "sqcompile.gelu_backward(" not in rec.graphs.get("backward_fused", "")
    assert all(g.isfinite().all() for g in grads.values())
