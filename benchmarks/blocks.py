"""Where the CPU transformer step gains and loses: its attention and its MLP timed apart,
forward + backward, fp32 eager against the shiftquant backend, interleaved in one process.

The shapes are one layer of ``benchmarks/train_step.py``'s transformer (batch 16, seq 256,
d_model 512, 8 heads):

* ``attention``: causal ``F.scaled_dot_product_attention`` on ``[16, 8, 256, 64]`` q, k, v.
  fp32 eager is PyTorch's fused (flash) CPU kernel; shiftquant rewrites it in math form with
  both GEMMs int8 (the default) on materialized ``[128, 256, 256]`` scores, the softmax and
  ``P``'s quantizer in one C kernel, the softmax's backward in another
  (:mod:`sqcompile.backends.cpu_attention`); "fusion off" runs them as Inductor's loops.
* ``mlp``: ``fc2(gelu(fc1(x)))`` with 512 -> 2048 -> 512 on 4096 tokens (int8 Linears); the
  GELU with ``fc2``'s input quantizer in one C kernel, each output gradient's two quantizers
  in another (:mod:`sqcompile.backends.cpu_quant`); "fusion off" runs them as Inductor's loops.

    python benchmarks/blocks.py --threads 1
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from tabulate import tabulate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sqcompile  # noqa: E402,F401
from _timing import add_threads_argument, interleaved, median_ms, median_ratio, start  # noqa: E402


class Attention(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class MLP(nn.Module):
    def __init__(self, d=512):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def _step(fn, inputs, params):
    def step():
        for t in (*inputs, *params):
            t.grad = None
        fn(*inputs).pow(2).mean().backward()
    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--bits", type=int, default=4)
    add_threads_argument(p)
    args = p.parse_args(argv)
    start("blocks.py", args, argv)
    options = dict(weight_bits=args.bits, act_bits=args.bits, grad_bits=args.bits, inner="inductor")
    torch.manual_seed(0)
    qkv = [torch.randn(16, 8, 256, 64, requires_grad=True) for _ in range(3)]
    x = [torch.randn(4096, 512, requires_grad=True)]
    mlp = MLP()
    ours = f"shiftquant W{args.bits}A{args.bits}G{args.bits}"
    runs = {
        ("attention", "fp32 eager"): _step(Attention(), qkv, []),
        ("attention", ours): _step(torch.compile(Attention(), backend="shiftquant", options=options), qkv, []),
        # the softmax, its backward and P's quantizer as Inductor's loops, not our C kernels
        ("attention", f"{ours}, fusion off"): _step(torch.compile(Attention(), backend="shiftquant",
                                                                  options=dict(options, fusion=False)), qkv, []),
        ("mlp", "fp32 eager"): _step(mlp, x, list(mlp.parameters())),
        ("mlp", ours): _step(torch.compile(mlp, backend="shiftquant", options=options), x, list(mlp.parameters())),
        ("mlp", f"{ours}, fusion off"): _step(torch.compile(mlp, backend="shiftquant",
                                                            options=dict(options, fusion=False)),
                                              x, list(mlp.parameters())),
    }
    times = interleaved({f"{part}/{path}": fn for (part, path), fn in runs.items()}, rounds=args.rounds, warmup=2)
    rows = [[part, path, f"{median_ms(times[f'{part}/{path}']):.1f}",
             f"{median_ratio(times, f'{part}/fp32 eager', f'{part}/{path}'):.2f}x"] for part, path in runs]
    print(tabulate(rows, headers=["part", "path", "median ms (fwd+bwd)", "speed-up vs fp32"], tablefmt="github"))


if __name__ == "__main__":
    main()
