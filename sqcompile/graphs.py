"""Readable text of FX graphs: one line per node, with its result's dtype/shape and the module
it came from, so a user can see what the backend did to each layer."""
from __future__ import annotations

import torch
import torch.fx as fx

from .passes.common import module_path

_DTYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
           torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64", torch.bool: "bool",
           torch.uint8: "u8"}


def _target_name(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_method":
        return f".{t}"
    if node.op == "call_module":
        return f"self.{t}"
    if node.op == "get_attr":
        return f"self.{t}"
    if isinstance(t, torch._ops.OpOverload):
        return f"{t.namespace}.{t._opname}" + ("" if t._overloadname == "default" else f".{t._overloadname}")
    if isinstance(t, torch._ops.OpOverloadPacket):
        return str(t)
    mod = getattr(t, "__module__", None) or ""
    name = getattr(t, "__name__", None) or str(t)
    if mod.startswith("sqcompile"):
        return f"sqcompile.{name}"
    if mod.startswith("torch") or mod in ("_operator", "operator", "builtins"):
        return f"{mod.replace('torch._C._nn', 'F').replace('torch.nn.functional', 'F')}.{name}" if mod not in ("_operator", "operator", "builtins") else name
    return f"{mod}.{name}"


def _fmt(a) -> str:
    if isinstance(a, fx.Node):
        return a.name
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_fmt(x) for x in a)
        return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
    if isinstance(a, dict):
        return "{" + ", ".join(f"{k!r}: {_fmt(v)}" for k, v in a.items()) + "}"
    if isinstance(a, torch.dtype):
        return str(a).replace("torch.", "")
    if isinstance(a, float):
        return f"{a:g}"
    return repr(a)


def _value_desc(node: fx.Node) -> str:
    v = node.meta.get("val", node.meta.get("example_value"))
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(_one(x) for x in v) + ")"
    return _one(v)


def _one(v) -> str:
    if isinstance(v, torch.Tensor):
        shape = ",".join(str(s) for s in v.shape)
        return f"{_DTYPES.get(v.dtype, str(v.dtype).replace('torch.', ''))}[{shape}]"
    return ""


def format_graph(gm: fx.GraphModule) -> str:
    """One line per node: ``name: type = op(args)    # module.path``."""
    rows = []
    for node in gm.graph.nodes:
        desc = _value_desc(node)
        if node.op == "placeholder":
            rows.append((f"{node.name}: {desc}".rstrip(": "), "input", module_path(node)))
        elif node.op == "output":
            rows.append((f"return {_fmt(node.args[0])}", "", ""))
        else:
            args = [_fmt(a) for a in node.args] + [f"{k}={_fmt(v)}" for k, v in node.kwargs.items()]
            lhs = f"{node.name}: {desc}" if desc else node.name
            rows.append((f"{lhs} = {_target_name(node)}({', '.join(args)})", "", module_path(node)))
    width = min(max((len(r[0]) for r in rows), default=0), 110)
    out = []
    for text, kind, path in rows:
        note = "  # " + " ".join(x for x in (kind, path) if x) if (kind or path) else ""
        out.append(f"{text:<{width}}{note}".rstrip())
    return "\n".join(out)
