"""torchvision's ResNet-50 weights by name: the names `--weights` accepts, the evaluation preset each
publishes (read without a download), where torch.hub caches their file, and the preprocessing a model
was evaluated with (the weights' preset, or given sizes for a checkpoint or a random init)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import torch
from torchvision.models import ResNet50_Weights

from influence.data.preprocessing import CROP_SIZE, RESIZE_SIZE, Preprocessing
from influence.runtime.cli import UserError

DEFAULT_WEIGHTS = "IMAGENET1K_V1"
NO_WEIGHTS = "none"


def weight_choices() -> List[str]:
    """Names accepted by `--weights`: every torchvision `ResNet50_Weights` member, or `none`."""
    return [weights.name for weights in ResNet50_Weights] + [NO_WEIGHTS]

def weights_preprocessing(weights_name: str) -> Preprocessing:
    """The evaluation preset torchvision publishes with the weights (IMAGENET1K_V1: Resize 256, IMAGENET1K_V2:
    Resize 232, both CenterCrop 224, bilinear), read from `weights.transforms()` without any download."""
    preset = ResNet50_Weights[weights_name].transforms()
    return Preprocessing(preset.resize_size[0], preset.crop_size[0], preset.interpolation.value)

def model_preprocessing(weights: Optional[str], resize_size: Optional[int] = None, crop_size: Optional[int] = None) -> Preprocessing:
    """The preprocessing a model was evaluated with: torchvision weights carry their own preset; a
    checkpoint or a random init (`weights` None or `none`) gets 256/224 unless sizes are given."""
    if weights is not None and weights != NO_WEIGHTS:
        preset = weights_preprocessing(weights)
        if resize_size is not None or crop_size is not None:
            raise UserError(
                f"--resize_size/--crop_size are for --checkpoint and --weights none: ResNet50_Weights.{weights} is "
                f"evaluated with Resize({preset.resize_size}) and CenterCrop({preset.crop_size}), which are used"
            )
        return preset
    return Preprocessing(
        RESIZE_SIZE if resize_size is None else resize_size, CROP_SIZE if crop_size is None else crop_size
    )

def weights_cache_path(weights_name: str) -> Path:
    """Where torch.hub keeps the file of a torchvision weights entry once downloaded."""
    url = ResNet50_Weights[weights_name].url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)

def pretrained_weights_cached(weights_name: str = DEFAULT_WEIGHTS) -> bool:
    return weights_cache_path(weights_name).is_file()
