"""Before any heavy work, whether the machine can take what the run will produce: free disk space under
the analysis folder for every file the run will write (the factors, the covariance and lambda partitions,
the score file and its partitions; sizes from the model's layer shapes, the image counts and kronfluence's
dtypes), and host memory for joining the score partitions. One line when either is short, with the
numbers and what helps, instead of a full disk or an out-of-memory kill after hours of work. Results and
partitions already on disk are not counted again."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path
from typing import Dict, List, Tuple

from kronfluence.factor.config import FactorConfig
from kronfluence.factor.eigen import eigendecomposition_exist
from torch import nn

from influence.analysis.factors import COVARIANCE, LAMBDA, PartitionedPhase, factor_arguments, factor_partitions
from influence.analysis.scoring import PAIRWISE, SELF, ScoreFiles, score_arguments, score_partitions, tracked_layer_shapes
from influence.analysis.settings import AnalysisSettings
from influence.results import naming
from influence.runtime import hardware
from influence.runtime.cli import UserError

logger = logging.getLogger("analyze")

# kronfluence's int64 count of processed examples, saved per layer with each covariance and lambda matrix.
COUNT_BYTES = 8
# Joining score partitions holds the growing joined matrix and its next, longer copy: twice the file.
JOIN_MEMORY_FACTOR = 2
# normalization.py writes its rescaled scores in float32 whatever the raw scores' precision.
NORMALIZED_SCORE_BYTES = 4


def size_text(num_bytes: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{int(num_bytes)} bytes"


def factor_bytes(model: nn.Module, settings: AnalysisSettings) -> Dict[str, int]:
    """Bytes of each factor phase's files for the strategy (0 where it skips the phase), per layer of
    `outputs` x `inputs`: covariances inputs^2 and outputs^2, their eigenvectors the same and eigenvalues
    inputs + outputs (in the covariances' dtype), lambda outputs x inputs."""
    factor_args = factor_arguments(settings)
    activation, gradient = factor_args.activation_covariance_dtype.itemsize, factor_args.gradient_covariance_dtype.itemsize
    shapes = tracked_layer_shapes(model)
    return {
        "covariance": COVARIANCE.needed(settings.strategy)
        * sum(i * i * activation + o * o * gradient + 2 * COUNT_BYTES for o, i in shapes),
        "eigendecomposition": FactorConfig.CONFIGS[settings.strategy].requires_eigendecomposition
        * sum((i * i + i) * activation + (o * o + o) * gradient for o, i in shapes),
        "lambda": LAMBDA.needed(settings.strategy)
        * sum(o * i * factor_args.lambda_dtype.itemsize + COUNT_BYTES for o, i in shapes),
    }


@dataclasses.dataclass
class Plan:
    """What a run still has to write, phase by phase: the files that stay, and the partition files on disk
    with them until the phase joins its partitions and deletes them; and the host memory that joining the
    score partitions takes."""

    steps: List[Tuple[str, int, int]] = dataclasses.field(default_factory=list)  # (kind, stays, partitions)
    join_memory: int = 0

    def total(self, kind: str) -> int:
        return sum(stays for step_kind, stays, _ in self.steps if step_kind == kind)

    @property
    def partitions(self) -> int:
        """The most partition files on disk at one time."""
        return max((partitions for _, _, partitions in self.steps), default=0)

    @property
    def disk(self) -> int:
        """The most the run adds to the disk at any time: what earlier phases left, plus a phase's own files
        and partitions when it joins them."""
        peak = written = 0
        for _, stays, partitions in self.steps:
            written += stays
            peak = max(peak, written + partitions)
        return peak


def _factor_phase(plan: Plan, directory: Path, phase: PartitionedPhase, size: int, partitions: int) -> None:
    if size == 0 or phase.finished(output_dir=directory):
        return
    finished = len(phase.partition_files(directory)) // len(phase.factor_names)
    # Every partition is a full-size sum over its images.
    plan.steps.append(("factors", size, size * (partitions - finished) if partitions > 1 else 0))


def _score_file(plan: Plan, directory: Path, files: ScoreFiles, size: int, partitions: int) -> None:
    if (directory / files.name).is_file():
        return
    if partitions == 1:
        plan.steps.append(("scores", size, 0))
        return
    finished = len(list(directory.glob(files.partition_glob)))  # the partitions together hold the file once
    plan.steps.append(("scores", size, size * (partitions - finished) // partitions))
    plan.join_memory = max(plan.join_memory, JOIN_MEMORY_FACTOR * size)


def plan_run(model: nn.Module, settings: AnalysisSettings, num_train: int, num_queries: int, self_influence: bool, score_files: int = 1) -> Plan:
    """The bytes the run will write under its analysis folder, from what is already there; `score_files`:
    pairwise score files of the same shape the run writes (the demo writes two)."""
    plan = Plan()
    factors_dir = naming.factors_dir(settings.output_dir, settings.analysis_name, settings.factors_name)
    sizes = factor_bytes(model, settings)
    partitions = factor_partitions(settings, min(num_train, settings.factor_examples))
    _factor_phase(plan, factors_dir, COVARIANCE, sizes["covariance"], partitions)
    if sizes["eigendecomposition"] and not eigendecomposition_exist(output_dir=factors_dir):
        plan.steps.append(("factors", sizes["eigendecomposition"], 0))
    _factor_phase(plan, factors_dir, LAMBDA, sizes["lambda"], partitions)
    score_size = score_arguments(settings).score_dtype.itemsize
    if self_influence:
        scores_dir = naming.scores_dir(settings.output_dir, settings.analysis_name, settings.self_scores_name)
        _score_file(plan, scores_dir, SELF, num_train * score_size, score_partitions(settings, num_train))
    else:
        scores_dir = naming.scores_dir(settings.output_dir, settings.analysis_name, settings.scores_name)
        for _ in range(score_files):
            _score_file(plan, scores_dir, PAIRWISE, num_queries * num_train * score_size, score_partitions(settings, num_train))
        if settings.score_normalization != naming.NO_NORMALIZATION:
            # normalization.py: the training set's self-influence, then a float32 copy of each score file,
            # made in memory from the raw file and its self-influence vectors (no partitions to join).
            self_dir = naming.scores_dir(settings.output_dir, settings.analysis_name, settings.self_scores_name)
            _score_file(plan, self_dir, SELF, num_train * score_size, score_partitions(settings, num_train))
            normalized_dir = naming.scores_dir(settings.output_dir, settings.analysis_name, settings.output_scores_name)
            for _ in range(score_files):
                _score_file(plan, normalized_dir, PAIRWISE, num_queries * num_train * NORMALIZED_SCORE_BYTES, 1)
    return plan


def available_memory_bytes() -> int:
    """Host memory available to a new allocation without swapping (Linux's MemAvailable), else free pages."""
    available = hardware.proc_kib("/proc/meminfo", "MemAvailable")
    if available is not None:
        return available * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_resources(model: nn.Module, settings: AnalysisSettings, num_train: int, num_queries: int, self_influence: bool, score_files: int = 1) -> Plan:
    """Raises a one-line `UserError` if the disk under the analysis folder or the host memory cannot take
    the run; returns the plan."""
    plan = plan_run(model, settings, num_train, num_queries, self_influence, score_files)
    folder = naming.analysis_dir(settings.output_dir, settings.analysis_name)
    free = shutil.disk_usage(folder).free
    smaller = "" if self_influence else ", or make the score file smaller with fewer --num_queries or --use_half_precision"
    logger.info(
        "preflight: the run needs up to %s under %s (%s free)%s", size_text(plan.disk), folder, size_text(free),
        f"; joining score partitions takes {size_text(plan.join_memory)} of host memory" if plan.join_memory else "",
    )
    if plan.disk > free:
        raise UserError(
            f"not enough disk space under {folder}: the run needs up to {size_text(plan.disk)} (factors "
            f"{size_text(plan.total('factors'))}, scores {size_text(plan.total('scores'))}, and partition files of up to "
            f"{size_text(plan.partitions)} at a time), {size_text(free)} is free; free space or choose another --output_dir{smaller}"
        )
    available = available_memory_bytes()
    if plan.join_memory > available:
        raise UserError(
            f"not enough host memory to join the score partitions: it takes about {size_text(plan.join_memory)} "
            f"(twice the score file), {size_text(available)} is available; free memory or use a larger machine{smaller}"
        )
    return plan
