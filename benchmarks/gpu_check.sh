#!/usr/bin/env bash
# The benchmark on one GPU at a size that finishes in under 8 minutes (an H100 or A100 should need 3-5),
# for whenever a GPU machine is available. Installs nothing: run it from the repository root with the
# suite's venv. Usage: benchmarks/gpu_check.sh OUTPUT_FOLDER [PYTHON]
# Writes OUTPUT_FOLDER/benchmark_gpu.json and OUTPUT_FOLDER/benchmark_gpu.txt (the printed tables).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: benchmarks/gpu_check.sh OUTPUT_FOLDER [PYTHON]}"
python="${2:-.venv/bin/python}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/nvidia_smi.txt"
uptime | tee "$out/uptime.txt"
# 480 s: stop before 8 minutes whatever happens; the JSON is written only by a finished run.
timeout 480 "$python" -m benchmarks.benchmark --device cuda \
    --num_classes 16 --num_train 2048 --num_queries 100 \
    --query_batch_size 50 --train_batch_size 128 --loading_images 2048 \
    --json "$out/benchmark_gpu.json" 2>&1 | tee "$out/benchmark_gpu.txt"
