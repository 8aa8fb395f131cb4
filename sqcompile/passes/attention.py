"""Attention written out as matmuls and a softmax, run as ``scaled_dot_product_attention``
where the fused integer attention would run it.

Models written before ``F.scaled_dot_product_attention`` (or for clarity, as timm's ViT and
minGPT) compute ``softmax(q @ k^T * scale [masked]) @ v`` op by op.  Quantized that way,
the two matmuls become two GEMMs and the scores go through memory between them.  Where a
quantized ``scaled_dot_product_attention`` would run as the fused Triton kernels
(:func:`~sqcompile.passes.precision.attention_unfused`: the Triton family with integer
execution, on CUDA by default), this pass replaces the chain with one
``F.scaled_dot_product_attention`` node, which :mod:`~sqcompile.passes.quantize_gemms` then
rewrites like any other; everywhere else the graph is left alone.

Matched, each intermediate used only by the next op (anything else is left as written)::

    s = q @ k.transpose(-2, -1)          # or (q * c) @ k.transpose(-2, -1)
    s = s * c    |  s / c                # optional, c a number
    s = s.masked_fill(m, -inf)  |  s + bias    # optional
    p = s.softmax(-1)                    # over the last dim, no dtype argument
    p = dropout(p, 0.0)                  # optional, p = 0 only
    out = p @ v

becomes ``scaled_dot_product_attention(q, k, v, attn_mask=~m | bias, scale=c)`` (``1 / c`` for
a division: equal up to float rounding; a scale on ``q`` is applied to the scores instead,
which the quantizers see the same way up to rounding).  The three operands must have the
same batch dims, and the two matmuls the same options as the attention would get (an
override that treats ``matmul`` differently keeps the explicit form).  The report's row says
it was rewritten.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..config import Config
from ..decisions import CompileRecord
from .common import arithmetic, call_name, example_value, only_user, shape_of
from .precision import Target, attention_unfused, choose_execution, op_config

NOTE = "written as matmul, softmax, matmul; run as scaled_dot_product_attention"


def explicit_attention(gm: fx.GraphModule, config: Config, target: Target, record: CompileRecord) -> fx.GraphModule:
    """Replace each matched chain (see the module docstring) by one sdpa node."""
    changed = False
    for node in list(gm.graph.nodes):
        if call_name(node) == "matmul" and node.graph is gm.graph:
            changed |= _rewrite(gm, node, config, target)
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x != 0


def _scaled(node):
    """``(x, c)`` for ``x * c`` / ``c * x`` (``c`` a number), ``(x, 1 / c)`` for ``x / c``; else None."""
    name = arithmetic(node)
    if name == "mul" and len(node.args) == 2 and not node.kwargs:
        a, b = node.args
        if isinstance(a, fx.Node) and _number(b):
            return a, float(b)
        if isinstance(b, fx.Node) and _number(a):
            return b, float(a)
    if name == "div" and len(node.args) == 2 and not node.kwargs:
        a, b = node.args
        if isinstance(a, fx.Node) and _number(b):
            return a, 1.0 / float(b)
    return None


def _transposed_key(node) -> Optional[fx.Node]:
    """``k`` for ``k.transpose(-2, -1)`` (any spelling of the last two dims), else None."""
    if call_name(node) != "transpose" or len(node.args) != 3 or node.kwargs:
        return None
    k, d0, d1 = node.args
    value = example_value(k)
    if value is None or not isinstance(d0, int) or not isinstance(d1, int):
        return None
    nd = value.dim()
    return k if {d0 % nd, d1 % nd} == {nd - 2, nd - 1} else None


def _softmax_input(node) -> Optional[fx.Node]:
    """The input of ``softmax(x, dim=-1)`` without a dtype, else None."""
    if call_name(node) != "softmax":
        return None
    args = list(node.args) + [None] * 3
    x = args[0]
    dim = node.kwargs.get("dim", args[1])
    dtype = node.kwargs.get("dtype", args[2] if node.op == "call_function" else None)
    value = example_value(x) if isinstance(x, fx.Node) else None
    if value is None or dtype is not None or not isinstance(dim, int) or dim % value.dim() != value.dim() - 1:
        return None
    return x


def _rewrite(gm: fx.GraphModule, out: fx.Node, config: Config, target: Target) -> bool:
    if len(out.args) != 2 or out.kwargs:
        return False
    p, v = out.args
    chain = [out]
    if call_name(p) == "dropout" and only_user(p, out):
        rate = p.kwargs.get("p", p.args[1] if len(p.args) > 1 else 0.5)
        if rate != 0:
            return False
        chain.append(p)
        p = p.args[0]
    s = _softmax_input(p) if only_user(p, chain[-1]) else None
    if s is None:
        return False
    chain.append(p)
    mask = keep_from = None
    if call_name(s) == "masked_fill" and only_user(s, p) and len(s.args) == 3 and s.args[2] == -math.inf:
        chain.append(s)
        s, keep_from = s.args[0], s.args[1]
    elif arithmetic(s) == "add" and only_user(s, p) and len(s.args) == 2 and not s.kwargs \
            and all(isinstance(a, fx.Node) for a in s.args):
        chain.append(s)
        s, mask = s.args
    if not only_user(s, chain[-1]):
        return False
    scale = 1.0
    scaled = _scaled(s)
    if scaled is not None:
        chain.append(s)
        s, scale = scaled
        if not only_user(s, chain[-1]):
            return False
    if call_name(s) != "matmul" or len(s.args) != 2 or s.kwargs:
        return False
    q, kt = s.args
    k = _transposed_key(kt) if isinstance(kt, fx.Node) else None
    if k is None:
        return False
    chain.append(s)
    q_scaled = _scaled(q) if scale == 1.0 and only_user(q, s) else None
    if q_scaled is not None:
        chain.append(q)
        q, scale = q_scaled
    values = [example_value(t) for t in (q, k, v)]
    if any(x is None or x.dim() < 3 for x in values):
        return False
    if len({tuple(shape_of(t)[:-2]) for t in (q, k, v)}) != 1:     # symbolic sizes compare by name
        return False
    mask_node = keep_from if keep_from is not None else mask
    mask_value = None if mask_node is None else example_value(mask_node)
    if mask_node is not None and mask_value is None:
        return False
    if not _fused(out, s, config, target, values, mask_value):
        return False
    with gm.graph.inserting_before(out):
        if keep_from is not None:      # masked_fill's mask says what to drop; sdpa's what to keep
            mask = gm.graph.call_function(torch.logical_not, (keep_from,))
            with mask_value.fake_mode:
                mask.meta["example_value"] = torch.logical_not(mask_value)
        sdpa = gm.graph.call_function(F.scaled_dot_product_attention, (q, k, v),
                                      {"attn_mask": mask, "scale": scale})
    sdpa.meta.update(out.meta)
    sdpa.meta["sq_note"] = NOTE
    out.replace_all_uses_with(sdpa)
    for node in chain:                   # the chain's own nodes, last first; the transpose if unused
        gm.graph.erase_node(node)
    if not kt.users:
        gm.graph.erase_node(kt)
    return True


def _fused(out: fx.Node, scores: fx.Node, config: Config, target: Target, values, mask) -> bool:
    """Would the attention run fused (:func:`~sqcompile.passes.precision.attention_unfused`),
    with both matmuls getting the options it gets?  Else the explicit form stays."""
    cfg, _ = op_config(out, config, "scaled_dot_product_attention")
    if cfg is None or not cfg.quantize:
        return False
    if any(op_config(n, config, "matmul")[0] != cfg for n in (out, scores)):
        return False
    try:
        ex = choose_execution(cfg, target)
    except ValueError:          # kernels="triton" where Triton cannot run: quantize_gemms says so
        return False
    return attention_unfused(cfg, target, ex, config, values, mask, 0.0) is None
