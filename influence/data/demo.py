"""The offline demo behind `analyze.py --demo`: a small ImageNet-layout folder of generated,
class-structured JPEG images (each class a colour and a stripe direction, each image its own jitter,
noise and a distracting blob), and the short report printed after the run: where the results are, the
score shape, the top training images of the first queries, and how often the top influencers share the
query's label compared with chance."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils import data

from influence.model import DEFAULT_ARCH
from influence.results import naming
from influence.data.images import SPLITS, base_image_folder, example_path

DEMO_DIR = Path("data") / "demo"
DEMO_CLASSES = (
    ("class0_red_horizontal", (0.85, 0.25, 0.2), 0.0),
    ("class1_green_diagonal", (0.2, 0.75, 0.3), 45.0),
    ("class2_blue_vertical", (0.2, 0.35, 0.85), 90.0),
    ("class3_yellow_antidiagonal", (0.9, 0.8, 0.2), 135.0),
)
DEMO_TRAIN_PER_CLASS = 5
DEMO_VAL_PER_CLASS = 1
DEMO_IMAGE_SIZE = 256  # already the Resize(256) size, so the demo spends no time resizing
DEMO_SEED = 0
JPEG_QUALITY = 90
SPEC_FILE = "demo_spec.json"
REPORT_QUERIES = 4
REPORT_TOP_K = 5


def _demo_image(rng: np.random.Generator, colour: Sequence[float], angle_deg: float, size: int) -> Image.Image:
    ys, xs = np.mgrid[0:size, 0:size] / size
    angle = np.deg2rad(angle_deg + rng.normal(0.0, 5.0))
    frequency = rng.uniform(5.0, 8.0)
    stripes = np.sin(2 * np.pi * frequency * (xs * np.cos(angle) + ys * np.sin(angle)) + rng.uniform(0, 2 * np.pi))
    base = np.clip(np.asarray(colour) + rng.normal(0.0, 0.07, size=3), 0.0, 1.0)
    image = base[None, None, :] * (0.75 + 0.25 * stripes[..., None])
    # A blob of random colour at a random place: a nuisance that the class does not explain.
    cy, cx, radius = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.08, 0.18)
    blob = (ys - cy) ** 2 + (xs - cx) ** 2 < radius**2
    image[blob] = rng.uniform(0.0, 1.0, size=3)
    image = np.clip(image + rng.normal(0.0, 0.04, size=image.shape), 0.0, 1.0)
    return Image.fromarray((image * 255).astype(np.uint8))


def _spec() -> Dict[str, object]:
    return {
        "classes": [name for name, _, _ in DEMO_CLASSES],
        "train_per_class": DEMO_TRAIN_PER_CLASS,
        "val_per_class": DEMO_VAL_PER_CLASS,
        "image_size": DEMO_IMAGE_SIZE,
        "seed": DEMO_SEED,
    }


def make_demo_dataset(root: str | Path = DEMO_DIR) -> Path:
    """Writes the demo folder at `root` unless a complete one is already there; returns `root`.

    The folder is written under a temporary name and renamed when complete, so an interrupted
    generation is never mistaken for a finished one.
    """
    root = Path(root)
    spec_path = root / SPEC_FILE
    if spec_path.is_file() and json.loads(spec_path.read_text()) == _spec():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    rng = np.random.default_rng(DEMO_SEED)
    counts = {"train": DEMO_TRAIN_PER_CLASS, "val": DEMO_VAL_PER_CLASS}
    for split in SPLITS:
        for name, colour, angle in DEMO_CLASSES:
            class_dir = staging / split / name
            class_dir.mkdir(parents=True)
            for i in range(counts[split]):
                image = _demo_image(rng, colour, angle, DEMO_IMAGE_SIZE)
                image.save(class_dir / f"{name}_{split}_{i:03d}.JPEG", format="JPEG", quality=JPEG_QUALITY)
    (staging / SPEC_FILE).write_text(json.dumps(_spec(), indent=2))
    if root.exists():
        shutil.rmtree(root)
    staging.rename(root)
    return root


def _label_name(dataset: data.Dataset, label: int) -> str:
    return base_image_folder(dataset).classes[label]


def same_label_share(scores: torch.Tensor, query_labels: torch.Tensor, train_labels: torch.Tensor, k: int) -> Dict[str, float]:
    """Share of each query's top-k (most helpful) training examples that carry the query's label, and
    the share expected by chance (the fraction of training examples with that label), both averaged
    over queries."""
    top = torch.topk(scores.float(), k=min(k, scores.shape[1]), dim=1).indices
    same = (train_labels[top] == query_labels[:, None]).float().mean().item()
    chance = (train_labels[None, :] == query_labels[:, None]).float().mean().item()
    return {"top_k": k, "same_label_share": same, "chance": chance}


def labels_of(dataset: data.Dataset) -> torch.Tensor:
    return torch.tensor([example_path(dataset, i)[1] for i in range(len(dataset))])


def report(
    results: Dict[str, Path],
    scores: Dict[str, torch.Tensor],
    train_dataset: data.Dataset,
    query_dataset: data.Dataset,
    profile_table: str,
    arch: str = DEFAULT_ARCH,
) -> str:
    """The demo's closing report, as text. `results`/`scores` are keyed by scores name."""
    lines: List[str] = ["", "=" * 30 + " demo report " + "=" * 30]
    train_labels, query_labels = labels_of(train_dataset), labels_of(query_dataset)
    for name, path in results.items():
        lines.append(f"scores `{name}`: {path}  shape {tuple(scores[name].shape)} (queries x training images)")
    if profile_table:
        lines += ["", "profile (all phases of this process):", profile_table]
    name = next(iter(scores))
    matrix = scores[name].float()
    lines.append("")
    lines.append(f"top-{REPORT_TOP_K} most helpful training images by `{name}` scores:")
    for q in range(min(REPORT_QUERIES, matrix.shape[0])):
        query_file, query_label = example_path(query_dataset, q)
        lines.append(f"  query {q}: {Path(query_file).name} [{_label_name(query_dataset, query_label)}]")
        values, indices = torch.topk(matrix[q], k=min(REPORT_TOP_K, matrix.shape[1]))
        for rank, (value, index) in enumerate(zip(values.tolist(), indices.tolist()), start=1):
            train_file, train_label = example_path(train_dataset, index)
            lines.append(
                f"    {rank}. {Path(train_file).name} [{_label_name(train_dataset, train_label)}] score {value:.4g}"
            )
    lines.append("")
    for name, matrix in scores.items():
        share = same_label_share(matrix, query_labels, train_labels, REPORT_TOP_K)
        lines.append(
            f"`{name}`: share of top-{REPORT_TOP_K} influencers with the query's label "
            f"{share['same_label_share']:.2f} (chance {share['chance']:.2f})"
        )
    name, path = next(iter(results.items()))
    table, summary = naming.top_influences_tables(path.parent, self_influence=False)
    figure = naming.top_influences_figure_path(naming.DEFAULT_FIGURE_DIR, path.parent.parent.name, name, 0)
    flags = _arch_flag(arch)
    lines += [
        "",
        "every query's most helpful and most harmful training images, as files and pictures:",
        f"  python top_influences.py --demo{flags}",
        f"    -> {table}, {summary}, {figure} (one figure per query)",
        "training images ranked by self-influence (atypical or mislabelled ones first):",
        f"  python analyze.py --demo{flags} --self_influence && python top_influences.py --demo{flags} --self",
        "browse every query's answers in a web browser (offline, no server; run the line above first for its",
        "self-influence page):",
        f"  python top_influences.py --demo{flags} --html",
        f"    -> open {naming.explorer_index(path.parent)}",
    ]
    return "\n".join(lines)


def _arch_flag(arch: str) -> str:
    """What the printed commands add for an architecture other than the default."""
    return "" if arch == DEFAULT_ARCH else f" --arch {arch}"


def self_influence_report(name: str, path: Path, profile_table: str, arch: str = DEFAULT_ARCH) -> str:
    """What `analyze.py --demo --self_influence` prints: where the scores are and what reads them."""
    table, summary = naming.top_influences_tables(path.parent, self_influence=True)
    figure = naming.top_influences_figure_path(naming.DEFAULT_FIGURE_DIR, path.parent.parent.name, name)
    return "\n".join([
        "", "=" * 24 + " demo self-influence report " + "=" * 24,
        f"self-influence scores `{name}`: {path} (one per training image)",
        "", "profile (all phases of this process):", profile_table, "",
        f"training images ranked by self-influence: python top_influences.py --demo{_arch_flag(arch)} --self",
        f"    -> {table}, {summary}, {figure}",
    ])
