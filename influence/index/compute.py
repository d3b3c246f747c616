"""The two passes of the gradient index: `compress_training_set` runs the model forward and backward over
the training images the unfinished shards hold and writes each shard's compressed gradients as it
finishes; `score_queries` projects the queries' preconditioned gradients the same way, scores them
against every shard and, for relative or cosine scores, takes each side's self-influence from the index
itself. Both take their model, data and projections from the caller (gradient_index.py builds them), and
under torchrun the ranks share the work: shards to write, query batches, shards to score."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils import data
from tqdm.auto import tqdm

from influence.analysis.normalization import COSINE, normalize
from influence.analysis.task import ClassificationTask
from influence.index import projection
from influence.index.shards import check_range, read_shard_chunks, shard_path, write_shard
from influence.results import preflight
from influence.results.naming import NO_NORMALIZATION
from influence.runtime import distributed
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
    ranges: Sequence[Tuple[int, int]], positions: Sequence[int], dtype: torch.dtype, batch_size: int, num_workers: int,
    device: str, seed: int, progress: Optional[distributed.Progress] = None, show_progress: bool = True,
) -> float:
    """Writes the shards at `positions` of `ranges` (each one when its images are done; under torchrun
    each rank is given its own), posting the images done to `progress`; returns the seconds it took. Only
    activation gradients are computed: the weights' own gradients never are."""
    total = sum(ranges[position][1] - ranges[position][0] for position in positions)
    model = model.to(device).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    projections = projections.to(device)
    task = ClassificationTask(seed)
    started = time.perf_counter()
    done = 0
    with projection.CompressedGradientRecorder(model, projections) as recorder, tqdm(
        total=total, desc="gradient index", unit="img", disable=not show_progress
    ) as bar:
        for position in positions:
            start, stop = ranges[position]
            rows: List[torch.Tensor] = []
            for images, labels, indices in _dataloader(data.Subset(train, range(start, stop)), batch_size, num_workers, device):
                batch = (images.to(device), labels.to(device), indices.to(device))
                task.compute_train_loss(batch, model, sample=False).backward()
                compressed = recorder.take()
                check_range(compressed, dtype, start + sum(len(row) for row in rows))
                rows.append(compressed.to(dtype).cpu())
                bar.update(len(labels))
                done += len(labels)
                if progress is not None:
                    progress.post(done)
            write_shard(shard_path(directory, position), torch.cat(rows), start, stop)
    return time.perf_counter() - started


def query_batches_share(layout: distributed.Layout, num_queries: int, batch_size: int) -> range:
    """This rank's queries: a contiguous run of whole query batches, so that every batch is the one a
    single process computes (the same preconditioned gradients, bit for bit on the CPU)."""
    batches = layout.share(-(-num_queries // batch_size))
    return range(min(batches.start * batch_size, num_queries), min(batches.stop * batch_size, num_queries))


def project_queries(
    analyzer: Any, query_dataset: data.Dataset, plan: Sequence[projection.LayerProjection],
    projections: projection.Projections, query_batch_size: int, factor_args: Any, factors: Dict[str, Any],
    score_args: Any, loader_kwargs: Dict[str, Any], normalized: bool, layout: distributed.Layout,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Every query's preconditioned, projected gradient (queries x dim, on every rank: each rank computes
    its share of the query batches and they are gathered), and, with `normalized`, kronfluence's
    1 / (lambda + damping) of each stored entry."""
    num_queries = len(query_dataset)
    device = analyzer.state.device
    projections = projections.to(device)
    mine = query_batches_share(layout, num_queries, query_batch_size)
    vectors = [torch.zeros(0, projections.dim, device=device)]
    inverse_curvature: Dict[str, torch.Tensor] = {}
    batches = projection.preconditioned_query_gradients(
        analyzer, data.Subset(query_dataset, mine), query_batch_size, factor_args, factors, score_args, loader_kwargs,
        inverse_curvature if normalized else None,
    )
    for gradients in tqdm(batches, total=-(-len(mine) // query_batch_size), desc="query gradients", unit="batch", disable=not layout.is_main):
        vectors.append(projections.compress([gradients[layer.name].float() for layer in plan]))
    counts = [len(query_batches_share(dataclasses.replace(layout, rank=rank), num_queries, query_batch_size)) for rank in range(layout.world_size)]
    query_vectors = distributed.gather_rows(layout, torch.cat(vectors), counts)
    weights = projections.block_weights(inverse_curvature).to(device) if inverse_curvature else None
    return query_vectors, weights


def score_shards(
    query_vectors: torch.Tensor, directory: Path, ranges: Sequence[Tuple[int, int]], positions: range,
    checksums: Sequence[Optional[str]], weights: Optional[torch.Tensor], normalization: str, show_progress: bool = True,
) -> torch.Tensor:
    """(queries x the training images of the shards at `positions`, a contiguous run) float32 scores,
    each shard streamed in row chunks and checked against its checksum. With `weights`, divided by each
    training image's self-influence over the index's eigen-directions (and, for cosine, each query's)."""
    first = ranges[positions.start][0] if len(positions) else 0
    columns = sum(ranges[position][1] - ranges[position][0] for position in positions)
    scores = torch.empty(query_vectors.shape[0], columns, dtype=torch.float32, device=query_vectors.device)
    train_self = torch.empty(columns, dtype=torch.float32, device=query_vectors.device)
    for position in tqdm(positions, desc="scoring shards", unit="shard", disable=not show_progress):
        start, stop = ranges[position]
        chunks = read_shard_chunks(shard_path(directory, position), stop - start, query_vectors.shape[1], checksums[position])
        for row, chunk in chunks:
            chunk = chunk.to(query_vectors.device, torch.float32)
            at = start - first + row
            scores[:, at : at + chunk.shape[0]] = query_vectors @ chunk.t()
            if weights is not None:  # each training image's g' H^-1 g over the index's eigen-directions
                train_self[at : at + chunk.shape[0]] = chunk.square() @ weights
    if weights is None:
        return scores
    # The query's own g_q' H^-1 g_q there: its stored entries are its preconditioned ones, (lambda + d) times smaller.
    query_self = (query_vectors.square() / weights).sum(dim=1) if normalization == COSINE else None
    return normalize(scores, train_self, query_self)


def score_queries(
    analyzer: Any, query_dataset: data.Dataset, plan: Sequence[projection.LayerProjection],
    projections: projection.Projections, directory: Path, ranges: Sequence[Tuple[int, int]], checksums: Sequence[Optional[str]],
    query_batch_size: int, factor_args: Any, factors: Dict[str, Any], score_args: Any, loader_kwargs: Dict[str, Any],
    normalization: str, layout: distributed.Layout = distributed.Layout(),
) -> Tuple[Optional[torch.Tensor], Dict[str, float]]:
    """(queries x training images) float32 scores against the index in `directory` on rank 0 (None on
    the others), and the seconds spent on the query gradients and on the shards. Under torchrun each rank
    computes its share of the query batches, then scores every query against its contiguous share of the
    shards; rank 0 gathers the columns."""
    started = time.perf_counter()
    normalized = normalization != NO_NORMALIZATION
    query_vectors, weights = project_queries(
        analyzer, query_dataset, plan, projections, query_batch_size, factor_args, factors, score_args, loader_kwargs, normalized, layout,
    )
    gradients_done = time.perf_counter()
    block = score_shards(query_vectors, directory, ranges, layout.share(len(ranges)), checksums, weights, normalization, layout.is_main)
    shares = [dataclasses.replace(layout, rank=rank).share(len(ranges)) for rank in range(layout.world_size)]
    bounds = [(ranges[share.start][0], ranges[share.stop - 1][1]) if len(share) else (0, 0) for share in shares]
    scores = torch.empty(query_vectors.shape[0], ranges[-1][1], dtype=torch.float32) if layout.is_main else None

    def place(rank: int, received: torch.Tensor) -> None:
        scores[:, bounds[rank][0] : bounds[rank][1]] = received.cpu()

    distributed.collect_on_main(layout, block, [(query_vectors.shape[0], stop - start) for start, stop in bounds], place)
    return scores, {"query_gradients_s": gradients_done - started, "scoring_s": time.perf_counter() - gradients_done}
