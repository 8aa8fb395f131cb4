"""Recycled buffers for the large outputs of the CPU kernels (GEMMs, quantizers, norms).

A freshly allocated large tensor pays its page faults on first touch: about 0.5 ms per MiB on
these VMs, more than the AMX GEMM itself takes for a 4096 x 2048 int32 result, and glibc maps
blocks of 32 MiB and more anew on every allocation (they never come back from its free
lists).  The integer GEMMs of a training step produce such outputs over and over, and so
do the C kernels around them (a GELU's saved input, attention's probabilities, the
gradients' int8 operands).  :class:`OutputPool` hands them out of buffers it keeps, and
reuses a buffer only once no tensor refers to its memory any more.

``SQCOMPILE_GEMM_POOL_MB`` in the environment (read at import) caps the memory kept, in MiB
(``0`` turns recycling off); anything but a whole number >= 0 raises a ``ValueError`` naming
it.  The default is an eighth of the machine's physical memory (3 GiB on 24 GiB), at most
4 GiB, and 1 GiB where the physical memory cannot be read: enough for every output a
step of the README's transformer keeps alive at once (432 MiB), which a 256 MiB cap (the
default before 2026-12-02) sent back to page-faulting ``torch.empty`` calls.  Buffers in use
count towards the cap as much as free ones, so the pool never holds more than the cap;
:func:`sqcompile.empty_cache` drops the free ones (after training, say).
"""
from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from typing import Optional

import torch

POOL_VARIABLE = "SQCOMPILE_GEMM_POOL_MB"


class OutputPool:
    """int32 buffers for large GEMM outputs, recycled once nothing refers to them.

    A buffer is free again when its storage's only owner is the pool: every tensor handed out
    is a view, and views (and anything else holding the memory: autograd's saved tensors,
    Inductor's buffers) hold a reference to the storage.  Buffers are matched by size; at
    most ``limit`` bytes are kept: a size the pool has no room for takes the room of the free
    buffers used longest ago (shapes that change from step to step, a last smaller batch, do
    not keep sizes that never come back), else it is a plain ``torch.empty``.  Needs
    ``torch._C._storage_Use_Count``; without it every output is a plain ``torch.empty``."""

    MIN_BYTES = 1 << 20

    def __init__(self, limit: Optional[int] = None):
        self.limit = _pool_limit() if limit is None else limit
        self.buffers: dict = {}        # nbytes -> [flat int32 tensors]
        self.recent: "OrderedDict[int, torch.Tensor]" = OrderedDict()     # id -> buffer, last used last
        self.kept = 0
        self.lock = threading.Lock()
        count = getattr(torch._C, "_storage_Use_Count", None)
        self._count = count
        self._idle = _use_count(count, torch.empty(1)) if count is not None else None

    def empty(self, shape, dtype: torch.dtype = torch.int32) -> torch.Tensor:
        """An uninitialized contiguous ``shape`` tensor of ``dtype`` (4 or 1 bytes an element),
        recycled when it is large enough."""
        numel = math.prod(shape)
        words = numel if dtype.itemsize == 4 else (numel + 3) // 4
        nbytes = 4 * words
        if self._idle is None or nbytes < self.MIN_BYTES or nbytes > self.limit:
            return torch.empty(shape, dtype=dtype)
        with self.lock:
            for buf in self.buffers.get(nbytes, ()):
                if self._free(buf):
                    self.recent.move_to_end(id(buf))
                    return _typed(buf, dtype, numel, shape)
            if self.kept + nbytes > self.limit and not self._evict(self.kept + nbytes - self.limit):
                return torch.empty(shape, dtype=dtype)
            with torch.inference_mode(False):
                buf = torch.empty(words, dtype=torch.int32)
            self.buffers.setdefault(nbytes, []).append(buf)
            self.recent[id(buf)] = buf
            self.kept += nbytes
            return _typed(buf, dtype, numel, shape)

    def _free(self, buf: torch.Tensor) -> bool:
        return _use_count(self._count, buf) == self._idle

    def _evict(self, need: int) -> bool:
        """Drop free buffers, least recently used first, until ``need`` bytes are released;
        False (nothing dropped) when the free ones do not add up to ``need``."""
        victims, found = [], 0
        for buf in self.recent.values():
            if found >= need:
                break
            if self._free(buf):
                victims.append(buf)
                found += 4 * buf.numel()
        if found < need:
            return False
        for buf in victims:
            nbytes = 4 * buf.numel()
            del self.recent[id(buf)]
            same = [t for t in self.buffers.pop(nbytes) if t is not buf]
            if same:
                self.buffers[nbytes] = same
            self.kept -= nbytes
        return True

    def clear(self) -> None:
        """Drop every kept buffer (tensors still in use keep their memory until they die)."""
        with self.lock:
            self.buffers.clear()
            self.recent.clear()
            self.kept = 0


def _typed(buf: torch.Tensor, dtype: torch.dtype, numel: int, shape) -> torch.Tensor:
    return buf.view(shape) if dtype == torch.int32 else buf.view(dtype)[:numel].view(shape)


def _use_count(count, t: torch.Tensor) -> int:
    return count(t.untyped_storage()._cdata)


def default_limit() -> int:
    """The cap in bytes without ``SQCOMPILE_GEMM_POOL_MB``: an eighth of physical memory, at
    most 4 GiB (1 GiB where ``os.sysconf`` cannot tell the memory size)."""
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return 1 << 30
    return min(physical // 8, 4 << 30) if physical > 0 else 1 << 30


def _pool_limit() -> int:
    raw = os.environ.get(POOL_VARIABLE)
    if raw is None:
        return default_limit()
    raw = raw.strip()
    try:
        mib = int(raw)
        if mib < 0:
            raise ValueError
    except ValueError:
        raise ValueError(f"environment variable {POOL_VARIABLE}={raw!r}: expected a number of MiB >= 0") from None
    return mib << 20


OUTPUTS = OutputPool()


def empty_cache() -> None:
    """Give back the memory of the CPU kernels' recycled output buffers (as
    ``torch.cuda.empty_cache`` does for CUDA's caching allocator): buffers still in use keep
    their memory until the tensors on them die, the rest goes back to the C allocator now.
    The next training step allocates (and page-faults) its outputs afresh."""
    OUTPUTS.clear()
