"""Grouped and depthwise integer convolutions (:mod:`sqcompile.kernels.cpu_grouped_conv`).

* the three ops' C kernels against their float64 references (exact integer sums, so bit for
  bit): depthwise, channel multipliers, groups of several channels, 1-3 spatial dims,
  strides, dilations, padding wider than the kernel, full-range int8 values, thread counts;
  random shapes (hypothesis); the references against an independent sum written out in
  Python; non-int8 operands and mismatched shapes;
* the schemas and fake implementations (``opcheck``);
* ``quantized_conv(integer=True)`` with groups against the simulated path (the same
  quantizers, float convolutions of the dequantized operands) and float autograd;
* the rewriting pass: grouped convs run ``int8-cpu`` on CPU, a MobileNet-style block trains
  under Inductor as under the eager inner compiler.
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from sqcompile import ops
from sqcompile.decisions import records_for
from sqcompile.kernels import cpu_grouped_conv as G
from sqcompile.kernels import native

OK, WHY = G.status()
needs_kernel = pytest.mark.skipif(not OK, reason=f"the CPU grouped-conv kernels cannot run here: {WHY}")


def test_kernel_builds_where_the_cpu_can_run_it():
    if native.status(native.simd_build()[2], lambda: None)[0]:
        assert OK, WHY


def _operands(n, c, cout, groups, sizes, kernel, stride, padding, dilation, low=-128, high=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(low, high, (n, c, *sizes), generator=g, dtype=torch.int8)
    w = torch.randint(low, high, (cout, c // groups, *kernel), generator=g, dtype=torch.int8)
    out = ops.strided_conv_output_sizes(sizes, kernel, stride, padding, dilation)
    e = torch.randint(low, high, (n, cout, *out), generator=g, dtype=torch.int8)
    return x, w, e


def _all_three(x, w, e, stride, padding, dilation, groups):
    args = (list(stride), list(padding), list(dilation), groups)
    return (ops.int8_grouped_conv(x, w, *args),
            ops.int8_grouped_conv_input_grad(e, w, list(x.shape), *args),
            ops.int8_grouped_conv_weight(e, x, list(w.shape[2:]), *args))


def _references(x, w, e, stride, padding, dilation, groups):
    args = (list(stride), list(padding), list(dilation), groups)
    return (ops.grouped_conv_reference(x, w, *args),
            ops.grouped_conv_input_grad_reference(e, w, list(x.shape), *args),
            ops.grouped_conv_weight_reference(e, x, list(w.shape[2:]), *args))


CASES = [  # n, c, cout, groups, sizes, kernel, stride, padding, dilation
    (2, 8, 8, 8, [9, 11], [3, 3], [1, 1], [1, 1], [1, 1]),            # depthwise 3x3, "same"
    (2, 8, 16, 8, [9, 11], [3, 3], [2, 2], [1, 1], [1, 1]),           # channel multiplier 2, stride 2
    (3, 6, 9, 3, [7, 13], [3, 5], [2, 3], [0, 2], [2, 1]),            # 2 channels a group, mixed everything
    (2, 12, 8, 4, [6, 6], [3, 3], [1, 1], [1, 1], [1, 1]),            # 3 in / 2 out a group, stride 1
    (2, 4, 4, 2, [17], [5], [3], [4], [2]),                            # 1-d, padding past the kernel's reach
    (2, 4, 4, 4, [17], [7], [1], [3], [1]),                            # 1-d depthwise, stride 1
    (1, 6, 6, 6, [5, 6, 7], [3, 3, 3], [1, 2, 1], [1, 0, 2], [1, 1, 2]),   # 3-d, a stride in one dim
    (2, 4, 8, 4, [4, 5, 6], [3, 1, 3], [1, 1, 1], [1, 0, 1], [1, 1, 1]),   # 3-d, stride 1
    (2, 8, 8, 8, [3, 4], [3, 3], [1, 1], [0, 0], [1, 1]),             # 1 x 2 output
    (2, 5, 5, 5, [8, 8], [3, 3], [1, 1], [5, 5], [2, 2]),             # outputs that see only padding
    (1, 3, 3, 3, [1, 40], [1, 3], [1, 1], [0, 1], [1, 1]),            # a single row
    (2, 35, 35, 35, [4, 5], [3, 3], [1, 1], [1, 1], [1, 1]),          # depthwise, 2 lane blocks and 3 channels
    (2, 20, 20, 20, [3, 4, 3], [3, 3, 3], [1, 1, 1], [1, 1, 1], [1, 1, 1]),   # 3-d depthwise
]

# the channel-block path takes stride-1 depthwise convs with small planes, the plane path the
# rest: every test runs both ways
PATHS = {"default": None, "planes only": 0, "lanes where depthwise": 10**9}


@pytest.fixture(params=list(PATHS))
def path(request, monkeypatch):
    if PATHS[request.param] is not None:
        monkeypatch.setattr(G, "LANES_BELOW", PATHS[request.param])
    return request.param


@needs_kernel
@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
def test_kernels_equal_the_references_bit_for_bit(case, path):
    n, c, cout, groups, sizes, kernel, stride, padding, dilation = case
    x, w, e = _operands(n, c, cout, groups, sizes, kernel, stride, padding, dilation)
    got = _all_three(x, w, e, stride, padding, dilation, groups)
    want = _references(x, w, e, stride, padding, dilation, groups)
    for name, a, b in zip(("forward", "input gradient", "weight gradient"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape and a.is_contiguous(), name
        assert torch.equal(a, b), name


@needs_kernel
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("case", [(3, 6, 12, 6, [10, 9], [3, 3], [1, 1], [1, 1], [1, 1]),
                                  (3, 40, 40, 40, [6, 7], [3, 3], [1, 1], [1, 1], [1, 1])],
                         ids=["multiplier", "depthwise"])
def test_the_thread_count_changes_nothing(threads, case):
    x, w, e = _operands(*case)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        got = _all_three(x, w, e, *case[6:], case[3])
    finally:
        torch.set_num_threads(before)
    for a, b in zip(got, _references(x, w, e, *case[6:], case[3])):
        assert torch.equal(a, b)


def test_references_equal_the_sums_written_out():
    """The float64 references against the definition, one product at a time (small shapes)."""
    n, c, cout, groups, sizes, kernel, stride, padding, dilation = 2, 4, 6, 2, [5, 4], [2, 3], [2, 1], [1, 1], [1, 2]
    x, w, e = _operands(n, c, cout, groups, sizes, kernel, stride, padding, dilation)
    y, dx, dw = _references(x, w, e, stride, padding, dilation, groups)
    cg, og = c // groups, cout // groups
    out = ops.strided_conv_output_sizes(sizes, kernel, stride, padding, dilation)
    Y, DX, DW = torch.zeros(y.shape, dtype=torch.int64), torch.zeros(dx.shape, dtype=torch.int64), \
        torch.zeros(dw.shape, dtype=torch.int64)
    for b, co, oh, ow, ci, kh, kw in itertools.product(range(n), range(cout), range(out[0]), range(out[1]), range(cg),
                                                       range(kernel[0]), range(kernel[1])):
        ih, iw = oh * stride[0] + kh * dilation[0] - padding[0], ow * stride[1] + kw * dilation[1] - padding[1]
        if 0 <= ih < sizes[0] and 0 <= iw < sizes[1]:
            c_in = (co // og) * cg + ci
            Y[b, co, oh, ow] += int(w[co, ci, kh, kw]) * int(x[b, c_in, ih, iw])
            DX[b, c_in, ih, iw] += int(w[co, ci, kh, kw]) * int(e[b, co, oh, ow])
            DW[co, ci, kh, kw] += int(e[b, co, oh, ow]) * int(x[b, c_in, ih, iw])
    assert torch.equal(y.long(), Y) and torch.equal(dx.long(), DX) and torch.equal(dw, DW)


@needs_kernel
@settings(max_examples=30, deadline=None)
@given(st.data())
def test_random_shapes_equal_the_references(data):
    nd = data.draw(st.integers(1, 3))
    groups = data.draw(st.integers(1, 40))
    depthwise = data.draw(st.booleans())
    cg, og = (1, 1) if depthwise else (data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3)))
    lanes_below = data.draw(st.sampled_from([0, 256, 10**9]))
    kernel = [data.draw(st.integers(1, 4)) for _ in range(nd)]
    dilation = [data.draw(st.integers(1, 2)) for _ in range(nd)]
    stride = [data.draw(st.integers(1, 3)) for _ in range(nd)]
    padding = [data.draw(st.integers(0, 3)) for _ in range(nd)]
    smallest = [max(1, d * (k - 1) + 1 - 2 * p) for k, d, p in zip(kernel, dilation, padding)]
    sizes = [data.draw(st.integers(lo, max(lo, 12 if nd < 3 else 6))) for lo in smallest]
    n = data.draw(st.integers(1, 3))
    x, w, e = _operands(n, cg * groups, og * groups, groups, sizes, kernel, stride, padding, dilation,
                        seed=data.draw(st.integers(0, 2**16)))
    saved = G.LANES_BELOW
    try:
        G.LANES_BELOW = lanes_below
        got = _all_three(x, w, e, stride, padding, dilation, groups)
    finally:
        G.LANES_BELOW = saved
    for a, b in zip(got, _references(x, w, e, stride, padding, dilation, groups)):
        assert torch.equal(a, b)


def test_int16_operands_take_the_reference():
    """ShiftQuant digits wider than int8 (more groups than int8 holds) run the float64
    references inside the ops."""
    x, w, e = _operands(2, 4, 4, 4, [6, 6], [3, 3], [1, 1], [1, 1], [1, 1])
    e16 = e.to(torch.int16) * 200
    args = ([1, 1], [1, 1], [1, 1], 4)
    assert torch.equal(ops.int8_grouped_conv_input_grad(e16, w, list(x.shape), *args),
                       ops.grouped_conv_input_grad_reference(e16, w, list(x.shape), *args))
    assert torch.equal(ops.int8_grouped_conv_weight(e16, x, [3, 3], *args),
                       ops.grouped_conv_weight_reference(e16, x, [3, 3], *args))


@needs_kernel
def test_mismatched_shapes_raise_value_errors():
    x, w, e = _operands(2, 4, 4, 4, [6, 6], [3, 3], [1, 1], [1, 1], [1, 1])
    with pytest.raises(ValueError, match="groups=2"):
        ops.int8_grouped_conv(x, w, [1, 1], [1, 1], [1, 1], 2)        # 4 channels are not 2 groups of 1
    with pytest.raises(ValueError, match="output gradient has shape"):
        ops.int8_grouped_conv_input_grad(e[:, :, :5], w, list(x.shape), [1, 1], [1, 1], [1, 1], 4)
    with pytest.raises(ValueError, match="output gradient has shape"):
        ops.int8_grouped_conv_weight(e, x, [3, 3], [2, 2], [1, 1], [1, 1], 4)
    with pytest.raises(ValueError, match="empty output"):
        ops.int8_grouped_conv(x[..., :2, :2], w, [1, 1], [0, 0], [1, 1], 4)


def test_ops_pass_opcheck():
    x, w, e = _operands(2, 4, 8, 4, [5, 6], [3, 3], [1, 1], [1, 1], [1, 1], low=-8, high=8)
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.sqcompile.int8_grouped_conv.default, (x, w, [1, 1], [1, 1], [1, 1], 4),
                          test_utils=tests)
    torch.library.opcheck(torch.ops.sqcompile.int8_grouped_conv_input_grad.default,
                          (e, w, list(x.shape), [1, 1], [1, 1], [1, 1], 4), test_utils=tests)
    torch.library.opcheck(torch.ops.sqcompile.int8_grouped_conv_weight.default,
                          (e, x, [3, 3], [1, 1], [1, 1], [1, 1], 4), test_utils=tests)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("nd, groups, cout, stride, outer", [(2, 8, 8, 1, False), (2, 8, 16, 2, False),
                                                             (1, 4, 8, 1, True), (3, 2, 4, 1, False)])
def test_integer_grouped_conv_equals_the_simulated_one(nd, groups, cout, stride, outer):
    """Integer execution against simulated execution: the same quantizers (nearest rounding
    forward; the gradients' stochastic rounding drawn from the same seed), then exact
    integer sums times the scales against float convolutions of the dequantized operands:
    equal to float32 rounding.  And both near float autograd.  The three runs take one
    upstream gradient tensor: on this 2-core VM, right after a test that ran 3 threads, the
    first ``torch.cos`` over these 2160 elements sometimes came back with one thread's half
    off by up to 1.5e-4 (torch's vectorized cos, not our code: MXCSR default on every pool
    thread), which made the gradients of two runs differ by that much."""
    torch.manual_seed(0)
    sizes = {1: [20], 2: [9, 10], 3: [5, 6, 4]}[nd]
    x = torch.randn(3, 8, *sizes)
    w = torch.randn(cout, 8 // groups, *[3] * nd)
    b = torch.randn(cout)
    kw = dict(nd=nd, a_bits=8, w_bits=8, grad_bits=8, sq_groups=1, outer_scale=outer)
    results, dy = {}, None
    for integer in (False, True):
        xi, wi, bi = (t.clone().requires_grad_() for t in (x, w, b))
        torch.manual_seed(1)
        y = ops.quantized_conv(xi, wi, bi, stride, 1, 1, groups, integer=integer, **kw)
        if dy is None:
            dy = torch.cos(torch.arange(y.numel(), dtype=torch.float32)).reshape(y.shape)
        y.backward(dy)
        results[integer] = (y, xi.grad, wi.grad, bi.grad)
    for a, s in zip(results[True], results[False]):
        assert a.shape == s.shape and rel(a, s) < 1e-5
    xf, wf, bf = (t.clone().requires_grad_() for t in (x, w, b))
    conv = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}[nd]
    y = conv(xf, wf, bf, stride, 1, 1, groups)
    y.backward(dy)
    for a, f in zip(results[True], (y, xf.grad, wf.grad, bf.grad)):
        assert rel(a, f) < 0.05


class MobileBlock(nn.Module):
    """MobileNetV2's inverted residual: 1x1 expand, 3x3 depthwise (stride 1 or 2), 1x1 project."""

    def __init__(self, c=8, t=4, stride=1):
        super().__init__()
        h = c * t
        self.expand, self.bn1 = nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h)
        self.dw, self.bn2 = nn.Conv2d(h, h, 3, stride, 1, groups=h, bias=False), nn.BatchNorm2d(h)
        self.project = nn.Conv2d(h, c, 1, bias=False)
        self.dw_s2 = nn.Conv2d(c, c, 3, 2, 1, groups=c)
        self.fc = nn.Linear(c, 3)

    def forward(self, x):
        y = torch.relu(self.bn1(self.expand(x)))
        y = x + self.project(torch.relu(self.bn2(self.dw(y))))
        return self.fc(self.dw_s2(y).mean((2, 3)))


@needs_kernel
def test_mobilenet_block_runs_its_depthwise_convs_integer_and_trains_as_under_eager():
    import sqcompile  # noqa: F401  (registers the backend)

    x, target = torch.randn(4, 8, 12, 12), torch.tensor([0, 1, 2, 0])
    grads, losses = {}, {}
    for inner in ("eager", "inductor"):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = MobileBlock()
        compiled = torch.compile(model, backend="shiftquant", options=dict(weight_bits=8, act_bits=8, grad_bits=8,
                                                                           inner=inner))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        history = []
        for _ in range(6):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(compiled(x), target)
            loss.backward()
            opt.step()
            history.append(loss.item())
        losses[inner], grads[inner] = history, [p.grad.clone() for p in model.parameters()]
        record = records_for(list(model.parameters()))[-1]
        by_path = {d.module_path: d for d in record.decisions if d.kind == "gemm"}
        for path in ("dw", "dw_s2"):
            assert by_path[path].quantized and by_path[path].execution == "int8-cpu", by_path[path]
            assert by_path[path].reason is None
        assert "int8_grouped_conv" in record.graphs["forward"]
    assert losses["inductor"][-1] < losses["inductor"][0]
    for a, b in zip(losses["eager"], losses["inductor"]):
        assert abs(a - b) < 1e-3 * max(1.0, abs(a))
    torch._dynamo.reset()


def test_grouped_convs_stay_simulated_off_cpu_and_when_transposed():
    assert ops.integer_conv_supported(2, 4) is None
    assert ops.integer_conv_supported(2, 4, device="cpu") is None
    assert "only on CPU" in ops.integer_conv_supported(2, 4, device="cuda")
    assert "grouped transposed" in ops.integer_conv_supported(2, 2, True, 2, 1)
