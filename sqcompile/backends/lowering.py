"""Lowering of the forward / backward ATen graphs that AOTAutograd produces.

Each graph is recorded for inspection (with the ``sqcompile.*`` ops as single nodes), then
handed to the inner compiler:

* ``"eager"``: the graph runs node by node; quantizers are the reference implementations.
* ``"inductor"``: the quantizer ops are first replaced by their definitions in
  :mod:`sqcompile.numerics` (stochastic rounding uses the counter-based
  :func:`~sqcompile.numerics.hash_noise`, which Inductor computes inside the fused loop), so
  Inductor fuses each quantizer with its
  neighbours (the gradient scaling before it, the dequantize epilogue after the int8 GEMM) into
  one pass over memory.  The int8 GEMMs stay calls of ``torch.ops.sqcompile.int8_mm``.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import operator
import os

import torch
from functorch.compile import make_boxed_func
from torch.fx import traceback as fx_traceback
from torch.fx.experimental.proxy_tensor import make_fx

from .. import numerics as N
from ..graphs import format_graph
from ..passes.common import hints
from .attention_grads import pack_attention_gradients
from .cpu_attention import fuse_attention_probs
from .cpu_quant import fuse_gelu_backwards, fuse_gelu_quantizers, fuse_gradient_quantizers
from .fusion import _contiguous, _refresh, _static, fuse_regions, int_arg, no_donation_of_aliases
from .norm_fusion import fuse_cpu_norm_quantizers, fuse_cpu_norm_residuals, fuse_norm_quantizers, fuse_norm_residuals


def _noise(x, stochastic):
    if not stochastic:
        return None
    if x.device.type == "cpu":
        seed = torch.ops.sqcompile.random_seed(x.device)
    else:   # Triton computes the inlined seed once per program: nothing to hoist
        seed = N.draw_seed(x.device)
    return N.hash_noise(x.shape, seed, x.device)


def _quantize(x, bits, keep_dims, stochastic):
    return N.quantize(x, bits, keep_dims, "stochastic" if stochastic else "nearest", _noise(x, stochastic))


def _shiftquant(x, bits, groups, channel_dims, stochastic, prescale=None):
    x = N.apply_prescale(x, prescale, channel_dims)     # fused by Inductor into both passes
    # Two passes over x: Inductor fuses the range reduction into one loop; the per-channel
    # parameters come from an opaque op, so they are computed once per channel instead of
    # being inlined (recomputed) into every element of the quantize loop.
    g, multiplier, scale, base = torch.ops.sqcompile.shift_params(N.amax(x, channel_dims), bits, groups)
    r = N.shiftquant_with_params(x, bits, groups, g, multiplier, scale, base,
                                 "stochastic" if stochastic else "nearest", _noise(x, stochastic))
    return r.expanded, r.base_scale


def _dequantize(q, scale, dtype):
    return N.dequantize(q, scale, dtype).contiguous()     # the op's layout (ops.dequantize)


def _channels_last(q):
    """``ops.channels_last`` for a fusing compiler: the quantizer that computes ``q`` writes its
    integers channels-last itself, in one loop, and they are stored.

    The copy is a clone in the permuted order, so Inductor fuses the quantizer (and whatever
    feeds it: a norm's output, a gradient's prescale) into the loop that writes it; the
    identity ``as_strided`` after it makes Inductor store that buffer (see
    :func:`materialize_integers`).  Without it the int8 values would be inlined into the
    im2col gather that reads them and recomputed once per kernel tap, as they were when
    the conv asked for a plain ``contiguous()``; kept as an opaque op, they are written by
    the quantizer and copied once more, on the host's thread, outside the fused loops."""
    c = q.movedim(1, -1).contiguous()
    return torch.ops.aten.as_strided(c, c.shape, c.stride()).movedim(-1, 1)


def quantizer_decompositions() -> dict:
    """The sqcompile quantizer ops -> their numerics definitions, for fusing compilers."""
    ops = torch.ops.sqcompile
    return {ops.quantize.default: _quantize, ops.shiftquant.default: _shiftquant,
            ops.dequantize.default: _dequantize, ops.channels_last.default: _channels_last}


# Forward GEMM FLOPs per call above which inner="auto" picks Inductor on CPU.  Inductor's
# compile (10-30 s on 2 cores) pays for itself only when the fused quantizers save more than
# that over a run: a 4096x1024x1024 Linear (8.6 GFLOP) runs 2.3x faster with it than with eager
# glue, while the tiny graphs of unit tests would spend most of their time compiling.
AUTO_INDUCTOR_MIN_FLOPS = 5e8


def inner_compiler(config, target, record) -> str:
    """"eager" or "inductor" for this graph (see the ``inner`` option)."""
    if config.inner != "auto":
        return config.inner
    if target.device == "cuda":
        return "inductor"
    flops = sum(d.flops for d in record.decisions if d.quantized)
    return "inductor" if flops >= AUTO_INDUCTOR_MIN_FLOPS else "eager"


class CudaGraphs:
    """What Inductor's cudagraph trees need from the compilers of one Dynamo graph (the
    ``cudagraphs`` option): one graph id, the forward's device, and a shared flag Inductor
    clears when the forward cannot be captured (the backward then is not either).  Computed
    the way ``torch._inductor.compile_fx`` does for its own graphs: parameters (and, in the
    backward, the tensors saved by the forward) are static inputs, not copied at each replay."""

    def __init__(self, num_dynamo_inputs: int):
        from torch._inductor import compile_fx as cfx
        from torch._inductor.utils import BoxedBool

        self.num_dynamo_inputs = num_dynamo_inputs
        self.enabled = BoxedBool(True)
        self.forward_device = cfx.BoxedDeviceIndex(None)
        self.graph_id = next(cfx._graph_counter)

    @staticmethod
    def config():
        """Inductor's own switch on while compiling: parts of Inductor read it rather than the
        ``cudagraphs`` argument, and its FX graph cache keys on it (without it, a graph cached
        by an earlier compile without CUDA graphs comes back without them, silently)."""
        from torch._inductor import config as inductor_config
        return inductor_config.patch({"triton.cudagraphs": True})

    def inner_kwargs(self, stage: str, gm, example_inputs) -> dict:
        """``compile_fx_inner`` arguments for ``gm`` (as AOTAutograd made it: the backward's
        placeholders are told apart by name)."""
        from torch._inductor import compile_fx as cfx
        from torch._inductor.utils import num_fw_fixed_arguments

        if stage == "backward":
            static = list(range(cfx.count_tangents(gm)))
        else:
            static = cfx.get_static_input_idxs(num_fw_fixed_arguments(self.num_dynamo_inputs, len(example_inputs)))
        return dict(cudagraphs=self.enabled, static_input_idxs=static, graph_id=self.graph_id,
                    boxed_forward_device_index=self.forward_device)


def compilers(config, target, record, num_dynamo_inputs: int) -> dict:
    """The compilers of AOTAutograd's forward, backward and inference graphs of one Dynamo
    graph (they share the CUDA-graph state when ``config.cudagraphs`` applies)."""
    graphs = CudaGraphs(num_dynamo_inputs) if config.cudagraphs and target.device == "cuda" else None
    return {stage: compiler(stage, config, target, record, graphs) for stage in ("forward", "backward", "inference")}


def compiler(stage: str, config, target, record, cuda_graphs: "CudaGraphs | None" = None):
    """A compiler for AOTAutograd's ``stage`` graph ("forward", "backward" or "inference")."""

    def compile_graph(gm, example_inputs):
        record.graphs[stage] = format_graph(gm)
        gm = pack_attention_gradients(gm, record, stage, config.fusion)   # fused attention writes dqkv in place
        gm = fuse_norm_residuals(gm, record, stage, config.fusion)   # norm backward adds the residual gradient
        gm = fuse_cpu_norm_residuals(gm, record, stage, config.fusion)   # the same on the CPU norm kernel
        gm = fuse_regions(gm, record, stage, config.fusion)   # Triton int8 GEMM + epilogue -> one generated kernel
        gm = fuse_norm_quantizers(gm, record, stage, config.fusion)   # L1 norm writes the GEMM's int8 input
        gm = fuse_cpu_norm_quantizers(gm, record, stage, config.fusion)   # the same on the CPU norm kernel
        record.inner = inner_compiler(config, target, record)
        gm = fuse_attention_probs(gm, record, stage, config.fusion)   # CPU attention's softmax in C
        gm = fuse_gelu_quantizers(gm, record, stage, config.fusion)   # CPU Linear's GELU + next quantizer in C
        gm = fuse_gelu_backwards(gm, record, stage, config.fusion)   # CPU GELU backward (+ bias sums) in C
        gm = fuse_gradient_quantizers(gm, record, stage, config.fusion, record.inner)   # CPU dY quantizers in C
        if stage == "forward":
            no_donation_of_aliases(gm)      # fused results saved for backward under several names
        if record.inner == "inductor":
            from torch._inductor.compile_fx import compile_fx_inner

            kwargs = {} if cuda_graphs is None else cuda_graphs.inner_kwargs(stage, gm, example_inputs)
            gm = decompose_for_inductor(gm, example_inputs)
            with contextlib.nullcontext() if cuda_graphs is None else cuda_graphs.config(), cache_tag():
                return compile_fx_inner(gm, example_inputs, is_backward=stage == "backward",
                                        is_inference=stage == "inference", **kwargs)
        return make_boxed_func(gm.forward)

    return compile_graph


@functools.lru_cache(maxsize=None)
def source_hash() -> str:
    """A hash of this package's sources (Python, C, headers)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digest = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            if name.endswith((".py", ".c", ".h")):
                digest.update(name.encode())
                with open(os.path.join(folder, name), "rb") as f:
                    digest.update(f.read())
    return digest.hexdigest()[:16]


def cache_tag():
    """Inductor's FX graph cache keyed on sqcompile's sources as well (added to
    ``torch.compiler.config.cache_key_tag``, the documented way to break caches).  The
    cache keys on the graph's code and inputs, not on what our ops do: a graph compiled
    before an op's output layout changed came back from the cache and failed its stride
    assertions at run time."""
    from torch.compiler import config as compiler_config
    return compiler_config.patch(cache_key_tag=f"{compiler_config.cache_key_tag}|sqcompile-{source_hash()}")


def decompose_for_inductor(gm, example_inputs):
    """Retrace ``gm`` with Inductor's decompositions plus the quantizer ops replaced by their
    numerics definitions (AOTAutograd ran with no decompositions, to keep the graphs readable)."""
    from torch._inductor.decomposition import select_decomp_table

    table = {**select_decomp_table(), **quantizer_decompositions()}
    fake_mode = torch._guards.detect_fake_mode(example_inputs)
    from torch._inductor.fx_passes.replace_random import replace_random_passes
    from torch._inductor.virtualized import V

    # Traced node by node with the nodes' metadata preserved, so the decomposed graph keeps
    # each op's ``original_aten`` and stack: Inductor names its kernels after them
    # (``triton_per_fused__softmax_backward_data_mul_...`` rather than ``triton_per_fused_13``),
    # which is what a profile of a compiled step shows.
    with fake_mode if fake_mode is not None else contextlib.nullcontext(), fx_traceback.preserve_node_meta():
        gm = make_fx(torch.fx.Interpreter(gm).run, decomposition_table=table)(*example_inputs)
    # what Inductor's joint-graph passes would have done: rand -> Inductor's fused RNG
    with V.set_fake_mode(fake_mode) if fake_mode is not None else contextlib.nullcontext():
        replace_random_passes(gm)
    materialize_integers(gm.graph)
    split_column_sums(gm.graph, fake_mode)
    no_symbolic_view_outputs(gm.graph)
    gm.recompile()
    return gm


def no_symbolic_view_outputs(graph: torch.fx.Graph) -> None:
    """Make every graph output whose strides are symbolic a tensor of its own, not a view.

    Inductor (2.13) orders a view output's strides with plain sympy comparisons, which fail on
    symbolic ones it cannot decide (``4*s1*s2 < 4``: a tensor ``[N, 4, H, W]`` under
    ``dynamic=True``, or after an image size changed, whose layout it prefers channels-last
    because a convolution reads it; or a ``ValueRangeError`` on the ``(H - 1)//2 + 1`` sizes
    after a strided convolution).  Our graphs make such outputs where an int8 tensor is saved
    for the backward: the identity ``as_strided`` that :func:`materialize_integers` and
    :func:`_channels_last` put after a quantizer to have it stored, and the channels-last
    operand of an integer convolution.  An identity ``as_strided`` output is replaced by the
    tensor it views (the same buffer; the graph's readers keep the view); any other view is
    copied at its strides (a multiply by 1: Inductor drops a ``clone`` as a no-op) -- an int8
    copy per such saved tensor, only when its strides are symbolic."""
    output = next(n for n in reversed(graph.nodes) if n.op == "output")

    def fix(arg):
        val = arg.meta.get("val") if isinstance(arg, torch.fx.Node) else None
        if not isinstance(val, torch.Tensor) or not _is_view(arg) or _static(val.stride()):
            return arg
        base = arg.args[0] if arg.target is torch.ops.aten.as_strided.default else None
        base_val = base.meta.get("val") if isinstance(base, torch.fx.Node) else None
        if isinstance(base_val, torch.Tensor) and not _is_view(base) and base.op != "placeholder" \
                and base_val.shape == val.shape and base_val.stride() == val.stride():
            return base
        with graph.inserting_before(output):    # not a clone: Inductor removes those as no-ops
            copy = graph.call_function(torch.ops.aten.mul.Tensor, (arg, 1))
        copy.meta = dict(arg.meta)
        copy.meta["val"] = val.clone()
        return copy

    output.args = torch.fx.node.map_arg(output.args, fix)


def _is_view(node: torch.fx.Node) -> bool:
    """Does ``node`` call a view op (its result aliases its input)?  Decided by the op's
    schema: the fake values of our identity ``as_strided`` nodes do not say so."""
    return node.op == "call_function" and bool(getattr(node.target, "is_view", False))


COLUMN_SUM_CHUNK = 64
"""Rows per partial sum in :func:`split_column_sums` (64 ran fastest of 64 and 256)."""


def split_column_sums(graph: torch.fx.Graph, fake_mode=None) -> int:
    """On CPU, sum a tall tensor over its leading dims in two steps: chunks of
    :data:`COLUMN_SUM_CHUNK` rows first, then the chunks' sums.

    Such sums are the gradients of every bias and norm weight (``dY.sum(0)`` over the tokens;
    the L1 norm's ``weight`` / ``bias`` sums of its quantized gradient).  Inductor's CPU code
    walks the whole height of the tensor for each block of 16 columns, a strided pass that
    misses the cache on every row; over chunks of 64 rows the walk stays in the cache and the
    chunks run in parallel.  Measured on one core, a ``[8192, 1024]`` float32 column sum: 6.7 ms
    in one step, 1.6 ms in two (eager PyTorch: 2.3 ms).  The sum's float order changes
    (within chunks, then across them), as any reduction order does.

    With symbolic rows (``dynamic=True``; the columns static) the chunks are the first
    ``rows // 64 * 64`` rows and the rest is summed on its own and added last, for every
    row count (no guard); taken when the rows' hint is a split static sum's (a ``[4096,
    1536]`` sum under ``dynamic=True``: 4.6 ms in one step, 1.4 ms in two, one core).
    Returns how many sums were split."""
    aten, chunk, split = torch.ops.aten, COLUMN_SUM_CHUNK, 0
    for node in list(graph.nodes):
        if node.target is not aten.sum.dim_IntList or len(node.args) < 2 or not node.args[1]:
            continue
        x = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
        out = node.meta.get("val")
        if not isinstance(x, torch.Tensor) or not isinstance(out, torch.Tensor) or x.device.type != "cpu" \
                or not x.dtype.is_floating_point or not _contiguous(x):
            continue
        dims = sorted(d % x.dim() for d in node.args[1])
        lead = len(dims)
        rows, cols = math.prod(x.shape[:lead]), math.prod(x.shape[lead:])
        hint = hints([rows])
        if dims != list(range(lead)) or lead == x.dim() or not isinstance(cols, int) or cols < 16 or \
                hint is None or hint[0] < 4 * chunk:
            continue
        if isinstance(rows, int):
            if rows % chunk:
                continue
            steps = _chunk_sums(graph, node, [node.args[0]], [rows // chunk, chunk, cols], fake_mode)
        else:
            rows_node = int_arg(graph, rows, node)
            if rows_node is None:
                continue        # a row count the graph cannot compute
            with graph.inserting_before(node):
                count = graph.call_function(operator.floordiv, (rows_node, chunk))
                head = graph.call_function(operator.mul, (count, chunk))
                flat = graph.call_function(aten.view.default, (node.args[0], [rows_node, cols]))
                top = graph.call_function(aten.slice.Tensor, (flat, 0, 0, head))
                rest = graph.call_function(aten.slice.Tensor, (flat, 0, head, rows_node))
            count.meta["val"] = rows // chunk
            head.meta["val"] = count.meta["val"] * chunk
            for step in (flat, top, rest):
                _refresh(step, fake_mode)
            steps = [flat, top, rest] + _chunk_sums(graph, node, [top, rest], [count, chunk, cols], fake_mode)
        node.replace_all_uses_with(steps[-1])
        graph.erase_node(node)
        split += 1
    return split


def _chunk_sums(graph: torch.fx.Graph, node: torch.fx.Node, parts, chunked, fake_mode=None) -> list:
    """The nodes, inserted before the column ``sum`` ``node``, that sum ``parts[0]`` viewed
    as ``chunked`` ``[chunks, chunk, cols]`` over each chunk, then over the chunks, add the
    column sums of the rest (``parts[1]``, if given) and view the result as ``node``'s."""
    aten = torch.ops.aten
    with graph.inserting_before(node):
        steps = [graph.call_function(aten.view.default, (parts[0], chunked))]
        steps.append(graph.call_function(aten.sum.dim_IntList, (steps[-1], [1]), dict(node.kwargs)))
        steps.append(graph.call_function(aten.sum.dim_IntList, (steps[-1], [0])))
        if len(parts) > 1:
            steps.append(graph.call_function(aten.sum.dim_IntList, (parts[1], [0]), dict(node.kwargs)))
            steps.append(graph.call_function(aten.add.Tensor, (steps[-2], steps[-1])))
        steps.append(graph.call_function(aten.view.default, (steps[-1], list(node.meta["val"].shape))))
    for step in steps:
        step.meta = {k: v for k, v in node.meta.items() if k != "val"}
        _refresh(step, fake_mode)
    return steps


_DEQUANTIZE_STEPS = (torch.ops.prims.convert_element_type.default, torch.ops.aten.mul.Tensor)


def _readers(q: torch.fx.Node) -> int:
    """How many nodes read ``q``'s values: a dequantize (the conversion to float, then single-use
    scale multiplies or conversions) counts as the readers of its result."""
    count = 0
    for user in q.users:
        if user.target is not torch.ops.prims.convert_element_type.default:
            count += 1
            continue
        node = user
        while len(node.users) == 1:
            step = next(iter(node.users))
            if step.target not in _DEQUANTIZE_STEPS or step.args[0] is not node:
                break
            node = step
        count += len(node.users)
    return count


def materialize_integers(graph: torch.fx.Graph) -> int:
    """Have a fusing compiler store each int8 tensor that the graph computes and reads more
    than once -- not the float32 values it is converted from, nor its dequantization.

    A quantizer computed in the graph (the stochastically rounded gradient in an L1 norm's
    backward) is dequantized and read by several loops: the norm's row reductions and its
    ``weight`` / ``bias`` gradients' column sums.  Inductor keeps in memory a value whose
    expression grows past its size limit (the rounding noise's hash does) and reads it back
    where it is used, and that value was the float32 one before the int8 conversion: 4 bytes
    an element written and read twice (the CPU norm's backward stored the whole quantized
    gradient so).  An identity ``as_strided`` after the int8 conversion makes Inductor store
    the int8 tensor (1 byte an element); the float32 value then lives only inside the loop
    that converts it.  Returns how many tensors were so marked."""
    marked = 0
    for q in list(graph.nodes):
        if q.target is not torch.ops.prims.convert_element_type.default or q.args[1] is not torch.int8 \
                or not isinstance(q.args[0], torch.fx.Node) or q.args[0].op == "placeholder" \
                or not isinstance(q.meta.get("val"), torch.Tensor) or not _contiguous(q.meta["val"]) \
                or _readers(q) < 2:
            continue
        users = list(q.users)
        first = next(n for n in graph.nodes if n in q.users)
        val = q.meta["val"]
        # sizes and strides: ints, or nodes computing them from q's own symbolic sizes
        if any(int_arg(graph, v, first, emit=False) is None for v in (*val.shape, *val.stride())):
            continue
        layout = [[int_arg(graph, v, first) for v in values] for values in (val.shape, val.stride())]
        with graph.inserting_before(first):
            kept = graph.call_function(torch.ops.aten.as_strided.default, (q, *layout))
        kept.meta = dict(q.meta)
        for user in users:
            user.replace_input_with(q, kept)
        marked += 1
    return marked
