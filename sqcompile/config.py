"""User-facing options of the ``shiftquant`` backend.

Everything a user can set lives in :class:`Config`.  ``torch.compile(model,
backend="shiftquant", options={...})`` builds one with :meth:`Config.from_options`; every
option is validated up front, and a wrong name or value raises a ``ValueError`` naming it.

Per-module overrides
--------------------
``overrides`` maps fnmatch patterns over module paths (``"layer1.0.conv1"``, ``"fc"``,
``"blocks.*.attn"``) to a partial option dict, or to ``None`` meaning "leave this module in
float".  A pattern matches a module when it matches the module's path or the path of any of
its parents, so ``"layer1"`` covers everything inside ``layer1``.  Patterns are applied in
dict order and later ones win field by field; after a ``None``, a later dict starts again from
the global options.  Ops called directly in the root module's
``forward`` have the path ``""``; the empty pattern matches only those, ``"*"`` matches all.

A key may also name the op: ``"module-pattern:op-pattern"`` applies only to ops whose name
(the report's ``op`` column, one of :data:`OP_NAMES`) matches the second fnmatch pattern.
``{"*:scaled_dot_product_attention": None}`` keeps attention's two GEMMs in float everywhere
(so it keeps PyTorch's fused attention kernel) while every Linear stays quantized;
``{"*": None, "*:linear": {}}`` quantizes Linear layers only.  Module paths never contain
``":"``, so the first ``":"`` separates the two parts.  An op pattern that matches none of
:data:`OP_NAMES` is refused with a ``ValueError``.
"""
from __future__ import annotations

import difflib
import fnmatch
import math
import os
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping, Optional, Tuple

MIN_BITS, MAX_BITS = 2, 8
MAX_GROUPS = 8
DEFAULT_GROUPS = 4        # ``groups=None``: this many, or fewer where they would not fit int8


def default_groups(grad_bits: int) -> int:
    """The ShiftQuant groups ``groups=None`` gives gradients of ``grad_bits``: the most, up to
    :data:`DEFAULT_GROUPS`, whose expanded integers ``qmax << (G - 1)`` fit int8, so each
    backward GEMM stays one int8 GEMM (4 at 4 and 5 bits, 3 at 6, 2 at 7, 1 at 8)."""
    return act_groups_for(DEFAULT_GROUPS, grad_bits)


def act_groups_for(act_groups: int, bits: int) -> int:
    """The most ShiftQuant groups, up to ``act_groups``, whose expanded integers fit int8 at
    ``bits`` (symmetric): what an activation quantized at ``bits`` gets under ``act_groups``
    (an unsigned ``b``-bit activation is quantized as ``b + 1`` symmetric bits, see
    :mod:`~sqcompile.passes.signs`), so the forward GEMM stays one int8 GEMM and the saved
    operand one int8 tensor; :func:`default_groups` for gradients."""
    from .numerics import fits_int8
    return max(g for g in range(1, act_groups + 1) if fits_int8(bits, g))


NORM_CHOICES = ("l1", "keep")
EXECUTION_CHOICES = ("auto", "simulate", "integer")
KERNEL_CHOICES = ("auto", "torch", "triton")
INNER_CHOICES = ("auto", "eager", "inductor")

# The ops the rewrite passes handle, by the names decisions and reports give them: what the
# op part of a ``"module:op"`` override key is matched against (tests check this list against
# the passes' own tables).
OP_NAMES = (
    "linear", "matmul", "mm", "bmm", "addmm", "baddbmm", "einsum", "conv1d", "conv2d", "conv3d",
    "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "scaled_dot_product_attention", "lstm", "gru", "rnn_tanh", "rnn_relu",
    "batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm",
)

# Options that may differ from module to module (the rest are global to one compile).
PER_OP_FIELDS = (
    "quantize", "weight_bits", "act_bits", "act_groups", "grad_bits", "groups", "grad_outer_scale", "unsigned_acts",
    "norm", "norm_bits", "l1_scale", "execution", "kernels", "fused_attention",
)


def _bad(name: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"sqcompile option {name!r}: got {value!r}, expected {expected}")


try:  # Dynamo re-raises ShortenTraceback subclasses unwrapped instead of BackendCompilerFailed.
    from torch._dynamo.exc import ShortenTraceback as _Unwrapped
except ImportError:  # pragma: no cover - a future torch without it: users get the wrapped error
    _Unwrapped = None


class OptionError(ValueError, *(() if _Unwrapped is None else (_Unwrapped,))):
    """A bad ``options=`` value.  Raised from the first call of the compiled model (that is
    when Dynamo calls the backend) as a ``ValueError``, not wrapped in Dynamo's
    ``BackendCompilerFailed``, so ``except ValueError`` works as with any bad argument."""

    def __init__(self, message: str):
        if _Unwrapped is None:
            ValueError.__init__(self, message)
        else:
            _Unwrapped.__init__(self, message, first_useful_frame=None)


@dataclass(frozen=True)
class OpConfig:
    """The resolved options that apply to one op (after overrides)."""

    quantize: bool = True
    weight_bits: int = 4
    act_bits: int = 4
    act_groups: int = 1
    grad_bits: int = 4
    groups: Optional[int] = None
    grad_outer_scale: bool = True
    unsigned_acts: bool = True
    norm: str = "l1"
    norm_bits: int = 8
    l1_scale: float = math.sqrt(math.pi / 2)
    execution: str = "auto"
    kernels: str = "auto"
    fused_attention: Optional[bool] = None

    def validate(self) -> None:
        if not isinstance(self.quantize, bool):
            raise _bad("quantize", self.quantize, "True or False")
        for name in ("weight_bits", "act_bits", "grad_bits", "norm_bits"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not MIN_BITS <= v <= MAX_BITS:
                raise _bad(name, v, f"an integer in {MIN_BITS}..{MAX_BITS}")
        g = self.groups
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or not 1 <= g <= MAX_GROUPS):
            raise _bad(
                "groups", g,
                f"None (as many as fit int8 at grad_bits, up to {DEFAULT_GROUPS}) or an integer in "
                f"1..{MAX_GROUPS} (ShiftQuant groups sit on a power-of-two ladder; past {MAX_GROUPS} "
                f"rungs the smallest group's scale is below 2**-{MAX_GROUPS} of the largest and its "
                "channels round to zero at any bit width)",
            )
        a = self.act_groups
        if isinstance(a, bool) or not isinstance(a, int) or not 1 <= a <= MAX_GROUPS:
            raise _bad("act_groups", a, f"an integer in 1..{MAX_GROUPS} (1: one scale per row / sample; more: "
                       "ShiftQuant over the activation's channels, as many groups as fit int8 up to this many)")
        if not isinstance(self.grad_outer_scale, bool):
            raise _bad("grad_outer_scale", self.grad_outer_scale, "True or False")
        if not isinstance(self.unsigned_acts, bool):
            raise _bad("unsigned_acts", self.unsigned_acts, "True or False")
        if self.norm not in NORM_CHOICES:
            raise _bad("norm", self.norm, f"one of {NORM_CHOICES}")
        if self.execution not in EXECUTION_CHOICES:
            raise _bad("execution", self.execution, f"one of {EXECUTION_CHOICES}")
        if self.kernels not in KERNEL_CHOICES:
            raise _bad("kernels", self.kernels, f"one of {KERNEL_CHOICES}")
        if not isinstance(self.l1_scale, (int, float)) or isinstance(self.l1_scale, bool) \
                or not math.isfinite(self.l1_scale) or self.l1_scale <= 0:
            raise _bad("l1_scale", self.l1_scale, "a finite positive number")
        if self.fused_attention is not None and not isinstance(self.fused_attention, bool):
            raise _bad("fused_attention", self.fused_attention, "True, False or None (fused on CUDA)")
        if self.fused_attention and self.kernels == "torch":
            raise _bad("fused_attention", self.fused_attention,
                       "False or None with kernels='torch' (the fused attention is a Triton kernel)")


@dataclass(frozen=True)
class Config(OpConfig):
    """All options of the ``shiftquant`` backend.

    ==============  ========  ================================================================
    option          default   meaning
    ==============  ========  ================================================================
    quantize        True      False keeps GEMMs in float and makes L1 norms unquantized (what
                              is left is the norm replacement alone: "float L1" training)
    weight_bits     4         bits of weights in forward GEMMs (2..8), nearest rounding
    act_bits        4         bits of activations feeding GEMMs (2..8), nearest rounding
    act_groups      1         1: one scale per row (token) / per sample (conv input).  More:
                              ShiftQuant over the activation's reduction channels (the
                              features a Linear sums over, a conv's input channels), on top
                              of that row / sample scale, with nearest rounding: channels
                              are grouped by range on a power-of-two ladder and the GEMM
                              stays one int8 GEMM.  An op uses as many groups as fit int8 at
                              its activation bits, up to this many (4 bits unsigned: 4;
                              signed: 5; 6 bits: 2 or 3; 8 bits: 1); see
                              :func:`act_groups_for`
    grad_bits       4         bits of output gradients in backward GEMMs (2..8), ShiftQuant
                              with stochastic rounding
    groups          None      ShiftQuant groups on the power-of-two ladder (1..8); 1 is
                              per-tensor quantization.  None: the most, up to 4, whose
                              expanded integers fit int8 at ``grad_bits`` (4 at 4 and 5
                              bits, 3 at 6, 2 at 7, 1 at 8), so every backward GEMM is one
                              int8 GEMM; more groups than that run as two (int16 digits)
    grad_outer_scale True     each backward GEMM's gradient also gets one float scale per
                              index of its free axis (per token for ``dX = dY W``, per
                              output feature for ``dW = dY^T X``), applied in the GEMM's
                              epilogue; ShiftQuant then groups the reduction axis of the
                              gradient divided by it.  Same integer GEMMs, one more pass
                              over the gradient (its free-axis maxima).  Every quantized
                              GEMM; for a convolution per output channel (``dW``) and per
                              sample (``dX``: each output position sums several input
                              positions, so a per-position scale would not factor out).
                              The Triton kernels and the fused attention
                              implement it; with collect_stats the gradient SQNR is the
                              divided gradient's.  On by default since it brought the char
                              transformer's loss gap from 1.5% to 0.6% at 6 bits, 2.3% to
                              0.7% at 8 and 6.1% to 3.7% at 4 (README, "Accuracy"); it
                              costs 10-18% of a CPU transformer step; on CUDA (untimed)
                              a gradient's ShiftQuant pair reads it three times where it
                              read it once or twice, and the fused attention takes one
                              more pass.  False: the paper's recipe (ShiftQuant alone)
    unsigned_acts   True      activations that are non-negative by construction (a ReLU's,
                              a softmax's or a sigmoid's output, pooled or reshaped) are
                              quantized unsigned: ``act_bits`` 4 gives them 16 levels
                              ``0..15`` instead of ``0..7`` (up to 7 bits; 8-bit
                              activations stay signed, as int8 holds them).  False: every
                              activation symmetric
    norm            "l1"      "l1" replaces Batch/Layer/Group/RMS norms by L1 norms, "keep"
                              leaves them alone
    norm_bits       8         bits of a norm's input and of the gradient into its backward
    l1_scale        1.2533    c in the L1 norm's ``sigma = c * mean|x - mean|``, which takes
                              the standard deviation's place in ``sqrt(sigma**2 + eps)``;
                              sqrt(pi/2) matches the L2 norm's scale on Gaussian inputs
    execution       "auto"    "simulate": quantize-dequantize around float ops; "integer":
                              int8 GEMMs; "auto": integer where available, else simulate
    kernels         "auto"    "torch": torch/oneDNN implementations; "triton": Triton
                              kernels (on CPU only under TRITON_INTERPRET=1); "auto": Triton on
                              CUDA, torch on CPU
    fused_attention None      quantized scaled_dot_product_attention as fused Triton kernels
                              (int8 ``QK^T`` and ``PV``, softmax and quantizers in registers,
                              no ``[L, S]`` tensor in memory; numerics equal to the unfused
                              ops up to float rounding): None fuses on CUDA, True also under
                              the Triton interpreter, False never.  Needs Triton kernels;
                              dropout, learned (grad-requiring) masks, head dims > 256 and
                              collect_stats keep the unfused ops (the report says why)
    overrides       {}        {module-path pattern: partial options or None (= float)}; a
                              key "pattern:op" applies to ops of that name only (see the
                              module docstring)
    collect_stats   False     record SQNR and group occupancy per op each step (costs time)
    inner           "auto"    compiler for what remains: "eager", "inductor", or "auto"
                              (Inductor on CUDA; on CPU Inductor for graphs whose quantized
                              GEMMs exceed 0.5 GFLOP per call, eager for smaller ones)
    cudagraphs      False     True: replay the compiled forward and backward as CUDA graphs
                              (Inductor's cudagraph trees, as ``mode="reduce-overhead"``),
                              which removes the host cost of launching each quantizer and
                              GEMM; needs an Inductor inner compiler; no effect on CPU.
                              Stochastic rounding stays stochastic: the Triton quantizers draw
                              their seeds on the device.  The usual caveat applies: a compiled
                              call's outputs are overwritten by its next replay
    fusion          None      region fusion of the Triton kernel family (each int8 GEMM and
                              its elementwise epilogue in one generated kernel; an L1 norm
                              and the quantizer of the GEMM it feeds in one kernel): True /
                              False, or None for the process default (on unless the
                              environment sets ``SQCOMPILE_FUSION=0``).  Off, the graphs run
                              the unfused ops: for debugging and for measuring what fusion
                              gains.  On CPU (``kernels="torch"``) it turns on the C kernels
                              that replace groups of graph ops: attention's softmax, the
                              gradients' outer-scaled ShiftQuants, a Linear's GELU with the
                              next quantizer, and a LayerNorm / RMSNorm with the quantizers
                              of the Linears it feeds (off, those norms stay graph ops)
    ==============  ========  ================================================================
    """

    overrides: Mapping[str, Optional[Mapping[str, Any]]] = field(default_factory=dict)
    collect_stats: bool = False
    inner: str = "auto"
    cudagraphs: bool = False
    fusion: Optional[bool] = None

    def __post_init__(self) -> None:
        self.validate()
        if not isinstance(self.overrides, Mapping):
            raise _bad("overrides", self.overrides,
                       "a dict {module-path pattern: option dict or None}")
        for pattern, opts in self.overrides.items():
            if not isinstance(pattern, str):
                raise _bad("overrides", pattern, "string patterns as keys")
            _check_op_pattern(pattern)
            if opts is None:
                continue
            if not isinstance(opts, Mapping):
                raise _bad(f"overrides[{pattern!r}]", opts, "an option dict or None")
            _check_names(opts, PER_OP_FIELDS, where=f"overrides[{pattern!r}]")
            try:
                replace(self.op_config(), **opts).validate()
            except ValueError as e:
                raise ValueError(f"{e} (in overrides[{pattern!r}])") from None
        if not isinstance(self.collect_stats, bool):
            raise _bad("collect_stats", self.collect_stats, "True or False")
        if self.inner not in INNER_CHOICES:
            raise _bad("inner", self.inner, f"one of {INNER_CHOICES}")
        if not isinstance(self.cudagraphs, bool):
            raise _bad("cudagraphs", self.cudagraphs, "True or False")
        if self.fusion is not None and not isinstance(self.fusion, bool):
            raise _bad("fusion", self.fusion, "True, False or None (the process default)")
        if self.cudagraphs and self.inner == "eager":
            raise _bad("cudagraphs", self.cudagraphs, "False with inner='eager' (CUDA graphs are captured by "
                       "Inductor: use inner='inductor' or 'auto')")
        if self.cudagraphs and self.collect_stats:
            raise _bad("cudagraphs", self.cudagraphs, "False with collect_stats=True (the stats are read back to "
                       "the host at every step, which a CUDA graph cannot replay)")

    @classmethod
    def from_options(cls, options: Optional[Mapping[str, Any]] = None) -> "Config":
        """Build a config from ``torch.compile(..., options=...)``; a Config passes through."""
        if options is None:
            return cls()
        if isinstance(options, Config):
            return options
        if not isinstance(options, Mapping):
            raise ValueError(f"sqcompile options must be a dict or a sqcompile.Config, got {type(options).__name__}")
        if "config" in options:  # options={"config": Config(...), **more}
            base = options["config"]
            rest = {k: v for k, v in options.items() if k != "config"}
            return replace(cls.from_options(base), **cls._checked(rest))
        return cls(**cls._checked(options))

    @classmethod
    def _checked(cls, options: Mapping[str, Any]) -> dict:
        _check_names(options, [f.name for f in fields(cls)], where="options")
        return dict(options)

    def op_config(self) -> OpConfig:
        return OpConfig(**{name: getattr(self, name) for name in PER_OP_FIELDS})

    def for_module(self, path: str, op: Optional[str] = None) -> Optional[OpConfig]:
        """Options for an op named ``op`` (see :data:`OP_NAMES`) inside the module at ``path``;
        None means "keep in float".  With ``op=None`` only plain module patterns apply.
        ``groups=None`` is resolved here, from the op's own ``grad_bits``
        (:func:`default_groups`)."""
        cfg: Optional[OpConfig] = self.op_config()
        for pattern, opts in self.overrides.items():
            if not override_matches(pattern, path, op):
                continue
            if opts is None:
                cfg = None
            else:       # after a None, a dict starts again from the global options
                cfg = replace(cfg or self.op_config(), **opts)
        if cfg is not None and cfg.groups is None:
            cfg = replace(cfg, groups=default_groups(cfg.grad_bits))
        return cfg

    def unmatched_overrides(self, paths) -> list:
        """Override patterns whose module part matches none of ``paths`` (module paths seen in
        a graph)."""
        paths = list(paths)
        return [p for p in self.overrides
                if not any(pattern_matches(split_override(p)[0], q) for q in paths)]


_dataclass_init = Config.__init__


def _config_init(self, *args, **kwargs) -> None:
    """``Config(...)`` with a wrong option name raises the ``ValueError`` (with a "did you
    mean") that ``options={...}`` gives, not the dataclass's ``TypeError``."""
    _check_names(kwargs, [f.name for f in fields(Config)], where="Config(...)")
    _dataclass_init(self, *args, **kwargs)


Config.__init__ = _config_init


def env_flag(name: str, default: bool, meaning: str) -> bool:
    """An on/off environment variable: ``1``/``true``/``on``/``yes`` or ``0``/``false``/``off``/
    ``no`` (any case); unset gives ``default``; anything else raises a ``ValueError`` naming
    the variable (``meaning``: what 1 and 0 do)."""
    value = os.environ.get(name, "1" if default else "0").strip().lower()
    if value in ("1", "true", "on", "yes"):
        return True
    if value in ("0", "false", "off", "no"):
        return False
    raise ValueError(f"environment variable {name}={value!r}: expected 1 or 0 ({meaning})")


def _check_names(options: Mapping[str, Any], allowed, where: str) -> None:
    for name in options:
        if name not in allowed:
            close = difflib.get_close_matches(str(name), list(allowed), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known options: {', '.join(allowed)}"
            raise ValueError(f"unknown sqcompile option {name!r} in {where}{hint}")


def split_override(key: str) -> Tuple[str, Optional[str]]:
    """``"layer1.*:linear"`` -> ``("layer1.*", "linear")``; ``"layer1"`` -> ``("layer1", None)``."""
    module, sep, op = key.partition(":")
    return module, (op if sep else None)


def override_matches(key: str, path: str, op: Optional[str] = None) -> bool:
    """Does the override ``key`` apply to op ``op`` inside the module at ``path``?"""
    module, op_pattern = split_override(key)
    if op_pattern is not None and (op is None or not fnmatch.fnmatchcase(op, op_pattern)):
        return False
    return pattern_matches(module, path)


def _check_op_pattern(key: str) -> None:
    _, op_pattern = split_override(key)
    if op_pattern is None or any(fnmatch.fnmatchcase(name, op_pattern) for name in OP_NAMES):
        return
    close = difflib.get_close_matches(op_pattern, OP_NAMES, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise _bad(f"overrides[{key!r}]", op_pattern,
               f"an op name or fnmatch pattern after ':' that matches one of {', '.join(OP_NAMES)}{hint}")


def module_ancestry(path: str) -> list:
    """``"a.b.c"`` -> ``["a.b.c", "a.b", "a", ""]``."""
    parts = path.split(".") if path else []
    return [".".join(parts[:i]) for i in range(len(parts), -1, -1)]


def pattern_matches(pattern: str, path: str) -> bool:
    """Does ``pattern`` match the module at ``path`` or one of its parents?

    The empty pattern matches only ops of the root module (path ``""``).
    """
    if pattern == "" or path == "":
        return fnmatch.fnmatchcase(path, pattern)
    return any(fnmatch.fnmatchcase(p, pattern) for p in module_ancestry(path)[:-1])


__all__ = ["Config", "OpConfig", "MIN_BITS", "MAX_BITS", "MAX_GROUPS", "DEFAULT_GROUPS", "default_groups", "OP_NAMES",
           "pattern_matches", "override_matches", "split_override"]
