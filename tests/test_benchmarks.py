"""The benchmark scripts still run: a tiny Linear step through ``benchmarks/linear.py``
(speed itself is measured by the scripts, never asserted here), the CPU convolutions, the host-cost table, the
gradient-scale diagnoses (transformer and CNN), and the sm_90 instruction counts (whose one structural property, no
division per element in nearest rounding, is asserted)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_linear_benchmark_runs_and_names_its_command():
    args = ["--shapes", "64,32,48", "--rounds", "1", "--skip-inductor", "--threads", "1"]
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "linear.py"), *args],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    first = res.stdout.splitlines()[0]
    assert "1 threads" in first and first.endswith("python benchmarks/linear.py " + " ".join(args))
    rows = [line for line in res.stdout.splitlines() if line.startswith("| 64x32x48")]
    assert any("fp32 eager" in r and "1.00x" in r for r in rows)
    assert any("sqcompile int4 (inductor)" in r for r in rows) and any("eager glue" in r for r in rows)


def test_cpu_conv_benchmark_runs():
    """``benchmarks/cpu_conv.py`` checks the implicit convolutions against im2col and times
    both passes of each shape (or says why it cannot, without AMX or AVX2)."""
    args = ["--shapes", "2,8,6,5", "--rounds", "1", "--threads", "1"]
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "cpu_conv.py"), *args],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    if "kernel not usable" not in res.stdout:
        assert "implicit GEMMs on the" in res.stdout
        rows = [line for line in res.stdout.splitlines() if line.startswith("| N2 C8 6x6 -> 5")]
        assert any("forward" in r for r in rows) and any("weight gradient" in r for r in rows)


def test_grouped_conv_benchmark_checks_and_times_every_part():
    """``benchmarks/grouped_conv.py`` checks the int8 depthwise kernels against fp32 (exact at
    its magnitudes) and times forward and both gradients."""
    args = ["--shapes", "2,4,6,1", "2,4,7,2", "--rounds", "1", "--threads", "1"]
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "grouped_conv.py"), *args],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    for shape in ("| [2, 4, 6, 6] s1", "| [2, 4, 7, 7] s2"):
        rows = [line for line in res.stdout.splitlines() if line.startswith(shape)]
        assert {part for part in ("forward", "input grad", "weight grad") if any(part in r for r in rows)} == \
            {"forward", "input grad", "weight grad"}


def test_host_overhead_benchmark_runs():
    """``benchmarks/host_overhead.py`` times every op it lists (Triton launches stubbed out)."""
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "host_overhead.py"), "--rounds", "1",
                          "--calls", "2"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line for line in res.stdout.splitlines() if line.startswith("| triton_")]
    assert len(rows) == 8 and "less host time" in res.stdout


@pytest.mark.slow
def test_sass_counts_show_no_division_per_element_in_nearest_rounding():
    """``benchmarks/sass_counts.py`` compiles kernels for sm_90 and counts their instructions.
    The per-row nearest quantizer (32 values per thread) must not divide per element:
    IEEE divisions put a MUFU reciprocal and a slow-path CALL per value into its code
    (34 of each before nearest rounding divided with FMAs, 4 since: the per-row scales)."""
    pytest.importorskip("triton.backends.nvidia")
    import sm90
    if not os.path.exists(sm90.CUOBJDUMP):
        pytest.skip("this Triton ships no cuobjdump")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "sass_counts.py"), "--only",
                          "quantize per-row bf16, nearest"], capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    row = next(line for line in res.stdout.splitlines() if line.startswith("| quantize per-row bf16, nearest"))
    instructions, per_element, mufu, calls, spilled = [c.strip() for c in row.split("|")[2:7]]
    assert int(mufu) <= 8 and int(calls) <= 8 and int(spilled) == 0, row
    assert float(per_element) < 30, row


def test_grad_scales_benchmark_runs():
    """``benchmarks/grad_scales.py`` prints one row per Linear of the char transformer and a mean."""
    pytest.importorskip("gensim")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "grad_scales.py"), "--steps", "1",
                          "--draws", "1"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line for line in res.stdout.splitlines() if line.startswith("| ") and "Linear" not in line]
    assert len(rows) == 10 and rows[-1].startswith("| mean"), res.stdout
    assert res.stdout.rstrip().endswith("python benchmarks/grad_scales.py --steps 1 --draws 1")


def test_quant_error_benchmark_compares_conv_input_gradient_groupings():
    """``benchmarks/quant_error.py`` ends with the conv ``dX`` operand's table: on real conv
    gradients (a few float steps of its CNN on Fashion-MNIST) ShiftQuant with ranges per
    (sample, channel), what sqcompile does, beats ranges per output channel at both widths."""
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    from data import DatasetMissing, fashion_mnist
    try:
        fashion_mnist("test", limit=1)
    except DatasetMissing as e:
        pytest.skip(f"dataset missing: {e}")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "quant_error.py"), "--steps", "10",
                          "--captures", "2", "--draws", "1"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    cells = {line.split("|")[1].strip(): [float(c) for c in line.split("|")[2:4]]
             for line in res.stdout.split("dX = dY W by grouping")[1].splitlines() if line.startswith("| ")
             and not line.startswith("| conv")}
    per_channel = cells["ShiftQuant, ranges per output channel"]
    per_sample = cells["ShiftQuant, ranges per (sample, channel) (sqcompile)"]
    assert len(cells) == 5 and all(a > b for a, b in zip(per_sample, per_channel)), res.stdout


def test_accuracy_benchmark_refuses_a_bad_option_before_training():
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "accuracy.py"), "--options",
                          '{"grad_outer_scal": true}'], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode != 0 and "did you mean 'grad_outer_scale'" in res.stderr and "===" not in res.stdout
