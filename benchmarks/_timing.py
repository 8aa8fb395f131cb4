"""Interleaved timing shared by the benchmark scripts.

These machines are noisy (other processes share 2 cores), so every candidate is measured in
the same process, round-robin: each round runs every candidate once, and the reported figure
is the median over rounds, with ratios taken against a baseline per round and then their
median.  A single absolute time is never the result.

``--cpu-time`` (every script that takes ``--threads``) times each call by the process's CPU
time instead of the wall clock: when other processes share the cores, a call that is
preempted is charged only for what it ran, so ratios stay put where wall-clock medians
swing by 2x.  With one thread it is that thread's busy time; with several it sums them
(total work, not latency), so use it with ``--threads 1``.
"""
from __future__ import annotations

import argparse
import contextlib
import shlex
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

_clock = time.perf_counter   # start() switches it to time.process_time for --cpu-time


def interleaved(candidates: Dict[str, Callable[[], object]], rounds: int, warmup: int = 1,
                sync: Callable[[], None] = lambda: None) -> Dict[str, List[float]]:
    """Seconds per call of each candidate, ``rounds`` samples each, measured round-robin."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    sync()
    times: Dict[str, List[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            sync()
            t0 = _clock()
            fn()
            sync()
            times[name].append(_clock() - t0)
    return times


def median_ratio(times: Dict[str, List[float]], baseline: str, name: str) -> float:
    """Median over rounds of baseline_time / candidate_time (> 1: the candidate is faster)."""
    return statistics.median(b / c for b, c in zip(times[baseline], times[name]))


def median_ms(samples: List[float]) -> float:
    return 1e3 * statistics.median(samples)


@contextlib.contextmanager
def norm_kernels_off(off: bool = True):
    """While ``off``, the L1-norm rewriting pass leaves every norm on the graph's ops instead
    of the C kernels of ``sqcompile.kernels.cpu_norm`` (read when a graph is traced, i.e. at a
    compiled model's first call)."""
    import importlib
    l1_norms = importlib.import_module("sqcompile.passes.l1_norms")
    saved = l1_norms._cpu_kernels
    if off:
        l1_norms._cpu_kernels = lambda *args: False
    try:
        yield
    finally:
        l1_norms._cpu_kernels = saved


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--cpu-time", action="store_true",
                   help="time calls by process CPU time, not wall time: robust to other processes "
                        "sharing the cores (use with --threads 1; with more threads it sums their work)")


def start(script: str, args: argparse.Namespace, argv: Optional[Sequence[str]]) -> None:
    """Apply ``--threads`` and print the torch version, the thread count and the command line,
    so a pasted result says how it was produced."""
    global _clock
    if args.threads:
        torch.set_num_threads(args.threads)
    if getattr(args, "cpu_time", False):
        if torch.get_num_threads() != 1:
            print("note: --cpu-time with more than one thread sums the threads' CPU time (total work, not latency)")
        _clock = time.process_time
    given = list(argv) if argv is not None else sys.argv[1:]
    from sqcompile.kernels import amx
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU int8 GEMMs on {amx.engine()}"
          f"{', times in process CPU time' if _clock is time.process_time else ''}; command: "
          f"python benchmarks/{script} {shlex.join(given)}")
