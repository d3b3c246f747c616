"""A new question in seconds: `build` makes one pass over the training set and stores every training
image's gradient, compressed per layer to --index_dim x --index_dim (LoGra-style projections of each
layer's inputs and output gradients, projection.py), in resumable safetensors shards; `query` computes only
the queries' measurement gradients, preconditions them exactly with the factors analyze.py fitted (EKFAC,
KFAC, diagonal or identity, through kronfluence itself), projects them the same way and scores them
against every shard, writing the pairwise score file top_influences.py and the explorer read.

The projections are, by default, the top eigenvectors of analyze.py's fitted EKFAC factors (--basis ekfac;
kfac likewise): the basis in which EKFAC preconditions, so the index's EKFAC score is the exact score
restricted to each layer's leading eigen-directions, deterministic, and measured far closer to the exact
scores than Gaussian projections of the same size (--basis gaussian: no factors needed, unbiased, noisy).
Why these and not EKFAC refitted in the projected space: the query side stays kronfluence's own exact
preconditioning, so one index serves every --factor_strategy and damping (docs/gradient_index.md).

    python analyze.py --dataset_dir PATH_TO_IMAGENET --factor_strategy ekfac      # the factors, once
    python gradient_index.py build --dataset_dir PATH_TO_IMAGENET --index_dim 32
    python gradient_index.py query --dataset_dir PATH_TO_IMAGENET --index_dim 32 --query_dir my_photos/
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from kronfluence.arguments import FactorArguments
from kronfluence.utils.constants import (
    ACTIVATION_EIGENVALUES_NAME,
    ACTIVATION_EIGENVECTORS_NAME,
    GRADIENT_EIGENVALUES_NAME,
    GRADIENT_EIGENVECTORS_NAME,
    SCORE_SAVE_PREFIX,
)
from kronfluence.utils.exceptions import FactorsNotFoundError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils import data
from tqdm.auto import tqdm

import demo
import hardware
import layouts
import locking
import naming
import pipeline
import preflight
import projection
import queries
from cli import UserError, damping_factor, non_negative_int, positive_int, setup_logging, user_errors
from records import claim_results_dir, dataset_provenance, model_source, precision_record, write_failure
from scoring import score_arguments
from settings import DEFAULT_TF32, DEMO_DEFAULTS, SEED_DEFAULTS, STRATEGIES, TF32_CHOICES, AnalysisSettings, set_tf32
from normalization import COSINE, normalize
from task import ClassificationTask, make_analyzer

logger = logging.getLogger("gradient_index")

PROG = "gradient_index.py"
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
# The query side holds one batch of full preconditioned gradients (about 100 MB per ResNet-50 query in
# float32) while it projects them; analyze.py holds all of its gathered queries at once.
DEFAULT_QUERY_BATCH_SIZE = {"seed": 16, "demo": 8}
SCORE_BYTES = 4  # the score file is float32
DIM_METADATA_KEY = "gradient_index_dim"


# ----------------------------------------------------------------------------------------------- names


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


# ----------------------------------------------------------------------------------------------- settings


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


def _add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset_dir", type=Path, help="ImageNet folder holding train/<wnid>/* and val/<wnid>/* (any layout analyze.py reads).")
    parser.add_argument("--demo", action="store_true", help="The offline demo's generated images under data/demo/ (made once), as analyze.py --demo.")
    parser.add_argument("--weights", choices=pipeline.weight_choices(), help=f"torchvision ResNet50_Weights to load, or 'none' for random init (default: {pipeline.DEFAULT_WEIGHTS}; demo: that if cached, else none).")
    parser.add_argument("--checkpoint", type=Path, help="Local ResNet-50 state dict instead of --weights (as analyze.py).")
    parser.add_argument("--resize_size", type=positive_int, help=f"With --checkpoint or --weights none: the shorter side resized to this many pixels (default: {pipeline.RESIZE_SIZE}).")
    parser.add_argument("--crop_size", type=positive_int, help=f"With --checkpoint or --weights none: the centre crop the model sees (default: {pipeline.CROP_SIZE}).")
    parser.add_argument("--index_dim", type=positive_int, default=DEFAULT_INDEX_DIM, help=f"Each layer's gradient is compressed to index_dim x index_dim (a side of at most index_dim is kept whole); bytes per image = sum over layers of that x the --dtype size (ResNet-50 at 32 in float16: 110.6 kB) (default: {DEFAULT_INDEX_DIM}).")
    parser.add_argument("--basis", choices=BASES, default=DEFAULT_BASIS, help=f"What each layer is projected onto: the top --index_dim eigenvectors of analyze.py's fitted ekfac or kfac factors (fit them first; the index then holds the exact score's leading eigen-directions), or gaussian random matrices that need no factors (unbiased but much noisier at the same size) (default: {DEFAULT_BASIS}).")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="Seed of the gaussian projections, and of the random init with --weights none; the query must use the index's (default: 0).")
    parser.add_argument("--output_dir", type=Path, default=Path(naming.DEFAULT_OUTPUT_DIR), help=f"Where results go (default: {naming.DEFAULT_OUTPUT_DIR}).")
    parser.add_argument("--analysis_name", help=f"Sub-folder of --output_dir, analyze.py's for this model and data (default: {naming.DEFAULT_ANALYSIS_NAME}; demo: {naming.DEMO_ANALYSIS_NAME}).")
    parser.add_argument("--num_workers", type=non_negative_int, help=f"DataLoader worker processes (default: the CPUs this process may use, at most {hardware.MAX_DEFAULT_WORKERS}; demo 0).")
    parser.add_argument("--device", choices=hardware.DEVICE_CHOICES, default="auto", help="Where to compute: auto = the GPU when torch sees one, else the CPU (default: auto).")
    parser.add_argument("--tf32", choices=TF32_CHOICES, default=DEFAULT_TF32, help=f"Which float32 ops run in TF32 on GPUs that have it, as analyze.py (default: {DEFAULT_TF32}); recorded with the index.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an index or scores on disk that were made with other settings.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{build,query}")
    build = commands.add_parser("build", help="One pass over the training set: the compressed gradient of every training image, in shards.")
    _add_common_arguments(build)
    build.add_argument("--train_batch_size", type=positive_int, help="Training images per batch (default: 256; demo 8).")
    build.add_argument("--dtype", choices=tuple(DTYPES), default=DEFAULT_DTYPE, help="How the compressed gradients are stored: float16 (the default; a value beyond its range stops the build and names bfloat16), bfloat16, or float32 (twice the disk; for exactness checks).")
    build.add_argument("--shard_size", type=positive_int, default=DEFAULT_SHARD_SIZE, help=f"Training images per shard; each is written when finished, so a killed build loses at most one (default: {DEFAULT_SHARD_SIZE:,}).")
    query = commands.add_parser("query", help="Score queries against a finished index, preconditioned with analyze.py's factors.")
    _add_common_arguments(query)
    query.add_argument("--factor_strategy", choices=STRATEGIES, help="Which of analyze.py's factors precondition the queries; they must be fitted already, except identity's (default: the --basis, ekfac with --basis gaussian).")
    query.add_argument("--damping_factor", type=damping_factor, default=argparse.SUPPRESS, help="Damping, as analyze.py's: a number, or 'heuristic' for 0.1 x mean eigenvalue (default: 1e-8; demo: heuristic). Use the value the exact scores used to compare with them.")
    query.add_argument("--score_normalization", choices=naming.NORMALIZATIONS, default=naming.NO_NORMALIZATION, help="As analyze.py's: relative divides each training image's score by the square root of its self-influence, cosine also each query's by its own; both computed from the index itself (restricted to its eigen-directions, no extra pass), so they need an ekfac or kfac --basis queried with the same --factor_strategy (default: none).")
    query.add_argument("--num_queries", type=positive_int, help="Score N validation images chosen by --query_selection (default: 1000; demo: all).")
    query.add_argument("--query_selection", choices=queries.SELECTIONS, default="first", help="Which validation images are the queries: first (default), per_class or random (by --seed), as analyze.py.")
    query.add_argument("--query_files", type=Path, help="A text file naming the query images, one per line (validation image paths or indices), as analyze.py.")
    query.add_argument("--query_dir", type=Path, help="Any folder of images as queries: class subfolders (wnid or class index) give the labels, else the model's prediction, as analyze.py.")
    query.add_argument("--query_batch_size", type=positive_int, help=f"Queries whose full preconditioned gradients are held at once (about 100 MB each for ResNet-50) (default: {DEFAULT_QUERY_BATCH_SIZE['seed']}; demo {DEFAULT_QUERY_BATCH_SIZE['demo']}).")
    query.add_argument("--scores_dir", type=Path, help=f"The score folder to write (default: OUTPUT_DIR/ANALYSIS_NAME/{SCORE_SAVE_PREFIX}{INDEX_SCORES_PREFIX}BASIS_dimINDEX_DIM, with _STRATEGY appended when --factor_strategy is not the basis); one per question keeps earlier answers.")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = pipeline.check_input_flags(args) or pipeline.check_preprocessing_sizes(args.resize_size, args.crop_size)
    if problem:
        parser.error(problem)
    defaults = DEMO_DEFAULTS if args.demo else SEED_DEFAULTS
    if args.analysis_name is None:
        args.analysis_name = defaults["analysis_name"]
    if args.num_workers is None:
        args.num_workers = 0 if args.demo else hardware.default_num_workers()
    if args.command == "build":
        if args.train_batch_size is None:
            args.train_batch_size = defaults["train_batch_size"]
        return args
    if args.factor_strategy is None:
        args.factor_strategy = args.basis if args.basis in EIGEN_BASES else "ekfac"
    if args.score_normalization != naming.NO_NORMALIZATION and (args.basis not in EIGEN_BASES or args.factor_strategy != args.basis):
        parser.error(
            f"--score_normalization {args.score_normalization} takes the self-influence from the index, which needs an "
            f"eigenvector basis queried with its own strategy (--basis ekfac --factor_strategy ekfac, or kfac); "
            f"got --basis {args.basis} --factor_strategy {args.factor_strategy}"
        )
    problem = queries.check_choice_flags(args) or queries.check_query_paths(args)
    if problem:
        parser.error(problem)
    if args.num_queries is None and args.query_files is None and args.query_dir is None:
        args.num_queries = defaults["num_queries"]
    if not hasattr(args, "damping_factor"):
        args.damping_factor = defaults["damping_factor"]
    if args.query_batch_size is None:
        args.query_batch_size = DEFAULT_QUERY_BATCH_SIZE["demo" if args.demo else "seed"]
    return args


# ----------------------------------------------------------------------------------------------- inputs


@dataclasses.dataclass
class Inputs:
    """The model and the training (and validation) images, as analyze.py builds them."""

    dataset_dir: Path
    preprocessing: pipeline.Preprocessing
    train: data.Dataset
    val: Optional[data.Dataset]
    model: torch.nn.Module
    source: str


def load_inputs(args: argparse.Namespace, with_val: bool) -> Inputs:
    """analyze.py's model and datasets from the same flags (the demo's folder and weights included)."""
    if args.checkpoint is not None:
        pipeline.check_checkpoint_path(args.checkpoint)
    weights = args.weights
    if args.demo:
        args.dataset_dir = demo.make_demo_dataset()
        if weights is None and args.checkpoint is None and not pipeline.pretrained_weights_cached():
            logger.warning("demo: pretrained ResNet-50 weights are not cached (no download here); using random init")
            weights = pipeline.NO_WEIGHTS
    if weights is None and args.checkpoint is None:
        weights = pipeline.DEFAULT_WEIGHTS
    preprocessing = pipeline.model_preprocessing(weights if args.checkpoint is None else None, args.resize_size, args.crop_size)
    dataset_dir = Path(args.dataset_dir)
    layouts.prepare_archives(dataset_dir)
    train = pipeline.get_imagenet_dataset("train", dataset_dir, preprocessing=preprocessing)
    val = pipeline.get_imagenet_dataset("val", dataset_dir, preprocessing=preprocessing) if with_val else None
    if val is not None:
        pipeline.check_datasets(train, val, 0)
    if args.checkpoint is None and weights != pipeline.NO_WEIGHTS and not args.demo:
        pipeline.check_pretrained_classes(train, weights)
    model = pipeline.build_model(weights=weights, checkpoint=args.checkpoint, seed=args.seed)
    pipeline.check_model_fits_classes(train, model)
    return Inputs(dataset_dir, preprocessing, train, val, model, model_source(weights, args.checkpoint))


def input_record(args: argparse.Namespace, inputs: Inputs) -> Dict[str, Any]:
    """Where things were, for the record; top_influences.py rebuilds the model and the view from it."""
    return {
        "dataset_dir": str(inputs.dataset_dir.resolve()),
        "checkpoint": str(args.checkpoint.resolve()) if args.checkpoint is not None else None,
        "preprocessing": dataclasses.asdict(inputs.preprocessing),
    }


def query_provenance(args: argparse.Namespace, inputs: Inputs, query_dataset: data.Dataset, query_record: Dict[str, Any]) -> Dict[str, Any]:
    """What the scores depend on and record, keyed exactly as analyze.run keys them (top_influences.py
    compares these keys with the dataset it is given)."""
    provenance = dataset_provenance(inputs.train, query_dataset, inputs.source)
    queries.add_to_provenance(provenance, query_record)
    provenance["inputs"] = input_record(args, inputs)
    return provenance


def index_projections(args: argparse.Namespace, plan: Sequence[projection.LayerProjection], train_provenance: Dict[str, Any]) -> Tuple[projection.Projections, Dict[str, Any]]:
    """The index's projections for --basis, and what they depend on: the seed for gaussian ones, the
    fitted factors' record id for an eigenvector basis (refitted factors make a stale index)."""
    if args.basis == GAUSSIAN:
        return projection.Projections.draw(plan, args.seed), {"projection": projection.PROJECTION_SCHEME}
    hint = f"--basis {args.basis} projects onto their eigenvectors: run `analyze.py --factor_strategy {args.basis}` with the same --dataset_dir, model and --output_dir/--analysis_name first, or pass --basis gaussian"
    record, directory = factor_record(args, args.basis, train_provenance, hint)
    if record is None:
        raise UserError(f"no {args.basis} factors in {directory}: {hint}")
    names = (ACTIVATION_EIGENVECTORS_NAME, ACTIVATION_EIGENVALUES_NAME, GRADIENT_EIGENVECTORS_NAME, GRADIENT_EIGENVALUES_NAME)
    paths = [directory / f"{name}.safetensors" for name in names]
    if not all(path.is_file() for path in paths):
        raise UserError(f"the {args.basis} factors in {directory} have no eigendecomposition yet (unfinished): run the same `analyze.py --factor_strategy {args.basis}` command again")
    try:
        handles = [safe_open(str(path), framework="pt") for path in paths]
        projections = projection.Projections.eigen(plan, lambda name: tuple(handle.get_tensor(name) for handle in handles))
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError(f"the {args.basis} factors in {directory} cannot be read as this model's ({error}); refit them with `analyze.py --factor_strategy {args.basis} --overwrite`") from None
    return projections, {"projection": projection.EIGEN_SCHEME, "basis_factors_id": record["id"]}


def index_depends_on(train_provenance: Dict[str, Any], args: argparse.Namespace, projected: Dict[str, Any]) -> Dict[str, Any]:
    """What every index depends on, and what a query checks before it trusts one."""
    return {**train_provenance, "index_dim": args.index_dim, "basis": args.basis, "seed": args.seed, **projected}


def _prepare_device(args: argparse.Namespace) -> str:
    device = hardware.resolve_device(args.device)
    hardware.check_gpu_capability(device)
    set_tf32(args.tf32, device)
    hardware.make_repeatable(device)
    return device


def _check_disk(folder: Path, needed: int, what: str) -> None:
    existing = Path(folder)
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    logger.info("preflight: %s needs %s under %s (%s free)", what, preflight.size_text(needed), folder, preflight.size_text(free))
    if needed > free:
        raise UserError(
            f"not enough disk space under {folder}: {what} needs {preflight.size_text(needed)}, "
            f"{preflight.size_text(free)} is free; free space, choose another --output_dir, or a smaller --index_dim or --dtype"
        )


def _dataloader(dataset: data.Dataset, batch_size: int, num_workers: int, device: str) -> data.DataLoader:
    return data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=device == "cuda")


# ----------------------------------------------------------------------------------------------- shards


def _shard_complete(path: Path, rows: int, dim: int, dtype: torch.dtype) -> bool:
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


def _write_shard(path: Path, gradients: torch.Tensor, start: int, stop: int) -> None:
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
        raise UserError(f"{path} is not a readable shard ({error}); rebuild the index with `{PROG} build`") from None
    if tuple(gradients.shape) != (rows, dim):
        raise UserError(f"{path} holds {tuple(gradients.shape)}, expected ({rows}, {dim}); rebuild the index with `{PROG} build --overwrite`")
    return gradients


def _check_range(compressed: torch.Tensor, dtype: torch.dtype, start: int) -> None:
    if dtype != torch.float16:
        return
    largest = compressed.abs().max().item()
    if not largest <= torch.finfo(torch.float16).max:
        raise UserError(
            f"compressed gradients of the training images from {start} on reach {largest:.3g}, beyond float16's "
            f"range; rebuild with --dtype bfloat16 (finished shards are replaced with --overwrite)"
        )


# ----------------------------------------------------------------------------------------------- build


def run_build(args: argparse.Namespace) -> Path:
    """Builds (or finishes, or reuses) the index; returns its folder."""
    device = _prepare_device(args)
    inputs = load_inputs(args, with_val=False)
    settings = IndexSettings(
        index_dim=args.index_dim, basis=args.basis, dtype=args.dtype, shard_size=args.shard_size, seed=args.seed,
        train_batch_size=args.train_batch_size, num_workers=args.num_workers, device=device, tf32=args.tf32,
        output_dir=str(args.output_dir), analysis_name=args.analysis_name, overwrite=args.overwrite,
    )
    dtype = DTYPES[settings.dtype]
    plan = projection.layer_plan(inputs.model, settings.index_dim)
    dim = sum(layer.size for layer in plan)
    per_image = projection.bytes_per_example(plan, dtype.itemsize)
    num_train = len(inputs.train)
    ranges = shard_ranges(num_train, settings.shard_size)
    provenance = dataset_provenance(inputs.train, data.Subset(inputs.train, []), inputs.source)["train"]
    projections, projected = index_projections(args, plan, provenance)
    depends_on = {
        **index_depends_on(provenance, args, projected),
        "dtype": settings.dtype, "shard_size": settings.shard_size, **precision_record(device),
    }
    resolved = {
        "layers": [dataclasses.asdict(layer) for layer in plan], "dim": dim, "bytes_per_image": per_image,
        "num_shards": len(ranges), **input_record(args, inputs),
    }
    directory = index_dir(settings.output_dir, settings.analysis_name, settings.basis, settings.index_dim)
    logger.info(hardware.describe_device(device, args.device))
    hardware.warn_if_slow_on_cpu(device, num_train, args.demo)
    claim_results_dir(directory, depends_on, settings, "gradient index", resolved)
    for stale in directory.glob(STAGING_GLOB):  # a shard being written when a run was killed
        stale.unlink()
    finished = {position for position, (start, stop) in enumerate(ranges) if _shard_complete(shard_path(directory, position), stop - start, dim, dtype)}
    remaining = sum(stop - start for position, (start, stop) in enumerate(ranges) if position not in finished)
    logger.info(
        "%s: %d training images, %d layers, index_dim %d (%s per image in %s), %d shards%s",
        inputs.source, num_train, len(plan), settings.index_dim, preflight.size_text(per_image), settings.dtype, len(ranges),
        f", reusing {len(finished)} finished" if finished else "",
    )
    if remaining:
        _check_disk(directory, remaining * per_image, "the index")
        model = inputs.model.to(device).eval()
        for parameter in model.parameters():  # only activation gradients are needed: no weight gradients computed
            parameter.requires_grad_(False)
        projections = projections.to(device)
        task = ClassificationTask(settings.seed)
        started = time.perf_counter()
        with projection.CompressedGradientRecorder(model, projections) as recorder, tqdm(
            total=num_train, initial=num_train - remaining, desc="gradient index", unit="img"
        ) as progress:
            for position, (start, stop) in enumerate(ranges):
                if position in finished:
                    continue
                rows = []
                for images, labels, indices in _dataloader(data.Subset(inputs.train, range(start, stop)), settings.train_batch_size, settings.num_workers, device):
                    batch = (images.to(device), labels.to(device), indices.to(device))
                    task.compute_train_loss(batch, model, sample=False).backward()
                    compressed = recorder.take()
                    _check_range(compressed, dtype, start + sum(len(row) for row in rows))
                    rows.append(compressed.to(dtype).cpu())
                    progress.update(len(labels))
                _write_shard(shard_path(directory, position), torch.cat(rows), start, stop)
        elapsed = time.perf_counter() - started
        logger.info(
            "compressed %d training images in %.1f s (%.1f images/s)", remaining, elapsed, remaining / elapsed,
            extra={"timings": {"build_s": elapsed, "built_images": remaining}},  # read by benchmarks/gradient_index_benchmark.py
        )
    logger.info("gradient index `%s`: %s, %d x %d (%s)", index_name(settings.basis, settings.index_dim), directory, num_train, dim, preflight.size_text(num_train * per_image))
    return directory


# ----------------------------------------------------------------------------------------------- query


def open_index(directory: Path, expected: Dict[str, Any], args: argparse.Namespace) -> Tuple[Dict[str, Any], List[Tuple[int, int]]]:
    """The record of a finished index built for exactly `expected`, and its shard ranges; one line if
    there is none, it is stale or unfinished."""
    build_hint = f"`{PROG} build` with the same --dataset_dir, model, --basis {args.basis}, --index_dim {args.index_dim} and --seed"
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
    done = [position for position, (start, stop) in enumerate(ranges) if _shard_complete(shard_path(directory, position), stop - start, dim, DTYPES[saved["dtype"]])]
    if len(done) != len(ranges):
        raise UserError(
            f"the gradient index in {directory} is unfinished ({len(done)} of {len(ranges)} shards); run the same "
            f"`{PROG} build` command again to finish it"
        )
    return record, ranges


def factor_record(args: argparse.Namespace, strategy: str, train_provenance: Dict[str, Any], hint: str) -> Tuple[Optional[Dict[str, Any]], Path]:
    """The run_config.json record of analyze.py's float32 factors of `strategy` (None if there are none)
    and their folder, checked to be of this model, these training images and this seed."""
    directory = naming.factors_dir(args.output_dir, args.analysis_name, naming.factors_name(strategy, False))
    record_path = directory / naming.RUN_CONFIG_FILE
    if not record_path.is_file():
        return None, directory
    try:
        record = json.loads(record_path.read_text())
    except ValueError:
        raise UserError(f"{record_path} cannot be read: {hint}") from None
    saved = record.get("depends_on", {})
    # The seed too, as analyze.py checks it: it draws the true-Fisher labels the factors were fitted with
    # (and, with --weights none, the model itself).
    changed = [key for key, value in {**train_provenance, "seed": args.seed}.items() if saved.get(key) != value]
    if changed:
        raise UserError(f"the factors in {directory} were fitted with another model, other images or another seed ({', '.join(changed)} differ): {hint}")
    return record, directory


def load_factors(analyzer: Any, args: argparse.Namespace, train_provenance: Dict[str, Any]) -> Tuple[Optional[Dict[str, Any]], FactorArguments, Dict[str, Any]]:
    """analyze.py's fitted factors of --factor_strategy (record, kronfluence's arguments, the factors),
    checked to be of this model and these training images; identity needs none."""
    name = naming.factors_name(args.factor_strategy, False)
    hint = f"run `analyze.py --factor_strategy {args.factor_strategy}` with the same --dataset_dir, model and --output_dir/--analysis_name first"
    record, directory = factor_record(args, args.factor_strategy, train_provenance, hint)
    if record is None:
        if args.factor_strategy == "identity":
            return None, FactorArguments(strategy="identity"), {}
        raise UserError(f"no {args.factor_strategy} factors in {directory}: {hint}")
    try:
        factor_args = analyzer.load_factor_args(name)
        factors = analyzer.load_all_factors(name)
    except (FileNotFoundError, FactorsNotFoundError):
        raise UserError(f"the factors in {directory} are unfinished: {hint}") from None
    return record, factor_args, factors


def run_query(args: argparse.Namespace) -> Path:
    """Scores the queries against the index; returns the score file."""
    device = _prepare_device(args)
    inputs = load_inputs(args, with_val=True)
    classes = pipeline.base_image_folder(inputs.train).classes
    query_dataset, query_record = queries.query_dataset(args, inputs.val, classes, inputs.model, inputs.preprocessing)
    provenance = query_provenance(args, inputs, query_dataset, query_record)
    directory = index_dir(args.output_dir, args.analysis_name, args.basis, args.index_dim)
    plan = projection.layer_plan(inputs.model, args.index_dim)
    if not (directory / naming.RUN_CONFIG_FILE).is_file():
        open_index(directory, {}, args)  # says how to build it, before any factors are asked for
    projections, projected = index_projections(args, plan, provenance["train"])
    index_record, ranges = open_index(directory, index_depends_on(provenance["train"], args, projected), args)
    if [dataclasses.asdict(layer) for layer in plan] != index_record["resolved"]["layers"]:
        raise UserError(f"the gradient index in {directory} has other layers than this model; rebuild it with `{PROG} build --overwrite`")
    settings = AnalysisSettings(
        strategy=args.factor_strategy, query_batch_size=args.query_batch_size, damping_factor=args.damping_factor,
        score_normalization=args.score_normalization,
        num_workers=args.num_workers, device=device, tf32=args.tf32, output_dir=str(args.output_dir),
        analysis_name=args.analysis_name, seed=args.seed, overwrite=args.overwrite,
    )
    analyzer = make_analyzer(inputs.model, settings)  # wraps the model's layers for kronfluence, in place
    factors_record, factor_args, factors = load_factors(analyzer, args, provenance["train"])
    normalization = args.score_normalization
    scores_dir = args.scores_dir or index_scores_dir(args.output_dir, args.analysis_name, args.basis, args.index_dim, args.factor_strategy, normalization)
    depends_on = {
        "index_id": index_record["id"], "index_dim": args.index_dim,
        "factors_name": naming.factors_name(args.factor_strategy, False),
        "factors_id": factors_record["id"] if factors_record else None,
        "damping_factor": args.damping_factor, "score_normalization": normalization, **precision_record(device), **provenance["query"],
    }
    resolved = {**provenance["inputs"], "queries": provenance["queries"], "index": str(directory.resolve())}
    num_queries, num_train = len(query_dataset), len(inputs.train)
    logger.info(hardware.describe_device(device, args.device))
    logger.info("%s: %d queries against %s (%d training images), strategy %s", inputs.source, num_queries, directory, num_train, args.factor_strategy)
    claim_results_dir(scores_dir, depends_on, settings, "index scores", resolved)
    path = scores_dir / naming.PAIRWISE_SCORES_FILE
    if path.is_file():
        logger.info("reusing finished scores %s", path)
        return path
    _check_disk(scores_dir, num_queries * num_train * SCORE_BYTES, "the score file")
    projections = projections.to(analyzer.state.device)
    started = time.perf_counter()
    vectors = []
    inverse_curvature: Dict[str, torch.Tensor] = {}
    batches = projection.preconditioned_query_gradients(
        analyzer, query_dataset, args.query_batch_size, factor_args, factors, score_arguments(settings),
        {"num_workers": args.num_workers, "pin_memory": device == "cuda"},
        inverse_curvature if normalization != naming.NO_NORMALIZATION else None,
    )
    for gradients in tqdm(batches, total=-(-num_queries // args.query_batch_size), desc="query gradients", unit="batch"):
        vectors.append(projections.compress([gradients[layer.name].float() for layer in plan]))
    query_vectors = torch.cat(vectors)
    gradients_done = time.perf_counter()
    weights = projections.block_weights(inverse_curvature).to(query_vectors.device) if inverse_curvature else None
    scores = torch.empty(num_queries, num_train, dtype=torch.float32)
    train_self = torch.empty(num_train, dtype=torch.float32)
    for position, (start, stop) in enumerate(tqdm(ranges, desc="scoring shards", unit="shard")):
        shard = read_shard(shard_path(directory, position), stop - start, query_vectors.shape[1]).to(query_vectors.device, torch.float32)
        scores[:, start:stop] = (query_vectors @ shard.t()).cpu()
        if weights is not None:  # each training image's g' H^-1 g over the index's eigen-directions
            train_self[start:stop] = (shard.square() @ weights).cpu()
    metadata = {DIM_METADATA_KEY: str(args.index_dim), "factor_strategy": args.factor_strategy}
    if weights is not None:
        # The query's own g_q' H^-1 g_q there: its stored entries are its preconditioned ones, (lambda + d) times smaller.
        query_self = (query_vectors.square() / weights).sum(dim=1).cpu() if normalization == COSINE else None
        scores = normalize(scores, train_self, query_self)
        metadata[naming.NORMALIZATION_METADATA_KEY] = normalization
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({naming.SCORES_KEY: scores}, str(staging), metadata=metadata)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
    timings = {"query_gradients_s": gradients_done - started, "scoring_s": time.perf_counter() - gradients_done}
    logger.info(
        "query gradients in %.1f s, scored against %d shards in %.1f s", timings["query_gradients_s"], len(ranges),
        timings["scoring_s"], extra={"timings": timings},  # read by benchmarks/gradient_index_benchmark.py
    )
    logger.info("scores `%s`: %s, shape %s", scores_dir.name, path, tuple(scores.shape))
    return path


# ----------------------------------------------------------------------------------------------- main


def main(argv: Optional[Sequence[str]] = None) -> Path:
    args = parse_args(argv)
    setup_logging()
    with user_errors(PROG):
        analysis = naming.analysis_dir(args.output_dir, args.analysis_name)
        try:
            with locking.hold(analysis):
                scores_parent = getattr(args, "scores_dir", None)
                if scores_parent is not None and scores_parent.resolve().parent != analysis.resolve():
                    with locking.hold(scores_parent.parent):  # its own analysis folder, also locked
                        return run_query(args)
                return run_build(args) if args.command == "build" else run_query(args)
        except torch.OutOfMemoryError:
            raise UserError("out of memory; lower --train_batch_size or --query_batch_size; finished shards are kept") from None
        except (OSError, SafetensorError) as error:
            reason = write_failure(error)
            if reason is None:
                raise
            raise UserError(
                f"cannot write under {analysis} ({reason}); free space or fix the folder, then run the same command "
                "again: finished shards are kept, the unfinished one was never renamed into place"
            ) from None


if __name__ == "__main__":
    main()
