"""The two builds of our AVX-512-style C kernels (``sqcompile/kernels/native.py``):

* ``SQCOMPILE_CPU_SIMD`` chooses the build (``auto`` / ``avx512`` / ``portable``) and any other
  value is a ``ValueError`` naming the variable;
* every build gives the same results bit for bit: the AVX-512 one, the portable one
  (``avx512_portable.h`` over AVX2) and the portable one without vector ISA flags (its plain C
  path) -- the attention, norm, quantizer and grouped-convolution kernels on inputs with NaN, infinities, zeros and
  rows that are not whole multiples of 16 lanes, each compared with this machine's default
  build (which the kernels' own test files, test_cpu_norm.py, test_cpu_quant.py and
  test_cpu_attention.py, hold to the ``numerics`` references).
"""
import contextlib
import functools
import platform

import pytest
import torch

from sqcompile import norms
from sqcompile import numerics as N
from sqcompile import ops
from sqcompile.kernels import cpu_attention as CA
from sqcompile.kernels import cpu_grouped_conv as CG
from sqcompile.kernels import cpu_norm as CN
from sqcompile.kernels import cpu_quant as CQ
from sqcompile.kernels import native

MODULES = (CA, CG, CN, CQ)
C, EPS = norms.L1_SCALE, 1e-5


@pytest.mark.parametrize("value, name", [("portable", "portable"), ("Portable ", "portable"), ("avx512", "avx512")])
def test_the_variable_chooses_the_build(monkeypatch, value, name):
    monkeypatch.setenv(native.SIMD_VARIABLE, value)
    got, cflags, needs = native.simd_build()
    assert got == name
    assert ("-DSQCOMPILE_PORTABLE" in cflags) == (name == "portable")
    assert needs == (native.AVX512_CPU_FLAGS if name == "avx512" else frozenset())


def test_auto_takes_avx512_where_the_cpu_has_it(monkeypatch):
    monkeypatch.delenv(native.SIMD_VARIABLE, raising=False)
    has = native.AVX512_CPU_FLAGS <= native.cpu_flags()
    assert native.simd_build()[0] == ("avx512" if has else "portable")
    monkeypatch.setenv(native.SIMD_VARIABLE, "auto")
    assert native.simd_build()[0] == ("avx512" if has else "portable")


def test_another_value_names_the_variable(monkeypatch):
    monkeypatch.setenv(native.SIMD_VARIABLE, "avx2")
    with pytest.raises(ValueError, match="SQCOMPILE_CPU_SIMD='avx2'.*auto, avx512, portable"):
        native.simd_build()


@pytest.mark.skipif(platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"),
                    reason="the C kernels are built on Linux x86-64 only")
def test_the_portable_build_compiles_here():
    """It needs no CPU flags: wherever there is a C compiler on Linux x86-64, it builds."""
    ok, why = native.status(frozenset(), lambda: CN._library(tuple(native.portable_cflags())))
    assert ok, why


BUILDS = {
    "portable": lambda: tuple(native.portable_cflags()),       # -mavx2 -mfma where the CPU has them
    "plain C": lambda: tuple(native.PORTABLE_CFLAGS),          # no vector ISA flags: the generic C path
}


@pytest.fixture(params=list(BUILDS))
def other_build(request, monkeypatch):
    """A context switch: inside ``with other_build():`` the three modules run another build than
    this machine's default one.  Skips when that build *is* the default one."""
    cflags = BUILDS[request.param]()
    if list(cflags) == native.simd_build()[1]:
        pytest.skip(f"the {request.param} build is this machine's default build")
    if not all(m.status()[0] for m in MODULES):
        pytest.skip("the kernels do not run here")

    @contextlib.contextmanager
    def use():
        with monkeypatch.context() as m:
            for mod in MODULES:
                m.setattr(mod, "_library", functools.partial(mod._library, cflags))
            yield
    return use


def _same_bits(a, b):
    assert type(a) is type(b)
    if isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same_bits(x, y)
        return
    assert a.dtype == b.dtype and a.shape == b.shape
    if a.dtype == torch.float32:
        a, b = a.view(torch.int32), b.view(torch.int32)
    assert torch.equal(a, b), (a != b).sum()


def _both(other_build, fn):
    """``fn()`` on the default build and on the other one, outputs copied."""
    clone = lambda out: tuple(t.clone() for t in out) if isinstance(out, tuple) else out.clone()  # noqa: E731
    ref = clone(fn())
    with other_build():
        got = clone(fn())
    return ref, got


def _awkward(shape, seed, scale=1.0):
    """Gaussian values with NaN, +-inf and zeros sprinkled in (one row left clean)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * scale
    flat = x.view(-1)
    n = flat.numel()
    for value, k in ((float("nan"), 3), (float("inf"), 2), (float("-inf"), 2), (0.0, 5), (-0.0, 3)):
        flat[torch.randint(shape[-1], n, (k,), generator=g)] = value
    return x


@pytest.mark.parametrize("shape, dims, center, out_bits", [
    ((3, 37, 21), [2], True, None),            # LayerNorm rows of 21: a full and a partial vector
    ((3, 37, 21), [2], False, 6),              # RMSNorm, quantized for the next Linear
    ((5, 6, 9, 7), [0, 2, 3], True, None),     # BatchNorm over (N, H, W)
    ((4, 6, 5, 13), [2, 3], True, 8),          # InstanceNorm
])
@pytest.mark.parametrize("awkward", [False, True])
def test_norm_kernels_give_the_same_bits(other_build, shape, dims, center, out_bits, awkward):
    x = _awkward(shape, 0) if awkward else torch.randn(shape, generator=torch.Generator().manual_seed(0))
    if len(dims) == 1:
        w, b = torch.randn(shape[-1]), torch.randn(shape[-1])
    else:
        w, b = None, None
    ref, got = _both(other_build, lambda: CN._forward(x, w, b, dims, center, C, EPS, 8, out_bits))
    _same_bits(ref, got)
    if out_bits is not None and CN.rows_only(shape, dims):     # with act_groups' quantizer instead
        _same_bits(*_both(other_build, lambda: CN._forward(x, w, b, dims, center, C, EPS, 8, out_bits, True, 3)))
    _, q, amax, total, deviation = CN._forward(x, w, b, dims, center, C, EPS, 8, None)
    dy = _awkward(shape, 1) if awkward else torch.randn(shape, generator=torch.Generator().manual_seed(1))
    residual = torch.randn(shape)
    seed = torch.tensor(12345, dtype=torch.int64)
    res = residual if len(dims) == 1 else None
    _same_bits(*_both(other_build, lambda: CN.cpu_l1_norm_backward(dy, q, amax, total, deviation, w, seed, dims, center,
                                                                C, EPS, 8, 5, True, res)))


@pytest.mark.parametrize("shape", [(2, 19, 45), (33, 17)])
@pytest.mark.parametrize("awkward", [False, True])
def test_quantizer_kernels_give_the_same_bits(other_build, shape, awkward):
    g = torch.Generator().manual_seed(2)
    dy = _awkward(shape, 2) if awkward else torch.randn(shape, generator=g)
    pk = torch.rand(*shape[:-2], 1, shape[-1], generator=g) + 0.5      # [..., 1, S]
    pq = torch.rand(*shape[:-1], 1, generator=g) + 0.5                 # [..., L, 1]
    seeds = (torch.tensor(7, dtype=torch.int64), torch.tensor(99, dtype=torch.int64))
    _same_bits(*_both(other_build, lambda: CQ.shiftquant_outer_pair(dy, pk, pq, 5, 3, seeds)))
    if len(shape) == 3:          # as a convolution's [N, C, L] gradient: the samples' and channels' outer maxima
        pn, pc = torch.rand(shape[0], 1, 1, generator=g) + 0.5, torch.rand(1, shape[1], 1, generator=g) + 0.5
        _same_bits(*_both(other_build, lambda: CQ.shiftquant_outer_pair(dy, pn, pc, 5, 3, seeds, conv=True)))

    acc = torch.randint(-5000, 5001, shape, dtype=torch.int32, generator=g)
    sa = torch.rand(*shape[:-1], 1, generator=g) * 1e-3
    sb = torch.rand(*shape[:-2], 1, shape[-1], generator=g) * 1e-3
    if awkward:
        sa.view(-1)[0] = float("nan")
        sb.view(-1)[1] = float("inf")
    bias = torch.randn(shape[-1], generator=g)
    _same_bits(*_both(other_build, lambda: CQ.gelu_quantize(acc, sa, sb, bias, 8)))
    for per_batch in (False, True):
        _same_bits(*_both(other_build, lambda: CQ.gelu_shiftquant(acc, sa, sb, bias, 4, 4, per_batch)))
    pre = dy * 3 if awkward else torch.randn(shape, generator=g) * 2
    _same_bits(*_both(other_build, lambda: CQ.gelu_backward(acc, sa, sb, pre)))


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("multiplier", [1, 2])       # depthwise 8x8 planes: the channel blocks at stride 1
def test_grouped_conv_kernels_give_the_same_bits(other_build, stride, multiplier):
    """Integer code only, but compiled with each build's flags (the vectorized loops)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-128, 128, (2, 6, 8, 8), generator=g, dtype=torch.int8)
    w = torch.randint(-128, 128, (6 * multiplier, 1, 3, 3), generator=g, dtype=torch.int8)
    args = ([stride] * 2, [1, 1], [1, 1], 6)
    y = ops.int8_grouped_conv(x, w, *args)
    e = torch.randint(-128, 128, y.shape, generator=g, dtype=torch.int8)
    _same_bits(*_both(other_build, lambda: (ops.int8_grouped_conv(x, w, *args),
                                            ops.int8_grouped_conv_input_grad(e, w, list(x.shape), *args),
                                            ops.int8_grouped_conv_weight(e, x, [3, 3], *args))))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("awkward", [False, True])
def test_attention_kernels_give_the_same_bits(other_build, causal, awkward):
    g = torch.Generator().manual_seed(3)
    shape = (2, 3, 23, 37)
    scores = torch.randint(-3000, 3001, shape, dtype=torch.int32, generator=g)
    sa = torch.rand(2, 3, 23, 1, generator=g) * 0.01
    sb = torch.rand(2, 3, 1, 37, generator=g) * 0.01
    if awkward:
        sa.view(-1)[4] = float("nan")
        scores[..., 5, :] = 0
    ref, got = _both(other_build, lambda: CA.attention_probs(scores, sa, sb, 0.125, causal, 8))
    _same_bits(ref, got)
    p = ref[0]
    dp = torch.randint(-3000, 3001, shape, dtype=torch.int32, generator=g)
    mask = torch.rand(23, 37, generator=g) < 0.2
    _same_bits(*_both(other_build, lambda: CA.attention_probs_backward(dp, sa, sb, p, mask, 0.125)))


@pytest.mark.skipif(not CN.status()[0], reason="the C kernels do not run here")
def test_the_portable_build_gives_the_reference_backward():
    """The portable build, wherever it is the default or not: a norm backward, its gradient
    rounded with ``hash_noise``, is the ``numerics`` reference's (to the float rounding of its
    sums)."""
    x = torch.randn(4, 40)
    dy = torch.randn(4, 40)
    seed = N.draw_seed("cpu")
    _, q, amax, total, deviation = CN.l1_norm_reference(x, None, None, [1], True, C, EPS, 8)
    want = CN.l1_norm_backward_reference(dy, q, amax, total, deviation, None, seed, [1], True, C, EPS, 8, 5)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(CN, "_library", functools.partial(CN._library, tuple(native.portable_cflags())))
        got = CN.cpu_l1_norm_backward(dy, q, amax, total, deviation, None, seed, [1], True, C, EPS, 8, 5, True)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
