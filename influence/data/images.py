"""The image datasets under every split: ImageFolder variants whose items carry their index (a scan of
class folders, or a given list of labelled files), the walk from a `Subset` down to its folder, the
fingerprint of a dataset's files that results are recorded against, and the check that every image
decodes. A file that cannot be read is one line naming it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from torch.utils import data
from torchvision.datasets import ImageFolder, VisionDataset
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader, make_dataset
from tqdm.auto import tqdm

from influence.data import layouts
from influence.runtime.cli import UserError


SPLITS = ("train", "val")


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

def transform_description(dataset: data.Dataset) -> str:
    """The dataset's transform as text (its repr names every step and parameter), recorded with results
    so that scores computed with another preprocessing are never reused."""
    return repr(base_image_folder(dataset).transform)
