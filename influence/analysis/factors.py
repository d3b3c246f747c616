"""The factor phase: fits (or reuses) the covariance, eigendecomposition and lambda factors of the chosen
strategy on the training set, recorded like every result (see records.py). The covariance and lambda fits
run in partitions of the fitted images, each saved when finished (kronfluence's data partitions), so an
interrupted fit resumes from its last finished partition; the partitions are summed, then deleted."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from kronfluence.arguments import FactorArguments
from kronfluence.factor.config import FactorConfig
from kronfluence.factor.covariance import covariance_matrices_exist
from kronfluence.factor.eigen import eigendecomposition_exist, lambda_matrices_exist
from kronfluence.utils.common.factor_arguments import all_low_precision_factor_arguments
from kronfluence.utils.constants import COVARIANCE_FACTOR_NAMES, FACTOR_ARGUMENTS_NAME, LAMBDA_FACTOR_NAMES
from torch.utils import data

from influence.analysis.settings import HALF_DTYPE, AnalysisSettings, uses_channels_last
from influence.results.records import claim_results_dir, precision_record, write_json_atomically
from influence.runtime import distributed
from influence.runtime.cli import UserError

logger = logging.getLogger("analyze")

# Fitted images per partition of the covariance and lambda fits: 10 partitions of ImageNet's 100,000, so
# a kill loses at most a tenth of a fit. Each covariance partition is a full copy of the covariances
# (0.6 GB for ResNet-50 in float32) until they are summed; lambda partitions are 0.1 GB each.
FACTOR_PARTITION_EXAMPLES = 10_000
# kronfluence's saved factor arguments, and those that change only how a fit is split, not its result.
KRONFLUENCE_FACTOR_ARGUMENTS_FILE = f"{FACTOR_ARGUMENTS_NAME}_arguments.json"
PARTITION_ARGUMENTS = ("covariance_data_partitions", "lambda_data_partitions")


@dataclasses.dataclass(frozen=True)
class PartitionedPhase:
    """A factor phase kronfluence fits in data partitions: the names of its files and its finished check."""

    name: str
    factor_names: List[str]
    finished: Callable[..., bool]  # kronfluence's (output_dir) -> all files of the summed phase exist
    required_by: str  # the FactorConfig attribute that says whether a strategy has this phase

    def needed(self, strategy: str) -> bool:
        return getattr(FactorConfig.CONFIGS[strategy], self.required_by)

    def partition_files(self, directory: Path) -> List[Path]:
        return sorted(path for name in self.factor_names for path in directory.glob(f"{name}_data_partition*_module_partition*.safetensors"))


COVARIANCE = PartitionedPhase("covariance", COVARIANCE_FACTOR_NAMES, covariance_matrices_exist, "requires_covariance_matrices")
LAMBDA = PartitionedPhase("lambda", LAMBDA_FACTOR_NAMES, lambda_matrices_exist, "requires_lambda_matrices")


def factor_partitions(settings: AnalysisSettings, num_examples: int) -> int:
    """Parts the covariance and lambda fits are split into (see FACTOR_PARTITION_EXAMPLES)."""
    if settings.factor_partitions is not None:
        return settings.factor_partitions
    return max(1, math.ceil(num_examples / FACTOR_PARTITION_EXAMPLES))


def factor_arguments(settings: AnalysisSettings, partitions: int = 1) -> FactorArguments:
    if settings.use_half_precision:
        factor_args = all_low_precision_factor_arguments(strategy=settings.strategy, dtype=HALF_DTYPE)
    else:
        factor_args = FactorArguments(strategy=settings.strategy)
    factor_args.covariance_data_partitions = partitions
    factor_args.lambda_data_partitions = partitions
    return factor_args


def factor_batch_size(settings: AnalysisSettings, analyzer: Any) -> Optional[int]:
    """`None` lets kronfluence search the largest batch that fits, which is safe only on one GPU: on the
    CPU it would try 4096 ResNet-50 images at once, and it cannot search across processes."""
    if settings.factor_batch_size is not None:
        return settings.factor_batch_size
    if analyzer.state.device.type == "cuda" and not analyzer.state.use_distributed:
        return None
    return settings.train_batch_size


def factor_examples(train_dataset: data.Dataset, seed: int, limit: int) -> data.Dataset:
    """The training images the factors are fitted on: all of them up to `limit` (--factor_examples), else a
    random subset of `limit` drawn with `seed`. kronfluence would take the first 100,000, which in
    ImageFolder order are the first ~78 of ImageNet's 1,000 classes."""
    if len(train_dataset) <= limit:
        return train_dataset
    chosen = np.random.default_rng(seed).choice(len(train_dataset), size=limit, replace=False)
    return data.Subset(train_dataset, sorted(chosen.tolist()))


def fit_factors(
    analyzer: Any,
    train_dataset: data.Dataset,
    settings: AnalysisSettings,
    provenance: Dict[str, Any],
    layout: distributed.Layout = distributed.Layout(),
) -> Dict[str, Any]:
    """Fits (or reuses) covariance, eigendecomposition and lambda factors; returns the factors' record."""
    directory = analyzer.factors_output_dir(settings.factors_name)
    fit_dataset = factor_examples(train_dataset, settings.seed, settings.factor_examples)
    depends_on = {
        "strategy": settings.strategy,
        "use_half_precision": settings.use_half_precision,
        "seed": settings.seed,
        "factor_examples": len(fit_dataset),
        **precision_record(settings.device),
        **provenance["train"],
    }
    partitions = factor_partitions(settings, len(fit_dataset))
    if partitions * analyzer.state.num_processes > len(fit_dataset):
        raise UserError(
            f"--factor_partitions {partitions} is more than the {len(fit_dataset)} fitted images"
            + (f" / {analyzer.state.num_processes} processes" if analyzer.state.num_processes > 1 else "")
        )
    batch_size = factor_batch_size(settings, analyzer)
    record = distributed.on_main(
        layout, lambda: claim_results_dir(
            directory, depends_on, settings, "factors",
            {"factor_batch_size": batch_size, "factor_partitions": partitions, "channels_last": uses_channels_last(settings),
             **provenance.get("inputs", {})},
        )
    )
    factor_args = factor_arguments(settings, partitions)
    distributed.on_main(layout, lambda: discard_other_partitioning(directory, factor_args))
    torch.manual_seed(settings.seed)
    fit = {"factors_name": settings.factors_name, "dataset": fit_dataset, "per_device_batch_size": batch_size, "factor_args": factor_args}
    report_finished_partitions(directory, COVARIANCE, settings, partitions)
    analyzer.fit_covariance_matrices(**fit)
    distributed.on_main(layout, lambda: remove_partition_files(directory, COVARIANCE))
    analyzer.perform_eigendecomposition(factors_name=settings.factors_name, factor_args=factor_args)
    report_finished_partitions(directory, LAMBDA, settings, partitions)
    analyzer.fit_lambda_matrices(**fit)
    distributed.on_main(layout, lambda: remove_partition_files(directory, LAMBDA))
    return record


def report_finished_partitions(directory: Path, phase: PartitionedPhase, settings: AnalysisSettings, partitions: int) -> None:
    if partitions == 1 or not phase.needed(settings.strategy) or phase.finished(output_dir=directory):
        return
    finished = len(phase.partition_files(directory)) // len(phase.factor_names)
    logger.info(
        "factors `%s`: %s fit in %d partitions%s", settings.factors_name, phase.name, partitions,
        f", reusing {finished} finished" if finished else "",
    )


def remove_partition_files(directory: Path, phase: PartitionedPhase) -> None:
    """Once a phase's partitions are summed they are redundant copies (0.6 GB each for ResNet-50's
    covariances); a run killed while summing them sums them again on the rerun."""
    if phase.finished(output_dir=directory):
        for path in phase.partition_files(directory):
            path.unlink()


def discard_other_partitioning(directory: Path, factor_args: FactorArguments) -> None:
    """Finished partitions of an interrupted fit are kept when the run resumes with the same partition
    count; those of another count cannot be summed with new ones, so the unfinished phases' partitions are
    removed and kronfluence's saved arguments (which it would refuse to replace) updated. Finished phases
    are kept: partitioning changes their sums only by float rounding. Finished factors are left as they
    are, saved arguments included: kronfluence compares them with those it copied beside unfinished scores."""
    saved_path = directory / KRONFLUENCE_FACTOR_ARGUMENTS_FILE
    if not saved_path.is_file():
        return
    saved, current = json.loads(saved_path.read_text()), factor_args.to_dict()
    neutral = dict.fromkeys(PARTITION_ARGUMENTS)
    if saved == current or {**saved, **neutral} != {**current, **neutral}:
        return  # the same, or other arguments changed, which kronfluence reports
    unfinished = [phase for phase in (COVARIANCE, LAMBDA) if phase.needed(factor_args.strategy) and not phase.finished(output_dir=directory)]
    if not unfinished and (eigendecomposition_exist(output_dir=directory) or not FactorConfig.CONFIGS[factor_args.strategy].requires_eigendecomposition):
        return
    for phase in unfinished:
        stale = phase.partition_files(directory)
        if stale:
            logger.warning("discarding %d %s partition files of an interrupted run with another partition count", len(stale), phase.name)
        for path in stale:
            path.unlink()
    write_json_atomically(saved_path, current)
