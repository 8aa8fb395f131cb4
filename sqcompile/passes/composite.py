"""Split composite ops whose GEMMs Dynamo leaves inside one call into the ops
:mod:`~sqcompile.passes.quantize_gemms` quantizes.

Dynamo does not trace into a few functions; each stays one node of the torch-level graph and,
left alone, would run in float with no report row:

* ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``, the self- and cross-attention
  of ``nn.TransformerEncoderLayer`` / ``DecoderLayer``) becomes the input projection(s) as
  ``linear`` nodes (the packed ``in_proj_weight`` as one GEMM for self-attention, a ``q`` and a
  packed ``kv`` GEMM when key is value, three GEMMs otherwise, or the separate
  ``q/k/v_proj_weight``), one ``scaled_dot_product_attention`` node over ``[N, H, L, D]`` head
  views, and the output projection as a ``linear`` node, exactly as PyTorch's own function runs
  it when ``need_weights=False``: ``attn_mask`` and ``key_padding_mask`` canonicalized to
  additive float masks of the query's dtype and summed (:func:`sqcompile.ops.mha_attention_mask`),
  ``is_causal`` passed on as PyTorch does, dropout only in training.  The call's result
  becomes ``(out, None)``.
* ``torch.tensordot`` and ``torch.inner`` / ``Tensor.inner`` become a two-operand ``einsum``
  (one batched GEMM after a permute and reshape); ``torch.linalg.multi_dot`` and
  ``torch.chain_matmul`` a chain of ``matmul`` nodes, multiplied in the order of least work as
  PyTorch does.
* ``torch.mv``, ``torch.dot`` and ``torch.vdot`` (real operands), and their ``Tensor``
  methods, become ``matmul`` with 1-d operands; ``torch.addmv`` a ``matmul`` and
  ``torch.addbmm`` an ``einsum('bnm,bmp->np')`` (one GEMM reducing over the batch and the
  inner dim), each followed by ``alpha * product + beta * input`` as PyTorch computes it
  (``beta=0`` ignores ``input``).
* ``lstm_cell`` / ``gru_cell`` / ``rnn_tanh_cell`` / ``rnn_relu_cell`` (``nn.LSTMCell``,
  ``nn.GRUCell``, ``nn.RNNCell`` called step by step) become the input and the recurrent
  projection as ``linear`` nodes (``<node>#ih``, ``<node>#hh``, under the cell's module path)
  and :func:`sqcompile.ops.rnn_cell_step` for the gates, in PyTorch's order of operations.

Design: the pieces are ordinary graph nodes rather than one ``quantized_*`` function, so each
GEMM gets the decision, report row, ``overrides`` match (``"*:linear"``,
``"*:scaled_dot_product_attention"``, a module path), statistics and fused-attention choice
any other ``linear`` / ``sdpa`` / ``matmul`` / ``einsum`` gets, and a float override keeps
PyTorch's float kernels for that piece only.  The glue between them (head split and merge,
mask merge) is a few small functions in :mod:`sqcompile.ops`.  Each new GEMM node carries
``meta["sq_name"]`` (``<original node>#<part>``: its decision's name, which keeps the report in
graph order) and ``meta["sq_note"]`` (where it came from, shown in the report).  The output
projection of an ``nn.MultiheadAttention`` is recorded under the module path of its
``out_proj`` submodule.

Left as one float node with one report row ``"float: <reason>"`` and its forward FLOPs:
multi-head attention whose weights are used (``need_weights=True`` and the second output read),
with ``bias_k``/``bias_v``, ``add_zero_attn``, ``static_k``/``static_v``, or non-constant
flags; ``tensordot`` with ``dims`` given as a tensor; ``inner`` with a 0-dim operand (a scaling,
not a GEMM); ``vdot`` of complex operands; any of them with ``out=``; an LSTM cell whose
``(h, c)`` is not a pair of graph values.
"""
from __future__ import annotations

import contextlib
import math
import operator
import string
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from .. import ops
from ..config import Config
from ..decisions import EXEC_FLOAT, CompileRecord, OpDecision, part_key
from .common import bind, call_name, example_value, module_path, numel, shape_of, size_hints
from .precision import Target

_MHA_ARGS = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias",
             "bias_k", "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias", "training",
             "key_padding_mask", "need_weights", "attn_mask", "use_separate_proj_weight", "q_proj_weight",
             "k_proj_weight", "v_proj_weight", "static_k", "static_v", "average_attn_weights", "is_causal")
_MHA_DEFAULTS = {"training": True, "key_padding_mask": None, "need_weights": True, "attn_mask": None,
                 "use_separate_proj_weight": False, "q_proj_weight": None, "k_proj_weight": None,
                 "v_proj_weight": None, "static_k": None, "static_v": None, "average_attn_weights": True,
                 "is_causal": False}
MHA = "multi_head_attention_forward"
_NOTE_MHA = "nn.MultiheadAttention"


def composite_gemms(gm: fx.GraphModule, config: Config, target: Target, record: CompileRecord) -> fx.GraphModule:
    """Split each composite op (see the module docstring) into GEMM nodes, or record why not."""
    changed = False
    for node in list(gm.graph.nodes):
        name = call_name(node)
        split = _SPLITS.get(name)
        if split is None:
            continue
        reason = split(gm, node)
        if reason is None:
            changed = True
        else:
            record.add(_float_decision(node, name, reason))
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm


# --------------------------------------------------------------------------------------------
# Building nodes with their example values
# --------------------------------------------------------------------------------------------

class _Builder:
    """Inserts nodes before ``at`` with ``at``'s metadata (module stack, stack trace) and
    example values computed on the fake values of their inputs."""

    def __init__(self, gm: fx.GraphModule, at: fx.Node):
        self.gm, self.at = gm, at
        values = [v for v in (example_value(a) for a in at.all_input_nodes) if v is not None]
        self.mode = next((v.fake_mode for v in values if hasattr(v, "fake_mode")), None) or contextlib.nullcontext()

    def __call__(self, fn: Callable, *args, sq_name: Optional[str] = None, sq_note: Optional[str] = None,
                 module_suffix: Optional[str] = None, **kwargs) -> fx.Node:
        with self.gm.graph.inserting_before(self.at):
            node = self.gm.graph.call_function(fn, args, kwargs)
        node.meta.update({k: v for k, v in self.at.meta.items() if k not in ("example_value", "val")})
        if sq_name is not None:
            node.meta["sq_name"] = sq_name
        if sq_note is not None:
            node.meta["sq_note"] = sq_note
        if module_suffix is not None:
            node.meta["nn_module_stack"] = _child_stack(self.at, module_suffix)
        fake = fx.node.map_aggregate((args, kwargs), lambda a: a.meta.get("example_value") if isinstance(a, fx.Node) else a)
        with self.mode:
            node.meta["example_value"] = fn(*fake[0], **fake[1])
        return node


def _child_stack(node: fx.Node, child: str) -> Dict[str, Any]:
    """``node``'s module stack with the submodule ``child`` of its innermost module appended."""
    stack = dict(node.meta.get("nn_module_stack") or {})
    if stack:
        key, raw = list(stack.items())[-1]
        path, cls = raw if isinstance(raw, tuple) else (raw, None)
        stack[f"{key}.{child}"] = (f"{path}.{child}", NonDynamicallyQuantizableLinear)
    return stack


def _unknown_shape(*nodes) -> Optional[str]:
    for n in nodes:
        if isinstance(n, fx.Node) and example_value(n) is None:
            return "operand shape unknown at compile time"
    return None


# --------------------------------------------------------------------------------------------
# Multi-head attention
# --------------------------------------------------------------------------------------------

def _mha_weights_used(node: fx.Node) -> bool:
    """Is anything but ``node[0]`` read (the attention weights, or the pair itself)?"""
    return any(not (u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0)
               and not (u.op == "call_function" and u.target is operator.getitem and u.args[1] == 1 and not u.users)
               for u in node.users)


def mha_unmapped(node: fx.Node, a: Dict[str, Any]) -> Optional[str]:
    """Why this ``multi_head_attention_forward`` call stays float (``None``: it is split)."""
    if a["need_weights"] is not False and _mha_weights_used(node):
        return "need_weights=True and the attention weights are used (the quantized attention does not form them)"
    if a["bias_k"] is not None or a["bias_v"] is not None:
        return "bias_k/bias_v (add_bias_kv=True) are not mapped to the quantized attention"
    if a["add_zero_attn"] is not False:
        return "add_zero_attn=True is not mapped to the quantized attention"
    if a["static_k"] is not None or a["static_v"] is not None:
        return "static_k/static_v are not mapped to the quantized attention"
    for k in ("training", "need_weights", "use_separate_proj_weight", "is_causal"):
        if not isinstance(a[k], bool):
            return f"non-constant {k}"
    for k in ("embed_dim_to_check", "num_heads"):
        if not isinstance(a[k], int):
            return f"non-constant {k}"
    if not isinstance(a["dropout_p"], (int, float, fx.Node)):   # a node: a symbolic float (dynamic=True)
        return "non-constant dropout_p"
    return _unknown_shape(*(a[k] for k in ("query", "key", "value", "attn_mask", "key_padding_mask")))


def _split_mha(gm: fx.GraphModule, node: fx.Node) -> Optional[str]:
    a = bind(node, _MHA_ARGS, _MHA_DEFAULTS)
    reason = mha_unmapped(node, a)
    if reason:
        return reason
    b = _Builder(gm, node)
    E, H = a["embed_dim_to_check"], a["num_heads"]
    query, key, value = a["query"], a["key"], a["value"]
    batched = example_value(query).dim() == 3
    if not batched:                           # [L, E] -> [L, 1, E], one node per input node
        unsqueezed: Dict[fx.Node, fx.Node] = {}
        for t in (query, key, value):
            if t not in unsqueezed:
                unsqueezed[t] = b(torch.unsqueeze, t, 1)
        query, key, value = unsqueezed[query], unsqueezed[key], unsqueezed[value]

    name = node.name

    def proj(x, w, bias, part, what):
        return b(torch._C._nn.linear, x, w, bias, sq_name=part_key(name, part),
                 sq_note=f"{_NOTE_MHA} input projection ({what})")

    def rows(t, start, stop):
        return None if t is None else b(operator.getitem, t, slice(start, stop))

    def chunks(t, n):
        parts = b(torch.chunk, t, n, -1)
        return [b(operator.getitem, parts, i) for i in range(n)]

    w, bias = a["in_proj_weight"], a["in_proj_bias"]
    if not a["use_separate_proj_weight"]:     # as F._in_projection_packed
        if key is value and query is key:
            q, k, v = chunks(proj(query, w, bias, "in_proj", "q, k, v packed"), 3)
        elif key is value:
            q = proj(query, rows(w, 0, E), rows(bias, 0, E), "in_proj_q", "q")
            k, v = chunks(proj(key, rows(w, E, None), rows(bias, E, None), "in_proj_kv", "k, v packed"), 2)
        else:
            q, k, v = (proj(x, rows(w, i * E, (i + 1) * E), rows(bias, i * E, (i + 1) * E), f"in_proj_{p}", p)
                       for i, (x, p) in enumerate(((query, "q"), (key, "k"), (value, "v"))))
    else:                                     # as F._in_projection, the bias split in three
        q, k, v = (proj(x, a[f"{p}_proj_weight"], rows(bias, i * E, (i + 1) * E), f"{p}_proj", p)
                   for i, (x, p) in enumerate(((query, "q"), (key, "k"), (value, "v"))))

    heads = [b(ops.mha_heads, t, H) for t in (q, k, v)]
    # masks as PyTorch merges them for need_weights=False: with is_causal and no padding mask
    # the attn_mask is only a hint and sdpa gets is_causal; otherwise the masks, summed
    need_weights, kpm, mask = a["need_weights"], a["key_padding_mask"], a["attn_mask"]
    causal = a["is_causal"] and kpm is None and not need_weights
    merged = None
    if not causal and (mask is not None or kpm is not None):
        merged = b(ops.mha_attention_mask, mask, kpm, query, key, H)
    dropout_p = a["dropout_p"] if isinstance(a["dropout_p"], fx.Node) else float(a["dropout_p"])
    dropout_p = dropout_p if a["training"] else 0.0
    attn = b(F.scaled_dot_product_attention, *heads, attn_mask=merged, dropout_p=dropout_p, is_causal=causal,
             sq_name=part_key(name, "attention"), sq_note=f"{_NOTE_MHA} attention")
    out = b(torch._C._nn.linear, b(ops.mha_merge_heads, attn), a["out_proj_weight"], a["out_proj_bias"],
            sq_name=part_key(name, "out_proj"), sq_note=f"{_NOTE_MHA} output projection",
            module_suffix="out_proj" if _in_mha_module(node) else None)
    if not batched:
        out = b(torch.squeeze, out, 1)
    result = b(ops.mha_result, out)
    result.meta.pop("sq_name", None)
    node.replace_all_uses_with(result)
    gm.graph.erase_node(node)
    return None


def _in_mha_module(node: fx.Node) -> bool:
    """Was the call made by an ``nn.MultiheadAttention`` (whose ``out_proj`` is a submodule)?"""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return False
    raw = list(stack.values())[-1]
    cls = raw[1] if isinstance(raw, tuple) and len(raw) > 1 else None
    return isinstance(cls, type) and issubclass(cls, torch.nn.MultiheadAttention)


def mha_flops(a: Dict[str, Any]) -> int:
    """Forward FLOPs of a float ``multi_head_attention_forward``: projections and both GEMMs
    of the attention (0 when a shape is unknown)."""
    q, k, v = (size_hints(a[n]) for n in ("query", "key", "value"))
    if q is None or k is None or v is None:
        return 0
    E = a["embed_dim_to_check"] if isinstance(a["embed_dim_to_check"], int) else q[-1]
    tokens_q, tokens_k = numel(q[:-1]), numel(k[:-1])
    src = k[0] + (1 if a["bias_k"] is not None else 0) + (1 if a["add_zero_attn"] is True else 0)
    static = size_hints(a["static_k"]) if a["static_k"] is not None else None
    if static is not None:
        src = static[1] + (1 if a["add_zero_attn"] is True else 0)
    projections = 2 * tokens_q * E * E * 2 + 2 * tokens_k * E * (k[-1] + v[-1])
    return projections + 2 * 2 * tokens_q * src * E


# --------------------------------------------------------------------------------------------
# tensordot, inner, multi_dot
# --------------------------------------------------------------------------------------------

def _einsum_node(b: _Builder, node: fx.Node, x, y, contract_x: Sequence[int], contract_y: Sequence[int],
                 what: str) -> fx.Node:
    """``einsum`` contracting dims ``contract_x`` of ``x`` with ``contract_y`` of ``y`` (in
    pairs), the output the free dims of ``x`` then those of ``y``: tensordot's layout."""
    nx, ny = example_value(x).dim(), example_value(y).dim()
    letters = iter(string.ascii_letters)
    ix = [next(letters) for _ in range(nx)]
    iy = [next(letters) for _ in range(ny)]
    for cx, cy in zip(contract_x, contract_y):
        iy[cy] = ix[cx]
    out = [c for i, c in enumerate(ix) if i not in contract_x] + [c for i, c in enumerate(iy) if i not in contract_y]
    equation = f"{''.join(ix)},{''.join(iy)}->{''.join(out)}"
    new = b(torch.einsum, equation, x, y, sq_name=node.name, sq_note=f"{what}, run as einsum('{equation}')")
    node.replace_all_uses_with(new)
    b.gm.graph.erase_node(node)
    return new


def _split_tensordot(gm: fx.GraphModule, node: fx.Node) -> Optional[str]:
    a = bind(node, ("a", "b", "dims", "out"), {"dims": 2, "out": None})
    x, y, dims = a["a"], a["b"], a["dims"]
    if a["out"] is not None:
        return "tensordot with out= is not rewritten"
    reason = _unknown_shape(x, y)
    if reason:
        return reason
    nx, ny = example_value(x).dim(), example_value(y).dim()
    if isinstance(dims, int):
        cx, cy = list(range(nx - dims, nx)), list(range(dims))
    elif isinstance(dims, (list, tuple)) and len(dims) == 2:
        cx, cy = ([d] if isinstance(d, int) else list(d) for d in dims)
        if not all(isinstance(d, int) for d in cx + cy):
            return "tensordot dims that are not constants"
        cx, cy = [d % nx for d in cx], [d % ny for d in cy]
    else:
        return "tensordot dims given as a tensor or non-constant"
    _einsum_node(_Builder(gm, node), node, x, y, cx, cy, "torch.tensordot")
    return None


def _split_inner(gm: fx.GraphModule, node: fx.Node) -> Optional[str]:
    names = ("self", "other") if node.op == "call_method" else ("input", "other")
    a = bind(node, names, {})
    x, y = a[names[0]], a["other"]
    reason = _unknown_shape(x, y)
    if reason:
        return reason
    nx, ny = example_value(x).dim(), example_value(y).dim()
    if nx == 0 or ny == 0:
        return "inner with a 0-dim operand is a scaling, not a GEMM"
    _einsum_node(_Builder(gm, node), node, x, y, [nx - 1], [ny - 1], "torch.inner")
    return None


def _chain_dims(shapes: List[List[int]]) -> List[int]:
    """``multi_dot``'s chain as matrices ``dims[i] x dims[i+1]`` (a 1-d first operand is a
    row, a 1-d last one a column)."""
    first = shapes[0][0] if len(shapes[0]) == 2 else 1
    return [first] + [s[-1] if len(s) == 2 else 1 for s in shapes[:-1]] + \
        [shapes[-1][-1] if len(shapes[-1]) == 2 else 1]


def _chain_cost(dims: List[int]) -> int:
    return _chain_plan(dims)[0]


def _chain_order(dims: List[int]) -> Any:
    return _chain_plan(dims)[1]


def _chain_plan(dims: List[int]):
    """The cheapest parenthesization of a chain of matrices ``dims[i] x dims[i+1]`` (the
    textbook dynamic program, as ``torch.linalg.multi_dot`` does): a nested pair of indices."""
    n = len(dims) - 1
    cost = [[0] * n for _ in range(n)]
    split = [[0] * n for _ in range(n)]
    for length in range(1, n):
        for i in range(n - length):
            j = i + length
            cost[i][j] = None
            for k in range(i, j):
                c = cost[i][k] + cost[k + 1][j] + dims[i] * dims[k + 1] * dims[j + 1]
                if cost[i][j] is None or c < cost[i][j]:
                    cost[i][j], split[i][j] = c, k

    def tree(i, j):
        return i if i == j else (tree(i, split[i][j]), tree(split[i][j] + 1, j))
    return cost[0][n - 1], tree(0, n - 1)


def _split_multi_dot(gm: fx.GraphModule, node: fx.Node) -> Optional[str]:
    a = bind(node, ("tensors", "out"), {"out": None})
    if a["out"] is not None:
        return "multi_dot with out= is not rewritten"
    return _split_chain(gm, node, a["tensors"], "torch.linalg.multi_dot")


def _split_chain_matmul(gm: fx.GraphModule, node: fx.Node) -> Optional[str]:
    if node.kwargs.get("out") is not None:
        return "chain_matmul with out= is not rewritten"
    return _split_chain(gm, node, list(node.args), "torch.chain_matmul")


def _split_chain(gm: fx.GraphModule, node: fx.Node, tensors, what: str) -> Optional[str]:
    """A chain of matrix products as ``matmul`` nodes in the cheapest order."""
    if not isinstance(tensors, (list, tuple)) or len(tensors) < 2:
        return f"{what} of fewer than two tensors or a non-constant list"
    reason = _unknown_shape(*tensors)
    if reason:
        return reason
    shapes = [size_hints(t) for t in tensors]
    if any(s is None for s in shapes):
        return "operand shape unknown at compile time"
    dims = _chain_dims(shapes)
    b = _Builder(gm, node)
    count = [0]

    def build(t):
        if isinstance(t, int):
            return tensors[t]
        left, right = build(t[0]), build(t[1])
        count[0] += 1
        return b(torch.matmul, left, right, sq_name=part_key(node.name, str(count[0])),
                 sq_note=f"{what}, product {count[0]} of {len(tensors) - 1}")

    node.replace_all_uses_with(build(_chain_order(dims)))
    gm.graph.erase_node(node)
    return None


# --------------------------------------------------------------------------------------------
# mv, dot, vdot, addmv, addbmm
# --------------------------------------------------------------------------------------------

# The two GEMM operands of each (the names of torch's signature; a method's first is ``self``).
_OPERANDS = {"mv": ("input", "vec"), "dot": ("input", "tensor"), "vdot": ("input", "other"),
             "addmv": ("mat", "vec"), "addbmm": ("batch1", "batch2")}


def _operands(node: fx.Node, name: str) -> Dict[str, Any]:
    """The call's arguments by the names of torch's signature (a method's ``self`` is ``input``)."""
    names = (("input",) if name in ("addmv", "addbmm") else ()) + _OPERANDS[name]
    return bind(node, names, {"beta": 1, "alpha": 1, "out": None})


def _product_operands(node: fx.Node):
    """``(name, arguments, x, y, reason)``: the call's two GEMM operands, and why it is not
    rewritten (``out=``, an operand of unknown shape) or None."""
    name = call_name(node)
    a = _operands(node, name)
    x, y = (a[k] for k in _OPERANDS[name])
    reason = f"{name} with out= is not rewritten" if a["out"] is not None else _unknown_shape(x, y)
    return name, a, x, y, reason


def _split_vector_product(gm: fx.GraphModule, node: fx.Node) -> Optional[str]:
    """``mv``, ``dot`` and ``vdot`` (real operands) are ``matmul`` with 1-d operands."""
    name, _, x, y, reason = _product_operands(node)
    if reason:
        return reason
    if name == "vdot" and (example_value(x).is_complex() or example_value(y).is_complex()):
        return "vdot of complex operands conjugates its first operand; not rewritten"
    b = _Builder(gm, node)
    new = b(torch.matmul, x, y, sq_name=node.name, sq_note=f"torch.{name}, run as matmul")
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return None


def _split_add_product(gm: fx.GraphModule, node: fx.Node) -> Optional[str]:
    """``addmv(input, mat, vec)`` is ``matmul(mat, vec)``, ``addbmm(input, b1, b2)`` the sum of
    the batch's products, one GEMM reducing over the batch and the inner dim:
    ``einsum('bnm,bmp->np')``; then ``alpha * product + beta * input`` as PyTorch computes it
    (``beta=0`` ignores ``input``, NaN included)."""
    name, a, x, y, reason = _product_operands(node)
    if reason:
        return reason
    b = _Builder(gm, node)
    if name == "addmv":
        product = b(torch.matmul, x, y, sq_name=node.name, sq_note="torch.addmv, run as matmul + add")
    else:
        product = b(torch.einsum, "bnm,bmp->np", x, y, sq_name=node.name,
                    sq_note="torch.addbmm, run as einsum('bnm,bmp->np') + add")
    alpha, beta = a["alpha"], a["beta"]
    if not (isinstance(alpha, (int, float)) and alpha == 1):
        product = b(operator.mul, product, alpha)
    if isinstance(beta, (int, float)) and beta == 0:
        result = product
    elif isinstance(beta, (int, float)) and beta == 1:
        result = b(operator.add, product, a["input"])
    else:
        result = b(torch.add, product, a["input"], alpha=beta)
    node.replace_all_uses_with(result)
    gm.graph.erase_node(node)
    return None


_SPLITS = {MHA: _split_mha, "tensordot": _split_tensordot, "inner": _split_inner,
           "linalg_multi_dot": _split_multi_dot, "chain_matmul": _split_chain_matmul,
           "mv": _split_vector_product, "dot": _split_vector_product, "vdot": _split_vector_product,
           "addmv": _split_add_product, "addbmm": _split_add_product}


# --------------------------------------------------------------------------------------------
# Recurrent cells (nn.LSTMCell, nn.GRUCell, nn.RNNCell)
# --------------------------------------------------------------------------------------------

RNN_CELLS = {"lstm_cell": "nn.LSTMCell", "gru_cell": "nn.GRUCell", "rnn_tanh_cell": "nn.RNNCell (tanh)",
             "rnn_relu_cell": "nn.RNNCell (relu)"}
_CELL_ARGS = ("input", "hx", "w_ih", "w_hh", "b_ih", "b_hh")
_CELL_DEFAULTS = {"b_ih": None, "b_hh": None}


def _cell_hidden(name: str, hx: Any) -> Any:
    """The state the recurrent GEMM reads: ``h`` of an LSTM's ``(h, c)``, else ``hx`` itself
    (``None`` when an LSTM's ``hx`` is not a pair of graph values)."""
    if name != "lstm_cell":
        return hx
    if isinstance(hx, (list, tuple)) and len(hx) == 2 and all(isinstance(t, fx.Node) for t in hx):
        return hx[0]
    return None


def rnn_cell_unmapped(name: str, a: Dict[str, Any]) -> Optional[str]:
    """Why this ``lstm_cell`` / ``gru_cell`` / ``rnn_*_cell`` call stays float (``None``: it is split)."""
    if _cell_hidden(name, a["hx"]) is None:
        return "hx is not a pair (h, c) of tensors in the graph"
    return _unknown_shape(a["input"], _cell_hidden(name, a["hx"]), a["w_ih"], a["w_hh"])


def _split_rnn_cell(gm: fx.GraphModule, node: fx.Node) -> Optional[str]:
    """One step of a cell as two ``linear`` nodes and the float gates of
    :func:`sqcompile.ops.rnn_cell_step`; a zero ``hx`` (the module's default) is multiplied as
    PyTorch does, so ``w_hh`` gets the zero gradient eager gives it, not none."""
    name = call_name(node)
    a = bind(node, _CELL_ARGS, _CELL_DEFAULTS)
    reason = rnn_cell_unmapped(name, a)
    if reason:
        return reason
    b, what = _Builder(gm, node), RNN_CELLS[name]
    gi = b(torch._C._nn.linear, a["input"], a["w_ih"], a["b_ih"], sq_name=part_key(node.name, "ih"),
           sq_note=f"{what} input projection")
    gh = b(torch._C._nn.linear, _cell_hidden(name, a["hx"]), a["w_hh"], a["b_hh"], sq_name=part_key(node.name, "hh"),
           sq_note=f"{what} recurrent projection")
    hx = tuple(a["hx"]) if name == "lstm_cell" else a["hx"]
    step = b(ops.rnn_cell_step, name[:-len("_cell")], gi, gh, hx)
    node.replace_all_uses_with(step)
    gm.graph.erase_node(node)
    return None


def _rnn_cell_float_decision(node: fx.Node, name: str, reason: str) -> OpDecision:
    """A cell kept whole: its forward FLOPs are both projections of every row of the batch."""
    a = bind(node, _CELL_ARGS, _CELL_DEFAULTS)
    x, weights = size_hints(a["input"]), [size_hints(a[k]) for k in ("w_ih", "w_hh")]
    flops = 0 if x is None or None in weights else 2 * numel(x[:-1]) * sum(numel(w) for w in weights)
    return OpDecision(node=node.name, module_path=module_path(node), op=name, kind="gemm",
                      shapes=[s for s in (shape_of(a["input"]), shape_of(a["w_ih"])) if s is not None],
                      flops=flops, execution=EXEC_FLOAT, reason=reason)


_SPLITS.update(dict.fromkeys(RNN_CELLS, _split_rnn_cell))


# --------------------------------------------------------------------------------------------
# Float rows
# --------------------------------------------------------------------------------------------

def _float_decision(node: fx.Node, name: str, reason: str) -> OpDecision:
    if name in RNN_CELLS:
        return _rnn_cell_float_decision(node, name, reason)
    if name == MHA:
        a = bind(node, _MHA_ARGS, _MHA_DEFAULTS)
        tensors = [a["query"], a["key"], a["value"]]
        flops = mha_flops(a)
    else:
        tensors = [t for t in node.args if isinstance(t, fx.Node)]
        if name == "linalg_multi_dot" and node.args and isinstance(node.args[0], (list, tuple)):
            tensors = [t for t in node.args[0] if isinstance(t, fx.Node)]
        if name in _OPERANDS:
            a = _operands(node, name)
            tensors = [a[k] for k in _OPERANDS[name] if isinstance(a[k], fx.Node)]
        flops = _plain_flops(node, tensors)
    shapes = [shape_of(t) for t in tensors if shape_of(t) is not None]
    return OpDecision(node=node.name, module_path=module_path(node), op=name, kind="gemm", shapes=shapes,
                      flops=flops, execution=EXEC_FLOAT, reason=reason)


def _plain_flops(node: fx.Node, tensors) -> int:
    """FLOPs of a ``tensordot`` / ``inner`` / ``multi_dot`` kept whole (0 when a shape is
    unknown).  Two operands: ``numel(x) * numel(y) = numel(out) * K**2`` gives the contracted
    size ``K``; a chain: the cost of its cheapest order."""
    shapes = [size_hints(t) for t in tensors]
    out = size_hints(node)
    if out is None or len(shapes) < 2 or any(s is None for s in shapes):
        return 0
    if call_name(node) in ("linalg_multi_dot", "chain_matmul"):
        return 2 * _chain_cost(_chain_dims(shapes))
    return 2 * numel(out) * math.isqrt(numel(shapes[0]) * numel(shapes[1]) // max(1, numel(out)))
