"""Builds what an influence analysis needs, from explicit arguments and nothing else: the torchvision
ResNet-50 (pretrained weights through torchvision's weights API, a local checkpoint, or random init) and
the ImageNet train/val datasets (torchvision ImageFolder over the folders layouts.py finds in
DATASET_DIR, or a list of labelled files for a flat val) with the evaluation transform. Every problem a user can fix (a missing folder, an empty class, a checkpoint that
is not a ResNet-50) is raised as a one-line `cli.UserError` before any heavy work starts."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import os
import re
import urllib.error
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from torch import nn
from torch.utils import data
from torchvision import transforms
from torchvision.datasets import ImageFolder, VisionDataset
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader, make_dataset
from torchvision.models import ResNet50_Weights, resnet50
from torchvision.transforms import InterpolationMode
from tqdm.auto import tqdm

import layouts
from cli import UserError

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_SIZE = 256
CROP_SIZE = 224
MIN_IMAGE_SIZE = 32
SPLITS = ("train", "val")
DEFAULT_WEIGHTS = "IMAGENET1K_V1"
NO_WEIGHTS = "none"
# Keys under which training scripts commonly wrap a state dict.
CHECKPOINT_WRAPPER_KEYS = ("state_dict", "model")
# Objects beside the tensors that training scripts save and that are safe to unpickle: torchvision's
# reference train.py keeps its command line as an argparse.Namespace under "args".
CHECKPOINT_SAFE_GLOBALS = (argparse.Namespace,)
# How torch's weights-only unpickler names an object it refuses to build.
UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")
DDP_PREFIX = "module."


def weight_choices() -> List[str]:
    """Names accepted by `--weights`: every torchvision `ResNet50_Weights` member, or `none`."""
    return [weights.name for weights in ResNet50_Weights] + [NO_WEIGHTS]


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """The evaluation preprocessing: Resize(resize_size) of the shorter side, CenterCrop(crop_size),
    then (for the model) ToTensor and Normalize with ImageNet's mean and std. Used for the training set and
    the queries alike, and recorded with the results."""

    resize_size: int = RESIZE_SIZE
    crop_size: int = CROP_SIZE
    interpolation: str = InterpolationMode.BILINEAR.value

    def view(self) -> transforms.Compose:
        """The image as the model sees it, before it becomes a tensor (for figures)."""
        return transforms.Compose(
            [transforms.Resize(self.resize_size, interpolation=InterpolationMode(self.interpolation)), transforms.CenterCrop(self.crop_size)]
        )

    def transform(self) -> transforms.Compose:
        return transforms.Compose(
            [*self.view().transforms, transforms.ToTensor(), transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)]
        )


def weights_preprocessing(weights_name: str) -> Preprocessing:
    """The evaluation preset torchvision publishes with the weights (IMAGENET1K_V1: Resize 256, IMAGENET1K_V2:
    Resize 232, both CenterCrop 224, bilinear), read from `weights.transforms()` without any download."""
    preset = ResNet50_Weights[weights_name].transforms()
    return Preprocessing(preset.resize_size[0], preset.crop_size[0], preset.interpolation.value)


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


def check_preprocessing_sizes(resize_size: Optional[int], crop_size: Optional[int]) -> Optional[str]:
    """What is wrong with explicit --resize_size/--crop_size (None if nothing): each at least MIN_IMAGE_SIZE
    (ResNet-50 halves an image five times), and the crop no larger than the resized image."""
    for flag, size in (("--resize_size", resize_size), ("--crop_size", crop_size)):
        if size is not None and size < MIN_IMAGE_SIZE:
            return f"{flag} {size} is below {MIN_IMAGE_SIZE} pixels, too small for ResNet-50's five halvings"
    resize = RESIZE_SIZE if resize_size is None else resize_size
    crop = CROP_SIZE if crop_size is None else crop_size
    if crop > resize:
        defaults = " (the default)" if resize_size is None else ""
        return f"--crop_size {crop} is larger than --resize_size {resize}{defaults}: the centre crop must fit in the resized image"
    return None


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


class BadImageError(UserError):
    """An image file that cannot be decoded. Raised in DataLoader workers, where PyTorch re-raises it in
    the main process with the worker's traceback folded into the message; `line` is the one line a user
    needs (which file, and why)."""

    PREFIX = "cannot read image "

    @property
    def line(self) -> str:
        text = str(self)
        return text[text.rindex(self.PREFIX):].strip() if self.PREFIX in text else text.strip()


def read_image_error(path: str) -> Optional[str]:
    """Why the image at `path` cannot be decoded into RGB pixels, or None when it can. Decoding the pixels,
    not only the header, is what catches a truncated JPEG."""
    try:
        with Image.open(path) as image:
            image.convert("RGB").load()
    except Exception as error:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
        return f"{type(error).__name__}: {error}"
    return None


def visible_classes(directory: str | Path) -> Tuple[List[str], Dict[str, int]]:
    """torchvision's `find_classes` without hidden folders (`.ipynb_checkpoints` is no class)."""
    classes = layouts.class_folders(Path(directory))
    if not classes:
        raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
    return classes, {name: index for index, name in enumerate(classes)}


class IndexedImageFolder(ImageFolder):
    """ImageFolder whose items are `(image, label, index)`; the index (position in the full folder) lets
    the true-Fisher label sampling depend on the example alone, not on its batch or process. An image
    that cannot be decoded stops the run with a `BadImageError` naming the file. Hidden folders and files
    (`layouts.is_hidden`) are neither classes nor images."""

    def find_classes(self, directory: str | Path) -> Tuple[List[str], Dict[str, int]]:
        return visible_classes(directory)

    @staticmethod
    def make_dataset(directory: str | Path, class_to_idx: Dict[str, int], extensions: Any = None,
                     is_valid_file: Any = None, allow_empty: bool = False) -> List[Tuple[str, int]]:
        prefix = len(os.path.join(os.path.expanduser(directory), ""))  # string slicing: ImageNet has 1.28M files

        def visible_image(path: str) -> bool:  # nothing in a hidden folder below a class either
            return layouts.is_image(path) and not any(layouts.is_hidden(part) for part in path[prefix:].split(os.sep))

        return make_dataset(directory, class_to_idx, is_valid_file=visible_image, allow_empty=allow_empty)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int, int]:
        try:
            image, label = super().__getitem__(index)
        except Exception as error:
            raise BadImageError(f"{BadImageError.PREFIX}{self.samples[index][0]} ({type(error).__name__}: {error})") from None
        return image, label, index


class ImageList(IndexedImageFolder):
    """An IndexedImageFolder over given `(path, class index)` samples instead of a scan of class folders: a
    flat validation folder labelled by the devkit or a CSV, or the query images a user chose. `root` is
    the folder the paths are recorded relative to."""

    def __init__(self, root: str | Path, samples: Sequence[Tuple[str, int]], classes: Sequence[str], transform: Any = None) -> None:
        VisionDataset.__init__(self, str(root), transform=transform)
        self.loader = default_loader
        self.extensions = IMG_EXTENSIONS
        self.classes = list(classes)
        self.class_to_idx = {name: index for index, name in enumerate(self.classes)}
        self.samples = [(str(path), int(label)) for path, label in samples]
        self.imgs = self.samples
        self.targets = [label for _, label in self.samples]


class _ImageCheck(data.Dataset):
    """Items are `read_image_error` of each file, so a DataLoader checks images in parallel."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int) -> str:
        return read_image_error(self.paths[position]) or ""


IMAGE_CHECK_BATCH = 64
MAX_BAD_IMAGES_SHOWN = 3


def image_paths(datasets: Sequence[data.Dataset]) -> List[str]:
    """Every image file of `datasets`, each once, sorted."""
    return sorted({example_path(dataset, position)[0] for dataset in datasets for position in range(len(dataset))})


def unreadable_images(paths: Sequence[str], num_workers: int) -> List[Tuple[str, str]]:
    """(path, reason) for each file of `paths` that cannot be decoded, checked by `num_workers` processes."""
    loader = data.DataLoader(_ImageCheck(paths), batch_size=IMAGE_CHECK_BATCH, num_workers=num_workers, collate_fn=list)
    errors = []
    with tqdm(total=len(paths), desc="checking images", unit="img") as progress:
        for start, batch in zip(range(0, len(paths), IMAGE_CHECK_BATCH), loader):
            errors.extend((paths[start + i], error) for i, error in enumerate(batch) if error)
            progress.update(len(batch))
    return errors


def raise_if_unreadable(errors: Sequence[Tuple[str, str]], num_checked: int) -> None:
    """One UserError naming the first unreadable files, if there are any."""
    if not errors:
        return
    errors = sorted(errors)
    shown = "; ".join(f"{path} ({error})" for path, error in errors[:MAX_BAD_IMAGES_SHOWN])
    more = f" and {len(errors) - MAX_BAD_IMAGES_SHOWN} more" if len(errors) > MAX_BAD_IMAGES_SHOWN else ""
    raise UserError(f"{len(errors)} of {num_checked} images cannot be read: {shown}{more}; fix or remove them")


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


def base_image_folder(dataset: data.Dataset) -> ImageFolder:
    """The ImageFolder under a dataset that may be wrapped in `Subset`s."""
    while isinstance(dataset, data.Subset):
        dataset = dataset.dataset
    return dataset


def example_path(dataset: data.Dataset, position: int) -> Tuple[str, int]:
    """File path and label of the `position`-th example of `dataset` (a folder or a Subset of one)."""
    while isinstance(dataset, data.Subset):
        position = dataset.indices[position]
        dataset = dataset.dataset
    return dataset.samples[position]


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


def weights_cache_path(weights_name: str) -> Path:
    """Where torch.hub keeps the file of a torchvision weights entry once downloaded."""
    url = ResNet50_Weights[weights_name].url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def pretrained_weights_cached(weights_name: str = DEFAULT_WEIGHTS) -> bool:
    return weights_cache_path(weights_name).is_file()


def _read_checkpoint(path: Path) -> Dict[str, Any]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # pylint: disable=import-outside-toplevel

        return load_file(str(path))
    try:
        with torch.serialization.safe_globals(list(CHECKPOINT_SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several unrelated types for a file that is not a checkpoint
        unsupported = UNSUPPORTED_GLOBAL.search(str(error))
        if unsupported:
            raise UserError(
                f"checkpoint {path} could not be read as a PyTorch state dict (Unsupported global: {unsupported[1]}, "
                "which torch loads only by running code from the file); save the model's state_dict() alone"
            ) from None
        raise UserError(f"checkpoint {path} could not be read as a PyTorch state dict ({type(error).__name__})") from None


def check_checkpoint_path(path: Path) -> None:
    if not Path(path).is_file():
        raise UserError(f"checkpoint {path} does not exist")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def samples_fingerprint(dataset: data.Dataset) -> str:
    """sha256 of the dataset's (`<class>/<file path below the class folder>`, label, file size in bytes)
    list, in order: changes when images are added, removed, renamed, relabelled or replaced by other content
    (which for compressed images all but always has another size), not when the folder moves, nor between
    layouts: a flat val file `F` of class `C` counts as `C/F`, its path had it been sorted into class
    folders. One `stat` per file: seconds for ImageNet's 1.28M files on a local disk."""
    digest = hashlib.sha256()
    folder = base_image_folder(dataset)
    prefix = len(os.path.join(folder.root, ""))  # string slicing: ImageNet has 1.28M files
    class_prefixes = [f"{name}/" for name in folder.classes]
    for position in range(len(dataset)):
        path, label = example_path(dataset, position)
        try:
            size = os.path.getsize(path)
        except OSError as error:
            raise UserError(f"cannot read {path} ({error.strerror}); did the dataset change during the run?") from None
        relative = path[prefix:]
        key = relative if relative.startswith(class_prefixes[label]) else class_prefixes[label] + relative
        digest.update(f"{key}\t{label}\t{size}\n".encode())
    return digest.hexdigest()


PREDICTION_BATCH_SIZE = 32


@torch.no_grad()
def top_classes(
    model: nn.Module, dataset: data.Dataset, positions: Optional[Sequence[int]] = None, num_classes: Optional[int] = None,
    device: Optional[str] = None,
) -> List[Tuple[int, float]]:
    """The model's top class (among its first `num_classes` outputs: a 1,000-way model on a smaller
    folder) and its probability for each example at `positions` (default: all), in order: batches from a
    DataLoader, on `device` (default: the GPU when torch sees one). The model is
    left on that device, in eval mode."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    chosen = dataset if positions is None else data.Subset(dataset, list(positions))
    model = model.to(device).eval()
    loader = data.DataLoader(chosen, batch_size=PREDICTION_BATCH_SIZE, pin_memory=device == "cuda")
    found: List[Tuple[int, float]] = []
    for images, *_ in tqdm(loader, desc="predictions", unit="batch", disable=len(loader) <= 1):
        logits = model(images.to(device, non_blocking=True))
        confidence, classes = logits[:, :num_classes].softmax(dim=-1).max(dim=-1)
        found += list(zip(classes.tolist(), confidence.tolist()))
    return found


def transform_description(dataset: data.Dataset) -> str:
    """The dataset's transform as text (its repr names every step and parameter), recorded with results
    so that scores computed with another preprocessing are never reused."""
    return repr(base_image_folder(dataset).transform)


def check_pretrained_classes(dataset: data.Dataset, weights_name: str) -> None:
    """torchvision's ImageNet weights index their outputs by all 1,000 sorted wnids; ImageFolder numbers
    only the class folders present, so a subset of classes would be scored against the wrong outputs.
    Checked from the weights' metadata, before anything is downloaded."""
    num_outputs_ = len(ResNet50_Weights[weights_name].meta["categories"])
    num_classes = len(base_image_folder(dataset).classes)
    if num_classes != num_outputs_:
        raise UserError(
            f"torchvision's ImageNet weights need all {num_outputs_} class folders (found {num_classes} in "
            f"{base_image_folder(dataset).root}); for a subset of classes pass --checkpoint with a model trained on it"
        )


def load_checkpoint_state_dict(path: str | Path) -> Dict[str, torch.Tensor]:
    """A ResNet-50 state dict from a file: plain, or wrapped under `state_dict`/`model` (torchvision's
    reference train.py checkpoints, their `args` Namespace included), with or without the `module.` prefix
    that DistributedDataParallel adds."""
    path = Path(path)
    check_checkpoint_path(path)
    state_dict = _read_checkpoint(path)
    for key in CHECKPOINT_WRAPPER_KEYS:
        if isinstance(state_dict, dict) and isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
            break
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise UserError(f"checkpoint {path} does not hold a state dict of tensors")
    return {k[len(DDP_PREFIX) :] if k.startswith(DDP_PREFIX) else k: v for k, v in state_dict.items()}


def model_from_state_dict(state_dict: Dict[str, torch.Tensor], source: str) -> nn.Module:
    """A ResNet-50 with these weights; the number of outputs is read from `fc.weight`."""
    if "fc.weight" not in state_dict or state_dict["fc.weight"].dim() != 2:
        raise UserError(f"{source} is not a ResNet-50 state dict: it has no 2-d `fc.weight`")
    model = resnet50(weights=None, num_classes=state_dict["fc.weight"].shape[0])
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise UserError(
            f"{source} does not fit ResNet-50: {len(missing)} keys missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    for key, tensor in expected.items():
        if state_dict[key].shape != tensor.shape:
            raise UserError(
                f"{source} does not fit ResNet-50: `{key}` has shape {tuple(state_dict[key].shape)}, "
                f"expected {tuple(tensor.shape)}"
            )
    model.load_state_dict(state_dict)
    return model


def build_model(
    weights: Optional[str] = DEFAULT_WEIGHTS, checkpoint: Optional[str | Path] = None, seed: int = 0
) -> nn.Module:
    """The ResNet-50 to analyse, in eval mode.

    `checkpoint`: a local state-dict file (takes precedence; `weights` must then be None).
    `weights`: a `ResNet50_Weights` name, or `none` for random init, drawn from `seed` (so that a rerun
    analyses the same model).
    """
    if checkpoint is not None:
        if weights is not None:
            raise ValueError("pass either weights or checkpoint, not both")
        model = model_from_state_dict(load_checkpoint_state_dict(checkpoint), f"checkpoint {checkpoint}")
    elif weights == NO_WEIGHTS:
        logger.warning(
            "*** --weights none: ResNet-50 is RANDOMLY INITIALISED; influence scores of an untrained model "
            "say nothing about a trained one. ***"
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = resnet50(weights=None)
    else:
        weights = weights or DEFAULT_WEIGHTS
        if weights not in ResNet50_Weights.__members__:
            raise UserError(f"unknown weights {weights!r}; choose from {weight_choices()}")
        try:
            model = resnet50(weights=ResNet50_Weights[weights])
        except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
            raise UserError(
                f"could not download ResNet50_Weights.{weights} ({getattr(error, 'reason', error)}) and it is "
                f"not cached at {weights_cache_path(weights)}; put the file there, or pass --checkpoint PATH "
                "to a local state dict"
            ) from None
    return model.eval()


def num_outputs(model: nn.Module) -> int:
    return model.fc.out_features


def calibrate_batchnorm(model: nn.Module, images: torch.Tensor, batch_size: Optional[int] = None) -> nn.Module:
    """Sets every BatchNorm layer's running statistics to the statistics of `images` (averaged over batches
    of `batch_size`, all at once by default), as training would have set them, and returns the model in
    eval mode. A random-init ResNet-50 needs it: with the initial statistics its activations grow by orders
    of magnitude through the 50 layers in eval mode, and float32 round-off then dominates any comparison
    of scores. A trained one gets exact statistics of its final weights instead of lagging running ones."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # running statistics = the plain average over the batches seen: these
    model.train()
    step = batch_size or len(images)
    with torch.no_grad():
        for start in range(0, len(images), step):
            model(images[start : start + step])
    return model.eval()
