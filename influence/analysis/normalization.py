"""Relative and cosine influence (`analyze.py --score_normalization`): pairwise scores rescaled so that the
few training images with very large gradients, which top the lists of every query, stop doing so.

- `relative` divides each training image's score by the square root of its self-influence under the same
  strategy and damping, g_q' H^-1 g_t / sqrt(g_t' H^-1 g_t): the loss-relative influence (l-RelatIF) of
  Barshan et al. 2020. The square root, not the self-influence itself, makes the score independent of the
  size of the training gradient (scaling g_t by c leaves it unchanged); dividing by the self-influence
  would make it fall as 1/|g_t| and favour images the model has no gradient for.
- `cosine` also divides by the square root of the query's own g_q' H^-1 g_q (its measurement gradient
  preconditioned and dotted with itself, always full rank): a cosine in the H^-1 inner product, within
  [-1, 1] at full rank (TrackStar-style unit-normalised gradients, with the suite's preconditioner).

The raw scores and the self-influence of every training image are computed (or reused: the latter are
exactly `analyze.py --self_influence`'s results) by scoring.py; this file adds the query side and writes
the rescaled scores as results of their own, whose record names the results they were made from."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils import data

from influence.analysis.scoring import compute_self_scores, load_scores
from influence.analysis.settings import AnalysisSettings
from influence.results import naming
from influence.results.records import claim_results_dir
from influence.results.score_files import load_record
from influence.runtime import distributed
from influence.runtime.cli import UserError

logger = logging.getLogger("analyze")

RELATIVE, COSINE = naming.NORMALIZATIONS[1:]
# A self-influence at or below this (a training image the model has no gradient for, or bfloat16 rounding
# of a tiny one) is clamped to it, so that its rescaled score is large but finite; the count is logged.
MIN_SELF_INFLUENCE = 1e-30


def normalize(raw: torch.Tensor, train_self: torch.Tensor, query_self: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`raw` (queries x training images) divided by sqrt(train_self) per column and, when given, by
    sqrt(query_self) per row; float32 (float64 kept)."""
    dtype = torch.float64 if raw.dtype == torch.float64 else torch.float32
    scores = raw.to(dtype, copy=True)
    scores.div_(train_self.to(dtype).clamp(min=MIN_SELF_INFLUENCE).sqrt()[None, :])
    if query_self is not None:
        scores.div_(query_self.to(dtype).clamp(min=MIN_SELF_INFLUENCE).sqrt()[:, None])
    return scores


class _MeasurementAsLoss:
    """The task with its measurement in place of the training loss, so that kronfluence's self scores of
    the queries are g_q' H^-1 g_q. kronfluence's `use_measurement_for_self_influence` is another
    quantity: the measurement's preconditioned gradient dotted with the training loss's."""

    def __init__(self, task: Any) -> None:
        self._task = task

    def __getattr__(self, name: str) -> Any:
        return getattr(self._task, name)

    def compute_train_loss(self, batch: Any, model: Any, sample: bool = False) -> torch.Tensor:
        return self._task.compute_measurement(batch, model)


@contextlib.contextmanager
def _measurement_task(analyzer: Any) -> Iterator[None]:
    task = analyzer.task
    analyzer.task = _MeasurementAsLoss(task)
    try:
        yield
    finally:
        analyzer.task = task


def compute_query_self_scores(
    analyzer: Any, query_dataset: data.Dataset, settings: AnalysisSettings, provenance: Dict[str, Any],
    factors_record: Dict[str, Any], layout: distributed.Layout,
) -> Path:
    """g_q' H^-1 g_q of every query (full rank), in its own results folder
    (`scores_STRATEGY[_half]_query_self`), reused like every other result."""
    query_provenance = {**provenance, "train": {**provenance["query"], "gradient": "measurement"}}
    name = naming.query_self_scores_name(settings.strategy, settings.use_half_precision)
    with _measurement_task(analyzer):
        return compute_self_scores(analyzer, query_dataset, settings, query_provenance, factors_record, layout, name)


def _record(path: Path) -> Dict[str, Any]:
    """The run record of results this run has just computed or reused (so it exists)."""
    record = load_record(path, warn=False)
    if record is None:
        raise UserError(f"{path.parent / naming.RUN_CONFIG_FILE} is missing: recompute those results with --overwrite")
    return record


def compute_normalized_scores(
    analyzer: Any,
    train_dataset: data.Dataset,
    query_dataset: data.Dataset,
    settings: AnalysisSettings,
    provenance: Dict[str, Any],
    factors_record: Dict[str, Any],
    raw_path: Path,
    layout: distributed.Layout = distributed.Layout(),
) -> Path:
    """The raw pairwise scores at `raw_path` rescaled by `settings.score_normalization`, written (or
    reused) as `scores_NAME_NORMALIZATION/pairwise_scores.safetensors`; returns that path. Their record
    depends on the raw scores' and on the self-influence results they were made from, by id: results
    made from other raw or self-influence scores are refused (or replaced with --overwrite), never reused."""
    normalization = settings.score_normalization
    train_self = compute_self_scores(analyzer, train_dataset, settings, provenance, factors_record, layout)
    query_self = None
    if normalization == COSINE:
        query_self = compute_query_self_scores(analyzer, query_dataset, settings, provenance, factors_record, layout)
    directory = analyzer.scores_output_dir(settings.output_scores_name)
    path = directory / naming.PAIRWISE_SCORES_FILE

    def write() -> None:
        raw_record = _record(raw_path)
        depends_on = {
            **raw_record["depends_on"],
            "score_normalization": normalization,
            "raw_scores_id": raw_record["id"],
            "train_self_scores_id": _record(train_self)["id"],
            **({"query_self_scores_id": _record(query_self)["id"]} if query_self is not None else {}),
        }
        resolved = {**raw_record.get("resolved", {}), "raw_scores": str(raw_path), "train_self_scores": str(train_self),
                    "query_self_scores": None if query_self is None else str(query_self)}
        claim_results_dir(directory, depends_on, settings, "normalised scores", resolved)
        if path.is_file():
            logger.info("reusing finished scores %s", path)
            return
        with safe_open(str(raw_path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        metadata[naming.NORMALIZATION_METADATA_KEY] = normalization
        train_norms = load_scores(train_self)
        scores = normalize(load_scores(raw_path), train_norms, None if query_self is None else load_scores(query_self))
        clamped = int((train_norms <= MIN_SELF_INFLUENCE).sum())
        if clamped:
            logger.warning("%d training images have a self-influence <= %g (no gradient); their %s scores are large", clamped, MIN_SELF_INFLUENCE, normalization)
        staging = directory / f".{naming.PAIRWISE_SCORES_FILE}.{os.getpid()}.tmp"
        try:
            save_file({naming.SCORES_KEY: scores.contiguous()}, str(staging), metadata=metadata)
            os.replace(staging, path)
        finally:
            staging.unlink(missing_ok=True)
        logger.info("%s scores `%s`: raw scores divided by sqrt(self-influence)%s", normalization, settings.output_scores_name,
                    " of the training image and of the query" if query_self is not None else " of the training image")

    distributed.on_main(layout, write)
    return path
