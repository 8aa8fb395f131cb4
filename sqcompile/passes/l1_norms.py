"""Replace BatchNorm / LayerNorm / GroupNorm / InstanceNorm / RMSNorm nodes by fully-quantized L1 norms.

Matches ``F.batch_norm``, ``F.layer_norm``, ``F.group_norm``, ``F.instance_norm`` and
``F.rms_norm`` / ``torch.rms_norm`` in Dynamo's graph and calls the matching
:mod:`sqcompile.norms` function with the node's own arguments, so BatchNorm and InstanceNorm
keep updating the module's own running-stat buffers (``state_dict`` keys and meaning are
unchanged; see :func:`sqcompile.norms.l1_batch_norm` for what ``running_var`` holds).

``eps`` is passed as the node has it (a number, ``None`` for RMSNorm's dtype default, or under
``dynamic=True`` a graph input): the L1 norm puts it under the root as the L2 norm does,
``sqrt(sigma**2 + eps)`` (see :mod:`sqcompile.norms`).

With the ``"triton"`` kernel family (``kernels="triton"``, or ``"auto"`` on CUDA), LayerNorm
and RMSNorm run on the one-kernel Triton L1 norm (:mod:`sqcompile.kernels.triton_norm`) when
:func:`sqcompile.norms.triton_unsupported` allows (float32/bfloat16/float16 rows of at most
8192 elements, quantized, no ``collect_stats``); their decision says ``triton``, or why not.
BatchNorm, GroupNorm and InstanceNorm stay on the torch implementation.

``norm="keep"`` (globally or per module through ``overrides``) leaves a norm as it is.
"""
from __future__ import annotations

import math
from typing import Optional

import torch.fx as fx

from .. import norms
from ..config import Config
from ..decisions import EXEC_FLOAT, EXEC_SIMULATED, EXEC_TRITON, CompileRecord, OpDecision, stats_key
from .common import bind, call_name, example_value, is_float_tensor, module_path, shape_of
from .precision import Target, kernel_family, op_config

_NORMS = {
    "batch_norm": (norms.l1_batch_norm,
                   ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
                   {"running_mean": None, "running_var": None, "weight": None, "bias": None, "training": False,
                    "momentum": 0.1, "eps": 1e-5}),
    "layer_norm": (norms.l1_layer_norm, ("input", "normalized_shape", "weight", "bias", "eps"),
                   {"weight": None, "bias": None, "eps": 1e-5}),
    "group_norm": (norms.l1_group_norm, ("input", "num_groups", "weight", "bias", "eps"),
                   {"weight": None, "bias": None, "eps": 1e-5}),
    "instance_norm": (norms.l1_instance_norm,
                      ("input", "running_mean", "running_var", "weight", "bias", "use_input_stats", "momentum", "eps"),
                      {"running_mean": None, "running_var": None, "weight": None, "bias": None,
                       "use_input_stats": True, "momentum": 0.1, "eps": 1e-5}),
    "rms_norm": (norms.l1_rms_norm, ("input", "normalized_shape", "weight", "eps"), {"weight": None, "eps": None}),
}


def l1_norms(gm: fx.GraphModule, config: Config, target: Target, record: CompileRecord) -> fx.GraphModule:
    for node in list(gm.graph.nodes):
        name = call_name(node)
        if name in _NORMS:
            _rewrite(gm, node, name, config, target, record)
    gm.graph.lint()
    gm.recompile()
    return gm


def _rewrite(gm: fx.GraphModule, node: fx.Node, name: str, config: Config, target: Target,
             record: CompileRecord) -> None:
    fn, names, defaults = _NORMS[name]
    args = bind(node, names, defaults)
    cfg, override_reason = op_config(node, config, name)
    decision = _decision(node, name)
    if cfg is None or cfg.norm == "keep" or not is_float_tensor(args["input"]):
        if cfg is None:
            decision.reason = override_reason
        elif cfg.norm == "keep":
            decision.reason = "norm='keep'"
        else:
            decision.reason = "input is not a floating-point tensor"
        record.add(decision)
        return

    positional = tuple(args[k] for k in names)
    bits = cfg.norm_bits if cfg.quantize else None        # quantize=False: float L1 norm
    kwargs = {"l1_scale": cfg.l1_scale, "norm_bits": bits, "grad_bits": bits}
    if config.collect_stats and bits is not None:
        kwargs["stats"] = stats_key(record, node.name)
    triton_why = _triton_rows(name, args, cfg, target, bits, kwargs.get("stats"))
    on_cpu_kernels = triton_why == "" and _cpu_kernels(name, args, cfg, target, bits, kwargs.get("stats"),
                                                       config.fusion)
    if triton_why is None:
        kwargs["kernels"] = "triton"
    elif on_cpu_kernels:
        kwargs["kernels"] = "cpu"
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(fn, positional, kwargs)
    new.meta.update(node.meta)
    new.meta["sq_decision"] = decision
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)

    decision.replacement = fn.__name__
    if bits is None:
        decision.reason = "quantize=False (float L1 norm)"
        record.add(decision)
        return
    decision.quantized = True
    decision.execution = EXEC_TRITON if triton_why is None else EXEC_SIMULATED
    if triton_why:
        decision.reason = f"not on the Triton kernels: {triton_why}"
    if on_cpu_kernels:
        decision.note = _join(decision.note, CPU_KERNEL_NOTE)
    decision.norm_bits = cfg.norm_bits
    decision.act_bits = cfg.norm_bits
    decision.act_quantizer = "per-slice, nearest"
    decision.grad_bits = cfg.norm_bits
    decision.grad_quantizer = "per-slice, stochastic"
    record.add(decision)


def _triton_rows(name: str, args: dict, cfg, target: Target, bits, stats) -> Optional[str]:
    """``None`` when the norm runs on the Triton L1-norm kernels (LayerNorm / RMSNorm kinds,
    kernel family ``"triton"``); else why not (``""`` when the family is not Triton at all)."""
    if name not in ("layer_norm", "rms_norm") or kernel_family(cfg, target) != "triton":
        return ""
    x = example_value(args["input"])
    shape = args["normalized_shape"]
    shape = [shape] if isinstance(shape, int) else list(shape)
    if x is None or not all(isinstance(s, int) for s in shape):
        return "the row length is not static"
    return norms.triton_unsupported(x.dtype, math.prod(shape), bits, stats)


CPU_KERNEL_NOTE = "batch statistics on the CPU L1-norm kernels (kernels/cpu_norm.c)"


def _cpu_kernels(name: str, args: dict, cfg, target: Target, bits, stats, fusion: Optional[bool]) -> bool:
    """Whether the norm runs on the C kernels of :mod:`sqcompile.kernels.cpu_norm`: any L1
    norm of the torch kernel family on CPU that :func:`sqcompile.norms.cpu_kernel_unsupported`
    allows (a GroupNorm's per-channel affine, channels-last inputs, symbolic sizes, ... keep the
    graph's ops), a LayerNorm / RMSNorm only with ``fusion`` on.

    Decision: a LayerNorm's output feeds the next Linear's per-row quantizer, and its input
    gradient a residual add.  As graph ops Inductor fuses the norm with both; as the bare
    kernel (1.26-1.31x faster alone) the norm wrote its output for the quantizer to read
    again, and the transformer of ``benchmarks/train_step.py`` trained 4% slower (A/B,
    2026-12-01).  With fusion on, :mod:`sqcompile.backends.norm_fusion` hands the kernel the
    quantizer and the residual add (``l1_norm+quantize``, ``l1_norm_backward+residual``);
    with ``fusion=False`` LayerNorm / RMSNorm stay on the ops."""
    if target.device != "cpu" or kernel_family(cfg, target) != "torch":
        return False
    row = name in ("layer_norm", "rms_norm")
    if row:
        from ..backends import fusion as F
        if not F.enabled(fusion):
            return False
    x = example_value(args["input"])
    params = [example_value(args[k]) if args.get(k) is not None else None for k in ("weight", "bias")]
    if x is None or any(args.get(k) is not None and p is None for k, p in zip(("weight", "bias"), params)):
        return False
    extra = {"num_groups": args["num_groups"]} if name == "group_norm" else \
        {"normalized_shape": args["normalized_shape"]} if row else {}
    return norms.cpu_kernel_unsupported(name, x, *params, bits, stats, **extra) is None


def _join(note: Optional[str], more: str) -> str:
    return more if not note else f"{note}; {more}"


def _decision(node: fx.Node, name: str, reason=None) -> OpDecision:
    inp = node.args[0] if node.args else node.kwargs.get("input")
    shape = shape_of(inp)
    return OpDecision(node=node.name, module_path=module_path(node), op=name, kind="norm",
                      shapes=[shape] if shape else [], execution=EXEC_FLOAT, reason=reason,
                      note=node.meta.get("sq_note"))    # set by passes.rms_norm for RMSNorm written out
