"""The gradient index on disk: its folder and score-folder names, the settings a build records, and its
shards (safetensors files of compressed training gradients, each written under a temporary name and
renamed, so a readable shard of the right shape is a finished one), opened and checked before a query
trusts them. Every problem is one line naming the file and the command that rebuilds it."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from influence.analysis.settings import DEFAULT_TF32, SEED_DEFAULTS
from influence.results import naming
from influence.runtime.cli import UserError

COMMAND = "gradient_index.py"  # named in the messages: the command that builds an index

INDEX_PREFIX = "gradient_index_"
# What the index projects onto: the top eigenvectors of analyze.py's fitted EKFAC or KFAC factors (the
# default: measured far closer to the exact scores, docs/gradient_index.md), or Gaussian matrices that
# need no factors (an unbiased estimate, but a noisy one).
EIGEN_BASES = ("ekfac", "kfac")
GAUSSIAN = "gaussian"
BASES = (*EIGEN_BASES, GAUSSIAN)
DEFAULT_BASIS = "ekfac"
INDEX_SCORES_PREFIX = "index_"
SHARD_STEM = "shard_"
SHARD_SUFFIX = ".safetensors"
STAGING_GLOB = f".{SHARD_STEM}*.tmp"
GRADIENTS_KEY = "gradients"  # in each shard: (images in the shard, compressed dimension)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DEFAULT_DTYPE = "float16"
SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}  # safetensors' names of them
DEFAULT_INDEX_DIM = 32
# Training images per shard: a kill loses at most one shard; 10,000 ResNet-50 images at --index_dim 32
# in float16 are a 1.1 GB file, and ImageNet takes 129 of them.
DEFAULT_SHARD_SIZE = 10_000


def index_name(basis: str, index_dim: int) -> str:
    """`gradient_index_ekfac_dim32`: one index per --basis and --index_dim in an analysis folder."""
    return f"{INDEX_PREFIX}{basis}_dim{index_dim}"


def index_dir(output_dir: str | Path, analysis_name: str, basis: str, index_dim: int) -> Path:
    return naming.analysis_dir(output_dir, analysis_name) / index_name(basis, index_dim)


def shard_path(directory: Path, position: int) -> Path:
    """`shard_00000.safetensors`: the shard holding training images position * shard_size onwards."""
    return Path(directory) / f"{SHARD_STEM}{position:05d}{SHARD_SUFFIX}"


def index_scores_name(basis: str, index_dim: int, strategy: str, normalization: str = naming.NO_NORMALIZATION) -> str:
    """`index_ekfac_dim32`: EKFAC scores from the EKFAC-basis index, beside analyze.py's `ekfac` (never
    mistaken for them); a strategy other than the basis is appended (`index_gaussian_dim32_ekfac`), then
    a normalisation as analyze.py appends it (`index_ekfac_dim32_relative`)."""
    name = f"{INDEX_SCORES_PREFIX}{basis}_dim{index_dim}" + ("" if strategy == basis else f"_{strategy}")
    return name if normalization == naming.NO_NORMALIZATION else f"{name}_{normalization}"


def index_scores_dir(output_dir: str | Path, analysis_name: str, basis: str, index_dim: int, strategy: str, normalization: str = naming.NO_NORMALIZATION) -> Path:
    return naming.scores_dir(output_dir, analysis_name, index_scores_name(basis, index_dim, strategy, normalization))


def shard_ranges(num_train: int, shard_size: int) -> List[Tuple[int, int]]:
    """[start, stop) of each shard's training images, in dataset order."""
    return [(start, min(start + shard_size, num_train)) for start in range(0, num_train, shard_size)]


@dataclasses.dataclass(frozen=True)
class IndexSettings:
    """What `build` is asked to do (recorded in the index's run_config.json)."""

    index_dim: int = DEFAULT_INDEX_DIM
    basis: str = DEFAULT_BASIS
    dtype: str = DEFAULT_DTYPE
    shard_size: int = DEFAULT_SHARD_SIZE
    seed: int = 0
    train_batch_size: int = SEED_DEFAULTS["train_batch_size"]
    num_workers: int = 0
    device: str = "cpu"
    tf32: str = DEFAULT_TF32
    output_dir: str = naming.DEFAULT_OUTPUT_DIR
    analysis_name: str = naming.DEFAULT_ANALYSIS_NAME
    overwrite: bool = False


def shard_complete(path: Path, rows: int, dim: int, dtype: torch.dtype) -> bool:
    """Whether a shard on disk holds `rows` x `dim` of `dtype` (shards are written under a temporary name
    and renamed, so a readable file of the right shape is a finished one)."""
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensor = handle.get_slice(GRADIENTS_KEY)
            return tuple(tensor.get_shape()) == (rows, dim) and SAFETENSORS_DTYPES.get(tensor.get_dtype()) == dtype
    except (SafetensorError, OSError):
        return False


def write_shard(path: Path, gradients: torch.Tensor, start: int, stop: int) -> None:
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({GRADIENTS_KEY: gradients.contiguous()}, str(staging), metadata={"start": str(start), "stop": str(stop)})
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def read_shard(path: Path, rows: int, dim: int) -> torch.Tensor:
    """One finished shard's compressed gradients (rows x dim), checked; one line if it is not one."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            gradients = handle.get_tensor(GRADIENTS_KEY)
    except (SafetensorError, OSError) as error:
        raise UserError(f"{path} is not a readable shard ({error}); rebuild the index with `{COMMAND} build`") from None
    if tuple(gradients.shape) != (rows, dim):
        raise UserError(f"{path} holds {tuple(gradients.shape)}, expected ({rows}, {dim}); rebuild the index with `{COMMAND} build --overwrite`")
    return gradients


def check_range(compressed: torch.Tensor, dtype: torch.dtype, start: int) -> None:
    if dtype != torch.float16:
        return
    largest = compressed.abs().max().item()
    if not largest <= torch.finfo(torch.float16).max:
        raise UserError(
            f"compressed gradients of the training images from {start} on reach {largest:.3g}, beyond float16's "
            f"range; rebuild with --dtype bfloat16 (finished shards are replaced with --overwrite)"
        )


def open_index(directory: Path, expected: Dict[str, Any], basis: str, index_dim: int) -> Tuple[Dict[str, Any], List[Tuple[int, int]]]:
    """The record of a finished index built for exactly `expected`, and its shard ranges; one line if
    there is none, it is stale or unfinished."""
    build_hint = f"`{COMMAND} build` with the same --dataset_dir, model, --basis {basis}, --index_dim {index_dim} and --seed"
    record_path = directory / naming.RUN_CONFIG_FILE
    if not record_path.is_file():
        raise UserError(f"no gradient index at {directory}: build it first with {build_hint}")
    try:
        record = json.loads(record_path.read_text())
    except ValueError:
        raise UserError(f"{record_path} cannot be read; rebuild the index with {build_hint} --overwrite") from None
    saved = record.get("depends_on", {})
    changes = [f"{key} {saved.get(key)!r} -> {value!r}" for key, value in expected.items() if saved.get(key) != value]
    if changes:
        raise UserError(
            f"the gradient index in {directory} was built with other settings ({'; '.join(changes)}); rebuild it "
            f"with {build_hint} --overwrite"
        )
    ranges = shard_ranges(saved["num_train"], saved["shard_size"])
    dim = record["resolved"]["dim"]
    done = [position for position, (start, stop) in enumerate(ranges) if shard_complete(shard_path(directory, position), stop - start, dim, DTYPES[saved["dtype"]])]
    if len(done) != len(ranges):
        raise UserError(
            f"the gradient index in {directory} is unfinished ({len(done)} of {len(ranges)} shards); run the same "
            f"`{COMMAND} build` command again to finish it"
        )
    return record, ranges
