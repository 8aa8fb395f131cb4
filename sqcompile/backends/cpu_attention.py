"""Quantized attention's softmax, and its backward, on CPU as C kernels
(``sqcompile::attention_probs``, ``sqcompile::attention_probs_backward``).

In a forward (or inference) graph of the torch kernel family on CPU, quantized attention
(:func:`sqcompile.ops.quantized_sdpa`) is the int8 GEMM ``Q K^T``, then::

    x = int8_mm.float() * (sa * sb)        # dequantize: Q's row scales times K's column scales
    x = x.view(...) * c                    # the attention scale
    x = x.masked_fill(~ones(L, S).tril(), -inf)    # is_causal (optional)
    p = x.softmax(-1)
    q, q_scale = quantize(p.view(...), bits, rows, nearest)   # P's quantizer for P V
    amax = p.view(...).abs().amax(-1, keepdim=True)          # its maxima, saved for the backward

This pass replaces that chain (each value used only by the next op, ``p`` used by anything)
with one :func:`~sqcompile.kernels.cpu_attention.attention_probs` call whose outputs take
the place of ``p``, ``q``, ``q_scale`` and ``amax``: one pass over each row of scores in cache
where Inductor's loops wrote and re-read the float scores (see that module).  The saved
tensors do not change.

In a backward graph it replaces ``dS = softmax_backward(dP, P) [.masked_fill(mask, 0)] * c``,
with ``dP`` the dequantized result of a CPU ``int8_mm`` (times its row scales, its column
scales or both) and ``mask`` any boolean ``[L, S]`` tensor (the causal mask, a user's), by
:func:`~sqcompile.kernels.cpu_attention.attention_probs_backward`: ``dS`` is written once,
where Inductor's loops recomputed the softmax backward in each pass of the quantizers that
read it (and :mod:`sqcompile.backends.cpu_quant` then quantizes it for ``dQ`` and ``dK`` in
one kernel, as every GEMM's output gradient).

Nothing happens on other devices, with other kernel families, with a ``stats`` quantizer of
``P``, with a forward mask other than the causal one (a boolean or additive ``attn_mask``:
the backward still fuses), for a softmax not over the last dim or not in float32, when the
kernels cannot run here (:func:`~sqcompile.kernels.cpu_attention.status`), or with
``fusion=False``.  Each fusion is recorded as a :class:`~sqcompile.decisions.FusedRegion`
on the attention's decision (labels ``dequant+scale[+causal]+softmax+quantize`` and
``dequant+softmax_backward[+mask]+scale``), as the GEMM regions of
:mod:`sqcompile.backends.fusion` are.
"""
from __future__ import annotations

import math
import operator
from typing import List, NamedTuple, Optional

import torch
import torch.fx as fx

from ..decisions import CompileRecord
from . import fusion as F

aten = torch.ops.aten
KERNEL = "sqcompile/kernels/cpu_attention.c:sq_attention_probs"
BACKWARD_KERNEL = "sqcompile/kernels/cpu_attention.c:sq_attention_probs_backward"


class _Match(NamedTuple):
    softmax: fx.Node
    mm: fx.Node
    sa: fx.Node
    sb: fx.Node
    scale: float
    causal: bool
    quantizer: fx.Node
    amax: Optional[fx.Node]
    chain: List[fx.Node]          # the nodes from the GEMM's conversion to the softmax


def _causal_mask(mask, L, S) -> bool:
    """Is ``mask`` ``~ones(L, S, dtype=bool).tril()`` (the entries ``is_causal`` hides)?"""
    if not isinstance(mask, fx.Node) or mask.target is not aten.bitwise_not.default:
        return False
    tril = mask.args[0]
    if not isinstance(tril, fx.Node) or tril.target is not aten.tril.default or tril.args[1:] not in ((), (0,)):
        return False
    ones = tril.args[0]
    if not isinstance(ones, fx.Node) or ones.target is not aten.ones.default or ones.kwargs.get("dtype") is not torch.bool:
        return False
    v = F._val(ones)
    return v is not None and F._same_shape(v.shape, (L, S))


def _scaled(x: fx.Node) -> Optional[float]:
    """``c`` when ``x`` is ``aten.mul.Tensor(y, c)`` with ``c`` a number."""
    if x.target is not aten.mul.Tensor or len(x.args) != 2 or not isinstance(x.args[1], (int, float)) or \
            isinstance(x.args[1], bool):
        return None
    return float(x.args[1])


def _chain(softmax: fx.Node) -> Optional[tuple]:
    """``(mm, sa, sb, c, causal, nodes)`` when ``softmax``'s input is the dequantized, scaled
    and (causally) masked int32 product of a CPU ``int8_mm`` (the module docstring)."""
    x, nodes, causal = softmax.args[0], [], False
    out = F._val(softmax)
    if out is None or out.dtype != torch.float32 or out.dim() < 2 or softmax.args[1] not in (-1, out.dim() - 1) \
            or softmax.args[2]:
        return None
    L, S = out.shape[-2:]
    if x.target is aten.masked_fill.Scalar and F.single_user(x) and x.args[2] == -math.inf and \
            _causal_mask(x.args[1], L, S):
        nodes.append(x)
        x, causal = x.args[0], True
    c = _scaled(x)
    if c is None or not F.single_user(x):
        return None
    nodes.append(x)
    found = F.dequantized_gemm(x.args[0], L, S)
    if found is None or found[1] is None or found[2] is None:
        return None
    mm, sa, sb, more = found
    return mm, sa, sb, c, causal, nodes + more


def _match(softmax: fx.Node) -> Optional[_Match]:
    found = _chain(softmax)
    if found is None:
        return None
    mm, sa, sb, c, causal, chain = found
    views = F.views_of(softmax)
    quantizers = [u for v in views for u in v.users if u.target is torch.ops.sqcompile.quantize.default and F.per_row_quantizer(u) and u.args[0] is v]
    if len(quantizers) != 1:
        return None
    quantizer = quantizers[0]
    return _Match(softmax, mm, sa, sb, c, causal, quantizer, F.row_amax(quantizer.args[0]), chain)


class _BackwardMatch(NamedTuple):
    sbd: fx.Node                  # aten._softmax_backward_data
    ds: fx.Node                   # the scale's multiply: dS
    mm: fx.Node
    sa: Optional[fx.Node]
    sb: Optional[fx.Node]
    probs: fx.Node
    mask: Optional[fx.Node]
    scale: float
    chain: List[fx.Node]          # the nodes from the GEMM's conversion to dS


def _match_backward(sbd: fx.Node) -> Optional[_BackwardMatch]:
    """The backward graph's ``dS = softmax_backward(dP, P) [masked_fill(mask, 0)] * c`` with
    ``dP`` a dequantized CPU ``int8_mm`` (:func:`_dequantized`), ``P`` float32 and ``mask`` a
    boolean ``[L, S]`` tensor."""
    grad, probs, dim, dtype = sbd.args
    out, p = F._val(sbd), F._val(probs)
    if out is None or p is None or out.dtype != torch.float32 or dtype != torch.float32 or out.dim() < 2 or \
            dim not in (-1, out.dim() - 1) or p.dtype != torch.float32 or not F._same_shape(p.shape, out.shape) or \
            not F.single_user(sbd):
        return None
    L, S = out.shape[-2:]
    x, chain, mask = next(iter(sbd.users)), [sbd], None
    if x.target is aten.masked_fill.Scalar and x.args[2] == 0 and F.single_user(x):
        m = F._val(x.args[1])
        if m is None or m.dtype != torch.bool or any(not F._same(n, 1) for n in m.shape[:-2]) or \
                not F._same_shape(m.shape[-2:], (L, S)):
            return None
        mask, chain = x.args[1], chain + [x]
        x = next(iter(x.users))
    c = _scaled(x)
    if c is None or x.args[0] is not chain[-1]:
        return None
    found = F.dequantized_gemm(grad, L, S)
    if found is None:
        return None
    mm, sa, sb, more = found
    return _BackwardMatch(sbd, x, mm, sa, sb, probs, mask, c, chain + [x] + more)


def _fuse_backward(gm: fx.GraphModule, record: CompileRecord, stage: str, sources: set) -> int:
    """Replace each :func:`_match_backward` chain by one ``sqcompile::attention_probs_backward``."""
    graph = gm.graph
    fused = 0
    for sbd in [n for n in graph.nodes if n.op == "call_function" and n.target is aten._softmax_backward_data.default]:
        m = _match_backward(sbd)
        if m is None or F._shape_arg(graph, F._val(m.mm).shape, m.sbd, emit=False) is None or \
                F._shape_arg(graph, F._val(m.ds).shape, m.sbd, emit=False) is None:
            continue
        mode = F._fake_mode(m.mm)
        acc_shape = F._val(m.mm).shape
        with graph.inserting_before(m.ds):
            probs = F._new(graph, aten.reshape.default, (m.probs, F._shape_arg(graph, acc_shape, m.ds)), m.mm, mode)
            mask = None if m.mask is None else F._new(
                graph, aten.reshape.default, (m.mask, F._shape_arg(graph, F._val(m.mask).shape[-2:], m.ds)), m.mm, mode)
            new = F._new(graph, torch.ops.sqcompile.attention_probs_backward.default,
                         (m.mm, m.sa, m.sb, probs, mask, m.scale), m.mm, mode)
        m.ds.replace_all_uses_with(F.viewed(graph, new, F._val(m.ds).shape, new, mode))
        names = [n.name for n in reversed(m.chain)]
        F.erase_dead(graph, set(m.chain))
        F.record_region(record, stage, F._decision_for(record, m.mm, sources),
                        f"dequant+softmax_backward{'+mask' if m.mask is not None else ''}+scale", names, m.mm, 1,
                        BACKWARD_KERNEL)
        fused += 1
    return fused


def _fuse_forward(gm: fx.GraphModule, record: CompileRecord, stage: str, sources: set) -> int:
    """Replace each :func:`_match` chain by one ``sqcompile::attention_probs``."""
    softmaxes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is aten._softmax.default]
    matches = [m for m in map(_match, softmaxes) if m is not None]
    graph = gm.graph
    fused = 0
    for m in matches:
        bits = m.quantizer.args[1]
        mode = F._fake_mode(m.mm)
        shapes = [F._val(n).shape for n in (m.softmax, F.output_item(m.quantizer, 0), F.output_item(m.quantizer, 1), m.amax)
                  if n is not None]
        if any(F._shape_arg(graph, s, m.softmax, emit=False) is None for s in shapes):
            continue                # a symbolic size the graph cannot compute
        with graph.inserting_before(m.softmax):
            new = F._new(graph, torch.ops.sqcompile.attention_probs.default,
                         (m.mm, m.sa, m.sb, m.scale, m.causal, bits), m.mm, mode)
            outs = [F._new(graph, operator.getitem, (new, i), m.mm, mode) for i in range(4)]

        doomed = {m.softmax, *m.chain, *F.views_of(m.softmax), *m.quantizer.users, m.quantizer}
        if m.causal:            # ~ones(L, S).tril()
            mask = m.chain[0].args[1]
            doomed |= {mask, mask.args[0], mask.args[0].args[0]}
        if m.amax is not None:
            doomed |= {m.amax, m.amax.args[0], m.amax.args[0].args[0]}

        for old, out in ((m.softmax, outs[0]), (F.output_item(m.quantizer, 0), outs[1]),
                         (F.output_item(m.quantizer, 1), outs[2]), (m.amax, outs[3])):
            if old is not None:
                old.replace_all_uses_with(F.viewed(graph, out, F._val(old).shape, new, mode))
        names = [n.name for n in reversed(m.chain)] + [m.softmax.name, m.quantizer.name]
        F.erase_dead(graph, doomed)
        F.record_region(record, stage, F._decision_for(record, m.mm, sources),
                        f"dequant+scale{'+causal' if m.causal else ''}+softmax+quantize", names, m.mm, 4, KERNEL)
        fused += 1
    return fused


def fuse_attention_probs(gm: fx.GraphModule, record: CompileRecord, stage: str,
                         option: Optional[bool] = None) -> fx.GraphModule:
    """Replace each quantized attention's dequantize ... ``P`` quantizer chain in ``gm`` (a
    forward or inference graph) by one ``sqcompile::attention_probs``, and in a backward
    graph each softmax backward chain by one ``sqcompile::attention_probs_backward`` (the
    module docstring).  ``option``: the compile's ``fusion`` option."""
    if not F.enabled(option):
        return gm
    from ..kernels import cpu_attention

    backward = stage == "backward"
    softmax = aten._softmax_backward_data.default if backward else aten._softmax.default
    gemms = [n for n in gm.graph.nodes if n.target is torch.ops.sqcompile.int8_mm.default]
    on_cpu = any(F._val(n) is not None and F._val(n).device.type == "cpu" for n in gemms)
    # the kernels are built at the first graph that could take them, not on a GPU's graphs
    if not on_cpu or not any(n.target is softmax for n in gm.graph.nodes) or not cpu_attention.status()[0]:
        return gm
    sources = {F._source_of(n) for n in gemms}
    if not backward:
        return F.finished(gm, record, stage, _fuse_forward(gm, record, stage, sources))
    return F.finished(gm, record, stage, _fuse_backward(gm, record, stage, sources))


__all__ = ["fuse_attention_probs", "KERNEL", "BACKWARD_KERNEL"]
