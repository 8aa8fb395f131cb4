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

SPEEDUPS = None          # whether interpreter_speedups applied (None: not in the interpreter)
if os.environ.get("TRITON_INTERPRET") == "1":
    from interpreter_speedups import install
    SPEEDUPS = install()


def _speedups_line() -> str:
    if SPEEDUPS:
        return "Triton interpreter: sqcompile's test speedups on"
    try:
        import triton
        version = triton.__version__
    except ImportError:
        version = "not installed"
    why = "SQCOMPILE_PLAIN_INTERPRETER=1" if os.environ.get("SQCOMPILE_PLAIN_INTERPRETER") == "1" else \
        f"Triton {version}: its interpreter is not Triton 3.9.0's, which they were written against"
    return f"Triton interpreter: sqcompile's test speedups off ({why}); the Triton tests run slower"


def pytest_report_header(config):
    """Say in the session header whether the interpreter runs with :mod:`interpreter_speedups`
    (they apply to Triton 3.9.0 only: on another Triton the Triton tests pass, more slowly)."""
    return None if SPEEDUPS is None else _speedups_line()


def pytest_configure(config):
    """The same as a warning when another Triton turned them off (the README's test command
    runs with ``-q``, which hides the header)."""
    if SPEEDUPS is False and os.environ.get("SQCOMPILE_PLAIN_INTERPRETER") != "1" and \
            not os.environ.get("PYTEST_XDIST_WORKER"):
        config.issue_config_time_warning(pytest.PytestWarning(_speedups_line()), stacklevel=2)


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
