"""The gradient index on disk: its folder and score-folder names, the settings a build records, and its
shards (safetensors files of compressed training gradients, each written under a temporary name and
renamed, so a readable shard of the right shape is a finished one), opened and checked before a query
trusts them. Each shard carries the sha256 of its gradients' bytes, computed before they were written;
the index's record lists them once every shard exists, and a query streams each shard in row chunks
against that checksum, so a shard whose bytes changed later is named instead of read as NaN scores.
Every problem is one line naming the file and the command that rebuilds it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from influence.analysis.settings import DEFAULT_TF32, SEED_DEFAULTS
from influence.results import naming
from influence.results.records import write_json_atomically
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
CHECKSUM_KEY = "sha256"  # in each shard's metadata and in the record's `shards`: sha256 of the gradients' bytes
SHARDS_RECORD_KEY = "shards"  # the record's list of finished shards, written once every shard exists
# A query reads a shard this many bytes of float32 rows at a time (never the whole shard, whatever
# --shard_size): the host memory a shard costs while it is scored.
READ_CHUNK_BYTES = 64 * 2**20


def basis_label(basis: str, use_half_precision: bool = False) -> str:
    """`ekfac`, or `ekfac_half` for an index on analyze.py's --use_half_precision factors (their folder's
    name); a Gaussian basis uses no factors."""
    return naming.factors_name(basis, use_half_precision) if basis in EIGEN_BASES else basis


def index_name(basis: str, index_dim: int) -> str:
    """`gradient_index_ekfac_dim32` (`gradient_index_ekfac_half_dim32` on half-precision factors: `basis`
    is the `basis_label`): one index per basis and --index_dim in an analysis folder."""
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


def _update_digest(digest: Any, tensor: torch.Tensor) -> None:
    """Feeds a tensor's bytes (row-major, as safetensors stores them) to a hashlib digest, without a copy."""
    digest.update(tensor.contiguous().view(torch.uint8).numpy().data)


def tensor_checksum(tensor: torch.Tensor) -> str:
    digest = hashlib.sha256()
    _update_digest(digest, tensor.cpu())
    return digest.hexdigest()


def write_shard(path: Path, gradients: torch.Tensor, start: int, stop: int) -> str:
    """Writes a shard atomically, its checksum in its metadata; returns the checksum."""
    checksum = tensor_checksum(gradients)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({GRADIENTS_KEY: gradients.contiguous()}, str(staging), metadata={"start": str(start), "stop": str(stop), CHECKSUM_KEY: checksum})
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
    return checksum


def _rebuild_hint(path: Path) -> str:
    return f"delete it (rm {path}) and run the same `{COMMAND} build` command again to rebuild it"


def shard_checksum(path: Path) -> str:
    """The checksum a finished shard was written with (from its metadata; computed from its bytes for a
    shard written before checksums were recorded)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            recorded = (handle.metadata() or {}).get(CHECKSUM_KEY)
            return recorded if recorded else tensor_checksum(handle.get_tensor(GRADIENTS_KEY))
    except (SafetensorError, OSError) as error:
        raise UserError(f"{path} is not a readable shard ({error}); {_rebuild_hint(path)}") from None


def read_shard_chunks(path: Path, rows: int, dim: int, checksum: Optional[str] = None) -> Iterator[Tuple[int, torch.Tensor]]:
    """A finished shard streamed as (first row, rows x dim chunk) in its stored dtype, never more than
    READ_CHUNK_BYTES of float32 rows at a time, read with plain reads (safetensors' own reader maps the
    whole file, whose pages then count against the process while it is scored); with `checksum`, its bytes
    are checked against it after the last chunk (before the caller's results are used). One line naming
    the shard if it is not one or its bytes changed."""
    step = max(1, READ_CHUNK_BYTES // (4 * max(dim, 1)))
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            header_size = int.from_bytes(handle.read(8), "little")
            entry = json.loads(handle.read(header_size))[GRADIENTS_KEY]
            dtype, shape, (begin, _) = SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"]), entry["data_offsets"]
            if shape != (rows, dim):
                raise UserError(f"{path} holds {shape}, expected ({rows}, {dim}); {_rebuild_hint(path)}")
            row_bytes = dim * dtype.itemsize
            handle.seek(8 + header_size + begin)
            for first in range(0, rows, step):
                buffer = bytearray(min(step, rows - first) * row_bytes)
                if handle.readinto(buffer) != len(buffer):
                    raise OSError("the file ends before its last row")
                if checksum is not None:
                    digest.update(buffer)
                yield first, torch.frombuffer(buffer, dtype=dtype).reshape(-1, dim)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"{path} is not a readable shard ({error}); {_rebuild_hint(path)}") from None
    if checksum is not None and digest.hexdigest() != checksum:
        raise UserError(f"{path} does not match the checksum recorded when it was written (its bytes changed since); {_rebuild_hint(path)}")


def read_shard(path: Path, rows: int, dim: int, checksum: Optional[str] = None) -> torch.Tensor:
    """One finished shard's compressed gradients (rows x dim), checked; one line if it is not one."""
    return torch.cat([chunk for _, chunk in read_shard_chunks(path, rows, dim, checksum)])


def record_shards(directory: Path, record: Dict[str, Any], positions: int) -> Dict[str, Any]:
    """Writes the list of finished shards and their checksums into the index's record (once every shard
    exists: a query trusts an index only with it); returns the record."""
    shards = [{"file": shard_path(directory, position).name, CHECKSUM_KEY: shard_checksum(shard_path(directory, position))} for position in range(positions)]
    if record.get(SHARDS_RECORD_KEY) != shards:  # a finished index's record is left as it is
        record = {**record, SHARDS_RECORD_KEY: shards}
        write_json_atomically(directory / naming.RUN_CONFIG_FILE, record)
    return record


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
    """The record of a finished index built for exactly `expected` (with its shards' checksums), and its
    shard ranges; one line if there is none, it is stale or unfinished."""
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
    if len(done) != len(ranges) or len(record.get(SHARDS_RECORD_KEY, [])) != len(ranges):
        missing = f"{len(done)} of {len(ranges)} shards" if len(done) != len(ranges) else "its shards' checksums are not recorded yet"
        raise UserError(f"the gradient index in {directory} is unfinished ({missing}); run the same `{COMMAND} build` command again to finish it")
    return record, ranges


def recorded_checksums(record: Dict[str, Any]) -> List[str]:
    return [entry[CHECKSUM_KEY] for entry in record[SHARDS_RECORD_KEY]]
