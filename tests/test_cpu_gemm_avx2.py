"""Our AVX2 int8 GEMM (``avx2_int8.c``, the engine of CPUs without AMX or VNNI) and its VNNI
build (``-DSQ_VNNI``: VPDPBUSD on ZMM registers, 32-column strips) against the exact float64
product.  Tests that hold for both run for each build the CPU can run (``variant``).

The kernel is exact only while ``max|A| * max|B| <= 8191`` (its int16 pair sums) and refuses
above; so operands here are drawn within magnitude bounds, up to and across that line, and
the worst cases for its int16 sums (every pair at the bound, long reductions) are built on
purpose.  Shapes cover its edges: M not a multiple of its 6-row block, N of its 16-column
strip, K of its 4-byte groups, K longer than one reduction chunk (512) and than the int16
sums' widening period; batches, broadcast and every operand layout.  Skips on CPUs without
AVX2 (or without a C compiler).
"""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from sqcompile import ops
from sqcompile.kernels import amx, avx2, cpu

AVX2_OK, AVX2_WHY = avx2.status()
pytestmark = pytest.mark.skipif(not AVX2_OK, reason=f"AVX2 kernel not usable here: {AVX2_WHY}")


@pytest.fixture(params=list(avx2.VARIANTS))
def variant(request):
    ok, why = avx2.status(request.param)
    if not ok:
        pytest.skip(f"the {request.param} build is not usable here: {why}")
    return request.param


def exact(a, b):
    return (a.double() @ b.double()).to(torch.int32)


def rand(*shape, bound, gen):
    return torch.randint(-bound, bound + 1, shape, dtype=torch.int8, generator=gen)


SHAPES = [(1, 1, 1), (5, 7, 3), (6, 4, 16), (7, 13, 17), (12, 64, 32), (33, 65, 17), (49, 513, 130),
          (100, 1000, 31), (256, 64, 256), (13, 36, 33), (25, 520, 530), (7, 1100, 1031)]
# the last three: the VNNI build's 32-column strips and 12-row, 512-column units
BOUNDS = [(7, 56), (15, 127), (127, 64), (91, 90), (3, 3), (0, 9)]   # 4-bit x gradients ... at the line (8190)


@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("bounds", BOUNDS)
def test_equals_exact_product(M, K, N, bounds, variant):
    g = torch.Generator().manual_seed(M * 1000 + K + N)
    a, b = rand(M, K, bound=bounds[0], gen=g), rand(K, N, bound=bounds[1], gen=g)
    assert torch.equal(avx2.int8_mm(a, b, variant), exact(a, b))


@pytest.mark.parametrize("layout", ["row", "b_col", "b_strided", "a_col", "a_col_whole_groups", "a_strided",
                                    "a_sliced", "both_col"])
def test_operand_layouts(layout, variant):
    g = torch.Generator().manual_seed(1)
    a, b = rand(70, 130, bound=15, gen=g), rand(130, 40, bound=127, gen=g)
    if layout in ("b_col", "both_col"):    # b = W.t() of a contiguous W
        b = b.t().contiguous().t()
    if layout in ("a_col", "both_col"):    # column-major a (dW's activations)
        a = a.t().contiguous().t()
    if layout == "b_strided":              # no unit stride at all
        b = rand(130, 80, bound=127, gen=g)[:, ::2]
    elif layout == "a_strided":
        a = rand(70, 260, bound=15, gen=g)[:, ::2]
    elif layout == "a_col_whole_groups":   # column-major, K a multiple of 4: packed 48 rows at a time, 4 rows alone
        a, b = rand(100, 128, bound=15, gen=g).t().contiguous().t(), rand(128, 40, bound=127, gen=g)
    elif layout == "a_sliced":             # row stride larger than K
        a = rand(70, 200, bound=15, gen=g)[:, 10:140]
    assert torch.equal(avx2.int8_mm(a, b, variant), exact(a, b))


def test_batched_and_broadcast(variant):
    g = torch.Generator().manual_seed(2)
    a, b = rand(2, 3, 33, 70, bound=56, gen=g), rand(2, 3, 70, 20, bound=7, gen=g)
    assert torch.equal(avx2.int8_mm(a, b, variant), exact(a, b))
    w = rand(70, 20, bound=7, gen=g)                           # one B for every batch entry
    assert torch.equal(avx2.int8_mm(a, w, variant), exact(a, w))
    a1 = rand(33, 70, bound=56, gen=g)                         # one A for every batch entry
    assert torch.equal(avx2.int8_mm(a1, b, variant), exact(a1, b))
    mixed = rand(2, 1, 70, 20, bound=7, gen=g)                 # batch dims that do not flatten
    assert torch.equal(avx2.int8_mm(a, mixed, variant), exact(a, mixed))
    # attention's layout: per-head slices of one [B, T, H, D] tensor, transposed views
    q = rand(2, 40, 4, 64, bound=63, gen=g).transpose(1, 2)
    k = rand(2, 40, 4, 64, bound=63, gen=g).transpose(1, 2)
    assert torch.equal(avx2.int8_mm(q, k.transpose(-1, -2), variant), exact(q, k.transpose(-1, -2)))


@pytest.mark.parametrize("amax,bmax", [(127, 64), (64, 127), (91, 90), (7, 127), (1, 1)])
@pytest.mark.parametrize("signs", ["same", "opposite", "alternating"])
def test_int16_sums_at_their_bound(amax, bmax, signs, variant):
    """Every pair sum as large as the operands allow, for 3000 k: the int16 sums run right up
    to 32767 before each widening, and a wrong widening period saturates them (the VNNI
    build: its int32 sums of the offset B, past one reduction chunk)."""
    K = 3000
    a = torch.full((13, K), amax, dtype=torch.int8)
    b = torch.full((K, 21), bmax, dtype=torch.int8)
    if signs == "opposite":
        b = -b
    elif signs == "alternating":
        a[:, 1::2] *= -1
        b[1::2] *= -1
    assert torch.equal(avx2.int8_mm(a, b, variant), exact(a, b))
    assert torch.equal(avx2.int8_mm(-a, b, variant), exact(-a, b))


@pytest.mark.parametrize("fill", [(-128, -128), (-128, 127), (127, -128), (127, 127)])
def test_vnni_build_takes_every_product(fill):
    """The VNNI build's sums are int32: no magnitude bound, nothing refused -- two full-range
    8-bit operands (what the AVX2 build sends to the float engine), extremes included, over
    a reduction long enough that ``A (B + 128)`` passes 2**31 before the offset's correction."""
    ok, why = avx2.status("vnni")
    if not ok:
        pytest.skip(f"the vnni build is not usable here: {why}")
    K = 70000                                   # 70000 * 128 * 255 > 2**31
    a = torch.full((7, K), fill[0], dtype=torch.int8)
    b = torch.full((K, 33), fill[1], dtype=torch.int8)
    b[:, 5] = 0
    b[::3, 7] = -b[::3, 7] - 1
    assert torch.equal(avx2.int8_mm(a, b, "vnni"), exact(a, b))     # |A B| <= 70000 * 2**14 < 2**31
    g = torch.Generator().manual_seed(5)
    a, b = rand(50, 300, bound=127, gen=g), rand(300, 70, bound=127, gen=g)
    a[0, 0] = b[0, 0] = -128
    assert torch.equal(avx2.int8_mm(a, b, "vnni"), exact(a, b))


def test_refuses_above_the_magnitude_bound():
    """``max|A| * max|B| > 8191`` could saturate an int16 lane: refused (``None``), whatever
    the rest of the values; at the bound it runs."""
    a, b = torch.zeros(5, 8, dtype=torch.int8), torch.zeros(8, 3, dtype=torch.int8)
    a[2, 3], b[4, 1] = 127, 65
    assert avx2.int8_mm(a, b) is None                     # 127 * 65 = 8255
    b[4, 1] = 64
    assert torch.equal(avx2.int8_mm(a, b), exact(a, b))   # 127 * 64 = 8128
    a[2, 3], b[4, 1] = -128, 64                           # 128 * 64 = 8192
    assert avx2.int8_mm(a, b) is None


def test_the_op_runs_8_bit_products_on_the_float_engine(monkeypatch):
    """Under ``SQCOMPILE_CPU_GEMM=avx2`` the op is exact either way: within the bound on the
    kernel, two 8-bit operands on the float engine."""
    monkeypatch.setenv(amx.ENGINE_VARIABLE, "avx2")
    calls = []
    real = cpu.float_int8_mm
    monkeypatch.setattr(cpu, "float_int8_mm", lambda a, b: calls.append("float") or real(a, b))
    g = torch.Generator().manual_seed(3)
    a, b = rand(40, 300, bound=127, gen=g), rand(300, 20, bound=7, gen=g)
    assert torch.equal(torch.ops.sqcompile.int8_mm(a, b), exact(a, b)) and calls == []
    b = rand(300, 20, bound=127, gen=g)
    assert torch.equal(torch.ops.sqcompile.int8_mm(a, b), exact(a, b)) and calls == ["float"]


def test_long_reductions_through_the_op(monkeypatch, variant):
    """``ops.integer_matmul`` splits K above MAX_INT32_TERMS; the kernel's int32 sums of
    ``A (B + off)`` wrap past 2**31 there and the offset's correction brings them back."""
    monkeypatch.setenv(amx.ENGINE_VARIABLE, variant)
    K = ops.MAX_INT32_TERMS + 1000
    a = torch.full((3, K), 127, dtype=torch.int8)
    b = torch.full((K, 5), 64, dtype=torch.int8)
    b[:, 0] = -64
    assert torch.equal(ops.integer_matmul(a, b), (a.double() @ b.double()).float())


def test_empty_products_and_refused_operands():
    assert avx2.int8_mm(torch.zeros(0, 5, dtype=torch.int8), torch.zeros(5, 3, dtype=torch.int8)).shape == (0, 3)
    z = avx2.int8_mm(torch.zeros(4, 0, dtype=torch.int8), torch.zeros(0, 3, dtype=torch.int8))
    assert torch.equal(z, torch.zeros(4, 3, dtype=torch.int32))
    with pytest.raises(TypeError, match="int8"):
        avx2.int8_mm(torch.zeros(2, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="do not chain"):
        avx2.int8_mm(torch.zeros(2, 3, dtype=torch.int8), torch.zeros(4, 2, dtype=torch.int8))


def test_two_threads_and_a_released_workspace(variant):
    g = torch.Generator().manual_seed(4)
    a, b = rand(3, 130, 600, bound=15, gen=g), rand(600, 300, bound=56, gen=g)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = avx2.int8_mm(a, b, variant)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(two, exact(a, b))
    avx2.release_workspace()
    assert torch.equal(avx2.int8_mm(a, b, variant), exact(a, b))


@pytest.mark.parametrize("build", list(avx2.VARIANTS))
@settings(max_examples=60, deadline=None)
@given(M=st.integers(1, 120), K=st.integers(1, 700), N=st.integers(1, 70), batch=st.integers(0, 2),
       transpose_a=st.booleans(), transpose_b=st.booleans(), amax=st.integers(0, 127),
       seed=st.integers(0, 2**31 - 1), data=st.data())
def test_property_exact(build, M, K, N, batch, transpose_a, transpose_b, amax, seed, data):
    ok, why = avx2.status(build)
    if not ok:
        pytest.skip(f"the {build} build is not usable here: {why}")
    bmax = data.draw(st.integers(0, 127 if build == "vnni" else min(127, 8191 // max(amax, 1))), label="bmax")
    g = torch.Generator().manual_seed(seed)
    lead = (batch,) if batch else ()
    a = rand(*lead, K, M, bound=amax, gen=g).transpose(-1, -2) if transpose_a else rand(*lead, M, K, bound=amax, gen=g)
    b = rand(*lead, N, K, bound=bmax, gen=g).transpose(-1, -2) if transpose_b else rand(*lead, K, N, bound=bmax, gen=g)
    assert torch.equal(avx2.int8_mm(a, b, build), exact(a, b))
