#!/usr/bin/env bash
# The GPU benchmark on a bare CUDA machine that has PyTorch but no network (see benchmarks/README.md).
# Needs .whl/ from `python -m benchmarks.device_wheels`; writes gpu.json to ./gpu-results (or the folder in OUT).
set -euo pipefail
out="${OUT:-gpu-results}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python3 -m benchmarks.run_all --only gpu --out "$out"
