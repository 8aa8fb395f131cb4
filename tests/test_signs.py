"""Unsigned quantization of activations that are non-negative by construction
(:mod:`sqcompile.passes.signs`): which graph values the analysis trusts, and what a quantized
op then computes, against an unsigned quantizer written out here from its definition."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sqcompile
from sqcompile.decisions import latest_records
from sqcompile.passes.signs import activation_bits, nonnegative_source

pytestmark = pytest.mark.usefixtures("one_thread_fresh_dynamo")


def _operand_source(fn, *inputs):
    """Trace ``fn`` with Dynamo (the graph the backend gets) and return what the analysis says
    of the first operand of its last ``linear`` call."""
    found = []

    def backend(gm, example_inputs):
        linears = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.linear]
        found.append(nonnegative_source(linears[-1].args[0]))
        return gm.forward

    torch.compile(fn, backend=backend, fullgraph=True)(*inputs)
    return found[-1]


W = torch.randn(3, 8)


@pytest.mark.parametrize("make, source", [
    (lambda x: F.relu(x), "relu"),
    (lambda x: torch.relu(x), "relu"),
    (lambda x: x.relu(), "relu"),
    (lambda x: F.relu6(x), "relu6"),
    (lambda x: torch.sigmoid(x), "sigmoid"),
    (lambda x: F.softmax(x, -1), "softmax"),
    (lambda x: x.abs(), "abs"),
    (lambda x: x.exp(), "exp"),
    (lambda x: x ** 2, "pow"),
    (lambda x: F.relu(x) ** 3, "relu"),
    (lambda x: x.clamp(min=0.0), "clamp"),
    (lambda x: F.hardtanh(x, 0.0, 6.0), "relu6"),
    (lambda x: F.hardtanh(x, 0.0, 1.0), "hardtanh"),
    (lambda x: F.threshold(x, 0.5, 0.0), "threshold"),
    (lambda x: F.dropout(F.relu(x), 0.5, training=True), "relu"),
    (lambda x: F.relu(x).view(2, 2, 8).flatten(0, 1), "relu"),
    (lambda x: torch.cat([F.relu(x), torch.sigmoid(x)], 0), "relu"),
    (lambda x: F.relu(x) + 2 * F.relu(-x), "relu"),
    (lambda x: F.relu(x) / 4, "relu"),
    (lambda x: torch.maximum(x, F.relu(x)), "relu"),
    (lambda x: torch.max(F.relu(x).view(2, 2, 8), 1)[0], "relu"),
    (lambda x: F.max_pool1d(F.relu(x)[None], 1)[0], "relu"),
])
def test_values_non_negative_by_construction_are_found(make, source):
    assert _operand_source(lambda x: F.linear(make(x), W), torch.randn(4, 8)) == source


@pytest.mark.parametrize("make", [
    lambda x: x,
    lambda x: F.gelu(x),
    lambda x: F.silu(x),
    lambda x: F.leaky_relu(x),
    lambda x: F.relu(x) - 1,
    lambda x: F.relu(x) * -1,
    lambda x: F.relu(x) / -2,
    lambda x: x.clamp(min=-1.0),
    lambda x: F.relu(x).clamp(max=-1.0),
    lambda x: F.relu(x).clamp(0.0, -1.0),
    lambda x: F.threshold(F.relu(x), 0.5, -1.0),
    lambda x: F.hardtanh(x),
    lambda x: x ** 3,
    lambda x: torch.cat([F.relu(x), x], 0),
    lambda x: torch.min(F.relu(x), x),
    lambda x: F.relu(x) + x,
    lambda x: torch.sigmoid(x) - 0.5,
    lambda x: F.pad(F.relu(x), (1, 0), value=-1.0)[:, 1:],
    lambda x: torch.tanh(x),
])
def test_values_that_may_be_negative_are_not(make):
    assert _operand_source(lambda x: F.linear(make(x), W), torch.randn(4, 8)) is None


def test_a_value_changed_in_place_afterwards_is_not_trusted():
    def fn(x):
        h = F.relu(x)
        h.sub_(1.0)          # h may be negative now
        return F.linear(h, W)

    def through_a_view(x):
        h = F.relu(x)
        h.view(-1)[0] = -5.0
        return F.linear(h, W)

    def augmented(x):
        h = F.relu(x)
        g = h.view(4, 8)
        h -= 1.0
        return F.linear(g, W)

    for f in (fn, through_a_view, augmented):
        assert _operand_source(f, torch.randn(4, 8)) is None
    assert _operand_source(lambda x: F.linear(F.relu(x).relu_(), W), torch.randn(4, 8)) == "relu_"


def test_activation_bits_add_one_bit_only_below_8_bits_and_when_enabled():
    def fn(x):
        return F.linear(F.relu(x), W)

    graphs = []
    torch.compile(fn, backend=lambda gm, ex: graphs.append(gm) or gm.forward, fullgraph=True)(torch.randn(4, 8))
    operand = next(n for n in graphs[0].graph.nodes if n.op == "call_function" and n.target is F.linear).args[0]
    assert activation_bits(operand, 4, True) == (5, "relu")
    assert activation_bits(operand, 7, True) == (8, "relu")
    assert activation_bits(operand, 8, True) == (8, None)
    assert activation_bits(operand, 4, False) == (4, None)


def _unsigned_fake_quantize_per_row(x, bits):
    """The unsigned ``bits``-bit quantizer of a non-negative tensor, from its definition:
    ``2**bits`` levels ``0 .. 2**bits - 1`` per row, scale ``amax / (2**bits - 1)``, nearest
    (half to even) rounding."""
    assert (x >= 0).all()
    levels = 2 ** bits - 1
    scale = x.amax(-1, keepdim=True) / levels
    q = torch.round(x / scale).clamp(0, levels)
    assert q.unique().numel() <= 2 ** bits
    return q * scale


def _per_channel_weight(w, bits):
    m = 2 ** (bits - 1) - 1
    scale = w.abs().amax(1, keepdim=True) / m
    return torch.round(w / scale).clamp(-m, m) * scale


class ReluMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


@pytest.mark.parametrize("execution", ["simulate", "integer"])
@pytest.mark.parametrize("bits", [4, 6])
def test_a_relu_output_is_quantized_on_2_to_the_bits_levels(execution, bits):
    torch.manual_seed(0)
    model = ReluMLP()
    x = torch.randn(64, 16)
    opts = {"weight_bits": bits, "act_bits": bits, "execution": execution}
    out = torch.compile(model, backend="shiftquant", options=opts)(x)
    # reference: fc1's input is signed (symmetric quantizer), fc2's input is a ReLU output
    m = 2 ** (bits - 1) - 1
    sx = x.abs().amax(-1, keepdim=True) / m
    xq = torch.round(x / sx).clamp(-m, m) * sx
    h = F.relu(F.linear(xq, _per_channel_weight(model.fc1.weight, bits), model.fc1.bias))
    ref = F.linear(_unsigned_fake_quantize_per_row(h, bits), _per_channel_weight(model.fc2.weight, bits),
                   model.fc2.bias)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_unsigned_halves_the_error_of_a_relu_outputs_quantization():
    torch.manual_seed(0)
    fc = nn.Linear(64, 16)
    x = torch.randn(256, 64)
    exact = fc(F.relu(x))
    errors = {}
    for unsigned in (True, False):
        torch._dynamo.reset()
        model = torch.compile(lambda t: fc(F.relu(t)), backend="shiftquant",
                              options={"weight_bits": 8, "act_bits": 4, "unsigned_acts": unsigned})
        errors[unsigned] = (model(x) - exact).norm() / exact.norm()
    assert errors[True] < 0.6 * errors[False]


def test_report_says_which_activations_are_unsigned_and_overrides_switch_it_off():
    model = ReluMLP()
    compiled = torch.compile(model, backend="shiftquant", options={"overrides": {"fc1": {"unsigned_acts": False}}})
    compiled(torch.randn(8, 16)).sum().backward()
    rows = {d.module_path: d for d in latest_records()[-1].decisions}
    assert rows["fc2"].act_quantizer == "per-row, nearest, unsigned (relu output)"
    assert "unsigned" not in rows["fc1"].act_quantizer
    assert "unsigned (relu output)" in str(sqcompile.report(compiled))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="shiftquant", options={"overrides": {"fc2": {"unsigned_acts": False}}})
    compiled(torch.randn(8, 16))
    assert "unsigned" not in {d.module_path: d for d in latest_records()[-1].decisions}["fc2"].act_quantizer


def test_8_bit_activations_stay_signed():
    compiled = torch.compile(ReluMLP(), backend="shiftquant", options={"act_bits": 8})
    compiled(torch.randn(8, 16))
    assert all("unsigned" not in d.act_quantizer for d in latest_records()[-1].decisions)


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_unsigned_acts_must_be_a_bool(value):
    with pytest.raises(ValueError, match="unsigned_acts"):
        sqcompile.Config(unsigned_acts=value)
    with pytest.raises(ValueError, match="unsigned_acts"):
        sqcompile.Config(overrides={"fc": {"unsigned_acts": value}})



def test_module_activations_as_models_write_them():
    """``nn.ReLU(inplace=True)`` (torchvision's ResNets), ``nn.ReLU6`` (MobileNets, which Dynamo
    sees as ``hardtanh(x, 0, 6)``), a max-pool and a flatten between an activation and the
    next GEMM; a GELU's output stays signed."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.Conv2d(8, 8, 3),
                          nn.ReLU6(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.GELU(),
                          nn.Linear(16, 2))
    compiled = torch.compile(model, backend="shiftquant")
    compiled(torch.randn(2, 3, 12, 12)).sum().backward()
    unsigned = {d.module_path: d.act_quantizer.partition("unsigned ")[2] for d in latest_records()[-1].decisions
                if d.kind == "gemm"}
    assert unsigned == {"0": "", "3": "(relu output)", "7": "(relu6 output)", "9": ""}


def test_attention_probabilities_are_unsigned_below_8_bits():
    q = torch.randn(2, 2, 8, 8, requires_grad=True)
    for bits, expected in ((4, "per-row, nearest; P unsigned (softmax output)"), (8, "per-row, nearest")):
        torch._dynamo.reset()
        attend = torch.compile(lambda t: F.scaled_dot_product_attention(t, t, t), backend="shiftquant",
                               options={"act_bits": bits})
        attend(q).sum().backward()
        (sdpa,) = latest_records()[-1].decisions
        assert sdpa.act_quantizer == expected
