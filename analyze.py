"""The driver, the file to open first: the command line, the settings it resolves to, and `run`, which
builds the model and the data (pipeline.py), wraps them in kronfluence (influence/analysis/task.py), fits
the factors (analysis/factors.py) and computes pairwise scores between the query images (validation images
chosen by data/queries.py, or a folder of the user's own) and every training image (analysis/scoring.py;
full rank, or low-rank query gradients with query batching; float32 or bfloat16), or with
`--self_influence` the self-influence score of every training image instead. Finished factors and scores
are reused when the same command is run again; results computed with other settings are never mixed in
silently (results/records.py). `--demo` runs the whole pipeline offline on generated images. One driver
for one process and for torchrun (runtime/distributed.py)."""

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
import torch.distributed as dist
from safetensors import SafetensorError
from torch.utils import data

import pipeline
from influence.analysis.factors import FACTOR_PARTITION_EXAMPLES, fit_factors
from influence.analysis.normalization import compute_normalized_scores
from influence.analysis.scoring import SCORE_PARTITION_EXAMPLES, compute_scores, compute_self_scores, load_scores, scores_shape
from influence.analysis.settings import (
    CHANNELS_LAST_CHOICES,
    DEFAULT_TF32,
    DEMO_DEFAULTS,
    FACTOR_MAX_EXAMPLES,
    FULL_RANK,
    SEED_DEFAULTS,
    STRATEGIES,
    TF32_CHOICES,
    AnalysisSettings,
    rank_argument,
    set_tf32,
)
from influence.analysis.task import make_analyzer
from influence.data import demo, images, layouts, queries
from influence.model import tracking
from influence.results import locking, naming, preflight
from influence.results.records import dataset_provenance, discard_torn_files, model_source, write_failure
from influence.runtime import distributed, hardware
from influence.runtime.cli import HEURISTIC_DAMPING, UserError, damping_factor, non_negative_int, positive_int, setup_logging, user_errors

logger = logging.getLogger("analyze")

DEMO_LOW_RANK = 32


def build_parser() -> argparse.ArgumentParser:

    parser = argparse.ArgumentParser(
        prog="analyze.py",
        description="Influence scores (EKFAC and relatives, via kronfluence) of ImageNet training images on "
        "validation predictions of a torchvision classifier (ResNet-50 by default, any other with --arch).",
    )
    parser.add_argument("--dataset_dir", type=Path, help="ImageNet folder holding train/<wnid>/* and val/<wnid>/*.")
    parser.add_argument("--demo", action="store_true", help="Run offline on generated images under data/demo/ (made once); no dataset, download or GPU needed.")
    parser.add_argument("--factor_strategy", choices=STRATEGIES, default="ekfac", help="Hessian approximation (default: ekfac).")
    parser.add_argument("--query_gradient_rank", type=rank_argument, default=None, help=f"Rank of the low-rank query gradients (query batching); {FULL_RANK} for full rank (default).")
    parser.add_argument("--query_batch_size", type=positive_int, help="Queries per batch (default: 100; demo 8).")
    parser.add_argument("--train_batch_size", type=positive_int, help="Training images per batch when scoring (default: 256; demo 8).")
    parser.add_argument("--factor_batch_size", type=positive_int, help="Training images per batch when fitting factors (default: searched on one GPU, else --train_batch_size).")
    parser.add_argument("--query_gradient_accumulation_steps", type=positive_int, help="Query batches gathered per pass over the training set (default: as many as fit in the device's memory beside the training side's own, all of them when they fit, at full and low rank alike; 1: one pass over the training set per query batch).")
    parser.add_argument("--num_queries", type=positive_int, help="Score N validation images, chosen by --query_selection (default: 1000; demo: all).")
    parser.add_argument("--query_selection", choices=queries.SELECTIONS, default="first", help="Which validation images are the queries: the first N in folder order (the default, upstream's: the first 20 classes on ImageNet), per_class (an equal number from each class, across all classes), or random (drawn with --seed).")
    parser.add_argument("--query_files", type=Path, help="A text file naming the query images, one per line: validation image paths (absolute, relative to val/, or a file name) or indices; instead of --num_queries and --query_selection.")
    parser.add_argument("--query_dir", type=Path, help="Any folder of images as queries (your own photos): class subfolders named by wnid or class index give the labels; without them each image's label is the model's own prediction (marked as predicted in the results).")
    parser.add_argument("--use_half_precision", action="store_true", help="bfloat16 factors and scores (names get _half).")
    parser.add_argument("--damping_factor", type=damping_factor, default=argparse.SUPPRESS, help=f"Damping added to the Hessian approximation: a number, or '{HEURISTIC_DAMPING}' for 0.1 x mean eigenvalue (default: 1e-8; demo: heuristic).")
    parser.add_argument("--num_workers", type=non_negative_int, help=f"DataLoader worker processes per process (default: the CPUs this process may use, shared among the processes torchrun starts on the node, at most {hardware.MAX_DEFAULT_WORKERS}; demo 0).")
    parser.add_argument("--device", choices=hardware.DEVICE_CHOICES, default="auto", help="Where to compute: auto = the GPU when torch sees one, else the CPU (default: auto); cuda fails in one line without a usable GPU. The device is logged before any work starts.")
    add_speed_arguments(parser)
    parser.add_argument("--output_dir", type=Path, default=Path(naming.DEFAULT_OUTPUT_DIR), help="Where results go (default: influence_results).")
    parser.add_argument("--analysis_name", help="Sub-folder of --output_dir for this model and data (default: imagenet; demo: demo; with another --arch: imagenet_ARCH, demo_ARCH).")
    parser.add_argument("--arch", default=pipeline.DEFAULT_ARCH, metavar="NAME", help=pipeline.ARCH_HELP)
    parser.add_argument("--weights", metavar="NAME", help=f"{pipeline.WEIGHTS_HELP} (default: the architecture's first, {pipeline.DEFAULT_WEIGHTS} for ResNet-50; demo: that if cached, else none).")
    parser.add_argument("--checkpoint", type=Path, help="Local state dict of --arch (.pt/.pth/.safetensors; may be wrapped under state_dict/model, module. prefixes allowed) instead of --weights.")
    parser.add_argument("--resize_size", type=positive_int, help=f"With --checkpoint or --weights none: resize the shorter side of every image to this many pixels (default: the architecture's first weights' preset, {pipeline.RESIZE_SIZE} for ResNet-50); torchvision weights use their own preset (ResNet-50 IMAGENET1K_V2: 232).")
    parser.add_argument("--crop_size", type=positive_int, help=f"With --checkpoint or --weights none: the centre crop the model sees, in pixels (default: the architecture's first weights' preset, {pipeline.CROP_SIZE} for ResNet-50); torchvision weights use their own preset.")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="Seed for every random choice (true-Fisher labels, randomised SVD) (default: 0).")
    parser.add_argument("--overwrite", action="store_true", help="Replace results on disk that were computed with other settings (finished matching results are still reused).")
    parser.add_argument("--profile", action="store_true", help="Print the per-phase timing table at the end.")
    parser.add_argument("--factor_examples", type=positive_int, default=FACTOR_MAX_EXAMPLES, help=f"Training images the covariance and lambda factors are fitted on: all of them up to N, else N drawn at random with --seed (default and most: {FACTOR_MAX_EXAMPLES:,}, upstream's on ImageNet and kronfluence's cap). Recorded with the factors.")
    parser.add_argument("--score_partitions", type=positive_int, help=f"Parts the training set is scored in; each is saved when done, so an interrupted run loses at most one (default: one per {SCORE_PARTITION_EXAMPLES:,} training images).")
    parser.add_argument("--factor_partitions", type=positive_int, help=f"Parts the covariance and lambda fits are done in; each is saved when done, so an interrupted fit loses at most one (default: one per {FACTOR_PARTITION_EXAMPLES:,} fitted images).")
    parser.add_argument("--check_images", action="store_true", help="Decode every training and query image before the analysis starts and stop with the list of unreadable files (one pass over the data, with --num_workers processes).")
    parser.add_argument("--score_normalization", choices=naming.NORMALIZATIONS, default=naming.NO_NORMALIZATION, help="Rescale the pairwise scores against the few high-gradient training images that top every list: none (kronfluence's scores, the default), relative (each training image's score divided by the square root of its self-influence: l-RelatIF), or cosine (the query's too: a cosine in the preconditioned inner product). Written as scores_NAME_relative/ or _cosine/ beside the raw scores; costs one self-influence pass over the training set (reused from --self_influence results), for cosine also one over the queries.")
    parser.add_argument("--self_influence", action="store_true", help=f"Compute self-influence scores of every training image with the same factors (scores_STRATEGY[_half]{naming.SELF_SUFFIX}/{naming.SELF_SCORES_FILE}) INSTEAD of pairwise scores; run without it for pairwise scores (finished factors are reused either way).")
    parser.add_argument("--dist_timeout", type=positive_int, default=distributed.DEFAULT_TIMEOUT_S, help=f"Under torchrun: seconds a rank waits for the others in a collective before it fails (default: {distributed.DEFAULT_TIMEOUT_S}).")
    return parser


def add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    """The speed settings, shared with benchmarks/benchmark.py; each is on by default and a flag turns it off."""
    parser.add_argument("--prefetch_factor", type=positive_int, help="Batches each DataLoader worker loads ahead (default: torch's, 2); needs --num_workers > 0.")
    parser.add_argument("--no_pin_memory", action="store_true", help="Do not pin host memory for copies to the GPU (pinned by default when a GPU is present).")
    parser.add_argument("--no_persistent_workers", action="store_true", help="Start DataLoader workers again for every pass over the training set (kept alive by default).")
    parser.add_argument("--channels_last", choices=CHANNELS_LAST_CHOICES, default="auto", help="Channels-last (NHWC) layout of the model and images: on, off, or auto = on with a GPU, off on the CPU where it measured slower (default: auto; scores equal up to float rounding).")
    parser.add_argument("--tf32", choices=TF32_CHOICES, default=DEFAULT_TF32, help=f"Which float32 ops run in TF32 on GPUs that have it (no effect on the CPU): matmuls (kronfluence's products; measured not to change the scores), all (convolutions too; moves scores by 2-4%% of the largest, speed-up unmeasured), or off (default: {DEFAULT_TF32}). Recorded with the results.")


def speed_settings(args: argparse.Namespace) -> Dict[str, Any]:
    """AnalysisSettings fields from the flags of `add_speed_arguments`."""
    return {
        "pin_memory": not args.no_pin_memory,
        "persistent_workers": not args.no_persistent_workers,
        "prefetch_factor": args.prefetch_factor,
        "channels_last": CHANNELS_LAST_CHOICES[args.channels_last],
        "tf32": args.tf32,
    }


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = pipeline.check_input_flags(args) or pipeline.check_model_flags(args)
    if problem:
        parser.error(problem)
    if args.factor_examples > FACTOR_MAX_EXAMPLES:
        # kronfluence's own cap (covariance_max_examples, lambda_max_examples) would silently keep the first 100,000.
        parser.error(f"--factor_examples {args.factor_examples} is above kronfluence's cap of {FACTOR_MAX_EXAMPLES:,} fitted examples")
    problem = pipeline.check_image_sizes(args.resize_size, args.crop_size, args.arch)
    if problem:
        parser.error(problem)
    problem = queries.check_choice_flags(args)
    if problem:
        parser.error(problem)
    if args.self_influence:
        query_flags = {"--num_queries": args.num_queries, "--query_batch_size": args.query_batch_size,
                       "--query_files": args.query_files, "--query_dir": args.query_dir,
                       "--query_selection": None if args.query_selection == "first" else args.query_selection,
                       "--query_gradient_rank": args.query_gradient_rank,
                       "--query_gradient_accumulation_steps": args.query_gradient_accumulation_steps,
                       "--score_normalization": None if args.score_normalization == naming.NO_NORMALIZATION else args.score_normalization}
        given = [flag for flag, value in query_flags.items() if value is not None]
        if given:
            parser.error(f"--self_influence scores the training set against itself (full rank); drop {', '.join(given)}")
    problem = queries.check_query_paths(args)
    if problem:
        parser.error(problem)
    defaults = DEMO_DEFAULTS if args.demo else SEED_DEFAULTS
    chosen_queries = args.query_files is not None or args.query_dir is not None
    args.analysis_name = args.analysis_name or naming.default_analysis_name(args.demo, args.arch)
    for key, value in defaults.items():
        if key == "num_queries" and chosen_queries:
            continue  # the file or folder says how many
        # `--damping_factor` is absent when not given: its None already means the heuristic.
        if getattr(args, key, None) is None and (key != "damping_factor" or not hasattr(args, key)):
            setattr(args, key, value)
    if args.num_workers is None:
        args.num_workers = 0 if args.demo else hardware.default_num_workers(distributed.layout_from_env().local_world_size)
    if args.prefetch_factor is not None and args.num_workers == 0:
        parser.error("--prefetch_factor needs DataLoader workers (--num_workers > 0)")
    return args


def settings_from_args(args: argparse.Namespace, device: str) -> AnalysisSettings:
    return AnalysisSettings(
        strategy=args.factor_strategy,
        query_gradient_rank=args.query_gradient_rank,
        query_batch_size=args.query_batch_size,
        train_batch_size=args.train_batch_size,
        factor_batch_size=args.factor_batch_size,
        query_gradient_accumulation_steps=args.query_gradient_accumulation_steps,
        use_half_precision=args.use_half_precision,
        damping_factor=args.damping_factor,
        num_workers=args.num_workers,
        **speed_settings(args),
        device=device,
        output_dir=str(args.output_dir),
        analysis_name=args.analysis_name,
        seed=args.seed,
        overwrite=args.overwrite,
        profile=args.profile or args.demo,
        score_partitions=args.score_partitions,
        factor_partitions=args.factor_partitions,
        factor_examples=args.factor_examples,
        score_normalization=args.score_normalization,
    )


def _check_output_dir(output_dir: Path) -> None:
    existing = output_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"output directory {output_dir} cannot be written (no write permission on {existing})")


def run(args: argparse.Namespace, layout: distributed.Layout) -> Dict[str, Path]:
    """Builds everything, runs the analysis; returns the score files, keyed by scores name."""
    device = hardware.resolve_device(args.device)
    distributed.check_process_layout(layout, device)
    hardware.check_gpu_capability(device)
    settings = settings_from_args(args, device)
    _check_output_dir(Path(settings.output_dir))
    set_tf32(settings.tf32, device)
    hardware.make_repeatable(device)
    if args.checkpoint is not None:
        pipeline.check_checkpoint_path(args.checkpoint)
    normalized = settings.score_normalization != naming.NO_NORMALIZATION
    if layout.distributed and args.dataset_dir is not None and layouts.needs_unpacking(Path(args.dataset_dir)):
        # The other ranks would wait for rank 0's hours of unpacking far past --dist_timeout.
        raise UserError(
            f"{args.dataset_dir} holds ImageNet's archives, not yet unpacked: run analyze.py once without torchrun "
            "to unpack them, then this command"
        )
    distributed.init(layout, device, args.dist_timeout)
    if args.demo:
        args.dataset_dir = distributed.on_main(layout, demo.make_demo_dataset)
    weights = pipeline.chosen_weights(args.weights, args.checkpoint, args.arch, args.demo)
    preprocessing = pipeline.model_preprocessing(weights if args.checkpoint is None else None, args.resize_size, args.crop_size, args.arch)
    dataset_dir = Path(args.dataset_dir)
    distributed.on_main(layout, lambda: layouts.prepare_archives(dataset_dir))  # ImageNet's archives, unpacked once
    # Several machines: every rank must see rank 0's output folder and the same inputs, or stop in one line now.
    distributed.check_shared(layout, naming.analysis_dir(settings.output_dir, settings.analysis_name), {"--dataset_dir": dataset_dir, "--checkpoint": args.checkpoint})
    # Cheap folder checks come before the model is built.
    train_dataset = pipeline.get_imagenet_dataset("train", dataset_dir, preprocessing=preprocessing)
    val_dataset = pipeline.get_imagenet_dataset("val", dataset_dir, preprocessing=preprocessing)
    num_queries = args.num_queries if args.num_queries is not None else len(val_dataset)
    if args.self_influence or args.query_files is not None or args.query_dir is not None:
        num_queries = 0  # val is only checked for its classes here; the queries are checked where chosen
    pipeline.check_datasets(train_dataset, val_dataset, num_queries)
    if settings.score_partitions is not None and settings.score_partitions > len(train_dataset):
        raise UserError(
            f"--score_partitions {settings.score_partitions} is more than the {len(train_dataset)} training images"
        )
    if args.checkpoint is None and weights != pipeline.NO_WEIGHTS and not args.demo:
        pipeline.check_pretrained_classes(train_dataset, weights, args.arch)
    model = pipeline.build_model(weights=weights, checkpoint=args.checkpoint, seed=args.seed, arch=args.arch, image_size=preprocessing.crop_size)
    pipeline.check_model_fits_classes(train_dataset, model)
    tracked = tracking.describe_tracking(model)
    classes = pipeline.base_image_folder(train_dataset).classes
    if args.self_influence:
        query_dataset, query_record = data.Subset(val_dataset, []), None
    else:
        query_dataset, query_record = queries.query_dataset(args, val_dataset, classes, model, preprocessing, device)
    num_queries = len(query_dataset)
    distributed.on_main(layout, lambda: preflight.check_resources(model, settings, len(train_dataset), num_queries, args.self_influence, 2 if args.demo else 1))
    if args.check_images:
        paths = images.image_paths([train_dataset, query_dataset])
        unreadable = images.unreadable_images(paths[layout.rank :: layout.world_size], settings.num_workers)
        images.raise_if_unreadable(distributed.gather_lists(layout, unreadable), len(paths))
        logger.info("all %d images can be read", len(paths))
    # Rank 0 stats every file (1.28M on ImageNet) and hashes the checkpoint, once; the others are told.
    provenance = distributed.on_main(layout, lambda: dataset_provenance(train_dataset, query_dataset, model_source(weights, args.checkpoint, args.arch)))
    source = provenance["train"]["model"]
    if query_record is not None:
        queries.add_to_provenance(provenance, query_record)
    provenance["inputs"] = {  # where things were, for the record (results depend on the transform, recorded above)
        "dataset_dir": str(dataset_dir.resolve()),
        "checkpoint": str(args.checkpoint.resolve()) if args.checkpoint is not None else None,
        "preprocessing": dataclasses.asdict(preprocessing),  # its parameters, for the scripts that read results
        "arch": args.arch,
        "tracking": tracked,  # which parameters the scores cover (influence/model/tracking.py)
    }
    # The input checks are done (their errors stay one line on stderr): what the work will run on, first.
    logger.info(hardware.describe_device(device, args.device))
    hardware.warn_if_slow_on_cpu(device, len(train_dataset), args.demo)
    logger.info(tracking.tracking_line(args.arch, tracked))
    logger.info(
        "%s: %d training images, %d queries, strategy %s, %s, %s%s",
        source, len(train_dataset), num_queries, settings.strategy,
        f"rank {settings.query_gradient_rank}" if settings.query_gradient_rank else "full rank",
        "bfloat16" if settings.use_half_precision else "float32",
        f", {layout.world_size} processes" if layout.distributed else "",
    )

    analyzer = make_analyzer(model, settings)
    factors_record = fit_factors(analyzer, train_dataset, settings, provenance, layout)
    if args.self_influence:
        path = compute_self_scores(analyzer, train_dataset, settings, provenance, factors_record, layout)
        if layout.is_main:
            logger.info("self-influence scores `%s`: %s, shape %s", settings.self_scores_name, path, scores_shape(path))
            if args.demo:
                print(demo.self_influence_report(settings.self_scores_name, path, analyzer.profiler.summary(), args.arch))
            elif settings.profile:
                print(analyzer.profiler.summary())
        return {settings.self_scores_name: path}
    runs = [settings]
    if args.demo:
        low_rank = settings.query_gradient_rank or DEMO_LOW_RANK
        runs = [dataclasses.replace(settings, query_gradient_rank=None), dataclasses.replace(settings, query_gradient_rank=low_rank)]
    results: Dict[str, Path] = {}
    for run_settings in runs:
        path = compute_scores(analyzer, train_dataset, query_dataset, run_settings, provenance, factors_record, layout)
        if normalized:
            path = compute_normalized_scores(analyzer, train_dataset, query_dataset, run_settings, provenance, factors_record, path, layout)
        results[run_settings.output_scores_name] = path
        if layout.is_main:
            logger.info("scores `%s`: %s, shape %s", run_settings.output_scores_name, path, scores_shape(path))
    if not layout.is_main:
        return results
    table = analyzer.profiler.summary() if settings.profile else ""
    if args.demo:
        scores = {name: load_scores(path) for name, path in results.items()}
        print(demo.report(results, scores, train_dataset, query_dataset, table, args.arch))
    elif table:
        print(table)
    return results


COLLECTIVE_FAILURE_MARKERS = ("Timed out", "Connection closed", "Connection reset", "gloo", "NCCL")


def _is_collective_failure(error: RuntimeError) -> bool:
    return any(marker in str(error) for marker in COLLECTIVE_FAILURE_MARKERS)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Path]:
    args = parse_args(argv)
    layout = distributed.layout_from_env()
    setup_logging()
    if not layout.is_main:
        logging.getLogger().setLevel(logging.WARNING)  # one rank reports; the others only warn
    try:
        with user_errors("analyze.py"):
            try:
                # Rank 0 holds the analysis folder for the whole run; the other ranks write nothing there.
                with locking.hold(naming.analysis_dir(args.output_dir, args.analysis_name)) if layout.is_main else contextlib.nullcontext():
                    return run(args, layout)
            except torch.OutOfMemoryError:
                raise UserError(
                    "out of memory; lower --train_batch_size, --query_batch_size or --factor_batch_size (or "
                    "--query_gradient_accumulation_steps); finished results are kept"
                ) from None
            except torch.linalg.LinAlgError as error:
                # Covariances of too few examples for a layer's input size (a small folder at a small crop)
                # are so degenerate that eigh does not converge, even in float64.
                raise UserError(
                    f"the eigendecomposition of a covariance failed ({str(error).splitlines()[0][:120]}): too few "
                    "training images for the layers' sizes; raise --factor_examples, use more images or a larger --crop_size, "
                    "or --factor_strategy diagonal or identity; finished results are kept"
                ) from None
            except (OSError, SafetensorError) as error:
                reason = write_failure(error)
                if reason is None:
                    raise
                results = naming.analysis_dir(args.output_dir, args.analysis_name)
                filename = getattr(error, "filename", None)
                if filename is not None and results.resolve() not in Path(filename).resolve().parents:
                    raise UserError(f"cannot access {filename} ({reason})") from None
                if layout.is_main and results.is_dir():
                    try:
                        for directory in [path for path in results.iterdir() if path.is_dir()]:
                            discard_torn_files(directory)
                    except OSError:  # an unwritable folder: the rerun's check finds what is left
                        pass
                raise UserError(
                    f"cannot write results under {results} ({reason}); free space or fix the folder, then run "
                    "the same command again: finished results are kept, the unfinished file was removed"
                ) from None
    except RuntimeError as error:
        # gloo reports a timed-out or broken collective as a plain RuntimeError, NCCL as DistError.
        if not layout.distributed or not (isinstance(error, dist.DistError) or _is_collective_failure(error)):
            raise
        # Another rank died or stalled: say so in one line; torchrun reports the exit of every rank.
        print(
            f"analyze.py: error: rank {layout.rank} lost the other processes ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:200]}); finished results are kept, rerun the same command to resume",
            file=sys.stderr,
        )
        raise SystemExit(1) from None
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
