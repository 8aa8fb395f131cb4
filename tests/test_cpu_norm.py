"""The L1 norm's C kernels (:mod:`sqcompile.kernels.cpu_norm`) and where they run.

* the ops against their PyTorch references (``l1_norm_reference`` /
  ``l1_norm_backward_reference``: :mod:`sqcompile.numerics`' quantizers, ``hash_noise``
  with the same seed): the int8 input, its maxima and the quantized gradient bit for bit,
  everything computed from sums to float32 rounding; over the norm kinds' layouts, with
  and without affine, centered or not, 2-8 bits, and over random shapes and slicings
  (hypothesis), at several thread counts, with constant slices and NaNs;
* the references against an independent float64 formula of the L1 norm and its gradient;
* the autograd function against :class:`sqcompile.norms._L1Norm` (the ops the norm is
  otherwise made of) and against float64 autograd of the unquantized formula;
* the ops' schemas and fake implementations (``opcheck``);
* which norms the rewriting pass puts on the kernels (BatchNorm / InstanceNorm / a norm
  without affine on CPU, float32, contiguous), the decision's note, and that a compiled
  CNN trains with them as with the graph of ops.
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from sqcompile import norms
from sqcompile import numerics as N
from sqcompile.decisions import records_for
from sqcompile.kernels import cpu_norm as CN
from sqcompile.kernels import native

l1_norms_pass = importlib.import_module("sqcompile.passes.l1_norms")

OK, WHY = CN.status()
needs_kernel = pytest.mark.skipif(not OK, reason=f"the CPU L1-norm kernels cannot run here: {WHY}")
C = norms.L1_SCALE
EPS = 1e-5


def test_kernel_builds_where_the_cpu_can_run_it():
    """Skipping is for machines that are not Linux on x86-64 (or an ``SQCOMPILE_CPU_SIMD=avx512``
    on a CPU without it), not for a kernel that fails to build."""
    if native.status(native.simd_build()[2], lambda: None)[0]:
        assert OK, WHY


@pytest.mark.parametrize("shape, dims, expected", [
    ((16, 32, 8, 8), (2, 3), [1, 1, 512, 64]),          # instance norm
    ((16, 32, 8, 8), (0, 2, 3), [1, 16, 32, 64]),       # batch norm
    ((4, 2, 8, 16), (2, 3), [1, 1, 8, 128]),            # group norm's view
    ((7, 5, 96), (2,), [1, 1, 35, 96]),                 # layer norm
    ((8, 12), (0,), [1, 8, 12, 1]),                     # batch norm over [N, C]: runs of 1
    ((2, 3, 4, 5), (0, 1), [1, 6, 20, 1]),
    ((2, 3, 4, 5), (1, 3), [2, 3, 4, 5]),
    ((2, 3, 4, 5), (0, 2), None),                       # kept, reduced, kept, reduced, kept: no
])
def test_slice_layout(shape, dims, expected):
    assert CN.slice_layout(shape, dims) == expected


def _case(shape, dims, affine, seed=0, scale=3.0, row=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * scale
    pshape = [s for d, s in enumerate(shape) if d in dims] if row else [1 if d in dims else s for d, s in enumerate(shape)]
    w = torch.rand(pshape, generator=g) + 0.5 if affine else None
    b = torch.randn(pshape, generator=g) if affine else None
    return x, w, b, torch.randn(shape, generator=g)


def _check_forward(out, ref, msg=""):
    y, q, amax, total, deviation = out
    ry, rq, ramax, rtotal, rdev = ref
    assert torch.equal(q, rq), msg
    assert torch.equal(amax, ramax), msg
    n = q.numel() // amax.numel()        # the sums are of n values: their rounding grows with n
    torch.testing.assert_close(total, rtotal, rtol=1e-5, atol=1e-6 * n * ramax.max().item(), msg=msg)
    torch.testing.assert_close(deviation, rdev, rtol=1e-5, atol=1e-6, msg=msg)
    torch.testing.assert_close(y, ry, rtol=1e-5, atol=2e-5, msg=msg)


def _check_backward(out, ref, msg="", dy=None):
    """``(dx, sum_dy, sum_dyx)`` against the reference: each to ``1e-4`` relative and
    ``1e-5`` of its largest value.  With ``dy``, the two parameter sums also to float32's
    rounding of a sum of ``n`` terms summed in another order, ``1e-7 * n`` times the largest
    term (``|dy|``, and ``|dy * xhat|`` taken as ``10 |dy|``): ``n`` terms that nearly cancel
    differ by more than ulps of their result (hypothesis found 3456 terms of about 1 summing to
    0.115, 2.2e-5 apart)."""
    for i, (a, r) in enumerate(zip(out, ref)):
        atol = 1e-5 * max(1.0, r.abs().max().item())
        if dy is not None and i > 0 and r.numel():
            atol += 1e-7 * (dy.numel() // r.numel()) * dy.abs().max().item() * (1 if i == 1 else 10)
        torch.testing.assert_close(a, r, rtol=1e-4, atol=atol, msg=msg)


LAYOUTS = [((16, 32, 8, 8), (2, 3)), ((16, 32, 8, 8), (0, 2, 3)), ((4, 2, 8, 16), (2, 3)), ((7, 5, 100), (2,)),
           ((3, 6, 5, 7, 9), (0, 2, 3, 4))]
ROW_LAYOUTS = [((7, 5, 100), (2,)), ((300, 48), (1,)), ((3, 4, 6, 20), (2, 3))]      # LayerNorm-like affine


@needs_kernel
@pytest.mark.parametrize("shape, dims", LAYOUTS)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("center", [True, False])
def test_ops_match_the_references(shape, dims, affine, center):
    x, w, b, dy = _case(shape, dims, affine)
    dims = list(dims)
    out = torch.ops.sqcompile.cpu_l1_norm(x, w, b, dims, center, C, EPS, 8)
    _check_forward(out, CN.l1_norm_reference(x, w, b, dims, center, C, EPS, 8))
    seed = torch.tensor(123456)
    saved = out[1:]
    got = torch.ops.sqcompile.cpu_l1_norm_backward(dy, *saved, w, seed, dims, center, C, EPS, 8, 6, True)
    _check_backward(got, CN.l1_norm_backward_reference(dy, *saved, w, seed, dims, center, C, EPS, 8, 6))
    # without dx: the same sums, and no dx
    dx, s1, s2 = torch.ops.sqcompile.cpu_l1_norm_backward(dy, *saved, w, seed, dims, center, C, EPS, 8, 6, False)
    assert dx.numel() == 0 and torch.equal(s1, got[1]) and torch.equal(s2, got[2])


@needs_kernel
@pytest.mark.parametrize("shape, dims", ROW_LAYOUTS)
@pytest.mark.parametrize("center", [True, False])
def test_row_affine_ops_match_the_references(shape, dims, center):
    """A LayerNorm's affine, one value per position along the rows: the backward's
    parameter sums run over all slices, in chunks added in order."""
    x, w, b, dy = _case(shape, dims, True, row=True)
    assert CN.affine_mode(shape, dims, w) == "row"
    dims = list(dims)
    out = torch.ops.sqcompile.cpu_l1_norm(x, w, b, dims, center, C, EPS, 8)
    _check_forward(out, CN.l1_norm_reference(x, w, b, dims, center, C, EPS, 8))
    seed = torch.tensor(77)
    got = torch.ops.sqcompile.cpu_l1_norm_backward(dy, *out[1:], w, seed, dims, center, C, EPS, 8, 8, True)
    ref = CN.l1_norm_backward_reference(dy, *out[1:], w, seed, dims, center, C, EPS, 8, 8)
    assert got[1].shape == ref[1].shape == torch.Size([s if d in dims else 1 for d, s in enumerate(shape)])
    _check_backward(got, ref)


@needs_kernel
@pytest.mark.parametrize("shape, dims", ROW_LAYOUTS + [((2, 3, 16), (2,))])
@pytest.mark.parametrize("out_bits", [4, 8])
@pytest.mark.parametrize("write_y", [True, False])
def test_quantized_output_is_the_next_quantizer_bit_for_bit(shape, dims, out_bits, write_y):
    """``cpu_l1_norm_quantized``: ``y`` through ``numerics.quantize`` per row (what the next
    Linear's quantizer computes) and the row maxima, bit for bit, with a zero row and a row
    holding a NaN; the statistics and ``y`` as ``cpu_l1_norm``'s."""
    x, w, b, _ = _case(shape, dims, True, row=True)
    row = CN.slice_layout(shape, dims)[3]
    x.view(-1, row)[0] = 0.0
    x.view(-1, row)[-1, 3] = float("nan")
    dims = list(dims)
    y, *stats = torch.ops.sqcompile.cpu_l1_norm(x, w, b, dims, True, C, EPS, 8)
    yq, ys, ya, y2, *stats2 = torch.ops.sqcompile.cpu_l1_norm_quantized(x, w, b, dims, True, C, EPS, 8, out_bits,
                                                                         write_y)
    rq, rs = N.quantize(y.reshape(-1, row), out_bits, [0])
    exact = dict(rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(yq.reshape(-1, row), rq, **exact)
    torch.testing.assert_close(ys.reshape(-1, 1), rs, **exact)
    torch.testing.assert_close(ya.reshape(-1, 1), N.amax(y.reshape(-1, row), [0]), **exact)
    assert torch.isnan(ys.reshape(-1)[-1]) and not yq.reshape(-1, row)[-1].any()
    for a, r in zip(stats2, stats):
        torch.testing.assert_close(a, r, **exact)
    if write_y:
        torch.testing.assert_close(y2, y, **exact)
    else:
        assert y2.numel() == 0
    with pytest.raises(ValueError, match="not rows"):
        torch.ops.sqcompile.cpu_l1_norm_quantized(torch.randn(4, 8, 32), None, None, [0, 2], True, C, EPS, 8, 8, True)


def _shiftquant_of_rows(y, row, bits, groups):
    """The next GEMM's ``act_groups`` quantizer over ``y`` as ``[1, rows, row]``
    (:func:`sqcompile.ops.shiftquant_outer`'s composition, nearest): ``(e, base, outer)``."""
    y3 = y.reshape(1, -1, row)
    r = N.safe_div_scale(N.amax(y3, [0, 1]))
    sq = N.shiftquant(y3 / r, bits, groups, [0, 2], "nearest")
    return sq.expanded, sq.base_scale, r


@needs_kernel
@pytest.mark.parametrize("shape, dims", ROW_LAYOUTS)
@pytest.mark.parametrize("out_bits, out_groups", [(4, 4), (6, 3), (2, 7)])
@pytest.mark.parametrize("write_y", [True, False])
def test_shiftquant_output_is_the_next_quantizer_bit_for_bit(shape, dims, out_bits, out_groups, write_y):
    """``cpu_l1_norm_shiftquant``: ``y`` through the next GEMM's ``act_groups`` quantizer (each
    row's maximum, 0 taken as 1 for a zero row; ShiftQuant of the quotients with a channel per
    column, the columns' ranges spread by the affine weight over every group) bit for bit, at
    two thread counts; the statistics and ``y`` as ``cpu_l1_norm``'s."""
    x, w, b, _ = _case(shape, dims, True, row=True)
    row = CN.slice_layout(shape, dims)[3]
    w = w * 2.0 ** (torch.arange(w.numel()) % 8).reshape(w.shape)
    b = b * 0
    x.view(-1, row)[0] = 0.0
    dims = list(dims)
    y, *stats = torch.ops.sqcompile.cpu_l1_norm(x, w, b, dims, True, C, EPS, 8)
    e_ref, base_ref, outer_ref = _shiftquant_of_rows(y, row, out_bits, out_groups)
    threads = torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            e, base, outer, y2, *stats2 = torch.ops.sqcompile.cpu_l1_norm_shiftquant(
                x, w, b, dims, True, C, EPS, 8, out_bits, out_groups, write_y)
            assert e.shape == shape and outer.shape == stats[1].shape
            assert torch.equal(e.reshape(e_ref.shape), e_ref) and torch.equal(base, base_ref)
            assert torch.equal(outer.reshape(outer_ref.shape), outer_ref) and outer.reshape(-1)[0] == 1
            for a, r in zip(stats2, stats):
                assert torch.equal(a, r)
            assert torch.equal(y2, y) if write_y else y2.numel() == 0
    finally:
        torch.set_num_threads(threads)
    used = e_ref[e_ref != 0].int().abs()          # the ladder is used: values shifted, values of finer groups
    assert used.max() > N.qmax(out_bits) and (used % 2 ** (out_groups - 1) != 0).any()


@needs_kernel
def test_shiftquant_output_with_a_nan_and_bad_arguments():
    """A NaN in one row makes every channel's range NaN: ``e`` all 0, the base NaN, as the
    composition.  Slices that are not rows, and groups that do not fit int8 (or are one), raise."""
    x, w, b, _ = _case((6, 40), (1,), True, row=True)
    x[2, 5] = float("nan")
    y = torch.ops.sqcompile.cpu_l1_norm(x, w, b, [1], True, C, EPS, 8)[0]
    e, base, outer, *_ = torch.ops.sqcompile.cpu_l1_norm_shiftquant(x, w, b, [1], True, C, EPS, 8, 4, 4, False)
    e_ref, base_ref, outer_ref = _shiftquant_of_rows(y, 40, 4, 4)
    assert not e.any() and not e_ref.any() and base.isnan() and base_ref.isnan()
    torch.testing.assert_close(outer.reshape(outer_ref.shape), outer_ref, rtol=0, atol=0, equal_nan=True)
    with pytest.raises(ValueError, match="not rows"):
        torch.ops.sqcompile.cpu_l1_norm_shiftquant(torch.randn(4, 8, 32), None, None, [0, 2], True, C, EPS, 8, 4, 4,
                                                   True)
    for groups in (1, 6):
        with pytest.raises(ValueError, match=f"out_groups={groups} at out_bits=4"):
            torch.ops.sqcompile.cpu_l1_norm_shiftquant(x, w, b, [1], True, C, EPS, 8, 4, groups, True)


@needs_kernel
@pytest.mark.parametrize("shape, dims, row", [((7, 5, 100), (2,), True), ((4, 24, 9, 9), (0, 2, 3), False)])
def test_backward_adds_the_residual_bit_for_bit(shape, dims, row):
    """``residual``: ``dx + residual`` as one add of the two float32 tensors, the sums unchanged."""
    x, w, b, dy = _case(shape, dims, True, row=row)
    dims = list(dims)
    saved = torch.ops.sqcompile.cpu_l1_norm(x, w, b, dims, True, C, EPS, 8)[1:]
    residual = torch.randn(shape)
    args = (dy, *saved, w, torch.tensor(9), dims, True, C, EPS, 8, 8, True)
    dx, s1, s2 = torch.ops.sqcompile.cpu_l1_norm_backward(*args)
    total, t1, t2 = torch.ops.sqcompile.cpu_l1_norm_backward(*args, residual)
    assert torch.equal(total, dx + residual) and torch.equal(t1, s1) and torch.equal(t2, s2)
    with pytest.raises(ValueError, match="residual"):
        torch.ops.sqcompile.cpu_l1_norm_backward(*args, residual[:1])


@needs_kernel
@pytest.mark.parametrize("bits", [2, 4, 6, 8])
@pytest.mark.parametrize("shape", [(8, 16, 6, 6), (8, 16, 8, 8)])   # rows of 36 and of 64 (the noise's aligned path)
def test_quantized_gradient_is_the_references_bit_for_bit(bits, shape):
    """At few bits the gradient's rounding dominates dx: an off-by-one integer anywhere would
    show as a whole quantization step, far outside the tolerance of the sums."""
    x, w, b, dy = _case(shape, (2, 3), True, seed=bits)
    dims = [2, 3]
    out = torch.ops.sqcompile.cpu_l1_norm(x, w, b, dims, True, C, EPS, bits)
    _check_forward(out, CN.l1_norm_reference(x, w, b, dims, True, C, EPS, bits))
    seed = torch.tensor(99 + bits)
    got = torch.ops.sqcompile.cpu_l1_norm_backward(dy, *out[1:], w, seed, dims, True, C, EPS, bits, bits, True)
    ref = CN.l1_norm_backward_reference(dy, *out[1:], w, seed, dims, True, C, EPS, bits, bits)
    _check_backward(got, ref)


@needs_kernel
@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=2, max_size=4), st.integers(16, 70), st.data(),
       st.booleans(), st.booleans(), st.sampled_from([1.0, 1e-3, 1e3]))
def test_ops_on_random_shapes(lead, row, data, affine, center, scale):
    shape = (*lead, row)
    nd = len(shape)
    kept = data.draw(st.lists(st.integers(0, nd - 2), unique=True, max_size=nd - 1), label="kept")
    # the trailing dim is reduced; every other dim kept or reduced as long as the layout holds
    dims = tuple(d for d in range(nd) if d not in kept)
    if CN.slice_layout(shape, dims) is None:
        return
    x, w, b, dy = _case(shape, dims, affine, seed=len(kept), scale=scale)
    out = torch.ops.sqcompile.cpu_l1_norm(x, w, b, list(dims), center, C, EPS, 8)
    _check_forward(out, CN.l1_norm_reference(x, w, b, list(dims), center, C, EPS, 8), str((shape, dims)))
    seed = torch.tensor(7)
    got = torch.ops.sqcompile.cpu_l1_norm_backward(dy, *out[1:], w, seed, list(dims), center, C, EPS, 8, 8, True)
    _check_backward(got, CN.l1_norm_backward_reference(dy, *out[1:], w, seed, list(dims), center, C, EPS, 8, 8),
                    str((shape, dims)), dy=dy)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("shape, dims, row", [((4, 24, 9, 9), [0, 2, 3], False), ((200, 40), [1], True)])
def test_results_do_not_depend_on_the_thread_count(threads, shape, dims, row):
    x, w, b, dy = _case(shape, dims, True, row=row)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.sqcompile.cpu_l1_norm(x, w, b, dims, True, C, EPS, 8)
        one_b = torch.ops.sqcompile.cpu_l1_norm_backward(dy, *one[1:], w, torch.tensor(3), dims, True, C, EPS, 8, 8,
                                                         True)
        torch.set_num_threads(threads)
        many = torch.ops.sqcompile.cpu_l1_norm(x, w, b, dims, True, C, EPS, 8)
        many_b = torch.ops.sqcompile.cpu_l1_norm_backward(dy, *many[1:], w, torch.tensor(3), dims, True, C, EPS, 8,
                                                          8, True)
    finally:
        torch.set_num_threads(before)
    for a, m in zip((*one, *one_b), (*many, *many_b)):
        assert torch.equal(a, m)


@needs_kernel
def test_constant_zero_and_nan_slices():
    x, w, b, dy = _case((2, 4, 32), (2,), True)
    x[0, 0] = 0.0                    # all zero: scale 0 (divides as 1), output = bias
    x[0, 1] = 2.5                    # constant: no deviation, output = bias
    x[1, 2, 5] = float("nan")        # NaN: the slice's maxima and everything after NaN
    dy[1, 3] = 0.0                   # a zero gradient slice: quantizes to zeros
    dims = [2]
    out = torch.ops.sqcompile.cpu_l1_norm(x, w, b, dims, True, C, EPS, 8)
    ref = CN.l1_norm_reference(x, w, b, dims, True, C, EPS, 8)
    torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=2e-5, equal_nan=True)
    torch.testing.assert_close(out[0][0, :2], b[0, :2].expand(2, 32), rtol=0, atol=1e-6)
    assert torch.equal(out[1], ref[1])
    assert torch.isnan(out[2][1, 2]).all() and torch.isnan(out[0][1, 2]).all()
    got = torch.ops.sqcompile.cpu_l1_norm_backward(dy, *out[1:], w, torch.tensor(1), dims, True, C, EPS, 8, 8, True)
    ref_b = CN.l1_norm_backward_reference(dy, *out[1:], w, torch.tensor(1), dims, True, C, EPS, 8, 8)
    for a, r in zip(got, ref_b):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5, equal_nan=True)
    assert torch.equal(got[0][1, 3], torch.zeros(32))           # no gradient, no dx


def test_references_are_the_l1_norm():
    """The references against an independent float64 writing of the norm and of its gradient
    (autograd through the float formula at the quantized input, the gradient quantized as
    the reference does)."""
    x, w, b, dy = _case((3, 4, 5, 20), (0, 2, 3), True)
    dims = [0, 2, 3]
    y, q, amax, total, deviation = CN.l1_norm_reference(x, w, b, dims, True, C, EPS, 8)
    xq = (q.double() * (amax.double() / 127)).requires_grad_()
    mean = xq.mean(dims, keepdim=True)
    sigma = C * (xq - mean).abs().mean(dims, keepdim=True)
    y64 = (xq - mean) / torch.sqrt(sigma ** 2 + EPS) * w.double() + b.double()
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    seed = torch.tensor(5)
    dq, ds = N.quantize(dy, 8, [1], "stochastic", N.hash_noise(dy.shape, seed))
    y64.backward(N.dequantize(dq, ds).double())
    dx, s1, s2 = CN.l1_norm_backward_reference(dy, q, amax, total, deviation, w, seed, dims, True, C, EPS, 8, 8)
    torch.testing.assert_close(dx.double(), xq.grad, rtol=1e-4, atol=1e-5)


def _compare_autograd(kind, shape, kwargs, seed=0):
    """The norm ``kind`` with ``kernels="cpu"`` against ``kernels="torch"``: the outputs
    to rounding; the gradients with the same noise seed to rounding of the sums."""
    fn = getattr(norms, f"l1_{kind}")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2
    c = shape[1]
    w = (torch.rand(c, generator=g) + 0.5).requires_grad_()
    b = torch.randn(c, generator=g).requires_grad_()
    dy = torch.randn(shape, generator=g)
    results = []
    for kernels in ("cpu", "torch"):
        xi = x.clone().requires_grad_()
        y = fn(xi, **kwargs(w, b), norm_bits=8, kernels=kernels)
        torch.manual_seed(11)       # the backward's seed
        y.backward(dy)
        results.append((y.detach(), xi.grad, w.grad.clone(), b.grad.clone()))
        w.grad = b.grad = None
    return results


@needs_kernel
@pytest.mark.parametrize("kind, shape, kwargs", [
    ("batch_norm", (8, 6, 10, 10), lambda w, b: dict(running_mean=None, running_var=None, weight=w, bias=b,
                                                     training=True)),
    ("instance_norm", (4, 6, 12, 12), lambda w, b: dict(weight=w, bias=b)),
])
def test_autograd_function_matches_the_ops_of_the_norm(kind, shape, kwargs):
    """The graph's ops draw their noise with ``uniform_noise`` in eager mode, the kernel with
    ``hash_noise``: the gradients agree in expectation.  So dx is compared against the graph's
    ops with the *same* quantized gradient: the reference backward with the seed drawn."""
    (y, dx, dw, db), (ry, rdx, rdw, rdb) = _compare_autograd(kind, shape, kwargs)
    torch.testing.assert_close(y, ry, rtol=1e-5, atol=2e-5)
    # quantized gradients with different noise: close, not equal (8 bits: within a few %)
    for a, r in ((dx, rdx), (dw, rdw), (db, rdb)):
        assert (a - r).norm() / r.norm() < 0.05


@needs_kernel
def test_autograd_function_gradient_is_the_reference_with_its_seed():
    x, w, b, dy = _case((6, 5, 8, 8), (0, 2, 3), True, seed=3)
    xi, wi, bi = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    y, mean, sigma = norms._l1_norm(xi, wi, bi, (0, 2, 3), center=True, l1_scale=C, eps=EPS, norm_bits=8,
                                    grad_bits=5, kernels="cpu")
    assert y.grad_fn is not None and "CpuL1Norm" in type(y.grad_fn).__name__
    torch.manual_seed(21)
    y.backward(dy)
    torch.manual_seed(21)
    seed = N.draw_seed("cpu")
    _, q, amax, total, deviation = CN.l1_norm_reference(x, w, b, [0, 2, 3], True, C, EPS, 8)
    dx, s1, s2 = CN.l1_norm_backward_reference(dy, q, amax, total, deviation, w, seed, [0, 2, 3], True, C, EPS, 8, 5)
    torch.testing.assert_close(xi.grad, dx, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(wi.grad, s2, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bi.grad, s1, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mean, total / 6 / 64)
    torch.testing.assert_close(sigma, C * deviation / 6 / 64)


@needs_kernel
def test_gradient_is_unbiased():
    """Stochastic rounding of the gradient: the mean of dx over many seeds approaches the
    gradient of the unquantized dy (the input quantizer's forward is the same for both)."""
    x, w, b, dy = _case((2, 3, 40), (2,), True, seed=5)
    dims = [2]
    out = torch.ops.sqcompile.cpu_l1_norm(x, w, b, dims, True, C, EPS, 8)
    runs = 400
    acc = torch.zeros_like(x, dtype=torch.float64)
    for s in range(runs):
        acc += torch.ops.sqcompile.cpu_l1_norm_backward(dy, *out[1:], w, torch.tensor(s), dims, True, C, EPS, 8, 3,
                                                        True)[0].double()
    exact = CN.l1_norm_backward_reference(dy, *out[1:], w, torch.tensor(0), dims, True, C, EPS, 8, 8)[0]
    # 3-bit gradients: one draw is off by up to a third of the range; the mean of 400 by ~1/60
    coarse = torch.ops.sqcompile.cpu_l1_norm_backward(dy, *out[1:], w, torch.tensor(0), dims, True, C, EPS, 8, 3,
                                                      True)[0]
    err_mean = (acc / runs - exact.double()).norm() / exact.norm()
    err_one = (coarse - exact).norm() / exact.norm()
    assert err_mean < err_one / 5, (err_mean, err_one)


@needs_kernel
def test_opcheck():
    x, w, b, dy = _case((4, 6, 20), (0, 2), True)
    args = (x, w, b, [0, 2], True, C, EPS, 8)
    torch.library.opcheck(torch.ops.sqcompile.cpu_l1_norm.default, args)
    out = torch.ops.sqcompile.cpu_l1_norm(*args)
    for need in (True, False):
        torch.library.opcheck(torch.ops.sqcompile.cpu_l1_norm_backward.default,
                              (dy, *out[1:], w, torch.tensor(4), [0, 2], True, C, EPS, 8, 8, need))
    torch.library.opcheck(torch.ops.sqcompile.cpu_l1_norm_backward.default,
                          (dy, *out[1:], w, torch.tensor(4), [0, 2], True, C, EPS, 8, 8, True, torch.randn(4, 6, 20)))
    x, w, b, _ = _case((4, 6, 20), (2,), True, row=True)
    for write_y in (True, False):
        torch.library.opcheck(torch.ops.sqcompile.cpu_l1_norm_quantized.default,
                              (x, w, b, [2], True, C, EPS, 8, 6, write_y))
        torch.library.opcheck(torch.ops.sqcompile.cpu_l1_norm_shiftquant.default,
                              (x, w, b, [2], True, C, EPS, 8, 6, 3, write_y))


def test_unsupported_says_why():
    x = torch.randn(4, 8, 16, 16)
    dims = (0, 2, 3)
    w = torch.ones(1, 8, 1, 1)
    assert "quantize=False" in CN.unsupported(x, w, None, dims, None, None)
    assert "collect_stats" in CN.unsupported(x, w, None, dims, 8, "k")
    assert "float64" in CN.unsupported(x.double(), w, None, dims, 8, None)
    assert "contiguous" in CN.unsupported(x.to(memory_format=torch.channels_last), w, None, dims, 8, None)
    assert "runs of 1" in CN.unsupported(torch.randn(4, 8), None, None, (0,), 8, None)
    assert "weight" in CN.unsupported(torch.randn(4, 8, 32), torch.ones(4, 1, 32), None, (2,), 8, None)
    assert "both" in CN.unsupported(torch.randn(4, 8, 32), torch.ones(32), torch.ones(4, 8, 1), (2,), 8, None)
    assert "both" in CN.unsupported(torch.randn(4, 8, 32), None, torch.ones(32), (2,), 8, None)
    assert "bias" in CN.unsupported(x, w, torch.ones(1, 8, 16, 1), dims, 8, None)
    assert "layout" in CN.unsupported(torch.randn(2, 3, 4, 32), None, None, (0, 2), 8, None)
    if OK:
        assert CN.unsupported(x, w, w, dims, 8, None) is None
        assert CN.unsupported(torch.randn(4, 8, 32), torch.ones(32), torch.ones(32), (2,), 8, None) is None


@pytest.mark.parametrize("shape, dims, pshape, mode", [
    ((4, 8, 6, 6), (0, 2, 3), (1, 8, 1, 1), "slice"),
    ((4, 8, 6, 6), (2, 3), (1, 8, 1, 1), "slice"),
    ((4, 8, 32), (2,), (32,), "row"),
    ((4, 8, 32), (2,), (1, 1, 32), "row"),
    ((4, 2, 8, 16), (2, 3), (8, 16), "row"),
    ((4, 2, 8, 16), (2, 3), (1, 2, 8, 1), None),       # a group norm's affine: per channel of a group
    ((4, 8, 32), (2,), (4, 1, 32), None),
])
def test_affine_mode(shape, dims, pshape, mode):
    assert CN.affine_mode(shape, dims, torch.ones(pshape)) == mode


def test_kernels_option_is_checked():
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="kernels"):
        norms.l1_instance_norm(x, norm_bits=8, kernels="gpu")
    with pytest.raises(ValueError, match="kernels"):
        norms.l1_batch_norm(x, None, None, training=True, norm_bits=8, kernels="triton")


class _Net(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.n1 = norm(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.n2 = nn.GroupNorm(4, 16)             # with affine per channel: stays on the ops
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        h = torch.relu(self.n1(self.conv1(x)))
        h = torch.relu(self.n2(self.conv2(h)))
        return self.head(h.mean((2, 3)))


@needs_kernel
@pytest.mark.parametrize("norm", [nn.BatchNorm2d, lambda c: nn.InstanceNorm2d(c, affine=True)])
def test_compiled_cnn_runs_its_norms_on_the_kernels(norm):
    torch.manual_seed(0)
    model = _Net(norm)
    reference = _Net(norm)
    reference.load_state_dict(model.state_dict())
    x = torch.randn(4, 3, 12, 12)
    target = torch.randint(0, 5, (4,))
    opts = dict(inner="inductor")
    compiled = torch.compile(model, backend="shiftquant", options=opts)
    saved = l1_norms_pass._cpu_kernels
    l1_norms_pass._cpu_kernels = lambda *a: False            # the same model on the graph's ops
    try:
        ref_compiled = torch.compile(reference, backend="shiftquant", options=dict(opts, fusion=True))
        ref_out = ref_compiled(x)
    finally:
        l1_norms_pass._cpu_kernels = saved
    out = compiled(x)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)

    records = records_for(list(model.parameters()))
    norms_ = [d for r in records for d in r.decisions if d.kind == "norm"]
    on_kernel = [d for d in norms_ if d.note and l1_norms_pass.CPU_KERNEL_NOTE in d.note]
    assert [d.op for d in on_kernel] == ["batch_norm" if isinstance(model.n1, nn.BatchNorm2d) else "instance_norm"]
    assert any(d.op == "group_norm" and not d.note for d in norms_)
    graphs = "\n".join(text for r in records for text in r.graphs.values())
    assert "sqcompile.cpu_l1_norm(" in graphs

    # training goes on: the loss falls
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(compiled(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0] * 0.8, losses


@needs_kernel
def test_layer_norm_on_the_kernels_when_asked():
    """``l1_layer_norm(kernels="cpu")``: the row-affine kernels, gradients as the reference
    with the seed the backward drew."""
    x, w, b, dy = _case((6, 10, 48), (2,), True, seed=8, row=True)
    xi, wi, bi = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    y = norms.l1_layer_norm(xi, 48, wi, bi, EPS, norm_bits=8, grad_bits=6, kernels="cpu")
    assert "CpuL1Norm" in type(y.grad_fn).__name__
    torch.manual_seed(4)
    y.backward(dy)
    torch.manual_seed(4)
    seed = N.draw_seed("cpu")
    ry, q, amax, total, deviation = CN.l1_norm_reference(x, w, b, [2], True, C, EPS, 8)
    torch.testing.assert_close(y.detach(), ry, rtol=1e-5, atol=2e-5)
    dx, s1, s2 = CN.l1_norm_backward_reference(dy, q, amax, total, deviation, w, seed, [2], True, C, EPS, 8, 6)
    torch.testing.assert_close(xi.grad, dx, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(wi.grad, s2.reshape(48), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bi.grad, s1.reshape(48), rtol=1e-4, atol=1e-4)


class _PreNorm(nn.Module):
    """Pre-norm residual blocks: a LayerNorm feeding one Linear, an RMSNorm feeding two."""

    def __init__(self, d=32):
        super().__init__()
        self.ln1, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.ln2, self.q, self.k = nn.RMSNorm(d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        x = x + self.fc2(torch.relu(self.fc1(self.ln1(x))))
        h = self.ln2(x)
        return x + self.q(h) * self.k(h)


class _PostNorm(nn.Module):
    """A post-norm block: the norm's output feeds a Linear and the next residual add."""

    def __init__(self, d=32):
        super().__init__()
        self.fc1, self.ln, self.fc2 = nn.Linear(d, d), nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, x):
        y = self.ln(x + self.fc1(x))
        return y + self.fc2(y)


def _train_step(model, x, opts, seed=0):
    compiled = torch.compile(model, backend="shiftquant", options=opts)
    xi = x.clone().requires_grad_()
    torch.manual_seed(seed)
    out = compiled(xi)
    out.square().sum().backward()
    grads = [xi.grad] + [p.grad for p in model.parameters()]
    return out.detach(), grads, records_for(list(model.parameters()))[-1]


_lowering = importlib.import_module("sqcompile.backends.lowering")


@needs_kernel
@pytest.mark.parametrize("inner, act_groups", [("eager", 1), ("inductor", 1), ("inductor", 4)])
@pytest.mark.parametrize("block, labels", [
    (_PreNorm, {"ln1": ["l1_norm+quantize", "l1_norm_backward+residual"],
                "ln2": ["l1_norm+quantize", "l1_norm_backward+residual"]}),
    (_PostNorm, {"ln": ["l1_norm+quantize+y"]}),
])
def test_row_norms_fuse_with_their_quantizers_and_residual_adds(block, labels, inner, act_groups, monkeypatch):
    """LayerNorm / RMSNorm on the kernels (fusion on): the kernel quantizes the output for the
    Linears that read it (per row, or with ``act_groups`` as their ShiftQuant does:
    ``l1_norm+shiftquant``) and adds the residual gradient; outputs and every gradient equal
    the same compile without those fusions bit for bit.  Under Inductor the reference keeps the
    residual fusion (without it Inductor orders the seed draws of the backward's quantizers
    differently); two Linears reading one norm's int8 output make saved tensors alias, which
    AOTAutograd's donated buffers must not reuse (``fusion.no_donation_of_aliases``)."""
    torch.manual_seed(0)
    model = block()
    x = torch.randn(3, 24, 32)
    op = "cpu_l1_norm_quantized"
    if act_groups > 1:
        labels = {k: [label.replace("+quantize", "+shiftquant") for label in v] for k, v in labels.items()}
        op = "cpu_l1_norm_shiftquant"
    out, grads, record = _train_step(model, x, dict(inner=inner, act_groups=act_groups))
    norms_ = {d.module_path: d for d in record.decisions if d.kind == "norm"}
    assert set(norms_) == set(labels)
    for path, decision in norms_.items():
        assert l1_norms_pass.CPU_KERNEL_NOTE in decision.note
        found = [r.label for r in record.regions if r.module_path == path]
        assert found == labels[path], found
    assert f"sqcompile.{op}(" in record.graphs["forward_fused"]

    model.zero_grad()
    monkeypatch.setattr(_lowering, "fuse_cpu_norm_quantizers", lambda gm, *a: gm)
    if inner == "eager":
        monkeypatch.setattr(_lowering, "fuse_cpu_norm_residuals", lambda gm, *a: gm)
    torch._dynamo.reset()
    ref_out, ref_grads, ref_record = _train_step(model, x, dict(inner=inner, act_groups=act_groups))
    assert all(not r.label.startswith(("l1_norm+quantize", "l1_norm+shiftquant")) for r in ref_record.regions)
    assert "sqcompile.cpu_l1_norm(" in ref_record.graphs["forward"]
    assert torch.equal(out, ref_out)
    for g, r in zip(grads, ref_grads):
        assert torch.equal(g, r)


@needs_kernel
def test_row_norms_stay_on_the_ops_without_fusion():
    """``fusion=False``: LayerNorm / RMSNorm keep the graph's ops (the bare kernel, writing its
    output for the quantizer to read again, trained slower); the results agree with the fused
    kernels to the float32 rounding of the norms' sums."""
    torch.manual_seed(0)
    model = _PreNorm()
    x = torch.randn(3, 24, 32)
    out, grads, record = _train_step(model, x, dict(inner="inductor"))
    model.zero_grad()
    ref_out, ref_grads, ref_record = _train_step(model, x, dict(inner="inductor", fusion=False))
    assert all(not d.note for d in ref_record.decisions if d.kind == "norm")
    assert "cpu_l1_norm" not in "\n".join(ref_record.graphs.values())
    for a, r in zip([out] + grads, [ref_out] + ref_grads):
        assert ((a - r).norm() / r.norm()).item() < 1e-2


@needs_kernel
@pytest.mark.parametrize("model, sizes, options, ops_", [
    (_PreNorm, [(3, 24, 32), (2, 17, 32)], {}, ["cpu_l1_norm_quantized", "cpu_l1_norm_backward"]),
    (_PreNorm, [(3, 24, 32), (2, 17, 32)], {"act_groups": 4}, ["cpu_l1_norm_shiftquant"]),
    (lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)),
     [(4, 3, 12, 11), (3, 3, 10, 9)], {}, ["cpu_l1_norm", "cpu_l1_norm_backward"]),
], ids=["pre-norm", "act_groups", "batch norm"])
def test_dynamic_shapes_run_the_kernels_as_static_shapes_do(model, sizes, options, ops_):
    """``dynamic=True``: one graph for every size, the norms on the kernels with their fusions
    (symbolic sizes reach the kernels' checks and fakes), each step bit for bit the step of a
    static-shape compile of that size."""
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    models = {False: model(), True: model()}
    models[True].load_state_dict(models[False].state_dict())
    runs = {dyn: torch.compile(m, backend="shiftquant", options=dict(inner="inductor", **options), dynamic=dyn)
            for dyn, m in models.items()}
    torch._dynamo.reset()
    counters.clear()
    regions = {}
    for i, size in enumerate(sizes):
        x = torch.randn(size)
        results = {}
        for dyn in (True, False):
            graphs = counters["stats"]["unique_graphs"]
            models[dyn].zero_grad()
            xi = x.clone().requires_grad_()
            torch.manual_seed(i)
            out = runs[dyn](xi)
            out.square().sum().backward()
            results[dyn] = [out.detach(), xi.grad] + [p.grad for p in models[dyn].parameters()]
            record = records_for(list(models[dyn].parameters()))[-1]
            regions[dyn, i] = sorted(r.label for r in record.regions)
            if dyn:
                assert counters["stats"]["unique_graphs"] == graphs + (i == 0)      # compiled once, for all sizes
                text = "\n".join(record.graphs.values())
                assert all(f"sqcompile.{op}(" in text for op in ops_), ops_
        for a, b in zip(results[True], results[False]):
            assert torch.equal(a, b)
        assert regions[True, i] == regions[False, i]


@needs_kernel
def test_dynamic_shapes_guard_the_sizes_the_kernels_need():
    """A symbolic size the kernels check (here an InstanceNorm's rows of H * W >= 16 values)
    becomes a guard: an input with shorter rows recompiles, and that graph keeps the norm on
    its ops."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.InstanceNorm2d(8, affine=True))
    compiled = torch.compile(model, backend="shiftquant", options=dict(inner="inductor"), dynamic=True)
    on_kernel = []
    for size in [(4, 3, 12, 11), (3, 3, 10, 9), (3, 3, 3, 5)]:
        compiled(torch.randn(size)).square().sum().backward()
        graphs = "\n".join(records_for(list(model.parameters()))[-1].graphs.values())
        on_kernel.append("sqcompile.cpu_l1_norm(" in graphs)
    assert len(records_for(list(model.parameters()))) == 2 and on_kernel == [True, True, False]
