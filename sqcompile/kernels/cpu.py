"""CPU kernels: int8 GEMMs on oneDNN through ``torch._int_mm`` (VNNI / AMX where present)."""
from __future__ import annotations

import torch

from .. import ops


@ops.int8_mm.register_kernel("cpu")
def int8_mm_cpu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 ``[..., M, K] @ [..., K, N]`` -> int32 with ``torch._int_mm`` (2-D, so batched
    products loop over the batch; each slice is one oneDNN call)."""
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        return (a.double() @ b.double()).to(torch.int32)   # int16 operands: exact reference
    if a.dim() == 2 and b.dim() == 2:
        return torch._int_mm(a, b)
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a3 = a.expand(*batch, *a.shape[-2:]).reshape(-1, *a.shape[-2:])
    b3 = b.expand(*batch, *b.shape[-2:]).reshape(-1, *b.shape[-2:])
    out = torch.empty(a3.shape[0], a3.shape[1], b3.shape[2], dtype=torch.int32)
    for i in range(a3.shape[0]):
        torch._int_mm(a3[i], b3[i], out=out[i])
    return out.reshape(*batch, a.shape[-2], b.shape[-1])
