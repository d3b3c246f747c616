"""Time and peak memory of `query_batching_analysis.py` on score files as large as a real run's: writes
two synthetic pairwise score files (default 1000 queries x 1,281,167 training examples, float32, about
5.1 GB each) in kronfluence's layout, streamed to disk a block of rows at a time, runs the analysis on
them in a child process, and reports the child's wall time and peak resident memory (ru_maxrss). The
low-rank file is the full-rank one plus independent noise, so the statistics are meaningful.
Run it from the repository root as `python -m benchmarks.query_batching_benchmark`."""

from __future__ import annotations

import argparse
import json
import resource
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from benchmarks.workdir import own_workdir, scratch_folder
from influence.results.naming import SCORES_KEY, pairwise_scores_path, scores_name
from influence.runtime.cli import user_errors

REPO_ROOT = Path(__file__).resolve().parent.parent

PROG = "query_batching_benchmark.py"
ANALYSIS_SCRIPT = REPO_ROOT / "query_batching_analysis.py"
# The sizes of a real run of the seed: 1000 ImageNet validation queries against the full training set.
FULL_NUM_QUERIES = 1000
FULL_NUM_TRAIN = 1_281_167
STRATEGY = "ekfac"
LOW_RANK = 32
ANALYSIS_NAME = "benchmark"
MIN_NUM_TRAIN = 100
MEMORY_BUDGET_BYTES = 2 * 1024**3
ROWS_PER_WRITE = 16
# Standard deviation of the noise added to the full-rank scores to make the low-rank ones.
LOW_RANK_NOISE = 0.3
SEED = 0
SAFETENSORS_DTYPES = {"float32": ("F32", 4), "bfloat16": ("BF16", 2)}


def safetensors_header(num_queries: int, num_train: int, dtype: str, metadata: Dict[str, str]) -> bytes:
    """The safetensors preamble (8-byte little-endian length, then JSON padded to 8 bytes) for one tensor."""
    code, itemsize = SAFETENSORS_DTYPES[dtype]
    header = {
        "__metadata__": metadata,
        SCORES_KEY: {"dtype": code, "shape": [num_queries, num_train], "data_offsets": [0, num_queries * num_train * itemsize]},
    }
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def to_bytes(rows: np.ndarray, dtype: str) -> bytes:
    """float32 rows as stored; bfloat16 keeps the top 16 bits of each float32 (round to nearest even)."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if dtype == "float32":
        return rows.tobytes()
    bits = rows.view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16).tobytes()


def write_score_files(
    full_path: Path, low_path: Path, num_queries: int, num_train: int, dtype: str, rows_per_write: int = ROWS_PER_WRITE
) -> None:
    """Writes correlated full-rank and rank-LOW_RANK files row block by row block, never holding a whole file."""
    rng = np.random.default_rng(SEED)
    for path in (full_path, low_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    with full_path.open("wb") as full_file, low_path.open("wb") as low_file:
        full_file.write(safetensors_header(num_queries, num_train, dtype, {"query_gradient_low_rank": "None"}))
        low_file.write(safetensors_header(num_queries, num_train, dtype, {"query_gradient_low_rank": str(LOW_RANK)}))
        for start in range(0, num_queries, rows_per_write):
            rows = min(rows_per_write, num_queries - start)
            full = rng.standard_normal((rows, num_train), dtype=np.float32)
            low = full + np.float32(LOW_RANK_NOISE) * rng.standard_normal((rows, num_train), dtype=np.float32)
            full_file.write(to_bytes(full, dtype))
            low_file.write(to_bytes(low, dtype))


def run_analysis(workdir: Path, num_queries: int, rows_per_block: Optional[int]) -> Dict[str, float]:
    """Runs the analysis as a user would, in a child process, and measures that child alone."""
    command = [
        sys.executable, str(ANALYSIS_SCRIPT),
        "--output_dir", str(workdir), "--analysis_name", ANALYSIS_NAME,
        "--num_queries", str(num_queries),
        "--figure", str(workdir / "query_batching.png"),
    ]
    if rows_per_block is not None:
        command += ["--rows_per_block", str(rows_per_block)]
    start = time.perf_counter()
    completed = subprocess.run(command, cwd=REPO_ROOT)
    seconds = time.perf_counter() - start
    if completed.returncode != 0:
        raise SystemExit(f"{PROG}: error: the analysis exited with code {completed.returncode}")
    # Linux reports ru_maxrss in KiB; this process has waited on no other child.
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    summary = json.loads((workdir / "query_batching.json").read_text())
    return {"seconds": seconds, "peak_rss_bytes": peak, "spearman_mean": summary["statistics"]["Spearman"]["mean"]}


def in_own_workdir(workdir: Path, keep: bool, prog: str, write: Callable[[], None], measure: Callable[[], Dict[str, float]]) -> Tuple[float, Dict[str, float]]:
    """Writes the synthetic files and measures in `workdir`, the benchmark's own (benchmarks/workdir.py:
    refused if it holds anything a benchmark did not make, locked, removed at the end unless `keep`);
    returns the write time in seconds and the measurements."""
    with user_errors(prog), own_workdir(workdir, keep):
        start = time.perf_counter()
        write()
        write_seconds = time.perf_counter() - start
        return write_seconds, measure()


def report(rows: Sequence[Tuple[str, str]], result: Dict[str, object], json_path: Optional[Path]) -> None:
    """Prints the measurements as a two-column table and writes them to `json_path` if one is given."""
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2) + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("--num_queries", type=int, default=FULL_NUM_QUERIES, help=f"Query rows per file (default: {FULL_NUM_QUERIES}).")
    parser.add_argument("--num_train", type=int, default=FULL_NUM_TRAIN, help=f"Training examples per row (default: {FULL_NUM_TRAIN}, ImageNet's training set).")
    parser.add_argument("--dtype", choices=sorted(SAFETENSORS_DTYPES), default="float32", help="Score dtype; bfloat16 is what --use_half_precision writes (default: float32).")
    parser.add_argument("--rows_per_block", type=int, help="Passed to the analysis (default: the analysis's own default).")
    parser.add_argument("--workdir", type=Path, help="Folder for the synthetic files, removed afterwards unless --keep (default: a new temporary folder).")
    parser.add_argument("--keep", action="store_true", help="Keep the synthetic files and the analysis outputs.")
    parser.add_argument("--json", type=Path, help="Also write the measurements to this JSON file.")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_queries <= 0 or args.num_train <= MIN_NUM_TRAIN:
        parser.error(f"--num_queries must be positive and --num_train above {MIN_NUM_TRAIN} (the top-{MIN_NUM_TRAIN} overlap)")
    workdir = scratch_folder(args.workdir, "query_batching_benchmark_")
    full_path = pairwise_scores_path(workdir, ANALYSIS_NAME, scores_name(STRATEGY, False, None))
    low_path = pairwise_scores_path(workdir, ANALYSIS_NAME, scores_name(STRATEGY, False, LOW_RANK))
    write_seconds, measured = in_own_workdir(
        workdir, args.keep, PROG, lambda: write_score_files(full_path, low_path, args.num_queries, args.num_train, args.dtype),
        lambda: {"file_bytes": full_path.stat().st_size, **run_analysis(workdir, args.num_queries, args.rows_per_block)},
    )
    file_bytes = measured["file_bytes"]
    result = {
        "num_queries": args.num_queries,
        "num_train": args.num_train,
        "dtype": args.dtype,
        "bytes_per_file": file_bytes,
        "write_seconds": write_seconds,
        "analysis_seconds": measured["seconds"],
        "peak_rss_bytes": measured["peak_rss_bytes"],
        "within_memory_budget": measured["peak_rss_bytes"] < MEMORY_BUDGET_BYTES,
        "spearman_mean": measured["spearman_mean"],
        "python": sys.version.split()[0],
    }
    rows = [
        ("score files", f"2 x {args.num_queries} x {args.num_train} {args.dtype} ({file_bytes / 1e9:.2f} GB each)"),
        ("write time", f"{write_seconds:.1f} s"),
        ("analysis wall time", f"{measured['seconds']:.1f} s"),
        ("analysis peak RSS", f"{measured['peak_rss_bytes'] / 1024**3:.2f} GiB (budget {MEMORY_BUDGET_BYTES / 1024**3:.0f} GiB: "
         f"{'within' if result['within_memory_budget'] else 'OVER'})"),
        ("Spearman mean", f"{measured['spearman_mean']:.4f}"),
    ]
    report(rows, result, args.json)
    return result


if __name__ == "__main__":
    main()
