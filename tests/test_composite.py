"""Ops that hide their GEMMs inside one call: nn.MultiheadAttention (and the attention of
nn.TransformerEncoderLayer / DecoderLayer), torch.tensordot, torch.inner,
torch.linalg.multi_dot, torch.chain_matmul, the vector products (mv, dot, vdot, addmv,
addbmm), F.bilinear, and the plain nn.RNN (tanh and relu).

Each mapped configuration is checked twice against eager PyTorch: with ``quantize=False`` the
split graph must give PyTorch's own outputs and gradients (float rounding only: this checks
the head split, the mask merge, ``is_causal`` and the projections), and at 8 bits with one
ShiftQuant group every GEMM must run in integer and stay within a few percent of float.
Configurations that are not mapped must keep PyTorch's result and get one report row
``float: <reason>`` with their FLOPs.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import sqcompile  # noqa: F401  (registers the backend, turns on allow_rnn)
from sqcompile.report import report

Q8 = dict(weight_bits=8, act_bits=8, grad_bits=8, groups=1)
FLOAT = dict(quantize=False)


pytestmark = pytest.mark.usefixtures("one_thread_fresh_dynamo")


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def first(out):
    return out if isinstance(out, torch.Tensor) else out[0]


def compare(model, inputs, options):
    """Compile ``model`` with ``options``; run eager and compiled on ``inputs`` and return the
    relative error of the output and the largest one among the gradients of the float inputs
    and parameters (loss: sum of squares of the first output), and the report."""
    inputs = [x.clone().requires_grad_() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
              for x in inputs]
    wrt = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad] + list(model.parameters())
    ref = first(model(*inputs))
    ref_grads = torch.autograd.grad(ref.pow(2).sum(), wrt, allow_unused=True)
    cm = torch.compile(model, backend="shiftquant", options=options)
    out = first(cm(*inputs))
    grads = torch.autograd.grad(out.pow(2).sum(), wrt, allow_unused=True)
    grad_err = max(rel(g, r) for g, r in zip(grads, ref_grads) if r is not None and r.norm() > 0)
    return rel(out, ref), grad_err, report(cm)


# --------------------------------------------------------------------------------------------
# nn.MultiheadAttention
# --------------------------------------------------------------------------------------------

L, N, E, H = 5, 3, 8, 2


class MHA(nn.Module):
    """One nn.MultiheadAttention called the way ``case`` says (inputs (L, N, E) unless batch_first)."""

    def __init__(self, case, **kw):
        super().__init__()
        self.case = case
        self.attn = nn.MultiheadAttention(E, H, **kw)

    def forward(self, x, y, attn_mask, kpm):
        a, c = self.attn, self.case
        if c == "self":
            return a(x, x, x, need_weights=False)[0]
        if c == "weights_unused":            # need_weights=True (the default), weights dropped
            return a(x, x, x)[0]
        if c == "cross":                     # key is value: q and packed kv projections
            return a(x, y, y, need_weights=False)[0]
        if c == "distinct":                  # three inputs (with kdim/vdim: separate weights)
            return a(x, y, 2 * y, need_weights=False)[0]
        if c == "masks":
            return a(x, x, x, attn_mask=attn_mask, key_padding_mask=kpm, need_weights=False)[0]
        if c == "masks_weights_unused":
            return a(x, x, x, attn_mask=attn_mask, key_padding_mask=kpm)[0]
        if c == "causal_hint":               # no padding mask: sdpa's is_causal, the mask unused
            return a(x, x, x, attn_mask=torch.zeros_like(attn_mask), is_causal=True, need_weights=False)[0]
        if c == "causal_padded":             # a padding mask: the masks merged, is_causal dropped
            return a(x, x, x, attn_mask=attn_mask, key_padding_mask=kpm, is_causal=True, need_weights=False)[0]
        if c == "unbatched":
            s = x[:, 0] if not a.batch_first else x[0]
            return a(s, s, s, key_padding_mask=kpm[0], need_weights=False)[0]
        if c == "weights_used":
            out, w = a(x, x, x)
            return out, w
        raise ValueError(c)


def mha_inputs(batch_first=False, mask="bool", kdim=E, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, L, E, generator=g) if batch_first else torch.randn(L, N, E, generator=g)
    y = torch.randn(N, 4, kdim, generator=g) if batch_first else torch.randn(4, N, kdim, generator=g)
    causal = torch.ones(L, L, dtype=torch.bool).triu(1)            # True = masked out
    kpm = torch.zeros(N, L, dtype=torch.bool)
    kpm[:, -2:] = True
    kpm[0, 1] = True
    if mask == "float":
        attn_mask = torch.zeros(L, L).masked_fill(causal, float("-inf"))
        kpm = torch.zeros(N, L).masked_fill(kpm, float("-inf"))
    elif mask == "3d":                                              # [N * H, L, S] additive
        attn_mask = torch.randn(N * H, L, L, generator=g)
        kpm = torch.zeros(N, L).masked_fill(kpm, float("-inf"))
    else:
        attn_mask = causal
    return [x, y, attn_mask, kpm]


def gemm_ops(rep):
    return [(r["module"], r["op"], r["part"]) for r in rep.rows() if r["kind"] == "gemm"]


PACKED = [("attn", "linear", None), ("attn", "scaled_dot_product_attention", None), ("attn.out_proj", "linear", None)]

MHA_CASES = [
    # (case, module kwargs, inputs kwargs, expected GEMM rows with quantize=False)
    ("self", {}, {}, PACKED),
    ("self", {"batch_first": True}, {"batch_first": True}, PACKED),
    ("weights_unused", {}, {}, PACKED),
    ("cross", {}, {}, [("attn", "linear", None)] + PACKED),
    ("distinct", {}, {}, [("attn", "linear", None)] * 2 + PACKED),
    ("distinct", {"kdim": 6, "vdim": 6}, {"kdim": 6}, [("attn", "linear", None)] * 2 + PACKED),
    ("masks", {}, {}, PACKED),
    ("masks", {"batch_first": True}, {"batch_first": True}, PACKED),
    ("masks", {}, {"mask": "float"}, PACKED),
    ("masks", {}, {"mask": "3d"}, PACKED),
    ("masks_weights_unused", {}, {"mask": "3d"}, PACKED),
    ("causal_hint", {}, {}, PACKED),
    ("causal_padded", {}, {}, PACKED),
    ("unbatched", {}, {}, PACKED),
    ("self", {"dropout": 0.5}, {}, PACKED),       # eval: no dropout
]


@pytest.mark.parametrize("case,kw,inp,rows", MHA_CASES,
                         ids=[f"{c}-{'-'.join(f'{k}={v}' for k, v in {**kw, **i}.items())}" for c, kw, i, _ in MHA_CASES])
def test_mha_split_gives_pytorchs_result_in_float(case, kw, inp, rows):
    torch.manual_seed(0)
    model = MHA(case, **kw)
    if "dropout" in kw:
        model.eval()
    fwd, grad, rep = compare(model, mha_inputs(**inp), FLOAT)
    assert fwd < 1e-5 and grad < 1e-5, (fwd, grad)
    assert gemm_ops(rep) == rows
    r = rep.rows()
    assert all(x["execution"] == "float: quantize=False" and x["flops"] > 0 for x in r)
    assert r[-1]["region"] == "nn.MultiheadAttention output projection"


def test_mha_quantized_at_8_bits_follows_float_and_the_masks():
    torch.manual_seed(0)
    model = MHA("masks")
    inputs = mha_inputs()
    fwd, grad, rep = compare(model, inputs, Q8)
    # ignoring the masks would be far off: the check below is about the masks, not only noise
    unmasked = model(inputs[0], inputs[1], None, None)
    assert fwd < 0.03 and grad < 0.08, (fwd, grad)
    assert fwd < 0.1 * rel(unmasked, model(*inputs))
    rows = rep.rows()
    assert gemm_ops(rep) == [("attn", "linear", None), ("attn", "scaled_dot_product_attention", "QK^T"),
                             ("attn", "scaled_dot_product_attention", "PV"), ("attn.out_proj", "linear", None)]
    for r in rows:
        assert r["quantized"] and r["execution"] == "int8-cpu"
        assert (r["act_bits"], r["grad_bits"], r["groups"]) == (8, 8, 1)
    assert rows[0]["shapes"] == [[L, N, E], [3 * E, E]]
    # FLOPs: packed projection, both attention GEMMs, output projection
    assert [r["flops"] for r in rows] == [2 * L * N * E * 3 * E, 2 * N * L * L * E, 2 * N * L * L * E, 2 * L * N * E * E]
    assert rep.summary()["integer_flops_fraction"] == 1.0
    assert [r["node"] for r in rows][::3] == ["multi_head_attention_forward#in_proj",
                                              "multi_head_attention_forward#out_proj"]
    text = str(rep)
    assert "attn.out_proj" in text and "nn.MultiheadAttention input projection (q, k, v packed)" in text


def test_mha_dropout_in_training_is_applied():
    torch.manual_seed(0)
    model = MHA("self", dropout=0.5)
    x = mha_inputs()[0]
    cm = torch.compile(model, backend="shiftquant", options=FLOAT)
    outs = [cm(x, None, None, None) for _ in range(2)]
    assert rel(outs[0], outs[1]) > 0.05                     # two dropout draws
    model.eval()
    torch._dynamo.reset()
    assert rel(torch.compile(model, backend="shiftquant", options=FLOAT)(x, None, None, None),
               model(x, None, None, None)) < 1e-5


def test_mha_with_dynamic_shapes_is_split_once_for_all_sizes():
    """dynamic=True makes dropout_p a symbolic float input; the split takes it as it is."""
    torch.manual_seed(0)
    model = MHA("masks", batch_first=True)
    cm = torch.compile(model, backend="shiftquant", dynamic=True, options=FLOAT)
    for n, length in ((2, 5), (3, 7)):
        x = torch.randn(n, length, E)
        mask = torch.ones(length, length, dtype=torch.bool).triu(1)
        kpm = torch.zeros(n, length, dtype=torch.bool)
        kpm[:, -1] = True
        assert rel(cm(x, None, mask, kpm), model(x, None, mask, kpm)) < 1e-5
    rep = report(cm)
    assert rep.summary()["graphs"] == 1
    assert gemm_ops(rep) == PACKED


@pytest.mark.parametrize("overrides,float_rows", [
    ({"*:scaled_dot_product_attention": None}, [("attn", "scaled_dot_product_attention", None)]),
    ({"attn.out_proj": None}, [("attn.out_proj", "linear", None)]),
    ({"attn": None, "attn.out_proj": {}}, [("attn", "linear", None), ("attn", "scaled_dot_product_attention", None)]),
])
def test_mha_overrides_reach_each_gemm(overrides, float_rows):
    torch.manual_seed(0)
    fwd, grad, rep = compare(MHA("masks"), mha_inputs(), {**Q8, "overrides": overrides})
    assert fwd < 0.03 and grad < 0.08
    floats = [(r["module"], r["op"], r["part"]) for r in rep.rows() if not r["quantized"]]
    assert floats == float_rows
    for r in rep.rows():
        if not r["quantized"]:
            assert r["execution"].startswith("float: overrides[")
        else:
            assert r["execution"] == "int8-cpu"
    assert 0 < rep.summary()["integer_flops_fraction"] < 1


@pytest.mark.parametrize("case,kw,reason", [
    ("weights_used", {}, "need_weights=True and the attention weights are used"),
    ("self", {"add_bias_kv": True}, "bias_k/bias_v"),
    ("self", {"add_zero_attn": True}, "add_zero_attn=True"),
])
def test_mha_float_fallbacks_are_one_row_with_reason_and_flops(case, kw, reason):
    class WithHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = MHA(case, **kw)
            self.head = nn.Linear(E, 2)

        def forward(self, *inputs):
            out = self.mha(*inputs)
            if isinstance(out, tuple):
                out = out[0] + out[1].sum()
            return self.head(out)

    torch.manual_seed(0)
    fwd, grad, rep = compare(WithHead(), mha_inputs(), Q8)
    rows = rep.rows()
    (mha,) = [r for r in rows if r["module"] == "mha.attn"]
    assert mha["op"] == "multi_head_attention_forward" and not mha["quantized"]
    assert mha["execution"].startswith(f"float: {reason}")
    keys = L + (1 if kw else 0)                  # bias_k or the zero key adds one key
    assert mha["flops"] == 2 * L * N * E * 3 * E + 2 * 2 * N * L * keys * E + 2 * L * N * E * E
    assert [r["op"] for r in rows] == ["multi_head_attention_forward", "linear"]
    s = rep.summary()
    assert s["gemms"] == 2 and s["gemms_quantized"] == 1 and 0 < s["quantized_flops_fraction"] < 0.1
    assert fwd < 0.02                            # only the head is quantized
    assert "float: " + reason in str(rep)


class EncoderDecoder(nn.Module):
    def __init__(self, d=16, heads=2):
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True)
        self.dec = nn.TransformerDecoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True)

    def forward(self, src, tgt, src_pad):
        mem = self.enc(src, src_key_padding_mask=src_pad)
        mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
        return self.dec(tgt, mem, tgt_mask=mask, tgt_is_causal=True, memory_key_padding_mask=src_pad)


def encoder_decoder_inputs():
    g = torch.Generator().manual_seed(1)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, -2:] = True
    return [torch.randn(2, 6, 16, generator=g), torch.randn(2, 5, 16, generator=g), pad]


def test_transformer_layers_attention_is_quantized():
    torch.manual_seed(0)
    model = EncoderDecoder()
    fwd, grad, _ = compare(model, encoder_decoder_inputs(), {**FLOAT, "norm": "keep"})
    assert fwd < 1e-5 and grad < 1e-5
    torch._dynamo.reset()
    fwd, grad, rep = compare(model, encoder_decoder_inputs(), {**Q8, "norm": "keep"})
    assert fwd < 0.03 and grad < 0.1, (fwd, grad)
    gemm = [r for r in rep.rows() if r["kind"] == "gemm"]
    assert all(r["quantized"] and r["execution"] == "int8-cpu" for r in gemm)
    attn = [(r["module"], r["op"], r["part"]) for r in gemm if "attn" in r["module"]]
    assert attn == [
        ("enc.self_attn", "linear", None), ("enc.self_attn", "scaled_dot_product_attention", "QK^T"),
        ("enc.self_attn", "scaled_dot_product_attention", "PV"), ("enc.self_attn.out_proj", "linear", None),
        ("dec.self_attn", "linear", None), ("dec.self_attn", "scaled_dot_product_attention", "QK^T"),
        ("dec.self_attn", "scaled_dot_product_attention", "PV"), ("dec.self_attn.out_proj", "linear", None),
        ("dec.multihead_attn", "linear", None), ("dec.multihead_attn", "linear", None),
        ("dec.multihead_attn", "scaled_dot_product_attention", "QK^T"),
        ("dec.multihead_attn", "scaled_dot_product_attention", "PV"), ("dec.multihead_attn.out_proj", "linear", None)]
    assert rep.summary()["integer_flops_fraction"] == 1.0


def test_encoder_layer_inference_fast_path_is_reported():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(x)

    model = Wrap()
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        out = torch.compile(model, backend="shiftquant")(x)
        assert rel(out, model(x)) < 1e-5
    (row,) = report(model).rows()
    assert row["op"] == "_transformer_encoder_layer_fwd" and not row["quantized"]
    assert "set_fastpath_enabled(False)" in row["execution"]
    assert row["flops"] == 2 * 12 * 16 * (48 + 16 + 32 + 32) + 2 * 2 * 12 * 6 * 16


# --------------------------------------------------------------------------------------------
# tensordot, inner, multi_dot, bilinear
# --------------------------------------------------------------------------------------------

class Contractions(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 5, 6) / 4)
        self.m = nn.Parameter(torch.randn(6, 6) / 3)

    def forward(self, x, y):
        a = torch.tensordot(x, self.w, dims=([2, 1], [1, 0]))       # [2, 6]
        b = torch.tensordot(x, y, dims=1)                           # [2, 4, 3]
        c = torch.inner(a, a)                                       # [2, 2]
        d = torch.linalg.multi_dot([a, self.m, self.m.t(), a.t()])  # [2, 2]
        e = x.inner(y.t())                                          # [2, 4, 3]
        return torch.cat([a.flatten(), b.flatten(), c.flatten(), d.flatten(), e.flatten()])


def contraction_inputs():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 4, 5, generator=g), torch.randn(5, 3, generator=g)]


def test_tensordot_inner_multi_dot_are_quantized_gemms():
    torch.manual_seed(0)
    model = Contractions()
    fwd, grad, rep = compare(model, contraction_inputs(), FLOAT)
    assert fwd < 1e-5 and grad < 1e-5
    torch._dynamo.reset()
    fwd, grad, rep = compare(model, contraction_inputs(), Q8)
    assert fwd < 0.03 and grad < 0.05, (fwd, grad)
    rows = rep.rows()
    assert [(r["op"], r["region"]) for r in rows] == [
        ("einsum", "torch.tensordot, run as einsum('abc,bcf->af')"),
        ("einsum", "torch.tensordot, run as einsum('abc,ce->abe')"),
        ("einsum", "torch.inner, run as einsum('ab,cb->ac')"),
        ("matmul", "torch.linalg.multi_dot, product 1 of 3"),
        ("matmul", "torch.linalg.multi_dot, product 2 of 3"),
        ("matmul", "torch.linalg.multi_dot, product 3 of 3"),
        ("einsum", "torch.inner, run as einsum('abc,dc->abd')")]
    assert all(r["quantized"] and r["execution"] == "int8-cpu" for r in rows)
    # the contraction with the parameter quantizes it as a weight
    assert rows[0]["weight_quantizer"] == "per-output-channel, nearest"
    assert [r["flops"] for r in rows[:3]] == [2 * 2 * 6 * 20, 2 * 8 * 3 * 5, 2 * 4 * 6]
    # multi_dot [2,6] [6,6] [6,6] [6,2]: every order costs 72 + 72 + 24 multiply-adds
    assert sum(r["flops"] for r in rows[3:6]) == 2 * (2 * 6 * 6 + 2 * 6 * 6 + 2 * 6 * 2)
    assert rep.summary()["integer_flops_fraction"] == 1.0


def test_multi_dot_takes_the_cheapest_order():
    from sqcompile.passes.composite import _chain_plan
    # [10, 2] [2, 10] [10, 2]: (A B) C costs 200 + 200 multiply-adds, A (B C) 40 + 40
    assert _chain_plan([10, 2, 10, 2]) == (80, (0, (1, 2)))
    assert _chain_plan([2, 10, 2, 10]) == (80, ((0, 1), 2))
    assert _chain_plan([3, 4]) == (0, 0)


class VectorProducts(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 5) / 3)
        self.b = nn.Parameter(torch.randn(6) / 3)
        self.bw = nn.Parameter(torch.randn(3, 5, 4) / 3)
        self.m = nn.Parameter(torch.randn(4, 4) / 2)

    def forward(self, x, v, b1):
        u = torch.mv(self.w, v)                                     # [6]
        return torch.cat([
            u, self.w.mv(v),
            torch.dot(u, u).reshape(1), u.dot(v.new_ones(6)).reshape(1), torch.vdot(v, v).reshape(1),
            torch.addmv(self.b, self.w, v), torch.addmv(self.b, self.w, v, beta=0.5, alpha=2.0),
            self.b.addmv(self.w, v, beta=0),
            torch.addbmm(x, b1, self.bw).flatten(), x.addbmm(b1, self.bw, beta=2, alpha=0.5).flatten(),
            torch.chain_matmul(x, self.m, self.m.t()).flatten(),
            (self.w @ v), (v @ self.w.t()), (v @ v).reshape(1)])


def test_mv_dot_addmv_addbmm_chain_matmul_are_quantized_gemms():
    torch.manual_seed(0)
    model = VectorProducts()
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(6, 4, generator=g), torch.randn(5, generator=g), torch.randn(3, 6, 5, generator=g)]
    fwd, grad, rep = compare(model, inputs, FLOAT)
    assert fwd < 1e-5 and grad < 1e-5, (fwd, grad)
    torch._dynamo.reset()
    fwd, grad, rep = compare(model, inputs, Q8)
    assert fwd < 0.03 and grad < 0.05, (fwd, grad)
    rows = rep.rows()
    assert [(r["op"], r["region"]) for r in rows] == [
        ("matmul", "torch.mv, run as matmul"), ("matmul", "torch.mv, run as matmul"),
        ("matmul", "torch.dot, run as matmul"), ("matmul", "torch.dot, run as matmul"),
        ("matmul", "torch.vdot, run as matmul"),
        *[("matmul", "torch.addmv, run as matmul + add")] * 3,
        *[("einsum", "torch.addbmm, run as einsum('bnm,bmp->np') + add")] * 2,
        ("matmul", "torch.chain_matmul, product 1 of 2"), ("matmul", "torch.chain_matmul, product 2 of 2"),
        ("matmul", None), ("matmul", None), ("matmul", None)]
    assert all(r["quantized"] and r["execution"] == "int8-cpu" for r in rows)
    assert [r["flops"] for r in rows[:5]] == [2 * 6 * 5] * 2 + [2 * 6] * 2 + [2 * 5]
    assert rows[8]["flops"] == 2 * 3 * 6 * 5 * 4 and rows[8]["weight_quantizer"] == "per-output-channel, nearest"
    assert rep.summary()["integer_flops_fraction"] == 1.0


def test_addmv_beta_zero_ignores_nan_input_as_pytorch_does():
    class AddMv(nn.Module):
        def forward(self, inp, m, v):
            return torch.addmv(inp, m, v, beta=0)

    inp, m, v = torch.full((3,), float("nan")), torch.randn(3, 4), torch.randn(4)
    out = torch.compile(AddMv(), backend="shiftquant", options=Q8)(inp, m, v)
    assert torch.isfinite(out).all() and rel(out, m @ v) < 0.03


def test_bilinear_and_scalar_inner_stay_float_with_a_row():
    class Forms(nn.Module):
        def __init__(self):
            super().__init__()
            self.bil = nn.Bilinear(5, 5, 3)

        def forward(self, x, s):
            return self.bil(x, x).sum() + torch.inner(x, s).sum()

    torch.manual_seed(0)
    model = Forms()
    x, s = torch.randn(4, 5), torch.tensor(2.0)
    fwd, _, rep = compare(model, [x, s], Q8)
    assert fwd < 1e-5
    rows = {r["op"]: r for r in rep.rows()}
    assert set(rows) == {"bilinear", "inner"}
    assert rows["bilinear"]["execution"] == "float: bilinear forms (x1^T A x2) are not quantized"
    assert rows["bilinear"]["module"] == "bil" and rows["bilinear"]["flops"] == 2 * 4 * 3 * 5 * 5
    assert rows["inner"]["execution"].startswith("float: inner with a 0-dim operand")
    assert rows["inner"]["flops"] == 2 * 20
    assert rep.summary()["quantized_flops_fraction"] == 0.0


# --------------------------------------------------------------------------------------------
# nn.RNN
# --------------------------------------------------------------------------------------------

class RNN(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.rnn = nn.RNN(3, 6, **kw)

    def forward(self, x, h0=None):
        return self.rnn(x, h0)


RNN_CASES = [
    ({"nonlinearity": "tanh"}, (5, 2, 3), None),
    ({"nonlinearity": "relu"}, (5, 2, 3), None),
    ({"nonlinearity": "relu", "num_layers": 2, "bidirectional": True, "batch_first": True}, (2, 5, 3), (4, 2, 6)),
    ({"nonlinearity": "tanh", "num_layers": 2, "bias": False}, (5, 2, 3), (2, 2, 6)),
    ({"nonlinearity": "tanh", "bidirectional": True}, (5, 3), None),                 # unbatched
]


@pytest.mark.parametrize("kw,x_shape,h_shape", RNN_CASES, ids=[
    "-".join(f"{k}={v}" for k, v in kw.items()) + ("-unbatched" if len(x) == 2 else "") for kw, x, _ in RNN_CASES])
def test_rnn_tanh_relu_unrolled_and_quantized(kw, x_shape, h_shape):
    torch.manual_seed(0)
    model = RNN(**kw)
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(x_shape, generator=g)] + ([torch.randn(h_shape, generator=g)] if h_shape else [])
    fwd, grad, rep = compare(model, inputs, Q8)
    assert fwd < 0.02 and grad < 0.06, (fwd, grad)
    (row,) = rep.rows()
    mode = "rnn_" + kw["nonlinearity"]
    assert (row["module"], row["op"], row["quantized"], row["execution"]) == ("rnn", mode, True, "int8-cpu")
    assert row["grad_quantizer"] == "ShiftQuant G=1, stochastic, outer scale" and row["weight_bits"] == 8
    steps = x_shape[0] * (x_shape[1] if len(x_shape) == 3 else 1)
    weights = sum(p.numel() for n, p in model.named_parameters() if "weight" in n)
    assert row["flops"] == 2 * steps * weights
    # unrolled: per layer and direction one input projection and one recurrent GEMM per step
    fwd_graph = rep.records[0].graphs["forward"]
    T = x_shape[1] if kw.get("batch_first") else x_shape[0]
    layers = kw.get("num_layers", 1) * (2 if kw.get("bidirectional") else 1)
    assert fwd_graph.count("sqcompile.int8_mm(") == layers * (1 + T)
