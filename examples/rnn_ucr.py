"""Train an LSTM (or GRU) sequence classifier on the UCR "Trace" time series, in float and with
the shiftquant backend at several bit widths, and print the test accuracies side by side.

    python examples/rnn_ucr.py                          # ~2 minutes on 2 CPU cores
    python examples/rnn_ucr.py --cell gru --hidden 64 --epochs 100 --downsample 1

Trace has 100 training and 100 test series of 275 steps, 4 classes.  The series are averaged
over windows of ``--downsample`` (5) steps, to 55 steps: under the backend ``nn.LSTM`` is
unrolled over time into one quantized GEMM per step (plus one for the input projection of all
steps), so the length of the sequence is the length of the compiled graph.  The classifier
reads the last hidden state and the maximum of the hidden states over time through a linear
layer (with the last state alone, float training stalls at 72%: classes 3 and 4 differ only
early in the series).  Importing sqcompile turns on
``torch._dynamo.config.allow_rnn``, so the LSTM is part of the one compiled graph.

Data: the UCR archive cached inside tslearn's wheel (``pip install tslearn``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data import ucr  # noqa: E402
from common import print_accuracy_table as print_table  # noqa: E402
from common import accuracy, add_run_arguments, float_and_quantized_runs, result, run_cli  # noqa: E402

FAMILY = "RNN (LSTM, UCR Trace)"


class RNNClassifier(nn.Module):
    def __init__(self, in_features: int, hidden: int, classes: int, cell: str = "lstm", layers: int = 1):
        super().__init__()
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.rnn = rnn(in_features, hidden, num_layers=layers, batch_first=True)
        self.fc = nn.Linear(2 * hidden, classes)

    def forward(self, x):                      # x: [batch, time, features]
        out, _ = self.rnn(x)
        # the last hidden state and the maximum over time: Trace's classes differ by short
        # features early in the series that the last state alone tends to forget
        return self.fc(torch.cat([out[:, -1], out.amax(1)], dim=1))


def downsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Average ``[N, T, C]`` over windows of ``factor`` steps (a trailing partial window is dropped)."""
    if factor <= 1:
        return x
    n, t, c = x.shape
    t = t // factor * factor
    return x[:, :t].reshape(n, t // factor, factor, c).mean(2)


def train_one(name: str, options: Optional[dict], data, classes: int, *, epochs: int, seed: int, hidden: int,
              cell: str, layers: int, batch_size: int, lr: float, log_every: int) -> dict:
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    model = RNNClassifier(xtr.shape[-1], hidden, classes, cell, layers)
    torch._dynamo.reset()       # a fresh compile per run (Dynamo caches at most 8 graphs per function)
    run_model = model if options is None else torch.compile(model, backend="shiftquant", options=options)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    per_epoch = len(xtr) // batch_size                 # full batches only: one compiled shape
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=max(epochs * per_epoch, 20), pct_start=0.2)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(per_epoch):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            loss = F.cross_entropy(run_model(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
        if epoch % log_every == 0 or epoch == epochs:
            print(f"  [{name}] epoch {epoch}/{epochs} loss {loss.item():.3f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    acc = accuracy(run_model, xte, yte)
    seconds = time.perf_counter() - start
    print(f"  [{name}] test accuracy {100 * acc:.2f}%", flush=True)
    return result(FAMILY, name, options, "test acc %", 100 * acc, True, epochs=epochs, steps=epochs * per_epoch,
                  seed=seed, seconds=seconds)


def run(bits_list: Sequence[int] = (8, 6, 4), epochs: int = 40, seed: int = 0, *, dataset: str = "Trace",
        downsample_by: int = 5, hidden: int = 32, cell: str = "lstm", layers: int = 1, batch_size: int = 20,
        lr: float = 1e-2, train_limit: Optional[int] = None, test_limit: Optional[int] = None,
        execution: str = "auto", include_float: bool = True, log_every: int = 10) -> List[dict]:
    """Train float (if ``include_float``) and one shiftquant run per entry of ``bits_list``;
    return one result dict per run (``value``: test accuracy in percent).  Raises
    :class:`data.DatasetMissing` when tslearn is not installed."""
    xtr, ytr, xte, yte = ucr(dataset)
    classes = int(torch.cat([ytr, yte]).max()) + 1
    xtr, ytr, xte, yte = xtr[:train_limit], ytr[:train_limit], xte[:test_limit], yte[:test_limit]
    xtr, xte = downsample(xtr, downsample_by), downsample(xte, downsample_by)
    print(f"UCR {dataset}: {len(xtr)} training / {len(xte)} test series of {xtr.shape[1]} steps "
          f"(downsampled by {downsample_by}), {classes} classes; {cell.upper()} hidden {hidden}, "
          f"{epochs} epochs, seed {seed}", flush=True)
    data = (xtr, ytr, xte, yte)
    kw = dict(epochs=epochs, seed=seed, hidden=hidden, cell=cell, layers=layers,
              batch_size=min(batch_size, len(xtr)), lr=lr, log_every=log_every)
    return float_and_quantized_runs(train_one, bits_list, execution, include_float, data, classes, **kw)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="Trace")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--downsample", type=int, default=5, help="average over windows of this many steps")
    p.add_argument("--cell", choices=["lstm", "gru"], default="lstm")
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-2)
    add_run_arguments(p, log_every=10)
    def run_args(args):
        return run(args.bits, args.epochs, args.seed, dataset=args.dataset, downsample_by=args.downsample,
                   hidden=args.hidden, cell=args.cell, layers=args.layers, batch_size=args.batch_size,
                   lr=args.lr, log_every=args.log_every, execution=args.execution)

    run_cli(p, argv, run_args, print_table)


if __name__ == "__main__":
    main()
