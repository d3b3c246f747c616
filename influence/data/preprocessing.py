"""The evaluation preprocessing every image goes through (Resize of the shorter side, CenterCrop, then
ToTensor and Normalize with ImageNet's statistics), its sizes, and the checks of sizes a user gives."""

from __future__ import annotations

import dataclasses
from typing import Optional

from torchvision import transforms
from torchvision.transforms import InterpolationMode


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_SIZE = 256
CROP_SIZE = 224
MIN_IMAGE_SIZE = 32


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

def check_preprocessing_sizes(
    resize_size: Optional[int], crop_size: Optional[int], defaults: Preprocessing = Preprocessing(),
    min_size: int = MIN_IMAGE_SIZE, model: str = "ResNet-50",
) -> Optional[str]:
    """What is wrong with explicit --resize_size/--crop_size (None if nothing): each at least `min_size`
    (ResNet-50 halves an image five times; an architecture's weights name their own minimum), and the crop
    no larger than the resized image (`defaults` where a size is not given: the architecture's preset)."""
    for flag, size in (("--resize_size", resize_size), ("--crop_size", crop_size)):
        if size is not None and size < min_size:
            return f"{flag} {size} is below {min_size} pixels, too small for {model}" + ("'s five halvings" if min_size == MIN_IMAGE_SIZE else "")
    resize = defaults.resize_size if resize_size is None else resize_size
    crop = defaults.crop_size if crop_size is None else crop_size
    if crop > resize:
        given = " (the default)" if resize_size is None else ""
        return f"--crop_size {crop} is larger than --resize_size {resize}{given}: the centre crop must fit in the resized image"
    return None
