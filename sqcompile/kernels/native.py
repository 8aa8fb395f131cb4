"""Our C kernels: built with the system C compiler on first use, loaded with ``ctypes``.

Each source file (``amx_int8.c``, ``cpu_attention.c``, ``cpu_quant.c``) becomes one shared
library in :data:`~sqcompile.kernels.triton_fused.KERNEL_DIR` (``SQCOMPILE_KERNEL_DIR``),
under a name that hashes the source, the headers beside it (``avx512.h``), the compiler and
its flags, so an edit or another compiler builds anew and an unchanged one loads what is
there (building takes about a second).  The
compiler is ``$CC``, else ``cc``, ``gcc`` or ``clang``, the first found.
"""
from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from typing import Callable, Optional, Sequence, Set, Tuple


AVX512_CFLAGS = ["-O2", "-fPIC", "-shared", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-ffp-contract=off"]
"""Flags of the AVX-512 kernels (``cpu_attention.c``, ``cpu_quant.c``): OpenMP on torch's own
libgomp; no contraction of a multiply and an add into an FMA, which would round once where
the graph's ops round twice."""
AVX512_CPU_FLAGS = frozenset({"avx512f", "avx512bw", "avx512vl"})


def cpu_flags() -> Set[str]:
    """The instruction-set flags of this CPU (``/proc/cpuinfo``; empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


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


__all__ = ["AVX512_CFLAGS", "AVX512_CPU_FLAGS", "build", "compiler", "cpu_flags", "status"]
