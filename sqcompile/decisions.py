"""What the backend decided for each op, recorded during compilation.

The rewrite passes append one :class:`OpDecision` per matmul / conv / norm node they see,
quantized or not; the report (:mod:`sqcompile.report`) renders them.  A
:class:`CompileRecord` holds everything one backend call produced: its decisions, the graphs
at each stage, the per-step statistics.  Records are looked up later by the parameters the
compiled graph used, so ``sqcompile.report(compiled_model)`` finds them without the user
passing anything around.
"""
from __future__ import annotations

import itertools
import threading
import weakref
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import torch

from .numerics import sqnr_from

# Execution labels shown in the report.
EXEC_INT8_CPU = "int8-cpu"
EXEC_INT8_TORCH = "int8-torch"
EXEC_TRITON = "triton"
EXEC_SIMULATED = "simulated"
EXEC_FLOAT = "float"


@dataclass
class OpDecision:
    """One matmul / conv / norm node and what became of it."""

    node: str                           # FX node name in the Dynamo graph
    module_path: str                    # "layer1.0.conv1" ("" for the root module)
    op: str                             # "linear", "conv2d", "matmul", "bmm", "batch_norm", ...
    kind: str                           # "gemm" or "norm"
    shapes: List[List[int]] = field(default_factory=list)
    flops: int = 0                      # forward multiply-adds x 2 (GEMMs); 0 for norms
    quantized: bool = False
    execution: str = EXEC_FLOAT         # int8-cpu | int8-torch | triton | simulated | float
    reason: Optional[str] = None        # why float, or why simulated instead of integer
    weight_bits: Optional[int] = None
    act_bits: Optional[int] = None
    weight_quantizer: Optional[str] = None
    act_quantizer: Optional[str] = None
    grad_bits: Optional[int] = None
    grad_quantizer: Optional[str] = None
    groups: Optional[int] = None
    norm_bits: Optional[int] = None
    replacement: Optional[str] = None   # the function the node was rewritten to
    region: Optional[str] = None        # fused region name, when lowering fused it
    note: Optional[str] = None          # a rewrite it went through, or a fusion not done and why
    graph: int = 0                      # which Dynamo graph (frame) of the model it came from

    @property
    def execution_label(self) -> str:
        if self.execution in (EXEC_FLOAT, EXEC_SIMULATED) and self.reason:
            return f"{self.execution}: {self.reason}"
        return self.execution

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass
class FusedRegion:
    """One integer GEMM and the elementwise epilogue the lowering fused into one generated
    kernel (:mod:`sqcompile.backends.fusion`)."""

    name: str                           # "R1", numbered per record
    stage: str                          # "forward", "backward" or "inference"
    label: str                          # "int8_mm+dequant+bias+gelu"
    nodes: List[str]                    # the ATen nodes it replaced, GEMM first
    module_path: str                    # module of the GEMM ("" when unknown)
    decision: Optional[str] = None      # OpDecision.node of the GEMM's op, when found
    outputs: int = 1                    # values it stores (more than 1: side outputs)
    stop: str = ""                      # why the region ends where it does
    kernel: str = ""                    # the generated module file

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass
class CompileRecord:
    """Everything one call of the backend produced (one Dynamo graph)."""

    index: int
    config: Any
    decisions: List[OpDecision] = field(default_factory=list)
    graphs: Dict[str, str] = field(default_factory=dict)   # stage -> readable code
    warnings: List[str] = field(default_factory=list)
    stats: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # node -> latest stats
    regions: List[FusedRegion] = field(default_factory=list)      # fused by the lowering
    inner: Optional[str] = None          # the inner compiler lowering used ("eager" / "inductor")
    options_id: Optional[int] = None     # id() of the options object torch.compile passed (report(compiled))
    last_run: int = -1                   # when its compiled graph last ran (RUNS), for report()

    def add(self, decision: OpDecision) -> OpDecision:
        decision.graph = self.index
        self.decisions.append(decision)
        return decision


_counter = itertools.count()
RUNS = itertools.count()      # a clock of compiled-graph calls: CompileRecord.last_run
_lock = threading.Lock()
# id(parameter/buffer) -> (weak reference to it, records of the graphs that used it).  Keyed by
# id because tensors compare elementwise; the weak reference's callback drops dead entries.
_by_tensor: Dict[int, tuple] = {}
_all: List["weakref.ref[CompileRecord]"] = []
_by_index: "weakref.WeakValueDictionary[int, CompileRecord]" = weakref.WeakValueDictionary()
_strong_latest: List[CompileRecord] = []   # keep the latest few alive for sqcompile.report()


def new_record(config, options_id: Optional[int] = None) -> CompileRecord:
    with _lock:
        rec = CompileRecord(index=next(_counter), config=config, options_id=options_id)
        _all.append(weakref.ref(rec))
        _by_index[rec.index] = rec
        _strong_latest.append(rec)
        del _strong_latest[:-8]
    return rec


def discard(record: CompileRecord) -> None:
    """Forget ``record``: its graph was abandoned before it could run (Dynamo restarts the
    trace when AOTAutograd specializes a float graph input, and compiles the graph again)."""
    with _lock:
        _all[:] = [r for r in _all if r() is not record]
        _by_index.pop(record.index, None)
        _strong_latest[:] = [r for r in _strong_latest if r is not record]
        for _, records in _by_tensor.values():
            if record in records:
                records.remove(record)


def attach(record: CompileRecord, tensors) -> None:
    """Remember that ``record`` came from a graph that used these parameters/buffers."""
    with _lock:
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                continue
            entry = _by_tensor.get(id(t))
            if entry is None or entry[0]() is not t:
                key = id(t)
                entry = (weakref.ref(t, lambda _, key=key: _by_tensor.pop(key, None)), [])
                _by_tensor[key] = entry
            if record not in entry[1]:
                entry[1].append(record)


def records_for(tensors) -> List[CompileRecord]:
    """Records of every compiled graph that used any of ``tensors``, oldest first."""
    seen: Dict[int, CompileRecord] = {}
    with _lock:
        for t in tensors:
            entry = _by_tensor.get(id(t))
            if entry is not None and entry[0]() is t:
                for rec in entry[1]:
                    seen.setdefault(rec.index, rec)
    return [seen[k] for k in sorted(seen)]


def latest_records() -> List[CompileRecord]:
    with _lock:
        return list(_strong_latest)


def stats_key(record: CompileRecord, node_name: str) -> str:
    """The key the observing ops carry to find their record again at run time."""
    return f"{record.index}:{node_name}"


# A quantized ``scaled_dot_product_attention`` runs two GEMMs; each records its statistics
# under its own part (``stats[f"{node}#{part}"]``) and gets its own report row.
SDPA_PARTS = ("QK^T", "PV")


def part_key(key: str, part: str) -> str:
    """The stats key (or node name) of one GEMM ``part`` of a multi-GEMM op."""
    return f"{key}#{part}"


FORWARD_ROLES = ("act", "norm_in")   # the quantizer every forward call of an op runs once


def observe(key: str, role: str, terms, *, bits: int, groups: Optional[int] = None, per_tensor=None,
            occupancy: Optional[List[int]] = None) -> None:
    """Record one call of a quantizer (``role``: "act", "weight", "act_b", "grad_dx",
    "grad_dw", "norm_in", "norm_grad") of the op named by ``key``: ``terms`` is its
    ``(signal, noise)`` power (:func:`sqcompile.numerics.sqnr_terms`), ``per_tensor`` the same
    for the per-tensor baseline and ``occupancy`` ShiftQuant's channel count per group.

    An op can run several times in one training step: an RNN's recurrence once per time
    step, a layer inside an activation checkpoint again in the backward pass.  ``steps``
    counts the runs of the compiled graph (training steps) in which the op ran and ``calls``
    its forward calls in the latest of them; a role's statistics pool all its calls of the
    latest step: the SQNR of the summed signal over the summed noise (the SQNR of all the
    call's tensors taken together, so a zero ``h0`` adds nothing rather than an ``inf``), the
    occupancy of the summed channel counts.  A run is :attr:`CompileRecord.last_run`, which
    the compiled graph sets when its forward starts (its backward runs under the same)."""
    index, _, node = key.partition(":")
    rec = _by_index.get(int(index))
    if rec is None:
        return
    run = rec.last_run
    with _lock:
        entry = rec.stats.setdefault(node, {"steps": 0, "calls": 0, "run": None})
        if role in FORWARD_ROLES:
            if entry["run"] != run:
                entry.update(steps=entry["steps"] + 1, calls=0, run=run)
            entry["calls"] += 1
        acc = entry.get(role)
        if acc is None or acc["run"] != run:
            acc = entry[role] = {"run": run, "bits": bits, "groups": groups, "calls": 0, "terms": [0.0, 0.0],
                                 "per_tensor_terms": [0.0, 0.0], "counts": None}
        acc["calls"] += 1
        acc["terms"] = [a + b for a, b in zip(acc["terms"], terms)]
        acc["sqnr_db"] = sqnr_from(*acc["terms"])
        if per_tensor is not None:
            acc["per_tensor_terms"] = [a + b for a, b in zip(acc["per_tensor_terms"], per_tensor)]
            acc["per_tensor_sqnr_db"] = sqnr_from(*acc["per_tensor_terms"])
        if occupancy is not None:
            counts = acc["counts"] = [a + b for a, b in zip(acc["counts"] or [0] * len(occupancy), occupancy)]
            acc["group_occupancy"] = [c / max(1, sum(counts)) for c in counts]
