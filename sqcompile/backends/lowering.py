"""Lowering of the forward / backward ATen graphs that AOTAutograd produces.

Each graph is recorded for inspection, then handed to the inner compiler: plain eager
execution of the graph, or Inductor (which fuses the float glue around our ops).
"""
from __future__ import annotations

from functorch.compile import make_boxed_func

from ..graphs import format_graph


def inner_compiler(config, target) -> str:
    if config.inner != "auto":
        return config.inner
    return "inductor" if target.device == "cuda" else "eager"


def compiler(stage: str, config, target, record):
    """A compiler for AOTAutograd's ``stage`` graph ("forward", "backward" or "inference")."""

    def compile_graph(gm, example_inputs):
        record.graphs[stage] = format_graph(gm)
        if inner_compiler(config, target) == "inductor":
            from torch._inductor.compile_fx import compile_fx_inner

            return compile_fx_inner(gm, example_inputs, is_backward=stage == "backward",
                                    is_inference=stage == "inference")
        return make_boxed_func(gm.forward)

    return compile_graph
