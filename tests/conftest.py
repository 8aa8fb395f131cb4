"""Shared pytest setup.

Triton's CPU interpreter must be chosen before any Triton kernel is defined (``@triton.jit``
decides at import time), so without CUDA this sets ``TRITON_INTERPRET=1`` here, before any
test module imports ``sqcompile``.  An explicit ``TRITON_INTERPRET`` in the environment wins.
In the interpreter, :mod:`interpreter_speedups` removes two of its overheads.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("TRITON_INTERPRET") == "1":
    from interpreter_speedups import install
    install()


@pytest.fixture
def one_thread_fresh_dynamo():
    """One torch thread (tiny models: a second thread only adds contention) and a fresh Dynamo
    (caches and counters) around a test; modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread_fresh_dynamo")``."""
    from torch._dynamo.utils import counters

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(threads)
