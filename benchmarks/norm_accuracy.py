"""L1 vs L2 normalization, float and 4-bit, on real data (the L1-norm issue's comparison).

For a ResNet-style CNN with BatchNorm (Fashion-MNIST) and a small character-level transformer
with LayerNorm (gensim's Lee corpus) it trains four variants with the same seed:

* float L2: plain PyTorch;
* float L1: ``options={"quantize": False}`` (only the norm replacement, no quantization);
* 4-bit ShiftQuant + L2: W4A4G4 with ``norm="keep"``;
* 4-bit ShiftQuant + L1: W4A4G4 with the default fully-quantized L1 norms.

    python benchmarks/norm_accuracy.py --threads 1
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

import torch
from tabulate import tabulate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
import char_transformer  # noqa: E402
import resnet_fashion_mnist  # noqa: E402


def variants(module):
    four = module.shiftquant_options(4)
    return [("float L1", {"quantize": False}), ("4-bit ShiftQuant + L2", dict(four, norm="keep"))]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cnn-train-limit", type=int, default=10000)
    p.add_argument("--lm-steps", type=int, default=300)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    cnn = resnet_fashion_mnist.run([4], epochs=1, seed=args.seed, train_limit=args.cnn_train_limit,
                                   extra_runs=variants(resnet_fashion_mnist))
    lm = char_transformer.run([4], seed=args.seed, steps=args.lm_steps, extra_runs=variants(char_transformer))
    order = {"float32": "float L2", "float L1": "float L1", "4-bit ShiftQuant + L2": "4-bit ShiftQuant + L2"}
    for family, results in (("CNN + BatchNorm, test acc %", cnn), ("transformer + LayerNorm, val loss", lm)):
        for r in results:
            rows.append([family, order.get(r["run"], "4-bit ShiftQuant + L1"), f"{r['value']:.4g}"])
    print()
    print(f"command: python benchmarks/norm_accuracy.py {shlex.join(argv if argv is not None else sys.argv[1:])}")
    print(tabulate(rows, headers=["model", "variant", "result"], tablefmt="github"))


if __name__ == "__main__":
    main()
