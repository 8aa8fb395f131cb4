"""int8 GEMMs on Intel AMX tiles: our own kernel (``amx_int8.c``), built with the system C
compiler on first use and called through ``ctypes``.

Why our own: ``torch._int_mm`` on CPU is oneDNN's ``gemm_api`` s8s8s32, which stays on the
AVX-512 VNNI units for most shapes; oneDNN reaches AMX-int8 only through its primitive API
with prepacked weights (``qlinear_prepack``, about 5 ns per element per call, which training
would pay on every step because every operand is new).  ``amx_int8.c`` packs what it needs
itself on every call (B into the tiles' VNNI order, A only when it cannot be read in place;
vectorized passes, about as cheap as a copy) and runs ``TDPBSSD`` on 2x2 tile blocks, so every
operand may be fresh on every call.  The result is the exact int32 product, bit-equal to
``torch._int_mm``.

Engine choice: ``SQCOMPILE_CPU_GEMM`` in the environment, read at each call:

* ``auto`` (default): AMX when :func:`status` says it is usable and the product has at least
  :data:`MIN_ROWS` rows, else oneDNN ``_int_mm`` where the CPU has VNNI (its int8 dot
  products), else ``avx2`` where the CPU has AVX2, else ``float``;
* ``amx``: AMX, and a ``RuntimeError`` saying why when it is not usable;
* ``onednn``: always ``torch._int_mm``;
* ``vnni``: the VNNI build of that kernel (:mod:`.avx2`, ``VPDPBUSD`` on ZMM registers: CPUs
  with AVX-512 VNNI), and a ``RuntimeError`` when it is not usable.  ``auto`` never takes it
  for plain GEMMs (oneDNN's ``_int_mm`` was faster on a Zen 4 core), but takes it for the
  stride-1 convolutions' implicit GEMMs where it would take oneDNN (:func:`conv_engine`);
* ``avx2``: our AVX2 kernel (:mod:`.avx2`, ``VPMADDUBSW``), and a ``RuntimeError`` when it
  is not usable; products of two 8-bit operands, which it refuses, on ``float``;
* ``float``: the exact product as float32 GEMMs (:func:`sqcompile.kernels.cpu.float_int8_mm`).

Decision: without VNNI, oneDNN's s8s8 ``_int_mm`` has no int8 units to run on and takes 35x
the float32 GEMM's time (``[4096, 512] @ [512, 2048]``, 1 thread, AMD EPYC with AVX2: 7.8 s
against 0.22 s, 2026-12-02), so ``auto`` takes ``avx2`` there (about 3x the float32 GEMM),
else ``float`` (int8 values and their products are exact in float32, and so are sums of up to
1024 of them, so the float GEMM gives the same int32 result).

Any other value raises a ``ValueError`` naming the variable.

The stride-1 convolutions' implicit GEMMs (:func:`int8_conv`, :func:`int8_conv_weight`: tap
tables instead of im2col columns) are built here and run on this kernel or, with
``gemm="vnni"`` / ``gemm="avx2"``, on a build of the AVX2 one, which takes the same tables.

Outputs come from :data:`sqcompile.kernels.pool.OUTPUTS` (recycled buffers, no page faults).
Built and cached as :mod:`.native` builds our C kernels (about a second, once).
"""
from __future__ import annotations

import ctypes
import functools
import itertools
import math
import os
from typing import List, Optional, Sequence, Tuple

import torch

from .. import ops
from . import avx2, native, pool

ENGINE_VARIABLE = "SQCOMPILE_CPU_GEMM"
ENGINE_CHOICES = ("auto", "amx", "onednn", "vnni", "avx2", "float")
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni"})
"""CPU flags (either one) of the int8 dot-product instructions oneDNN's ``_int_mm`` runs on."""
SOURCE = os.path.join(os.path.dirname(__file__), "amx_int8.c")
# -fopenmp links libgomp.so.1: the copy torch already loaded has that soname, so the kernel
# and torch share one OpenMP runtime and thread pool.
CFLAGS = ["-O2", "-fPIC", "-shared", "-fopenmp", "-mamx-tile", "-mamx-int8", "-mavx512f", "-mavx512bw"]


def requested_engine() -> str:
    """The engine ``SQCOMPILE_CPU_GEMM`` asks for (``auto`` when unset)."""
    value = os.environ.get(ENGINE_VARIABLE, "auto").strip().lower() or "auto"
    if value not in ENGINE_CHOICES:
        raise ValueError(f"environment variable {ENGINE_VARIABLE}={os.environ[ENGINE_VARIABLE]!r}: "
                         f"expected one of {', '.join(ENGINE_CHOICES)}")
    return value


# Under ``auto``, products with fewer rows than this go to oneDNN: the AMX kernel packs B on
# every call (~0.2 ns per byte) and has a larger fixed cost, which a few rows do not repay
# (measured for K x N = 512 x 2048: 1 row 260 vs 161 us, 32 rows 265 vs 237, 128 rows 528 vs 736).
MIN_ROWS = 32


def has_vnni() -> bool:
    """Whether this CPU has the int8 dot products (:data:`VNNI_FLAGS`) oneDNN's ``_int_mm`` needs
    to be fast."""
    return bool(VNNI_FLAGS & native.cpu_flags())


def engine(rows: Optional[int] = None) -> str:
    """The engine CPU int8 GEMMs run on now: ``"amx"``, ``"onednn"``, ``"vnni"``, ``"avx2"``
    or ``"float"`` (for a product with ``rows`` rows per matrix, when given)."""
    want = requested_engine()
    if want in ("onednn", "float"):
        return want
    if want in avx2.VARIANTS:
        ok, why = avx2.status(want)
        if not ok:
            raise RuntimeError(f"{ENGINE_VARIABLE}={want}, but the {avx2.VARIANTS[want][2]} int8 kernel is not "
                               f"usable: {why}")
        return want
    small = want == "auto" and rows is not None and rows < MIN_ROWS
    if not small:
        ok, why = status()
        if ok:
            return "amx"
        if want == "amx":
            raise RuntimeError(f"{ENGINE_VARIABLE}=amx, but the AMX int8 kernel is not usable: {why}")
    return _without_amx()


def conv_engine(rows: Optional[int] = None) -> str:
    """The engine of stride-1 convolutions' implicit GEMMs: :func:`engine`, except that ``auto``
    takes the VNNI build of our AVX2 kernel (:mod:`.avx2`) where :func:`engine` gives oneDNN and
    that build is usable -- oneDNN's ``_int_mm`` is the faster plain GEMM on such CPUs, but only
    our kernels read a convolution's input in place instead of im2col columns."""
    chosen = engine(rows)
    if chosen == "onednn" and requested_engine() == "auto" and avx2.status("vnni")[0]:
        return "vnni"
    return chosen


def _without_amx() -> str:
    """What ``auto`` takes when AMX is not: oneDNN with VNNI, else our AVX2 kernel, else float."""
    if has_vnni():
        return "onednn"
    return "avx2" if avx2.status()[0] else "float"


def describe() -> str:
    """One line for reports: where CPU int8 GEMMs run now, and why not on AMX if they don't."""
    try:
        chosen = engine()
    except (ValueError, RuntimeError) as e:
        return f"not runnable: {e}"
    fallback = {"onednn": "oneDNN _int_mm", "avx2": "the AVX2 kernel", "float": "float32 GEMMs"}[_without_amx()]
    if chosen == "amx":
        small = "" if requested_engine() == "amx" else f"; products of fewer than {MIN_ROWS} rows on {fallback}"
        return f"sqcompile's AMX-int8 kernel (TDPBSSD{small})"
    ok, why = status()
    reason = f"{ENGINE_VARIABLE}={chosen}" if ok or requested_engine() != "auto" else why
    if chosen == "float":
        vnni = "" if has_vnni() else "; no VNNI for oneDNN's _int_mm"
        return f"exact int8 products as float32 GEMMs (K in chunks of 1024; not AMX: {reason}{vnni})"
    if chosen == "avx2":
        return (f"sqcompile's AVX2 int8 kernel (VPMADDUBSW; products of two 8-bit operands on float32 GEMMs; "
                f"not AMX: {reason}; no VNNI for oneDNN's _int_mm)")
    if chosen == "vnni":
        return f"sqcompile's AVX-512 VNNI int8 kernel (VPDPBUSD; not AMX: {reason})"
    convs = "; stride-1 convolutions on sqcompile's AVX-512 VNNI kernel" if conv_engine() == "vnni" else ""
    return f"oneDNN torch._int_mm (VNNI{convs}; not AMX: {reason})"


@functools.lru_cache(maxsize=None)
def status() -> Tuple[bool, Optional[str]]:
    """``(usable, reason)`` for the AMX kernel on this machine (checked and built once)."""
    usable = native.status({"amx_tile", "amx_int8"}, _library)
    if not usable[0]:
        return usable
    if _library().sq_amx_init() != 0:
        return False, "the kernel refused the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM; Linux >= 5.16)"
    return True, None


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL:
    lib = native.build(SOURCE, CFLAGS, "the AMX kernel")
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.sq_amx_init.restype = ctypes.c_int
    lib.sq_amx_release_workspace.restype = None
    lib.sq_amx_int8_mm.restype = ctypes.c_int
    lib.sq_amx_int8_mm.argtypes = [ptr, i64, i64, i64, ptr, i64, i64, i64, ptr, i64, i64, i64, i64, ctypes.c_int]
    lib.sq_amx_int8_implicit.restype = ctypes.c_int
    lib.sq_amx_int8_implicit.argtypes = [ptr, i64, ptr, i64, ptr, i64, ptr, i64, i64, ptr, i64, ctypes.c_int]
    lib.sq_copy_layout.restype = None
    lib.sq_copy_layout.argtypes = [ptr, ptr, ptr, ctypes.c_int, ptr, ptr, ctypes.c_int]
    lib.sq_wgrad_layout.restype = None
    lib.sq_wgrad_layout.argtypes = [ptr, i64, i64, i64, i64, ptr, ctypes.c_int]
    return lib


def int8_mm_output(a: torch.Tensor, b: torch.Tensor, kernel: str) -> Tuple[torch.Tensor, tuple]:
    """What our C int8 GEMMs check first (``kernel`` names them in errors): int8 operands
    whose shapes chain; then their output (recycled, uninitialized) and the broadcast batch
    dims (``()`` for two matrices, the common case, without the batch bookkeeping)."""
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"{kernel} int8_mm needs int8 operands, got {a.dtype} and {b.dtype}")
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"int8_mm: shapes {tuple(a.shape)} and {tuple(b.shape)} do not chain")
    batch = () if a.dim() == 2 and b.dim() == 2 else tuple(torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]))
    return pool.OUTPUTS.empty((*batch, a.shape[-2], b.shape[-1])), batch


def int8_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ b`` for int8 ``[..., M, K]`` and ``[..., K, N]`` (batch dims broadcast) as
    int32 ``[..., M, N]`` on the AMX kernel.  Each operand is read in place (the kernel packs
    it) when its matrices are row- or column-major; other layouts are copied once.
    The caller keeps ``K`` within :data:`sqcompile.ops.MAX_INT32_TERMS`."""
    out, batch = int8_mm_output(a, b, "AMX")
    ok, why = status()          # also grants this process the AMX tile state
    if not ok:
        raise RuntimeError(f"the AMX int8 kernel is not usable: {why}")
    M, K, N = a.shape[-2], a.shape[-1], b.shape[-1]
    if out.numel() == 0 or K == 0:
        return out.zero_()
    plain = not batch
    if plain and (a.stride(1) == 1 or a.stride(0) == 1) and (b.stride(1) == 1 or b.stride(0) == 1):
        a3, sab, b3, sbb = a, 0, b, 0
    else:
        (a3, sab), (b3, sbb) = batched_operand(a, batch), batched_operand(b, batch)
    rc = _library().sq_amx_int8_mm(
        a3.data_ptr(), sab, a3.stride(-2), a3.stride(-1), b3.data_ptr(), sbb, b3.stride(-2), b3.stride(-1),
        out.data_ptr(), out.numel() // (M * N), M, N, K, torch.get_num_threads())
    if rc != 0:
        raise MemoryError(f"AMX int8_mm: could not allocate packing buffers for {M}x{K}x{N}")
    return out


def _tap_offsets(grid: Sequence[int], kernel: Sequence[int], dilation: Sequence[int], last_step: int) -> List[int]:
    """Grid offsets of the taps, row-major, the last dim's taps every ``last_step``-th."""
    strides = ops.row_major_strides(grid)
    return [sum(t * dl * st for t, dl, st in zip(tap, dilation, strides))
            for tap in itertools.product(*[range(k) for k in kernel[:-1]], range(0, kernel[-1], last_step))]


def conv_steps(channels: int, sizes: Sequence[int], kernel: Sequence[int], padding: Sequence[int],
               dilation: Sequence[int]) -> Tuple[List[int], int]:
    """The k steps of :func:`int8_conv`'s implicit GEMM: ``(offsets, run)``.

    The flattened weight (:func:`sqcompile.ops._flat_weight`: taps row-major, then channels)
    is cut into runs of ``run`` bytes whose input bytes are adjacent in memory: along the
    last spatial dim at dilation 1 its ``k`` taps (``k * channels`` bytes), else one tap.
    Each run takes ``ceil(run / 64)`` k steps of 64 bytes (its weights zero-padded);
    ``offsets[kb]`` is the byte offset of step ``kb`` from its output row's position in the
    padded channels-last input (a grid position is ``channels`` bytes)."""
    grid = [s + 2 * p for s, p in zip(sizes, padding)]
    taps = kernel[-1] if dilation[-1] == 1 else 1
    run = taps * channels
    offsets = []
    for base in _tap_offsets(grid, kernel, dilation, taps):
        offsets += range(base * channels, (base * channels) + run, 64)
    return offsets, run


CONV_KERNELS = ("amx", "vnni", "avx2")
"""The GEMM kernels :func:`int8_conv` and :func:`int8_conv_weight` run their implicit GEMMs on:
the AMX one here, or a build of the AVX2 one (:mod:`.avx2`, the same tables)."""


def _conv_library(gemm: str) -> ctypes.CDLL:
    """The library of the GEMM kernel ``gemm``, usable (both export the layout copies,
    ``sq_copy_layout`` and ``sq_wgrad_layout``, built with their own flags)."""
    if gemm not in CONV_KERNELS:
        raise ValueError(f"gemm={gemm!r}: expected one of {', '.join(CONV_KERNELS)}")
    ok, why = status() if gemm == "amx" else avx2.status(gemm)
    if not ok:
        raise RuntimeError(f"the {gemm.upper()} int8 kernel is not usable: {why}")
    return _library() if gemm == "amx" else avx2._library(gemm)


def _implicit(x: torch.Tensor, ld: int, moff: Sequence[int], koff: Sequence[int], b: torch.Tensor,
              out: torch.Tensor, gemm: str = "amx") -> Optional[torch.Tensor]:
    """``sq_amx_int8_implicit`` (see ``amx_int8.c``) or ``sq_avx2_int8_implicit``: ``out``
    [len(moff) * 32, N] int32 from the int8 buffer ``x`` read at the tables' offsets and B
    ``b`` [len(koff) * 64, N]; ``None`` where the AVX2 kernel refuses the magnitudes."""
    lib = _conv_library(gemm)
    assert (b.stride(0) == 1 or b.stride(1) == 1) and out.is_contiguous()
    mt, kt = torch.tensor(moff, dtype=torch.int64), torch.tensor(koff, dtype=torch.int64)
    tables = (ld, mt.data_ptr(), len(moff), kt.data_ptr(), len(koff), b.data_ptr(), b.stride(0), b.stride(1),
              out.data_ptr(), b.shape[1], torch.get_num_threads())
    if gemm == "amx":
        rc = lib.sq_amx_int8_implicit(x.data_ptr(), *tables)
    else:
        rc = lib.sq_avx2_int8_implicit(x.data_ptr(), x.numel(), *tables)
        if rc == avx2.REFUSED:
            return None
    if rc != 0:
        raise MemoryError(f"{gemm.upper()} implicit GEMM: could not allocate the packed operand")
    return out


def _copy_into(dst: torch.Tensor, src: torch.Tensor, gemm: str = "amx") -> None:
    """``dst.copy_(src)`` for int8 ``[N, C, *S]`` views (``sq_copy_layout``: rows of memory
    copied whole, transposes in cached blocks; torch's strided copy is several times slower
    at the transposes these layouts need)."""
    assert dst.shape == src.shape and dst.dtype == src.dtype == torch.int8 and src.dim() >= 3
    if src.numel() == 0:
        return
    sizes = torch.tensor(src.shape, dtype=torch.int64)
    sstr = torch.tensor(src.stride(), dtype=torch.int64)
    dstr = torch.tensor(dst.stride(), dtype=torch.int64)
    _conv_library(gemm).sq_copy_layout(src.data_ptr(), sizes.data_ptr(), sstr.data_ptr(), src.dim() - 2,
                                         dst.data_ptr(), dstr.data_ptr(), torch.get_num_threads())


def _zeros(shape) -> torch.Tensor:
    """A zeroed int8 buffer for the implicit GEMMs' grids, recycled (:mod:`.pool`): a fresh
    one of a few MiB pays its page faults on every call."""
    return pool.OUTPUTS.empty(shape, torch.int8).zero_()


def _check_int8(what: str, *tensors: torch.Tensor) -> None:
    if any(t.dtype != torch.int8 for t in tensors):
        raise TypeError(f"AMX {what} needs int8 operands, got {', '.join(str(t.dtype) for t in tensors)}")


def int8_conv(x: torch.Tensor, w: torch.Tensor, padding: Sequence[int], dilation: Sequence[int],
              gemm: str = "amx") -> Optional[torch.Tensor]:
    """:func:`sqcompile.ops.int8_conv` (stride-1 integer convolution, exact int32) as one
    implicit GEMM on the AMX tiles (``gemm="avx2"``: on the AVX2 kernel, ``None`` where it
    refuses the magnitudes): the input is copied once into a zero-padded channels-last
    buffer and the GEMM reads its rows in place, tap by tap -- no im2col columns.  The
    weights are cut into the runs of :func:`conv_steps`."""
    _check_int8("int8_conv", x, w)
    n, c, sizes, cout = x.shape[0], x.shape[1], list(x.shape[2:]), w.shape[0]
    offsets, run = conv_steps(c, sizes, list(w.shape[2:]), padding, dilation)
    grid = [s + 2 * p for s, p in zip(sizes, padding)]
    m = n * math.prod(grid)
    mb = -(-m // 32)
    out = ops.conv_grid_output(x, w, padding, dilation, lambda shape, **_: pool.OUTPUTS.empty(shape),
                               extra=(32 * mb - m) * cout)
    if out.numel() == 0 or c == 0:
        return out.zero_()
    # the grid, zero-padded, with room for the reads of the last 32-row block's taps
    xp = _zeros((32 * mb * c + max(offsets) + 64,))
    inner = tuple(slice(p, p + s) for p, s in zip(padding, sizes))
    _copy_into(xp[:m * c].view(n, *grid, c)[(slice(None), *inner)].movedim(-1, 1), x, gemm)
    # B [K, Cout], column-major: each output channel's runs, each zero-padded to whole steps
    padded = -(-run // 64) * 64
    if padded == run and w.movedim(1, -1).is_contiguous():      # the weight as it is (ops.im2col_conv's layout)
        b = w.movedim(1, -1).reshape(cout, -1).t()
    else:
        b = (torch.zeros if padded != run else torch.empty)((cout, len(offsets) * 64 // padded, padded),
                                                             dtype=torch.int8)
        _copy_into(b[..., :run].view(cout, *w.shape[2:], c).movedim(-1, 1), w, gemm)
        b = b.view(cout, -1).t()
    if _implicit(xp, c, [32 * i * c for i in range(mb)], offsets, b, out.as_strided((32 * mb, cout), (cout, 1)),
                 gemm) is None:
        return None
    return out


def int8_conv_weight(e: torch.Tensor, x: torch.Tensor, kernel: Sequence[int], padding: Sequence[int],
                     dilation: Sequence[int], gemm: str = "amx") -> Optional[torch.Tensor]:
    """:func:`sqcompile.ops.int8_conv_weight` (a stride-1 convolution's exact int32 weight
    gradient) as one implicit GEMM on the AMX tiles (``gemm="avx2"``: on the AVX2 kernel,
    ``None`` where it refuses the magnitudes): the input copied channel-major onto the
    padded grid, ``e`` row-major onto the same grid (zero where no output is), and each
    block of 32 channels of one tap read in place at that tap's offset -- no im2col columns.
    Needs ``N * prod(S + 2 p)`` within :data:`sqcompile.ops.MAX_INT32_TERMS` (the caller
    splits the batch)."""
    _check_int8("int8_conv_weight", e, x)
    n, c, sizes, cout = x.shape[0], x.shape[1], list(x.shape[2:]), e.shape[1]
    if e.numel() == 0 or x.numel() == 0:             # nothing to sum (an empty batch): no product to run
        return torch.zeros((cout, c, *kernel), dtype=torch.int32)
    grid = [s + 2 * p for s, p in zip(sizes, padding)]
    m = n * math.prod(grid)
    kb = -(-m // 64)
    offsets = _tap_offsets(grid, kernel, dilation, 1)
    cb = -(-c // 32)
    ld = 64 * kb + max(offsets) + 64        # a channel's row: the grid, then room for the last step's reads
    xc = _zeros((32 * cb, ld))
    inner = tuple(slice(p, p + s) for p, s in zip(padding, sizes))
    _copy_into(xc[:c, :m].view(c, n, *grid)[(slice(None), slice(None), *inner)].transpose(0, 1), x, gemm)
    eg = _zeros((64 * kb, cout))
    _copy_into(eg[:m].view(n, *grid, cout)[(slice(None), *[slice(0, o) for o in e.shape[2:]])].movedim(-1, 1), e,
               gemm)
    moff = [ci * 32 * ld + off for off in offsets for ci in range(cb)]
    out = _implicit(xc, ld, moff, [64 * i for i in range(kb)], eg, pool.OUTPUTS.empty((len(moff) * 32, cout)), gemm)
    if out is None:
        return None
    dw = pool.OUTPUTS.empty((cout, c, *kernel))                      # [taps, 32 cb, Cout] -> [Cout, C, taps]
    _conv_library(gemm).sq_wgrad_layout(out.data_ptr(), len(offsets), c, 32 * cb, cout, dw.data_ptr(),
                                        torch.get_num_threads())
    return dw


def release_workspace() -> None:
    """Free the calling thread's packing workspace (it grows to the largest product packed so
    far and is kept for the next call; this returns it after an unusually large one)."""
    if status()[0]:
        _library().sq_amx_release_workspace()


def batched_operand(x: torch.Tensor, batch, unit_stride: bool = True) -> Tuple[torch.Tensor, int]:
    """``x`` as ``[B, rows, cols]`` over the broadcast ``batch``, and the element stride
    between consecutive batch entries (0: one operand shared by all), for our C GEMMs.  Views,
    except when the batch dims cannot be flattened with one stride, or, with ``unit_stride``
    (the AMX kernel's need), the matrices have no unit stride: then one copy."""
    if unit_stride and x.stride(-1) != 1 and x.stride(-2) != 1:
        x = x.contiguous()
    x = x.expand(*batch, *x.shape[-2:])
    if x.dim() == 2:
        return x.unsqueeze(0), 0
    if all(s == 0 for s in x.stride()[:-2]):
        return x.reshape(-1, *x.shape[-2:])[:1], 0
    try:
        flat = x.view(-1, *x.shape[-2:])
    except RuntimeError:
        flat = x.reshape(-1, *x.shape[-2:]).contiguous()
    return flat, flat.stride(0) if flat.shape[0] > 1 else 0

