"""The ``shiftquant`` torch.compile backend: the whole pipeline, top to bottom.

1. Capture: Dynamo hands us a torch-level FX graph and example inputs.
2. Rewrite: composite ops that hide GEMMs in one call (multi-head attention, tensordot, inner,
   multi_dot, chain_matmul, RNN cells) and the vector products (mv, dot, addmv, addbmm) are
   split into linear / attention / matmul / einsum nodes
   (:mod:`sqcompile.passes.composite`); attention written as matmuls and a softmax becomes one
   attention node where the fused integer attention will run it (:mod:`sqcompile.passes.attention`),
   RMSNorm written out becomes one ``rms_norm`` node (:mod:`sqcompile.passes.rms_norm`); matmul/conv nodes
   become quantized ops (:mod:`sqcompile.passes.quantize_gemms`), norms become L1 norms
   (:mod:`sqcompile.passes.l1_norms`); every decision is recorded.
3. Autograd: AOTAutograd traces the rewritten graph into forward and backward ATen graphs in
   which ``sqcompile::quantize`` / ``shiftquant`` / ``int8_mm`` stay single nodes and the
   tensors saved for backward are the int8 ones.
4. Lowering: each ATen graph is lowered (:mod:`sqcompile.backends.lowering`) and handed to the
   inner compiler (eager, or Inductor).
"""
from __future__ import annotations

import sys
import warnings
from typing import Any, List, Mapping, Optional

import torch
import torch.fx as fx
from torch._dynamo.backends.common import aot_autograd

from .. import kernels  # noqa: F401  (registers CPU / Triton implementations of the ops)
from ..config import Config, OptionError
from ..decisions import RUNS, CompileRecord, attach, discard, new_record
from ..graphs import format_graph
from ..passes import (check_overrides, composite_gemms, explicit_attention, explicit_rms_norm, l1_norms,
                      quantize_gemms)
from ..passes.common import anchor_module_paths, subgraph_of
from ..passes.precision import FLOAT_GRAPH, Target
from . import fusion, lowering

BACKEND_NAME = "shiftquant"

# torch.compile's ``mode=`` (which torch hands a custom backend as a ``mode`` keyword) -> the
# options it means here.  The Triton kernels autotune in every mode; what the Inductor modes
# add beyond that is CUDA graphs, which is this backend's ``cudagraphs`` option.
MODES = {
    "default": {},
    "reduce-overhead": {"cudagraphs": True},
    "max-autotune": {"cudagraphs": True},
    "max-autotune-no-cudagraphs": {},
}


def shiftquant_backend(gm: fx.GraphModule, example_inputs: List[Any], options: Optional[Mapping[str, Any]] = None,
                       mode: Optional[str] = None, **kwargs):
    """``torch.compile(model, backend="shiftquant", options={...})`` lands here.

    ``options`` (or keyword arguments, when called directly) are :class:`sqcompile.Config`
    fields; unknown names or bad values raise ``ValueError`` naming the option.
    ``torch.compile(model, backend="shiftquant", mode=...)`` takes Inductor's mode names
    (:data:`MODES`): ``"reduce-overhead"`` and ``"max-autotune"`` turn on ``cudagraphs``
    (no effect on CPU), the others change nothing; what ``options`` set themselves wins (torch
    refuses both at once; a :class:`~sqcompile.Config` passed directly is taken as it is).
    """
    given = options       # the object torch.compile(options=...) holds: report(compiled) finds it
    if kwargs:
        options = {**(options or {}), **kwargs}
    if mode is not None:
        if mode not in MODES:
            raise OptionError(f"unknown torch.compile mode={mode!r} for backend={BACKEND_NAME!r}; "
                              f"one of {sorted(MODES)}")
        if not isinstance(options, Config):
            options = {**MODES[mode], **(options or {})}
    try:
        config = Config.from_options(options)
    except ValueError as e:
        raise OptionError(str(e)) from None
    record = new_record(config, options_id=None if given is None else id(given))
    attach(record, [t for t in example_inputs if isinstance(t, torch.Tensor)])
    target = detect_target(example_inputs)
    hint = cudagraphs_hint(config, target)
    if hint and not _HINTED:
        _HINTED.append(hint)
        warnings.warn(hint, stacklevel=2)
    rewrite(gm, config, target, record)
    compile_stage = lowering.compilers(config, target, record, len(example_inputs))
    try:
        with fusion.enabled_as(config.fusion):     # read while the graphs are traced (ops._epilogue_in_gemm)
            compiled = aot_autograd(
                fw_compiler=compile_stage["forward"],
                bw_compiler=compile_stage["backward"],
                inference_compiler=compile_stage["inference"],
                keep_inference_input_mutations=True,
            )(gm, example_inputs)
    except torch._dynamo.exc.RestartAnalysis:
        # Dynamo traces the frame again and calls the backend anew (under dynamic=True a
        # norm's eps is first a float graph input, which AOTAutograd specializes): this
        # graph never runs, so the report must not show it next to the one that does
        discard(record)
        raise
    return _attaching(compiled, record)


def _attaching(compiled, record: CompileRecord):
    """Dynamo reuses a compiled graph for another instance of the same module class (its
    parameters are graph inputs), without calling the backend again; attach the record to the
    tensors each call really receives, so ``sqcompile.report(model)`` finds it for every
    instance, and note when it ran (of two graphs of one module, e.g. Dynamo's recompile for
    ``eval()`` and the training graph it goes back to, the report shows the one that ran
    last).  Costs one tuple of ids and one counter step per call."""
    last = [None]

    def run(*args):
        key = tuple(map(id, args))
        if key != last[0]:
            attach(record, args)
            last[0] = key
        record.last_run = next(RUNS)      # report() shows the graph of a module that ran last
        return compiled(*args)

    run._boxed_call = getattr(compiled, "_boxed_call", False)
    return run


def rewrite(gm: fx.GraphModule, config: Config, target: Target, record: CompileRecord) -> fx.GraphModule:
    """Run the rewrite passes in order, keeping the graph before and after."""
    graphs = [gm, *subgraphs(gm)]
    root = compiled_root()
    anchor_module_paths(graphs, root)
    transform = functorch_transform(graphs)
    if transform:
        for graph in graphs:
            graph.meta[FLOAT_GRAPH] = (f"inside torch.func.{transform}: sqcompile's quantized autograd functions "
                                       f"do not support torch.func transforms")
    record.graphs["dynamo"] = _format_graphs(gm, graphs)
    order = {node.name: i for i, node in enumerate(_execution_order(gm))}
    for graph in graphs:
        composite_gemms(graph, config, target, record)
    for graph in graphs:
        explicit_attention(graph, config, target, record)
        explicit_rms_norm(graph)
        quantize_gemms(graph, config, target, record)
        l1_norms(graph, config, target, record)
    check_overrides(gm, config, record, root)
    _gradient_free(graphs)
    # graph order; a GEMM split off a composite op is named "<its node>#<part>"
    record.decisions.sort(key=lambda d: order.get(d.node.partition("#")[0], len(order)))
    record.graphs["rewritten"] = _format_graphs(gm, graphs)
    return gm


def functorch_transform(graphs: List[fx.GraphModule]) -> Optional[str]:
    """The ``torch.func`` transform (``grad``, ``vmap``, ``jvp``, ...) a graph traced through, if any:
    Dynamo inlines each as calls that enter and leave its level (``_grad_increment_nesting``)."""
    for graph in graphs:
        for node in graph.graph.nodes:
            name = getattr(node.target, "__name__", "") if node.op == "call_function" else ""
            if name.endswith("_increment_nesting"):
                return name.lstrip("_").partition("_")[0]
    return None


def compiled_root() -> Optional[torch.nn.Module]:
    """The module ``torch.compile`` was given, whose call is compiling this graph: the
    innermost caller's frame whose ``self`` is a ``torch.compile``-d module (its ``_orig_mod``)
    or a module compiled in place (``module.compile()``); None when a function was compiled.
    Read off the Python stack, since Dynamo hands the backend only the frame's graph.  A
    ``DistributedDataParallel`` / ``DataParallel`` wrapper stands for the module it wraps
    (paths are ``fc1``, not ``module.fc1``, as Dynamo's own are: it compiles the wrapped
    module's ``forward``)."""
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, torch.nn.Module):
            if isinstance(owner, torch._dynamo.eval_frame.OptimizedModule):
                owner = owner._orig_mod
            elif getattr(owner, "_compiled_call_impl", None) is None:
                owner = None
            if owner is not None:
                wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
                return owner.module if isinstance(owner, wrappers) else owner
        frame = frame.f_back
    return None


def _gradient_free(graphs: List[fx.GraphModule]) -> None:
    """An op whose result needs no gradient (its parameters frozen and its inputs needing
    none, as in the first layers of a fine-tuned model, or a graph traced under ``no_grad``)
    runs no gradient quantizer: its decision says so instead of describing quantizers that
    never run (the report's gradient column shows ``-``)."""
    for graph in graphs:
        for node in graph.graph.nodes:
            d, value = node.meta.get("sq_decision"), node.meta.get("example_value")
            if d is not None and d.quantized and isinstance(value, torch.Tensor) and not value.requires_grad:
                d.grad_bits = d.grad_quantizer = d.groups = None
                d.note = "; ".join(t for t in (d.note, "no gradient flows through it (frozen parameters and "
                                                          "inputs, or a graph compiled under no_grad)") if t)


def _format_graphs(gm: fx.GraphModule, graphs: List[fx.GraphModule]) -> str:
    """The graph, then each subgraph under a ``# <attribute>:`` line."""
    names = {id(sub): name for name, sub in gm.named_modules() if isinstance(sub, fx.GraphModule)}
    return "\n".join([format_graph(gm)] + [f"\n# {names.get(id(g), 'subgraph')}:\n{format_graph(g)}" for g in graphs[1:]])


def _execution_order(gm: fx.GraphModule):
    """``gm``'s nodes with each subgraph's nodes where the higher-order op that runs it is."""
    for node in gm.graph.nodes:
        for arg in node.args:
            sub = subgraph_of(gm, arg)
            if sub is not None:
                yield from _execution_order(sub)
        yield node


def subgraphs(gm: fx.GraphModule) -> List[fx.GraphModule]:
    """The graph modules that ``gm``'s higher-order ops run (the body of an activation
    checkpoint, ``torch.utils.checkpoint(..., use_reentrant=False)``, or of a ``wrap``), nested
    ones too.  Their ops are rewritten like the rest (AOTAutograd traces the bodies, and a
    checkpoint's recomputation runs the quantized forward again, deterministically: forward
    quantizers round to nearest).  A body's nodes are renamed ``<attribute>_<name>`` first, so
    the decisions (and the statistics keys) of every graph in one record stay distinct."""
    found = []
    for node in gm.graph.nodes:
        sub = subgraph_of(gm, node)
        if sub is not None and all(sub is not f for f in found):
            prefix = str(node.target).replace(".", "_")
            for n in sub.graph.nodes:
                if n.op != "output" and not n.name.startswith(prefix + "_"):
                    n._rename(f"{prefix}_{n.name}")
            sub.recompile()
            found += [sub, *subgraphs(sub)]
    return found


_HINTED: List[str] = []      # the CUDA-graph hint is given once per process


def cudagraphs_hint(config: Config, target: Target) -> Optional[str]:
    """The hint a CUDA compile without ``cudagraphs=True`` gets (``None`` where it does not
    apply): launched from Python, a training step of many small quantizer and GEMM kernels is
    bound by the host, not by the GPU.  A warning rather than a changed default, since CUDA
    graphs change what a call returns (its outputs are overwritten by the next replay), as
    with ``mode="reduce-overhead"``."""
    if target.device != "cuda" or config.cudagraphs or config.collect_stats or config.inner == "eager":
        return None
    return ("sqcompile on CUDA without options={'cudagraphs': True}: each step launches its quantizer and "
            "GEMM kernels from Python and is bound by that host time (an H200 ran a transformer block's "
            "training step at 0.15x bf16 so, 0.49x with CUDA graphs). With cudagraphs=True, as with "
            "mode='reduce-overhead', a call's outputs are overwritten by the next replay; see the README's "
            "'cudagraphs' option.")


def detect_target(example_inputs) -> Target:
    devices = {t.device.type for t in example_inputs if isinstance(t, torch.Tensor)}
    device = "cuda" if "cuda" in devices else "cpu"
    ok, reason = kernels.triton_status(device)
    return Target(device=device, triton_ok=ok, triton_reason=reason)


def register() -> None:
    """Make ``backend="shiftquant"`` resolve after ``import sqcompile``.

    The ``torch_dynamo_backends`` entry point does the same without importing us; when Dynamo
    is loading us through that entry point it registers the function itself, so we must not.
    """
    from torch._dynamo.backends import registry

    if BACKEND_NAME in registry._COMPILER_FNS or registry._BACKENDS.get(BACKEND_NAME) is not None:
        return
    registry.register_backend(shiftquant_backend, name=BACKEND_NAME)
