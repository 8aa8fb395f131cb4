"""Train a small U-Net to denoise Fashion-MNIST images, in float and with the shiftquant backend
at several bit widths, and print the test PSNR side by side.

    python examples/unet_denoise_fashion_mnist.py --threads 1           # ~8 minutes on one CPU core
    python examples/unet_denoise_fashion_mnist.py --bits 4 --epochs 3 --train-limit 60000

The network is an image-to-image model of the kind the classification examples do not cover:
an encoder of 3x3 convs (two of them strided, 28 -> 14 -> 7), a decoder that upsamples with
**transposed convolutions** (``ConvTranspose2d``, stride 2, ``output_padding=1``: 7 -> 14 ->
28) and concatenates the encoder's features at each scale (U-Net skips), with
**InstanceNorm2d** (affine) after every conv but the last.  Under the backend every conv and
transposed conv runs as a quantized GEMM (int8 im2col GEMMs with ``--execution integer`` or
``auto``) and every InstanceNorm becomes a fully-quantized L1 instance norm.

Task: the input is a test image plus Gaussian noise (standard deviation ``--noise`` in pixel
units, 0..1), the target the clean image; the loss is the mean squared error.  The metric is
the PSNR of the denoised test images against the clean ones, ``10 log10(1 / MSE)`` over pixel
values in [0, 1] (the noisy inputs themselves score 12.8 dB at the default noise 0.3).
The noise is drawn from a generator seeded per run, so float and quantized runs see the same
noisy images.

Data: Debian's ``dataset-fashion-mnist`` (``apt-get install -y dataset-fashion-mnist``).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, fashion_mnist  # noqa: E402
from common import add_run_arguments, float_and_quantized_runs, result, run_cli, train_minibatches  # noqa: E402

FAMILY = "U-Net denoiser (Fashion-MNIST)"
METRIC = "test PSNR dB"


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.InstanceNorm2d(cout, affine=True), nn.ReLU())


def _up(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 3, 2, 1, output_padding=1),
                         nn.InstanceNorm2d(cout, affine=True), nn.ReLU())


class UNet(nn.Module):
    """Two scales down, two up, skips by concatenation; ``width`` channels at full size."""

    def __init__(self, width: int = 16):
        super().__init__()
        w = width
        self.enc1, self.enc2, self.enc3 = _block(1, w), _block(w, 2 * w, 2), _block(2 * w, 4 * w, 2)
        self.up2, self.dec2 = _up(4 * w, 2 * w), _block(4 * w, 2 * w)
        self.up1, self.dec1 = _up(2 * w, w), _block(2 * w, w)
        self.out = nn.Conv2d(w, 1, 1)

    def forward(self, x):
        e1 = self.enc1(x)                                     # 28 x 28
        e2 = self.enc2(e1)                                    # 14 x 14
        e3 = self.enc3(e2)                                    # 7 x 7
        d2 = self.dec2(torch.cat([self.up2(e3), e2], 1))      # 14 x 14
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))      # 28 x 28
        return x + self.out(d1)                               # predicts the correction


def noisy(x: torch.Tensor, noise: float, generator: torch.Generator) -> torch.Tensor:
    """``x`` (normalized as :func:`data.fashion_mnist` returns it) plus Gaussian noise of
    standard deviation ``noise`` in pixel units."""
    return x + torch.randn(x.shape, generator=generator) * (noise / FASHION_MNIST_STD)


def psnr(model, x_noisy: torch.Tensor, x_clean: torch.Tensor, batch: int = 1000) -> float:
    """PSNR in dB of ``model``'s outputs against ``x_clean``, over pixel values in [0, 1]
    (outputs clipped to that range, as an image would be saved)."""
    model.eval()
    se = 0.0
    with torch.no_grad():
        for i in range(0, len(x_noisy), batch):
            pixels = (model(x_noisy[i:i + batch]) * FASHION_MNIST_STD + FASHION_MNIST_MEAN).clamp(0, 1)
            clean = x_clean[i:i + batch] * FASHION_MNIST_STD + FASHION_MNIST_MEAN
            se += (pixels - clean).square().sum().item()
    model.train()
    return 10 * math.log10(1.0 / (se / x_clean.numel()))


def train_one(name: str, options: Optional[dict], data, *, epochs: int, seed: int, batch_size: int, lr: float,
              width: int, noise: float, max_steps: Optional[int] = None, log_every: int = 50) -> dict:
    xtr, xte, xte_noisy = data
    torch.manual_seed(seed)
    model = UNet(width)
    torch._dynamo.reset()       # a fresh compile per run (Dynamo caches at most 8 graphs per function)
    run_model = model if options is None else torch.compile(model, backend="shiftquant", options=options)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)

    def batch_loss(idx):
        clean = xtr[idx]
        return F.mse_loss(run_model(noisy(clean, noise, g)), clean)

    start = time.perf_counter()
    steps = train_minibatches(name, batch_loss, len(xtr), opt, lr, epochs=epochs, batch_size=batch_size,
                              max_steps=max_steps, generator=g, log_every=log_every, start=start, digits=4)
    value = psnr(run_model, xte_noisy, xte)
    seconds = time.perf_counter() - start
    print(f"  [{name}] test PSNR {value:.2f} dB", flush=True)
    return result(FAMILY, name, options, METRIC, value, True, epochs=epochs, steps=steps, seed=seed, seconds=seconds)


def run(bits_list: Sequence[int] = (8, 6, 4), epochs: int = 1, seed: int = 0, *, train_limit: int = 20000,
        test_limit: Optional[int] = 2000, batch_size: int = 64, lr: float = 3e-3, width: int = 16,
        noise: float = 0.3, max_steps: Optional[int] = None, execution: str = "auto", include_float: bool = True,
        log_every: int = 50) -> List[dict]:
    """Train float (if ``include_float``) and one shiftquant run per entry of ``bits_list``;
    return one result dict per run (``value`` is the test PSNR in dB).  Raises
    :class:`data.DatasetMissing` when Fashion-MNIST is not installed."""
    xtr, _ = fashion_mnist("train", limit=train_limit)
    xte, _ = fashion_mnist("test", limit=test_limit)
    xte_noisy = noisy(xte, noise, torch.Generator().manual_seed(1234))      # the same for every run
    print(f"Fashion-MNIST: {len(xtr)} training / {len(xte)} test images, noise {noise}, U-Net width {width}, "
          f"{epochs} epoch(s), seed {seed}; noisy test inputs: {psnr(nn.Identity(), xte_noisy, xte):.2f} dB",
          flush=True)
    data = (xtr, xte, xte_noisy)
    kw = dict(epochs=epochs, seed=seed, batch_size=batch_size, lr=lr, width=width, noise=noise,
              max_steps=max_steps, log_every=log_every)
    return float_and_quantized_runs(train_one, bits_list, execution, include_float, data, **kw)


def print_table(results: List[dict]) -> None:
    from tabulate import tabulate

    base = next((r["value"] for r in results if r["bits"] is None), None)
    rows = [[r["run"], f"{r['value']:.2f}", "" if base is None else f"{r['value'] - base:+.2f}",
             f"{r['seconds']:.0f}"] for r in results]
    print()
    print(tabulate(rows, headers=["run", METRIC, "vs float (dB)", "time s"], tablefmt="github",
                   disable_numparse=True))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-limit", type=int, default=20000, help="training images used (of 60000)")
    p.add_argument("--test-limit", type=int, default=2000, help="test images scored (of 10000)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--width", type=int, default=16, help="channels at full resolution")
    p.add_argument("--noise", type=float, default=0.3, help="noise standard deviation in pixel units (0..1)")
    add_run_arguments(p, log_every=50)

    def run_args(args):
        return run(args.bits, args.epochs, args.seed, train_limit=args.train_limit, test_limit=args.test_limit,
                   batch_size=args.batch_size, lr=args.lr, width=args.width, noise=args.noise,
                   log_every=args.log_every, execution=args.execution)

    run_cli(p, argv, run_args, print_table)


if __name__ == "__main__":
    main()
