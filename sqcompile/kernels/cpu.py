"""CPU kernels: exact int8 GEMMs, on our AMX kernel (:mod:`.amx`) where the CPU has AMX-int8
and on oneDNN's ``torch._int_mm`` (AVX-512 VNNI) elsewhere; ``SQCOMPILE_CPU_GEMM`` chooses
(:func:`.amx.engine`).  Large outputs come from recycled buffers (:mod:`.pool`)."""
from __future__ import annotations

import torch

from .. import ops
from . import amx, pool


@ops.int8_mm.register_kernel("cpu")
def int8_mm_cpu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 ``[..., M, K] @ [..., K, N]`` -> int32."""
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        return (a.double() @ b.double()).to(torch.int32)   # int16 operands: exact reference
    if amx.engine(rows=a.shape[-2]) == "amx":
        return amx.int8_mm(a, b)
    return onednn_int8_mm(a, b)


def onednn_int8_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch._int_mm`` (2-D, so batched products loop over the batch; each slice is one
    oneDNN call)."""
    if a.dim() == 2 and b.dim() == 2:
        return torch._int_mm(a, b, out=pool.OUTPUTS.empty((a.shape[0], b.shape[1])))
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a3 = a.expand(*batch, *a.shape[-2:]).reshape(-1, *a.shape[-2:])
    b3 = b.expand(*batch, *b.shape[-2:]).reshape(-1, *b.shape[-2:])
    out = pool.OUTPUTS.empty((a3.shape[0], a3.shape[1], b3.shape[2]))
    for i in range(a3.shape[0]):
        torch._int_mm(a3[i], b3[i], out=out[i])
    return out.reshape(*batch, a.shape[-2], b.shape[-1])
