"""Shared pytest setup.

Triton's CPU interpreter must be chosen before any Triton kernel is defined (``@triton.jit``
decides at import time), so without CUDA this sets ``TRITON_INTERPRET=1`` here, before any
test module imports ``sqcompile``.  An explicit ``TRITON_INTERPRET`` in the environment wins.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
