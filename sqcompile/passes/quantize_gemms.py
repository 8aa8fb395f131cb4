"""Replace matrix products and convolutions by their quantized versions.

Matches (Dynamo's torch-level graph): ``linear``, ``matmul`` / ``@`` / ``x.matmul``, ``mm``,
``bmm``, ``addmm``, ``baddbmm``, two-operand ``einsum``, ``conv1d/2d/3d``,
``conv_transpose1d/2d/3d`` and
``scaled_dot_product_attention`` (rewritten in math form so ``QK^T`` and ``PV`` are quantized)
and the recurrent layers ``lstm``, ``gru``, ``rnn_tanh``, ``rnn_relu`` (unrolled).
Each becomes a call of the matching ``sqcompile.ops.quantized_*`` function with the node's
bits, groups and execution as plain keyword arguments, so the rewritten graph prints what was
chosen.  Ops that cannot be quantized (embeddings, ``bilinear``, PyTorch's fused
transformer inference kernels, integer operands, einsum with more than two operands) stay as
they are and get a "float: <reason>" decision with their FLOPs.  Composite ops that hide their
GEMMs inside one call (multi-head attention, ``tensordot``, ``inner``, ``multi_dot``,
``chain_matmul``, RNN cells) or that have no node of their own here (``mv``, ``dot``,
``addmv``, ``addbmm``) were
split into these ops before (:mod:`sqcompile.passes.composite`); a node that carries
``meta["sq_name"]`` is recorded under that name (``<original node>#<part>``) and one with
``meta["sq_note"]`` says where it came from.
"""
from __future__ import annotations

from typing import Optional

import torch.fx as fx

from .. import ops
from ..config import Config, act_groups_for
from ..decisions import EXEC_FLOAT, CompileRecord, OpDecision, stats_key
from .common import (bind, call_name, example_value, is_float_tensor, is_parameter, module_path, numel, shape_of,
                     size_hints)
from .precision import Target, attention_unfused, choose_execution, op_config
from .signs import activation_bits, unsigned_bits

_MM_NAMES = {"matmul": ("input", "other"), "mm": ("input", "mat2"), "bmm": ("input", "mat2")}
_ADDMM_NAMES = {"addmm": ("input", "mat1", "mat2"), "baddbmm": ("input", "batch1", "batch2")}
_CONV = {"conv1d": 1, "conv2d": 2, "conv3d": 3}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
_CONV_T = {"conv_transpose1d": 1, "conv_transpose2d": 2, "conv_transpose3d": 3}
_CONV_T_ARGS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
_CONV_T_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "output_padding": 0, "groups": 1, "dilation": 1}
_CONVS = {**_CONV, **_CONV_T}
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
_FLOAT_ONLY = {
    "embedding": "embedding lookups gather rows, they are not GEMMs; the table stays float",
    "embedding_bag": "embedding-bag lookups gather and sum rows, they are not dense GEMMs; the table stays float",
    "bilinear": "bilinear forms (x1^T A x2) are not quantized",
    "_transformer_encoder_layer_fwd": (
        "PyTorch's fused inference kernel of nn.TransformerEncoderLayer (eval and no_grad); "
        "torch.backends.mha.set_fastpath_enabled(False) before compiling makes its GEMMs quantizable"),
    "_native_multi_head_attention": (
        "PyTorch's fused inference kernel of nn.MultiheadAttention (eval and no_grad); "
        "torch.backends.mha.set_fastpath_enabled(False) before compiling makes its GEMMs quantizable"),
}
_RNN_ARGS = ("input", "hx", "params", "has_biases", "num_layers", "dropout", "train", "bidirectional", "batch_first")
GEMM_NAMES = {"linear", *(_MM_NAMES), *(_ADDMM_NAMES), "einsum", *(_CONVS), "scaled_dot_product_attention",
              *ops.RNN_MODES}


def quantize_gemms(gm: fx.GraphModule, config: Config, target: Target, record: CompileRecord) -> fx.GraphModule:
    for node in list(gm.graph.nodes):
        name = call_name(node)
        if name in _FLOAT_ONLY:
            record.add(_decision(node, name, reason=_FLOAT_ONLY[name]))
        elif name in GEMM_NAMES:
            _rewrite(gm, node, name, config, target, record)
    gm.graph.lint()
    gm.recompile()
    return gm


def _rewrite(gm, node: fx.Node, name: str, config: Config, target: Target, record: CompileRecord) -> None:
    if name == "einsum":
        equation, operands = node.args[0], list(node.args[1:])
        if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
            operands = list(operands[0])
        parsed = ops.parse_einsum(equation, len(operands)) if isinstance(equation, str) else "non-constant equation"
        args = {"equation": equation, "a": operands[0] if operands else None, "b": operands[1] if len(operands) > 1 else None}
        unsupported = parsed if isinstance(parsed, str) else None
        tensors = operands
    elif name == "linear":
        args = bind(node, ("input", "weight", "bias"), {"bias": None})
        tensors, unsupported = [args["input"], args["weight"]], None
    elif name in _MM_NAMES:
        a, b = _MM_NAMES[name]
        args = bind(node, ("self", *_MM_NAMES[name][1:]), {}) if node.op == "call_method" else bind(node, (a, b), {})
        args = {"a": list(args.values())[0], "b": list(args.values())[1]}
        tensors, unsupported = [args["a"], args["b"]], None
    elif name in _ADDMM_NAMES:
        names = _ADDMM_NAMES[name]
        if node.op == "call_method":
            names = ("self", *names[1:])
        raw = bind(node, names, {"beta": 1, "alpha": 1})
        args = {"inp": raw[names[0]], "a": raw[names[1]], "b": raw[names[2]], "beta": raw["beta"], "alpha": raw["alpha"]}
        tensors, unsupported = [args["a"], args["b"]], None
    elif name in _CONVS:
        transposed = name in _CONV_T
        args = bind(node, *((_CONV_T_ARGS, _CONV_T_DEFAULTS) if transposed else (_CONV_ARGS, _CONV_DEFAULTS)))
        tensors = [args["input"], args["weight"]]
        unsupported = ops.integer_conv_supported(_CONVS[name], args["groups"], transposed, args["stride"],
                                                 args.get("output_padding"), target.device)
    elif name in ops.RNN_MODES:
        args = bind(node, _RNN_ARGS, {})
        params = list(args["params"]) if isinstance(args["params"], (list, tuple)) else []
        tensors = [args["input"], params[0] if params else None]
        unsupported = ops.rnn_unsupported(name, params, args["has_biases"], args["num_layers"], args["bidirectional"])
    else:  # scaled_dot_product_attention
        args = bind(node, _SDPA_ARGS, _SDPA_DEFAULTS)
        tensors, unsupported = [args["query"], args["key"], args["value"]], None

    decision = _decision(node, name, tensors)
    float_reason = _float_reason(tensors)
    if (name == "einsum" or name in ops.RNN_MODES) and unsupported:
        float_reason = unsupported
    cfg, override_reason = op_config(node, config, name)
    if cfg is not None and not cfg.quantize:
        override_reason = "quantize=False"
    if float_reason or cfg is None or not cfg.quantize:
        decision.reason = float_reason or override_reason
        record.add(decision)
        return

    ex = choose_execution(cfg, target, unsupported if name in _CONVS else None)
    weighty = name in ("linear", *ops.RNN_MODES, *_CONVS) or is_parameter(tensors[1])
    # activations that are non-negative by construction are quantized unsigned (passes.signs);
    # an RNN's input and attention's q are inputs of ops that quantize more than them
    whole_input = name not in ops.RNN_MODES and name != "scaled_dot_product_attention"
    a_bits, a_unsigned = activation_bits(tensors[0], cfg.act_bits, cfg.unsigned_acts and whole_input)
    b_bits, b_unsigned = (cfg.weight_bits, None) if weighty else \
        activation_bits(tensors[1], cfg.act_bits, cfg.unsigned_acts)
    common = dict(grad_bits=cfg.grad_bits, groups=cfg.groups, integer=ex.integer, kernels=ex.kernels)
    if cfg.grad_outer_scale:
        common["outer_scale"] = True
    if config.collect_stats:
        common["stats"] = stats_key(record, decision.node)
    if name == "linear":
        target_fn, new_args = ops.quantized_linear, (args["input"], args["weight"], args["bias"])
        q = dict(a_bits=a_bits, w_bits=cfg.weight_bits, **common)
    elif name in _CONVS:
        target_fn = ops.quantized_conv if name in _CONV else ops.quantized_conv_transpose
        new_args = tuple(args[k] for k in (_CONV_ARGS if name in _CONV else _CONV_T_ARGS))
        common["sq_groups"] = common.pop("groups")
        q = dict(nd=_CONVS[name], a_bits=a_bits, w_bits=cfg.weight_bits, **common)
    elif name == "scaled_dot_product_attention":
        target_fn, new_args = ops.quantized_sdpa, tuple(args[k] for k in _SDPA_ARGS)
        q = dict(act_bits=cfg.act_bits, **common)
        if cfg.unsigned_acts and unsigned_bits(cfg.act_bits):      # probabilities are never negative
            q["p_bits"] = unsigned_bits(cfg.act_bits)
            a_unsigned = "softmax"
        why_not = _attention_unfused(cfg, target, ex, config, args)
        notes = [decision.note]     # set by passes.attention / passes.composite
        if why_not is None:
            q["fused"] = True
            decision.region = FUSED_ATTENTION
        elif why_not:
            notes.append(f"unfused attention: {why_not}")
        decision.note = "; ".join(n for n in notes if n) or None
    elif name in ops.RNN_MODES:
        target_fn, new_args = ops.quantized_rnn, (name, *(args[k] for k in _RNN_ARGS))
        q = dict(a_bits=cfg.act_bits, w_bits=cfg.weight_bits, **common)
    elif name == "einsum":
        target_fn, new_args = ops.quantized_einsum, (args["equation"], args["a"], args["b"])
        q = dict(a_bits=a_bits, b_bits=b_bits, **common)
    elif name in _ADDMM_NAMES:
        target_fn, new_args = ops.quantized_addmm, (args["inp"], args["a"], args["b"])
        q = dict(beta=args["beta"], alpha=args["alpha"], a_bits=a_bits, b_bits=b_bits, **common)
    else:
        target_fn, new_args = ops.quantized_matmul, (args["a"], args["b"])
        q = dict(a_bits=a_bits, b_bits=b_bits, **common)
    # act_groups: ShiftQuant over the first operand's reduction channels, as many groups as fit
    # int8 at its bits (attention and RNNs keep one scale per row)
    a_groups = 1 if name in ops.RNN_MODES or name == "scaled_dot_product_attention" else \
        act_groups_for(cfg.act_groups, a_bits)
    if a_groups > 1:
        q["a_groups"] = a_groups

    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(target_fn, new_args, q)
    new.meta.update(node.meta)
    new.meta["sq_decision"] = decision
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)

    decision.quantized = True
    decision.execution = ex.label
    decision.reason = ex.reason
    decision.act_bits = cfg.act_bits
    decision.act_quantizer = ("per-sample" if name in _CONVS else "per-row") + \
        (f" x ShiftQuant G={a_groups} per {'(sample, channel)' if name in _CONVS else 'column'}" if a_groups > 1
         else "") + ", nearest" + _unsigned(a_unsigned, "; P " if name == "scaled_dot_product_attention" else ", ")
    decision.weight_bits = cfg.weight_bits if weighty else cfg.act_bits
    decision.weight_quantizer = "per-output-channel, nearest" if weighty else \
        "per-column, nearest (activation)" + _unsigned(b_unsigned)
    decision.grad_bits = cfg.grad_bits
    decision.groups = cfg.groups
    decision.grad_quantizer = f"ShiftQuant G={cfg.groups}, stochastic" + \
        (", groups per sample (dX)" if name in _CONVS else "") + (", outer scale" if cfg.grad_outer_scale else "")
    decision.replacement = target_fn.__name__
    record.add(decision)


FUSED_ATTENTION = "fused attention (Triton)"


def _unsigned(source: Optional[str], lead: str = ", ") -> str:
    return f"{lead}unsigned ({source} output)" if source else ""


def _attention_unfused(cfg, target, ex, config, args) -> Optional[str]:
    """:func:`~sqcompile.passes.precision.attention_unfused` for an sdpa node's arguments."""
    mask = args["attn_mask"]
    if isinstance(mask, fx.Node):
        mask = example_value(mask)
        if mask is None:
            return "attn_mask of unknown dtype at compile time"
    values = [example_value(args[k]) for k in ("query", "key", "value")]
    return attention_unfused(cfg, target, ex, config, values, mask, args["dropout_p"])


def _float_reason(tensors) -> Optional[str]:
    for t in tensors:
        v = example_value(t)
        if v is None:
            return "operand shape unknown at compile time"
        if not is_float_tensor(t):
            return f"operand dtype {v.dtype} is not floating point"
    return None


def _decision(node: fx.Node, name: str, tensors=None, reason: Optional[str] = None) -> OpDecision:
    if tensors is None:
        tensors = [a for a in node.args if isinstance(a, fx.Node)][:2]
    shapes = [shape_of(t) for t in tensors if shape_of(t) is not None]
    d = OpDecision(node=node.meta.get("sq_name", node.name), module_path=module_path(node), op=name, kind="gemm",
                   shapes=shapes, execution=EXEC_FLOAT, reason=reason, note=node.meta.get("sq_note"))
    d.flops = _flops(node, name, [size_hints(t) for t in tensors])
    return d


def _flops(node: fx.Node, name: str, shapes) -> int:
    """Forward FLOPs (2 x multiply-adds) of the op, from its input and output shapes (symbolic
    sizes at the values they were compiled for); 0 when a shape is unknown."""
    if name in ops.RNN_MODES:      # every weight times one vector per step and sequence
        weights = [size_hints(w) for w in _rnn_weights(node)]
        if not shapes or shapes[0] is None or any(w is None for w in weights):
            return 0
        return 2 * numel(shapes[0][:-1]) * sum(numel(w) for w in weights)
    out = size_hints(node)
    if not shapes or out is None or any(s is None for s in shapes):
        return 0
    if name == "embedding":
        return 0    # a gather, no multiply-adds
    if name.startswith("conv_transpose") and len(shapes) > 1:
        return 2 * numel(shapes[0]) * numel(shapes[1][1:])    # every input value times a [Cout/g, k..] slice
    if name == "linear":
        return 2 * numel(out) * shapes[0][-1]
    if name in _CONV:
        w = shapes[1]
        return 2 * numel(out) * numel(w[1:])
    if name == "bilinear":
        return 2 * numel(out) * shapes[0][-1] * shapes[1][-1]
    if name == "_transformer_encoder_layer_fwd":
        return _encoder_layer_flops(node, shapes[0])
    if name == "_native_multi_head_attention":
        q, k = shapes[0], shapes[1]
        qkv, proj = (size_hints(node.args[i]) for i in (5, 7))
        if qkv is None or proj is None:
            return 0
        e = q[-1]
        return 2 * numel(q[:-1]) * e * (e + proj[0]) + 2 * 2 * numel(k[:-1]) * e * e + 2 * 2 * numel(q[:-1]) * k[-2] * e
    if name == "scaled_dot_product_attention":
        q, k = shapes[0], shapes[1]
        return 2 * 2 * numel(q[:-1]) * k[-2] * q[-1]
    if name == "einsum":
        parsed = ops.parse_einsum(node.args[0], len(shapes)) if isinstance(node.args[0], str) else None
        if not isinstance(parsed, tuple):
            return 0
        size = {c: s for spec, shp in zip(parsed[0], shapes) for c, s in zip(spec, shp)}
        return 2 * numel(list(size.values()))
    a = shapes[0]
    return 2 * numel(out) * (a[-1] if a else 1)


def _rnn_weights(node: fx.Node):
    """The weight matrices (``w_ih``, ``w_hh`` of every layer and direction) of an RNN node."""
    args = bind(node, _RNN_ARGS, {})
    params = args["params"] if isinstance(args["params"], (list, tuple)) else []
    per = 4 if args["has_biases"] else 2
    return [p for i, p in enumerate(params) if i % per < 2]


def _encoder_layer_flops(node: fx.Node, src) -> int:
    """``_transformer_encoder_layer_fwd(src [N, L, E], E, H, qkv_w, qkv_b, proj_w, proj_b,
    ..., ffn_w1, ffn_b1, ffn_w2, ...)``: its four projections and the attention's two GEMMs."""
    weights = [size_hints(node.args[i]) if len(node.args) > i else None for i in (3, 5, 14, 16)]
    if any(w is None for w in weights):
        return 0
    tokens, seq = numel(src[:-1]), (src[-2] if len(src) > 1 else 1)
    return 2 * tokens * sum(numel(w) for w in weights) + 2 * 2 * tokens * seq * src[-1]
