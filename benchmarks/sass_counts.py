"""Instruction counts of sqcompile's hot Triton kernels compiled for Hopper (sm_90), no GPU needed.

    python benchmarks/sass_counts.py                 # every kernel listed below
    python benchmarks/sass_counts.py --only quant    # those whose name contains "quant"

A session without a GPU can still see what a kernel change does to the code a GPU would run:
each kernel is compiled as a real launch specializes it (``tests/sm90.py``: unit strides as
constants, 16-divisible pointers and sizes), disassembled with the ``cuobjdump`` Triton ships,
and counted.  Columns: SASS instructions in all; per element of the program's tile, for the
elementwise kernels and the region kernels, whose epilogue runs once per output value (a
static count, the prologue included: a loop body counts once, so for the int8 GEMM only the
totals compare); for the fused attention, each loop body (``tests/sm90.py:sass_loops``) per
score of the tile an iteration covers, so per score and pass: the forward's two passes
(interior tiles, then edge tiles, each), the ranges kernel's two, then ``dK``/``dV``'s and
``dQ``'s one; ``MUFU`` (the special-function unit: exp,
reciprocal, ...; 16 per clock per SM on Hopper, an eighth of the FP32 rate); ``CALL`` (slow
paths, e.g. of an IEEE division); spilled bytes per thread (``ptxas -v``).

This is a proxy, not a timing.  For scale: a kernel that streams a bf16 tensor at the H200's
~4.3 TB/s, reading 2 and writing 1 byte per element, has about 128 / 6.1 = 21 instruction
issues per element per SM to spend (128 lanes per clock, 1.6e12 elements/s over 132 SMs at
1.98 GHz); above that it is instruction-bound, whatever its memory traffic.  Whether a kernel
is, ``benchmarks/gpu.py`` part 2 measures.
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
os.environ.pop("TRITON_INTERPRET", None)      # compile for the GPU, never interpret


def _cases():
    """name -> (kernel, signature, constexprs, num_warps, num_stages, elements per program or 0
    [, "region": compiled without FMA contraction, as launched | "loops": the per-element
    column counts each loop body per element of the tile one iteration covers])."""
    import sm90
    import torch
    from sqcompile.kernels import triton_attention as ta
    from sqcompile.kernels import triton_gemm as tg
    from sqcompile.kernels import triton_norm as tn
    from sqcompile.kernels import triton_quant as tq

    sig = sm90.SIGNATURES
    cases = {}
    for st in (False, True):
        cases[f"quantize per-row bf16, {'stochastic' if st else 'nearest'}"] = (
            tq._quantize_fused_kernel, sig["quantize_fused"],
            dict(stride_l=1, QMAX=7, STOCHASTIC=st, NOISE_ALONG_C=False, INT64=False, BLOCK_C=2, BLOCK_L=2048,
                 ONE_TILE=True, **sm90.QUANT_LAYOUT_CONSTANTS),
            4, 3, 2 * 2048)
    # channels contiguous (a gradient's columns): the split kernel's 128 x 32 tile
    cases["quantize per-column bf16, stochastic, channels contiguous"] = (
        tq._quantize_kernel, {**sig["quantize_fused"], "range_ptr": "*fp32", "stride_l": "i32", "n_cblocks": "i32"},
        dict(stride_c=1, QMAX=7, A_KEPT=True, STOCHASTIC=True, NOISE_ALONG_C=True, INT64=False, BLOCK_C=128,
             BLOCK_L=32, **sm90.QUANT_LAYOUT_CONSTANTS),
        4, 3, 128 * 32)
    for along_c in (False, True):
        unit = "stride_c" if along_c else "stride_l"
        cases[f"shiftquant {'columns' if along_c else 'rows'} bf16, stochastic"] = (
            tq._shiftquant_kernel,
            {**sig["shiftquant"], "stride_l": "i32", "out_stride_c": "i32", "out_stride_l": "i32"},
            {unit: 1, "out_" + unit: 1, "QMAX": 7, "GROUPS": 4, "A_KEPT": False, "STOCHASTIC": True,
             "NOISE_ALONG_C": along_c, "PRESCALE": True, "INT64": False,
             "BLOCK_C": 128 if along_c else 2, "BLOCK_L": 32 if along_c else 2048},
            4, 3, 4096)
    for (transposed, t), outer in [*zip(tq._PAIR_TILES.items(), (False, False)), ((True, tq._PAIR_TILES[True]), True)]:
        runtime, unit = ("er_stride_n", "er_stride_m") if transposed else ("er_stride_m", "er_stride_n")
        cases[f"shiftquant pair bf16, stochastic{', rows transposed' if transposed else ''}"
              f"{', outer scales' if outer else ''}"] = (
            tq._shiftquant_pair_kernel, {**sig["shiftquant_pair"], runtime: "i32"},
            {unit: 1, "stride_n": 1, "QMAX": 7, "GROUPS": 4, "STOCHASTIC": True, "COLUMNS_NOISE_ALONG_N": True,
             "PRESCALE_C": True, "PRESCALE_R": True, "INT64": False, "BLOCK_M": t.block_c, "BLOCK_N": t.block_l,
             **sm90.QUANT_LAYOUT_CONSTANTS, **dict(sm90.PAIR_CONSTANTS, OUTER=outer)},
            t.num_warps, 3, t.block_c * t.block_l)
    # ShiftQuant's range passes (a loop over the reduced axis: its body once, per element of a step)
    cases["shiftquant range pass, rows bf16"] = (
        tq._absmax_kernel, {"x_ptr": "*bf16", "ranges_ptr": "*i32", "prescale_ptr": "*fp32", "C": "i32", "L": "i32",
                            "stride_a": "i32", "stride_c": "i32", "stride_a2": "i32", "l_per_split": "i32",
                            "n_channels": "i32"},
        dict(stride_l=1, A2=1, A_KEPT=True, PRESCALE=True, INT64=False, BLOCK_C=2, BLOCK_L=2048), 4, 3, 2 * 2048)
    bm, bn = tq._pair_geometry((1, 8192, 8192), torch.device("cpu"), False).range_block
    for outer, what in ((0, ""), (1, ", outer maxima"), (2, ", outer-scaled quotients")):
        cases[f"shiftquant pair range pass bf16 (both ways){what}"] = (
            tq._absmax_pair_kernel, sm90.PAIR_RANGE_SIGNATURE,
            dict(sm90.PAIR_RANGE_CONSTANTS, stride_n=1, A2=1, PRESCALE_C=True, PRESCALE_R=True, INT64=False,
                 BLOCK_M=bm, BLOCK_N=bn, OUTER=outer), tq.pair_range_warps(outer), 3, bm * bn)
    br, bl, w = tn._block(1024, 4096, tn.FORWARD_PER_THREAD)
    cases["L1 norm forward + output quantized, rows of 1024"] = (
        tn._l1_norm_kernel, sig["l1_norm"],
        dict(QMAX=127, OUT_QMAX=7, CENTER=True, HAS_W=True, HAS_B=True, OUT_Q=True, BLOCK_R=br, BLOCK_L=bl),
        w, 3, br * bl)
    br, bl, w = tn._block(1024, 2048, tn.BACKWARD_PER_THREAD)
    for res in (False, True):
        cases["L1 norm backward (gradient quantized), rows of 1024" + (", + residual, ranges, sum" if res else "")] = (
            tn._l1_norm_backward_kernel, sig["l1_norm_backward"],
            dict(GQMAX=127, CENTER=True, HAS_W=True, NEED_DW=True, NEED_DB=True, RESIDUAL=res, RANGES=res, SUMS=res,
                 BLOCK_R=br, BLOCK_L=bl), w, 3, br * bl)
    for c in tg.CUDA_CONFIGS[:1] + tg.CUDA_CONFIGS[5:6]:
        tile = "x".join(str(c.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        cases[f"int8 GEMM + dequant + bias, {tile}"] = (
            tg._int8_gemm_kernel, sig["int8_gemm"], dict(**sm90.GEMM_UNIT_STRIDES, SCALED=True, HAS_BIAS=True,
                                                         ACTIVATION="none", **c.kwargs),
            c.num_warps, c.num_stages, 0)
    # the generated region kernels of a transformer block (sm90.REGION_PROGRAMS) at 128 x 128
    # (8 warps: 64 accumulator values per thread), compiled as launched (no FMA contraction)
    from sqcompile.kernels import triton_fused as tf
    for name, (spec, _) in sm90.REGION_PROGRAMS.items():
        ep = tf.Epilogue(*spec)
        signature, unit = sm90.region_arguments(ep)
        c = tg.CUDA_CONFIGS[2]
        cases[f"region {name}, 128x128x128"] = (
            tf.kernel_for(ep.signature()).fn, signature, {**unit, **c.kwargs}, c.num_warps, c.num_stages,
            128 * 128, "region")
    # the fused attention at head dim 64, causal, the first candidate tiles (each loop body: per score)
    for name, (kernel, signature, consts) in sm90.attention_kernels().items():
        if name in ("fwd", "ranges", "dkdv", "dq"):
            t = ta.GPU_TILES[name][0][0]
            cases[f"attention {name}, d 64, {t.block_m}x{t.block_n}"] = (
                kernel, signature, {**consts, "CAUSAL": True, "MASK": 0, "BLOCK_M": t.block_m, "BLOCK_N": t.block_n,
                                    "BLOCK_D": 64}, t.num_warps, t.num_stages, t.block_m * t.block_n, "loops")
    return cases


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="count only the kernels whose name contains this")
    args = parser.parse_args()
    import triton
    import sm90
    print(f"sm_90 SASS of sqcompile's Triton kernels (Triton {triton.__version__}; static counts)\n")
    print(f"| {'kernel':58s} | instructions | per element       | MUFU | CALL | spilled B |")
    print(f"|{'-' * 60}|--------------|-------------------|------|------|-----------|")
    for name, (fn, sig, consts, warps, stages, elements, *kind) in _cases().items():
        if args.only not in name:
            continue
        out = sm90.compile_sm90(fn, sig, consts, num_warps=warps, num_stages=stages, fp_fusion=kind != ["region"])
        counts = sm90.sass_counts(out["cubin"])
        n = counts.get("instructions", 0)
        per_thread = elements / (32 * warps)
        if kind == ["loops"]:
            per = " / ".join(f"{k / per_thread:.0f}" for k in sm90.sass_loops(out["cubin"])) or "-"
        else:
            per = f"{n / per_thread:.1f}" if elements else "-"
        print(f"| {name:58s} | {n:12d} | {per:>17s} | {counts.get('MUFU', 0):4d} | {counts.get('CALL', 0):4d} "
              f"| {out['spilled']:9d} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
