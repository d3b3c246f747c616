"""Do the scores mean anything on a trained model and real images? Answered offline on scikit-learn's
handwritten digits (real scans that ship inside scikit-learn), written as an ImageNet-layout folder with
planted mislabels, and a torchvision ResNet-50 trained on them here from random init. Then the suite's own
command lines run on that checkpoint and folder as a user would run them (analyze.py with each strategy
and rank, query_batching_analysis.py, top_influences.py, analyze.py --self_influence), and the answers are
checked against what is known: the label of each query, the planted mislabels, and the margins of models
retrained without the most helpful training images (the counterfactual check).

    python -m validation.trained_digits [--quick] [--json PATH]

Prints a table and writes a JSON report; finished steps (folder, checkpoint, factors, scores) are reused
when the same command runs again."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch.utils import data

import naming
import pipeline
from cli import UserError, setup_logging, user_errors
from query_batching_analysis import check_writable
from factors import fit_factors
from records import dataset_provenance, write_json_atomically
from scoring import compute_self_scores, load_scores
from settings import AnalysisSettings
from task import make_analyzer
from validation import digits

PROG = "trained_digits.py"
REPO_ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger(PROG)

STRATEGIES = ("identity", "diagonal", "kfac", "ekfac")
SEED_SPEARMAN = 0.94  # upstream's low-rank (rank 32) against full-rank figure on ImageNet
TOP_K = 10
SEED = 0
ANALYSIS_BATCH_SIZE = 32  # training images per batch in every phase
QUERY_BATCH_SIZE = 40
SELF_GRID_COLUMNS = 8
SELF_GRID_IMAGES = 24
PROBE_NAME = "probe"  # a file name inside each output folder: check_writable checks its folder


@dataclasses.dataclass(frozen=True)
class RunSize:
    """Everything that makes the full run and `--quick` differ."""

    name: str
    layout: digits.DigitsLayout
    strategies: Sequence[str]  # pairwise scores at full rank, each with its own factors
    training: digits.Training
    factor_examples: int  # training images the covariance and lambda factors are fitted on (analyze.py --factor_examples)
    preprocessing: pipeline.Preprocessing
    low_ranks: Sequence[int]
    removal_queries_per_class: int  # the removal test's queries: the first N validation images of each class
    removal_per_query: int  # each query's most helpful training images (by EKFAC) left out of the retraining
    self_influence_strategies: Sequence[str]  # by analyze.py --self_influence, every training image
    sampled_self_influence_strategies: Sequence[str]  # on a sample: every planted mislabel and `self_influence_sample` others
    self_influence_sample: int


FULL = RunSize(
    name="trained_digits",
    layout=digits.DigitsLayout(seed=SEED, num_images=1000, val_per_class=8),
    strategies=STRATEGIES,
    training=digits.Training(epochs=10),
    factor_examples=300,
    preprocessing=pipeline.Preprocessing(resize_size=54, crop_size=48),
    low_ranks=(32, 8),
    removal_queries_per_class=1,
    removal_per_query=5,
    self_influence_strategies=("identity", "diagonal"),
    sampled_self_influence_strategies=("ekfac", "kfac"),
    self_influence_sample=150,
)
QUICK = dataclasses.replace(
    FULL,
    name="trained_digits_quick",
    layout=digits.DigitsLayout(seed=SEED, num_images=600, val_per_class=4),
    strategies=("identity", "diagonal", "ekfac"),
    factor_examples=100,
    low_ranks=(32,),
    sampled_self_influence_strategies=("ekfac",),
    self_influence_sample=40,
)
# The test suite's: the smallest run whose numbers still mean something (a few minutes).
TEST = dataclasses.replace(
    QUICK,
    name="trained_digits_test",
    layout=digits.DigitsLayout(seed=SEED, num_images=400, val_per_class=2),
    strategies=("identity", "ekfac"),
    low_ranks=(),
    removal_per_query=0,
    self_influence_strategies=(),
    self_influence_sample=30,
)


def checkpoint_path(work_dir: Path, excluded_name: str = "") -> Path:
    return work_dir / f"resnet50_digits{excluded_name}.pt"


def figure_paths(figure_dir: Path, size: RunSize) -> Dict[str, Path]:
    """The run's figures: the low-rank comparison (the full run's is the suite's headline
    `figure/query_batching.png`) and the self-influence grid with the planted mislabels marked."""
    suffix = "" if size is FULL else f"_{size.name}"
    return {
        "query_batching": figure_dir / f"query_batching{suffix}.png",
        "self_influence": figure_dir / f"self_influence_{size.name}_planted.png",
    }


class Steps:
    """Runs the suite's command lines one after another as subprocesses (as a user types them), each with
    its output in a log file, and a one-line account of each on the terminal."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.count = 0

    def run(self, script: str, *argv: str) -> None:
        self.count += 1
        log = self.log_dir / f"{self.count:02d}_{Path(script).stem}.log"
        command = [sys.executable, script, *argv]
        shown = " ".join(["python", script, *argv]).replace(str(REPO_ROOT) + "/", "")
        print(f"[{self.count:2d}] {shown}", flush=True)
        start = time.perf_counter()
        with log.open("w") as handle:
            done = subprocess.run(command, cwd=REPO_ROOT, stdout=handle, stderr=subprocess.STDOUT, check=False)
        if done.returncode != 0:
            tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
            raise UserError(f"step {self.count} failed (exit {done.returncode}): {tail[0]}; its log: {log}")
        print(f"     {time.perf_counter() - start:.0f} s", flush=True)


def trained_checkpoint(path: Path, images: torch.Tensor, labels: torch.Tensor, size: RunSize, excluded: Sequence[int]) -> torch.nn.Module:
    """The ResNet-50 trained without `excluded`, from `path` when a run with the same training record
    saved it (the record beside it says how it was trained), else trained now and saved."""
    record = {"layout": dataclasses.asdict(size.layout), "training": dataclasses.asdict(size.training), "seed": SEED,
              "excluded": sorted(int(i) for i in excluded), "preprocessing": dataclasses.asdict(size.preprocessing)}
    record_path = path.with_suffix(".json")
    if path.is_file() and record_path.is_file() and json.loads(record_path.read_text()) == record:
        return pipeline.build_model(weights=None, checkpoint=path)
    model = digits.train_resnet50(images, labels, size.training, SEED, excluded)
    partial = path.with_suffix(".partial")
    torch.save(model.state_dict(), partial)
    partial.replace(path)
    write_json_atomically(record_path, record)
    return model


def same_label_share(scores: torch.Tensor, query_labels: torch.Tensor, train_labels: torch.Tensor) -> float:
    """Mean over queries of the share of its TOP_K most helpful training images that carry its label."""
    top = scores.topk(min(TOP_K, scores.shape[1]), dim=1).indices
    return (train_labels[top] == query_labels[:, None]).double().mean().item()


def mislabel_detection(self_scores: torch.Tensor, planted: Sequence[int]) -> Dict[str, float]:
    """ROC AUC of the self-influence scores for telling planted mislabels from the rest, the share of them
    found among the top 2 x planted, and the share of them above the median score."""
    scores = self_scores.double().numpy()
    is_planted = np.zeros(len(scores), dtype=bool)
    is_planted[list(planted)] = True
    top = np.argsort(-scores, kind="stable")[: 2 * len(planted)]
    return {
        "auc": float(roc_auc_score(is_planted, scores)),
        "recall_top2x": float(is_planted[top].sum() / len(planted)),
        "planted_above_median": float((scores[is_planted] > np.median(scores)).mean()),
    }


def removal_sets(scores: torch.Tensor, queries: Sequence[int], per_query: int, num_train: int) -> Dict[str, List[int]]:
    """The training images the removal test leaves out: each query's `per_query` most helpful ones (by
    EKFAC, full rank), and as many drawn at random (seeded)."""
    helpful = sorted({int(i) for query in queries for i in scores[query].topk(per_query).indices.tolist()})
    random = np.random.default_rng(SEED).choice(num_train, size=len(helpful), replace=False)
    return {"helpful": helpful, "random": sorted(int(i) for i in random)}


def analyze_argv(data_dir: Path, checkpoint: Path, output_dir: Path, size: RunSize) -> List[str]:
    """The flags every analyze.py command of the run shares: the user's data, checkpoint and sizes, the
    heuristic damping (0.1 x the mean eigenvalue; kronfluence's 1e-8 is for ImageNet-sized data) and one
    process without DataLoader workers (2 CPU cores)."""
    return [
        "--dataset_dir", str(data_dir), "--checkpoint", str(checkpoint),
        "--resize_size", str(size.preprocessing.resize_size), "--crop_size", str(size.preprocessing.crop_size),
        "--output_dir", str(output_dir), "--analysis_name", size.name, "--damping_factor", "heuristic",
        "--num_workers", "0", "--train_batch_size", str(ANALYSIS_BATCH_SIZE), "--profile",
        "--factor_examples", str(size.factor_examples),
        "--overwrite",  # the analysis is this script's own: results of an earlier checkpoint are replaced, matching ones reused
    ]


def run_suite(steps: Steps, argv: List[str], size: RunSize, num_queries: int, figure_dir: Path) -> Dict[str, Any]:
    """The suite's commands on the trained model: pairwise scores per strategy (full rank) and per EKFAC
    rank, the low-rank comparisons, one query's top influences, and self-influence per strategy.
    Returns the low-rank comparison summaries by rank."""
    output_dir = Path(argv[argv.index("--output_dir") + 1])
    data_dir = argv[argv.index("--dataset_dir") + 1]
    queries = ["--num_queries", str(num_queries), "--query_batch_size", str(min(num_queries, QUERY_BATCH_SIZE))]
    for strategy in sorted(size.strategies, key=STRATEGIES.index, reverse=True):  # EKFAC, the answer that matters most, first
        steps.run("analyze.py", *argv, *queries, "--factor_strategy", strategy)
    comparisons = {}
    for rank in size.low_ranks:
        steps.run("analyze.py", *argv, *queries, "--factor_strategy", "ekfac", "--query_gradient_rank", str(rank))
        full = naming.pairwise_scores_path(output_dir, size.name, naming.scores_name("ekfac", False, None))
        low = naming.pairwise_scores_path(output_dir, size.name, naming.scores_name("ekfac", False, rank))
        figure = figure_paths(figure_dir, size)["query_batching"] if rank == max(size.low_ranks) else output_dir / size.name / f"query_batching_rank{rank}.png"
        summary = figure.with_suffix(".json")
        steps.run("query_batching_analysis.py", "--full_scores", str(full), "--low_rank_scores", str(low),
                  "--figure", str(figure), "--summary", str(summary))
        comparisons[rank] = json.loads(summary.read_text())["statistics"]
    steps.run("top_influences.py", "--dataset_dir", data_dir, "--output_dir", str(output_dir), "--analysis_name", size.name,
              "--queries", "0", "--figure_dir", str(figure_dir))
    for strategy in size.self_influence_strategies:
        steps.run("analyze.py", *argv, "--factor_strategy", strategy, "--self_influence")
        steps.run("top_influences.py", "--dataset_dir", data_dir, "--output_dir", str(output_dir), "--analysis_name", size.name,
                  "--self", "--factor_strategy", strategy, "--figure_dir", str(output_dir / size.name))
    return comparisons


def sampled_self_influence(strategy: str, size: RunSize, data_dir: Path, checkpoint: Path, output_dir: Path, positions: Sequence[int]) -> torch.Tensor:
    """Self-influence of the training images at `positions` with the factors analyze.py fitted on the whole
    training set (reused, by the same record), through the suite's own factors and scoring code: EKFAC and
    KFAC precondition each training gradient in the eigenbasis of every layer, about 10^11 floating-point
    operations per image for ResNet-50 whatever the crop, so every image would not fit the time budget."""
    settings = AnalysisSettings(
        strategy=strategy, damping_factor=None, train_batch_size=ANALYSIS_BATCH_SIZE, num_workers=0,
        output_dir=str(output_dir), analysis_name=size.name, factor_examples=size.factor_examples, overwrite=True,
    )
    train = pipeline.get_imagenet_dataset("train", data_dir, preprocessing=size.preprocessing)
    sample = data.Subset(train, list(positions))
    source = f"checkpoint sha256:{pipeline.file_sha256(checkpoint)}"
    analyzer = make_analyzer(pipeline.build_model(weights=None, checkpoint=checkpoint), settings)
    factors = fit_factors(analyzer, train, settings, dataset_provenance(train, data.Subset(train, []), source))
    path = compute_self_scores(analyzer, sample, settings, dataset_provenance(sample, data.Subset(train, []), source), factors)
    return load_scores(path).clone()


def draw_planted_grid(path: Path, self_scores: torch.Tensor, positions: Sequence[int], train_paths: Sequence[str],
                      train_labels: torch.Tensor, record: Dict[str, Any], data_dir: Path, preprocessing: pipeline.Preprocessing,
                      count: int) -> None:
    """The `count` training images with the highest EKFAC self-influence (`self_scores[i]` is that of the
    training image at `positions[i]`), each captioned with its rank, training index, folder label and, for
    a planted mislabel, PLANTED and its true digit."""
    from top_influences import draw_grid  # pylint: disable=import-outside-toplevel

    true_label = {entry["path"]: entry["true_label"] for entry in record["mislabels"]}
    top = [positions[i] for i in self_scores.topk(count).indices.tolist()]
    cells: List[List[Optional[tuple]]] = []
    for rank, position in enumerate(top, 1):
        if (rank - 1) % SELF_GRID_COLUMNS == 0:
            cells.append([])
        relative = train_paths[position]
        caption = f"rank {rank}: train #{position}\nlabel {int(train_labels[position])}"
        caption += f"\nPLANTED (true {true_label[relative]})" if relative in true_label else "\n"
        cells[-1].append((str(data_dir / relative), caption))
    found = sum(train_paths[position] in true_label for position in top)
    draw_grid(path, cells, f"highest EKFAC self-influence on the digits: {found} of the top {count} are planted "
              f"mislabels ({len(true_label)} planted among the {len(positions)} scored)", preprocessing.view())


def report_table(result: Dict[str, Any]) -> str:
    """The report as text: one line per number, each named by its statistic."""
    lines = [
        f"trained ResNet-50 on {result['num_train']} digit scans ({result['num_planted']} planted mislabels), "
        f"crop {result['crop_size']} px",
        f"  train accuracy (given labels) {result['train_accuracy']:.3f}   val accuracy {result['val_accuracy']:.3f} "
        f"({result['num_queries']} images, the queries)   test accuracy {result['test_accuracy']:.3f}",
        f"  {'strategy':<10}{'same label, top-10 helpful':>28}{'mislabel ROC AUC':>18}{'recall, top 2x':>16}",
    ]
    for strategy in result["same_label_share_top10"]:
        auc = result["mislabel_auc"].get(strategy)
        recall = result["mislabel_recall_top2x"].get(strategy)
        lines.append(
            f"  {strategy:<10}{result['same_label_share_top10'][strategy]:>28.3f}"
            f"{'-' if auc is None else f'{auc:.3f}':>18}{'-' if recall is None else f'{recall:.3f}':>16}"
        )
    lines.append(f"  chance: same label {result['chance_same_label']:.3f}, ROC AUC 0.5, recall "
                 + ", ".join(f"{value:.3f} ({strategy})" for strategy, value in result["chance_recall_top2x"].items()))
    for strategy, scored in result["self_influence_scored"].items():
        lines.append(f"  self-influence ({strategy}) scored on {scored}")
    for rank, stats in result["low_rank"].items():
        lines.append(
            f"  EKFAC rank {rank} vs full rank, per query: Spearman mean {stats['spearman_mean']:.4f}, minimum "
            f"{stats['spearman_min']:.4f}; top-10 overlap mean {stats['top10_overlap_mean']:.3f} (upstream on ImageNet, rank 32: {SEED_SPEARMAN})"
        )
    removal = result["removal"]
    if removal:
        drop = removal["margin_drop"]
        lines.append(
            f"  removal test ({removal['num_queries']} queries, {removal['num_removed']} training images left out, "
            f"retrained): mean margin drop {drop['helpful']:+.3f} without the most helpful, {drop['random']:+.3f} without random ones"
        )
    lines.append(f"  {result['seconds']:.0f} s in all")
    return "\n".join(lines)


def removal_test(size: RunSize, ekfac_scores: torch.Tensor, tensors: Dict[str, torch.Tensor], base: torch.nn.Module, work_dir: Path) -> Dict[str, Any]:
    """Retrains from the same seed without each query's most helpful training images, and again without as
    many random ones; returns how far the queries' margins fell in each case (positive: fell)."""
    per_class = size.removal_queries_per_class
    queries = [int(i) for label in range(digits.NUM_CLASSES) for i in (tensors["val_labels"] == label).nonzero().flatten()[:per_class]]
    removed = removal_sets(ekfac_scores, queries, size.removal_per_query, len(tensors["train_labels"]))
    query_images, query_labels = tensors["val_images"][queries], tensors["val_labels"][queries]
    before = digits.margins(digits.logits_of(base, query_images), query_labels)
    drops = {}
    for kind, excluded in removed.items():
        model = trained_checkpoint(checkpoint_path(work_dir, f"_without_{kind}"), tensors["train_images"], tensors["train_labels"], size, excluded)
        after = digits.margins(digits.logits_of(model, query_images), query_labels)
        drops[kind] = (before - after).mean().item()
    return {"queries": queries, "num_queries": len(queries), "num_removed": len(removed["helpful"]), "removed": removed, "margin_drop": drops}


def validate(size: RunSize, work_dir: Path, output_dir: Path, figure_dir: Path) -> Dict[str, Any]:
    start = time.perf_counter()
    data_dir = work_dir / "data"
    record = digits.write_digits_folder(data_dir, size.layout)
    splits = {split: digits.load_split(data_dir, split, size.preprocessing) for split in digits.SPLITS}
    tensors = {f"{split}_{part}": tensor for split, (images, labels, _) in splits.items() for part, tensor in (("images", images), ("labels", labels))}
    train_paths = splits["train"][2]
    planted = digits.planted_positions(record, train_paths)
    checkpoint = checkpoint_path(work_dir)
    model = trained_checkpoint(checkpoint, tensors["train_images"], tensors["train_labels"], size, ())
    accuracy = {split: digits.accuracy(digits.logits_of(model, tensors[f"{split}_images"]), tensors[f"{split}_labels"]) for split in digits.SPLITS}
    print(f"ResNet-50 trained: accuracy train {accuracy['train']:.3f}, val {accuracy['val']:.3f}, test {accuracy['test']:.3f}", flush=True)

    num_queries = len(tensors["val_labels"])
    steps = Steps(work_dir)
    comparisons = run_suite(steps, analyze_argv(data_dir, checkpoint, output_dir, size), size, num_queries, figure_dir)
    pairwise = {s: load_scores(naming.pairwise_scores_path(output_dir, size.name, naming.scores_name(s, False, None))) for s in size.strategies}
    detection = {
        s: mislabel_detection(load_scores(naming.self_scores_path(output_dir, size.name, naming.self_scores_name(s, False))), planted)
        for s in size.self_influence_strategies
    }
    clean = sorted(set(range(len(train_paths))) - set(planted))
    sample = sorted(planted + np.random.default_rng(SEED).choice(clean, size=size.self_influence_sample, replace=False).tolist())
    in_sample = [sample.index(position) for position in planted]
    for strategy in size.sampled_self_influence_strategies:
        print(f"[--] self-influence ({strategy}) of {len(sample)} training images: the {len(planted)} planted mislabels and "
              f"{size.self_influence_sample} others drawn at random", flush=True)
        scores = sampled_self_influence(strategy, size, data_dir, checkpoint, output_dir, sample)
        detection[strategy] = mislabel_detection(scores, in_sample)
        if strategy == "ekfac":
            draw_planted_grid(figure_paths(figure_dir, size)["self_influence"], scores, sample, train_paths,
                              tensors["train_labels"], record, data_dir, size.preprocessing, min(SELF_GRID_IMAGES, len(sample)))
    removal = removal_test(size, pairwise["ekfac"], tensors, model, work_dir) if size.removal_per_query else None
    train_labels, query_labels = tensors["train_labels"], tensors["val_labels"]
    return {
        "run": size.name,
        "num_train": len(train_labels),
        "num_planted": len(planted),
        "num_queries": num_queries,
        "crop_size": size.preprocessing.crop_size,
        "resize_size": size.preprocessing.resize_size,
        "epochs": size.training.epochs,
        "train_accuracy": accuracy["train"],
        "val_accuracy": accuracy["val"],
        "test_accuracy": accuracy["test"],
        "chance_same_label": (train_labels[None, :] == query_labels[:, None]).double().mean().item(),
        "same_label_share_top10": {s: same_label_share(scores, query_labels, train_labels) for s, scores in pairwise.items()},
        "mislabel_auc": {s: value["auc"] for s, value in detection.items()},
        "mislabel_recall_top2x": {s: value["recall_top2x"] for s, value in detection.items()},
        "mislabel_above_median": {s: value["planted_above_median"] for s, value in detection.items()},
        "chance_recall_top2x": {
            **{s: 2 * len(planted) / len(train_labels) for s in size.self_influence_strategies},
            **{s: 2 * len(planted) / len(sample) for s in size.sampled_self_influence_strategies},
        },
        "self_influence_scored": {
            **{s: f"all {len(train_labels)} training images" for s in size.self_influence_strategies},
            **{s: f"{len(sample)} training images: the {len(planted)} planted and {size.self_influence_sample} drawn at random" for s in size.sampled_self_influence_strategies},
        },
        "low_rank": {
            str(rank): {
                "spearman_mean": stats["Spearman"]["mean"], "spearman_min": stats["Spearman"]["minimum"],
                "top10_overlap_mean": stats["top-10 overlap"]["mean"],
            }
            for rank, stats in comparisons.items()
        },
        "low_rank_spearman_mean": {str(rank): stats["Spearman"]["mean"] for rank, stats in comparisons.items()},
        "removal_margin_drop": removal["margin_drop"] if removal else {},
        "removal": removal,
        "figures": {name: str(path) for name, path in figure_paths(figure_dir, size).items()},
        "seconds": time.perf_counter() - start,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"A smaller run ({QUICK.layout.num_images} of the 1,797 scans, no KFAC, rank 32 only, {QUICK.self_influence_sample} sampled images for EKFAC self-influence): about 10 minutes on 2 cores instead of 28.")
    parser.add_argument("--json", type=Path, help="Also write the report as JSON to this file.")
    parser.add_argument("--work_dir", type=Path, help="Digits folder, checkpoints and step logs (default: data/trained_digits, or data/trained_digits_quick).")
    parser.add_argument("--output_dir", type=Path, default=Path(naming.DEFAULT_OUTPUT_DIR), help=f"analyze.py's --output_dir (default: {naming.DEFAULT_OUTPUT_DIR}); the analysis is named trained_digits[_quick].")
    parser.add_argument("--figure_dir", type=Path, default=Path(naming.DEFAULT_FIGURE_DIR), help=f"Where the figures go (default: {naming.DEFAULT_FIGURE_DIR}).")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = build_parser().parse_args(argv)
    setup_logging()
    size = QUICK if args.quick else FULL
    work_dir = (args.work_dir or Path("data") / size.name).resolve()
    with user_errors(PROG):
        # Checked before the training and the analyses, not after them.
        outputs = [*figure_paths(args.figure_dir, size).values(), work_dir / PROBE_NAME, args.output_dir / PROBE_NAME]
        for path in [*outputs, *([args.json] if args.json is not None else [])]:
            check_writable(path)
        result = validate(size, work_dir, args.output_dir.resolve(), args.figure_dir.resolve())
        print(report_table(result))
        if args.json is not None:
            write_json_atomically(args.json, result)
            print(f"report: {args.json}")
    return result


if __name__ == "__main__":
    main()
