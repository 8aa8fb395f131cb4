"""Small Triton kernels that expose device functions to the tests.

Imported by the tests that use them, after ``conftest.py`` has chosen the interpreter (a
kernel is defined as interpreted or compiled when its module is imported)."""
from __future__ import annotations

import triton
import triton.language as tl

from sqcompile.kernels.triton_quant import _uniform_noise


@triton.jit
def noise_tile(out_ptr, seed_ptr, l0, L, BROADCAST: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """``_uniform_noise``'s ``[ROWS, COLS]`` tile for rows ``3, 4, ...`` from column ``l0`` of
    rows of ``L``, stored row-major at ``out_ptr``."""
    r = tl.arange(0, ROWS)
    c = tl.arange(0, COLS)
    k = _uniform_noise(tl.load(seed_ptr), r + 3, l0, L, ROWS, COLS, BROADCAST)
    tl.store(out_ptr + r[:, None] * COLS + c[None, :], k)
