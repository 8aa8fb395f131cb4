"""The Triton L1 norm (:mod:`sqcompile.kernels.triton_norm`) and its fusion with the quantizers
of the GEMMs it feeds (:mod:`sqcompile.backends.norm_fusion`).

Without CUDA the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set by
conftest.py), on small shapes whose rows are not powers of two and whose row counts are not
multiples of the kernels' row blocks.  References:

* the input quantizer against :func:`sqcompile.numerics.quantize` (bit for bit);
* ``y`` and the statistics against the torch implementation in :mod:`sqcompile.norms`;
* the backward against float autograd of the L1 formula at the same dequantized input and
  the same quantized gradient (drawn by ``triton_quantize`` with the kernel's seed);
* the output-quantized kernel against quantizing the plain kernel's ``y`` (bit for bit);
* compiled models with fusion on against fusion off, and against the torch kernel family.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sqcompile import norms
from sqcompile import numerics as N
from sqcompile.decisions import records_for
from sqcompile.kernels.triton_ops import triton_available

AVAILABLE, WHY = triton_available()
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=WHY)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
C = norms.L1_SCALE
EPS = 1e-3
SHAPES = [(13, 45), (6, 16), (3, 1)]          # rows x L: masked edges, one tile, a single column


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _kernels():
    from sqcompile.kernels import triton_norm, triton_quant
    return triton_norm, triton_quant


def _case(shape, dtype, center, affine, seed=0):
    g = torch.Generator().manual_seed(seed)
    R, L = shape
    x = (torch.randn(R, L, generator=g) * 3 + 0.5).to(dtype)
    w = (torch.randn(L, generator=g) + 1).to(dtype) if affine else None
    b = torch.randn(L, generator=g).to(dtype) if affine and center else None
    return [t if t is None else t.to(DEVICE) for t in (x, w, b)]


def _torch_norm(x, w, b, center, bits=8):
    fn = norms.l1_layer_norm if center else norms.l1_rms_norm
    extra = (b,) if center else ()
    return fn(x, [x.shape[-1]], w, *extra, eps=EPS, norm_bits=bits, kernels="torch")


def _float_reference(xc, w, b, center, dy):
    """Float autograd of the L1 formula at the dequantized input ``xc`` for the gradient ``dy``:
    ``(dx, dw, db)``."""
    xc = xc.detach().clone().requires_grad_()
    wf = None if w is None else w.detach().float().requires_grad_()
    bf = None if b is None else b.detach().float().requires_grad_()
    z = xc - xc.mean(1, keepdim=True) if center else xc
    y = z / torch.sqrt((C * z.abs().mean(1, keepdim=True)) ** 2 + EPS)
    y = y if wf is None else y * wf
    y = y if bf is None else y + bf
    y.backward(dy)
    return xc.grad, None if wf is None else wf.grad, None if bf is None else bf.grad


def _close(got, want, dtype):
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float().cpu(), want.float().cpu(), rtol=tol, atol=tol * float(want.abs().max()))


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------

def check_forward(shape, dtype, center, affine, seed=0):
    tn, _ = _kernels()
    x, w, b = _case(shape, dtype, center, affine, seed)
    y, q, scale, mean, inv = tn.l1_norm(x, w, b, 6, center, C, EPS)
    q_ref, s_ref = N.quantize(x, 6, [0], "nearest")
    assert torch.equal(q, q_ref) and torch.equal(scale, s_ref)        # the input quantizer: exact
    assert y.dtype == dtype and y.shape == x.shape
    _close(y, _torch_norm(x, w, b, center, bits=6), dtype)
    xc = N.dequantize(q_ref, s_ref)
    mean_ref = xc.mean(1, keepdim=True) if center else torch.zeros_like(mean)
    sigma = C * (xc - mean_ref).abs().mean(1, keepdim=True)
    torch.testing.assert_close(mean, mean_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(inv, 1.0 / torch.sqrt(sigma * sigma + EPS), rtol=1e-5, atol=0)


def check_output_quantized(shape, dtype, out_bits):
    tn, tq = _kernels()
    x, w, b = _case(shape, dtype, True, True, seed=3)
    x[2] = 0.0                                         # a zero row: scale 0, output = bias
    y, q, scale, mean, inv = tn.l1_norm(x, w, b, 8, True, C, EPS)
    qy, sy, q2, scale2, mean2, inv2 = tn.l1_norm_quantized(x, w, b, 8, True, C, EPS, out_bits)
    qy_ref, sy_ref = tq.quantize(y, out_bits, [0], False)
    assert torch.equal(qy, qy_ref) and torch.equal(sy, sy_ref.view(-1, 1))
    assert torch.equal(qy.cpu(), N.quantize(y.cpu(), out_bits, [0], "nearest")[0])
    for a, b_ in ((q, q2), (scale, scale2), (mean, mean2), (inv, inv2)):
        assert torch.equal(a, b_)


def check_backward(shape, dtype, center, affine, sum_rtol=1e-5):
    tn, tq = _kernels()
    x, w, b = _case(shape, dtype, center, affine, seed=5)
    _, q, scale, mean, inv = tn.l1_norm(x, w, b, 8, center, C, EPS)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(6)).to(dtype).to(DEVICE)
    dx, dw, db = tn.l1_norm_backward(dy, q, scale, mean, inv, w, 6, center, C, w is not None, b is not None, seed=11)
    # the gradient quantizer is triton_quantize's: same seed, same draws
    dq, ds = tq.quantize(dy, 6, [0], True, seed=11)
    dx_ref, dw_ref, db_ref = _float_reference(N.dequantize(q, scale), w, b, center, N.dequantize(dq, ds.view(-1, 1)))
    assert dx.dtype == dtype
    _close(dx, dx_ref, dtype)
    for got, want in ((dw, dw_ref), (db, db_ref)):      # column sums over all rows
        if want is None:
            assert got.numel() == 0
        else:
            torch.testing.assert_close(got, want, rtol=sum_rtol, atol=sum_rtol * float(want.abs().max()))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("center,affine", [(True, True), (True, False), (False, True)])
def test_forward_kernel_matches_the_torch_norm(shape, dtype, center, affine):
    check_forward(shape, dtype, center, affine)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_bits", [4, 8])
def test_output_quantized_kernel_equals_quantizing_the_output(dtype, out_bits):
    check_output_quantized((13, 45), dtype, out_bits)


@pytest.mark.parametrize("shape", SHAPES[:2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("center,affine", [(True, True), (False, True), (True, False)])
def test_backward_kernel_matches_float_autograd_at_the_same_quantized_gradient(shape, dtype, center, affine):
    check_backward(shape, dtype, center, affine)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
class TestOnGPU:
    """The same checks at transformer sizes, compiled for the device (rows of 768 to 8192,
    the block shapes with 8 and 16 warps, many programs and the backward's row loop)."""

    @pytest.mark.parametrize("shape,dtype", [((8192, 1024), torch.bfloat16), ((2048, 4096), torch.float32),
                                             ((300, 8192), torch.bfloat16), ((4097, 768), torch.float16)])
    def test_forward_and_backward(self, shape, dtype):
        check_forward(shape, dtype, True, True)
        check_forward(shape, dtype, False, True)
        check_output_quantized(shape, dtype, 4)
        check_backward(shape, dtype, True, True, sum_rtol=1e-4)


def test_backward_rounding_is_seeded_and_unbiased():
    tn, _ = _kernels()
    x, w, b = _case((6, 40), torch.float32, True, True, seed=7)
    _, q, scale, mean, inv = tn.l1_norm(x, w, b, 8, True, C, EPS)
    dy = torch.randn(6, 40, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    run = lambda seed: tn.l1_norm_backward(dy, q, scale, mean, inv, w, 4, True, C, True, True, seed=seed)[0]  # noqa: E731
    assert torch.equal(run(3), run(3)) and not torch.equal(run(3), run(4))
    exact = _float_reference(N.dequantize(q, scale), w, b, True, dy)[0]
    one = (run(0) - exact).norm()
    mean_of_many = (torch.stack([run(s) for s in range(64)]).mean(0) - exact).norm()
    # 4-bit stochastic rounding of dy: the average of 64 draws is ~8x closer than one draw
    assert mean_of_many < one / 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_with_the_residual_added_is_the_add(dtype):
    """``l1_norm_backward_residual``: bit for bit ``dx + residual`` of the plain backward (the
    same seed), the same weight / bias gradients; the sum's ShiftQuant ranges per column and
    per row exactly (NaN as +inf) and its column sums to float32 rounding, once rounded to
    the dtype."""
    tn, _ = _kernels()
    x, w, b = _case((13, 45), dtype, True, True, seed=3)
    _, q, scale, mean, inv = tn.l1_norm(x, w, b, 8, True, C, EPS)
    g = torch.Generator().manual_seed(4)
    dy, res = (torch.randn(13, 45, generator=g).to(DEVICE, dtype) for _ in range(2))
    res[4, 7] = float("nan")
    dx, dw, db = tn.l1_norm_backward(dy, q, scale, mean, inv, w, 4, True, C, True, True, seed=9)
    out, dw2, db2, cols, rows, sums = tn.l1_norm_backward_residual(dy, q, scale, mean, inv, w, res, 4, True, C, True,
                                                                   True, True, True, seed=9)
    expected = dx + res
    assert torch.equal(out.nan_to_num(), expected.nan_to_num()) and out.isnan().sum() == 1
    assert torch.equal(dw, dw2) and torch.equal(db, db2)
    mag = expected.float().abs().nan_to_num(nan=float("inf"))
    assert torch.equal(cols, mag.amax(0)) and torch.equal(rows, mag.amax(1)) and cols[7] == float("inf")
    assert sums.dtype == dtype and sums[7].isnan()
    finite = torch.arange(45, device=DEVICE) != 7
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2 ** -8, atol=0)
    torch.testing.assert_close(sums[finite].double(), expected.double().sum(0)[finite].to(dtype).double(), **tol)
    # neither ranges nor sums asked: empty; a residual of another shape: refused
    _, _, _, cols, rows, sums = tn.l1_norm_backward_residual(dy, q, scale, mean, inv, w, res, 4, True, C, False,
                                                             False, False, False, seed=9)
    assert cols.numel() == rows.numel() == sums.numel() == 0
    with pytest.raises(ValueError, match="residual"):
        tn.l1_norm_backward_residual(dy, q, scale, mean, inv, w, res[:, :5], 4, True, C, True, True, True, True)


def test_kernels_refuse_what_they_cannot_take():
    tn, _ = _kernels()
    with pytest.raises(ValueError, match="contiguous"):
        tn.l1_norm(torch.randn(4, 6, device=DEVICE).t(), None, None, 8, True, C, EPS)
    with pytest.raises(ValueError, match="float64"):
        tn.l1_norm(torch.randn(4, 6, dtype=torch.float64, device=DEVICE), None, None, 8, True, C, EPS)
    with pytest.raises(ValueError, match="8192"):
        tn.l1_norm(torch.randn(1, 8193, device=DEVICE), None, None, 8, True, C, EPS)
    with pytest.raises(ValueError, match="weight"):
        tn.l1_norm(torch.randn(4, 6, device=DEVICE), torch.ones(5, device=DEVICE), None, 8, True, C, EPS)


def test_norm_api_names_the_kernels_argument():
    x = torch.randn(3, 8, device=DEVICE)
    with pytest.raises(ValueError, match="kernels"):
        norms.l1_layer_norm(x, [8], norm_bits=8, kernels="cuda")
    with pytest.raises(ValueError, match="kernels='triton'.*float64"):
        norms.l1_layer_norm(x.double(), [8], norm_bits=8, kernels="triton")
    with pytest.raises(ValueError, match="kernels='triton'.*quantize=False"):
        norms.l1_rms_norm(x, [8], norm_bits=None, kernels="triton")


def test_forward_ops_pass_opcheck():
    x, w, b = _case((5, 12), torch.float32, True, True)
    ops = torch.ops.sqcompile
    _, q, scale, mean, inv = ops.triton_l1_norm(x, w, b, 8, True, C, EPS)
    dy, res = torch.randn_like(x), torch.randn_like(x)
    for op, args in ((ops.triton_l1_norm.default, (x, w, b, 8, True, C, EPS)),
                     (ops.triton_l1_norm_quantized.default, (x, w, b, 8, True, C, EPS, 4)),
                     (ops.triton_l1_norm_backward_residual.default,
                      (dy, q, scale, mean, inv, w, res, 4, True, C, True, False, True, True))):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------------------------------------
# Autograd and compiled models
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("center", [True, False])
def test_autograd_function_gives_the_kernels_gradients(center):
    """``l1_layer_norm(..., kernels="triton")`` end to end against the torch implementation:
    forward to float32 rounding, gradients within 8-bit stochastic rounding of the gradient."""
    x, w, b = _case((2 * 7, 30), torch.float32, center, True, seed=9)
    x = x.view(2, 7, 30)
    grads = []
    for kernels in ("triton", "torch"):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        bb = b.clone().requires_grad_() if center else None
        fn = norms.l1_layer_norm if center else norms.l1_rms_norm
        y = fn(xx, [30], ww, *((bb,) if center else ()), eps=EPS, norm_bits=8, kernels=kernels)
        (y * torch.linspace(-1, 1, 30, device=DEVICE)).square().sum().backward()
        grads.append([y.detach(), xx.grad, ww.grad] + ([bb.grad] if center else []))
    _close(grads[0][0], grads[1][0], torch.float32)
    for got, want in zip(grads[0][1:], grads[1][1:]):     # each family draws its own noise
        assert float((got - want).norm() / want.norm()) < 0.05


class NormFeedsLinears(nn.Module):
    """LayerNorm -> q / k / v Linears (three quantizers of the same output), and an RMSNorm whose
    output also feeds a residual (no fusion there)."""

    def __init__(self, d=24):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.rms = nn.RMSNorm(d)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        h = self.ln(x)
        h = self.q(h) * self.k(h) + self.v(h)
        r = self.rms(h)
        return r + self.out(r)


def _step(model, x, options):
    model = copy.deepcopy(model).to(DEVICE)
    compiled = torch.compile(model, backend="shiftquant", options={"kernels": "triton", "inner": "eager", **options})
    torch.manual_seed(1)
    out = compiled(x.to(DEVICE))
    out.square().mean().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}, records_for(list(model.parameters()))[-1]


def test_compiled_norms_run_on_triton_and_fuse_with_the_gemm_quantizers():
    torch.manual_seed(0)
    model, x = NormFeedsLinears(), torch.randn(2, 5, 24)
    out, grads, rec = _step(model, x, {"weight_bits": 8, "act_bits": 8})
    ref_out, ref_grads, ref_rec = _step(model, x, {"weight_bits": 8, "act_bits": 8, "fusion": False})
    norms_ = {d.module_path: d for d in rec.decisions if d.kind == "norm"}
    assert norms_["ln"].execution == "triton" and norms_["rms"].execution == "triton"
    assert "sqcompile.triton_l1_norm(" in rec.graphs["forward"]
    assert "triton_l1_norm_backward" in rec.graphs["backward"]
    # ln's output only feeds the three quantizers: one kernel writes their int8 operand;
    # rms's output also feeds the residual: it stays a plain norm
    fused = rec.graphs["forward_fused"]
    assert fused.count("triton_l1_norm_quantized(") == 1 and fused.count("triton_l1_norm(") == 1
    region = [r for r in rec.regions if r.label == "l1_norm+quantize"]
    assert len(region) == 1 and region[0].module_path == "ln" and len(region[0].nodes) == 4
    assert norms_["ln"].region.endswith("l1_norm+quantize") and norms_["rms"].region is None
    assert not any(r.label == "l1_norm+quantize" for r in ref_rec.regions)
    # fused == unfused: the forward to float rounding of the GEMM epilogues, the gradients too
    # (same seeds: the same stochastic draws)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5 * float(ref_grads[name].abs().max()))


class PreNormResidual(nn.Module):
    """``y = lin(x); y + fc(ln(y))``: ``lin``'s output gradient is the residual's plus the
    norm's input gradient, which ``lin`` ShiftQuants both ways (``x`` comes from a Linear
    too) and sums for its bias."""

    def __init__(self, d=24):
        super().__init__()
        self.inp, self.lin, self.ln, self.fc = nn.Linear(d, d), nn.Linear(d, d), nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, x):
        y = self.lin(self.inp(x))
        return y + self.fc(self.ln(y))


def test_norm_backward_takes_the_residual_add_its_ranges_and_its_sum(monkeypatch):
    """``fuse_norm_residuals``: the add after the norm's backward, the range pass of the pair
    that quantizes the sum and its column sum move into the norm's backward kernel; the
    gradients are those of the same compile without it, bit for bit but ``lin``'s bias
    gradient (summed in another order)."""
    from sqcompile.backends import lowering, norm_fusion

    torch.manual_seed(0)
    model, x = PreNormResidual(), torch.randn(2, 5, 24)
    plain = {"grad_outer_scale": False}      # ranges of the gradient itself (not of its quotients)
    _, grads, rec = _step(model, x, plain)
    backward = rec.graphs["backward_fused"]
    assert "triton_l1_norm_backward_residual(" in backward and "triton_l1_norm_backward(" not in backward
    assert [r.label for r in rec.regions if r.module_path == "ln" and r.stage == "backward"] == [
        norm_fusion.RESIDUAL_LABEL + "+ranges+sum"]
    def pairs(graph):           # the ShiftQuant pairs, and how many take no given ranges
        found = [line for line in graph.splitlines() if "triton_shiftquant_pair(" in line]
        return len(found), sum(", None, None, " in line for line in found)
    monkeypatch.setattr(lowering, "fuse_norm_residuals", lambda gm, *args: gm)
    torch._dynamo.reset()
    _, ref_grads, ref_rec = _step(model, x, plain)
    assert "triton_l1_norm_backward_residual(" not in ref_rec.graphs["backward_fused"]
    assert backward.count("aten.sum.dim_IntList(") == ref_rec.graphs["backward_fused"].count("aten.sum.dim_IntList(") - 1
    assert backward.count("aten.add.Tensor(") == ref_rec.graphs["backward_fused"].count("aten.add.Tensor(") - 1
    # fc's output gradient (the loss's) and lin's (now with the kernel's ranges)
    assert pairs(backward) == (2, 1) and pairs(ref_rec.graphs["backward_fused"]) == (2, 2)
    for name in grads:
        if name == "lin.bias":
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-7)
        else:
            assert torch.equal(grads[name], ref_grads[name]), name


def test_norm_quantizer_fusion_is_bit_exact(monkeypatch):
    """Only the norm fusion differs (the GEMM regions are the same): identical int8 operands,
    so identical outputs."""
    from sqcompile.backends import lowering

    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(20), nn.Linear(20, 12))
    x = torch.randn(3, 4, 20)
    out, _, rec = _step(model, x, {})
    monkeypatch.setattr(lowering, "fuse_norm_quantizers", lambda gm, *args: gm)
    torch._dynamo.reset()
    ref, _, ref_rec = _step(model, x, {})
    assert [r.label for r in rec.regions if r.stage == "forward"] == ["int8_mm+dequant+bias", "l1_norm+quantize"]
    assert [r.label for r in ref_rec.regions if r.stage == "forward"] == ["int8_mm+dequant+bias"]
    assert torch.equal(out, ref)


def test_norm_feeding_three_linears_under_inductor_gives_the_unfused_gradients(monkeypatch):
    """One norm's int8 output read by the q, k and v Linears, compiled by Inductor (the tests
    above run the graphs eagerly): the fused graph saves three views of one tensor for the
    backward, and the gradients equal those of the same compile without the norm fusion, bit
    for bit (the GEMM regions are the same).  Such aliases must not be AOTAutograd's donated
    buffers (``fusion.no_donation_of_aliases``); the CPU kernels' test
    ``test_row_norms_fuse_with_their_quantizers_and_residual_adds`` is the one where Inductor
    did reuse one."""
    from sqcompile.backends import lowering

    torch.manual_seed(0)
    model = NormFeedsLinears()
    x = torch.randn(2, 8, 24)
    out, grads, rec = _step(model, x, {"inner": "inductor"})
    assert "l1_norm+quantize" in [r.label for r in rec.regions]
    monkeypatch.setattr(lowering, "fuse_norm_quantizers", lambda gm, *args: gm)
    torch._dynamo.reset()
    ref, ref_grads, _ = _step(model, x, {"inner": "inductor"})
    assert torch.equal(out, ref)
    for name in grads:
        assert torch.equal(grads[name], ref_grads[name]), name


@pytest.mark.parametrize("module,options,reason", [
    (nn.LayerNorm(8193), {}, "rows of 8193 elements"),
    (nn.LayerNorm(16).double(), {}, "torch.float64 input"),
    (nn.LayerNorm(16), {"collect_stats": True}, "collect_stats"),
])
def test_norms_the_kernels_cannot_take_stay_on_torch_and_say_why(module, options, reason):
    x = torch.randn(2, module.normalized_shape[0], dtype=module.weight.dtype)
    _, _, rec = _step(module, x, options)
    d = next(d for d in rec.decisions if d.kind == "norm")
    assert d.execution == "simulated" and reason in d.reason
    assert "triton_l1_norm" not in rec.graphs["forward"]


def test_batch_norm_stays_on_the_torch_implementation():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    _, _, rec = _step(model, torch.randn(2, 3, 6, 6), {})
    d = next(d for d in rec.decisions if d.kind == "norm")
    assert d.execution == "simulated" and d.reason is None


_HOPPER_SCRIPT = """
import json, sm90
from sqcompile.kernels import triton_norm as tn
fwd, bwd = sm90.SIGNATURES["l1_norm"], sm90.SIGNATURES["l1_norm_backward"]
result = {}
for L in (1024, 4096):
    br, bl, w = tn._block(L, 4096, tn.FORWARD_PER_THREAD)
    for out_q in (False, True):
        result[f"fwd {L} out_q={out_q}"] = sm90.compile_sm90(tn._l1_norm_kernel, fwd, dict(
            QMAX=127, OUT_QMAX=7, CENTER=True, HAS_W=True, HAS_B=True, OUT_Q=out_q, BLOCK_R=br, BLOCK_L=bl),
            num_warps=w)["spilled"]
    br, bl, w = tn._block(L, 2048, tn.BACKWARD_PER_THREAD)
    for res in (False, True):     # with the residual add, the sum's ranges and its column sums
        result[f"bwd {L} residual={res}"] = sm90.compile_sm90(tn._l1_norm_backward_kernel, bwd, dict(
            GQMAX=127, CENTER=True, HAS_W=True, NEED_DW=True, NEED_DB=True, RESIDUAL=res, RANGES=res, SUMS=res,
            BLOCK_R=br, BLOCK_L=bl), num_warps=w)["spilled"]
print(json.dumps(result))
"""


@pytest.mark.slow
def test_norm_kernels_compile_for_hopper_without_spills():
    """The interpreter is lenient: compile the norm kernels for sm_90 (no GPU needed), with the
    block shapes the launchers pick for rows of 1024 and 4096, and check with ``ptxas -v``
    (when Triton ships it) that nothing spills."""
    import json
    pytest.importorskip("triton.backends.nvidia")
    import sm90
    result = json.loads(sm90.run(_HOPPER_SCRIPT).strip().splitlines()[-1])
    assert len(result) == 8 and all(v <= 0 for v in result.values()), result


def test_an_override_puts_a_norm_back_on_the_torch_implementation():
    model = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 8))
    _, _, rec = _step(model, torch.randn(2, 3, 16), {"overrides": {"*:layer_norm": {"kernels": "torch"}}})
    norm = next(d for d in rec.decisions if d.kind == "norm")
    gemm = next(d for d in rec.decisions if d.kind == "gemm")
    assert norm.execution == "simulated" and gemm.execution == "triton"
    assert "triton_l1_norm" not in rec.graphs["forward"]
