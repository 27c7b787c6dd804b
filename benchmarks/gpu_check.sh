#!/usr/bin/env bash
# GPU check on the device machine (it has torch but not monai, pytorch-ignite, nibabel or fire): install the wheels
# carried in .whl/ (see docs/benchmarks.md), then run every stage of every bundle on CUDA; results go to $1.
set -uo pipefail
out="${1:-gpu_check}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 benchmarks/gpu_check.py --output /tmp/gpu_check "${@:2}" 2>&1 | tee "$out/gpu_check.log"
status=${PIPESTATUS[0]}
cp /tmp/gpu_check/gpu_check.md /tmp/gpu_check/gpu_check.json "$out/" 2>/dev/null
exit "$status"
