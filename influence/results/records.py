"""What results depend on, and the run record (`run_config.json`) that says it beside them: a results
folder is reused only for exactly the same inputs and settings, refused (or replaced with `--overwrite`)
with the change named otherwise; files a crash cut short are found and removed; JSON is written
atomically; and a failed write is told apart from a bug, for a one-line message."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open
from torch.utils import data

from influence.analysis.settings import AnalysisSettings
from influence.data import images
from influence.model import DEFAULT_ARCH, checkpoints
from influence.results import naming
from influence.runtime.cli import UserError

logger = logging.getLogger("analyze")

# Write errors a user fixes by freeing space (or raising a quota or file-size limit), then resuming.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# Before the model in a recorded model source of any architecture but ResNet-50.
ARCH_PREFIX = "arch:"


def model_source(weights: Optional[str] = None, checkpoint: Optional[Path] = None, arch: str = DEFAULT_ARCH) -> str:
    """What results record as their model: `checkpoint sha256:...` (the file's content, wherever it is)
    or `weights:NAME` (torchvision's, or `none` for a random init), after `arch:NAME ` for any architecture
    but ResNet-50 (whose results keep the record they always had), so a changed --arch is refused on rerun."""
    model = f"checkpoint sha256:{checkpoints.file_sha256(checkpoint)}" if checkpoint is not None else f"weights:{weights}"
    return model if arch == DEFAULT_ARCH else f"{ARCH_PREFIX}{arch} {model}"


def split_model_source(source: str) -> Tuple[str, str]:
    """(architecture, model) of a recorded model source: `arch:vit_b_16 weights:none` -> (`vit_b_16`,
    `weights:none`); a source without an architecture is ResNet-50's."""
    if source.startswith(ARCH_PREFIX):
        arch, _, model = source[len(ARCH_PREFIX):].partition(" ")
        return arch, model
    return DEFAULT_ARCH, source


def check_same_arch(recorded: Optional[str], asked: Optional[str], what: str) -> None:
    """One line when `what` (results, factors) were computed with another architecture than --arch asks for."""
    if recorded is not None and asked is not None and recorded != asked:
        raise UserError(f"{what} were computed for --arch {recorded}, not --arch {asked}: pass --arch {recorded}")


def recorded_arch(record: Optional[Dict[str, Any]]) -> Optional[str]:
    """The architecture a run record's results were computed with (None: no record or no model in it)."""
    source = (record or {}).get("depends_on", {}).get("model")
    return None if source is None else split_model_source(source)[0]


def dataset_provenance(train_dataset: data.Dataset, query_dataset: data.Dataset, model_source: str) -> Dict[str, Any]:
    """What results depend on besides the flags: the model's weights, the preprocessing, and which images
    were used (file lists and sizes, not folder locations, so a moved dataset or a copied checkpoint is
    still recognised)."""
    train = {
        "model": model_source,
        "transform": images.transform_description(train_dataset),
        "num_train": len(train_dataset),
        "train_files_sha256": images.samples_fingerprint(train_dataset),
    }
    query = {"num_queries": len(query_dataset), "query_files_sha256": images.samples_fingerprint(query_dataset)}
    return {"train": train, "query": {**train, **query}}


def precision_record(device: str) -> Dict[str, str]:
    """For `depends_on`: TF32 changes factors and scores (convolutions by 2-4% of the largest score on the
    demo data), so results computed with it are never mixed with float32 ones, nor TF32 matmuls alone with
    TF32 matmuls and convolutions. Nothing on the CPU, which has no TF32 whatever torch's switches say."""
    if device != "cuda":
        return {}
    matmuls = torch.backends.cuda.matmul.fp32_precision == "tf32"
    convolutions = torch.backends.cudnn.conv.fp32_precision == "tf32"
    in_force = [name for name, on in (("matmuls", matmuls), ("convolutions", convolutions)) if on]
    return {"tf32": " and ".join(in_force)} if in_force else {}


def write_json_atomically(path: Path, payload: Dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        staging.write_text(json.dumps(payload, indent=2, sort_keys=True))
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def _differences(saved: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    keys = sorted(set(saved) | set(current))
    return [f"{key} {saved.get(key)!r} -> {current.get(key)!r}" for key in keys if saved.get(key) != current.get(key)]


def claim_results_dir(
    directory: Path, depends_on: Dict[str, Any], settings: AnalysisSettings, what: str, resolved: Dict[str, Any]
) -> Dict[str, Any]:
    """Makes `directory` hold results of exactly `depends_on`; returns its run record.

    A directory recorded with other settings is refused (or emptied with `--overwrite`); a matching one
    is kept, so finished work in it is reused. The record is written before any computation so that an
    interrupted run resumes with the same command.
    """
    record_path = directory / naming.RUN_CONFIG_FILE
    if record_path.is_file():
        try:
            record = json.loads(record_path.read_text())
        except ValueError:
            if not settings.overwrite:
                raise UserError(f"{record_path} cannot be read; pass --overwrite to recompute the {what} in {directory}") from None
            record = {}
        changes = _differences(record.get("depends_on", {}), depends_on)
        if not changes:
            discard_torn_files(directory)
            return record
        if not settings.overwrite:
            raise UserError(
                f"{what} in {directory} were computed with other settings ({'; '.join(changes)}); pass "
                "--overwrite to replace them, or choose another --analysis_name/--output_dir"
            )
        logger.warning("--overwrite: removing %s in %s (%s)", what, directory, "; ".join(changes))
        shutil.rmtree(directory)
    elif directory.exists() and any(directory.iterdir()):
        if not settings.overwrite:
            raise UserError(
                f"{directory} holds {what} that this suite did not record; pass --overwrite to replace them"
            )
        shutil.rmtree(directory)
    record = {
        "id": uuid.uuid4().hex,
        "depends_on": depends_on,
        "settings": dataclasses.asdict(settings),
        "resolved": resolved,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }
    write_json_atomically(record_path, record)
    return record


def discard_torn_files(directory: Path) -> List[Path]:
    """Deletes result files that a crash cut short (kronfluence writes them in place), so that they are
    recomputed instead of being taken as finished; returns what was deleted."""
    torn = []
    for path in sorted(directory.glob("*.safetensors")) + sorted(directory.glob("*.json")):
        try:
            if path.suffix == ".json":
                json.loads(path.read_text())
            else:
                with safe_open(str(path), framework="pt"):
                    pass
        except (ValueError, OSError, SafetensorError):
            torn.append(path)
    for path in torn:
        logger.warning("%s is incomplete (an interrupted run?); it will be recomputed", path)
        path.unlink()
    return torn


def write_failure(error: Exception) -> Optional[str]:
    """The reason, when `error` is a failed write a user can fix (full disk, quota, file-size limit,
    permissions, read-only disk); None for anything else. safetensors reports OS errors as text."""
    codes = (*DISK_FULL_ERRNOS, errno.EACCES, errno.EPERM, errno.EROFS)
    if isinstance(error, OSError):
        return os.strerror(error.errno) if error.errno in codes else None
    for code in codes:
        if f"(os error {code})" in str(error):
            return os.strerror(code)
    return None
