"""The CPU int8 GEMM engines (our AMX kernel, oneDNN's ``torch._int_mm``, the float engine)
against the exact float64 product, and the engine choice (``SQCOMPILE_CPU_GEMM``); our AVX2
kernel has its own file (``test_cpu_gemm_avx2.py``).

The AMX tests skip on CPUs without AMX-int8 (or without a C compiler); the oneDNN ones run
everywhere.  Shapes cover every edge the kernel handles separately: M, N and K that are not
multiples of its 32-row block, 16-column tile and 64-byte tile row; K longer than one
reduction chunk (512); batches, broadcast and strided operands.
"""
import os

import pytest
import torch
from hypothesis import given, settings, strategies as st

import sqcompile
from sqcompile import ops
from sqcompile.kernels import amx, avx2, cpu, pool

AMX_OK, AMX_WHY = amx.status()
needs_amx = pytest.mark.skipif(not AMX_OK, reason=f"AMX kernel not usable here: {AMX_WHY}")


def exact(a, b):
    return (a.double() @ b.double()).to(torch.int32)


def rand8(*shape, gen):
    return torch.randint(-128, 128, shape, dtype=torch.int8, generator=gen)


SHAPES = [(1, 1, 1), (5, 7, 3), (32, 64, 32), (33, 65, 17), (31, 63, 15), (64, 128, 16),
          (100, 1000, 130), (47, 1100, 129), (256, 64, 256),
          (5, 64, 7), (33, 128, 40), (100, 640, 50),   # K whole tiles: A read in place, tail rows copied
          # panels wider than 128 columns (amx_int8.c's panel_tiles): one reduction chunk and an
          # odd N tile count; several chunks with a second, partial panel of two tiles
          (70, 64, 1000), (200, 512, 4000), (65, 1100, 530)]


@needs_amx
@pytest.mark.parametrize("M,K,N", SHAPES)
def test_amx_equals_exact_product(M, K, N):
    g = torch.Generator().manual_seed(M * 1000 + K + N)
    a, b = rand8(M, K, gen=g), rand8(K, N, gen=g)
    assert torch.equal(amx.int8_mm(a, b), exact(a, b))


@needs_amx
@pytest.mark.parametrize("layout", ["row", "col", "strided", "a_transposed", "a_strided", "a_sliced",
                                    "a_sliced_whole_tiles"])
def test_amx_operand_layouts(layout):
    g = torch.Generator().manual_seed(1)
    a, b = rand8(70, 130, gen=g), rand8(130, 40, gen=g)
    if layout == "col":                    # b = W.t() of a contiguous W: packed from columns
        b = b.t().contiguous().t()
    elif layout == "strided":              # neither dim of b contiguous: copied once
        b = rand8(130, 80, gen=g)[:, ::2]
    elif layout == "a_transposed":         # column-major a (dW's activations): transposed while packed
        a = a.t().contiguous().t()
    elif layout == "a_strided":            # no unit stride at all: copied once
        a = rand8(70, 260, gen=g)[:, ::2]
    elif layout == "a_sliced":             # row stride larger than K
        a = rand8(70, 200, gen=g)[:, 10:140]
    elif layout == "a_sliced_whole_tiles":  # the same with K = 128: read in place, row stride 200
        a, b = rand8(70, 200, gen=g)[:, 10:138], rand8(128, 40, gen=g)
    assert torch.equal(amx.int8_mm(a, b), exact(a, b))


@needs_amx
def test_amx_batched_and_broadcast():
    g = torch.Generator().manual_seed(2)
    a, b = rand8(2, 3, 33, 70, gen=g), rand8(2, 3, 70, 20, gen=g)
    assert torch.equal(amx.int8_mm(a, b), exact(a, b))
    w = rand8(70, 20, gen=g)                                   # one B for every batch entry
    assert torch.equal(amx.int8_mm(a, w), exact(a, w))
    a1 = rand8(33, 70, gen=g)                                  # one A for every batch entry
    assert torch.equal(amx.int8_mm(a1, b), exact(a1, b))
    mixed = rand8(2, 1, 70, 20, gen=g)                         # batch dims that do not flatten
    assert torch.equal(amx.int8_mm(a, mixed), exact(a, mixed))
    # attention's layout: per-head slices of one [B, T, H, D] tensor, transposed views
    q = rand8(2, 40, 4, 64, gen=g).transpose(1, 2)
    k = rand8(2, 40, 4, 64, gen=g).transpose(1, 2)
    assert torch.equal(amx.int8_mm(q, k.transpose(-1, -2)), exact(q, k.transpose(-1, -2)))


@needs_amx
def test_amx_empty_and_extreme_values():
    assert amx.int8_mm(torch.zeros(0, 5, dtype=torch.int8), torch.zeros(5, 3, dtype=torch.int8)).shape == (0, 3)
    z = amx.int8_mm(torch.zeros(4, 0, dtype=torch.int8), torch.zeros(0, 3, dtype=torch.int8))
    assert torch.equal(z, torch.zeros(4, 3, dtype=torch.int32))
    # -128 * -128 summed over K = MAX_INT32_TERMS stays exact (the caller's split bound)
    K = 4096
    a = torch.full((33, K), -128, dtype=torch.int8)
    b = torch.full((K, 17), -128, dtype=torch.int8)
    assert torch.equal(amx.int8_mm(a, b), exact(a, b))


@needs_amx
def test_amx_after_releasing_the_workspace():
    g = torch.Generator().manual_seed(7)
    a, b = rand8(300, 640, gen=g), rand8(640, 90, gen=g)
    amx.int8_mm(a, b)
    amx.release_workspace()
    assert torch.equal(amx.int8_mm(a, b), exact(a, b))


@needs_amx
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("layout", ["row-major B", "column-major B", "batched B", "transposed A"])
def test_amx_packs_a_large_b_a_panel_at_a_time(threads, layout):
    """A B whose packed tiles pass 4 MiB (amx_int8.c's LAZY_B_BYTES) is packed one panel at a
    time by the thread that needs it: ragged K and N (a partial k tile, an odd N tile count,
    a partial last tile), one B per batch entry or one for all, any thread count."""
    g = torch.Generator().manual_seed(threads)
    M, K, N = 70, 2100, 2050                      # 33 k tiles x 129 N tiles: 4.2 MiB packed
    if layout == "batched B":
        a, b = rand8(2, M, K, gen=g), rand8(2, K, N // 2 + 1100, gen=g)      # 2.3 MiB each
    elif layout == "column-major B":
        a, b = rand8(M, K, gen=g), rand8(N, K, gen=g).t()
    elif layout == "transposed A":
        a, b = rand8(K, M, gen=g).t(), rand8(K, N, gen=g)
    else:
        a, b = rand8(M, K, gen=g), rand8(K, N, gen=g)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        got = amx.int8_mm(a, b)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(got, exact(a, b))


@needs_amx
def test_amx_with_two_threads_equals_one():
    g = torch.Generator().manual_seed(3)
    a, b = rand8(3, 130, 600, gen=g), rand8(600, 300, gen=g)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = amx.int8_mm(a, b)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(two, exact(a, b))


@needs_amx
@settings(max_examples=40, deadline=None)
@given(M=st.integers(1, 80), K=st.one_of(st.integers(1, 300), st.sampled_from([64, 128, 192])),
       N=st.integers(1, 80), batch=st.integers(0, 2),
       transpose_a=st.booleans(), transpose_b=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_amx_property_exact(M, K, N, batch, transpose_a, transpose_b, seed):
    g = torch.Generator().manual_seed(seed)
    lead = (batch,) if batch else ()
    a = rand8(*lead, K, M, gen=g).transpose(-1, -2) if transpose_a else rand8(*lead, M, K, gen=g)
    b = rand8(*lead, N, K, gen=g).transpose(-1, -2) if transpose_b else rand8(*lead, K, N, gen=g)
    assert torch.equal(amx.int8_mm(a, b), exact(a, b))


def test_amx_refuses_wrong_operands():
    with pytest.raises(TypeError, match="int8"):
        amx.int8_mm(torch.zeros(2, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="do not chain"):
        amx.int8_mm(torch.zeros(2, 3, dtype=torch.int8), torch.zeros(4, 2, dtype=torch.int8))


@pytest.mark.parametrize("a_shape, b_shape", [
    ((9, 2500), (2500, 7)),                 # three chunks of the reduction, the last partial
    ((2, 33, 1024), (1024, 17)),            # exactly one chunk, a batch broadcast against 2-D
    ((1, 5, 3000), (3, 3000, 4)),           # batch dims broadcast both ways
    ((4, 0), (0, 3)),                       # nothing to sum: zeros
])
def test_float_engine_equals_exact_product(a_shape, b_shape):
    g = torch.Generator().manual_seed(6)
    a, b = rand8(*a_shape, gen=g), rand8(*b_shape, gen=g)
    assert torch.equal(cpu.float_int8_mm(a, b), exact(a, b))
    assert torch.equal(cpu.float_int8_mm(a.mT.contiguous().mT, b.mT.contiguous().mT), exact(a, b))


def test_float_engine_is_exact_at_the_largest_sums():
    """Every product -128 * -128 = 2**14: a chunk of 1024 sums to 2**24, the largest integer
    below which float32 holds them all; 2500 of them overflow no chunk."""
    a, b = torch.full((3, 2500), -128, dtype=torch.int8), torch.full((2500, 2), -128, dtype=torch.int8)
    assert torch.equal(cpu.float_int8_mm(a, b), torch.full((3, 2), 2500 * 2**14, dtype=torch.int32))
    with pytest.raises(ValueError, match="do not chain"):
        cpu.float_int8_mm(a, a)


def test_onednn_engine_equals_exact_product():
    g = torch.Generator().manual_seed(4)
    a, b = rand8(3, 33, 70, gen=g), rand8(70, 20, gen=g)
    assert torch.equal(cpu.onednn_int8_mm(a, b), exact(a, b))
    assert torch.equal(cpu.onednn_int8_mm(a[0], b), exact(a[0], b))


def _size1_views(gen):
    """int8 ``[1, n]`` / ``[m, 1]`` views with every stride a view can have along the size-1
    dim (below, equal to and above the other dim's length), as im2col views give them."""
    out = []
    for m, n in ((1, 18), (18, 1), (1, 1)):
        base = rand8(64, gen=gen)
        for s_unit in (1, 2):
            for s_other in (1, 3, 9, 18, 40):
                strides = (s_other, s_unit) if m == 1 else (s_unit, s_other)
                out.append(base.as_strided((m, n), strides))
    return out


@pytest.mark.parametrize("engine", ["onednn", "amx"])
def test_operands_with_a_size_1_dim_at_any_stride_are_exact(monkeypatch, engine):
    """oneDNN reads a size-1 dim's stride as the leading dimension: a ``[1, 18]`` row with
    stride 9 came back as other memory (a conv with one output channel got garbage weight
    gradients).  Both engines, 2-d and batched."""
    if engine == "amx" and not AMX_OK:
        pytest.skip(AMX_WHY)
    monkeypatch.setenv(amx.ENGINE_VARIABLE, engine)
    g = torch.Generator().manual_seed(9)
    for a in _size1_views(g):
        m, k = a.shape
        for b in (rand8(k, 5, gen=g), rand8(5, k, gen=g).t(), *[v for v in _size1_views(g) if v.shape[0] == k]):
            assert torch.equal(torch.ops.sqcompile.int8_mm(a, b), exact(a, b)), (a.shape, a.stride(), b.stride())
            a3, b3 = a.expand(3, m, k), b.expand(3, *b.shape)
            assert torch.equal(torch.ops.sqcompile.int8_mm(a3, b3), exact(a3, b3))


@pytest.mark.parametrize("engine", ["onednn", "auto"])
def test_conv_with_one_output_or_input_channel_matches_float(monkeypatch, engine):
    import copy

    import sqcompile  # noqa: F401  (registers the backend)

    monkeypatch.setenv(amx.ENGINE_VARIABLE, engine)
    eight = {"weight_bits": 8, "act_bits": 8, "grad_bits": 8, "groups": 1}
    for conv, shape in ((torch.nn.Conv2d(2, 1, 3), (2, 2, 5, 5)), (torch.nn.Conv1d(1, 4, 1), (2, 1, 1)),
                        (torch.nn.Conv2d(1, 4, 1), (2, 1, 6, 6))):
        torch._dynamo.reset()
        torch.manual_seed(0)
        ref, x = copy.deepcopy(conv), torch.randn(shape)
        out = torch.compile(conv, backend="shiftquant", options=eight)(x)
        out.sum().backward()
        ref(x).sum().backward()
        assert (out - ref(x)).norm() <= 0.03 * ref(x).norm()
        assert (conv.weight.grad - ref.weight.grad).norm() <= 0.03 * ref.weight.grad.norm()
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------
# engine choice
# --------------------------------------------------------------------------------------------

def test_engine_variable_is_validated(monkeypatch):
    monkeypatch.setenv(amx.ENGINE_VARIABLE, "mkl")
    with pytest.raises(ValueError, match=amx.ENGINE_VARIABLE):
        amx.engine()
    a = torch.ones(2, 2, dtype=torch.int8)
    with pytest.raises(ValueError, match=amx.ENGINE_VARIABLE):
        torch.ops.sqcompile.int8_mm(a, a)


def fake_avx2_status(avx2_ok, vnni_ok):
    """``avx2.status`` of a CPU where the two builds are (not) usable."""
    def status(variant="avx2"):
        ok = avx2_ok if variant == "avx2" else vnni_ok
        return (True, None) if ok else (False, f"no {variant} here")
    return status


@pytest.mark.parametrize("avx2_ok", [True, False])
@pytest.mark.parametrize("vnni", [True, False])
@pytest.mark.parametrize("engine", ["onednn", "amx", "auto", "vnni", "avx2", "float"])
@pytest.mark.parametrize("rows", [amx.MIN_ROWS - 1, amx.MIN_ROWS])
def test_engine_choice_routes_the_op(monkeypatch, engine, rows, vnni, avx2_ok):
    calls = []
    monkeypatch.setenv(amx.ENGINE_VARIABLE, engine)
    monkeypatch.setattr(amx, "has_vnni", lambda: vnni)
    monkeypatch.setattr(avx2, "status", fake_avx2_status(avx2_ok, vnni and avx2_ok))
    monkeypatch.setattr(amx, "int8_mm", lambda a, b: calls.append("amx") or exact(a, b))
    monkeypatch.setattr(avx2, "int8_mm", lambda a, b, variant: calls.append(variant) or exact(a, b))
    monkeypatch.setattr(cpu, "onednn_int8_mm", lambda a, b: calls.append("onednn") or exact(a, b))
    monkeypatch.setattr(cpu, "float_int8_mm", lambda a, b: calls.append("float") or exact(a, b))
    a = torch.ones(2, rows, 5, dtype=torch.int8)
    b = torch.ones(5, 2, dtype=torch.int8)
    if (engine == "amx" and not AMX_OK) or (engine == "avx2" and not avx2_ok) or \
            (engine == "vnni" and not (vnni and avx2_ok)):
        with pytest.raises(RuntimeError, match="not usable"):
            torch.ops.sqcompile.int8_mm(a, b)
        return
    assert torch.equal(torch.ops.sqcompile.int8_mm(a, b), exact(a, b))
    # auto sends products with few rows to oneDNN (lower fixed cost) where the CPU has VNNI, else
    # to our AVX2 kernel, else to float32 GEMMs; "amx", "vnni" and "avx2" force their kernels
    use_amx = AMX_OK and (engine == "amx" or (engine == "auto" and rows >= amx.MIN_ROWS))
    other = engine if engine in ("onednn", "vnni", "avx2", "float") else "onednn" if vnni else \
        "avx2" if avx2_ok else "float"
    assert calls == ["amx" if use_amx else other]
    # convolutions: auto takes the VNNI build where the plain GEMMs would go to oneDNN
    conv = "vnni" if engine == "auto" and other == "onednn" and not use_amx and vnni and avx2_ok else \
        "amx" if use_amx else other
    assert amx.conv_engine(rows) == conv


def test_unusable_amx_falls_back_with_a_reason(monkeypatch, tmp_path):
    """A CPU without AMX or a failed build: ``auto`` takes oneDNN, ``amx`` says why not."""
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C\n")
    monkeypatch.setattr(amx, "SOURCE", str(broken))
    amx.status.cache_clear()
    amx._library.cache_clear()
    try:
        ok, why = amx.status()
        assert not ok and why
        monkeypatch.setenv(amx.ENGINE_VARIABLE, "auto")
        assert amx.engine() == ("onednn" if amx.has_vnni() else "avx2" if avx2.status()[0] else "float")
        assert why in amx.describe()
        monkeypatch.setenv(amx.ENGINE_VARIABLE, "amx")
        with pytest.raises(RuntimeError, match=amx.ENGINE_VARIABLE):
            amx.engine()
    finally:
        amx.status.cache_clear()
        amx._library.cache_clear()


@pytest.mark.parametrize("engine", ["onednn", "amx", "float"])
def test_integer_matmul_on_each_engine_is_exact(monkeypatch, engine):
    """The op the quantized layers call, including the int32 split of long reductions."""
    if engine == "amx" and not AMX_OK:
        pytest.skip(AMX_WHY)
    monkeypatch.setenv(amx.ENGINE_VARIABLE, engine)
    g = torch.Generator().manual_seed(5)
    K = ops.MAX_INT32_TERMS + 1000
    a, b = rand8(9, K, gen=g), rand8(K, 7, gen=g)
    assert torch.equal(ops.integer_matmul(a, b), (a.double() @ b.double()).float())


# --------------------------------------------------------------------------------------------
# output recycling
# --------------------------------------------------------------------------------------------

def test_output_pool_recycles_only_unreferenced_buffers():
    outputs = pool.OutputPool(limit=64 << 20)
    shape = (512, 1024)                                   # 2 MiB of int32: pooled
    first = outputs.empty(shape)
    first.fill_(7)
    held = outputs.empty(shape)                           # first is alive: a second buffer
    assert held.data_ptr() != first.data_ptr() and outputs.kept == 2 * 4 * 512 * 1024
    view = first[:3]                                      # a view keeps the memory in use
    ptr = first.data_ptr()
    del first
    assert outputs.empty(shape).data_ptr() != ptr
    assert torch.equal(view, torch.full((3, 1024), 7, dtype=torch.int32))
    del view
    again = outputs.empty((1024, 512))                    # any shape of the same size
    assert again.data_ptr() == ptr and again.shape == (1024, 512)


def test_output_pool_limits():
    small = pool.OutputPool(limit=64 << 20).empty((4, 4))  # below MIN_BYTES: plain tensor
    assert small.shape == (4, 4) and small.dtype == torch.int32
    outputs = pool.OutputPool(limit=4 << 20)
    a, b = outputs.empty((512, 1024)), outputs.empty((512, 1024))   # 2 MiB each: both kept
    c = outputs.empty((512, 1024))                                  # over the limit: not kept
    assert outputs.kept == 4 << 20 and len({a.data_ptr(), b.data_ptr(), c.data_ptr()}) == 3
    outputs.clear()
    assert outputs.kept == 0 and outputs.empty((512, 1024)).data_ptr() not in (a.data_ptr(), b.data_ptr())
    off = pool.OutputPool(limit=0)
    off.empty((512, 1024))
    assert off.kept == 0


def test_output_pool_makes_room_for_new_sizes_from_the_least_recently_used_free_buffers():
    """Shapes that change every step (a last smaller batch, variable sequence lengths) must
    not fill the pool with sizes that never come back."""
    outputs = pool.OutputPool(limit=6 << 20)
    mib = 1 << 18                                                       # int32 elements in 1 MiB
    a, b = outputs.empty((2 * mib,)), outputs.empty((2 * mib,))         # 4 MiB kept, both in use
    pa, pb = a.data_ptr(), b.data_ptr()
    del a, b
    again = outputs.empty((2 * mib,))                                   # a's buffer again: b is the older
    assert again.data_ptr() == pa
    c = outputs.empty((3 * mib,))                                       # 3 MiB more: b makes room
    assert outputs.kept == 5 << 20 and sorted(outputs.buffers) == [2 << 20, 3 << 20]
    held = outputs.empty((3 * mib,))                    # a's and c's buffers in use: a plain tensor
    assert outputs.kept == 5 << 20 and len(outputs.buffers[3 << 20]) == 1
    del again                                           # a's buffer free: it makes room for 3 MiB
    assert outputs.empty((3 * mib,)) is not None and outputs.kept == 6 << 20
    assert sorted(outputs.buffers) == [3 << 20] and len(outputs.buffers[3 << 20]) == 2
    del held, c


def test_output_pool_variable_is_validated(monkeypatch):
    monkeypatch.setenv(pool.POOL_VARIABLE, "lots")
    with pytest.raises(ValueError, match=pool.POOL_VARIABLE):
        pool.OutputPool()
    monkeypatch.setenv(pool.POOL_VARIABLE, "16")
    assert pool.OutputPool().limit == 16 << 20


def test_output_pool_default_cap_is_an_eighth_of_physical_memory(monkeypatch):
    monkeypatch.delenv(pool.POOL_VARIABLE, raising=False)
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert pool.OutputPool().limit == min(physical // 8, 4 << 30)
    # a step of the README's transformer keeps 432 MiB of outputs alive at once
    assert pool.OutputPool().limit >= 432 << 20 or physical < 4 << 30

    def unreadable(name):
        raise ValueError(name)
    monkeypatch.setattr(os, "sysconf", unreadable)
    assert pool.OutputPool().limit == 1 << 30


def test_empty_cache_gives_back_free_buffers_and_keeps_used_ones(monkeypatch):
    outputs = pool.OutputPool(limit=64 << 20)
    monkeypatch.setattr(pool, "OUTPUTS", outputs)
    used, free = outputs.empty((512, 1024)), outputs.empty((512, 1024))
    used.fill_(3)
    del free
    assert outputs.kept == 4 << 20
    sqcompile.empty_cache()
    assert outputs.kept == 0 and not outputs.buffers
    assert torch.equal(used, torch.full((512, 1024), 3, dtype=torch.int32))   # still the caller's
    outputs.empty((512, 1024))                    # a fresh buffer, the only one counted
    assert outputs.kept == 2 << 20


@needs_amx
def test_recycled_outputs_never_overwrite_live_results():
    g = torch.Generator().manual_seed(6)
    a1, b1 = rand8(600, 64, gen=g), rand8(64, 700, gen=g)       # 1.6 MiB outputs: pooled
    a2, b2 = rand8(600, 64, gen=g), rand8(64, 700, gen=g)
    c1 = amx.int8_mm(a1, b1)
    c2 = amx.int8_mm(a2, b2)
    assert c1.data_ptr() != c2.data_ptr()
    assert torch.equal(c1, exact(a1, b1)) and torch.equal(c2, exact(a2, b2))
    ptr = c1.data_ptr()
    del c1
    c3 = amx.int8_mm(a2, b1)
    assert c3.data_ptr() == ptr and torch.equal(c3, exact(a2, b1)) and torch.equal(c2, exact(a2, b2))


@pytest.mark.slow
def test_training_with_recycled_outputs_equals_training_without(monkeypatch):
    """Three compiled training steps whose GEMM outputs (>= 1 MiB) come from the pool give the
    same parameters, bit for bit, as with recycling off: no buffer is reused while live."""
    import torch.nn as nn

    def train(limit):
        monkeypatch.setattr(pool, "OUTPUTS", pool.OutputPool(limit=limit))
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(256, 640), nn.GELU(), nn.Linear(640, 256))
        run = torch.compile(model, backend="shiftquant", options={"inner": "inductor"})
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x = torch.randn(512, 256)
        for _ in range(3):
            opt.zero_grad()
            run(x).pow(2).mean().backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()], pool.OUTPUTS.kept

    recycled, kept = train(64 << 20)
    fresh, none_kept = train(0)
    assert kept > 0 and none_kept == 0              # the pool was used, then not
    for a, b in zip(recycled, fresh):
        assert torch.equal(a, b)
