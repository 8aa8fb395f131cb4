"""Our C kernels: built with the system C compiler on first use, loaded with ``ctypes``.

Each source file (``amx_int8.c``, ``avx2_int8.c``, ``cpu_attention.c``, ``cpu_norm.c``,
``cpu_quant.c``) becomes one shared library in :data:`~sqcompile.kernels.triton_fused.KERNEL_DIR`
(``SQCOMPILE_KERNEL_DIR``), under a name that hashes the source, the headers beside it
(``avx512.h``, ``avx512_portable.h``, ``int8_pack.h``), the compiler and its flags, so an edit or another
compiler builds anew and an unchanged one loads what is there (building takes about a
second).  The compiler is ``$CC``, else ``cc``, ``gcc`` or ``clang``, the first found.

The attention, norm and quantizer kernels are written with AVX-512 intrinsics and come in two
builds (:func:`simd_build`): ``"avx512"`` (the compiler's intrinsics; CPUs with AVX-512
F/BW/VL) and ``"portable"`` (the same source over ``avx512_portable.h``: each 512-bit
operation as two AVX2 halves, or plain C where the CPU lacks AVX2 / FMA; bit for bit the same
results).
``SQCOMPILE_CPU_SIMD=auto|avx512|portable`` in the environment, read when a kernel is first
used, chooses; ``auto`` (the default) takes ``avx512`` where the CPU has it.
"""
from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from typing import Callable, FrozenSet, List, Optional, Sequence, Set, Tuple


AVX512_CFLAGS = ["-O2", "-fPIC", "-shared", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-ffp-contract=off"]
"""Flags of the AVX-512 kernels (``cpu_attention.c``, ``cpu_quant.c``): OpenMP on torch's own
libgomp; no contraction of a multiply and an add into an FMA, which would round once where
the graph's ops round twice."""
AVX512_CPU_FLAGS = frozenset({"avx512f", "avx512bw", "avx512vl"})
PORTABLE_CFLAGS = ["-O3", "-fPIC", "-shared", "-fopenmp", "-ffp-contract=off", "-Wno-psabi", "-DSQCOMPILE_PORTABLE"]
"""Flags of the portable build (``-mavx2 -mfma`` are added where the CPU has them, which
selects ``avx512_portable.h``'s AVX2 path; ``-O3`` vectorizes its plain C path's lane loops)."""
SIMD_VARIABLE = "SQCOMPILE_CPU_SIMD"
SIMD_CHOICES = ("auto", "avx512", "portable")


def simd_build() -> Tuple[str, List[str], FrozenSet[str]]:
    """``(name, cflags, cpu_flags)`` of the build of the AVX-512-style kernels this machine
    takes: ``"avx512"`` where the CPU has :data:`AVX512_CPU_FLAGS`, else ``"portable"``, unless
    ``SQCOMPILE_CPU_SIMD`` names one (``avx512`` on a CPU without it: the kernels report that
    the CPU lacks the flags, and the graphs' ops run).  ``ValueError`` naming the variable for
    another value."""
    value = os.environ.get(SIMD_VARIABLE, "auto").strip().lower() or "auto"
    if value not in SIMD_CHOICES:
        raise ValueError(f"environment variable {SIMD_VARIABLE}={os.environ[SIMD_VARIABLE]!r}: "
                         f"expected one of {', '.join(SIMD_CHOICES)}")
    if value == "avx512" or (value == "auto" and AVX512_CPU_FLAGS <= cpu_flags()):
        return "avx512", list(AVX512_CFLAGS), AVX512_CPU_FLAGS
    return "portable", portable_cflags(), frozenset()


def portable_cflags() -> List[str]:
    """:data:`PORTABLE_CFLAGS`, with ``-mavx2 -mfma`` where this CPU has them."""
    return PORTABLE_CFLAGS + (["-mavx2", "-mfma"] if {"avx2", "fma"} <= cpu_flags() else [])


@functools.lru_cache(maxsize=None)
def cpu_flags() -> FrozenSet[str]:
    """The instruction-set flags of this CPU (``/proc/cpuinfo``, read once: the CPU engine's
    choice asks on every GEMM; empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def compiler() -> str:
    """The C compiler to build with; ``RuntimeError`` when there is none."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    raise RuntimeError("no C compiler found (set CC, or install gcc)")


def build(source: str, cflags: Sequence[str], what: str) -> ctypes.CDLL:
    """The shared library built from the C file ``source`` with ``cflags`` (``-shared``
    included), loaded; ``RuntimeError`` naming ``what`` when the build fails.  The caller
    caches the result and declares the functions' argument types."""
    from .triton_fused import KERNEL_DIR   # one cache folder for everything we generate

    cc = compiler()
    text = b""
    for path in [source, *sorted(glob.glob(os.path.join(os.path.dirname(source), "*.h")))]:
        with open(path, "rb") as f:
            text += f.read()
    key = hashlib.sha256(text + " ".join([cc, *cflags]).encode()).hexdigest()[:16]
    stem = os.path.splitext(os.path.basename(source))[0]
    path = os.path.join(KERNEL_DIR, f"{stem}_{key}.so")
    if not os.path.exists(path):
        os.makedirs(KERNEL_DIR, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=KERNEL_DIR)
        os.close(fd)
        result = subprocess.run([cc, *cflags, "-o", tmp, source], capture_output=True, text=True)
        if result.returncode != 0:
            os.unlink(tmp)
            raise RuntimeError(f"building {what} with {cc} failed: {result.stderr.strip()[-500:]}")
        os.replace(tmp, path)   # atomic: concurrent builders never load a half-written file
    return ctypes.CDLL(path)


def status(flags: Set[str], load: Callable[[], object]) -> Tuple[bool, Optional[str]]:
    """``(usable, reason)`` for a kernel that needs Linux on x86-64, the CPU ``flags`` and
    ``load()`` (its build and load) to succeed."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False, f"needs Linux on x86-64 (this is {platform.system()} on {platform.machine()})"
    missing = flags - cpu_flags()
    if missing:
        return False, f"this CPU lacks {', '.join(sorted(missing))}"
    try:
        load()
    except (OSError, RuntimeError) as e:
        return False, str(e)
    return True, None


__all__ = ["AVX512_CFLAGS", "AVX512_CPU_FLAGS", "PORTABLE_CFLAGS", "SIMD_CHOICES", "SIMD_VARIABLE", "build", "compiler",
           "cpu_flags", "portable_cflags", "simd_build", "status"]
