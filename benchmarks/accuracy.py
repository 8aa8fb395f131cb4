"""Accuracy of sub-8-bit training on real data: float vs W/A/G = 8/8/8, 6/6/6 and 4/4/4.

One model per family, each trained by its example (``examples/``) from the same seed in float
and with ``torch.compile(model, backend="shiftquant", options=...)``:

=============  =============================  ======================================  ======================
family         example                        data                                    metric
=============  =============================  ======================================  ======================
cnn            resnet_fashion_mnist.py        Fashion-MNIST (20k train, 10k test)     test accuracy
transformer    char_transformer.py            gensim "lee" news text, characters      val loss (nats/char)
gnn            gcn_cora.py                    Cora (140 labelled nodes, 1000 test)    test accuracy
rnn            rnn_ucr.py                     UCR Trace (100 train, 100 test)         test accuracy
unet           unet_denoise_fashion_mnist.py  Fashion-MNIST + noise (20k, 2k test)    test PSNR (dB)
separable      resnet_fashion_mnist.py        Fashion-MNIST (20k train, 10k test)     test accuracy
               ``--separable``: depthwise 3x3 + pointwise 1x1 convs (MobileNet style)
=============  =============================  ======================================  ======================

Quantized runs use the paper's recipe as sqcompile implements it: weights and activations with
nearest rounding, gradients with ShiftQuant (stochastic rounding) with as many groups as fit one
int8 GEMM (4 bits: G=4, 6 bits: G=3, 8 bits: G=1), and every Batch/Layer/InstanceNorm replaced by a
fully-quantized L1 norm (the default).  Targets from the paper (arXiv 2411.10948): a 4-bit CNN
within 1 point of float, a 6-bit transformer within 1% (relative) of the float loss, a 6-bit GNN
within 1 point.  The RNN, the U-Net denoiser (transposed convs, InstanceNorm) and the separable
CNN (depthwise convs) have no stated target.

The defaults took 24 minutes on 2 CPU cores shared with other work (one thread, load average
about 3.5; CNN 12 min, transformer 6, GNN 3, RNN 2.5; the U-Net family, added later, 8 min)
-- far shorter training than the paper's.
``--families`` runs a subset; scale up with ``--epochs`` and ``--seeds``:

    python benchmarks/accuracy.py --threads 1                              # all six families
    python benchmarks/accuracy.py --families cnn gnn --seeds 0 1 2 --epochs cnn=3 gnn=400
    python benchmarks/accuracy.py --families transformer --options '{"grad_outer_scale": false}'

``--options`` adds sqcompile options to every quantized run (validated before any training).

``--execution`` defaults to ``simulate`` for the CNN (same numbers as integer GEMMs, but on CPU
the int8 im2col path of convolutions is 2-3x slower than simulation, measured at 1 thread) and
``auto`` (integer GEMMs) for the others.  A family whose dataset is not installed is skipped
with the loader's message saying how to install it.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import common  # noqa: E402
import sqcompile  # noqa: E402
from data import DatasetMissing  # noqa: E402

# family -> (example module, unit of --epochs, default epochs, default execution, extra run() kwargs)
FAMILIES = {
    "cnn": ("resnet_fashion_mnist", "epochs over 20k images", 1, "simulate", {"train_limit": 20000, "log_every": 40}),
    "transformer": ("char_transformer", "epochs over 324k characters", 2.5, "auto", {"log_every": 100}),
    "gnn": ("gcn_cora", "full-batch epochs", 200, "auto", {"log_every": 100}),
    "rnn": ("rnn_ucr", "epochs over 100 series", 40, "auto", {"log_every": 20}),
    "unet": ("unet_denoise_fashion_mnist", "epochs over 20k images", 1, "auto", {"train_limit": 20000, "log_every": 100}),
    "separable": ("resnet_fashion_mnist", "epochs over 20k images", 1, "auto",
                  {"train_limit": 20000, "log_every": 40, "separable": True}),
}
# (family, bits) -> (paper target, checker(delta) -> bool); delta: points of accuracy, or relative loss change
TARGETS = {
    ("cnn", 4): ("within 1 point", lambda d: d >= -1.0),
    ("transformer", 6): ("within 1% of float loss", lambda d: d <= 0.01),
    ("gnn", 6): ("within 1 point", lambda d: d >= -1.0),
}


def run_family(family: str, bits, epochs, seeds, execution: str):
    module_name, _, _, _, extra = FAMILIES[family]
    module = __import__(module_name)
    results = []
    for seed in seeds:
        print(f"\n=== {family}: seed {seed}, {epochs} epochs, execution={execution} ===", flush=True)
        results += module.run(bits, epochs, seed, execution=execution, **extra)
    return results


def summarize(family: str, results, epochs, unit: str, execution: str):
    """One row per run name: mean (and std over seeds) of the metric, delta vs float, target."""
    by_run = {}
    for r in results:
        by_run.setdefault((r["bits"], r["run"]), []).append(r)
    float_runs = by_run.get((None, "float32"))
    base = statistics.mean(r["value"] for r in float_runs) if float_runs else None
    rows = []
    for (bits, name), runs in sorted(by_run.items(), key=lambda kv: -(kv[0][0] or 99)):
        values = [r["value"] for r in runs]
        mean = statistics.mean(values)
        higher = runs[0]["higher_is_better"]
        fmt = "{:.2f}" if higher else "{:.4f}"
        value = fmt.format(mean) + (f" ± {fmt.format(statistics.stdev(values))}" if len(values) > 1 else "")
        if runs[0]["metric"].startswith("val loss"):
            value += f" (ppl {math.exp(mean):.3f})"
        delta, target, met = "", "", ""
        if bits is not None and base is not None:
            d = mean - base if higher else (mean - base) / base
            delta_unit = " dB" if "dB" in runs[0]["metric"] else " pt"
            delta = f"{d:+.2f}{delta_unit}" if higher else f"{100 * d:+.2f}%"
            if (family, bits) in TARGETS:
                target, check = TARGETS[(family, bits)]
                met = "yes" if check(d) else "NO"
        seeds = ",".join(str(r["seed"]) for r in runs)
        rows.append([family, name, runs[0]["metric"], value, delta, target, met, f"{epochs:g} {unit}",
                     seeds, "float" if bits is None else execution,
                     f"{statistics.mean(r['seconds'] for r in runs):.0f}"])
    return rows


def parse_epochs(items):
    out = {}
    for item in items or []:
        family, sep, value = item.partition("=")
        if not sep or family not in FAMILIES:
            raise SystemExit(f"--epochs takes FAMILY=N with FAMILY in {list(FAMILIES)}, got {item!r}")
        out[family] = float(value) if family == "transformer" else int(value)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (each runs float and every bit width)")
    p.add_argument("--epochs", nargs="+", metavar="FAMILY=N",
                   help="epochs per family, e.g. cnn=3 transformer=2 gnn=400 rnn=80 (defaults: "
                        + ", ".join(f"{f}={v[2]}" for f, v in FAMILIES.items()) + ")")
    p.add_argument("--bits", type=int, nargs="+", default=[8, 6, 4], help="W/A/G bit widths (default 8 6 4)")
    p.add_argument("--execution", choices=["auto", "simulate", "integer"], default=None,
                   help="sqcompile execution for every family (default: simulate for cnn, auto otherwise)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's choice; 1 is much faster on a busy machine)")
    p.add_argument("--json", type=Path, default=None, help="also write every run's result dict here")
    p.add_argument("--options", type=json.loads, default={}, metavar="JSON",
                   help='more sqcompile options for every quantized run, e.g. \'{"grad_outer_scale": false}\'')
    args = p.parse_args(argv)
    if not isinstance(args.options, dict):
        raise SystemExit(f"--options takes a JSON object, got {args.options!r}")
    sqcompile.Config(**args.options)            # a bad name or value fails here, before any training
    common.EXTRA_OPTIONS.update(args.options)
    epochs = {f: v[2] for f, v in FAMILIES.items()}
    epochs.update(parse_epochs(args.epochs))
    if args.threads:
        torch.set_num_threads(args.threads)
    given = sys.argv[1:] if argv is None else argv
    command = "python benchmarks/accuracy.py " + " ".join(shlex.quote(a) for a in given)

    t0 = time.perf_counter()
    rows, skipped, everything = [], [], []
    for family in args.families:
        module_name, unit, _, default_execution, _ = FAMILIES[family]
        execution = args.execution or default_execution
        try:
            results = run_family(family, args.bits, epochs[family], args.seeds, execution)
        except DatasetMissing as e:
            print(f"\n{family}: skipped, {e}", flush=True)
            skipped.append(f"{family}: {e}")
            continue
        everything += results
        rows += summarize(family, results, epochs[family], unit, execution)

    print()
    print(f"Command: {command}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); total {time.perf_counter() - t0:.0f} s. "
          "Quantized runs: W/A/G bits as named, ShiftQuant gradients with G groups, L1 norms. "
          "Accuracy deltas in points, PSNR deltas in dB, loss deltas relative.")
    for s in skipped:
        print(f"skipped {s}")
    print()
    print(tabulate(rows, headers=["family", "run", "metric", "value", "vs float", "paper target", "met",
                                  "training", "seeds", "execution", "time s"],
                   tablefmt="github", disable_numparse=True))
    if args.json:
        args.json.write_text(json.dumps({"command": command, "results": everything}, indent=1))


if __name__ == "__main__":
    main()
