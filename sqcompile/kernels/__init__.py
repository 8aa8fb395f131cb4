"""Device implementations of the ops in :mod:`sqcompile.ops`.

Importing this package registers them: int8 GEMMs, attention's softmax, the L1 norm and the
gradients' quantizer for CPU (``cpu``, ``cpu_attention``, ``cpu_norm``, ``cpu_quant``) and, when Triton is importable,
the Triton kernel family (``triton``).
"""
import os

import torch

from . import cpu  # noqa: F401  (registers torch.ops.sqcompile.int8_mm for CPU)
from . import cpu_attention  # noqa: F401  (defines torch.ops.sqcompile.attention_probs)
from . import cpu_grouped_conv  # noqa: F401  (registers torch.ops.sqcompile.int8_grouped_conv* for CPU)
from . import cpu_norm  # noqa: F401  (defines torch.ops.sqcompile.cpu_l1_norm, cpu_l1_norm_backward)
from . import cpu_quant  # noqa: F401  (defines torch.ops.sqcompile.shiftquant_outer_pair)

try:  # Triton is a dependency, but a broken GPU toolchain must not take the CPU path down.
    from . import triton_ops  # noqa: F401
    TRITON_ERROR = None
except ImportError as e:  # pragma: no cover - exercised only on broken installs
    TRITON_ERROR = e


def triton_status(device: str):
    """``(usable, reason)`` for the Triton kernel family on ``device`` ("cpu" or "cuda")."""
    if TRITON_ERROR is not None:
        return False, f"the Triton kernels failed to import ({TRITON_ERROR})"
    if device == "cuda":
        return (True, None) if torch.cuda.is_available() else (False, "CUDA is not available")
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, None
    return False, "Triton needs CUDA, or TRITON_INTERPRET=1 (set before import) to run its interpreter on CPU"
