"""Train a ResNet-18-style network on Fashion-MNIST in float and with the shiftquant backend at
several bit widths (weights, activations and gradients), and print the accuracies side by side.

    python examples/resnet_fashion_mnist.py                  # ~10 minutes on 2 CPU cores
    python examples/resnet_fashion_mnist.py --execution simulate --threads 1    # about half that
    python examples/resnet_fashion_mnist.py --blocks 2 2 2 2 --train-limit 60000 --epochs 5
    python examples/resnet_fashion_mnist.py --separable     # depthwise-separable convs (MobileNet style)

The network is ResNet-18's layout scaled to 28x28 grey images: a 3x3 stem, four stages of
BasicBlocks (two 3x3 convs with BatchNorm, a residual add, a strided 1x1 conv + BatchNorm on the
shortcut where the shape changes) with widths 16-32-64-128, global average pooling and a
linear classifier.  ``--blocks 2 2 2 2`` is ResNet-18's depth; the default ``1 1 1 1`` keeps
the run short on a laptop CPU.  Under the backend every conv and the classifier run as
quantized GEMMs and every BatchNorm becomes a fully-quantized L1 norm (``norm="l1"``).

Data: Debian's ``dataset-fashion-mnist`` (``apt-get install -y dataset-fashion-mnist``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data import fashion_mnist  # noqa: E402
from common import print_accuracy_table as print_table  # noqa: E402
from common import (  # noqa: E402
    accuracy, add_run_arguments, float_and_quantized_runs, result, run_cli, train_minibatches)

FAMILY = "CNN (ResNet, Fashion-MNIST)"


def conv3x3(cin: int, cout: int, stride: int, separable: bool) -> nn.Module:
    """A 3x3 conv, or with ``separable`` MobileNet's depthwise-separable pair: a depthwise 3x3
    (``groups=cin``) and a pointwise 1x1."""
    if not separable:
        return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    return nn.Sequential(nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.Conv2d(cin, cout, 1, bias=False))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, separable: bool = False):
        super().__init__()
        self.conv1 = conv3x3(cin, cout, stride, separable)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = conv3x3(cout, cout, 1, separable)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet-18's layout (``blocks=(2, 2, 2, 2)``) for 1x28x28 inputs."""

    def __init__(self, blocks: Sequence[int] = (1, 1, 1, 1), widths: Sequence[int] = (16, 32, 64, 128),
                 classes: int = 10, separable: bool = False):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, cin = [], widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths)):
            for j in range(n):
                layers.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1, separable))   # 28 -> 14 -> 7 -> 4
                cin = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(x.mean((2, 3)))


def train_one(name: str, options: Optional[dict], data, *, epochs: int, seed: int, batch_size: int, lr: float,
              blocks: Sequence[int], widths: Sequence[int], max_steps: Optional[int] = None,
              log_every: int = 50, separable: bool = False) -> dict:
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    model = ResNet(blocks, widths, separable=separable)
    torch._dynamo.reset()       # a fresh compile per run (Dynamo caches at most 8 graphs per function)
    run_model = model if options is None else torch.compile(model, backend="shiftquant", options=options)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    start = time.perf_counter()
    steps = train_minibatches(name, lambda idx: F.cross_entropy(run_model(xtr[idx]), ytr[idx]), len(xtr), opt, lr,
                              epochs=epochs, batch_size=batch_size, max_steps=max_steps,
                              generator=torch.Generator().manual_seed(seed), log_every=log_every, start=start)
    acc = accuracy(run_model, xte, yte)
    seconds = time.perf_counter() - start
    print(f"  [{name}] test accuracy {100 * acc:.2f}%", flush=True)
    return result(FAMILY, name, options, "test acc %", 100 * acc, True, epochs=epochs, steps=steps, seed=seed,
                  seconds=seconds)


def run(bits_list: Sequence[int] = (8, 6, 4), epochs: int = 1, seed: int = 0, *, train_limit: int = 10000,
        test_limit: Optional[int] = None, batch_size: int = 128, lr: float = 0.1,
        blocks: Sequence[int] = (1, 1, 1, 1), widths: Sequence[int] = (16, 32, 64, 128),
        max_steps: Optional[int] = None, execution: str = "auto", include_float: bool = True,
        extra_runs: Sequence[Tuple[str, dict]] = (), log_every: int = 50, separable: bool = False) -> List[dict]:
    """Train float (if ``include_float``), one shiftquant run per entry of ``bits_list`` and one
    per ``(name, options)`` in ``extra_runs``;
    return one result dict per run (``value`` is the test accuracy in percent).  Raises
    :class:`data.DatasetMissing` when Fashion-MNIST is not installed."""
    xtr, ytr = fashion_mnist("train", limit=train_limit)
    xte, yte = fashion_mnist("test", limit=test_limit)
    print(f"Fashion-MNIST: {len(xtr)} training / {len(xte)} test images, ResNet blocks {list(blocks)} "
          f"widths {list(widths)}{', depthwise-separable convs' if separable else ''}, {epochs} epoch(s), "
          f"seed {seed}", flush=True)
    data = (xtr, ytr, xte, yte)
    kw = dict(epochs=epochs, seed=seed, batch_size=batch_size, lr=lr, blocks=blocks, widths=widths,
              max_steps=max_steps, log_every=log_every, separable=separable)
    results = float_and_quantized_runs(train_one, bits_list, execution, include_float, data, **kw)
    results += [train_one(name, opts, data, **kw) for name, opts in extra_runs]
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-limit", type=int, default=10000, help="training images used (of 60000)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--blocks", type=int, nargs=4, default=[1, 1, 1, 1],
                   help="BasicBlocks per stage (ResNet-18: 2 2 2 2)")
    p.add_argument("--widths", type=int, nargs=4, default=[16, 32, 64, 128])
    p.add_argument("--separable", action="store_true",
                   help="MobileNet-style convs: each 3x3 conv a depthwise 3x3 and a pointwise 1x1")
    add_run_arguments(p, log_every=20)
    def run_args(args):
        return run(args.bits, args.epochs, args.seed, train_limit=args.train_limit, batch_size=args.batch_size,
                   lr=args.lr, blocks=args.blocks, widths=args.widths, log_every=args.log_every,
                   execution=args.execution, separable=args.separable)

    run_cli(p, argv, run_args, print_table)


if __name__ == "__main__":
    main()
