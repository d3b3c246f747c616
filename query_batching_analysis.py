"""How far query batching (low-rank query gradients) moves the influence scores: reads a full-rank and
a low-rank pairwise score file written by `analyze.py`, and for every query compares the two rows over
all training examples (Spearman, Pearson, overlap of the top-k training examples). It prints and saves
the summary statistics and draws one query's scores against each other beside the distribution of
per-query Spearman correlations. Rows are streamed a block at a time, so two 1000 x 1,281,167 files
(about 5.1 GB each) are compared in well under 2 GB of memory."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from kronfluence.utils.constants import SCORE_SAVE_PREFIX
from safetensors import SafetensorError, safe_open
from scipy.stats import ConstantInputWarning, pearsonr, spearmanr
from tqdm import tqdm

from cli import UserError, non_negative_int, positive_int, setup_logging, user_errors
from naming import (
    DEFAULT_ANALYSIS_NAME,
    DEMO_ANALYSIS_NAME,
    DEFAULT_OUTPUT_DIR,
    PAIRWISE_SCORES_FILE,
    RUN_CONFIG_FILE,
    SCORES_KEY,
    pairwise_scores_path,
    rank_from_scores_name,
    scores_name,
)

PROG = "query_batching_analysis.py"
logger = logging.getLogger(PROG)

# The seed's two analyze.py commands: EK-FAC in float32, once at full rank and once with rank-32 queries.
SEED_STRATEGY = "ekfac"
SEED_LOW_RANK = 32
TOP_K = (10, 100)
DEFAULT_NUM_POINTS = 5000
DEFAULT_FIGURE = Path("figure/query_batching.png")
# Two blocks of 16 rows of 1,281,167 float32 scores are 164 MB; torch itself takes about 0.65 GB.
DEFAULT_ROWS_PER_BLOCK = 16
LOW_PERCENTILE = 5
SCATTER_SEED = 0
# kronfluence saves ScoreArguments.to_str_dict() as the file's metadata; a full-rank run stores "None".
RANK_METADATA_KEY = "query_gradient_low_rank"
FLOAT_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}

SPEARMAN = "Spearman"
PEARSON = "Pearson"
SUMMARY_FIELDS = ("mean", "median", "minimum", f"{LOW_PERCENTILE}th percentile")


def overlap_name(k: int) -> str:
    return f"top-{k} overlap"


STATISTICS = (SPEARMAN, PEARSON) + tuple(overlap_name(k) for k in TOP_K)


@dataclass(frozen=True)
class ScoreFile:
    """One pairwise score file, checked: it exists, holds a 2-D floating `all_modules` tensor."""

    path: Path
    num_queries: int
    num_train: int
    dtype: str
    rank: Optional[int]

    @property
    def label(self) -> str:
        return rank_label(self.rank)


def rank_label(rank: Optional[int]) -> str:
    return "full rank" if rank is None else f"rank {rank}"


def resolve_scores_path(given: Path) -> Path:
    """A score folder (`.../scores_NAME`) stands for the pairwise score file inside it."""
    return given / PAIRWISE_SCORES_FILE if given.is_dir() else given


def file_rank(path: Path, metadata: Dict[str, str]) -> Optional[int]:
    """The query-gradient rank from the saved ScoreArguments, else from the `scores_NAME` folder name."""
    saved = metadata.get(RANK_METADATA_KEY)
    if saved is not None and saved != "None":
        if not saved.isdigit():
            raise UserError(f"{path}: metadata {RANK_METADATA_KEY}={saved!r} is not a rank")
        return int(saved)
    if saved == "None":
        return None
    name = path.parent.name
    name = name[len(SCORE_SAVE_PREFIX):] if name.startswith(SCORE_SAVE_PREFIX) else name
    return rank_from_scores_name(name)


def recorded_queries(path: Path) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
    """The fingerprint of a score file's query images and analyze.py's record of how they were chosen,
    from its run_config.json (None where there is no record)."""
    try:
        record = json.loads((path.parent / RUN_CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None, None
    return record.get("depends_on", {}).get("query_files_sha256"), record.get("resolved", {}).get("queries")


def open_score_file(path: Path, flag: str) -> ScoreFile:
    """Checks one score file without reading its scores; every problem is one `UserError` line."""
    if not path.is_file():
        raise UserError(f"{flag}: score file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            metadata = handle.metadata() or {}
            if SCORES_KEY not in keys:
                raise UserError(
                    f"{path} has no '{SCORES_KEY}' scores (keys: {', '.join(keys) or 'none'}); "
                    "analyze.py writes them unless per-module scores were asked for"
                )
            scores = handle.get_slice(SCORES_KEY)
            shape = tuple(scores.get_shape())
            dtype = scores.get_dtype()
    except SafetensorError as error:
        raise UserError(f"{path} is not a readable safetensors file ({error})") from None
    if len(shape) != 2:
        raise UserError(f"{path}: '{SCORES_KEY}' has shape {shape}, expected (queries, training examples)")
    if dtype not in FLOAT_DTYPES:
        raise UserError(f"{path}: '{SCORES_KEY}' holds {dtype}, expected floating-point scores")
    return ScoreFile(
        path=path, num_queries=shape[0], num_train=shape[1], dtype=FLOAT_DTYPES[dtype], rank=file_rank(path, metadata)
    )


def read_rows(score_file: ScoreFile, start: int, stop: int) -> np.ndarray:
    """Rows `start:stop` as float32 (float64 for float64 files), checked for NaN and infinity.

    float32 holds bfloat16 and float16 scores exactly. The file is opened afresh for every block:
    safetensors memory-maps it, and a mapping kept open would count every page read so far as resident
    memory, growing to the size of the file.
    """
    dtype = torch.float64 if score_file.dtype == "float64" else torch.float32
    with safe_open(str(score_file.path), framework="pt") as handle:
        rows = handle.get_slice(SCORES_KEY)[start:stop].to(dtype, copy=True).numpy()
    bad = ~np.isfinite(rows)
    if bad.any():
        query, train = np.argwhere(bad)[0]
        raise UserError(
            f"{score_file.path} has NaN or infinite scores (first: query {start + query}, "
            f"training example {train}); recompute them (e.g. with a larger --damping_factor)"
        )
    return rows


def top_k_overlap(first: np.ndarray, second: np.ndarray, k: int) -> float:
    """The fraction of the k largest scores (most helpful training examples) that two rows share; NaN
    (not defined) when there are no more than k training examples, where it would be 1 whatever the scores."""
    if first.size <= k:
        return math.nan
    first_top = np.argpartition(-first, k - 1)[:k]
    second_top = np.argpartition(-second, k - 1)[:k]
    return np.intersect1d(first_top, second_top).size / k


def row_statistics(full: np.ndarray, low: np.ndarray) -> Dict[str, float]:
    """Every statistic for one query; NaN correlations where its scores are constant in either file.

    One row at a time keeps scipy's temporaries to a few row-sized arrays; Pearson is taken in float64
    because scipy keeps float32 input in float32.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConstantInputWarning)
        statistics = {
            SPEARMAN: float(spearmanr(full, low).statistic),
            PEARSON: float(pearsonr(full.astype(np.float64), low.astype(np.float64)).statistic),
        }
    for k in TOP_K:
        statistics[overlap_name(k)] = top_k_overlap(full, low, k)
    return statistics


def compare(
    full: ScoreFile,
    low: ScoreFile,
    num_queries: int,
    rows_per_block: int,
    scatter_query: int,
    scatter_train: np.ndarray,
) -> Tuple[Dict[str, np.ndarray], Tuple[np.ndarray, np.ndarray]]:
    """Streams both files block by block; returns per-query statistics and the scatter query's sampled scores."""
    per_query = {name: np.full(num_queries, np.nan) for name in STATISTICS}
    scatter = (np.empty(0), np.empty(0))
    with tqdm(total=num_queries, desc="queries", unit="query") as progress:
        for start in range(0, num_queries, rows_per_block):
            stop = min(start + rows_per_block, num_queries)
            full_rows = read_rows(full, start, stop)
            low_rows = read_rows(low, start, stop)
            for offset, (full_row, low_row) in enumerate(zip(full_rows, low_rows)):
                for name, value in row_statistics(full_row, low_row).items():
                    per_query[name][start + offset] = value
                progress.update(1)
            if start <= scatter_query < stop:
                scatter = (full_rows[scatter_query - start, scatter_train], low_rows[scatter_query - start, scatter_train])
    return per_query, scatter


def summarize(values: np.ndarray) -> Dict[str, Optional[float]]:
    """Mean, median, minimum and low percentile over the queries where the statistic is defined."""
    defined = values[np.isfinite(values)]
    summary: Dict[str, Optional[float]] = {"queries": int(defined.size)}
    numbers = (
        (np.mean(defined), np.median(defined), np.min(defined), np.percentile(defined, LOW_PERCENTILE))
        if defined.size
        else (None,) * len(SUMMARY_FIELDS)
    )
    for field, number in zip(SUMMARY_FIELDS, numbers):
        summary[field] = None if number is None else float(number)
    return summary


def format_table(summaries: Dict[str, Dict[str, Optional[float]]]) -> str:
    width = max(len(name) for name in summaries) + 2
    lines = [f"{'statistic':<{width}}" + "".join(f"{field:>16}" for field in SUMMARY_FIELDS) + f"{'queries':>10}"]
    for name, summary in summaries.items():
        cells = "".join(f"{'n/a' if summary[f] is None else f'{summary[f]:.4f}':>16}" for f in SUMMARY_FIELDS)
        lines.append(f"{name:<{width}}{cells}{summary['queries']:>10}")
    return "\n".join(lines)


def draw_figure(
    path: Path,
    full: ScoreFile,
    low: ScoreFile,
    scatter_query: int,
    scatter: Tuple[np.ndarray, np.ndarray],
    per_query: Dict[str, np.ndarray],
) -> None:
    import matplotlib.pyplot as plt

    full_scores, low_scores = scatter
    spearman = per_query[SPEARMAN]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    # Small markers for thousands of points, visible ones for a demo-sized handful; y = x for reference.
    left.scatter(full_scores, low_scores, s=2 if full_scores.size > 500 else 16, alpha=0.5, linewidths=0)
    if full_scores.size:
        low_end, high_end = float(min(full_scores.min(), low_scores.min())), float(max(full_scores.max(), low_scores.max()))
        left.plot([low_end, high_end], [low_end, high_end], color="grey", linewidth=0.8, linestyle=":", label="y = x")
        left.legend(loc="upper left")
    left.set_xlabel(f"{full.label} score")
    left.set_ylabel(f"{low.label} score")
    left.set_title(
        f"query {scatter_query}, {full_scores.size} training examples\n"
        f"{SPEARMAN} {spearman[scatter_query]:.4f}, {PEARSON} {per_query[PEARSON][scatter_query]:.4f}"
    )
    defined = spearman[np.isfinite(spearman)]
    if defined.size:
        right.hist(defined, bins=min(50, max(10, defined.size // 5)))
        median = float(np.median(defined))
        right.axvline(median, color="black", linestyle="--", label=f"median {median:.4f}")
        right.legend()
    right.set_xlabel(f"{SPEARMAN} correlation per query ({low.label} vs {full.label})")
    right.set_ylabel("queries")
    right.set_title(f"{SPEARMAN} over {full.num_train} training examples, {defined.size} queries")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=150)
    plt.close(figure)


def check_writable(path: Path) -> None:
    """Creates the folder of an output file; one line if that or writing there is impossible."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create the folder of {path}: {error.strerror}") from None
    if path.is_dir() or not os.access(path.parent, os.W_OK):
        raise UserError(f"cannot write {path}")


def seed_scores_path(output_dir: Path, analysis_name: str, rank: Optional[int]) -> Path:
    """Where the seed's analyze.py command of this rank (None: full rank) writes its scores."""
    return pairwise_scores_path(output_dir, analysis_name, scores_name(SEED_STRATEGY, False, rank))


def default_analysis_name(output_dir: Path) -> str:
    """The seed's analysis, or the demo's when only the demo has been run (said in the log)."""
    def seed_files_exist(analysis_name: str) -> bool:
        return all(seed_scores_path(output_dir, analysis_name, rank).is_file() for rank in (None, SEED_LOW_RANK))

    if not seed_files_exist(DEFAULT_ANALYSIS_NAME) and seed_files_exist(DEMO_ANALYSIS_NAME):
        logger.info("no scores under %s; using the demo's (%s)", output_dir / DEFAULT_ANALYSIS_NAME, output_dir / DEMO_ANALYSIS_NAME)
        return DEMO_ANALYSIS_NAME
    return DEFAULT_ANALYSIS_NAME


def build_parser() -> argparse.ArgumentParser:
    full_name = scores_name(SEED_STRATEGY, False, None)
    low_name = scores_name(SEED_STRATEGY, False, SEED_LOW_RANK)
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("--full_scores", type=Path, help=f"Full-rank pairwise scores: a score folder or a .safetensors file (default: the `{full_name}` scores under --output_dir/--analysis_name).")
    parser.add_argument("--low_rank_scores", type=Path, help=f"Low-rank (query-batched) pairwise scores: a score folder or a .safetensors file (default: the `{low_name}` scores under --output_dir/--analysis_name).")
    parser.add_argument("--output_dir", type=Path, default=Path(DEFAULT_OUTPUT_DIR), help=f"analyze.py's results folder, for the default score files (default: {DEFAULT_OUTPUT_DIR}).")
    parser.add_argument("--analysis_name", help=f"Sub-folder of --output_dir, for the default score files (default: {DEFAULT_ANALYSIS_NAME}; when it has no scores but `analyze.py --demo` has run, {DEMO_ANALYSIS_NAME}).")
    parser.add_argument("--num_queries", type=positive_int, help="Compare the first N queries (default: all).")
    parser.add_argument("--num_points", type=positive_int, default=DEFAULT_NUM_POINTS, help=f"Training examples drawn at random for the scatter plot (default: {DEFAULT_NUM_POINTS}).")
    parser.add_argument("--scatter_query", type=non_negative_int, default=0, help="Query whose scores the scatter plot shows (default: 0).")
    parser.add_argument("--figure", type=Path, default=DEFAULT_FIGURE, help=f"Where the figure is saved (default: {DEFAULT_FIGURE}).")
    parser.add_argument("--summary", type=Path, help="JSON file for the summary statistics, per-query values and resolved inputs (default: the --figure path with .json).")
    parser.add_argument("--rows_per_block", type=positive_int, default=DEFAULT_ROWS_PER_BLOCK, help=f"Query rows read and compared at a time; memory grows with it (default: {DEFAULT_ROWS_PER_BLOCK}).")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging()
    with user_errors(PROG):
        if args.analysis_name is None:
            args.analysis_name = default_analysis_name(args.output_dir)
        full_path = resolve_scores_path(args.full_scores or seed_scores_path(args.output_dir, args.analysis_name, None))
        low_path = resolve_scores_path(
            args.low_rank_scores or seed_scores_path(args.output_dir, args.analysis_name, SEED_LOW_RANK)
        )
        full = open_score_file(full_path, "--full_scores")
        low = open_score_file(low_path, "--low_rank_scores")
        if (full.num_queries, full.num_train) != (low.num_queries, low.num_train):
            raise UserError(
                f"score shapes differ: {full.path} has {full.num_queries} x {full.num_train}, {low.path} has "
                f"{low.num_queries} x {low.num_train} (queries x training examples); both must score the same queries and training set"
            )
        full_queries, low_queries = recorded_queries(full.path), recorded_queries(low.path)
        if full_queries[0] and low_queries[0] and full_queries[0] != low_queries[0]:
            raise UserError(
                f"{full.path} and {low.path} were computed for different query images (their records' "
                "query_files_sha256 differ): run analyze.py with the same query flags for both"
            )
        if full.num_train <= max(TOP_K):
            logger.warning(
                "only %d training examples: top-k overlaps with k >= %d are not defined (n/a)", full.num_train, full.num_train
            )
        num_queries = full.num_queries if args.num_queries is None else args.num_queries
        if num_queries > full.num_queries:
            raise UserError(f"--num_queries {num_queries} exceeds the {full.num_queries} queries in {full.path}")
        if args.scatter_query >= num_queries:
            raise UserError(f"--scatter_query {args.scatter_query} is not among the {num_queries} queries compared")
        summary_path = args.summary or args.figure.with_suffix(".json")
        for output in (args.figure, summary_path):  # checked now, not after a 10-minute comparison
            check_writable(output)
        if low.rank is None:
            logger.warning("%s is full rank (by its saved arguments or name); is --low_rank_scores right?", low.path)
        if full.rank is not None:
            logger.warning("%s has rank %d (by its saved arguments or name); is --full_scores right?", full.path, full.rank)

        rng = np.random.default_rng(SCATTER_SEED)
        scatter_train = np.sort(rng.choice(full.num_train, size=min(args.num_points, full.num_train), replace=False))
        logger.info(
            "comparing %d queries x %d training examples: %s (%s) vs %s (%s)",
            num_queries, full.num_train, low.label, low.path, full.label, full.path,
        )
        per_query, scatter = compare(full, low, num_queries, args.rows_per_block, args.scatter_query, scatter_train)

    summaries = {name: summarize(values) for name, values in per_query.items()}
    print(f"{full.label} ({full.dtype}): {full.path}")
    print(f"{low.label} ({low.dtype}): {low.path}")
    print(f"{low.label} vs {full.label}, per query over {full.num_train} training examples, {num_queries} queries:")
    print(format_table(summaries))

    import matplotlib

    matplotlib.use("Agg")
    draw_figure(args.figure, full, low, args.scatter_query, scatter, per_query)
    result = {
        "full_scores": {"path": str(full.path), "rank": full.rank, "dtype": full.dtype},
        "low_rank_scores": {"path": str(low.path), "rank": low.rank, "dtype": low.dtype},
        "num_queries": num_queries,
        "num_train": full.num_train,
        "top_k": list(TOP_K),
        "num_points": int(scatter_train.size),
        "scatter_query": args.scatter_query,
        "queries": full_queries[1],  # which images the rows are, as analyze.py recorded them
        "rows_per_block": args.rows_per_block,
        "figure": str(args.figure),
        "statistics": summaries,
        "per_query": {name: [None if math.isnan(v) else float(v) for v in values] for name, values in per_query.items()},
    }
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"figure: {args.figure}")
    print(f"summary: {summary_path}")
    return result


if __name__ == "__main__":
    main()
