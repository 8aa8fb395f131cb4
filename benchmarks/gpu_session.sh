#!/usr/bin/env bash
# The prepared GPU check, for a session that is lent the H200 (at most 10 minutes there), the
# figures first so that a time-out cannot cost them:
#   1. benchmarks/gpu.py, every part, with profiles, and the block also with attention in bf16,
#      with the quantized attention unfused, with symbolic sizes and without grad_outer_scale (on
#      by default: what its accuracy costs), then at width 4096 (last: a time-out costs it first);
#   2. the Triton kernels' correctness tests on the GPU (kernels compiled for the device, not
#      interpreted): quantizers, GEMMs, region fusion with ranges, the L1 norm kernels, the
#      fused attention;
#   3. benchmarks/host_overhead.py --device cuda: each op's host cost with Triton's launcher.
# Writes env.txt, gpu.txt, gpu-tests.txt and host.txt to the folder given (default: $OUT, else .).
# From this machine, with the device tool:
#   run(command="bash benchmarks/gpu_session.sh", timeout_s=590)
set -uo pipefail
out=${1:-${OUT:-.}}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
  2>&1 | tee "$out/env.txt"
timeout 330 python3 benchmarks/gpu.py --reps 3 --block-timeout 90 --profile --float-attention --unfused-attention --dynamic \
  --outer-scale \
  --block-dims 1024,4096 \
  2>&1 | tee "$out/gpu.txt"
# no -x: one failure must not hide the others; slow tests (compiles for sm_90 without a GPU) are CPU checks;
# SQCOMPILE_AUTOTUNE=0: one config per kernel and shape, since the tests check values, not speed
SQCOMPILE_AUTOTUNE=0 timeout 180 python3 -m pytest -o addopts="" -q -p no:warnings -m "not slow" -n 4 \
  tests/test_triton_attention.py tests/test_triton_norms.py tests/test_fusion.py tests/test_triton_kernels.py \
  2>&1 | tee "$out/gpu-tests.txt"
SQCOMPILE_AUTOTUNE=0 timeout 40 python3 benchmarks/host_overhead.py --device cuda 2>&1 | tee "$out/host.txt"
