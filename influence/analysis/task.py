"""The kronfluence Task for image classification: the training loss (with the true-Fisher labels drawn
reproducibly per example), the measurement whose influence is scored (the margin), and the Analyzer built
around a model with that task."""

from __future__ import annotations

import logging
from typing import Any, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.task import Task
from torch import nn

from influence.analysis.settings import AnalysisSettings, dataloader_kwargs, uses_channels_last
from influence.model import tracking
from influence.runtime import distributed


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
    Tracked layers: `tracked_modules`, the names influence/model/tracking.py gives: every Conv2d and
    Linear that runs as a layer, subclasses included.
    """

    def __init__(self, seed: int, channels_last: bool = False, tracked_modules: Optional[List[str]] = None) -> None:
        self.seed = seed
        self.channels_last = channels_last
        self.tracked_modules = tracked_modules

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
        return self.tracked_modules


def make_analyzer(model: nn.Module, settings: AnalysisSettings) -> Any:
    """kronfluence's Analyzer around the model (wraps its Conv2d/Linear layers in place)."""

    task = ClassificationTask(settings.seed, channels_last=uses_channels_last(settings), tracked_modules=tracking.tracked_module_names(model))
    if uses_channels_last(settings):
        model = model.to(memory_format=torch.channels_last)
    tracking.register_subclasses(model)
    model = prepare_model(model, task)
    if distributed.uses_gloo():
        from influence.runtime import gloo_shim  # pylint: disable=import-outside-toplevel

        model = gloo_shim.wrap_model(model)
    root_level = logging.getLogger().level
    analyzer = Analyzer(
        analysis_name=settings.analysis_name,
        model=model,
        task=task,
        profile=settings.profile,
        output_dir=settings.output_dir,
        log_level=logging.WARNING,
        # Otherwise kronfluence moves everything to a GPU whenever one is visible. Not with the CPU process
        # group's DDP wrapper, which kronfluence refuses with cpu=True (it needs no GPU hidden: see
        # distributed.check_process_layout).
        cpu=settings.device == "cpu" and not distributed.uses_gloo(),
    )
    logging.getLogger().setLevel(root_level)  # kronfluence sets the root logger's level too, hiding ours
    analyzer.set_dataloader_kwargs(dataloader_kwargs(settings))
    return analyzer
