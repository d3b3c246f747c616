"""Real images with a known truth, offline: scikit-learn's handwritten digits (1,797 real 8x8 scans that
ship inside scikit-learn) written as an ImageNet-layout folder with a recorded set of planted mislabels,
and a torchvision ResNet-50 trained on it from random init on the CPU, seeded, so that a run without some
training images (the removal test) differs from the full run only by those images.

Images are read back through the suite's own dataset class with the preprocessing the analysis uses, so the model is trained on exactly what it is later scored on."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

import pipeline
from influence.model import DEFAULT_ARCH, architectures
from influence.runtime.cli import UserError

NUM_CLASSES = 10
SPLITS = ("train", "val", "test")  # train/ and val/ are what the suite reads; test/ only measures accuracy
RECORD_FILE = "digits.json"
SCAN_MAX = 16  # load_digits() pixel values run 0..16
BATCHNORM_BATCH = 256


@dataclasses.dataclass(frozen=True)
class DigitsLayout:
    """How the scans become a folder: `num_images` scans drawn stratified by `seed` (None: all 1,797),
    `val_per_class` of them per class as validation images (the analysis's queries), `test_fraction` of the
    rest as a test split for the accuracy, the rest for training, `mislabel_fraction` of which are
    written into a wrong class folder. Files are RGB PNGs of `image_size` pixels (bilinear upscaling of
    the 8x8 scan: smooth strokes rather than 4-pixel blocks)."""

    seed: int = 0
    num_images: Optional[int] = None
    val_per_class: int = 8
    test_fraction: float = 0.2
    mislabel_fraction: float = 0.03
    image_size: int = 32


def class_folder(label: int) -> str:
    """`digit_0` .. `digit_9`: ImageFolder's sorted order is the label order."""
    return f"digit_{label}"


def scan_image(pixels: np.ndarray, image_size: int) -> Image.Image:
    gray = np.round(pixels.astype(np.float64) * (255.0 / SCAN_MAX)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").resize((image_size, image_size), Image.BILINEAR).convert("RGB")


def split_scans(labels: np.ndarray, layout: DigitsLayout) -> Dict[str, np.ndarray]:
    """Scan indices per split, each stratified by label and drawn with `layout.seed`."""
    from sklearn.model_selection import train_test_split  # pylint: disable=import-outside-toplevel

    indices = np.arange(len(labels))
    if layout.num_images is not None and layout.num_images < len(labels):
        indices, _ = train_test_split(indices, train_size=layout.num_images, stratify=labels, random_state=layout.seed)
    rest, val = train_test_split(
        indices, test_size=layout.val_per_class * NUM_CLASSES, stratify=labels[indices], random_state=layout.seed
    )
    train, test = train_test_split(rest, test_size=layout.test_fraction, stratify=labels[rest], random_state=layout.seed)
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def write_digits_folder(root: Path, layout: DigitsLayout) -> Dict[str, Any]:
    """Writes `root/{train,val,test}/digit_<k>/scan_<i>.png` and `root/digits.json` (the layout and the
    planted mislabels: path, true and planted label) once; a folder with the same record is reused, one
    with another is refused. Built in a sibling folder and renamed into place, so an interrupted write
    leaves nothing that looks finished. Returns the record."""
    from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel

    wanted = dataclasses.asdict(layout)
    if (root / RECORD_FILE).is_file():
        record = json.loads((root / RECORD_FILE).read_text())
        if record.get("layout") != wanted:
            raise UserError(f"{root} holds digits written with {record.get('layout')}, not {wanted}; remove it or choose another --work_dir")
        return record
    if root.exists() and any(root.iterdir()):
        raise UserError(f"{root} exists and is not a digits folder written by this script; remove it or choose another --work_dir")
    digits = load_digits()
    labels = digits.target.astype(int)
    splits = split_scans(labels, layout)
    rng = np.random.default_rng(layout.seed)
    train = splits["train"]
    flipped = rng.choice(train, size=int(round(layout.mislabel_fraction * len(train))), replace=False)
    planted = {int(i): int((labels[i] + rng.integers(1, NUM_CLASSES)) % NUM_CLASSES) for i in np.sort(flipped)}
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        mislabels = []
        for split, scans in splits.items():
            for label in range(NUM_CLASSES):
                (staging / split / class_folder(label)).mkdir(parents=True)
            for scan in scans.tolist():
                label = planted.get(scan, int(labels[scan])) if split == "train" else int(labels[scan])
                relative = f"{split}/{class_folder(label)}/scan_{scan:04d}.png"
                scan_image(digits.images[scan], layout.image_size).save(staging / relative)
                if split == "train" and scan in planted:
                    mislabels.append({"path": relative, "true_label": int(labels[scan]), "planted_label": label})
        record = {
            "layout": wanted,
            "counts": {split: len(scans) for split, scans in splits.items()},
            "mislabels": mislabels,
        }
        (staging / RECORD_FILE).write_text(json.dumps(record, indent=1))
        if root.exists():
            root.rmdir()  # empty, checked above
        os.replace(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return record


def load_split(root: Path, split: str, preprocessing: pipeline.Preprocessing) -> Tuple[torch.Tensor, torch.Tensor, List[str]]:
    """Every image of `root/split` through the suite's dataset class and `preprocessing`, in the suite's order
    (ImageFolder's, so positions here are the analysis's training indices): images, labels (the folder's,
    planted mislabels included) and paths relative to `root`."""
    dataset = pipeline.IndexedImageFolder(str(root / split), transform=preprocessing.transform())
    if dataset.classes != [class_folder(label) for label in range(NUM_CLASSES)]:
        raise UserError(f"{root / split} has classes {dataset.classes}, not digit_0 .. digit_9")
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    paths = [os.path.relpath(path, root).replace(os.sep, "/") for path, _ in dataset.samples]
    return images, torch.tensor(dataset.targets), paths


def planted_positions(record: Dict[str, Any], train_paths: Sequence[str]) -> List[int]:
    """Training positions (the analysis's indices) of the planted mislabels."""
    position = {path: i for i, path in enumerate(train_paths)}
    return sorted(position[entry["path"]] for entry in record["mislabels"])


@dataclasses.dataclass(frozen=True)
class Training:
    """AdamW with a linear warm-up over `warmup_fraction` of the steps and a cosine decay to 0, stepped per
    batch; the BatchNorm statistics are recomputed over the training images at the end."""

    epochs: int = 4
    batch_size: int = 64
    learning_rate: float = 2e-3
    weight_decay: float = 5e-4
    warmup_fraction: float = 0.1


def epoch_batches(num_train: int, batch_size: int, generator: torch.Generator, excluded: torch.Tensor) -> List[torch.Tensor]:
    """One epoch's batches: a permutation of all `num_train` positions cut into batches, then the excluded
    positions taken out of their batch. The permutation and the cut depend only on the generator, so a
    run without some images sees every other image in the same batch at the same step as the full run.
    Batches left with fewer than 2 images are dropped (BatchNorm needs 2)."""
    order = torch.randperm(num_train, generator=generator)
    kept = ~torch.isin(order, excluded)
    batches = [order[start : start + batch_size][kept[start : start + batch_size]] for start in range(0, num_train, batch_size)]
    return [batch for batch in batches if len(batch) >= 2]


def train_model(
    images: torch.Tensor, labels: torch.Tensor, training: Training, seed: int, excluded: Sequence[int] = (),
    arch: str = DEFAULT_ARCH,
) -> nn.Module:
    """torchvision's `arch` (ResNet-50 by default) with 10 outputs, drawn from `seed` and trained on `images`
    (already preprocessed) without the positions in `excluded`; the same seed gives the same weights, and
    the same batches less the excluded images. Returns the model in eval mode."""
    left_out = torch.tensor(sorted(set(int(i) for i in excluded)), dtype=torch.long)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = architectures.build(arch, num_classes=NUM_CLASSES, image_size=images.shape[-1])
    generator = torch.Generator().manual_seed(seed)
    schedule = [epoch_batches(len(labels), training.batch_size, generator, left_out) for _ in range(training.epochs)]
    total = sum(len(batches) for batches in schedule)
    warmup = max(1, round(training.warmup_fraction * total))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    optimizer = torch.optim.AdamW(model.parameters(), lr=training.learning_rate, weight_decay=training.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    model.train()
    with tqdm(total=total, desc=f"training {architectures.display_name(arch)} ({len(labels) - len(left_out)} images)", unit="step") as progress:
        for epoch, batches in enumerate(schedule, 1):
            for batch in batches:
                loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                progress.update(1)
                progress.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
    used = torch.ones(len(labels), dtype=torch.bool)
    used[left_out] = False
    return pipeline.calibrate_batchnorm(model, images[used], BATCHNORM_BATCH)


@torch.no_grad()
def logits_of(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(images[start : start + BATCHNORM_BATCH]) for start in range(0, len(images), BATCHNORM_BATCH)])


def margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logit of the label minus logsumexp of the other logits: the suite's measurement, sign flipped (a
    positive margin is a confident right answer)."""
    correct = logits.gather(1, labels[:, None]).squeeze(1)
    return correct - logits.scatter(1, labels[:, None], -torch.inf).logsumexp(dim=1)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(dim=1) == labels).double().mean().item()
