"""``grad_outer_scale=True``: one float scale per free index of each backward GEMM's gradient
(per token for ``dX = dY W``, per output feature for ``dW = dY^T X``), applied in the GEMM's
epilogue, with ShiftQuant on the gradient divided by it.

Checked against float autograd: a token (or output feature) whose gradient is 1e4x smaller than
the others keeps its resolution with the outer scale, where the per-tensor base scale rounds it
to noise; both executions (simulated and int8 GEMMs); the option's validation, report and
convolutions (per output channel for ``dW``, per sample for ``dX``).  Both kernel families
(Triton under ``TRITON_INTERPRET=1`` on CPU)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sqcompile
from sqcompile import ops
from sqcompile.decisions import records_for
from sqcompile.kernels.triton_ops import triton_available

TRITON, WHY = triton_available()
FAMILIES = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not TRITON, reason=WHY))]


def rel(a, b):
    return float((a - b).norm() / b.norm())


def _linear_grads(outer: bool, integer: bool, dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                  kernels: str = "torch"):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    y = ops.quantized_linear(x, w, None, a_bits=8, w_bits=8, grad_bits=6, groups=3, integer=integer,
                             kernels=kernels, outer_scale=outer)
    y.backward(dy)
    return x.grad, w.grad


def _worst_errors(integer, kernels, which: int, index, seed: int):
    """Worst relative error of the gradient slice ``index`` of ``dX`` (``which`` 0) or ``dW``
    (1) over three stochastic-rounding draws, without and with the outer scale, when that
    slice's ``dY`` entries are 1e-4 of the others."""
    torch.manual_seed(seed)
    x, w = torch.randn(64, 48), torch.randn(32, 48)
    dy = torch.randn(64, 32)
    dy[index if which == 0 else (slice(None), index)] *= 1e-4
    want = dy @ w if which == 0 else dy.t() @ x            # float dX / dW
    errors = {}
    for outer in (False, True):
        draws = [_linear_grads(outer, integer, dy, x, w, kernels)[which] for _ in range(3)]
        assert all(rel(g, want) < 0.1 for g in draws)       # the whole product is fine either way
        errors[outer] = max(rel(g[index], want[index]) for g in draws)
    return errors


@pytest.mark.parametrize("kernels", FAMILIES)
@pytest.mark.parametrize("integer", [True, False])
def test_a_small_tokens_input_gradient_keeps_its_resolution(integer, kernels):
    errors = _worst_errors(integer, kernels, 0, 5, seed=0)   # token 5's row of dX
    assert errors[True] < 0.1 < 0.5 < errors[False], errors


@pytest.mark.parametrize("kernels", FAMILIES)
@pytest.mark.parametrize("integer", [True, False])
def test_a_small_output_features_weight_gradient_keeps_its_resolution(integer, kernels):
    errors = _worst_errors(integer, kernels, 1, 7, seed=1)   # output feature 7's row of dW
    assert errors[True] < 0.1 < 0.5 < errors[False], errors


def test_batched_and_transposed_operands():
    """Attention's products: a batched matmul with a column-major second operand (``K^T``);
    the outer scales are per (batch, row) and per (batch, column), also for the transposed
    gradient layouts."""
    torch.manual_seed(2)
    a = torch.randn(3, 16, 8, requires_grad=True)
    k = torch.randn(3, 20, 8, requires_grad=True)
    dy = torch.randn(3, 16, 20)
    dy[1, 4] *= 1e-4
    dy[2, :, 3] *= 1e-4
    y = ops.quantized_matmul(a, k.transpose(-1, -2), a_bits=8, b_bits=8, grad_bits=6, groups=3, integer=True,
                             outer_scale=True)
    y.backward(dy)
    want_da, want_dk = dy @ k, (a.transpose(-1, -2) @ dy).transpose(-1, -2)
    assert rel(a.grad, want_da.detach()) < 0.1 and rel(k.grad, want_dk.detach()) < 0.1
    assert rel(a.grad[1, 4], want_da[1, 4].detach()) < 0.1       # the small token
    assert rel(k.grad[2, 3], want_dk[2, 3].detach()) < 0.1       # the small key (a column of dY)


def test_zero_gradient_rows_stay_zero():
    x, w = torch.randn(8, 16), torch.randn(4, 16)
    dy = torch.randn(8, 4)
    dy[2] = 0
    dx, dw = _linear_grads(True, True, dy, x, w)
    assert torch.isfinite(dx).all() and torch.isfinite(dw).all() and not dx[2].any()


def test_option_is_validated():
    with pytest.raises(ValueError, match="grad_outer_scale"):
        sqcompile.Config(grad_outer_scale=1)
    with pytest.raises(ValueError, match="grad_outer_scale"):
        sqcompile.Config(overrides={"fc": {"grad_outer_scale": "yes"}})


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).flatten(1))


def test_report_says_where_it_applies_and_training_runs():
    torch._dynamo.reset()
    torch.manual_seed(3)
    model = _ConvNet()
    compiled = torch.compile(model, backend="shiftquant", options={"grad_outer_scale": True})
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, target = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
    losses = []
    for _ in range(5):
        loss = F.cross_entropy(compiled(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    rows = {d.op: d for d in records_for(list(model.parameters()))[-1].decisions}
    assert rows["linear"].grad_quantizer.endswith("outer scale")
    assert rows["conv2d"].grad_quantizer.endswith("groups per sample (dX), outer scale")
    torch._dynamo.reset()


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_compiled_linear_keeps_a_small_tokens_gradient(inner):
    """Through the backend (the quantizers inlined into Inductor's loops or run op by op)."""
    torch._dynamo.reset()
    torch.manual_seed(4)
    layer = nn.Linear(48, 32)
    x = torch.randn(64, 48, requires_grad=True)
    dy = torch.randn(64, 32)
    dy[9] *= 1e-4
    want = dy @ layer.weight.detach()
    compiled = torch.compile(layer, backend="shiftquant", options={
        "weight_bits": 8, "act_bits": 8, "grad_bits": 6, "groups": 3, "grad_outer_scale": True, "inner": inner})
    compiled(x).backward(dy)
    assert rel(x.grad, want) < 0.1 and rel(x.grad[9], want[9]) < 0.1
    torch._dynamo.reset()


def _conv_errors(integer: bool, which: int, index, bits: int, groups: int, seed: int, bound: float):
    """Worst relative error, without and with the outer scale, of the slice ``index`` of a
    conv's ``dX`` (``which`` 0) or ``dW`` (1) against float autograd, when that slice's ``dY``
    entries are 1e-4 of the others' (three stochastic-rounding draws; the whole gradient must
    stay within ``bound`` either way)."""
    torch.manual_seed(seed)
    x, w = torch.randn(4, 3, 8, 8), torch.randn(6, 3, 3, 3)
    dy = torch.randn(4, 6, 8, 8)
    dy[index] *= 1e-4
    want = torch.nn.grad.conv2d_input(x.shape, w, dy, padding=1) if which == 0 else \
        torch.nn.grad.conv2d_weight(x, w.shape, dy, padding=1)
    slice_of = (lambda g: g[index]) if which == 0 else (lambda g: g[index[1]])
    errors = {}
    for outer in (False, True):
        draws = []
        for _ in range(3):
            xx, ww = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
            ops.quantized_conv(xx, ww, None, 1, 1, 1, 1, nd=2, a_bits=8, w_bits=8, grad_bits=bits, sq_groups=groups,
                               integer=integer, outer_scale=outer).backward(dy)
            draws.append((xx.grad, ww.grad)[which])
        assert all(rel(g, want) < bound for g in draws)
        errors[outer] = max(rel(slice_of(g), slice_of(want)) for g in draws)
    return errors


@pytest.mark.parametrize("integer", [True, False])
def test_a_small_output_channels_conv_weight_gradient_keeps_its_resolution(integer):
    """A conv's ``dW`` GEMM reduces over (batch, positions): the outer scale is per output
    channel, as for a Linear's output feature."""
    errors = _conv_errors(integer, 1, (slice(None), 2), bits=6, groups=3, seed=5, bound=0.1)
    assert errors[True] < 0.1 < 0.5 < errors[False], errors


@pytest.mark.parametrize("integer", [True, False])
def test_a_small_samples_conv_input_gradient_keeps_its_resolution(integer):
    """A conv's ``dX`` GEMM keeps the batch: the outer scale is per sample.  Its ShiftQuant
    groups per (sample, channel) already, but a sample 1e-4 of the others lies far below the
    last rung of the ladder (1/8 at G=4) and rounds to noise without it."""
    errors = _conv_errors(integer, 0, 2, bits=4, groups=4, seed=6, bound=0.3)
    assert errors[True] < 0.3 < 0.5 < errors[False], errors
