"""Generated region kernels: one int8 GEMM and its elementwise epilogue in one Triton kernel.

The lowering pass :mod:`sqcompile.backends.fusion` describes each region's epilogue as a
small SSA program, an :class:`Epilogue` (serialized to a JSON string, its *signature*); this
module turns the program into Triton source, writes it to a module file, imports it and
launches it.  The main loop is :func:`~sqcompile.kernels.triton_gemm.int8_gemm_tile` (the
design of ``triton_gemm._int8_gemm_kernel``: grouped program order, masked edges, explicit
strides, int32 accumulator); only the epilogue is generated::

    @triton.jit
    def region_kernel(a_ptr, b_ptr, M, N, K, <A and B strides>, tune_key,
                      in0_ptr, in0_sb, in0_sm, in0_sn, ..., out0_ptr, out0_sb, out0_sm, out0_sn, ...,
                      [rng0_ptr, rng0_sb, ...,] [part_ptr, part_ss,] BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M):
        acc, offs_m, offs_n, batch, pid_m = int8_gemm_tile(...)
        <generated: loads of the inputs, one line per epilogue op, stores of the outputs>

Epilogue programs
-----------------
* ``inputs``: the tensors the epilogue reads, each ``[pattern, dtype]``.  Every input is
  addressed in the GEMM's output space ``[B, M, N]``; ``pattern`` names the dims it varies
  along (``"mn"`` a full tile, ``"m"`` one value per row, ``"n"`` per column, ``""`` a scalar;
  a leading ``"b"`` when it varies over the batch), so a per-row scale loads ``BLOCK_M``
  values, not a tile.
* ``ops``: ``[name, dtype, *args]``; an arg is ``"acc"`` (the int32 accumulator), ``"in<i>"``,
  ``"v<j>"`` (an earlier op's value) or a number (a Python scalar of the graph).
* ``outputs``: the values stored, as ``"v<j>"``; each is written contiguous ``[B, M, N]`` in
  its op's dtype.
* ``ranges`` (optional): ``[value, axis]`` pairs; each adds a float32 output ``[B, N]`` (axis
  ``"n"``: the max of ``|value|`` over the rows of each column) or ``[B, M]`` (``"m"``: over the
  columns of each row), NaN counted as +inf, combined across tiles with an integer atomic
  max on the float bits (exact, so order does not matter).  These are the channel ranges of
  a ShiftQuant of the value (:mod:`sqcompile.backends.fusion`), which then skips its own
  range pass over memory.
* ``sums`` (optional): ``[value, dtype]`` pairs; each adds an output ``[N]`` of ``dtype``: the
  sum of the value over the batch and the rows of each column (a Linear's bias gradient,
  ``dY.sum((0, 1))``), accumulated in float32 and rounded once to ``dtype``, as torch's
  ``sum`` does.  Each tile writes its float32 column sums to its own row of a partial-sum
  buffer ``[B * cdiv(M, BLOCK_M), N]``; one ``sum`` over those rows finishes it.  No atomics,
  so the result is the same on every run; it differs from the unfused ``sum`` only in the
  order of the float32 additions.

Numerics follow eager PyTorch (TensorIterator) so a fused region computes what the unfused
ops compute: an op of result dtype ``D`` casts each tensor operand to ``D``, computes in
``D``'s "opmath" type (float32 for bfloat16 / float16), and rounds the result to ``D``
(:func:`~sqcompile.kernels.triton_quant.cast_rtne`); Python scalars stay in opmath, as in
eager; divisions are IEEE (``div_rn``); the activations use torch's formulas (``gelu`` as
``x * 0.5 * (1 + erf(x / sqrt 2))``, ``silu`` as ``x / (1 + exp(-x))``, ...); on CUDA the
kernels are compiled without FMA contraction (``enable_fp_fusion=False``), since eager runs a
multiply and the add after it as two kernels.  What can differ is the last bit of ``erf`` /
``exp`` (libdevice or NumPy against torch's own): allclose to float rounding.  One
deliberate deviation: a 0-d float32 tensor operand of a bfloat16 op is rounded to bfloat16
first, as eager CUDA does (eager CPU keeps it in float32); sqcompile's graphs never contain
that mix.

Kernels are cached by their signature, in this process (:func:`cache_info` counts hits and
misses) and on disk (the generated module files, named by a hash of the signature, under
:data:`KERNEL_DIR`).  They are launched from a plain op (:func:`sqcompile.ops.custom_op`),
``sqcompile::triton_fused_int8_mm(a, b, inputs, epilogue) -> Tensor[]``, with a fake
implementation (the outputs' shapes follow from ``a``, ``b`` and the signature), so graphs
that contain it stay traceable and Inductor calls it as an extern kernel.  Like the other
Triton ops it runs on CUDA, or on CPU under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import json
import math
import os
import sys
import tempfile
import threading
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from .. import ops
from .triton_ops import triton_version

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16, "i32": torch.int32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_TL = {"f32": "tl.float32", "bf16": "tl.bfloat16", "f16": "tl.float16", "i32": "tl.int32"}
_OPMATH = {"f32": "f32", "bf16": "f32", "f16": "f32", "i32": "i32"}
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# op name -> (number of tensor-or-scalar args, Triton expression over the opmath args a, b, c).
# The formulas are torch's (aten/src/ATen/native/cpu/*Kernel.cpp and their CUDA twins).
OPS: Dict[str, Tuple[int, str]] = {
    "convert": (1, "{a}"),
    "add": (2, "{a} + {b}"),
    "sub": (2, "{a} - {b}"),
    "mul": (2, "{a} * {b}"),
    "div": (2, "tl.math.div_rn({a}, {b})"),
    "neg": (1, "-{a}"),
    "relu": (1, "tl.where({a} < 0.0, 0.0, {a})"),              # NaN stays NaN, as torch.relu
    "gelu": (1, "{a} * 0.5 * (1.0 + tl.erf({a} * 0.7071067811865476))"),
    "silu": (1, "tl.math.div_rn({a}, 1.0 + tl.exp(-{a}))"),
    "sigmoid": (1, "tl.math.div_rn(1.0, 1.0 + tl.exp(-{a}))"),
    # backward ops: a = incoming gradient, b = the forward input (c = threshold)
    "threshold_backward": (3, "tl.where({b} <= {c}, 0.0, {a})"),
    "gelu_backward": (2, "{a} * (0.5 * (1.0 + tl.erf({b} * 0.7071067811865476))"
                         " + {b} * (0.3989422804014327 * tl.exp({b} * {b} * -0.5)))"),
    "silu_backward": (2, "{a} * _sig * (1.0 + {b} * (1.0 - _sig))"),
}
# Ops whose expression needs a helper value first (computed once per op).
_PRELUDE = {"silu_backward": "_sig = tl.math.div_rn(1.0, 1.0 + tl.exp(-{b}))"}

Arg = Union[str, float]


@dataclass(frozen=True)
class Epilogue:
    """An epilogue program (see the module docstring); :meth:`signature` is its cache key."""

    inputs: Tuple[Tuple[str, str], ...]
    ops: Tuple[Tuple, ...]
    outputs: Tuple[str, ...]
    ranges: Tuple[Tuple[str, str], ...] = ()
    sums: Tuple[Tuple[str, str], ...] = ()

    def signature(self) -> str:
        d = {"inputs": [list(i) for i in self.inputs], "ops": [list(o) for o in self.ops],
             "outputs": list(self.outputs)}
        if self.ranges:
            d["ranges"] = [list(r) for r in self.ranges]
        if self.sums:
            d["sums"] = [list(r) for r in self.sums]
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def parse(cls, signature: str) -> "Epilogue":
        return _parse(signature)

    def dtype_of(self, ref: str) -> str:
        if ref == "acc":
            return "i32"
        if ref.startswith("in"):
            return self.inputs[int(ref[2:])][1]
        return self.ops[int(ref[1:])][1]

    def range_shapes(self, batch: int, M: int, N: int) -> List[Tuple[int, int]]:
        """The float32 range outputs' shapes: ``[batch, M]`` per row, ``[batch, N]`` per column."""
        return [(batch, M if axis == "m" else N) for _, axis in self.ranges]

    def sum_dtypes(self) -> List[torch.dtype]:
        """The dtypes of the column-sum outputs (each ``[N]``)."""
        return [DTYPES[d] for _, d in self.sums]

    def output_dtypes(self) -> List[torch.dtype]:
        return [DTYPES[self.dtype_of(r)] for r in self.outputs]

    def validate(self) -> None:
        for pattern, dtype in self.inputs:
            if dtype not in DTYPES or pattern not in ("", "m", "n", "mn", "b", "bm", "bn", "bmn"):
                raise ValueError(f"bad epilogue input {pattern!r}/{dtype!r}")
        for j, (name, dtype, *args) in enumerate(self.ops):
            if name not in OPS or dtype not in DTYPES or dtype == "i32" or len(args) != OPS[name][0]:
                raise ValueError(f"bad epilogue op {j}: {[name, dtype, *args]}")
            for a in args:
                if isinstance(a, str) and not self._defined(a, j):
                    raise ValueError(f"epilogue op {j} reads {a!r} before it is defined")
                if not isinstance(a, str) and not (isinstance(a, (int, float)) and math.isfinite(a)):
                    raise ValueError(f"epilogue op {j}: bad scalar {a!r}")
        if not self.outputs or any(not (r.startswith("v") and self._defined(r, len(self.ops))) for r in self.outputs):
            raise ValueError(f"bad epilogue outputs {self.outputs}")
        for ref, axis in self.ranges:
            if axis not in ("m", "n") or not (ref.startswith("v") and self._defined(ref, len(self.ops))):
                raise ValueError(f"bad epilogue range {[ref, axis]}")
        for ref, dtype in self.sums:
            if DTYPES.get(dtype) not in FLOAT_DTYPES or not (ref.startswith("v") and self._defined(ref, len(self.ops))):
                raise ValueError(f"bad epilogue sum {[ref, dtype]}")

    def _defined(self, ref: str, before: int) -> bool:
        if ref == "acc":
            return True
        if ref.startswith("in") and ref[2:].isdigit():
            return int(ref[2:]) < len(self.inputs)
        return ref.startswith("v") and ref[1:].isdigit() and int(ref[1:]) < before


_PARSED: Dict[str, Epilogue] = {}


def _parse(signature: str) -> Epilogue:
    ep = _PARSED.get(signature)
    if ep is None:
        d = json.loads(signature)
        ep = Epilogue(tuple(tuple(i) for i in d["inputs"]), tuple(tuple(o) for o in d["ops"]), tuple(d["outputs"]),
                      tuple(tuple(r) for r in d.get("ranges", ())), tuple(tuple(r) for r in d.get("sums", ())))
        ep.validate()
        _PARSED[signature] = ep
    return ep


# --------------------------------------------------------------------------------------------
# Code generation
# --------------------------------------------------------------------------------------------

_TEMPLATE = '''"""Generated by sqcompile.kernels.triton_fused (do not edit): int8 GEMM + epilogue.

Epilogue signature:
{signature}
"""
import triton
import triton.language as tl

from sqcompile.kernels.triton_gemm import int8_gemm_tile
from sqcompile.kernels.triton_quant import _abs_nan_as_inf, _absmax, cast_rtne


@triton.jit(do_not_specialize=["tune_key"])
def region_kernel(a_ptr, b_ptr, M, N, K, stride_ab, stride_am, stride_ak, stride_bb, stride_bk, stride_bn, tune_key,
{params}
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    acc, offs_m, offs_n, batch, pid_m = int8_gemm_tile(a_ptr, b_ptr, M, N, K, stride_ab, stride_am, stride_ak,
                                                       stride_bb, stride_bk, stride_bn, BLOCK_M, BLOCK_N, BLOCK_K,
                                                       GROUP_M)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]
{body}
'''


def _load(i: int, pattern: str) -> str:
    base = f"in{i}_ptr + batch * in{i}_sb"
    if "m" in pattern and "n" in pattern:
        return (f"tl.load({base} + offs_m[:, None] * in{i}_sm + offs_n[None, :] * in{i}_sn, "
                f"mask=mask, other=0)")
    if "m" in pattern:
        return f"tl.load({base} + offs_m * in{i}_sm, mask=mask_m, other=0)[:, None]"
    if "n" in pattern:
        return f"tl.load({base} + offs_n * in{i}_sn, mask=mask_n, other=0)[None, :]"
    return f"tl.load({base})"


def _cast(expr: str, src: str, dst: str) -> str:
    """``expr`` of dtype ``src`` as ``dst``, rounding like torch (ints go through float32)."""
    if src == dst:
        return expr
    if src == "i32" and dst != "f32":
        expr, src = f"({expr}).to(tl.float32)", "f32"
    if dst == "f32" or src == "i32":
        return f"({expr}).to({_TL[dst]})"
    return f"cast_rtne({expr}, {_TL[dst]})"


def generate_source(ep: Epilogue, store_reduced: Optional[bool] = None) -> str:
    """The Triton module for ``ep`` (see the module docstring); ``store_reduced``: see
    :func:`store_from_reduced` (its answer when None)."""
    if store_reduced is None:
        store_reduced = store_from_reduced(ep.ops)
    params = [f"in{i}_ptr, in{i}_sb, in{i}_sm, in{i}_sn," for i in range(len(ep.inputs))]
    params += [f"out{i}_ptr, out{i}_sb, out{i}_sm, out{i}_sn," for i in range(len(ep.outputs))]
    params += [f"rng{i}_ptr, rng{i}_sb," for i in range(len(ep.ranges))]
    params += ["part_ptr, part_ss,"] if ep.sums else []
    body = [f"    in{i} = {_load(i, pattern)}" for i, (pattern, _) in enumerate(ep.inputs)]
    for j, (name, dtype, *args) in enumerate(ep.ops):
        math_t = _OPMATH[dtype]
        if name == "convert" and isinstance(args[0], str):
            # the cast itself: no round trip through opmath, whose rounding back to a 16-bit
            # ``dtype`` is the identity on a value already of that dtype (NaN included)
            body.append(f"    v{j} = {_cast(args[0], ep.dtype_of(args[0]), dtype)}  # convert")
            continue
        xs = []
        for a in args:
            if isinstance(a, str):   # tensor operand: to the op's dtype (as TensorIterator), then opmath
                xs.append(_cast(_cast(a, ep.dtype_of(a), dtype), dtype, math_t))
            else:                    # Python scalar: an opmath constant (not rounded to the op's dtype)
                xs.append(repr(float(a)))
        names = dict(zip("abc", xs))
        if name in _PRELUDE:
            body.append("    " + _PRELUDE[name].format(**names))
        body.append(f"    v{j} = {_cast(OPS[name][1].format(**names), math_t, dtype)}  # {name}")
    # Each value that is reduced (ranges, column sums) is taken once in float32 with the
    # tile's masked edges zeroed; with ``store_reduced`` an output that is also reduced is
    # stored from there (the same values: a 16-bit one goes to float32 and back exactly).
    reduced = list(dict.fromkeys([ref for ref, _ in ep.ranges] + [ref for ref, _ in ep.sums]))
    for ref in reduced:
        body.append(f"    z_{ref} = tl.where(mask, {_cast(ref, ep.dtype_of(ref), 'f32')}, 0.0)")
    for i, ref in enumerate(ep.outputs):
        value = _cast(f"z_{ref}", "f32", ep.dtype_of(ref)) if store_reduced and ref in reduced else ref
        body.append(f"    tl.store(out{i}_ptr + batch * out{i}_sb + offs_m[:, None] * out{i}_sm"
                    f" + offs_n[None, :] * out{i}_sn, {value}, mask=mask)")
    for i, (ref, axis) in enumerate(ep.ranges):
        # |value| maxed over the tile's rows ("n") or columns ("m"), NaN propagated and then
        # taken as +inf; non-negative float32 orders like its int32 bits, so an integer atomic
        # max combines the tiles
        offs, reduce = ("offs_n", 0) if axis == "n" else ("offs_m", 1)
        body.append(f"    r{i} = _abs_nan_as_inf(_absmax(z_{ref}, {reduce}))")
        body.append(f"    tl.atomic_max(rng{i}_ptr + batch * rng{i}_sb + {offs}, r{i}.to(tl.int32, bitcast=True), "
                    f"mask=mask_{axis}, sem=\"relaxed\")")
    if ep.sums:   # this tile's float32 column sums, to its own row of the partial-sum buffer
        body.append("    part_row = (batch * tl.cdiv(M, BLOCK_M) + pid_m) * N")
    for i, (ref, _) in enumerate(ep.sums):
        body.append(f"    s{i} = tl.sum(z_{ref}, 0)")
        body.append(f"    tl.store(part_ptr + {i} * part_ss + part_row + offs_n, s{i}, mask=mask_n)")
    return _TEMPLATE.format(signature=ep.signature(), params="\n".join(" " * 18 + p for p in params),
                            body="\n".join(body))


# --------------------------------------------------------------------------------------------
# Kernel cache: generated modules on disk, loaded kernels in memory
# --------------------------------------------------------------------------------------------

KERNEL_DIR = os.environ.get("SQCOMPILE_KERNEL_DIR") or os.path.join(
    tempfile.gettempdir(), f"sqcompile_kernels_{os.getuid() if hasattr(os, 'getuid') else 'user'}")


@dataclass
class RegionKernel:
    epilogue: Epilogue
    fn: object           # the Triton kernel (autotuned on CUDA)
    path: str            # the generated module file
    min_block_m: int     # the smallest BLOCK_M it may run with (sizes the column-sum buffer)


_LIGHT_OPS = {"convert", "mul", "div", "add", "sub", "neg"}


def wide_tile_fits(ep: Epilogue) -> bool:
    """Does the 128x256 tile keep ``ep``'s epilogue in registers?  Yes for scale, bias and
    cast epilogues with one output; no with an activation (or its backward), a full-tile
    input (residual), a side output, range or column-sum outputs: ``ptxas -v`` for sm_90
    (Triton 3.9, the kernels specialized as launched) shows 60-700 spilled bytes per thread
    for those at 128x256 and none at 128x128 (``tests/test_fusion.py`` checks both)."""
    return not ep.ranges and not ep.sums and two_programs_fit(ep)


def two_programs_fit(ep: Epilogue) -> bool:
    """Does ``ep``'s 128x128 region kernel fit two programs on an SM
    (:data:`~sqcompile.kernels.triton_gemm.TWO_PROGRAMS_CONFIG`: 128 registers a thread)?
    Yes for scale, bias and cast epilogues with one output, range outputs included (118-128
    registers, sm_90 ptxas, Triton 3.6 and 3.9); no with an activation (194-254), a
    full-tile input (a residual: 134-136), a side output or a column sum (``dequant+ranges``
    with a sum: 205 registers, Triton 3.9)."""
    return len(ep.outputs) == 1 and not ep.sums and all(name in _LIGHT_OPS for name, *_ in ep.ops) and \
        not any("m" in p and "n" in p for p, _ in ep.inputs)


# Ops whose formulas call exp / erf (see :func:`store_from_reduced`).
_TRANSCENDENTAL_OPS = {"gelu", "silu", "sigmoid", "gelu_backward", "silu_backward"}


def store_from_reduced(ops: Sequence[Tuple]) -> bool:
    """Does a generated epilogue with these ops store a value that it also reduces
    (ShiftQuant ranges, column sums) from the reduced float32 form (:func:`generate_source`)?
    Only with Triton before 3.9 (3.6 is the H200 machine's) and an exp or erf in the chain.
    Storing the value itself, that Triton's layout pass computes the epilogue twice, once in
    the store's layout and once in the reductions': for a 16-bit GELU or SiLU backward with
    ranges that spilled 264-604 bytes per thread on sm_90 at every region tile (``ptxas
    -v``); from the one reduced value it is computed once (GELU backward + ranges + sum at
    128 x 128: 7912 -> 4824 instructions, 426 -> 0 spilled bytes; no spills at any tile, SiLU
    likewise).  A light chain is cheaper computed twice than moved between layouts
    (dequantize + ranges: 1584 instructions against 1720), and Triton 3.9 computes it once
    either way, allocating fewer registers when the value itself is stored (192 against 255
    at 128 x 128 x 256 for the GELU backward, where the other form spills 4 bytes)."""
    return triton_version() < (3, 9) and any(name in _TRANSCENDENTAL_OPS for name, *_ in ops)


@functools.lru_cache(maxsize=None)
def _gemm():
    """:mod:`sqcompile.kernels.triton_gemm`, imported on first use (it defines Triton kernels),
    then looked up without ``importlib`` on every launch."""
    return importlib.import_module(".triton_gemm", __package__)


def region_configs(ep: Optional[Epilogue] = None):
    """Autotuning configs of region kernels: four to six of the GEMM's Hopper configs
    (128x256, 128x128 and 64x128 tiles, BLOCK_K 128, and 128x128 with BLOCK_K 256, which
    waits for its MMAs half as often: :data:`~sqcompile.kernels.triton_gemm.CUDA_CONFIGS`;
    the 128x256 one only where :func:`wide_tile_fits`, the 128x128 one that fits two
    programs on an SM only where :func:`two_programs_fit`),
    or for thin operands (N or K of 64, as in attention) the small one
    (:func:`~sqcompile.kernels.triton_gemm.prune_configs` picks).  The 64x128 tile (4 warps)
    gives outputs with few columns more programs per wave: a ``[8192, 1024]`` output is 512
    tiles of 128x128, 3.9 waves on 132 SMs, or 1024 of 64x128, 7.8 (it spills for no
    epilogue; the 128x128 tile with 4 warps and BLOCK_K 64, which the plain GEMM also tries,
    spills 500-1100 bytes for heavy epilogues and is left out).  Every region signature is
    compiled once per config (7-12 s each for sm_90 on a 2-core CPU, measured with
    ``triton.compile``), so a model with ten distinct epilogues would spend minutes
    autotuning over all of the plain GEMM's."""
    gemm = _gemm()
    wide = [gemm.CUDA_CONFIGS[0]] if ep is None or wide_tile_fits(ep) else []
    two = [gemm.TWO_PROGRAMS_CONFIG] if ep is None or two_programs_fit(ep) else []
    return [*wide, gemm.CUDA_CONFIGS[2], *two, gemm.CUDA_CONFIGS[6], gemm.CUDA_CONFIGS[4], gemm.SMALL_CONFIG]


_CACHE: Dict[Tuple[str, Tuple[int, int]], RegionKernel] = {}
_STATS = {"hits": 0, "misses": 0}
_LOCK = threading.Lock()


def cache_info() -> Dict[str, int]:
    """``{"hits", "misses", "kernels"}`` of the in-process kernel cache."""
    with _LOCK:
        return {**_STATS, "kernels": len(_CACHE)}


def _same_file(path: str, text: str) -> bool:
    try:
        with open(path) as f:
            return f.read() == text
    except OSError:
        return False


def kernel_for(signature: str) -> RegionKernel:
    """The region kernel for an epilogue signature, generated and imported on first use."""
    version = triton_version()      # the generated code depends on it (store_from_reduced)
    with _LOCK:
        k = _CACHE.get((signature, version))
        if k is not None:
            _STATS["hits"] += 1
            return k
        _STATS["misses"] += 1
        ep = _parse(signature)
        source = generate_source(ep)
        digest = hashlib.sha256(source.encode()).hexdigest()[:20]
        name = f"sqcompile_region_{digest}"
        path = os.path.join(KERNEL_DIR, name + ".py")
        if not _same_file(path, source):
            os.makedirs(KERNEL_DIR, exist_ok=True)
            tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
            with open(tmp, "w") as f:
                f.write(source)
            os.replace(tmp, path)            # atomic: concurrent compiles never see half a file
        # triton.jit reads the function's source with inspect: the module must come from a file.
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        gemm = _gemm()
        fn = module.region_kernel
        if gemm.INTERPRETED:
            min_block_m = gemm.INTERPRETER_CONFIG["BLOCK_M"]
        else:
            import triton
            configs = region_configs(ep)
            min_block_m = min(c.kwargs["BLOCK_M"] for c in configs)
            fn = triton.autotune(configs, prune_configs_by={"early_config_prune": gemm.prune_configs},
                                 key=["N", "tune_key"])(fn)
        k = _CACHE[signature, version] = RegionKernel(ep, fn, path, min_block_m)
        return k


# --------------------------------------------------------------------------------------------
# Launch, and the custom op
# --------------------------------------------------------------------------------------------

def _output_shape(a: torch.Tensor, b: torch.Tensor) -> List[int]:
    return [*torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]), a.shape[-2], b.shape[-1]]


@functools.lru_cache(maxsize=4096)
def _input_strides(shape: Tuple[int, ...], strides: Tuple[int, ...], pattern: str,
                   shape3: Tuple[int, int, int]) -> Tuple[int, int, int]:
    """The ``[B, M, N]`` strides under which a region input of ``shape`` / ``strides`` (at most
    3 dims, broadcasting to ``[B, M, N]`` as torch broadcasts; 0 along broadcast dims) is
    read; its sizes must be 1 in the dims ``pattern`` does not name.  The kernel takes the
    input's own pointer with these strides, so no view is made per launch."""
    if len(shape) > 3:
        raise ValueError(f"region input of shape {shape} has more than 3 dims")
    pad = 3 - len(shape)
    padded, padded_strides = [1] * pad + list(shape), [0] * pad + list(strides)
    for dim, size, letter in zip(range(3), padded, "bmn"):
        if size != 1 and (letter not in pattern or size != shape3[dim]):
            raise ValueError(f"region input of shape {shape} does not match pattern {pattern!r} "
                             f"of the GEMM output {shape3}")
    return tuple(st if size != 1 else 0 for size, st in zip(padded, padded_strides))


def fused_int8_mm(a: torch.Tensor, b: torch.Tensor, inputs: Sequence[torch.Tensor], signature: str) -> List[torch.Tensor]:
    """Run the region kernel of ``signature`` on ``a @ b`` (int8, ``[..., M, K] @ [..., K, N]``)."""
    from .triton_quant import cdiv
    gemm = _gemm()
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"fused int8 GEMM takes int8 operands, got {a.dtype} and {b.dtype}")
    kernel = kernel_for(signature)
    ep = kernel.epilogue
    a3, b3, batch = gemm._as_batched(a, b)
    if not gemm.INTERPRETED and a3.is_cuda:
        a3, b3 = gemm._k_major(a3, b3)
    Bt, M, K = a3.shape
    N = b3.shape[2]
    shape = [*batch, M, N]
    outs = [torch.empty(shape, dtype=dt, device=a.device) for dt in ep.output_dtypes()]
    ranges = []
    if ep.ranges:            # one zero fill for all of them
        shapes = ep.range_shapes(Bt, M, N)
        zeros = torch.zeros(sum(b * n for b, n in shapes), dtype=torch.int32, device=a.device)
        ranges = [r.view(shape) for r, shape in zip(zeros.split([b * n for b, n in shapes]), shapes)]
    results = outs + [r.view(torch.float32) for r in ranges]
    if Bt * M * N == 0:
        return results + [torch.zeros(N, dtype=dt, device=a.device) for dt in ep.sum_dtypes()]
    # Column sums: a row of float32 partial sums per tile, enough rows for the smallest BLOCK_M
    # the kernel may run with (the rows the chosen one writes are summed after the launch).
    parts = (torch.empty(len(ep.sums), Bt * cdiv(M, kernel.min_block_m), N, dtype=torch.float32, device=a.device)
             if ep.sums else None)
    args = [a3, b3, M, N, K, *a3.stride(), *b3.stride(), gemm.tune_key(M, K, a3.stride(), b3.stride())]
    for t, (pattern, _) in zip(inputs, ep.inputs):
        args += [t, *_input_strides(tuple(t.shape), t.stride(), pattern, (Bt, M, N))]
    for o in outs:               # contiguous [*batch, M, N]
        args += [o, M * N, N, 1]
    for r in ranges:
        args += [r, r.stride(0)]
    if ep.sums:
        args += [parts, parts.stride(0)]
    block_m = []

    def grid(meta):
        block_m.append(meta["BLOCK_M"])     # the last call is the launch's (after any autotuning)
        return cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]), Bt
    # No FMA contraction: eager runs the epilogue as separate multiply and add kernels.
    kernel.fn[grid](*args, **(gemm.INTERPRETER_CONFIG if gemm.INTERPRETED else {"enable_fp_fusion": False}))
    rows = Bt * cdiv(M, block_m[-1]) if ep.sums else 0
    return results + [parts[i, :rows].sum(0).to(dt) for i, dt in enumerate(ep.sum_dtypes())]


@ops.custom_op("sqcompile::triton_fused_int8_mm")
def triton_fused_int8_mm(a: torch.Tensor, b: torch.Tensor, inputs: List[torch.Tensor], epilogue: str) -> List[torch.Tensor]:
    """``epilogue(a @ b)``: an int8 GEMM and the elementwise ops after it in one generated
    Triton kernel (``epilogue`` is an :class:`Epilogue` signature; see the module docstring).
    Returns the outputs, then the range outputs, then the column sums."""
    from .triton_ops import _check_device
    _check_device(a, b, *inputs)
    return fused_int8_mm(a, b, inputs, epilogue)


@triton_fused_int8_mm.register_fake
def _(a, b, inputs, epilogue):
    shape = _output_shape(a, b)
    ep = _parse(epilogue)
    return ([a.new_empty(shape, dtype=dt) for dt in ep.output_dtypes()] +
            [a.new_empty(s, dtype=torch.float32) for s in ep.range_shapes(math.prod(shape[:-2]), *shape[-2:])] +
            [a.new_empty(shape[-1], dtype=dt) for dt in ep.sum_dtypes()])


__all__ = ["Epilogue", "generate_source", "kernel_for", "cache_info", "fused_int8_mm", "KERNEL_DIR", "OPS"]
