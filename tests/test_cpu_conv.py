"""Stride-1 integer convolutions without im2col columns: ``sqcompile::int8_conv`` and
``sqcompile::int8_conv_weight`` (implicit GEMMs on the AMX tiles, ``kernels/amx_int8.c``, or
on either build of the AVX2 kernel, ``kernels/avx2_int8.c``, with the same tables).

Checked against the exact float64 convolution (its output and, through autograd, its weight
gradient): shapes over 1-3 spatial dims, channel counts below, at and past the 64-byte k step
(runs zero-padded), output channels that are not whole tiles, padding, dilation (the last
dim's taps then take steps of their own), batches, and input layouts (NCHW, channels-last,
sliced); a hypothesis search over the same space; the ops' fake implementations
(``opcheck``), the reference path without AMX, the batch split that keeps the weight
gradient's int32 sums exact; and a compiled CNN trained with the implicit convolutions and
with im2col GEMMs (the same integers: the same outputs and gradients bit for bit).

The AMX tests skip on CPUs without AMX-int8, the AVX2 ones without AVX2, the VNNI ones
(the AVX2 kernel's VNNI build) without AVX-512 VNNI; the reference ones run everywhere.  The AVX2 kernel is exact within ``max|A| * max|B| <= 8191`` and refuses
above, so its operands are drawn within that bound (inputs up to 15, as 4-bit activations)
and its refusal is tested on its own.
"""
import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from sqcompile import ops
from sqcompile.decisions import records_for
from sqcompile.kernels import amx, avx2

AMX_OK, AMX_WHY = amx.status()
needs_amx = pytest.mark.skipif(not AMX_OK, reason=f"AMX kernel not usable here: {AMX_WHY}")
AVX2_OK, AVX2_WHY = avx2.status()
VNNI_OK, VNNI_WHY = avx2.status("vnni")
GEMMS = [pytest.param("amx", marks=needs_amx),
         pytest.param("vnni", marks=pytest.mark.skipif(not VNNI_OK, reason=f"VNNI kernel not usable: {VNNI_WHY}")),
         pytest.param("avx2", marks=pytest.mark.skipif(not AVX2_OK, reason=f"AVX2 kernel not usable: {AVX2_WHY}"))]
X_BOUND = {"amx": 127, "vnni": 127, "avx2": 15}
"""The largest |input| each kernel's tests draw (weights and output gradients: 127)."""
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def exact(x, w, padding, dilation, e=None):
    """The float64 convolution (exact for these integers), and with ``e`` its weight gradient."""
    xd, wd = x.double(), w.double().requires_grad_(e is not None)
    out = CONV[x.dim() - 2](xd, wd, padding=padding, dilation=dilation)
    if e is None:
        return out.to(torch.int32)
    out.backward(e.double())
    return wd.grad.to(torch.int32)


def rand8(*shape, gen, low=-127, high=127):
    return torch.randint(low, high + 1, shape, dtype=torch.int8, generator=gen)


def layout(t, kind):
    if kind == "channels_last":
        return t.movedim(1, -1).contiguous().movedim(-1, 1)
    if kind == "sliced":                  # a view into a wider tensor: no dense strides
        wide = torch.zeros((*t.shape[:-1], t.shape[-1] + 3), dtype=t.dtype)
        wide[..., 1:-2] = t
        return wide[..., 1:-2]
    return t.contiguous()


CASES = [   # (x shape, w shape, padding, dilation)
    ((2, 64, 9, 11), (32, 64, 3, 3), [1, 1], [1, 1]),       # k steps of whole channels
    ((2, 32, 9, 11), (40, 32, 3, 3), [1, 1], [1, 1]),       # run of 96 bytes: 2 steps, padded
    ((1, 3, 8, 8), (17, 3, 3, 3), [1, 1], [1, 1]),          # few channels: 9 bytes a row of taps
    ((1, 1, 6, 7), (5, 1, 3, 3), [1, 1], [1, 1]),
    ((2, 24, 7, 12), (16, 24, 3, 5), [2, 0], [1, 2]),       # dilated last dim: one tap a run
    ((2, 64, 10), (33, 64, 5), [2], [2]),                   # 1-d
    ((1, 16, 4, 5, 6), (8, 16, 3, 3, 3), [1, 1, 1], [1, 1, 1]),   # 3-d
    ((3, 130, 5, 5), (70, 130, 1, 1), [0, 0], [1, 1]),      # 1x1, channels past two steps
    ((2, 64, 6, 6), (20, 64, 3, 3), [0, 0], [1, 1]),        # no padding
    ((5, 8, 3, 3), (3, 8, 3, 3), [2, 2], [1, 1]),           # padding wider than the image's half
    ((2, 40, 3, 37), (24, 40, 3, 3), [1, 1], [1, 1]),       # layout copies in 16 x 16 blocks, and edges
]


@pytest.mark.parametrize("gemm", GEMMS)
@pytest.mark.parametrize("xs,ws,padding,dilation", CASES)
@pytest.mark.parametrize("kind", ["contiguous", "channels_last", "sliced"])
def test_implicit_conv_and_weight_gradient_are_exact(xs, ws, padding, dilation, kind, gemm):
    g = torch.Generator().manual_seed(sum(xs) * 100 + sum(ws))
    bound = X_BOUND[gemm]
    x, w = layout(rand8(*xs, gen=g, low=-bound, high=bound), kind), layout(rand8(*ws, gen=g), kind)
    ref = exact(x, w, padding, dilation)
    out = amx.int8_conv(x, w, padding, dilation, gemm=gemm)
    assert torch.equal(out, ref)
    assert out.stride() == ops.int8_conv(x, w, padding, dilation).stride()   # the fake's / reference's layout
    e = layout(rand8(*ref.shape, gen=g), kind)
    dw = amx.int8_conv_weight(e, x, list(ws[2:]), padding, dilation, gemm=gemm)
    assert dw.is_contiguous() and torch.equal(dw, exact(x, w, padding, dilation, e))


@pytest.mark.skipif(not AVX2_OK, reason=f"AVX2 kernel not usable: {AVX2_WHY}")
@pytest.mark.parametrize("xs,ws,padding,dilation", CASES[:2] + CASES[5:8])
def test_avx2_reads_the_grid_in_place_at_small_magnitudes(xs, ws, padding, dilation):
    """Operands small enough that the AVX2 build's int16 sums last a whole reduction chunk
    (``max|A| * max|B| = 6``): the implicit A's rows are then read in place (``micro_steps``,
    as the VNNI build always does) -- the forward's on the input grid, the weight gradient's
    channel rows of each tap -- and the blocks that cannot be (past M, across two taps) packed."""
    g = torch.Generator().manual_seed(sum(xs))
    x, w = rand8(*xs, gen=g, low=-2, high=2), rand8(*ws, gen=g, low=-3, high=3)
    ref = exact(x, w, padding, dilation)
    assert torch.equal(amx.int8_conv(x, w, padding, dilation, gemm="avx2"), ref)
    e = rand8(*ref.shape, gen=g, low=-3, high=3)
    assert torch.equal(amx.int8_conv_weight(e, x, list(ws[2:]), padding, dilation, gemm="avx2"),
                       exact(x, w, padding, dilation, e))


@pytest.mark.skipif(not AVX2_OK, reason=f"AVX2 kernel not usable: {AVX2_WHY}")
def test_avx2_convs_refuse_two_8_bit_operands_and_the_op_runs_them_as_im2col(monkeypatch):
    """8-bit inputs against 8-bit weights could saturate the AVX2 kernel's int16 sums: it
    refuses (``None``), and the CPU op then runs the im2col GEMM (on the float engine), exact."""
    monkeypatch.setenv(amx.ENGINE_VARIABLE, "avx2")
    g = torch.Generator().manual_seed(11)
    x, w = rand8(2, 16, 7, 7, gen=g), rand8(8, 16, 3, 3, gen=g)
    x[0, 0, 0, 0], w[0, 0, 0, 0] = 127, 127
    assert amx.int8_conv(x, w, [1, 1], [1, 1], gemm="avx2") is None
    out = ops.int8_conv(x, w, [1, 1], [1, 1])
    assert torch.equal(out, exact(x, w, [1, 1], [1, 1]))
    e = rand8(*out.shape, gen=g)
    assert amx.int8_conv_weight(e, x, [3, 3], [1, 1], [1, 1], gemm="avx2") is None
    assert torch.equal(ops.int8_conv_weight(e, x, [3, 3], [1, 1], [1, 1]), exact(x, w, [1, 1], [1, 1], e))
    with pytest.raises(ValueError, match="gemm='mkl'"):
        amx.int8_conv(x, w, [1, 1], [1, 1], gemm="mkl")


def test_implicit_waste_counts_the_padded_work():
    """The implicit GEMM's size over im2col's, written out: grid positions over output positions,
    runs of taps padded to 64 bytes over the taps' bytes (weight gradient: channels padded to
    32, grid positions to 64)."""
    from sqcompile.kernels import cpu
    # 3x3 at padding 1 on 32x32, 64 channels: runs of 3 * 64 bytes need no padding
    assert cpu.implicit_waste((2, 64, 32, 32), [3, 3], [1, 1], [1, 1]) == pytest.approx(34 * 34 / (32 * 32))
    # 32 channels: each run of 96 bytes takes two 64-byte steps
    assert cpu.implicit_waste((2, 32, 32, 32), [3, 3], [1, 1], [1, 1]) == pytest.approx(34 * 34 * 384 / (32 * 32 * 288))
    # weight gradient of 40 channels: 64 rows a tap, and 2 * 34 * 34 = 2312 positions padded to 2368
    assert cpu.implicit_waste((2, 40, 32, 32), [3, 3], [1, 1], [1, 1], weight=True) == \
        pytest.approx((64 / 40) * 2368 / (2 * 32 * 32))


@pytest.mark.parametrize("gemm", GEMMS[1:])
def test_vnni_and_avx2_engines_take_the_implicit_gemm_only_where_it_wastes_little(monkeypatch, gemm):
    """Where the padded grid and runs would make the implicit GEMM much larger than im2col's
    (a ResNet's 4x4 stage, a 1-channel input), the engine runs the im2col GEMM; the results
    are the exact convolution either way."""
    from sqcompile.kernels import cpu
    monkeypatch.setenv(amx.ENGINE_VARIABLE, gemm)
    calls = []
    real_conv, real_weight = amx.int8_conv, amx.int8_conv_weight
    monkeypatch.setattr(amx, "int8_conv", lambda *a, **k: calls.append("conv") or real_conv(*a, **k))
    monkeypatch.setattr(amx, "int8_conv_weight", lambda *a, **k: calls.append("weight") or real_weight(*a, **k))
    g = torch.Generator().manual_seed(12)
    # (input, forward implicit, weight gradient implicit)
    cases = {"avx2": [((2, 64, 16, 16), True, True), ((2, 64, 4, 4), False, False), ((2, 1, 16, 16), False, False)],
             "vnni": [((2, 64, 32, 32), True, True), ((2, 64, 16, 16), True, True), ((2, 64, 8, 8), False, False),
                      ((2, 1, 32, 32), False, False)]}[gemm]
    for xs, implicit, weight_implicit in cases:
        assert (cpu.implicit_waste(xs, [3, 3], [1, 1], [1, 1]) <= cpu.MAX_WASTE[gemm]) == implicit
        assert (cpu.implicit_waste(xs, [3, 3], [1, 1], [1, 1], weight=True) <= cpu.MAX_WASTE[gemm]) == weight_implicit
        x, w = rand8(*xs, gen=g, low=-X_BOUND[gemm], high=X_BOUND[gemm]), rand8(8, xs[1], 3, 3, gen=g)
        calls.clear()
        out = ops.int8_conv(x, w, [1, 1], [1, 1])
        assert torch.equal(out, exact(x, w, [1, 1], [1, 1]))
        e = rand8(*out.shape, gen=g)
        assert torch.equal(ops.int8_conv_weight(e, x, [3, 3], [1, 1], [1, 1]), exact(x, w, [1, 1], [1, 1], e))
        assert calls == ["conv"] * implicit + ["weight"] * weight_implicit, xs


@pytest.mark.parametrize("gemm", GEMMS)
def test_empty_batch_and_channels_give_zeros(gemm):
    """An empty batch (nothing to sum for the weight gradient) and no input channels (empty
    sums): zeros of the convolution's shapes, not a failed product.  (PyTorch's float conv2d
    returns the input's shape for zero channels, so the reference is written out.)"""
    for xs, ws in [((0, 8, 5, 5), (4, 8, 3, 3)), ((2, 0, 5, 5), (4, 0, 3, 3))]:
        x, w = torch.zeros(xs, dtype=torch.int8), torch.zeros(ws, dtype=torch.int8)
        out = amx.int8_conv(x, w, [1, 1], [1, 1], gemm=gemm)
        assert torch.equal(out, torch.zeros(xs[0], ws[0], 5, 5, dtype=torch.int32))
        e = torch.ones(out.shape, dtype=torch.int8)
        assert torch.equal(amx.int8_conv_weight(e, x, [3, 3], [1, 1], [1, 1], gemm=gemm),
                           torch.zeros(ws, dtype=torch.int32))


@pytest.mark.parametrize("xs,ws,padding,dilation", CASES[:3] + CASES[4:6])
def test_reference_ops_are_exact(xs, ws, padding, dilation, monkeypatch):
    """The ops on a CPU without AMX (the engine forced to oneDNN): the im2col GEMMs, the same
    integers in the same layouts."""
    monkeypatch.setenv(amx.ENGINE_VARIABLE, "onednn")
    g = torch.Generator().manual_seed(7)
    x, w = rand8(*xs, gen=g), rand8(*ws, gen=g)
    out = ops.int8_conv(x, w, padding, dilation)
    assert torch.equal(out, exact(x, w, padding, dilation))
    e = rand8(*out.shape, gen=g)
    assert torch.equal(ops.int8_conv_weight(e, x, list(ws[2:]), padding, dilation), exact(x, w, padding, dilation, e))


@pytest.mark.parametrize("gemm", GEMMS)
@settings(max_examples=40, deadline=None)
@given(nd=st.integers(1, 3), n=st.integers(1, 3), c=st.integers(1, 70), cout=st.integers(1, 40),
       data=st.data(), seed=st.integers(0, 2 ** 31 - 1))
def test_implicit_conv_property(gemm, nd, n, c, cout, data, seed):
    kernel = [data.draw(st.integers(1, 3)) for _ in range(nd)]
    dilation = [data.draw(st.integers(1, 2)) for _ in range(nd)]
    padding = [data.draw(st.integers(0, 2)) for _ in range(nd)]
    sizes = [data.draw(st.integers(max(1, d * (k - 1) + 1 - 2 * p), 7)) for k, d, p in zip(kernel, dilation, padding)]
    kind = data.draw(st.sampled_from(["contiguous", "channels_last", "sliced"]))
    g = torch.Generator().manual_seed(seed)
    bound = X_BOUND[gemm]
    x, w = layout(rand8(n, c, *sizes, gen=g, low=-bound, high=bound), kind), rand8(cout, c, *kernel, gen=g)
    ref = exact(x, w, padding, dilation)
    assert torch.equal(amx.int8_conv(x, w, padding, dilation, gemm=gemm), ref)
    e = rand8(*ref.shape, gen=g)
    assert torch.equal(amx.int8_conv_weight(e, x, kernel, padding, dilation, gemm=gemm),
                       exact(x, w, padding, dilation, e))


def test_ops_fake_implementations():
    g = torch.Generator().manual_seed(3)
    x, w = rand8(2, 24, 7, 12, gen=g), rand8(16, 24, 3, 5, gen=g)
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.sqcompile.int8_conv.default, (x, w, [2, 0], [1, 2]), test_utils=utils)
    e = rand8(2, 16, 9, 4, gen=g)       # the output gradient: 7 + 2*2 - 2 rows, 12 - 4*2 columns
    torch.library.opcheck(torch.ops.sqcompile.int8_conv_weight.default, (e, x, [3, 5], [2, 0], [1, 2]),
                          test_utils=utils)


@pytest.mark.parametrize("shape", [(2, 16, 11, 4), (2, 16, 9, 5), (3, 16, 9, 4), (2, 16, 36)])
def test_weight_gradient_refuses_an_output_gradient_of_another_shape(shape):
    """On every engine (the AMX kernel would read ``e`` on the wrong grid)."""
    g = torch.Generator().manual_seed(3)
    x, e = rand8(2, 24, 7, 12, gen=g), rand8(*shape, gen=g)
    with pytest.raises(ValueError, match=r"int8_conv_weight: e has shape .* has shape \(2, 16, 9, 4\)"):
        torch.ops.sqcompile.int8_conv_weight(e, x, [3, 5], [2, 0], [1, 2])


@needs_amx
def test_weight_gradient_splits_the_batch_to_keep_int32_exact(monkeypatch):
    """Past ``MAX_INT32_TERMS`` grid positions the batch is cut into slices, each one exact
    product, their sums added in float64 (here the limit is lowered to force three slices)."""
    g = torch.Generator().manual_seed(5)
    x, e = rand8(5, 8, 6, 6, gen=g, low=-128), rand8(5, 4, 6, 6, gen=g, low=-128)
    w = torch.zeros(4, 8, 3, 3)
    calls = []
    real = torch.ops.sqcompile.int8_conv_weight
    ks = ops.kernel_set("torch")._replace(int8_conv_weight=lambda *a: calls.append(a[0].shape[0]) or real(*a))
    monkeypatch.setattr(ops, "MAX_INT32_TERMS", 2 * 8 * 8)
    dw = ops.im2col_conv_weight_grad(ks, e, x, w.shape, [1, 1], [1, 1], [1, 1])
    assert calls == [2, 2, 1]
    assert torch.equal(dw.double(), exact(x, w.to(torch.int8), [1, 1], [1, 1], e).double())


@contextlib.contextmanager
def im2col_family():
    """The torch kernel family without its implicit convolutions (stride-1 convs as im2col
    GEMMs), while compiling and running."""
    family = ops.kernel_set("torch")
    ops.register_kernel_set("torch", family._replace(int8_conv=None, int8_conv_weight=None))
    try:
        yield
    finally:
        ops.register_kernel_set("torch", family)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 32, 3, padding=1)
        self.c2 = torch.nn.Conv2d(32, 64, 3, padding=2, dilation=2)
        self.down = torch.nn.Conv2d(64, 64, 3, stride=2, padding=1)
        self.c3 = torch.nn.Conv2d(64, 40, 1)
        self.up = torch.nn.ConvTranspose2d(40, 16, 3, padding=1)       # stride 1: a conv's input gradient
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.c2(F.relu(self.c1(x))))
        x = F.relu(self.up(F.relu(self.c3(F.relu(self.down(x))))))
        return self.fc(x.mean((2, 3)))


def _train(model, x, family, inner):
    torch.manual_seed(1)
    with family:
        m = torch.compile(model, backend="shiftquant", options={"inner": inner})
        out = m(x)
        out.pow(2).mean().backward()
    return out, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("gemm", GEMMS)
def test_compiled_cnn_trains_as_with_im2col_gemms(gemm, monkeypatch):
    """The same integer products either way, so a compiled step gives the same outputs and
    gradients bit for bit; the implicit ops are in the graphs (forward, input and weight
    gradients of the stride-1 convs, the strided conv's input gradient by output phase);
    the strided conv's forward and weight gradient keep their im2col GEMMs.  Inductor compiles
    the graphs for the engine ``auto`` takes here, the eager inner compiler runs them for the
    others (the engine changes the kernels, not the graphs; two Inductor compiles per engine
    were the suite's slowest test)."""
    inner = "inductor" if gemm == amx.conv_engine() else "eager"
    monkeypatch.setenv(amx.ENGINE_VARIABLE, gemm)
    torch.manual_seed(0)
    model, x = Net(), torch.randn(2, 3, 12, 12)
    ref_out, ref_grads = _train(copy.deepcopy(model), x, im2col_family(), inner)
    torch._dynamo.reset()
    out, grads = _train(model, x, contextlib.nullcontext(), inner)
    assert torch.equal(out, ref_out)
    for name in grads:
        assert torch.equal(grads[name], ref_grads[name]), name
    rec = records_for(list(model.parameters()))[-1]
    assert rec.graphs["forward"].count("sqcompile.int8_conv(") == 4           # c1, c2, c3, up
    assert rec.graphs["backward"].count("sqcompile.int8_conv_weight(") == 4
    # dX of c2, c3 and up, and of down's four output phases (c1's input needs none)
    assert rec.graphs["backward"].count("sqcompile.int8_conv(") == 3 + 4

