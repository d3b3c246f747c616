#!/usr/bin/env bash
# The benchmark on one GPU, for whenever a GPU machine is available; stops itself before 8 minutes
# (whether each run fits its share is untested: never run on a GPU yet). Installs nothing: run it from the
# repository root with the suite's venv. Usage: benchmarks/gpu_check.sh OUTPUT_FOLDER [PYTHON]
# Writes OUTPUT_FOLDER/benchmark_gpu.json and OUTPUT_FOLDER/benchmark_gpu.txt (the printed tables), then
# the speed of each --tf32 choice on covariance fitting and on scoring, at one smaller size
# (tf32_{matmuls,all,off}_{covariance,scores}.json).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: benchmarks/gpu_check.sh OUTPUT_FOLDER [PYTHON]}"
python="${2:-.venv/bin/python}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/nvidia_smi.txt"
uptime | tee "$out/uptime.txt"
# 270 + 6 x 35 s: stop before 8 minutes whatever happens; a JSON is written only by a finished run.
timeout 270 "$python" -m benchmarks.benchmark --device cuda \
    --num_classes 16 --num_train 2048 --num_queries 100 \
    --query_batch_size 50 --train_batch_size 128 --loading_images 2048 \
    --json "$out/benchmark_gpu.json" 2>&1 | tee "$out/benchmark_gpu.txt" \
    || echo "gpu_check.sh: the main benchmark stopped early (time limit or error, above)"
for tf32 in matmuls all off; do
    timeout 35 "$python" -m benchmarks.benchmark --device cuda --tf32 "$tf32" --phases covariance \
        --precisions float32 --num_classes 16 --num_train 512 --train_batch_size 128 \
        --json "$out/tf32_${tf32}_covariance.json" 2>&1 | tee "$out/tf32_${tf32}_covariance.txt" || echo "gpu_check.sh: tf32 $tf32 stopped early"
    timeout 35 "$python" -m benchmarks.benchmark --device cuda --tf32 "$tf32" --strategy identity --phases scores \
        --ranks full --precisions float32 --num_classes 16 --num_train 512 --num_queries 100 \
        --query_batch_size 50 --train_batch_size 128 \
        --json "$out/tf32_${tf32}_scores.json" 2>&1 | tee "$out/tf32_${tf32}_scores.txt" || echo "gpu_check.sh: tf32 $tf32 stopped early"
done
