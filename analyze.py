"""The driver: wraps the ResNet-50 and the ImageNet datasets from `pipeline.py` in a kronfluence Task,
fits the covariance, eigendecomposition and lambda factors on the training set, and computes pairwise
influence scores between the first `--num_queries` validation images and every training image (full
rank, or low-rank query gradients with query batching; float32 or bfloat16), or with `--self_influence`
the self-influence score of every training image instead. Finished factors and
scores are reused when the same command is run again; results computed with other settings are never
mixed in silently. `--demo` runs the whole pipeline offline on generated images."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import math
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.score.pairwise import pairwise_scores_save_path
from kronfluence.score.self import self_scores_save_path
from kronfluence.task import Task
from kronfluence.utils.constants import SCORE_ARGUMENTS_NAME
from kronfluence.utils.common.factor_arguments import all_low_precision_factor_arguments
from kronfluence.utils.common.score_arguments import all_low_precision_score_arguments
from kronfluence.utils.dataset import DataLoaderKwargs
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn
from torch.utils import data

import demo
import distributed
import naming
import pipeline
from cli import UserError, non_negative_int, positive_int, setup_logging, user_errors

logger = logging.getLogger("analyze")

STRATEGIES = ("identity", "diagonal", "kfac", "ekfac")
FULL_RANK = -1  # the seed's spelling of "no low-rank approximation"
HEURISTIC_DAMPING = "heuristic"
# The seed's defaults (upstream ImageNet example).
SEED_DEFAULTS = {
    "query_batch_size": 100,
    "train_batch_size": 256,
    "num_queries": 1000,
    "damping_factor": 1e-8,  # kronfluence's default, which the seed's published numbers used
    "analysis_name": naming.DEFAULT_ANALYSIS_NAME,
}
# The demo: a few dozen generated images on a laptop CPU, where 1e-8 damping is badly conditioned.
DEMO_DEFAULTS = {
    "query_batch_size": 8,
    "train_batch_size": 8,
    "num_queries": None,  # every demo val image
    "damping_factor": None,
    "analysis_name": naming.DEMO_ANALYSIS_NAME,
}
DEMO_LOW_RANK = 32
MAX_DEFAULT_WORKERS = 8
HALF_DTYPE = torch.bfloat16
FACTOR_MAX_EXAMPLES = 100_000  # kronfluence's cap for covariance and lambda fitting, as upstream used
# Training images per score partition: a partition's scores are written as soon as it is finished, so a
# crash loses at most one partition. ImageNet gets 26 partitions, each about 4% of the scoring time (25
# minutes of upstream's 11-hour full-rank A100 run); each partition recomputes the query gradients, which
# costs about num_queries / SCORE_PARTITION_EXAMPLES (2%) more at full rank.
SCORE_PARTITION_EXAMPLES = 50_000
# kronfluence's file name for the score arguments it saves, and the arguments that do not change scores.
KRONFLUENCE_SCORE_ARGUMENTS_FILE = f"{SCORE_ARGUMENTS_NAME}_arguments.json"
RESULT_NEUTRAL_SCORE_ARGUMENTS = {"query_gradient_accumulation_steps": None}
# Write errors a user fixes by freeing space (or raising a quota or file-size limit), then resuming.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# Share of the device's memory (host memory on the CPU) that gathered query gradients may take when the
# number of query batches per pass over the training set is chosen automatically.
QUERY_GRADIENT_MEMORY_FRACTION = 0.4
CHANNELS_LAST_CHOICES = {"auto": None, "on": True, "off": False}
# Which float32 ops run in TF32 on GPUs that have it. benchmarks/tf32_accuracy.py (README, Speed settings):
# TF32 matmuls (kronfluence's covariance, eigenbasis and score products, most of the FLOPs) leave the demo's
# scores as float32 does; TF32 convolutions (on in PyTorch's own defaults) move them by 2-4% of the largest.
TF32_CHOICES = ("matmuls", "all", "off")
DEFAULT_TF32 = "matmuls"


@dataclasses.dataclass(frozen=True)
class AnalysisSettings:
    """Everything `run_analysis` needs besides the model and the data. `None` means "off" or "automatic"."""

    strategy: str = "ekfac"
    query_gradient_rank: Optional[int] = None
    query_batch_size: int = SEED_DEFAULTS["query_batch_size"]
    train_batch_size: int = SEED_DEFAULTS["train_batch_size"]
    factor_batch_size: Optional[int] = None
    query_gradient_accumulation_steps: Optional[int] = None
    use_half_precision: bool = False
    damping_factor: Optional[float] = SEED_DEFAULTS["damping_factor"]
    num_workers: int = 0
    pin_memory: bool = True  # only where there is a GPU to copy to
    persistent_workers: bool = True  # only with workers; keeps them across the passes over the training set
    prefetch_factor: Optional[int] = None  # batches each worker loads ahead (None: torch's default, 2)
    channels_last: Optional[bool] = None  # None: on GPUs only (measured slower on the CPU, see README)
    tf32: str = DEFAULT_TF32  # which float32 ops run in TF32, on GPUs that have it
    output_dir: str = naming.DEFAULT_OUTPUT_DIR
    analysis_name: str = naming.DEFAULT_ANALYSIS_NAME
    seed: int = 0
    overwrite: bool = False
    profile: bool = False
    score_partitions: Optional[int] = None

    @property
    def factors_name(self) -> str:
        return naming.factors_name(self.strategy, self.use_half_precision)

    @property
    def scores_name(self) -> str:
        return naming.scores_name(self.strategy, self.use_half_precision, self.query_gradient_rank)

    @property
    def self_scores_name(self) -> str:
        return naming.self_scores_name(self.strategy, self.use_half_precision)


def sample_labels(logits: torch.Tensor, indices: torch.Tensor, seed: int) -> torch.Tensor:
    """One label per example drawn from softmax(logits) (Gumbel-max), with randomness that depends only on
    `seed` and the example's dataset index, so the draw is the same whatever the batch or process.

    numpy's SeedSequence mixes (seed, index) into a full-width seed; torch.Generator.manual_seed would
    keep only the low 32 bits of a combined integer, so different seeds could give the same draws.
    """
    uniform = np.stack(
        [np.random.default_rng([seed, index]).random(logits.shape[-1]) for index in indices.tolist()]
    )
    gumbel = -np.log(-np.log(np.clip(uniform, 1e-20, 1.0 - 1e-12)))
    return (logits.detach().float() + torch.from_numpy(gumbel).float().to(logits.device)).argmax(dim=-1)


class ClassificationTask(Task):
    """Image classification for kronfluence.

    Training loss: summed cross-entropy; with `sample=True` the labels are drawn from the model's own
    predictive distribution (true Fisher), reproducibly per example (see `sample_labels`).
    Measurement: the margin -(logit_correct - logsumexp(other logits)), summed.
    Tracked layers: every Conv2d and Linear (kronfluence's choice when no list is given).
    """

    def __init__(self, seed: int, channels_last: bool = False) -> None:
        self.seed = seed
        self.channels_last = channels_last

    def _layout(self, images: torch.Tensor) -> torch.Tensor:
        """NHWC images for a channels-last model: convolutions then need no layout conversions."""
        if self.channels_last and images.dim() == 4:
            return images.contiguous(memory_format=torch.channels_last)
        return images

    def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
        images, labels, indices = batch
        logits = model(self._layout(images))
        if sample:
            with torch.no_grad():
                labels = sample_labels(logits, indices, self.seed)
        return F.cross_entropy(logits, labels, reduction="sum")

    def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
        images, labels, _ = batch
        logits = model(self._layout(images))
        rows = torch.arange(logits.shape[0], device=logits.device)
        correct = logits[rows, labels]
        others = logits.clone()
        others[rows, labels] = -torch.inf
        return -(correct - others.logsumexp(dim=-1)).sum()

    def get_influence_tracked_modules(self) -> Optional[List[str]]:
        return None


def factor_arguments(settings: AnalysisSettings) -> FactorArguments:
    if settings.use_half_precision:
        return all_low_precision_factor_arguments(strategy=settings.strategy, dtype=HALF_DTYPE)
    return FactorArguments(strategy=settings.strategy)


def query_gradient_bytes(model: nn.Module, rank: Optional[int], itemsize: int) -> int:
    """Bytes one query's preconditioned gradient takes: per tracked layer, out x in (+1 for a bias) at full
    rank, or rank x (out + in) for a low-rank one (kronfluence keeps a layer full where that is smaller).
    About 100 MB per query in float32 for ResNet-50 at full rank."""
    total = 0
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            rows = module.weight.shape[0]
            columns = module.weight[0].numel() + (1 if module.bias is not None else 0)
            total += rows * columns if rank is None else min(rows * columns, rank * (rows + columns))
    return total * itemsize


def device_memory_bytes(device: torch.device) -> int:
    """Memory of the device the scores are computed on: the GPU's or the host's total. Totals, not what is
    free at start, so that a rerun on the same machine batches queries the same way (low-rank scores
    depend on it, see `query_batching_record`)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def accumulation_steps(settings: AnalysisSettings, num_queries: int, query_bytes: int, memory_bytes: int, num_processes: int = 1) -> int:
    """Query batches gathered before each pass over the training set: as many as fit in
    QUERY_GRADIENT_MEMORY_FRACTION of `memory_bytes` (each query takes `query_bytes`; every process holds
    all gathered queries), all of them if they fit, so that the training set is read as few times as
    possible. Each pass recomputes every training gradient, so at full rank this is the largest saving
    available. Full-rank scores are the same either way (each query's score is computed independently);
    low-rank ones are not (see `query_batching_record`)."""
    if settings.query_gradient_accumulation_steps is not None:
        return settings.query_gradient_accumulation_steps
    queries_per_step = settings.query_batch_size * num_processes
    all_steps = max(1, math.ceil(num_queries / queries_per_step))
    fitting_queries = int(memory_bytes * QUERY_GRADIENT_MEMORY_FRACTION) // max(1, query_bytes)
    return max(1, min(all_steps, fitting_queries // queries_per_step))


def score_partitions(settings: AnalysisSettings, num_train: int) -> int:
    """Parts the training set is scored in, each saved when finished (see SCORE_PARTITION_EXAMPLES)."""
    if settings.score_partitions is not None:
        return settings.score_partitions
    return max(1, math.ceil(num_train / SCORE_PARTITION_EXAMPLES))


def set_tf32(choice: str) -> str:
    """Puts the TF32_CHOICES `choice` in force where the GPU has TF32 (compute capability 8+) and everything
    else in full float32, convolutions included (PyTorch's own defaults run them in TF32); returns the
    choice in force ("off" without such a GPU). Set through torch's fp32_precision switches, not the legacy
    allow_tf32 flags (torch refuses a mix of the two)."""
    if choice not in TF32_CHOICES:
        raise ValueError(f"tf32 must be one of {TF32_CHOICES}, not {choice!r}")
    available = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8
    in_force = choice if available else "off"
    torch.backends.cuda.matmul.fp32_precision = "tf32" if in_force in ("matmuls", "all") else "ieee"
    torch.backends.cudnn.conv.fp32_precision = "tf32" if in_force == "all" else "ieee"
    return in_force


def precision_record() -> Dict[str, str]:
    """For `depends_on`: TF32 changes factors and scores (convolutions by 2-4% of the largest score on the
    demo data), so results computed with it are never mixed with float32 ones, nor TF32 matmuls alone with
    TF32 matmuls and convolutions. Nothing on the CPU, which has no TF32 whatever torch's switches say."""
    if not torch.cuda.is_available():
        return {}
    matmuls = torch.backends.cuda.matmul.fp32_precision == "tf32"
    convolutions = torch.backends.cudnn.conv.fp32_precision == "tf32"
    in_force = [name for name, on in (("matmuls", matmuls), ("convolutions", convolutions)) if on]
    return {"tf32": " and ".join(in_force)} if in_force else {}


def score_arguments(settings: AnalysisSettings, steps: int = 1, partitions: int = 1) -> ScoreArguments:
    if settings.use_half_precision:
        score_args = all_low_precision_score_arguments(
            damping_factor=settings.damping_factor,
            query_gradient_low_rank=settings.query_gradient_rank,
            dtype=HALF_DTYPE,
        )
    else:
        score_args = ScoreArguments(
            damping_factor=settings.damping_factor, query_gradient_low_rank=settings.query_gradient_rank
        )
    score_args.query_gradient_accumulation_steps = steps
    score_args.data_partitions = partitions
    return score_args


def _write_json_atomically(path: Path, payload: Dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        staging.write_text(json.dumps(payload, indent=2, sort_keys=True))
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def _differences(saved: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    keys = sorted(set(saved) | set(current))
    return [f"{key} {saved.get(key)!r} -> {current.get(key)!r}" for key in keys if saved.get(key) != current.get(key)]


def claim_results_dir(
    directory: Path, depends_on: Dict[str, Any], settings: AnalysisSettings, what: str, resolved: Dict[str, Any]
) -> Dict[str, Any]:
    """Makes `directory` hold results of exactly `depends_on`; returns its run record.

    A directory recorded with other settings is refused (or emptied with `--overwrite`); a matching one
    is kept, so finished work in it is reused. The record is written before any computation so that an
    interrupted run resumes with the same command.
    """
    record_path = directory / naming.RUN_CONFIG_FILE
    if record_path.is_file():
        try:
            record = json.loads(record_path.read_text())
        except ValueError:
            if not settings.overwrite:
                raise UserError(f"{record_path} cannot be read; pass --overwrite to recompute the {what} in {directory}") from None
            record = {}
        changes = _differences(record.get("depends_on", {}), depends_on)
        if not changes:
            discard_torn_files(directory)
            return record
        if not settings.overwrite:
            raise UserError(
                f"{what} in {directory} were computed with other settings ({'; '.join(changes)}); pass "
                "--overwrite to replace them, or choose another --analysis_name/--output_dir"
            )
        logger.warning("--overwrite: removing %s in %s (%s)", what, directory, "; ".join(changes))
        shutil.rmtree(directory)
    elif directory.exists() and any(directory.iterdir()):
        if not settings.overwrite:
            raise UserError(
                f"{directory} holds {what} that this suite did not record; pass --overwrite to replace them"
            )
        shutil.rmtree(directory)
    record = {
        "id": uuid.uuid4().hex,
        "depends_on": depends_on,
        "settings": dataclasses.asdict(settings),
        "resolved": resolved,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }
    _write_json_atomically(record_path, record)
    return record


def discard_torn_files(directory: Path) -> List[Path]:
    """Deletes result files that a crash cut short (kronfluence writes them in place), so that they are
    recomputed instead of being taken as finished; returns what was deleted."""
    torn = []
    for path in sorted(directory.glob("*.safetensors")) + sorted(directory.glob("*.json")):
        try:
            if path.suffix == ".json":
                json.loads(path.read_text())
            else:
                with safe_open(str(path), framework="pt"):
                    pass
        except (ValueError, OSError, SafetensorError):
            torn.append(path)
    for path in torn:
        logger.warning("%s is incomplete (an interrupted run?); it will be recomputed", path)
        path.unlink()
    return torn


def make_analyzer(model: nn.Module, settings: AnalysisSettings) -> Any:
    """kronfluence's Analyzer around the model (wraps its Conv2d/Linear layers in place)."""

    task = ClassificationTask(settings.seed, channels_last=uses_channels_last(settings))
    if uses_channels_last(settings):
        model = model.to(memory_format=torch.channels_last)
    model = prepare_model(model, task)
    if distributed.uses_gloo():
        import kronfluence_gloo_shim  # pylint: disable=import-outside-toplevel

        model = kronfluence_gloo_shim.wrap_model(model)
    root_level = logging.getLogger().level
    analyzer = Analyzer(
        analysis_name=settings.analysis_name,
        model=model,
        task=task,
        profile=settings.profile,
        output_dir=settings.output_dir,
        log_level=logging.WARNING,
    )
    logging.getLogger().setLevel(root_level)  # kronfluence sets the root logger's level too, hiding ours
    analyzer.set_dataloader_kwargs(dataloader_kwargs(settings))
    return analyzer


def uses_channels_last(settings: AnalysisSettings) -> bool:
    """Channels-last by default on GPUs only: on the CPU kronfluence's covariance pass measured 14% slower
    with it (README, Performance), although a plain ResNet-50 forward and backward is faster."""
    return torch.cuda.is_available() if settings.channels_last is None else settings.channels_last


def dataloader_kwargs(settings: AnalysisSettings) -> DataLoaderKwargs:
    """Pinned memory only where there is a GPU to copy to; persistent workers and prefetching only with
    workers (torch refuses them without). Workers persist across the passes over the training set that
    full-rank scoring makes, instead of being started again for each pass."""
    workers = settings.num_workers > 0
    return DataLoaderKwargs(
        num_workers=settings.num_workers,
        pin_memory=settings.pin_memory and torch.cuda.is_available(),
        persistent_workers=settings.persistent_workers and workers,
        prefetch_factor=settings.prefetch_factor if workers else None,
    )


def factor_batch_size(settings: AnalysisSettings, analyzer: Any) -> Optional[int]:
    """`None` lets kronfluence search the largest batch that fits, which is safe only on one GPU: on the
    CPU it would try 4096 ResNet-50 images at once, and it cannot search across processes."""
    if settings.factor_batch_size is not None:
        return settings.factor_batch_size
    if analyzer.state.device.type == "cuda" and not analyzer.state.use_distributed:
        return None
    return settings.train_batch_size


def fit_factors(
    analyzer: Any,
    train_dataset: data.Dataset,
    settings: AnalysisSettings,
    provenance: Dict[str, Any],
    layout: distributed.Layout = distributed.Layout(),
) -> Dict[str, Any]:
    """Fits (or reuses) covariance, eigendecomposition and lambda factors; returns the factors' record."""
    directory = analyzer.factors_output_dir(settings.factors_name)
    fit_dataset = factor_examples(train_dataset, settings.seed)
    depends_on = {
        "strategy": settings.strategy,
        "use_half_precision": settings.use_half_precision,
        "seed": settings.seed,
        "factor_examples": len(fit_dataset),
        **precision_record(),
        **provenance["train"],
    }
    batch_size = factor_batch_size(settings, analyzer)
    record = distributed.on_main(
        layout, lambda: claim_results_dir(
            directory, depends_on, settings, "factors",
            {"factor_batch_size": batch_size, "channels_last": uses_channels_last(settings), **provenance.get("inputs", {})},
        )
    )
    torch.manual_seed(settings.seed)
    analyzer.fit_all_factors(
        factors_name=settings.factors_name,
        dataset=fit_dataset,
        per_device_batch_size=batch_size,
        factor_args=factor_arguments(settings),
    )
    return record


def compute_scores(
    analyzer: Any,
    train_dataset: data.Dataset,
    query_dataset: data.Dataset,
    settings: AnalysisSettings,
    provenance: Dict[str, Any],
    factors_record: Dict[str, Any],
    layout: distributed.Layout = distributed.Layout(),
) -> Path:
    """Computes (or reuses) the pairwise scores; returns the path of the score file."""
    directory = analyzer.scores_output_dir(settings.scores_name)
    depends_on = {
        **scores_depends_on(settings, factors_record),
        "query_gradient_rank": settings.query_gradient_rank,
        **provenance["query"],
    }
    itemsize = torch.finfo(HALF_DTYPE if settings.use_half_precision else torch.float32).bits // 8
    steps = accumulation_steps(
        settings, len(query_dataset), query_gradient_bytes(analyzer.model, settings.query_gradient_rank, itemsize),
        device_memory_bytes(analyzer.state.device), analyzer.state.num_processes,
    )
    depends_on.update(query_batching_record(settings, steps, analyzer.state.num_processes))
    partitions = score_partitions(settings, len(train_dataset))
    score_args = score_arguments(settings, steps, partitions)
    resolved = {
        "query_gradient_accumulation_steps": steps,
        "score_partitions": partitions,
        "channels_last": uses_channels_last(settings),
        **provenance.get("inputs", {}),
    }
    distributed.on_main(layout, lambda: claim_results_dir(directory, depends_on, settings, "scores", resolved))

    def compute(targets: Optional[List[int]]) -> None:
        analyzer.compute_pairwise_scores(
            scores_name=settings.scores_name,
            factors_name=settings.factors_name,
            query_dataset=query_dataset,
            train_dataset=train_dataset,
            per_device_query_batch_size=settings.query_batch_size,
            per_device_train_batch_size=settings.train_batch_size,
            score_args=score_args,
            target_data_partitions=targets,
        )

    return compute_in_partitions(
        directory, PAIRWISE, settings.scores_name, score_args, settings.seed, layout, compute,
        lambda: analyzer.aggregate_pairwise_scores(scores_name=settings.scores_name),
    )


def query_batching_record(settings: AnalysisSettings, steps: int, num_processes: int) -> Dict[str, Any]:
    """For low-rank scores' `depends_on`: the randomised SVD draws one projection per layer per query batch
    from the global generator, and DataLoader iterators draw from it too, so which queries share a
    projection follows the batch size and process count, and the draws follow the batches per pass."""
    if settings.query_gradient_rank is None:
        return {}
    return {"query_batch_size": settings.query_batch_size, "processes": num_processes, "query_batches_per_pass": steps}


def scores_depends_on(settings: AnalysisSettings, factors_record: Dict[str, Any]) -> Dict[str, Any]:
    """What pairwise and self-influence scores alike depend on besides their data: the factors they were
    computed with, the damping and the arithmetic."""
    return {
        "factors_name": settings.factors_name,
        "factors_id": factors_record["id"],
        "damping_factor": settings.damping_factor,
        "use_half_precision": settings.use_half_precision,
        **precision_record(),
    }


def compute_self_scores(
    analyzer: Any,
    train_dataset: data.Dataset,
    settings: AnalysisSettings,
    provenance: Dict[str, Any],
    factors_record: Dict[str, Any],
    layout: distributed.Layout = distributed.Layout(),
) -> Path:
    """Computes (or reuses) the self-influence score of every training example with the same factors:
    kronfluence's self scores, the training loss's gradient preconditioned and dotted with itself (always
    full rank); returns the path of the score file (a vector of length num_train)."""
    directory = analyzer.scores_output_dir(settings.self_scores_name)
    depends_on = {**scores_depends_on(settings, factors_record), **provenance["train"]}
    partitions = score_partitions(settings, len(train_dataset))
    resolved = {
        "self_influence": True,
        "score_partitions": partitions,
        "channels_last": uses_channels_last(settings),
        **provenance.get("inputs", {}),
    }
    score_args = score_arguments(dataclasses.replace(settings, query_gradient_rank=None), 1, partitions)
    distributed.on_main(layout, lambda: claim_results_dir(directory, depends_on, settings, "self-influence scores", resolved))

    def compute(targets: Optional[List[int]]) -> None:
        analyzer.compute_self_scores(
            scores_name=settings.self_scores_name,
            factors_name=settings.factors_name,
            train_dataset=train_dataset,
            per_device_train_batch_size=settings.train_batch_size,
            score_args=score_args,
            target_data_partitions=targets,
        )

    return compute_in_partitions(
        directory, SELF, settings.self_scores_name, score_args, settings.seed, layout, compute,
        lambda: analyzer.aggregate_self_scores(scores_name=settings.self_scores_name),
    )


@dataclasses.dataclass(frozen=True)
class ScoreFiles:
    """Where kronfluence writes one kind of scores: the joined file and the per-partition files."""

    name: str
    partition_path: Callable[..., Path]  # kronfluence's save-path function, (output_dir, partition)
    partition_glob: str


PAIRWISE = ScoreFiles(
    naming.PAIRWISE_SCORES_FILE, pairwise_scores_save_path, "pairwise_scores_data_partition*_module_partition*.safetensors"
)
SELF = ScoreFiles(naming.SELF_SCORES_FILE, self_scores_save_path, "self_scores_data_partition*_module_partition*.safetensors")


def compute_in_partitions(
    directory: Path,
    files: ScoreFiles,
    scores_name: str,
    score_args: ScoreArguments,
    seed: int,
    layout: distributed.Layout,
    compute: Callable[[Optional[List[int]]], None],
    aggregate: Callable[[], None],
) -> Path:
    """Runs `compute` on each training-set partition that is not finished yet, joins the partitions, and
    returns the joined file; reuses a finished joined file."""
    path = directory / files.name
    if path.is_file():
        logger.info("reusing finished scores %s", path)
        distributed.on_main(layout, lambda: remove_partition_files(directory, files))
        return path
    distributed.on_main(layout, lambda: discard_other_partitioning(directory, files, score_args))
    partitions = score_args.data_partitions
    for partition in range(partitions):
        if partitions > 1 and files.partition_path(output_dir=directory, partition=(partition, 0)).is_file():
            logger.info("scores `%s`: reusing finished partition %d of %d", scores_name, partition + 1, partitions)
            continue
        if partitions > 1:
            logger.info("scores `%s`: partition %d of %d", scores_name, partition + 1, partitions)
        # torch.svd_lowrank (low-rank query gradients) is randomised; seeding before every partition gives
        # each partition, and a resumed run, the same query gradients as one uninterrupted pass.
        torch.manual_seed(seed)
        compute([partition] if partitions > 1 else None)
    if partitions > 1:

        def join() -> None:
            # kronfluence joins the partitions after computing the last one; a run that crashed after the
            # last partition but before or while joining them joins them now.
            if not path.is_file():
                aggregate()
            remove_partition_files(directory, files)

        distributed.on_main(layout, join)
    return path


def discard_other_partitioning(directory: Path, files: ScoreFiles, score_args: ScoreArguments) -> None:
    """Finished partitions of an interrupted run are kept when the run resumes with the same score
    arguments; partitions made with others (another partition count, say) cannot be joined with new ones,
    so they are removed, as are kronfluence's saved arguments, which it would otherwise refuse to replace."""
    saved_path = directory / KRONFLUENCE_SCORE_ARGUMENTS_FILE
    if not saved_path.is_file():
        return
    saved, current = json.loads(saved_path.read_text()), score_args.to_dict()
    if saved == current:
        return
    if score_args.query_gradient_low_rank is None and (
        {**saved, **RESULT_NEUTRAL_SCORE_ARGUMENTS} == {**current, **RESULT_NEUTRAL_SCORE_ARGUMENTS}
    ):
        # Only how full-rank queries are batched per pass changed (--query_gradient_accumulation_steps):
        # finished partitions hold the same scores, so they are kept and kronfluence is shown the new
        # arguments. Low-rank scores depend on it, so their partitions are discarded.
        _write_json_atomically(saved_path, current)
        return
    stale = sorted(directory.glob(files.partition_glob))
    logger.warning("discarding %d partial score files of an interrupted run with other score arguments", len(stale))
    for stale_path in [*stale, saved_path]:
        stale_path.unlink()


def remove_partition_files(directory: Path, files: ScoreFiles) -> None:
    """Once the joined score file is complete its partitions are redundant copies (5 GB for ImageNet)."""
    shape = scores_shape(directory / files.name)  # raises if the joined file is unreadable
    partitions = sorted(directory.glob(files.partition_glob))
    if partitions:
        logger.info("scores of shape %s complete; removing %d partition files", shape, len(partitions))
    for partition_path in partitions:
        partition_path.unlink()


def scores_shape(path: Path) -> tuple:

    with safe_open(str(path), framework="pt") as handle:
        return tuple(handle.get_slice(naming.SCORES_KEY).get_shape())


def load_scores(path: Path) -> torch.Tensor:

    return load_file(str(path))[naming.SCORES_KEY]


def dataset_provenance(train_dataset: data.Dataset, query_dataset: data.Dataset, model_source: str) -> Dict[str, Any]:
    """What results depend on besides the flags: the model's weights, the preprocessing, and which images
    were used (file lists and sizes, not folder locations, so a moved dataset or a copied checkpoint is
    still recognised)."""
    train = {
        "model": model_source,
        "transform": pipeline.transform_description(),
        "num_train": len(train_dataset),
        "train_files_sha256": pipeline.samples_fingerprint(train_dataset),
    }
    query = {"num_queries": len(query_dataset), "query_files_sha256": pipeline.samples_fingerprint(query_dataset)}
    return {"train": train, "query": {**train, **query}}


def factor_examples(train_dataset: data.Dataset, seed: int) -> data.Dataset:
    """The training images the factors are fitted on: all of them up to FACTOR_MAX_EXAMPLES, else a random
    subset drawn with `seed`. kronfluence would take the first 100,000, which in ImageFolder order are the
    first ~78 of ImageNet's 1,000 classes."""
    if len(train_dataset) <= FACTOR_MAX_EXAMPLES:
        return train_dataset
    chosen = np.random.default_rng(seed).choice(len(train_dataset), size=FACTOR_MAX_EXAMPLES, replace=False)
    return data.Subset(train_dataset, sorted(chosen.tolist()))


# ---------------------------------------------------------------------------------------------- CLI


def _rank(text: str) -> Optional[int]:
    value = int(text)
    if value == FULL_RANK:
        return None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive rank, or {FULL_RANK} for full rank, not {text}")
    return value


def _damping(text: str) -> Optional[float]:
    if text == HEURISTIC_DAMPING:
        return None
    value = float(text)
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 or '{HEURISTIC_DAMPING}', not {text}")
    return value


def build_parser() -> argparse.ArgumentParser:

    parser = argparse.ArgumentParser(
        prog="analyze.py",
        description="Influence scores (EKFAC and relatives, via kronfluence) of ImageNet training images on "
        "validation predictions of a torchvision ResNet-50.",
    )
    parser.add_argument("--dataset_dir", type=Path, help="ImageNet folder holding train/<wnid>/* and val/<wnid>/*.")
    parser.add_argument("--demo", action="store_true", help="Run offline on generated images under data/demo/ (made once); no dataset, download or GPU needed.")
    parser.add_argument("--factor_strategy", choices=STRATEGIES, default="ekfac", help="Hessian approximation (default: ekfac).")
    parser.add_argument("--query_gradient_rank", type=_rank, default=None, help=f"Rank of the low-rank query gradients (query batching); {FULL_RANK} for full rank (default).")
    parser.add_argument("--query_batch_size", type=positive_int, help="Queries per batch (default: 100; demo 8).")
    parser.add_argument("--train_batch_size", type=positive_int, help="Training images per batch when scoring (default: 256; demo 8).")
    parser.add_argument("--factor_batch_size", type=positive_int, help="Training images per batch when fitting factors (default: searched on one GPU, else --train_batch_size).")
    parser.add_argument("--query_gradient_accumulation_steps", type=positive_int, help="Query batches gathered per pass over the training set (default: all of them with a low rank, 1 at full rank).")
    parser.add_argument("--num_queries", type=positive_int, help="Score the first N validation images (default: 1000; demo: all).")
    parser.add_argument("--use_half_precision", action="store_true", help="bfloat16 factors and scores (names get _half).")
    parser.add_argument("--damping_factor", type=_damping, default=argparse.SUPPRESS, help=f"Damping added to the Hessian approximation: a number, or '{HEURISTIC_DAMPING}' for 0.1 x mean eigenvalue (default: 1e-8; demo: heuristic).")
    parser.add_argument("--num_workers", type=non_negative_int, help=f"DataLoader worker processes (default: CPU count, at most {MAX_DEFAULT_WORKERS}; demo 0).")
    add_speed_arguments(parser)
    parser.add_argument("--output_dir", type=Path, default=Path(naming.DEFAULT_OUTPUT_DIR), help="Where results go (default: influence_results).")
    parser.add_argument("--analysis_name", help="Sub-folder of --output_dir for this model and data (default: imagenet; demo: demo).")
    parser.add_argument("--weights", choices=pipeline.weight_choices(), help=f"torchvision ResNet50_Weights to load, or 'none' for random init (default: {pipeline.DEFAULT_WEIGHTS}; demo: that if cached, else none).")
    parser.add_argument("--checkpoint", type=Path, help="Local ResNet-50 state dict (.pt/.pth/.safetensors; may be wrapped under state_dict/model, module. prefixes allowed) instead of --weights.")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="Seed for every random choice (true-Fisher labels, randomised SVD) (default: 0).")
    parser.add_argument("--overwrite", action="store_true", help="Replace results on disk that were computed with other settings (finished matching results are still reused).")
    parser.add_argument("--profile", action="store_true", help="Print the per-phase timing table at the end.")
    parser.add_argument("--score_partitions", type=positive_int, help=f"Parts the training set is scored in; each is saved when done, so an interrupted run loses at most one (default: one per {SCORE_PARTITION_EXAMPLES:,} training images).")
    parser.add_argument("--check_images", action="store_true", help="Decode every training and query image before the analysis starts and stop with the list of unreadable files (one pass over the data, with --num_workers processes).")
    parser.add_argument("--self_influence", action="store_true", help=f"Compute self-influence scores of every training image with the same factors (scores_STRATEGY[_half]{naming.SELF_SUFFIX}/{naming.SELF_SCORES_FILE}) INSTEAD of pairwise scores; run without it for pairwise scores (finished factors are reused either way). Not under torchrun on CPUs.")
    parser.add_argument("--dist_timeout", type=positive_int, default=distributed.DEFAULT_TIMEOUT_S, help=f"Under torchrun: seconds a rank waits for the others in a collective before it fails (default: {distributed.DEFAULT_TIMEOUT_S}).")
    return parser


def add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    """The speed settings, shared with benchmarks/benchmark.py; each is on by default and a flag turns it off."""
    parser.add_argument("--prefetch_factor", type=positive_int, help="Batches each DataLoader worker loads ahead (default: torch's, 2); needs --num_workers > 0.")
    parser.add_argument("--no_pin_memory", action="store_true", help="Do not pin host memory for copies to the GPU (pinned by default when a GPU is present).")
    parser.add_argument("--no_persistent_workers", action="store_true", help="Start DataLoader workers again for every pass over the training set (kept alive by default).")
    parser.add_argument("--channels_last", choices=CHANNELS_LAST_CHOICES, default="auto", help="Channels-last (NHWC) layout of the model and images: on, off, or auto = on with a GPU, off on the CPU where it measured slower (default: auto; scores equal up to float rounding).")
    parser.add_argument("--tf32", choices=TF32_CHOICES, default=DEFAULT_TF32, help=f"Which float32 ops run in TF32 on GPUs that have it (no effect on the CPU): matmuls (kronfluence's products; measured not to change the scores), all (convolutions too; moves scores by 2-4%% of the largest, speed-up unmeasured), or off (default: {DEFAULT_TF32}). Recorded with the results.")


def speed_settings(args: argparse.Namespace) -> Dict[str, Any]:
    """AnalysisSettings fields from the flags of `add_speed_arguments`."""
    return {
        "pin_memory": not args.no_pin_memory,
        "persistent_workers": not args.no_persistent_workers,
        "prefetch_factor": args.prefetch_factor,
        "channels_last": CHANNELS_LAST_CHOICES[args.channels_last],
        "tf32": args.tf32,
    }


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.demo and args.dataset_dir is not None:
        parser.error("--demo makes its own dataset; drop --dataset_dir")
    if not args.demo and args.dataset_dir is None:
        parser.error("--dataset_dir is required (or --demo for the offline demo)")
    if args.checkpoint is not None and args.weights is not None:
        parser.error("--checkpoint and --weights exclude each other")
    if args.self_influence:
        query_flags = {"--num_queries": args.num_queries, "--query_batch_size": args.query_batch_size,
                       "--query_gradient_rank": args.query_gradient_rank,
                       "--query_gradient_accumulation_steps": args.query_gradient_accumulation_steps}
        given = [flag for flag, value in query_flags.items() if value is not None]
        if given:
            parser.error(f"--self_influence scores the training set against itself (full rank); drop {', '.join(given)}")
    defaults = DEMO_DEFAULTS if args.demo else SEED_DEFAULTS
    for key, value in defaults.items():
        # `--damping_factor` is absent when not given: its None already means the heuristic.
        if getattr(args, key, None) is None and (key != "damping_factor" or not hasattr(args, key)):
            setattr(args, key, value)
    if args.num_workers is None:
        args.num_workers = 0 if args.demo else default_num_workers()
    if args.prefetch_factor is not None and args.num_workers == 0:
        parser.error("--prefetch_factor needs DataLoader workers (--num_workers > 0)")
    return args


def default_num_workers() -> int:
    """One DataLoader worker per CPU core, at most MAX_DEFAULT_WORKERS."""
    return min(MAX_DEFAULT_WORKERS, os.cpu_count() or 1)


def settings_from_args(args: argparse.Namespace) -> AnalysisSettings:
    return AnalysisSettings(
        strategy=args.factor_strategy,
        query_gradient_rank=args.query_gradient_rank,
        query_batch_size=args.query_batch_size,
        train_batch_size=args.train_batch_size,
        factor_batch_size=args.factor_batch_size,
        query_gradient_accumulation_steps=args.query_gradient_accumulation_steps,
        use_half_precision=args.use_half_precision,
        damping_factor=args.damping_factor,
        num_workers=args.num_workers,
        **speed_settings(args),
        output_dir=str(args.output_dir),
        analysis_name=args.analysis_name,
        seed=args.seed,
        overwrite=args.overwrite,
        profile=args.profile or args.demo,
        score_partitions=args.score_partitions,
    )


def _check_output_dir(output_dir: Path) -> None:
    existing = output_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"output directory {output_dir} cannot be written (no write permission on {existing})")


def run(args: argparse.Namespace, layout: distributed.Layout) -> Dict[str, Path]:
    """Builds everything, runs the analysis; returns the score files, keyed by scores name."""
    settings = settings_from_args(args)
    _check_output_dir(Path(settings.output_dir))
    set_tf32(settings.tf32)
    if args.checkpoint is not None:
        pipeline.check_checkpoint_path(args.checkpoint)
    if args.self_influence and layout.distributed and not torch.cuda.is_available():
        raise UserError(
            "--self_influence is not supported under torchrun on CPUs (kronfluence_gloo_shim does not cover "
            "self scores); run it as a single process, or on GPUs"
        )
    distributed.init(layout, args.dist_timeout)
    weights = args.weights
    if args.demo:
        args.dataset_dir = distributed.on_main(layout, demo.make_demo_dataset)
        if weights is None and args.checkpoint is None and not pipeline.pretrained_weights_cached():
            logger.warning("demo: pretrained ResNet-50 weights are not cached (no download here); using random init")
            weights = pipeline.NO_WEIGHTS
    dataset_dir = Path(args.dataset_dir)
    # Cheap folder checks come before the model is built.
    train_dataset = pipeline.get_imagenet_dataset("train", dataset_dir)
    val_dataset = pipeline.get_imagenet_dataset("val", dataset_dir)
    num_queries = args.num_queries if args.num_queries is not None else len(val_dataset)
    if args.self_influence:
        num_queries = 0  # no queries: val is only checked for its classes
    pipeline.check_datasets(train_dataset, val_dataset, num_queries)
    if settings.score_partitions is not None and settings.score_partitions > len(train_dataset):
        raise UserError(
            f"--score_partitions {settings.score_partitions} is more than the {len(train_dataset)} training images"
        )
    if weights is None and args.checkpoint is None:
        weights = pipeline.DEFAULT_WEIGHTS
    if args.checkpoint is None and weights != pipeline.NO_WEIGHTS and not args.demo:
        pipeline.check_pretrained_classes(train_dataset, weights)
    model = pipeline.build_model(weights=weights, checkpoint=args.checkpoint, seed=args.seed)
    pipeline.check_model_fits_classes(train_dataset, model)
    query_dataset = data.Subset(val_dataset, list(range(num_queries)))
    if args.check_images:
        paths = pipeline.image_paths([train_dataset, query_dataset])
        unreadable = pipeline.unreadable_images(paths[layout.rank :: layout.world_size], settings.num_workers)
        pipeline.raise_if_unreadable(distributed.gather_lists(layout, unreadable), len(paths))
        logger.info("all %d images can be read", len(paths))
    if args.checkpoint is not None:
        model_source = f"checkpoint sha256:{pipeline.file_sha256(args.checkpoint)}"
    else:
        model_source = f"weights:{weights}"
    provenance = dataset_provenance(train_dataset, query_dataset, model_source)
    provenance["inputs"] = {  # where things were, for the record; results do not depend on it
        "dataset_dir": str(dataset_dir.resolve()),
        "checkpoint": str(args.checkpoint.resolve()) if args.checkpoint is not None else None,
    }
    logger.info(
        "%s: %d training images, %d queries, strategy %s, %s, %s%s",
        model_source, len(train_dataset), num_queries, settings.strategy,
        f"rank {settings.query_gradient_rank}" if settings.query_gradient_rank else "full rank",
        "bfloat16" if settings.use_half_precision else "float32",
        f", {layout.world_size} processes" if layout.distributed else "",
    )

    analyzer = make_analyzer(model, settings)
    factors_record = fit_factors(analyzer, train_dataset, settings, provenance, layout)
    if args.self_influence:
        path = compute_self_scores(analyzer, train_dataset, settings, provenance, factors_record, layout)
        if layout.is_main:
            logger.info("self-influence scores `%s`: %s, shape %s", settings.self_scores_name, path, scores_shape(path))
            if args.demo:
                print(demo.self_influence_report(settings.self_scores_name, path, analyzer.profiler.summary()))
            elif settings.profile:
                print(analyzer.profiler.summary())
        return {settings.self_scores_name: path}
    runs = [settings]
    if args.demo:
        low_rank = settings.query_gradient_rank or DEMO_LOW_RANK
        runs = [dataclasses.replace(settings, query_gradient_rank=None), dataclasses.replace(settings, query_gradient_rank=low_rank)]
    results: Dict[str, Path] = {}
    for run_settings in runs:
        path = compute_scores(analyzer, train_dataset, query_dataset, run_settings, provenance, factors_record, layout)
        results[run_settings.scores_name] = path
        if layout.is_main:
            logger.info("scores `%s`: %s, shape %s", run_settings.scores_name, path, scores_shape(path))
    if not layout.is_main:
        return results
    table = analyzer.profiler.summary() if settings.profile else ""
    if args.demo:
        scores = {name: load_scores(path) for name, path in results.items()}
        print(demo.report(results, scores, train_dataset, query_dataset, table))
    elif table:
        print(table)
    return results


def _write_failure(error: Exception) -> Optional[str]:
    """The reason, when `error` is a failed write a user can fix (full disk, quota, file-size limit,
    permissions, read-only disk); None for anything else. safetensors reports OS errors as text."""
    codes = (*DISK_FULL_ERRNOS, errno.EACCES, errno.EPERM, errno.EROFS)
    if isinstance(error, OSError):
        return os.strerror(error.errno) if error.errno in codes else None
    for code in codes:
        if f"(os error {code})" in str(error):
            return os.strerror(code)
    return None


COLLECTIVE_FAILURE_MARKERS = ("Timed out", "Connection closed", "Connection reset", "gloo", "NCCL")


def _is_collective_failure(error: RuntimeError) -> bool:
    return any(marker in str(error) for marker in COLLECTIVE_FAILURE_MARKERS)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Path]:
    args = parse_args(argv)
    layout = distributed.layout_from_env()
    setup_logging()
    if not layout.is_main:
        logging.getLogger().setLevel(logging.WARNING)  # one rank reports; the others only warn
    try:
        with user_errors("analyze.py"):
            try:
                return run(args, layout)
            except torch.OutOfMemoryError:
                raise UserError(
                    "out of memory; lower --train_batch_size, --query_batch_size or --factor_batch_size (or "
                    "--query_gradient_accumulation_steps); finished results are kept"
                ) from None
            except (OSError, SafetensorError) as error:
                reason = _write_failure(error)
                if reason is None:
                    raise
                results = naming.analysis_dir(args.output_dir, args.analysis_name)
                filename = getattr(error, "filename", None)
                if filename is not None and results.resolve() not in Path(filename).resolve().parents:
                    raise UserError(f"cannot access {filename} ({reason})") from None
                if layout.is_main and results.is_dir():
                    try:
                        for directory in [path for path in results.iterdir() if path.is_dir()]:
                            discard_torn_files(directory)
                    except OSError:  # an unwritable folder: the rerun's check finds what is left
                        pass
                raise UserError(
                    f"cannot write results under {results} ({reason}); free space or fix the folder, then run "
                    "the same command again: finished results are kept, the unfinished file was removed"
                ) from None
    except RuntimeError as error:
        # gloo reports a timed-out or broken collective as a plain RuntimeError, NCCL as DistError.
        if not layout.distributed or not (isinstance(error, dist.DistError) or _is_collective_failure(error)):
            raise
        # Another rank died or stalled: say so in one line; torchrun reports the exit of every rank.
        print(
            f"analyze.py: error: rank {layout.rank} lost the other processes ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:200]}); finished results are kept, rerun the same command to resume",
            file=sys.stderr,
        )
        raise SystemExit(1) from None
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
