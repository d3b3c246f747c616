"""What one analysis is asked to do, as a frozen `AnalysisSettings` (the driver builds it from the flags;
the benchmarks and tests build it directly), the seed's defaults, and the few decisions that follow from
the settings and the machine: which float32 ops run in TF32, the memory layout, the DataLoader options."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Optional

import torch
from kronfluence.utils.dataset import DataLoaderKwargs

from influence.results import naming

STRATEGIES = ("identity", "diagonal", "kfac", "ekfac")
FULL_RANK = -1  # the seed's spelling of "no low-rank approximation"
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
# Training images the covariance and lambda factors are fitted on at most, as upstream used on ImageNet.
FACTOR_MAX_EXAMPLES = 100_000
HALF_DTYPE = torch.bfloat16
CHANNELS_LAST_CHOICES = {"auto": None, "on": True, "off": False}
# Which float32 ops run in TF32 on GPUs that have it. benchmarks/tf32_accuracy.py (docs/performance.md, Speed settings):
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
    channels_last: Optional[bool] = None  # None: automatic, see uses_channels_last
    tf32: str = DEFAULT_TF32  # which float32 ops run in TF32, on GPUs that have it
    device: str = "cpu"  # "cuda" or "cpu", decided once (hardware.resolve_device); kronfluence, layout and pinning follow it
    output_dir: str = naming.DEFAULT_OUTPUT_DIR
    analysis_name: str = naming.DEFAULT_ANALYSIS_NAME
    seed: int = 0
    overwrite: bool = False
    profile: bool = False
    score_partitions: Optional[int] = None
    factor_partitions: Optional[int] = None  # None: one per factors.FACTOR_PARTITION_EXAMPLES fitted images
    factor_examples: int = FACTOR_MAX_EXAMPLES
    score_normalization: str = naming.NO_NORMALIZATION  # naming.NORMALIZATIONS: pairwise scores rescaled (normalization.py)

    @property
    def factors_name(self) -> str:
        return naming.factors_name(self.strategy, self.use_half_precision)

    @property
    def scores_name(self) -> str:
        return naming.scores_name(self.strategy, self.use_half_precision, self.query_gradient_rank)

    @property
    def output_scores_name(self) -> str:
        """The pairwise scores this run hands to the user: the raw ones (`scores_name`), or their rescaled
        copy with `score_normalization`."""
        return naming.scores_name(self.strategy, self.use_half_precision, self.query_gradient_rank, self.score_normalization)

    @property
    def self_scores_name(self) -> str:
        return naming.self_scores_name(self.strategy, self.use_half_precision)


def rank_argument(text: str) -> Optional[int]:
    value = int(text)
    if value == FULL_RANK:
        return None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive rank, or {FULL_RANK} for full rank, not {text}")
    return value


def set_tf32(choice: str, device: str) -> str:
    """Puts the TF32_CHOICES `choice` in force where the GPU has TF32 (compute capability 8+) and everything
    else in full float32, convolutions included (PyTorch's own defaults run them in TF32); returns the
    choice in force ("off" on the CPU or without such a GPU). Set through torch's fp32_precision switches, not the legacy
    allow_tf32 flags (torch refuses a mix of the two)."""
    if choice not in TF32_CHOICES:
        raise ValueError(f"tf32 must be one of {TF32_CHOICES}, not {choice!r}")
    available = device == "cuda" and torch.cuda.get_device_capability()[0] >= 8
    in_force = choice if available else "off"
    torch.backends.cuda.matmul.fp32_precision = "tf32" if in_force in ("matmuls", "all") else "ieee"
    torch.backends.cudnn.conv.fp32_precision = "tf32" if in_force == "all" else "ieee"
    return in_force


def uses_channels_last(settings: AnalysisSettings) -> bool:
    """Channels-last by default only where tensor cores run the convolutions: on a GPU in bfloat16 or with
    TF32 convolutions (`--tf32 all`). In strict float32 NHWC gains nothing there and kronfluence's unfold
    copies each layer's input back to NCHW; on the CPU the covariance pass measured 14% slower with it
    (docs/performance.md). Unmeasured on a GPU so far."""
    if settings.channels_last is not None:
        return settings.channels_last
    return settings.device == "cuda" and (settings.use_half_precision or settings.tf32 == "all")


def dataloader_kwargs(settings: AnalysisSettings) -> DataLoaderKwargs:
    """Pinned memory only where there is a GPU to copy to; persistent workers and prefetching only with
    workers (torch refuses them without). Workers persist across the passes over the training set that
    full-rank scoring makes, instead of being started again for each pass."""
    workers = settings.num_workers > 0
    return DataLoaderKwargs(
        num_workers=settings.num_workers,
        pin_memory=settings.pin_memory and settings.device == "cuda",
        persistent_workers=settings.persistent_workers and workers,
        prefetch_factor=settings.prefetch_factor if workers else None,
    )
