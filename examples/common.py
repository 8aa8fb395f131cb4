"""Helpers the examples share."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, List, Optional, Sequence


# Options added to every quantized run's (``benchmarks/accuracy.py --options``), e.g.
# ``{"grad_outer_scale": False}``: one process-wide setting instead of a parameter of every example.
EXTRA_OPTIONS: dict = {}


def shiftquant_options(bits: int, execution: str = "auto") -> dict:
    """W/A/G = ``bits`` with as many ShiftQuant groups (up to 4) as fit one int8 GEMM:
    4 bits G=4, 6 bits G=3, 8 bits G=1; L1 norms (the default).  ``execution="simulate"``
    computes the same numbers with float GEMMs on dequantized values (faster on CPU for convs).
    :data:`EXTRA_OPTIONS` is merged in last.  (``groups`` is what the backend's default gives;
    it is passed so that each run's options name it.)"""
    from sqcompile.config import default_groups

    return {"weight_bits": bits, "act_bits": bits, "grad_bits": bits, "groups": default_groups(bits),
            "execution": execution, **EXTRA_OPTIONS}


def float_and_quantized_runs(train_one: Callable, bits_list: Sequence[int], execution: str, include_float: bool,
                             *args, **kwargs) -> List[dict]:
    """``train_one(name, options, *args, **kwargs)`` in float (``options=None``, if
    ``include_float``) and once per W/A/G width of ``bits_list`` (:func:`shiftquant_options`);
    the results in that order."""
    results = [train_one("float32", None, *args, **kwargs)] if include_float else []
    for bits in bits_list:
        opts = shiftquant_options(bits, execution)
        results.append(train_one(f"W{bits}A{bits}G{bits} (G={opts['groups']})", opts, *args, **kwargs))
    return results


def print_accuracy_table(results: List[dict]) -> None:
    """The run / test accuracy / gap to float / time table of the classification examples."""
    from tabulate import tabulate

    base = next((r["value"] for r in results if r["bits"] is None), None)
    rows = [[r["run"], f"{r['value']:.2f}", "" if base is None else f"{r['value'] - base:+.2f}",
             f"{r['seconds']:.0f}"] for r in results]
    print()
    print(tabulate(rows, headers=["run", "test acc %", "vs float (points)", "time s"], tablefmt="github",
                   disable_numparse=True))


def add_run_arguments(p: argparse.ArgumentParser, log_every: int) -> None:
    """The options every comparison example shares: seed, progress interval, bit widths,
    sqcompile's execution option and the torch thread count."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=log_every)
    p.add_argument("--bits", type=int, nargs="+", default=[8, 6, 4], help="W/A/G bit widths to compare with float")
    p.add_argument("--execution", choices=["auto", "simulate", "integer"], default="auto",
                   help="sqcompile's execution option (same numerics; 'simulate' is faster for convs on CPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's choice; 1 is faster on a busy machine)")


def run_cli(p: argparse.ArgumentParser, argv: Optional[Sequence[str]], run: Callable[[argparse.Namespace], list],
            show: Callable[[list], None]) -> None:
    """Parse ``argv``, apply ``--threads``, ``show(run(args))``; a missing dataset exits with
    the message saying how to get it."""
    import torch
    from data import DatasetMissing

    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        results = run(args)
    except DatasetMissing as e:
        sys.exit(str(e))
    show(results)


def train_minibatches(name: str, batch_loss: Callable, n: int, opt, lr: float, *, epochs: int, batch_size: int,
                      max_steps: Optional[int], generator, log_every: int, start: float, digits: int = 3) -> int:
    """Train over ``n`` examples: ``epochs`` passes in a fresh random order (``generator``) of
    ``batch_size`` examples, at most ``max_steps`` steps, with a one-cycle learning rate peaking
    at ``lr``; ``batch_loss(idx)`` is the loss of the examples at ``idx`` (``opt`` steps on its
    gradient).  Prints the loss every ``log_every`` steps (with the time since ``start``);
    returns the number of steps."""
    import time

    import torch

    per_epoch = n // batch_size
    steps = epochs * per_epoch if max_steps is None else min(max_steps, epochs * per_epoch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=max(steps, 20))   # (short runs stop early)
    step = 0
    while step < steps:
        epoch = step // per_epoch
        perm = torch.randperm(n, generator=generator)
        for i in range(0, per_epoch * batch_size, batch_size):
            if step >= steps:
                break
            loss = batch_loss(perm[i:i + batch_size])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % log_every == 0 or step == steps:
                print(f"  [{name}] epoch {epoch + 1} step {step}/{steps} loss {loss.item():.{digits}f} "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
    return steps


def accuracy(model, x, y, batch: int = 1000) -> float:
    """Fraction of ``x`` that ``model`` (switched to eval for the pass) classifies as ``y``."""
    import torch

    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += (model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item()
    model.train()
    return correct / len(x)


def result(family: str, name: str, options: Optional[dict], metric: str, value: float, higher_is_better: bool,
           **extra) -> dict:
    """One run's result row, as ``benchmarks/accuracy.py`` and the tables read it."""
    return {"family": family, "run": name, "bits": None if options is None else options.get("weight_bits"),
            "groups": None if options is None else options.get("groups"), "metric": metric, "value": value,
            "higher_is_better": higher_is_better, **extra}
