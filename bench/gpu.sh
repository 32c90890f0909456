#!/usr/bin/env bash
# GPU checks and timings on a CUDA machine: the CUDA-marked tests, then the benchmarks on the GPU.
#   bash bench/gpu.sh            (from the repository root; needs the project's requirements installed)
# Writes bench/results_gpu.json and bench/cuda_checks.json (shown at the end of bench/RESULTS.md with the card's name, from
# torch.cuda.get_device_name) and bench/gpu-tests.log with the tests' output. Each benchmark's results
# are written as soon as it ends, so a run cut short keeps what it finished.
# Environment: PYTHON (default python3), GPU_TEST_TIMEOUT / GPU_BENCH_TIMEOUT (seconds, default 300 / 900),
# OUT (optional: a folder that receives copies of the results and the logs).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY - <<'PY' || exit 1
import sys, torch
if not torch.cuda.is_available():
    sys.exit("bench/gpu.sh needs a CUDA device (torch.cuda.is_available() is False)")
print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda, flush=True)
PY
export MMIE_DEVICE=cuda PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
for pkg in accelerate bitsandbytes; do  # the quantized-weights tests skip without bitsandbytes
  $PY -c "import $pkg" 2>/dev/null || $PY -m pip install -q --retries 0 --timeout 10 "$pkg" \
    || echo "$pkg unavailable: the tests that need it skip"
done
status=0
# test_cuda.py's tests are the CUDA-marked ones; test_half_precision.py (unmarked) runs on the GPU through MMIE_DEVICE
timeout "${GPU_TEST_TIMEOUT:-300}" $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py \
  tests/test_half_precision.py 2>&1 | tee bench/gpu-tests.log || status=1
# the maps recorded during generation against the analysis pass, in float32 on the GPU; launches blocking, so
# that a failing kernel is reported where it is called
MMIE_DTYPE=float32 CUDA_LAUNCH_BLOCKING=1 timeout "${GPU_TEST_TIMEOUT:-300}" $PY -m pytest -x -q -p no:cacheprovider \
  tests/test_generation_maps.py 2>&1 | tee -a bench/gpu-tests.log || status=1
# float32 for the equalities the benchmarks check (the 7B-sized LLaVA of the token maps is bf16 by itself)
MMIE_DTYPE=${MMIE_DTYPE:-float32} timeout "${GPU_BENCH_TIMEOUT:-900}" $PY -m bench --gpu 2>&1 \
  | tee bench/gpu-bench.log || status=1
MMIE_DTYPE=float32 timeout "${GPU_TEST_TIMEOUT:-300}" $PY -m bench.cuda_checks 2>&1 | tee -a bench/gpu-bench.log \
  || status=1
$PY -c "from bench.__main__ import render; from pathlib import Path; Path('bench/RESULTS.md').write_text(render())"
if [ -n "${OUT:-}" ]; then
  cp bench/gpu-tests.log bench/gpu-bench.log bench/RESULTS.md bench/results_gpu.json bench/cuda_checks.json \
    "$OUT"/ 2>/dev/null
fi
exit $status
