#!/usr/bin/env bash
# The prepared GPU check, for a session that is lent the H200 (15 minutes of device time in
# all, a machine's start ~30 s of it), the figures first so that a time-out cannot cost them:
#   1. benchmarks/gpu.py, every part, with profiles, and the block also with attention in bf16
#      and without grad_outer_scale (on by default: what its accuracy costs), then at width
#      4096 (last: a time-out costs it first);
#   2. the Triton kernels' correctness tests on the GPU (kernels compiled for the device, not
#      interpreted): quantizers, GEMMs, region fusion with ranges, the L1 norm kernels, the
#      fused attention.  Stopped by SIGINT at its limit so that pytest still prints which
#      tests failed (-rf); 8 workers (14 were killed once, 2026-11-30, after a benchmark);
#   3. benchmarks/host_overhead.py --device cuda: each op's host cost with Triton's launcher.
# Writes env.txt, gpu.txt, gpu-tests.txt and host.txt to the folder given (default: $OUT, else .).
# On 2026-11-30 part 1 took ~270 s of an H200 (gpu.py ~200 s, the tests ~105 s with 14 workers).
# From this machine, with the device tool:
#   run(command="bash benchmarks/gpu_session.sh", timeout_s=560)
set -uo pipefail
out=${1:-${OUT:-.}}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
  2>&1 | tee "$out/env.txt"
timeout 300 python3 benchmarks/gpu.py --reps 3 --block-timeout 90 --profile --float-attention --outer-scale \
  --block-dims 1024,4096 > "$out/gpu.txt" 2>&1
sed -n '/^=====/,$p' "$out/gpu.txt"          # the summary (gpu.txt has the profiles and autotuner choices)
# slow tests (compiles for sm_90 without a GPU) are CPU checks; SQCOMPILE_AUTOTUNE=0: one
# config per kernel and shape, since the tests check values, not speed
SQCOMPILE_AUTOTUNE=0 timeout -s INT -k 15 150 python3 -m pytest -o addopts="" -q -p no:warnings -p no:benchmark \
  -m "not slow" -n 8 -rf --tb=short \
  tests/test_triton_attention.py tests/test_triton_norms.py tests/test_fusion.py tests/test_triton_kernels.py \
  > "$out/gpu-tests.txt" 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" "$out/gpu-tests.txt" | cut -c1-200
SQCOMPILE_AUTOTUNE=0 timeout 40 python3 benchmarks/host_overhead.py --device cuda 2>&1 | tee "$out/host.txt"
