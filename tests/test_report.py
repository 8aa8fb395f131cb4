"""The per-op precision report (sqcompile.report), explain() and the command line.

Every test compiles a small model, runs a step or a few, and checks the report against what
the model contains: one row per matmul / conv (and norm, once the L1 pass records norms),
with the module paths, bits and execution the options ask for.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sqcompile  # noqa: F401  (registers the backend)
from sqcompile.explain import Explanation, explain
from sqcompile.report import ROW_KEYS, Report, report

ROOT = Path(__file__).resolve().parents[1]
NORM_TYPES = (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------

class ResBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class ResNetish(nn.Module):
    def __init__(self, c=8, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.layer1 = nn.Sequential(ResBlock(c))
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = self.layer1(F.relu(self.bn(self.stem(x))))
        return self.fc(x.mean((2, 3)))


class Attention(nn.Module):
    def __init__(self, d, heads, sdpa):
        super().__init__()
        self.heads, self.sdpa = heads, sdpa
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = (t.reshape(B, T, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        if self.sdpa:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            a = torch.softmax((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5, dim=-1) @ v
        return self.proj(a.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    def __init__(self, d=32, heads=4, sdpa=False):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d), Attention(d, heads, sdpa)
        self.ln2, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Transformer(nn.Module):
    """Block 0 writes attention as explicit matmuls, block 1 calls F.scaled_dot_product_attention."""

    def __init__(self, d=32):
        super().__init__()
        self.blocks = nn.ModuleList([Block(d, sdpa=False), Block(d, sdpa=True)])
        self.head = nn.Linear(d, 8)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def compiled_step(model, x, steps=1, **options):
    cm = torch.compile(model, backend="shiftquant", options=options)
    for _ in range(steps):
        cm(x).float().sum().backward()
    return cm


def gemm_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def check_norm_rows(rows, model):
    """Norm rows appear once the L1 pass records norm decisions: one per norm module."""
    norm_rows = [r for r in rows if r["kind"] == "norm"]
    if norm_rows:
        expected = {n for n, m in model.named_modules() if isinstance(m, NORM_TYPES)}
        assert sorted(r["module"] for r in norm_rows) == sorted(expected)
        for r in norm_rows:
            assert r["norm_bits"] is not None and r["shapes"]


@pytest.fixture(scope="module")
def cnn_stats_report():
    # A fresh compile: Dynamo would otherwise reuse the graph an earlier test compiled for
    # another ResNetish instance, and the record (with its step count) is per graph.
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ResNetish()
    cm = compiled_step(model, torch.randn(4, 3, 8, 8), steps=2, collect_stats=True)
    return report(cm), model


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------

def test_cnn_one_row_per_gemm_with_paths_bits_execution():
    torch.manual_seed(0)
    model = ResNetish()
    cm = compiled_step(model, torch.randn(2, 3, 8, 8), weight_bits=4, act_bits=6, grad_bits=5, groups=3)
    rows = report(cm).rows()
    gemm_rows = [r for r in rows if r["kind"] == "gemm"]
    expected = gemm_modules(model)
    assert sorted(r["module"] for r in gemm_rows) == sorted(expected)      # exactly one row each
    for r in gemm_rows:
        op = "linear" if isinstance(expected[r["module"]], nn.Linear) else "conv2d"
        assert r["op"] == op and r["quantized"] and r["execution"] == "int8-cpu"
        assert (r["weight_bits"], r["act_bits"], r["grad_bits"], r["groups"]) == (4, 6, 5, 3)
        assert "ShiftQuant" in r["grad_quantizer"] and r["flops"] > 0
    stem = next(r for r in rows if r["module"] == "stem")
    assert stem["shapes"] == [[2, 3, 8, 8], [8, 3, 3, 3]]
    check_norm_rows(rows, model)
    s = report(cm).summary()
    assert s["integer_flops_fraction"] == 1.0 and s["quantized_flops_fraction"] == 1.0
    assert s["ops"] == len(rows) and s["gemms"] == len(expected) and s["graphs"] == 1
    text = str(report(cm))
    assert "layer1.0.conv1" in text and "int8-cpu" in text and "Summary:" in text
    assert "SQNR" not in text                       # no stats collected: no stats columns


def test_text_names_the_cpu_gemm_engine(monkeypatch):
    from sqcompile.kernels import amx
    cm = compiled_step(ResNetish(), torch.randn(2, 3, 8, 8))
    monkeypatch.setenv(amx.ENGINE_VARIABLE, "onednn")
    assert "int8-cpu GEMMs run on oneDNN torch._int_mm" in str(report(cm))
    monkeypatch.setenv(amx.ENGINE_VARIABLE, "float")
    assert "int8-cpu GEMMs run on exact int8 products as float32 GEMMs" in str(report(cm))
    from sqcompile.kernels import avx2
    if avx2.status()[0]:
        monkeypatch.setenv(amx.ENGINE_VARIABLE, "avx2")
        assert "int8-cpu GEMMs run on sqcompile's AVX2 int8 kernel (VPMADDUBSW" in str(report(cm))
    monkeypatch.setenv(amx.ENGINE_VARIABLE, "auto")
    expected = "AMX-int8 kernel" if amx.status()[0] else "oneDNN torch._int_mm" if amx.has_vnni() else \
        "AVX2 int8 kernel" if avx2.status()[0] else "float32 GEMMs (K in chunks of 1024; not AMX: "
    assert "int8-cpu GEMMs run on" in str(report(cm)) and expected in str(report(cm))
    monkeypatch.setenv(amx.ENGINE_VARIABLE, "bogus")
    assert "SQCOMPILE_CPU_GEMM='bogus'" in str(report(cm))        # a report still renders


def test_transformer_rows_for_linears_matmuls_and_sdpa():
    torch.manual_seed(0)
    model = Transformer()
    cm = compiled_step(model, torch.randn(2, 6, 32), weight_bits=4, act_bits=8)
    rows = report(cm).rows()
    gemm_rows = [r for r in rows if r["kind"] == "gemm"]
    linears = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
    assert sorted(r["module"] for r in gemm_rows if r["op"] == "linear") == linears
    assert [r["module"] for r in gemm_rows if r["op"] == "matmul"] == ["blocks.0.attn"] * 2
    sdpa = [r for r in gemm_rows if r["op"] == "scaled_dot_product_attention"]
    assert [(r["module"], r["part"]) for r in sdpa] == [("blocks.1.attn", "QK^T"), ("blocks.1.attn", "PV")]
    assert sdpa[0]["flops"] == sdpa[1]["flops"] == 2 * 2 * 6 * 6 * 8 * 4   # B*H*L*S*(d/H), each GEMM
    assert len(gemm_rows) == len(linears) + 4
    assert all(r["part"] is None for r in gemm_rows if r["op"] != "scaled_dot_product_attention")
    for r in gemm_rows:
        assert r["execution"] == "int8-cpu" and r["act_bits"] == 8
        # an activation-by-activation product quantizes its second operand at act_bits
        assert r["weight_bits"] == (4 if r["op"] == "linear" else 8)
    check_norm_rows(rows, model)
    assert "blocks.1.attn" in str(report(cm)) and "scaled_dot_product_attention PV" in str(report(cm))


def test_attention_gemms_report_their_own_statistics():
    """QK^T and PV of one attention are measured apart: their act operands are Q and the
    softmax probabilities, so their SQNRs differ; a float attention stays one row."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Transformer()
    cm = compiled_step(model, torch.randn(2, 6, 32), steps=1, collect_stats=True)
    qk, pv = [r for r in report(cm).rows() if r["op"] == "scaled_dot_product_attention"]
    for r in (qk, pv):
        assert r["steps"] == 1
        assert all(r[k] is not None for k in ("sqnr_act_db", "sqnr_weight_db", "sqnr_grad_dx_db", "sqnr_grad_dw_db"))
    assert qk["sqnr_act_db"] != pv["sqnr_act_db"] and qk["sqnr_grad_dx_db"] != pv["sqnr_grad_dx_db"]
    torch._dynamo.reset()
    cm = compiled_step(Transformer(), torch.randn(2, 6, 32),
                       overrides={"*:scaled_dot_product_attention": None})
    (row,) = [r for r in report(cm).rows() if r["op"] == "scaled_dot_product_attention"]
    assert row["part"] is None and not row["quantized"]


def test_float_fallbacks_carry_reasons_and_unmatched_overrides_warn():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.fc = nn.Linear(4, 3)

        def forward(self, idx):
            e = self.emb(idx)                                   # [B, 4, 4, 8]
            y = self.conv(self.up(e.permute(0, 3, 1, 2)))
            return self.fc(y.mean((2, 3)))

    model = Mixed()
    with pytest.warns(UserWarning, match="no_such_module"):
        cm = compiled_step(model, torch.randint(0, 20, (2, 4, 4)), overrides={"fc": None, "no_such_module": None})
    rep = report(cm)
    by_op = {r["op"]: r for r in rep.rows()}
    assert set(by_op) == {"embedding", "conv_transpose2d", "conv2d", "linear"}
    for op in ("embedding", "linear"):
        r = by_op[op]
        assert not r["quantized"] and r["execution"].startswith("float: ") and len(r["execution"]) > 12
    assert "overrides['fc']" in by_op["linear"]["execution"]
    assert by_op["conv2d"]["execution"] == by_op["conv_transpose2d"]["execution"] == "int8-cpu"
    s = rep.summary()
    assert s["quantized"] == 2 and 0 < s["quantized_flops_fraction"] < 1
    assert any("no_such_module" in w for w in s["warnings"])
    text = str(rep)
    assert "float: " in text and "warning:" in text and "no_such_module" in text


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------

def test_stats_are_finite_and_8_bits_beat_4_bits():
    x = torch.randn(4, 3, 8, 8)
    sqnr = {}
    for bits in (8, 4):
        torch.manual_seed(0)
        model = ResNetish()
        cm = compiled_step(model, x, weight_bits=bits, act_bits=bits, collect_stats=True)
        rows = [r for r in report(cm).rows() if r["kind"] == "gemm"]
        assert len(rows) == len(gemm_modules(model))
        for r in rows:
            for key in ("sqnr_weight_db", "sqnr_act_db", "sqnr_grad_dw_db"):
                assert r[key] is not None and math.isfinite(r[key]), (r["module"], key)
            assert r["steps"] == 1
            assert abs(sum(r["occupancy_dw"]) - 1) < 1e-6
        sqnr[bits] = {r["module"]: (r["sqnr_weight_db"], r["sqnr_act_db"]) for r in rows}
    for module, (w8, a8) in sqnr[8].items():
        w4, a4 = sqnr[4][module]
        assert w8 > w4 + 10 and a8 > a4 + 10, module     # ~6 dB per bit


def test_shiftquant_gradient_sqnr_beats_per_tensor_on_spread_channels():
    """A layer whose 256 output channels get gradients of ranges spread over 2**6 (as real
    layers do: a few channels carry most of the gradient).  ShiftQuant (4 groups) is compared
    with per-tensor quantization (1 group) at the same 4 bits; both round stochastically, so
    the SQNR is averaged over a few steps."""
    torch.manual_seed(0)
    spread = 2.0 ** -torch.empty(256).uniform_(0, 6)

    class Spread(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc0 = nn.Linear(64, 256)
            self.fc1 = nn.Linear(256, 256)
            self.register_buffer("spread", spread)

        def forward(self, x):
            return self.fc1(F.relu(self.fc0(x))) * self.spread

    x = torch.randn(64, 64)
    mean_sqnr = {}
    for groups in (4, 1):
        torch.manual_seed(1)
        cm = torch.compile(Spread(), backend="shiftquant", options={"grad_bits": 4, "groups": groups,
                                                                    "collect_stats": True})
        values, baseline = [], []
        for _ in range(4):
            (cm(x) * torch.randn(64, 256)).sum().backward()
            row = next(r for r in report(cm).rows() if r["module"] == "fc1")
            values.append(row["sqnr_grad_dx_db"])
            baseline.append(row["sqnr_grad_dx_per_tensor_db"])
        mean_sqnr[groups] = sum(values) / len(values)
        if groups == 4:   # the in-op per-tensor baseline tells the same story
            assert mean_sqnr[4] > sum(baseline) / len(baseline) + 2
    assert mean_sqnr[4] > mean_sqnr[1] + 2, mean_sqnr


def test_steps_count_training_steps_and_calls_count_an_ops_runs_in_one():
    """An LSTM's GEMMs run once for the input projection and once per time step, a layer
    inside an activation checkpoint twice (its forward is recomputed in the backward): the
    row's ``steps`` is the number of training steps all the same, ``calls`` the forward calls
    in the latest step."""
    from torch.utils.checkpoint import checkpoint

    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(4, 8, batch_first=True)
            self.fc = nn.Linear(8, 8)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            y, _ = self.rnn(x)
            return self.head(checkpoint(self.fc, y, use_reentrant=False))

    torch._dynamo.reset()
    torch.manual_seed(0)
    cm = compiled_step(Recurrent(), torch.randn(3, 5, 4), steps=3, collect_stats=True)
    rows = {r["module"]: r for r in report(cm).rows()}
    assert {m: (r["steps"], r["calls"]) for m, r in rows.items()} == {"rnn": (3, 1 + 5), "fc": (3, 2), "head": (3, 1)}
    for r in rows.values():
        assert all(r[k] is not None and math.isfinite(r[k]) for k in ("sqnr_act_db", "sqnr_weight_db", "sqnr_grad_dw_db"))
    torch._dynamo.reset()


def test_statistics_pool_the_calls_of_the_latest_step():
    """Calls of one run of the graph are pooled (summed signal over summed noise, summed
    group counts), as the SQNR of all their tensors together; the next run starts over."""
    from sqcompile import decisions as D

    rec = D.new_record(None)
    key = D.stats_key(rec, "mm")
    rec.last_run = 100
    D.observe(key, "act", (1.0, 0.0), bits=4)                 # exact (a zero h0 would be too)
    D.observe(key, "act", (3.0, 0.03), bits=4)
    D.observe(key, "grad_dw", (1.0, 0.01), bits=4, groups=2, per_tensor=(1.0, 0.1), occupancy=[3, 1])
    D.observe(key, "grad_dw", (1.0, 0.03), bits=4, groups=2, per_tensor=(1.0, 0.1), occupancy=[1, 3])
    st = rec.stats["mm"]
    assert (st["steps"], st["calls"]) == (1, 2)
    assert st["act"]["sqnr_db"] == pytest.approx(10 * math.log10(4.0 / 0.03))
    assert st["grad_dw"]["sqnr_db"] == pytest.approx(10 * math.log10(2.0 / 0.04))
    assert st["grad_dw"]["per_tensor_sqnr_db"] == pytest.approx(10.0)
    assert st["grad_dw"]["group_occupancy"] == [0.5, 0.5]
    rec.last_run = 101
    D.observe(key, "act", (1.0, 0.1), bits=4)
    assert (st["steps"], st["calls"]) == (2, 1) and st["act"]["sqnr_db"] == pytest.approx(10.0)
    row = next(r for r in Report(rec.__class__(index=rec.index, config=None, stats=rec.stats, decisions=[
        D.OpDecision(node="mm", module_path="", op="mm", kind="gemm")])).rows())
    assert (row["steps"], row["calls"]) == (2, 1)


def test_stats_off_adds_no_nodes():
    x = torch.randn(2, 3, 8, 8)
    for collect in (False, True):
        torch.manual_seed(0)
        cm = compiled_step(ResNetish(), x, collect_stats=collect)
        rep = report(cm)
        text = "".join(r.graphs["forward"] + r.graphs["backward"] for r in rep.records)
        assert ("_observed" in text) is collect
        assert rep.summary()["stats_collected"] is collect


def test_norm_rows_carry_their_quantizers_sqnr(cnn_stats_report):
    """Each L1 norm reports the SQNR of its 8-bit input and gradient quantizers (per slice:
    well above the ~25 dB a 4-bit GEMM operand gets, below the ~50 dB ceiling of 8 bits)."""
    rep, model = cnn_stats_report
    norm_rows = [r for r in rep.rows() if r["kind"] == "norm"]
    assert norm_rows and len(norm_rows) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    for r in norm_rows:
        assert r["steps"] == 2 and r["norm_bits"] == 8
        assert 30 < r["sqnr_act_db"] < 60 and 25 < r["sqnr_grad_db"] < 60, r
    assert f"{norm_rows[0]['sqnr_act_db']:.1f}" in str(rep)


def test_stats_table_columns(cnn_stats_report):
    rep, _ = cnn_stats_report
    text = str(rep)
    assert "SQNR W" in text and "SQNR grad dx/dw" in text and "groups % dx | dw" in text
    fc = next(r for r in rep.rows() if r["module"] == "fc")
    assert f"{fc['sqnr_weight_db']:.1f}" in text
    assert fc["steps"] == 2


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------

def test_json_round_trip(cnn_stats_report):
    rep, _ = cnn_stats_report
    back = Report.from_json(rep.to_json())
    assert back.rows() == rep.rows() and back.summary() == rep.summary()
    kernel = rep.summary()["int8_cpu_kernel"]
    assert str(back) == str(rep).replace(f"GEMMs run on {kernel}.", f"GEMMs ran on {kernel} (where this report was saved).")
    with pytest.raises(ValueError, match="not a sqcompile report"):
        Report.from_json(json.dumps({"rows": []}))
    whole = json.loads(rep.to_json())
    for missing in ("rows", "summary"):
        cut = {k: v for k, v in whole.items() if k != missing}
        with pytest.raises(ValueError, match="incomplete sqcompile report"):
            Report.from_json(json.dumps(cut))


def test_a_loaded_report_names_the_saving_machines_cpu_kernel(cnn_stats_report, monkeypatch):
    """A report saved to JSON and read on another machine describes the int8 kernel of the
    machine that ran the GEMMs, not the reader's."""
    from sqcompile.kernels import amx

    rep, _ = cnn_stats_report
    saved = amx.describe()
    text = rep.to_json()
    assert json.loads(text)["summary"]["int8_cpu_kernel"] == saved
    monkeypatch.setattr(amx, "describe", lambda: "the reading machine's kernel")
    back = Report.from_json(text)
    assert f"int8-cpu GEMMs ran on {saved} (where this report was saved)." in str(back)
    assert "reading machine" not in str(back) and back.summary()["int8_cpu_kernel"] == saved
    old = json.loads(text)
    del old["summary"]["int8_cpu_kernel"]                   # saved before the kernel was recorded
    assert "a CPU kernel this report does not name" in str(Report.from_json(json.dumps(old)))


def test_csv_has_header_and_rows(cnn_stats_report, tmp_path):
    rep, _ = cnn_stats_report
    text = rep.to_csv(tmp_path / "r.csv")
    lines = text.strip().splitlines()
    assert lines[0].split(",") == list(ROW_KEYS)
    assert len(lines) == 1 + len(rep.rows())
    assert (tmp_path / "r.csv").read_text() == text


def test_plot_writes_png(cnn_stats_report, tmp_path):
    pytest.importorskip("matplotlib")
    rep, _ = cnn_stats_report
    path = rep.plot(str(tmp_path / "report.png"))
    assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------
# Finding records
# --------------------------------------------------------------------------------------------

def test_report_of_uncompiled_model_or_non_module_raises():
    with pytest.raises(ValueError, match=r"no graph of this Linear reached backend=\"shiftquant\".*graph_breaks"):
        report(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="nn.Module"):
        report(lambda x: x)
    cm = torch.compile(nn.Linear(3, 3), backend="shiftquant")
    with pytest.raises(ValueError, match="never run"):                 # compiled lazily
        report(cm)


def test_recompiles_keep_the_newest_record_and_graph_breaks_keep_both():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

        def forward(self, x):
            x = self.a(x)
            torch._dynamo.graph_break()
            return self.b(x)

    model = Broken()
    cm = torch.compile(model, backend="shiftquant")
    for batch in (2, 3, 5):                       # new shapes: recompiles of both graphs
        cm(torch.randn(batch, 8)).sum().backward()
    rep = report(model)                           # the original module works too
    assert [r["module"] for r in rep.rows()] == ["a", "b"]
    assert rep.summary()["graphs"] == 2 and [r["graph"] for r in rep.rows()] == [0, 1]
    assert rep.rows()[0]["shapes"][0][0] != 2     # the newest compile
    assert str(rep).splitlines()[0].split()[0] == "graph"
    assert {"a", "b"} <= {r["module"] for r in report().rows()}     # no argument: the latest compiles
    ex = explain(model, torch.randn(2, 8))
    assert ex.graphs["forward"].count("# --- graph ") == 2 and "(backend call #" in ex.graphs["backward"]
    assert [r["module"] for r in ex.report.rows()] == ["a", "b"]
    # explain's headings number the graphs as the report's graph column does, from 0
    for stage in ("dynamo", "forward", "backward"):
        headings = [line.split()[3] for line in ex.graphs[stage].splitlines() if line.startswith("# --- graph ")]
        assert headings == [str(r["graph"]) for r in ex.report.rows()] == ["0", "1"]
    assert "# --- graph 0 of graphs 0-1" in str(ex) and str(ex.report).splitlines()[2].split()[0] == "0"


# --------------------------------------------------------------------------------------------
# explain() and the command line
# --------------------------------------------------------------------------------------------

def test_explain_of_a_model_dynamo_captures_no_graph_of_says_so_and_why():
    class Passthrough(nn.Module):           # no tensor operation to capture
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return x

    class BreaksFirst(Passthrough):         # a graph break, and nothing to capture around it
        def forward(self, x):
            torch._dynamo.graph_break()
            return x

    for make, why in ((Passthrough, "no tensor operation for Dynamo to capture"),
                      (BreaksFirst, "graph_break()"),
                      (lambda: nn.BatchNorm1d(4, momentum=None), "Tensor.item()")):   # Dynamo breaks its frame
        model = make().eval()
        with pytest.raises(ValueError, match="Dynamo captured no graph") as e:
            explain(model, torch.randn(3, 4))
        assert why in str(e.value) and type(model).__name__ in str(e.value)
        assert not model.training                      # the model is left as it was
    torch._dynamo.reset()


def test_explain_shows_graphs_and_leaves_the_model_unchanged():
    torch.manual_seed(0)
    model = ResNetish().eval()
    model.fc.weight.grad = torch.ones_like(model.fc.weight)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 8, 8)
    rng = torch.get_rng_state()
    ex = explain(model, x, weight_bits=6, collect_stats=True)
    assert isinstance(ex, Explanation)
    assert set(ex.graphs) == {"dynamo", "rewritten", "forward", "backward"}
    assert "torch.conv2d(" in ex.graphs["dynamo"] and "quantized_conv" in ex.graphs["rewritten"]
    assert "sqcompile.int8_mm" in ex.graphs["forward"] and "shiftquant" in ex.graphs["backward"]
    assert {r["weight_bits"] for r in ex.report.rows() if r["kind"] == "gemm"} == {6}
    text = str(ex)
    assert "Backward graph" in text and "Summary:" in text
    # unchanged: training flag, buffers (BN running stats), grads, RNG
    assert not any(m.training for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(model.fc.weight.grad, torch.ones_like(model.fc.weight))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "fc.weight")
    assert torch.equal(torch.get_rng_state(), rng)


def test_explain_validates_options():
    with pytest.raises(ValueError, match="weight_bits"):
        explain(nn.Linear(4, 4), torch.randn(2, 4), weight_bits=13)
    with pytest.raises(ValueError, match="did you mean 'act_bits'"):
        explain(nn.Linear(4, 4), torch.randn(2, 4), act_bit=4)


def test_explain_of_a_compiled_model_uses_its_options_with_the_given_ones_on_top():
    """The Quickstart's ``explain(model, x)`` after ``model = torch.compile(..., options=...)``
    explains what training runs, not a default compile."""
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    compiled = torch.compile(model, backend="shiftquant", options={"overrides": {"2": None}, "weight_bits": 6})
    compiled(torch.randn(4, 8)).sum().backward()

    def bits(exp):
        return {r["module"]: r["weight_bits"] for r in exp.report.rows()}

    assert bits(explain(compiled, torch.randn(4, 8))) == {"0": 6, "2": None}
    assert bits(explain(compiled, torch.randn(4, 8), weight_bits=8)) == {"0": 8, "2": None}
    assert bits(explain(model, torch.randn(4, 8))) == {"0": 4, "2": 4}


def test_explain_raises_the_models_own_error():
    class ShapeBug(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(7, 2)   # 8 != 7

        def forward(self, x):
            return self.fc2(self.fc1(x))

    class MyError(Exception):
        pass

    class Raises(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            if x.shape[0] > 1:
                raise MyError("batch too large for this model")
            return self.fc(x)

    with pytest.raises(RuntimeError) as info:
        explain(ShapeBug(), torch.randn(2, 4))
    assert type(info.value) is RuntimeError and "mat1 and mat2 shapes cannot be multiplied" in str(info.value)
    with pytest.raises(MyError, match="batch too large"):
        explain(Raises(), torch.randn(2, 4))


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "sqcompile", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_explain_prints_the_report():
    out = _cli("explain", "examples/explain_demo.py", "--options", '{"weight_bits": 6}')
    assert out.returncode == 0, out.stderr
    assert "layer1.0.conv1" in out.stdout and "W6" in out.stdout and "Summary:" in out.stdout
    assert "Backward graph" not in out.stdout


def test_cli_help_and_bad_input(capsys, tmp_path):
    from sqcompile.__main__ import main

    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0 and "explain" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["explain", str(ROOT / "examples" / "explain_demo.py"), "--options", '{"weight_bits": 13}'])
    assert info.value.code == 2 and "weight_bits" in capsys.readouterr().err
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(SystemExit, match="neither build"):
        main(["explain", str(empty)])
    passthrough = tmp_path / "passthrough.py"
    passthrough.write_text("import torch\nmodel = torch.nn.Identity()\nexample_inputs = torch.randn(2, 3)\n")
    with pytest.raises(SystemExit, match=r"sqcompile explain: sqcompile.explain\(\): Dynamo captured no graph"):
        main(["explain", str(passthrough)])


def test_plot_without_matplotlib_says_how_to_install(cnn_stats_report, monkeypatch, tmp_path):
    rep, _ = cnn_stats_report
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install sqcompile\[plot\]"):
        rep.plot(str(tmp_path / "x.png"))


# --------------------------------------------------------------------------------------------
# Which graphs a report shows, and what it says of ops without gradients (user-level findings)
# --------------------------------------------------------------------------------------------

def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.LayerNorm(64), nn.ReLU(), nn.Linear(64, 10))


def test_report_of_a_compiled_module_shows_its_own_options_not_another_compiles():
    """The same module compiled twice with other options, then inspected by explain() at a
    third setting: ``report(compiled)`` shows the graphs that compile made."""
    torch._dynamo.reset()
    m, x = _mlp(), torch.randn(8, 32)
    ca = torch.compile(m, backend="shiftquant", options={"weight_bits": 8, "act_bits": 8})
    cb = torch.compile(m, backend="shiftquant", options={"weight_bits": 2, "act_bits": 2})
    ca(x).sum().backward()
    cb(x).sum().backward()
    explain(m, x, weight_bits=6)
    for compiled, bits in ((ca, 8), (cb, 2)):
        assert {r["weight_bits"] for r in report(compiled).rows() if r["op"] == "linear"} == {bits}
    torch._dynamo.reset()


def test_frozen_layers_report_no_gradient_quantizers():
    """Fine-tuning the head only: no gradient flows through the first Linear and the norm, so
    no gradient quantizer of theirs runs; the report says "-" there, not "g4 ..."."""
    torch._dynamo.reset()
    m = _mlp()
    for p in [*m[0].parameters(), *m[1].parameters()]:
        p.requires_grad_(False)
    compiled = torch.compile(m, backend="shiftquant")
    compiled(torch.randn(8, 32)).sum().backward()
    rows = {r["module"]: r for r in report(compiled).rows()}
    assert rows["0"]["grad_bits"] is None and rows["1"]["grad_bits"] is None
    assert "no gradient" in rows["0"]["region"]
    assert rows["3"]["grad_bits"] == 4
    text = str(report(compiled))
    line = next(ln for ln in text.splitlines() if ln.startswith("0 "))
    assert "ShiftQuant" not in line
    torch._dynamo.reset()


def test_a_batchnorm_models_training_and_inference_graphs_are_reported_once_each():
    """After eval() + no_grad, a BatchNorm model's inference graph (which lifts other buffers)
    is reported next to the training graph, once each and labelled, with no gradient
    quantizers for the inference graph; a second training step recompiles nothing new."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))
    compiled = torch.compile(m, backend="shiftquant")
    x = torch.randn(32, 16)
    compiled(x).sum().backward()
    compiled.eval()
    with torch.no_grad():
        compiled(x)
    compiled.train()
    compiled(x).sum().backward()
    rep = report(compiled)
    assert rep.summary()["graphs"] == 2 and rep.summary()["inference_graphs"] == 1
    assert "in 2 graphs (1 compiled for inference)" in rep.summary_line()
    by_graph = {}
    for r in rep.rows():
        by_graph.setdefault(r["graph"], []).append(r)
    assert sorted(len(v) for v in by_graph.values()) == [3, 3]
    assert sorted(all(r["grad_bits"] is None for r in v) for v in by_graph.values()) == [False, True]
    torch._dynamo.reset()


def test_embeddings_are_not_counted_as_gemms_and_fused_attention_asked_for_says_why_not():
    torch._dynamo.reset()

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc = nn.Embedding(50, 16), nn.Linear(16, 16)

        def forward(self, ids):
            h = self.fc(self.emb(ids))
            q = h.view(2, 5, 2, 8).transpose(1, 2)
            return F.scaled_dot_product_attention(q, q, q)

    model = Tiny()
    compiled = torch.compile(model, backend="shiftquant", options={"fused_attention": True})
    compiled(torch.randint(0, 50, (2, 5))).sum().backward()
    rep = report(compiled)
    emb = next(r for r in rep.rows() if r["op"] == "embedding")
    assert emb["flops"] == 0
    assert rep.summary()["gemms"] == len([r for r in rep.rows() if r["op"] != "embedding"])
    attention = [r for r in rep.rows() if r["op"] == "scaled_dot_product_attention"]
    assert attention and all("fused_attention=True needs the Triton kernel family" in r["region"] for r in attention)
    torch._dynamo.reset()


def test_a_validation_loss_in_eval_mode_does_not_hide_the_training_graph():
    """``eval()`` forward with gradients on (a validation loss) recompiles a graph with the
    same ops; training then runs its cached graph, and the report shows that one again, with
    its statistics, rather than the single eval step."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.1), nn.Linear(8, 2))
    x = torch.randn(16, 8)
    compiled = torch.compile(m, backend="shiftquant", options={"collect_stats": True})
    for _ in range(3):
        compiled(x).sum().backward()
    m.eval()
    compiled(x).sum()
    m.train()
    for _ in range(3):
        compiled(x).sum().backward()
    rows = report(compiled).rows()
    assert len(rows) == 2 and all(r["steps"] == 6 and r["sqnr_grad_dw_db"] is not None for r in rows)
    torch._dynamo.reset()


def test_report_of_a_compile_without_options_ignores_explain_and_other_compiles():
    torch._dynamo.reset()
    m, x = _mlp(), torch.randn(8, 32)
    compiled = torch.compile(m, backend="shiftquant")                 # the README's one-liner
    compiled(x).sum().backward()
    explain(m, x, weight_bits=8)
    torch.compile(m, backend="shiftquant", options={"weight_bits": 2})(x)
    assert {r["weight_bits"] for r in report(compiled).rows() if r["op"] == "linear"} == {4}
    torch._dynamo.reset()


def test_report_and_explain_take_a_compile_of_a_compiled_module():
    """``torch.compile`` of an already compiled module returns a function wrapping its forward;
    the outer compile's backend is the one Dynamo calls, and report() shows its graphs."""
    torch._dynamo.reset()
    m, x = _mlp(), torch.randn(8, 32)
    inner = torch.compile(m, backend="shiftquant", options={"weight_bits": 8})
    outer = torch.compile(inner, backend="shiftquant", options={"weight_bits": 6})
    outer(x).sum().backward()
    torch.compile(m, backend="shiftquant", options={"weight_bits": 2})(x)       # another compile of m
    assert {r["weight_bits"] for r in report(outer).rows() if r["op"] == "linear"} == {6}
    assert {r["weight_bits"] for r in explain(outer, x, weight_bits=5).report.rows() if r["op"] == "linear"} == {5}
    with pytest.raises(ValueError, match="takes a torch.nn.Module or its torch.compile-d version"):
        report(torch.compile(lambda t: t @ t, backend="shiftquant"))
    torch._dynamo.reset()


def test_simulated_rows_say_why_and_unusable_triton_is_a_value_error():
    torch._dynamo.reset()
    rep = explain(nn.Sequential(nn.ConvTranspose2d(4, 4, 3, groups=2)), torch.randn(2, 4, 6, 6),
                  execution="integer").report
    assert rep.rows()[0]["execution"] == "simulated: grouped transposed convolution (groups=2) has no integer " \
                                         "formulation yet"
    assert "simulated: grouped transposed convolution" in str(rep)
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        compiled = torch.compile(nn.Linear(4, 2), backend="shiftquant", options={"kernels": "triton"})
        with pytest.raises(ValueError, match="option 'kernels': 'triton' is not usable here"):
            compiled(torch.randn(3, 4))
    torch._dynamo.reset()


def test_cli_plot_without_matplotlib_is_a_clean_error_before_compiling(capsys, monkeypatch, tmp_path):
    from sqcompile.__main__ import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)     # import matplotlib -> ImportError
    with pytest.raises(SystemExit) as e:
        main(["explain", str(ROOT / "examples" / "explain_demo.py"), "--plot", str(tmp_path / "p.png")])
    assert e.value.code == 2 and "--plot needs matplotlib" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Graphs other compiles made, modules left out of every graph, Dynamo's recompile limit
# --------------------------------------------------------------------------------------------

class _HookedMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def test_report_of_a_compile_shows_the_graph_dynamo_reuses_from_a_compile_with_equal_options():
    """Dynamo runs a graph that another ``torch.compile`` call compiled for another instance of
    the class when their options compare equal, without calling the backend: that graph is the
    one that runs, so the report shows it next to the inference graph compiled here."""
    torch._dynamo.reset()
    options = {"weight_bits": 8, "act_bits": 8}
    x = torch.randn(8, 32)
    torch.compile(_mlp(), backend="shiftquant", options=dict(options))(x).sum().backward()   # an earlier run
    m = _mlp()
    compiled = torch.compile(m, backend="shiftquant", options=dict(options))
    m.eval()
    with torch.no_grad():
        compiled(x)                                   # an inference graph, compiled under this call's options
    m.train()
    compiled(x).sum().backward()                      # the earlier run's training graph
    rep = report(compiled)
    assert rep.summary()["graphs"] == 2 and rep.summary()["inference_graphs"] == 1
    assert sorted(r["grad_bits"] is None for r in rep.rows() if r["op"] == "linear") == [False, False, True, True]
    torch._dynamo.reset()


def test_report_of_a_compile_shows_the_graph_it_runs_again_after_an_unfreeze():
    """Frozen, the model compiles a graph of its own; unfrozen, Dynamo runs the graph an earlier
    compile with equal options made: the report shows that one, with layer 0's gradient."""
    torch._dynamo.reset()
    options = {"weight_bits": 8, "act_bits": 8}
    x = torch.randn(8, 32)
    torch.compile(_mlp(), backend="shiftquant", options=dict(options))(x).sum().backward()   # an earlier run
    m = _mlp()
    compiled = torch.compile(m, backend="shiftquant", options=dict(options))
    for p in m[0].parameters():
        p.requires_grad_(False)
    compiled(x).sum().backward()                      # compiled here: no gradient through layer 0
    frozen = report(compiled).rows()[0]
    for p in m[0].parameters():
        p.requires_grad_(True)
    compiled(x).sum().backward()                      # the earlier run's graph again
    rows = report(compiled).rows()
    assert frozen["grad_bits"] is None and "no gradient" in frozen["region"]
    assert [r["module"] for r in rows] == ["0", "1", "3"] and rows[0]["grad_bits"] == 4
    torch._dynamo.reset()


def test_a_module_dynamo_leaves_out_of_its_graphs_gets_a_float_row():
    """A full backward hook makes Dynamo run ``fc2`` eagerly (in float) and compile ``fc3`` as a
    frame of its own (where its path reads ``<root>``): ``fc2`` is listed as not captured, ``fc3``
    is not (matched by its parameters), and the summary says the FLOP fractions leave it out."""
    torch._dynamo.reset()
    m = _HookedMLP()
    m.fc2.register_full_backward_hook(lambda module, grad_in, grad_out: None)
    compiled = torch.compile(m, backend="shiftquant")
    compiled(torch.randn(16, 32)).sum().backward()
    for rep in (report(compiled), report(m)):
        missing = [r for r in rep.rows() if r["graph"] is None]
        assert [(r["module"], r["op"], r["quantized"], r["flops"]) for r in missing] == [
            ("fc2", "linear", False, None)]
        assert missing[0]["execution"].startswith("float: not in any graph Dynamo captured (it ran eagerly")
        assert len(rep.rows()) == 3 and rep.summary()["not_captured"] == 1
        assert rep.summary()["gemms"] == 3 and rep.summary()["gemms_quantized"] == 2
        assert rep.summary()["quantized_flops_fraction"] == 1.0
        assert "1 module in no captured graph runs in float (FLOPs unknown, not counted)" in rep.summary_line()
        line = next(ln for ln in str(rep).splitlines() if " fc2 " in ln)
        assert line.split()[0] == "-" and "not in any graph" in line
        assert Report.from_json(rep.to_json()).rows() == rep.rows()
    torch._dynamo.reset()


class _Sweep(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def test_past_dynamos_recompile_limit_report_names_it():
    """Each ``torch.compile`` with other options recompiles the same ``forward``; past
    ``recompile_limit`` Dynamo runs the model eagerly, in float, and report() says why."""
    import torch._dynamo.config as dynamo_config

    torch._dynamo.reset()
    x = torch.randn(4, 16)
    with dynamo_config.patch(recompile_limit=2):
        for bits in (8, 6, 4):                                         # an options sweep, no reset
            m = _Sweep()
            compiled = torch.compile(m, backend="shiftquant", options={"weight_bits": bits})
            compiled(x).sum().backward()
        with pytest.raises(ValueError, match=r"_Sweep.forward is full .*recompile_limit = 2.*in eager PyTorch, in "
                                             r"float.*torch._dynamo.reset\(\) between the compiles"):
            report(compiled)
        assert torch.equal(compiled(x), m(x))                          # it did run in float
        with pytest.raises(ValueError, match="recompile_limit"):       # the plain module too
            report(m)
    torch._dynamo.reset()


def test_a_report_warns_when_dynamos_cache_of_the_forward_is_full():
    """A call that none of the cached graphs accepts runs eagerly: the report says so."""
    import torch._dynamo.config as dynamo_config

    torch._dynamo.reset()
    with dynamo_config.patch(recompile_limit=2):
        m = _Sweep()
        compiled = torch.compile(m, backend="shiftquant", dynamic=False)
        for batch in (2, 3):
            compiled(torch.randn(batch, 16)).sum().backward()
        warnings = report(compiled).summary()["warnings"]
        assert any("_Sweep.forward is full" in w and "none of its graphs accepts" in w for w in warnings)
        assert "recompile_limit" in str(report(compiled)).splitlines()[-1]
    torch._dynamo.reset()


def test_report_of_a_compiled_function_points_to_report_without_argument():
    torch._dynamo.reset()
    f = torch.compile(lambda t: t @ t, backend="shiftquant")
    f(torch.randn(4, 4))
    with pytest.raises(ValueError, match=r"got function; for a torch.compile-d function call sqcompile.report\(\) "
                                         r"with no argument"):
        report(f)
    assert report().rows()[-1]["op"] == "matmul"
    torch._dynamo.reset()


def test_report_of_a_model_called_with_other_parameters_says_how_records_are_found():
    torch._dynamo.reset()
    m = _HookedMLP()
    compiled = torch.compile(m, backend="shiftquant")
    params = {k: v.detach().clone().requires_grad_(True) for k, v in m.named_parameters()}
    torch.func.functional_call(compiled, params, (torch.randn(8, 32),)).sum().backward()
    with pytest.raises(ValueError, match=r"finds records by the identity of the tensors.*functional_call.*"
                                         r"report\(\) with no argument") as e:
        report(compiled)
    assert "not compiled" not in str(e.value)
    assert {"fc1", "fc2", "fc3"} <= {r["module"] for r in report().rows()}
    torch._dynamo.reset()


def test_a_compiled_train_steps_update_graph_is_no_inference_graph():
    """A compiled training step whose parameter update (under no_grad) is a graph of its own,
    with no matmul / conv / norm: not counted as a graph compiled for inference."""
    torch._dynamo.reset()
    m = _HookedMLP()

    def train_step(x):
        m(x).sum().backward()
        with torch.no_grad():
            for p in m.parameters():
                p.sub_(0.1 * p.grad)
                p.grad = None

    step = torch.compile(train_step, backend="shiftquant")
    for _ in range(2):
        step(torch.randn(8, 32))
    rep = report(m)
    assert len(rep.rows()) == 3 and rep.summary()["inference_graphs"] == 0
    assert "inference" not in rep.summary_line()
    torch._dynamo.reset()


def test_report_of_the_plain_module_shows_every_compiles_graphs():
    """After ``torch._dynamo.reset()`` and a compile with other options, ``report(module)``
    shows both compiles' graphs (the summary says they had different options);
    ``report(compiled)`` each its own."""
    torch._dynamo.reset()
    m, x = _HookedMLP(), torch.randn(8, 32)
    first = torch.compile(m, backend="shiftquant", options={"weight_bits": 8})
    first(x).sum().backward()
    torch._dynamo.reset()
    second = torch.compile(m, backend="shiftquant", options={"weight_bits": 4})
    second(x).sum().backward()
    rep = report(m)
    assert [(r["module"], r["weight_bits"]) for r in rep.rows()] == [
        ("fc1", 8), ("fc2", 8), ("fc3", 8), ("fc1", 4), ("fc2", 4), ("fc3", 4)]
    assert rep.summary()["option_sets"] == 2
    assert "in 2 graphs compiled with 2 different option sets" in rep.summary_line()
    assert {r["weight_bits"] for r in report(first).rows()} == {8}
    assert {r["weight_bits"] for r in report(second).rows()} == {4}
    torch._dynamo.reset()


def test_a_recurrent_cell_dynamo_leaves_out_gets_a_float_row_too():
    """``nn.LSTMCell`` / ``GRUCell`` are quantized when captured, so one Dynamo runs eagerly
    (here: a full backward hook) is listed as not captured, as a Linear would be."""
    torch._dynamo.reset()

    class Cells(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.gru, self.fc = nn.LSTMCell(8, 8), nn.GRUCell(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            h, _ = self.lstm(x)
            return self.fc(self.gru(h))

    m = Cells()
    m.gru.register_full_backward_hook(lambda module, grad_in, grad_out: None)
    compiled = torch.compile(m, backend="shiftquant")
    compiled(torch.randn(4, 8)).sum().backward()
    missing = [(r["module"], r["op"]) for r in report(compiled).rows() if r["graph"] is None]
    assert missing == [("gru", "gru_cell")]
    torch._dynamo.reset()


def test_a_graph_dynamo_restarts_is_not_reported():
    """Under ``dynamic=True`` a norm's ``eps`` is first a float graph input; AOTAutograd
    specializes it and Dynamo restarts the trace, calling the backend a second time.  The
    first graph never runs: the report showed every row twice (two inference graphs)."""
    torch._dynamo.reset()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.ln, self.out = nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 4)

        def forward(self, x):
            return self.out(self.ln(self.fc(x)))

    compiled = torch.compile(Net(), backend="shiftquant", dynamic=True)
    with torch.no_grad():
        compiled(torch.randn(8, 16))
    rep = report(compiled)
    assert [r["module"] for r in rep.rows()] == ["fc", "ln", "out"] and rep.summary()["graphs"] == 1
    torch._dynamo.reset()
