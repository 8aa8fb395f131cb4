"""CPU integer convolutions: fp32 ``conv2d`` (and its weight gradient) against the int8 im2col
GEMM and sqcompile's implicit-GEMM convolutions (``sqcompile::int8_conv``,
``sqcompile::int8_conv_weight``: no im2col columns) on the AMX tiles or, without AMX, on the
VNNI or the AVX2 build of our other kernel (``--gemm`` chooses), interleaved in one process,
medians and ratios against fp32 (the im2col GEMM runs on the engine ``auto`` takes for plain
GEMMs: oneDNN's ``_int_mm`` on a VNNI CPU without AMX).  Eager calls on int8 operands, so it times the ops themselves, not a compiled step
(``train_step.py --models unet resnet18 --no-implicit-conv`` does that).

Default shapes: 3x3 convs at padding 1 of the U-Net of ``train_step.py`` (batch 16, 64x64
images, 32-64 channels) and of the ResNet-18 there (batch 32, 32x32 down to 4x4).

    python benchmarks/cpu_conv.py --threads 1 --cpu-time
    python benchmarks/cpu_conv.py --shapes 16,64,64,32 32,512,4,512   # N,C,H,Cout (3x3, square)
    python benchmarks/cpu_conv.py --gemm avx2       # the AVX2 kernel's implicit GEMMs on an AMX CPU
    python benchmarks/cpu_conv.py --gemm vnni       # its VNNI build's (AVX-512 VNNI)
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from tabulate import tabulate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import add_threads_argument, interleaved, median_ms, median_ratio, start  # noqa: E402
from sqcompile import ops  # noqa: E402
from sqcompile.kernels import amx, avx2  # noqa: E402

SHAPES = ["16,1,64,32", "16,32,64,32", "16,64,64,32", "16,128,32,64",
          "32,64,32,64", "32,128,16,128", "32,256,8,256", "32,512,4,512"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="*", default=SHAPES, help="N,C,H,Cout: 3x3 convs at padding 1 on HxH")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--gemm", choices=["auto", *amx.CONV_KERNELS], default="auto",
                   help="kernel of the implicit GEMMs (auto: AMX where usable, else VNNI, else AVX2)")
    add_threads_argument(p)
    args = p.parse_args(argv)
    start("cpu_conv.py", args, argv)
    usable = {"amx": amx.status(), "vnni": avx2.status("vnni"), "avx2": avx2.status()}
    gemm = args.gemm if args.gemm != "auto" else next((k for k in usable if usable[k][0]), "avx2")
    if not usable[gemm][0]:
        print(f"{gemm.upper()} kernel not usable here ({usable[gemm][1]}): nothing to compare")
        return
    print(f"implicit GEMMs on the {gemm.upper()} kernel")
    rows = []
    for spec in args.shapes:
        n, c, h, cout = (int(v) for v in spec.split(","))
        # 4-bit values, gradients as ShiftQuant expands them (the AVX2 kernel's time depends on them)
        x = torch.randint(-7, 8, (n, c, h, h), dtype=torch.int8).contiguous(memory_format=torch.channels_last)
        w = torch.randint(-7, 8, (cout, c, 3, 3), dtype=torch.int8)
        e = torch.randint(-56, 57, (n, cout, h, h), dtype=torch.int8).contiguous(memory_format=torch.channels_last)
        xf, wf, ef = x.float(), w.float(), e.float()
        pad, dil = [1, 1], [1, 1]
        assert torch.equal(amx.int8_conv(x, w, pad, dil, gemm=gemm), ops.im2col_int8_conv(x, w, pad, dil)), spec
        assert torch.equal(amx.int8_conv_weight(e, x, [3, 3], pad, dil, gemm=gemm),
                           ops.im2col_int8_conv_weight(e, x, [3, 3], pad, dil)), spec
        forward = {"fp32 conv2d": lambda: torch.nn.functional.conv2d(xf, wf, padding=1),
                   "int8 im2col GEMM": lambda: ops.im2col_int8_conv(x, w, pad, dil),
                   "int8 implicit GEMM": lambda: amx.int8_conv(x, w, pad, dil, gemm=gemm)}
        weight = {"fp32 conv2d": lambda: torch.ops.aten.convolution_backward(
                      ef, xf, wf, None, [1, 1], pad, dil, False, [0, 0], 1, [False, True, False]),
                  "int8 im2col GEMM": lambda: ops.im2col_int8_conv_weight(e, x, [3, 3], pad, dil),
                  "int8 implicit GEMM": lambda: amx.int8_conv_weight(e, x, [3, 3], pad, dil, gemm=gemm)}
        for what, runs in (("forward", forward), ("weight gradient", weight)):
            times = interleaved(runs, rounds=args.rounds, warmup=1)
            rows.append([f"N{n} C{c} {h}x{h} -> {cout}", what,
                         *(f"{median_ms(times[k]):.2f} ms ({median_ratio(times, 'fp32 conv2d', k):.2f}x)"
                           for k in runs)])
            print(tabulate(rows[-1:], tablefmt="github"), flush=True)
    print()
    print(tabulate(rows, headers=["conv 3x3", "", *forward], tablefmt="github"))


if __name__ == "__main__":
    main()
