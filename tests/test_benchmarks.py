"""The benchmark scripts still run: a tiny Linear step through ``benchmarks/linear.py``
(speed itself is measured by the scripts, never asserted here)."""
import os
import subprocess
import sys

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


def test_host_overhead_benchmark_runs():
    """``benchmarks/host_overhead.py`` times every op it lists (Triton launches stubbed out)."""
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "host_overhead.py"), "--rounds", "1",
                          "--calls", "2"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line for line in res.stdout.splitlines() if line.startswith("| triton_")]
    assert len(rows) == 8 and "less host time" in res.stdout
