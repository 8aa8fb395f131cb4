"""Interleaved timing shared by the benchmark scripts.

These machines are noisy (other processes share 2 cores), so every candidate is measured in
the same process, round-robin: each round runs every candidate once, and the reported figure
is the median over rounds, with ratios taken against a baseline per round and then their
median.  A single absolute time is never the result.
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch


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
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def median_ratio(times: Dict[str, List[float]], baseline: str, name: str) -> float:
    """Median over rounds of baseline_time / candidate_time (> 1: the candidate is faster)."""
    return statistics.median(b / c for b, c in zip(times[baseline], times[name]))


def median_ms(samples: List[float]) -> float:
    return 1e3 * statistics.median(samples)


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")


def start(script: str, args: argparse.Namespace, argv: Optional[Sequence[str]]) -> None:
    """Apply ``--threads`` and print the torch version, the thread count and the command line,
    so a pasted result says how it was produced."""
    if args.threads:
        torch.set_num_threads(args.threads)
    given = list(argv) if argv is not None else sys.argv[1:]
    from sqcompile.kernels import amx
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU int8 GEMMs on {amx.engine()}; command: "
          f"python benchmarks/{script} {shlex.join(given)}")
