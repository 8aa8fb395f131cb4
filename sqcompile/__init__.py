"""sqcompile: sub-8-bit integer training (ShiftQuant + L1 normalization) for PyTorch.

    model = torch.compile(model, backend="shiftquant", options={"weight_bits": 4})

See README.md for the options, the numerics and the measured results.
"""
from . import decisions  # noqa: F401
from . import ops  # noqa: F401  (registers the torch.ops.sqcompile.* custom ops)
from . import kernels  # noqa: F401  (registers their CPU / Triton implementations)
from .backends import register as _register
from .backends import shiftquant_backend
from .config import Config
from .explain import Explanation, explain
from .kernels.pool import empty_cache
from .report import Report, report

__version__ = "0.1.0"
_register()

# Dynamo graph-breaks on nn.LSTM / nn.GRU unless told to trace them; the RNN rewrite needs them
# in the graph.  Importing sqcompile (which backend="shiftquant" does through its entry point,
# before Dynamo traces anything) turns this on for the process; it changes nothing for models
# without recurrent layers.  Set it back to False after the import to opt out.
import torch._dynamo  # noqa: E402

torch._dynamo.config.allow_rnn = True

__all__ = ["Config", "Explanation", "Report", "empty_cache", "explain", "report", "shiftquant_backend", "__version__"]
