"""The two passes of the gradient index: `compress_training_set` runs the model forward and backward over
the training images the unfinished shards hold and writes each shard's compressed gradients as it
finishes; `score_queries` projects the queries' preconditioned gradients the same way, scores them
against every shard and, for relative or cosine scores, takes each side's self-influence from the index
itself. Both take their model, data and projections from the caller (gradient_index.py builds them)."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import nn
from torch.utils import data
from tqdm.auto import tqdm

from influence.analysis.normalization import COSINE, normalize
from influence.analysis.task import ClassificationTask
from influence.index import projection
from influence.index.shards import check_range, read_shard, shard_path, write_shard
from influence.results import preflight
from influence.runtime.cli import UserError

logger = logging.getLogger("gradient_index")


def check_disk(folder: Path, needed: int, what: str) -> None:
    """One line when the file system under `folder` (or its nearest existing parent) has less than
    `needed` bytes free."""
    existing = Path(folder)
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    logger.info("preflight: %s needs %s under %s (%s free)", what, preflight.size_text(needed), folder, preflight.size_text(free))
    if needed > free:
        raise UserError(
            f"not enough disk space under {folder}: {what} needs {preflight.size_text(needed)}, "
            f"{preflight.size_text(free)} is free; free space, choose another --output_dir, or a smaller --index_dim or --dtype"
        )


def _dataloader(dataset: data.Dataset, batch_size: int, num_workers: int, device: str) -> data.DataLoader:
    return data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=device == "cuda")


def compress_training_set(
    model: nn.Module, train: data.Dataset, projections: projection.Projections, directory: Path,
    ranges: Sequence[Tuple[int, int]], finished: Set[int], dtype: torch.dtype, batch_size: int, num_workers: int,
    device: str, seed: int,
) -> float:
    """Writes every shard of `ranges` not in `finished` (each one when its images are done); returns the
    seconds it took. Only activation gradients are computed: the weights' own gradients never are."""
    num_train = ranges[-1][1] if ranges else 0
    remaining = sum(stop - start for position, (start, stop) in enumerate(ranges) if position not in finished)
    model = model.to(device).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    projections = projections.to(device)
    task = ClassificationTask(seed)
    started = time.perf_counter()
    with projection.CompressedGradientRecorder(model, projections) as recorder, tqdm(
        total=num_train, initial=num_train - remaining, desc="gradient index", unit="img"
    ) as progress:
        for position, (start, stop) in enumerate(ranges):
            if position in finished:
                continue
            rows: List[torch.Tensor] = []
            for images, labels, indices in _dataloader(data.Subset(train, range(start, stop)), batch_size, num_workers, device):
                batch = (images.to(device), labels.to(device), indices.to(device))
                task.compute_train_loss(batch, model, sample=False).backward()
                compressed = recorder.take()
                check_range(compressed, dtype, start + sum(len(row) for row in rows))
                rows.append(compressed.to(dtype).cpu())
                progress.update(len(labels))
            write_shard(shard_path(directory, position), torch.cat(rows), start, stop)
    return time.perf_counter() - started


def score_queries(
    analyzer: Any, query_dataset: data.Dataset, plan: Sequence[projection.LayerProjection],
    projections: projection.Projections, directory: Path, ranges: Sequence[Tuple[int, int]], query_batch_size: int,
    factor_args: Any, factors: Dict[str, Any], score_args: Any, loader_kwargs: Dict[str, Any], normalization: str,
    normalized: bool,
) -> Tuple[torch.Tensor, Dict[str, float]]:
    """(queries x training images) float32 scores against the index in `directory`, and the seconds spent
    on the query gradients and on the shards. With `normalized`, the scores are divided by each training
    image's self-influence over the index's eigen-directions (and, for cosine, each query's)."""
    num_queries, num_train = len(query_dataset), ranges[-1][1]
    projections = projections.to(analyzer.state.device)
    started = time.perf_counter()
    vectors = []
    inverse_curvature: Dict[str, torch.Tensor] = {}
    batches = projection.preconditioned_query_gradients(
        analyzer, query_dataset, query_batch_size, factor_args, factors, score_args, loader_kwargs,
        inverse_curvature if normalized else None,
    )
    for gradients in tqdm(batches, total=-(-num_queries // query_batch_size), desc="query gradients", unit="batch"):
        vectors.append(projections.compress([gradients[layer.name].float() for layer in plan]))
    query_vectors = torch.cat(vectors)
    gradients_done = time.perf_counter()
    weights: Optional[torch.Tensor] = projections.block_weights(inverse_curvature).to(query_vectors.device) if inverse_curvature else None
    scores = torch.empty(num_queries, num_train, dtype=torch.float32)
    train_self = torch.empty(num_train, dtype=torch.float32)
    for position, (start, stop) in enumerate(tqdm(ranges, desc="scoring shards", unit="shard")):
        shard = read_shard(shard_path(directory, position), stop - start, query_vectors.shape[1]).to(query_vectors.device, torch.float32)
        scores[:, start:stop] = (query_vectors @ shard.t()).cpu()
        if weights is not None:  # each training image's g' H^-1 g over the index's eigen-directions
            train_self[start:stop] = (shard.square() @ weights).cpu()
    if weights is not None:
        # The query's own g_q' H^-1 g_q there: its stored entries are its preconditioned ones, (lambda + d) times smaller.
        query_self = (query_vectors.square() / weights).sum(dim=1).cpu() if normalization == COSINE else None
        scores = normalize(scores, train_self, query_self)
    return scores, {"query_gradients_s": gradients_done - started, "scoring_s": time.perf_counter() - gradients_done}
