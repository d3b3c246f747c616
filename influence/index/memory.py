"""The memory a gradient-index query (and a build's shard) needs, counted before the work, as analyze.py's
preflight counts its own: one line when the host (or the GPU) cannot hold it. The index itself is never held: each shard is
streamed in chunks of `shards.READ_CHUNK_BYTES`, so a 141.7 GB index is queried with a few hundred MB of
shard data in memory; what grows is the query batch (its full preconditioned gradients) and the score
matrix rank 0 assembles."""

from __future__ import annotations

import logging
from typing import Dict, Sequence, Tuple

import torch

from influence.index import shards
from influence.index.projection import LayerProjection
from influence.results import preflight
from influence.runtime import distributed
from influence.runtime.cli import UserError

logger = logging.getLogger("gradient_index")

FLOAT32_BYTES = 4
# Full gradients a query holds at once (float32): measured 271 MiB per ResNet-50 query (peak host memory
# at a query batch of 4 against 1, benchmarks/gradient_index_scaling.py), 2.7 times its 102 MB gradient.
GRADIENT_COPIES = 3


def query_memory(plan: Sequence[LayerProjection], num_queries: int, ranges: Sequence[Tuple[int, int]], query_batch_size: int, layout: distributed.Layout) -> Dict[str, int]:
    """Bytes by purpose on this rank: a query batch's full preconditioned gradients, every query's
    projected gradient, one chunk of a shard (stored, float32 and its scores), this rank's score columns
    and, on rank 0, the whole score matrix it assembles and writes."""
    full = sum(layer.outputs * layer.inputs for layer in plan)
    dim = sum(layer.size for layer in plan)
    num_train = ranges[-1][1]
    chunk_rows = min(max(1, shards.READ_CHUNK_BYTES // (FLOAT32_BYTES * dim)), max(stop - start for start, stop in ranges))
    columns = sum(ranges[position][1] - ranges[position][0] for position in layout.share(len(ranges)))
    needs = {
        "query batch": query_batch_size * full * FLOAT32_BYTES * GRADIENT_COPIES,
        "projected queries": num_queries * dim * FLOAT32_BYTES,
        "shard chunk": chunk_rows * (2 * dim + num_queries) * FLOAT32_BYTES,  # stored (at most float32), float32, its scores
        "score columns": 2 * num_queries * columns * FLOAT32_BYTES,  # twice while a normalisation divides them
    }
    if layout.is_main:
        needs["score matrix"] = num_queries * num_train * FLOAT32_BYTES
    return needs


def _line(needs: Dict[str, int]) -> str:
    return ", ".join(f"{what} {preflight.size_text(size)}" for what, size in needs.items())


def check_query_memory(plan: Sequence[LayerProjection], num_queries: int, ranges: Sequence[Tuple[int, int]], query_batch_size: int, device: str, layout: distributed.Layout) -> Dict[str, int]:
    """One line when this rank's host memory (and, on a GPU, the GPU's free memory) is below what the
    query needs; returns the count. On a GPU the query batch, the projected queries, the shard chunk and
    the score columns live there, the score matrix on the host."""
    needs = query_memory(plan, num_queries, ranges, query_batch_size, layout)
    on_host = dict(needs) if device == "cpu" else {what: size for what, size in needs.items() if what == "score matrix"}
    on_device = {} if device == "cpu" else {what: size for what, size in needs.items() if what != "score matrix"}
    available = preflight.available_memory_bytes()
    logger.info("preflight: the query needs about %s of host memory (%s), %s available", preflight.size_text(sum(on_host.values())), _line(on_host), preflight.size_text(available))
    advice = "lower --query_batch_size, or ask fewer queries at a time (--num_queries, --query_files)"
    if sum(on_host.values()) > available:
        raise UserError(f"not enough host memory for the query on rank {layout.rank}: it needs about {preflight.size_text(sum(on_host.values()))} ({_line(on_host)}), {preflight.size_text(available)} is available; {advice}")
    if on_device:
        free = torch.cuda.mem_get_info()[0]
        logger.info("preflight: the query needs about %s of GPU memory (%s), %s free", preflight.size_text(sum(on_device.values())), _line(on_device), preflight.size_text(free))
        if sum(on_device.values()) > free:
            raise UserError(f"not enough GPU memory for the query on rank {layout.rank}: it needs about {preflight.size_text(sum(on_device.values()))} ({_line(on_device)}), {preflight.size_text(free)} is free; {advice}")
    return needs


def check_build_memory(shard_bytes: int, layout: distributed.Layout) -> None:
    """One line when this rank's host memory cannot hold a shard while it is built: its rows as they come,
    and their concatenation written to disk (the model and a batch come on top, as for analyze.py)."""
    needed, available = 2 * shard_bytes, preflight.available_memory_bytes()
    logger.info("preflight: a shard needs about %s of host memory while it is built, %s available", preflight.size_text(needed), preflight.size_text(available))
    if needed > available:
        raise UserError(f"not enough host memory to build a shard on rank {layout.rank}: it takes about {preflight.size_text(needed)} (twice the shard), {preflight.size_text(available)} is available; lower --shard_size")
