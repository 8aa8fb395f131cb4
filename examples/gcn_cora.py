"""Train a 2-layer graph convolutional network (Kipf & Welling) on the Cora citation graph, in
float and with the shiftquant backend at several bit widths, and print the test accuracies.

    python examples/gcn_cora.py                         # ~3 minutes on 2 CPU cores
    python examples/gcn_cora.py --epochs 400 --hidden 64 --aggregation dense

The model is ``A_hat relu(A_hat X W1) W2`` with ``A_hat = D^-1/2 (A + I) D^-1/2``, dropout on
the features and the hidden layer, trained full-batch with Adam on the 140 labelled nodes.
Two ways to multiply by ``A_hat`` (``--aggregation``):

* ``index`` (default): a gather of the source rows (``h[src] * w``) and an ``index_add`` onto
  the targets, over the 10556 directed edges plus the self loops.  Dynamo traces these index
  ops into the graph without a break; they are not GEMMs, so the aggregation stays float (it is
  a weighted sum of already-quantized-GEMM outputs) and only ``X W`` is quantized.
* ``dense``: ``A_hat`` as a dense ``[2708, 2708]`` buffer and ``A_hat @ (X W)`` as a matmul,
  which the backend quantizes like any GEMM (``A_hat`` per row at ``act_bits``, ``X W`` as the
  other activation operand, the gradient with ShiftQuant).  This is the fully-quantized
  variant; it costs 2708x2708 multiply-adds per feature.

``torch.sparse.mm`` is not offered: Dynamo (torch 2.13) does not compile a frame holding a
sparse tensor at all -- it runs it eagerly without saying so, so the backend would never see
the model.

Data: Cora from the ``graphdatascience`` package (``pip install --no-deps graphdatascience
pyarrow``).
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
from data import cora  # noqa: E402
from common import add_run_arguments, float_and_quantized_runs, result, run_cli  # noqa: E402

FAMILY = "GNN (GCN, Cora)"


def gcn_norm(edge_index: torch.Tensor, num_nodes: int):
    """Self-loop weights ``1/deg`` and edge weights ``1/sqrt(deg_s deg_t)`` of ``D^-1/2 (A+I) D^-1/2``
    (``edge_index`` holds every edge in both directions, no self loops)."""
    src, dst = edge_index
    deg = torch.ones(num_nodes).index_add_(0, dst, torch.ones(dst.numel()))     # + 1 for the self loop
    return 1.0 / deg, (deg[src] * deg[dst]).rsqrt()


class GCN(nn.Module):
    def __init__(self, edge_index: torch.Tensor, num_nodes: int, in_features: int, hidden: int, classes: int,
                 dropout: float = 0.5, aggregation: str = "index"):
        super().__init__()
        if aggregation not in ("index", "dense"):
            raise ValueError(f"aggregation must be 'index' or 'dense', got {aggregation!r}")
        self.aggregation, self.dropout = aggregation, dropout
        self_w, edge_w = gcn_norm(edge_index, num_nodes)
        if aggregation == "dense":
            adj = torch.diag(self_w)
            adj[edge_index[1], edge_index[0]] = edge_w
            self.register_buffer("adj", adj)
        else:
            self.register_buffer("src", edge_index[0].clone())
            self.register_buffer("dst", edge_index[1].clone())
            self.register_buffer("self_weight", self_w[:, None])
            self.register_buffer("edge_weight", edge_w[:, None])
        self.lin1 = nn.Linear(in_features, hidden)
        self.lin2 = nn.Linear(hidden, classes)

    def propagate(self, h):
        if self.aggregation == "dense":
            return self.adj @ h
        return (h * self.self_weight).index_add(0, self.dst, h[self.src] * self.edge_weight)

    def forward(self, x):
        x = F.dropout(x, self.dropout, self.training)
        h = F.relu(self.propagate(self.lin1(x)))
        h = F.dropout(h, self.dropout, self.training)
        return self.propagate(self.lin2(h))


def accuracy(logits, y, idx) -> float:
    return (logits[idx].argmax(1) == y[idx]).float().mean().item()


def train_one(name: str, options: Optional[dict], data: dict, *, epochs: int, seed: int, hidden: int, lr: float,
              weight_decay: float, dropout: float, aggregation: str, log_every: int) -> dict:
    x, y = data["x"], data["y"]
    train_idx, val_idx, test_idx = (data[k].nonzero().flatten() for k in ("train_mask", "val_mask", "test_mask"))
    torch.manual_seed(seed)
    model = GCN(data["edge_index"], x.shape[0], x.shape[1], hidden, data["num_classes"], dropout, aggregation)
    torch._dynamo.reset()       # a fresh compile per run (Dynamo caches at most 8 graphs per function)
    run_model = model if options is None else torch.compile(model, backend="shiftquant", options=options)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        loss = F.cross_entropy(run_model(x)[train_idx], y[train_idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if epoch % log_every == 0 or epoch == epochs:
            model.eval()
            with torch.no_grad():
                val = accuracy(run_model(x), y, val_idx)
            print(f"  [{name}] epoch {epoch}/{epochs} loss {loss.item():.3f} val acc {100 * val:.1f}% "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    model.eval()
    with torch.no_grad():
        logits = run_model(x)
    test, val = accuracy(logits, y, test_idx), accuracy(logits, y, val_idx)
    seconds = time.perf_counter() - start
    print(f"  [{name}] test accuracy {100 * test:.2f}%", flush=True)
    return result(FAMILY, name, options, "test acc %", 100 * test, True, val=100 * val, epochs=epochs,
                  steps=epochs, seed=seed, seconds=seconds)


def run(bits_list: Sequence[int] = (8, 6, 4), epochs: int = 200, seed: int = 0, *, hidden: int = 16,
        lr: float = 0.01, weight_decay: float = 5e-4, dropout: float = 0.5, aggregation: str = "index",
        num_nodes: Optional[int] = None, execution: str = "auto", include_float: bool = True,
        log_every: int = 50) -> List[dict]:
    """Train float (if ``include_float``) and one shiftquant run per entry of ``bits_list``;
    return one result dict per run (``value``: test accuracy in percent).  ``seed`` sets both
    the initialization and the random train/val/test split.  ``num_nodes`` keeps the subgraph
    of the first ``num_nodes`` nodes (for quick tests).  Raises :class:`data.DatasetMissing`
    when the Cora files are not installed."""
    data = cora(seed=seed)
    if num_nodes is not None:
        data = _subgraph(data, num_nodes)
    x = data["x"]
    data["x"] = x / x.sum(1, keepdim=True).clamp_min(1)          # row-normalized bag of words
    print(f"Cora: {x.shape[0]} nodes, {data['edge_index'].shape[1]} directed edges, {x.shape[1]} features; "
          f"{int(data['train_mask'].sum())}/{int(data['val_mask'].sum())}/{int(data['test_mask'].sum())} "
          f"train/val/test nodes; hidden {hidden}, {aggregation} aggregation, {epochs} epochs, seed {seed}",
          flush=True)
    kw = dict(epochs=epochs, seed=seed, hidden=hidden, lr=lr, weight_decay=weight_decay, dropout=dropout,
              aggregation=aggregation, log_every=log_every)
    return float_and_quantized_runs(train_one, bits_list, execution, include_float, data, **kw)


def _subgraph(data: dict, n: int) -> dict:
    src, dst = data["edge_index"]
    keep = (src < n) & (dst < n)
    out = {k: (v[:n] if isinstance(v, torch.Tensor) and v.shape[0] == data["x"].shape[0] else v)
           for k, v in data.items()}
    out["edge_index"] = data["edge_index"][:, keep]
    return out


def print_table(results: List[dict]) -> None:
    from tabulate import tabulate

    base = next((r["value"] for r in results if r["bits"] is None), None)
    rows = [[r["run"], f"{r['value']:.2f}", "" if base is None else f"{r['value'] - base:+.2f}",
             f"{r['val']:.2f}", f"{r['seconds']:.0f}"] for r in results]
    print()
    print(tabulate(rows, headers=["run", "test acc %", "vs float (points)", "val acc %", "time s"],
                   tablefmt="github", disable_numparse=True))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--dropout", type=float, default=0.5)
    p.add_argument("--aggregation", choices=["index", "dense"], default="index",
                   help="index_add over the edges (float aggregation) or a dense A_hat @ H matmul (quantized)")
    add_run_arguments(p, log_every=50)
    def run_args(args):
        return run(args.bits, args.epochs, args.seed, hidden=args.hidden, lr=args.lr,
                   weight_decay=args.weight_decay, dropout=args.dropout, aggregation=args.aggregation,
                   log_every=args.log_every, execution=args.execution)

    run_cli(p, argv, run_args, print_table)


if __name__ == "__main__":
    main()
