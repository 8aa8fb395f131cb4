"""Triton int8 GEMM: ``int8 [B, M, K] @ int8 [B, K, N]`` accumulated exactly in int32.

One kernel, :func:`_int8_gemm_kernel`, in the style of Triton's matmul tutorial (grouped
program order for L2 reuse, ``tl.dot`` on int8 tiles with an int32 accumulator), with:

* explicit strides for every operand, so transposed views (``q.t()``, ``weight.t()``) are
  read in place, without copies;
* masked loads and stores on all three dims, so ``M``, ``N`` and ``K`` need not be
  multiples of the block sizes;
* the batch as the second grid dim (strides 0 for broadcast operands);
* one epilogue, :func:`_epilogue`, the single place where elementwise work after the integer
  accumulation goes: nothing (int32 out), or dequantization ``acc * sa[m] * sb[n]``, an
  optional bias ``+ bias[n]`` and an activation chosen by the ``ACTIVATION`` constexpr
  (``"none"``, ``"relu"``, ``"gelu"``, ``"silu"``), written in the output dtype.  A code
  generator fusing more epilogue ops (residual add, the next layer's quantizer) extends that
  function and its arguments; the main loop never changes.

On CUDA the kernel is autotuned over configs suited to Hopper's int8 tensor cores (128-256
wide tiles, ``BLOCK_K`` 64-256, 2-4 stages, 4-8 warps; see :data:`CUDA_CONFIGS` for why
``BLOCK_K`` 256); in the interpreter (CPU,
``TRITON_INTERPRET=1``) one small fixed config keeps tests fast.  The dot's operand layout
matters on Hopper: 8-bit wgmma wants both operands K-major, which is what a Linear's forward
gets (``x`` rows and ``weight.t()`` columns are contiguous along K); the backward GEMMs read
transposed operands, which the CUDA launcher copies to K-major first (:func:`_k_major`).

Limits: each operand matrix (one batch entry) must hold fewer than 2**31 elements (in-matrix
offsets are int32, the batch offset is int64); ``K`` up to :data:`sqcompile.ops.MAX_INT32_TERMS`
keeps int32 from overflowing (``ops.integer_matmul`` splits longer reductions).
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..config import env_flag
from .triton_quant import cast_rtne, cdiv, next_power_of_2

ACTIVATIONS = ("none", "relu", "gelu", "silu")
_INT32_ELEMENTS = 2 ** 31


@triton.jit
def _activation(x, ACTIVATION: tl.constexpr):
    if ACTIVATION == "relu":
        x = tl.maximum(x, 0.0)
    elif ACTIVATION == "gelu":   # exact (erf) GELU, as torch.nn.functional.gelu's default
        x = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACTIVATION == "silu":
        x = x * tl.sigmoid(x)
    return x


@triton.jit
def _epilogue(acc, offs_m, offs_n, batch, M, N, sa_ptr, sb_ptr, bias_ptr, stride_sab, stride_sam, stride_sbb,
              stride_sbn, SCALED: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr):
    """Everything between the int32 accumulator and the store (see the module docstring)."""
    if SCALED:
        sa = tl.load(sa_ptr + batch * stride_sab + offs_m * stride_sam, mask=offs_m < M, other=0.0)
        sb = tl.load(sb_ptr + batch * stride_sbb + offs_n * stride_sbn, mask=offs_n < N, other=0.0)
        out = acc.to(tl.float32) * sa.to(tl.float32)[:, None] * sb.to(tl.float32)[None, :]
        if HAS_BIAS:
            out += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        out = _activation(out, ACTIVATION)
    else:
        out = acc
    return out


@triton.jit
def int8_gemm_tile(a_ptr, b_ptr, M, N, K, stride_ab, stride_am, stride_ak, stride_bb, stride_bk, stride_bn,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """The GEMM main loop shared by :func:`_int8_gemm_kernel` and the region kernels
    :mod:`sqcompile.kernels.triton_fused` generates: this program's ``BLOCK_M x BLOCK_N``
    tile of ``A[b] @ B[b]`` as an exact int32 accumulator, with its row and column offsets,
    the batch index (int64) and its row block's index ``pid_m`` (the tile's first row over
    ``BLOCK_M``).  Grouped program order: GROUP_M row blocks share the B tiles they read
    while those are in L2."""
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + batch * stride_ab + (offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak)
    b_ptrs = b_ptr + batch * stride_bb + (offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn)
    mask_m = offs_m[:, None] < M
    mask_n = offs_n[None, :] < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=mask_m & (offs_k[None, :] < k_left), other=0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & mask_n, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc, offs_m, offs_n, batch, pid_m


@triton.jit(do_not_specialize=["tune_key"])
def _int8_gemm_kernel(a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, bias_ptr, M, N, K,
                      stride_ab, stride_am, stride_ak, stride_bb, stride_bk, stride_bn,
                      stride_cb, stride_cm, stride_cn, stride_sab, stride_sam, stride_sbb, stride_sbn, tune_key,
                      SCALED: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """``C[b] = epilogue(A[b] @ B[b])`` with an int32 accumulator.

    Grid: ``(cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), batch)``.  ``tune_key``: the autotuning key
    (:func:`tune_key`), unused by the kernel."""
    acc, offs_m, offs_n, batch, _ = int8_gemm_tile(a_ptr, b_ptr, M, N, K, stride_ab, stride_am, stride_ak, stride_bb,
                                                   stride_bk, stride_bn, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    out = _epilogue(acc, offs_m, offs_n, batch, M, N, sa_ptr, sb_ptr, bias_ptr, stride_sab, stride_sam,
                    stride_sbb, stride_sbn, SCALED, HAS_BIAS, ACTIVATION)
    c_ptrs = c_ptr + batch * stride_cb + (offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn)
    tl.store(c_ptrs, cast_rtne(out, c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _relayout_kernel(x_ptr, y_ptr, R, C, sxb, sxr, sxc, syb, syr, syc,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """``y[b, r, c] = x[b, r, c]`` between two layouts, one ``[BLOCK_R, BLOCK_C]`` tile per
    program.  When one side is contiguous along ``r`` and the other along ``c`` (a transpose),
    Triton's coalescing gives the load and the store their own layouts and moves the tile
    between them through shared memory, so both sides stream whole lines.

    Grid: ``(cdiv(R, BLOCK_R), cdiv(C, BLOCK_C), B)``."""
    b = tl.program_id(2).to(tl.int64)
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_r < R)[:, None] & (offs_c < C)[None, :]
    tile = tl.load(x_ptr + b * sxb + offs_r[:, None] * sxr + offs_c[None, :] * sxc, mask=mask)
    tl.store(y_ptr + b * syb + offs_r[:, None] * syr + offs_c[None, :] * syc, tile, mask=mask)


INTERPRETED = type(_int8_gemm_kernel).__name__ == "InterpretedFunction"

# Hopper int8 wgmma: 128-256 wide tiles, BLOCK_K 64-256, 2-4 stages in shared memory.
#
# Triton issues an int8 wgmma synchronously: its pipeliner makes a dot "properly async" (the
# next iteration's MMAs queued behind this one's) only for float32 accumulators, so every
# iteration of the K loop ends by waiting for its MMAs to drain (``wgmma.wait_group 0`` in the
# PTX, where an fp16 or fp8 GEMM waits with 1 outstanding; seen with Triton 3.6 and 3.9).
# The BLOCK_K 256 configs halve the number of those waits per tile (twice the MMAs per wait)
# at the cost of fewer stages in the 227 KB of shared memory; autotuning picks.
CUDA_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_stages=4, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 256, "GROUP_M": 8}, num_stages=2, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 256, "GROUP_M": 8}, num_stages=3, num_warps=8),
    # Two programs per SM: 96 KB of shared memory and, for a light epilogue (dequantize, bias,
    # ShiftQuant ranges), 128 registers a thread (sm_90 ptxas), so one program's epilogue
    # runs while the other's MMAs do.  With one program per SM (the configs above) the
    # epilogue follows the MMAs on the same warps: at K 1024 a 128 x 128 tile's MMAs take
    # ~2.2 us of an SM and its epilogue ~1-3 us.
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_stages=3, num_warps=8),
]
TWO_PROGRAMS_CONFIG = CUDA_CONFIGS[7]
# For operands too thin for any of those (attention's head dim of 64 as N or K).
SMALL_CONFIG = triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4)
INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}


def autotune_enabled() -> bool:
    """``SQCOMPILE_AUTOTUNE`` (read at each new problem shape): ``1`` (default) times every
    fitting config once per shape and layout and keeps the fastest; ``0`` takes the first
    fitting one untimed, which cuts compile time (each config of each kernel is compiled
    before it is timed) at some cost in speed: for tests and quick runs."""
    return env_flag("SQCOMPILE_AUTOTUNE", True, "1: autotune, 0: the first fitting config")


def prune_configs(configs, named_args, **kwargs):
    """Autotuning candidates that fit the problem: tiles no wider than ``N`` and ``K`` (each
    rounded up to a power of two, at least 64), else :data:`SMALL_CONFIG`; only the first of
    them when :func:`autotune_enabled` says no.  A 128-wide tile over a 64-wide operand
    wastes half of every MMA; measured on the H200, the attention GEMMs of a transformer
    block ran slower than their bf16 counterparts with the large tiles."""
    N, K = named_args["N"], named_args["K"]

    def fits(c):
        return (c.kwargs["BLOCK_N"] <= max(64, next_power_of_2(N))
                and c.kwargs["BLOCK_K"] <= max(64, next_power_of_2(K)))
    fitting = [c for c in configs if c is not SMALL_CONFIG and fits(c)] or [SMALL_CONFIG]
    return fitting if autotune_enabled() else fitting[:1]


def tune_key(M: int, K: int, a_strides, b_strides) -> int:
    """With ``N``, the autotuning key of an int8 GEMM (and of a region kernel): ``M`` and
    ``K`` rounded up to powers of two and the operands' layout (which of A's and B's two
    inner strides are 1: it decides the best config), packed into one small int.  ``M``
    counts tokens, and ``K`` does in a ``dW`` GEMM: with dynamic shapes (batches of changing
    length) an exact key would time every config again for each new size; rounded, each
    power of two autotunes once.  ``N``, a layer's width, stays exact."""
    layout = ((a_strides[-2] == 1) | (a_strides[-1] == 1) << 1 | (b_strides[-2] == 1) << 2
              | (b_strides[-1] == 1) << 3)
    return ((max(M, 1) - 1).bit_length() * 64 + (max(K, 1) - 1).bit_length()) * 16 + layout


if INTERPRETED:
    _gemm = _int8_gemm_kernel
else:
    _gemm = triton.autotune([*CUDA_CONFIGS, SMALL_CONFIG], prune_configs_by={"early_config_prune": prune_configs},
                            key=["N", "tune_key"])(_int8_gemm_kernel)


@functools.lru_cache(maxsize=4096)
def _batch_shape(a_batch: Tuple[int, ...], b_batch: Tuple[int, ...]) -> Tuple[int, ...]:
    """The broadcast batch shape (``torch.broadcast_shapes`` costs ~10 us a launch)."""
    return tuple(torch.broadcast_shapes(a_batch, b_batch))


def _as_batched(a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, tuple]:
    """``[..., M, K]``, ``[..., K, N]`` -> ``[Bt, M, K]``, ``[Bt, K, N]`` views (batch dims
    broadcast; a copy only when broadcast batch dims do not merge) and the batch shape."""
    if a.dim() < 2 or b.dim() < 2:
        raise ValueError(f"int8 GEMM needs operands with >= 2 dims, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"int8 GEMM: inner dims differ: {tuple(a.shape)} @ {tuple(b.shape)}")
    batch = _batch_shape(tuple(a.shape[:-2]), tuple(b.shape[:-2]))
    bt = math.prod(batch)
    a3, b3 = (t if t.dim() == 3 and tuple(t.shape[:1]) == batch else
              t.expand(*batch, *t.shape[-2:]).reshape(bt, *t.shape[-2:]) for t in (a, b))
    for t in (a3, b3):
        if t.shape[1] * t.shape[2] >= _INT32_ELEMENTS:
            raise ValueError("int8 GEMM: one operand matrix holds 2**31 elements or more")
    return a3, b3, tuple(batch)


def relayout(x3: torch.Tensor, out3: torch.Tensor) -> torch.Tensor:
    """Copy the 3-D ``x3`` into ``out3`` (same shape, any layouts) with :func:`_relayout_kernel`;
    returns ``out3``.  torch's strided copy moves one byte per thread and ran an int8
    transpose at ~8% of an H200's bandwidth; the tiled kernel streams both sides."""
    B, R, C = x3.shape
    if x3.numel() == 0:
        return out3
    block = 32 if INTERPRETED else 64
    if cdiv(C, block) > 65535 or B > 65535:     # grid dims 1 and 2 are 16-bit on CUDA
        return out3.copy_(x3)
    _relayout_kernel[(cdiv(R, block), cdiv(C, block), B)](
        x3, out3, R, C, *x3.stride(), *out3.stride(), BLOCK_R=block, BLOCK_C=block, num_warps=4)
    return out3


def _k_major(a3: torch.Tensor, b3: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Operands with K contiguous (``A`` row-major, ``B`` column-major), copying if needed.

    Hopper's 8-bit wgmma reads both operands K-major from shared memory; for any other
    layout Triton transposes tiles through registers and the GEMM runs ~4x slower (measured
    at 8192^3 on an H200: 257 against 1082 TFLOP/s), while one copy (:func:`relayout`) moves
    2 bytes per element.  The kernel itself takes any strides (the interpreter path keeps them)."""
    if a3.stride(2) != 1 and a3.shape[2] > 1:
        a3 = relayout(a3, torch.empty(a3.shape, dtype=a3.dtype, device=a3.device))
    if b3.stride(1) != 1 and b3.shape[1] > 1:
        Bt, K, N = b3.shape
        b3 = relayout(b3, torch.empty((Bt, N, K), dtype=b3.dtype, device=b3.device).transpose(1, 2))
    return a3, b3


def _launch(a3, b3, c3, sa3=None, sb3=None, bias=None, activation: str = "none") -> None:
    if not INTERPRETED and a3.is_cuda:
        a3, b3 = _k_major(a3, b3)
    Bt, M, K = a3.shape
    N = b3.shape[2]
    if c3.numel() == 0:
        return                      # (K == 0 runs no loop iteration: the epilogue sees 0)
    scaled = sa3 is not None
    dummy = c3
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]), Bt)  # noqa: E731
    extra = INTERPRETER_CONFIG if INTERPRETED else {}
    _gemm[grid](
        a3, b3, c3, sa3 if scaled else dummy, sb3 if scaled else dummy, bias if bias is not None else dummy,
        M, N, K, *a3.stride(), *b3.stride(), *c3.stride(),
        sa3.stride(0) if scaled else 0, sa3.stride(1) if scaled else 0,
        sb3.stride(0) if scaled else 0, sb3.stride(2) if scaled else 0, tune_key(M, K, a3.stride(), b3.stride()),
        SCALED=scaled, HAS_BIAS=bias is not None, ACTIVATION=activation, **extra)


def int8_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``int8 [..., M, K] @ int8 [..., K, N]`` -> int32 ``[..., M, N]`` (contiguous)."""
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"int8_mm takes int8 operands, got {a.dtype} and {b.dtype}")
    a3, b3, batch = _as_batched(a, b)
    c3 = torch.empty((a3.shape[0], a3.shape[1], b3.shape[2]), dtype=torch.int32, device=a.device)
    _launch(a3, b3, c3)
    return c3.reshape(*batch, a3.shape[1], b3.shape[2])


def scaled_int8_mm(qa: torch.Tensor, sa_row: torch.Tensor, qb: torch.Tensor, sb_col: torch.Tensor,
                   bias: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.float32,
                   activation: str = "none") -> torch.Tensor:
    """``activation((qa @ qb) * sa_row * sb_col + bias)`` in ``out_dtype``, dequantized in the
    GEMM's epilogue (float32 arithmetic).

    ``sa_row`` broadcasts to ``[..., M, 1]`` (e.g. the scale ``ops.quantize`` returns for
    ``keep_dims=[0, 1]``; a scalar is a per-tensor scale; a 1-D tensor of length M is one
    scale per row), ``sb_col`` to ``[..., 1, N]`` (1-D: one per column), ``bias`` is ``[N]``.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if qa.dtype != torch.int8 or qb.dtype != torch.int8:
        raise TypeError(f"scaled_int8_mm takes int8 operands, got {qa.dtype} and {qb.dtype}")
    a3, b3, batch = _as_batched(qa, qb)
    Bt, M, _ = a3.shape
    N = b3.shape[2]
    if sa_row.dim() == 1 and sa_row.numel() == M:
        sa_row = sa_row[:, None]
    if sb_col.dim() == 1:
        sb_col = sb_col[None, :]
    sa3 = sa_row.expand(*batch, M, 1).reshape(Bt, M, 1)
    sb3 = sb_col.expand(*batch, 1, N).reshape(Bt, 1, N)
    if bias is not None:
        bias = bias.reshape(N).contiguous()
    c3 = torch.empty((Bt, M, N), dtype=out_dtype, device=qa.device)
    _launch(a3, b3, c3, sa3, sb3, bias, activation)
    return c3.reshape(*batch, M, N)


__all__ = ["int8_mm", "scaled_int8_mm", "int8_gemm_tile", "relayout", "ACTIVATIONS", "CUDA_CONFIGS", "INTERPRETED"]
