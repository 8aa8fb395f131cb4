"""The fused attention writes a fused ``qkv`` projection's gradient in place.

A transformer that computes q, k and v with one Linear splits its output into heads, and the
forward reads the three slices where they lie
(:func:`~sqcompile.kernels.triton_attention.attention_forward`).  Autograd assembles their
gradients into the Linear's output gradient with copies of the whole tensor:

* split by ``qkv.view(B, L, 3, H, D).permute(2, 0, 3, 1, 4)`` (timm, ``benchmarks/gpu.py``)::

      s_i = select_backward(d_i, [3, B, H, L, D], 0, i)      # zeros with d_i in slice i
      g = clone(permute((s_0 + s_1) + s_2, [1, 3, 0, 2, 4]))  # [B, L, 3, H, D]

* split by ``qkv.split(C, -1)`` then ``.view(B, L, H, D).transpose(1, 2)`` (nanoGPT)::

      g = cat([view(clone(transpose(d_i, 1, 2)), [B, L, C]) for i in (0, 1, 2)], -1)

one to three more reads and writes of the whole gradient between the attention's kernels and
the ShiftQuants that read it (at a 1024-wide block's training shape, 48 MB each way per
copy).  In a backward graph of the Triton family this pass replaces the assembly by
``sqcompile::triton_attention_backward_packed``: the kernels write ``dq``, ``dk`` and ``dv``
straight into their places in the assembled tensor.  The values are the same (the copies
move values; the sum adds each to zeros).

Where each gradient lands is worked out by running its chain of ops backwards on a meta
tensor of the assembled gradient's layout (a view back to a view's input shape, a transpose or
permute undone, a clone as is, then the ``select`` or the slice of the ``cat``), so any mix
of views, transposes, permutes and clones between the two is handled; the kernels take the
result as strides with the (batch, head) axis in two levels.  With symbolic sizes
(``dynamic=True``, or Dynamo's recompile after a new sequence length) the meta tensor has the
symbolic sizes, the places' strides and offsets are expressions in them, and the op gets
nodes computing those (:func:`~sqcompile.backends.fusion.int_arg`): one graph serves every
length.  Only exact assemblies are
replaced: the three gradients of one ``triton_attention_backward`` (as many queries as keys)
used by nothing else, each through single-use ops of those kinds, into one ``cat`` of the
three, or three ``select_backward`` of dim 0 at distinct indices summed by two adds and used
only by a permute and a contiguous clone; ``dk`` and ``dv`` landing at the same strides.
Each rewrite is recorded as a :class:`~sqcompile.decisions.FusedRegion` labelled
``attention_backward+qkv_gradient`` and follows the ``fusion`` option.

The ShiftQuants that then read the assembled gradient as ``[tokens, features]`` (the
projection's ``dX`` and ``dW`` quantizers, which the lowering pairs) get its channel ranges
from the kernels' epilogues (``ranges=True``: per feature and per token, atomic maxima of the
stored values, as a GEMM region's epilogue computes them), so neither reads it for a range
pass.  Likewise a ``sum`` of it over the tokens (the projection's bias gradient, in its
dtype): the kernels write per-tile float32 column sums (``sums=True``), so the sum does not
read it either; it agrees with the graph's ``sum`` up to the order of the float32 additions.
"""
from __future__ import annotations

import operator
from typing import List, Optional, Tuple

import torch
import torch.fx as fx

from ..decisions import CompileRecord, FusedRegion
from . import fusion as F

LABEL = "attention_backward+qkv_gradient"
aten = torch.ops.aten
_MOVES = {aten.transpose.int, aten.permute.default, aten.clone.default}


def _single_user(node: fx.Node) -> Optional[fx.Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _chain(grad: fx.Node) -> Tuple[List[fx.Node], Optional[fx.Node]]:
    """``(ops, end)``: the single-use views / transposes / permutes / clones from ``grad`` on,
    and the node they reach (a ``cat`` or a ``select_backward`` of dim 0), or ``None``."""
    ops, node = [], grad
    while True:
        user = _single_user(node)
        if user is None or user.op != "call_function":
            return ops, None
        if user.target is aten.cat.default or (user.target is aten.select_backward.default and user.args[2] == 0):
            return ops, user
        if user.args[0] is not node or not (F._is_view(user) or user.target in _MOVES):
            return ops, None
        if user.target is aten.clone.default and user.kwargs.get("memory_format") not in (
                None, torch.contiguous_format, torch.preserve_format):
            return ops, None
        ops.append(user)
        node = user


def _undo(region: torch.Tensor, ops: List[fx.Node]) -> Optional[torch.Tensor]:
    """``region`` (a meta view where the chain's last op's result lies) taken back through
    ``ops``, last first: where the chain's input lies, or ``None`` when a view cannot be
    undone without a copy."""
    for op in reversed(ops):
        src = F._val(op.args[0])
        if op.target is aten.transpose.int:
            region = region.transpose(op.args[1], op.args[2])
        elif op.target is aten.permute.default:
            dims = [d % region.dim() for d in op.args[1]]
            region = region.permute([dims.index(d) for d in range(len(dims))])
        elif op.target is not aten.clone.default:        # a view: back to its input's shape
            try:
                region = region.view(src.shape)
            except RuntimeError:
                return None
        if not F._same_shape(region.shape, src.shape):
            return None
    return region


def _cat_slots(cat: fx.Node, ends: List[fx.Node]) -> Optional[List[torch.Tensor]]:
    """Where each chain's last result lies in ``cat``'s output, when ``cat`` joins exactly them."""
    tensors, dim = cat.args[0], cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    out = F._val(cat)
    if out is None or len(tensors) != 3 or sorted(map(id, tensors)) != sorted(map(id, ends)):
        return None
    layout = torch.empty(out.shape, device="meta")
    starts, at = {}, 0
    for t in tensors:
        starts[t] = at
        at += F._val(t).shape[dim]
    return [layout.narrow(dim, starts[e], F._val(e).shape[dim]) for e in ends]


def _select_slots(selects: List[fx.Node]) -> Optional[Tuple[fx.Node, List[fx.Node], List[torch.Tensor]]]:
    """``(clone, replaced, slots)`` for three ``select_backward`` summed, permuted and cloned:
    the clone to replace, the adds and permute in between, where each select's input lies."""
    shape = list(selects[0].args[1])
    if any(list(s.args[1]) != shape for s in selects) or shape[0] != 3 or \
            sorted(s.args[3] % 3 for s in selects) != [0, 1, 2]:
        return None
    adds = [_single_user(s) for s in selects]
    if any(a is None or a.target is not aten.add.Tensor or a.kwargs for a in adds):
        return None
    inner = {a for a in adds if all(arg in selects for arg in a.args)}
    outer = {a for a in adds if a not in inner}
    if len(inner) != 1 or len(outer) != 1:
        return None
    (inner,), (outer,) = inner, outer
    permute = _single_user(outer)
    clone = _single_user(permute) if permute is not None and _single_user(inner) is outer else None
    if permute is None or permute.target is not aten.permute.default or clone is None or \
            clone.target is not aten.clone.default or \
            clone.kwargs.get("memory_format", torch.contiguous_format) is not torch.contiguous_format:
        return None
    total = _undo(torch.empty(F._val(clone).shape, device="meta"), [permute])
    if total is None:
        return None
    return clone, [permute, outer, inner], [total.select(0, s.args[3] % 3) for s in selects]


def _layout_args(graph: fx.Graph, result: fx.Node, places: List[torch.Tensor], removed: List[fx.Node]):
    """``(size, offsets, strides)`` arguments of the packed op (inserted before ``result``):
    ints, and with symbolic sizes nodes computing them from the graph's sizes, none of them
    reading a node the rewrite erases; None when one cannot be computed (nothing is inserted
    then)."""
    avoid = set(removed)
    values = [list(F._val(result).shape), [p.storage_offset() for p in places],
              [s for p in places for s in p.stride()]]
    if not F.rehome_sym_sizes(graph, removed, emit=False) or \
            any(F.int_arg(graph, v, result, avoid, emit=False) is None for group in values for v in group):
        return None
    return [[F.int_arg(graph, v, result, avoid) for v in group] for group in values]


def _shiftquants(result: fx.Node, grad_shape) -> List[Tuple[fx.Node, int]]:
    """``[(quantizer, 1 or 2)]``: the ShiftQuants of the assembled gradient seen as ``[tokens,
    features]`` (through contiguous views; an outer dim of 1 allowed), along its features (the
    ranges output 1) or its tokens (output 2), whose ranges the kernels can compute."""
    B, H, L, D = grad_shape
    tokens = B * L
    found = []
    for sq in F.readers_of(result, F._op("triton_shiftquant")):
        x = F._val(sq.args[0])
        nd = x.dim()
        if sq.kwargs or nd < 2 or not F._same(x.shape[-2], tokens) or \
                not F._same(F._product(x.shape), F._product([tokens, x.shape[-1]])):
            continue
        dims = sorted(d % nd for d in sq.args[3])
        outer = list(range(nd - 2))
        if dims == outer + [nd - 1]:
            found.append((sq, 1))
        elif dims == outer + [nd - 2]:
            found.append((sq, 2))
    return found


def _bias_sums(result: fx.Node, grad_shape) -> List[fx.Node]:
    """The ``sum`` nodes of the assembled gradient over its tokens, in its dtype (through
    contiguous views): the projection's bias gradient, which the kernels can compute."""
    B, H, L, D = grad_shape
    return [node for node, _ in F.column_sums(result, (1, B * L, 3 * H * D), F._val(result).dtype)]


def pack_attention_gradients(gm: fx.GraphModule, record: CompileRecord, stage: str,
                             option: Optional[bool] = None) -> fx.GraphModule:
    """Replace each matched gradient assembly of ``gm`` (see the module docstring)."""
    backward_op, packed_op = F._op("triton_attention_backward"), F._op("triton_attention_backward_packed")
    if backward_op is None or packed_op is None or not F.enabled(option):
        return gm
    graph = gm.graph
    packed = 0
    for bwd in [n for n in graph.nodes if n.op == "call_function" and n.target is backward_op]:
        grads = [next((u for u in bwd.users if u.target is operator.getitem and u.args[1] == i), None)
                 for i in range(3)]
        if any(g is None or F._val(g) is None for g in grads) or len(bwd.users) != 3 or \
                not all(F._same_shape(F._val(g).shape, F._val(grads[0]).shape) for g in grads[1:]):
            continue
        chains = [_chain(g) for g in grads]
        ends = [end for _, end in chains]
        if any(e is None for e in ends):
            continue
        # the last node of each chain (the tensor the cat / select_backward takes)
        lasts = [ops[-1] if ops else g for (ops, _), g in zip(chains, grads)]
        if all(e.target is aten.cat.default for e in ends) and len(set(ends)) == 1:
            slots, result, between = _cat_slots(ends[0], lasts), ends[0], []
        elif all(e.target is aten.select_backward.default for e in ends):
            found = _select_slots(ends)
            if found is None:
                continue
            result, between, slots = found
            between = [*between, *ends]
        else:
            continue
        if slots is None:
            continue
        places = [_undo(slot, ops) for slot, (ops, _) in zip(slots, chains)]
        if any(p is None for p in places) or not F._same_shape(places[1].stride(), places[2].stride()):
            continue
        removed = [result, *between, *(op for ops, _ in chains for op in reversed(ops)), *grads, bwd]
        layout = _layout_args(graph, result, places, removed)
        if layout is None:
            continue
        mode = F._fake_mode(bwd.args[0])
        quantizers = _shiftquants(result, F._val(grads[0]).shape)
        sums = _bias_sums(result, F._val(grads[0]).shape)
        # the packed op's arguments by name: the backward's, the packed layout, what else it computes
        given = {**F._bound_args(bwd), **dict(zip(("size", "offsets", "strides"), layout)),
                 "ranges": bool(quantizers), "sums": bool(sums)}
        args = tuple(given[a.name] for a in packed_op._schema.arguments)
        with graph.inserting_before(result):
            new = F._new(graph, packed_op, args, bwd, mode)
            value = F._new(graph, operator.getitem, (new, 0), bwd, mode)
        result.replace_all_uses_with(value)
        for sq, index in quantizers:        # given the ranges the kernels computed: no range pass
            with graph.inserting_before(sq):
                rng = F._new(graph, operator.getitem, (new, index), bwd, mode)
            F.given_ranges(graph, sq, rng, mode)
        for node in sums:
            F.given_sum(graph, node, new, 3, bwd, mode, [])
        F.rehome_sym_sizes(graph, removed)
        for node in removed:                    # last use first
            graph.erase_node(node)
        F._record(record, None, FusedRegion(
            name=f"R{len(record.regions) + 1}", stage=stage, label=LABEL, nodes=[n.name for n in reversed(removed)],
            module_path=F._module_of(bwd), outputs=1,
            kernel="sqcompile/kernels/triton_attention.py:_attention_bwd_kv_kernel, _attention_bwd_q_kernel"))
        packed += 1
    return F.finished(gm, record, stage, packed)


__all__ = ["pack_attention_gradients", "LABEL"]
