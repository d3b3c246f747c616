#!/usr/bin/env bash
# The benchmark on one GPU, for whenever a GPU machine is available; stops itself before 8 minutes. Installs
# nothing: run it with the suite's venv. Usage: benchmarks/gpu_check.sh [--dry-run] OUTPUT_FOLDER [PYTHON]
# Writes OUTPUT_FOLDER/benchmark_gpu.json and OUTPUT_FOLDER/benchmark_gpu.txt (the printed tables), then
# the speed of each --tf32 choice on covariance fitting and on scoring, at one smaller size
# (tf32_{matmuls,all,off}_{covariance,scores}.json), with nvidia_smi.txt and loadavg.txt beside them.
# --dry-run: the same steps on the CPU with a small CNN and a few images (under a minute), to check the
# script itself on a machine without a GPU; its numbers mean nothing (tests/test_gpu_check.py runs it).
set -euo pipefail
dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then
    dry_run=1
    shift
fi
repo="$(cd "$(dirname "$0")/.." && pwd)"
out_arg="${1:?usage: benchmarks/gpu_check.sh [--dry-run] OUTPUT_FOLDER [PYTHON]}"
python="${2:-$repo/.venv/bin/python}"
# Paths given relative to the caller's directory, resolved before the cd below.
mkdir -p "$out_arg"
out="$(cd "$out_arg" && pwd)"
if [[ "$python" == */* ]]; then
    python="$(cd "$(dirname "$python")" && pwd)/$(basename "$python")"
fi
cd "$repo"
export PYTHONUNBUFFERED=1  # through tee, output reaches the file line by line, and survives a timeout's kill
work="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
trap 'rm -rf "$work"' EXIT  # the generated images of a run that timeout killed, too
if ((dry_run)); then
    device=(--device cpu --model small)
    main_sizes=(--num_classes 2 --num_train 8 --num_queries 4 --query_batch_size 2 --train_batch_size 4 --loading_images 8)
    tf32_sizes=(--num_classes 2 --num_train 4 --num_queries 2 --query_batch_size 2 --train_batch_size 4)
    echo "dry run on the CPU: no GPU is used" | tee "$out/nvidia_smi.txt"
else
    device=(--device cuda)
    main_sizes=(--num_classes 16 --num_train 2048 --num_queries 100 --query_batch_size 50 --train_batch_size 128 --loading_images 2048)
    tf32_sizes=(--num_classes 16 --num_train 512 --num_queries 100 --query_batch_size 50 --train_batch_size 128)
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/nvidia_smi.txt"
    else
        echo "nvidia-smi not found" | tee "$out/nvidia_smi.txt"
    fi
fi
tee "$out/loadavg.txt" </proc/loadavg  # not uptime: procps is missing from minimal CUDA images
# Loading is measured with the analysis's own worker count only (0 and 1 workers alone took ~40 s).
workers="$("$python" -c 'from influence.runtime import hardware; print(hardware.default_num_workers())')"
# 270 + 6 x 35 s: stop before 8 minutes whatever happens; a JSON is written only by a finished run.
timeout 270 "$python" -m benchmarks.benchmark "${device[@]}" "${main_sizes[@]}" --loading_workers "$workers" \
    --workdir "$work/main" --json "$out/benchmark_gpu.json" 2>&1 | tee "$out/benchmark_gpu.txt" \
    || echo "gpu_check.sh: the main benchmark stopped early (time limit or error, above)"
for tf32 in matmuls all off; do
    timeout 35 "$python" -m benchmarks.benchmark "${device[@]}" --tf32 "$tf32" --phases covariance \
        --precisions float32 "${tf32_sizes[@]}" --workdir "$work/tf32_${tf32}_covariance" \
        --json "$out/tf32_${tf32}_covariance.json" 2>&1 | tee "$out/tf32_${tf32}_covariance.txt" || echo "gpu_check.sh: tf32 $tf32 stopped early"
    timeout 35 "$python" -m benchmarks.benchmark "${device[@]}" --tf32 "$tf32" --strategy identity --phases scores \
        --ranks full --precisions float32 "${tf32_sizes[@]}" --workdir "$work/tf32_${tf32}_scores" \
        --json "$out/tf32_${tf32}_scores.json" 2>&1 | tee "$out/tf32_${tf32}_scores.txt" || echo "gpu_check.sh: tf32 $tf32 stopped early"
done
