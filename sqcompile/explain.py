"""``sqcompile.explain(model, *example_inputs, **options)``: what the backend does to a model.

Compiles the model with ``backend="shiftquant"`` and ``options``, runs one training step's
forward and backward (of the sum of the floating outputs) and returns an :class:`Explanation`:
the Dynamo graph before and after the rewrite passes, the forward and backward ATen graphs
AOTAutograd produced from it, and the per-op precision :class:`~sqcompile.report.Report`.

The model is left as it was: its training flags, buffers (BatchNorm running statistics),
parameters' ``.grad`` and the global RNG state are restored, and gradients are taken with
``torch.autograd.grad`` so nothing accumulates into ``.grad``.  The step runs in training mode
(that is what the backward graph is for).

Two things to know:

* The model first runs eagerly once (under ``no_grad``, state restored), so that an error in
  the model's own code reaches you as that error, not wrapped in Dynamo's
  ``BackendCompilerFailed``.
* To produce fresh graphs it calls ``torch._dynamo.reset()``: Dynamo caches compiled code per
  Python function, so a model compiled before with the same options would otherwise be served
  from that cache.  Every ``torch.compile``-d function in the process then recompiles at its
  next call (same results; the first call is slow again).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.utils._pytree as pytree

from . import decisions as D
from .config import Config
from .report import Report, compiled_config, latest_per_graph, module_of

__all__ = ["Explanation", "explain"]

STAGES = ("dynamo", "rewritten", "forward", "backward")
_TITLES = {
    "dynamo": "Dynamo graph (before rewriting)",
    "rewritten": "Rewritten graph (after the sqcompile passes)",
    "forward": "Forward graph (ATen, after AOTAutograd)",
    "backward": "Backward graph (ATen, after AOTAutograd)",
}


class Explanation:
    """The result of :func:`explain`; ``print()`` it.

    ``graphs``: ``{"dynamo", "rewritten", "forward", "backward"}`` -> readable text, joined
    over the Dynamo graphs when the model compiled to several, each under a header
    ``# --- graph i of graphs 0-n ...`` numbered from 0 as the report's ``graph`` column;
    ``report``: the :class:`~sqcompile.report.Report`; ``records``: the underlying
    :class:`~sqcompile.decisions.CompileRecord` objects.  Given ``model``, the report also
    lists its modules that no graph captured (as :func:`sqcompile.report` does).
    """

    def __init__(self, records: List[D.CompileRecord], backward_note: str = "",
                 model: Optional[torch.nn.Module] = None):
        self.records = records
        self.report = Report(records, model=model)
        self.graphs: Dict[str, str] = {stage: _joined(records, stage, backward_note) for stage in STAGES}

    def __str__(self) -> str:
        parts = [f"== {_TITLES[s]} ==\n{self.graphs[s]}" for s in STAGES]
        parts.append(f"== Precision report ==\n{self.report}")
        return "\n\n".join(parts)

    def __repr__(self) -> str:
        return f"<sqcompile Explanation: {len(self.records)} graph(s), {self.report.summary()['ops']} ops>"


def explain(model: torch.nn.Module, *example_inputs, **options) -> Explanation:
    """Compile ``model`` with the ``shiftquant`` backend and ``options`` (the keys of
    :class:`sqcompile.Config`; a bad one raises its ``ValueError``; for a model that is
    ``torch.compile(m, backend="shiftquant", options=...)``, its options with ``options`` on
    top, so that ``explain(compiled, x)`` shows what training runs), run one forward and one
    backward on ``example_inputs`` and explain what the backend did.  The model is unchanged
    afterwards (see the module docstring).  When Dynamo captures no graph of the model (a
    forward without tensor operations, or one Dynamo gives up on before its first operation),
    the backend is never called and this raises a ``ValueError`` saying so, with the graph
    breaks Dynamo counted during the call as the reason."""
    compiled = compiled_config(model)     # a compiled model's own options, the given ones on top
    config = Config.from_options(options if compiled is None else {"config": compiled, **options})
    module = module_of(model)     # a torch.compile-d module (of a compiled module, too): the module inside
    if module is None:
        raise TypeError(f"sqcompile.explain() takes a torch.nn.Module or its torch.compile-d version, "
                        f"got {type(model).__name__}")
    model = module
    state = _ModelState(model)
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        try:
            model.train()
            with torch.no_grad():
                model(*example_inputs)   # the model's own errors surface here, unwrapped
            state.restore_buffers()
            torch._dynamo.reset()
            before, breaks = _last_index(), _graph_breaks()
            compiled = torch.compile(model, backend="shiftquant", options=config)
            outputs = compiled(*example_inputs)
            note = _backward(model, outputs, example_inputs)
            fresh = [r for r in _candidates(model) if r.index > before]
            why = "" if fresh else _why_no_graph(breaks)
        finally:
            state.restore()
    if not fresh:
        raise ValueError(f"sqcompile.explain(): Dynamo captured no graph of this {type(model).__name__}, so "
                         f'backend="shiftquant" had nothing to compile and the model ran in eager PyTorch: {why}')
    return Explanation(latest_per_graph(fresh), note, model)


# --------------------------------------------------------------------------------------------

class _ModelState:
    """Training flags, buffers and ``.grad`` of every parameter, to put back afterwards."""

    def __init__(self, model: torch.nn.Module):
        self.flags = [(m, m.training) for m in model.modules()]
        self.buffers = [(m, name, b, b.detach().clone()) for m in model.modules()
                        for name, b in m._buffers.items() if b is not None]
        self.grads = [(p, p.grad) for p in model.parameters()]

    def restore_buffers(self) -> None:
        with torch.no_grad():
            for m, name, b, saved in self.buffers:
                m._buffers[name] = b
                b.copy_(saved)

    def restore(self) -> None:
        self.restore_buffers()
        for m, flag in self.flags:
            m.training = flag
        for p, g in self.grads:
            p.grad = g


def _backward(model: torch.nn.Module, outputs, example_inputs) -> str:
    """Backpropagate the sum of the floating outputs without touching any ``.grad``."""
    floats = [t for t in pytree.tree_leaves(outputs)
              if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]
    if not floats:
        return "no backward graph: no floating output requires grad"
    leaves = [p for p in model.parameters() if p.requires_grad]
    leaves += [t for t in pytree.tree_leaves(example_inputs) if isinstance(t, torch.Tensor) and t.requires_grad]
    if not leaves:
        return "no backward graph: neither the parameters nor the inputs require grad"
    loss = sum(t.float().sum() for t in floats)
    torch.autograd.grad(loss, leaves, allow_unused=True)
    return ""


def _graph_breaks() -> Dict[str, int]:
    """Dynamo's count of graph breaks by reason, so far in this process."""
    from torch._dynamo.utils import counters
    return dict(counters["graph_break"])


def _why_no_graph(breaks_before: Dict[str, int]) -> str:
    """Why Dynamo captured no graph: the graph breaks it counted since ``breaks_before`` (each
    reason's first line and hint), or, with none, that there was no tensor operation to capture."""
    reasons = []
    for reason, n in _graph_breaks().items():
        if n > breaks_before.get(reason, 0):
            lines = [line.strip() for line in reason.strip().splitlines() if line.strip()]
            hint = next((line for line in lines[1:] if line.startswith("Hint:")), None)
            reasons.append(lines[0] + (f" ({hint})" if hint else "") if lines else reason)
    if reasons:
        return ("Dynamo broke the graph where it could not trace: " + "; ".join(reasons)
                + ' (TORCH_LOGS="graph_breaks" shows where)')
    return "the forward has no tensor operation for Dynamo to capture (it returns its inputs or Python values)"


def _last_index() -> int:
    latest = D.latest_records()
    return latest[-1].index if latest else -1


def _candidates(model: torch.nn.Module) -> List[D.CompileRecord]:
    """Records attached to the model's tensors, plus the latest ones (for parameter-free
    models, whose graphs lift no module state)."""
    found = {r.index: r for r in D.records_for([*model.parameters(), *model.buffers()])}
    for r in D.latest_records():
        found.setdefault(r.index, r)
    return [found[k] for k in sorted(found)]


def _joined(records: List[D.CompileRecord], stage: str, backward_note: str) -> str:
    texts = []
    for i, rec in enumerate(records):
        text = rec.graphs.get(stage)
        if text is None and stage == "forward" and "inference" in rec.graphs:
            text = "# inference graph (no gradient needed)\n" + rec.graphs["inference"]
        if text is None:
            text = f"({backward_note or 'no ' + stage + ' graph'})" if stage == "backward" else f"(no {stage} graph)"
        if len(records) > 1:
            text = f"# --- graph {i} of graphs 0-{len(records) - 1} (backend call #{rec.index}) ---\n{text}"
        texts.append(text)
    return "\n\n".join(texts)
