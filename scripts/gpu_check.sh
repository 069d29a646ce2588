#!/usr/bin/env bash
# The GPU check (make gpu-check): native Triton kernels against their torch twins, the bench grid on CUDA at a 7B
# model's geometry, and the decode kernels' bandwidth; writes results/bench/cuda.md (scripts/gpu_check.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
unset TRITON_INTERPRET
exec "$PY" scripts/gpu_check.py "$@"
