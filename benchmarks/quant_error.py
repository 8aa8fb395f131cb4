"""Quantization error of real output gradients: per-tensor vs ShiftQuant vs per-channel.

Trains a small CNN on Fashion-MNIST in plain float PyTorch, captures the output gradients
``dY`` of its conv and linear layers at a few points in training (tensor hooks on the layers'
outputs), and measures how well each quantizer represents them as they feed the two backward
GEMMs:

* ``dX = dY W`` reduces over output features / channels: the channels are dY's columns
  (Linear ``[T, O]``: channel_dims ``[1]``; Conv ``[N, C, H, W]``: ``[1]``);
* ``dW = dY^T X`` reduces over tokens: the channels are dY's rows
  (Linear: ``[0]``; Conv: ``[0, 2, 3]``, one channel per (n, h, w) position).

Quantizers, all with stochastic rounding as for gradients (:mod:`sqcompile.numerics`):
per-tensor (one scale: what a plain integer GEMM accepts, the baseline), ShiftQuant with
G = 1..5 power-of-two groups along the reduction channels, and per-channel (one scale per
reduction channel: the error floor, which no integer GEMM can apply).

A last table compares groupings of the convs' ``dX`` operand: ranges per output channel
against ranges per (sample, output channel), which sqcompile uses (one base scale either way,
so the same integer GEMM), with and without one scale per sample first.

Metrics, per captured tensor and averaged over tensors and stochastic-rounding draws:
normalized MSE ``mean((x - x_q)^2) / mean(x^2)`` (arithmetic mean, so dominated by the worst
tensors) and SQNR in dB (``-10 log10`` of the normalized MSE per draw; the mean of dB values
is a geometric mean of the errors).

    python benchmarks/quant_error.py                   # about 20 s on 2 CPU cores
    python benchmarks/quant_error.py --per-layer       # also one table per layer
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tabulate import tabulate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples.data import fashion_mnist  # noqa: E402
from sqcompile import numerics  # noqa: E402
from sqcompile.config import default_groups  # noqa: E402

GEMMS = ("dX = dY W", "dW = dY^T X")


class SmallCNN(nn.Module):
    """conv(1->16) - pool - conv(16->32) - pool - fc(1568->128) - fc(128->10), ReLU between."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def reduction_channel_dims(dy: torch.Tensor) -> dict:
    """channel_dims of dY for each backward GEMM: dX reduces over out-features/channels,
    dW over tokens (rows; for conv every (n, h, w) position)."""
    if dy.dim() == 2:
        return {GEMMS[0]: (1,), GEMMS[1]: (0,)}
    if dy.dim() == 4:
        return {GEMMS[0]: (1,), GEMMS[1]: (0, 2, 3)}
    raise ValueError(f"unexpected gradient rank {dy.dim()}")


def train_and_capture(args) -> list:
    """Train in float and return ``[(layer, step, dY)]`` captured at ``args.captures`` steps."""
    torch.manual_seed(args.seed)
    x_train, y_train = fashion_mnist("train")
    x_test, y_test = fashion_mnist("test", limit=2000)
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    gen = torch.Generator().manual_seed(args.seed)

    capture_steps = set(torch.linspace(0, args.steps - 1, args.captures).round().long().tolist())
    captured, state = [], {"step": None}

    # A forward hook puts a tensor hook on the layer's output, which receives dY in backward.
    # (A module full backward hook would do the same but warns on conv1, whose input needs
    # no gradient.)
    def hook(name):
        def fn(module, inputs, output):
            step = state["step"]
            if step is not None:
                output.register_hook(lambda dy: captured.append((name, step, dy.detach().clone())))
        return fn

    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.register_forward_hook(hook(name))

    t0 = time.perf_counter()
    running_loss, running_acc = 0.0, 0.0
    for step in range(args.steps):
        idx = torch.randint(0, len(x_train), (args.batch_size,), generator=gen)
        xb, yb = x_train[idx], y_train[idx]
        state["step"] = step if step in capture_steps else None
        logits = model(xb)
        loss = F.cross_entropy(logits, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running_loss += loss.item()
        running_acc += (logits.argmax(1) == yb).float().mean().item()
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            n = (step % args.log_every) + 1
            print(f"step {step + 1:4d}/{args.steps}  loss {running_loss / n:.3f}  "
                  f"train acc {running_acc / n:.3f}  ({time.perf_counter() - t0:.1f} s)", flush=True)
            running_loss, running_acc = 0.0, 0.0
    state["step"] = None
    with torch.no_grad():
        acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    print(f"test accuracy (first {len(y_test)} test images): {acc:.3f}")
    print(f"captured {len(captured)} gradients at steps {sorted(capture_steps)}: "
          + ", ".join(f"{n} {tuple(t.shape)}" for n, s, t in captured if s == min(capture_steps)))
    return captured


def quantizers(bits_list, groups_list):
    """``(row name, bits, fn(x, channel_dims) -> dequantized x)`` for every table cell."""
    out = []
    for bits in bits_list:
        out.append(("per-tensor", bits,
                    lambda x, dims, b=bits: numerics.fake_quantize(x, b, (), "stochastic")))
        for g in groups_list:
            out.append((f"ShiftQuant G={g}", bits,
                        lambda x, dims, b=bits, g=g: numerics.shiftquant(x, b, g, dims, "stochastic").dequantize()))
        out.append(("per-channel (floor)", bits,
                    lambda x, dims, b=bits: numerics.dequantize(*numerics.quantize_per_channel(x, b, dims, "stochastic"))))
    return out


def measure(captured, args):
    """``{(layer or "all", row, bits, gemm): ([nmse], [sqnr_db])}`` over tensors and draws."""
    torch.manual_seed(args.seed)                     # stochastic-rounding noise
    results = defaultdict(lambda: ([], []))
    for layer, step, dy in captured:
        power = dy.double().pow(2).mean().item()
        if power == 0:
            continue
        for gemm, dims in reduction_channel_dims(dy).items():
            for row, bits, fn in quantizers(args.bits, args.groups):
                for _ in range(args.draws):
                    dq = fn(dy, dims)
                    nmse = numerics.mse(dy, dq) / power
                    sqnr = numerics.sqnr_db(dy, dq)
                    for key in ("all", layer):
                        results[(key, row, bits, gemm)][0].append(nmse)
                        results[(key, row, bits, gemm)][1].append(sqnr)
    return results


def conv_input_grad_table(captured, args) -> str:
    """SQNR (dB) of the convs' ``dY`` as it feeds ``dX = dY W``, by how ShiftQuant groups it:
    ranges per output channel, per (sample, output channel) (what sqcompile does: the expanded
    integers share one base scale whatever the grouping, so the GEMM is the same), that with
    one scale per sample first (``grad_outer_scale``), and the per-channel floors of both
    groupings.  G is the default (``config.default_groups``: 4 at 4 bits, 3 at 6), as in training."""
    torch.manual_seed(args.seed)

    def outer(x, b, g):
        r = numerics.safe_div_scale(numerics.amax(x, [0]))
        return numerics.shiftquant(x / r, b, g, (0, 1), "stochastic").dequantize() * r

    rows = {
        "ShiftQuant, ranges per output channel": lambda x, b, g: numerics.shiftquant(
            x, b, g, (1,), "stochastic").dequantize(),
        "ShiftQuant, ranges per (sample, channel) (sqcompile)": lambda x, b, g: numerics.shiftquant(
            x, b, g, (0, 1), "stochastic").dequantize(),
        "the same, one scale per sample first (grad_outer_scale)": outer,
        "per output channel (floor of the first)": lambda x, b, g: numerics.dequantize(
            *numerics.quantize_per_channel(x, b, (1,), "stochastic")),
        "per (sample, channel) (floor of the second)": lambda x, b, g: numerics.dequantize(
            *numerics.quantize_per_channel(x, b, (0, 1), "stochastic")),
    }
    convs = [dy for _, _, dy in captured if dy.dim() == 4 and dy.abs().amax() > 0]
    groups = {b: default_groups(b) for b in args.bits}
    body = []
    for row, fn in rows.items():
        line = [row]
        for bits, g in groups.items():
            sqnrs = [numerics.sqnr_db(dy, fn(dy, bits, g)) for dy in convs for _ in range(args.draws)]
            line.append(f"{sum(sqnrs) / len(sqnrs):.1f}")
        body.append(line)
    headers = ["conv dX operand"] + [f"{b}-bit G={g}" for b, g in groups.items()]
    return tabulate(body, headers=headers, tablefmt="github", disable_numparse=True)


def table(results, key, args, metric):
    rows = [r for r, b, _ in quantizers(args.bits[:1], args.groups)]
    headers = ["quantizer"] + [f"{b}-bit {g}" for b in args.bits for g in GEMMS]
    body = []
    for row in rows:
        line = [row]
        for bits in args.bits:
            for gemm in GEMMS:
                nmses, sqnrs = results[(key, row, bits, gemm)]
                if metric == "nmse":
                    cell = f"{sum(nmses) / len(nmses):.2e}"
                else:
                    cell = f"{sum(sqnrs) / len(sqnrs):.1f}"
                if row.startswith("ShiftQuant") and not numerics.fits_int8(bits, int(row.split("=")[1])):
                    cell += " †"
                line.append(cell)
        body.append(line)
    return tabulate(body, headers=headers, tablefmt="github", disable_numparse=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=200, help="float training steps (default 200)")
    p.add_argument("--bits", type=int, nargs="+", default=[4, 6], help="bit widths (default 4 6)")
    p.add_argument("--groups", type=int, nargs="+", default=[1, 2, 3, 4, 5],
                   help="ShiftQuant group counts (default 1..5)")
    p.add_argument("--seed", type=int, default=0, help="seed for init, batches and rounding noise")
    p.add_argument("--captures", type=int, default=4,
                   help="number of training steps (evenly spaced, first and last included) at "
                        "which gradients are captured (default 4)")
    p.add_argument("--draws", type=int, default=3, help="stochastic-rounding draws per tensor (default 3)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--per-layer", action="store_true", help="also print one table per layer")
    args = p.parse_args(argv)

    command = ("python benchmarks/quant_error.py "
               + f"--steps {args.steps} --bits {' '.join(map(str, args.bits))} "
               + f"--groups {' '.join(map(str, args.groups))} --seed {args.seed} "
               + f"--captures {args.captures} --draws {args.draws} --batch-size {args.batch_size} "
               + f"--lr {args.lr}" + (" --per-layer" if args.per_layer else ""))
    t0 = time.perf_counter()
    captured = train_and_capture(args)
    t1 = time.perf_counter()
    results = measure(captured, args)
    t2 = time.perf_counter()

    layers = list(dict.fromkeys(name for name, _, _ in captured))
    print()
    print(f"Command: {command}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; training {t1 - t0:.1f} s, "
          f"quantization {t2 - t1:.1f} s")
    print(f"{len(captured)} output gradients dY ({', '.join(layers)} x {args.captures} steps), "
          f"{args.draws} stochastic-rounding draws each. † = ShiftQuant's expanded integers "
          f"exceed int8 at this bit width (int16 or per-group accumulation).")
    for key in ["all"] + (layers if args.per_layer else []):
        scope = "all layers" if key == "all" else f"layer {key}"
        print(f"\nNormalized MSE, mean((dY - Q(dY))^2) / mean(dY^2), {scope} (lower is better):\n")
        print(table(results, key, args, "nmse"))
        print(f"\nSQNR in dB, mean over tensors, {scope} (higher is better):\n")
        print(table(results, key, args, "sqnr"))
    print("\nSQNR in dB of the convs' dY for dX = dY W by grouping, mean over tensors (higher is better):\n")
    print(conv_input_grad_table(captured, args))
    print(f"\nTotal {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
