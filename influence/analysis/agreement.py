"""How closely two sets of influence scores for the same queries agree, query by query: Spearman and
Pearson statistics over all training images and the overlap of the top-k most helpful ones, computed one
row at a time (score files are streamed a block of rows at a time), then summarised over the queries.
Used to compare low-rank with full-rank scores, the gradient index with exact scores, and TF32 with float32."""

from __future__ import annotations

import math
import warnings
from typing import Dict, Optional, Tuple

import numpy as np
from scipy.stats import ConstantInputWarning, pearsonr, spearmanr
from tqdm import tqdm

from influence.results.score_files import ScoreFile, read_rows

TOP_K = (10, 100)
LOW_PERCENTILE = 5
SPEARMAN = "Spearman"
PEARSON = "Pearson"
SUMMARY_FIELDS = ("mean", "median", "minimum", f"{LOW_PERCENTILE}th percentile")


def overlap_name(k: int) -> str:
    return f"top-{k} overlap"


STATISTICS = (SPEARMAN, PEARSON) + tuple(overlap_name(k) for k in TOP_K)


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
