"""Train a small CNN on Fashion-MNIST in float, then with the shiftquant backend at 8 and 4
bits (weights, activations and gradients), and print the accuracies side by side.

    python examples/train_cnn.py                 # ~10 minutes on 2 CPU cores
    python examples/train_cnn.py --train-limit 60000 --epochs 3

The quantized runs are exactly what a user writes:

    compiled = torch.compile(model, backend="shiftquant", options={"weight_bits": 4, ...})

BatchNorm layers become fully-quantized L1 norms (``norm="l1"``, the default).
Data: Debian's ``dataset-fashion-mnist`` (``apt-get install -y dataset-fashion-mnist``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import accuracy, shiftquant_options  # noqa: E402
from data import DatasetMissing, fashion_mnist  # noqa: E402


class CNN(nn.Module):
    def __init__(self, width: int = 32, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)        # 14x14
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)        # 7x7
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


def train(name, options, data, args) -> dict:
    xtr, ytr, xte, yte = data
    torch.manual_seed(args.seed)
    model = CNN(args.width)
    run = model if options is None else torch.compile(model, backend="shiftquant", options=options)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    steps = args.epochs * (len(xtr) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=steps)
    g = torch.Generator().manual_seed(args.seed)
    start, step = time.perf_counter(), 0
    for epoch in range(args.epochs):
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr) - args.batch_size + 1, args.batch_size):
            idx = perm[i:i + args.batch_size]
            loss = F.cross_entropy(run(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % args.log_every == 0 or step == steps:
                print(f"  [{name}] epoch {epoch + 1} step {step}/{steps} loss {loss.item():.3f} "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
    acc = accuracy(run, xte, yte)
    print(f"  [{name}] test accuracy {100 * acc:.2f}%", flush=True)
    return {"run": name, "accuracy": acc, "seconds": time.perf_counter() - start}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-limit", type=int, default=20000, help="training images used (of 60000)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4], help="W/A/G bit widths to compare with float")
    args = p.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)

    try:
        xtr, ytr = fashion_mnist("train", limit=args.train_limit)
        xte, yte = fashion_mnist("test")
    except DatasetMissing as e:
        sys.exit(str(e))
    print(f"Fashion-MNIST: {len(xtr)} training / {len(xte)} test images, {args.epochs} epochs, seed {args.seed}")
    data = (xtr, ytr, xte, yte)

    results = [train("float32", None, data, args)]
    for bits in args.bits:
        results.append(train(f"shiftquant W{bits}A{bits}G{bits}", shiftquant_options(bits), data, args))

    from tabulate import tabulate

    base = results[0]["accuracy"]
    rows = [[r["run"], f"{100 * r['accuracy']:.2f}", f"{100 * (r['accuracy'] - base):+.2f}", f"{r['seconds']:.0f}"]
            for r in results]
    print()
    print(tabulate(rows, headers=["run", "test acc %", "vs float (points)", "time s"], tablefmt="github"))


if __name__ == "__main__":
    main()
