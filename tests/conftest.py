"""Shared fixtures: tiny ImageNet-layout folders under tmp_path, a saved random-init ResNet-50, and a
small CNN with an indexed tensor dataset for the tests that check the mathematics quickly."""

from __future__ import annotations

import os

# The suite means the same on every machine: its tolerances are float32 ones (TF32 convolutions on a GPU
# break them), its two-process tests use gloo on CPU slots (on a one-GPU machine NCCL and set_device(1)
# would fail), so every GPU is hidden before torch is first imported; subprocesses inherit this. Tests that
# need a GPU's behaviour simulate one with monkeypatched torch.cuda functions.
os.environ["CUDA_VISIBLE_DEVICES"] = ""

from pathlib import Path  # noqa: E402  (after hiding the GPUs, like every import below)
from typing import Dict, Sequence

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils import data

import pipeline

REPO_ROOT = Path(__file__).resolve().parents[1]

TINY_IMAGE_SIZE = 40


def write_image_folder(
    root: Path,
    counts: Dict[str, Dict[str, int]],
    size: int = TINY_IMAGE_SIZE,
    seed: int = 0,
) -> Path:
    """Writes root/<split>/<class>/<n>.JPEG for counts = {split: {class: n}}; each class its own colour."""
    rng = np.random.default_rng(seed)
    for split, classes in counts.items():
        for class_index, (name, count) in enumerate(sorted(classes.items())):
            class_dir = root / split / name
            class_dir.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 60, size=(size, size, 3)) + 40 * class_index
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(class_dir / f"{name}_{i:03d}.JPEG")
    return root


def tiny_counts(classes: Sequence[str] = ("n01", "n02"), train: int = 3, val: int = 2) -> Dict[str, Dict[str, int]]:
    return {"train": {c: train for c in classes}, "val": {c: val for c in classes}}


@pytest.fixture
def tiny_imagenet(tmp_path: Path) -> Path:
    """2 classes, 3 training and 2 validation images each."""
    return write_image_folder(tmp_path / "imagenet", tiny_counts())


@pytest.fixture(scope="session")
def resnet50_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init ResNet-50 state dict saved like a user's checkpoint (fixed seed).

    Its BatchNorm running statistics are set from one batch of noise images (`pipeline.calibrate_batchnorm`).
    """
    from torchvision.models import resnet50

    torch.manual_seed(0)
    model = pipeline.calibrate_batchnorm(resnet50(weights=None), torch.randn(8, 3, 224, 224))
    path = tmp_path_factory.mktemp("checkpoint") / "resnet50_random.pt"
    torch.save(model.state_dict(), path)
    return path


class SmallCNN(nn.Module):
    """Conv2d + Linear layers only, a few thousand parameters."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False)
        self.fc = nn.Linear(6 * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.flatten(1))


class IndexedTensors(data.Dataset):
    """(image, label, index) items, like pipeline.IndexedImageFolder."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.images[index], int(self.labels[index]), index


def small_problem(num_train: int = 12, num_query: int = 4, num_classes: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    model = SmallCNN(num_classes)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    train = IndexedTensors(
        torch.randn(num_train, 3, 8, 8, generator=generator),
        torch.randint(0, num_classes, (num_train,), generator=generator),
    )
    query = IndexedTensors(
        torch.randn(num_query, 3, 8, 8, generator=generator),
        torch.randint(0, num_classes, (num_query,), generator=generator),
    )
    return model.eval(), train, query


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A test that pins torch to one thread leaves the next ones their own thread count."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def pytest_configure(config):
    """Under pytest-xdist (the README's command runs two workers on the 2 cores) each worker and every
    process it starts uses one torch thread: two workers of two threads each would oversubscribe the
    cores, and torch's OpenMP threads spin-wait when they cannot all run (measured: several times slower)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


# The slowest files, longest first (measured on 2 cores, one torch thread a process: about 515, 165, 135,
# 55-75, 60, 55, 50, 45 and 45 seconds); the others follow in their collection order.
LONGEST_FIRST = (
    "test_trained_digits.py", "test_distributed.py", "test_scoring.py", "test_gpu_check.py", "test_gradient_index_torchrun.py",
    "test_architectures.py", "test_gradient_index.py", "test_locking.py", "test_factors.py",
)


def pytest_collection_modifyitems(session, config, items):
    """The slowest files first, and in each file its `slow` tests first (a stable sort otherwise).

    Under pytest-xdist (`--dist loadfile --no-loadscope-reorder` in pytest.ini: files in this order, not
    by their number of tests) the trained-digits file starts at once on one worker while the other works
    through the rest. A worker is handed another file whenever at most two of its tests are left to run
    (at the start too), and that file waits behind them: with the trained-digits run first in its file,
    its five quick tests are still pending during its minutes, so no other file waits behind it."""
    def key(item):
        file_rank = LONGEST_FIRST.index(item.path.name) if item.path.name in LONGEST_FIRST else len(LONGEST_FIRST)
        return file_rank, item.get_closest_marker("slow") is None

    items.sort(key=key)
