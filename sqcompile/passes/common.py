"""Small helpers the rewrite passes share: module paths, shapes and argument binding."""
from __future__ import annotations

import operator
import re
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.fx as fx

_ROOT = re.compile(r"^L\[['\"][^'\"]*['\"]\]\.?")
# a module reached through a global of the compiled function: G['model'].fc, or through a
# module's global, which Dynamo names G['__import_<module>'].model
_GLOBAL = re.compile(r"^G\[['\"](?:__import_[^'\"]*|([^'\"]*))['\"]\]\.?")
_GETATTR = re.compile(r"getattr\(([^()]*), ['\"]([^'\"]+)['\"]\)")
_CLOSURE = re.compile(r"^.*\.cell_contents\.?")      # a module captured by a closure: its own paths
_INDEX = re.compile(r"\[(?:['\"])?([^\]'\"]+)(?:['\"])?\]")


def normalize_path(raw: str) -> str:
    """Dynamo's ``L['self'].layer1[0].conv1`` (or ``L['fn'].0.conv``) -> ``layer1.0.conv1``;
    a module that a compiled function reaches as a global: ``G['model'].fc`` -> ``model.fc``
    (``G['__import___main__'].model.fc`` likewise); one captured by a closure of the compiled
    function (``getattr(L['fn'].__closure__[1].cell_contents, '0')``) -> its own path (``0``)."""
    while _GETATTR.search(raw):
        raw = _GETATTR.sub(r"\1.\2", raw)
    raw = _CLOSURE.sub("", raw)
    path = _GLOBAL.sub(lambda m: f"{m.group(1)}." if m.group(1) else "", _ROOT.sub("", raw))
    path = _INDEX.sub(r".\1", path)
    return path.strip(".").replace("..", ".")


def module_path(node: fx.Node) -> str:
    """Path of the innermost module ``node`` was traced in ("" for the root module)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    raw = list(stack.values())[-1]
    raw = raw[0] if isinstance(raw, tuple) else raw
    return normalize_path(str(raw))


_SOURCE_MODULE = re.compile(r"\._modules\[['\"]([^'\"]+)['\"]\]")
_SOURCE_TENSOR = re.compile(r"\._(?:parameters|buffers)\[['\"]([^'\"]+)['\"]\]$")


def anchor_module_paths(graphs: Sequence[fx.GraphModule], root: Optional[torch.nn.Module]) -> int:
    """Make the module paths of ``graphs`` (a Dynamo graph and its subgraphs) paths in ``root``,
    the module ``torch.compile`` was given; returns how many nodes changed.

    Dynamo writes each node's module path relative to the frame it compiled.  That frame is
    ``root.forward`` unless a graph break made Dynamo compile another one: the rest of a
    forward resumed after the break, where a submodule already fetched is a stack value
    (``L['___stack0']`` for ``root.fc3``), or a submodule's own ``forward``.  Its paths then
    lose their prefix (``fc3`` became the root ``""``), so ``overrides={"fc3": None}`` matched
    nothing and the layer was quantized.  A module's place in ``root`` is known from its
    parameters and buffers (graph inputs whose sources name the module's expression in the
    frame, and whose objects ``root`` names): each expression and its ancestors that lie
    within the same frame value are mapped to their path in ``root``, and every node's
    ``nn_module_stack`` entry under a mapped expression is rewritten to the full path."""
    if root is None:
        return 0
    names: Dict[int, List[str]] = {}     # a tied tensor has several
    for n, t in [*root.named_parameters(remove_duplicate=False), *root.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(t), []).append(n)
    full: Dict[str, str] = {}      # Dynamo's module expression -> path in root
    for node in graphs[0].graph.nodes:
        arg = node.meta.get("grapharg") if node.op == "placeholder" else None
        source = getattr(getattr(arg, "source", None), "name", None)
        value = getattr(arg, "example", None) if arg is not None else None
        if not isinstance(source, str) or not isinstance(value, torch.Tensor) or not _SOURCE_TENSOR.search(source):
            continue
        expr = _SOURCE_MODULE.sub(r".\1", _SOURCE_TENSOR.sub("", source))      # L['s'].blocks.0.a
        head = _ROOT.match(expr)
        if head is None:
            continue
        base, parts = head.group(0).rstrip("."), [p for p in expr[head.end():].split(".") if p]
        paths = [n.split(".")[:-1] for n in names.get(id(value), ())]       # the tensor's module(s) in root
        paths = [p for p in paths if len(parts) <= len(p) and p[len(p) - len(parts):] == parts]
        if len(paths) != 1:       # not in root, or tied between modules the expression cannot tell apart
            continue
        path = paths[0]
        for i in range(len(parts) + 1):       # the expression and its ancestors within the frame value
            full.setdefault(".".join([base, *parts[:i]]), ".".join(path[:len(path) - len(parts) + i]))
    changed = 0
    for graph in graphs:
        for node in graph.graph.nodes:
            stack = node.meta.get("nn_module_stack")
            if not stack:
                continue
            new = {}
            for key, value in stack.items():
                mapped = _anchored(str(value[0] if isinstance(value, tuple) else value), full)
                if mapped is not None:
                    value = (mapped, *value[1:]) if isinstance(value, tuple) else mapped
                new[key] = value
            if new != stack:
                node.meta["nn_module_stack"] = new
                changed += 1
    return changed


def _anchored(raw: str, full: Dict[str, str]) -> Optional[str]:
    """``raw`` under the longest mapped expression, as ``L['self'].<path in root>``; None if
    no mapped expression covers it."""
    expr = _SOURCE_MODULE.sub(r".\1", raw)
    best = max((e for e in full if expr == e or expr.startswith(e + ".") or expr.startswith(e + "[")),
               key=len, default=None)
    if best is None:
        return None
    rest = normalize_path("L['self']" + expr[len(best):])
    path = ".".join(p for p in (full[best], rest) if p)
    return f"L['self'].{path}" if path else "L['self']"


def module_paths(gm: fx.GraphModule) -> set:
    """Every module path (and its parents) appearing in the graph, or in the graph modules its
    higher-order ops run (an activation checkpoint's body)."""
    out = {""}
    for node in gm.graph.nodes:
        p = module_path(node)
        parts = p.split(".") if p else []
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        sub = subgraph_of(gm, node)
        if sub is not None:
            out |= module_paths(sub)
    return out


def subgraph_of(gm: fx.GraphModule, node: Any) -> Optional[fx.GraphModule]:
    """The graph module a ``get_attr`` node of ``gm`` names (the body a higher-order op such
    as an activation checkpoint runs), else None."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    obj = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, fx.GraphModule) else None


def example_value(node: Any) -> Optional[torch.Tensor]:
    if not isinstance(node, fx.Node):
        return None
    v = node.meta.get("example_value", node.meta.get("val"))
    return v if isinstance(v, torch.Tensor) else None


def shape_of(node: Any) -> Optional[List[int]]:
    v = example_value(node)
    if v is None:
        return None
    # int() on a symbolic size would install a guard and specialize the graph to this batch
    # size (recompiling for every new size); keep symbolic sizes as their names instead.  A
    # size Dynamo already specialized (``dynamic=True`` makes every size symbolic, and matching
    # a weight fixes the in-features) is a constant expression: that one is its int.
    return [_constant(s) for s in v.shape]


def _constant(s) -> Any:
    """``s`` as an int when it is one or a symbolic size fixed to a constant, else its name."""
    if isinstance(s, int):
        return s
    value = s.node.maybe_as_int()
    return value if value is not None else str(s)


def size_hint(s) -> Optional[int]:
    """A size as an int without a guard: itself, the constant a symbolic size was fixed to, or
    the value Dynamo saw for it (its hint); ``None`` for a data-dependent size."""
    if isinstance(s, int):
        return s
    value = s.node.maybe_as_int()
    if value is None:
        value = s.node.hint
    return None if value is None else int(value)


def hints(sizes) -> Optional[List[int]]:
    """:func:`size_hint` of each size, or ``None`` when one has no hint."""
    out = [size_hint(s) for s in sizes]
    return None if any(h is None for h in out) else out


def size_hints(node: Any) -> Optional[List[int]]:
    """The node's shape at the sizes it was compiled for (:func:`hints`).  For estimates only
    (FLOPs in the report, the ``inner="auto"`` choice) and analyses that confirm what they
    rely on symbolically (:mod:`sqcompile.backends.fusion`)."""
    v = example_value(node)
    return None if v is None else hints(v.shape)


def is_float_tensor(node: Any) -> bool:
    v = example_value(node)
    return v is not None and v.is_floating_point()


def is_parameter(node: Any) -> bool:
    """Does this graph input hold an ``nn.Parameter`` (lifted by Dynamo as a placeholder)?"""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "get_attr":
        return True
    if node.op != "placeholder":
        return False
    v = example_value(node)
    return isinstance(v, torch.nn.Parameter) or "_parameters_" in node.name


def bind(node: fx.Node, names: Sequence[str], defaults: Dict[str, Any]) -> Dict[str, Any]:
    """Map a call's positional and keyword args onto ``names``; ``self`` for call_method is
    the first name."""
    out = dict(defaults)
    for name, value in zip(names, node.args):
        out[name] = value
    for name, value in node.kwargs.items():
        out[name] = value
    missing = [n for n in names if n not in out]
    if missing:
        raise TypeError(f"{node.format_node()}: missing arguments {missing}")
    return out


def call_name(node: fx.Node) -> Optional[str]:
    """A stable name for what a call node calls: ``"linear"``, ``"conv2d"``, ``"matmul"``, ...
    (both ``torch.matmul`` / ``operator.matmul`` / ``x.matmul`` give ``"matmul"``)."""
    if node.op == "call_method":
        return {"__matmul__": "matmul"}.get(node.target, node.target)
    if node.op != "call_function":
        return None
    t = node.target
    if t is operator.matmul:
        return "matmul"
    if not str(getattr(t, "__module__", None) or "").startswith("torch"):
        return None   # a user function of the same name is not ours to rewrite
    return getattr(t, "__name__", None)


def only_user(node: Any, user: fx.Node) -> bool:
    """Is ``node`` a graph value whose one and only user is ``user``?"""
    return isinstance(node, fx.Node) and list(node.users) == [user]


_ARITHMETIC = {operator.mul: "mul", torch.mul: "mul", operator.truediv: "div", torch.div: "div",
               torch.true_divide: "div", operator.add: "add", torch.add: "add", operator.pow: "pow",
               torch.pow: "pow"}


def arithmetic(node: Any) -> Optional[str]:
    """``"mul"``, ``"div"``, ``"add"`` or ``"pow"`` for those operators in any spelling
    (``a * b``, ``torch.mul``, ``a.mul(b)``), else None."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_function":
        return _ARITHMETIC.get(node.target)
    if node.op == "call_method":
        return {"mul": "mul", "div": "div", "add": "add", "pow": "pow"}.get(node.target)
    return None


def numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
