"""A new question in seconds: `build` makes one pass over the training set and stores every training
image's gradient, compressed per layer to --index_dim x --index_dim (LoGra-style projections of each
layer's inputs and output gradients, influence/index/), in resumable safetensors shards; `query` computes only
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

Both commands run under torchrun too (`torchrun --nproc-per-node 8 gradient_index.py build ...`, and
across machines with --nnodes): the ranks share the shards to write, the query batches and the shards to
score; rank 0 alone writes the record and the score file.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch
from kronfluence.utils.constants import SCORE_SAVE_PREFIX
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch.utils import data

import pipeline
from influence.analysis.scoring import score_arguments
from influence.analysis.settings import DEFAULT_TF32, DEMO_DEFAULTS, SEED_DEFAULTS, STRATEGIES, TF32_CHOICES, AnalysisSettings, set_tf32
from influence.analysis.task import make_analyzer
from influence.data import demo, layouts, queries
from influence.index import projection
from influence.index.basis import index_depends_on, index_projections, load_factors
from influence.index.compute import check_disk, compress_training_set, score_queries
from influence.index.memory import check_build_memory, check_query_memory
from influence.index.shards import (
    BASES,
    DEFAULT_BASIS,
    DEFAULT_DTYPE,
    DEFAULT_INDEX_DIM,
    DEFAULT_SHARD_SIZE,
    DTYPES,
    EIGEN_BASES,
    INDEX_SCORES_PREFIX,
    STAGING_GLOB,
    IndexSettings,
    basis_label,
    index_dir,
    index_name,
    index_scores_dir,
    open_index,
    record_shards,
    recorded_checksums,
    shard_complete,
    shard_path,
    shard_ranges,
)
from influence.model import tracking
from influence.results import locking, naming, preflight
from influence.results.records import claim_results_dir, dataset_provenance, model_source, precision_record, write_failure
from influence.runtime import distributed, hardware
from influence.runtime.cli import UserError, damping_factor, non_negative_int, positive_int, setup_logging, user_errors

logger = logging.getLogger("gradient_index")

PROG = "gradient_index.py"
# The query side holds one batch of full preconditioned gradients (about 100 MB per ResNet-50 query in
# float32) while it projects them; analyze.py holds all of its gathered queries at once.
DEFAULT_QUERY_BATCH_SIZE = {"seed": 16, "demo": 8}
SCORE_BYTES = 4  # the score file is float32
DIM_METADATA_KEY = "gradient_index_dim"


def _add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset_dir", type=Path, help="ImageNet folder holding train/<wnid>/* and val/<wnid>/* (any layout analyze.py reads).")
    parser.add_argument("--demo", action="store_true", help="The offline demo's generated images under data/demo/ (made once), as analyze.py --demo.")
    parser.add_argument("--arch", default=pipeline.DEFAULT_ARCH, metavar="NAME", help=f"{pipeline.ARCH_HELP} As analyze.py's.")
    parser.add_argument("--weights", metavar="NAME", help=f"{pipeline.WEIGHTS_HELP} (default: the architecture's first, {pipeline.DEFAULT_WEIGHTS} for ResNet-50; demo: that if cached, else none).")
    parser.add_argument("--checkpoint", type=Path, help="Local state dict of --arch instead of --weights (as analyze.py).")
    parser.add_argument("--resize_size", type=positive_int, help=f"With --checkpoint or --weights none: the shorter side resized to this many pixels (default: the architecture's preset, {pipeline.RESIZE_SIZE} for ResNet-50).")
    parser.add_argument("--crop_size", type=positive_int, help=f"With --checkpoint or --weights none: the centre crop the model sees (default: the architecture's preset, {pipeline.CROP_SIZE} for ResNet-50).")
    parser.add_argument("--index_dim", type=positive_int, default=DEFAULT_INDEX_DIM, help=f"Each layer's gradient is compressed to index_dim x index_dim (a side of at most index_dim is kept whole); bytes per image = sum over layers of that x the --dtype size (ResNet-50 at 32 in float16: 110.6 kB) (default: {DEFAULT_INDEX_DIM}).")
    parser.add_argument("--basis", choices=BASES, default=DEFAULT_BASIS, help=f"What each layer is projected onto: the top --index_dim eigenvectors of analyze.py's fitted ekfac or kfac factors (fit them first; the index then holds the exact score's leading eigen-directions), or gaussian random matrices that need no factors (unbiased but much noisier at the same size) (default: {DEFAULT_BASIS}).")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="Seed of the gaussian projections, and of the random init with --weights none; the query must use the index's (default: 0).")
    parser.add_argument("--output_dir", type=Path, default=Path(naming.DEFAULT_OUTPUT_DIR), help=f"Where results go (default: {naming.DEFAULT_OUTPUT_DIR}).")
    parser.add_argument("--analysis_name", help=f"Sub-folder of --output_dir, analyze.py's for this model and data (default: {naming.DEFAULT_ANALYSIS_NAME}; demo: {naming.DEMO_ANALYSIS_NAME}; with another --arch: imagenet_ARCH, demo_ARCH).")
    parser.add_argument("--num_workers", type=non_negative_int, help=f"DataLoader worker processes (default: the CPUs this process may use, at most {hardware.MAX_DEFAULT_WORKERS}; demo 0).")
    parser.add_argument("--device", choices=hardware.DEVICE_CHOICES, default="auto", help="Where to compute: auto = the GPU when torch sees one, else the CPU (default: auto).")
    parser.add_argument("--tf32", choices=TF32_CHOICES, default=DEFAULT_TF32, help=f"Which float32 ops run in TF32 on GPUs that have it, as analyze.py (default: {DEFAULT_TF32}); recorded with the index.")
    parser.add_argument("--use_half_precision", action="store_true", help="Use the factors of `analyze.py --use_half_precision` (factors_STRATEGY_half, bfloat16): their eigenvectors as the --basis (the index is then gradient_index_BASIS_half_dimN) and, for a query, their preconditioning, computed as analyze.py's half-precision run computes it.")
    parser.add_argument("--dist_timeout", type=positive_int, default=distributed.DEFAULT_TIMEOUT_S, help=f"Under torchrun: seconds a rank waits for the others at a collective, or for any progress of theirs while they finish their shards, before it stops with one line (default: {distributed.DEFAULT_TIMEOUT_S}).")
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
    problem = (pipeline.check_input_flags(args) or pipeline.check_model_flags(args)
               or pipeline.check_image_sizes(args.resize_size, args.crop_size, args.arch))
    if problem:
        parser.error(problem)
    defaults = DEMO_DEFAULTS if args.demo else SEED_DEFAULTS
    if args.analysis_name is None:
        args.analysis_name = naming.default_analysis_name(args.demo, args.arch)
    if args.num_workers is None:
        args.num_workers = 0 if args.demo else hardware.default_num_workers(distributed.layout_from_env().local_world_size)
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


@dataclasses.dataclass
class Inputs:
    """The model and the training (and validation) images, as analyze.py builds them."""

    dataset_dir: Path
    preprocessing: pipeline.Preprocessing
    train: data.Dataset
    val: Optional[data.Dataset]
    model: torch.nn.Module
    source: str


def load_inputs(args: argparse.Namespace, with_val: bool, layout: distributed.Layout) -> Inputs:
    """analyze.py's model and datasets from the same flags (the demo's folder and weights included); under
    torchrun, once every rank has checked that it sees the output folder and the inputs rank 0 sees."""
    if args.checkpoint is not None:
        pipeline.check_checkpoint_path(args.checkpoint)
    if args.demo:
        args.dataset_dir = distributed.on_main(layout, demo.make_demo_dataset)
    weights = pipeline.chosen_weights(args.weights, args.checkpoint, args.arch, args.demo)
    preprocessing = pipeline.model_preprocessing(weights if args.checkpoint is None else None, args.resize_size, args.crop_size, args.arch)
    dataset_dir = Path(args.dataset_dir)
    distributed.check_shared(layout, naming.analysis_dir(args.output_dir, args.analysis_name), {"--dataset_dir": dataset_dir, "--checkpoint": args.checkpoint})
    if layout.distributed and layouts.needs_unpacking(dataset_dir):
        raise UserError(f"{dataset_dir} holds ImageNet's archives, not yet unpacked: run {PROG} once without torchrun to unpack them, then this command")
    layouts.prepare_archives(dataset_dir)
    train = pipeline.get_imagenet_dataset("train", dataset_dir, preprocessing=preprocessing)
    distributed.check_same(layout, f"the training images under {dataset_dir}", len(train))
    val = pipeline.get_imagenet_dataset("val", dataset_dir, preprocessing=preprocessing) if with_val else None
    if val is not None:
        pipeline.check_datasets(train, val, 0)
    if args.checkpoint is None and weights != pipeline.NO_WEIGHTS and not args.demo:
        pipeline.check_pretrained_classes(train, weights, args.arch)
    model = pipeline.build_model(weights=weights, checkpoint=args.checkpoint, seed=args.seed, arch=args.arch, image_size=preprocessing.crop_size)
    pipeline.check_model_fits_classes(train, model)
    return Inputs(dataset_dir, preprocessing, train, val, model, model_source(weights, args.checkpoint, args.arch))


def input_record(args: argparse.Namespace, inputs: Inputs) -> Dict[str, Any]:
    """Where things were, for the record; top_influences.py rebuilds the model and the view from it."""
    return {
        "dataset_dir": str(inputs.dataset_dir.resolve()),
        "checkpoint": str(args.checkpoint.resolve()) if args.checkpoint is not None else None,
        "preprocessing": dataclasses.asdict(inputs.preprocessing),
        "arch": args.arch,
        "tracking": tracking.describe_tracking(inputs.model),
    }


def query_provenance(args: argparse.Namespace, inputs: Inputs, query_dataset: data.Dataset, query_record: Dict[str, Any]) -> Dict[str, Any]:
    """What the scores depend on and record, keyed exactly as analyze.run keys them (top_influences.py
    compares these keys with the dataset it is given)."""
    provenance = dataset_provenance(inputs.train, query_dataset, inputs.source)
    queries.add_to_provenance(provenance, query_record)
    provenance["inputs"] = input_record(args, inputs)
    return provenance


def _prepare_device(args: argparse.Namespace, layout: distributed.Layout) -> str:
    """The device, checked, set up and, under torchrun, the process group joined."""
    device = hardware.resolve_device(args.device)
    distributed.check_process_layout(layout, device)
    hardware.check_gpu_capability(device)
    set_tf32(args.tf32, device)
    hardware.make_repeatable(device)
    distributed.init(layout, device, args.dist_timeout)
    return device


def run_build(args: argparse.Namespace, layout: distributed.Layout) -> Path:
    """Builds (or finishes, or reuses) the index; returns its folder. Under torchrun the unfinished shards
    are dealt out to the ranks; rank 0 records every shard's checksum once all exist."""
    device = _prepare_device(args, layout)
    inputs = load_inputs(args, with_val=False, layout=layout)
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
    provenance = distributed.on_main(layout, lambda: dataset_provenance(inputs.train, data.Subset(inputs.train, []), inputs.source)["train"])
    projections, projected = index_projections(args.basis, args.seed, args.output_dir, args.analysis_name, plan, provenance, args.use_half_precision)
    depends_on = {
        **index_depends_on(provenance, args.index_dim, args.basis, args.seed, projected),
        "dtype": settings.dtype, "shard_size": settings.shard_size, **precision_record(device),
    }
    resolved = {
        "layers": [dataclasses.asdict(layer) for layer in plan], "dim": dim, "bytes_per_image": per_image,
        "num_shards": len(ranges), "processes": layout.world_size, **input_record(args, inputs),
    }
    label = basis_label(settings.basis, args.use_half_precision)
    directory = index_dir(settings.output_dir, settings.analysis_name, label, settings.index_dim)
    logger.info(hardware.describe_device(device, args.device))
    if layout.is_main:
        hardware.warn_if_slow_on_cpu(device, num_train, args.demo)

    def claim() -> Any:
        record = claim_results_dir(directory, depends_on, settings, "gradient index", resolved)
        for stale in directory.glob(STAGING_GLOB):  # a shard being written when a run was killed
            stale.unlink()
        finished = [position for position, (start, stop) in enumerate(ranges) if shard_complete(shard_path(directory, position), stop - start, dim, dtype)]
        remaining = sum(stop - start for position, (start, stop) in enumerate(ranges) if position not in finished)
        logger.info(
            "%s: %d training images, %d layers, index_dim %d (%s per image in %s), %d shards%s%s",
            inputs.source, num_train, len(plan), settings.index_dim, preflight.size_text(per_image), settings.dtype, len(ranges),
            f", reusing {len(finished)} finished" if finished else "", f", {layout.world_size} processes" if layout.distributed else "",
        )
        if remaining:
            check_disk(directory, remaining * per_image, "the index")
        return record, finished

    record, finished = distributed.on_main(layout, claim)
    unfinished = [position for position in range(len(ranges)) if position not in finished]
    mine = unfinished[layout.rank :: layout.world_size]
    progress = distributed.Progress(layout, f"{index_name(label, settings.index_dim)}/build")
    if unfinished:
        check_build_memory(min(settings.shard_size, num_train) * per_image, layout)
        elapsed = compress_training_set(
            inputs.model, inputs.train, projections, directory, ranges, mine, dtype, settings.train_batch_size,
            settings.num_workers, device, settings.seed, progress, show_progress=layout.is_main,
        )
        progress.wait_for_all(args.dist_timeout)
        built = sum(stop - start for position, (start, stop) in enumerate(ranges) if position in unfinished)
        elapsed = max(distributed.gather_lists(layout, [elapsed]))
        logger.info(
            "compressed %d training images in %.1f s (%.1f images/s%s)", built, elapsed, built / elapsed,
            f", {layout.world_size} processes" if layout.distributed else "",
            extra={"timings": {"build_s": elapsed, "built_images": built}},  # read by benchmarks/gradient_index_benchmark.py
        )
    distributed.on_main(layout, lambda: record_shards(directory, record, len(ranges)))
    logger.info("gradient index `%s`: %s, %d x %d (%s)", index_name(label, settings.index_dim), directory, num_train, dim, preflight.size_text(num_train * per_image))
    return directory


def run_query(args: argparse.Namespace, layout: distributed.Layout) -> Optional[Path]:
    """Scores the queries against the index; returns the score file (None on ranks other than 0)."""
    device = _prepare_device(args, layout)
    inputs = load_inputs(args, with_val=True, layout=layout)
    classes = pipeline.base_image_folder(inputs.train).classes
    query_dataset, query_record = queries.query_dataset(args, inputs.val, classes, inputs.model, inputs.preprocessing)
    provenance = distributed.on_main(layout, lambda: query_provenance(args, inputs, query_dataset, query_record))
    half = args.use_half_precision
    label = basis_label(args.basis, half)
    directory = index_dir(args.output_dir, args.analysis_name, label, args.index_dim)
    plan = projection.layer_plan(inputs.model, args.index_dim)
    if not (directory / naming.RUN_CONFIG_FILE).is_file():
        open_index(directory, {}, label, args.index_dim)  # says how to build it, before any factors are asked for
    projections, projected = index_projections(args.basis, args.seed, args.output_dir, args.analysis_name, plan, provenance["train"], half)
    index_record, ranges = open_index(directory, index_depends_on(provenance["train"], args.index_dim, args.basis, args.seed, projected), label, args.index_dim)
    if [dataclasses.asdict(layer) for layer in plan] != index_record["resolved"]["layers"]:
        raise UserError(f"the gradient index in {directory} has other layers than this model; rebuild it with `{PROG} build --overwrite`")
    settings = AnalysisSettings(
        strategy=args.factor_strategy, query_batch_size=args.query_batch_size, damping_factor=args.damping_factor,
        score_normalization=args.score_normalization, use_half_precision=half,
        num_workers=args.num_workers, device=device, tf32=args.tf32, output_dir=str(args.output_dir),
        analysis_name=args.analysis_name, seed=args.seed, overwrite=args.overwrite,
    )
    analyzer = make_analyzer(inputs.model, settings)  # wraps the model's layers for kronfluence, in place
    factors_record, factor_args, factors = load_factors(analyzer, args.output_dir, args.analysis_name, args.seed, args.factor_strategy, provenance["train"], half)
    normalization = args.score_normalization
    strategy_label = naming.factors_name(args.factor_strategy, half)
    scores_dir = args.scores_dir or index_scores_dir(args.output_dir, args.analysis_name, label, args.index_dim, strategy_label, normalization)
    depends_on = {
        "index_id": index_record["id"], "index_dim": args.index_dim,
        "factors_name": naming.factors_name(args.factor_strategy, half),
        "factors_id": factors_record["id"] if factors_record else None,
        "damping_factor": args.damping_factor, "score_normalization": normalization, **precision_record(device), **provenance["query"],
    }
    resolved = {**provenance["inputs"], "queries": provenance["queries"], "index": str(directory.resolve()), "processes": layout.world_size}
    num_queries, num_train = len(query_dataset), len(inputs.train)
    path = scores_dir / naming.PAIRWISE_SCORES_FILE

    def claim() -> bool:
        logger.info(hardware.describe_device(device, args.device))
        logger.info("%s: %d queries against %s (%d training images), strategy %s%s", inputs.source, num_queries, directory, num_train,
                    strategy_label, f", {layout.world_size} processes" if layout.distributed else "")
        claim_results_dir(scores_dir, depends_on, settings, "index scores", resolved)
        if path.is_file():
            logger.info("reusing finished scores %s", path)
            return True
        check_disk(scores_dir, num_queries * num_train * SCORE_BYTES, "the score file")
        return False

    if distributed.on_main(layout, claim):
        return path if layout.is_main else None
    check_query_memory(plan, num_queries, ranges, args.query_batch_size, device, layout)
    scores, timings = score_queries(
        analyzer, query_dataset, plan, projections, directory, ranges, recorded_checksums(index_record), args.query_batch_size,
        factor_args, factors, score_arguments(settings), {"num_workers": args.num_workers, "pin_memory": device == "cuda"},
        normalization, layout,
    )
    if not layout.is_main:
        return None
    metadata = {DIM_METADATA_KEY: str(args.index_dim), "factor_strategy": args.factor_strategy}
    if normalization != naming.NO_NORMALIZATION:
        metadata[naming.NORMALIZATION_METADATA_KEY] = normalization
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({naming.SCORES_KEY: scores}, str(staging), metadata=metadata)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
    logger.info(
        "query gradients in %.1f s, scored against %d shards in %.1f s", timings["query_gradients_s"], len(ranges),
        timings["scoring_s"], extra={"timings": timings},  # read by benchmarks/gradient_index_benchmark.py
    )
    logger.info("scores `%s`: %s, shape %s", scores_dir.name, path, tuple(scores.shape))
    return path


def main(argv: Optional[Sequence[str]] = None) -> Optional[Path]:
    args = parse_args(argv)
    layout = distributed.layout_from_env()
    setup_logging()
    if not layout.is_main:
        logging.getLogger().setLevel(logging.WARNING)  # one rank reports; the others only warn
    try:
        with user_errors(PROG):
            analysis = naming.analysis_dir(args.output_dir, args.analysis_name)
            try:
                # Rank 0 holds the analysis folder (and a --scores_dir elsewhere) for the whole run.
                with contextlib.ExitStack() as held:
                    if layout.is_main:
                        held.enter_context(locking.hold(analysis))
                        scores_parent = getattr(args, "scores_dir", None)
                        if scores_parent is not None and scores_parent.resolve().parent != analysis.resolve():
                            held.enter_context(locking.hold(scores_parent.parent))  # its own analysis folder, also locked
                    return run_build(args, layout) if args.command == "build" else run_query(args, layout)
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
    except RuntimeError as error:
        if not distributed.is_collective_failure(layout, error):
            raise
        print(distributed.lost_processes_line(PROG, layout, error), file=sys.stderr)  # torchrun reports every rank's exit
        raise SystemExit(1) from None
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
