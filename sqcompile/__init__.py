"""sqcompile: sub-8-bit integer training (ShiftQuant + L1 normalization) for PyTorch.

    model = torch.compile(model, backend="shiftquant", options={"weight_bits": 4})

See README.md for the options, the numerics and the measured results.
"""
from . import ops  # noqa: F401  (registers the torch.ops.sqcompile.* custom ops)
from . import kernels  # noqa: F401  (registers their CPU / Triton implementations)
from .backends import register as _register
from .backends import shiftquant_backend
from .config import Config

__version__ = "0.1.0"
_register()

__all__ = ["Config", "shiftquant_backend", "__version__"]
