"""The test suite's changes to Triton's CPU interpreter (:mod:`interpreter_speedups`): on the
Triton they were written for they are in force, a kernel calling helpers (nested, in a loop,
with builtins, a reduction and Triton's own ``tl.cdiv``) computes what NumPy does, and so do
reductions with combine functions of their own (order-sensitive, NaN-propagating, over two
operands, along either axis, over all, keeping dims) -- the same left folds, bit for bit."""
import os
from functools import reduce

import numpy as np
import pytest
import torch

import interpreter_speedups

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from triton.runtime import interpreter as I                      # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available(),
                                reason="Triton's CPU interpreter only")


@triton.jit
def _clamp_abs(x, bound):
    return tl.minimum(tl.abs(x), bound)


@triton.jit
def _row_term(x, bound):
    return tl.sum(_clamp_abs(x, bound) * 2.0, axis=1)            # a helper calling a helper


@triton.jit
def _kernel(x_ptr, out_ptr, n_rows, bound, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    mask = rows[:, None] < n_rows
    x = tl.load(x_ptr + rows[:, None] * BLOCK_C + cols[None, :], mask=mask, other=0.0)
    for _ in range(2):                                            # helpers called in a loop
        x = x - _row_term(x, bound)[:, None] / BLOCK_C
    tl.store(out_ptr + rows[:, None] * BLOCK_C + cols[None, :], tl.cdiv(BLOCK_C, 3) * x, mask=mask)


def _expected(x: np.ndarray, bound: float) -> np.ndarray:
    for _ in range(2):
        term = (np.minimum(np.abs(x), np.float32(bound)) * np.float32(2.0)).sum(1, dtype=np.float32)
        x = x - term[:, None] / x.shape[1]
    return (x.shape[1] + 2) // 3 * x


def test_the_known_triton_runs_with_them():
    if triton.__version__ != "3.9.0" or os.environ.get("SQCOMPILE_PLAIN_INTERPRETER") == "1":
        pytest.skip(f"written for Triton 3.9.0 (here {triton.__version__}); off where the sources differ")
    assert hasattr(I.GridExecutor.__call__, "__wrapped__"), "tests/interpreter_speedups.py was not installed"


@pytest.mark.parametrize("rows", [5, 16])
def test_helpers_inside_a_launch_compute_what_numpy_does(rows):
    x = torch.randn(rows, 8, generator=torch.Generator().manual_seed(rows))
    out = torch.empty_like(x)
    for _ in range(2):                                            # a second launch: patched afresh
        _kernel[(triton.cdiv(rows, 4),)](x, out, rows, 0.75, BLOCK_R=4, BLOCK_C=8)
        np.testing.assert_allclose(out.numpy(), _expected(x.numpy(), 0.75), rtol=1e-5, atol=1e-5)


@triton.jit
def _halve_add(a, b):                       # not associative: the fold's order shows
    return a * 0.5 + b


@triton.jit
def _max_nan(a, b):
    return tl.where((a > b) | (a != a), a, b)


@triton.jit
def _argmax(v1, i1, v2, i2):                # ties to the left
    take = v2 > v1
    return tl.where(take, v2, v1), tl.where(take, i2, i1)


@triton.jit
def _reduce_kernel(x_ptr, down_ptr, across_ptr, all_ptr, nan_ptr, value_ptr, index_ptr,
                   R: tl.constexpr, C: tl.constexpr):
    r, c = tl.arange(0, R), tl.arange(0, C)
    x = tl.load(x_ptr + r[:, None] * C + c[None, :])
    tl.store(down_ptr + c, tl.reduce(x, 0, _halve_add))
    tl.store(across_ptr + r, tl.reduce(x, 1, _halve_add))
    tl.store(all_ptr, tl.reduce(x, None, _halve_add))
    tl.store(nan_ptr + r[:, None], tl.reduce(x, 1, _max_nan, keep_dims=True))
    value, index = tl.reduce((x, tl.broadcast_to(c[None, :], (R, C))), 1, _argmax)
    tl.store(value_ptr + r, value)
    tl.store(index_ptr + r, index)


def test_reductions_with_their_own_combine_fold_as_numpy_does():
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-4, 5, (8, 16), generator=g).float() + torch.rand(8, 16, generator=g).round() / 4
    x[2, 5] = x[6, 0] = float("nan")
    outs = [torch.empty(n) for n in (16, 8, 1, 8, 8)] + [torch.empty(8, dtype=torch.int32)]
    _reduce_kernel[(1,)](x, *outs, R=8, C=16)
    xn, half = x.numpy(), np.float32(0.5)
    halve_add = lambda a, b: a * half + b                               # noqa: E731
    expected = [reduce(halve_add, xn), reduce(halve_add, xn.T), reduce(halve_add, xn.reshape(-1)).reshape(1),
                reduce(lambda a, b: np.where((a > b) | (a != a), a, b), xn.T)]
    for got, want in zip(outs, expected):
        np.testing.assert_array_equal(got.numpy(), want)
    assert torch.isnan(outs[3][[2, 6]]).all()
    firsts = [reduce(lambda a, b: b if b[1] > a[1] else a, enumerate(row))[0] for row in xn]   # ties: left
    np.testing.assert_array_equal(outs[5].numpy(), firsts)
    np.testing.assert_array_equal(outs[4].numpy(), [row[k] for row, k in zip(xn, firsts)])


def test_installing_twice_changes_nothing():
    """A second :func:`~interpreter_speedups.install` finds the replaced functions, not the
    sources it knows, and leaves them alone (the guard a different Triton meets)."""
    def replaced():
        return I.GridExecutor.__call__, I.InterpretedFunction.__call__, I._get_np_dtype, I.ReduceOps.generic_reduce
    before = replaced()
    assert interpreter_speedups.install() is False
    assert replaced() == before
