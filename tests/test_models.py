"""Model families under ``backend="shiftquant"``: each compiles into one graph (no graph break
of ours), trains, and quantizes what it should; dynamic batch sizes; DistributedDataParallel.

Models and data are tiny and generated, so every test takes seconds.

DDP pitfall (measured on torch 2.13, CPU, gloo; ``test_ddp_...`` below):
``torch.compile(DistributedDataParallel(nn.Sequential(...)))`` -- and ``ddp.compile()`` -- run
the model eagerly without a word: the backend is never called, nothing is quantized, and
training "works".  Dynamo does not trace DDP's own ``forward``; it compiles the frame of the
wrapped module's ``forward`` instead, and ``nn.Sequential.forward`` (like every ``torch.nn``
module's) lives in a file Dynamo skips.  A model class of your own (any ``nn.Module`` subclass
whose ``forward`` is in your code) compiles as one graph -- or several, one per DDP bucket,
through Dynamo's DDPOptimizer -- so wrap the layers in one:
``torch.compile(DDP(MyModel()), backend="shiftquant")``.  Compiling first,
``DDP(torch.compile(seq, backend="shiftquant"))``, also quantizes, but DDP then sees one opaque
backward and cannot overlap its all-reduce with the backward pass bucket by bucket.
"""
import copy
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters

import sqcompile  # noqa: F401  (registers the backend, turns on allow_rnn)
from sqcompile.backends import shiftquant_backend
from sqcompile.decisions import latest_records, records_for
from sqcompile.report import Report

from models import Block, train


pytestmark = pytest.mark.usefixtures("one_thread_fresh_dynamo")


class Counting:
    """The shiftquant backend, counting how often Dynamo calls it (once per compiled graph)."""

    def __init__(self, **options):
        self.options, self.calls, self.records = options, 0, []

    def __call__(self, gm, example_inputs):
        self.calls += 1
        compiled = shiftquant_backend(gm, example_inputs, options=self.options)
        self.records.append(latest_records()[-1])       # the record this call created
        return compiled


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------

class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class TinyResNet(nn.Module):
    def __init__(self, classes=4, width=8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = BasicBlock(width, width, 1)
        self.layer2 = BasicBlock(width, 2 * width, 2)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        return self.fc(self.layer2(self.layer1(self.stem(x))).mean((2, 3)))


class EinsumBlock(nn.Module):
    """Pre-norm transformer block whose causal attention is written with einsum."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(B, T, 3, self.heads, D // self.heads).unbind(2)
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) * (D // self.heads) ** -0.5
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        p = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1)
        a = torch.einsum("bhqk,bkhd->bqhd", p, v).reshape(B, T, D)
        x = x + self.proj(a)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyLM(nn.Module):
    """Token embedding + learned positions, one transformer block, final norm, linear head."""

    def __init__(self, vocab=12, seq=8, d=32, attention="sdpa"):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.02 * torch.randn(seq, d))
        self.block = EinsumBlock(d) if attention == "einsum" else Block(d, sdpa=True)
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        return self.head(self.ln_f(self.block(x)))


class DepthwiseNet(nn.Module):
    """Depthwise conv1d over a sequence, then a depthwise + pointwise conv2d (MobileNet style)."""

    def __init__(self, channels=4, classes=3):
        super().__init__()
        self.dw1 = nn.Conv1d(channels, channels, 5, padding=2, groups=channels)
        self.dw2 = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.pw2 = nn.Conv2d(channels, 8, 1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):                                  # x: [B, C, 36]
        h = F.relu(self.dw1(x)).reshape(x.shape[0], x.shape[1], 6, 6)
        h = F.relu(self.pw2(self.dw2(h)))
        return self.fc(h.mean((2, 3)))


class GCN(nn.Module):
    """Two GCN layers; ``A_hat`` applied with a gather + index_add over the edges, or as a
    dense matmul."""

    def __init__(self, edge_index, n, features, classes, hidden=16, dense=False):
        super().__init__()
        src, dst = edge_index
        deg = torch.ones(n).index_add_(0, dst, torch.ones(dst.numel()))
        self.dense = dense
        if dense:
            adj = torch.diag(1 / deg)
            adj[dst, src] = (deg[src] * deg[dst]).rsqrt()
            self.register_buffer("adj", adj)
        else:
            self.register_buffer("src", src)
            self.register_buffer("dst", dst)
            self.register_buffer("self_w", (1 / deg)[:, None])
            self.register_buffer("edge_w", (deg[src] * deg[dst]).rsqrt()[:, None])
        self.lin1, self.lin2 = nn.Linear(features, hidden), nn.Linear(hidden, classes)

    def propagate(self, h):
        if self.dense:
            return self.adj @ h
        return (h * self.self_w).index_add(0, self.dst, h[self.src] * self.edge_w)

    def forward(self, x):
        return self.propagate(self.lin2(F.relu(self.propagate(self.lin1(x)))))


class RNNClassifier(nn.Module):
    def __init__(self, cell="lstm", features=3, hidden=16, classes=2):
        super().__init__()
        if cell.startswith("rnn_"):
            self.rnn = nn.RNN(features, hidden, nonlinearity=cell[4:], batch_first=True)
        else:
            self.rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell](features, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.fc(out[:, -1])


# --------------------------------------------------------------------------------------------
# Generated data (learnable, so a few steps visibly lower the loss)
# --------------------------------------------------------------------------------------------

def textures(n, g):
    """Four 8x8 texture classes (stripes both ways, checkerboard, flat) plus noise."""
    i = torch.arange(8)
    patterns = torch.stack([(i[:, None] % 2).expand(8, 8), (i[None, :] % 2).expand(8, 8),
                            (i[:, None] + i[None, :]) % 2, torch.zeros(8, 8, dtype=torch.long)]).float()
    y = torch.arange(n) % 4
    return patterns[y].unsqueeze(1) * 2 - 1 + 0.5 * torch.randn(n, 1, 8, 8, generator=g), y


def copy_task(n, g, vocab=12, seq=8):
    """Next-token targets that need attention: predict the previous token."""
    idx = torch.randint(0, vocab, (n, seq), generator=g)
    return idx, torch.cat([idx[:, :1], idx[:, :-1]], dim=1)


def waves(n, g, channels=4, length=36, classes=3):
    y = torch.arange(n) % classes
    t = torch.arange(length).float()
    x = torch.sin(t * (y[:, None, None] + 1) * 0.4 + torch.rand(n, channels, 1, generator=g) * 6)
    return x + 0.2 * torch.randn(n, channels, length, generator=g), y


def random_graph(n, g, features=8, classes=3, edges=60):
    """Nodes of three classes; features a noisy one-hot of the class; edges mostly in-class."""
    y = torch.arange(n) % classes
    src = torch.randint(0, n, (edges,), generator=g)
    dst = (src + classes * torch.randint(1, 4, (edges,), generator=g)) % n      # same class
    ei = torch.cat([torch.stack([src, dst]), torch.stack([dst, src])], 1)
    ei = torch.unique(ei[:, ei[0] != ei[1]], dim=1)
    x = F.one_hot(y, features).float() + 0.5 * torch.randn(n, features, generator=g)
    return ei, x, y


def sequences(n, g, length=10, features=3):
    x = torch.randn(n, length, features, generator=g)
    return x, (x[:, :, 0].sum(1) > 0).long()


def lm_loss(logits, y):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def cls_loss(logits, y):
    return F.cross_entropy(logits, y)


def compile_train_check(model, x, y, loss_fn, steps=12, lr=1e-2, **options):
    """Compile with the backend, train ``steps`` steps on one batch, and check: one graph (one
    backend call, no graph break), finite and decreasing loss.  Returns the graph's record."""
    backend = Counting(**options)
    run = torch.compile(model, backend=backend)
    losses = train(run, model.parameters(), [(x, y)] * steps, loss_fn, lr)
    assert backend.calls == 1, f"{backend.calls} graphs compiled for one model and one input shape"
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert all(math.isfinite(v) for v in losses), losses
    assert sum(losses[-3:]) < 0.9 * sum(losses[:3]), losses
    recs = records_for(list(model.parameters()))
    assert len(recs) == 1
    return recs[0]


def gemms(rec):
    return [d for d in rec.decisions if d.kind == "gemm"]


def norms(rec):
    return [d for d in rec.decisions if d.kind == "norm"]


# --------------------------------------------------------------------------------------------
# Families: one graph, training, decisions
# --------------------------------------------------------------------------------------------

def test_resnet_with_batchnorm_is_one_graph_trains_and_quantizes_every_conv():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = TinyResNet()
    x, y = textures(16, g)
    rec = compile_train_check(model, x, y, cls_loss)
    convs = sorted(d.module_path for d in gemms(rec) if d.op == "conv2d")
    assert convs == ["layer1.conv1", "layer1.conv2", "layer2.conv1", "layer2.conv2", "layer2.shortcut.0", "stem.0"]
    assert all(d.quantized and d.execution == "int8-cpu" for d in gemms(rec)), [d.execution_label for d in gemms(rec)]
    bns = norms(rec)
    assert len(bns) == 6 and all(d.op == "batch_norm" and d.quantized for d in bns)
    # the L1 norm still updates the module's running statistics
    assert model.layer1.bn1.num_batches_tracked.item() == 12


@pytest.mark.parametrize("attention", ["sdpa", "einsum"])
def test_transformer_lm_is_one_graph_quantizes_attention_and_keeps_embedding_float(attention):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = TinyLM(attention=attention)
    x, y = copy_task(16, g)
    rec = compile_train_check(model, x, y, lm_loss, steps=15)
    ops = sorted((d.module_path, d.op) for d in gemms(rec))
    linears = [("block.fc1", "linear"), ("block.fc2", "linear"), ("block.proj", "linear"),
               ("block.qkv", "linear"), ("head", "linear")]
    attn = [("block", "scaled_dot_product_attention")] if attention == "sdpa" else [("block", "einsum")] * 2
    assert ops == sorted(linears + attn + [("tok", "embedding")])
    by_op = {d.op: d for d in gemms(rec)}
    emb = by_op.pop("embedding")
    assert not emb.quantized and emb.execution == "float" and "embedding" in emb.reason
    assert all(d.quantized for d in by_op.values())
    # QK^T and PV quantize both operands as activations
    for d in gemms(rec):
        if d.op in ("einsum", "scaled_dot_product_attention"):
            assert d.weight_bits == d.act_bits == 4 and "activation" in d.weight_quantizer
    assert [d.op for d in norms(rec)] == ["layer_norm"] * 3 and all(d.quantized for d in norms(rec))
    # both attention GEMMs run as int8 GEMMs in forward and backward
    assert rec.graphs["forward"].count("sqcompile.int8_mm(") == 7


def test_depthwise_conv1d_and_conv2d_run_as_integer_convolutions():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = DepthwiseNet()
    x, y = waves(12, g)
    rec = compile_train_check(model, x, y, cls_loss, steps=15, lr=5e-2)
    by_path = {d.module_path: d for d in gemms(rec)}
    for path, op in [("dw1", "conv1d"), ("dw2", "conv2d")]:
        d = by_path[path]
        assert d.op == op and d.quantized and d.execution == "int8-cpu" and d.reason is None
    assert rec.graphs["forward"].count("int8_grouped_conv(") == 2
    assert by_path["pw2"].execution == "int8-cpu" and by_path["pw2"].reason is None
    assert by_path["fc"].quantized


@pytest.mark.parametrize("dense", [False, True], ids=["index_add", "dense_adjacency"])
def test_gcn_is_one_graph_and_trains(dense):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    ei, x, y = random_graph(30, g)
    model = GCN(ei, 30, x.shape[1], 3, dense=dense)
    rec = compile_train_check(model, x, y, cls_loss, steps=15)
    ops = sorted((d.module_path, d.op) for d in gemms(rec))
    if dense:   # A_hat @ H is a quantized GEMM with two activation operands
        assert ops == [("", "matmul"), ("", "matmul"), ("lin1", "linear"), ("lin2", "linear")]
        assert all(d.weight_quantizer.endswith("(activation)") for d in gemms(rec) if d.op == "matmul")
    else:       # the gather / index_add aggregation is not a GEMM: only X W is quantized
        assert ops == [("lin1", "linear"), ("lin2", "linear")]
        assert "index_add" in rec.graphs["rewritten"]
    assert all(d.quantized for d in gemms(rec))


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
def test_rnn_classifier_is_one_graph_with_quantized_recurrence(cell):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = RNNClassifier(cell)
    x, y = sequences(16, g)
    rec = compile_train_check(model, x, y, cls_loss, steps=15)
    by_op = {d.op: d for d in gemms(rec)}
    assert sorted(by_op) == sorted([cell, "linear"])
    assert by_op[cell].quantized and by_op[cell].module_path == "rnn"
    assert by_op[cell].grad_quantizer == "ShiftQuant G=4, stochastic, outer scale"
    # unrolled: one input projection for all steps + one recurrent GEMM per step (10 steps)
    assert rec.graphs["forward"].count("sqcompile.int8_mm(") == 1 + 10 + 1


# --------------------------------------------------------------------------------------------
# Dynamic batch sizes
# --------------------------------------------------------------------------------------------

_DYNAMIC = {
    "resnet": (lambda: TinyResNet(), lambda n, g: textures(n, g), cls_loss),
    "sdpa_lm": (lambda: TinyLM(attention="sdpa"), lambda n, g: copy_task(n, g), lm_loss),
    "einsum_lm": (lambda: TinyLM(attention="einsum"), lambda n, g: copy_task(n, g), lm_loss),
    "lstm": (lambda: RNNClassifier("lstm"), lambda n, g: sequences(n, g), cls_loss),
}


def _batches(make_data, sizes=(8, 5, 3)):
    g = torch.Generator().manual_seed(0)
    return [make_data(n, g) for n in sizes]


@pytest.mark.parametrize("family", list(_DYNAMIC))
def test_changing_batch_size_trains_and_recompiles_no_more_than_torch_does(family):
    """Batches of 8, then 5, then 3: training goes on, and the backend is called as often as
    Dynamo compiles the model for a trivial backend (static 8, then one dynamic graph)."""
    make_model, make_data, loss_fn = _DYNAMIC[family]
    torch.manual_seed(0)
    model = make_model()
    reference_model = copy.deepcopy(model)
    ours = Counting()
    losses = train(torch.compile(model, backend=ours), model.parameters(), _batches(make_data), loss_fn)
    assert all(math.isfinite(v) for v in losses)
    assert all(torch.isfinite(p).all() for p in model.parameters())

    torch._dynamo.reset()
    reference = CompileCounter()
    train(torch.compile(reference_model, backend=reference), reference_model.parameters(), _batches(make_data),
          loss_fn)
    assert reference.frame_count == 2
    # The backend must not specialize the symbolic batch size (an int() on a SymInt installs
    # a guard): it recompiles exactly as often as torch does with a counting backend.
    assert ours.calls == reference.frame_count
    # the dynamic graph's GEMMs count their FLOPs at the size it was compiled for (5), so
    # inner="auto" picks Inductor for it when the static graph got Inductor
    assert Report(ours.records[-1:]).summary()["gemm_flops"] > 0


@pytest.mark.parametrize("family", list(_DYNAMIC))
def test_dynamic_true_compiles_as_often_as_torch_and_counts_flops_at_the_compiled_sizes(family):
    """``torch.compile(..., dynamic=True)`` makes every size symbolic, also the ones Dynamo then
    fixes by a guard (in-features matching a weight): training goes on, the backend compiles
    as many graphs as Dynamo does for a counting backend, and the report's GEMM FLOPs (what
    ``inner="auto"`` decides by) are those of a static compile at the first batch's sizes,
    not zero or garbage.  (Dynamic-mode compiles may also be restarted by AOTAutograd to
    specialize float scalars; only the compiles that finish count.)"""
    make_model, make_data, loss_fn = _DYNAMIC[family]
    torch.manual_seed(0)
    model = make_model()
    static_model, reference_model = copy.deepcopy(model), copy.deepcopy(model)
    batches = _batches(make_data, (6, 5, 3))      # no batch equal to another size: no duck-sizing guard
    ours = Counting()
    losses = train(torch.compile(model, backend=ours, dynamic=True), model.parameters(), batches, loss_fn)
    assert all(math.isfinite(v) for v in losses)

    torch._dynamo.reset()
    reference = CompileCounter()
    train(torch.compile(reference_model, backend=reference, dynamic=True), reference_model.parameters(), batches,
          loss_fn)
    assert len(ours.records) == reference.frame_count == 1

    torch._dynamo.reset()
    static = Counting()
    train(torch.compile(static_model, backend=static, dynamic=False), static_model.parameters(), batches[:1],
          loss_fn)
    flops = Report(ours.records[:1]).summary()["gemm_flops"]
    assert flops == Report(static.records).summary()["gemm_flops"]
    assert flops > 0


# --------------------------------------------------------------------------------------------
# DistributedDataParallel (two processes, gloo)
# --------------------------------------------------------------------------------------------

class DDPNet(nn.Module):
    """The layers of a small CNN in a model class of our own (see the module docstring)."""

    def __init__(self, hidden=16):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, 4)

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(h)))))


def _ddp_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        # bucket_cap_mb=1 with a 1 MB (512x512) hidden layer: several DDP buckets (DDPOptimizer refuses caps
        # below its 1 MB first bucket)
        for name, make, bucket_mb in [("custom", DDPNet, 25.0), ("custom_small_buckets", lambda: DDPNet(512), 1.0),
                                      ("sequential", lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(),
                                                                           nn.Linear(16, 4)), 25.0)]:
            torch._dynamo.reset()
            torch.manual_seed(0)                     # the same initial weights on every rank
            model = make()
            init = [p.detach().clone() for p in model.parameters()]
            backend = Counting(overrides={"fc3": None})       # a path in the wrapped model, not "module.fc3"
            run = torch.compile(nn.parallel.DistributedDataParallel(model, bucket_cap_mb=bucket_mb), backend=backend)
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            g = torch.Generator().manual_seed(100 + rank)   # different data on each rank
            for _ in range(4):
                x = torch.randn(8, 1, 6, 6, generator=g) if name != "sequential" else torch.randn(8, 8, generator=g)
                loss = F.cross_entropy(run(x), torch.randint(0, 4, (8,), generator=g))
                opt.zero_grad()
                loss.backward()
                opt.step()
            flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
            gathered = [torch.empty_like(flat) for _ in range(world)]
            dist.all_gather(gathered, flat)
            results[name] = {
                "calls": backend.calls,
                "equal_across_ranks": all(torch.equal(gathered[0], t) for t in gathered[1:]),
                "moved": not all(torch.equal(a, p) for a, p in zip(init, model.parameters())),
                "quantized": any(d.quantized for r in backend.records for d in r.decisions),
                "reported": sorted({d.module_path for r in records_for(list(model.parameters())) for d in r.decisions}),
                "float_paths": sorted({d.module_path for r in backend.records for d in r.decisions if not d.quantized}),
            }
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_keep_parameters_equal_and_bare_sequential_is_not_compiled(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for res in results:
        # recommended pattern: torch.compile(DDP(MyModel())) is compiled, quantized, and the
        # ranks, fed different data, end with bit-identical parameters
        for name in ("custom", "custom_small_buckets"):
            assert res[name]["calls"] >= 1 and res[name]["quantized"], (name, res[name])
            assert res[name]["moved"] and res[name]["equal_across_ranks"], (name, res[name])
            assert res[name]["float_paths"] == ["fc3"], (name, res[name])
        # DDPOptimizer splits the graph at bucket boundaries: one backend call per piece
        assert res["custom_small_buckets"]["calls"] > res["custom"]["calls"] == 1
        # sqcompile.report(model) finds the decisions, also of every piece DDPOptimizer compiled
        for name in ("custom", "custom_small_buckets"):
            assert res[name]["reported"] == ["bn", "conv", "fc1", "fc2", "fc3"], (name, res[name])
        # the pitfall (torch 2.13): a bare nn.Sequential under DDP never reaches the backend
        seq = res["sequential"]
        assert seq["calls"] == 0 and not seq["quantized"] and seq["moved"] and seq["equal_across_ranks"]
