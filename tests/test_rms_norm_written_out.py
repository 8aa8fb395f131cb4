"""RMSNorm written out by hand (LLaMA, Mistral, Gemma, nanoGPT forks) under the backend:
``sqcompile.passes.rms_norm`` turns each exact spelling into one ``F.rms_norm`` node, which the
norm pass replaces by the L1 RMS norm (and reports), or keeps with ``norm="keep"`` /
overrides; anything norm-like that is not exactly an RMS norm stays as written.

``eps`` is large (0.05) so that passing the wrong one would show in the values.
"""
import importlib
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

import sqcompile
from sqcompile.decisions import latest_records
from sqcompile import norms
from sqcompile.kernels import cpu_norm
from sqcompile.norms import l1_rms_norm
from sqcompile.passes.rms_norm import NOTE

l1_norms_pass = importlib.import_module("sqcompile.passes.l1_norms")

from models import train

D, EPS = 8, 0.05


pytestmark = pytest.mark.usefixtures("one_thread_fresh_dynamo")


def _rsqrt_ms(x, eps, dims=-1):
    return torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)


# spelling -> (forward, weight the norm multiplies by: None, "w" or "1+w", normalized dims)
SPELLINGS = {
    "weight_first": (lambda m, x: m.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + m.eps), "w", 1),
    "llama": (lambda m, x: (lambda x32: x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + m.eps))(x.float())
              .type_as(x) * m.weight, "w", 1),
    "sqrt_x_times_x": (lambda m, x: x / torch.sqrt((x * x).mean(-1, keepdim=True) + m.eps), None, 1),
    "square_method": (lambda m, x: x * torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + m.eps) * m.weight, "w", 1),
    "torch_mean_power": (lambda m, x: x * torch.rsqrt(torch.mean(x ** 2, dim=-1, keepdim=True) + m.eps), None, 1),
    "gemma": (lambda m, x: (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + m.eps)
                            * (1.0 + m.weight.float())).type_as(x), "1+w", 1),
    "pow_minus_half": (lambda m, x: m.weight * (x * (torch.pow(x, 2).mean((-1,), keepdim=True) + m.eps) ** -0.5),
                       "w", 1),
    "method_chain": (lambda m, x: x.mul(x.pow(2).mean(-1, True).add(m.eps).rsqrt()).mul(m.weight), "w", 1),
    "two_trailing_dims": (lambda m, x: x * _rsqrt_ms(x, m.eps, (-2, -1)), None, 2),
}

# forward, and what the rewrite matched: None (nothing) or the weight-less norm with the rest kept
NEAR_MISSES = {
    "mean_over_dim0": lambda m, x: x * _rsqrt_ms(x, m.eps, 0),
    "mean_over_first_and_last": lambda m, x: x * _rsqrt_ms(x, m.eps, (0, -1)),
    "no_keepdim": lambda m, x: x * torch.rsqrt(x.pow(2).mean(-1) + m.eps)[..., None],
    "no_keepdim_broadcast": lambda m, x: x * torch.rsqrt(x.pow(2).mean(-1) + m.eps),    # x[i, j] / rms(row j)
    "inverse_rms_also_returned": lambda m, x: (lambda r: (x * r * m.weight, r))(_rsqrt_ms(x, m.eps)),
    "mean_also_returned": lambda m, x: (lambda ms: (x * torch.rsqrt(ms + m.eps) * m.weight, ms))(
        x.pow(2).mean(-1, keepdim=True)),
    "eps_outside_the_root": lambda m, x: x / (torch.sqrt(x.pow(2).mean(-1, keepdim=True)) + m.eps),
    "eps_a_buffer": lambda m, x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + m.eps_buffer),
    "other_numerator": lambda m, x: (x + 1) * _rsqrt_ms(x, m.eps),
    "cube_not_square": lambda m, x: x * torch.rsqrt(x.pow(3).abs().mean(-1, keepdim=True) + m.eps),
}
PARTIAL = {
    "normalized_also_returned": lambda m, x: (lambda y: (y * m.weight, y))(x * _rsqrt_ms(x, m.eps)),
    "times_a_gate": lambda m, x: x * _rsqrt_ms(x, m.eps) * x.sigmoid(),
}


class WrittenRMSNorm(nn.Module):
    def __init__(self, forward, d=D):
        super().__init__()
        self.fn, self.eps = forward, EPS
        self.weight = nn.Parameter(1 + 0.5 * torch.randn(d))
        self.register_buffer("eps_buffer", torch.tensor(EPS))

    def forward(self, x):
        return self.fn(self, x)


class Net(nn.Module):
    """Linear -> the norm -> Linear (``linears=False``: the norm alone, under ``norm``)."""

    def __init__(self, forward, linears=True):
        super().__init__()
        self.fc1 = nn.Linear(D, D) if linears else nn.Identity()
        self.norm = WrittenRMSNorm(forward)
        self.fc2 = nn.Linear(D, D) if linears else nn.Identity()

    def forward(self, x):
        return self.fc2(self.norm(self.fc1(x)))


def _compiled_step(model, x, **options):
    """Output, input gradient and parameter gradients of one compiled step, and its record."""
    torch._dynamo.reset()
    x = x.detach().clone().requires_grad_(True)
    model.zero_grad()
    torch.manual_seed(7)        # the same gradient rounding noise each time
    out = torch.compile(model, backend="shiftquant", options=options)(x)
    first = out[0] if isinstance(out, tuple) else out
    first.backward(torch.linspace(-1, 1, first.numel()).reshape(first.shape).to(first.dtype))
    assert not counters["graph_break"], dict(counters["graph_break"])
    return out, _grads(x, model), latest_records()[-1]


def _eager_step(model, x):
    x = x.detach().clone().requires_grad_(True)
    model.zero_grad()
    out = model(x)
    first = out[0] if isinstance(out, tuple) else out
    first.backward(torch.linspace(-1, 1, first.numel()).reshape(first.shape).to(first.dtype))
    return out, _grads(x, model)


def _grads(x, model):
    return [x.grad, *(p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters())]


def _norm_rows(rec):
    return [d for d in rec.decisions if d.kind == "norm"]


def _kernels(spelling, x):
    """``"cpu"`` where the norm runs on the C kernels of :mod:`sqcompile.kernels.cpu_norm` (rows
    of at least 16 adjacent values, on a machine that builds them), else ``"torch"``: the
    ``kernels`` of the reference :func:`l1_rms_norm`.  The two draw their gradient noise
    differently (``hash_noise`` from a drawn seed, ``uniform_noise``), so each is compared
    with its own."""
    _, weight, k = SPELLINGS[spelling]
    w = None if weight is None else torch.ones(D)
    fits = norms.cpu_kernel_unsupported("rms_norm", x, w, None, 8, None, normalized_shape=x.shape[-k:]) is None
    return "cpu" if cpu_norm.status()[0] and fits else "torch"


def _inputs(seed=0, shape=(2, 3, D), dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.randn(shape).to(dtype)


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_written_out_rms_norm_is_an_l1_rms_norm_in_the_report(spelling):
    model = Net(SPELLINGS[spelling][0])
    _, _, rec = _compiled_step(model, _inputs())
    row = [r for r in sqcompile.report(model).rows() if r["kind"] == "norm"]
    assert len(row) == 1, row
    assert row[0]["op"] == "rms_norm" and row[0]["module"] == "norm" and row[0]["quantized"]
    note = NOTE if _kernels(spelling, _inputs()) == "torch" else f"{NOTE}; {l1_norms_pass.CPU_KERNEL_NOTE}"
    assert row[0]["execution"] == "simulated" and row[0]["norm_bits"] == 8 and row[0]["region"] == note
    assert sqcompile.report(model).summary()["quantized"] == 3          # fc1, the norm, fc2
    assert "rsqrt" not in rec.graphs["rewritten"] and "sqrt" not in rec.graphs["rewritten"]
    assert rec.graphs["rewritten"].count("sqcompile.l1_rms_norm(") == 1


@pytest.mark.parametrize("options", [{"norm": "keep"}, {"norm": "keep", "quantize": False}],
                         ids=["keep", "keep_float"])
@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_kept_norm_computes_what_the_written_out_form_computes(spelling, options):
    """``norm="keep"``: the matched chain runs as ``F.rms_norm``, equal to eager up to float
    rounding (the Linears quantized or not)."""
    model = Net(SPELLINGS[spelling][0], linears=False)
    x = _inputs()
    out, grads, rec = _compiled_step(model, x, **options)
    want, want_grads = _eager_step(model, x)
    assert [(d.op, d.execution_label, d.note) for d in _norm_rows(rec)] == [("rms_norm", "float: norm='keep'", NOTE)]
    assert "F.rms_norm(" in rec.graphs["rewritten"]
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    for got, ref in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_default_options_give_the_l1_rms_norm_where_the_norm_is(spelling):
    """Output and gradients are those of ``sqcompile.norms.l1_rms_norm`` (8 bits, the module's ``eps``,
    the written weight, the same ``kernels``) applied to the input, with the same gradient
    rounding noise."""
    _, weight, k = SPELLINGS[spelling]
    model = Net(SPELLINGS[spelling][0], linears=False)
    x = _inputs()
    out, grads, _ = _compiled_step(model, x)

    xr = x.clone().requires_grad_(True)
    w = model.norm.weight.detach().clone().requires_grad_(True)
    gamma = {None: None, "w": w, "1+w": 1.0 + w}[weight]
    torch.manual_seed(7)
    want = l1_rms_norm(xr, x.shape[-k:], gamma, EPS, norm_bits=8, kernels=_kernels(spelling, x))
    want.backward(torch.linspace(-1, 1, want.numel()).reshape(want.shape))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], xr.grad, rtol=1e-5, atol=1e-5)
    if weight is not None:
        torch.testing.assert_close(grads[1], w.grad, rtol=1e-5, atol=1e-5)
    # and it is not the L2 norm it replaced
    assert (out - _eager_step(model, x)[0]).abs().max() > 1e-2


@pytest.mark.parametrize("spelling", ["llama", "gemma", "weight_first"])
def test_bfloat16_casts_are_absorbed_and_the_result_keeps_its_dtype(spelling):
    model = Net(SPELLINGS[spelling][0], linears=False).to(torch.bfloat16)
    x = _inputs(dtype=torch.bfloat16)
    out, grads, rec = _compiled_step(model, x, norm="keep", quantize=False)
    want, want_grads = _eager_step(model, x)
    assert [d.op for d in _norm_rows(rec)] == ["rms_norm"] and out.dtype == torch.bfloat16
    torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2)          # bfloat16 roundings
    for got, ref in zip(grads, want_grads, strict=True):
        assert got.dtype == ref.dtype
        torch.testing.assert_close(got, ref, rtol=5e-2, atol=5e-2)
    out, _, rec = _compiled_step(model, x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert _norm_rows(rec)[0].quantized


@pytest.mark.parametrize("near_miss", list(NEAR_MISSES))
def test_near_misses_are_left_as_written(near_miss):
    model = Net(NEAR_MISSES[near_miss], linears=False)
    x = _inputs(shape=(D, D, D))        # a mean without keepdim broadcasts
    out, grads, rec = _compiled_step(model, x)
    want, want_grads = _eager_step(model, x)
    assert not _norm_rows(rec)
    assert rec.graphs["rewritten"] == rec.graphs["dynamo"]
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    for got, ref in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("partial", list(PARTIAL))
def test_a_normalized_value_used_further_is_a_norm_without_weight(partial):
    """``x * rsqrt(mean(x^2) + eps)`` used elsewhere too or multiplied by something else than a
    weight is an RMS norm without a weight; what follows stays as written."""
    model = Net(PARTIAL[partial], linears=False)
    x = _inputs()
    out, grads, rec = _compiled_step(model, x, norm="keep")
    want, want_grads = _eager_step(model, x)
    assert [d.op for d in _norm_rows(rec)] == ["rms_norm"]
    assert f"F.rms_norm(l_x_, ({D},), None, {EPS})" in rec.graphs["rewritten"]
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    for got, ref in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("override", [{"norm": None}, {"*:rms_norm": None}, {"norm": {"norm": "keep"}}])
def test_overrides_keep_the_written_out_norm_in_float(override):
    model = Net(SPELLINGS["llama"][0])
    x = _inputs()
    _, _, rec = _compiled_step(model, x, overrides=override)
    (norm,) = _norm_rows(rec)
    assert norm.op == "rms_norm" and not norm.quantized and norm.note == NOTE
    assert [d.quantized for d in rec.decisions if d.kind == "gemm"] == [True, True]


class TinyLlama(nn.Module):
    """Pre-norm MLP blocks with LLaMA's RMSNorm and a final norm, as LLaMA's reference code."""

    def __init__(self, d=16, blocks=2):
        super().__init__()
        self.inp = nn.Linear(4, d)
        self.norms = nn.ModuleList(WrittenRMSNorm(SPELLINGS["llama"][0], d) for _ in range(blocks + 1))
        self.fc1 = nn.ModuleList(nn.Linear(d, 2 * d) for _ in range(blocks))
        self.fc2 = nn.ModuleList(nn.Linear(2 * d, d) for _ in range(blocks))
        self.head = nn.Linear(d, 1)

    def forward(self, x):
        h = self.inp(x)
        for norm, fc1, fc2 in zip(self.norms, self.fc1, self.fc2):
            h = h + fc2(F.silu(fc1(norm(h))))
        return self.head(self.norms[-1](h))


def test_llama_style_model_trains_with_every_norm_an_l1_norm():
    torch.manual_seed(0)
    model = TinyLlama()
    x = torch.randn(64, 4)
    y = (x[:, :1] * x[:, 1:2]).sin()
    losses = train(torch.compile(model, backend="shiftquant"), model.parameters(), [(x, y)] * 15, F.mse_loss)
    assert not counters["graph_break"] and all(map(math.isfinite, losses))
    assert sum(losses[-3:]) < 0.9 * sum(losses[:3]), losses
    summary = sqcompile.report(model).summary()
    assert (summary["norms"], summary["norms_quantized"]) == (3, 3)
    assert summary["quantized"] == summary["ops"] == 3 + 6


def test_written_out_norm_runs_on_the_triton_norm_kernel():
    """With the Triton family the matched norm is an RMSNorm like ``nn.RMSNorm``: one Triton
    kernel, fused with the next Linear's quantizer when that is its only user."""
    pytest.importorskip("triton")
    model = Net(SPELLINGS["llama"][0])
    _, _, rec = _compiled_step(model, _inputs(), kernels="triton", inner="eager", weight_bits=8, act_bits=8)
    (norm,) = _norm_rows(rec)
    assert norm.execution == "triton" and "l1_norm+quantize" in norm.region and norm.note == NOTE


def test_a_changed_batch_size_recompiles_with_the_norm_matched_again():
    """The graph Dynamo compiles after a batch size changes (symbolic batch and positions)
    matches as the static one: the normalized dims are static."""
    model = Net(SPELLINGS["llama"][0])
    run = torch.compile(model, backend="shiftquant")
    for batch in (2, 5, 7):
        run(torch.randn(batch, 3, D)).sum().backward()
    static, dynamic = latest_records()[-2:]
    for rec in (static, dynamic):
        assert [(d.op, d.quantized, d.note) for d in _norm_rows(rec)] == [("rms_norm", True, NOTE)]
    assert isinstance(_norm_rows(dynamic)[0].shapes[0][0], str)          # a symbolic batch size


# (two_trailing_dims normalizes over the sequence too, a symbolic size under dynamic=True: not matched)
@pytest.mark.parametrize("spelling", [s for s in SPELLINGS if s != "two_trailing_dims"])
def test_dynamic_true_matches_with_eps_a_graph_input(spelling):
    """Under ``dynamic=True`` Dynamo passes ``self.eps`` as a 0-dim tensor input read with
    ``.item()``; the pass reads its value, which makes Dynamo guard on it and compile the
    graph with that ``eps`` a constant: the norm is matched, and another instance with another
    ``eps`` compiles again instead of running with the wrong one."""
    x = _inputs()
    for eps in (EPS, 0.5):
        model = Net(SPELLINGS[spelling][0])       # (fc1 makes the normalized size static)
        model.norm.eps = eps
        run = torch.compile(model, backend="shiftquant", options={"norm": "keep", "quantize": False}, dynamic=True)
        for batch in (2, 5):
            xb = _inputs(shape=(batch, 3, D))
            torch.testing.assert_close(run(xb), model(xb), rtol=1e-5, atol=1e-6)
        rec = latest_records()[-1]
        assert [(d.op, d.note) for d in _norm_rows(rec)] == [("rms_norm", NOTE)], spelling
        assert "F.rms_norm(" in rec.graphs["rewritten"] and f", {eps})" in rec.graphs["rewritten"]
        assert isinstance(_norm_rows(rec)[0].shapes[0][0], str)            # a symbolic batch size
    assert not counters["graph_break"], dict(counters["graph_break"])
    # and the L1 norm by default, with the module's eps
    model = Net(SPELLINGS[spelling][0])
    run = torch.compile(model, backend="shiftquant", dynamic=True)
    run(x).sum().backward()
    (norm,) = _norm_rows(latest_records()[-1])
    assert norm.op == "rms_norm" and norm.quantized and norm.note == NOTE
    assert f"{EPS:g}" in latest_records()[-1].graphs["rewritten"]
