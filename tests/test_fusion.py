"""Region fusion (:mod:`sqcompile.backends.fusion`) and its generated kernels
(:mod:`sqcompile.kernels.triton_fused`).

Without CUDA everything runs in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set by
conftest.py), on small shapes whose M, N and K are not multiples of the 32-wide blocks.

* generated kernels against a reference evaluation of the same epilogue program with torch's
  own ops (every op the generator knows, float32 and bfloat16, all input patterns);
* compiled models with fusion on against fusion off (``fusion.ENABLED``): same forward and
  gradients, regions in the forward and the backward graphs, in the decisions and the report;
* ShiftQuant ranges and bias-gradient column sums computed in the epilogues, against the
  quantizers' own range pass and the graph's own ``sum``;
* where a region must stop: a value with two consumers, a non-elementwise op;
* int16 ShiftQuant gradients (two digit GEMMs) and Inductor as the inner compiler;
* the kernel cache hits on a second compile; ``kernels="torch"`` is left alone;
* a few training steps with ``kernels="triton"`` (fused) track ``kernels="torch"``.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sm90       # tests/: the region programs the sm_90 compile test and sass_counts.py share
import sqcompile
from sqcompile.backends import fusion
from sqcompile.decisions import records_for
from sqcompile.kernels import cpu_quant
from sqcompile.kernels.triton_ops import triton_available
from models import assert_steps_match

AVAILABLE, WHY = triton_available()
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=WHY)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON = dict(kernels="triton", inner="eager")
EIGHT = dict(weight_bits=8, act_bits=8, grad_bits=8, groups=1)
# ShiftQuant alone: the gradients' ranges are then those of the gradient itself, which a GEMM
# region computes in its epilogue (with the default grad_outer_scale they are the quotients')
PLAIN = dict(grad_outer_scale=False)


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    torch._dynamo.reset()
    monkeypatch.setattr(fusion, "ENABLED", True)
    yield
    torch._dynamo.reset()


class Residual(nn.Module):
    """linear + bias + gelu, then linear + bias + residual: M = 10, K = 24 / 40, N = 40 / 24."""

    def __init__(self, d=24, hidden=40):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(x)))


class TwoConsumers(nn.Module):
    """``y`` (the bias add) feeds both the gelu and the add: the region must end at ``y``."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(24, 40)

    def forward(self, x):
        y = self.fc(x)
        return F.gelu(y) + y


class NotElementwise(nn.Module):
    """A softmax right after the Linear: the region is GEMM + dequant + bias, nothing more."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(24, 40)

    def forward(self, x):
        return torch.softmax(self.fc(x), dim=-1) * 2.0


def _compile_and_step(model, x, fused: bool, options=None, seed=1):
    """Forward + backward of a deep copy of ``model``; (output, grads, the compile record)."""
    fusion.ENABLED = fused
    torch._dynamo.reset()
    model = copy.deepcopy(model).to(DEVICE)
    compiled = torch.compile(model, backend="shiftquant", options={**TRITON, **(options or {})})
    torch.manual_seed(seed)            # the same stochastic-rounding seeds in both runs
    out = compiled(x.to(DEVICE))
    out.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return out.detach(), grads, records_for(list(model.parameters()))[-1], compiled


def _assert_close(a, b, dtype=torch.float32):
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * float(b.float().abs().max()))


def _labels(record, stage=None):
    return [r.label for r in record.regions if stage is None or r.stage == stage]


# ---------------------------------------------------------------------------------------------
# Generated kernels against torch's own ops
# ---------------------------------------------------------------------------------------------

def _reference(ep, a, b, inputs):
    """The epilogue program evaluated with eager torch ops, op by op, in the program's dtypes."""
    from sqcompile.kernels.triton_fused import DTYPES
    aten = torch.ops.aten
    fns = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div, "neg": torch.neg,
           "relu": torch.relu, "gelu": F.gelu, "silu": F.silu, "sigmoid": torch.sigmoid,
           "threshold_backward": aten.threshold_backward, "gelu_backward": aten.gelu_backward,
           "silu_backward": aten.silu_backward}
    env = {"acc": torch.stack([torch._int_mm(a[i], b[i]) for i in range(a.shape[0])])}
    env.update({f"in{i}": t for i, t in enumerate(inputs)})
    for j, (name, dtype, *args) in enumerate(ep.ops):
        xs = [env[x] if isinstance(x, str) else x for x in args]
        v = xs[0].to(DTYPES[dtype]) if name == "convert" else fns[name](*xs)
        assert v.dtype == DTYPES[dtype], (j, name, v.dtype)
        env[f"v{j}"] = v
    return [env[r] for r in ep.outputs]


# (inputs [pattern, dtype], ops, outputs): float32 dequant + every activation; bfloat16 casts,
# bias and residual; the backward ops.  Inputs: per-row scale [B, M, 1], per-column scale
# [1, 1, N], scalar scale, bias [N], a full [B, M, N] tile (residual / forward input).
PROGRAMS = {
    "f32-forward": ([["bm", "f32"], ["n", "f32"], ["n", "f32"]],
                    [["convert", "f32", "acc"], ["mul", "f32", "in0", "in1"], ["mul", "f32", "v0", "v1"],
                     ["add", "f32", "v2", "in2"], ["gelu", "f32", "v3"], ["silu", "f32", "v4"],
                     ["sigmoid", "f32", "v5"], ["relu", "f32", "v6"], ["sub", "f32", "v7", 0.5],
                     ["div", "f32", "v8", "in1"], ["neg", "f32", "v9"]],
                    ["v10", "v3"]),
    "bf16-forward": ([["", "f32"], ["n", "bf16"], ["bmn", "bf16"]],
                     [["convert", "f32", "acc"], ["mul", "f32", "v0", "in0"], ["convert", "bf16", "v1"],
                      ["add", "bf16", "v2", "in1"], ["gelu", "bf16", "v3"], ["add", "bf16", "in2", "v4"],
                      ["mul", "bf16", "v5", 0.3]],
                     ["v6", "v3"]),
    "backward": ([["", "f32"], ["bmn", "f32"]],
                 [["convert", "f32", "acc"], ["mul", "f32", "v0", "in0"], ["gelu_backward", "f32", "v1", "in1"],
                  ["threshold_backward", "f32", "v2", "in1", 0.0], ["silu_backward", "f32", "v3", "in1"]],
                 ["v4"]),
}


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_generated_kernel_matches_the_ops_it_replaces(program):
    from sqcompile.kernels import triton_fused as tf
    ins, ops, outs = PROGRAMS[program]
    ep = tf.Epilogue(tuple(map(tuple, ins)), tuple(map(tuple, ops)), tuple(outs))
    B, M, K, N = 2, 37, 45, 19
    g = torch.Generator().manual_seed(len(program))
    a = torch.randint(-127, 128, (B, M, K), dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (B, N, K), dtype=torch.int8, generator=g).transpose(1, 2)  # weight.t() layout
    shapes = {"bm": (B, M, 1), "n": (N,), "": (), "bmn": (B, M, N)}
    inputs = [(torch.rand(shapes[p], generator=g) * 1e-3 if p in ("bm", "") else torch.randn(shapes[p], generator=g))
              .to(tf.DTYPES[d]) for p, d in ins]
    got = torch.ops.sqcompile.triton_fused_int8_mm(a.to(DEVICE), b.to(DEVICE), [t.to(DEVICE) for t in inputs],
                                                   ep.signature())
    expected = _reference(ep, a, b.contiguous(), inputs)
    assert len(got) == len(expected)
    for x, y in zip(got, expected):
        assert x.dtype == y.dtype and x.shape == (B, M, N)
        if y.dtype == torch.bfloat16:   # erf / exp may differ in the last float32 bit: 1 bf16 ulp
            torch.testing.assert_close(x.cpu().float(), y.float(), rtol=2 ** -7, atol=1e-6)
        else:
            _assert_close(x.cpu(), y)


def check_ranges(B, M, K, N, dtype):
    """Range outputs: max |value| per column ("n") and per row ("m"), per batch, NaN as +inf,
    exactly (a max does not depend on the order the tiles combine in)."""
    from sqcompile.kernels import triton_fused as tf
    ins = (("", "f32"), ("bmn", dtype))
    ops = (("convert", "f32", "acc"), ("mul", "f32", "v0", "in0"), ("convert", dtype, "v1"),
           ("gelu_backward", dtype, "v2", "in1"))
    ep = tf.Epilogue(ins, ops, ("v3",), (("v3", "n"), ("v3", "m"), ("v1", "n")))
    g = torch.Generator().manual_seed(4)
    a = torch.randint(-127, 128, (B, M, K), dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (B, K, N), dtype=torch.int8, generator=g)
    inputs = [torch.tensor(1e-3), torch.randn(B, M, N, generator=g).to(tf.DTYPES[dtype])]
    inputs[1][1, 5, 7] = float("nan")                  # -> +inf in column 7 / row 5 of batch 1
    out, cols, rows, cols_v1 = torch.ops.sqcompile.triton_fused_int8_mm(
        a.to(DEVICE), b.to(DEVICE), [t.to(DEVICE) for t in inputs], ep.signature())
    expected = _reference(ep, a, b, inputs)
    torch.testing.assert_close(out.cpu().float(), expected[0].float(), rtol=2 ** -7, atol=1e-6, equal_nan=True)
    mag = out.cpu().float().abs().nan_to_num(nan=float("inf"))    # the kernel's own output
    assert cols.dtype == torch.float32 and cols.shape == (B, N) and rows.shape == (B, M)
    assert torch.equal(cols.cpu(), mag.amax(1)) and torch.equal(rows.cpu(), mag.amax(2))
    assert cols[1, 7] == float("inf") and rows[1, 5] == float("inf") and torch.isfinite(cols[0]).all()
    v1 = (torch.stack([torch._int_mm(a[i], b[i]) for i in range(B)]).float() * inputs[0]).abs()
    assert torch.equal(cols_v1.cpu(), v1.amax(1))


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_generated_kernel_computes_exact_channel_ranges(dtype):
    check_ranges(2, 37, 45, 19, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_channel_ranges_are_exact_with_concurrent_tiles_on_gpu():
    """Hundreds of tiles racing on the same atomics: still the exact max."""
    check_ranges(2, 2048, 512, 1536, "bf16")


def check_sums(B, M, K, N, dtype):
    """Column-sum outputs: the region's value summed over the batch and the rows in float32,
    rounded once to the sum's dtype (torch's ``sum``); NaN propagates; the same on every run
    (per-tile partial sums, no atomics)."""
    from sqcompile.kernels import triton_fused as tf
    ins = (("", "f32"), ("bmn", dtype))
    ops = (("convert", "f32", "acc"), ("mul", "f32", "v0", "in0"), ("convert", dtype, "v1"),
           ("gelu_backward", dtype, "v2", "in1"))
    ep = tf.Epilogue(ins, ops, ("v3",), (("v3", "n"),), (("v3", dtype), ("v1", "f32")))
    g = torch.Generator().manual_seed(5)
    a = torch.randint(-127, 128, (B, M, K), dtype=torch.int8, generator=g).to(DEVICE)
    b = torch.randint(-127, 128, (B, K, N), dtype=torch.int8, generator=g).to(DEVICE)
    inputs = [torch.tensor(1e-3), torch.randn(B, M, N, generator=g).to(tf.DTYPES[dtype])]
    inputs[1][1, M - 1, 7] = float("nan")             # the last row of the last batch's tiles
    inputs = [t.to(DEVICE) for t in inputs]
    out, cols, total, total_v1 = torch.ops.sqcompile.triton_fused_int8_mm(a, b, inputs, ep.signature())
    again = torch.ops.sqcompile.triton_fused_int8_mm(a, b, inputs, ep.signature())
    for x, y in zip((total, total_v1), again[2:]):                      # run to run, bit for bit
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)
    assert total.shape == (N,) and total.dtype == tf.DTYPES[dtype] and total_v1.dtype == torch.float32
    # against float64 sums of what the kernel stored (``out``) and of the float32 value ``v1``
    expected = out.double().sum((0, 1))
    assert total[7].isnan() and expected[7].isnan() and not total[torch.arange(N) != 7].isnan().any()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == "f32" else dict(rtol=2 ** -8, atol=0)   # bf16: its last bit
    torch.testing.assert_close(total.double(), expected.to(total.dtype).double(), equal_nan=True, **tol)
    v1 = torch.stack([torch._int_mm(a[i].cpu(), b[i].cpu()) for i in range(B)]).double() * 1e-3
    # float32 sums by trees (a tile's rows, then its partial sums): within depth * 2**-24 *
    # sum |v| of the exact sum, depth well under 64 (an absolute 1e-5 failed on the H200:
    # 4096 values ~100 cancelling to ~0.01 were 1.4e-3 off; a row left out, ~sum |v| / 4096,
    # is 64 times the bound)
    v1 = v1.float().double()
    err = (total_v1.cpu().double() - v1.sum((0, 1))).abs()
    assert (err <= 64 * 2 ** -24 * v1.abs().sum((0, 1))).all(), float(err.max())


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_generated_kernel_sums_columns(dtype):
    check_sums(2, 70, 45, 19, dtype)             # M: two full 32-row tiles and a partial one per batch
    from sqcompile.kernels import triton_fused as tf
    ep = tf.Epilogue((), (("convert", "f32", "acc"),), ("v0",), (), (("v0", "bf16"),))
    empty = torch.ops.sqcompile.triton_fused_int8_mm(torch.ones(1, 0, 8, dtype=torch.int8, device=DEVICE),
                                                     torch.ones(8, 5, dtype=torch.int8, device=DEVICE), [],
                                                     ep.signature())
    assert torch.equal(empty[1].cpu(), torch.zeros(5, dtype=torch.bfloat16))     # a sum over no rows


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_column_sums_on_gpu(monkeypatch):
    """Autotuned tile sizes (autotuning on even where the GPU session turns it off: every
    config writes its own rows while it is timed): the partial sums the chosen tile wrote,
    and only those."""
    monkeypatch.setenv("SQCOMPILE_AUTOTUNE", "1")
    check_sums(2, 2048, 512, 1536, "bf16")


def test_column_sum_finds_bias_gradients():
    """``sum`` nodes over a contiguous view of a GEMM output that keep its columns, in order."""
    def node(x, dims, keepdim=False, dtype=None):
        graph = torch.fx.Graph()
        p = graph.placeholder("x")
        p.meta["val"] = x
        kw = {} if dtype is None else {"dtype": dtype}
        n = graph.call_function(torch.ops.aten.sum.dim_IntList, (p, dims, keepdim), kw)
        n.meta["val"] = torch.ops.aten.sum.dim_IntList(x, dims, keepdim, **kw)
        return n
    t = lambda *shape: torch.empty(shape, device="meta", dtype=torch.bfloat16)     # noqa: E731
    col = fusion._column_sum
    assert col(node(t(2, 16, 128), [0, 1], True), (1, 32, 128)) == "bf16"          # a Linear's bias gradient
    assert col(node(t(32, 128), [0]), (1, 32, 128)) == "bf16"
    assert col(node(t(2, 16, 128), [0, 1], dtype=torch.float32), (1, 32, 128)) == "f32"
    assert col(node(t(4, 8, 128), [-3, -2]), (4, 8, 128)) == "bf16"                # batched GEMM: b and m
    assert col(node(t(2, 16, 128), [1]), (1, 32, 128)) is None                     # per-sample sums
    assert col(node(t(2, 16, 128), [2]), (1, 32, 128)) is None                     # row sums
    assert col(node(t(4, 8, 128), [1]), (4, 8, 128)) is None                       # keeps the batch
    assert col(node(t(1, 16, 256), [1]), (1, 32, 128)) is None                     # dim 2 straddles M and N
    assert col(node(t(2, 16, 2, 64), [0, 1]), (1, 32, 128)) == "bf16"              # N kept as two dims, in order
    assert col(node(t(1, 32, 128).transpose(1, 2), [0, 2]), (1, 32, 128)) is None  # not a plain view


def test_range_axis_maps_shiftquant_channels_onto_the_gemm_output():
    rng = fusion._range_axis
    t = torch.empty
    assert rng(t(1, 32, 128), [0, 2], (1, 32, 128)) == "n"
    assert rng(t(1, 32, 128), [0, 1], (1, 32, 128)) == "m"
    assert rng(t(2, 16, 128), [0, 1], (1, 32, 128)) == "m"        # the Linear's GEMM merged batch and tokens
    assert rng(t(2, 16, 128), [2], (1, 32, 128)) == "n"
    assert rng(t(2, 16, 128), [1], (1, 32, 128)) is None          # half of M kept, half reduced
    assert rng(t(8, 16, 64), [0, 2], (8, 16, 64)) == "n"
    assert rng(t(8, 16, 64), [2], (8, 16, 64)) is None            # channels merge batches
    assert rng(t(1, 32, 128), [0, 1, 2], (1, 32, 128)) is None    # one range per element
    assert rng(t(1, 128, 32).transpose(1, 2), [0, 2], (1, 32, 128)) is None    # not a plain view
    assert rng(t(4, 8, 128), [0, 2], (1, 32, 128)) is None        # M split in two, one part kept
    assert rng(t(1, 16, 256), [0, 2], (1, 32, 128)) is None        # dim 2 straddles M and N


def _ranged(rec) -> list:
    """The backward graph's ShiftQuants that take their ranges from a region (a node, not None)."""
    return [line for line in rec.graphs["backward_fused"].splitlines()
            if "sqcompile.triton_shiftquant_fused(" in line and ", None, " not in line.split("(", 2)[-1][:40]]


def test_region_ranges_are_exactly_the_shiftquant_range_pass(monkeypatch):
    """The same training step with the ranges computed in the region and by the quantizers'
    own range pass: bit-identical gradients (each quantizer on its own: no pairs)."""
    monkeypatch.setattr(fusion, "_pair_shiftquants", lambda graph: 0)
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(24, 24), Residual()), torch.randn(2, 5, 24)
    _, grads, rec, _ = _compile_and_step(model, x, fused=True, options=PLAIN)
    monkeypatch.setattr(fusion, "_find_ranges", lambda r, sq: None)
    _, ref_grads, ref_rec, _ = _compile_and_step(model, x, fused=True, options=PLAIN)
    assert "int8_mm+dequant+gelu_backward+ranges+sum" in _labels(rec, "backward")
    assert not any("ranges" in label for label in _labels(ref_rec, "backward"))
    # fc1's output gradient: ranges along its columns (dX) and its rows (dW); the first
    # Linear's (fc1's dX plus the residual's gradient): along its rows (dW; it has no dX)
    assert len(_ranged(rec)) == 3 and not _ranged(ref_rec)
    for name in grads:
        assert torch.equal(grads[name], ref_grads[name]), name


def test_region_sums_are_the_bias_gradients(monkeypatch):
    """The same training step with each bias gradient summed in the region that computes the
    Linear's output gradient and by the graph's own ``sum``: the bias gradients agree to
    float32 rounding (the additions' order differs), every other gradient bit for bit, and
    the graph no longer reads those output gradients for their sums."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(24, 24), Residual()), torch.randn(2, 5, 24)
    _, grads, rec, _ = _compile_and_step(model, x, fused=True)
    monkeypatch.setattr(fusion, "_find_sums", lambda r: None)
    _, ref_grads, ref_rec, _ = _compile_and_step(model, x, fused=True)
    # fc1's output gradient (fc2's dX region) and the first Linear's (fc1's dX region, with
    # the residual's gradient added); fc2's is the graph's input, which no region computes
    assert _labels(rec, "backward")[::2] == ["int8_mm+dequant+gelu_backward+sum",
                                             "int8_mm+dequant+residual+sum", "int8_mm+dequant"]
    assert not any("sum" in label for label in _labels(ref_rec, "backward"))

    def sums(record):
        return sum("aten.sum.dim_IntList(" in line for line in record.graphs["backward_fused"].splitlines())
    assert sums(ref_rec) == 3 and sums(rec) == 1
    for name in grads:
        if name.endswith("bias") and name != "1.fc2.bias":
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6)
            assert not torch.equal(grads[name], torch.zeros_like(grads[name]))
        else:
            assert torch.equal(grads[name], ref_grads[name]), name


def test_values_stored_and_reduced_are_stored_from_the_reduced_form_before_triton_3_9(monkeypatch):
    """Before Triton 3.9 a region with an exp or erf stores a value that it also reduces
    (ranges, column sums) from the reduced float32 form (``store_from_reduced``: else Triton
    3.6 computes a GELU backward twice and spills on sm_90); both forms give the same
    gradients bit for bit, with the same regions (ranges and sums included)."""
    from sqcompile.kernels import triton_fused as tf
    ep = tf.Epilogue(*sm90.REGION_PROGRAMS["gelu_backward+ranges+sum"][0])
    light = tf.Epilogue(*sm90.REGION_PROGRAMS["dequant+ranges"][0])
    assert tf.store_from_reduced(ep.ops) == (tf.triton_version() < (3, 9)) and not tf.store_from_reduced(light.ops)
    old, new = tf.generate_source(ep, True), tf.generate_source(ep, False)
    assert "cast_rtne(z_v3, tl.bfloat16), mask=mask)" in old and ", v3, mask=mask)" in new
    assert old.count("tl.where(mask,") == new.count("tl.where(mask,") == 1     # one masked value for all reductions
    monkeypatch.setattr(fusion, "_pair_shiftquants", lambda graph: 0)
    model, x = nn.Sequential(nn.Linear(24, 24), Residual()), torch.randn(2, 5, 24)
    results = {}
    for version in ((3, 9), (3, 6)):
        monkeypatch.setattr(tf, "triton_version", lambda: version)
        torch._dynamo.reset()
        torch.manual_seed(0)
        _, grads, rec, _ = _compile_and_step(model, x, fused=True, options=PLAIN)
        assert "int8_mm+dequant+gelu_backward+ranges+sum" in _labels(rec, "backward")
        assert len(_ranged(rec)) == 3       # fc1's output gradient: both ranges; the first Linear's: one
        results[version] = grads
    for name, grad in results[3, 9].items():
        assert torch.equal(grad, results[3, 6][name]), name


def test_shiftquant_pairs_change_no_value(monkeypatch):
    """The two ShiftQuants of each Linear's output gradient (along its columns for ``dX``,
    along its rows for ``dW``) become one ``triton_shiftquant_pair``, which takes the
    region's ranges where the region computed them and stores the ``dW`` operand
    transposed: bit-identical gradients, stochastic draws included, to the same step with
    the quantizers on their own."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(24, 24), Residual()), torch.randn(2, 5, 24)
    _, grads, rec, _ = _compile_and_step(model, x, fused=True, options=PLAIN)
    monkeypatch.setattr(fusion, "_pair_shiftquants", lambda graph: 0)
    _, ref_grads, ref_rec, _ = _compile_and_step(model, x, fused=True, options=PLAIN)
    lines = rec.graphs["backward_fused"].splitlines()
    pairs = [line.split("sqcompile.triton_shiftquant_pair(")[1] for line in lines
             if "sqcompile.triton_shiftquant_pair(" in line]
    # fc1's and fc2's output gradients are quantized twice; the first Linear's only along
    # its rows (it has no dX).  fc1's gradient comes from fc2's dX region, with both ranges.
    assert len(pairs) == 2 and all(p.rstrip().endswith(", True)") for p in pairs)
    assert sum(", None, None, " not in p for p in pairs) == 1
    assert not any("sqcompile.triton_shiftquant_pair(" in line for line in ref_rec.graphs["backward_fused"].splitlines())
    assert sum("sqcompile.triton_shiftquant" in line for line in lines) == 3
    for name in grads:
        assert torch.equal(grads[name], ref_grads[name]), name


def test_outer_scaled_shiftquants_pair_and_change_no_value(monkeypatch):
    """With ``grad_outer_scale`` the two ShiftQuants of each Linear's output gradient are
    ``triton_shiftquant_outer`` (one scale per token for ``dX``, per output feature for
    ``dW``), which also become one pair (``outer=True``: three reads of the gradient for both
    instead of three each), the ``dW`` operand stored transposed: bit-identical gradients,
    stochastic draws included, to the same step with each quantizer on its own, and to
    the eager composition of float ops around the plain ShiftQuant (the torch family's)."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(24, 24), Residual()), torch.randn(2, 5, 24)
    opts = {"grad_outer_scale": True}
    _, grads, rec, _ = _compile_and_step(model, x, fused=True, options=opts)
    lines = rec.graphs["backward_fused"].splitlines()
    pairs = [line for line in lines if "sqcompile.triton_shiftquant_pair(" in line]
    assert len(pairs) == 2 and all(p.rstrip().endswith(", True, True)") for p in pairs), pairs
    singles = [line for line in lines if "sqcompile.triton_shiftquant_outer(" in line]
    assert len(singles) == 1 and singles[0].rstrip().endswith(", True)")     # the first Linear's dW, transposed
    assert not any("sqcompile.triton_shiftquant(" in line or "triton_shiftquant_fused(" in line for line in lines)
    monkeypatch.setattr(fusion, "_pair_shiftquants", lambda graph: 0)
    _, ref_grads, ref_rec, _ = _compile_and_step(model, x, fused=True, options=opts)
    assert sum("sqcompile.triton_shiftquant_outer(" in line for line in ref_rec.graphs["backward_fused"].splitlines()) == 5
    for name in grads:
        assert torch.equal(grads[name], ref_grads[name]), name
    from sqcompile import ops
    triton = ops.kernel_set("triton")
    monkeypatch.setitem(ops.KERNEL_SETS, "triton", triton._replace(shiftquant_outer=None))
    _, composed, comp_rec, _ = _compile_and_step(model, x, fused=True, options=opts)
    assert not any("triton_shiftquant_outer(" in line for line in comp_rec.graphs["backward_fused"].splitlines())
    for name in grads:
        assert torch.equal(grads[name], composed[name]), name


def test_dw_gradients_stored_transposed_change_no_value(monkeypatch):
    """The ``dW`` GEMM's ShiftQuant stores its operand transposed (no copy into the GEMM's
    layout): bit-identical gradients to the same step without that (each quantizer on its
    own: no pairs)."""
    monkeypatch.setattr(fusion, "_pair_shiftquants", lambda graph: 0)
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(24, 24), Residual()), torch.randn(2, 5, 24)
    _, grads, rec, _ = _compile_and_step(model, x, fused=True, options=PLAIN)
    monkeypatch.setattr(fusion, "_store_transposed", lambda graph, ops: 0)
    _, ref_grads, ref_rec, _ = _compile_and_step(model, x, fused=True, options=PLAIN)
    transposed = [line for line in rec.graphs["backward_fused"].splitlines()
                  if "sqcompile.triton_shiftquant_fused(" in line and line.rstrip().endswith(", True)")]
    assert len(transposed) == 3                        # one per Linear: its dW gradient
    assert not any(line.rstrip().endswith(", True)") for line in ref_rec.graphs["backward_fused"].splitlines()
                   if "sqcompile.triton_shiftquant_fused(" in line)
    for name in grads:
        assert torch.equal(grads[name], ref_grads[name]), name


def test_generated_source_is_small_and_keyed_by_signature():
    from sqcompile.kernels import triton_fused as tf
    ins, ops, outs = PROGRAMS["f32-forward"]
    ep = tf.Epilogue(tuple(map(tuple, ins)), tuple(map(tuple, ops)), tuple(outs))
    assert tf.Epilogue.parse(ep.signature()) == ep
    src = tf.generate_source(ep)
    assert "int8_gemm_tile" in src and src.count("tl.store(") == 2 and src.count("tl.load(") == 3
    assert "offs_m * in0_sm" in src          # a per-row scale is a BLOCK_M vector, not a tile
    k = tf.kernel_for(ep.signature())
    assert k.path.endswith(".py") and open(k.path).read() == src
    with pytest.raises(ValueError):
        tf.Epilogue.parse('{"inputs":[],"ops":[["erfinv","f32","acc"]],"outputs":["v0"]}')


_HOPPER_SCRIPT = """
import json, sys, sm90
from sqcompile.kernels import triton_fused as tf
ep = tf.Epilogue.parse(sys.argv[1])
sig, ones = sm90.region_arguments(ep)
fn = tf.kernel_for(sys.argv[1]).fn


def compile_one(config):
    out = sm90.compile_sm90(fn, sig, {**ones, **config.kwargs}, num_warps=config.num_warps,
                            num_stages=config.num_stages, fp_fusion=False)
    return {"tile": [*(config.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")), config.num_stages],
            "wgmma": "wgmma" in out["ptx"], "cubin": len(out["cubin"]), "shared": out["shared"],
            "spilled": out["spilled"], "registers": out["registers"],
            # a relaxed integer atomic max: "red" (Triton 3.9), "atom" with its result unused (3.6)
            "atomics": sum(out["ptx"].count(f"{op}.global.gpu.relaxed.max.s32") for op in ("red", "atom"))}


print(json.dumps(sm90.parallel(compile_one, tf.region_configs(ep))))
"""

@pytest.mark.slow
@pytest.mark.parametrize("program", list(sm90.REGION_PROGRAMS))
def test_generated_kernel_compiles_for_hopper(program):
    """The interpreter is lenient: compile generated kernels for sm_90 (no GPU needed), in a
    process without TRITON_INTERPRET, with every autotuning config they get: the GEMM uses
    wgmma, range outputs a relaxed atomic max, and (per ``ptxas -v``) nothing spills, which
    is why heavy epilogues do not get the 128x256 tile; light ones also get a 128x128 tile
    with 3 stages that fits two programs on an SM (96 KB of shared memory, at most 128
    registers a thread).  With the installed Triton: 3.9, or 3.6 (the H200 machine's), which
    spilled 264-604 bytes at every tile for ``gelu_backward+ranges`` until the stored value
    came from the reduced one (``store_from_reduced``)."""
    import json
    pytest.importorskip("triton.backends.nvidia")
    from sqcompile.kernels import triton_fused as tf
    spec, wide = sm90.REGION_PROGRAMS[program]
    ep = tf.Epilogue(*spec)
    assert tf.wide_tile_fits(ep) == wide
    result = json.loads(sm90.run(_HOPPER_SCRIPT, ep.signature()).strip().splitlines()[-1])
    two = tf.two_programs_fit(ep)
    assert two == (program in ("dequant+bias", "dequant+ranges"))
    assert [r["tile"] for r in result] == ([[128, 256, 128, 3]] if wide else []) + [[128, 128, 128, 4]] + (
        [[128, 128, 128, 3]] if two else []) + [[128, 128, 256, 3], [64, 128, 128, 4], [128, 64, 64, 4]]
    for r in result:
        assert r["wgmma"] and r["cubin"] > 0 and r["spilled"] <= 0 and r["shared"] <= 227 * 1024, r
        assert (r["atomics"] > 0) == bool(ep.ranges)
        if r["tile"] == [128, 128, 128, 3]:      # two programs per SM
            assert r["shared"] <= 227 * 1024 // 2 and 0 < r["registers"] <= 128, r


def test_fused_op_passes_opcheck():
    from sqcompile.kernels import triton_fused as tf
    ins, ops, outs = PROGRAMS["bf16-forward"]
    sig = tf.Epilogue(tuple(map(tuple, ins)), tuple(map(tuple, ops)), tuple(outs)).signature()
    a = torch.randint(-127, 128, (1, 9, 20), dtype=torch.int8, device=DEVICE)
    b = torch.randint(-127, 128, (20, 11), dtype=torch.int8, device=DEVICE)
    inputs = [torch.rand((), device=DEVICE), torch.randn(11, device=DEVICE).bfloat16(),
              torch.randn(1, 9, 11, device=DEVICE).bfloat16()]
    torch.library.opcheck(torch.ops.sqcompile.triton_fused_int8_mm.default, (a, b, inputs, sig),
                          test_utils=("test_schema", "test_faketensor"))
    summed = tf.Epilogue(tuple(map(tuple, ins)), tuple(map(tuple, ops)), tuple(outs), (("v3", "n"),),
                         (("v6", "bf16"), ("v0", "f32"))).signature()        # with ranges and column sums
    torch.library.opcheck(torch.ops.sqcompile.triton_fused_int8_mm.default, (a, b, inputs, summed),
                          test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------------------------------------
# Compiled models: fusion on == fusion off
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_regions_compute_what_the_unfused_graph_computes(dtype):
    torch.manual_seed(0)
    model = Residual().to(dtype)
    x = torch.randn(2, 5, 24).to(dtype)
    out, grads, rec, _ = _compile_and_step(model, x, fused=True)
    ref_out, ref_grads, ref_rec, _ = _compile_and_step(model, x, fused=False)
    assert not ref_rec.regions and "triton_fused_int8_mm" not in ref_rec.graphs["forward"]
    _assert_close(out, ref_out, dtype)
    for name in grads:     # same stochastic-rounding draws: the gradients agree too
        _assert_close(grads[name], ref_grads[name], dtype)
    cast = "+cast" if dtype == torch.bfloat16 else ""
    assert _labels(rec, "forward") == [f"int8_mm+dequant{cast}+bias+gelu", f"int8_mm+dequant{cast}+bias+residual"]
    fc1 = rec.regions[0]
    assert fc1.outputs == 2       # the pre-activation, saved for backward, is a side output
    assert "triton_int8_mm" in fc1.nodes and "gelu" in fc1.nodes
    # backward: dX of fc2 takes gelu's backward along, and computes fc1's bias gradient (its
    # output gradient summed over the tokens); the others end at the weight's transpose.  (With
    # grad_outer_scale=False it also computes the ranges of that gradient's ShiftQuant:
    # test_region_ranges_are_exactly_the_shiftquant_range_pass)
    assert _labels(rec, "backward") == [f"int8_mm+dequant{cast}+gelu_backward+sum", f"int8_mm+dequant{cast}",
                                        f"int8_mm+dequant{cast}"]
    fused_fw = rec.graphs["forward_fused"]
    assert fused_fw.count("sqcompile.triton_fused_int8_mm(") == 2 and "triton_int8_mm(" not in fused_fw
    assert rec.graphs["backward_fused"].count("sqcompile.triton_fused_int8_mm(") == 3
    assert "triton_int8_mm(" in rec.graphs["forward"]       # the recorded ATen graph stays unfused


class PreNorm(nn.Module):
    """A pre-norm MLP block after a Linear: the L1 norm writes fc1's int8 operand (forward);
    its backward adds the residual's gradient and computes the ShiftQuant ranges and the bias
    sum of ``inp``'s output gradient (backward)."""

    def __init__(self, d=24, hidden=40):
        super().__init__()
        self.inp, self.ln = nn.Linear(d, d), nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        x = self.inp(x)
        return x + self.fc2(F.gelu(self.fc1(self.ln(x))))


@pytest.mark.parametrize("model", [Residual, PreNorm])
def test_symbolic_sizes_fuse_as_static_ones_without_specializing(model):
    """``dynamic=True`` (and Dynamo's dynamic recompile after a size change, which then serves
    every size): the token dim is symbolic.  The regions are those of a static compile, the
    values equal a static compile's at each size bit for bit (the same kernels, the size a
    runtime argument), and one graph serves both sizes (no guard specializes it)."""
    from test_models import Counting
    torch.manual_seed(0)
    model = model()
    xs = [torch.randn(3, 5, 24), torch.randn(2, 7, 24)]
    static = [_compile_and_step(model, x, fused=True) for x in xs]
    torch._dynamo.reset()
    dynamic = copy.deepcopy(model).to(DEVICE)
    backend = Counting(**TRITON)
    compiled = torch.compile(dynamic, backend=backend, dynamic=True)
    assert_steps_match(compiled, dynamic, xs, [(out, grads) for out, grads, *_ in static], DEVICE)
    (rec,) = backend.records
    assert any(isinstance(s, str) for d in rec.decisions for shape in d.shapes for s in shape)   # symbolic
    assert _labels(rec) == _labels(static[0][2]) and rec.regions
    assert "triton_int8_mm(" not in rec.graphs["forward_fused"] + rec.graphs["backward_fused"]


def test_int16_gradient_regions_fold_the_low_digit_gemm():
    """6-bit ShiftQuant with 4 groups does not fit int8: the gradient GEMM is two int8 GEMMs
    (high and low digit); the low one's int32 result is read by the high one's region."""
    torch.manual_seed(0)
    model, x = Residual(), torch.randn(2, 5, 24)
    options = dict(grad_bits=6, groups=4)
    out, grads, rec, _ = _compile_and_step(model, x, fused=True, options=options)
    ref_out, ref_grads, _, _ = _compile_and_step(model, x, fused=False, options=options)
    assert _labels(rec, "backward") == ["int8_mm+int16+dequant+gelu_backward+sum", "int8_mm+int16+dequant",
                                        "int8_mm+int16+dequant"]
    _assert_close(out, ref_out)
    for name in grads:
        _assert_close(grads[name], ref_grads[name])


def test_regions_are_recorded_on_decisions_and_in_the_report():
    torch.manual_seed(0)
    model = Residual()
    _, _, rec, compiled = _compile_and_step(model, torch.randn(2, 5, 24), fused=True)
    by_module = {d.module_path: d for d in rec.decisions if d.kind == "gemm"}
    assert by_module["fc1"].region.startswith("R1: int8_mm+dequant+bias+gelu")
    assert by_module["fc2"].region.startswith("R2: int8_mm+dequant+bias+residual")
    assert "gelu_backward" in by_module["fc2"].region          # the backward region of fc2's dX
    assert {r.module_path for r in rec.regions} == {"fc1", "fc2"}
    assert all(r.decision in (by_module["fc1"].node, by_module["fc2"].node) for r in rec.regions)
    text = str(sqcompile.report(compiled))
    assert "region" in text and "R1: int8_mm+dequant+bias+gelu" in text
    assert sqcompile.report(compiled).rows()[0]["region"].startswith("R1")


@pytest.mark.parametrize("model,label,stop", [
    (TwoConsumers(), "int8_mm+dequant+bias", "2 consumers"),
    (NotElementwise(), "int8_mm+dequant+bias", "_softmax"),
])
def test_region_stops_where_it_must(model, label, stop):
    x = torch.randn(2, 7, 24)
    out, grads, rec, _ = _compile_and_step(model, x, fused=True)
    ref_out, ref_grads, _, _ = _compile_and_step(model, x, fused=False)
    forward = [r for r in rec.regions if r.stage == "forward"]
    assert [r.label for r in forward] == [label]
    assert stop in forward[0].stop
    _assert_close(out, ref_out)
    for name in grads:
        _assert_close(grads[name], ref_grads[name])


def test_inference_graph_fuses_the_activation_without_side_output():
    model = nn.Sequential(nn.Linear(24, 40), nn.SiLU(), nn.Linear(40, 9), nn.ReLU()).to(DEVICE)
    compiled = torch.compile(model, backend="shiftquant", options=TRITON)
    x = torch.randn(3, 24, device=DEVICE)
    with torch.no_grad():
        out = compiled(x)
        fusion.ENABLED = False
        torch._dynamo.reset()
        ref = torch.compile(copy.deepcopy(model), backend="shiftquant", options=TRITON)(x)
    rec = records_for(list(model.parameters()))[-1]
    assert _labels(rec, "inference") == ["int8_mm+dequant+bias+silu", "int8_mm+dequant+bias+relu"]
    assert all(r.outputs == 1 for r in rec.regions)
    _assert_close(out, ref)


def test_fused_op_is_an_extern_kernel_under_inductor():
    """inner="inductor" retraces the fused graph: the region op survives as one call."""
    torch.manual_seed(0)
    model, x = Residual(), torch.randn(2, 5, 24)
    out, grads, rec, _ = _compile_and_step(model, x, fused=True, options={"inner": "inductor"})
    ref_out, ref_grads, _, _ = _compile_and_step(model, x, fused=False)
    assert len(rec.regions) == 5
    _assert_close(out, ref_out)
    for name in grads:      # Inductor rounds the unfused float ops (bias grads' sums) its own way
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5)


def test_generated_kernels_are_cached_across_compiles():
    from sqcompile.kernels import triton_fused as tf
    model, x = Residual(), torch.randn(2, 5, 24)
    _, _, rec, _ = _compile_and_step(model, x, fused=True)
    first = tf.cache_info()
    _, _, rec2, _ = _compile_and_step(model, x, fused=True)
    second = tf.cache_info()
    assert second["misses"] == first["misses"]                  # nothing generated again
    assert second["hits"] >= first["hits"] + len(rec2.regions)
    assert [r.kernel for r in rec2.regions] == [r.kernel for r in rec.regions]
    # dW of fc1 and of fc2 share one epilogue (dequantize by a scalar): one kernel for both
    assert rec.regions[-1].kernel == rec.regions[-2].kernel


def test_torch_kernels_and_disabled_fusion_leave_graphs_alone():
    """No Triton region with the torch kernel family; on CPU the family's own C kernels take
    ``fc1``'s GELU and ``fc2``'s quantizer, and that GELU's backward on ``fc2``'s input gradient
    (:mod:`sqcompile.backends.cpu_quant`), nothing else."""
    model, x = Residual(), torch.randn(2, 5, 24)
    compiled = torch.compile(model.to(DEVICE), backend="shiftquant", options={"kernels": "torch", "inner": "eager"})
    compiled(x.to(DEVICE)).sum().backward()
    rec = records_for(list(model.parameters()))[-1]
    cpu = DEVICE == "cpu" and cpu_quant.status()[0]
    assert [r.label for r in rec.regions] == (["dequant+bias+gelu+quantize", "dequant+gelu_backward+sum"]
                                              if cpu else [])
    assert ("forward_fused" in rec.graphs) == ("backward_fused" in rec.graphs) == cpu
    assert all(d.region is None for d in rec.decisions if d.module_path not in ("fc1", "fc2") or not cpu)
    _, _, rec, _ = _compile_and_step(model, x, fused=False)
    assert not rec.regions and all(d.region is None for d in rec.decisions)
    # with fusion off, the dequantization moves into the GEMM's epilogue (scaled GEMM op);
    # with it on, the graph keeps int8_mm + elementwise nodes for the region search
    assert "triton_scaled_int8_mm" in rec.graphs["forward"] and "triton_int8_mm(" not in rec.graphs["forward"]
    _, _, rec, _ = _compile_and_step(model, x, fused=True)
    assert "triton_scaled_int8_mm" not in rec.graphs["forward"] and rec.regions


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def _train(kernels: str, steps: int = 4):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 5)).to(DEVICE)
    data = torch.randn(4, 12, 24, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    target = torch.randn(4, 12, 5, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    compiled = torch.compile(model, backend="shiftquant", options={**EIGHT, "kernels": kernels, "inner": "eager"})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for step in range(steps):
        loss = F.mse_loss(compiled(data[step]), target[step])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses, torch.cat([p.detach().flatten() for p in model.parameters()]), records_for(list(model.parameters()))


def test_training_with_fused_triton_kernels_tracks_torch_kernels():
    losses_t, params_t, recs = _train("triton")
    torch._dynamo.reset()
    losses_r, params_r, _ = _train("torch")
    assert {r.stage for r in recs[-1].regions} == {"forward", "backward"}
    # step 1's forward is deterministic and exact in both families; later steps differ by the
    # stochastic rounding of the gradients (each family draws its own noise)
    assert abs(losses_t[0] - losses_r[0]) <= 1e-5 * abs(losses_r[0])
    for lt, lr in zip(losses_t, losses_r):       # measured: 2e-4 relative at step 4
        assert abs(lt - lr) <= 0.005 * abs(lr)
    assert float((params_t - params_r).norm() / params_r.norm()) < 0.003   # measured: 3e-4


def test_fusion_option_turns_fusion_off_for_one_compile():
    """``options={"fusion": False}``: unfused graphs (GEMMs dequantizing in their own epilogue),
    while the process default stays on; the results are the fused ones."""
    torch.manual_seed(0)
    model, x = Residual(), torch.randn(2, 5, 24)
    out, grads, rec, _ = _compile_and_step(model, x, fused=True, options={"fusion": False})
    assert fusion.ENABLED and not rec.regions and "forward_fused" not in rec.graphs
    assert "triton_scaled_int8_mm" in rec.graphs["forward"]
    ref_out, ref_grads, ref_rec, _ = _compile_and_step(model, x, fused=True)
    assert ref_rec.regions
    _assert_close(out, ref_out)
    for name in grads:
        _assert_close(grads[name], ref_grads[name])


def test_activation_groups_fuse_and_equal_the_unfused_graphs():
    """``act_groups``: the GEMMs' inputs are ShiftQuant-ed (nearest), not per-row quantized;
    the GEMM regions (dequantize, bias, GELU, residual, the backward's GELU and sums) form as
    without it and give the unfused results."""
    torch.manual_seed(0)
    model, x = Residual(), torch.randn(2, 5, 24)
    options = {"act_groups": 4}
    out, grads, rec, _ = _compile_and_step(model, x, fused=True, options=options)
    assert _labels(rec, "forward") == ["int8_mm+dequant+bias+gelu", "int8_mm+dequant+bias+residual"]
    assert "int8_mm+dequant+gelu_backward+sum" in _labels(rec, "backward")
    ref_out, ref_grads, _, _ = _compile_and_step(model, x, fused=False, options=options)
    _assert_close(out, ref_out)
    for name in grads:
        _assert_close(grads[name], ref_grads[name])


@pytest.mark.slow
@pytest.mark.parametrize("outer", [True, False], ids=["outer_scale", "plain"])
def test_gpu_benchmark_block_under_inductor_matches_the_eager_inner_compiler(outer):
    """``benchmarks/gpu.py``'s transformer block, shrunk, with the Triton family under Inductor
    (what the GPU benchmark runs): every fusion pass applies (GEMM regions, ranges without
    ``grad_outer_scale``, the L1 norms with the GEMM quantizers, ShiftQuant pairs) and the
    results equal those with the eager inner compiler, except the bias gradients (Inductor sums
    them in another order) and with outer scales the gradients before attention (below).  The attention
    stays unfused (``fused_attention=False``, also on a GPU), so its quantizers and GEMMs are
    in the graph for these passes (the fused kernels: ``tests/test_triton_attention.py``)."""
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gpu.py")
    spec = importlib.util.spec_from_file_location("gpu_benchmark", path)
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    torch.manual_seed(0)
    block, x = gpu.Block(d=32, heads=2), torch.randn(2, 16, 32)
    options = {"execution": "integer", "fused_attention": False, "grad_outer_scale": outer}
    out, grads, rec, _ = _compile_and_step(block, x, fused=True, options={**options, "inner": "inductor"})
    ref_out, ref_grads, ref_rec, _ = _compile_and_step(block, x, fused=True, options=options)
    labels = _labels(rec)
    assert labels == _labels(ref_rec) and rec.inner == "inductor"
    assert labels.count("l1_norm+quantize") == 2
    assert f"int8_mm+dequant+gelu_backward{'' if outer else '+ranges'}+sum" in labels
    # every gradient is quantized twice, along its columns and its rows (the four Linears'
    # dY, attention's dS and dO): six pairs (with outer scales: ", True)" last), each row
    # operand stored in the layout its GEMM reads (dW's and dK's transposed as A, dV's dO as
    # B); no ShiftQuant left on its own
    backward = rec.graphs["backward_fused"].splitlines()
    pairs = [line for line in backward if "sqcompile.triton_shiftquant_pair(" in line]
    ending = ", True, True)" if outer else ", True)"
    assert len(pairs) == 6 and all(line.rstrip().endswith(ending) for line in pairs)
    assert sum("sqcompile.triton_shiftquant" in line for line in backward) == 6
    assert {d.execution for d in rec.decisions} == {"triton"}
    assert torch.equal(out, ref_out)
    # Inductor's softmax backward (attention's dS) differs from eager's in the last bits; with
    # outer scales each of dS's rows has its own, so that reaches the weights before attention
    # (qkv) as float rounding (~1e-8 relative); without them, one scale for all of dS does not
    # move at these sizes
    attention_rounding = ("qkv.", "ln1.") if outer else ()
    for name in grads:
        if name.endswith("bias") or name.startswith(attention_rounding):
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(grads[name], ref_grads[name]), name
