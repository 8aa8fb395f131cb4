"""Decide each op's precision and execution from the config, overrides and the target.

Matches nothing by itself: the rewrite passes call :func:`op_config` for every node they
would rewrite, and :func:`choose_execution` to pick simulated / integer execution and the
kernel family.  :func:`check_overrides` warns about override patterns that match no module.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.fx as fx

from .. import ops
from ..config import Config, OpConfig, OptionError, override_matches, pattern_matches, split_override
from ..decisions import EXEC_INT8_CPU, EXEC_INT8_TORCH, EXEC_SIMULATED, EXEC_TRITON, CompileRecord
from .common import module_path, module_paths


@dataclass(frozen=True)
class Target:
    """Where the compiled graph runs and which kernel families are usable there."""

    device: str                      # "cpu" or "cuda"
    triton_ok: bool
    triton_reason: Optional[str] = None


@dataclass(frozen=True)
class Execution:
    integer: bool
    kernels: str                     # kernel family name in ops.KERNEL_SETS
    label: str                       # what the report shows
    reason: Optional[str] = None     # why simulated although integer was asked for


FLOAT_GRAPH = "sq_float_graph"
"""Key of a graph module's ``meta``: the reason every op of the graph stays float."""


def op_config(node: fx.Node, config: Config, op: str) -> Tuple[Optional[OpConfig], Optional[str]]:
    """The options for ``node`` (an op named ``op``, see :data:`~sqcompile.config.OP_NAMES`)
    in its module, or ``(None, reason)`` when overrides keep it float, or the whole graph is
    (:data:`FLOAT_GRAPH`)."""
    forced = node.graph.owning_module.meta.get(FLOAT_GRAPH) if node.graph.owning_module is not None else None
    if forced:
        return None, forced
    path = module_path(node)
    cfg = config.for_module(path, op)
    if cfg is not None:
        return cfg, None
    pattern = [p for p, v in config.overrides.items() if v is None and override_matches(p, path, op)][-1]
    return None, f"overrides[{pattern!r}] is None"


def kernel_family(cfg: OpConfig, target: Target) -> str:
    if cfg.kernels == "torch":
        return "torch"
    if cfg.kernels == "triton":
        if not target.triton_ok:
            raise OptionError(f"sqcompile option 'kernels': 'triton' is not usable here: {target.triton_reason}")
        return "triton"
    return "triton" if target.device == "cuda" and target.triton_ok else "torch"


def choose_execution(cfg: OpConfig, target: Target, integer_unsupported: Optional[str] = None) -> Execution:
    """Simulated or integer execution for one op.

    ``integer_unsupported`` is the reason the integer formulation cannot run this op (e.g. a
    grouped transposed convolution), or None.  ``execution="integer"`` then falls back to simulation and
    says why, rather than failing the whole compile: training goes on.
    """
    kernels = kernel_family(cfg, target)
    if cfg.execution == "simulate":
        return Execution(False, kernels, EXEC_SIMULATED)
    if integer_unsupported:
        return Execution(False, kernels, EXEC_SIMULATED, integer_unsupported)
    if kernels == "triton":
        return Execution(True, kernels, EXEC_TRITON)
    return Execution(True, kernels, EXEC_INT8_CPU if target.device == "cpu" else EXEC_INT8_TORCH)


def attention_fusion(cfg: OpConfig, target: Target, ex: Execution) -> bool:
    """Should a quantized ``scaled_dot_product_attention`` run as the fused Triton attention
    (before checking its operands)?  ``fused_attention=None`` fuses on CUDA only, so the
    Triton interpreter on CPU keeps the unfused ops, which are bit-exact with
    :mod:`sqcompile.numerics` (the fused kernels equal them up to float rounding)."""
    if not ex.integer or ex.kernels != "triton" or cfg.fused_attention is False:
        return False
    return cfg.fused_attention is True or target.device == "cuda"


def attention_unfused(cfg: OpConfig, target: Target, ex: Execution, config: Config, values, mask,
                      dropout_p) -> Optional[str]:
    """Why a quantized attention with example operands ``values`` (query, key, value), mask
    example ``mask`` (or None) and ``dropout_p`` does not run as the fused Triton kernels:
    ``None`` when it does, ``""`` when fusion is not wanted (:func:`attention_fusion`)."""
    if not attention_fusion(cfg, target, ex):
        if cfg.fused_attention is True and ex.integer and ex.kernels != "triton":
            # asked for by name, so say why not (on CPU, kernels="auto" is the torch family)
            return f"fused_attention=True needs the Triton kernel family, this op runs on {ex.kernels!r}"
        return ""
    if config.collect_stats:
        return "collect_stats observes each GEMM's quantizers"
    if isinstance(dropout_p, fx.Node):
        return "dropout_p is not a constant"
    return ops.fused_attention_unsupported(*values, mask, dropout_p, grad_bits=cfg.grad_bits, groups=cfg.groups)


def check_overrides(gm: fx.GraphModule, config: Config, record: CompileRecord,
                    root: Optional[torch.nn.Module] = None) -> None:
    """Warn (once per graph, after the passes recorded its ops) about override patterns that
    match no module: of ``root``, the module ``torch.compile`` was given, when known (a graph
    break splits a model into graphs that each hold some of its modules), else of this graph;
    and about ``"module:op"`` patterns whose modules are all in this graph but have no op of
    that name (``{"fc1:conv2d": None}`` on a Linear does nothing)."""
    if not config.overrides:
        return
    in_graph = module_paths(gm)
    paths = in_graph | ({name for name, _ in root.named_modules()} if root is not None else set())
    unmatched = config.unmatched_overrides(paths)
    where = f"of the compiled {type(root).__name__}" if root is not None else "in this graph"
    if unmatched:
        _warn(record, f"sqcompile option 'overrides': pattern(s) {unmatched} match no module {where} "
                      f"(module paths look like 'layer1.0.conv1'; see sqcompile.explain(model, x) for them)")
    leaves = [name for name, m in root.named_modules() if next(m.children(), None) is None] \
        if root is not None else sorted(in_graph)
    ops_here = {(d.module_path, d.op) for d in record.decisions}
    no_op = [key for key in config.overrides if key not in unmatched and split_override(key)[1] is not None
             and not any(override_matches(key, path, op) for path, op in ops_here)
             and all(path in in_graph for path in leaves if pattern_matches(split_override(key)[0], path))]
    if no_op:
        _warn(record, f"sqcompile option 'overrides': pattern(s) {no_op} match modules {where} but none of "
                      f"their ops (the op after ':' is the report's op column: linear, conv2d, matmul, "
                      f"layer_norm, ...)")


def _warn(record: CompileRecord, msg: str) -> None:
    record.warnings.append(msg)
    warnings.warn(msg, UserWarning, stacklevel=3)
