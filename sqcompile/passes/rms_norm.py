"""RMSNorm written out, ``x * rsqrt(mean(x^2) + eps) * weight``, as one ``F.rms_norm`` node.

LLaMA's, Mistral's and Gemma's reference code and nanoGPT forks write RMSNorm by hand, so
Dynamo's graph holds a square, a mean, an add, an ``rsqrt`` and products rather than a norm,
and :mod:`~sqcompile.passes.l1_norms` would leave it in float without a word.  This pass
replaces each exactly matched chain by ``F.rms_norm(x, normalized_shape, weight, eps)``, which
``l1_norms`` then replaces by the L1 RMS norm, or keeps (``norm="keep"``, an override of the
module or of ``rms_norm``), as it does for ``nn.RMSNorm``.  So the rewrite is made whatever
the options, and ``F.rms_norm`` computes what the chain computed, up to float rounding.  The
report's row says that the norm was written out.

Matched, each intermediate used only by the next op::

    s = x.pow(2) | x ** 2 | torch.pow(x, 2) | x * x | x.square() | torch.square(x)
    m = s.mean(dims, keepdim=True) | torch.mean(s, dims, keepdim=True)   # dims: the trailing ones
    d = m + eps  |  eps + m  |  m.add(eps)                               # eps a number >= 0 (*)
    y = x * torch.rsqrt(d)   (d.rsqrt(), d ** -0.5)   |   x / torch.sqrt(d)   (d.sqrt(), d ** 0.5)
    y = y * w                                          # optional, the factors in any order

(*) Or, under ``dynamic=True``, a float attribute (``self.eps``) that Dynamo passes as a 0-dim
tensor input read with ``.item()``: the pass reads its value, which makes Dynamo guard on it
and compile the graph again with ``eps`` a constant (so another module instance with another
``eps`` gets its own graph, not this one with the wrong ``eps``); the second compile matches
as a static one.

``x`` in the numerator and in the square may differ by widening casts (``x.float()`` in one,
``x`` in the other: the same values; Gemma casts each separately).  ``w`` is any floating
tensor of shape ``normalized_shape`` (the norm's parameter, or Gemma's ``1 + w``).  Float
casts between the products are absorbed (LLaMA's ``self._norm(x.float()).type_as(x) *
self.weight``): the norm is computed in the wider of the dtypes of ``x`` and ``w`` (each cast
up to it if needed) and its result cast to the dtype the chain ended in; casts after the last
product stay as written.  The match ends at the last product whose factors are ``x``,
``rsqrt`` and at most one ``w``: if ``x * rsqrt(d)`` is used elsewhere too, or multiplied by
something else (a number, a gate, a tensor of another shape), it is an RMS norm without a
weight and the rest stays as written.

Not matched (left as written, in float, and not a norm in the report): the mean over leading
dims, over dims that are not all the trailing ones, without ``keepdim`` or with a ``dtype``;
the mean written as ``sum / n``; ``eps`` a tensor or outside the root (``sqrt(m) + eps``);
``1 / sqrt(d)``; a square, mean, sum or root also used elsewhere (e.g. the inverse RMS
returned); numerator and square from different values or related by a narrowing cast; a
``normalized_shape`` with symbolic sizes (under ``dynamic=True`` a normalized dim that no weight
or Linear fixes).
"""
from __future__ import annotations

import contextlib
import math
from typing import List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F

from .common import arithmetic, call_name, example_value, only_user, shape_of

NOTE = "RMSNorm written out op by op; run as rms_norm"

_CASTS = {"float", "double", "half", "bfloat16", "to", "type", "type_as"}


def explicit_rms_norm(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace each matched chain (see the module docstring) by one ``F.rms_norm`` node."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.graph is gm.graph and _root(node) is not None:
            changed |= _rewrite(gm, node)
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm


def _root(node: fx.Node) -> Optional[Tuple[str, fx.Node]]:
    """``("rsqrt", d)`` for ``rsqrt(d)`` / ``d ** -0.5``, ``("sqrt", d)`` for ``sqrt(d)`` /
    ``d ** 0.5``; else None."""
    if node.kwargs or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    if call_name(node) in ("rsqrt", "sqrt") and len(node.args) == 1:
        return call_name(node), node.args[0]
    if arithmetic(node) == "pow" and len(node.args) == 2 and node.args[1] in (-0.5, 0.5):
        return "rsqrt" if node.args[1] < 0 else "sqrt", node.args[0]
    return None


def _eps(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0


def _symbolic_float(x) -> bool:
    """Is ``x`` a graph value that is a float with a known value: under ``dynamic=True`` Dynamo
    passes a float attribute (``self.eps``) as a 0-dim tensor input and reads it with
    ``.item()``, a ``SymFloat`` whose hint is the value it was compiled with?"""
    if not isinstance(x, fx.Node) or call_name(x) != "item" or len(x.args) != 1 \
            or not isinstance(x.args[0], fx.Node) or x.args[0].op != "placeholder":
        return False
    v = x.meta.get("example_value")
    return isinstance(v, torch.SymFloat) and v.node.hint is not None


def _plus_eps(d: fx.Node):
    """``(m, eps)`` for ``m + eps`` / ``eps + m`` with ``eps`` a number >= 0 or a symbolic
    float (:func:`_symbolic_float`, the node; :func:`_eps_value` reads it), else None."""
    if arithmetic(d) != "add" or len(d.args) != 2 or d.kwargs:
        return None
    a, b = d.args
    for m, eps in ((a, b), (b, a)):
        if isinstance(m, fx.Node) and example_value(m) is not None and (_eps(eps) or _symbolic_float(eps)):
            return m, eps
    return None


def _eps_value(eps) -> Optional[float]:
    """``eps`` as a number.  A symbolic float is read with ``float()``, which makes Dynamo
    guard on its value: another value (another module instance with another ``eps``)
    recompiles the graph rather than run this one with the wrong ``eps``.  Called only once
    the whole chain matched, so that no other float is specialized."""
    if isinstance(eps, fx.Node):
        eps = float(eps.meta["example_value"])
    return float(eps) if _eps(eps) else None


def _mean_dims(m: fx.Node) -> Optional[Tuple[fx.Node, List[int]]]:
    """``(s, dims)`` for ``mean(s, dims, keepdim=True)`` without a dtype, else None."""
    if call_name(m) != "mean":
        return None
    names = ("input", "dim", "keepdim", "dtype")
    if len(m.args) > len(names) or any(k not in names for k in m.kwargs):
        return None
    args = {"dim": None, "keepdim": False, "dtype": None, **dict(zip(names, m.args)), **m.kwargs}
    dims = args["dim"]
    dims = [dims] if isinstance(dims, int) else dims
    if not isinstance(args["input"], fx.Node) or args["keepdim"] is not True or args["dtype"] is not None \
            or not isinstance(dims, (list, tuple)) or not dims or not all(isinstance(d, int) for d in dims):
        return None
    return args["input"], list(dims)


def _squared(s: fx.Node) -> Optional[fx.Node]:
    """``x`` for ``x ** 2`` in any spelling (pow, ``x * x``, square), else None."""
    if s.kwargs or not s.args or not isinstance(s.args[0], fx.Node):
        return None
    if arithmetic(s) == "pow" and len(s.args) == 2 and s.args[1] == 2 and not isinstance(s.args[1], bool):
        return s.args[0]
    if arithmetic(s) == "mul" and len(s.args) == 2 and s.args[0] is s.args[1]:
        return s.args[0]
    if call_name(s) == "square" and len(s.args) == 1:
        return s.args[0]
    return None


def _cast_source(node) -> Optional[fx.Node]:
    """The tensor a float-to-float dtype cast (``.float()``, ``.to(dtype)``, ``.type_as(t)``,
    ...) converts, judged by the values it sees and gives; else None."""
    if not isinstance(node, fx.Node) or call_name(node) not in _CASTS or not node.args:
        return None
    src = node.args[0]
    a, b = example_value(src), example_value(node)
    if a is None or b is None or not a.is_floating_point() or not b.is_floating_point():
        return None
    return src if a.device == b.device and shape_of(src) == shape_of(node) else None


def _widened_from(node: fx.Node) -> List[fx.Node]:
    """``node`` and what it was widened from by exact casts (``bfloat16 -> float32``, ...)."""
    out = [node]
    src = _cast_source(node)
    while src is not None and torch.promote_types(example_value(src).dtype, example_value(out[-1]).dtype) \
            == example_value(out[-1]).dtype:
        out.append(src)
        src = _cast_source(src)
    return out


def _factors(node, user: fx.Node, inner: List[fx.Node]) -> list:
    """The factors of a product ``node`` computed only for ``user`` (``w * x``), each mul on
    the way appended to ``inner`` after the muls it uses; ``[node]`` for anything else."""
    if arithmetic(node) == "mul" and len(node.args) == 2 and not node.kwargs and only_user(node, user):
        out = _factors(node.args[0], node, inner) + _factors(node.args[1], node, inner)
        inner.append(node)
        return out
    return [node]


def _rewrite(gm: fx.GraphModule, root: fx.Node) -> bool:
    kind, d = _root(root)
    plus = _plus_eps(d) if only_user(d, root) else None
    mean = _mean_dims(plus[0]) if plus is not None and only_user(plus[0], d) else None
    x_sq = _squared(mean[0]) if mean is not None and only_user(mean[0], plus[0]) else None
    value = example_value(x_sq)
    if value is None or not value.is_floating_point():
        return False
    m, eps_arg = plus
    s, dims = mean
    nd, k = value.dim(), len(dims)
    if sorted(dim % nd for dim in dims if -nd <= dim < nd) != list(range(nd - k, nd)):
        return False
    shape = shape_of(x_sq)[nd - k:]
    if not all(isinstance(n, int) for n in shape):
        return False
    sources = set(_widened_from(x_sq))

    # Walk the products from the root down: x once, w (shape == normalized_shape) at most once.
    chain, cur, x, w, end = [s, m, d, root], root, None, None, None
    divided = kind == "rsqrt"                   # sqrt: the first product must be x / sqrt(d)
    while len(cur.users) == 1:
        user = next(iter(cur.users))
        if _cast_source(user) is cur:
            chain.append(user)
            cur = user
            continue
        op = arithmetic(user)
        if len(user.args) != 2 or user.kwargs or sum(a is cur for a in user.args) != 1:
            break
        if not divided and op == "div" and user.args[1] is cur:
            other = user.args[0]
        elif divided and op == "mul":
            other = user.args[0] if user.args[1] is cur else user.args[1]
        else:
            break
        inner: List[fx.Node] = []
        found_x, found_w, ok = x, w, True
        for f in _factors(other, user, inner):
            if found_x is None and isinstance(f, fx.Node) and sources & set(_widened_from(f)):
                found_x = f
            elif found_w is None and _weight(f, shape, value.device):
                found_w = f
            else:
                ok = False
        if not ok:
            break
        chain += [*inner, user]
        cur, x, w, divided = user, found_x, found_w, True
        if x is not None:
            end = (user, len(chain), w)
    if end is None:
        return False
    eps = _eps_value(eps_arg)
    if eps is None:
        return False
    end, n, w = end
    chain = chain[:n]

    inp = x_sq if torch.promote_types(example_value(x).dtype, value.dtype) != example_value(x).dtype else x
    dtype = example_value(inp).dtype if w is None else torch.promote_types(example_value(inp).dtype,
                                                                          example_value(w).dtype)
    fake_mode = getattr(example_value(inp), "fake_mode", None) or contextlib.nullcontext()
    with gm.graph.inserting_before(end), fake_mode:
        inp, w = (_cast(gm, t, dtype, end) for t in (inp, w))
        out = gm.graph.call_function(F.rms_norm, (inp, tuple(shape), w, eps))
        out.meta.update(end.meta)
        out.meta["example_value"] = F.rms_norm(example_value(inp), tuple(shape), example_value(w), eps)
        out.meta["sq_note"] = NOTE
        out = _cast(gm, out, example_value(end).dtype, end)
    end.replace_all_uses_with(out)
    for node in reversed(chain):         # the chain's own nodes, last first
        gm.graph.erase_node(node)
    for node in dict.fromkeys(_widened_from(x) + _widened_from(x_sq)):      # casts left without a user
        if _cast_source(node) is not None and not node.users:
            gm.graph.erase_node(node)
    if isinstance(eps_arg, fx.Node) and not eps_arg.users and call_name(eps_arg) == "item":
        gm.graph.erase_node(eps_arg)     # the .item() of dynamic=True's eps input, now unused
    return True


def _weight(f, shape: list, device) -> bool:
    v = example_value(f)
    return v is not None and v.is_floating_point() and v.device == device and shape_of(f) == shape


def _cast(gm: fx.GraphModule, node, dtype: torch.dtype, like: fx.Node):
    """``node.to(dtype)`` where its dtype differs (run inside the fake mode), else ``node``."""
    value = example_value(node)
    if value is None or value.dtype == dtype:
        return node
    cast = gm.graph.call_method("to", (node, dtype))
    cast.meta.update(like.meta)
    cast.meta["example_value"] = value.to(dtype)
    return cast
