"""L1 vs L2 normalization, forward + backward, on CPU, interleaved in one process.

For BatchNorm2d and LayerNorm at realistic shapes it times:

* ``L2 eager``: PyTorch's own layer (the baseline every ratio is against);
* ``L2 inductor``: the same layer under ``torch.compile`` (Inductor);
* ``L1 float inductor``: :mod:`sqcompile.norms`' L1 norm without quantization under Inductor,
  the like-for-like arithmetic comparison with ``L2 inductor``;
* ``L1 8-bit shiftquant``: the layer compiled with ``backend="shiftquant"`` (the fully
  quantized L1 norm the backend puts in place of the L2 one, Inductor inner compiler; on
  CPUs with AVX-512 the norms run on the C kernels of
  ``sqcompile.kernels.cpu_norm``);
* ``L1 8-bit, graph ops``: the same with the norm left as the graph's ops under Inductor
  (the C kernels off).

    python benchmarks/norm.py
    python benchmarks/norm.py --rounds 15
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn as nn
from tabulate import tabulate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sqcompile import norms  # noqa: E402
from _timing import add_threads_argument, interleaved, median_ms, median_ratio, norm_kernels_off, start  # noqa: E402

CASES = {
    "BatchNorm2d [64,128,28,28]": (lambda: nn.BatchNorm2d(128), (64, 128, 28, 28)),
    "BatchNorm2d [128,64,56,56]": (lambda: nn.BatchNorm2d(64), (128, 64, 56, 56)),
    "InstanceNorm2d [16,32,64,64]": (lambda: nn.InstanceNorm2d(32, affine=True), (16, 32, 64, 64)),
    "LayerNorm [8192,1024]": (lambda: nn.LayerNorm(1024), (8192, 1024)),
    "LayerNorm [16384,768]": (lambda: nn.LayerNorm(768), (16384, 768)),
}


class L1Float(nn.Module):
    """The L1 version of ``layer`` in float (no quantization), sharing its parameters."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        m = self.layer
        if isinstance(m, nn.InstanceNorm2d):
            return norms.l1_instance_norm(x, None, None, m.weight, m.bias, eps=m.eps, norm_bits=None)
        if isinstance(m, nn.BatchNorm2d):
            return norms.l1_batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, True, 0.1, m.eps ** 0.5,
                                       norm_bits=None)
        return norms.l1_layer_norm(x, m.normalized_shape, m.weight, m.bias, m.eps ** 0.5, norm_bits=None)


def step_fn(module, x, g, norm_ops=False):
    def step():
        with norm_kernels_off(norm_ops):
            x.grad = None
            module(x).backward(g)
    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    add_threads_argument(p)
    args = p.parse_args(argv)
    start("norm.py", args, argv)
    rows = []
    for case in args.cases:
        make, shape = CASES[case]
        torch._dynamo.reset()
        torch.manual_seed(0)
        layer = make()
        x = torch.randn(shape, requires_grad=True)
        g = torch.randn(shape)
        cands = {
            "L2 eager": step_fn(layer, x, g),
            "L2 inductor": step_fn(torch.compile(layer), x, g),
            "L1 float inductor": step_fn(torch.compile(L1Float(layer)), x, g),
            "L1 8-bit shiftquant": step_fn(torch.compile(layer, backend="shiftquant", options={"inner": "inductor"}),
                                           x, g),
        }
        # other options than the row above: equal ones would make Dynamo reuse its graphs
        cands["L1 8-bit, graph ops"] = step_fn(torch.compile(layer, backend="shiftquant",
                                                             options={"inner": "inductor", "fusion": True}),
                                               x, g, norm_ops=True)
        times = interleaved(cands, rounds=args.rounds, warmup=2)
        for name in cands:
            rows.append([case, name, f"{median_ms(times[name]):.2f}", f"{median_ratio(times, 'L2 eager', name):.2f}x",
                         f"{median_ratio(times, 'L2 inductor', name):.2f}x"])
        print(tabulate(rows[-len(cands):], tablefmt="github"), flush=True)
    print()
    print(tabulate(rows, headers=["layer [shape]", "path", "median ms fwd+bwd", "speed-up vs L2 eager",
                                  "vs L2 inductor"], tablefmt="github"))


if __name__ == "__main__":
    main()
