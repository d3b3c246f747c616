"""Which images the scores are computed for (the queries): validation images chosen by a rule
(`--query_selection first|per_class|random`), listed in a file (`--query_files`), or any folder of images
(`--query_dir`, labelled by class subfolders or, without them, by the model's own prediction). The
choice is described in one record that analyze.py keeps with the scores, so that the scripts reading
the scores name the same images."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils import data

from influence.data import layouts
from influence.data.images import ImageList, base_image_folder
from influence.data.preprocessing import Preprocessing
from influence.model.inference import top_classes
from influence.runtime.cli import UserError

SELECTIONS = ("first", "per_class", "random")
LABEL_FROM_FOLDER = "folder"
LABEL_PREDICTED = "predicted"


def select_positions(labels: Sequence[int], num_queries: int, selection: str, seed: int) -> List[int]:
    """Positions of `num_queries` validation images: the first ones in folder order, an equal number
    from each class (the first images of every class, then the second ones, ..., so that 1,000 queries
    over 1,000 classes are one per class), or a random draw by `seed`. Returned in folder order."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, not {selection!r}")
    if num_queries > len(labels):
        raise UserError(f"the validation set has {len(labels)} images, fewer than the {num_queries} queries asked for (--num_queries)")
    if selection == "first":
        return list(range(num_queries))
    if selection == "random":
        return sorted(np.random.default_rng(seed).choice(len(labels), size=num_queries, replace=False).tolist())
    by_class: Dict[int, List[int]] = {}
    for position, label in enumerate(labels):
        by_class.setdefault(label, []).append(position)
    chosen: List[int] = []
    round_index = 0
    while len(chosen) < num_queries:
        for label in sorted(by_class):
            members = by_class[label]
            if round_index < len(members) and len(chosen) < num_queries:
                chosen.append(members[round_index])
        round_index += 1
    return sorted(chosen)


def positions_from_file(path: Path, val: data.Dataset) -> List[int]:
    """Positions of the validation images a text file names, one per line: an index into the validation
    set, or a file path (absolute, relative to the val folder, or a bare file name when that is unique).
    Blank lines and comment lines (`#` first, after any spaces) are skipped; a `#` later in a line is part
    of a file name. The order is the file's."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"--query_files: cannot read {path} ({error})") from None
    folder = base_image_folder(val)
    by_path = {os.path.realpath(sample_path): position for position, (sample_path, _) in enumerate(folder.samples)}
    by_name: Dict[str, List[int]] = {}
    for position, (sample_path, _) in enumerate(folder.samples):
        by_name.setdefault(os.path.basename(sample_path), []).append(position)
    positions: List[int] = []
    listed: Set[int] = set()
    for number, raw in enumerate(lines, 1):
        entry = raw.strip()
        if not entry or entry.startswith("#"):
            continue
        if entry.isdigit():
            position = int(entry)
            if position >= len(folder.samples):
                raise UserError(f"{path}:{number}: index {position} is beyond the {len(folder.samples)} validation images")
        else:
            candidates = [os.path.realpath(entry), os.path.realpath(os.path.join(folder.root, entry))]
            found = [by_path[candidate] for candidate in candidates if candidate in by_path]
            if not found and len(by_name.get(entry, [])) == 1:
                found = by_name[entry]
            if not found:
                raise UserError(f"{path}:{number}: {entry} is not a validation image in {folder.root}")
            position = found[0]
        if position in listed:
            raise UserError(f"{path}:{number}: {entry} is listed twice")
        listed.add(position)
        positions.append(position)
    if not positions:
        raise UserError(f"{path} names no validation image")
    return positions


def folder_samples(query_dir: Path, classes: Sequence[str]) -> Tuple[List[Tuple[str, int]], bool]:
    """The images of `query_dir`, sorted by path: with class subfolders (named by wnid, or by class index)
    each takes its folder's label; without any, every label is -1 (to be predicted). Returns the samples
    and whether they are labelled."""
    query_dir = Path(query_dir).resolve()  # the paths and the root they are recorded against must agree
    if not query_dir.is_dir():
        raise UserError(f"--query_dir {query_dir} is not a folder")
    class_to_idx = {name: index for index, name in enumerate(classes)}
    samples: List[Tuple[str, int]] = []
    subfolders = layouts.class_folders(query_dir)
    loose = layouts.flat_images(query_dir)
    if subfolders and loose:
        raise UserError(f"--query_dir {query_dir} mixes images ({loose[0]}) and class folders ({subfolders[0]}): use one or the other")
    if not subfolders:
        samples = [(str(query_dir / name), -1) for name in loose]
    for name in subfolders:
        if name in class_to_idx:
            label = class_to_idx[name]
        elif name.isdigit() and int(name) < len(classes):
            label = int(name)
        else:
            raise UserError(
                f"--query_dir: {query_dir / name} is not a class: name class folders by wnid (e.g. {classes[0]}) or "
                f"class index (0-{len(classes) - 1})"
            )
        walked = []
        for root, folders, files in os.walk(query_dir / name):  # pruned as it goes: sorted only afterwards
            folders[:] = [folder for folder in folders if not layouts.is_hidden(folder)]
            walked.append((root, sorted(file for file in files if layouts.is_image(file))))
        samples += [(os.path.join(root, file), label) for root, files in sorted(walked) for file in files]
    if not samples:
        raise UserError(f"--query_dir {query_dir} holds no images")
    return samples, bool(subfolders)


@torch.no_grad()
def predicted_labels(model: nn.Module, dataset: data.Dataset, num_classes: int, device: Optional[str] = None) -> List[int]:
    """The model's own prediction for each image among the dataset's `num_classes` classes (the model's
    first outputs; a model may have more), the label of an unlabeled query: its margin is then how sure
    the model is of its own answer."""
    return [label for label, _ in top_classes(model, dataset, num_classes=num_classes, device=device)]


def query_dataset(
    args: Any, val: data.Dataset, classes: Sequence[str], model: nn.Module, preprocessing: Preprocessing,
    device: Optional[str] = None,
) -> Tuple[data.Dataset, Dict[str, Any]]:
    """The queries the flags ask for, and the record of them kept with the scores (unlabeled queries are
    predicted on `device`, default: the GPU when there is one)."""
    if args.query_dir is not None:
        root = Path(args.query_dir).resolve()
        samples, labelled = folder_samples(root, classes)
        if args.num_queries is not None:
            if args.num_queries > len(samples):
                raise UserError(f"--query_dir {args.query_dir} holds {len(samples)} images, fewer than --num_queries {args.num_queries}")
            samples = samples[: args.num_queries]  # the first N: only they are predicted
        if not labelled:
            unlabeled = ImageList(root, samples, classes, preprocessing.transform())
            samples = [(path, label) for (path, _), label in zip(samples, predicted_labels(model, unlabeled, len(classes), device))]
        return ImageList(root, samples, classes, preprocessing.transform()), {
            "selection": "query_dir", "root": str(root), "files": [os.path.relpath(path, root) for path, _ in samples],
            "labels": [label for _, label in samples], "label_source": LABEL_FROM_FOLDER if labelled else LABEL_PREDICTED,
        }
    if args.query_files is not None:
        positions = positions_from_file(args.query_files, val)
        selection = "query_files"
    else:
        num_queries = args.num_queries if args.num_queries is not None else len(val)
        positions = select_positions(base_image_folder(val).targets, num_queries, args.query_selection, args.seed)
        selection = args.query_selection
    return data.Subset(val, positions), {"selection": selection, "val_positions": positions, "label_source": LABEL_FROM_FOLDER}


def recorded_queries(record: Optional[Dict[str, Any]], val: Optional[data.Dataset], classes: Sequence[str],
                     preprocessing: Preprocessing, num_queries: int) -> Tuple[data.Dataset, str]:
    """The query images a score file was computed for, from its record (records from before queries were
    recorded mean the first `num_queries` validation images), and where their labels came from."""
    chosen = (record or {}).get("resolved", {}).get("queries")
    if chosen is None or "val_positions" in chosen:
        if val is None:
            raise UserError("the scores' queries are validation images, but no validation set was given")
        positions = chosen["val_positions"] if chosen else list(range(num_queries))
        if positions and max(positions) >= len(val):
            raise UserError(f"the scores' queries include validation image {max(positions)}, beyond the {len(val)} found")
        return data.Subset(val, positions), LABEL_FROM_FOLDER
    root = Path(chosen["root"])
    samples = [(str(root / file), label) for file, label in zip(chosen["files"], chosen["labels"])]
    missing = [path for path, _ in samples if not os.path.isfile(path)]
    if missing:
        raise UserError(f"the scores' query image {missing[0]} is missing ({len(missing)} of {len(samples)} are)")
    return ImageList(root, samples, classes, preprocessing.transform()), chosen["label_source"]


def check_choice_flags(args: Any) -> Optional[str]:
    """What is wrong with how the query flags combine (None if nothing): --query_files or --query_dir,
    not both; neither with --query_selection, --query_files not with --num_queries."""
    if args.query_files is not None and args.query_dir is not None:
        return "--query_files and --query_dir exclude each other"
    if (args.query_files is not None or args.query_dir is not None) and args.query_selection != "first":
        return "--query_selection chooses among validation images; drop it with --query_files or --query_dir"
    if args.query_files is not None and args.num_queries is not None:
        return "--query_files names the queries; drop --num_queries"
    return None


def check_query_paths(args: Any) -> Optional[str]:
    """Whether --query_files is a file and --query_dir a folder (None if so, or not given)."""
    if args.query_files is not None and not args.query_files.is_file():
        return f"--query_files {args.query_files} is not a file"
    if args.query_dir is not None and not args.query_dir.is_dir():
        return f"--query_dir {args.query_dir} is not a folder"
    return None


def add_to_provenance(provenance: Dict[str, Any], query_record: Dict[str, Any]) -> None:
    """Adds the query choice to records.dataset_provenance's result, as every score writer keys it: a
    selection other than upstream's `first` (recorded by its absence: older results stay valid) and
    predicted labels in what the scores depend on (a changed choice is named on rerun), the whole
    record under `queries`."""
    if query_record["selection"] != "first":
        provenance["query"]["query_selection"] = query_record["selection"]
    if query_record["label_source"] == LABEL_PREDICTED:
        provenance["query"]["query_labels"] = LABEL_PREDICTED
    provenance["queries"] = query_record
