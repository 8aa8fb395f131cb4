"""One training step (forward + backward) of a Linear layer on CPU: fp32 eager, fp32 under
Inductor, torchao's int8 mixed-precision training (when torchao is installed) and sqcompile's
integer path, measured interleaved in one process.

    python benchmarks/linear.py                         # the issue's three shapes
    python benchmarks/linear.py --shapes 4096,1024,1024 --rounds 7

Prints median milliseconds per step and the median per-round speed-up over fp32 eager.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from tabulate import tabulate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sqcompile  # noqa: E402,F401
from _timing import add_threads_argument, interleaved, median_ms, median_ratio, start  # noqa: E402


def make_step(module, x, g):
    def step():
        x.grad = None
        for p in module.parameters():
            p.grad = None
        module(x).backward(g)
    return step


def torchao_linear(layer):
    """torchao's int8 mixed-precision training applied to a copy of ``layer``, or None."""
    try:
        from torchao.prototype.quantized_training import int8_mixed_precision_training
        from torchao.quantization import quantize_
    except Exception:
        return None
    m = torch.nn.Sequential(torch.nn.Linear(layer.in_features, layer.out_features))
    m[0].load_state_dict(layer.state_dict())
    quantize_(m, int8_mixed_precision_training())
    return m


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["4096,1024,1024", "4096,4096,4096", "16384,1024,4096"],
                   help="tokens,in,out triples")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--skip-inductor", action="store_true", help="leave out fp32 under Inductor")
    add_threads_argument(p)
    args = p.parse_args(argv)
    start("linear.py", args, argv)
    torch.manual_seed(0)
    rows = []
    for spec in args.shapes:
        T, K, N = (int(v) for v in spec.split(","))
        torch._dynamo.reset()
        layer = torch.nn.Linear(K, N)
        x = torch.randn(T, K, requires_grad=True)
        g = torch.randn(T, N)
        opts = dict(weight_bits=args.bits, act_bits=args.bits, grad_bits=args.bits, groups=4,
                    execution="integer", inner="inductor")
        cands = {"fp32 eager": make_step(layer, x, g)}
        if not args.skip_inductor:
            cands["fp32 inductor"] = make_step(torch.compile(layer), x, g)
        ao = torchao_linear(layer)
        if ao is not None:
            cands["torchao int8 mixed"] = make_step(ao, x, g)
        cands[f"sqcompile int{args.bits} (inductor)"] = make_step(
            torch.compile(layer, backend="shiftquant", options=opts), x, g)
        cands[f"sqcompile int{args.bits} (eager glue)"] = make_step(
            torch.compile(layer, backend="shiftquant", options=dict(opts, inner="eager")), x, g)
        times = interleaved(cands, rounds=args.rounds, warmup=2)
        for name in cands:
            rows.append([f"{T}x{K}x{N}", name, f"{median_ms(times[name]):.1f}",
                         f"{median_ratio(times, 'fp32 eager', name):.2f}x"])
        print(tabulate(rows[-len(cands):], headers=["shape", "path", "median ms/step", "vs fp32 eager"],
                       tablefmt="github"), flush=True)
    print()
    print(tabulate(rows, headers=["T x in x out", "path", "median ms/step", "speed-up vs fp32 eager"],
                   tablefmt="github"))


if __name__ == "__main__":
    main()
