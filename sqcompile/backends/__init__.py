"""The torch.compile backend and the lowering of its graphs."""
from .shiftquant import BACKEND_NAME, register, shiftquant_backend

__all__ = ["BACKEND_NAME", "register", "shiftquant_backend"]
