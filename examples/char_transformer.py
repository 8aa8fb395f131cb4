"""Train a small decoder-only transformer as a character-level language model on the gensim
"lee" news corpus, in float and with the shiftquant backend at several bit widths, and print
the validation loss (nats per character) and perplexity side by side.

    python examples/char_transformer.py                     # ~6 minutes on 2 CPU cores
    python examples/char_transformer.py --steps 3000 --d-model 256 --layers 4 --seq-len 128
    python examples/char_transformer.py --bits 4 --float-attention   # attention kept in float too

The model: token embedding + learned positions, pre-norm blocks (LayerNorm, or RMSNorm with
``--norm rms``; causal multi-head attention through ``F.scaled_dot_product_attention(...,
is_causal=True)``, or explicit ``q @ k^T`` / ``softmax @ v`` matmuls with ``--attention
matmul``; a GELU MLP), a final norm and a linear head.  Under the backend every linear layer and
both attention products (QK^T and PV) are quantized GEMMs, the norms become fully-quantized L1
norms, and the embedding tables stay float (a lookup is not a GEMM; the report says so).

The text is split 90/10 into training and validation characters; the validation loss is the
mean cross-entropy over ``--val-batches`` fixed random windows of the held-out 10%.

Data: gensim's test corpora (``pip install gensim``).
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
from data import CharTokenizer, char_corpus, lm_batches  # noqa: E402
from common import add_run_arguments, float_and_quantized_runs, result, run_cli, shiftquant_options  # noqa: E402

FAMILY = "Transformer (char LM, lee)"
# Keeps attention's QK^T and PV in float, whichever way the model computes them (the only
# matmuls in this model are attention's; its Linears are "linear" ops and stay quantized).
FLOAT_ATTENTION = {"*:scaled_dot_product_attention": None, "*:matmul": None}


class Attention(nn.Module):
    def __init__(self, d: int, heads: int, attention: str):
        super().__init__()
        self.heads, self.attention = heads, attention
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (t.reshape(B, T, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        if self.attention == "sdpa":
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            s = (q @ k.transpose(-2, -1)) * (D // self.heads) ** -0.5
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            a = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1) @ v
        return self.proj(a.transpose(1, 2).reshape(B, T, D))


def _norm(kind: str, d: int) -> nn.Module:
    return nn.LayerNorm(d) if kind == "layer" else nn.RMSNorm(d)


class Block(nn.Module):
    def __init__(self, d: int, heads: int, attention: str, norm: str):
        super().__init__()
        self.ln1 = _norm(norm, d)
        self.attn = Attention(d, heads, attention)
        self.ln2 = _norm(norm, d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class CharTransformer(nn.Module):
    def __init__(self, vocab: int, seq_len: int, d: int = 128, heads: int = 4, layers: int = 2,
                 attention: str = "sdpa", norm: str = "layer"):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq_len, d)
        self.blocks = nn.ModuleList(Block(d, heads, attention, norm) for _ in range(layers))
        self.ln_f = _norm(norm, d)
        self.head = nn.Linear(d, vocab)
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx):
        T = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(T, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def lm_loss(model, inputs, targets):
    logits = model(inputs)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def evaluate(model, val_batches) -> float:
    model.eval()
    with torch.no_grad():
        total = sum(lm_loss(model, x, y).item() for x, y in val_batches)
    model.train()
    return total / len(val_batches)


def train_one(name: str, options: Optional[dict], train_ids, val_batches, vocab: int, *, steps: int, seed: int,
              batch_size: int, seq_len: int, lr: float, d_model: int, heads: int, layers: int, attention: str,
              norm: str, log_every: int) -> dict:
    torch.manual_seed(seed)
    model = CharTransformer(vocab, seq_len, d_model, heads, layers, attention, norm)
    torch._dynamo.reset()       # a fresh compile per run (Dynamo caches at most 8 graphs per function)
    run_model = model if options is None else torch.compile(model, backend="shiftquant", options=options)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=max(steps, 20), pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step, (x, y) in enumerate(lm_batches(train_ids, seq_len, batch_size, generator=g, num_batches=steps), 1):
        loss = lm_loss(run_model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            print(f"  [{name}] step {step}/{steps} train loss {loss.item():.3f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    val = evaluate(run_model, val_batches)
    seconds = time.perf_counter() - start
    print(f"  [{name}] validation loss {val:.4f} nats/char, perplexity {math.exp(val):.3f}", flush=True)
    return result(FAMILY, name, options, "val loss (nats/char)", val, False, perplexity=math.exp(val), steps=steps,
                  epochs=steps * batch_size * seq_len / len(train_ids), seed=seed, seconds=seconds)


def run(bits_list: Sequence[int] = (8, 6, 4), epochs: Optional[float] = None, seed: int = 0, *, steps: int = 400,
        corpus: str = "lee", limit_chars: Optional[int] = None, batch_size: int = 32, seq_len: int = 64,
        lr: float = 3e-3, d_model: int = 64, heads: int = 4, layers: int = 2, attention: str = "sdpa",
        norm: str = "layer", val_batches: int = 20, execution: str = "auto", include_float: bool = True,
        extra_runs: Sequence[Tuple[str, dict]] = (), log_every: int = 100) -> List[dict]:
    """Train float (if ``include_float``), one shiftquant run per entry of ``bits_list`` and one
    per ``(name, options)`` in ``extra_runs``;
    return one result dict per run (``value``: validation loss in nats/char).  ``epochs``, when
    given, sets the number of steps to that many passes over the training characters
    (``epochs * train_chars / (batch_size * seq_len)``) instead of ``steps``.  Raises
    :class:`data.DatasetMissing` when gensim is not installed."""
    text = char_corpus(corpus, limit_chars)
    tok = CharTokenizer(text)
    ids = tok.encode(text)
    split = int(0.9 * len(ids))
    train_ids, val_ids = ids[:split], ids[split:]
    if epochs is not None:
        steps = max(1, round(epochs * len(train_ids) / (batch_size * seq_len)))
    vg = torch.Generator().manual_seed(1234)        # the same validation windows for every run
    val = list(lm_batches(val_ids, seq_len, batch_size, generator=vg, num_batches=val_batches))
    print(f"corpus {corpus!r}: {len(train_ids):,} training / {len(val_ids):,} validation characters, "
          f"vocabulary {tok.vocab_size}; d_model {d_model}, {layers} layers, {heads} heads, {attention} attention, "
          f"{norm} norm; {steps} steps of {batch_size}x{seq_len} "
          f"({steps * batch_size * seq_len / len(train_ids):.2f} epochs), seed {seed}", flush=True)
    kw = dict(steps=steps, seed=seed, batch_size=batch_size, seq_len=seq_len, lr=lr, d_model=d_model, heads=heads,
              layers=layers, attention=attention, norm=norm, log_every=log_every)
    results = float_and_quantized_runs(train_one, bits_list, execution, include_float, train_ids, val,
                                       tok.vocab_size, **kw)
    results += [train_one(name, opts, train_ids, val, tok.vocab_size, **kw) for name, opts in extra_runs]
    return results


def print_table(results: List[dict]) -> None:
    from tabulate import tabulate

    base = next((r["value"] for r in results if r["bits"] is None), None)
    rows = [[r["run"], f"{r['value']:.4f}", f"{r['perplexity']:.3f}",
             "" if base is None else f"{100 * (r['value'] - base) / base:+.2f}%", f"{r['seconds']:.0f}"]
            for r in results]
    print()
    print(tabulate(rows, headers=["run", "val loss (nats/char)", "perplexity", "loss vs float", "time s"],
                   tablefmt="github", disable_numparse=True))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--epochs", type=float, default=None, help="passes over the training text (overrides --steps)")
    p.add_argument("--corpus", choices=["lee", "enwiki"], default="lee")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--attention", choices=["sdpa", "matmul"], default="sdpa")
    p.add_argument("--norm", choices=["layer", "rms"], default="layer")
    p.add_argument("--val-batches", type=int, default=20)
    p.add_argument("--float-attention", action="store_true",
                   help="also train each bit width with attention's two products kept in float "
                        f"(overrides={FLOAT_ATTENTION}; every Linear stays quantized)")
    add_run_arguments(p, log_every=100)

    def run_args(args):
        extra = []
        if args.float_attention:
            for bits in args.bits:
                opts = dict(shiftquant_options(bits, args.execution), overrides=FLOAT_ATTENTION)
                extra.append((f"W{bits}A{bits}G{bits} (G={opts['groups']}), attention float", opts))
        return run(args.bits, args.epochs, args.seed, steps=args.steps, corpus=args.corpus,
                   batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, d_model=args.d_model,
                   heads=args.heads, layers=args.layers, attention=args.attention, norm=args.norm,
                   val_batches=args.val_batches, log_every=args.log_every, execution=args.execution,
                   extra_runs=extra)

    run_cli(p, argv, run_args, print_table)


if __name__ == "__main__":
    main()
