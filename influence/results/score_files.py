"""Readers of finished score files and their records, shared by top_influences.py,
query_batching_analysis.py, validation and benchmarks: a pairwise score file opened and checked without
reading its scores (shape, dtype, the query-gradient rank and score normalisation it was made with), its
rows streamed a block at a time, a self-influence vector, and the run_config.json beside a score file
(which queries, which preprocessing). Every problem a user can fix is one `UserError` line."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

import numpy as np
import torch
from kronfluence.utils.constants import SCORE_SAVE_PREFIX
from safetensors import SafetensorError, safe_open

from influence.results import naming
from influence.runtime.cli import UserError

if TYPE_CHECKING:
    from influence.data.preprocessing import Preprocessing

logger = logging.getLogger("score_files")

# kronfluence saves ScoreArguments.to_str_dict() as the file's metadata; a full-rank run stores "None".
RANK_METADATA_KEY = "query_gradient_low_rank"
FLOAT_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


@dataclass(frozen=True)
class ScoreFile:
    """One pairwise score file, checked: it exists, holds a 2-D floating `all_modules` tensor."""

    path: Path
    num_queries: int
    num_train: int
    dtype: str
    rank: Optional[int]
    normalization: str  # naming.NORMALIZATIONS: "none" for kronfluence's raw scores

    @property
    def label(self) -> str:
        """`full rank`, `rank 32`, `full rank, relative`."""
        label = rank_label(self.rank)
        return label if self.normalization == naming.NO_NORMALIZATION else f"{label}, {self.normalization}"


def rank_label(rank: Optional[int]) -> str:
    return "full rank" if rank is None else f"rank {rank}"


def resolve_scores_path(given: Path) -> Path:
    """A score folder (`.../scores_NAME`) stands for the pairwise score file inside it."""
    return given / naming.PAIRWISE_SCORES_FILE if given.is_dir() else given


def file_rank(path: Path, metadata: Dict[str, str]) -> Optional[int]:
    """The query-gradient rank from the saved ScoreArguments, else from the `scores_NAME` folder name."""
    saved = metadata.get(RANK_METADATA_KEY)
    if saved is not None and saved != "None":
        if not saved.isdigit():
            raise UserError(f"{path}: metadata {RANK_METADATA_KEY}={saved!r} is not a rank")
        return int(saved)
    if saved == "None":
        return None
    name = path.parent.name
    name = name[len(SCORE_SAVE_PREFIX):] if name.startswith(SCORE_SAVE_PREFIX) else name
    return naming.rank_from_scores_name(name)


def file_normalization(path: Path, metadata: Dict[str, str]) -> str:
    """How the scores were rescaled (`analyze.py --score_normalization`), from the file's metadata:
    kronfluence's raw files carry no such key, which means "none"."""
    saved = metadata.get(naming.NORMALIZATION_METADATA_KEY, naming.NO_NORMALIZATION)
    if saved not in naming.NORMALIZATIONS:
        raise UserError(
            f"{path}: metadata {naming.NORMALIZATION_METADATA_KEY}={saved!r} is not one of {', '.join(naming.NORMALIZATIONS)}"
        )
    return saved


def query_choice(path: Path) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
    """The fingerprint of a score file's query images and analyze.py's record of how they were chosen,
    from its run_config.json (None where there is no readable record). queries.recorded_queries turns the
    latter back into a dataset."""
    try:
        record = load_record(path, warn=False)
    except UserError:
        return None, None
    if record is None:
        return None, None
    return record.get("depends_on", {}).get("query_files_sha256"), record.get("resolved", {}).get("queries")


def open_score_file(path: Path, flag: str) -> ScoreFile:
    """Checks one score file without reading its scores; every problem is one `UserError` line."""
    if not path.is_file():
        raise UserError(f"{flag}: score file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            metadata = handle.metadata() or {}
            if naming.SCORES_KEY not in keys:
                raise UserError(
                    f"{path} has no '{naming.SCORES_KEY}' scores (keys: {', '.join(keys) or 'none'}); "
                    "analyze.py writes them unless per-module scores were asked for"
                )
            scores = handle.get_slice(naming.SCORES_KEY)
            shape = tuple(scores.get_shape())
            dtype = scores.get_dtype()
    except SafetensorError as error:
        raise UserError(f"{path} is not a readable safetensors file ({error})") from None
    if len(shape) != 2:
        raise UserError(f"{path}: '{naming.SCORES_KEY}' has shape {shape}, expected (queries, training examples)")
    if dtype not in FLOAT_DTYPES:
        raise UserError(f"{path}: '{naming.SCORES_KEY}' holds {dtype}, expected floating-point scores")
    return ScoreFile(
        path=path, num_queries=shape[0], num_train=shape[1], dtype=FLOAT_DTYPES[dtype], rank=file_rank(path, metadata),
        normalization=file_normalization(path, metadata),
    )


def read_rows(score_file: ScoreFile, start: int, stop: int) -> np.ndarray:
    """Rows `start:stop` as float32 (float64 for float64 files), checked for NaN and infinity.

    float32 holds bfloat16 and float16 scores exactly. The file is opened afresh for every block:
    safetensors memory-maps it, and a mapping kept open would count every page read so far as resident
    memory, growing to the size of the file.
    """
    dtype = torch.float64 if score_file.dtype == "float64" else torch.float32
    with safe_open(str(score_file.path), framework="pt") as handle:
        rows = handle.get_slice(naming.SCORES_KEY)[start:stop].to(dtype, copy=True).numpy()
    bad = ~np.isfinite(rows)
    if bad.any():
        query, train = np.argwhere(bad)[0]
        raise UserError(
            f"{score_file.path} has NaN or infinite scores (first: query {start + query}, "
            f"training example {train}); recompute them (e.g. with a larger --damping_factor)"
        )
    return rows


def read_self_scores(path: Path) -> torch.Tensor:
    """The self-influence vector (num_train,) as float32 (float64 kept), checked; one line per problem."""
    if not path.is_file():
        raise UserError(f"self-influence score file not found: {path} (run analyze.py --self_influence first)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            if naming.SCORES_KEY not in handle.keys():
                raise UserError(f"{path} has no '{naming.SCORES_KEY}' scores (keys: {', '.join(handle.keys()) or 'none'})")
            scores = handle.get_tensor(naming.SCORES_KEY)
    except SafetensorError as error:
        raise UserError(f"{path} is not a readable safetensors file ({error})") from None
    if scores.dim() != 1:
        raise UserError(f"{path}: '{naming.SCORES_KEY}' has shape {tuple(scores.shape)}, expected (training examples,): is it a pairwise file? (drop --self)")
    if not scores.is_floating_point():
        raise UserError(f"{path}: '{naming.SCORES_KEY}' holds {scores.dtype}, expected floating-point scores")
    scores = scores.double() if scores.dtype == torch.float64 else scores.float()
    if not torch.isfinite(scores).all():
        first = int((~torch.isfinite(scores)).nonzero()[0])
        raise UserError(f"{path} has NaN or infinite scores (first: training example {first}); recompute them")
    return scores


def load_record(scores_path: Path, warn: bool = True) -> Optional[Dict[str, Any]]:
    """The run_config.json beside a score file, or None (with a warning unless `warn` is off) where there
    is none; a `UserError` line where it is not JSON."""
    record_path = scores_path.parent / naming.RUN_CONFIG_FILE
    if not record_path.is_file():
        if warn:
            logger.warning("%s is missing: cannot check that the scores were computed on this dataset", record_path)
        return None
    try:
        return json.loads(record_path.read_text())
    except ValueError:
        raise UserError(f"{record_path} is not valid JSON (an interrupted run?)") from None


def recorded_preprocessing(record: Optional[Dict[str, Any]]) -> Preprocessing:
    """The preprocessing analyze.py recorded with the scores (records from before it was recorded, and
    missing records, mean the default 256/224); the images are then read and drawn as the model saw them."""
    # Imported here: it brings torchvision, which query_batching_analysis.py never needs (0.1 GiB).
    from influence.data.preprocessing import Preprocessing  # pylint: disable=import-outside-toplevel,redefined-outer-name

    recorded = (record or {}).get("resolved", {}).get("preprocessing")
    return Preprocessing(**recorded) if recorded else Preprocessing()


def check_writable(path: Path) -> None:
    """Creates the folder of an output file; one line if that or writing there is impossible."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create the folder of {path}: {error.strerror}") from None
    if path.is_dir() or not os.access(path.parent, os.W_OK):
        raise UserError(f"cannot write {path}")
