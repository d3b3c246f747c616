"""Running the model outside the influence analysis: its top class for each image (an unlabeled query
folder, the explorer's predictions) and BatchNorm statistics recomputed from images."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils import data
from tqdm.auto import tqdm

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


def predict_classes(model: nn.Module, dataset: data.Dataset, positions: Sequence[int]) -> Dict[int, Tuple[int, float]]:
    """The model's top class and its probability for each example (evaluation transform), on the GPU when
    there is one."""
    return dict(zip(positions, top_classes(model, dataset, positions)))


def predict(model: nn.Module, dataset: data.Dataset, positions: Sequence[int], names: Sequence[str]) -> Dict[int, str]:
    """`class name (probability)` of the model's top class for each example (evaluation transform)."""
    return {position: prediction_text(found, names) for position, found in predict_classes(model, dataset, positions).items()}


def prediction_text(found: Tuple[int, float], names: Sequence[str]) -> str:
    index, value = found
    name = names[index] if index < len(names) else f"output {index}"
    return f"{name} ({value:.2f})"
