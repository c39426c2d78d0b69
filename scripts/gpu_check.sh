#!/usr/bin/env bash
# Every GPU check in one call, for a machine whose Python already has a CUDA build of torch
# (see "GPU installs" in the README). Writes under OUT_DIR (default: $OUT, else gpu_check/):
#   tests.txt               the tests marked `cuda` (skipped everywhere else): one torchrun
#                           training run of the tiny config on cuda in bf16, and inference
#                           whose fp32 audio matches the CPU's (no TF32) plus a bf16 run
#   benchmark_cuda.json/txt the benchmark on cuda: batch throughput and the training step
#                           at growing batch sizes up to the first that does not fit
#   nvidia-smi.txt          the device, for the record
# Wheels of the pure-data dependencies (soundfile, soxr, ...) for machines without a package
# index can sit in .whl/; they are installed first, offline. Usage:
#   PYTHON=/path/to/python bash scripts/gpu_check.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_check}}
python=${PYTHON:-python3}
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    "$python" -m pip install --quiet --no-index --no-deps .whl/*.whl
fi
"$python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "error: torch sees no CUDA device")'
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
status=0
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$python" -m pytest -q -m cuda -rs tests 2>&1 | tee "$out/tests.txt" \
    || status=1
"$python" scripts/benchmark.py --device cuda --batch-sizes 1,16,64 --train-batch 2,4,8,16,32,64 \
    --json "$out/benchmark_cuda.json" 2>&1 | tee "$out/benchmark_cuda.txt" || status=1
exit $status
