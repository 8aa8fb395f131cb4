"""How much a free outer scale would add to ShiftQuant on real transformer gradients.

ShiftQuant groups the channels of the GEMM's *reduction* axis on a power-of-two ladder below
one base scale per tensor.  The other axis of the gradient is free: a scale per row of ``dY``
in ``dX = dY W`` (per token) or per column in ``dW = dY^T X`` (per output feature) factors
out of the integer GEMM and would be applied in its epilogue, like the per-row activation
scales of the forward GEMMs.  This script measures what that would give, before any kernel
is changed: it trains the char transformer of ``examples/char_transformer.py`` in float for
a while, captures each Linear's input ``X``, weight ``W`` and output gradient ``dY``, and
compares the two backward products computed from quantized ``dY`` against the float ones
(SQNR in dB, higher is better, mean over stochastic-rounding draws):

* ``ShiftQuant``: what sqcompile does now (``numerics.shiftquant``, per-tensor base);
* ``+ outer``: ``dY`` divided by its maximum per free index first, ShiftQuant'd, multiplied
  back (one float per token for ``dX``, per output feature for ``dW``);
* ``per-channel``: one scale per reduction channel (the floor ShiftQuant approaches);
* ``per sequence`` (``dX`` only; not what sqcompile does for Linears: in training the char
  transformer gained less than seed noise, see the README): ShiftQuant's ranges
  per (sequence, output feature) instead of per output feature, which needs no other pass or
  GEMM (the expanded integers share one base scale however the ranges are grouped; conv input
  gradients are grouped per (sample, channel) so).

    python benchmarks/grad_scales.py                        # 6-bit, G=3; about a minute
    python benchmarks/grad_scales.py --bits 4 --groups 4
    python benchmarks/grad_scales.py --bits 8 --groups 1

Needs gensim for the corpus (``pip install gensim``).  A diagnosis, not a speed benchmark.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from tabulate import tabulate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import char_transformer as ct  # noqa: E402
from data import CharTokenizer, char_corpus, lm_batches  # noqa: E402
from sqcompile import numerics as N  # noqa: E402


def capture(steps: int, seed: int):
    """Train ``steps`` float steps, then one more batch's ``{linear: (X, dY, W, L)}`` (2-D, ``L``
    the sequence length: rows ``i * L .. (i + 1) * L - 1`` are sequence ``i``)."""
    torch.manual_seed(seed)
    text = char_corpus("lee")
    tok = CharTokenizer(text)
    ids = tok.encode(text)
    model = ct.CharTransformer(tok.vocab_size, 64, d=64, heads=4, layers=2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batches = lm_batches(ids, 64, 32, generator=torch.Generator().manual_seed(seed), num_batches=steps + 1)
    captured = {}
    for step, (x, y) in enumerate(batches):
        hooks = []
        if step == steps:
            for name, mod in model.named_modules():
                if isinstance(mod, torch.nn.Linear):
                    hooks.append(mod.register_forward_hook(_hook(name, captured)))
        loss = ct.lm_loss(model, x, y)
        opt.zero_grad()
        loss.backward()
        if step < steps:
            opt.step()
        for h in hooks:
            h.remove()
    return captured


def _hook(name, captured):
    def forward_hook(mod, inputs, out):
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])

        def grad_hook(dy):
            captured[name] = (x, dy.detach().reshape(-1, dy.shape[-1]), mod.weight.detach(), dy.shape[-2])
        out.register_hook(grad_hook)
    return forward_hook


def sqnr_db(ref: torch.Tensor, got: torch.Tensor) -> float:
    err = ((ref - got) ** 2).sum().clamp_min(1e-30)
    return 10 * math.log10(float((ref ** 2).sum() / err))


def quantized(dy: torch.Tensor, variant: str, bits: int, groups: int, reduction: int, seq: int):
    """``dy`` quantized for a GEMM that reduces over ``dy``'s dim ``reduction``, dequantized
    (None: the variant does not apply)."""
    if variant == "per sequence":
        if reduction == 0:
            return None
        v = dy.reshape(-1, seq, dy.shape[-1])
        return N.shiftquant(v, bits, groups, [0, 2], "stochastic").dequantize().reshape(dy.shape)
    if variant == "per-channel":
        return N.fake_quantize(dy.float(), bits, (reduction,), "stochastic")
    if variant == "ShiftQuant":
        return N.shiftquant(dy, bits, groups, [reduction], "stochastic").dequantize()
    outer = N.safe_div_scale(N.amax(dy, [1 - reduction]))    # one factor per free index
    return N.shiftquant(dy / outer, bits, groups, [reduction], "stochastic").dequantize() * outer


VARIANTS = ("ShiftQuant", "per sequence", "+ outer", "per-channel")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", type=int, default=6)
    p.add_argument("--groups", type=int, default=3)
    p.add_argument("--steps", type=int, default=150, help="float training steps before the capture")
    p.add_argument("--draws", type=int, default=3, help="stochastic-rounding draws per product")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    captured = capture(args.steps, args.seed)
    rows, sums = [], [0.0] * (2 * len(VARIANTS))
    for name, (x, dy, w, seq) in captured.items():
        dx, dw = dy @ w, dy.t() @ x
        row = [name]
        for col, (ref, reduction, product) in enumerate(((dx, 1, lambda q: q @ w), (dw, 0, lambda q: q.t() @ x))):
            for i, variant in enumerate(VARIANTS):
                draws = [quantized(dy, variant, args.bits, args.groups, reduction, seq) for _ in range(args.draws)]
                if draws[0] is None:
                    row.append("-")
                    sums[len(VARIANTS) * col + i] = None
                    continue
                v = sum(sqnr_db(ref, product(q)) for q in draws) / args.draws
                row.append(f"{v:.1f}")
                sums[len(VARIANTS) * col + i] += v / len(captured)
        rows.append(row)
    rows.append(["mean"] + ["-" if v is None else f"{v:.1f}" for v in sums])
    headers = ["Linear"] + [f"{g}: {v}" for g in ("dX", "dW") for v in VARIANTS]
    print(f"\n{args.bits}-bit gradients, G={args.groups}: SQNR (dB) of the backward products after "
          f"{args.steps} float steps, mean of {args.draws} draws\n")
    print(tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True))
    print("\nCommand: python benchmarks/grad_scales.py " + " ".join(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
