"""Time and peak memory of `top_influences.py`'s streamed top-k on a score file as large as a real run's:
writes one synthetic pairwise score file (default 1000 queries x 1,281,167 training examples, float32,
about 5.1 GB) a block of rows at a time, then, in a child process, finds the top-k helpful and harmful
training examples of every query with the same function the script uses, and reports the child's wall
time and peak resident memory (ru_maxrss). No images are involved: at this size only the scores matter.
Run it from the repository root as `python -m benchmarks.top_influences_benchmark`."""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

from benchmarks.query_batching_benchmark import (
    FULL_NUM_QUERIES,
    FULL_NUM_TRAIN,
    MEMORY_BUDGET_BYTES,
    SAFETENSORS_DTYPES,
    in_own_workdir,
    report,
    safetensors_header,
    to_bytes,
)
from benchmarks.workdir import scratch_folder
from influence.runtime.cli import positive_int

REPO_ROOT = Path(__file__).resolve().parent.parent

PROG = "top_influences_benchmark.py"
DEFAULT_TOP_K = 10
ROWS_PER_WRITE = 16
SEED = 0


def write_score_file(path: Path, num_queries: int, num_train: int, dtype: str) -> None:
    """Random normal scores, ROWS_PER_WRITE rows at a time, never the whole matrix in memory."""
    rng = np.random.default_rng(SEED)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        handle.write(safetensors_header(num_queries, num_train, dtype, {"query_gradient_low_rank": "None"}))
        for start in range(0, num_queries, ROWS_PER_WRITE):
            rows = min(ROWS_PER_WRITE, num_queries - start)
            handle.write(to_bytes(rng.standard_normal((rows, num_train), dtype=np.float32), dtype))


def measure(path: Path, top_k: int, rows_per_block: int) -> Dict[str, object]:
    """What the child process runs: the top-k of every query, as top_influences.py computes it."""
    from influence.results.score_files import open_score_file  # pylint: disable=import-outside-toplevel
    from top_influences import HELPFUL, stream_top_k  # pylint: disable=import-outside-toplevel

    score_file = open_score_file(path, "--score_file")
    found = stream_top_k(score_file, list(range(score_file.num_queries)), top_k, rows_per_block)
    return {"queries": len(found), "first_best": found[0][HELPFUL][1][:3]}


def run_child(path: Path, top_k: int, rows_per_block: int) -> Dict[str, float]:
    command = [
        sys.executable, "-m", "benchmarks.top_influences_benchmark", "--score_file", str(path),
        "--top_k", str(top_k), "--rows_per_block", str(rows_per_block),
    ]
    start = time.perf_counter()
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if completed.returncode != 0:
        raise SystemExit(f"{PROG}: error: the measurement exited with code {completed.returncode}: {completed.stderr[-500:]}")
    # Linux reports ru_maxrss in KiB; this process has waited on no other child.
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {"seconds": seconds, "peak_rss_bytes": peak, **json.loads(completed.stdout.strip().splitlines()[-1])}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("--num_queries", type=positive_int, default=FULL_NUM_QUERIES, help=f"Query rows (default: {FULL_NUM_QUERIES}).")
    parser.add_argument("--num_train", type=positive_int, default=FULL_NUM_TRAIN, help=f"Training examples per row (default: {FULL_NUM_TRAIN}, ImageNet's training set).")
    parser.add_argument("--dtype", choices=sorted(SAFETENSORS_DTYPES), default="float32", help="Score dtype; bfloat16 is what --use_half_precision writes (default: float32).")
    parser.add_argument("--top_k", type=positive_int, default=DEFAULT_TOP_K, help=f"k of the top-k (default: {DEFAULT_TOP_K}).")
    parser.add_argument("--rows_per_block", type=positive_int, default=16, help="Query rows read at a time (default: 16, the script's default).")
    parser.add_argument("--workdir", type=Path, help="Folder for the synthetic file, removed afterwards unless --keep (default: a new temporary folder).")
    parser.add_argument("--keep", action="store_true", help="Keep the synthetic file.")
    parser.add_argument("--json", type=Path, help="Also write the measurements to this JSON file.")
    parser.add_argument("--score_file", type=Path, help="Measure this existing file and print one JSON line (what the child process runs).")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    args = build_parser().parse_args(argv)
    if args.score_file is not None:
        result = measure(args.score_file, args.top_k, args.rows_per_block)
        print(json.dumps(result))
        return result
    workdir = scratch_folder(args.workdir, "top_influences_benchmark_")
    path = workdir / "pairwise_scores.safetensors"
    write_seconds, measured = in_own_workdir(
        workdir, args.keep, PROG, lambda: write_score_file(path, args.num_queries, args.num_train, args.dtype),
        lambda: {"file_bytes": path.stat().st_size, **run_child(path, args.top_k, args.rows_per_block)},
    )
    file_bytes = measured["file_bytes"]
    result = {
        "num_queries": args.num_queries, "num_train": args.num_train, "dtype": args.dtype, "top_k": args.top_k,
        "rows_per_block": args.rows_per_block, "bytes": file_bytes, "write_seconds": write_seconds,
        "top_k_seconds": measured["seconds"], "peak_rss_bytes": measured["peak_rss_bytes"],
        "within_memory_budget": measured["peak_rss_bytes"] < MEMORY_BUDGET_BYTES, "python": sys.version.split()[0],
    }
    rows = [
        ("score file", f"{args.num_queries} x {args.num_train} {args.dtype} ({file_bytes / 1e9:.2f} GB)"),
        ("write time", f"{write_seconds:.1f} s"),
        (f"top-{args.top_k} of every query", f"{measured['seconds']:.1f} s (child process, including imports)"),
        ("peak RSS", f"{measured['peak_rss_bytes'] / 1024**3:.2f} GiB (budget {MEMORY_BUDGET_BYTES / 1024**3:.0f} GiB: "
         f"{'within' if result['within_memory_budget'] else 'OVER'})"),
    ]
    report(rows, result, args.json)
    return result


if __name__ == "__main__":
    main()
