"""CPU quantizers fused with what produces their input, as C kernels
(:mod:`sqcompile.kernels.cpu_quant`).

**Gradients** (``sqcompile::shiftquant_outer_pair``).  With ``grad_outer_scale`` (the
default), the backward of each quantized GEMM ``Y = A B`` quantizes ``dY`` twice
(:func:`sqcompile.ops.shiftquant_outer`): along its columns for ``dA = dY B^T``, prescaled by
``B``'s scales, and along its rows for ``dB = A^T dY``, prescaled by ``A``'s.  In a backward
graph of the torch kernel family on CPU that Inductor compiles (``inner="inductor"``, whose
quantizers draw :func:`~sqcompile.numerics.hash_noise`, as the kernel does),
:func:`fuse_gradient_quantizers` replaces each such pair over one float32 ``dY`` -- a
Linear's or a matmul's output gradient, after a GELU's or a norm's backward, attention's
``dS`` -- by one :func:`~sqcompile.kernels.cpu_quant.shiftquant_outer_pair`, bit for bit what
the two compute.  Inductor then writes ``dY`` once, where its six loops over the two
quantizers each recomputed ``dY``'s producer (the GELU backward's ``erf``, a dequantized GEMM
result); the kernel makes three passes over it.  Its two seeds become
``sqcompile::random_seed`` nodes of the graph, drawn where the quantizers drew theirs, in
their order.  A convolution's output gradient ``[N, C, *S]`` pairs up the same way
(``conv=True``: ``dX``'s quantizer has one outer maximum per sample, ``dW``'s one per output
channel; the ResNet-18 and U-Net steps of ``benchmarks/train_step.py`` level with Inductor's
loops on a Zen 4 core, 0.99-1.01x: the kernel's divisions bound it as they bound the loops,
and a conv's ``dY`` producer is cheap to recompute).  Label
``shiftquant_outer(dY) x2``, on the decision of the GEMM (or convolution) that ``dY``'s
column quantization feeds.

**A Linear's GELU** (``sqcompile::gelu_quantize``).  In a forward or inference graph,
:func:`fuse_gelu_quantizers` replaces ``gelu(int8_mm.float() * (sa * sb) [+ bias])`` whose
output only the next GEMM's per-row quantizer (and its saved maxima) read by one
:func:`~sqcompile.kernels.cpu_quant.gelu_quantize`: one pass over each row, where Inductor's
loop evaluated the GELU (two ``erf`` calls) once for the row's maximum and again to quantize.
The pre-activation (saved for the backward) is the graph's bit for bit; the GELU's ``erf`` is
PyTorch's vectorized formula over our ``exp``, a few ulps from Inductor's.  Label
``dequant[+bias]+gelu+quantize``, on the Linear's decision.  With ``act_groups``, the next
GEMM's quantizer is :func:`sqcompile.ops.shiftquant_outer`'s composition (nearest) instead,
and :func:`~sqcompile.kernels.cpu_quant.gelu_shiftquant` replaces the same nodes and it
(``sqcompile::gelu_shiftquant``, label ``dequant[+bias]+gelu+shiftquant``): two passes over
the rows, where Inductor's loops evaluated the GELU twice too.  The ``tanh`` GELU, and a GELU
whose output something else reads, keep the graph's ops.

**That GELU's backward** (``sqcompile::gelu_backward``).  In a backward graph,
:func:`fuse_gelu_backwards` replaces ``gelu_backward(int8_mm.float() * scales, pre)`` -- the
exact GELU's backward on the dequantized gradient of the next GEMM's input -- and the
column sums of its result (the bias gradient) by one
:func:`~sqcompile.kernels.cpu_quant.gelu_backward`: Inductor's loop evaluated ``erf`` and a
second ``exp`` per value and summed the columns in another pass over the result.  The
gradient is the graph's to a few ulps of the GELU's derivative (PyTorch's ``erf`` formula, the
density's ``exp`` shared with it), the sums in the order of the graph's split column sums.
Label ``dequant+gelu_backward`` (``+sum`` with the sums), on the decision of the GEMM whose
gradient it dequantizes.  Runs before the gradient pass, which then quantizes the result.

None of these passes does anything on other devices, with other kernel families, when the kernels
cannot run here (:func:`~sqcompile.kernels.cpu_quant.status`: Linux on x86-64 and a C
compiler), or with ``fusion=False``; the gradient pass also not without ``grad_outer_scale``,
under ``inner="eager"`` (whose quantizers draw their noise another way), or for bit widths
beyond int8's range.  Each fusion is recorded as a :class:`~sqcompile.decisions.FusedRegion`.
"""
from __future__ import annotations

import operator
from typing import List, NamedTuple, Optional

import torch
import torch.fx as fx

from .. import numerics as N
from ..decisions import CompileRecord
from . import fusion as F

aten = torch.ops.aten
KERNEL = "sqcompile/kernels/cpu_quant.c:sq_outer_pair_ranges, sq_outer_pair_quantize"
LABEL = "shiftquant_outer(dY) x2"
GELU_KERNEL = "sqcompile/kernels/cpu_quant.c:sq_gelu_quantize"
GELU_SHIFT_KERNEL = "sqcompile/kernels/cpu_quant.c:sq_gelu_shiftquant"
GELU_BACKWARD_KERNEL = "sqcompile/kernels/cpu_quant.c:sq_gelu_backward"


class _OuterQuantizer(NamedTuple):
    """One ``shiftquant_outer`` composition of the graph over ``dY`` (see :func:`_outer_quantizer`)."""
    prescale: fx.Node
    outer: fx.Node                # the outer maxima, 0 taken as 1
    quantizer: fx.Node            # sqcompile.shiftquant of dY * prescale / outer
    nodes: List[fx.Node]          # everything between dY and the quantizer's results


def _sides(pv: torch.Tensor, v: torch.Tensor) -> List[tuple]:
    """The ``(side, conv)`` layouts a prescale ``pv`` of ``dY`` (``v``) fits
    (:func:`~sqcompile.kernels.cpu_quant.pair_dims` has their dims): a GEMM's ``[..., L, S]``
    along the columns (``pv`` ``[..., 1, S]``) or the rows (``[..., L, 1]``); a convolution's
    ``[N, C, *S]`` (``dW``'s "cols": ``pv`` one value per sample; ``dX``'s "rows": one per
    output channel)."""
    nd, out = v.dim(), []
    for side, conv, dim in (("cols", False, -2), ("rows", False, -1)):
        if F.row_vector(pv, v, dim):
            out.append((side, conv))
    if nd >= 3 and pv.dim() == nd and pv.dtype == torch.float32:
        for side, keep in (("cols", 0), ("rows", 1)):
            if all(F._same(pv.shape[d], 1) for d in range(nd) if d != keep) and \
                    (F._same(pv.shape[keep], v.shape[keep]) or F._same(pv.shape[keep], 1)):
                out.append((side, True))
    return out


def _outer_quantizer(mul: fx.Node, dy: fx.Node) -> Optional[tuple]:
    """``(side, conv, _OuterQuantizer)`` when ``mul`` is ``dY * prescale`` feeding
    :func:`sqcompile.ops.shiftquant_outer`'s stochastic composition
    (:func:`~sqcompile.backends.fusion.outer_composition`) with the dims of one of
    :func:`_sides`' layouts (``side`` "cols" or "rows"; ``conv``: a convolution's gradient)."""
    v = F._val(dy)
    if mul.target is not aten.mul.Tensor or len(mul.args) != 2 or mul.args[0] is not dy or \
            not isinstance(mul.args[1], fx.Node):
        return None
    pre = mul.args[1]
    pv, nd = F._val(pre), v.dim()
    found = F.outer_composition(mul, stochastic=True) if pv is not None else None
    if found is None:
        return None
    from ..kernels.cpu_quant import pair_dims

    for side, conv in _sides(pv, v):
        dims = pair_dims(nd, conv)[0 if side == "cols" else 1]
        if found.channels == dims[0] and found.reduced == [d for d in range(nd) if d not in dims[1]]:
            return side, conv, _OuterQuantizer(pre, found.outer, found.quantizer, [mul, *found.nodes])
    return None


_PRODUCTS = (torch.ops.sqcompile.int8_mm.default, torch.ops.sqcompile.int8_conv.default,
             torch.ops.sqcompile.int8_conv_weight.default)
"""The integer products a quantized gradient feeds (a GEMM, a stride-1 conv's implicit GEMMs)."""


def _gemm_fed_by(node: fx.Node) -> Optional[fx.Node]:
    """The integer product (:data:`_PRODUCTS`) that ``node`` (an integer tensor) reaches
    through views and transposes."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        for user in n.users:
            if user.target in _PRODUCTS:
                return user
            if user not in seen and user.args and user.args[0] is n and (
                    F._is_view(user) or user.target in (aten.transpose.int, aten.t.default, aten.permute.default)):
                seen.add(user)
                stack.append(user)
    return None


def _fuse(gm: fx.GraphModule, record: CompileRecord, stage: str) -> int:
    graph = gm.graph
    sources = {F._source_of(n) for n in graph.nodes if n.target in _PRODUCTS}
    fused = 0
    for dy in list(graph.nodes):
        v = F._val(dy)
        if not isinstance(v, torch.Tensor) or v.dtype != torch.float32 or v.dim() < 2 or v.device.type != "cpu":
            continue
        matches = [m for m in (_outer_quantizer(u, dy) for u in list(dy.users)) if m is not None]
        both = [flag for flag in (False, True) if {side for side, f, _ in matches if f == flag} == {"cols", "rows"}]
        conv = both[0] if both else None        # a GEMM's layout first, where degenerate sizes fit both
        if conv is None:
            continue
        found = {side: q for side, f, q in matches if f == conv}
        c, r = found["cols"], found["rows"]
        bits, groups = c.quantizer.args[1:3]
        if r.quantizer.args[1:3] != (bits, groups) or not N.fits_int8(bits, groups):
            continue
        mode = F._fake_mode(dy)
        order = {n: i for i, n in enumerate(graph.nodes)}
        first_use = min(c.nodes[0], r.nodes[0], key=order.__getitem__)
        if max(order[c.prescale], order[r.prescale]) > order[first_use]:
            continue            # a prescale computed after dY's first use: keep the graph
        doomed = {*c.nodes, *r.nodes, c.outer, r.outer, *c.quantizer.users, *r.quantizer.users}
        if not F.rehome_sym_sizes(graph, doomed, emit=False):
            continue            # a size a dynamic-shape graph reads off them, computable nowhere else
        with graph.inserting_before(first_use):
            # the seeds as graph nodes, drawn in the quantizers' order: as the two quantizers'
            # own are once lowered (drawn inside the op, Inductor's order of extern calls would
            # decide which seed each got)
            seeds = [F._new(graph, torch.ops.sqcompile.random_seed.default, (v.device,), c.quantizer, mode)
                     for _ in range(2)]
            if order[r.quantizer] < order[c.quantizer]:
                seeds.reverse()
            new = F._new(graph, torch.ops.sqcompile.shiftquant_outer_pair.default,
                         (dy, c.prescale, r.prescale, *seeds, bits, groups, conv), c.quantizer, mode)
            outs = [F._new(graph, operator.getitem, (new, i), c.quantizer, mode) for i in range(6)]
        for q, base in ((c, 0), (r, 3)):
            for item in [u for u in q.quantizer.users if u.target is operator.getitem]:
                item.replace_all_uses_with(outs[base + item.args[1]])
            q.outer.replace_all_uses_with(outs[base + 2])
        names = [n.name for n in (*c.nodes, c.outer, *r.nodes, r.outer)]
        F.rehome_sym_sizes(graph, doomed)
        F.erase_dead(graph, doomed)
        mm = _gemm_fed_by(outs[0])
        decision = F._decision_for(record, mm, sources) if mm is not None else None
        F.record_region(record, stage, decision, LABEL, names, new, 6, KERNEL)
        fused += 1
    return fused


def _cpu_kernels_apply(gm: fx.GraphModule) -> bool:
    """Does ``gm`` hold a CPU integer product (:data:`_PRODUCTS`), and can the kernels run
    here?  (Checked in that order: the kernels are built at the first graph that could take
    them, not on a GPU's.)"""
    from ..kernels import cpu_quant

    gemms = [n for n in gm.graph.nodes if n.target in _PRODUCTS]
    return any(F._val(n) is not None and F._val(n).device.type == "cpu" for n in gemms) and cpu_quant.status()[0]



def _fuse_gelu_backwards(gm: fx.GraphModule, record: CompileRecord, stage: str) -> int:
    graph = gm.graph
    sources = {F._source_of(n) for n in graph.nodes if n.target is torch.ops.sqcompile.int8_mm.default}
    fused = 0
    for node in [n for n in graph.nodes if n.op == "call_function" and n.target is aten.gelu_backward.default]:
        if len(node.args) != 2 or F._bound_args(node)["approximate"] != "none":
            continue
        grad, pre = node.args
        out, pv = F._val(node), F._val(pre)
        if out is None or pv is None or out.dtype != torch.float32 or pv.dtype != torch.float32 or \
                not F._same_shape(pv.shape, out.shape):
            continue
        found = F.dequantized_gemm(grad)
        if found is None:
            continue
        mm, sa, sb, nodes = found
        acc = F._val(mm)
        if any(F._is_view(n) and n.target not in F.RESHAPES for n in nodes):
            continue                # a transpose between: the kernel pairs acc and pre in order
        if F._shape_arg(graph, out.shape, node, emit=False) is None:
            continue                # a symbolic size the graph cannot compute
        gemm3 = (F._product(acc.shape[:-2]), acc.shape[-2], acc.shape[-1])
        sums = [user for user, _ in F.column_sums(node, gemm3, torch.float32)]
        mode = F._fake_mode(mm)
        with graph.inserting_before(node):
            new = F._new(graph, torch.ops.sqcompile.gelu_backward.default, (mm, sa, sb, pre), mm, mode)
            outs = [F._new(graph, operator.getitem, (new, i), mm, mode) for i in range(2)]
        node.replace_all_uses_with(F.viewed(graph, outs[0], out.shape, new, mode))
        for user in sums:
            user.replace_all_uses_with(F.viewed(graph, outs[1], F._val(user).shape, new, mode))
        names = [n.name for n in reversed(nodes)] + [node.name] + [u.name for u in sums]
        F.erase_dead(graph, {node, *nodes, *sums})
        F.record_region(record, stage, F._decision_for(record, mm, sources),
                        "dequant+gelu_backward" + ("+sum" if sums else ""), names, mm, 2, GELU_BACKWARD_KERNEL)
        fused += 1
    return fused


def fuse_gelu_backwards(gm: fx.GraphModule, record: CompileRecord, stage: str,
                        option: Optional[bool] = None) -> fx.GraphModule:
    """Replace each CPU GELU backward on a dequantized GEMM gradient in ``gm`` (a backward
    graph), with the column sums of its result, by one ``sqcompile::gelu_backward`` (the module
    docstring).  ``option``: the compile's ``fusion`` option."""
    if not F.enabled(option) or stage != "backward" or \
            not any(n.target is aten.gelu_backward.default for n in gm.graph.nodes):
        return gm
    if not _cpu_kernels_apply(gm):
        return gm
    return F.finished(gm, record, stage, _fuse_gelu_backwards(gm, record, stage))


def fuse_gradient_quantizers(gm: fx.GraphModule, record: CompileRecord, stage: str,
                             option: Optional[bool] = None, inner: str = "eager") -> fx.GraphModule:
    """Replace each pair of outer-scaled ShiftQuants of one gradient in ``gm`` (a backward
    graph for ``inner``, the compiler it goes to, ``"inductor"``) by one
    ``sqcompile::shiftquant_outer_pair`` (the module docstring).  ``option``: the compile's
    ``fusion`` option."""
    if not F.enabled(option) or stage != "backward" or inner != "inductor":
        return gm
    if not any(n.target is torch.ops.sqcompile.shiftquant.default for n in gm.graph.nodes) or \
            not _cpu_kernels_apply(gm):
        return gm
    return F.finished(gm, record, stage, _fuse(gm, record, stage))


# ---------------------------------------------------------------------------------------------
# Forward: a Linear's GELU and the next GEMM's input quantizer
# ---------------------------------------------------------------------------------------------

class _GeluMatch(NamedTuple):
    gelu: fx.Node
    pre: fx.Node                  # the GELU's input (saved for backward): dequantized [+ bias]
    mm: fx.Node
    sa: fx.Node
    sb: fx.Node
    bias: Optional[fx.Node]
    quantizer: fx.Node            # sqcompile.quantize (per row) or sqcompile.shiftquant (act_groups)
    amax: Optional[fx.Node]       # per row: the saved maxima, if any
    shift: Optional[tuple]        # act_groups: (F.OuterComposition, per_batch)
    chain: List[fx.Node]          # the nodes from the GEMM's conversion to the GELU's input


def _shift_composition(views: List[fx.Node], acc: torch.Tensor) -> Optional[tuple]:
    """``(F.OuterComposition, per_batch)`` where one of ``views`` (the GELU's output and its
    views) is the next GEMM's input ``[C, rows, N]``, reshaped in row-major order, quantized
    with ``act_groups`` (:func:`~sqcompile.backends.fusion.act_groups_quantizer`), ``C`` 1 or
    ``acc``'s batch entries (``per_batch``).
    Other layouts (a Linear's rows into a GEMM per batch entry) keep the graph's ops."""
    for y in views:
        found = F.act_groups_quantizer(y, views[0])
        if found is None:
            continue
        v = F._val(y)
        if F._same(v.shape[0], 1):
            return found, False
        if acc.dim() == 3 and F._same(v.shape[0], acc.shape[0]) and F._same(v.shape[1], acc.shape[1]):
            return found, True
    return None


def _match_gelu(gelu: fx.Node) -> Optional[_GeluMatch]:
    """``gelu(int8_mm.float() * (sa * sb) [+ bias])`` (views between; ``bias`` float32 along
    the last dim) whose only readers are one per-row nearest quantizer and its maxima, or
    the next GEMM's ``act_groups`` quantizer (:func:`_shift_composition`)."""
    approximate = gelu.args[1] if len(gelu.args) > 1 else gelu.kwargs.get("approximate", "none")
    out = F._val(gelu)
    if approximate != "none" or out is None or out.dtype != torch.float32 or out.dim() < 1:
        return None
    pre, x, bias, chain = gelu.args[0], gelu.args[0], None, []
    if x.target is aten.add.Tensor and len(x.args) == 2 and isinstance(x.args[1], fx.Node) and not x.kwargs:
        b = F._val(x.args[1])
        if b is None or b.dtype != torch.float32 or any(not F._same(n, 1) for n in b.shape[:-1]) or \
                not F._same(b.shape[-1], out.shape[-1]) or not F._same_shape(F._val(x).shape, out.shape):
            return None
        bias, chain, x = x.args[1], [x], x.args[0]
    found = F.dequantized_gemm(x, shared=bias is None)     # without a bias, x is pre: saved too
    if found is None or found[1] is None or found[2] is None or \
            not F._same(F._val(found[0]).shape[-1], out.shape[-1]):
        return None
    mm, sa, sb, nodes = found
    views = F.views_of(gelu)
    quantizers = [u for v in views for u in v.users
                  if u.target is torch.ops.sqcompile.quantize.default and u.args[0] is v and F.per_row_quantizer(u)]
    shift = _shift_composition(views, F._val(mm)) if not quantizers else None
    if shift is not None:
        composition = shift[0]
        quantizer, amax = composition.quantizer, None
        allowed = {*views, *composition.nodes}
    elif len(quantizers) == 1:
        quantizer = quantizers[0]
        amax = F.row_amax(quantizer.args[0])
        allowed = {*views, quantizer} | ({amax.args[0].args[0]} if amax is not None else set())
    else:
        return None
    if any(u not in allowed and not F._is_sym_size(u) for v in views for u in v.users):
        return None                 # the GELU's output is read by something else: keep it
    return _GeluMatch(gelu, pre, mm, sa, sb, bias, quantizer, amax, shift, chain + nodes)


def _fuse_gelus(gm: fx.GraphModule, record: CompileRecord, stage: str) -> int:
    graph = gm.graph
    sources = {F._source_of(n) for n in graph.nodes if n.target is torch.ops.sqcompile.int8_mm.default}
    fused = 0
    for gelu in [n for n in graph.nodes if n.op == "call_function" and n.target is aten.gelu.default]:
        m = _match_gelu(gelu)
        if m is None:
            continue
        mode = F._fake_mode(m.mm)
        q_out, scale_out = F.output_item(m.quantizer, 0), F.output_item(m.quantizer, 1)
        if m.shift is None:
            target, args, kernel, what = torch.ops.sqcompile.gelu_quantize.default, (m.quantizer.args[1],), \
                GELU_KERNEL, "quantize"
            olds = [m.pre, q_out, scale_out, m.amax]
            doomed = {m.quantizer, *m.quantizer.users}
            if m.amax is not None:
                doomed |= {m.amax, m.amax.args[0], m.amax.args[0].args[0]}
        else:
            composition, per_batch = m.shift
            target, args, kernel, what = torch.ops.sqcompile.gelu_shiftquant.default, \
                (*m.quantizer.args[1:3], per_batch), GELU_SHIFT_KERNEL, "shiftquant"
            olds = [m.pre, q_out, scale_out, composition.outer]
            doomed = {*composition.nodes, composition.outer, *m.quantizer.users}
        doomed |= {gelu, *m.chain, *F.views_of(gelu)}
        if any(o is not None and F._shape_arg(graph, F._val(o).shape, gelu, emit=False) is None for o in olds) or \
                not F.rehome_sym_sizes(graph, doomed, emit=False):
            continue                # a symbolic size the graph cannot compute
        with graph.inserting_before(gelu):
            new = F._new(graph, target, (m.mm, m.sa, m.sb, m.bias, *args), m.mm, mode)
            outs = [F._new(graph, operator.getitem, (new, i), m.mm, mode) for i in range(4)]
        for old, out in zip(olds, outs):
            if old is not None:
                old.replace_all_uses_with(F.viewed(graph, out, F._val(old).shape, new, mode))
        names = [n.name for n in reversed(m.chain)] + [gelu.name, m.quantizer.name]
        F.rehome_sym_sizes(graph, doomed)       # sizes dynamic-shape graphs read off the erased nodes
        F.erase_dead(graph, doomed)
        F.record_region(record, stage, F._decision_for(record, m.mm, sources),
                        f"dequant{'+bias' if m.bias is not None else ''}+gelu+{what}", names, m.mm, 4, kernel)
        fused += 1
    return fused


def fuse_gelu_quantizers(gm: fx.GraphModule, record: CompileRecord, stage: str,
                         option: Optional[bool] = None) -> fx.GraphModule:
    """Replace each CPU Linear's dequantize [+ bias] + GELU + the next GEMM's per-row quantizer
    in ``gm`` (a forward or inference graph) by one ``sqcompile::gelu_quantize`` (the module
    docstring).  ``option``: the compile's ``fusion`` option."""
    if not F.enabled(option) or stage == "backward" or \
            not any(n.target is aten.gelu.default for n in gm.graph.nodes):
        return gm
    if not _cpu_kernels_apply(gm):
        return gm
    return F.finished(gm, record, stage, _fuse_gelus(gm, record, stage))


__all__ = ["fuse_gelu_backwards", "fuse_gelu_quantizers", "fuse_gradient_quantizers", "GELU_BACKWARD_KERNEL",
           "GELU_KERNEL", "GELU_SHIFT_KERNEL", "KERNEL", "LABEL"]
