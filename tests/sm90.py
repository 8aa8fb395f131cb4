"""Compile Triton kernels for Hopper (sm_90) without a GPU, for the slow tests.

Triton's CPU interpreter accepts code the GPU compiler may reject or compile badly, so the
tests also compile the kernels for sm_90 in a subprocess without ``TRITON_INTERPRET`` and read
what ``ptxas -v`` says of them (registers, spilled bytes).  The kernels are specialized the way
Triton's JIT specializes a real launch: integer arguments equal to 1 become constants (a
contiguous operand's unit stride), and every other pointer and ``i32`` argument carries the
16-divisibility hint aligned tensors and sizes get.  Without those hints the same kernels show
hundreds of spilled bytes that a real launch does not have.

Use from a subprocess script: ``import sm90`` (:func:`run` puts this directory on the path).
"""
from __future__ import annotations

import multiprocessing
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")


def compile_sm90(fn, signature: dict, constexprs: dict, *, num_warps: int, num_stages: int = 3,
            fp_fusion: bool = True) -> dict:
    """``{"cubin": bytes, "ptx": str, "registers": int, "spilled": int, "shared": int}``
    (registers / spilled bytes -1 when Triton ships no ``ptxas-blackwell``; shared memory per
    program in bytes).  ``signature``: argument -> Triton type
    for the runtime arguments; ``constexprs``: argument -> value (unit strides included)."""
    while not isinstance(fn, JITFunction):         # under an autotuner
        fn = fn.fn
    names = fn.arg_names
    sig = {k: ("constexpr" if k in constexprs else v) for k, v in signature.items()}
    sig.update({k: "constexpr" for k in constexprs})
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k, v in sig.items()
             if v != "constexpr" and (v.startswith("*") or v == "i32")}
    out = triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                         target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": fp_fusion})
    result = {"cubin": out.asm["cubin"], "ptx": out.asm["ptx"], "registers": -1, "spilled": -1,
              "shared": out.metadata.shared}
    if os.path.exists(PTXAS):
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(out.asm["ptx"])
        try:
            log = subprocess.run([PTXAS, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                                 capture_output=True, text=True, check=True).stderr
        finally:
            os.unlink(f.name)
        result["registers"] = max(int(n) for n in re.findall(r"Used (\d+) registers", log))
        result["spilled"] = sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", log))
    return result


_JOBS: list = []


def _run_job(i: int):
    fn, item = _JOBS[i]
    return fn(item)


def parallel(fn, items) -> list:
    """``[fn(item) for item in items]``, in forked worker processes, one per CPU: compiling for
    sm_90 is CPU-bound and each kernel compiles on its own (the slow tests' compiles take
    half the time on two cores).  ``fn`` and ``items`` reach the workers through the fork, so
    they need not be picklable; the results must be."""
    items = list(items)
    workers = min(len(items), os.cpu_count() or 1)
    if workers <= 1:
        return [fn(item) for item in items]
    _JOBS[:] = [(fn, item) for item in items]
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            return pool.map(_run_job, range(len(items)), chunksize=1)
    finally:
        _JOBS.clear()


CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _sass(cubin: bytes) -> list:
    """``[(address, instruction text)]`` of a compiled kernel (``cuobjdump -sass``, which
    Triton ships); ``[]`` when there is no ``cuobjdump``."""
    if not os.path.exists(CUOBJDUMP):
        return []
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        listing = subprocess.run([CUOBJDUMP, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    return [(int(m.group(1), 16), m.group(2)) for m in
            (re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line) for line in listing.splitlines()) if m]


def sass_loops(cubin: bytes) -> list:
    """The instruction counts of a compiled kernel's loops, in code order: each backward
    branch closes one, from its target to the branch (an outer loop's count includes its
    inner loops')."""
    sass = _sass(cubin)
    loops = []
    for address, text in sass:
        m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        target = int(m.group(1), 16) if m else address
        if target < address:
            loops.append(sum(target <= a <= address for a, _ in sass))
    return loops


def sass_counts(cubin: bytes) -> dict:
    """``{"instructions", "MUFU", "CALL", "FFMA", ...}``: the SASS instructions of a compiled
    kernel (:func:`_sass`) in all and by opcode, without modifiers (``{}`` when there is no
    ``cuobjdump``).  Static counts: a loop body counts once (:func:`sass_loops` counts those)."""
    sass = _sass(cubin)
    if not sass:
        return {}
    ops = [re.sub(r"^(@!?U?P\w+\s+)", "", text).split()[0].split(".")[0] for _, text in sass]
    counts = {"instructions": len(ops)}
    for op in ops:
        counts[op] = counts.get(op, 0) + 1
    return counts


_VIEW = {"C": "i32", "L": "i32", "stride_a": "i32", "stride_c": "i32"}
# The quantize kernels' other layout arguments as a launch over a dense view passes them: the
# outer axis in one level (``A2`` 1, a constant after specialization), the output at the
# input's strides (``SAME_LAYOUT``: its stride arguments unused).  ``_absmax_kernel`` takes
# ``A2`` and ``stride_a2`` only.
QUANT_LAYOUT = {"stride_a2": "i32", "q_stride_a": "i32", "q_stride_a2": "i32", "q_stride_c": "i32", "q_stride_l": "i32"}
QUANT_LAYOUT_CONSTANTS = {"A2": 1, "SAME_LAYOUT": True}     # also the ShiftQuant pair's, as a Linear's dY launches it
# The ShiftQuant pair's kernels as shiftquant_pair launches them without grad_outer_scale
# (both quantizers; ``OUTER`` 1 or 2 for the range kernel's passes, True for the quantize
# kernel, with it).
PAIR_CONSTANTS = {"OUTER": False, "COLS": True, "ROWS": True}
PAIR_RANGE_CONSTANTS = {"OUTER": 0, "COL_MAX": True, "ROW_MAX": True}
PAIR_RANGE_SIGNATURE = {"x_ptr": "*bf16", "ranges_ptr": "*i32", "pc_ptr": "*fp32", "pr_ptr": "*fp32",
                        "outer_ptr": "*fp32", "M": "i32", "N": "i32", "stride_a": "i32", "stride_m": "i32",
                        "stride_a2": "i32", "m_per_split": "i32"}
# Runtime arguments of the kernels that ptxas tests and benchmarks/sass_counts.py compile, as
# launched (bf16 inputs); each kernel's unit strides are constexprs the caller adds.
SIGNATURES = {
    "quantize_fused": {"x_ptr": "*bf16", "q_ptr": "*i8", "scale_ptr": "*fp32", **_VIEW, **QUANT_LAYOUT,
                       "seed_ptr": "*i64"},
    # plus out_stride_c or out_stride_l (the other one is 1)
    "shiftquant": {"x_ptr": "*bf16", "e_ptr": "*i8", "range_ptr": "*fp32", "rmax_ptr": "*fp32", "base_ptr": "*fp32",
                   "prescale_ptr": "*fp32", **_VIEW, "n_cblocks": "i32", "seed_ptr": "*i64"},
    # plus er_stride_m or er_stride_n (the other one is 1)
    "shiftquant_pair": {"x_ptr": "*bf16", "ec_ptr": "*i8", "er_ptr": "*i8", "ranges_ptr": "*fp32", "bc_ptr": "*fp32",
                        "br_ptr": "*fp32", "pc_ptr": "*fp32", "pr_ptr": "*fp32", "outer_ptr": "*fp32",
                        "sc_ptr": "*fp32", "sr_ptr": "*fp32", "M": "i32", "N": "i32",
                        "stride_a": "i32", "stride_m": "i32", "stride_a2": "i32", "out_stride_a": "i32",
                        "ec_stride_m": "i32", "n_mblocks": "i32", "seed_c_ptr": "*i64", "seed_r_ptr": "*i64"},
    "l1_norm": {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*bf16", "q_ptr": "*i8",
                "s_ptr": "*fp32", "mean_ptr": "*fp32", "inv_ptr": "*fp32", "qy_ptr": "*i8", "sy_ptr": "*fp32",
                "R": "i32", "L": "i32", "l1_scale": "fp32", "eps": "fp32"},
    "l1_norm_backward": {"dy_ptr": "*bf16", "q_ptr": "*i8", "s_ptr": "*fp32", "mean_ptr": "*fp32", "inv_ptr": "*fp32",
                         "w_ptr": "*bf16", "dx_ptr": "*bf16", "dw_ptr": "*fp32", "db_ptr": "*fp32",
                         "seed_ptr": "*i64", "res_ptr": "*bf16", "cr_ptr": "*i32", "rr_ptr": "*fp32",
                         "cs_ptr": "*fp32", "R": "i32", "L": "i32", "l1_scale": "fp32", "n_programs": "i32"},
    # K-major operands (stride_ak = stride_bk = 1), output and column scales contiguous along N
    "int8_gemm": {"a_ptr": "*i8", "b_ptr": "*i8", "c_ptr": "*bf16", "sa_ptr": "*fp32", "sb_ptr": "*fp32",
                  "bias_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32",
                  **{s: "i32" for s in ("stride_ab", "stride_am", "stride_bb", "stride_bn", "stride_cb", "stride_cm",
                                        "stride_sab", "stride_sam", "stride_sbb", "tune_key")}},
}
GEMM_UNIT_STRIDES = {"stride_ak": 1, "stride_bk": 1, "stride_cn": 1, "stride_sbn": 1}


# Generated region kernels (``sqcompile.kernels.triton_fused``) the slow tests and
# ``benchmarks/sass_counts.py`` compile: name -> (epilogue program ``(inputs, ops, outputs[,
# ranges])``, whether the 128x256 tile is among its configs).  The transformer block's
# kinds: a Linear's dequantize + bias, ``fc1`` with its GELU (the pre-activation kept for the
# backward), ``fc1``'s gradient through the GELU backward with both ShiftQuant ranges, and
# a Linear's ``dX`` (scaled) with both ranges.  ``fc1``'s gradient region also sums it over
# the tokens (``fc1``'s bias gradient).
REGION_PROGRAMS = {
    "dequant+bias": (((("bm", "f32"), ("n", "f32"), ("n", "bf16")),
                      (("convert", "f32", "acc"), ("mul", "f32", "v0", "in0"), ("mul", "f32", "v1", "in1"),
                       ("convert", "bf16", "v2"), ("add", "bf16", "v3", "in2")), ("v4",)), True),
    "bias+gelu, side output": (((("bm", "f32"), ("n", "f32"), ("n", "bf16")),
                                (("convert", "f32", "acc"), ("mul", "f32", "v0", "in0"), ("mul", "f32", "v1", "in1"),
                                 ("convert", "bf16", "v2"), ("add", "bf16", "v3", "in2"), ("gelu", "bf16", "v4")),
                                ("v5", "v4")), False),
    "gelu_backward+ranges+sum": (((("", "f32"), ("bmn", "bf16")),
                                  (("convert", "f32", "acc"), ("mul", "f32", "v0", "in0"), ("convert", "bf16", "v1"),
                                   ("gelu_backward", "bf16", "v2", "in1")), ("v3",), (("v3", "n"), ("v3", "m")),
                                  (("v3", "bf16"),)), False),
    "dequant+ranges": (((("", "f32"),), (("convert", "f32", "acc"), ("mul", "f32", "v0", "in0"), ("convert", "bf16", "v1")),
                        ("v2",), (("v2", "n"), ("v2", "m"))), False),
}


def region_arguments(ep) -> tuple:
    """``(signature, unit strides)`` of the region kernel for the epilogue ``ep`` as launched:
    K-major int8 operands, every tensor input and output contiguous along N."""
    ptr = {"f32": "*fp32", "bf16": "*bf16", "f16": "*fp16", "i32": "*i32"}
    sig = {"a_ptr": "*i8", "b_ptr": "*i8", "M": "i32", "N": "i32", "K": "i32"}
    sig.update({f"stride_{s}": "i32" for s in ("ab", "am", "bb", "bn")}, tune_key="i32")
    ones = {"stride_ak": 1, "stride_bk": 1}
    for kind, specs in (("in", ep.inputs), ("out", [("bmn", ep.dtype_of(r)) for r in ep.outputs])):
        for i, (pattern, dtype) in enumerate(specs):
            sig[f"{kind}{i}_ptr"] = ptr[dtype]
            for d in "bmn":             # strides of dims the value varies along; the rest are unused
                if d == "n" and d in pattern:
                    ones[f"{kind}{i}_sn"] = 1
                else:
                    sig[f"{kind}{i}_s{d}"] = "i32"
    for i in range(len(ep.ranges)):
        sig.update({f"rng{i}_ptr": "*i32", f"rng{i}_sb": "i32"})
    if ep.sums:
        sig.update({"part_ptr": "*fp32", "part_ss": "i32"})
    return sig, ones


def attention_kernels() -> dict:
    """The fused attention's kernels as launched: name -> ``(kernel, signature, constexprs)``
    for the runtime arguments and the unit strides (add the tile, ``BLOCK_D``, ``CAUSAL`` and
    ``MASK``).  A boolean padding mask ``[B, 1, 1, S]`` (uint8, keys contiguous); bf16 inputs;
    each operand's strides as the launcher passes them, its contiguous one a constant: the
    forward reads ``qV`` with the keys contiguous (the K-major operand of ``qP qV``), the
    backward ``qQ`` / ``qK`` and ``dO``'s row quantization likewise; the backward writes a fused
    projection's gradient with its ShiftQuant ranges and its bias gradient's partial sums
    (``RANGES``, ``SUMS``, head dims up to 64), as in a transformer block; without
    ``grad_outer_scale`` (``OUTER``: set it to 2 for the ranges kernel's second pass with it,
    True for ``dq``), but for ``dkdv_outer``, the ``dK``/``dV`` kernel with it."""
    import triton.language as tl
    from sqcompile.kernels import triton_attention as ta

    qkv = (("q", "m", "d"), ("k", "n", "d"), ("v", "n", "d"))
    specs = {   # name -> (kernel, pointers, operand layouts (name, sequence dim, contiguous dim), constexprs)
        "fwd": (ta._attention_fwd_kernel, {"sv_ptr": "*fp32", "o_ptr": "*bf16", "stats_ptr": "*fp32", "H_o": "i32",
                                            "s_oh": "i32"},     # the output stored [B, L, H, D]
                (("q", "m", "d"), ("k", "n", "d"), ("v", "n", "n"), ("o", "m", "d")), {"QMAX": 7}),
        "ranges": (ta._attention_ranges_kernel, {"stats_ptr": "*fp32", "eo_ptr": "*i8", "bo_ptr": "*fp32",
                                                 "delta_ptr": "*fp32", "ranges_ptr": "*i32", "outer_ptr": "*fp32"},
                   (*qkv, ("e", "m", "d")), {"OUTER": 0}),
        "dkdv": (ta._attention_bwd_kv_kernel, {"qt_ptr": "*i8", "stats_ptr": "*fp32", "eoc_ptr": "*i8",
                                               "boc_ptr": "*fp32", "eor_ptr": "*i8", "bor_ptr": "*fp32",
                                               "delta_ptr": "*fp32", "ranges_ptr": "*fp32", "outer_ptr": "*fp32",
                                               "seed_ptr": "*i64", "dk_ptr": "*bf16", "dv_ptr": "*bf16", "H_d": "i32", "s_dh": "i32",
                                               "rng_ptr": "*i32", "N_feat": "i32", "f0_k": "i32", "f0_v": "i32",
                                               "sum_ptr": "*fp32", "n_slots": "i32"},
                 (*qkv, ("qt", "m", "m"), ("e", "m", "d"), ("r", "m", "m"), ("d", "n", "d")),
                 {"QMAX": 7, "GRAD_QMAX": 7, "GROUPS": 4, "STOCHASTIC": True, "RANGES": True, "SUMS": True,
                  "SLOT": 64, "OUTER": False}),
        "dq": (ta._attention_bwd_q_kernel, {"kt_ptr": "*i8", "stats_ptr": "*fp32", "eoc_ptr": "*i8",
                                            "boc_ptr": "*fp32", "delta_ptr": "*fp32", "ranges_ptr": "*fp32",
                                            "outer_ptr": "*fp32", "seed_ptr": "*i64", "dq_ptr": "*bf16", "H_d": "i32", "s_dh": "i32",
                                            "rng_ptr": "*i32", "N_feat": "i32", "f0_q": "i32", "sum_ptr": "*fp32",
                                            "n_slots": "i32"},
               (*qkv, ("kt", "n", "n"), ("e", "m", "d"), ("d", "m", "d")),
               {"GRAD_QMAX": 7, "GROUPS": 4, "STOCHASTIC": True, "COLUMNS_NOISE_ALONG_S": True, "RANGES": True,
                "SUMS": True, "SLOT": 64, "OUTER": False}),
    }
    kernels = {}
    for name, (kernel, pointers, layouts, consts) in specs.items():
        strides, unit = {}, {"s_ms": 1}
        for p, seq, contiguous in layouts:
            strides[f"s_{p}b"] = "i32"
            for dim in (seq, "d"):
                if dim == contiguous:
                    unit[f"s_{p}{dim}"] = 1
                else:
                    strides[f"s_{p}{dim}"] = "i32"
        signature = {"q_ptr": "*i8", "k_ptr": "*i8", "v_ptr": "*i8", "mask_ptr": "*u8", "H_in": "i32",
                     "s_mo": "i32", "s_mi": "i32", "s_ml": "i32", "sq_ptr": "*fp32", "sk_ptr": "*fp32", **pointers,
                     "L": "i32", "S": "i32", "D": "i32", "BH": "i32", "scale": "fp32", "tune_key": "i32",
                     **strides}
        kernels[name] = (kernel, signature, {**unit, **consts, "DTYPE": tl.bfloat16})
    kernel, signature, consts = kernels["dkdv"]      # its own tiles (``triton_attention.GPU_TILES``)
    kernels["dkdv_outer"] = (kernel, signature, dict(consts, OUTER=True))
    return kernels


def run(script: str, *args: str, timeout: int = 600) -> str:
    """Run ``script`` (Python source that imports this module) in a process without
    ``TRITON_INTERPRET``; its standard output."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.abspath(__file__)), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(proc.stderr[-3000:])
    return proc.stdout
