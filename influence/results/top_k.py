"""What a score file answers, as lists: each query's most helpful and most harmful training images
(streamed from the score matrix a block of rows at a time), the images named by file and readable class,
checked to be those the scores were computed on, and written as CSV."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils import data
from torchvision.models import ResNet50_Weights
from tqdm import tqdm

from influence.data import layouts
from influence.data.images import example_path
from influence.model.weights import DEFAULT_WEIGHTS
from influence.results import naming
from influence.results.records import dataset_provenance
from influence.results.score_files import ScoreFile, read_rows
from influence.runtime.cli import UserError

HELPFUL, HARMFUL = "helpful", "harmful"
CSV_COLUMNS = ("query_index", "query_path", "query_label", "query_label_source", "kind", "rank", "train_index", "train_path", "label", "score")
SELF_CSV_COLUMNS = ("rank", "train_index", "train_path", "label", "score")


@dataclass(frozen=True)
class Example:
    """One image as the outputs name it."""

    index: int
    path: str
    label: str


def stream_top_k(
    score_file: ScoreFile, queries: Sequence[int], k: int, rows_per_block: int
) -> Dict[int, Dict[str, Tuple[List[float], List[int]]]]:
    """For each query, the k highest (helpful) and k lowest (harmful) scores and their training indices,
    best first. Only blocks of rows holding a chosen query are read, one block at a time."""
    wanted = set(queries)
    k = min(k, score_file.num_train)
    found: Dict[int, Dict[str, Tuple[List[float], List[int]]]] = {}
    with tqdm(total=len(wanted), desc="top-k", unit="query") as progress:
        for start in range(0, score_file.num_queries, rows_per_block):
            stop = min(start + rows_per_block, score_file.num_queries)
            chosen = [q for q in range(start, stop) if q in wanted]
            if not chosen:
                continue
            rows = torch.from_numpy(read_rows(score_file, start, stop))[[q - start for q in chosen]]
            helpful = torch.topk(rows, k, dim=1)
            harmful = torch.topk(rows, k, dim=1, largest=False)
            for position, query in enumerate(chosen):
                found[query] = {
                    HELPFUL: (helpful.values[position].tolist(), helpful.indices[position].tolist()),
                    HARMFUL: (harmful.values[position].tolist(), harmful.indices[position].tolist()),
                }
            progress.update(len(chosen))
    return found


def class_names(classes: Sequence[str], dataset_dir: Optional[Path] = None) -> List[str]:
    """`wnid readable name` from the dataset's devkit or Kaggle synset mapping where it has one, else from
    torchvision's weights' metadata when the folder has its 1,000 ImageNet classes (available without
    downloading the weights), else the folder names."""
    readable = layouts.readable_names(layouts.find_layout(dataset_dir)) if dataset_dir is not None else {}
    if readable:
        return [f"{wnid} {readable[wnid]}" if wnid in readable else wnid for wnid in classes]
    categories = ResNet50_Weights[DEFAULT_WEIGHTS].meta["categories"]
    if len(classes) != len(categories):
        return list(classes)
    return [f"{wnid} {name}" for wnid, name in zip(classes, categories)]


def describe(dataset: data.Dataset, names: Sequence[str], position: int) -> Example:
    path, label = example_path(dataset, position)
    return Example(index=position, path=path, label=names[label])


def check_same_images(
    record: Optional[Dict[str, Any]], train: data.Dataset, queries: data.Dataset, dataset_dir: Path, self_influence: bool
) -> None:
    """The dataset's images and labels are those the scores were computed on, by analyze.py's own
    fingerprint of them (whatever it covers), compared key by key with what the score folder recorded."""
    if record is None:
        return
    provenance = dataset_provenance(train, queries, model_source="")
    current = provenance["train" if self_influence else "query"]
    saved = record.get("depends_on", {})
    changed = [key for key in sorted(current) if key != "model" and key in saved and saved[key] != current[key]]
    if changed:
        raise UserError(
            f"the images in {dataset_dir} are not those the scores were computed on ({', '.join(changed)} differ "
            f"from {naming.RUN_CONFIG_FILE}); pass the --dataset_dir that analyze.py used"
        )


def write_csv(path: Path, columns: Sequence[str], rows: Sequence[Dict[str, Any]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def entry(rank: int, example: Example, score: float) -> Dict[str, Any]:
    return {"rank": rank, "train_index": example.index, "train_path": example.path, "label": example.label, "score": score}
