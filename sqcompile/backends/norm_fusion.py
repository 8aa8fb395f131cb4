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

In a backward graph, a pre-norm residual block adds the norm's input gradient to the
residual stream's: ``g = residual + dx`` right after ``triton_l1_norm_backward``, and that
sum is what the Linear before the norm takes as its output gradient (ShiftQuant-ed along
its columns and its rows, and summed over the tokens for its bias).  When ``dx`` has no other
use (through views) and the other operand is a contiguous tensor of its shape and dtype,
:func:`fuse_norm_residuals` replaces both by ``sqcompile::triton_l1_norm_backward_residual``:
the kernel adds the residual gradient (bit for bit the add: each rounded to the dtype) and
writes only the sum, and also gives the ShiftQuants that read it their channel ranges and
the ``sum`` over its rows its value (per-program float32 partial sums, as the norm's own
weight gradient; equal to the graph's sum up to the order of the additions).  Recorded as
``l1_norm_backward+residual`` (``+ranges``, ``+sum``).  It runs before the GEMM regions so
that the ShiftQuant pairs take those ranges.
"""
from __future__ import annotations

import operator
from typing import List, Optional, Tuple

import torch
import torch.fx as fx

from ..decisions import CompileRecord, FusedRegion
from . import fusion as F

LABEL = "l1_norm+quantize"
SHIFT_LABEL = "l1_norm+shiftquant"
RESIDUAL_LABEL = "l1_norm_backward+residual"


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
            if F._is_sym_size(user):
                continue            # a read of a size (dynamic shapes): re-homed when fused
            if F._is_view(user) and user.args[0] is node:
                stack.append(user)
            elif user.target is quantize and user.args[0] is node and F.per_row_quantizer(user):
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
        y = F.output_item(norm, 0)
        quantizers, between = _consumers(y, quantize) if y is not None else (None, set())
        if not quantizers or len({q.args[1] for q in quantizers}) != 1:
            continue
        if any(F._shape_arg(graph, F._val(old).shape, old, emit=False) is None
               for q in quantizers for old in (F.output_item(q, 0), F.output_item(q, 1)) if old is not None) or \
                not F.rehome_sym_sizes(graph, {y, *between} - {u for u in between if F._is_sym_size(u)}, emit=False):
            continue                # a symbolic size the graph cannot compute
        mode = F._fake_mode(norm.args[0])
        with graph.inserting_before(norm):
            new = F._new(graph, fused_op, (*norm.args, quantizers[0].args[1]), norm, mode)
            outs = [F._new(graph, operator.getitem, (new, i), norm, mode) for i in range(6)]
        for i in range(1, 5):                                  # q, scale, mean, inv
            old = F.output_item(norm, i)
            if old is not None:
                old.replace_all_uses_with(outs[i + 1])
        replaced = []
        for q in quantizers:
            for i in (0, 1):                                   # int8 operand, row scales
                old = F.output_item(q, i)
                if old is None:
                    continue
                with graph.inserting_before(old):
                    view = F._new(graph, torch.ops.aten.view.default,
                                  (outs[i], F._shape_arg(graph, F._val(old).shape, old)), norm, mode)
                old.replace_all_uses_with(view)
            replaced.append(q.name)
        removed = [norm.name, *replaced]
        dead = {norm, y, *between, *[u for n in (norm, *quantizers) for u in n.users]}
        dead -= {u for u in dead if F._is_sym_size(u)}
        F.rehome_sym_sizes(graph, dead)
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


def _residual_add(dx: fx.Node) -> Tuple[Optional[fx.Node], List[fx.Node], Optional[fx.Node]]:
    """``(add, views between, other operand)`` when ``dx``'s only use, through single-use
    views, is an ``aten.add.Tensor`` with a contiguous tensor of the add's shape and dtype."""
    node, views = dx, []
    while len(node.users) == 1:
        (user,) = node.users
        if F._is_view(user) and user.args[0] is node:
            node = user
            views.append(user)
            continue
        if user.target is not torch.ops.aten.add.Tensor or len(user.args) != 2 or user.kwargs or \
                sum(a is node for a in user.args) != 1:
            break
        other = user.args[1] if user.args[0] is node else user.args[0]
        out, val = F._val(user), F._val(other) if isinstance(other, fx.Node) else None
        if val is None or out is None or not F._same_shape(val.shape, out.shape) or val.dtype != out.dtype or \
                F._val(node).dtype != out.dtype or not F._contiguous(val) or F._hints(out.shape) is None:
            break
        return user, views, other
    return None, views, None


def fuse_norm_residuals(gm: fx.GraphModule, record: CompileRecord, stage: str,
                        option: Optional[bool] = None) -> fx.GraphModule:
    """Fuse each ``triton_l1_norm_backward`` of ``gm`` with the residual add after it, the
    ranges of the ShiftQuants and the column sums that read the result (see the module
    docstring).  ``option``: the compile's ``fusion`` option."""
    bwd_op = F._op("triton_l1_norm_backward")
    if bwd_op is None or not F.enabled(option):
        return gm
    ops, aten = torch.ops.sqcompile, torch.ops.aten
    graph = gm.graph
    fused = 0
    for bwd in [n for n in graph.nodes if n.op == "call_function" and n.target is bwd_op]:
        dx = F.output_item(bwd, 0)
        add, views, other = _residual_add(dx) if dx is not None else (None, [], None)
        order = {n: i for i, n in enumerate(graph.nodes)}
        if add is None or (other.op != "placeholder" and order[other] > order[bwd]):
            continue                # the residual gradient must exist where the norm's backward runs
        args = F._bound_args(bwd)
        R, L = F._val(args["dy"]).shape
        gemm3 = (1, R, L)
        if F._shape_arg(graph, (R, L), bwd, emit=False) is None or \
                F._shape_arg(graph, F._val(add).shape, add, emit=False) is None:
            continue                # a symbolic size the graph cannot compute
        ranged = [(sq, F._range_axis(F._val(sq.args[0]), sq.args[3], gemm3))
                  for sq in F.readers_of(add, ops.triton_shiftquant.default)]
        ranged = [(sq, 3 if axis == "n" else 4) for sq, axis in ranged if axis is not None]
        sums = [node for node, _ in F.column_sums(add, gemm3, F._val(add).dtype)]
        mode = F._fake_mode(args["dy"])
        with graph.inserting_before(bwd):
            residual = F._new(graph, aten.view.default, (other, F._shape_arg(graph, (R, L), bwd)), bwd, mode)
            new = F._new(graph, ops.triton_l1_norm_backward_residual.default, (
                args["dy"], args["q"], args["scale"], args["mean"], args["inv"], args["weight"], residual,
                args["grad_bits"], args["center"], args["l1_scale"], args["need_weight_grad"], args["need_bias_grad"],
                bool(ranged), bool(sums)), bwd, mode)
            outs = [F._new(graph, operator.getitem, (new, i), bwd, mode) for i in range(3)]
        for i in (1, 2):                                       # dweight, dbias
            old = F.output_item(bwd, i)
            if old is not None:
                old.replace_all_uses_with(outs[i])
        with graph.inserting_before(add):
            total = F._new(graph, aten.view.default, (outs[0], F._shape_arg(graph, F._val(add).shape, add)), bwd, mode)
        add.replace_all_uses_with(total)
        for sq, index in ranged:
            with graph.inserting_before(sq):
                found = F._new(graph, operator.getitem, (new, index), bwd, mode)
            F.given_ranges(graph, sq, found, mode)
        for node in sums:
            F.given_sum(graph, node, new, 5, bwd, mode, [])
        removed = [add, *reversed(views), dx, *[u for u in bwd.users if u is not dx], bwd]
        for node in removed:
            graph.erase_node(node)
        label = RESIDUAL_LABEL + ("+ranges" if ranged else "") + ("+sum" if sums else "")
        decision = _norm_decision(record, bwd)
        F._record(record, decision, FusedRegion(
            name=f"R{len(record.regions) + 1}", stage=stage, label=label, nodes=[n.name for n in reversed(removed)],
            module_path=decision.module_path if decision else F._module_of(bwd),
            decision=decision.node if decision else None, outputs=1, stop="",
            kernel="sqcompile/kernels/triton_norm.py:_l1_norm_backward_kernel"))
        fused += 1
    return F.finished(gm, record, stage, fused)


# ---------------------------------------------------------------------------------------------
# The same two fusions for the CPU L1-norm kernels (kernels/cpu_norm.c)
# ---------------------------------------------------------------------------------------------

CPU_KERNEL = "sqcompile/kernels/cpu_norm.c:sq_l1_norm_forward"
CPU_SHIFT_KERNEL = CPU_KERNEL + ", sqcompile/kernels/cpu_quant.c:sq_shiftquant_quotients"
CPU_BACKWARD_KERNEL = "sqcompile/kernels/cpu_norm.c:sq_l1_norm_backward"


def _cpu_consumers(y: fx.Node, row: int) -> Tuple[List[fx.Node], List[fx.Node], List[fx.Node], bool]:
    """``(quantizers, row maxima, nodes between, other uses)`` of ``y``: the per-row nearest
    ``sqcompile.quantize`` calls over rows of ``row`` values that read it (through views), of
    one bit width, with the ``amax(abs(detach(.)))`` of their inputs that the GEMMs save, and
    whether anything else reads ``y`` too."""
    views = F.views_of(y)
    quantizers, maxima, other = [], [], False
    for v in views:
        rows = F._same(F._val(v).shape[-1], row)
        for user in v.users:
            if user in views or F._is_sym_size(user):
                continue
            if rows and user.target is torch.ops.sqcompile.quantize.default and user.args[0] is v and \
                    F.per_row_quantizer(user) and (not quantizers or quantizers[0].args[1] == user.args[1]):
                quantizers.append(user)
                continue
            amax = F.row_amax(v) if rows else None
            if amax is not None and user is amax.args[0].args[0]:
                maxima.append(amax)
            else:
                other = True
    inputs = {q.args[0] for q in quantizers}
    kept = [m for m in maxima if m.args[0].args[0].args[0] in inputs]
    other = other or len(kept) < len(maxima)            # a maximum of no fused quantizer's input
    return quantizers, kept, [b for m in kept for b in (m.args[0].args[0], m.args[0])], other


def _cpu_shift_consumers(y: fx.Node, row: int) -> Tuple[List[F.OuterComposition], bool]:
    """``(compositions, other uses)`` of ``y``: the next GEMMs' ``act_groups`` quantizers
    (:func:`~sqcompile.backends.fusion.act_groups_quantizer`) over ``y`` reshaped to
    ``[1, rows, row]`` (one channel per column over all rows), of one bit width and group
    count, and whether anything else reads ``y`` too."""
    views = F.views_of(y)
    found, other = [], False
    for v in views:
        c = F.act_groups_quantizer(v, y)
        if c is not None and F._same(F._val(v).shape[0], 1) and F._same(F._val(v).shape[2], row) and \
                (not found or found[0].quantizer.args[1:3] == c.quantizer.args[1:3]):
            found.append(c)
            continue
        other = other or any(u not in views and not F._is_sym_size(u) for u in v.users)
    return found, other


def fuse_cpu_norm_quantizers(gm: fx.GraphModule, record: CompileRecord, stage: str,
                             option: Optional[bool] = None) -> fx.GraphModule:
    """Replace each ``sqcompile::cpu_l1_norm`` over rows whose output the next GEMMs' per-row
    quantizers read (with the row maxima they save) by one
    ``sqcompile::cpu_l1_norm_quantized`` (:mod:`sqcompile.kernels.cpu_norm`): the kernel
    quantizes each row of ``y`` while it is in cache, bit for bit what the quantizers compute,
    and writes ``y`` itself only when something else reads it too (a post-norm block's
    residual).  Label ``l1_norm+quantize``, on the norm's decision.  Where those GEMMs
    quantize with ``act_groups`` instead (:func:`_cpu_shift_consumers`), by one
    ``sqcompile::cpu_l1_norm_shiftquant``: each row's maximum and quotients while it is in
    cache, then the channels' ShiftQuant over the quotients; label ``l1_norm+shiftquant``."""
    if not F.enabled(option) or stage == "backward":
        return gm
    ops = torch.ops.sqcompile
    norm_op = getattr(ops, "cpu_l1_norm", None)
    if norm_op is None:
        return gm
    from ..kernels import cpu_norm

    graph = gm.graph
    fused = 0
    for norm in [n for n in graph.nodes if n.op == "call_function" and n.target is norm_op.default]:
        x, dims, y = F._val(norm.args[0]), norm.args[3], F.output_item(norm, 0)
        if y is None or x is None or not cpu_norm.rows_only(x.shape, dims):
            continue
        row = cpu_norm.slice_layout(x.shape, dims)[3]
        quantizers, maxima, between, other = _cpu_consumers(y, row)
        compositions = []
        if quantizers:
            target, args, label, kernel = ops.cpu_l1_norm_quantized.default, (quantizers[0].args[1], other), \
                LABEL, CPU_KERNEL
        else:
            compositions, other = _cpu_shift_consumers(y, row)
            if not compositions:
                continue
            target, args, label, kernel = ops.cpu_l1_norm_shiftquant.default, \
                (*compositions[0].quantizer.args[1:3], other), SHIFT_LABEL, CPU_SHIFT_KERNEL
        mode = F._fake_mode(norm.args[0])
        with graph.inserting_before(norm):
            new = F._new(graph, target, (*norm.args, *args), norm, mode)
            outs = [F._new(graph, operator.getitem, (new, i), norm, mode) for i in range(8)]
        olds = [(F.output_item(q, i), outs[i]) for q in quantizers for i in (0, 1)] + [(m, outs[2]) for m in maxima]
        olds += [(F.output_item(c.quantizer, i), outs[i]) for c in compositions for i in (0, 1)]
        olds += [(c.outer, outs[2]) for c in compositions]
        for old, out in olds:
            if old is not None:
                old.replace_all_uses_with(F.viewed(graph, out, F._val(old).shape, new, mode))
        doomed = {norm, *norm.users, *F.views_of(y), *between, *quantizers, *maxima,
                  *[u for q in quantizers for u in q.users]}
        doomed |= {n for c in compositions for n in (*c.nodes, c.outer, *c.quantizer.users)}
        for i in range(0 if other else 1, 5):                  # y (when read elsewhere), q, amax, total, deviation
            old = F.output_item(norm, i)
            if old is not None:
                old.replace_all_uses_with(outs[i + 3])
        names = [norm.name, *[q.name for q in quantizers], *[m.name for m in maxima],
                 *[c.quantizer.name for c in compositions]]
        F.erase_dead(graph, doomed)
        F._record(record, *_cpu_region(record, stage, norm, label + ("+y" if other else ""), names, 3, kernel))
        fused += 1
    return F.finished(gm, record, stage, fused)


def fuse_cpu_norm_residuals(gm: fx.GraphModule, record: CompileRecord, stage: str,
                            option: Optional[bool] = None) -> fx.GraphModule:
    """Give each ``sqcompile::cpu_l1_norm_backward`` whose ``dx`` only the residual add after
    it reads (a pre-norm block's) that add's other operand: the kernel writes ``dx +
    residual`` (bit for bit the add) and ``dx`` itself is never written.  Label
    ``l1_norm_backward+residual``, on the norm's decision."""
    bwd_op = getattr(torch.ops.sqcompile, "cpu_l1_norm_backward", None)
    if bwd_op is None or not F.enabled(option) or stage != "backward":
        return gm
    graph = gm.graph
    fused = 0
    for bwd in [n for n in graph.nodes if n.op == "call_function" and n.target is bwd_op.default]:
        dx = F.output_item(bwd, 0)
        add, views, other = _residual_add(dx) if dx is not None else (None, [], None)
        order = {n: i for i, n in enumerate(graph.nodes)}
        if add is None or F._bound_args(bwd)["residual"] is not None or F._val(add).dtype != torch.float32 or \
                (other.op != "placeholder" and order[other] > order[bwd]):
            continue                # the residual gradient must exist where the norm's backward runs
        mode = F._fake_mode(bwd.args[0])
        residual = F.viewed(graph, other, F._val(bwd.args[0]).shape, bwd, mode)     # as dy
        with graph.inserting_before(bwd):
            new = F._new(graph, bwd_op.default, (*bwd.args, residual), bwd, mode)
            outs = [F._new(graph, operator.getitem, (new, i), bwd, mode) for i in range(3)]
        for i in (1, 2):                                       # the parameters' sums
            old = F.output_item(bwd, i)
            if old is not None:
                old.replace_all_uses_with(outs[i])
        add.replace_all_uses_with(F.viewed(graph, outs[0], F._val(add).shape, new, mode))
        names = [bwd.name, *[v.name for v in views], add.name]
        F.erase_dead(graph, {add, *views, dx, *bwd.users, bwd})
        F._record(record, *_cpu_region(record, stage, bwd, RESIDUAL_LABEL, names, 1, CPU_BACKWARD_KERNEL))
        fused += 1
    return F.finished(gm, record, stage, fused)


def _cpu_region(record: CompileRecord, stage: str, norm: fx.Node, label: str, names, outputs: int, kernel: str):
    decision = _norm_decision(record, norm)
    return decision, FusedRegion(
        name=f"R{len(record.regions) + 1}", stage=stage, label=label, nodes=names,
        module_path=decision.module_path if decision else F._module_of(norm),
        decision=decision.node if decision else None, outputs=outputs, stop="", kernel=kernel)


def _norm_decision(record: CompileRecord, norm: fx.Node):
    """The norm decision ``norm`` came from: the only quantized norm of its module."""
    module = F._module_of(norm)
    found = [d for d in record.decisions if d.kind == "norm" and d.quantized and d.module_path == module]
    return found[0] if len(found) == 1 else None


__all__ = ["fuse_cpu_norm_quantizers", "fuse_cpu_norm_residuals", "fuse_norm_quantizers", "fuse_norm_residuals",
           "LABEL", "RESIDUAL_LABEL", "SHIFT_LABEL"]
