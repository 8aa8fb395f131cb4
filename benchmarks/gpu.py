"""GPU benchmark of the Triton kernel family (one script, under 5 minutes on one H200).

    python benchmarks/gpu.py                 # all parts
    python benchmarks/gpu.py --parts 1,2     # skip the compiled transformer block

Prints, each measured in this run with interleaved repetitions (``triton.testing.do_bench``,
L2 flushed between calls, median of the medians of ``--reps`` rounds):

1. Linear forward+backward with ``ops.quantized_linear(..., integer=True, kernels="triton")``
   (4-bit weights/activations, 4-bit ShiftQuant gradients, 4 groups) against bf16
   ``F.linear`` forward+backward at (M, K, N) = 4096^3 and 8192^3; the pure GEMM at 8192^3:
   our int8 Triton GEMM (and its dequantizing variant, and cuBLAS ``torch._int_mm`` for
   reference) against bf16 ``torch.matmul``, in TFLOP/s (target: int8 >= 1.3x bf16).
2. Quantizer throughput in GB/s and as a fraction of the device's bandwidth, measured in the
   same run with a device-to-device copy (target > 70%), twice: launched from Python (what an
   eager caller gets, host launch cost included) and replayed from a CUDA graph (the kernels
   alone, what a captured training step gets).  "essential" counts the bytes the
   op must move (read x once, write q and the scales); "traffic" counts what the kernels do
   move (ShiftQuant and the split quantizer read x twice: a range pass, then the quantize pass).
   Also a gradient's two ShiftQuants (along its columns and its rows, the rows' result stored
   transposed, as the backward graph runs them) as one ``triton_shiftquant_pair`` against
   two separate quantizers, at a Linear's ``dY`` and attention's ``dS`` shapes, as a ratio;
   and the pair with its previous 64 x 64 tile (now 32 x 128; fewer instructions, shorter
   transposed stores: which is faster is for this run to say).
3. A transformer block training step (d_model 1024, 16 heads, seq 1024, batch 8, LayerNorm,
   GELU MLP, causal ``F.scaled_dot_product_attention``; until 2026-11-29 the attention was
   written as explicit matmuls) compiled with ``backend="shiftquant"``
   (``kernels="triton"``, ``execution="integer"``) against the same block in bf16 under
   Inductor, with CUDA graphs (``cudagraphs=True`` for us, ``mode="reduce-overhead"`` for
   bf16) and bf16 also without (``--launched`` adds ours without CUDA graphs: host-bound).  Each int8 GEMM runs fused with its epilogue (dequantize, bias, GELU, residual
   add, GELU backward: :mod:`sqcompile.backends.fusion`); the part prints how many regions
   were fused, and ``--ablate-fusion`` also times the captured block with fusion off (each GEMM
   then dequantizes in its own epilogue and Inductor runs the bias/activation/residual ops);
   ``--float-attention`` also times it with attention left in bf16 (PyTorch's flash
   attention: ``overrides={"*:scaled_dot_product_attention": None}``, the Linears int8), and
   ``--unfused-attention`` with the quantized attention as separate ops instead of the fused
   Triton kernels (``fused_attention=False``); ``--dynamic`` compiled with symbolic sizes
   (``dynamic=True``, the graph Dynamo compiles after a size change; it should time as the
   static one); ``--outer-scale`` with ``grad_outer_scale`` the other way than its default
   (on by default: the difference is what its accuracy costs on a GPU, three passes per
   gradient ShiftQuant pair instead of one or two, none of its ranges from a GEMM region, two
   range passes in the fused attention's backward).  ``--block-dims
   1024,4096`` also times a block of
   width 4096 (32 heads of 128, as Llama-7B's; bf16 and ours with CUDA graphs), where the
   GEMMs, which int8 speeds up, weigh 4x more against the per-element work (norms,
   quantizers, attention) than at width 1024.  Errors there are printed and the script goes on.
4. The L1 norm at the block's LayerNorm shape ([8192, 1024] bf16), forward+backward: the Triton
   kernels against the same norm fused by Inductor and against bf16 ``nn.LayerNorm`` under
   Inductor (CUDA-graph replay); and the forward with its output quantized for a GEMM inside
   the norm kernel against the norm plus a separate quantizer.
5. Attention alone at the block's shape ([8, 16, 1024, 64] bf16, causal), forward+backward
   (CUDA-graph replay): the fused integer attention (:mod:`sqcompile.kernels.triton_attention`)
   against the same quantized attention as separate ops and against bf16
   ``F.scaled_dot_product_attention`` (flash attention).

Parts 1, 3 and 5 also print what the autotuners chose per kernel and problem shape (the GEMM,
each generated region kernel, the fused attention's kernels): their candidate tiles were
chosen from compile-time counts, so which win here is what the next change needs.

Exits 0 with a message when CUDA is absent.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import math
import signal
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

QUANT_BITS = dict(a_bits=4, w_bits=4, grad_bits=4, groups=4)
SUMMARY: list = []
PROFILE = False     # --profile
_MEASURED: dict = {}


def bench(fns: dict, reps: int, cuda_graph: bool = False) -> dict:
    """Median time (ms) of each callable, rounds interleaved so clock and thermal drift hit all.

    ``cuda_graph``: time replays of a CUDA graph of the callable (``do_bench_cudagraph``),
    which leaves out the host's launch cost: what the kernels themselves take."""
    import triton.testing
    times = {name: [] for name in fns}
    for fn in fns.values():      # warm up: compile, autotune, allocate
        fn()
    torch.cuda.synchronize()
    for _ in range(reps):
        for name, fn in fns.items():
            if cuda_graph:
                ms = triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median")
            else:
                ms = triton.testing.do_bench(fn, warmup=5, rep=40, return_mode="median")
            times[name].append(ms)
    return {name: statistics.median(ts) for name, ts in times.items()}


def profile(name: str, fn, steps: int = 3, rows: int = 14) -> None:
    """Where the device time of ``fn`` goes: the top kernels over ``steps`` calls, the device
    time per call against the wall time per call (their gap is host-bound idle time)."""
    try:
        _profile(name, fn, steps, rows)
    except Exception as e:   # a profiler problem must not cost the measurements
        print(f"  profile {name}: FAILED ({type(e).__name__}: {e})")


def _profile(name: str, fn, steps: int, rows: int) -> None:
    from torch.profiler import ProfilerActivity
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / steps * 1e3
    events = prof.key_averages()
    attr = "device_time_total" if hasattr(events[0], "device_time_total") else "cuda_time_total"
    kernels = [e for e in events if getattr(e, attr) > 0 and e.device_type == torch.autograd.DeviceType.CUDA]
    device = sum(getattr(e, attr) for e in kernels) / steps / 1e3
    launches = sum(e.count for e in kernels) / steps
    print(f"\n  profile {name}: wall {wall:.2f} ms per call, kernels {device:.2f} ms per call, "
          f"{launches:.0f} kernel launches per call")
    for e in sorted(kernels, key=lambda e: -getattr(e, attr))[:rows]:
        print(f"    {getattr(e, attr) / steps / 1e3:8.3f} ms  x{e.count // steps:<4d} {e.key[:100]}")
    # Launched from Python (not replayed), each sqcompile op's device time, by input shapes:
    # which GEMM region or quantizer of the step is slow (the table above lumps them by kernel)
    ours = [e for e in prof.key_averages(group_by_input_shape=True)
            if e.key.startswith("sqcompile::") and getattr(e, attr) > 0]
    if ours:
        print("    -- sqcompile ops by input shapes (device time, kernels launched inside included)")
    for e in sorted(ours, key=lambda e: -getattr(e, attr))[:rows]:
        shapes = " ".join("x".join(map(str, sh)) for sh in e.input_shapes if sh)[:70]
        print(f"    {getattr(e, attr) / steps / 1e3:8.3f} ms  x{e.count // steps:<4d} {e.key[11:]:28s} {shapes}")


def print_autotuned(label: str) -> None:
    """What the autotuners chose so far, per kernel and problem key (shapes, and strides
    where they are part of the key): the plain GEMM, each generated region kernel (by its
    epilogue's ops), the fused attention's kernels.  The tiles in ``CUDA_CONFIGS``,
    ``region_configs`` and ``GPU_TILES`` were chosen from compile-time counts, so which win
    on the device is what the next change needs."""
    from sqcompile.kernels import triton_attention, triton_fused, triton_gemm
    tuners = [("gemm", triton_gemm._gemm)]
    for k in triton_fused._CACHE.values():
        tuners.append(("region " + "+".join(op[0] for op in k.epilogue.ops) +
                       ("+ranges" if k.epilogue.ranges else "") + ("+sum" if k.epilogue.sums else ""), k.fn))
    tuners += [(f"attention {name}{' wide' if wide else ''}", triton_attention._tuned(name, wide))
               for name in triton_attention.GPU_TILES for wide in (False, True)]
    print(f"  autotuned ({label}):")
    for name, tuner in tuners:
        for key, config in getattr(tuner, "cache", {}).items():
            print(f"    {name} {tuple(key[:7])}: {config}")


def record(part: str, what: str, value: str) -> None:
    SUMMARY.append((part, what, value))
    print(f"  {what:58s} {value}", flush=True)


# ---------------------------------------------------------------------------------------------
# 1. Linear forward+backward and the pure GEMM
# ---------------------------------------------------------------------------------------------

def part_linear(reps: int) -> None:
    from sqcompile import ops
    print("\n[1] Linear forward+backward: ours (integer, triton kernels) vs bf16 F.linear", flush=True)
    for M, K, N in [(4096, 4096, 4096), (8192, 8192, 8192)]:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = (torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / math.sqrt(K)).requires_grad_()
        dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)

        def ours_fwd():
            return ops.quantized_linear(x, w, None, integer=True, kernels="triton", **QUANT_BITS)

        def ours_step():
            return torch.autograd.grad(ours_fwd(), (x, w), dy)

        def bf16_step():
            return torch.autograd.grad(F.linear(x, w), (x, w), dy)

        with torch.no_grad():
            t = bench({"ours_fwd": ours_fwd, "bf16_fwd": lambda: F.linear(x, w)}, reps)
        t.update(bench({"ours": ours_step, "bf16": bf16_step}, reps))
        if PROFILE and M == 8192:
            profile(f"linear fwd+bwd {M}x{K}x{N} (ours)", ours_step)
        flops = 2 * M * N * K
        shape = f"{M}x{K}x{N}"
        record("1 linear", f"fwd      {shape}: ours {t['ours_fwd']:.3f} ms, bf16 {t['bf16_fwd']:.3f} ms",
               f"{t['bf16_fwd'] / t['ours_fwd']:.2f}x")
        record("1 linear", f"fwd+bwd  {shape}: ours {t['ours']:.3f} ms, bf16 {t['bf16']:.3f} ms "
               f"({3 * flops / t['bf16'] / 1e9:.0f} TFLOP/s)", f"{t['bf16'] / t['ours']:.2f}x")

    print("\n[1] Pure GEMM 8192^3: int8 Triton vs bf16 torch.matmul", flush=True)
    from sqcompile.kernels import triton_gemm
    n = 8192
    a8 = torch.randint(-127, 128, (n, n), dtype=torch.int8, device="cuda")
    b8_kmajor = torch.randint(-127, 128, (n, n), dtype=torch.int8, device="cuda").t()   # [K, N], K contiguous
    b8_nmajor = torch.randint(-127, 128, (n, n), dtype=torch.int8, device="cuda")       # [K, N], N contiguous
    sa = torch.rand(n, 1, device="cuda")
    sb = torch.rand(1, n, device="cuda")
    a16 = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b16 = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    fns = {
        "bf16 torch.matmul": lambda: a16 @ b16,
        "int8 triton (B K-major)": lambda: triton_gemm.int8_mm(a8, b8_kmajor),
        "int8 triton (B N-major: K-major copy + GEMM)": lambda: triton_gemm.int8_mm(a8, b8_nmajor),
        "int8 triton scaled -> bf16 (B K-major)": lambda: triton_gemm.scaled_int8_mm(a8, sa, b8_kmajor, sb,
                                                                                     out_dtype=torch.bfloat16),
        "int8 cuBLAS torch._int_mm (B K-major)": lambda: torch._int_mm(a8, b8_kmajor),
    }
    t = bench(fns, reps)
    flops = 2 * n ** 3
    ref = t["bf16 torch.matmul"]
    for name, ms in t.items():
        record("1 gemm", f"{name}: {ms:.3f} ms, {flops / ms / 1e9:.0f} TFLOP/s", f"{ref / ms:.2f}x bf16")
    print_autotuned("GEMM")


# ---------------------------------------------------------------------------------------------
# 2. Quantizer throughput
# ---------------------------------------------------------------------------------------------

def copy_bandwidth(reps: int, part: str = "2 quant") -> float:
    """GB/s of a device-to-device copy (bytes read + written) of 512 MiB, well past L2
    (measured once per run)."""
    if "copy" not in _MEASURED:
        src = torch.empty(2 ** 29, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        ms = bench({"copy": lambda: dst.copy_(src)}, reps)["copy"]
        _MEASURED["copy"] = 2 * src.numel() / ms / 1e6
        record(part, f"device-to-device copy (512 MiB): {ms:.3f} ms", f"{_MEASURED['copy']:.0f} GB/s")
    return _MEASURED["copy"]


def _with_pair_tile(block_m: int, block_n: int, fn, *args):
    """``fn(*args)`` with the ShiftQuant pair's transposed-store tile set to ``block_m x
    block_n`` (the tile it used before 32 x 128, for comparison on the device)."""
    from sqcompile.kernels import triton_quant as tq
    saved = tq._PAIR_TILES[True]
    tq._PAIR_TILES[True] = tq._Tile(block_m, block_n, 4)
    tq._pair_geometry.cache_clear()
    try:
        return fn(*args)
    finally:
        tq._PAIR_TILES[True] = saved
        tq._pair_geometry.cache_clear()


def part_quantizers(reps: int) -> None:
    print("\n[2] Quantizer throughput vs device-to-device copy", flush=True)
    bandwidth = copy_bandwidth(reps)

    M = N = 8192
    q_ = torch.ops.sqcompile.triton_quantize
    sq_ = torch.ops.sqcompile.triton_shiftquant
    cases = []
    pairs = []       # (pair label, two-quantizer label)
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(1, M, N, device="cuda", dtype=dtype)
        e = x.element_size()
        n = x.numel()
        w = torch.randn(N, M, device="cuda", dtype=dtype).t().unsqueeze(0)   # weight.t(): [1, K, N]
        name = str(dtype).replace("torch.", "")
        # (label, fn, essential bytes, traffic bytes)
        cases += [
            (f"quantize per-row nearest     [{name}]", lambda x=x: q_(x, 4, [0, 1], False), n * (e + 1) + M * 4, n * (e + 1)),
            (f"quantize per-row stochastic  [{name}]", lambda x=x: q_(x, 4, [0, 1], True), n * (e + 1) + M * 4, n * (e + 1)),
            (f"quantize per-col weight.t()  [{name}]", lambda w=w: q_(w, 4, [0, 2], False), n * (e + 1) + N * 4, n * (e + 1)),
            (f"quantize per-col N-contig    [{name}]", lambda x=x: q_(x, 4, [0, 2], False), n * (e + 1) + N * 4, n * (2 * e + 1)),
            (f"quantize per-tensor          [{name}]", lambda x=x: q_(x, 4, [], False), n * (e + 1), n * (2 * e + 1)),
            (f"shiftquant chan (b,n) stoch  [{name}]", lambda x=x: sq_(x, 4, 4, [0, 2], True), n * (e + 1), n * (2 * e + 1)),
            (f"shiftquant chan (b,m) stoch  [{name}]", lambda x=x: sq_(x, 4, 4, [0, 1], True), n * (e + 1), n * (2 * e + 1)),
        ]
        if dtype == torch.bfloat16:
            pair_, fused_ = torch.ops.sqcompile.triton_shiftquant_pair, torch.ops.sqcompile.triton_shiftquant_fused
            for shape in ((1, M, N), (128, 1024, 1024)):       # a Linear's dY; attention's dS
                g = torch.randn(shape, device="cuda", dtype=dtype)
                ng, tag = g.numel(), "x".join(map(str, shape))
                two = f"two shiftquants cols+rows^T [{name} {tag}]"
                one = f"shiftquant pair cols+rows^T [{name} {tag}]"
                pairs.append((one, two))
                cases += [   # both read the gradient, write two int8 results; two passes vs four
                    (two, lambda g=g: (sq_(g, 4, 4, [0, 2], True), fused_(g, None, 4, 4, [0, 1], True, None, True)),
                     ng * (e + 2), ng * (4 * e + 2)),
                    (one, lambda g=g: pair_(g, None, None, 4, 4, True, None, None, True), ng * (e + 2), ng * (2 * e + 2)),
                    (f"{one}, 64x64 tile", lambda g=g: _with_pair_tile(64, 64, pair_, g, None, None, 4, 4, True, None,
                                                                       None, True), ng * (e + 2), ng * (2 * e + 2)),
                    # grad_outer_scale's pair: three reads (outer maxima, quotient ranges, quantize)
                    (f"{one}, outer scales", lambda g=g: pair_(g, None, None, 4, 4, True, None, None, True, True),
                     ng * (e + 2), ng * (3 * e + 2)),
                ]
            cases += [
                (f"  torch ref: quantize per-row [{name}]",
                 lambda x=x: torch.ops.sqcompile.quantize(x, 4, [0, 1], False), n * (e + 1), n * (e + 1)),
                (f"  torch ref: shiftquant (b,n) [{name}]",
                 lambda x=x: torch.ops.sqcompile.shiftquant(x, 4, 4, [0, 2], True), n * (e + 1), n * (e + 1)),
            ]
    for cuda_graph in (False, True):
        how = "kernels (CUDA graph replay)" if cuda_graph else "launched from Python"
        print(f"  -- {how}")
        t = bench({label: fn for label, fn, _, _ in cases}, reps, cuda_graph=cuda_graph)
        for label, _, essential, traffic in cases:
            ms = t[label]
            gbs = essential / ms / 1e6
            extra = "" if traffic == essential else f", traffic {traffic / ms / 1e6 / bandwidth:.0%}"
            record("2 quant" + (" graph" if cuda_graph else ""), f"{label}: {ms:.3f} ms, {gbs:.0f} GB/s{extra}",
                   f"{gbs / bandwidth:.0%} of copy")
        for one, two in pairs:
            record("2 pair" + (" graph" if cuda_graph else ""), f"{one} vs two quantizers",
                   f"{t[two] / t[one]:.2f}x faster")


# ---------------------------------------------------------------------------------------------
# 3. Transformer block training step
# ---------------------------------------------------------------------------------------------

class Block(torch.nn.Module):
    def __init__(self, d: int = 1024, heads: int = 16):
        super().__init__()
        self.heads = heads
        self.ln1 = torch.nn.LayerNorm(d)
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.proj = torch.nn.Linear(d, d)
        self.ln2 = torch.nn.LayerNorm(d)
        self.fc1 = torch.nn.Linear(d, 4 * d)
        self.fc2 = torch.nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, D = x.shape
        h = self.heads
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, h, D // h).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, D)
        x = x + self.proj(y)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class _Timeout(Exception):
    pass


def fused_regions(model) -> str:
    """What region fusion did to a compiled model: regions per stage, distinct kernels."""
    from sqcompile.decisions import records_for
    regions = [r for rec in records_for(list(model.parameters())) for r in rec.regions]
    stages = {stage: sum(r.stage == stage for r in regions) for stage in ("forward", "backward")}
    return (f"{stages['forward']} forward + {stages['backward']} backward regions, "
            f"{len({r.kernel for r in regions})} generated kernels")


def part_block(reps: int, timeout_s: int, ablate_fusion: bool = False, float_attention: bool = False,
               unfused_attention: bool = False, launched: bool = False, d: int = 1024,
               dynamic: bool = False, outer_scale: bool = False) -> None:
    """One block width ``d`` (heads of 64 up to d 1024, of 128 above, as in Llama-7B's d 4096).
    The optional variants (``--ablate-fusion`` ...) run at ``d`` 1024 only, but attention in
    bf16 (``--float-attention``), which the README recommends on a GPU today, at every width."""
    heads = d // 64 if d <= 1024 else d // 128
    tag = "3 block" if d == 1024 else f"3 block{d}"
    print(f"\n[3] Transformer block training step (d {d}, {heads} heads, seq 1024, batch 8)", flush=True)
    if d != 1024:
        ablate_fusion = unfused_attention = launched = dynamic = outer_scale = False
    torch.manual_seed(0)
    base = Block(d, heads).cuda().bfloat16()
    x = torch.randn(8, 1024, d, device="cuda", dtype=torch.bfloat16)

    def step_fn(model):
        params = list(model.parameters())

        def step():
            loss = model(x).float().square().mean()
            loss.backward()
            for p in params:
                p.grad = None
        return step

    def shiftquant(m, cudagraphs=False, dynamic=None, **options):
        return torch.compile(m, backend="shiftquant", dynamic=dynamic,
                             options={"kernels": "triton", "execution": "integer", "cudagraphs": cudagraphs, **options})

    fns = {}
    variants = [("bf16 Inductor", lambda m: torch.compile(m), True),
                ("bf16 Inductor, CUDA graphs", lambda m: torch.compile(m, mode="reduce-overhead"), True),
                ("shiftquant integer/triton, CUDA graphs", lambda m: shiftquant(m, cudagraphs=True), True)]
    if launched:   # host-bound (0.15x bf16 on 2026-11-28); one more compile
        variants.append(("shiftquant integer/triton", shiftquant, True))
    if ablate_fusion:   # region fusion off: GEMMs dequantize in their own epilogue, the rest is Inductor's
        variants.append(("shiftquant integer/triton, CUDA graphs, fusion off",
                         lambda m: shiftquant(m, cudagraphs=True, fusion=False), False))
    if float_attention:  # flash attention in bf16; the Linears stay int8
        variants.append(("shiftquant integer/triton, CUDA graphs, attention float",
                         lambda m: shiftquant(m, cudagraphs=True,
                                              overrides={"*:scaled_dot_product_attention": None}), True))
    if dynamic:  # symbolic sizes, as after a change of batch size: should time as the static graph
        variants.append(("shiftquant integer/triton, CUDA graphs, dynamic shapes",
                         lambda m: shiftquant(m, cudagraphs=True, dynamic=True), True))
    if unfused_attention:  # the quantized attention as separate quantizers, GEMMs and softmax
        variants.append(("shiftquant integer/triton, CUDA graphs, attention unfused",
                         lambda m: shiftquant(m, cudagraphs=True, fused_attention=False), True))
    if outer_scale:  # grad_outer_scale flipped: its cost (no region ranges, a third pass, the attention's 2nd range pass)
        from sqcompile.config import OpConfig
        flipped = not OpConfig().grad_outer_scale
        variants.append((f"shiftquant integer/triton, CUDA graphs, grad_outer_scale={flipped}",
                         lambda m: shiftquant(m, cudagraphs=True, grad_outer_scale=flipped), True))
    for name, make, fuse in variants:
        def on_alarm(signum, frame):
            raise _Timeout(f"compile + first step took more than {timeout_s} s")
        old = signal.signal(signal.SIGALRM, on_alarm)
        signal.alarm(timeout_s)
        try:
            t0 = time.perf_counter()
            model = copy.deepcopy(base)
            step = step_fn(make(model))
            for _ in range(3):      # CUDA graphs: warm-up, record, first replay
                step()
            torch.cuda.synchronize()
            record(tag, f"{name}: compile + first step {time.perf_counter() - t0:.1f} s", "ok")
            if name.startswith("shiftquant"):
                regions = fused_regions(model)
                # The 2026-11-28 ablation (a module flag flipped between compiles) still ran
                # fused kernels; the option is part of the backend's identity, so it cannot.
                if regions.startswith("0 forward + 0 backward") and fuse:
                    raise RuntimeError(f"not compiled by the backend ({regions}): Dynamo fell back to eager")
                ok = fuse or regions.startswith("0 forward + 0 backward")
                record(tag, f"{name}: {regions}", "info" if ok else "error: fusion was not off")
            if "CUDA graphs" in name:   # Inductor logs why it skips a graph; count them here
                from torch._dynamo.utils import counters
                record(tag, f"{name}: cudagraph skips so far: {counters['inductor']['cudagraph_skips']}",
                       "info")
            fns[name] = step
        except Exception as e:  # the backend is under construction: report and go on
            record(tag, f"{name}: FAILED ({type(e).__name__}: {str(e).splitlines()[0][:120]})", "error")
            traceback.print_exc(limit=6)
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
    if len(fns) < 2:
        return
    try:
        t = bench(fns, reps)
    except Exception as e:
        record(tag, f"timing FAILED ({type(e).__name__}: {e})", "error")
        return
    ref, ref_graphs = t["bf16 Inductor"], t.get("bf16 Inductor, CUDA graphs")
    for name, ms in t.items():
        vs_graphs = f", {ref_graphs / ms:.2f}x bf16 CUDA graphs" if ref_graphs else ""
        record(tag, f"{name}: {ms:.2f} ms per step", f"{ref / ms:.2f}x bf16{vs_graphs}")
    print_autotuned(f"block d={d}")
    if PROFILE:
        for name, fn in fns.items():
            profile(f"block d={d} {name}", fn)


# ---------------------------------------------------------------------------------------------
# 4. L1 norm forward+backward
# ---------------------------------------------------------------------------------------------

def part_norm(reps: int) -> None:
    """The block's LayerNorm shape, [8192, 1024] bf16, forward + backward: sqcompile's Triton L1
    norm (one kernel each way) against the same L1 norm as torch ops fused by Inductor (the
    ``kernels="torch"`` path on CUDA) and against bf16 ``nn.LayerNorm`` under Inductor; and
    the forward with its output quantized for a GEMM, fused in the norm kernel
    (``triton_l1_norm_quantized``) against the norm followed by ``triton_quantize``."""
    from sqcompile import norms
    print("\n[4] L1 norm [8192, 1024] bf16 forward+backward", flush=True)
    R, L = 8192, 1024
    x = torch.randn(R, L, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ln = torch.nn.LayerNorm(L).cuda().bfloat16()
    dy = torch.randn(R, L, device="cuda", dtype=torch.bfloat16)
    inductor_l1 = torch.compile(ln, backend="shiftquant", options={"kernels": "torch", "inner": "inductor"})
    inductor_l2 = torch.compile(ln)

    def step(forward):
        return lambda: torch.autograd.grad(forward(), (x, *ln.parameters()), dy, allow_unused=True)

    def triton_l1():
        return norms.l1_layer_norm(x, [L], ln.weight, ln.bias, eps=1e-3, norm_bits=8, kernels="triton")

    fns = {"triton L1": step(triton_l1), "inductor L1": step(lambda: inductor_l1(x)),
           "inductor L2 (nn.LayerNorm)": step(lambda: inductor_l2(x))}
    try:                       # the kernels alone, as in a captured training step
        t = bench(fns, reps, cuda_graph=True)
    except Exception as e:     # capture refused: time launches from Python instead
        record("4 norm", f"CUDA-graph timing failed ({type(e).__name__}); launched from Python", "info")
        t = bench(fns, reps)
    copy_gbs = copy_bandwidth(reps, "4 norm")
    essential = R * L * (2 + 2 + 1) * 2          # fwd: x, y, q; bwd: dy, q, dx (bytes)
    for name, ms in t.items():
        extra = f", {essential / ms / 1e6 / copy_gbs:.0%} of copy" if name == "triton L1" else ""
        record("4 norm", f"fwd+bwd {name}: {ms:.3f} ms{extra}", f"{t['inductor L1'] / ms:.2f}x inductor L1")

    norm_backward_sweep(x.detach(), ln.weight.detach(), ln.bias.detach(), dy, reps, copy_gbs)

    ops = torch.ops.sqcompile
    xd, w, b = x.detach(), ln.weight.detach(), ln.bias.detach()
    args = (xd, w, b, 8, True, 1.2533, 1e-3)
    t = bench({"norm + quantize": lambda: ops.triton_quantize(ops.triton_l1_norm(*args)[0], 4, [0], False),
               "norm with quantized output": lambda: ops.triton_l1_norm_quantized(*args, 4)}, reps, cuda_graph=True)
    for name, ms in t.items():
        record("4 norm", f"fwd {name}: {ms:.3f} ms", f"{t['norm + quantize'] / ms:.2f}x unfused")


def norm_backward_sweep(x, weight, bias, dy, reps: int, copy_gbs: float) -> None:
    """The L1 norm's backward kernel alone (weight and bias gradients), over its launch
    geometry: values per thread (``BACKWARD_PER_THREAD``, which sets the warps) and programs
    per SM (``BACKWARD_PROGRAMS_PER_SM``: beyond it, programs loop over row blocks)."""
    from sqcompile.kernels import triton_norm as tn
    R, L = x.shape
    _, q, scale, mean, inv = tn.l1_norm(x, weight, bias, 8, True, 1.2533, 1e-3)
    default = (tn.BACKWARD_PER_THREAD, tn.BACKWARD_PROGRAMS_PER_SM)

    def backward(per_thread, per_sm):
        def run():
            tn.BACKWARD_PER_THREAD, tn.BACKWARD_PROGRAMS_PER_SM = per_thread, per_sm
            try:
                return tn.l1_norm_backward(dy, q, scale, mean, inv, weight, 4, True, 1.2533, True, True)
            finally:
                tn.BACKWARD_PER_THREAD, tn.BACKWARD_PROGRAMS_PER_SM = default
        return run

    configs = {f"{per_thread} per thread, <= {per_sm} programs/SM": backward(per_thread, per_sm)
               for per_thread in (4, 8, 16) for per_sm in (4, 16)}
    t = bench(configs, reps, cuda_graph=True)
    essential = R * L * (2 + 1 + 2)              # dy, q, dx (bytes)
    ref = t[f"{default[0]} per thread, <= {default[1]} programs/SM"]
    for name, ms in t.items():
        record("4 norm bwd", f"{name}: {ms:.3f} ms, {essential / ms / 1e6 / copy_gbs:.0%} of copy",
               f"{ref / ms:.2f}x default")


# ---------------------------------------------------------------------------------------------
# 5. Attention forward+backward
# ---------------------------------------------------------------------------------------------

def part_attention(reps: int) -> None:
    """[8, 16, 1024, 64] bf16, causal, forward + backward as in the block: the fused integer
    attention, the same quantized attention as separate ops, and bf16 flash attention."""
    from sqcompile import ops
    print("\n[5] Attention [8, 16, 1024, 64] bf16 causal forward+backward", flush=True)
    q, k, v = (torch.randn(8, 16, 1024, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    do = torch.randn_like(q)
    bits = dict(act_bits=4, p_bits=5, grad_bits=4, groups=4, integer=True, kernels="triton")   # P unsigned, as models run it

    def step(attend):
        return lambda: torch.autograd.grad(attend(), (q, k, v), do)

    fns = {"bf16 flash (F.scaled_dot_product_attention)":
               step(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
           "int8 fused": step(lambda: ops.quantized_sdpa(q, k, v, is_causal=True, fused=True, **bits)),
           "int8 unfused": step(lambda: ops.quantized_sdpa(q, k, v, is_causal=True, fused=False, **bits))}
    try:                       # the kernels alone, as in a captured training step
        t = bench(fns, reps, cuda_graph=True)
    except Exception as e:     # capture refused: time launches from Python instead
        record("5 attn", f"CUDA-graph timing failed ({type(e).__name__}); launched from Python", "info")
        t = bench(fns, reps)
    flash = t["bf16 flash (F.scaled_dot_product_attention)"]
    for name, ms in t.items():
        record("5 attn", f"fwd+bwd {name}: {ms:.3f} ms",
               f"{flash / ms:.2f}x bf16 flash, {t['int8 unfused'] / ms:.2f}x unfused")
    print_autotuned("attention")
    if PROFILE:
        profile("attention int8 fused", fns["int8 fused"], rows=8)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="1,2,3,4,5", help="comma-separated parts to run (1, 2, 3, 4, 5)")
    parser.add_argument("--reps", type=int, default=5, help="interleaved rounds per measurement")
    parser.add_argument("--block-timeout", type=int, default=150, help="seconds allowed for each compile in part 3")
    parser.add_argument("--block-dims", default="1024",
                        help="comma-separated model widths for part 3 (1024: 16 heads of 64; wider: heads of 128, "
                             "e.g. 4096 as in Llama-7B), each after the one before")
    parser.add_argument("--ablate-fusion", action="store_true",
                        help="part 3 also times the captured shiftquant block with region fusion off "
                             "(options={'fusion': False}: one more compile)")
    parser.add_argument("--float-attention", action="store_true",
                        help="part 3 also times the captured shiftquant block with attention in bf16 (flash "
                             "attention; the Linears stay int8)")
    parser.add_argument("--launched", action="store_true",
                        help="part 3 also times the shiftquant block without CUDA graphs (host-bound; one more compile)")
    parser.add_argument("--unfused-attention", action="store_true",
                        help="part 3 also times the captured shiftquant block with the quantized attention as "
                             "separate ops (fused_attention=False)")
    parser.add_argument("--dynamic", action="store_true",
                        help="part 3 also times the captured shiftquant block compiled with dynamic=True")
    parser.add_argument("--outer-scale", action="store_true",
                        help="part 3 also times the captured shiftquant block with grad_outer_scale the other "
                             "way than its default (its outer maxima: one more pass per ShiftQuant pair, one "
                             "more in the fused attention's backward)")
    parser.add_argument("--profile", action="store_true",
                        help="also print where the device time goes (torch.profiler) for the 8192 linear and "
                             "each block variant")
    args = parser.parse_args()
    global PROFILE
    PROFILE = args.profile
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py: CUDA is not available on this machine; nothing to measure.")
        return 0
    import triton

    import sqcompile  # noqa: F401  (registers the ops, the kernels and the backend)

    # Part 3 compiles the same Block.forward once per variant and width; past Dynamo's
    # recompile limit (8) it runs the code *uncompiled* (as happened at d 4096 on 2026-11-30,
    # timed as if it were ours), so allow every variant its own entry.
    torch._dynamo.config.recompile_limit = 64

    parts = {p.strip() for p in args.parts.split(",")}
    started = time.perf_counter()
    # the block (part 3, several compiles) runs last, so a time limit costs the fewest figures
    for key, run in [("1", lambda: part_linear(args.reps)), ("2", lambda: part_quantizers(args.reps)),
                     ("4", lambda: part_norm(args.reps)), ("5", lambda: part_attention(args.reps)),
                     ("3", lambda: [part_block(args.reps, args.block_timeout, args.ablate_fusion, args.float_attention,
                                               args.unfused_attention, args.launched, int(d), args.dynamic,
                                               args.outer_scale)
                                    for d in args.block_dims.split(",")])]:
        if key not in parts:
            continue
        try:
            run()
        except Exception as e:
            record(f"{key} ERROR", f"{type(e).__name__}: {str(e).splitlines()[0][:150]}", "error")
            traceback.print_exc()
        torch.cuda.empty_cache()

    print("\n" + "=" * 100)
    print(f"sqcompile GPU benchmark  {datetime.datetime.now().isoformat(timespec='seconds')}  "
          f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
          f"({time.perf_counter() - started:.0f} s)")
    print(f"quantization: {QUANT_BITS}; ratios > 1 mean ours is faster")
    print("-" * 100)
    for part, what, value in SUMMARY:
        print(f"{part:9s} {what:76s} {value}")
    print("=" * 100)
    return 0


if __name__ == "__main__":
    sys.exit(main())
