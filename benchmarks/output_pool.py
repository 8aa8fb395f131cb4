"""What recycling the CPU kernels' outputs saves: the shiftquant training step of
``train_step.py``'s models with the process's output pool (``SQCOMPILE_GEMM_POOL_MB``, by
default an eighth of physical memory) against the same step with a pool capped at
``--pool-mb`` (256 MiB, the default before 2026-12-02), interleaved in one process that runs
nothing else.

Nothing else, because the difference is page faults: an output the pool cannot hold is a
``torch.empty``, and glibc serves it from memory it has already touched only where something
else in the process freed such memory.  An fp32 step interleaved with these (as
``train_step.py`` does) leaves its freed activations on glibc's heap for the small pool's
outputs and hides the cost a process that trains only this model pays.

    taskset -c 1 python benchmarks/output_pool.py --threads 1 --cpu-time
    python benchmarks/output_pool.py --models transformer resnet18 unet --pool-mb 0
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch
from tabulate import tabulate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step  # noqa: E402
from _timing import add_threads_argument, interleaved, median_ms, median_ratio, start  # noqa: E402

from sqcompile.kernels import pool  # noqa: E402


@contextlib.contextmanager
def own_pool(outputs: pool.OutputPool):
    """While active, the CPU kernels take their outputs from ``outputs`` instead of the
    process's pool."""
    shared = pool.OUTPUTS
    pool.OUTPUTS = outputs
    try:
        yield
    finally:
        pool.OUTPUTS = shared


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["transformer"], choices=list(train_step.MODELS))
    p.add_argument("--pool-mb", type=int, default=256, help="the capped pool's size in MiB (default 256)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--bits", type=int, default=4)
    add_threads_argument(p)
    args = p.parse_args(argv)
    if args.pool_mb < 0:
        p.error("--pool-mb must be >= 0")
    start("output_pool.py", args, argv)
    bits = dict(weight_bits=args.bits, act_bits=args.bits, grad_bits=args.bits, inner="inductor")
    capped_label = f"pool capped at {args.pool_mb} MiB"
    rows = []
    for name in args.models:
        torch._dynamo.reset()
        pool.OUTPUTS.clear()
        x, _ = train_step.model_input(argparse.Namespace(channels_last=False), name)
        ours = train_step.make_step(name, bits, False, x)
        capped = pool.OutputPool(limit=args.pool_mb << 20)
        # other options than the first step's (a default spelled out): Dynamo would reuse its graphs
        capped_step = train_step.make_step(name, dict(bits, kernels="auto"), False, x)

        def capped_run():
            with own_pool(capped):
                capped_step()

        runs = {f"process pool ({pool.OUTPUTS.limit >> 20} MiB)": ours, capped_label: capped_run}
        times = interleaved(runs, rounds=args.rounds, warmup=2)
        kept = {runs_label: outputs.kept for runs_label, outputs in zip(runs, (pool.OUTPUTS, capped))}
        for label in runs:
            rows.append([name, label, f"{median_ms(times[label]):.0f}",
                         f"{median_ratio(times, capped_label, label):.2f}x", f"{kept[label] / 2**20:.0f}"])
    print(tabulate(rows, headers=["model", "outputs from", "median ms/step", f"speed-up vs {args.pool_mb} MiB",
                                  "kept MiB"], tablefmt="github"))


if __name__ == "__main__":
    main()
