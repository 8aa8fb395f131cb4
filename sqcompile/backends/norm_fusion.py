"""An L1 norm that feeds quantized GEMMs writes their int8 operand directly.

In a forward graph of the Triton kernel family, a LayerNorm / RMSNorm-kind L1 norm
(``sqcompile::triton_l1_norm``) is usually followed by the per-row activation quantizer of the
GEMM it feeds (``triton_quantize(y, act_bits, rows, nearest)``; with separate ``q`` / ``k`` /
``v`` Linears, three of them).  When *every* use of the norm's output ``y`` is such a
quantizer (through pure views), with the same bits, this pass replaces the norm by
``sqcompile::triton_l1_norm_quantized``: the kernel quantizes ``y`` per row in registers and
writes the int8 operand and its row scales; ``y`` itself is never written, and the quantizers
are gone.  The results are bit-identical to the unfused graph (the kernel rounds ``y`` to its
dtype and quantizes it with the quantizer's own device functions).

Nothing happens when ``y`` has any other use (a residual, a float op, a graph output), when a
quantizer is not per row or rounds stochastically, or when the quantizers disagree on the
bits.  Each fusion is recorded as a :class:`~sqcompile.decisions.FusedRegion` labelled
``l1_norm+quantize`` on the norm's decision, next to the GEMM regions of
:mod:`sqcompile.backends.fusion`, and follows the same ``fusion`` option.
"""
from __future__ import annotations

import operator
from typing import List, Optional, Tuple

import torch
import torch.fx as fx

from ..decisions import CompileRecord, FusedRegion
from . import fusion as F

LABEL = "l1_norm+quantize"


def _getitem(node: fx.Node, index: int) -> Optional[fx.Node]:
    for user in node.users:
        if user.target is operator.getitem and user.args[1] == index:
            return user
    return None


def _per_row(q: fx.Node) -> bool:
    """Is the quantizer ``q`` nearest-rounding with one scale per row (every dim but the last)?"""
    x = F._val(q.args[0])
    _, bits, keep, stochastic = q.args[:4]
    if x is None or x.dim() < 1 or stochastic or not F._static(x.shape):
        return False
    nd = x.dim()
    keep = {d % nd for d in keep}
    return (nd - 1) not in keep and all(d in keep for d in range(nd - 1) if x.shape[d] > 1)


def _consumers(y: fx.Node, quantize) -> Tuple[Optional[List[fx.Node]], set]:
    """``(quantizers, nodes between)``: the quantizers that are all of ``y``'s uses (through
    views), or ``None``."""
    found, stack, seen = [], [y], set()
    while stack:
        node = stack.pop()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            if user.op == "output":
                return None, seen
            if F._is_view(user) and user.args[0] is node:
                stack.append(user)
            elif user.target is quantize and user.args[0] is node and _per_row(user):
                found.append(user)
            else:
                return None, seen
    return found or None, seen


def fuse_norm_quantizers(gm: fx.GraphModule, record: CompileRecord, stage: str,
                         option: Optional[bool] = None) -> fx.GraphModule:
    """Fuse each ``triton_l1_norm`` of ``gm`` with the per-row quantizers that are all its
    output's uses (see the module docstring).  ``option``: the compile's ``fusion`` option."""
    norm_op = F._op("triton_l1_norm")
    if norm_op is None or not F.enabled(option):
        return gm
    ops = torch.ops.sqcompile                 # registered with triton_l1_norm
    fused_op, quantize = ops.triton_l1_norm_quantized.default, ops.triton_quantize.default
    graph = gm.graph
    fused = 0
    for norm in [n for n in graph.nodes if n.op == "call_function" and n.target is norm_op]:
        y = _getitem(norm, 0)
        quantizers, between = _consumers(y, quantize) if y is not None else (None, set())
        if not quantizers or len({q.args[1] for q in quantizers}) != 1:
            continue
        mode = F._fake_mode(norm.args[0])
        with graph.inserting_before(norm):
            new = F._new(graph, fused_op, (*norm.args, quantizers[0].args[1]), norm, mode)
            outs = [F._new(graph, operator.getitem, (new, i), norm, mode) for i in range(6)]
        for i in range(1, 5):                                  # q, scale, mean, inv
            old = _getitem(norm, i)
            if old is not None:
                old.replace_all_uses_with(outs[i + 1])
        replaced = []
        for q in quantizers:
            for i in (0, 1):                                   # int8 operand, row scales
                old = _getitem(q, i)
                if old is None:
                    continue
                with graph.inserting_before(old):
                    view = F._new(graph, torch.ops.aten.view.default, (outs[i], list(F._val(old).shape)), norm, mode)
                old.replace_all_uses_with(view)
            replaced.append(q.name)
        removed = [norm.name, *replaced]
        dead = {norm, y, *between, *[u for n in (norm, *quantizers) for u in n.users]}
        for node in reversed(list(graph.nodes)):               # the replaced nodes, last first
            if node in dead and not node.users:
                graph.erase_node(node)
        decision = _norm_decision(record, norm)
        F._record(record, decision, FusedRegion(
            name=f"R{len(record.regions) + 1}", stage=stage, label=LABEL, nodes=removed,
            module_path=decision.module_path if decision else F._module_of(norm),
            decision=decision.node if decision else None, outputs=2, stop="",
            kernel="sqcompile/kernels/triton_norm.py:_l1_norm_kernel"))
        fused += 1
    return F.finished(gm, record, stage, fused)


def _norm_decision(record: CompileRecord, norm: fx.Node):
    """The norm decision ``norm`` came from: the only quantized norm of its module."""
    module = F._module_of(norm)
    found = [d for d in record.decisions if d.kind == "norm" and d.quantized and d.module_path == module]
    return found[0] if len(found) == 1 else None


__all__ = ["fuse_norm_quantizers", "LABEL"]
