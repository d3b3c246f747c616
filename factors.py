"""The factor phase: fits (or reuses) the covariance, eigendecomposition and lambda factors of the chosen
strategy on the training set, recorded like every result (see records.py)."""

from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np
import torch
from kronfluence.arguments import FactorArguments
from kronfluence.utils.common.factor_arguments import all_low_precision_factor_arguments
from torch.utils import data

import distributed
from records import claim_results_dir, precision_record
from settings import HALF_DTYPE, AnalysisSettings, uses_channels_last


def factor_arguments(settings: AnalysisSettings) -> FactorArguments:
    if settings.use_half_precision:
        return all_low_precision_factor_arguments(strategy=settings.strategy, dtype=HALF_DTYPE)
    return FactorArguments(strategy=settings.strategy)


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
