"""``act_groups``: ShiftQuant over an activation's reduction channels (a Linear's input
features, a conv's input channels) on top of its per-row / per-sample scale, nearest rounding.

Checked against a reference written with :mod:`sqcompile.numerics` (the per-row maxima, then
ShiftQuant of the quotient), against float autograd (a channel 1000x smaller than the rest
keeps its resolution), between simulated and integer execution and the two kernel families
(Triton under ``TRITON_INTERPRET=1``), under Inductor with the CPU C kernels, and for the
option's validation, the groups each bit width allows and the report."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import sqcompile
from sqcompile import numerics as N
from sqcompile import ops
from sqcompile.config import act_groups_for
from sqcompile.decisions import records_for
from sqcompile.kernels.triton_ops import triton_available

from models import rel, train

TRITON, WHY = triton_available()
FAMILIES = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not TRITON, reason=WHY))]


def reference(x, bits, groups, keep_dims, channel_dims):
    """The activation as the forward GEMM sees it: each row's (sample's) maximum ``r``, then
    ShiftQuant of ``x / r`` over ``channel_dims`` with nearest rounding, times ``r``."""
    r = N.safe_div_scale(N.amax(x, keep_dims))
    sq = N.shiftquant(x.float() / r, bits, groups, channel_dims, "nearest")
    return sq.expanded.float() * (sq.base_scale * r), sq


def _conv(x, w, integer, kernels="torch", a_groups=4, conv_groups=1, bits=4):
    return ops.quantized_conv(x, w, None, 1, w.shape[-1] // 2, 1, conv_groups, nd=2, a_bits=bits, w_bits=8, grad_bits=8,
                              sq_groups=1, integer=integer, kernels=kernels, outer_scale=True, a_groups=a_groups)


def _linear(x, w, integer, kernels="torch", a_groups=4, bits=4):
    return ops.quantized_linear(x, w, None, a_bits=bits, w_bits=8, grad_bits=8, groups=1, integer=integer,
                                kernels=kernels, outer_scale=True, a_groups=a_groups)


@pytest.mark.parametrize("kernels", FAMILIES)
@pytest.mark.parametrize("integer", [False, True])
def test_linear_forward_is_the_reference_times_the_weight(integer, kernels):
    torch.manual_seed(0)
    x, w = torch.randn(2, 9, 40), torch.randn(24, 40)
    x[..., 7] *= 30      # an outlier feature
    x[..., 11] *= 0.02   # a small one
    xq, sq = reference(x.reshape(1, -1, 40), 4, 4, [0, 1], [0, 2])
    wq = N.fake_quantize(w, 8, [0])
    want = (xq.reshape(2, 9, 40).double() @ wq.double().t()).float()
    y = _linear(x, w, integer, kernels)
    assert torch.allclose(y, want, rtol=1e-5, atol=1e-4), (y - want).abs().max()
    assert sorted(set(sq.group.flatten().tolist())) == [0, 1, 2, 3]     # the ladder is used


@pytest.mark.parametrize("kernels", FAMILIES)
@pytest.mark.parametrize("integer", [False, True])
@pytest.mark.parametrize("conv_groups", [1, 6])
def test_conv_forward_is_the_reference_convolved(integer, kernels, conv_groups):
    if kernels == "triton" and integer and conv_groups > 1:
        pytest.skip("grouped convs run simulated off CPU kernels")
    torch.manual_seed(1)
    x, w = torch.randn(3, 6, 7, 7), torch.randn(12, 6 // conv_groups, 3, 3)
    x[:, 2] *= 0.05
    x[1, 4] *= 0.003
    xq, _ = reference(x, 4, 4, [0], [0, 1])
    wq = N.fake_quantize(w, 8, [0])
    want = F.conv2d(xq.double(), wq.double(), None, 1, 1, 1, conv_groups).float()
    y = _conv(x, w, integer, kernels, conv_groups=conv_groups)
    assert torch.allclose(y, want, rtol=1e-5, atol=1e-4), (y - want).abs().max()


@pytest.mark.parametrize("integer", [False, True])
def test_transposed_conv_forward_is_the_reference_transposed(integer):
    torch.manual_seed(8)
    x, w = torch.randn(2, 6, 5, 5), torch.randn(6, 4, 3, 3)
    x[:, 1] *= 0.03
    xq, _ = reference(x, 4, 4, [0], [0, 1])
    wq = N.fake_quantize(w, 8, [1])         # a transposed conv's weight: per output channel, dim 1
    want = F.conv_transpose2d(xq.double(), wq.double(), None, 2, 1, 1).float()
    y = ops.quantized_conv_transpose(x, w, None, 2, 1, 1, nd=2, a_bits=4, w_bits=8, grad_bits=8, sq_groups=1,
                                     integer=integer, outer_scale=True, a_groups=4)
    assert torch.allclose(y, want, rtol=1e-5, atol=1e-4), (y - want).abs().max()


def test_small_channels_keep_their_resolution():
    """A conv input channel 16x below the others (a depthwise conv's output channel with a
    small weight): one scale per sample rounds nearly all of it to zero at 4 bits; the groups
    put it 3 rungs down the ladder, on 8x finer steps."""
    torch.manual_seed(2)
    x, w = torch.randn(4, 8, 6, 6), torch.randn(8, 8, 1, 1) * 0.1
    w[0] = 0
    w[0, 3] = 1.0    # output channel 0 reads input channel 3 alone
    x[:, 3] /= 16
    want = F.conv2d(x, w)[:, 0]
    errors = {g: rel(_conv(x, w, True, a_groups=g)[:, 0], want) for g in (1, 4)}
    assert errors[4] < 0.4 < 0.8 < errors[1], errors


@pytest.mark.parametrize("kernels", FAMILIES)
def test_gradients_match_float_autograd_and_the_simulated_ones(kernels):
    torch.manual_seed(3)
    x0, w0 = torch.randn(16, 32), torch.randn(20, 32)
    x0[:, 5] *= 0.01
    dy = torch.randn(16, 20)
    grads = {}
    for integer in (False, True):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        torch.manual_seed(7)
        _linear(x, w, integer, kernels).backward(dy)
        grads[integer] = (x.grad, w.grad)
    for a, b in zip(*grads.values()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
    # dX through the 8-bit weight; dW from the int8 activation the forward saved, the reference's
    xq = reference(x0.unsqueeze(0), 4, 4, [0, 1], [0, 2])[0][0]
    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    F.linear(x, w).backward(dy)
    assert rel(grads[True][0], x.grad) < 0.03 and rel(grads[True][1], dy.t() @ xq) < 0.03
    assert rel(xq, x0) > 0.03      # (so dW's check is not the float one)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(1, 24), bits=st.integers(2, 8), requested=st.integers(1, 8),
       spread=st.floats(0, 12), seed=st.integers(0, 2 ** 16))
def test_quantizer_error_is_within_half_a_step_of_the_rows_scale(rows, cols, bits, requested, spread, seed):
    """Property: whatever the channels' spread, each value is within half a step of the
    row's own scale (``r / qmax``: group 0's step), channels lower on the ladder within half
    of theirs, and the integers fit int8 with the groups :func:`act_groups_for` gives."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, rows, cols, generator=g) * torch.exp2(-spread * torch.rand(cols, generator=g))
    groups = act_groups_for(requested, bits)
    assert 1 <= groups <= requested and N.fits_int8(bits, groups)
    assert groups == requested or not N.fits_int8(bits, groups + 1)
    q, s = ops._quantize_act(ops.kernel_set("torch"), None, x, bits, [0, 1], [0, 2], groups)
    assert q.dtype == torch.int8 and s.shape == (1, rows, 1)
    xq, sq = reference(x, bits, groups, [0, 1], [0, 2])
    got = q.float() * s
    if groups > 1:
        assert torch.equal(q, sq.expanded)
    # one group: the plain per-row quantizer (which divides by r / qmax, not by r then 1 / qmax)
    assert torch.equal(got, xq if groups > 1 else N.fake_quantize(x, bits, [0, 1]))
    r = N.amax(x, [0, 1])
    step = r / N.qmax(bits) * torch.exp2(-sq.group.float())       # each channel's step, times r
    assert ((x - got).abs() <= step / 2 * (1 + 1e-5) + 1e-30).all()


def test_groups_per_bit_width_follow_int8():
    # symmetric: qmax << (G - 1) <= 127; an unsigned b-bit activation is quantized as b + 1 bits
    assert [act_groups_for(8, b) for b in range(2, 9)] == [7, 6, 5, 4, 3, 2, 1]
    assert [act_groups_for(4, b) for b in range(2, 9)] == [4, 4, 4, 4, 3, 2, 1]
    assert act_groups_for(1, 4) == 1


@pytest.mark.parametrize("bad", [0, 9, True, 2.0, "4", None])
def test_bad_values_name_the_option(bad):
    with pytest.raises(ValueError, match="act_groups"):
        sqcompile.Config(act_groups=bad)
    with pytest.raises(ValueError, match="act_groups"):
        sqcompile.Config(overrides={"fc": {"act_groups": bad}})


class Separable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8 * 6 * 6, 10)

    def forward(self, x):
        return self.fc(self.pw(self.dw(torch.relu(self.conv(x)))).flatten(1))


def test_report_names_the_groups_each_op_got_and_overrides_apply_per_module():
    torch.manual_seed(4)
    model = Separable()
    opts = {"act_groups": 4, "overrides": {"fc": {"act_groups": 1}, "pw": {"act_bits": 6}}}
    compiled = torch.compile(model, backend="shiftquant", options=opts)
    compiled(torch.randn(2, 3, 6, 6)).sum().backward()
    rows = {d.module_path: d.act_quantizer for d in records_for(list(model.parameters()))[-1].decisions}
    assert rows["conv"] == "per-sample x ShiftQuant G=4 per (sample, channel), nearest"
    assert rows["dw"] == "per-sample x ShiftQuant G=4 per (sample, channel), nearest, unsigned (relu output)"
    assert rows["pw"] == "per-sample x ShiftQuant G=3 per (sample, channel), nearest"     # 6 bits: 3 fit
    assert rows["fc"] == "per-row, nearest"
    assert "ShiftQuant G=4 per (sample, channel)" in str(sqcompile.report(compiled))


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_compiled_model_trains_as_the_simulated_ops_do(inner):
    """The whole model under the backend (Inductor with the CPU C kernels, or eager) against
    the same model with ``execution="simulate"``: the same forward to float rounding, and
    training lowers the loss."""
    torch.manual_seed(5)
    model = Separable()
    x, target = torch.randn(8, 3, 6, 6), torch.randint(0, 10, (8,))
    outs = {}
    for execution in ("simulate", "integer"):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="shiftquant",
                                 options={"act_groups": 4, "execution": execution, "inner": inner})
        outs[execution] = compiled(x)
    assert torch.allclose(outs["simulate"], outs["integer"], rtol=1e-4, atol=1e-4)
    losses = train(compiled, model.parameters(), [(x, target)] * 8, F.cross_entropy)
    assert losses[-1] < 0.7 * losses[0], losses


class MlpBlock(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear + residual: the CPU C kernels that write the next
    Linear's int8 operand (``l1_norm+quantize``, ``dequant+bias+gelu+quantize`` per row,
    ``l1_norm+shiftquant``, ``dequant+bias+gelu+shiftquant`` with ``act_groups``)."""

    def __init__(self, d=32):
        super().__init__()
        self.ln, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.ln(x))))


def test_cpu_kernels_take_the_groups():
    """With ``act_groups`` the norm and GELU kernels that quantize the next Linear's input
    quantize it with ShiftQuant (``l1_norm+shiftquant``, ``dequant+bias+gelu+shiftquant``),
    the other kernels stay, and the integer forward equals the simulated one."""
    torch.manual_seed(6)
    model, x = MlpBlock(), torch.randn(4, 16, 32)
    labels, outs = {}, {}
    for groups, execution in ((1, "integer"), (4, "integer"), (4, "simulate")):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="shiftquant", options={
            "act_groups": groups, "inner": "inductor", "execution": execution})
        outs[groups, execution] = compiled(x)
        if execution == "integer":                  # (the simulated backward is not compared)
            outs[groups, execution].sum().backward()
        labels[groups, execution] = [r.label for r in records_for(list(model.parameters()))[-1].regions]
    assert {"l1_norm+quantize", "dequant+bias+gelu+quantize"} <= set(labels[1, "integer"])
    assert labels[4, "integer"] == [label.replace("+quantize", "+shiftquant") for label in labels[1, "integer"]]
    torch.testing.assert_close(outs[4, "integer"], outs[4, "simulate"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(outs[1, "integer"], outs[4, "integer"], rtol=1e-3, atol=1e-3)
