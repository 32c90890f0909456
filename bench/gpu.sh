#!/usr/bin/env bash
# GPU checks and timings on a CUDA machine: the CUDA-marked tests, then every benchmark on the GPU.
#   bash bench/gpu.sh            (from the repository root; needs the project's requirements installed)
# Writes bench/RESULTS.md and bench/results.json with the card's name in their header (bench/common.py
# records torch.cuda.get_device_name), and bench/gpu-tests.log with the tests' output.
set -euo pipefail
cd "$(dirname "$0")/.."
python - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("bench/gpu.sh needs a CUDA device (torch.cuda.is_available() is False)")
print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
PY
export MMIE_DEVICE=cuda
python -m pip install -q accelerate bitsandbytes || echo "bitsandbytes unavailable: the quantized-weights tests skip"
python -m pytest -m cuda -q tests/test_cuda.py tests/test_half_precision.py 2>&1 | tee bench/gpu-tests.log
python -m bench
