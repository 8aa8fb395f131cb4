"""The per-op precision report: what the ``shiftquant`` backend did to every matmul, conv and norm.

    cm = torch.compile(model, backend="shiftquant", options={"collect_stats": True})
    cm(x).sum().backward()
    print(sqcompile.report(cm))

One row per matmul / conv / norm node the rewrite passes saw (quantized or left in float, with
the reason), built from the :class:`~sqcompile.decisions.CompileRecord` of each compiled graph.
The columns say where the op lives (module path), what it computes on (input shapes), at
which precision each operand runs forward and backward, how it executes (``int8-cpu``,
``int8-torch``, ``triton``, ``simulated`` or ``float: <reason>``) and, when the lowering fused
it, its region.  With ``collect_stats=True`` it adds the measured quality of the latest step:
SQNR (signal-to-quantization-noise ratio, dB; higher is better, each bit adds about 6 dB) of
the weight, the activation and the gradient, and ShiftQuant's group occupancy.

Reading the statistics columns
------------------------------
* ``SQNR W`` is the GEMM's second operand: the weight of a Linear / conv, or the activation
  ``B`` of an activation-by-activation matmul (attention's ``K^T`` and ``V``).
* ``SQNR grad`` shows both backward GEMMs, ``dx / dw`` (``dx = dy W``: gradient grouped along
  the output channels; ``dW = dy^T x``: grouped along tokens / positions).  They are shown
  apart, not averaged, because they differ by several dB and a first layer has no ``dx``; the
  row dicts also carry their mean (``sqnr_grad_db``), which :meth:`Report.plot` draws.
* ``groups %`` is the fraction of channels in each ShiftQuant group (group 0 holds the
  largest ranges), ``dx | dw``: ``88/0/12/0`` means most channels are within 2x of the
  largest and 12% sit 8x below it.
* For norm rows, ``SQNR A`` is the norm's quantized input and ``SQNR grad`` the gradient into
  its backward.
* A quantized ``scaled_dot_product_attention`` runs two GEMMs and gets two rows, ``part``
  ``QK^T`` and ``PV`` (each with half the op's FLOPs and its own statistics: ``SQNR A`` is
  ``Q`` resp. the probabilities ``P``, ``SQNR W`` is ``K^T`` resp. ``V``).  Left in float, it is
  one fused kernel and one row.

Statistics are the latest step's values, measured by observing variants of the quantizer ops
(``sqcompile::quantize_observed`` / ``shiftquant_observed``).  ``steps`` counts the training
steps (runs of the compiled graph) in which the op ran and ``calls`` its forward calls in the
latest one (an RNN's recurrence runs once per time step, a checkpointed layer twice); the
statistics of an op that runs several times per step pool all the calls of that step (summed
signal over summed noise power; summed group counts), see :func:`sqcompile.decisions.observe`.  With ``collect_stats=False``
(the default) the rewrite emits the plain ops: stats off adds no nodes to the forward or
backward graph and costs nothing.

Which records :func:`report` uses
---------------------------------
A model compiles to one Dynamo graph per frame (more than one after graph breaks), and each
graph is compiled again when its guards fail (new input shapes, ``train()`` / ``eval()``,
``no_grad``).  :func:`report` keeps one record of each graph, the one whose compiled graph ran
last (the newest if none ran), where two records are the same graph when their decisions name
the same ``(module path, op, kind)`` sequence, their Dynamo graphs lift the same parameters,
both were compiled for training or both for inference (``no_grad``), and both with the same
options (:class:`~sqcompile.Config`).  So a recompile for a new batch size replaces the old
record, graph breaks give one block of rows per graph, a ``no_grad`` evaluation adds its
inference graph next to the training one, and an ``eval()`` forward with gradients on (a
validation loss) shows until training runs its cached graph again.

``report(compiled)`` keeps to the graphs compiled with options equal to that ``torch.compile``
call's: Dynamo runs a graph that another call with equal options compiled (for another
instance of the module class, or before a freeze / unfreeze) without calling the backend
again, so such a graph is this call's too, while other compiles of the module and
:func:`sqcompile.explain.explain` (which compiles it again) do not change the report.
``report(module)`` shows the graphs of every compile, each set of options apart.  Build
``Report(records)`` from :func:`sqcompile.decisions.records_for` to pick records yourself.
Instances of one module class that run the same graph share its record (and its statistics,
which are per graph).

With the model at hand (``report(compiled)``, ``report(module)``), the report also lists, as
``float`` rows without a graph, the Linear / conv / norm / attention / RNN modules whose
parameters none of its graphs used: Dynamo ran them eagerly (a module with a full backward
hook, a graph break around it) or they did not run.  Their FLOPs are unknown, and the summary's
FLOP fractions are those of the captured graphs.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
import types
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import torch
import torch.nn as nn

from . import decisions as D
from .config import Config

__all__ = ["Report", "report"]

_FORMAT = "sqcompile.report/1"
INTEGER_EXECUTIONS = (D.EXEC_INT8_CPU, D.EXEC_INT8_TORCH, D.EXEC_TRITON)
NOT_GEMMS = ("embedding",)      # reported with the GEMMs (they stay float), counted as none

# Row dict keys, in order (rows(), JSON and CSV use them).
ROW_KEYS = (
    "graph", "node", "module", "op", "part", "kind", "shapes", "flops", "quantized", "execution",
    "weight_bits", "weight_quantizer", "act_bits", "act_quantizer", "grad_bits", "grad_quantizer", "groups",
    "norm_bits", "region", "steps", "calls",
    "sqnr_weight_db", "sqnr_act_db", "sqnr_grad_dx_db", "sqnr_grad_dw_db", "sqnr_grad_db",
    "sqnr_grad_dx_per_tensor_db", "sqnr_grad_dw_per_tensor_db", "occupancy_dx", "occupancy_dw",
)
_STAT_KEYS = ("sqnr_weight_db", "sqnr_act_db", "sqnr_grad_dx_db", "sqnr_grad_dw_db", "sqnr_grad_db", "occupancy_dx",
              "occupancy_dw")


class Report:
    """Per-op precision report of one or more compiled graphs (see the module docstring).

    ``print(report)`` renders the table and a summary; :meth:`rows` gives one dict per op,
    :meth:`summary` the totals, :meth:`to_json` / :meth:`from_json`, :meth:`to_csv` and
    :meth:`plot` export them.  Statistics columns appear only when stats were collected
    (``collect_stats=True``), the ``region`` column only when the lowering fused ops, the
    ``graph`` column only when the report spans several Dynamo graphs (numbered from 0, the
    index into :attr:`records`; :func:`sqcompile.explain`'s graph headings use the same numbers).
    Given ``model``, its modules that none of ``records`` used get a float row with graph
    ``None`` (see the module docstring); ``warnings`` are shown with the records' own.

    Statistics cost time only when asked for: with ``collect_stats=False`` (the default) the
    backend adds no nodes to the forward or backward graph (no ``*_observed`` op; the report
    is built from what was recorded at compile time).  With it on, each quantizer also
    measures its SQNR in float64 (and ShiftQuant its per-tensor baseline and group counts):
    about 2.4x the step time of a small MLP on CPU, so use it to inspect, not to train.
    """

    def __init__(self, records: Union[D.CompileRecord, Iterable[D.CompileRecord]] = (),
                 model: Optional[torch.nn.Module] = None, warnings: Iterable[str] = ()):
        if isinstance(records, D.CompileRecord):
            records = [records]
        self.records: List[D.CompileRecord] = sorted(records, key=lambda r: r.index)
        self._rows = [row for i, r in enumerate(self.records) for d in _ordered(r) for row in _rows_of(d, r, i)]
        if model is not None:
            self._rows += _uncaptured_rows(model, self.records)
        self._summary = _summarize(self._rows, self.records, list(warnings))
        self._loaded = False
        if any(r["execution"] == D.EXEC_INT8_CPU for r in self._rows):
            from .kernels import amx   # the engine is chosen at each GEMM call: name the one that runs now
            self._summary["int8_cpu_kernel"] = amx.describe()

    # -- data ------------------------------------------------------------------------------

    def rows(self) -> List[Dict[str, Any]]:
        """One dict per matmul / conv / norm, and per GEMM of a quantized attention (keys:
        :data:`ROW_KEYS`); module ``""`` is the root.  A module of the model in none of the
        graphs has ``graph`` None, no shapes and ``flops`` None (unknown)."""
        return [dict(r) for r in self._rows]

    def summary(self) -> Dict[str, Any]:
        """Totals: op counts, GEMM FLOP fractions in integer / quantized (of the GEMMs in the
        graphs: ``not_captured`` counts the modules in none, whose FLOPs are unknown), graphs
        (``inference_graphs``: those compiled under ``no_grad`` that have rows;
        ``option_sets``: how many different options they were compiled with), warnings and,
        when rows run ``int8-cpu``, ``int8_cpu_kernel``: the CPU int8 GEMM kernel they run on
        (taken when the report is made; a report read by :meth:`from_json` keeps the saving
        machine's, and says so when printed)."""
        return json.loads(json.dumps(self._summary))

    def to_json(self, indent: Optional[int] = 1) -> str:
        """JSON text with the rows and the summary; :meth:`from_json` reads it back.  The summary
        carries the CPU int8 kernel description of this machine (``int8_cpu_kernel``), which a
        report read back elsewhere shows instead of the reading machine's.

        Non-finite SQNR values (``inf``: the quantizer was exact) are written as ``Infinity``,
        which Python's ``json`` reads back; NaN never occurs (it is stored as ``null``)."""
        return json.dumps({"format": _FORMAT, "rows": self._rows, "summary": self._summary}, indent=indent)

    @classmethod
    def from_json(cls, text: str) -> "Report":
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise ValueError(f"not a sqcompile report (expected a JSON object with format {_FORMAT!r})")
        rows, summary = data.get("rows"), data.get("summary")
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows) or not isinstance(summary, dict):
            raise ValueError("an incomplete sqcompile report: it needs a 'rows' list of objects and a 'summary' object")
        rep = cls.__new__(cls)
        rep.records = []
        rep._rows = [{k: r.get(k) for k in ROW_KEYS} for r in rows]
        rep._summary = summary
        rep._loaded = True     # its int8_cpu_kernel is the saving machine's, not this one's
        return rep

    def to_csv(self, path: Optional[str] = None) -> str:
        """CSV text (header + one line per op; list fields as JSON); written to ``path`` if given."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(ROW_KEYS), lineterminator="\n")
        writer.writeheader()
        for r in self._rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else ("" if v is None else v)
                             for k, v in r.items()})
        text = buf.getvalue()
        if path is not None:
            with open(path, "w", newline="") as f:
                f.write(text)
        return text

    # -- rendering -------------------------------------------------------------------------

    def __str__(self) -> str:
        from tabulate import tabulate

        rows = self._rows
        has = {
            "graph": len({r["graph"] for r in rows}) > 1,
            "region": any(r["region"] for r in rows),
            "stats": any(r[k] is not None for r in rows for k in _STAT_KEYS),
            "occupancy": any(r["occupancy_dx"] or r["occupancy_dw"] for r in rows),
        }
        columns = [
            ("graph", lambda r: "-" if r["graph"] is None else r["graph"], has["graph"]),
            ("module", lambda r: r["module"] or "<root>", True),
            ("op", _op_text, True),
            ("inputs", lambda r: ", ".join("x".join(str(s) for s in shp) for shp in r["shapes"]) or "?", True),
            ("forward", _forward_text, True),
            ("gradient", _gradient_text, True),
            ("execution", lambda r: r["execution"], True),
            ("region", lambda r: r["region"] or "", has["region"]),
            ("SQNR W", lambda r: _db(r["sqnr_weight_db"]), has["stats"]),
            ("SQNR A", lambda r: _db(r["sqnr_act_db"]), has["stats"]),
            ("SQNR grad dx/dw", _grad_sqnr_text, has["stats"]),
            ("groups % dx | dw", _occupancy_text, has["occupancy"]),
        ]
        columns = [(h, f) for h, f, show in columns if show]
        table = tabulate([[f(r) for _, f in columns] for r in rows], headers=[h for h, _ in columns],
                         tablefmt="simple", disable_numparse=True) if rows else "(no matmul / conv / norm ops)"
        lines = [table, "", self.summary_line()]
        if any(r["execution"] == D.EXEC_INT8_CPU for r in rows):
            kernel = self._summary.get("int8_cpu_kernel")
            if not self._loaded:
                lines.append(f"{D.EXEC_INT8_CPU} GEMMs run on {kernel}.")
            elif kernel:
                lines.append(f"{D.EXEC_INT8_CPU} GEMMs ran on {kernel} (where this report was saved).")
            else:
                lines.append(f"{D.EXEC_INT8_CPU} GEMMs ran on a CPU kernel this report does not name "
                             f"(saved by an older sqcompile).")
        if has["stats"]:
            lines.append("SQNR in dB (latest step); W = weight or second operand; grad = dx / dw GEMMs.")
        lines += [f"warning: {w}" for w in self._summary["warnings"]]
        return "\n".join(lines)

    def summary_line(self) -> str:
        s = self._summary
        parts = [f"{s['quantized']} of {s['ops']} ops quantized (GEMMs {s['gemms_quantized']}/{s['gemms']}"
                 + (f", norms {s['norms_quantized']}/{s['norms']}" if s["norms"] else "") + ")"]
        if s["graphs"] != 1:
            inference = s.get("inference_graphs", 0)
            parts[0] += f" in {s['graphs']} graphs" + (f" ({inference} compiled for inference)" if inference else "")
        if s.get("option_sets", 1) > 1:
            parts[0] += f" compiled with {s['option_sets']} different option sets"
        missing = s.get("not_captured", 0)
        parts.append(f"GEMM FLOPs in integer: {_pct(s['integer_flops_fraction'])}, "
                     f"quantized: {_pct(s['quantized_flops_fraction'])}"
                     + (" of the captured graphs' FLOPs" if missing else ""))
        if missing:
            parts.append(f"{missing} module{'s' if missing > 1 else ''} in no captured graph "
                         f"run{'' if missing > 1 else 's'} in float (FLOPs unknown, not counted)")
        return "Summary: " + "; ".join(parts)

    def __repr__(self) -> str:
        s = self._summary
        return f"<sqcompile Report: {s['ops']} ops, {s['quantized']} quantized, {s['graphs']} graph(s)>"

    def plot(self, path: str) -> str:
        """Per-layer SQNR bars (weight / act / mean grad) and ShiftQuant group occupancy
        (stacked, ``dx`` and ``dw`` side by side) as a PNG at ``path``; returns ``path``."""
        try:
            from matplotlib.figure import Figure
        except ImportError as e:
            raise ImportError("Report.plot needs matplotlib: pip install sqcompile[plot]  "
                              "(or pip install matplotlib)") from e
        rows = self._rows
        labels = [f"{r['module'] or '<root>'}\n{_op_text(r)}" for r in rows]
        x = list(range(len(rows)))
        fig = Figure(figsize=(max(6.0, 0.7 * len(rows) + 2), 7.5), layout="constrained")
        ax1, ax2 = fig.subplots(2, 1, sharex=True)
        width = 0.27
        for j, (key, name) in enumerate((("sqnr_weight_db", "weight"), ("sqnr_act_db", "activation"),
                                         ("sqnr_grad_db", "gradient (mean dx, dw)"))):
            vals = [_finite_or_nan(r[key]) for r in rows]
            ax1.bar([i + (j - 1) * width for i in x], vals, width, label=name)
        ax1.set_ylabel("SQNR (dB)")
        ax1.set_title("Quantization quality per op (latest step)")
        ax1.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax1.grid(axis="y", alpha=0.3)
        if not any(r[k] is not None for r in rows for k in _STAT_KEYS):
            ax1.text(0.5, 0.5, "no statistics: compile with options={'collect_stats': True}",
                     transform=ax1.transAxes, ha="center", va="center")
        n_groups = max((len(r[k] or []) for r in rows for k in ("occupancy_dx", "occupancy_dw")), default=0)
        for side, key, hatch in ((-0.2, "occupancy_dx", None), (0.2, "occupancy_dw", "//")):
            bottom = [0.0] * len(rows)
            for g in range(n_groups):
                vals = [100 * (r[key][g] if r[key] and g < len(r[key]) else 0.0) for r in rows]
                ax2.bar([i + side for i in x], vals, 0.38, bottom=bottom, color=f"C{g}", hatch=hatch,
                        label=f"group {g}" if key == "occupancy_dx" else None, edgecolor="white")
                bottom = [b + v for b, v in zip(bottom, vals)]
        ax2.set_ylabel("channels in group (%)")
        ax2.set_title("ShiftQuant group occupancy (left bar dx, hatched right bar dw)")
        if n_groups:
            ax2.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax2.set_xticks(x)
        ax2.set_xticklabels(labels, rotation=60, ha="right", fontsize="small")
        fig.savefig(path, dpi=110)
        return path


# --------------------------------------------------------------------------------------------
# Finding the records of a model
# --------------------------------------------------------------------------------------------

def report(compiled_or_model=None) -> Report:
    """The :class:`Report` of a model compiled with ``backend="shiftquant"``.

    ``compiled_or_model`` is the ``torch.compile``-d module (or what ``torch.compile`` of it
    returns again, a function wrapping its forward: the outer compile is the one Dynamo runs)
    or the original ``nn.Module`` (records are found through its parameters and buffers, by
    identity), or None for the latest compiles of any model (also the way to see a
    ``torch.compile``-d plain function, or a model called with other tensors than its own,
    e.g. through ``torch.func.functional_call``).  Only the newest record of each Dynamo graph
    is kept (see the module docstring).

    Which compiles count: for a ``torch.compile``-d module, the graphs compiled with options
    equal to its own (the same resolved :class:`~sqcompile.Config`, ``mode`` included).
    Dynamo runs a graph compiled by another ``torch.compile`` call whose options compare
    equal (for another instance of the class, or compiled before a freeze / unfreeze) without
    calling the backend again, so that graph is this compile's too; of such graphs the one
    that ran last is shown.  Graphs compiled with other options (another compile of the
    module, :func:`sqcompile.explain`) are not.  For the plain module, every compile's.

    The modules of the model that the backend quantizes or replaces (Linear, conv, norm,
    attention and RNN modules) whose parameters and buffers appear in none of the reported
    graphs get a row too, ``float``, with the reason: Dynamo left them out of its graphs (a
    module hook it does not trace, a graph break around it), or they did not run.

    Raises ``ValueError`` when nothing was compiled with this backend, saying why where it can
    tell (Dynamo's cache for the model's ``forward`` full at ``recompile_limit``; the model
    called with other tensors than its parameters).  A cache that is full while records exist
    adds a warning to the report: calls that none of its graphs accepts run in eager PyTorch.
    """
    if compiled_or_model is None:
        records = D.latest_records()
        if not records:
            raise ValueError('sqcompile.report(): nothing has been compiled with backend="shiftquant" yet '
                             "(compilation happens at the first call of the compiled model)")
        return Report(latest_per_graph(records))
    model = module_of(compiled_or_model)
    if model is None:
        raise ValueError(f"sqcompile.report() takes a torch.nn.Module or its torch.compile-d version, "
                         f"got {type(compiled_or_model).__name__}; for a torch.compile-d function call "
                         f"sqcompile.report() with no argument (the latest graphs of any model or function)")
    backend = _compile_backend(compiled_or_model)
    records = D.records_for([*model.parameters(), *model.buffers()])
    if backend is not None:
        config = _config_of(backend)
        options_id = id(backend.kwargs.get("options"))
        records = [r for r in records if r.options_id == options_id or (config is not None and r.config == config)]
    cache = _DynamoCache.of(model)
    if not records:
        raise ValueError(_why_no_records(model, backend, cache))
    warning = cache.warning(backend) if cache is not None else None
    return Report(latest_per_graph(records), model=model, warnings=[warning] if warning else ())


def _why_no_records(model: torch.nn.Module, backend, cache: Optional["_DynamoCache"]) -> str:
    """The message of ``report(model)`` finding no record: why, where it can tell."""
    name = type(model).__name__
    head = f'sqcompile.report(): no graph of this {name} reached backend="shiftquant"'
    if cache is not None and cache.full and backend is None:
        return (f"{head}: {cache.full_text()}; if it was compiled, its calls that none of these graphs "
                f"accepts ran in eager PyTorch, in float.  {cache.advice()}.")
    if cache is not None and cache.full and not cache.holds(backend):
        return (f"{head}: {cache.full_text()} and none of them is this torch.compile call's, so Dynamo "
                f"runs the model in eager PyTorch, in float.  {cache.advice()}.")
    if backend is not None and cache is not None and cache.holds(backend):
        return (f"{head} with its own parameters and buffers: Dynamo holds graphs of its forward compiled "
                f"with this torch.compile call's options, but report() finds records by the identity of "
                f"the tensors the graphs ran with, and they ran with others (torch.func.functional_call, "
                f"or parameters replaced after compiling); sqcompile.report() with no argument shows the "
                f"latest graphs of any model")
    return (f'{head}: it was not compiled with it, or never run (compilation happens at the first call), '
            f'or Dynamo traced no graph of it (a frame it skips or breaks up runs in eager PyTorch; '
            f'TORCH_LOGS="graph_breaks" shows why), or it ran with other tensors than its own parameters '
            f'(records are found by the identity of the tensors the graphs ran with, so '
            f'torch.func.functional_call or a model without parameters or buffers cannot be found this '
            f'way; report() with no argument shows the latest graphs of any model)')


def module_of(obj) -> Optional[torch.nn.Module]:
    """The ``nn.Module`` behind ``obj``: ``obj`` itself, the module a ``torch.compile``-d
    module wraps (``_orig_mod``), or the one behind what ``torch.compile`` returns for an
    already compiled module (a function wrapping its ``forward``: Dynamo's
    ``_torchdynamo_orig_callable`` / ``__wrapped__``, then the bound method's ``__self__``).
    None when there is none (a compiled plain function)."""
    for _ in range(32):
        if isinstance(obj, torch.nn.Module) and not isinstance(getattr(obj, "_orig_mod", None), torch.nn.Module):
            return obj
        for attr in ("_orig_mod", "_torchdynamo_orig_callable", "__wrapped__", "__self__"):
            inner = getattr(obj, attr, None)
            if inner is not None and inner is not obj:
                obj = inner
                break
        else:
            return None
    return None


def _compile_backend(compiled):
    """The backend object (``torch._TorchCompileWrapper``: ``kwargs`` holds the ``options`` and
    ``mode`` it was given) of a ``torch.compile``-d module, or of ``torch.compile`` of one, so
    that ``report(compiled)`` shows that compile's graphs when the same module was also
    compiled with other options or inspected by :func:`sqcompile.explain`.  Read from Dynamo's
    wrappers of the backend, which are internal: None (all the module's graphs) for a plain
    module or if this torch lays them out otherwise."""
    context = getattr(compiled, "dynamo_ctx", None)
    if context is None:       # torch.compile of a compiled module: a function holding its context
        cells = [c.cell_contents for c in getattr(compiled, "__closure__", None) or () if c.cell_contents is not None]
        context = next((c for c in cells if hasattr(c, "callback") and hasattr(c, "compiler_config")), None)
    backend = getattr(context, "callback", None)
    for _ in range(8):      # CatchErrorsWrapper -> ConvertFrame -> WrapBackendDebug -> the wrapper
        inner = getattr(backend, "_torchdynamo_orig_backend", None)
        if inner is None:
            break
        backend = inner
    return backend if isinstance(getattr(backend, "kwargs", None), dict) else None


def compiled_config(compiled) -> Optional[Config]:
    """The :class:`Config` a ``torch.compile(..., backend="shiftquant", options=...)``-d module
    was compiled with; None for a plain module, another backend, or invalid options."""
    backend = _compile_backend(compiled)
    return None if backend is None else _config_of(backend)


def _config_of(backend) -> Optional[Config]:
    """The :class:`Config` the backend builds from a compile's ``options`` and ``mode`` (as
    :func:`sqcompile.backends.shiftquant.shiftquant_backend` does), None if they are invalid."""
    from .backends.shiftquant import MODES
    options, mode = backend.kwargs.get("options"), backend.kwargs.get("mode")
    if mode in MODES and not isinstance(options, Config):
        options = {**MODES[mode], **(options or {})}
    try:
        return Config.from_options(options)
    except (TypeError, ValueError):
        return None


class _DynamoCache:
    """Dynamo's cache of compiled graphs for a model's ``forward`` (one entry per compile of
    that code object: other shapes, ``train()`` / ``eval()``, ``no_grad``, and every
    ``torch.compile`` with other options; for torch.nn's own classes, such as ``Sequential``,
    the cache of the wrapper frame Dynamo enters all of them through).  Once it holds
    ``torch._dynamo.config.recompile_limit`` entries, a call that none of them accepts runs in
    eager PyTorch: unquantized, and in no record.  Read through Dynamo's debugging accessor,
    which is internal: :meth:`of` gives None where this torch has none."""

    def __init__(self, frame: str, backends: List[Any], limit_name: str, limit: int):
        self.frame = frame              # what the cache belongs to, in words
        self.backends = backends        # of each entry: the backend object it was compiled by
        self.limit_name, self.limit = limit_name, limit     # the limit it is full at; "", 0: not full

    @classmethod
    def of(cls, model: torch.nn.Module) -> Optional["_DynamoCache"]:
        try:
            from torch._dynamo import config, external_utils, trace_rules
            from torch._dynamo.eval_frame import _debug_get_cache_entry_list
            forward = model.forward
            if config.wrap_top_frame or (isinstance(forward, types.MethodType) and trace_rules.check(forward)):
                # torch.nn's own classes: Dynamo enters them through a wrapper frame (as
                # OptimizedModule does), whose one cache holds the graphs of all of them
                code = external_utils.wrap_inline(model).__code__
                name = (f"the wrapper frame it enters {type(model).__name__} and every other torch.nn "
                        f"class through (torch._dynamo.external_utils.wrap_inline)")
            else:
                code = getattr(forward, "__func__", forward).__code__
                name = f"{type(model).__name__}.forward"
            entries = _debug_get_cache_entry_list(code)
            limits = [("recompile_limit", int(config.recompile_limit)),
                      ("accumulated_recompile_limit", int(config.accumulated_recompile_limit))]
            # Dynamo counts toward recompile_limit the entries whose ID_MATCH-guarded locals
            # (a module after a graph break) are this call's: ``self`` is the model
            own = [e for e in entries if all(ref() is None or local != "self" or ref() is model
                                             for local, ref in e.guard_manager.id_matched_objs.items())]
            backends = [e.backend for e in entries]
        except (ImportError, AttributeError, TypeError, RuntimeError):
            return None
        counts = {"recompile_limit": len(own), "accumulated_recompile_limit": len(entries)}
        full = next(((n, v) for n, v in limits if counts[n] >= v), ("", 0))
        return cls(name, backends, *full)

    @property
    def full(self) -> bool:
        return bool(self.limit_name)

    def holds(self, backend) -> bool:
        """Whether a graph of this compile (a backend comparing equal, as Dynamo matches them) is cached."""
        return any(b == backend for b in self.backends)

    def full_text(self) -> str:
        return (f"Dynamo's cache for {self.frame} is full ({self.limit} graphs, "
                f"torch._dynamo.config.{self.limit_name} = {self.limit}; every torch.compile with other "
                f"options counts, as do input shapes, train()/eval() and no_grad)")

    def advice(self) -> str:
        return (f"Call torch._dynamo.reset() between the compiles of an options sweep, or raise "
                f"torch._dynamo.config.{self.limit_name}")

    def warning(self, backend) -> Optional[str]:
        if not self.full:
            return None
        if backend is not None and not self.holds(backend):
            what = ("none of its graphs was compiled by this torch.compile call, so its calls run in "
                    "eager PyTorch, unquantized; the graphs shown are others' with equal options")
        else:
            what = ("a call that none of its graphs accepts (new input shapes, train()/eval(), no_grad) "
                    "runs in eager PyTorch, unquantized and not in this report")
        return f"{self.full_text()}: {what}.  {self.advice()}."


def latest_per_graph(records: Sequence[D.CompileRecord]) -> List[D.CompileRecord]:
    """Of each Dynamo graph among ``records``, the record whose compiled graph ran last (the
    newest one if none ran): a module compiled again for ``eval()`` (a validation loss
    with gradients on) and then trained on its cached training graph shows the training
    graph again.  Oldest first."""
    newest: Dict[Any, D.CompileRecord] = {}
    for rec in sorted(records, key=lambda r: (r.last_run, r.index)):
        newest[graph_key(rec)] = rec
    return sorted(newest.values(), key=lambda r: r.index)


_PLACEHOLDER = re.compile(r"^(\w+)\b.*#\s*input\b")


def graph_key(record: D.CompileRecord):
    """What stays the same when Dynamo recompiles one graph (new shapes, train/eval): the
    ``(module path, op, kind)`` of its decisions, the parameters it lifts as inputs
    (placeholder names like ``l_self_modules_fc_parameters_weight_`` come from the source;
    buffers not: an eval-mode BatchNorm lifts other ones), whether it was compiled for
    inference (under ``no_grad``) or training, so that a model's training graph and its
    inference graph are both reported, and the options it was compiled with (its
    :class:`~sqcompile.Config`), so that compiles of one module with other options are
    different graphs: ``report(module)`` shows each, not the one that ran last."""
    ops = tuple((d.module_path, d.op, d.kind) for d in record.decisions)
    state = []
    for line in record.graphs.get("dynamo", "").splitlines():
        m = _PLACEHOLDER.match(line)
        if m and "_parameters_" in m.group(1):
            state.append(m.group(1))
    return ops, tuple(sorted(state)), "inference" in record.graphs, repr(record.config)


# --------------------------------------------------------------------------------------------
# Rows and summary
# --------------------------------------------------------------------------------------------

def _ordered(record: D.CompileRecord) -> List[D.OpDecision]:
    """Decisions in graph order, an activation checkpoint's ops where it runs them and a GEMM
    split off a composite op (``"<node>#<part>"``) where its node was: the backend sorts them
    so once every pass has run (``shiftquant.rewrite``)."""
    return list(record.decisions)


def _rows_of(d: D.OpDecision, record: D.CompileRecord, graph: int) -> List[Dict[str, Any]]:
    """The rows of one decision: one, or one per GEMM of a quantized attention."""
    if d.op == "scaled_dot_product_attention" and d.quantized:
        return [_row(d, record, graph, part, len(D.SDPA_PARTS)) for part in D.SDPA_PARTS]
    return [_row(d, record, graph)]


def _row(d: D.OpDecision, record: D.CompileRecord, graph: int, part: Optional[str] = None,
         parts: int = 1) -> Dict[str, Any]:
    st = record.stats.get(d.node if part is None else D.part_key(d.node, part), {})
    norm = d.kind == "norm"
    weight = st.get("weight") or st.get("act_b") or {}
    act = st.get("norm_in" if norm else "act") or {}
    dx, dw = ({}, {}) if norm else (st.get("grad_dx") or {}, st.get("grad_dw") or {})
    grads = [v for v in (_num(dx.get("sqnr_db")), _num(dw.get("sqnr_db"))) if v is not None]
    if norm:
        grads = [v for v in (_num((st.get("norm_grad") or {}).get("sqnr_db")),) if v is not None]
    row = {
        "graph": graph, "node": d.node, "module": d.module_path, "op": d.op, "part": part, "kind": d.kind,
        "shapes": [list(s) for s in d.shapes], "flops": int(d.flops) // parts, "quantized": bool(d.quantized),
        "execution": d.execution_label,
        "weight_bits": d.weight_bits, "weight_quantizer": d.weight_quantizer,
        "act_bits": d.act_bits, "act_quantizer": d.act_quantizer,
        "grad_bits": d.grad_bits, "grad_quantizer": d.grad_quantizer, "groups": d.groups,
        "norm_bits": d.norm_bits, "region": "; ".join(t for t in (d.region, d.note) if t) or None,
        "steps": st.get("steps"), "calls": st.get("calls"),
        "sqnr_weight_db": _num(weight.get("sqnr_db")), "sqnr_act_db": _num(act.get("sqnr_db")),
        "sqnr_grad_dx_db": _num(dx.get("sqnr_db")), "sqnr_grad_dw_db": _num(dw.get("sqnr_db")),
        "sqnr_grad_db": sum(grads) / len(grads) if grads else None,
        "sqnr_grad_dx_per_tensor_db": _num(dx.get("per_tensor_sqnr_db")),
        "sqnr_grad_dw_per_tensor_db": _num(dw.get("per_tensor_sqnr_db")),
        "occupancy_dx": _fractions(dx.get("group_occupancy")), "occupancy_dw": _fractions(dw.get("group_occupancy")),
    }
    return row


# The modules whose ops the backend quantizes or replaces, by the op name their report rows
# carry: one of them that no reported graph used runs in eager PyTorch, in float.
_MODULE_OPS = (
    (nn.Linear, "linear", "gemm"), (nn.Bilinear, "bilinear", "gemm"),
    (nn.Conv1d, "conv1d", "gemm"), (nn.Conv2d, "conv2d", "gemm"), (nn.Conv3d, "conv3d", "gemm"),
    (nn.ConvTranspose1d, "conv_transpose1d", "gemm"), (nn.ConvTranspose2d, "conv_transpose2d", "gemm"),
    (nn.ConvTranspose3d, "conv_transpose3d", "gemm"),
    (nn.MultiheadAttention, "multi_head_attention", "gemm"),
    (nn.LSTM, "lstm", "gemm"), (nn.GRU, "gru", "gemm"), (nn.RNN, "rnn", "gemm"),
    (nn.LSTMCell, "lstm_cell", "gemm"), (nn.GRUCell, "gru_cell", "gemm"), (nn.RNNCell, "rnn_cell", "gemm"),
    (nn.modules.batchnorm._BatchNorm, "batch_norm", "norm"), (nn.LayerNorm, "layer_norm", "norm"),
    (nn.GroupNorm, "group_norm", "norm"), (nn.RMSNorm, "rms_norm", "norm"),
    (nn.modules.instancenorm._InstanceNorm, "instance_norm", "norm"),
)
NOT_CAPTURED = ("not in any graph Dynamo captured (it ran eagerly, e.g. after a graph break or with a module "
                "hook Dynamo does not trace, or it did not run)")


def _uncaptured_rows(model: torch.nn.Module, records: Sequence[D.CompileRecord]) -> List[Dict[str, Any]]:
    """A float row (``graph`` None, FLOPs unknown) for each module of ``model`` of a kind the
    backend quantizes or replaces (:data:`_MODULE_OPS`) whose parameters and buffers none of
    ``records`` used.  Matched by tensor identity, not by path: a frame Dynamo compiled for a
    submodule names its modules relative to that submodule.  A module without parameters or
    buffers cannot be matched and gets no row; nor do the submodules of a listed one (an
    attention's ``out_proj``)."""
    shown = {r.index for r in records}
    rows: List[Dict[str, Any]] = []
    listed: List[str] = []
    for path, module in model.named_modules():
        kind = next(((op, k) for cls, op, k in _MODULE_OPS if isinstance(module, cls)), None)
        if kind is None or any(path.startswith(p + ".") for p in listed):
            continue
        tensors = [*module.parameters(), *module.buffers()]
        if not tensors or any(r.index in shown for r in D.records_for(tensors)):
            continue
        listed.append(path)
        row = dict.fromkeys(ROW_KEYS)
        row.update(module=path, op=kind[0], kind=kind[1], shapes=[], flops=None, quantized=False,
                   execution=f"{D.EXEC_FLOAT}: {NOT_CAPTURED}")
        rows.append(row)
    return rows


def _summarize(rows: List[Dict[str, Any]], records: Sequence[D.CompileRecord],
               warnings: Optional[List[str]] = None) -> Dict[str, Any]:
    gemms = [r for r in rows if r["kind"] == "gemm" and r["op"] not in NOT_GEMMS]
    norms = [r for r in rows if r["kind"] == "norm"]
    known = [r for r in gemms if r["flops"] is not None]      # a module in no graph: FLOPs unknown
    total = sum(r["flops"] for r in known)
    integer = sum(r["flops"] for r in known if r["execution"] in INTEGER_EXECUTIONS)
    quantized = sum(r["flops"] for r in known if r["quantized"])
    warnings = list(warnings or [])
    for rec in records:
        for w in rec.warnings:
            if w not in warnings:
                warnings.append(w)
    return {
        "ops": len(rows), "quantized": sum(r["quantized"] for r in rows),
        "gemms": len(gemms), "gemms_quantized": sum(r["quantized"] for r in gemms),
        "norms": len(norms), "norms_quantized": sum(r["quantized"] for r in norms),
        "not_captured": sum(r["graph"] is None for r in rows),
        "gemm_flops": total,
        "integer_flops_fraction": integer / total if total else None,
        "quantized_flops_fraction": quantized / total if total else None,
        "graphs": len(records) if records else len({r["graph"] for r in rows if r["graph"] is not None}),
        # a graph with no matmul / conv / norm (an optimizer step compiled under no_grad) is no
        # inference graph of the model
        "inference_graphs": sum("inference" in rec.graphs and bool(rec.decisions) for rec in records),
        "option_sets": len({repr(rec.config) for rec in records}),
        "records": [rec.index for rec in records],
        "stats_collected": any(r[k] is not None for r in rows for k in _STAT_KEYS),
        "warnings": warnings,
    }


def _op_text(r: Dict[str, Any]) -> str:
    """``linear``; ``scaled_dot_product_attention QK^T`` for one GEMM of a multi-GEMM op."""
    return r["op"] + (f" {r['part']}" if r.get("part") else "")


def _num(v) -> Optional[float]:
    """A JSON-safe float: NaN (undefined) becomes None, +-inf (exact / all-noise) stays."""
    if v is None:
        return None
    v = float(v)
    return None if math.isnan(v) else v


def _fractions(v) -> Optional[List[float]]:
    return None if v is None else [float(x) for x in v]


def _finite_or_nan(v) -> float:
    return v if v is not None and math.isfinite(v) else float("nan")


# --------------------------------------------------------------------------------------------
# Cell text
# --------------------------------------------------------------------------------------------

_SHORT = [(", nearest", ""), ("per-output-channel", "per-channel"), (", stochastic", " SR"),
          ("per-column (activation)", "per-col"), (" (activation)", "")]


def _short(quantizer: Optional[str]) -> str:
    q = quantizer or ""
    for old, new in _SHORT:
        q = q.replace(old, new)
    return q


def _forward_text(r) -> str:
    if r["kind"] == "norm":
        bits = r["act_bits"] or r["norm_bits"]
        return f"in{bits} {_short(r['act_quantizer'])}".strip() if bits else "-"
    if r["weight_bits"] is None and r["act_bits"] is None:
        return "-"
    w = f"W{r['weight_bits']} {_short(r['weight_quantizer'])}".strip()
    a = f"A{r['act_bits']} {_short(r['act_quantizer'])}".strip()
    return f"{w} / {a}"


def _gradient_text(r) -> str:
    bits = r["grad_bits"]
    if bits is None:
        return "-"
    q = _short(r["grad_quantizer"])
    if r["groups"] and "G=" not in q:
        q = f"{q} G={r['groups']}".strip()
    return f"g{bits} {q}".strip()


def _db(v) -> str:
    if v is None:
        return ""
    return f"{v:.1f}" if math.isfinite(v) else ("inf" if v > 0 else "-inf")


def _grad_sqnr_text(r) -> str:
    if r["kind"] == "norm":
        return _db(r["sqnr_grad_db"])
    dx, dw = r["sqnr_grad_dx_db"], r["sqnr_grad_dw_db"]
    if dx is None and dw is None:
        return ""
    return f"{_db(dx) or '-'} / {_db(dw) or '-'}"


def _occupancy_text(r) -> str:
    def one(fr):
        return "/".join(str(round(100 * f)) for f in fr) if fr else "-"

    if not (r["occupancy_dx"] or r["occupancy_dw"]):
        return ""
    return f"{one(r['occupancy_dx'])} | {one(r['occupancy_dw'])}"


def _pct(v) -> str:
    if v is None:
        return "n/a (no GEMMs)"
    text = f"{100 * v:.1f}%"
    if text == "100.0%" and v < 1:
        return ">99.9%"
    if text == "0.0%" and v > 0:
        return "<0.1%"
    return text

