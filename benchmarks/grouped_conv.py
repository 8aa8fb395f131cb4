"""CPU depthwise convolutions: sqcompile's integer kernels (``sqcompile::int8_grouped_conv``,
``int8_grouped_conv_input_grad``, ``int8_grouped_conv_weight`` on int8 operands, NCHW)
against PyTorch's fp32 depthwise conv on NCHW operands (what an NCHW model runs) and on
channels-last ones, forward and each gradient, interleaved in one process; medians and
ratios against fp32 NCHW.  Eager calls, so it times the ops, not a compiled step
(``train_step.py --models mobilenet_v2 --grouped-simulated`` does that).

Default shapes: the depthwise 3x3 convs of ``train_step.py``'s MobileNetV2 (batch 32, 32x32
inputs), stride 1 and 2.

    python benchmarks/grouped_conv.py --threads 1 --cpu-time
    python benchmarks/grouped_conv.py --shapes 32,144,32,1 32,576,8,2    # N,C,H,stride (3x3, square)
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

SHAPES = ["32,96,32,1", "32,144,32,1", "32,144,32,2", "32,192,16,1", "32,384,8,1", "32,576,8,2", "32,960,4,1"]


def candidates(n, c, h, stride):
    g = torch.Generator().manual_seed(0)
    s, p, d = [stride] * 2, [1, 1], [1, 1]
    qx = torch.randint(-8, 8, (n, c, h, h), generator=g, dtype=torch.int8)
    qw = torch.randint(-8, 8, (c, 1, 3, 3), generator=g, dtype=torch.int8)
    y = ops.int8_grouped_conv(qx, qw, s, p, d, c)
    qe = torch.randint(-8, 8, y.shape, generator=g, dtype=torch.int8)
    x, w, dy = qx.float(), qw.float(), qe.float()
    xc, dyc = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
    # small integers: fp32's sums are exact, so the kernels must give them (a check, not a test)
    want = torch.ops.aten.convolution_backward(dy, x, w, None, s, p, d, False, [0, 0], c, [True, True, False])
    got = (ops.int8_grouped_conv_input_grad(qe, qw, list(qx.shape), s, p, d, c),
           ops.int8_grouped_conv_weight(qe, qx, [3, 3], s, p, d, c))
    if not (torch.equal(y.float(), torch.ops.aten.convolution(x, w, None, s, p, d, False, [0, 0], c))
            and torch.equal(got[0].float(), want[0]) and torch.equal(got[1].float(), want[1])):
        raise AssertionError(f"the int8 kernels disagree with fp32 on [{n}, {c}, {h}, {h}] stride {stride}")

    def fp32(x, dy, part):
        if part == "forward":
            return lambda: torch.ops.aten.convolution(x, w, None, s, p, d, False, [0, 0], c)
        mask = [part == "input grad", part == "weight grad", False]
        return lambda: torch.ops.aten.convolution_backward(dy, x, w, None, s, p, d, False, [0, 0], c, mask)

    ours = {"forward": lambda: ops.int8_grouped_conv(qx, qw, s, p, d, c),
            "input grad": lambda: ops.int8_grouped_conv_input_grad(qe, qw, list(qx.shape), s, p, d, c),
            "weight grad": lambda: ops.int8_grouped_conv_weight(qe, qx, [3, 3], s, p, d, c)}
    return {part: {"fp32 NCHW": fp32(x, dy, part), "fp32 channels-last": fp32(xc, dyc, part), "int8 (ours)": fn}
            for part, fn in ours.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="*", default=SHAPES, help="N,C,H,stride: depthwise 3x3 convs at padding 1 on HxH")
    p.add_argument("--rounds", type=int, default=7)
    add_threads_argument(p)
    args = p.parse_args(argv)
    start("grouped_conv.py", args, argv)
    rows = []
    for spec in args.shapes:
        n, c, h, stride = (int(v) for v in spec.split(","))
        for part, runs in candidates(n, c, h, stride).items():
            times = interleaved(runs, rounds=args.rounds, warmup=2)
            base = "fp32 NCHW"
            rows.append([f"[{n}, {c}, {h}, {h}] s{stride}", part,
                         *[f"{median_ms(times[k]):.2f}" for k in runs],
                         *[f"{median_ratio(times, base, k):.2f}x" for k in list(runs)[1:]]])
            print(tabulate(rows[-1:], tablefmt="github"), flush=True)
    print()
    print(tabulate(rows, headers=["input", "part", "fp32 NCHW ms", "fp32 channels-last ms", "int8 ms",
                                  "channels-last vs NCHW", "int8 vs NCHW"], tablefmt="github"))


if __name__ == "__main__":
    main()
