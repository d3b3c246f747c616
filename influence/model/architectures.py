"""Which torchvision classifier is analysed (`--arch`): every ImageNet classification model torchvision
registers, by its registered name (resnet50, the default, convnext_tiny, vit_b_16, ...), built with
`torchvision.models.get_model`, with its own weights enum (`get_model_weights`) and the evaluation preset
those weights publish. Every name a user can get wrong (an unknown architecture, weights of another one, a
crop a vision transformer cannot cut into patches) is one line listing what fits."""

from __future__ import annotations

from enum import Enum
from typing import Any, Dict, List, Optional, Tuple, Type

import torchvision
from torch import nn

from influence.model import DEFAULT_ARCH
from influence.runtime.cli import UserError

NO_WEIGHTS = "none"
# How messages name an architecture: the default's as it always was, any other by its registered name.
DISPLAY_NAMES = {DEFAULT_ARCH: "ResNet-50"}


def display_name(arch: str) -> str:
    return DISPLAY_NAMES.get(arch, arch)


def arch_choices() -> List[str]:
    """The registered names of torchvision's image classification models (not detection, segmentation,
    video or quantized ones, which live in sub-packages)."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def arch_problem(arch: str) -> Optional[str]:
    """What is wrong with --arch (None if nothing): a name torchvision does not register, with the choices."""
    if arch in arch_choices():
        return None
    return f"unknown --arch {arch!r}; torchvision's classification models are {', '.join(arch_choices())}"


def check_arch(arch: str) -> None:
    problem = arch_problem(arch)
    if problem:
        raise UserError(problem)


def weights_enum(arch: str) -> Type[Enum]:
    """The architecture's torchvision weights enum (ResNet50_Weights, ConvNeXt_Tiny_Weights, ...)."""
    check_arch(arch)
    return torchvision.models.get_model_weights(arch)


def weight_choices(arch: str = DEFAULT_ARCH) -> List[str]:
    """Names `--weights` accepts with this architecture: its weights enum's members, or `none`."""
    return [weights.name for weights in weights_enum(arch)] + [NO_WEIGHTS]


def first_weights(arch: str) -> Enum:
    """The first weights torchvision published for the architecture (IMAGENET1K_V1 mostly): the default
    of `--weights`, and the preset a checkpoint or a random init of it is evaluated with."""
    return next(iter(weights_enum(arch)))


def check_weights(arch: str, weights: Optional[str]) -> Optional[str]:
    """What is wrong with `--weights` for `--arch` (None if nothing). Accepts a member name (IMAGENET1K_V2)
    or the enum's spelling (ResNet50_Weights.IMAGENET1K_V2); weights of another architecture are named."""
    if weights is None:
        return None
    enum = weights_enum(arch)
    name = resolve_weights_name(arch, weights)
    if name in weight_choices(arch):
        return None
    owner, _, member = weights.rpartition(".")
    other = [candidate for candidate in arch_choices() if owner and weights_enum(candidate).__name__ == owner]
    whose = f" are {other[0]}'s, not {arch}'s" if other and member else ""
    return f"--weights {weights}{whose}: {enum.__name__} has {', '.join(weight_choices(arch))} (choose another with --arch)"


def resolve_weights_name(arch: str, weights: str) -> str:
    """`ResNet50_Weights.IMAGENET1K_V2` -> `IMAGENET1K_V2` when the enum is this architecture's; anything else unchanged."""
    owner, _, member = weights.rpartition(".")
    return member if owner == weights_enum(arch).__name__ else weights


def weights_entry(arch: str, weights: str) -> Enum:
    problem = check_weights(arch, weights)
    if problem or weights == NO_WEIGHTS:
        raise UserError(problem or "--weights none has no torchvision weights entry")
    return weights_enum(arch)[resolve_weights_name(arch, weights)]


def preset_sizes(entry: Enum) -> Tuple[int, int, str]:
    """(resize, crop, interpolation) of the evaluation preset published with the weights, read from
    `weights.transforms()` without any download."""
    preset = entry.transforms()
    return preset.resize_size[0], preset.crop_size[0], preset.interpolation.value


# Architectures whose parameters or attention windows are laid out for the input size: built for the crop.
SIZED_BY_CROP = ("vit_", "swin", "maxvit")


def _size_arguments(arch: str, image_size: Optional[int]) -> Dict[str, Any]:
    """Constructor arguments that fix the input size where the architecture needs one: a vision
    transformer's position embeddings (`image_size`), MaxViT's attention grid (`input_size`)."""
    if image_size is None:
        return {}
    if arch.startswith("vit_"):
        return {"image_size": image_size}
    if arch.startswith("maxvit"):
        return {"input_size": (image_size, image_size)}
    return {}


def _without_auxiliary_heads(model: nn.Module) -> nn.Module:
    """GoogLeNet and Inception v3 carry auxiliary classifiers for training that eval mode never runs (so
    they would have no gradients to fit): dropped, as torchvision does when it loads their weights."""
    if getattr(model, "aux_logits", False):
        model.aux_logits = False
        for name in ("aux1", "aux2", "AuxLogits"):
            if hasattr(model, name):
                setattr(model, name, None)
    return model


def build(arch: str, weights: Optional[str] = None, num_classes: Optional[int] = None, image_size: Optional[int] = None) -> nn.Module:
    """The architecture with torchvision's `weights` (a member name) or at random init (None), with
    `num_classes` outputs (random init only; default 1,000) and, for architectures whose parameters depend
    on it, inputs of `image_size` pixels (default: 224, or the weights' own)."""
    check_arch(arch)
    config: Dict[str, Any] = {}
    if weights is not None:
        entry = weights_entry(arch, weights)
        config["weights"] = entry
        config.update(_size_arguments(arch, preset_sizes(entry)[1]))
    else:
        config["weights"] = None
        config.update(_size_arguments(arch, image_size))
        if num_classes is not None:
            config["num_classes"] = num_classes
        if arch in ("googlenet", "inception_v3"):
            config["init_weights"] = True  # torchvision warns when left unset
    try:
        model = torchvision.models.get_model(arch, **config)
    except (AssertionError, ValueError) as error:
        if weights is not None or image_size is None:
            raise
        # A vision transformer's crop must be a multiple of its patch size (torchvision asserts it).
        raise UserError(f"{arch} cannot be built for {image_size}-pixel crops (--crop_size): {str(error).splitlines()[0]}") from None
    return _without_auxiliary_heads(model)


def output_layer(model: nn.Module) -> Tuple[str, nn.Module]:
    """The classifier's last layer (name, module): the last Linear or Conv2d in module order in every
    torchvision classifier (`fc`, `classifier.2`, `heads.head`, SqueezeNet's 1x1 `classifier.1`)."""
    found = [(name, module) for name, module in model.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))]
    if not found:
        raise UserError(f"{type(model).__name__} has no Linear or Conv2d layer to read its outputs from")
    return found[-1]


def num_outputs(model: nn.Module) -> int:
    _, layer = output_layer(model)
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
