"""The test suite's changes to Triton's CPU interpreter (:mod:`interpreter_speedups`): on the
Triton they were written for they are in force, and a kernel calling helpers (nested, in a
loop, with builtins, a reduction and Triton's own ``tl.cdiv``) computes what NumPy does."""
import os

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


def test_installing_twice_changes_nothing():
    """A second :func:`~interpreter_speedups.install` finds the replaced functions, not the
    sources it knows, and leaves them alone (the guard a different Triton meets)."""
    before = (I.GridExecutor.__call__, I.InterpretedFunction.__call__, I._get_np_dtype)
    assert interpreter_speedups.install() is False
    assert (I.GridExecutor.__call__, I.InterpretedFunction.__call__, I._get_np_dtype) == before
