"""Replace BatchNorm / LayerNorm / GroupNorm / RMSNorm nodes by fully-quantized L1 norms."""
from __future__ import annotations

import torch.fx as fx


def l1_norms(gm: fx.GraphModule, config, target, record) -> fx.GraphModule:
    return gm
