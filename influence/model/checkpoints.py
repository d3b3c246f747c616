"""A model of the chosen architecture (ResNet-50 by default) from a local checkpoint file: a plain state
dict, a safetensors file, or a training script's wrapper (torchvision's reference train.py included), read
without running code from the file; every file that does not fit the architecture is one line saying why. Also the checkpoint's sha256, which
results are recorded against."""

from __future__ import annotations

import argparse
import hashlib
import re
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn

from influence.model import DEFAULT_ARCH
from influence.runtime.cli import UserError

# Keys under which training scripts commonly wrap a state dict.
CHECKPOINT_WRAPPER_KEYS = ("state_dict", "model")
# Objects beside the tensors that training scripts save and that are safe to unpickle: torchvision's
# reference train.py keeps its command line as an argparse.Namespace under "args".
CHECKPOINT_SAFE_GLOBALS = (argparse.Namespace,)
# How torch's weights-only unpickler names an object it refuses to build.
UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")
DDP_PREFIX = "module."
# GoogLeNet's and Inception v3's auxiliary classifiers, which the model is built without (eval never runs them).
AUXILIARY_PREFIXES = ("aux1.", "aux2.", "AuxLogits.")


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

def load_checkpoint_state_dict(path: str | Path) -> Dict[str, torch.Tensor]:
    """A state dict from a file: plain, or wrapped under `state_dict`/`model` (torchvision's
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

def model_from_state_dict(
    state_dict: Dict[str, torch.Tensor], source: str, arch: str = DEFAULT_ARCH, image_size: Optional[int] = None
) -> nn.Module:
    """A model of `arch` with these weights; the number of outputs is read from its classifier's last
    layer (`fc.weight` for a ResNet), the input size of a vision transformer is `image_size`."""
    # Imported here: torchvision, which the run records (records.py hashes checkpoints) do not need.
    from influence.model import architectures  # pylint: disable=import-outside-toplevel

    name = architectures.display_name(arch)
    with torch.device("meta"):  # the layer's name only: no memory, no initialisation
        layer_name, _ = architectures.output_layer(architectures.build(arch, image_size=image_size))
    key = f"{layer_name}.weight"
    if key not in state_dict or state_dict[key].dim() not in (2, 4):
        raise UserError(f"{source} is not a {name} state dict: it has no 2-d `{key}`" + ("" if arch == DEFAULT_ARCH else " (its classifier's last layer)"))
    state_dict = {key: value for key, value in state_dict.items() if not key.startswith(AUXILIARY_PREFIXES)}
    model = architectures.build(arch, num_classes=state_dict[key].shape[0], image_size=image_size)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise UserError(
            f"{source} does not fit {name}: {len(missing)} keys missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})" + ("" if arch == DEFAULT_ARCH else "; another architecture needs --arch")
        )
    for key, tensor in expected.items():
        if state_dict[key].shape != tensor.shape:
            raise UserError(
                f"{source} does not fit {name}: `{key}` has shape {tuple(state_dict[key].shape)}, "
                f"expected {tuple(tensor.shape)}"
                + (" (a vision transformer trained at another size needs --crop_size)" if "pos_embedding" in key else "")
            )
    model.load_state_dict(state_dict)
    return model
