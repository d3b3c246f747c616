"""Builds what an influence analysis needs, from explicit arguments and nothing else: the torchvision
classifier (`--arch`, ResNet-50 by default; pretrained weights through torchvision's weights API, a local
checkpoint, or random init) and
the ImageNet train/val datasets (torchvision ImageFolder over the folders `influence.data.layouts` finds
in DATASET_DIR, or a list of labelled files for a flat val) with the evaluation transform. The pieces
(image folders, preprocessing, weights, checkpoints) live in the `influence` package; this file composes
them. Every problem a user can fix (a missing folder, an empty class, a checkpoint that does not
fit the architecture) is raised as a one-line `UserError` before any heavy work starts."""

from __future__ import annotations

import logging
import urllib.error
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn
from torch.utils import data

from influence.data import layouts
from influence.data.images import SPLITS, ImageList, IndexedImageFolder, base_image_folder, example_path, visible_classes
from influence.data.preprocessing import CROP_SIZE, MIN_IMAGE_SIZE, RESIZE_SIZE, Preprocessing, check_preprocessing_sizes
from influence.model import architectures
from influence.model.architectures import DEFAULT_ARCH, arch_choices, arch_problem, display_name, num_outputs, weight_choices
from influence.model.attention import make_attention_trackable
from influence.model.checkpoints import check_checkpoint_path, load_checkpoint_state_dict, model_from_state_dict
from influence.model.inference import calibrate_batchnorm, top_classes
from influence.model.weights import DEFAULT_WEIGHTS, NO_WEIGHTS, default_weights, model_preprocessing, pretrained_weights_cached, weights_cache_path
from influence.runtime.cli import UserError

__all__ = [  # the pieces the commands take from here, beside the builders defined below
    "CROP_SIZE", "DEFAULT_ARCH", "DEFAULT_WEIGHTS", "arch_choices", "default_weights", "NO_WEIGHTS", "RESIZE_SIZE", "SPLITS", "ImageList", "IndexedImageFolder", "Preprocessing",
    "base_image_folder", "calibrate_batchnorm", "check_checkpoint_path", "check_preprocessing_sizes", "example_path",
    "model_preprocessing", "pretrained_weights_cached", "top_classes", "weight_choices",
    "check_input_flags", "get_imagenet_dataset", "check_datasets", "check_model_fits_classes", "check_pretrained_classes",
    "build_model", "num_outputs", "check_model_flags", "check_image_sizes", "random_model", "arch_problem", "chosen_weights", "display_name", "ARCH_HELP", "WEIGHTS_HELP",
]

logger = logging.getLogger(__name__)


def check_input_flags(args: Any) -> Optional[str]:
    """What is wrong with the data and model flags analyze.py and gradient_index.py share (None if
    nothing): --demo or --dataset_dir, exactly one; --checkpoint and --weights, at most one."""
    if args.demo and args.dataset_dir is not None:
        return "--demo makes its own dataset; drop --dataset_dir"
    if not args.demo and args.dataset_dir is None:
        return "--dataset_dir is required (or --demo for the offline demo)"
    if args.checkpoint is not None and args.weights is not None:
        return "--checkpoint and --weights exclude each other"
    return None


ARCH_HELP = (
    "Which torchvision classifier: any image classification model torchvision registers, by name (resnet18, "
    "convnext_tiny, efficientnet_b0, mobilenet_v3_small, vit_b_16, ...; default: resnet50, the seed's). Results go "
    "to imagenet_ARCH/ (demo_ARCH/) unless --analysis_name is given."
)
WEIGHTS_HELP = (
    "torchvision weights of --arch by name (ResNet-50: IMAGENET1K_V1, IMAGENET1K_V2; ConvNeXt_Tiny_Weights.IMAGENET1K_V1 "
    "spelled out is accepted too), or 'none' for random init"
)


def check_image_sizes(resize_size: Optional[int], crop_size: Optional[int], arch: str = DEFAULT_ARCH) -> Optional[str]:
    """`check_preprocessing_sizes` against the architecture's own preset and smallest input: its weights'
    `min_size` (Inception v3 75, AlexNet 63), at least 32; the transformers are built for the crop
    itself, so their weights' 224 does not bind them."""
    minimum = architectures.first_weights(arch).meta["min_size"][0]
    built_for_crop = arch.startswith(architectures.SIZED_BY_CROP)
    return check_preprocessing_sizes(
        resize_size, crop_size, model_preprocessing(None, arch=arch),
        MIN_IMAGE_SIZE if built_for_crop else max(MIN_IMAGE_SIZE, minimum), display_name(arch),
    )


def check_model_flags(args: Any) -> Optional[str]:
    """What is wrong with --arch and --weights together (None if nothing); `args.weights` is left as the
    member name (`ResNet50_Weights.IMAGENET1K_V2` -> `IMAGENET1K_V2`)."""
    problem = arch_problem(args.arch)
    if problem:
        return problem
    problem = architectures.check_weights(args.arch, args.weights)
    if problem is None and args.weights is not None:
        args.weights = architectures.resolve_weights_name(args.arch, args.weights)
    return problem


def chosen_weights(weights: Optional[str], checkpoint: Optional[Path], arch: str, demo: bool) -> Optional[str]:
    """The weights to load (None with a checkpoint): `weights` as given, else the architecture's default;
    the offline demo falls back to a random init when those are not cached (it downloads nothing)."""
    if weights is not None or checkpoint is not None:
        return weights
    if demo and not pretrained_weights_cached(arch=arch):
        logger.warning("demo: pretrained %s weights are not cached (no download here); using random init", architectures.display_name(arch))
        return NO_WEIGHTS
    return default_weights(arch)


def get_imagenet_dataset(
    split: str,
    dataset_dir: str | Path,
    indices: Optional[Sequence[int]] = None,
    preprocessing: Preprocessing = Preprocessing(),
) -> data.Dataset:
    """The `split` ("train" or "val") of ImageNet in any layout `layouts.find_layout` knows, `preprocessing`
    applied; a flat val is listed in the order class folders would give.

    With `indices`, only those examples (a `Subset`; items keep their index in the full folder).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    layout = layouts.find_layout(Path(dataset_dir))
    split_dir = layout.train_dir if split == "train" else layout.val_dir
    try:
        if split == "val" and layout.labels_file is not None:
            classes, _ = visible_classes(layout.train_dir)
            samples = [(str(split_dir / name), label) for name, label in layouts.class_labels(layout, classes)]
            dataset = ImageList(split_dir, samples, classes, transform=preprocessing.transform())
        else:
            dataset = IndexedImageFolder(str(split_dir), transform=preprocessing.transform())
    except FileNotFoundError as error:
        # ImageFolder's own message names the class folders without images; a user needs the path too.
        raise UserError(f"{split_dir}: {error}") from None
    if indices is None:
        return dataset
    bad = [index for index in indices if not 0 <= index < len(dataset)]
    if bad:
        raise UserError(f"{split_dir} has {len(dataset)} images; index {bad[0]} is out of range")
    return data.Subset(dataset, list(indices))


def check_datasets(train_dataset: data.Dataset, query_dataset: data.Dataset, num_queries: int) -> None:
    """Checks that the two splits fit together and hold enough queries (before the model is built)."""
    train_folder, query_folder = base_image_folder(train_dataset), base_image_folder(query_dataset)
    if train_folder.classes != query_folder.classes:
        only_train = sorted(set(train_folder.classes) - set(query_folder.classes))
        only_val = sorted(set(query_folder.classes) - set(train_folder.classes))
        raise UserError(
            f"train and val class folders differ: {len(only_train)} only in train (e.g. {only_train[:3]}), "
            f"{len(only_val)} only in val (e.g. {only_val[:3]})"
        )
    if len(query_dataset) < num_queries:
        raise UserError(
            f"{query_folder.root} has {len(query_dataset)} images, fewer than the {num_queries} queries asked "
            "for (--num_queries)"
        )


def check_model_fits_classes(dataset: data.Dataset, model: nn.Module) -> None:
    num_classes = len(base_image_folder(dataset).classes)
    if num_classes > num_outputs(model):
        raise UserError(f"the dataset has {num_classes} classes but the model has only {num_outputs(model)} outputs")


def check_pretrained_classes(dataset: data.Dataset, weights_name: str, arch: str = DEFAULT_ARCH) -> None:
    """torchvision's ImageNet weights index their outputs by all 1,000 sorted wnids; ImageFolder numbers
    only the class folders present, so a subset of classes would be scored against the wrong outputs.
    Checked from the weights' metadata, before anything is downloaded."""
    num_outputs_ = len(architectures.weights_entry(arch, weights_name).meta["categories"])
    num_classes = len(base_image_folder(dataset).classes)
    if num_classes != num_outputs_:
        raise UserError(
            f"torchvision's ImageNet weights need all {num_outputs_} class folders (found {num_classes} in "
            f"{base_image_folder(dataset).root}); for a subset of classes pass --checkpoint with a model trained on it"
        )


def random_model(arch: str = DEFAULT_ARCH, seed: int = 0, image_size: Optional[int] = None) -> nn.Module:
    """The architecture at random init drawn from `seed` (torchvision's own init), as its state dict is
    saved and loaded: without the attention `build_model` makes trackable. A classifier that torchvision
    starts at zero (the vision transformers') is drawn too: otherwise no gradient would reach any other
    layer, every factor but the classifier's would be zero, and the heuristic damping with them."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = architectures.build(arch, image_size=image_size)
        _, head = architectures.output_layer(model)
        if not head.weight.any():
            logger.warning("%s's random init leaves its classifier at zero; drawn as nn.%s's default init instead", display_name(arch), type(head).__name__)
            head.reset_parameters()
    return model


def build_model(
    weights: Optional[str] = DEFAULT_WEIGHTS, checkpoint: Optional[str | Path] = None, seed: int = 0,
    arch: str = DEFAULT_ARCH, image_size: Optional[int] = None,
) -> nn.Module:
    """The `arch` classifier to analyse (ResNet-50 by default), in eval mode.

    `checkpoint`: a local state-dict file (takes precedence; `weights` must then be None).
    `weights`: a name of the architecture's torchvision weights enum, or `none` for random init, drawn from
    `seed` (so that a rerun analyses the same model).
    `image_size`: the crop the model sees, for architectures whose parameters depend on it (a vision
    transformer's position embeddings); torchvision weights fix their own.
    A vision transformer's attention is rebuilt from trackable layers over the same parameters
    (influence/model/attention.py).
    """
    name = architectures.display_name(arch)
    if checkpoint is not None:
        if weights is not None:
            raise ValueError("pass either weights or checkpoint, not both")
        model = model_from_state_dict(load_checkpoint_state_dict(checkpoint), f"checkpoint {checkpoint}", arch, image_size)
        if not architectures.output_layer(model)[1].weight.any():
            logger.warning(
                "*** checkpoint %s: the classifier's weights are all zero (an untrained vision transformer?): no "
                "gradient reaches any other layer, so every score comes from the classifier alone ***", checkpoint,
            )
    elif weights == NO_WEIGHTS:
        logger.warning(
            "*** --weights none: %s is RANDOMLY INITIALISED; influence scores of an untrained model "
            "say nothing about a trained one. ***", name,
        )
        model = random_model(arch, seed, image_size)
    else:
        weights = weights or default_weights(arch)
        problem = architectures.check_weights(arch, weights)
        if problem:
            raise UserError(problem)
        try:
            model = architectures.build(arch, weights=weights)
        except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
            enum_name = architectures.weights_enum(arch).__name__
            raise UserError(
                f"could not download {enum_name}.{weights} ({getattr(error, 'reason', error)}) and it is "
                f"not cached at {weights_cache_path(weights, arch)}; put the file there, or pass --checkpoint PATH "
                "to a local state dict"
            ) from None
    return make_attention_trackable(model).eval()
