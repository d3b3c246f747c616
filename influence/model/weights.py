"""torchvision's weights by name for the chosen architecture: the names `--weights` accepts, the
evaluation preset each publishes (read without a download), where torch.hub caches their file, and the
preprocessing a model was evaluated with (the weights' preset, or, for a checkpoint or a random init, the
preset of the architecture's first published weights unless sizes are given)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from influence.data.preprocessing import Preprocessing
from influence.model import architectures
from influence.model.architectures import DEFAULT_ARCH, NO_WEIGHTS
from influence.runtime.cli import UserError

DEFAULT_WEIGHTS = "IMAGENET1K_V1"  # ResNet-50's, the seed's


def default_weights(arch: str = DEFAULT_ARCH) -> str:
    """The weights loaded when `--weights` is not given: the architecture's first published ones
    (IMAGENET1K_V1 for ResNet-50, as upstream)."""
    return architectures.first_weights(arch).name


def weights_preprocessing(weights_name: str, arch: str = DEFAULT_ARCH) -> Preprocessing:
    """The evaluation preset torchvision publishes with the weights (ResNet-50 IMAGENET1K_V1: Resize 256,
    IMAGENET1K_V2: Resize 232, both CenterCrop 224, bilinear; ConvNeXt-Tiny: 236/224; EfficientNet-B0:
    256/224 bicubic), read from `weights.transforms()` without any download."""
    return Preprocessing(*architectures.preset_sizes(architectures.weights_entry(arch, weights_name)))


def model_preprocessing(
    weights: Optional[str], resize_size: Optional[int] = None, crop_size: Optional[int] = None, arch: str = DEFAULT_ARCH
) -> Preprocessing:
    """The preprocessing a model was evaluated with: torchvision weights carry their own preset; a
    checkpoint or a random init (`weights` None or `none`) gets the preset of the architecture's first
    published weights (ResNet-50: 256/224 bilinear), with the sizes given replacing its own."""
    if weights is not None and weights != NO_WEIGHTS:
        preset = weights_preprocessing(weights, arch)
        if resize_size is not None or crop_size is not None:
            raise UserError(
                f"--resize_size/--crop_size are for --checkpoint and --weights none: "
                f"{architectures.weights_enum(arch).__name__}.{weights} is evaluated with Resize({preset.resize_size}) "
                f"and CenterCrop({preset.crop_size}), which are used"
            )
        return preset
    resize, crop, interpolation = architectures.preset_sizes(architectures.first_weights(arch))
    return Preprocessing(resize if resize_size is None else resize_size, crop if crop_size is None else crop_size, interpolation)


def weights_cache_path(weights_name: str, arch: str = DEFAULT_ARCH) -> Path:
    """Where torch.hub keeps the file of a torchvision weights entry once downloaded."""
    url = architectures.weights_entry(arch, weights_name).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def pretrained_weights_cached(weights_name: Optional[str] = None, arch: str = DEFAULT_ARCH) -> bool:
    return weights_cache_path(weights_name or default_weights(arch), arch).is_file()
