"""How far query batching (low-rank query gradients) moves the influence scores: reads a full-rank and
a low-rank pairwise score file written by `analyze.py` (raw, or both rescaled alike by its
--score_normalization), and for every query compares the two rows over all training examples
(Spearman, Pearson, overlap of the top-k training examples). It prints and saves
the summary statistics and draws one query's scores against each other beside the distribution of
per-query Spearman correlations. Rows are streamed a block at a time, so two 1000 x 1,281,167 files
(about 5.1 GB each) are compared in well under 2 GB of memory."""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from influence.analysis.agreement import PEARSON, SPEARMAN, TOP_K, compare, format_table, summarize
from influence.model import DEFAULT_ARCH
from influence.results import naming
from influence.results.naming import (
    DEFAULT_ANALYSIS_NAME,
    DEFAULT_OUTPUT_DIR,
    DEMO_ANALYSIS_NAME,
    NO_NORMALIZATION,
    NORMALIZATIONS,
    pairwise_scores_path,
    scores_name,
)
from influence.results.records import check_same_arch, recorded_arch
from influence.results.score_files import ScoreFile, check_writable, load_record, open_score_file, query_choice, resolve_scores_path
from influence.runtime.cli import UserError, non_negative_int, positive_int, setup_logging, user_errors

PROG = "query_batching_analysis.py"
logger = logging.getLogger(PROG)

# The seed's two analyze.py commands: EK-FAC in float32, once at full rank and once with rank-32 queries.
SEED_STRATEGY = "ekfac"
SEED_LOW_RANK = 32
DEFAULT_NUM_POINTS = 5000
DEFAULT_FIGURE = Path("figure/query_batching.png")
# Two blocks of 16 rows of 1,281,167 float32 scores are 164 MB; torch itself takes about 0.65 GB.
DEFAULT_ROWS_PER_BLOCK = 16
SCATTER_SEED = 0


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


def seed_scores_path(output_dir: Path, analysis_name: str, rank: Optional[int], normalization: str = NO_NORMALIZATION) -> Path:
    """Where the seed's analyze.py command of this rank (None: full rank) writes its scores, or with
    `--score_normalization` its rescaled ones (`ekfac_relative`, `ekfac_qlr32_relative`)."""
    return pairwise_scores_path(output_dir, analysis_name, scores_name(SEED_STRATEGY, False, rank, normalization))


def default_analysis_name(output_dir: Path, normalization: str, arch: str = DEFAULT_ARCH) -> str:
    """The seed's analysis of `arch`, or the demo's when only the demo has been run (said in the log)."""
    def seed_files_exist(analysis_name: str) -> bool:
        return all(seed_scores_path(output_dir, analysis_name, rank, normalization).is_file() for rank in (None, SEED_LOW_RANK))

    seed, demo = naming.default_analysis_name(False, arch), naming.default_analysis_name(True, arch)
    if not seed_files_exist(seed) and seed_files_exist(demo):
        logger.info("no scores under %s; using the demo's (%s)", output_dir / seed, output_dir / demo)
        return demo
    return seed


def recorded_architecture(full: ScoreFile, low: ScoreFile, arch: Optional[str]) -> Optional[str]:
    """The architecture both score files were computed with, by their records (None without records);
    files of two architectures, or of another than --arch, are refused."""
    found = {path: recorded_arch(load_record(path, warn=False)) for path in (full.path, low.path)}
    known = {value for value in found.values() if value is not None}
    if len(known) > 1:
        raise UserError(f"{full.path} and {low.path} were computed with different models ({' and '.join(sorted(known))})")
    recorded = next(iter(known), None)
    check_same_arch(recorded, arch, "the scores")
    return recorded


def build_parser() -> argparse.ArgumentParser:
    full_name = scores_name(SEED_STRATEGY, False, None)
    low_name = scores_name(SEED_STRATEGY, False, SEED_LOW_RANK)
    relative = NORMALIZATIONS[1]
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("--full_scores", type=Path, help=f"Full-rank pairwise scores: a score folder or a .safetensors file (default: the `{full_name}` scores under --output_dir/--analysis_name, or those --score_normalization names).")
    parser.add_argument("--low_rank_scores", type=Path, help=f"Low-rank (query-batched) pairwise scores: a score folder or a .safetensors file (default: the `{low_name}` scores under --output_dir/--analysis_name, or those --score_normalization names).")
    parser.add_argument("--score_normalization", choices=NORMALIZATIONS, default=NO_NORMALIZATION, help=f"Which default score files: kronfluence's raw ones (none, the default), or those analyze.py --score_normalization rescaled (e.g. {relative}: `{scores_name(SEED_STRATEGY, False, None, relative)}` and `{scores_name(SEED_STRATEGY, False, SEED_LOW_RANK, relative)}`); other than none it also refuses given files of another normalisation. The two files must always have the same one.")
    parser.add_argument("--output_dir", type=Path, default=Path(DEFAULT_OUTPUT_DIR), help=f"analyze.py's results folder, for the default score files (default: {DEFAULT_OUTPUT_DIR}).")
    parser.add_argument("--analysis_name", help=f"Sub-folder of --output_dir, for the default score files (default: {DEFAULT_ANALYSIS_NAME}; when it has no scores but `analyze.py --demo` has run, {DEMO_ANALYSIS_NAME}; with --arch: imagenet_ARCH or demo_ARCH).")
    parser.add_argument("--arch", metavar="NAME", help="The architecture analyze.py --arch analysed, for the default score folders; the files' records must name it (default: what they record, resnet50's folders).")
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
        if args.arch is not None:
            # Imported here: torchvision's model registry, which nothing else here needs (0.1 GiB).
            from influence.model.architectures import arch_problem  # pylint: disable=import-outside-toplevel

            problem = arch_problem(args.arch)
            if problem:
                parser.error(problem)
        if args.analysis_name is None:
            args.analysis_name = default_analysis_name(args.output_dir, args.score_normalization, args.arch or DEFAULT_ARCH)
        full_path = resolve_scores_path(
            args.full_scores or seed_scores_path(args.output_dir, args.analysis_name, None, args.score_normalization)
        )
        low_path = resolve_scores_path(
            args.low_rank_scores or seed_scores_path(args.output_dir, args.analysis_name, SEED_LOW_RANK, args.score_normalization)
        )
        full = open_score_file(full_path, "--full_scores")
        low = open_score_file(low_path, "--low_rank_scores")
        if full.normalization != low.normalization:
            raise UserError(
                f"{full.path} has score_normalization {full.normalization} but {low.path} has {low.normalization} (by their "
                "metadata): compare files of the same analyze.py --score_normalization"
            )
        if args.score_normalization not in (NO_NORMALIZATION, full.normalization):
            raise UserError(f"{full.path} has score_normalization {full.normalization} (by its metadata), not --score_normalization {args.score_normalization}")
        if (full.num_queries, full.num_train) != (low.num_queries, low.num_train):
            raise UserError(
                f"score shapes differ: {full.path} has {full.num_queries} x {full.num_train}, {low.path} has "
                f"{low.num_queries} x {low.num_train} (queries x training examples); both must score the same queries and training set"
            )
        arch = recorded_architecture(full, low, args.arch)
        full_queries, low_queries = query_choice(full.path), query_choice(low.path)
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
        "score_normalization": full.normalization,
        "arch": arch,  # as the score files record it (None without records)
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
