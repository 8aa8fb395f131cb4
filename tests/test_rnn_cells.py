"""nn.LSTMCell, nn.GRUCell and nn.RNNCell (tanh, relu) unrolled by hand.

Dynamo leaves each step one ``lstm_cell`` / ``gru_cell`` / ``rnn_tanh_cell`` / ``rnn_relu_cell``
node; :mod:`sqcompile.passes.composite` splits it into two ``linear`` nodes (input and recurrent
projection, reported under the cell's module path) and the float gates of
:func:`sqcompile.ops.rnn_cell_step`.  Checked as the other composite splits are: with
``quantize=False`` the split graph gives PyTorch's outputs and every gradient (float rounding
only), at 8 bits with one ShiftQuant group every GEMM runs in integer and stays close to float.
"""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import sqcompile  # noqa: F401  (registers the backend)
from sqcompile.config import Config
from sqcompile.decisions import new_record
from sqcompile.passes.composite import composite_gemms
from sqcompile.passes.precision import Target
from sqcompile.report import report

Q8 = dict(weight_bits=8, act_bits=8, grad_bits=8, groups=1)
FLOAT = dict(quantize=False)
KINDS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
NOTE = {"lstm": "nn.LSTMCell", "gru": "nn.GRUCell", "rnn_tanh": "nn.RNNCell (tanh)", "rnn_relu": "nn.RNNCell (relu)"}
T, B, IN, HID = 3, 2, 3, 6


pytestmark = pytest.mark.usefixtures("one_thread_fresh_dynamo")


def make_cell(kind: str, bias: bool = True, in_features: int = IN) -> nn.Module:
    if kind == "lstm":
        return nn.LSTMCell(in_features, HID, bias=bias)
    if kind == "gru":
        return nn.GRUCell(in_features, HID, bias=bias)
    return nn.RNNCell(in_features, HID, bias=bias, nonlinearity=kind[len("rnn_"):])


class Unrolled(nn.Module):
    """One cell run ``T`` steps three times: batched from no ``hx`` (the module's zeros),
    batched from a given ``hx``, and unbatched (1-d inputs) from no ``hx``."""

    def __init__(self, kind: str, bias: bool = True):
        super().__init__()
        self.lstm = kind == "lstm"
        self.cell = make_cell(kind, bias)

    def run(self, x, state):
        outs = []
        for t in range(x.shape[0]):
            state = self.cell(x[t], state)
            outs.append(torch.cat(state, -1) if self.lstm else state)    # c as well as h
        return torch.stack(outs).flatten()

    def forward(self, x, h0):
        given = (h0, torch.tanh(h0)) if self.lstm else h0
        return torch.cat([self.run(x, None), self.run(x, given), self.run(x[:, 0], None)])


def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(T, B, IN, generator=g), torch.randn(B, HID, generator=g)


def eager_and_compiled(model: nn.Module, args, options):
    """Outputs and gradients (parameters by name, then the inputs) of ``model`` in eager and
    compiled with ``options`` (loss: sum of squares), and the report."""
    def step(fn):
        xs = [a.clone().requires_grad_() for a in args]
        model.zero_grad(set_to_none=True)
        out = fn(*xs)
        out.pow(2).sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        grads.update({f"input{i}": x.grad for i, x in enumerate(xs)})
        return out.detach(), grads

    ref, ref_grads = step(model)
    cm = torch.compile(model, backend="shiftquant", options=options)
    out, grads = step(cm)
    return (out, grads), (ref, ref_grads), report(cm)


def cosine(a, b) -> float:
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def expected_rows(kind: str):
    """(module, op, region, shapes, flops) of the linears of one ``Unrolled`` call, in order."""
    rows = []
    for batch in (B, B, 1):                     # 1: the unbatched run (the module unsqueezes)
        for _ in range(T):
            for what, k in (("input", IN), ("recurrent", HID)):
                w = [GATES[kind] * HID, k]
                rows.append(("cell", "linear", f"{NOTE[kind]} {what} projection", [[batch, k], w],
                             2 * batch * w[0] * w[1]))
    return rows


def rows_of(rep):
    return [(r["module"], r["op"], r["region"], r["shapes"], r["flops"]) for r in rep.rows()]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("kind", KINDS)
def test_cell_split_gives_pytorchs_result_in_float(kind, bias):
    torch.manual_seed(0)
    model = Unrolled(kind, bias)
    (out, grads), (ref, ref_grads), rep = eager_and_compiled(model, inputs(), FLOAT)
    torch.testing.assert_close(out, ref)
    assert grads.keys() == ref_grads.keys() and len(grads) == (6 if bias else 4)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], msg=name)
    assert rows_of(rep) == expected_rows(kind)
    assert all(r["execution"] == "float: quantize=False" for r in rep.rows())
    assert [r["node"].partition("#")[2] for r in rep.rows()] == ["ih", "hh"] * 3 * T


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("kind", KINDS)
def test_cells_quantized_at_8_bits_follow_float(kind, bias):
    torch.manual_seed(0)
    model = Unrolled(kind, bias)
    (out, grads), (ref, ref_grads), rep = eager_and_compiled(model, inputs(), Q8)
    assert cosine(out, ref) > 0.99
    for name, g in grads.items():
        assert cosine(g, ref_grads[name]) > 0.99, name
    assert rows_of(rep) == expected_rows(kind)
    for r in rep.rows():
        assert r["quantized"] and r["execution"] == "int8-cpu"
        assert (r["weight_bits"], r["act_bits"], r["grad_bits"], r["groups"]) == (8, 8, 8, 1)
        assert r["weight_quantizer"] == "per-output-channel, nearest"
    s = rep.summary()
    assert s["gemms"] == s["gemms_quantized"] == 6 * T and s["integer_flops_fraction"] == 1.0
    assert s["gemm_flops"] == sum(r[-1] for r in expected_rows(kind))


def test_cells_without_hx_give_w_hh_the_zero_gradient_eager_gives():
    """A single step from the module's zero ``hx``: the recurrent GEMM is kept, so ``w_hh``
    gets a zero gradient as in eager (an optimizer's weight decay and momentum still see it)."""
    class OneStep(nn.Module):
        def __init__(self):
            super().__init__()
            self.cells = nn.ModuleList(make_cell(k) for k in KINDS)

        def forward(self, x, h0):
            outs = [c(x) for c in self.cells]
            return torch.cat([torch.cat(o, -1) if isinstance(o, tuple) else o for o in outs], -1)

    torch.manual_seed(0)
    x, h0 = inputs()
    (out, grads), (ref, ref_grads), rep = eager_and_compiled(OneStep(), [x[0], h0], FLOAT)
    torch.testing.assert_close(out, ref)
    for i in range(len(KINDS)):
        w_hh = grads[f"cells.{i}.weight_hh"]
        assert w_hh is not None and torch.equal(w_hh, torch.zeros_like(w_hh))
        assert ref_grads[f"cells.{i}.weight_ih"].norm() > 0
        torch.testing.assert_close(grads[f"cells.{i}.weight_ih"], ref_grads[f"cells.{i}.weight_ih"])
    assert [(r["module"], r["region"]) for r in rep.rows()] == [
        (f"cells.{i}", f"{NOTE[k]} {what} projection") for i, k in enumerate(KINDS) for what in ("input", "recurrent")]


def test_unrolled_lstm_and_gru_cells_hold_all_the_gemm_flops():
    """The user's model: an LSTMCell feeding a GRUCell for 7 steps and a Linear head.  Before
    the split the report had only the head and claimed 100% of GEMM FLOPs in integer."""
    class CellNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell, self.gcell, self.fc = nn.LSTMCell(8, 16), nn.GRUCell(16, 16), nn.Linear(16, 3)

        def forward(self, x):
            h = x.new_zeros(x.shape[0], 16)
            c, g = h.clone(), h.clone()
            for t in range(x.shape[1]):
                h, c = self.cell(x[:, t], (h, c))
                g = self.gcell(h, g)
            return self.fc(g)

    torch.manual_seed(0)
    x = torch.randn(6, 7, 8)
    (out, grads), (ref, ref_grads), rep = eager_and_compiled(CellNet(), [x], Q8)
    assert cosine(out, ref) > 0.99 and all(cosine(g, ref_grads[n]) > 0.99 for n, g in grads.items())
    modules = [r["module"] for r in rep.rows()]
    assert modules == ["cell", "cell", "gcell", "gcell"] * 7 + ["fc"]
    s = rep.summary()
    cells = 7 * 2 * 6 * (64 * 8 + 64 * 16 + 48 * 16 + 48 * 16)
    assert s["gemm_flops"] == cells + 2 * 6 * 3 * 16 and s["integer_flops_fraction"] == 1.0


def test_cell_that_cannot_be_split_is_one_float_row_with_its_flops():
    """An LSTM ``hx`` that is not a pair of graph values (Dynamo writes the pair out; a graph
    built otherwise may not) keeps the cell whole, in float, with a row saying why."""
    def step(x, hx, w_ih, w_hh):
        return torch.lstm_cell(x, hx, w_ih, w_hh)

    gm = fx.symbolic_trace(step)
    values = {"x": torch.randn(B, IN), "w_ih": torch.randn(4 * HID, IN), "w_hh": torch.randn(4 * HID, HID)}
    for node in gm.graph.nodes:
        if node.name in values:
            node.meta["example_value"] = values[node.name]
    record = new_record(Config())
    composite_gemms(gm, Config(), Target("cpu", False), record)
    (d,) = record.decisions
    assert (d.op, d.kind, d.quantized) == ("lstm_cell", "gemm", False)
    assert d.reason == "hx is not a pair (h, c) of tensors in the graph"
    assert d.flops == 2 * B * (4 * HID * IN + 4 * HID * HID) and d.shapes == [[B, IN], [4 * HID, IN]]
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [torch.lstm_cell]
