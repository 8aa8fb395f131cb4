"""Property tests of the reference quantizers (sqcompile.numerics) against the spec in
DESIGN.md, written from the definitions rather than from the implementation."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sqcompile import numerics as N

bits_st = st.integers(2, 8)
groups_st = st.integers(1, 6)


def tensors(draw, max_dims=3):
    shape = draw(st.lists(st.integers(1, 7), min_size=2, max_size=max_dims))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    # channel ranges spread over several octaves so groups are exercised
    x = torch.randn(shape, generator=g)
    spread = torch.pow(2.0, torch.randint(-6, 1, (shape[-1],), generator=g).float())
    return x * spread


@st.composite
def tensor_st(draw):
    return tensors(draw)


def test_qmax_and_fit_rule():
    assert [N.qmax(b) for b in range(2, 9)] == [1, 3, 7, 15, 31, 63, 127]
    # "4 bits up to 5 groups, 5 bits up to 4, 6 bits up to 3, 8 bits only 1"
    assert max(g for g in range(1, 9) if N.fits_int8(4, g)) == 5
    assert max(g for g in range(1, 9) if N.fits_int8(5, g)) == 4
    assert max(g for g in range(1, 9) if N.fits_int8(6, g)) == 3
    assert max(g for g in range(1, 9) if N.fits_int8(8, g)) == 1
    for b in range(2, 9):
        for g in range(1, 9):
            assert N.fits_int8(b, g) == ((2 ** (b - 1) - 1) * 2 ** (g - 1) <= 127)
    with pytest.raises(ValueError):
        N.qmax(9)


@settings(max_examples=60, deadline=None)
@given(x=tensor_st(), bits=bits_st)
def test_nearest_quantize_matches_definition(x, bits):
    q, scale = N.quantize(x, bits, keep_dims=(0,))
    m = 2 ** (bits - 1) - 1
    amax = x.abs().amax(dim=tuple(range(1, x.dim())), keepdim=True)
    assert torch.equal(scale, amax / m)
    expected = torch.clamp(torch.round(x / torch.where(scale == 0, 1.0, scale)), -m, m)
    assert torch.equal(q.float(), expected)
    assert q.dtype == torch.int8 and q.abs().max() <= m
    # error at most half a step
    assert torch.all((N.dequantize(q, scale) - x).abs() <= scale / 2 + 1e-6)


@settings(max_examples=60, deadline=None)
@given(x=tensor_st(), bits=bits_st)
def test_stochastic_rounding_is_floor_or_ceil(x, bits):
    q, scale = N.quantize(x, bits, (), "stochastic")
    v = x / scale
    m = 2 ** (bits - 1) - 1
    assert torch.all((q.float() == torch.floor(v).clamp(-m, m)) | (q.float() == torch.ceil(v).clamp(-m, m)))


def test_stochastic_rounding_is_unbiased_and_error_shrinks_with_samples():
    torch.manual_seed(0)
    x = torch.rand(4096) * 2 - 1
    scale = torch.tensor(0.25)        # values sit between grid points of a coarse grid
    errs = []
    for n in (4, 64, 1024):
        mean = torch.stack([N.dequantize(N.quantize_with_scale(x, scale, 4, "stochastic"), scale)
                            for _ in range(n)]).mean(0)
        errs.append(float((mean - x).abs().mean()))
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 0.25 / 16        # ~ step / sqrt(1024) / 2
    # nearest rounding is biased for the same values: its error does not shrink
    near = N.dequantize(N.quantize_with_scale(x, scale, 4, "nearest"), scale)
    assert float((near - x).abs().mean()) > 4 * errs[2]


def test_uniform_noise_is_uniform_in_every_byte():
    torch.manual_seed(0)
    u = N.uniform_noise((8, 2**20))
    assert u.min() >= 0 and u.max() < 1
    # every eighth byte came from the sign-bit byte of an int64: it must be uniform too.
    # 2**20 samples per lane: the standard error of a fraction is 0.0005, we allow 6 of them.
    for lane in range(8):
        lane_vals = u.flatten()[lane::8]
        assert abs(float(lane_vals.mean()) - 0.5) < 0.003, lane
        assert abs(float((lane_vals >= 0.5).float().mean()) - 0.5) < 0.003, lane


def _expected_group(r: float, R: float, G: int) -> int:
    """Group g holds ranges in (R/2**(g+1), R/2**g]; zero and tiny ranges go to G-1."""
    if r == 0:
        return G - 1
    for g in range(G - 1):
        if R / 2 ** (g + 1) < r <= R / 2 ** g:
            return g
    return G - 1


@settings(max_examples=80, deadline=None)
@given(x=tensor_st(), bits=bits_st, groups=groups_st)
def test_shiftquant_groups_follow_channel_ranges(x, bits, groups):
    r = N.shiftquant(x, bits, groups, channel_dims=[x.dim() - 1], rounding="nearest")
    ranges = x.abs().amax(dim=tuple(range(x.dim() - 1)))
    R = float(ranges.max())
    got = r.group.flatten().tolist()
    assert got == [_expected_group(float(v), R, groups) for v in ranges]


def test_shiftquant_group_boundaries_are_exact():
    # ranges exactly on powers of two below R: R/2 belongs to group 1, just above R/2 to group 0
    x = torch.tensor([[8.0, 4.0, 4.0000005, 2.0, 1.0, 0.5, 0.0]])
    r = N.shiftquant(x, 4, 4, [1], "nearest")
    assert r.group.flatten().tolist() == [0, 1, 0, 2, 3, 3, 3]


@settings(max_examples=80, deadline=None)
@given(x=tensor_st(), bits=bits_st, groups=groups_st)
def test_expanded_form_equals_groupwise_dequantization(x, bits, groups):
    r = N.shiftquant(x, bits, groups, channel_dims=[0], rounding="nearest")
    m = 2 ** (bits - 1) - 1
    scales = r.group_scales()
    R = x.abs().max()
    for g in range(groups):   # s_g = R / 2**g / qmax
        assert math.isclose(float(scales[g]), float(R) / 2 ** g / m, rel_tol=1e-6)
    group_scale = scales[r.group]
    groupwise = r.q.float() * group_scale
    assert torch.equal(r.expanded.float() * r.base_scale, groupwise)      # exact, not close
    assert torch.equal(r.expanded.long(), r.q.long() << (groups - 1 - r.group))
    assert r.q.abs().max() <= m
    assert r.expanded.dtype == (torch.int8 if N.fits_int8(bits, groups) else torch.int16)
    # each channel is quantized with its group's scale: error within half a step of it
    assert torch.all((groupwise - x).abs() <= group_scale / 2 * (1 + 1e-5) + 1e-7)


def test_shiftquant_beats_per_tensor_and_approaches_per_channel():
    torch.manual_seed(0)
    x = torch.randn(256, 64) * torch.pow(2.0, -(torch.arange(64) % 6).float())   # 6 octaves of ranges
    per_tensor = N.mse(N.fake_quantize(x, 4, ()), x)
    per_channel = N.mse(N.fake_quantize(x, 4, (1,)), x)
    sq = N.mse(N.shiftquant(x, 4, 4, [1], "nearest").dequantize(), x)
    assert per_channel < sq < per_tensor / 2


@pytest.mark.parametrize("fn", [
    lambda x: N.quantize(x, 4, ()),
    lambda x: N.quantize(x, 4, (0,), "stochastic"),
    lambda x: (lambda r: (r.expanded, r.base_scale))(N.shiftquant(x, 4, 4, [1])),
])
def test_zero_tensors_quantize_to_zero(fn):
    q, scale = fn(torch.zeros(5, 6))
    assert torch.all(q == 0)
    assert torch.all(scale == 0) and not torch.isnan(scale).any()
    assert torch.all(N.dequantize(q, scale) == 0)


def test_non_finite_values_propagate_instead_of_vanishing():
    x = torch.randn(4, 6)
    x[1, 2] = float("inf")
    q, scale = N.quantize(x, 4, ())
    assert torch.isnan(N.dequantize(q, scale)).all()
    r = N.shiftquant(x, 4, 4, [1])
    assert torch.isnan(r.dequantize()).all()
    x[1, 2] = float("nan")
    assert torch.isnan(N.shiftquant(x, 4, 4, [1]).dequantize()).all()
    # a NaN confined to one row with per-row scales stays in that row
    q, scale = N.quantize(x, 8, (0,))
    d = N.dequantize(q, scale)
    assert torch.isnan(d[1]).all() and torch.isfinite(d[[0, 2, 3]]).all()


def test_sqnr():
    x = torch.randn(1000)
    assert N.sqnr_db(x, x) == float("inf")
    assert abs(N.sqnr_db(x, x * 1.1) - 20.0) < 1e-4   # noise = 0.1 x -> 20 dB (x * 1.1 rounds in float32)


def test_hash_noise_is_uniform_and_seeded():
    u = N.hash_noise((2**22,), seed=12345)
    assert u.min() >= 0 and u.max() < 1
    counts = torch.bincount(((u * 256) - 0.5).round().long(), minlength=256).double()
    expected = u.numel() / 256
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 400            # 255 degrees of freedom: mean 255, sd ~23
    assert abs(float(u.mean()) - 0.5) < 1e-3
    assert torch.equal(N.hash_noise((100,), 7), N.hash_noise((100,), 7))
    assert not torch.equal(N.hash_noise((100,), 7), N.hash_noise((100,), 8))
    # neighbouring elements are not correlated
    c = torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1]
    assert abs(float(c)) < 0.01


def test_stochastic_rounding_with_hash_noise_is_unbiased():
    x = torch.full((4096,), 0.3)
    scale = torch.tensor(1.0)
    means = [N.dequantize(N.quantize_with_scale(x, scale, 4, "stochastic", N.hash_noise(x.shape, s)), scale).mean()
             for s in range(64)]
    assert abs(float(torch.stack(means).mean()) - 0.3) < 0.005


@given(x=tensor_st(), bits=bits_st, groups=groups_st, seed=st.integers(0, 2**31 - 1))
def test_prescale_is_shiftquant_of_the_float32_product(x, bits, groups, seed):
    """``prescale`` (one factor per channel, any sign, zeros included) = ShiftQuant of the
    float32 product, computed by hand."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(x.shape[-1], generator=g) * torch.pow(2.0, torch.randint(-4, 4, (x.shape[-1],), generator=g))
    m[0] = 0.0
    got = N.shiftquant(x.bfloat16(), bits, groups, [x.dim() - 1], "nearest", prescale=m)
    ref = N.shiftquant(x.bfloat16().float() * m, bits, groups, [x.dim() - 1], "nearest")
    assert torch.equal(got.expanded, ref.expanded) and torch.equal(got.base_scale, ref.base_scale)


@pytest.mark.parametrize("shape", [(3, 5, 4), (1, 3, 5, 1), (5,), (2, 1, 4)])
def test_prescale_must_be_one_factor_per_channel(shape):
    x = torch.randn(3, 5, 4)
    with pytest.raises(ValueError, match="prescale"):
        N.shiftquant(x, 4, 4, [0, 2], prescale=torch.rand(shape))
    N.shiftquant(x, 4, 4, [0, 2], prescale=torch.rand(3, 1, 4))      # fine
