"""End-to-end: torch.compile(model, backend="shiftquant") against eager float PyTorch."""
import copy
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sqcompile
from sqcompile.decisions import latest_records, records_for

from models import Block, SmallCNN, rel, train

EIGHT = dict(weight_bits=8, act_bits=8, grad_bits=8, groups=1, norm="keep")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _grads(model, x, backend_options=None, seed=0):
    model = copy.deepcopy(model)
    run = model if backend_options is None else torch.compile(model, backend="shiftquant", options=backend_options)
    torch.manual_seed(seed)
    out = run(x)
    out.pow(2).mean().backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}, model


def _record_for(model):
    recs = records_for(list(model.parameters()))
    assert recs, "the backend left no record for this model"
    return recs[-1]


@pytest.mark.parametrize("execution", ["simulate", "integer"])
def test_cnn_every_conv_and_linear_is_quantized_and_8bit_grads_match_float(execution):
    torch.manual_seed(0)
    model = SmallCNN(norm=False)
    x = torch.randn(16, 1, 12, 12)
    ref_out, ref, _ = _grads(model, x)
    out, got, m = _grads(model, x, dict(EIGHT, execution=execution))
    rec = _record_for(m)
    gemms = [d for d in rec.decisions if d.kind == "gemm"]
    assert sorted(d.module_path for d in gemms) == ["conv1", "conv2", "down", "fc"]
    assert all(d.quantized and d.weight_bits == 8 for d in gemms)
    assert {d.execution for d in gemms} == {"int8-cpu" if execution == "integer" else "simulated"}
    # the ops are single visible nodes in the AOT graphs
    assert rec.graphs["forward"].count("sqcompile.quantize(") >= 8
    assert rec.graphs["backward"].count("sqcompile.shiftquant(") >= 7   # conv1's input needs no grad
    if execution == "integer":   # stride-1 convs: the implicit-GEMM op; the strided conv and fc: int8_mm
        assert rec.graphs["forward"].count("sqcompile.int8_conv(") == 2
        assert rec.graphs["forward"].count("sqcompile.int8_mm(") == 2
    # Tolerance: 8-bit per-channel weights / per-row activations give ~0.5% output error per
    # layer; the gradients add 8-bit stochastic rounding (unbiased, ~1% noise per GEMM) through
    # four layers, so 5% relative L2 error leaves room without hiding a wrong formula (a missing
    # scale or a transposed grouping gives errors of order 100%).
    assert rel(out, ref_out) < 0.02
    for name in ref:
        assert rel(got[name], ref[name]) < 0.05, name


def test_transformer_block_quantized_at_every_matmul_and_close_at_8_bits():
    torch.manual_seed(0)
    block = Block()
    x = torch.randn(4, 16, 32)
    ref_out, ref, _ = _grads(block, x)
    out, got, m = _grads(block, x, EIGHT)
    rec = _record_for(m)
    ops = sorted((d.module_path, d.op) for d in rec.decisions if d.kind == "gemm")
    assert ops == [("", "matmul"), ("", "matmul"), ("fc1", "linear"), ("fc2", "linear"),
                   ("proj", "linear"), ("qkv", "linear")]
    assert all(d.quantized for d in rec.decisions if d.kind == "gemm")
    # QK^T and PV quantize both operands at act_bits
    attn = [d for d in rec.decisions if d.op == "matmul"]
    assert all(d.weight_bits == d.act_bits == 8 for d in attn)
    assert rec.graphs["forward"].count("sqcompile.int8_mm(") == 6
    assert rel(out, ref_out) < 0.03
    for name in ref:
        if name.startswith("ln"):       # LayerNorm params see gradients of quantized GEMMs only
            continue
        assert rel(got[name], ref[name]) < 0.06, name


def test_sdpa_is_decomposed_into_two_quantized_gemms():
    torch.manual_seed(0)
    block = Block(sdpa=True)
    x = torch.randn(2, 8, 32)
    ref_out, _, _ = _grads(block, x)
    out, _, m = _grads(block, x, EIGHT)
    rec = _record_for(m)
    sdpa = [d for d in rec.decisions if d.op == "scaled_dot_product_attention"]
    assert len(sdpa) == 1 and sdpa[0].quantized
    assert rec.graphs["forward"].count("sqcompile.int8_mm(") == 6
    assert rel(out, ref_out) < 0.03


def test_4_bit_gradients_differ_from_float_yet_training_converges():
    torch.manual_seed(0)
    model = SmallCNN(classes=4, norm=False)
    x, y = _textures(128)
    _, ref, _ = _grads(model, x)
    _, got, _ = _grads(model, x, {})           # defaults: 4/4/4 bits, ShiftQuant G=4
    assert max(rel(got[n], ref[n]) for n in ref) > 0.05   # quantization really happens

    compiled = torch.compile(model, backend="shiftquant")
    losses = train(compiled, model.parameters(), [(x, y)] * 60, F.cross_entropy, lr=3e-3)
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5


def _textures(n):
    """Four texture classes (horizontal / vertical stripes, checkerboard, flat) plus noise."""
    i = torch.arange(8)
    patterns = torch.stack([(i[:, None] % 2).expand(8, 8), (i[None, :] % 2).expand(8, 8),
                            (i[:, None] + i[None, :]) % 2, torch.zeros(8, 8, dtype=torch.long)]).float()
    y = torch.arange(n) % 4
    x = patterns[y].unsqueeze(1) * 2 - 1 + 0.5 * torch.randn(n, 1, 8, 8)
    return x, y


def test_model_state_is_untouched():
    model = SmallCNN()
    keys = list(model.state_dict())
    compiled = torch.compile(model, backend="shiftquant")
    compiled(torch.randn(4, 1, 8, 8)).sum().backward()
    assert list(model.state_dict()) == keys
    assert list(compiled.state_dict()) == [f"_orig_mod.{k}" for k in keys]
    assert all(type(p) is nn.Parameter and p.dtype == torch.float32 for p in model.parameters())
    assert isinstance(model.conv1, nn.Conv2d)   # nothing swapped in the user's module


def test_overrides_keep_modules_in_float_and_other_bits():
    model = SmallCNN(norm=False)
    compiled = torch.compile(model, backend="shiftquant",
                             options={"overrides": {"conv1": {"weight_bits": 8, "act_bits": 8}, "fc": None}})
    compiled(torch.randn(2, 1, 8, 8))
    by_path = {d.module_path: d for d in _record_for(model).decisions}
    assert by_path["conv1"].weight_bits == 8 and by_path["conv2"].weight_bits == 4
    assert not by_path["fc"].quantized and "overrides['fc']" in by_path["fc"].execution_label


@pytest.mark.parametrize("compile_how", ["torch.compile", "in place", "inner of an eager wrapper"])
def test_overrides_and_paths_hold_across_a_graph_break(compile_how):
    """A full backward hook on ``fc2`` breaks the graph; Dynamo compiles the rest of the
    forward as a frame of its own, where ``fc3`` is a stack value (its module path was ""):
    ``overrides={"fc3": None}`` matched nothing, warned, and the classifier ran at 4 bits."""
    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 10)

        def forward(self, x):
            return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))

    class Wrapper(nn.Module):      # not compiled; its compiled child is the root of the paths
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) * 2

    torch._dynamo.reset()
    torch.manual_seed(0)
    m = MLP()
    m.fc2.register_full_backward_hook(lambda module, grad_in, grad_out: None)
    options = {"overrides": {"fc3": None}}
    if compile_how == "in place":
        m.compile(backend="shiftquant", options=options)
        run = m
    elif compile_how == "torch.compile":
        run = torch.compile(m, backend="shiftquant", options=options)
    else:
        run = Wrapper(torch.compile(m, backend="shiftquant", options=options))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(torch.randn(16, 32)).sum().backward()
    assert not [w for w in caught if "overrides" in str(w.message)]     # "pattern matches no module"
    rows = {d.module_path: d for r in records_for(list(m.parameters())) for d in r.decisions}
    assert rows["fc1"].quantized
    assert not rows["fc3"].quantized and "overrides" in rows["fc3"].reason
    assert "" not in rows
    torch._dynamo.reset()


def test_torch_func_transforms_run_in_float_with_a_reason():
    """Per-sample gradients (``vmap(grad(loss))``) under the backend: the quantized autograd
    functions cannot run inside a ``torch.func`` transform (they raised "must override the
    setup_context staticmethod"), so the graph stays float, equal to eager, with report rows
    that say why."""
    from torch.func import functional_call, grad, vmap

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, x, y):
        return F.cross_entropy(functional_call(model, p, (x[None],)), y[None])

    x, y = torch.randn(5, 8), torch.randint(0, 3, (5,))
    per_sample = torch.compile(vmap(grad(loss), in_dims=(None, 0, 0)), backend="shiftquant")(params, x, y)
    ref = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    assert all(torch.allclose(per_sample[k], ref[k], atol=1e-6) for k in ref)
    rows = [d for r in records_for(list(params.values())) for d in r.decisions]
    assert len(rows) == 2 and all(not d.quantized and "torch.func.vmap" in d.reason for d in rows)
    assert sorted(d.module_path for d in rows) == ["0", "2"]        # not the closure cells' names
    torch._dynamo.reset()


@pytest.mark.parametrize("raw, path", [("L['self'].layer1[0].conv1", "layer1.0.conv1"), ("L['fn'].0.conv", "0.conv"),
                                       ("G['model'].fc", "model.fc"), ("G['__import___main__'].m.fc", "m.fc"),
                                       ("getattr(L['func'].__closure__[1].cell_contents, '0')", "0")])
def test_module_paths_drop_dynamos_frame_and_global_names(raw, path):
    """A module a compiled function reaches as a global read ``G.__import___main__.m``."""
    from sqcompile.passes.common import normalize_path

    assert normalize_path(raw) == path


def test_op_overrides_keep_attention_float_and_match_eager_attention():
    torch.manual_seed(0)
    model = Block(sdpa=True)
    x = torch.randn(2, 8, 32)
    key = "*:scaled_dot_product_attention"
    out, grads, qmodel = _grads(model, x, {"overrides": {key: None}, "norm": "keep"})
    decisions = _record_for(qmodel).decisions
    by_op = {}
    for d in decisions:
        by_op.setdefault(d.op, []).append(d)
    (sdpa,) = by_op["scaled_dot_product_attention"]
    assert not sdpa.quantized and f"overrides[{key!r}]" in sdpa.execution_label
    assert by_op["linear"] and all(d.quantized for d in by_op["linear"])
    # Only the attention is float: with the Linears quantized too, the output differs from
    # eager; with them kept float as well, it is eager's attention exactly.
    ref_out, ref_grads, _ = _grads(model, x)
    assert rel(out, ref_out) > 1e-3
    torch._dynamo.reset()
    out2, grads2, _ = _grads(model, x, {"overrides": {key: None, "*:linear": None}, "norm": "keep"})
    torch.testing.assert_close(out2, ref_out)
    torch.testing.assert_close(grads2, ref_grads)


def test_unsupported_ops_stay_float_are_reported_and_train():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.bag = nn.EmbeddingBag(10, 3, mode="sum")
            self.up = nn.ConvTranspose1d(8, 8, 2, stride=2)
            self.fc = nn.Linear(8, 3)

        def forward(self, idx):
            h = self.up(self.emb(idx).transpose(1, 2)).transpose(1, 2)
            return self.fc(h).mean(1) + self.bag(idx)

    model = M()
    compiled = torch.compile(model, backend="shiftquant")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    idx = torch.randint(0, 10, (4, 5))
    for _ in range(3):
        loss = compiled(idx).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    by_op = {d.op: d for d in _record_for(model).decisions}
    assert by_op["linear"].quantized
    assert not by_op["embedding"].quantized and "embedding" in by_op["embedding"].reason
    assert not by_op["embedding_bag"].quantized and "embedding" in by_op["embedding_bag"].reason
    assert by_op["conv_transpose1d"].quantized      # float until 2026-11-30
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("execution", ["simulate", "integer"])
def test_decoder_with_transposed_convs_is_quantized_and_8bit_grads_match_float(execution):
    """An encoder-decoder (strided conv down, ``ConvTranspose2d`` up with ``output_padding``, a
    1-d transposed conv with groups): every conv is quantized, the groups=1 ones as int8
    GEMMs, and 8-bit training gradients stay within a few percent of float autograd's."""
    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.down = nn.Conv2d(2, 8, 3, stride=2, padding=1)
            self.up = nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1)
            self.mix = nn.ConvTranspose1d(4, 4, 3, padding=1, groups=2)

        def forward(self, x):
            y = self.up(F.relu(self.down(x)))
            return self.mix(y.flatten(2)).view_as(y)

    torch.manual_seed(0)
    model = Decoder()
    x = torch.randn(4, 2, 10, 10)
    ref_out, ref, _ = _grads(model, x)
    out, got, m = _grads(model, x, dict(EIGHT, execution=execution))
    by_path = {d.module_path: d for d in _record_for(m).decisions}
    assert sorted(by_path) == ["down", "mix", "up"] and all(d.quantized for d in by_path.values())
    assert by_path["up"].execution == ("int8-cpu" if execution == "integer" else "simulated")
    assert by_path["mix"].execution.startswith("simulated") and \
        (execution == "simulate" or "grouped transposed" in by_path["mix"].reason)
    assert rel(out, ref_out) < 0.02
    # measured (seeds 0-2): the transposed convs' own gradients 0.1-1.1%; ``down``'s, which
    # takes two quantized input gradients through a ReLU, 1.2-5.5% -- as with ``Conv2d`` /
    # ``Conv1d`` in their places (1.2-6.1%)
    for name in ref:
        assert rel(got[name], ref[name]) < (0.1 if name.startswith("down") else 0.03), name


@pytest.mark.parametrize("track", [True, False])
def test_instance_norm_becomes_an_l1_instance_norm_and_keeps_its_buffers_semantics(track):
    """``nn.InstanceNorm2d`` runs as :func:`sqcompile.norms.l1_instance_norm` with the module's
    own buffers: the compiled training step gives the function's output and updates
    ``running_mean`` / ``running_var`` as the function does on a copy; in eval the running
    statistics normalize (with ``track_running_stats``), else each instance's own."""
    from sqcompile.norms import l1_instance_norm

    torch.manual_seed(0)
    norm = nn.InstanceNorm2d(3, affine=True, track_running_stats=track, momentum=0.3)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    ref_buffers = [b.clone() for b in (norm.running_mean, norm.running_var)] if track else [None, None]
    compiled = torch.compile(norm, backend="shiftquant", options={"norm_bits": 8})
    for step in range(2):
        x = (torch.randn(4, 3, 5, 6) * (step + 1) + step).requires_grad_()
        want = l1_instance_norm(x.detach(), *ref_buffers, norm.weight, norm.bias, True, 0.3, norm.eps, norm_bits=8)
        y = compiled(x)
        torch.testing.assert_close(y, want)
        y.square().sum().backward()
    if track:
        torch.testing.assert_close(norm.running_mean, ref_buffers[0])
        torch.testing.assert_close(norm.running_var, ref_buffers[1])
    (row,) = sqcompile.report(compiled).rows()
    assert (row["op"], row["quantized"], row["norm_bits"]) == ("instance_norm", True, 8)
    assert all(torch.isfinite(t.grad).all() for t in (x, norm.weight, norm.bias))
    norm.eval()
    x = torch.randn(2, 3, 5, 6)
    want = l1_instance_norm(x, *ref_buffers, norm.weight, norm.bias, not track, 0.3, norm.eps, norm_bits=8)
    torch.testing.assert_close(compiled(x), want)


def test_nan_and_inf_gradients_propagate():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    compiled = torch.compile(model, backend="shiftquant")
    out = compiled(torch.randn(4, 8))
    g = torch.ones_like(out)
    g[0, 0] = float("inf")
    out.backward(g)
    w = model[2].weight.grad
    assert not torch.isfinite(w).all()              # not silently zeroed
    model.zero_grad()
    out = compiled(torch.randn(4, 8))
    out.backward(torch.full_like(out, float("nan")))
    assert torch.isnan(model[0].weight.grad).any()


def test_zero_inputs_give_zero_not_nan():
    model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 2, bias=False))
    compiled = torch.compile(model, backend="shiftquant")
    out = compiled(torch.zeros(3, 8))
    assert torch.equal(out, torch.zeros(3, 2))
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_bf16_model_keeps_its_dtype():
    model = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4)).to(torch.bfloat16)
    compiled = torch.compile(model, backend="shiftquant", options={"weight_bits": 8, "act_bits": 8})
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    out = compiled(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(p.grad.dtype == torch.bfloat16 for p in model.parameters())
    assert rel(out.float(), model(x).float()) < 0.05


def test_operands_of_different_dtypes_are_refused_as_eager_refuses_them():
    """A float32 batch into a bfloat16 model: eager PyTorch raises; quantized, the op would
    run (the quantizers take any float dtype), so it raises too, naming the dtypes."""
    model = nn.Linear(16, 4).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="mat1 and mat2 must have the same dtype"):
        model(torch.randn(2, 16))
    with pytest.raises(Exception, match="operands of linear to have the same dtype.*float32, bfloat16"):
        torch.compile(model, backend="shiftquant")(torch.randn(2, 16))


class _Mixed(nn.Module):
    """A conv, a Linear, attention, an einsum and a bmm: every GEMM spelling autocast casts."""

    def __init__(self):
        super().__init__()
        self.conv, self.lin = nn.Conv1d(4, 8, 3, padding=1), nn.Linear(8, 8)
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        h = self.lin(self.conv(x).transpose(1, 2))                                   # [B, T, 8]
        q = h.view(h.shape[0], -1, 2, 4).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, q, q).transpose(1, 2).reshape(h.shape)
        return torch.einsum("btd,de->bte", a, self.w) + torch.bmm(h.mT, h)[:, :h.shape[1]]


@pytest.mark.parametrize("options", [{}, {"execution": "simulate"}, {"inner": "inductor"}])
def test_autocast_gives_quantized_ops_the_dtype_it_gives_eager_ops(options):
    """Under ``torch.autocast`` every GEMM's result is in the autocast dtype in eager mode; the
    quantized ops return the same dtype (they returned float32), with values as close to the
    eager autocast result as 8-bit quantization allows, and float32 parameter gradients."""
    torch.manual_seed(0)
    model = _Mixed()
    x = torch.randn(2, 4, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(x)
        out = torch.compile(model, backend="shiftquant", options={**EIGHT, **options})(x)
    assert ref.dtype == torch.bfloat16 and out.dtype == torch.bfloat16
    assert rel(out.float(), ref.float()) < 0.05
    out.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters())


class _Checkpointed(nn.Module):
    def __init__(self, mode=None):
        super().__init__()
        self.mode = mode
        self.a, self.ln, self.c = nn.Linear(32, 64), nn.LayerNorm(64), nn.Linear(64, 10)

    def body(self, t):
        return F.relu(self.ln(self.a(t)))

    def forward(self, x):
        if self.mode is None:
            return self.c(self.body(x))
        return self.c(torch.utils.checkpoint.checkpoint(self.body, x, use_reentrant=self.mode == "reentrant"))


@pytest.mark.parametrize("mode", ["non-reentrant", "reentrant"])
def test_ops_inside_an_activation_checkpoint_are_quantized_and_reported(mode):
    """Dynamo puts a checkpointed region in a subgraph that a higher-order op runs; its Linear
    and LayerNorm stayed float L2 ops and left the report.  Now they are rewritten like the
    rest, reported in graph order, and the step's gradients are the uncheckpointed compiled
    model's bit for bit (the recomputed forward quantizes as the first one did); override
    patterns see the modules inside."""
    torch.manual_seed(0)
    plain, ckpt = _Checkpointed(), _Checkpointed(mode)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(64, 32)
    for model in (plain, ckpt):
        torch.manual_seed(1)
        torch.compile(model, backend="shiftquant", options=EIGHT | {"norm": "l1"})(x).pow(2).sum().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.equal(p.grad, q.grad), name
    rows = [(d.module_path, d.op, d.quantized) for d in _record_for(ckpt).decisions]
    assert rows == [("a", "linear", True), ("ln", "layer_norm", True), ("c", "linear", True)]
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")           # "a" matches a module inside the checkpoint
        torch.compile(ckpt, backend="shiftquant", options={"overrides": {"a": None}})(x)
    assert [d.quantized for d in _record_for(ckpt).decisions] == [False, True, True]


@pytest.mark.parametrize("options", [{}, {"execution": "simulate"}, {"inner": "inductor"}])
def test_empty_batches_give_empty_outputs_and_zero_gradients(options):
    """A batch of 0 rows (or 0 positions): PyTorch returns empty outputs and zero weight
    gradients; the quantizers' maxima over nothing are 0 (scale 0), not an error."""
    for m, x in ((nn.Linear(16, 8), torch.randn(0, 16)), (nn.Linear(16, 8), torch.randn(2, 0, 16)),
                 (nn.Conv2d(3, 4, 3), torch.randn(0, 3, 5, 5))):
        torch._dynamo.reset()
        y = torch.compile(m, backend="shiftquant", options=options)(x)
        assert y.shape == m(x).shape
        y.sum().backward()
        assert torch.equal(m.weight.grad, torch.zeros_like(m.weight))


@pytest.mark.parametrize("options", [{}, {"inner": "inductor"}])
def test_routed_experts_with_data_dependent_token_counts_are_quantized(options):
    """Token-choice mixture of experts: ``nonzero`` -> ``index_select`` -> expert Linear ->
    ``index_add`` (traced with ``capture_dynamic_output_shape_ops``): the expert's row count
    is unknown until run time, and the layout and prescale checks on the GEMM path, and the
    outer scales' maxima over the tokens, guarded on it (``GuardOnDataDependentSymNode``);
    the same graph then runs an expert that no token chose."""
    class Routed(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.expert = nn.Linear(16, 2), nn.Linear(16, 16)

        def forward(self, x):
            tokens = torch.nonzero(self.gate(x).argmax(-1) == 0).squeeze(1)
            return torch.zeros_like(x).index_add(0, tokens, self.expert(x.index_select(0, tokens)))

    torch._dynamo.reset()
    torch.manual_seed(0)
    m, x = Routed(), torch.randn(32, 16)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        compiled = torch.compile(m, backend="shiftquant", options={**EIGHT, **options})
        y = compiled(x)
        y.square().sum().backward()
        grads = [p.grad.clone() for p in m.expert.parameters()]
        m.zero_grad()
        ref = m(x)
        ref.square().sum().backward()
        assert rel(y, ref) < 0.02
        assert all(rel(g, p.grad) < 0.05 for g, p in zip(grads, m.expert.parameters()))
        rows = {d.module_path: d for d in _record_for(m).decisions}
        assert rows["expert"].quantized and rows["gate"].quantized
        with torch.no_grad():      # no token for the expert: the same graph with 0 rows
            m.gate.bias.copy_(torch.tensor([-1e4, 1e4]))
        m.zero_grad()
        y = compiled(x)
        y.square().sum().backward()
        assert torch.equal(y, torch.zeros_like(x))
        assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in m.expert.parameters())
    torch._dynamo.reset()


def test_linear_with_a_1d_weight_is_the_dot_product_form():
    """``F.linear(x, w)`` with ``w`` of shape ``[in]`` gives ``[...]``, one value per row."""
    torch.manual_seed(0)
    w = torch.randn(16, requires_grad=True)
    x = torch.randn(4, 16)
    y = torch.compile(lambda x, w: F.linear(x, w), backend="shiftquant", options=EIGHT)(x, w)
    ref = F.linear(x, w)
    assert y.shape == ref.shape and rel(y.detach(), ref.detach()) < 0.02
    y.sum().backward()
    assert w.grad.shape == w.shape and rel(w.grad, x.sum(0)) < 0.02


def test_rms_norm_without_eps_gets_the_dtypes_epsilon():
    """``nn.RMSNorm(eps=None)`` means eps = finfo(dtype).eps in PyTorch: the L1 norm gets the
    same, as for that eps given explicitly (a row of zeros bounded the same)."""
    x = torch.randn(3, 8) * 1e-5
    x[1] = 0
    results = []
    for eps in (None, torch.finfo(torch.float32).eps):
        torch._dynamo.reset()
        xx = x.clone().requires_grad_()
        y = torch.compile(nn.RMSNorm(8, eps=eps), backend="shiftquant", options={"quantize": False})(xx)
        y.sum().backward()
        results.append((y.detach(), xx.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_backend_resolves_in_a_fresh_process_without_importing_sqcompile():
    script = textwrap.dedent("""
        import sys, torch
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        out = torch.compile(model, backend="shiftquant")(torch.randn(4, 8))
        out.sum().backward()
        rec = sys.modules["sqcompile"].decisions.latest_records()[-1]
        assert all(d.quantized for d in rec.decisions), rec.decisions
        print("ok", len(rec.decisions))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.abspath(__file__)) + "/..", timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "ok 2"


def test_cudagraphs_option_is_a_no_op_on_cpu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(8, 16)
    _, ref, _ = _grads(model, x, {"execution": "simulate", "inner": "inductor"})
    _, got, _ = _grads(model, x, {"execution": "simulate", "inner": "inductor", "cudagraphs": True})
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
def test_cudagraphs_replays_train_with_fresh_stochastic_noise():
    """Captured forward/backward: gradients follow the uncaptured compile's within
    quantization noise, replays draw new rounding noise, and training makes progress."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 8)).cuda()
    x, y = torch.randn(256, 64, device="cuda"), torch.randint(0, 8, (256,), device="cuda")
    options = {"kernels": "triton", "execution": "integer", "grad_bits": 8, "cudagraphs": True}
    compiled = torch.compile(model, backend="shiftquant", options=options)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    grads, losses = [], []
    for step in range(12):
        loss = F.cross_entropy(compiled(x), y)
        loss.backward()
        losses.append(loss.item())
        if step in (4, 5):   # warm-up and recording are over: these are replays
            grads.append(model[0].weight.grad.clone())
            opt.zero_grad()
            continue
        opt.step()
        opt.zero_grad()
    assert not torch.equal(grads[0], grads[1])             # same weights and input, new noise
    assert rel(grads[1], grads[0]) < 0.2                    # ... but the same gradient
    assert losses[-1] < losses[0]


def test_graphs_for_inductor_keep_each_ops_origin():
    """The retrace that inlines the quantizers for Inductor keeps every node's ``original_aten``
    (and stack): Inductor names its kernels after them, so a profile of a compiled step shows
    ``..._softmax_backward_data_masked_fill_mul...`` instead of ``triton_per_fused_13``."""
    from torch._inductor.utils import run_and_get_code
    from sqcompile.backends import lowering

    seen = []
    original = lowering.decompose_for_inductor

    def spy(gm, example_inputs):
        out = original(gm, example_inputs)
        seen.append([n for n in out.graph.nodes if n.op == "call_function"])
        return out

    class Attention(nn.Module):
        def forward(self, q, k):
            return (q @ k.transpose(-1, -2)).softmax(-1)

    torch._dynamo.reset()
    q, k = torch.randn(2, 8, 16, requires_grad=True), torch.randn(2, 8, 16)
    model = torch.compile(Attention(), backend="shiftquant", options={"inner": "inductor", "execution": "simulate"})
    lowering.decompose_for_inductor, saved = spy, lowering.decompose_for_inductor
    try:
        _, codes = run_and_get_code(lambda: model(q, k).square().sum().backward())
    finally:
        lowering.decompose_for_inductor = saved
    assert len(seen) == 2 and all(n.meta.get("original_aten") is not None for nodes in seen for n in nodes)
    import re                                     # the softmax's kernels are named after it
    assert re.search(r"(cpp|triton_\w+)_fused_\w*_softmax", "\n".join(codes))
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_int8_tensors_read_twice_are_marked_to_be_stored():
    """``lowering.materialize_integers``: an int8 tensor the graph computes and then reads more
    than once (through its dequantize) gets an identity ``as_strided``, which makes Inductor
    store the int8 values; one read once, or an int8 input, is left alone; values unchanged."""
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx
    from sqcompile.backends.lowering import materialize_integers

    def twice(x, s, q_in):
        d = ((x / s).round().clamp(-127, 127).to(torch.int8).float() * s)
        return d.sum(0), d.sum(1), q_in.float() * s + q_in.float()

    def once(x, s):
        return ((x / s).round().clamp(-127, 127).to(torch.int8).float() * s).sum()

    x, s, q_in = torch.randn(6, 5), torch.rand(6, 1) + 0.1, torch.randint(-9, 9, (6, 5), dtype=torch.int8)
    for fn, args, marked in ((twice, (x, s, q_in), 1), (once, (x, s), 0)):
        gm = make_fx(fn, decomposition_table=select_decomp_table())(*args)
        want = gm(*args)
        assert materialize_integers(gm.graph) == marked
        gm.recompile()
        views = [n for n in gm.graph.nodes if n.target is torch.ops.aten.as_strided.default]
        assert len(views) == marked and all(v.args[0].meta["val"].dtype == torch.int8 for v in views)
        leaves = torch.utils._pytree.tree_leaves
        assert all(torch.equal(a, b) for a, b in zip(leaves(gm(*args)), leaves(want), strict=True))


def test_tall_column_sums_are_split_into_chunks_of_rows():
    """``lowering.split_column_sums``: a sum of a tall contiguous CPU tensor over its leading
    dims (a bias or norm-weight gradient) becomes partial sums over chunks of 64 rows, then
    their sum (Inductor's one-step code walks the whole height per column block); the values
    agree up to float order.  Sums it cannot or need not split are left: too few rows, rows
    not a multiple of the chunk, a trailing dim reduced, a non-float tensor."""
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx
    from sqcompile.backends.lowering import COLUMN_SUM_CHUNK, split_column_sums

    def sums(x, y, z, i):
        return x.sum(0), x.sum((0, 1), keepdim=True), y.sum(0), x.sum(2), z.sum(0), i.sum(0)

    rows = 4 * COLUMN_SUM_CHUNK
    args = (torch.randn(rows // 4, 4, 32), torch.randn(rows - 1, 32), torch.randn(2 * COLUMN_SUM_CHUNK, 32),
            torch.randint(0, 9, (rows, 32)))
    gm = make_fx(sums, decomposition_table=select_decomp_table())(*args)
    want = gm(*args)
    assert split_column_sums(gm.graph) == 1            # only x.sum((0, 1)): x.sum(0) has 64 rows
    gm.recompile()
    got = gm(*args)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert [n.args[1] for n in gm.graph.nodes if n.target is torch.ops.aten.sum.dim_IntList].count([1]) == 1


def test_symbolic_column_sums_are_split_for_every_row_count():
    """Under symbolic sizes (``dynamic=True``) a tall column sum is split where its rows'
    hint is: chunks of 64 over the first ``rows // 64 * 64`` rows, the rest added last, so
    that the graph serves every row count, a multiple of 64 or not, fewer than 64 too; the
    values agree with the one-step sum up to float order.  A sum whose hint has few rows is
    left."""
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx
    from sqcompile.backends.lowering import COLUMN_SUM_CHUNK, split_column_sums

    def sums(x, y):            # 32 static columns (as a Linear's are), the rows symbolic
        columns = torch.linspace(-1.0, 1.0, 32)
        x, y = x.unsqueeze(-1) * columns, y.unsqueeze(-1) * columns
        return x.sum(0), x.sum((0, 1)), y.sum(0)

    rows = 4 * COLUMN_SUM_CHUNK + 27
    gm = make_fx(sums, decomposition_table=select_decomp_table(), tracing_mode="symbolic")(
        torch.randn(rows, 3), torch.randn(7))
    mode = next(n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder").fake_mode
    assert split_column_sums(gm.graph, mode) == 1        # x.sum((0, 1)); x.sum(0)'s rows are x.shape[0]
    gm.recompile()
    assert sum(n.target is torch.ops.aten.slice.Tensor for n in gm.graph.nodes) == 2
    for n in (rows, 2 * rows, 5 * COLUMN_SUM_CHUNK, 9):
        args = (torch.randn(n, 3), torch.randn(n % 11 + 2))
        for got, want in zip(gm(*args), sums(*args), strict=True):
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_cuda_compiles_without_cuda_graphs_get_one_hint():
    """A CUDA compile that launches from Python (host-bound at transformer sizes) is told
    about ``cudagraphs=True``; CPU compiles, CUDA-graph compiles and the configurations that
    cannot use CUDA graphs (``collect_stats``, the eager inner compiler) are not."""
    from sqcompile.backends.shiftquant import cudagraphs_hint
    from sqcompile.config import Config
    from sqcompile.passes.precision import Target
    cuda, cpu = Target(device="cuda", triton_ok=True), Target(device="cpu", triton_ok=True)
    hint = cudagraphs_hint(Config(), cuda)
    assert hint and "cudagraphs" in hint and "overwritten" in hint
    assert cudagraphs_hint(Config(), cpu) is None
    assert cudagraphs_hint(Config(inner="inductor", cudagraphs=True), cuda) is None
    assert cudagraphs_hint(Config(collect_stats=True), cuda) is None
    assert cudagraphs_hint(Config(inner="eager"), cuda) is None
