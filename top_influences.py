"""Puts influence scores in front of a person. From a pairwise score file written by `analyze.py` it lists,
for each query, the training images that helped its prediction most (highest scores) and hurt it most
(lowest scores), with file, label, score and rank, as CSV and JSON beside the score file, and draws one
figure per query: the query with its label and the model's prediction, then its top helpful and top harmful
training images. With `--self` it reads the self-influence scores (`analyze.py --self_influence`) instead
and ranks the training images by them, highest first: atypical or mislabelled images tend to come first.
The score matrix is streamed a block of query rows at a time (a 1000 x 1,281,167 file in well under 2 GB),
and images are opened only for what is drawn."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from kronfluence.utils.constants import SCORE_SAVE_PREFIX
from torch import nn
from torch.utils import data
from tqdm import tqdm

import pipeline
from influence.analysis.settings import FULL_RANK, STRATEGIES, rank_argument
from influence.data.queries import LABEL_PREDICTED, recorded_queries
from influence.explorer import page as explorer
from influence.explorer.figures import draw_query_figure, draw_self_figure
from influence.model.inference import predict, predict_classes, prediction_text
from influence.results import locking, naming
from influence.results.records import check_same_arch, model_source, recorded_arch, split_model_source
from influence.results.score_files import check_writable, load_record, open_score_file, read_self_scores, recorded_preprocessing
from influence.results.top_k import (
    CSV_COLUMNS,
    HARMFUL,
    HELPFUL,
    SELF_CSV_COLUMNS,
    check_same_images,
    class_names,
    describe,
    entry,
    stream_top_k,
    write_csv,
)
from influence.runtime import hardware
from influence.runtime.cli import UserError, non_negative_int, positive_int, setup_logging, user_errors

PROG = "top_influences.py"
logger = logging.getLogger(PROG)

DEFAULT_TOP_K = 10
DEFAULT_FIGURE_TOP_K = 5
DEFAULT_SELF_FIGURE_TOP_K = 20
DEFAULT_NUM_FIGURES = 10
# Two copies of 16 rows of 1,281,167 float32 scores are 164 MB.
DEFAULT_ROWS_PER_BLOCK = 16
MAX_THUMBNAIL_WORKERS = 8
# The explorer's self-influence page lists this many training images, highest first.
EXPLORER_SELF_TOP_K = 100
# What the explorer's pages say of rescaled scores (analyze.py --score_normalization; raw scores: nothing).
NORMALIZATION_NOTES = dict(zip(naming.NORMALIZATIONS[1:], (
    "relative influence: each score divided by the square root of the training image's self-influence",
    "cosine influence: each score divided by the square roots of the training image's and the query's self-influence",
)))


def parse_queries(text: str) -> List[int]:
    """argparse type for `--queries 0,5,9`: distinct indices >= 0, in the order given."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated query indices such as 0,5,9, not {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"must be comma-separated query indices >= 0, not {text!r}")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"lists a query twice: {text!r}")
    return values


def model_for_predictions(args: argparse.Namespace, record: Optional[Dict[str, Any]]) -> Optional[nn.Module]:
    """`_build_model_for_predictions`, with --no_prediction named in its errors."""
    try:
        return _build_model_for_predictions(args, record)
    except UserError as error:
        raise UserError(f"{error} (or pass --no_prediction to draw the figures without predictions)") from None


def _build_model_for_predictions(args: argparse.Namespace, record: Optional[Dict[str, Any]]) -> Optional[nn.Module]:
    """The model the scores were computed with, for the predictions in the figures: from --weights or
    --checkpoint, else rebuilt from what the score folder recorded (its architecture, and a torchvision
    weights name or a checkpoint found at its recorded path with the recorded sha256)."""
    if args.no_prediction:
        return None
    source = (record or {}).get("depends_on", {}).get("model")
    seed = args.seed if args.seed is not None else (record or {}).get("settings", {}).get("seed", 0)
    arch = recorded_arch(record) or args.arch or pipeline.DEFAULT_ARCH
    image_size = recorded_preprocessing(record).crop_size  # a vision transformer's position embeddings need it
    build = functools.partial(pipeline.build_model, seed=seed, arch=arch, image_size=image_size)
    if args.checkpoint is not None:
        pipeline.check_checkpoint_path(args.checkpoint)
        if source is not None and source != model_source(checkpoint=args.checkpoint, arch=arch):
            raise UserError(f"--checkpoint {args.checkpoint} is not the model the scores were computed with ({source})")
        return build(weights=None, checkpoint=args.checkpoint)
    if args.weights is not None:
        flags = argparse.Namespace(arch=arch, weights=args.weights)  # the weights' name resolved for this architecture
        problem = pipeline.check_model_flags(flags)
        if problem:
            raise UserError(problem)
        if source is not None and source != model_source(weights=flags.weights, arch=arch):
            raise UserError(f"--weights {args.weights} is not the model the scores were computed with ({source})")
        return build(weights=flags.weights)
    if source is None:
        logger.warning("no recorded model and no --weights/--checkpoint: figures show no predictions")
        return None
    kind, _, value = split_model_source(source)[1].partition(":")
    if kind == "weights":
        return build(weights=value)
    recorded = Path((record or {}).get("resolved", {}).get("checkpoint") or "")
    if recorded.is_file() and model_source(checkpoint=recorded, arch=arch) == source:
        return build(weights=None, checkpoint=recorded)
    raise UserError(
        f"the scores were computed with a checkpoint ({source}) that is no longer at {recorded}; pass --checkpoint PATH"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("--dataset_dir", type=Path, help="The ImageNet folder the scores were computed on (train/<wnid>/*, val/<wnid>/*).")
    parser.add_argument("--demo", action="store_true", help=f"Read the demo's scores and images (data/demo, --analysis_name {naming.DEMO_ANALYSIS_NAME}).")
    parser.add_argument("--self", dest="self_influence", action="store_true", help="Rank training images by their self-influence scores (from analyze.py --self_influence) instead of listing each query's influencers.")
    parser.add_argument("--scores", type=Path, help="The score file or its scores_NAME folder (default: named by --output_dir, --analysis_name, --factor_strategy, --query_gradient_rank, --use_half_precision, --score_normalization, as analyze.py names it).")
    parser.add_argument("--output_dir", type=Path, default=Path(naming.DEFAULT_OUTPUT_DIR), help=f"analyze.py's results folder, for the default score file (default: {naming.DEFAULT_OUTPUT_DIR}).")
    parser.add_argument("--analysis_name", help=f"Sub-folder of --output_dir (default: {naming.DEFAULT_ANALYSIS_NAME}; --demo: {naming.DEMO_ANALYSIS_NAME}; with --arch: imagenet_ARCH, demo_ARCH).")
    parser.add_argument("--factor_strategy", choices=STRATEGIES, default="ekfac", help="Strategy of the default score file (default: ekfac).")
    parser.add_argument("--query_gradient_rank", type=rank_argument, default=None, help=f"Query-gradient rank of the default score file; {FULL_RANK} for full rank (default). Not with --self.")
    parser.add_argument("--use_half_precision", action="store_true", help="The default score file is the bfloat16 one (_half).")
    parser.add_argument("--score_normalization", choices=naming.NORMALIZATIONS, help="The default score file is the one analyze.py --score_normalization wrote (scores_NAME_relative, scores_NAME_cosine; none: the raw scores_NAME, as without this flag); a --scores file of another normalisation is refused. Not with --self (self-influence is never normalised).")
    parser.add_argument("--queries", type=parse_queries, help="Comma-separated query indices, e.g. 0,5,9 (default: every query in the file). Not with --self.")
    parser.add_argument("--top_k", type=positive_int, default=DEFAULT_TOP_K, help=f"Training images listed per query and kind (with --self: listed in all) in the CSV and JSON (default: {DEFAULT_TOP_K}).")
    parser.add_argument("--figure_top_k", type=non_negative_int, help=f"Training images drawn per row of a query figure (default: {DEFAULT_FIGURE_TOP_K}), or in the --self grid (default: {DEFAULT_SELF_FIGURE_TOP_K}); at most --top_k.")
    parser.add_argument("--num_figures", type=non_negative_int, default=DEFAULT_NUM_FIGURES, help=f"Draw figures for the first N chosen queries (default: {DEFAULT_NUM_FIGURES}; 0: none). The CSV and JSON cover every chosen query.")
    parser.add_argument("--figure_dir", type=Path, default=Path(naming.DEFAULT_FIGURE_DIR), help=f"Where the PNG figures go (default: {naming.DEFAULT_FIGURE_DIR}).")
    parser.add_argument("--results_dir", type=Path, help="Where the CSV and JSON go (default: beside the score file).")
    parser.add_argument("--no_prediction", action="store_true", help="Do not rebuild the model: figures show labels and scores but no predictions.")
    parser.add_argument("--arch", metavar="NAME", help="The architecture analyze.py --arch analysed, for the default score folder (imagenet_ARCH, demo_ARCH); the model itself is read from the score folder's record, and a different one is refused (default: resnet50's folder).")
    parser.add_argument("--weights", metavar="NAME", help="Model for the predictions: torchvision weights of the recorded architecture by name (default: what the score folder's run_config.json records).")
    parser.add_argument("--checkpoint", type=Path, help="Model for the predictions: a local state dict of the recorded architecture (default: the recorded checkpoint, if still at its recorded path with the same sha256).")
    parser.add_argument("--seed", type=non_negative_int, help="Seed of the random-init model with --weights none (default: the recorded seed).")
    parser.add_argument("--html", action="store_true", help=f"Also write a static explorer beside the CSV ({naming.EXPLORER_DIR}/{naming.EXPLORER_INDEX}: every query, its page of helpful and harmful training images, and self-influence when its scores exist); opens offline from file://. Predicts every query unless --no_prediction. Not with --self.")
    parser.add_argument("--thumbnail_workers", type=positive_int, help=f"Threads making the explorer's thumbnails (default: the CPUs this process may use, at most {MAX_THUMBNAIL_WORKERS}). Only with --html.")
    parser.add_argument("--rows_per_block", type=positive_int, default=DEFAULT_ROWS_PER_BLOCK, help=f"Query rows read at a time; memory grows with it (default: {DEFAULT_ROWS_PER_BLOCK}).")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.demo == (args.dataset_dir is not None):
        parser.error("pass --dataset_dir (the folder the scores were computed on), or --demo")
    if args.self_influence and (args.query_gradient_rank is not None or args.queries is not None):
        parser.error("--self ranks training images by self-influence: drop --query_gradient_rank and --queries")
    if args.self_influence and args.score_normalization is not None:
        parser.error("--self reads self-influence scores, which are never normalised: drop --score_normalization")
    if args.html and args.self_influence:
        parser.error("--html builds the explorer from pairwise scores (it adds the self-influence page when those scores exist): drop --self")
    if args.thumbnail_workers is not None and not args.html:
        parser.error("--thumbnail_workers sets how the --html explorer's thumbnails are made: add --html or drop it")
    if args.thumbnail_workers is None:
        args.thumbnail_workers = min(MAX_THUMBNAIL_WORKERS, hardware.available_cpus())
    if args.checkpoint is not None and args.weights is not None:
        parser.error("--checkpoint and --weights exclude each other")
    if args.no_prediction and (args.checkpoint is not None or args.weights is not None or args.seed is not None):
        parser.error("--no_prediction builds no model: drop --weights/--checkpoint/--seed")
    if args.figure_top_k is None:
        args.figure_top_k = min(args.top_k, DEFAULT_SELF_FIGURE_TOP_K if args.self_influence else DEFAULT_FIGURE_TOP_K)
    if args.figure_top_k > args.top_k:
        parser.error(f"--figure_top_k {args.figure_top_k} is more than --top_k {args.top_k}")
    problem = pipeline.arch_problem(args.arch) if args.arch is not None else None
    if problem:
        parser.error(problem)
    if args.analysis_name is None:
        args.analysis_name = naming.default_analysis_name(args.demo, args.arch or pipeline.DEFAULT_ARCH)
    if args.demo:
        from influence.data import demo  # pylint: disable=import-outside-toplevel

        args.dataset_dir = demo.DEMO_DIR
    return args


def scores_path(args: argparse.Namespace) -> Path:
    if args.scores is not None:
        file_name = naming.SELF_SCORES_FILE if args.self_influence else naming.PAIRWISE_SCORES_FILE
        return args.scores / file_name if args.scores.is_dir() else args.scores
    if args.self_influence:
        name = naming.self_scores_name(args.factor_strategy, args.use_half_precision)
        return naming.self_scores_path(args.output_dir, args.analysis_name, name)
    normalization = args.score_normalization or naming.NO_NORMALIZATION
    name = naming.scores_name(args.factor_strategy, args.use_half_precision, args.query_gradient_rank, normalization)
    return naming.pairwise_scores_path(args.output_dir, args.analysis_name, name)


def scores_label(path: Path) -> Tuple[str, str]:
    """(analysis name, scores name) of a score file in analyze.py's layout, for figure names."""
    folder = path.parent.name
    name = folder[len(SCORE_SAVE_PREFIX):] if folder.startswith(SCORE_SAVE_PREFIX) else path.stem
    return path.parent.parent.name or "scores", name


def run_pairwise(
    args: argparse.Namespace, path: Path, record: Optional[Dict[str, Any]], train: data.Dataset, val: data.Dataset, names: List[str]
) -> Dict[str, Any]:
    score_file = open_score_file(path, "--scores")
    if args.score_normalization not in (None, score_file.normalization):
        raise UserError(f"{path} has score_normalization {score_file.normalization} (by its metadata), not --score_normalization {args.score_normalization}")
    recorded = (record or {}).get("resolved", {}).get("queries") or {}
    too_few_val = "root" not in recorded and score_file.num_queries > len(val)  # the queries are validation images
    if score_file.num_train != len(train) or too_few_val:
        raise UserError(
            f"{path} holds {score_file.num_queries} x {score_file.num_train} scores (queries x training images) but "
            f"{args.dataset_dir} has {len(val)} validation and {len(train)} training images; pass the --dataset_dir the scores were computed on"
        )
    queries = args.queries if args.queries is not None else list(range(score_file.num_queries))
    if max(queries) >= score_file.num_queries:
        raise UserError(f"--queries {max(queries)} is not among the {score_file.num_queries} queries in {path}")
    class_list = pipeline.base_image_folder(train).classes
    query_set, label_source = recorded_queries(record, val, class_list, recorded_preprocessing(record), score_file.num_queries)
    if len(query_set) != score_file.num_queries:
        raise UserError(f"{path} holds scores of {score_file.num_queries} queries but its record names {len(query_set)}")
    check_same_images(record, train, query_set, args.dataset_dir, self_influence=False)
    table, summary = naming.top_influences_tables(args.results_dir or path.parent, self_influence=False)
    for output in (table, summary):
        check_writable(output)
    self_scores = explorer_self_scores(args, path, train) if args.html else None
    if args.html:
        explorer.check_destination(table.parent)
    drawn = queries[: args.num_figures]
    predicted = queries if args.html else drawn
    view = recorded_preprocessing(record).view()  # the images as the model saw them, for every figure
    model = model_for_predictions(args, record) if predicted else None  # before the long part: its errors come first

    logger.info("top-%d helpful and harmful training images of %d queries from %s", args.top_k, len(queries), path)
    found = stream_top_k(score_file, queries, args.top_k, args.rows_per_block)
    classes = predict_classes(model, query_set, predicted) if model is not None else {}
    predictions = {position: prediction_text(value, names) for position, value in classes.items()}
    analysis_name, name = scores_label(path)
    rows: List[Dict[str, Any]] = []
    entries: List[Dict[str, Any]] = []
    figures: List[str] = []
    for query_index in tqdm(queries, desc="writing", unit="query"):
        query = describe(query_set, names, query_index)
        ranked = {
            kind: [(describe(train, names, index), score) for score, index in zip(*found[query_index][kind])]
            for kind in (HELPFUL, HARMFUL)
        }
        query_entry = {"query_index": query_index, "query_path": query.path, "label": query.label, "label_source": label_source}
        if query_index in predictions:
            query_entry["prediction"] = predictions[query_index]
            if label_source != LABEL_PREDICTED:  # a predicted label agrees with the prediction by definition
                query_entry["correct"] = classes[query_index][0] == pipeline.example_path(query_set, query_index)[1]
        for kind, examples in ranked.items():
            query_entry[kind] = [entry(rank, example, score) for rank, (example, score) in enumerate(examples, 1)]
            rows += [{"query_index": query_index, "query_path": query.path, "query_label": query.label,
                      "query_label_source": label_source, "kind": kind, **item} for item in query_entry[kind]]
        if query_index in drawn and args.figure_top_k:
            figure = naming.top_influences_figure_path(args.figure_dir, analysis_name, name, query_index)
            shown = {kind: examples[: args.figure_top_k] for kind, examples in ranked.items()}
            shown_query = query if label_source != LABEL_PREDICTED else dataclasses.replace(query, label=f"{query.label} (predicted)")
            draw_query_figure(figure, shown_query, predictions.get(query_index), shown, name, view)
            query_entry["figure"] = str(figure)
            figures.append(str(figure))
        entries.append(query_entry)
    write_csv(table, CSV_COLUMNS, rows)
    result = {
        "scores": str(path), "score_normalization": score_file.normalization, "dtype": score_file.dtype, "num_queries": score_file.num_queries,
        "num_train": score_file.num_train, "top_k": args.top_k, "dataset_dir": str(args.dataset_dir),
        "csv": str(table), "figures": figures, "queries": entries,
    }
    summary.write_text(json.dumps(result, indent=2) + "\n")
    print(f"top-{args.top_k} helpful and harmful training images of {len(queries)} queries: {table}, {summary}")
    if figures:
        print(f"figures ({len(figures)}): {figures[0]}{' ...' if len(figures) > 1 else ''}")
    if args.html:
        ranked = explorer_self_ranking(self_scores, model, train, names) if self_scores is not None else None
        title = f"{path.parent.parent.name}/{path.parent.name}"
        if score_file.normalization in NORMALIZATION_NOTES:
            title += f" ({NORMALIZATION_NOTES[score_file.normalization]})"
        index, counts = explorer.build_explorer(table.parent, entries, ranked, title, len(train), args.thumbnail_workers)
        result["explorer"] = str(index)
        summary.write_text(json.dumps(result, indent=2) + "\n")
        print(f"explorer ({counts['made']} thumbnails made, {counts['reused']} reused): open {index}")
    return result


def explorer_self_scores(args: argparse.Namespace, path: Path, train: data.Dataset) -> Optional[torch.Tensor]:
    """The self-influence scores made with the same factors as the pairwise file (its sibling
    scores_NAME_self folder), checked like `--self` checks them, or None when there are none."""
    self_path = path.parent.parent / f"{SCORE_SAVE_PREFIX}{naming.self_scores_name_for(scores_label(path)[1])}" / naming.SELF_SCORES_FILE
    if not self_path.is_file():
        logger.info("no self-influence scores at %s: the explorer has no self-influence page", self_path)
        return None
    return checked_self_scores(args, self_path, load_record(self_path), train)


def explorer_self_ranking(
    scores: torch.Tensor, model: Optional[nn.Module], train: data.Dataset, names: List[str]
) -> List[Dict[str, Any]]:
    """The training images with the highest self-influence, with prediction and whether it matches the label."""
    values, indices = torch.topk(scores, min(EXPLORER_SELF_TOP_K, scores.numel()))
    ranked = [entry(rank, describe(train, names, index), score) for rank, (score, index) in enumerate(zip(values.tolist(), indices.tolist()), 1)]
    classes = predict_classes(model, train, indices.tolist()) if model is not None else {}
    for item in ranked:
        if item["train_index"] in classes:
            found = classes[item["train_index"]]
            item["prediction"] = prediction_text(found, names)
            item["correct"] = found[0] == pipeline.example_path(train, item["train_index"])[1]
    return ranked


def checked_self_scores(args: argparse.Namespace, path: Path, record: Optional[Dict[str, Any]], train: data.Dataset) -> torch.Tensor:
    """The self-influence scores at `path`, refused in one line unless they are this training set's."""
    scores = read_self_scores(path)
    if scores.numel() != len(train):
        raise UserError(
            f"{path} holds {scores.numel()} self-influence scores but {args.dataset_dir} has {len(train)} training "
            "images; pass the --dataset_dir the scores were computed on"
        )
    check_same_images(record, train, data.Subset(train, []), args.dataset_dir, self_influence=True)
    return scores


def run_self(args: argparse.Namespace, path: Path, record: Optional[Dict[str, Any]], train: data.Dataset, names: List[str]) -> Dict[str, Any]:
    scores = checked_self_scores(args, path, record, train)
    table, summary = naming.top_influences_tables(args.results_dir or path.parent, self_influence=True)
    for output in (table, summary):
        check_writable(output)
    model = model_for_predictions(args, record) if args.figure_top_k else None
    values, indices = torch.topk(scores, min(args.top_k, scores.numel()))
    ranked = [(describe(train, names, index), score) for score, index in zip(values.tolist(), indices.tolist())]
    rows = [entry(rank, example, score) for rank, (example, score) in enumerate(ranked, 1)]
    write_csv(table, SELF_CSV_COLUMNS, rows)
    figures: List[str] = []
    shown = ranked[: args.figure_top_k]
    predictions = predict(model, train, [example.index for example, _ in shown], names) if model is not None else {}
    for row in rows[: len(shown)]:
        if row["train_index"] in predictions:
            row["prediction"] = predictions[row["train_index"]]
    if shown:
        analysis_name, name = scores_label(path)
        figure = naming.top_influences_figure_path(args.figure_dir, analysis_name, name)
        draw_self_figure(figure, shown, predictions, name, recorded_preprocessing(record).view())
        figures.append(str(figure))
    result = {
        "scores": str(path), "num_train": scores.numel(), "top_k": args.top_k, "dataset_dir": str(args.dataset_dir),
        "csv": str(table), "figures": figures,
        "score_statistics": {"mean": scores.mean().item(), "median": scores.median().item(), "max": scores.max().item(), "min": scores.min().item()},
        "ranked": rows,
    }
    summary.write_text(json.dumps(result, indent=2) + "\n")
    print(f"top-{len(rows)} training images by self-influence: {table}, {summary}")
    if figures:
        print(f"figure: {figures[0]}")
    return result


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    setup_logging()
    with user_errors(PROG):
        path = scores_path(args)
        if args.demo and not args.dataset_dir.is_dir():
            raise UserError(f"{args.dataset_dir} does not exist: run `python analyze.py --demo` first")
        # The tables go beside the scores: not while analyze.py (or another of these) writes in that folder.
        with locking.writing_into(args.results_dir or path.parent):
            record = load_record(path)
            check_same_arch(recorded_arch(record), args.arch, f"the scores in {path}")
            preprocessing = recorded_preprocessing(record)
            train = pipeline.get_imagenet_dataset("train", args.dataset_dir, preprocessing=preprocessing)
            names = class_names(pipeline.base_image_folder(train).classes, args.dataset_dir)
            if args.self_influence:
                return run_self(args, path, record, train, names)
            val = pipeline.get_imagenet_dataset("val", args.dataset_dir, preprocessing=preprocessing)
            pipeline.check_datasets(train, val, num_queries=0)
            return run_pairwise(args, path, record, train, val, names)


if __name__ == "__main__":
    main()
