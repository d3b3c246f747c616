"""The score phase: pairwise scores (queries x training images, full rank or low-rank query gradients)
and self-influence scores, computed in resumable partitions of the training set (each saved when
finished, reseeded so that a resumed run gives the same scores), with query batches per pass sized from
the device's memory; and the readers of finished score files."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from kronfluence.arguments import ScoreArguments
from kronfluence.score.pairwise import pairwise_scores_save_path
from kronfluence.score.self import self_scores_save_path
from kronfluence.utils.common.score_arguments import all_low_precision_score_arguments
from kronfluence.utils.constants import SCORE_ARGUMENTS_NAME
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from torch.utils import data

from influence.analysis.settings import HALF_DTYPE, AnalysisSettings, uses_channels_last
from influence.model.tracking import tracked_layers
from influence.results import naming
from influence.results.records import claim_results_dir, precision_record, write_json_atomically
from influence.runtime import distributed

logger = logging.getLogger("analyze")

# Training images per score partition: a partition's scores are written as soon as it is finished, so a
# crash loses at most one partition. ImageNet gets 26 partitions, each about 4% of the scoring time (25
# minutes of upstream's 11-hour full-rank A100 run); each partition recomputes the query gradients, which
# costs about num_queries / SCORE_PARTITION_EXAMPLES (2%) more at full rank.
SCORE_PARTITION_EXAMPLES = 50_000
# kronfluence's file name for the score arguments it saves, and the arguments that do not change scores.
KRONFLUENCE_SCORE_ARGUMENTS_FILE = f"{SCORE_ARGUMENTS_NAME}_arguments.json"
RESULT_NEUTRAL_SCORE_ARGUMENTS = {"query_gradient_accumulation_steps": None}
# Share of the device's memory (host memory on the CPU) that gathered query gradients may take when the
# number of query batches per pass over the training set is chosen automatically.
QUERY_GRADIENT_MEMORY_FRACTION = 0.4
# Share of the device's memory the training side and the gathered query gradients may take together: the
# rest is the CUDA context, the model, the factors and the allocator's slack.
USABLE_MEMORY_FRACTION = 0.85


def query_gradient_bytes(model: nn.Module, rank: Optional[int], itemsize: int) -> int:
    """Bytes one query's preconditioned gradient takes: per tracked layer, out x in (+1 for a bias) at full
    rank, or rank x (out + in) for a low-rank one (kronfluence keeps a layer full where that is smaller).
    About 100 MB per query in float32 for ResNet-50 at full rank."""
    total = 0
    for rows, columns in tracked_layer_shapes(model):
        total += rows * columns if rank is None else min(rows * columns, rank * (rows + columns))
    return total * itemsize


def layer_shape(module: nn.Module) -> Tuple[int, int]:
    """(outputs, inputs) of a tracked layer's gradient: a convolution's inputs are its input channels x
    kernel size, and a bias counts as one more input."""
    return module.weight.shape[0], module.weight[0].numel() + (1 if module.bias is not None else 0)


def tracked_layer_shapes(model: nn.Module) -> List[Tuple[int, int]]:
    """`layer_shape` of every tracked layer."""
    return [layer_shape(module) for module in tracked_layers(model)]


def device_memory_bytes(device: torch.device) -> int:
    """Memory of the device the scores are computed on: the GPU's or the host's total. Totals, not what is
    free at start, so that a rerun on the same machine batches queries the same way (low-rank scores
    depend on it, see `query_batching_record`)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def training_side_bytes(model: nn.Module, example: torch.Tensor, batch_size: int, itemsize: int) -> int:
    """Device memory the training side of pairwise scoring takes for one batch of `batch_size`, from one
    forward pass of `example` (one image, without the batch dimension): what autograd keeps for the backward
    pass, the copy of every Conv2d/Linear input that kronfluence keeps until the backward pass reaches the
    layer, and the largest layer's per-example gradient with a convolution's unfolded input, which exist
    one layer at a time. ResNet-50 at 224 px in float32: about 35 GB for a batch of 256 (tests/test_scoring.py)."""
    model = getattr(model, "module", model)  # under DistributedDataParallel, the model itself
    counts = {"saved": 0, "inputs": 0, "largest": 0}
    saved_storages = set()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        per_example = tensor.dim() > 0 and tensor.shape[0] == 1 and not isinstance(tensor, nn.Parameter)
        if per_example and tensor.untyped_storage().data_ptr() not in saved_storages:
            saved_storages.add(tensor.untyped_storage().data_ptr())
            counts["saved"] += tensor.numel()
        return tensor

    def layer_hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        counts["inputs"] += inputs[0].numel()
        rows, columns = layer_shape(module)
        unfolded = module.weight[0].numel() * output[0, 0].numel() if isinstance(module, nn.Conv2d) else 0
        counts["largest"] = max(counts["largest"], rows * columns + unfolded)

    handles = [layer.register_forward_hook(layer_hook) for layer in tracked_layers(model)]
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            parameter = next(model.parameters())
            model(example.unsqueeze(0).to(device=parameter.device, dtype=parameter.dtype).requires_grad_(True))
    finally:
        for handle in handles:
            handle.remove()
    return batch_size * itemsize * (counts["saved"] + counts["inputs"] + counts["largest"])


def accumulation_steps(
    settings: AnalysisSettings, num_queries: int, query_bytes: int, memory_bytes: int, num_processes: int = 1,
    training_bytes: int = 0,
) -> int:
    """Query batches gathered before each pass over the training set: as many as fit in
    QUERY_GRADIENT_MEMORY_FRACTION of `memory_bytes`, and beside the training side's own `training_bytes`
    in USABLE_MEMORY_FRACTION of it (each query takes `query_bytes`; every process holds all gathered
    queries), all of them if they fit, so that the training set is read as few times as possible. Each pass
    recomputes every training gradient, so at full rank this is the largest saving available. Full-rank
    scores are the same either way (each query's score is computed independently); low-rank ones are not
    (see `query_batching_record`)."""
    if settings.query_gradient_accumulation_steps is not None:
        return settings.query_gradient_accumulation_steps
    queries_per_step = settings.query_batch_size * num_processes
    all_steps = max(1, math.ceil(num_queries / queries_per_step))
    budget = min(memory_bytes * QUERY_GRADIENT_MEMORY_FRACTION, memory_bytes * USABLE_MEMORY_FRACTION - training_bytes)
    fitting_queries = max(0, int(budget)) // max(1, query_bytes)
    return max(1, min(all_steps, fitting_queries // queries_per_step))


def score_partitions(settings: AnalysisSettings, num_train: int) -> int:
    """Parts the training set is scored in, each saved when finished (see SCORE_PARTITION_EXAMPLES)."""
    if settings.score_partitions is not None:
        return settings.score_partitions
    return max(1, math.ceil(num_train / SCORE_PARTITION_EXAMPLES))


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
        **precision_record(settings.device),
    }


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
    training_bytes = 0
    if settings.query_gradient_accumulation_steps is None:
        training_bytes = training_side_bytes(analyzer.model, train_dataset[0][0], settings.train_batch_size, itemsize)
    steps = accumulation_steps(
        settings, len(query_dataset), query_gradient_bytes(analyzer.model, settings.query_gradient_rank, itemsize),
        device_memory_bytes(analyzer.state.device), analyzer.state.num_processes, training_bytes,
    )
    depends_on.update(query_batching_record(settings, steps, analyzer.state.num_processes))
    partitions = score_partitions(settings, len(train_dataset))
    score_args = score_arguments(settings, steps, partitions)
    resolved = {
        "query_gradient_accumulation_steps": steps,
        "score_partitions": partitions,
        "channels_last": uses_channels_last(settings),
        **provenance.get("inputs", {}),
        "queries": provenance.get("queries"),  # which images the rows are: queries.recorded_queries reads it back
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


def compute_self_scores(
    analyzer: Any,
    train_dataset: data.Dataset,
    settings: AnalysisSettings,
    provenance: Dict[str, Any],
    factors_record: Dict[str, Any],
    layout: distributed.Layout = distributed.Layout(),
    scores_name: Optional[str] = None,
) -> Path:
    """Computes (or reuses) the self-influence score of every training example with the same factors:
    kronfluence's self scores, the training loss's gradient preconditioned and dotted with itself (always
    full rank); returns the path of the score file (a vector of length num_train). `scores_name` (default:
    the settings' self-scores name) is the results folder, for other examples' self scores (the queries')."""
    scores_name = scores_name or settings.self_scores_name
    directory = analyzer.scores_output_dir(scores_name)
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
            scores_name=scores_name,
            factors_name=settings.factors_name,
            train_dataset=train_dataset,
            per_device_train_batch_size=settings.train_batch_size,
            score_args=score_args,
            target_data_partitions=targets,
        )

    return compute_in_partitions(
        directory, SELF, scores_name, score_args, settings.seed, layout, compute,
        lambda: analyzer.aggregate_self_scores(scores_name=scores_name),
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
        write_json_atomically(saved_path, current)
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
