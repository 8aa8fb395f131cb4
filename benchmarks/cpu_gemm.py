"""The CPU int8 GEMM engines on the products a training step makes: fp32 ``torch.matmul``
against oneDNN's ``torch._int_mm``, sqcompile's AMX kernel (``sqcompile.kernels.amx``), its
AVX2 kernel (``sqcompile.kernels.avx2``: CPUs with neither AMX nor VNNI) and its VNNI build
(``variant="vnni"``: AVX-512 VNNI, the convolutions' engine there) and the float engine
(``sqcompile.kernels.cpu.float_int8_mm``: exact int8 products as float32 GEMMs), interleaved
in one process, medians and ratios against fp32.  Kernels the CPU cannot run are left out.

Default shapes: the transformer of ``train_step.py`` (16 x 256 tokens, d_model 512, 8 heads):
each Linear's forward (``x @ W^T``), input gradient (``g @ W``) and weight gradient
(``g^T @ x``, the reduction over tokens, operands in the layouts the backward hands over),
and attention's two batched products over 128 heads.  Values as at 4 bits: activations and
weights in [-8, 8), gradients (ShiftQuant's expanded integers ``q << shift``) in [-56, 56]
(the AVX2 kernel's int16 sums depend on the magnitudes; the other engines' time does not).

    python benchmarks/cpu_gemm.py
    python benchmarks/cpu_gemm.py --threads 1 --rounds 9
    python benchmarks/cpu_gemm.py --shapes 4096,1024,1024 4096,4096,4096
    python benchmarks/cpu_gemm.py --no-onednn     # a CPU without VNNI: _int_mm takes ~35x fp32
"""
from __future__ import annotations

import argparse
import functools
import os
import sys

import torch
from tabulate import tabulate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import add_threads_argument, interleaved, median_ms, median_ratio, start  # noqa: E402
from sqcompile.kernels import amx, avx2, cpu  # noqa: E402

T = 16 * 256


def transformer_cases():
    """``(name, a, b)`` int8 operand pairs, laid out as the quantized layers hand them over."""
    def r(*shape, low=-8, high=8):
        return torch.randint(low, high, shape, dtype=torch.int8)

    cases = []
    for name, (k, n) in {"qkv": (512, 1536), "proj": (512, 512), "fc1": (512, 2048), "fc2": (2048, 512)}.items():
        x, w, g = r(T, k), r(n, k), r(T, n, low=-56, high=57)
        cases += [(f"{name} fwd x@W^T", x, w.t()), (f"{name} dX g@W", g, w), (f"{name} dW g^T@x", g.t(), x)]
    q, kk, v = r(16, 8, 256, 64), r(16, 8, 256, 64), r(16, 8, 256, 64)
    cases += [("attn QK^T (128 heads)", q, kk.transpose(-1, -2)),
              ("attn PV (128 heads)", r(16, 8, 256, 256), v)]
    return cases


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="*", default=None,
                   help="M,K,N products (row-major operands) instead of the transformer's")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--no-onednn", action="store_true",
                   help="leave oneDNN's _int_mm out (without VNNI it is too slow to time in full)")
    add_threads_argument(p)
    args = p.parse_args(argv)
    start("cpu_gemm.py", args, argv)
    ok, why = amx.status()
    if not ok:
        print(f"AMX kernel not usable here ({why}): it is not timed")
    builds = []
    for variant, (_, _, title) in avx2.VARIANTS.items():
        usable, why = avx2.status(variant)
        if usable:
            builds.append((variant, f"{title} kernel"))
        else:
            print(f"{title} kernel not usable here ({why}): it is not timed")
    if args.shapes:
        cases = []
        for s in args.shapes:
            M, K, N = (int(v) for v in s.split(","))
            cases.append((f"{M}x{K}x{N}", torch.randint(-8, 8, (M, K), dtype=torch.int8),
                          torch.randint(-8, 8, (K, N), dtype=torch.int8)))
    else:
        cases = transformer_cases()
    rows, total = [], {}
    for name, a, b in cases:
        af, bf = a.float(), b.float()
        runs = {"fp32 matmul": lambda: af @ bf, "float engine": lambda: cpu.float_int8_mm(a, b)}
        want = (a.double() @ b.double()).to(torch.int32)
        assert torch.equal(cpu.float_int8_mm(a, b), want), name
        if not args.no_onednn:
            runs["oneDNN _int_mm"] = lambda: cpu.onednn_int8_mm(a, b)
            assert torch.equal(cpu.onednn_int8_mm(a, b), want), name
        if ok:
            runs["AMX kernel"] = lambda: amx.int8_mm(a, b)
            assert torch.equal(amx.int8_mm(a, b), want), name
        for variant, label in builds:
            runs[label] = functools.partial(avx2.int8_mm, a, b, variant)
            assert torch.equal(avx2.int8_mm(a, b, variant), want), name
        times = interleaved(runs, rounds=args.rounds, warmup=1)
        for label in runs:
            total[label] = total.get(label, 0.0) + median_ms(times[label])
        rows.append([name, *(f"{median_ms(times[k]):.2f} ms ({median_ratio(times, 'fp32 matmul', k):.2f}x)"
                             for k in runs)])
        print(tabulate(rows[-1:], tablefmt="github"), flush=True)
    rows.append(["sum of medians", *(f"{total[k]:.1f} ms ({total['fp32 matmul'] / total[k]:.2f}x)" for k in total)])
    print()
    print(tabulate(rows, headers=["product", *total], tablefmt="github"))


if __name__ == "__main__":
    main()
