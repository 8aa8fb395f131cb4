"""Integer execution (int8 GEMMs on oneDNN) against the simulated path and exact references."""
import pytest
import torch
import torch.nn.functional as F

from sqcompile import numerics as N
from sqcompile import ops

from models import rel

Q8 = dict(grad_bits=8, groups=1)


def _run(fn, inputs, integer, seed=0, **kw):
    """Forward + backward of ``fn`` with a fixed seed, so both executions draw the same
    stochastic-rounding noise and see the same quantized operands."""
    inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    torch.manual_seed(seed)
    out = fn(*inputs, integer=integer, **kw)
    g = torch.linspace(-1, 1, out.numel(), dtype=torch.float32).reshape(out.shape).to(out.dtype)
    out.backward(g)
    return out.detach(), [t.grad for t in inputs if t.requires_grad]


def _assert_same(a, b, tol):
    assert a.shape == b.shape and a.dtype == b.dtype
    assert rel(a.float(), b.float()) < tol, rel(a.float(), b.float())


def test_integer_matmul_is_exact():
    torch.manual_seed(0)
    a = torch.randint(-127, 128, (37, 45), dtype=torch.int8)
    b = torch.randint(-127, 128, (45, 19), dtype=torch.int8)
    exact = a.double() @ b.double()
    assert torch.equal(torch.ops.sqcompile.int8_mm(a, b), exact.to(torch.int32))   # oneDNN kernel
    assert torch.equal(ops.integer_matmul(a, b), exact.float())
    # batched, broadcast and transposed (non-contiguous) operands
    a3 = torch.randint(-7, 8, (3, 33, 17), dtype=torch.int8)
    b3 = torch.randint(-7, 8, (17, 3, 9), dtype=torch.int8).transpose(0, 1)
    assert torch.equal(torch.ops.sqcompile.int8_mm(a3, b3), (a3.double() @ b3.double()).to(torch.int32))


def test_int16_operands_are_split_into_two_int8_gemms_exactly():
    # ShiftQuant's expanded form at 8 bits with 8 groups reaches 127 * 128
    torch.manual_seed(0)
    e = torch.randint(-127 * 128, 127 * 128 + 1, (29, 41), dtype=torch.int16)
    w = torch.randint(-127, 128, (41, 13), dtype=torch.int8)
    hi, lo = ops._split_int16(e)
    assert hi.abs().max() <= 127 and lo.abs().max() <= 64
    assert torch.equal(hi.int() * 128 + lo.int(), e.int())
    assert torch.equal(ops.integer_matmul(e, w), (e.double() @ w.double()).float())
    assert torch.equal(ops.integer_matmul(w.t(), e.t()), (w.t().double() @ e.t().double()).float())  # int16 on the right


def test_long_reductions_do_not_overflow_int32():
    K = ops.MAX_INT32_TERMS + 3000      # 127 * 127 * K > 2**31
    a = torch.full((2, K), 127, dtype=torch.int8)
    b = torch.full((K, 3), 127, dtype=torch.int8)
    b[-1] = -127
    exact = a.double() @ b.double()
    assert exact.max() > 2**31
    assert torch.equal(ops.integer_matmul(a, b), exact.float())


@pytest.mark.parametrize("shape", [(1, 5), (7, 13), (2, 9, 33)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_linear_integer_equals_simulate(shape, dtype):
    torch.manual_seed(1)
    x = torch.randn(*shape).to(dtype)
    w = torch.randn(11, shape[-1]).to(dtype)
    b = torch.randn(11).to(dtype)
    kw = dict(a_bits=4, w_bits=4, grad_bits=4, groups=4)
    out_i, grads_i = _run(ops.quantized_linear, [x, w, b], True, **kw)
    out_s, grads_s = _run(ops.quantized_linear, [x, w, b], False, **kw)
    tol = 1e-5 if dtype == torch.float32 else 2e-2     # both round the same exact integers
    _assert_same(out_i, out_s, tol)
    for gi, gs in zip(grads_i, grads_s):
        _assert_same(gi, gs, tol)


def test_matmul_bmm_integer_equals_simulate_with_non_contiguous_inputs():
    torch.manual_seed(2)
    a = torch.randn(3, 9, 4, 17).transpose(1, 2)          # [3, 4, 9, 17], non-contiguous
    b = torch.randn(17, 5)                                 # broadcast over the batch
    kw = dict(a_bits=6, b_bits=6, grad_bits=5, groups=4)   # 5 bits x 4 groups fits int8
    out_i, g_i = _run(ops.quantized_matmul, [a, b], True, **kw)
    out_s, g_s = _run(ops.quantized_matmul, [a, b], False, **kw)
    _assert_same(out_i, out_s, 1e-5)
    for x, y in zip(g_i, g_s):
        _assert_same(x, y, 1e-5)
    ref = a @ b
    assert rel(out_i, ref) < 0.05


def test_groups_beyond_int8_use_the_int16_path_in_backward():
    torch.manual_seed(3)
    x, w = torch.randn(16, 40), torch.randn(24, 40)
    kw = dict(a_bits=8, w_bits=8, grad_bits=8, groups=4)    # 127 * 8 does not fit int8
    assert not N.fits_int8(8, 4)
    out_i, g_i = _run(ops.quantized_linear, [x, w], True, **kw)
    out_s, g_s = _run(ops.quantized_linear, [x, w], False, **kw)
    for a, b in zip(g_i, g_s):
        _assert_same(a, b, 1e-5)
    ref_x = torch.autograd.functional.vjp(lambda t: F.linear(t, w), x,
                                          torch.linspace(-1, 1, 16 * 24).reshape(16, 24))[1]
    assert rel(g_i[0], ref_x) < 0.02


@pytest.mark.parametrize("conv", [
    dict(nd=2, x=(2, 3, 9, 11), w=(5, 3, 3, 3), stride=1, padding=1, dilation=1),
    dict(nd=2, x=(1, 4, 10, 10), w=(6, 4, 3, 2), stride=2, padding=(1, 0), dilation=1),
    dict(nd=2, x=(2, 2, 12, 12), w=(3, 2, 3, 3), stride=1, padding=2, dilation=2),
    dict(nd=1, x=(3, 4, 17), w=(7, 4, 5), stride=2, padding=2, dilation=1),
])
def test_conv_integer_equals_simulate(conv):
    torch.manual_seed(4)
    x, w, b = torch.randn(conv["x"]), torch.randn(conv["w"]), torch.randn(conv["w"][0])

    def fn(x, w, b, integer):
        return ops.quantized_conv(x, w, b, conv["stride"], conv["padding"], conv["dilation"], 1, nd=conv["nd"],
                                  a_bits=6, w_bits=6, grad_bits=6, sq_groups=3, integer=integer)

    out_i, g_i = _run(fn, [x, w, b], True)
    out_s, g_s = _run(fn, [x, w, b], False)
    _assert_same(out_i, out_s, 1e-5)
    for a, c in zip(g_i, g_s):
        _assert_same(a, c, 1e-5)
    conv_fn = F.conv1d if conv["nd"] == 1 else F.conv2d
    ref = conv_fn(x, w, b, conv["stride"], conv["padding"], conv["dilation"])
    assert rel(out_i, ref) < 0.06


def test_integer_conv_support_rule():
    assert ops.integer_conv_supported(2, 1) is None
    assert "grouped" in ops.integer_conv_supported(2, 4)
    assert "conv3d" in ops.integer_conv_supported(3, 1)


def test_inductor_lowering_matches_the_eager_path():
    """inner="inductor" replaces the quantizer ops by their numerics definitions and lets
    Inductor fuse them; forward (nearest rounding) must agree with the eager path to float
    rounding, backward (different noise source) statistically."""
    import copy

    import sqcompile  # noqa: F401
    from sqcompile.decisions import records_for

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(48, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))
    x = torch.randn(96, 48)
    outs, grads = {}, {}
    for inner in ("eager", "inductor"):
        m = copy.deepcopy(model)
        cm = torch.compile(m, backend="shiftquant", options=dict(weight_bits=8, act_bits=8, grad_bits=8, groups=1,
                                                                 norm="keep", inner=inner))
        out = cm(x)
        out.pow(2).mean().backward()
        outs[inner], grads[inner] = out.detach(), [p.grad for p in m.parameters()]
        assert records_for(list(m.parameters()))[-1].inner == inner
    assert rel(outs["inductor"], outs["eager"]) < 1e-5
    for a, b in zip(grads["inductor"], grads["eager"]):
        assert rel(a, b) < 0.05      # both are 8-bit stochastic estimates of the same gradient
    torch._dynamo.reset()
