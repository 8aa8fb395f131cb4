"""Region fusion: each Triton int8 GEMM and its elementwise epilogue become one generated kernel.

Matches, in a post-autograd ATen graph (forward, backward or inference), every
``sqcompile.triton_int8_mm`` node (the ``"triton"`` kernel family) and the chain of
elementwise ops that consumes its result one after the other:

* the int32 -> float ``_to_copy`` and the multiplies by the row / column / scalar scales
  (dequantization), later dtype casts, the bias add, ``relu`` / ``gelu`` / ``silu`` /
  ``sigmoid``, a residual add (the other operand any tensor that maps onto the GEMM's
  ``[B, M, N]`` output), and in backward graphs ``threshold_backward`` / ``gelu_backward`` /
  ``silu_backward`` (the activation's gradient right after a ``dX`` GEMM);
* pure-metadata views between them (``view`` / ``reshape`` / ``squeeze`` / ``unsqueeze`` of a
  contiguous value, e.g. the ``[1, M, N]`` -> ``[*lead, N]`` view after a Linear's GEMM);
* the elementwise ops that compute an operand and are used only by the region (the outer
  product ``s_a * s_b`` of the two scale vectors is folded in, so the kernel reads ``M + N``
  scales instead of a materialized ``M x N`` scale tensor; with an int16 ShiftQuant operand,
  ``hi * 128.0 + lo`` of the two digit GEMMs is folded into the high digit's region, which
  reads the low digit's int32 result).

The search walks a networkx ``DiGraph`` of the FX graph (value -> consumers), kept up to date
as regions are replaced, and checks that no input of a region depends on the region itself.

When ShiftQuant quantizers (``triton_shiftquant``) read the region's final value (directly or
through views) with channels that are the output's columns or rows (per batch), the region
also computes their channel ranges in its epilogue (``max |value|`` per column or row: a tile
max and an integer atomic max on the float bits, exact in any order), and the quantizers
become ``triton_shiftquant_fused``, which skip their own range pass over memory.  The
label then ends in ``+ranges``.  This is the usual case for a gradient: the ``dX`` GEMM of one
Linear (with the activation's backward) produces the output gradient of the Linear before
it, which its two backward GEMMs ShiftQuant along its columns and along its rows.

Likewise a ``sum`` of the region's final value over the batch and the rows (through views),
keeping the columns: that Linear's bias gradient.  The region writes per-tile float32
column sums and the op finishes the sum (:mod:`~sqcompile.kernels.triton_fused`), so the
gradient is not read again for it; the label then ends in ``+sum``.  The result agrees with
the graph's ``sum`` up to the order of the float32 additions (not bit for bit).

After the regions, each ShiftQuant with one channel per row whose expanded gradient is used
only where GEMMs want its rows contiguous (transposed as their first operand: a Linear's
``dW = dY^T X``, attention's ``dK = dS^T Q``; as is as their second: ``dV = P^T dO``) is told
to store it transposed, so that operand reaches the GEMM with its reduction dim contiguous
and needs no relayout copy (:func:`_store_transposed`).  Then the two ShiftQuants of one
gradient, along its columns and along its rows (``dX`` and ``dW``; attention's ``dQ`` and
``dK``), become one ``triton_shiftquant_pair`` that reads the gradient once per pass instead
of twice (:func:`_pair_shiftquants`).  With ``grad_outer_scale`` the quantizers are
``triton_shiftquant_outer`` (one scale per row or column besides ShiftQuant's): they are
stored transposed and paired the same way (``outer=True``: three passes for both); their
ranges are those of the gradient divided by its outer maxima, which no region computes.

Not fused, by design: the quantizer *before* a GEMM (its prologue) and the per-row quantizer
of the next GEMM after it.  In training the int8 operand is saved for the backward, so it is
written in any case; quantizing it again inside the GEMM would read the float operand once
per column tile instead of the int8 one, for no saved write.  And a per-row scale needs the
whole row, which a tile of the output does not hold (the L1 norm, whose program holds whole
rows, does write its consumer's int8 operand: :mod:`sqcompile.backends.norm_fusion`).

The chain ends at the first op that is not elementwise (a quantizer, a reduction, a
transpose), at a value with two or more consumers, at an operand that does not map onto the
``[B, M, N]`` tile, or at an unsupported dtype (float64).  One exception to
"a single consumer": a value that is also a *graph output* (in training, the pre-activation
saved for the backward) is stored by the kernel as a side output and the chain goes on, since
that value is written to memory in any case.  Views at the end of a chain stay in the graph,
applied to the kernel's output.

Graphs compiled for dynamic shapes fuse as static ones do: the analysis works on the sizes'
hints and confirms each equality it needs on the symbolic sizes (see "Sizes" below; nothing
installs a guard, so one graph keeps serving every size), and the views the rewrite adds
take their symbolic sizes from nodes of the graph (``sym_size``).  The kernels take ``M``,
``N`` and ``K`` at run time.

Each region is replaced by one call of ``sqcompile::triton_fused_int8_mm(a, b, inputs,
epilogue)`` (:mod:`sqcompile.kernels.triton_fused`): ``epilogue`` is the region's ops as a
small SSA program whose signature keys the generated-kernel cache, so every layer with the
same epilogue shares one kernel.  The fused kernel computes what the unfused ops compute
(same int32 accumulator, the same float ops in the same order and dtypes).

Each region is recorded on the :class:`~sqcompile.decisions.CompileRecord` (``record.regions``,
and ``OpDecision.region`` of the op the GEMM came from, which the report shows).  The op is
found from the GEMM node's ``source_fn_stack`` (forward) or ``fwd_source_fn_stack``
(backward: AOTAutograd copies the forward op's metadata onto the backward nodes) naming the
Dynamo node the rewrite pass decided on, else from the module path (``nn_module_stack`` /
``fwd_nn_module_stack``) when exactly one GEMM decision has that path.  A region with neither
is still fused and recorded, with ``decision=None``.

Fusion is on by default; the ``fusion=False`` option turns it off for one compile, and
``SQCOMPILE_FUSION=0`` in the environment (read at import) or
``sqcompile.backends.fusion.ENABLED = False`` changes the default (graphs then run the unfused ops:
the reference for the tests).  Graphs without Triton GEMMs (``kernels="torch"``) are returned
unchanged.
"""
from __future__ import annotations

import contextlib
import operator
import threading
from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional, Tuple

import networkx as nx
import sympy
import torch
import torch.fx as fx

from ..config import env_flag
from ..decisions import CompileRecord, FusedRegion
from ..graphs import format_graph
from ..numerics import fits_int8
from ..passes.common import hints as _hints, normalize_path

ENABLED = env_flag("SQCOMPILE_FUSION", True, "1: fuse regions of the Triton kernel family, 0: run the unfused ops")
_COMPILE = threading.local()     # the ``fusion`` option of the compile this thread is tracing


@contextlib.contextmanager
def enabled_as(value: Optional[bool]):
    """While a compile traces its graphs: its ``fusion`` option (``None``: the default)."""
    previous = getattr(_COMPILE, "value", None)
    _COMPILE.value = value
    try:
        yield
    finally:
        _COMPILE.value = previous


def enabled(value: Optional[bool] = None) -> bool:
    """Is fusion on: ``value`` if given, else the option of the compile being traced (see
    :func:`enabled_as`), else :data:`ENABLED`."""
    if value is None:
        value = getattr(_COMPILE, "value", None)
    return ENABLED if value is None else value
MAX_SIDE_OUTPUTS = 3
MAX_INLINED = 8          # operand ops folded into one region (keeps kernels small)

aten = torch.ops.aten
_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.squeeze.dim,
          aten.squeeze.dims, aten.squeeze.default, aten.unsqueeze.default, aten.alias.default}
_CONVERTS = {aten._to_copy.default, torch.ops.prims.convert_element_type.default}
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_META_KEYS = ("nn_module_stack", "fwd_nn_module_stack", "source_fn_stack", "fwd_source_fn_stack", "seq_nr",
              "partitioner_tag")
_DEQUANT_PHASE = ("int16", "dequant")     # label parts that turn the int32 accumulator into the GEMM's value


class _Stop(Exception):
    """Why the region cannot take a node (the message is recorded)."""


def _op(name: str):
    """``torch.ops.sqcompile.<name>.default``, or None before the Triton family is registered."""
    packet = getattr(torch.ops.sqcompile, name, None)
    return None if packet is None else packet.default


def _val(node) -> Optional[torch.Tensor]:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _static(shape) -> bool:
    return all(isinstance(s, int) for s in shape)


# Sizes.  A graph compiled for dynamic shapes carries symbolic sizes (``torch.SymInt``); any
# comparison of one that sympy cannot decide, or an ``int()`` of it, would install a guard and
# specialize the compiled graph to the sizes at hand.  So the region analysis reasons on each
# size's hint (its value in the example inputs: ``_hints``) and confirms every equality it
# relies on symbolically (``_key``: the expanded expression, compared exactly; never a guard).
# A symbolic size is at least 2 (Dynamo specializes 0 and 1), so a broadcast dim's 1 is a 1.

def _key(size):
    """A size (int, ``SymInt`` or a key already) to compare exactly without a guard: the int,
    or its expanded sympy expression."""
    if isinstance(size, (int, sympy.Basic)):
        return size
    constant = size.node.maybe_as_int()
    return constant if constant is not None else sympy.expand(size.node.expr)


def _same(a, b) -> bool:
    """Are two sizes (or keys) equal for every value of their symbols?"""
    a, b = _key(a), _key(b)
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return sympy.expand(sympy.sympify(a) - sympy.sympify(b)) == 0


def _product(sizes):
    """The product of sizes (or keys), as a key."""
    out = 1
    for s in sizes:
        out = out * _key(s)
    return out if isinstance(out, int) else sympy.expand(out)


def _same_shape(a, b) -> bool:
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))


def _contiguous(v: torch.Tensor) -> bool:
    """``v.is_contiguous()`` decided without a guard (size-1 dims' strides do not matter)."""
    expect = 1
    for size, stride in reversed(list(zip(v.shape, v.stride()))):
        if not _same(size, 1) and not _same(stride, expect):
            return False
        expect = _product([expect, size])
    return True


def _shape_arg(graph: fx.Graph, sizes, before: fx.Node, emit: bool = True, avoid=frozenset()) -> Optional[list]:
    """``sizes`` as the shape argument of a new ``view`` / ``reshape`` inserted before
    ``before``: the ints, and for each symbolic size a node computing it, defined before
    ``before``: a SymInt of the graph (a ``sym_size``, a SymInt input), else a new
    ``sym_size`` of a tensor that has that size as a dim (``emit=False``: only check that
    one exists), else ``-1`` for one size; None when no shape argument can be made.  Nodes
    in ``avoid`` are not used."""
    if all(isinstance(_key(s), int) for s in sizes):
        return [_key(s) for s in sizes]
    nodes, dims = {}, {}
    for node in graph.nodes:
        if node is before:
            break
        if node in avoid:
            continue
        v = node.meta.get("val")
        if isinstance(v, torch.SymInt):
            nodes.setdefault(_key(v), node)
        elif isinstance(v, torch.Tensor):
            for d, size in enumerate(v.shape):
                if not isinstance(size, int):
                    dims.setdefault(_key(size), (node, d, size))
    out, inferred = [], False
    for size in sizes:
        key = _key(size)
        if isinstance(key, int):
            out.append(key)
        elif key in nodes:
            out.append(nodes[key])
        elif key in dims:
            tensor, d, value = dims[key]
            if emit:
                with graph.inserting_before(before):
                    nodes[key] = graph.call_function(aten.sym_size.int, (tensor, d))
                nodes[key].meta["val"] = value
            out.append(nodes.get(key, key))
        elif not inferred:
            out.append(-1)
            inferred = True
        else:
            return None
    return out


def int_arg(graph: fx.Graph, value, before: fx.Node, avoid=frozenset(), emit: bool = True):
    """``value`` (an int or a ``SymInt``: a size, a stride, an offset) as an argument of a node
    inserted before ``before``: the int, or a node computing it from the graph's sizes (each
    symbol through :func:`_shape_arg`, then the sums and products of the expression, inserted
    before ``before``); None when the expression is not a polynomial in sizes the graph has
    (nothing is inserted then).  ``emit=False``: only check (True for a symbolic value)."""
    key = _key(value)
    if isinstance(key, int):
        return key
    symbols = sorted(key.free_symbols, key=str)
    found = _shape_arg(graph, symbols, before, emit=False, avoid=avoid)
    if found is None or -1 in found or not _polynomial(key):
        return None
    if not emit:
        return True
    leaves = dict(zip(symbols, _shape_arg(graph, symbols, before, avoid=avoid)))
    values = {sym: node.meta["val"] for sym, node in leaves.items()}

    def emit(expr):
        if expr.is_Integer:
            return int(expr), int(expr)
        if expr.is_Symbol:
            return leaves[expr], values[expr]
        if expr.is_Pow:
            expr = sympy.Mul(*[expr.base] * int(expr.exp), evaluate=False)
        combine = operator.add if expr.is_Add else operator.mul
        out, val = emit(expr.args[0])
        for arg in expr.args[1:]:
            node, v = emit(arg)
            with graph.inserting_before(before):
                out = graph.call_function(combine, (out, node))
            val = combine(val, v)
            out.meta["val"] = val
        return out, val

    return emit(key)[0]


def _polynomial(expr) -> bool:
    """Is ``expr`` built of integers, symbols, sums, products and positive integer powers?"""
    if expr.is_Integer or expr.is_Symbol:
        return True
    if expr.is_Pow:
        return expr.exp.is_Integer and expr.exp > 0 and _polynomial(expr.base)
    return (expr.is_Add or expr.is_Mul) and all(_polynomial(a) for a in expr.args)


def _is_sym_size(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is aten.sym_size.int


def rehome_sym_sizes(graph: fx.Graph, doomed, emit: bool = True) -> bool:
    """Point each ``sym_size`` that reads a size of a node in ``doomed`` (nodes a rewrite
    erases) at another node giving that size (:func:`_shape_arg`), so the rewrite can erase
    them; with ``emit=False`` only check that each can be.  In dynamic-shape graphs AOTAutograd
    reads sizes off intermediate values; the passes treat such reads as no use."""
    doomed = set(doomed)
    for node in list(doomed):
        for sym in [u for u in node.users if _is_sym_size(u)]:
            value = sym.meta.get("val")
            found = None if value is None else _shape_arg(graph, [value], sym, emit, avoid=doomed | {sym})
            if found is None or found == [-1]:
                return False
            if emit:
                for user in list(sym.users):
                    user.args = fx.node.map_arg(user.args, lambda n: found[0] if n is sym else n)
                    user.kwargs = fx.node.map_arg(user.kwargs, lambda n: found[0] if n is sym else n)
                graph.erase_node(sym)
    return True


def _elementwise(node: fx.Node) -> Optional[Tuple[str, list]]:
    """``(epilogue op, args)`` for an ATen node the epilogue can compute, else None."""
    if node.op != "call_function":
        return None
    t, args, kw = node.target, node.args, node.kwargs
    if t in (aten.add.Tensor, aten.sub.Tensor, aten.add.Scalar, aten.sub.Scalar):
        if kw.get("alpha", args[2] if len(args) > 2 else 1) != 1:
            return None        # eager computes a + alpha * b with an FMA: not reproduced
        return ("add" if t in (aten.add.Tensor, aten.add.Scalar) else "sub"), list(args[:2])
    if t in (aten.mul.Tensor, aten.mul.Scalar):
        return "mul", list(args[:2])
    if t in (aten.div.Tensor, aten.div.Scalar):
        return "div", list(args[:2])
    if t in (aten.neg.default, aten.relu.default, aten.silu.default, aten.sigmoid.default):
        return t._opname, [args[0]]
    if t is aten.gelu.default:
        return ("gelu", [args[0]]) if kw.get("approximate", args[1] if len(args) > 1 else "none") == "none" else None
    if t is aten.gelu_backward.default:
        approx = kw.get("approximate", args[2] if len(args) > 2 else "none")
        return ("gelu_backward", list(args[:2])) if approx == "none" else None
    if t is aten.silu_backward.default:
        return "silu_backward", list(args[:2])
    if t is aten.threshold_backward.default:
        return "threshold_backward", list(args[:3])
    if t in _CONVERTS:
        src, out = _val(args[0]), _val(node)
        if src is None or out is None or out.device != src.device or kw.get("pin_memory"):
            return None
        if kw.get("layout") not in (None, torch.strided) or kw.get("memory_format") not in (
                None, torch.preserve_format, torch.contiguous_format):
            return None
        return "convert", [args[0]]
    return None


def _is_view(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _VIEWS


def _label(node: fx.Node) -> str:
    t = node.target
    return getattr(t, "__name__", None) or str(t)


# --------------------------------------------------------------------------------------------
# Region search
# --------------------------------------------------------------------------------------------

@dataclass
class _Region:
    mm: fx.Node
    gemm3: tuple                                              # [B, M, N] of the GEMM output
    #                                     (ints, or symbolic sizes in a dynamic-shape graph)
    members: List[fx.Node] = field(default_factory=list)      # every node it replaces (mm first)
    chain: List[fx.Node] = field(default_factory=list)        # the epilogue chain, in order
    side: List[fx.Node] = field(default_factory=list)         # chain values also graph outputs
    inputs: List[Tuple[fx.Node, Tuple[int, int, int], str, str]] = field(default_factory=list)
    ops: List[list] = field(default_factory=list)             # the epilogue program
    value: Dict[fx.Node, str] = field(default_factory=dict)   # node -> "acc" / "v<j>"
    extent: Dict[str, str] = field(default_factory=dict)      # ref -> dims it varies along, "T":
    #                                     reads a full [M, N] tile from memory, "I": an int32 one
    tags: List[str] = field(default_factory=list)             # label parts
    stop: str = ""
    ranges: List[Tuple[str, str]] = field(default_factory=list)  # [value, axis]: ShiftQuant ranges
    range_users: List[Tuple[fx.Node, int]] = field(default_factory=list)   # (shiftquant node, range)
    sums: List[Tuple[str, str]] = field(default_factory=list)    # [value, dtype]: column sums
    sum_users: List[fx.Node] = field(default_factory=list)       # the ``sum`` node of each
    erased: List[fx.Node] = field(default_factory=list)          # other nodes the rewrite erased

    def snapshot(self):
        return (len(self.members), len(self.chain), len(self.side), len(self.inputs), len(self.ops),
                dict(self.value), dict(self.extent), len(self.tags))

    def restore(self, snap) -> None:
        nm, nc, ns, ni, no, value, extent, nt = snap
        del self.members[nm:], self.chain[nc:], self.side[ns:], self.inputs[ni:], self.ops[no:], self.tags[nt:]
        self.value, self.extent = value, extent

    @property
    def label(self) -> str:
        """``int8_mm+dequant+bias+gelu``: the ops in order, repeats merged; the leading
        dequantization (``int16``: combining the digit GEMMs of an int16 operand) first."""
        lead = 0
        while lead < len(self.tags) and self.tags[lead] in _DEQUANT_PHASE:
            lead += 1
        parts = [t for t in _DEQUANT_PHASE if t in self.tags[:lead]]
        for t in self.tags[lead:]:
            if not parts or parts[-1] != t:
                parts.append(t)
        return "+".join(["int8_mm", *parts])


class _Search:
    """Grows the region of one GEMM node over the graph's dependency DiGraph."""

    def __init__(self, dag: nx.DiGraph, claimed: set):
        self.dag = dag
        self.claimed = claimed

    def grow(self, mm: fx.Node) -> Optional[_Region]:
        out = _val(mm)
        a, b = _val(mm.args[0]), _val(mm.args[1])
        if out is None or a is None or b is None or _hints(out.shape) is None or out.dim() < 2:
            return None
        if a.dtype != torch.int8 or b.dtype != torch.int8:
            return None
        batch = 1
        for s in out.shape[:-2]:
            batch = batch * s                  # a SymInt product when sizes are symbolic: no guard
        r = _Region(mm, (batch, out.shape[-2], out.shape[-1]))
        r.members.append(mm)
        r.value[mm] = "acc"
        r.extent["acc"] = "bmn"       # computed, not read: "T" marks tiles read from memory
        cur = mm
        while True:
            users = list(self.dag.successors(cur))
            outside = [u for u in users if u.op == "output"]
            consumers = [u for u in users if u.op != "output"]
            if not consumers:
                r.stop = f"{cur.name} is a graph output" if outside else f"{cur.name} has no consumer"
                break
            if len(consumers) > 1:
                r.stop = f"{cur.name} has {len(consumers)} consumers"
                break
            if outside and (cur is mm or _is_view(cur) or len(r.side) >= MAX_SIDE_OUTPUTS):
                r.stop = f"{cur.name} is a graph output"
                break
            snap = r.snapshot()
            try:
                self.take(r, consumers[0], cur)
            except _Stop as e:
                r.restore(snap)
                r.stop = str(e)
                break
            if outside:
                r.side.append(cur)
            cur = consumers[0]
        while r.chain and _is_view(r.chain[-1]):      # trailing views stay in the graph
            r.members.remove(r.chain.pop())
        if not r.chain:
            return None
        if r.chain[-1] in r.side:
            r.side.remove(r.chain[-1])
        leaves = {n for n, *_ in r.inputs}
        if leaves & nx.descendants(self.dag, mm):      # cannot happen for a chain; never fuse a cycle
            return None
        if not _rewritable(mm.graph, r):               # a symbolic size no node of the graph computes
            return None
        self.claimed.update(r.members)
        return r

    # -- one chain node ------------------------------------------------------------------

    def take(self, r: _Region, node: fx.Node, cur: fx.Node) -> None:
        if node in self.claimed:
            raise _Stop(f"{node.name} belongs to another region")
        spec = _elementwise(node)
        if spec is None and not _is_view(node):
            raise _Stop(f"{node.name} ({_label(node)}) is not an elementwise op the epilogue computes")
        v = _val(node)
        if v is None or _hints(v.shape) is None:
            raise _Stop(f"{node.name} has no tensor shape with known sizes")
        if not _same(_product(v.shape), _product(r.gemm3)) or not _contiguous(v):
            raise _Stop(f"{node.name} is not a contiguous [B, M, N] value")
        if _is_view(node):
            if node.args[0] is not cur:
                raise _Stop(f"{node.name} views another value")
            r.members.append(node)
            r.chain.append(node)
            r.value[node] = r.value[cur]
            return
        if v.dtype not in _FLOATS:
            raise _Stop(f"{node.name} computes in {v.dtype}")
        if not _same_shape(_val(cur).shape, v.shape):
            raise _Stop(f"{node.name} broadcasts the GEMM's value")
        if any(isinstance(x, fx.Node) for x in node.kwargs.values()):
            raise _Stop(f"{node.name} takes a tensor keyword argument")
        name, args = spec
        refs = [self.operand(r, a, tuple(v.shape), node) for a in args]
        others = [r.extent.get(ref, "") for a, ref in zip(args, refs) if a is not cur and isinstance(ref, str)]
        tag = self.tag(r, name, others)
        r.value[node] = self.emit(r, node, name, refs)
        r.members.append(node)
        r.chain.append(node)
        r.tags.append(tag)

    def tag(self, r: _Region, name: str, other_extents: List[str]) -> str:
        """The label part of one chain op, from what its other operands read: scales (less
        than a tile per value: dequant), a per-column vector (bias), a tile (residual)."""
        dequant = all(t in _DEQUANT_PHASE for t in r.tags)
        full = any("T" in e for e in other_extents)
        if name == "convert":
            return "dequant" if not r.tags else "cast"
        if name == "add" and dequant and any("I" in e for e in other_extents):
            return "int16"      # + the low digit's int32 GEMM (ops.integer_matmul's int16 split)
        if name in ("mul", "div") and dequant and not full:
            return "dequant"
        if name in ("add", "sub") and other_extents:
            if full:
                return "residual" if name == "add" else "sub"
            if all(e.replace("b", "") == "n" for e in other_extents):   # one value per column
                return "bias"
        return {"threshold_backward": "relu_backward"}.get(name, name)

    # -- operands ------------------------------------------------------------------------

    def operand(self, r: _Region, x, shape: tuple, user: fx.Node):
        if isinstance(x, bool) or (not isinstance(x, fx.Node) and not isinstance(x, (int, float))):
            raise _Stop(f"{user.name}: unsupported operand {x!r}")
        if not isinstance(x, fx.Node):
            if not float("-inf") < float(x) < float("inf"):
                raise _Stop(f"{user.name}: non-finite scalar {x!r}")
            return float(x)
        if x in r.value:
            return r.value[x]
        ref = self.inline(r, x, shape, user)
        return ref if ref is not None else self.leaf(r, x, shape)

    def inline(self, r: _Region, x: fx.Node, shape: tuple, user: fx.Node) -> Optional[str]:
        """Fold an operand's own elementwise op into the region when only the region uses it."""
        v = _val(x)
        spec = _elementwise(x)
        if (spec is None or x in self.claimed or v is None or v.dtype not in _FLOATS or _hints(v.shape) is None
                or sum(1 for n in r.members if n not in r.chain and n is not r.mm) >= MAX_INLINED
                or any(u is not user and u not in r.members for u in self.dag.successors(x))
                or _broadcast(v.shape, shape) is None
                or any(isinstance(a, fx.Node) for a in x.kwargs.values())):
            return None
        snap = r.snapshot()
        try:
            refs = [self.operand(r, a, shape, x) for a in spec[1]]
        except _Stop:
            r.restore(snap)
            return None
        r.members.append(x)
        r.value[x] = self.emit(r, x, spec[0], refs)
        return r.value[x]

    def leaf(self, r: _Region, x: fx.Node, shape: tuple) -> str:
        v = _val(x)
        if v is None or _hints(v.shape) is None:
            raise _Stop(f"operand {x.name} has no tensor shape with known sizes")
        from ..kernels.triton_fused import DTYPE_NAMES
        if v.dtype not in DTYPE_NAMES:
            raise _Stop(f"operand {x.name} is {v.dtype}")
        if v.device != _val(r.mm).device:
            raise _Stop(f"operand {x.name} is on {v.device}")
        shape3 = _to_gemm_space(v.shape, shape, r.gemm3)
        if shape3 is None:
            raise _Stop(f"operand {x.name} {list(v.shape)} does not map onto the GEMM's [B, M, N] = {list(r.gemm3)}")
        pattern = "".join(d for d, s in zip("bmn", shape3) if s > 1)
        for i, (node, s3, _, _) in enumerate(r.inputs):
            if node is x and s3 == shape3:
                return f"in{i}"
        r.inputs.append((x, shape3, pattern, DTYPE_NAMES[v.dtype]))
        ref = f"in{len(r.inputs) - 1}"
        r.extent[ref] = pattern + ("T" if "m" in pattern and "n" in pattern else "") + (
            "I" if v.dtype == torch.int32 else "")
        return ref

    def emit(self, r: _Region, node: fx.Node, name: str, refs: list) -> str:
        from ..kernels.triton_fused import DTYPE_NAMES
        r.ops.append([name, DTYPE_NAMES[_val(node).dtype], *refs])
        ref = f"v{len(r.ops) - 1}"
        r.extent[ref] = "".join(d for d in "bmnTI" if any(d in r.extent.get(a, "") for a in refs if isinstance(a, str)))
        return ref


def _split(x: torch.Tensor, kept_dims, gemm3) -> Optional[Tuple[set, set]]:
    """``(kept, reduced)``: which of a GEMM output's dims ``"b"``, ``"m"``, ``"n"`` a reduction
    of ``x`` (a contiguous view of the output ``[B, M, N]``) over all dims but ``kept_dims``
    keeps and which it reduces; None when a dim of ``x`` straddles two output dims (in its
    flat index) or an output dim is partly kept, partly reduced.  Dims of size 1 are neither."""
    hints, sizes, strides = _hints(gemm3), _hints(x.shape), _hints(x.stride())
    if hints is None or sizes is None or strides is None or not _contiguous(x) or \
            not _same(_product(x.shape), _product(gemm3)) or 0 in sizes:
        return None
    B, M, N = hints
    nd = x.dim()
    kept_dims = {d % nd for d in kept_dims}
    spans = (("n", 1, N), ("m", N, N * M), ("b", N * M, N * M * B))
    kept, reduced = set(), set()
    for d, (size, stride) in enumerate(zip(sizes, strides)):
        if size == 1:
            continue
        inside = [name for name, lo, hi in spans if lo <= stride and stride * size <= hi]
        if not inside:
            return None          # straddles two output dims
        (kept if d in kept_dims else reduced).add(inside[0])
    return None if kept & reduced else (kept, reduced)


def _range_axis(x: torch.Tensor, channel_dims, gemm3) -> Optional[str]:
    """``"n"`` / ``"m"`` when ShiftQuant's channels of ``x`` (a contiguous view of a GEMM output
    ``[B, M, N]``) over ``channel_dims`` are the output's (batch, column) / (batch, row) pairs,
    in that row-major order; else None.  Each dim of ``x`` must lie within one of the output's
    dims (in its flat index), and each output dim must be kept or reduced as a whole."""
    split = _split(x, channel_dims, gemm3)
    if split is None:
        return None
    kept, _ = split
    if (not _same(gemm3[0], 1) and "b" not in kept) or ("m" in kept) == ("n" in kept):
        return None
    return "n" if "n" in kept else "m"


def _column_sum(node: fx.Node, gemm3) -> Optional[str]:
    """The result dtype's name when ``node`` (an ``aten.sum.dim_IntList`` of a contiguous view
    of a GEMM output ``[B, M, N]``) sums over the batch and the rows, keeping the ``N``
    columns in order (a Linear's bias gradient); else None."""
    from ..kernels.triton_fused import DTYPE_NAMES
    x, out = _val(node.args[0]), _val(node)
    dims = _bound_args(node)["dim"]
    if x is None or out is None or not dims or x.dim() == 0 or out.dtype not in _FLOATS or not _static(out.shape):
        return None
    summed = {d % x.dim() for d in dims}
    split = _split(x, [d for d in range(x.dim()) if d not in summed], gemm3)
    if split is None or split[0] != {"n"} or not _same(_product(out.shape), gemm3[2]):
        return None
    return DTYPE_NAMES[out.dtype]


def _find_ranges(r: _Region, shiftquant) -> None:
    """Let the region also compute the channel ranges of each ShiftQuant that reads its final
    value (through views): that quantizer then skips its own range pass."""
    final = r.chain[-1]
    ref = r.value[final]
    for user in readers_of(final, shiftquant):
        axis = _range_axis(_val(user.args[0]), user.args[3], r.gemm3)
        if axis is None:
            continue
        if [ref, axis] not in r.ranges:
            r.ranges.append([ref, axis])
        r.range_users.append((user, r.ranges.index([ref, axis])))
    if r.ranges:
        r.tags.append("ranges")


def _find_sums(r: _Region) -> None:
    """Let the region also compute each ``sum`` of its final value over the batch and the
    rows (through views): a Linear's bias gradient, which then reads no gradient from
    memory."""
    final = r.chain[-1]
    for user, dtype in column_sums(final, r.gemm3):
        r.sums.append([r.value[final], dtype])
        r.sum_users.append(user)
    if r.sums:
        r.tags.append("sum")


def column_sums(node: fx.Node, gemm3, dtype: Optional[torch.dtype] = None) -> List[Tuple[fx.Node, str]]:
    """``[(sum node, its dtype's name)]``: the ``sum`` nodes that read ``node``'s value (a
    contiguous ``[B, M, N]`` value, through contiguous views) over the batch and the rows,
    keeping the columns (:func:`_column_sum`); with ``dtype``, only those with that result
    dtype."""
    found = [(user, _column_sum(user, gemm3)) for user in readers_of(node, aten.sum.dim_IntList)
             if dtype is None or _val(user).dtype == dtype]
    return [(user, name) for user, name in found if name is not None]


def output_item(node: fx.Node, index: int) -> Optional[fx.Node]:
    """The ``getitem`` of ``node`` that takes its output ``index``, if any."""
    return next((u for u in node.users if u.target is operator.getitem and u.args[1] == index), None)


def single_user(node: fx.Node) -> bool:
    return len(node.users) == 1


def row_vector(v: torch.Tensor, like: torch.Tensor, dim: int) -> bool:
    """Does ``v`` (float32) broadcast to ``like`` ``[..., L, S]`` with size 1 along ``dim``
    (-1: one value per row, -2: one per column)?"""
    if v.dim() > like.dim() or v.dtype != torch.float32:
        return False
    pad = [1] * (like.dim() - v.dim()) + list(v.shape)
    return _same(pad[dim], 1) and all(_same(a, 1) or _same(a, b) for a, b in zip(pad, like.shape))


def dequantized_gemm(x: fx.Node, L=None, S=None, shared: bool = False) -> Optional[tuple]:
    """``(mm, sa, sb, nodes)`` when ``x`` is, through single-use views, a CPU ``int8_mm``'s int32
    ``[..., L, S]`` result (any shape when ``L`` is None) converted to float32 and multiplied
    by its scales: one row vector
    (``[..., L, 1]``), one column vector (``[..., 1, S]``) or their product, each broadcasting
    to the result (``sa`` / ``sb`` None where there is none); ``nodes``: the views, the
    multiply, the conversion (and the scales' product).  With ``shared``, ``x`` itself may have
    other readers (the caller replaces all its uses)."""
    top, nodes = x, []

    def only_reader(n):
        return single_user(n) or (shared and n is top)

    while _is_view(x) and only_reader(x):
        nodes.append(x)
        x = x.args[0]
    if x.target is not aten.mul.Tensor or not only_reader(x) or len(x.args) != 2:
        return None
    nodes.append(x)
    convert = next((a for a in x.args if isinstance(a, fx.Node) and a.target is aten._to_copy.default), None)
    scales = next((a for a in x.args if a is not convert), None)
    if convert is None or not isinstance(scales, fx.Node) or convert.kwargs.get("dtype") is not torch.float32 or \
            set(convert.kwargs) - {"dtype"} or not single_user(convert):
        return None
    nodes.append(convert)
    mm = convert.args[0]
    acc = _val(mm)
    if mm.target is not torch.ops.sqcompile.int8_mm.default or not single_user(mm) or acc is None or \
            acc.dtype != torch.int32 or acc.device.type != "cpu" or \
            (L is not None and not _same_shape(acc.shape[-2:], (L, S))):
        return None
    v = _val(scales)
    if v is not None and row_vector(v, acc, -1):
        return mm, scales, None, nodes
    if v is not None and row_vector(v, acc, -2):
        return mm, None, scales, nodes
    if scales.target is not aten.mul.Tensor or len(scales.args) != 2:
        return None
    a, b = scales.args
    va, vb = _val(a), _val(b)
    if va is None or vb is None:
        return None
    if not (row_vector(va, acc, -1) and row_vector(vb, acc, -2)):
        a, b, va, vb = b, a, vb, va
        if not (row_vector(va, acc, -1) and row_vector(vb, acc, -2)):
            return None
    return mm, a, b, nodes + [scales]


def views_of(node: fx.Node) -> List[fx.Node]:
    """``node`` and the values that view it as a whole (views, same-shape ``expand``)."""
    found, stack = [], [node]
    while stack:
        n = stack.pop()
        found.append(n)
        for user in n.users:
            if user.args and user.args[0] is n and (_is_view(user) or (
                    user.target is aten.expand.default and _same_shape(_val(user).shape, _val(n).shape))):
                stack.append(user)
    return found


def row_amax(node: fx.Node) -> Optional[fx.Node]:
    """The ``amax(abs(detach(node)), [last], keepdim=True)`` of ``node``, if any."""
    nd = _val(node).dim()
    for d in node.users:
        if d.target is not aten.detach.default or not single_user(d):
            continue
        (a,) = d.users
        if a.target is not aten.abs.default or not single_user(a):
            continue
        (m,) = a.users
        if m.target is aten.amax.default and [x % nd for x in m.args[1]] == [nd - 1] and \
                (m.args[2] if len(m.args) > 2 else m.kwargs.get("keepdim", False)):
            return m
    return None


class OuterComposition(NamedTuple):
    """:func:`sqcompile.ops.shiftquant_outer`'s composition over ``y`` (:func:`outer_composition`)."""
    outer: fx.Node                # the outer maxima, 0 taken as 1
    quantizer: fx.Node            # sqcompile.shiftquant of y / outer
    nodes: List[fx.Node]          # from y's detach to the quantizer
    reduced: List[int]            # the dims the outer maxima reduce
    channels: List[int]           # the quantizer's channel dims


def outer_composition(y: fx.Node, stochastic: bool) -> Optional[OuterComposition]:
    """:func:`sqcompile.ops.shiftquant_outer`'s composition over ``y`` as AOTAutograd traces it,
    the only readers of ``y``::

        r = amax(abs(detach(y)), dims, keepdim);  r = r.masked_fill(r == 0, 1)
        e, base = sqcompile.shiftquant(y / r, bits, groups, channels, stochastic)

    (and the reads of ``y``'s sizes a dynamic-shape graph makes: see :func:`rehome_sym_sizes`)."""
    if len([u for u in y.users if not _is_sym_size(u)]) != 2:
        return None
    nd = _val(y).dim()
    detach = next((u for u in y.users if u.target is aten.detach.default), None)
    div = next((u for u in y.users if u.target is aten.div.Tensor and u.args[0] is y), None)
    if detach is None or div is None or not single_user(detach):
        return None
    (a,) = detach.users
    if a.target is not aten.abs.default or not single_user(a):
        return None
    (amax,) = a.users
    if amax.target is not aten.amax.default or \
            not (amax.args[2] if len(amax.args) > 2 else amax.kwargs.get("keepdim", False)):
        return None
    eq = next((u for u in amax.users if u.target is aten.eq.Scalar and u.args[1] == 0), None)
    outer = div.args[1]
    if eq is None or len(amax.users) != 2 or not single_user(eq) or outer.target is not aten.masked_fill.Scalar or \
            outer.args[:3] != (amax, eq, 1) or not single_user(div):
        return None
    (sq,) = div.users
    if sq.target is not torch.ops.sqcompile.shiftquant.default or sq.args[0] is not div or \
            sq.args[4] is not stochastic or (len(sq.args) > 5 and sq.args[5] is not None) or sq.kwargs:
        return None
    return OuterComposition(outer, sq, [detach, a, amax, eq, div, sq], sorted(d % nd for d in amax.args[1]),
                            sorted(d % nd for d in sq.args[3]))


RESHAPES = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


def reshaped_from(y: fx.Node, x: fx.Node) -> bool:
    """Is ``y`` ``x`` through reshapes and same-shape expands alone (the same elements in
    row-major order)?"""
    while y is not x:
        if y.op != "call_function" or not (y.target in RESHAPES or y.target is aten.expand.default and
                                           _same_shape(_val(y).shape, _val(y.args[0]).shape)):
            return False
        y = y.args[0]
    return True


def act_groups_quantizer(v: fx.Node, source: fx.Node) -> Optional[OuterComposition]:
    """The next GEMM's ``act_groups`` quantizer over ``v`` (:func:`sqcompile.ops._quantize_act`:
    :func:`outer_composition` with nearest rounding, one outer maximum per row of ``v`` as
    ``[C, rows, N]``, ShiftQuant channels (entry, column), groups that fit int8), where ``v``
    is ``source`` reshaped (:func:`reshaped_from`); else None."""
    val = _val(v)
    if val is None or val.dim() != 3 or not reshaped_from(v, source):
        return None
    found = outer_composition(v, stochastic=False)
    if found is None or found.reduced != [2] or found.channels != [0, 2] or \
            not fits_int8(*found.quantizer.args[1:3]):
        return None
    return found


def viewed(graph: fx.Graph, out: fx.Node, shape, new: fx.Node, mode) -> fx.Node:
    """``out`` (``new`` or one of its outputs) viewed as ``shape`` (itself when it has that
    shape), the view right after it; symbolic sizes are computed before ``new``."""
    if _same_shape(_val(out).shape, shape):
        return out
    arg = _shape_arg(graph, shape, new)
    with graph.inserting_after(out):
        return _new(graph, aten.view.default, (out, arg), new, mode)


def per_row_quantizer(q: fx.Node) -> bool:
    """Is the quantizer call ``q`` (``(x, bits, keep_dims, stochastic, ...)``) nearest-rounding
    with one scale per row (every dim but the last kept)?"""
    x = _val(q.args[0])
    _, bits, keep, stochastic = q.args[:4]
    if x is None or x.dim() < 1 or stochastic or _hints(x.shape) is None:
        return False
    nd = x.dim()
    keep = {d % nd for d in keep}
    return (nd - 1) not in keep and all(d in keep for d in range(nd - 1) if not _same(x.shape[d], 1))


def readers_of(node: fx.Node, target) -> List[fx.Node]:
    """The calls of ``target`` that read ``node``'s value as their first argument, directly or
    through contiguous views (each one's input is its ``args[0]``)."""
    found, stack = [], [node]
    while stack:
        node = stack.pop()
        for user in node.users:
            if _is_view(user) and user.args[0] is node and _val(user) is not None and _contiguous(_val(user)):
                stack.append(user)
            elif user.target is target and user.args[0] is node:
                found.append(user)
    return found


def given_ranges(graph: fx.Graph, sq: fx.Node, ranges: fx.Node, mode) -> fx.Node:
    """Replace the ShiftQuant ``sq`` by ``triton_shiftquant_fused`` taking the channel ranges
    ``ranges`` (a node computed before ``sq``): no range pass."""
    with graph.inserting_before(sq):
        ranged = _new(graph, torch.ops.sqcompile.triton_shiftquant_fused.default, (sq.args[0], ranges, *sq.args[1:]),
                      sq, mode)
    sq.replace_all_uses_with(ranged)
    graph.erase_node(sq)
    return ranged


def given_sum(graph: fx.Graph, node: fx.Node, source: fx.Node, index: int, like: fx.Node, mode,
              erased: List[fx.Node]) -> List[fx.Node]:
    """Replace the column ``sum`` ``node`` (:func:`_column_sum`) by output ``index`` of
    ``source`` (the sum computed by a kernel, ``[N]``), viewed as ``node``'s shape; ``node``
    and the views only it read are erased (appended to ``erased``).  Returns the new nodes."""
    with graph.inserting_before(node):
        new = [_new(graph, operator.getitem, (source, index), like, mode)]
        if not _same_shape(_val(node).shape, _val(new[0]).shape):
            new.append(_new(graph, aten.view.default, (new[0], _shape_arg(graph, _val(node).shape, node)), like, mode))
    node.replace_all_uses_with(new[-1])
    view = node.args[0]
    graph.erase_node(node)
    while _is_view(view) and not view.users:
        erased.append(view)
        view = view.args[0]
        graph.erase_node(erased[-1])
    return new


def _broadcast(small, big) -> Optional[List[int]]:
    """``small`` padded with leading 1s to ``big``'s length when it broadcasts to ``big`` (each
    size 1 or the same as ``big``'s), as hints; else None."""
    if len(small) > len(big):
        return None
    padded = [1] * (len(big) - len(small)) + list(small)
    if not all(_same(s, 1) or _same(s, b) for s, b in zip(padded, big)):
        return None
    return _hints(padded)


def _to_gemm_space(leaf, shape, gemm3) -> Optional[Tuple[int, int, int]]:
    """The shape ``[b, m, n]`` (each 1 or the GEMM's size, as hints) under which a tensor of
    shape ``leaf``, broadcast to the chain value's ``shape`` (a contiguous view of the GEMM's
    ``[B, M, N]`` output), reads the same elements; None when no such shape exists (e.g. a
    per-sample operand when the GEMM's M merges samples and tokens).  Worked out on the
    sizes' hints, then confirmed symbolically: the leaf's elements are those of the GEMM dims
    it is read along."""
    padded, big, hints = _broadcast(leaf, shape), _hints(shape), _hints(gemm3)
    if padded is None or big is None or hints is None:
        return None
    try:
        strides = torch.empty(padded, device="meta").expand(big).view(hints).stride()
    except RuntimeError:
        return None
    shape3 = tuple(g if (st != 0 and g > 1) else 1 for g, st in zip(hints, strides))
    expect = (shape3[1] * shape3[2], shape3[2], 1)
    if any(s > 1 and st != e for s, st, e in zip(shape3, strides, expect)):
        return None
    if not _same(_product(leaf), _product(g for g, s in zip(gemm3, shape3) if s > 1)):
        return None
    return shape3


# --------------------------------------------------------------------------------------------
# Rewriting the graph
# --------------------------------------------------------------------------------------------

def _fake_mode(node: fx.Node):
    v = _val(node)
    return getattr(v, "fake_mode", None)


def _refresh(node: fx.Node, mode) -> None:
    """Recompute ``node``'s fake value after its inputs changed."""
    if mode is not None:
        with mode:
            node.meta["val"] = node.target(*torch.fx.node.map_arg(node.args, lambda n: n.meta.get("val")),
                                           **node.kwargs)


def _new(graph: fx.Graph, target, args, like: fx.Node, mode) -> fx.Node:
    node = graph.call_function(target, args)
    for k in _META_KEYS:
        if k in like.meta:
            node.meta[k] = like.meta[k]
    _refresh(node, mode)
    return node


def _reshaped_inputs(r: _Region) -> List[Tuple[fx.Node, Optional[tuple]]]:
    """Each region input with the ``[b, m, n]`` shape (sizes, ints or symbolic) it must be
    reshaped to first, or None when its own shape (padded to 3 dims) is that already."""
    out = []
    for node, shape3, _, _ in r.inputs:
        shape = tuple(_val(node).shape)
        natural = (1,) * (3 - len(shape)) + shape
        target = tuple(g if s > 1 else 1 for g, s in zip(r.gemm3, shape3))
        out.append((node, None if _same_shape(natural, target) else target))
    return out


def _rewritable(graph: fx.Graph, r: _Region) -> bool:
    """Can :func:`_rewrite` express every view and reshape it needs (see :func:`_shape_arg`)?
    Always, when the sizes are static."""
    final = r.chain[-1]
    shapes = [shape3 for _, shape3 in _reshaped_inputs(r) if shape3 is not None]
    shapes += [_val(n).shape for n in [final, *r.side] if not _same_shape(_val(n).shape, _val(r.mm).shape)]
    return (all(_shape_arg(graph, shape, final, emit=False) is not None for shape in shapes)
            and rehome_sym_sizes(graph, r.members, emit=False))


def _rewrite(gm: fx.GraphModule, r: _Region, signature: str) -> List[fx.Node]:
    """Replace the region (and the ShiftQuants it computes the ranges of) by the fused call;
    returns the new nodes."""
    graph = gm.graph
    final = r.chain[-1]
    mode = _fake_mode(r.mm)
    op = torch.ops.sqcompile.triton_fused_int8_mm.default
    with graph.inserting_before(final):
        leaves = []
        for node, shape3 in _reshaped_inputs(r):
            leaves.append(node if shape3 is None else
                          _new(graph, aten.reshape.default, (node, _shape_arg(graph, shape3, final)), r.mm, mode))
        fused = _new(graph, op, (r.mm.args[0], r.mm.args[1], leaves, signature), r.mm, mode)
        outs = []
        for i, node in enumerate([final, *r.side]):
            out = _new(graph, operator.getitem, (fused, i), r.mm, mode)
            if not _same_shape(_val(node).shape, _val(r.mm).shape):
                out = _new(graph, aten.view.default, (out, _shape_arg(graph, _val(node).shape, final)), r.mm, mode)
            outs.append(out)
    members = set(r.members)
    for node, out in zip([final, *r.side], outs):
        node.replace_all_uses_with(out, delete_user_cb=lambda user: user not in members)
    extra = []
    for sq, index in r.range_users:
        with graph.inserting_before(sq):
            ranges = _new(graph, operator.getitem, (fused, len(outs) + index), r.mm, mode)
        extra += [ranges, given_ranges(graph, sq, ranges, mode)]
    for index, node in enumerate(r.sum_users, len(outs) + len(r.ranges)):
        extra += given_sum(graph, node, fused, index, r.mm, mode, r.erased)
    rehome_sym_sizes(graph, members)
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in sorted(members, key=order.__getitem__, reverse=True):
        graph.erase_node(node)
    return [*leaves, fused, *outs, *[o.args[0] for o in outs if o.target is aten.view.default], *extra]


def _module_of(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or node.meta.get("fwd_nn_module_stack") or {}
    if not stack:
        return ""                      # code of the root module (or metadata lost)
    raw = list(stack.values())[-1]
    return normalize_path(str(raw[0] if isinstance(raw, tuple) else raw))


def _source_of(node: fx.Node) -> Optional[str]:
    stack = node.meta.get("source_fn_stack") or node.meta.get("fwd_source_fn_stack")
    return stack[-1][0] if stack else None


def _decision_for(record: CompileRecord, mm: fx.Node, sources: set):
    """The GEMM decision ``mm`` came from: the one named by its source node, else the only
    GEMM decision of its module that no other GEMM of the graph names (Dynamo names a node
    after the variable it is assigned to, ``a = p @ v``, while ``source_fn_stack`` keeps the
    name it was created with, ``matmul_1``)."""
    gemms = [d for d in record.decisions if d.kind == "gemm" and d.quantized]
    source = _source_of(mm)
    for d in gemms:
        if d.node == source:
            return d
    module = _module_of(mm)
    left = [d for d in gemms if d.module_path == module and d.node not in sources]
    return left[0] if len(left) == 1 else None


def _digraph(graph: fx.Graph) -> nx.DiGraph:
    dag = nx.DiGraph()
    for node in graph.nodes:
        dag.add_node(node)
        dag.add_edges_from((node, user) for user in node.users if not _is_sym_size(user))
    return dag


def _record(record: CompileRecord, decision, region: FusedRegion) -> None:
    """Add ``region`` to the record and to its decision's ``region`` text, grouped by label:
    ``"R1: int8_mm+dequant+bias+gelu; R9, R10: int8_mm+dequant"``."""
    record.regions.append(region)
    if decision is None:
        return
    by_label: Dict[str, List[str]] = {}
    for other in record.regions:
        if other.decision == decision.node:
            by_label.setdefault(other.label, []).append(other.name)
    decision.region = "; ".join(f"{', '.join(names)}: {label}" for label, names in by_label.items())


def erase_dead(graph: fx.Graph, doomed) -> None:
    """Erase the nodes of ``doomed`` that nothing reads any more, users before what they read."""
    for node in reversed(list(graph.nodes)):
        if node in doomed and not node.users:
            graph.erase_node(node)


def record_region(record: CompileRecord, stage: str, decision, label: str, nodes, anchor: fx.Node, outputs: int,
                  kernel: str) -> None:
    """Record a region of our kernels that replaced the nodes named ``nodes`` on ``decision`` (a
    GEMM decision, or None: then the module path is ``anchor``'s)."""
    _record(record, decision, FusedRegion(
        name=f"R{len(record.regions) + 1}", stage=stage, label=label, nodes=list(nodes),
        module_path=decision.module_path if decision else _module_of(anchor),
        decision=decision.node if decision else None, outputs=outputs, stop="", kernel=kernel))


def fuse_regions(gm: fx.GraphModule, record: CompileRecord, stage: str,
                 option: Optional[bool] = None) -> fx.GraphModule:
    """Fuse each Triton int8 GEMM of ``gm`` with its epilogue (see the module docstring);
    regions go to ``record.regions`` and their op's ``OpDecision.region``.  ``gm`` is
    modified in place and returned; ``record.graphs[stage + "_fused"]`` shows the result.
    ``option``: the compile's ``fusion`` option (``None``: :data:`ENABLED`)."""
    mm_op = _op("triton_int8_mm")
    if not enabled(option) or mm_op is None:
        return gm
    gemms = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is mm_op]
    if not gemms:
        return gm
    from ..kernels import triton_fused

    claimed: set = set()
    shiftquant = torch.ops.sqcompile.triton_shiftquant.default     # registered with triton_int8_mm
    sources = {_source_of(n) for n in gemms}
    fused = 0
    dag = _digraph(gm.graph)
    for mm in gemms:
        r = _Search(dag, claimed).grow(mm)
        if r is None:
            continue
        _find_ranges(r, shiftquant)
        _find_sums(r)
        signature = triton_fused.Epilogue(tuple((p, d) for _, _, p, d in r.inputs), tuple(tuple(o) for o in r.ops),
                                          tuple(r.value[n] for n in [r.chain[-1], *r.side]),
                                          tuple(tuple(x) for x in r.ranges), tuple(tuple(x) for x in r.sums)).signature()
        kernel = triton_fused.kernel_for(signature)       # generated (or found) now, at compile time
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        nodes = [mm.name] + [n.name for n in sorted(r.members[1:], key=order.__getitem__)]
        decision = _decision_for(record, mm, sources)
        _record(record, decision, FusedRegion(
            name=f"R{len(record.regions) + 1}", stage=stage, label=r.label, nodes=nodes,
            module_path=decision.module_path if decision else _module_of(mm),
            decision=decision.node if decision else None, outputs=1 + len(r.side), stop=r.stop, kernel=kernel.path))
        new = _rewrite(gm, r, signature)
        dag.remove_nodes_from(r.members + [sq for sq, _ in r.range_users] + r.sum_users + r.erased)
        for node in new:
            dag.add_edges_from((i, node) for i in node.all_input_nodes)
            dag.add_edges_from((node, u) for u in node.users if not _is_sym_size(u))
        fused += 1
    fused += _store_transposed(gm.graph, {mm_op, torch.ops.sqcompile.triton_fused_int8_mm.default})
    fused += _pair_shiftquants(gm.graph)
    return finished(gm, record, stage, fused)


def _storage_base(node):
    """The node whose result ``node`` views (through view ops), or ``node`` itself."""
    while isinstance(node, fx.Node) and _is_view(node) and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def no_donation_of_aliases(gm: fx.GraphModule) -> bool:
    """Keep the backward from reusing the memory of saved tensors that alias each other.

    AOTAutograd marks the saved tensors that nothing else refers to as "donated": the
    backward compiled by Inductor may write into their memory once it has read them.  It
    decides so on the forward graph before our passes run; a pass that makes two saved
    values views of one result (an L1 norm's int8 output read by separate q, k and v
    Linears, or one row maxima for all three) would let the backward overwrite one through
    the other.  When ``gm``'s (a forward graph's) outputs alias each other, this clears the
    donation for the graph (the flag AOTAutograd itself clears when saved tensors may be
    used twice).  Returns whether it did."""
    (output,) = gm.graph.find_nodes(op="output")
    bases = [_storage_base(n) for n in output.args[0] if isinstance(n, fx.Node) and isinstance(_val(n), torch.Tensor)]
    if len(set(bases)) == len(bases):
        return False
    context = torch._guards.TracingContext.try_get()
    if context is not None and getattr(context, "fw_metadata", None) is not None:
        context.fw_metadata.bw_donated_idxs = []
    return True


def finished(gm: fx.GraphModule, record: CompileRecord, stage: str, changed: int) -> fx.GraphModule:
    """``gm`` after a lowering pass: linted, recompiled and recorded as the stage's fused graph
    when the pass changed it."""
    if changed:
        gm.graph.lint()
        gm.recompile()
        record.graphs[f"{stage}_fused"] = format_graph(gm)
    return gm


def _bound_args(node: fx.Node) -> Dict[str, object]:
    """``node``'s arguments by name, defaults included (bound by its op's schema)."""
    schema = node.target._schema.arguments
    arg = {a.name: a.default_value for a in schema if a.has_default_value()}
    arg.update(zip((a.name for a in schema), node.args), **node.kwargs)
    return arg


def _only_operand(user: fx.Node, node: fx.Node, index: int, gemm_ops: set) -> bool:
    """Is ``user`` an int8 GEMM that reads ``node`` as its operand ``index`` (0: A, 1: B) only?"""
    return (user.target in gemm_ops and user.args[index] is node and user.args[1 - index] is not node
            and not any(a is node for a in (user.args[2] if len(user.args) > 2 else ())))


def _store_transposed(graph: fx.Graph, gemm_ops: set) -> int:
    """Each ShiftQuant with one channel per row whose expanded gradient is used only where a
    GEMM wants it with its rows contiguous stores it transposed
    (``triton_shiftquant_fused(..., transposed=True)``, or ``triton_shiftquant_outer`` with
    ``transposed=True``): transposed, as the first operand
    (a Linear's ``dW = dY^T X``, attention's ``dK = dS^T Q``), or as is, as the second one
    (attention's ``dV = P^T dO``).  The GEMM then reads its reduction dim contiguously
    instead of first copying the operand into that layout.  The same bytes are written, in
    another order; the values are unchanged.  Returns how many."""
    from ..kernels.triton_quant import transposed_unsupported
    ops = torch.ops.sqcompile
    plain, fused_op, outer = ops.triton_shiftquant.default, ops.triton_shiftquant_fused.default, \
        ops.triton_shiftquant_outer.default
    done = 0
    for sq in [n for n in graph.nodes if n.op == "call_function" and n.target in (plain, fused_op, outer)]:
        arg = _bound_args(sq)
        x, dims = arg["x"], arg["channel_dims"]
        if arg.get("transposed"):
            continue
        items = {u.args[1]: u for u in sq.users if u.target is operator.getitem}
        e = items.get(0)
        if e is None or not e.users or _val(x) is None or transposed_unsupported(_val(x), dims):
            continue
        t = next(iter(e.users))
        nd = _val(e).dim()
        as_a = (len(e.users) == 1 and t.target is aten.transpose.int and t.users
                and {d % nd for d in t.args[1:3]} == {nd - 2, nd - 1}
                and all(_only_operand(u, t, 0, gemm_ops) for u in t.users))
        if not as_a and not all(_only_operand(u, e, 1, gemm_ops) for u in e.users):
            continue
        mode = _fake_mode(x)
        if sq.target is outer:
            target, args = outer, (x, arg["bits"], arg["groups"], dims, arg["outer_dims"], arg["stochastic"],
                                   arg.get("prescale"), True)
        else:
            target, args = fused_op, (x, arg.get("ranges"), arg["bits"], arg["groups"], dims, arg["stochastic"],
                                      arg.get("prescale"), True)
        with graph.inserting_before(sq):
            new = _new(graph, target, args, sq, mode)
        for item in items.values():
            item.update_arg(0, new)
            _refresh(item, mode)
        if as_a:
            _refresh(t, mode)
        graph.erase_node(sq)
        done += 1
    return done


def _pair_shiftquants(graph: fx.Graph) -> int:
    """Merge the two ShiftQuants of one gradient, along its columns and along its rows (a
    Linear's ``dY`` for ``dX`` and ``dW``, attention's ``dS`` for ``dQ`` and ``dK``), into one
    ``triton_shiftquant_pair`` that reads the gradient once per pass instead of twice: one
    range pass for both (none when a region gave both ranges), one quantize pass writing both
    results, the row quantizer's stored transposed when it was.  Bit for bit the two
    quantizers' results, stochastic draws included when no other random op ran between them
    (their seeds are drawn columns first, where the pair stands: at the earlier of the two).
    Two ``triton_shiftquant_outer`` (``grad_outer_scale``) pair as well, into one with
    ``outer=True``.  Returns how many pairs."""
    from ..kernels.triton_ops import pair_dims
    from ..kernels.triton_quant import pair_unsupported
    ops = torch.ops.sqcompile
    quantizers = (ops.triton_shiftquant.default, ops.triton_shiftquant_fused.default,
                  ops.triton_shiftquant_outer.default)
    outer_op = ops.triton_shiftquant_outer.default
    order = {n: i for i, n in enumerate(graph.nodes)}
    done = 0
    for x in list(graph.nodes):
        v = _val(x)
        if v is None or not isinstance(v, torch.Tensor) or pair_unsupported(v) is not None:
            continue
        cols, rows = pair_dims(v.dim())
        found: Dict[str, Tuple[fx.Node, dict]] = {}
        for sq in x.users:
            if sq.target not in quantizers:
                continue
            arg = _bound_args(sq)
            dims = sorted(d % v.dim() for d in arg["channel_dims"])
            which = "cols" if dims == cols else "rows" if dims == rows else None
            if arg["x"] is x and which and which not in found:
                found[which] = (sq, arg)
        if len(found) != 2:
            continue
        (sq_c, c), (sq_r, r) = found["cols"], found["rows"]
        outer = sq_c.target is outer_op
        if (any(c[k] != r[k] for k in ("bits", "groups", "stochastic")) or c.get("transposed")
                or (sq_r.target is outer_op) != outer
                or (outer and [sorted(d % v.dim() for d in q["outer_dims"]) for q in (c, r)] != [rows, cols])
                or any(u.target is not operator.getitem for u in [*sq_c.users, *sq_r.users])):
            continue
        first = min(sq_c, sq_r, key=order.__getitem__)
        late = [i for i in {*sq_c.all_input_nodes, *sq_r.all_input_nodes} if order[i] > order[first]]
        if any(i.target is not operator.getitem or order[i.args[0]] > order[first] for i in late):
            continue               # an input of the later one is computed after the earlier one
        for item in late:          # a region's range output, taken out right before its quantizer
            first.prepend(item)
        mode = _fake_mode(x)
        with graph.inserting_before(first):
            pair = _new(graph, ops.triton_shiftquant_pair.default,
                        (x, c.get("ranges"), r.get("ranges"), c["bits"], c["groups"], c["stochastic"],
                         c.get("prescale"), r.get("prescale"), bool(r.get("transposed")), *[True] * outer), first,
                        mode)
        for sq, offset in ((sq_c, 0), (sq_r, 2)):
            for item in list(sq.users):
                item.args = (pair, item.args[1] + offset)
                _refresh(item, mode)
            graph.erase_node(sq)
        done += 1
        order = {n: i for i, n in enumerate(graph.nodes)}
    return done


__all__ = ["fuse_regions", "ENABLED", "enabled", "enabled_as"]
