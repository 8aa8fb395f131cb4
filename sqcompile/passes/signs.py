"""Which activations feeding a GEMM are non-negative by construction (a ReLU's output, a pooled
or reshaped ReLU output, a softmax, a sigmoid ...), so that they can be quantized unsigned.

A symmetric ``b``-bit quantizer spends half its levels on negative values; on a ReLU's output
those are never used, and a 4-bit activation gets 8 levels (``0..7``) where 16 (``0..15``) fit
in the same 4 bits.  The unsigned ``b``-bit quantizer of a non-negative tensor has
``qmax = 2**b - 1`` and, on values that are all ``>= 0``, gives exactly the integers of the
symmetric quantizer with ``qmax(b + 1) = 2**b - 1``: the quantized ops and kernels run it as
``a_bits = b + 1`` and nothing below the rewrite pass needs to know (the integers are stored
in int8, and ``2**b - 1 <= 127`` for ``b <= 7``; at 8 bits activations stay signed).  If this
analysis were ever wrong about a tensor, it would be quantized with a symmetric ``b + 1``-bit
quantizer: more precise than asked, never wrong.

The analysis walks back from a GEMM's operand through ops that keep values non-negative
(shape and selection ops, pooling, dropout, ``cat``, sums and products of non-negative
values) to an op whose output is non-negative whatever its input (``relu``, ``relu6``,
``sigmoid``, ``softmax``, ``exp``, ``abs``, ``clamp(min >= 0)``, ...).  A value that an
in-place op or an indexed assignment may change later is not trusted.
"""
from __future__ import annotations

import numbers
import operator
from typing import Any, Dict, Optional, Tuple

import torch.fx as fx

from ..config import MAX_BITS
from .common import arithmetic, call_name

# ops whose output is >= 0 whatever their (real) input
_SOURCES = {"relu", "relu_", "relu6", "sigmoid", "sigmoid_", "softmax", "exp", "exp_", "abs", "abs_", "square",
            "softplus", "hardsigmoid"}
# ops whose output is >= 0 when their first tensor argument is (shape, selection, pooling, ...)
_KEEPS_FIRST = {
    "view", "reshape", "flatten", "unflatten", "permute", "transpose", "t", "contiguous", "unsqueeze", "squeeze",
    "expand", "expand_as", "clone", "detach", "to", "float", "half", "bfloat16", "double", "type_as", "narrow",
    "select", "movedim", "moveaxis", "repeat", "repeat_interleave", "roll", "flip", "split", "chunk", "unbind",
    "tensor_split", "getitem", "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
    "adaptive_max_pool2d", "adaptive_max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices",
    "max_pool3d_with_indices", "mean", "sum", "amax", "cummax", "cumsum", "pixel_shuffle",
    "pixel_unshuffle", "dropout", "dropout1d", "dropout2d", "dropout3d", "feature_dropout", "sqrt",
}
_CONCAT = {"cat", "concat", "concatenate", "stack", "hstack", "vstack", "dstack"}
# in-place ops that keep a non-negative tensor non-negative
_SAFE_INPLACE = {"relu_", "sigmoid_", "abs_", "exp_"}
_OPERATOR_INPLACE = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                     operator.ipow, operator.imod, operator.imatmul, operator.setitem}
_MAX_DEPTH = 64


def activation_bits(node: Any, bits: int, enabled: bool) -> Tuple[int, Optional[str]]:
    """``(bits the quantized op is given, source)`` for an activation operand ``node`` quantized
    at ``bits``: ``(bits + 1, "relu")`` where it is non-negative (its unsigned ``bits``-bit
    quantizer, see the module docstring), else ``(bits, None)``."""
    source = nonnegative_source(node) if enabled and unsigned_bits(bits) else None
    return (unsigned_bits(bits), source) if source else (bits, None)


def unsigned_bits(bits: int) -> Optional[int]:
    """The ``bits`` argument that makes a quantized op quantize a non-negative operand
    unsigned at ``bits`` (``bits + 1``), or None where int8 cannot hold it (8 bits)."""
    return bits + 1 if bits < MAX_BITS else None


def nonnegative_source(node: Any) -> Optional[str]:
    """The name of the op that makes ``node``'s value non-negative (``"relu"``), or None when
    that is not certain."""
    return _source(node, {}, 0)


def _source(node: Any, memo: Dict[fx.Node, Optional[str]], depth: int) -> Optional[str]:
    if not isinstance(node, fx.Node) or depth > _MAX_DEPTH:
        return None
    if node not in memo:
        memo[node] = None if _mutated(node) else _derive(node, memo, depth)
    return memo[node]


def _derive(node: fx.Node, memo, depth: int) -> Optional[str]:
    if node.op not in ("call_function", "call_method"):
        return None
    name = "getitem" if node.target is operator.getitem else call_name(node)
    first = node.args[0] if node.args else None

    def source_of(x):
        return _source(x, memo, depth + 1)

    if name in _SOURCES:
        return name
    if name == "hardtanh":      # nn.ReLU6 is hardtanh(x, 0, 6)
        low, high = _arg(node, 1, "min_val", -1.0), _arg(node, 2, "max_val", 1.0)
        return ("relu6" if (low, high) == (0, 6) else name) if _nonneg_number(low) else None
    if name == "threshold":         # x > threshold ? x : value
        low, value = _arg(node, 1, "threshold", None), _arg(node, 2, "value", None)
        return name if _nonneg_number(low) and _nonneg_number(value) else None
    if name in ("clamp", "clip", "clamp_min"):
        low, high = _arg(node, 1, "min", None), _arg(node, 2, "max", None) if name != "clamp_min" else None
        if high is not None and not _nonneg_number(high):       # a negative max makes every value negative
            return None
        return name if _nonneg_number(low) else source_of(first)
    if name in ("interpolate", "upsample"):        # bicubic interpolation overshoots
        mode = _arg(node, 3, "mode", "nearest")
        return source_of(first) if isinstance(mode, str) and mode != "bicubic" else None
    if name == "pad":
        value = _arg(node, 3, "value", None)
        return source_of(first) if value is None or _nonneg_number(value) else None
    if name in _KEEPS_FIRST:
        return source_of(first)
    if name in _CONCAT:
        parts = first if isinstance(first, (list, tuple)) else node.args
        found = [source_of(p) for p in parts]
        return found[0] if found and all(found) else None
    op = arithmetic(node)
    if name == "max" and not any(isinstance(a, fx.Node) for a in node.args[1:]):    # over dims: values, indices
        return source_of(first)
    if op in ("add", "mul") or name in ("max", "maximum", "where"):
        operands = node.args[1:] if name == "where" else node.args[:2]
        if name in ("max", "maximum"):       # max(a, b) >= 0 when either is
            found = [source_of(a) for a in operands]
            return next((f for f in found if f), None)
        found = []
        for a in operands:
            if isinstance(a, fx.Node):
                found.append(source_of(a))
            elif not _nonneg_number(a):
                return None
        if op == "add" and "alpha" in node.kwargs and not _nonneg_number(node.kwargs["alpha"]):
            return None
        return found[0] if found and all(found) else None
    if op == "div":
        divisor = node.args[1] if len(node.args) > 1 else None
        return source_of(first) if isinstance(divisor, numbers.Real) and divisor > 0 else None
    if op == "pow":
        exponent = node.args[1] if len(node.args) > 1 else None
        if isinstance(exponent, numbers.Integral) and exponent % 2 == 0:
            return "pow"
        return source_of(first) if isinstance(exponent, numbers.Real) else None
    return None


def _arg(node: fx.Node, index: int, name: str, default):
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


def _nonneg_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and v >= 0


def _mutated(node: fx.Node) -> bool:
    """May a later in-place op or indexed assignment change ``node``'s value (through it or
    a view of it)?"""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        for user in n.users:
            name = "getitem" if user.target is operator.getitem else call_name(user)
            if (user.target in _OPERATOR_INPLACE and user.args and user.args[0] is n) \
                    or user.kwargs.get("out") is not None:
                return True
            if isinstance(name, str) and name.endswith("_") and not name.startswith("_") \
                    and name not in _SAFE_INPLACE and user.args and user.args[0] is n:
                return True
            if user.kwargs.get("inplace") and user.args and user.args[0] is n and name not in _SOURCES \
                    and name not in ("dropout", "dropout1d", "dropout2d", "dropout3d"):
                return True
            if name in _VIEWS:
                todo.append(user)
    return False


_VIEWS = {"view", "reshape", "flatten", "unflatten", "permute", "transpose", "t", "unsqueeze", "squeeze", "expand",
          "narrow", "select", "movedim", "moveaxis", "split", "chunk", "unbind", "tensor_split", "getitem",
          "view_as", "as_strided", "diagonal", "unfold", "detach"}
