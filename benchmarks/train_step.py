"""A full training step (forward, backward, SGD update) on CPU: fp32 eager vs the shiftquant
backend, interleaved in one process, plus the bytes saved for backward (activation memory).

* transformer: 4 pre-norm blocks, d_model 512, 8 heads, seq 256, batch 16 (SDPA attention,
  LayerNorm -> L1 norm, GELU MLP);
* resnet18: a ResNet-18-sized CNN (BasicBlocks 64-128-256-512, BatchNorm -> L1 norm) on 32x32
  inputs, batch 32;
* unet: ``examples/unet_denoise_fashion_mnist.py``'s U-Net at width 32 (convs down, transposed
  convs up, InstanceNorm -> L1 instance norm) on 64x64 grey images, batch 16;
* mobilenet_v2: MobileNetV2 for 32x32 inputs (17 inverted residuals: 1x1 expand, 3x3
  depthwise, 1x1 project; BatchNorm -> L1 norm; ReLU6), batch 32.

    python benchmarks/train_step.py
    python benchmarks/train_step.py --models transformer --rounds 7
    python benchmarks/train_step.py --models transformer --float-attention
    python benchmarks/train_step.py --models transformer --onednn   # AMX kernel vs oneDNN _int_mm
    python benchmarks/train_step.py --models transformer --saved-scales   # GEMMs saving scales, not maxima
    python benchmarks/train_step.py --models transformer --outer-scale    # grad_outer_scale flipped too
    python benchmarks/train_step.py --models resnet18 --act-groups 4      # act_groups=4 too
    python benchmarks/train_step.py --fusion-off        # attention softmax, gradient quantizers in Inductor loops
    python benchmarks/train_step.py --no-grad-kernel    # gradients' quantizers in Inductor loops
    python benchmarks/train_step.py --models resnet18 unet --no-conv-grad-kernel   # convs' ones only
    python benchmarks/train_step.py --models transformer --no-gelu-kernel   # GELU + quantizer in Inductor
    python benchmarks/train_step.py --models transformer --no-gelu-backward-kernel   # GELU backward in Inductor
    python benchmarks/train_step.py --models transformer --peak-memory
    python benchmarks/train_step.py --models unet
    python benchmarks/train_step.py --models unet resnet18 --no-implicit-conv   # convs as im2col GEMMs too
    python benchmarks/train_step.py --models unet resnet18 --no-norm-kernel     # norms as Inductor's loops too
    python benchmarks/train_step.py --no-c-kernels      # none of the C kernels but the GEMMs' (a portable-build A/B)
    python benchmarks/train_step.py --models mobilenet_v2 --grouped-simulated   # depthwise convs simulated (float)
    python benchmarks/train_step.py --models transformer --dynamic --no-norm-kernel   # dynamic=True too
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from tabulate import tabulate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sqcompile  # noqa: E402,F401
from sqcompile.config import OpConfig  # noqa: E402
from sqcompile.kernels import amx  # noqa: E402
from _timing import add_threads_argument, interleaved, median_ms, median_ratio, norm_kernels_off, start  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
from unet_denoise_fashion_mnist import UNet  # noqa: E402


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, D)
        x = x + self.proj(a)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Transformer(nn.Module):
    def __init__(self, d=512, heads=8, layers=4):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.head = nn.Linear(d, d)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                      if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.short(x))


class ResNet18(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        h = cin * expand
        self.residual = stride == 1 and cin == cout
        layers = [] if expand == 1 else [nn.Conv2d(cin, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6()]
        self.body = nn.Sequential(*layers, nn.Conv2d(h, h, 3, stride, 1, groups=h, bias=False), nn.BatchNorm2d(h),
                                  nn.ReLU6(), nn.Conv2d(h, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.body(x)
        return x + y if self.residual else y


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0) for 32x32 inputs: the stem and the first stages at stride 1."""

    def __init__(self, classes=10):
        super().__init__()
        layers, cin = [nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6()], 32
        for t, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                           (6, 320, 1, 1)):
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers += [nn.Conv2d(cin, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(1280, classes)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


MODELS = {
    "transformer": (Transformer, lambda: torch.randn(16, 256, 512), lambda out: out.pow(2).mean()),
    "resnet18": (ResNet18, lambda: torch.randn(32, 3, 32, 32),
                 lambda out: F.cross_entropy(out, torch.arange(out.shape[0]) % 10)),
    "unet": (lambda: UNet(32), lambda: torch.randn(16, 1, 64, 64), lambda out: out.pow(2).mean()),
    "mobilenet_v2": (MobileNetV2, lambda: torch.randn(32, 3, 32, 32),
                     lambda out: F.cross_entropy(out, torch.arange(out.shape[0]) % 10)),
}


@contextlib.contextmanager
def gemm_engine(engine):
    """Run with ``SQCOMPILE_CPU_GEMM=engine`` (read at every int8 GEMM call); ``None``: as set."""
    if engine is None:
        yield
        return
    old = os.environ.get(amx.ENGINE_VARIABLE)
    os.environ[amx.ENGINE_VARIABLE] = engine
    try:
        yield
    finally:
        if old is None:
            del os.environ[amx.ENGINE_VARIABLE]
        else:
            os.environ[amx.ENGINE_VARIABLE] = old


def saved_bytes(step) -> int:
    """Bytes of the tensors autograd saves for backward during one step."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return total


@contextlib.contextmanager
def saved_scales(on: bool):
    """While ``on``, quantized GEMMs traced for Inductor save their operands' scales for backward
    (as before 2026-11-30) rather than their channel maxima (``sqcompile.ops._saves_maxima``):
    the comparison the ``--saved-scales`` variant makes.  Read when a graph is traced, i.e. at
    the variant's first steps."""
    from sqcompile import ops
    saves = ops._saves_maxima
    if on:
        ops._saves_maxima = lambda ks: False
    try:
        yield
    finally:
        ops._saves_maxima = saves


@contextlib.contextmanager
def passes_off(names):
    """While active, the lowering passes ``names`` (functions of ``sqcompile.backends.lowering``,
    e.g. ``fuse_gradient_quantizers``) leave the graphs alone: the comparisons the
    ``--no-grad-kernel`` and ``--no-gelu-kernel`` variants make.  Read when a graph is
    compiled, i.e. at the variant's first step."""
    from sqcompile.backends import lowering
    saved = {name: getattr(lowering, name) for name in names}
    for name in names:
        setattr(lowering, name, lambda gm, *args: gm)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(lowering, name, fn)


@contextlib.contextmanager
def conv_pairs_off(on):
    """While ``on``, the gradient pass pairs only GEMMs' gradients, not convolutions' (their
    outer-scaled ShiftQuants stay Inductor's loops): ``--no-conv-grad-kernel``.  Read when a
    graph is compiled, i.e. at the variant's first step."""
    from sqcompile.backends import cpu_quant
    sides = cpu_quant._sides
    if on:
        cpu_quant._sides = lambda pv, v: [(side, conv) for side, conv in sides(pv, v) if not conv]
    try:
        yield
    finally:
        cpu_quant._sides = sides


@contextlib.contextmanager
def im2col_convs(on):
    """While ``on``, the torch kernel family has no ``int8_conv``: stride-1 integer convs are
    traced as im2col GEMMs, as before the implicit-GEMM kernel (``--no-implicit-conv``).
    Read when a graph is traced, i.e. at the variant's first step."""
    from sqcompile import ops
    family = ops.KERNEL_SETS["torch"]
    if on:
        ops.register_kernel_set("torch", family._replace(int8_conv=None, int8_conv_weight=None))
    try:
        yield
    finally:
        ops.register_kernel_set("torch", family)


@contextlib.contextmanager
def grouped_simulated(on):
    """While ``on``, grouped convolutions have no integer formulation (as before 2026-12-03:
    quantized, then float convolutions of the dequantized operands): ``--grouped-simulated``.
    Read when a graph is compiled, i.e. at the variant's first step."""
    from sqcompile import ops
    supported = ops.integer_conv_supported
    if on:
        ops.integer_conv_supported = lambda nd, groups, *a, **k: \
            "grouped (benchmark: simulated)" if groups != 1 else supported(nd, groups, *a, **k)
    try:
        yield
    finally:
        ops.integer_conv_supported = supported


def variants(args, name):
    """``(label, compile options or None, bf16 autocast)`` of every path timed for ``name``."""
    bits = dict(weight_bits=args.bits, act_bits=args.bits, grad_bits=args.bits, inner="inductor")
    tag = f"shiftquant W{args.bits}A{args.bits}G{args.bits}"
    out = [("fp32 eager", None, False), (tag, bits, False)]
    if args.float_attention and name == "transformer":
        out.append((f"{tag}, attention float", dict(bits, overrides={"*:scaled_dot_product_attention": None}), False))
    if args.onednn:
        out += [(f"{label}, oneDNN GEMMs", dict(options, _engine="onednn"), False) for label, options, _ in out[1:]]
    if args.saved_scales:
        out.append((f"{tag}, GEMMs save scales", dict(bits, _saved_scales=True), False))
    if args.fusion_off:
        out.append((f"{tag}, fusion off", dict(bits, fusion=False), False))
    # default options spelled out (fusion=True, collect_stats=False), different for each row:
    # options equal to another row's would make Dynamo reuse that row's compiled graphs
    # (torch.compile's backend wrappers compare equal by their options)
    if args.no_grad_kernel:
        out.append((f"{tag}, gradient quantizers as Inductor loops",
                    dict(bits, fusion=True, _passes_off=("fuse_gradient_quantizers",)), False))
    if args.no_gelu_kernel and name == "transformer":
        out.append((f"{tag}, GELU + quantizer as Inductor loops",
                    dict(bits, fusion=True, collect_stats=False, _passes_off=("fuse_gelu_quantizers",)), False))
    if args.no_gelu_backward_kernel and name == "transformer":
        out.append((f"{tag}, GELU backward as Inductor's loop",
                    dict(bits, fusion=True, cudagraphs=False, _passes_off=("fuse_gelu_backwards",)), False))
    if args.no_conv_grad_kernel and name != "transformer":
        out.append((f"{tag}, convs' gradient quantizers as Inductor loops",
                    dict(bits, fusion=True, grad_outer_scale=True, _conv_pairs_off=True), False))
    if args.no_implicit_conv and name != "transformer":
        out.append((f"{tag}, convs as im2col GEMMs",
                    dict(bits, fusion=True, execution="auto", _im2col=True), False))
    if args.grouped_simulated and name == "mobilenet_v2":
        out.append((f"{tag}, grouped convs simulated",
                    dict(bits, fusion=True, cudagraphs=False, collect_stats=False, _grouped_simulated=True), False))
    if args.no_norm_kernel:
        out.append((f"{tag}, norms as Inductor loops",
                    dict(bits, fusion=True, execution="auto", collect_stats=False, _norm_ops=True), False))
    if args.no_c_kernels:
        out.append((f"{tag}, no C kernels but the GEMMs'",
                    dict(bits, fusion=False, execution="auto", _norm_ops=True), False))
    if args.outer_scale:
        flipped = not OpConfig().grad_outer_scale
        out.append((f"{tag}, grad_outer_scale={flipped}", dict(bits, grad_outer_scale=flipped), False))
    if args.act_groups > 1:
        out.append((f"{tag}, act_groups={args.act_groups}", dict(bits, act_groups=args.act_groups), False))
        if args.no_gelu_kernel and name == "transformer":
            out.append((f"{tag}, act_groups={args.act_groups}, norm / GELU + quantizer as Inductor loops",
                        dict(bits, act_groups=args.act_groups, fusion=True, collect_stats=False,
                             _passes_off=("fuse_gelu_quantizers", "fuse_cpu_norm_quantizers")), False))
    if args.dynamic:
        out.append((f"{tag}, dynamic=True", dict(bits, kernels="auto", fusion=True, _dynamic=True), False))
        if args.no_norm_kernel:
            out.append((f"{tag}, dynamic=True, norms as Inductor loops",
                        dict(bits, kernels="auto", fusion=True, collect_stats=False, _dynamic=True, _norm_ops=True),
                        False))
    if args.bf16:
        out.append(("bf16 autocast eager (reference)", None, True))
    return out


def make_step(name, options, bf16, x, channels_last=False):
    """One training step (forward, backward, SGD) of a fresh ``name`` model on input ``x``
    (with ``channels_last``, a CNN's parameters are stored channels-last, as ``x`` then is)."""
    cls, _, loss_fn = MODELS[name]
    torch.manual_seed(0)
    model = cls()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    options = dict(options or {})
    engine = options.pop("_engine", None)
    scales = options.pop("_saved_scales", False)
    off = options.pop("_passes_off", ())
    im2col = options.pop("_im2col", False)
    norm_ops = options.pop("_norm_ops", False)
    conv_pairs = options.pop("_conv_pairs_off", False)
    grouped = options.pop("_grouped_simulated", False)
    dynamic = options.pop("_dynamic", None)
    run = model if not options else torch.compile(model, backend="shiftquant", options=options, dynamic=dynamic)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        with gemm_engine(engine), saved_scales(scales), passes_off(off), im2col_convs(im2col), \
                norm_kernels_off(norm_ops), conv_pairs_off(conv_pairs), grouped_simulated(grouped):
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn(run(x))
            loss.backward()
            opt.step()
    return step


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def model_input(args, name):
    """``(x, channels_last)`` for ``name``: ``--channels-last`` applies to the 4-d CNN input."""
    x = MODELS[name][1]()
    cl = args.channels_last and x.dim() == 4
    return (x.contiguous(memory_format=torch.channels_last) if cl else x), cl


def peak_child(args, spec: str) -> None:
    """``--_peak model:index``: warm one variant up, reset the process's RSS high-water mark,
    run two steps and print the peak RSS during them (JSON, read by :func:`peak_memory`)."""
    name, index = spec.split(":")
    label, options, bf16 = variants(args, name)[int(index)]
    torch.manual_seed(0)
    step = make_step(name, options, bf16, *model_input(args, name))
    for _ in range(2):
        step()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:   # Linux: reset VmHWM to the current RSS
        f.write("5")
    for _ in range(2):
        step()
    print(json.dumps({"label": label, "peak_mib": _status_mib("VmHWM")}))


def peak_memory(args, argv, name):
    """Peak resident memory of each variant's training step, each in a process of its own (a
    high-water mark is per process).  It is the whole process: the Python and torch runtime,
    parameters and optimizer state, and for compiled paths what compiling left resident
    (Inductor's caches) and sqcompile's recycled GEMM outputs."""
    rows = []
    given = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--peak-memory"]
    for i in range(len(variants(args, name))):
        res = subprocess.run([sys.executable, os.path.abspath(__file__), *given, "--_peak", f"{name}:{i}"],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    base = rows[0]["peak_mib"]
    return [[name, r["label"], f"{r['peak_mib']:.0f}", f"{r['peak_mib'] / base:.2f}"] for r in rows]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["transformer", "resnet18"], choices=list(MODELS),
                   help="models to time (default: transformer resnet18)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--bits", type=int, default=4)
    add_threads_argument(p)
    p.add_argument("--float-attention", action="store_true",
                   help="also time the shiftquant step with attention kept in float (overrides="
                        "{'*:scaled_dot_product_attention': None}: PyTorch's fused attention, Linears quantized)")
    p.add_argument("--onednn", action="store_true",
                   help="also time each shiftquant step with its int8 GEMMs on oneDNN's torch._int_mm "
                        "(SQCOMPILE_CPU_GEMM=onednn) instead of the AMX kernel, in the same process")
    p.add_argument("--saved-scales", action="store_true",
                   help="also time the shiftquant step with its quantized GEMMs saving their operands' scales "
                        "for backward instead of their channel maxima (which let Inductor keep a norm or a "
                        "softmax and the next GEMM's quantizer in one loop over rows), in the same process")
    p.add_argument("--fusion-off", action="store_true",
                   help="also time the step with fusion=False: attention's softmax, P quantizer and softmax "
                        "backward (sqcompile.backends.cpu_attention) and the gradients' quantizers "
                        "(sqcompile.backends.cpu_quant) as Inductor's loops instead of C kernels")
    p.add_argument("--no-implicit-conv", action="store_true",
                   help="CNNs: also time the step with stride-1 convs as im2col GEMMs (before the "
                        "implicit-GEMM conv kernel)")
    p.add_argument("--no-norm-kernel", action="store_true",
                   help="also time the step with the L1 norms as the graph's ops under Inductor (the "
                        "cpu_l1_norm C kernels off)")
    p.add_argument("--no-c-kernels", action="store_true",
                   help="also time the step with none of the attention / quantizer / GELU / norm C kernels "
                        "(fusion=False and the norms on the graph's ops): what a CPU without them runs")
    p.add_argument("--no-grad-kernel", action="store_true",
                   help="also time the step with the gradients' outer-scaled ShiftQuants as Inductor's loops "
                        "(the shiftquant_outer_pair C kernel off, attention's kernels on)")
    p.add_argument("--no-conv-grad-kernel", action="store_true",
                   help="CNNs: also time the step with the convolutions' gradient quantizers as Inductor's loops "
                        "(shiftquant_outer_pair's conv=True off; the Linears' pairs on)")
    p.add_argument("--no-gelu-kernel", action="store_true",
                   help="also time the transformer step with its Linear's dequantize + bias + GELU + the next "
                        "quantizer as Inductor's loop (the gelu_quantize C kernel off, the others on); with "
                        "--act-groups also that step with the quantizers of its norms' and GELUs' outputs as "
                        "Inductor's loops (gelu_shiftquant and cpu_l1_norm_shiftquant off)")
    p.add_argument("--no-gelu-backward-kernel", action="store_true",
                   help="also time the transformer step with its GELU's backward (dequantize + GELU backward + "
                        "the bias gradient's sums) as Inductor's loops (the gelu_backward C kernel off)")
    p.add_argument("--grouped-simulated", action="store_true",
                   help="also time mobilenet_v2 with its depthwise convs simulated (float), not integer")
    p.add_argument("--dynamic", action="store_true",
                   help="also time the shiftquant step compiled with dynamic=True (symbolic sizes: the graph "
                        "Dynamo compiles once batch sizes or lengths vary); with --no-norm-kernel also that "
                        "step with its norms as Inductor's loops")
    p.add_argument("--outer-scale", action="store_true",
                   help="also time the shiftquant step with grad_outer_scale the other way than its default, "
                        "in the same process")
    p.add_argument("--act-groups", type=int, default=1, metavar="G",
                   help="also time the shiftquant step with act_groups=G (ShiftQuant over the activations' "
                        "channels, the forward quantizer of the accuracy option), in the same process")
    p.add_argument("--bf16", action="store_true",
                   help="also time fp32 eager under bf16 autocast: on CPUs with AMX-BF16 tiles its GEMMs are "
                        "several times faster than both fp32 and oneDNN's int8 GEMM as PyTorch reaches it")
    p.add_argument("--channels-last", action="store_true",
                   help="store the CNN's parameters and input channels-last (torch.channels_last), every path: "
                        "PyTorch's convs then return channels-last outputs, and so do the integer convs")
    p.add_argument("--peak-memory", action="store_true",
                   help="instead of timing, report each path's peak resident memory during two training "
                        "steps, each path in a process of its own (Linux)")
    p.add_argument("--_peak", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._peak:
        if args.threads:
            torch.set_num_threads(args.threads)
        return peak_child(args, args._peak)
    start("train_step.py", args, argv)
    if args.peak_memory:
        rows = [row for name in args.models for row in peak_memory(args, argv, name)]
        print(tabulate(rows, headers=["model", "path", "peak RSS MiB", "vs fp32"], tablefmt="github"))
        return
    rows = []
    for name in args.models:
        torch._dynamo.reset()
        torch.manual_seed(0)
        x, cl = model_input(args, name)
        runs = {label: make_step(name, options, bf16, x, cl) for label, options, bf16 in variants(args, name)}
        times = interleaved(runs, rounds=args.rounds, warmup=2)
        mem = {label: saved_bytes(step) for label, step in runs.items()}
        base = "fp32 eager"
        for label in runs:
            rows.append([name, label, f"{median_ms(times[label]):.0f}", f"{median_ratio(times, base, label):.2f}x",
                         f"{mem[label] / 2**20:.0f}", f"{mem[label] / mem[base]:.2f}"])
        print(tabulate(rows[-len(runs):], tablefmt="github"), flush=True)
    print()
    print(tabulate(rows, headers=["model", "path", "median ms/step", "speed-up vs fp32", "saved for bwd MiB",
                                  "vs fp32"], tablefmt="github"))


if __name__ == "__main__":
    main()
