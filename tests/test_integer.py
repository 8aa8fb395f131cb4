"""Integer execution (int8 GEMMs on oneDNN) against the simulated path and exact references."""
import pytest
import torch
import torch.nn.functional as F

from sqcompile import numerics as N
from sqcompile import ops
from sqcompile.kernels.triton_ops import triton_available

from models import rel

Q8 = dict(grad_bits=8, groups=1)
EIGHT = dict(weight_bits=8, act_bits=8, grad_bits=8, groups=1)


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
    dict(nd=3, x=(2, 3, 5, 6, 7), w=(4, 3, 3, 2, 3), stride=(1, 2, 2), padding=(1, 0, 1), dilation=(1, 1, 2)),
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
    conv_fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[conv["nd"]]
    ref = conv_fn(x, w, b, conv["stride"], conv["padding"], conv["dilation"])
    assert rel(out_i, ref) < 0.06


@pytest.mark.parametrize("integer", [True, False])
def test_conv_input_has_one_scale_per_sample(integer):
    """The forward against a conv of per-sample fake-quantized inputs, written out here: a
    sample 100x smaller than the others keeps its own resolution (with one scale per tensor
    it rounded to zero: relative error 1.0)."""
    torch.manual_seed(2)
    x = torch.randn(3, 4, 8, 8) * torch.tensor([1.0, 0.01, 3.0]).view(3, 1, 1, 1)
    w = torch.randn(6, 4, 3, 3)
    m = 2 ** 5 - 1                                                  # 6 bits
    sx = x.abs().amax((1, 2, 3), keepdim=True) / m
    xq = torch.round(x / sx).clamp(-m, m) * sx
    sw = w.abs().amax((1, 2, 3), keepdim=True) / m
    wq = torch.round(w / sw).clamp(-m, m) * sw
    out = ops.quantized_conv(x, w, None, 1, 1, 1, 1, nd=2, a_bits=6, w_bits=6, grad_bits=8, sq_groups=1,
                             integer=integer)
    torch.testing.assert_close(out, F.conv2d(xq, wq, None, 1, 1), rtol=1e-5, atol=1e-5)
    assert rel(out[1], F.conv2d(x, w, None, 1, 1)[1]) < 0.05        # the small sample too


@pytest.mark.parametrize("kernels", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not triton_available()[0], reason=triton_available()[1]))])
@pytest.mark.parametrize("integer", [True, False])
def test_conv_input_gradient_groups_its_channels_per_sample(integer, kernels):
    """``dX``'s ShiftQuant takes one range per (sample, output channel): a sample whose
    gradient is 8x smaller than the others' keeps the others' relative error (against float
    autograd).  Ranges per output channel alone (``numerics``, the control) put it on the
    large samples' steps: 4-bit steps of 1/7 of their range, about its whole range."""
    torch.manual_seed(5)
    x, w = torch.randn(4, 3, 8, 8), torch.randn(6, 3, 3, 3)
    dy = torch.randn(4, 6, 8, 8)
    dy[1] /= 8
    want = torch.nn.grad.conv2d_input(x.shape, w, dy, padding=1)
    for _ in range(3):
        xx = x.clone().requires_grad_(True)
        ops.quantized_conv(xx, w, None, 1, 1, 1, 1, nd=2, a_bits=8, w_bits=8, grad_bits=4, sq_groups=4,
                           integer=integer, kernels=kernels).backward(dy)
        assert rel(xx.grad, want) < 0.3 and rel(xx.grad[1], want[1]) < 0.35
    per_channel = N.shiftquant(dy, 4, 4, [1], "stochastic").dequantize()
    assert rel(torch.nn.grad.conv2d_input(x.shape, w, per_channel, padding=1)[1], want[1]) > 1.0


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("integer", [True, False])
@pytest.mark.parametrize("nd,channels_last", [(1, False), (2, False), (2, True), (3, False), (3, True)])
def test_conv_output_and_input_gradient_have_pytorchs_memory_format(nd, channels_last, integer, transposed):
    """The int8 im2col GEMM computes channels-last values, and the simulated path convolves
    contiguous dequantized operands; either way the op returns the layout ``F.conv*d`` /
    ``F.conv_transpose*d`` gives (a ``view`` of the output, as LeNet-style code flattens it,
    must work)."""
    torch.manual_seed(0)
    x = torch.randn((2, 3, *[6] * nd))
    w = torch.randn((3 if transposed else 4, 4 if transposed else 3, *[3] * nd))
    if channels_last:
        x = x.to(memory_format=torch.channels_last if nd == 2 else torch.channels_last_3d)
    x.requires_grad_(True)
    kw = dict(nd=nd, a_bits=8, w_bits=8, grad_bits=8, sq_groups=1, integer=integer)
    if transposed:
        conv_fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[nd]
        y = ops.quantized_conv_transpose(x, w, None, 1, 1, **kw)
    else:
        conv_fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
        y = ops.quantized_conv(x, w, None, 1, 1, 1, 1, **kw)
    ref = conv_fn(x, w, None, 1, 1)
    assert y.stride() == ref.stride()
    y.backward(torch.ones_like(ref))
    ref_dx, = torch.autograd.grad(conv_fn(x, w, None, 1, 1), x, torch.ones_like(ref))
    assert x.grad.stride() == ref_dx.stride()
    if not channels_last:   # (PyTorch's own channels-last output cannot be viewed so either)
        assert y.view(2, -1).shape == (2, ref.numel() // 2)


def test_compiled_conv_outputs_can_be_viewed_and_feed_kept_norms():
    """User-level: ``view`` after a conv, and a conv whose gradient comes back through a kept
    BatchNorm1d (AOTAutograd coerces incoming gradients to standard layouts only)."""
    import sqcompile  # noqa: F401  (registers the backend)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Linear(8 * 8 * 8, 10)

        def forward(self, x):
            x = torch.relu(self.conv(x))
            return self.fc(x.view(x.size(0), -1))

    torch._dynamo.reset()
    torch.manual_seed(0)
    net = Net()
    torch.compile(net, backend="shiftquant")(torch.randn(4, 3, 8, 8)).sum().backward()
    assert net.conv.weight.grad is not None and torch.isfinite(net.conv.weight.grad).all()
    seq = torch.nn.Sequential(torch.nn.Conv1d(4, 16, 5, padding=2), torch.nn.BatchNorm1d(16))
    torch.compile(seq, backend="shiftquant", options={"norm": "keep"})(torch.randn(8, 4, 32)).sum().backward()
    assert torch.isfinite(seq[0].weight.grad).all()
    torch._dynamo.reset()


def test_torch_family_ops_pass_opcheck_on_transposed_inputs():
    """Fake implementations give the layouts the real ops give, also for inputs that are not
    contiguous (a traced graph views results at the fake strides): dequantize of a transposed
    tensor returned a transposed result, which the backward of a Linear before an L1 norm
    whose gradient arrived transposed then failed to view."""
    x = torch.randn(2, 20, 9).transpose(1, 2)                           # [2, 9, 20], not contiguous
    q, s = torch.ops.sqcompile.quantize(x, 4, [0, 1], False)
    e = torch.randint(-7, 8, (2, 20, 9), dtype=torch.int8).transpose(1, 2)
    for op, args in [
        (torch.ops.sqcompile.quantize.default, (x, 4, [0, 1], False)),
        (torch.ops.sqcompile.quantize.default, (x, 4, [0, 2], False)),
        (torch.ops.sqcompile.shiftquant.default, (x, 4, 4, [0, 2], False, torch.rand(2, 1, 20))),
        (torch.ops.sqcompile.dequantize.default, (q, s, torch.float32)),
        (torch.ops.sqcompile.dequantize.default, (e, torch.rand(2, 9, 1), torch.bfloat16)),
        (torch.ops.sqcompile.int8_mm.default, (q, e.transpose(1, 2))),
        (torch.ops.sqcompile.channels_last.default, (e,)),
        (torch.ops.sqcompile.channels_last.default, (torch.randint(-7, 8, (2, 3, 4, 5), dtype=torch.int8),)),
    ]:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_l1_norm_gradient_arriving_transposed_reaches_the_linear_before_it():
    """Linear -> LayerNorm -> transpose -> depthwise Conv1d (a Conformer / ConvNeXt-1d
    block): the norm's gradient arrives transposed; both inner compilers train it."""
    import sqcompile  # noqa: F401  (registers the backend)

    class ConvModule(torch.nn.Module):
        def __init__(self, d=32):
            super().__init__()
            self.proj, self.ln = torch.nn.Linear(d, d), torch.nn.LayerNorm(d)
            self.dw = torch.nn.Conv1d(d, d, 3, padding=1, groups=d)

        def forward(self, x):
            return self.dw(self.ln(self.proj(x)).transpose(1, 2))

    for inner in ("eager", "inductor"):
        torch._dynamo.reset()
        torch.manual_seed(0)
        m = ConvModule()
        torch.compile(m, backend="shiftquant", options={"inner": inner})(torch.randn(4, 8, 32)).square().sum().backward()
        assert torch.isfinite(m.proj.weight.grad).all() and m.proj.weight.grad.abs().sum() > 0
    torch._dynamo.reset()


def test_strided_conv_block_compiles_for_inductor_with_nchw_gradients():
    """A stride-2 conv whose input-gradient phases have one tap each (the 1x1 shortcut of a
    ResNet block), compiled for Inductor now that its gradient arrives NCHW: the retrace with
    Inductor's decompositions (where ``stack`` of one tensor is a view, not a copy) must
    take every view the first trace took."""
    import sqcompile  # noqa: F401  (registers the backend)

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 1, 1, bias=False), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 16, 1, 2, bias=False))
    x = torch.randn(4, 3, 8, 8)
    out = torch.compile(model, backend="shiftquant", options={"inner": "inductor", **dict(EIGHT)})(x)
    out.square().sum().backward()
    ref = torch.nn.Sequential(*[m for m in model])
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref(x).square().sum().backward()
    assert all(rel(g, p.grad) < 0.05 for g, p in zip(grads, model.parameters()))
    torch._dynamo.reset()


def test_convs_compile_for_inductor_with_symbolic_image_sizes():
    """``dynamic=True`` (or an image size that changed) makes a conv net's spatial sizes
    symbolic.  Inductor 2.13 failed to order the strides of a view among a graph's outputs
    when they are symbolic (``4*s1*s2 < 4`` undecidable for the channels-last layout it
    prefers in front of a simulated conv; a ``ValueRangeError`` on the ``(H - 1)//2 + 1`` sizes
    after a strided one), and our saved int8 tensors were such views
    (``lowering.no_symbolic_view_outputs``).  One graph serves both image sizes."""
    import sqcompile  # noqa: F401  (registers the backend)

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, 1, 1),
                                torch.nn.ConvTranspose2d(8, 3, 3, 2, 1, 1))
    options = {"inner": "inductor", **EIGHT, "overrides": {"2": {"execution": "simulate"}}}
    compiled = torch.compile(model, backend="shiftquant", options=options, dynamic=True)
    for size in ((10, 12), (7, 9)):
        x = torch.randn(2, 3, *size)
        out = compiled(x)
        out.square().sum().backward()
        assert rel(out, model(x)) < 0.05
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    torch._dynamo.reset()


def test_integer_conv_support_rule():
    assert ops.integer_conv_supported(2, 1) is None
    assert ops.integer_conv_supported(2, 4) is None                 # on CPU since 2026-12-03
    assert "only on CPU" in ops.integer_conv_supported(2, 4, device="cuda")
    assert ops.integer_conv_supported(3, 1) is None                 # simulated until 2026-11-30


CONV_T = [
    dict(nd=2, x=(2, 3, 5, 6), w=(3, 5, 3, 3), stride=2, padding=1, output_padding=1, dilation=1),
    dict(nd=2, x=(1, 4, 4, 5), w=(4, 6, 3, 2), stride=(2, 3), padding=(1, 0), output_padding=(1, 2), dilation=1),
    dict(nd=2, x=(2, 2, 6, 6), w=(2, 3, 3, 3), stride=1, padding=2, output_padding=0, dilation=2),
    dict(nd=1, x=(3, 4, 9), w=(4, 7, 5), stride=3, padding=2, output_padding=1, dilation=2),
    dict(nd=3, x=(2, 3, 3, 4, 4), w=(3, 2, 3, 2, 3), stride=2, padding=1, output_padding=(1, 0, 1), dilation=1),
]


def _conv_t(conv, outer=False, **kw):
    def fn(x, w, b, integer):
        return ops.quantized_conv_transpose(x, w, b, conv["stride"], conv["padding"], conv["output_padding"], 1,
                                            conv["dilation"], nd=conv["nd"], integer=integer, outer_scale=outer,
                                            **{**dict(a_bits=6, w_bits=6, grad_bits=6, sq_groups=3), **kw})
    return fn


def _conv_t_ref(conv, x, w, b=None):
    fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[conv["nd"]]
    return fn(x, w, b, conv["stride"], conv["padding"], conv["output_padding"], 1, conv["dilation"])


@pytest.mark.parametrize("outer", [False, True])
@pytest.mark.parametrize("conv", CONV_T)
def test_conv_transpose_integer_equals_simulate(conv, outer):
    """The transposed conv's int8 GEMMs (its forward as a conv's input gradient, ``dX`` as a
    conv, ``dW`` as a conv's weight gradient with the operands' roles swapped) against the
    simulated path, which runs PyTorch's own transposed convolution and its backward on the
    same quantized operands and the same gradient integers."""
    torch.manual_seed(4)
    x, w, b = torch.randn(conv["x"]), torch.randn(conv["w"]), torch.randn(conv["w"][1])
    out_i, g_i = _run(_conv_t(conv, outer), [x, w, b], True)
    out_s, g_s = _run(_conv_t(conv, outer), [x, w, b], False)
    _assert_same(out_i, out_s, 1e-5)
    for a, c in zip(g_i, g_s):
        _assert_same(a, c, 1e-5)
    assert out_i.shape == _conv_t_ref(conv, x, w, b).shape
    assert rel(out_i, _conv_t_ref(conv, x, w, b)) < 0.06


@pytest.mark.parametrize("integer", [True, False])
def test_conv_transpose_quantizes_inputs_per_sample_and_weights_per_output_channel(integer):
    """The forward against ``F.conv_transpose2d`` of operands fake-quantized here: one scale
    per sample of ``x``, one per output channel (dim 1) of ``w``."""
    torch.manual_seed(2)
    x = torch.randn(3, 4, 5, 5) * torch.tensor([1.0, 0.01, 3.0]).view(3, 1, 1, 1)
    w = torch.randn(4, 6, 3, 3) * torch.tensor([1.0, 0.02, 1.0, 5.0, 1.0, 1.0]).view(1, 6, 1, 1)
    m = 2 ** 5 - 1                                                  # 6 bits
    sx = x.abs().amax((1, 2, 3), keepdim=True) / m
    sw = w.abs().amax((0, 2, 3), keepdim=True) / m
    xq, wq = torch.round(x / sx).clamp(-m, m) * sx, torch.round(w / sw).clamp(-m, m) * sw
    out = ops.quantized_conv_transpose(x, w, None, 2, 1, 1, nd=2, a_bits=6, w_bits=6, grad_bits=8, sq_groups=1,
                                       integer=integer)
    torch.testing.assert_close(out, F.conv_transpose2d(xq, wq, None, 2, 1, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("integer", [True, False])
def test_conv_transpose_gradients_are_unbiased_straight_through(integer):
    """Stochastic rounding of the output gradient is unbiased and both gradients are linear
    in it: averaged over draws, 4-bit ShiftQuant gradients approach float autograd's at the
    quantized operands (a wrong scale or a transposed role would miss by factors)."""
    conv = CONV_T[0]
    torch.manual_seed(0)
    x, w = torch.randn(conv["x"]), torch.randn(conv["w"])
    fn = _conv_t(conv, True, a_bits=8, w_bits=8, grad_bits=4, sq_groups=4)
    draws = 64
    total = [torch.zeros_like(x), torch.zeros_like(w)]
    for seed in range(draws):
        _, grads = _run(lambda x, w, integer: fn(x, w, None, integer), [x, w], integer, seed=seed)
        for acc, g in zip(total, grads):
            acc += g
    xq = N.fake_quantize(x, 8, (0,)).requires_grad_()
    wq = N.fake_quantize(w, 8, (1,)).requires_grad_()
    out = _conv_t_ref(conv, xq, wq)
    out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
    single = _run(lambda x, w, integer: fn(x, w, None, integer), [x, w], integer, seed=draws)[1]
    for acc, one, want in zip(total, single, (xq.grad, wq.grad)):      # measured: 0.010-0.014 / 0.10-0.11
        assert rel(acc / draws, want) < 0.03 < rel(one, want)


def test_grouped_conv_transpose_runs_simulated_close_to_float():
    torch.manual_seed(1)
    x, w = torch.randn(2, 4, 5), torch.randn(4, 3, 3)              # groups=2: 6 output channels
    ref = F.conv_transpose1d(x, w, None, 2, 1, 1, 2)
    out = ops.quantized_conv_transpose(x, w, None, 2, 1, 1, 2, nd=1, a_bits=8, w_bits=8, grad_bits=8, sq_groups=1,
                                       integer=False)
    assert out.shape == ref.shape and rel(out, ref) < 0.02
    with pytest.raises(ValueError, match="grouped transposed convolution"):
        ops.quantized_conv_transpose(x, w, None, 2, 1, 1, 2, nd=1, a_bits=8, w_bits=8, grad_bits=8, sq_groups=1,
                                     integer=True)


def test_integer_conv_transpose_support_rule():
    assert ops.integer_conv_supported(2, 1, True, 2, 1) is None
    assert "grouped transposed" in ops.integer_conv_supported(2, 2, True, 2, 1)
    assert ops.integer_conv_supported(3, 1, True, 1, 0) is None
    # output_padding may reach the stride when below the dilation: the sizes no longer match a conv's
    assert "output_padding" in ops.integer_conv_supported(1, 1, True, 1, 1)


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


@pytest.mark.parametrize("nd", [1, 2])
@pytest.mark.parametrize("edtype", [torch.int8, torch.int16])
def test_strided_conv_input_grad_phase_split_is_exact(nd, edtype):
    """dX of a strided conv is computed per output phase (only the taps that reach it);
    it must equal the float64 transposed convolution exactly, for kernels smaller than,
    equal to and larger than the stride, paddings beyond the kernel and dilations."""
    torch.manual_seed(5)
    ks = ops.kernel_set("torch")
    emax = 127 * 64 if edtype == torch.int16 else 56
    checked = 0
    for k, s, p, dl, X in [(1, 2, 0, 1, 8), (3, 2, 1, 1, 8), (3, 2, 1, 1, 9), (2, 2, 0, 1, 7), (4, 3, 2, 1, 10),
                           (3, 3, 0, 2, 11), (5, 2, 2, 1, 9), (3, 2, 3, 2, 8), (1, 3, 1, 1, 7), (2, 3, 0, 1, 9)]:
        sizes = [X, X + 1][:nd]
        x_shape = (2, 3, *sizes)
        out = [(v + 2 * p - dl * (k - 1) - 1) // s + 1 for v in sizes]
        e = torch.randint(-emax, emax + 1, (2, 5, *out), dtype=torch.int32).to(edtype)
        w = torch.randint(-7, 8, (5, 3, *[k] * nd), dtype=torch.int8)
        args = ([s] * nd, [p] * nd, [dl] * nd)
        ref = torch.ops.aten.convolution_backward(
            e.double(), torch.zeros(x_shape, dtype=torch.float64), w.double(), None, *args, False, [0] * nd, 1,
            [True, False, False])[0]
        got = ops.im2col_conv_input_grad(ks, e, w, x_shape, *args)
        assert got.dtype == torch.float32 and got.shape == ref.shape
        assert torch.equal(got.double(), ref), (k, s, p, dl, X)
        assert torch.equal(ops._dilated_conv_input_grad(ks, e, w, x_shape, *args).double(), ref)
        checked += 1
    assert checked == 10


@pytest.mark.parametrize("integer", [True, False])
def test_column_major_operands_get_identical_gradients(integer):
    """A column-major operand (attention's K^T, a Linear's weight.t()) keeps its memory order
    through the batch flattening and its gradient is computed transposed; the values must be
    those of the same product on row-major copies (same seed, same noise): exactly with
    integer GEMMs, to float rounding when simulated (the float GEMM sums in another order)."""
    torch.manual_seed(6)
    a = torch.randn(2, 3, 17, 9).transpose(-1, -2)       # [2, 3, 9, 17], column-major matrices
    b = torch.randn(2, 3, 5, 17).transpose(-1, -2)       # [2, 3, 17, 5], column-major (K^T-like)
    assert ops._col_major(a) and ops._col_major(b)
    kw = dict(a_bits=4, b_bits=4, grad_bits=4, groups=4)
    out_t, g_t = _run(ops.quantized_matmul, [a, b], integer, **kw)
    out_c, g_c = _run(ops.quantized_matmul, [a.contiguous(), b.contiguous()], integer, **kw)
    assert torch.equal(out_t, out_c)
    for x, y in zip(g_t, g_c):
        assert torch.equal(x, y) if integer else rel(x, y) < 1e-6
    assert ops._col_major(g_t[1])                         # produced in b's memory order


def test_inductor_noise_seed_is_one_opaque_op_on_cpu():
    """The lowering draws each stochastic quantizer's seed with ``sqcompile::random_seed`` (an
    extern call computed once) instead of an inlined randint, which Inductor's C++ backend
    recomputed inside the quantizer loop for every vector of 16 elements."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from sqcompile.backends import lowering

    gm = make_fx(lambda x: lowering._shiftquant(x, 4, 4, [1], True)[0])(torch.randn(8, 16))
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.sqcompile.random_seed.default) == 1
    assert not any("randint" in str(t) for t in targets)
    seeds = {int(torch.ops.sqcompile.random_seed(torch.device("cpu"))) for _ in range(4)}
    assert len(seeds) > 1 and all(0 <= v < 2 ** 31 - 1 for v in seeds)
