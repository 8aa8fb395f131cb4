"""Host cost per call of the Triton ops a compiled training step launches.

    python benchmarks/host_overhead.py                  # our Python only (any machine)
    python benchmarks/host_overhead.py --device cuda    # real launches on a GPU

Without CUDA graphs, a GPU training step at transformer-block sizes is bound by the host:
the device finishes each kernel before Python has launched the next.  What an op costs on
the host is then its speed.

* ``--device cpu`` (default): CPU tensors, with every Triton kernel launch replaced by a
  no-op, so what is timed is the op's own Python (argument checks, launch plans,
  allocations, seeds, grids) and torch's custom-op dispatch: everything but Triton's
  launcher and the kernel.  Runs anywhere (Triton's interpreter is imported, never run).
* ``--device cuda``: the real ops on small CUDA tensors, Triton's launcher included,
  timed over a burst of calls (the kernels are tiny, so the host is the bottleneck).

Each op is timed in bursts of ``--calls`` calls, interleaved with the same burst of eager
``torch.add`` on a small tensor; the table gives the median microseconds per call and, the
figure to compare across machines, the median ratio to one ``torch.add`` call of the same
round.  The pair row is also compared with the two ShiftQuants it replaces.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


class _NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](*args)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _stub_kernels() -> None:
    from sqcompile.kernels import triton_attention, triton_fused, triton_gemm, triton_norm, triton_ops, triton_quant
    for module in (triton_quant, triton_norm, triton_attention, triton_gemm):
        for name in dir(module):
            if name.startswith("_") and name.endswith("_kernel"):
                setattr(module, name, _NoLaunch())
    for name in triton_attention._KERNELS:      # launched by name through this table
        triton_attention._KERNELS[name] = _NoLaunch()
    original = triton_fused.kernel_for

    def kernel_for(signature):
        k = original(signature)
        k.fn = _NoLaunch()
        return k

    triton_fused.kernel_for = kernel_for
    triton_ops._check_device = lambda *tensors: None    # what it costs for CUDA tensors: nothing


def cases(device: str) -> dict:
    import torch
    from sqcompile.kernels import triton_fused
    ops = torch.ops.sqcompile
    M, N, K = 512, 1024, 256
    g = torch.randn(1, M, N, device=device)
    pc, pr = torch.rand(1, 1, N, device=device), torch.rand(1, M, 1, device=device)
    x = torch.randn(M, K, device=device)
    w, b = torch.randn(K, device=device), torch.randn(K, device=device)
    a8 = torch.randint(-7, 8, (1, M, K), dtype=torch.int8, device=device)
    b8 = torch.randint(-7, 8, (1, N, K), dtype=torch.int8, device=device).mT
    sa, sb, bias = torch.rand(1, M, 1, device=device), torch.rand(1, 1, N, device=device), torch.rand(N, device=device)
    ep = triton_fused.Epilogue(
        (("m", "f32"), ("n", "f32"), ("n", "f32")),
        (("convert", "f32", "acc"), ("mul", "f32", "in0", "in1"), ("mul", "f32", "v0", "v1"), ("add", "f32", "v2", "in2"),
         ("gelu", "f32", "v3")), ("v4",))
    signature = ep.signature()
    _, q, scale, mean, inv = ops.triton_l1_norm(x, w, b, 8, True, 1.25, 1e-5)
    dy = torch.randn_like(x)
    small = torch.ones(8, device=device)
    qa, ka, va = (torch.randn(16, 128, 64, device=device) for _ in range(3))
    att = ops.triton_attention(qa, ka, va, None, 0.125, True, 4)
    return {
        "torch.add (reference)": lambda: small.add(1),
        "triton_quantize (per-row)": lambda: ops.triton_quantize(x, 4, [0], False),
        "triton_shiftquant": lambda: ops.triton_shiftquant(g, 4, 4, [0, 2], True, pc),
        "two ShiftQuants (columns, rows^T)": lambda: (ops.triton_shiftquant(g, 4, 4, [0, 2], True, pc),
                                                     ops.triton_shiftquant_fused(g, None, 4, 4, [0, 1], True, pr, True)),
        "triton_shiftquant_pair": lambda: ops.triton_shiftquant_pair(g, None, None, 4, 4, True, pc, pr, True),
        "triton_fused_int8_mm (bias+gelu)": lambda: ops.triton_fused_int8_mm(a8, b8, [sa, sb, bias], signature),
        "triton_l1_norm_quantized": lambda: ops.triton_l1_norm_quantized(x, w, b, 8, True, 1.25, 1e-5, 4),
        "triton_l1_norm_backward": lambda: ops.triton_l1_norm_backward(dy, q, scale, mean, inv, w, 8, True, 1.25,
                                                                       True, True),
        "triton_attention (fused, causal)": lambda: ops.triton_attention(qa, ka, va, None, 0.125, True, 4),
        "triton_attention_backward": lambda: ops.triton_attention_backward(att[0], *att[1:], None, 0.125, True, 4, 4,
                                                                           4),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--calls", type=int, default=100, help="calls per timed burst")
    args = p.parse_args(argv)
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"     # before the kernel modules are imported
    import torch
    from tabulate import tabulate
    from _timing import interleaved

    import sqcompile.kernels  # noqa: F401  (registers the ops)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("no CUDA device: nothing to measure (run without --device cuda for the Python cost)")
            return
        sync = torch.cuda.synchronize
    else:
        _stub_kernels()
        sync = lambda: None  # noqa: E731
    fns = cases(args.device)

    def burst(fn):
        def run():
            for _ in range(args.calls):
                fn()
        return run

    times = interleaved({name: burst(fn) for name, fn in fns.items()}, args.rounds, warmup=2, sync=sync)
    ref = "torch.add (reference)"
    rows = []
    for name in fns:
        us = 1e6 * statistics.median(times[name]) / args.calls
        ratio = statistics.median(t / r for t, r in zip(times[name], times[ref]))
        rows.append([name, f"{us:.1f}", f"{ratio:.1f}x"])
    print(f"torch {torch.__version__}; host cost per call ({args.device}"
          f"{', Triton launches stubbed out' if args.device == 'cpu' else ''}); command: "
          f"python benchmarks/host_overhead.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(tabulate(rows, headers=["op", "us per call", "x torch.add"], tablefmt="github"))
    pair = statistics.median(t / p for t, p in zip(times["two ShiftQuants (columns, rows^T)"],
                                                   times["triton_shiftquant_pair"]))
    print(f"\nthe pair against the two ShiftQuants it replaces: {pair:.2f}x less host time")


if __name__ == "__main__":
    main()
