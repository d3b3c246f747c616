"""Do the scores mean anything on a trained model and real images? Answered offline on scikit-learn's
handwritten digits (real scans that ship inside scikit-learn), written as an ImageNet-layout folder with
planted mislabels, and a torchvision ResNet-50 trained on them here from random init. Then the suite's own
command lines run on that checkpoint and folder as a user would run them (analyze.py with each strategy,
rank and score normalisation, query_batching_analysis.py, top_influences.py, analyze.py --self_influence,
gradient_index.py build and query for EKFAC scores from an index),
and the answers are checked against what is known: the label of each query, the planted mislabels, and
the margins of models retrained on random halves of the training set (the linear datamodeling score,
validation/lds.py, with its noise ceiling).

    python -m validation.trained_digits [--quick] [--json PATH]

Prints a table and writes a JSON report; finished steps (folder, checkpoint, factors, scores,
retrainings) are reused when the same command runs again."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy.stats import bootstrap
from sklearn.metrics import roc_auc_score

import pipeline
from influence.analysis.agreement import SPEARMAN, overlap_name, row_statistics
from influence.analysis.scoring import load_scores
from influence.analysis.settings import STRATEGIES
from influence.index import shards as index_shards
from influence.results import naming
from influence.results.records import write_json_atomically
from influence.results.score_files import check_writable
from influence.runtime.cli import UserError, setup_logging, user_errors
from validation import digits, lds
from validation.report import TOP_FRACTION, TOP_K, draw_lds_figure, draw_planted_grid, report_table

PROG = "trained_digits.py"
REPO_ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger(PROG)

SEED = 0
ANALYSIS_BATCH_SIZE = 32  # training images per batch in every phase
QUERY_BATCH_SIZE = 40
SELF_GRID_IMAGES = 24
BOOTSTRAP_RESAMPLES = 1000
NORMALIZED = naming.NORMALIZATIONS[1:]
RELATIVE = NORMALIZED[0]
# Wall-clock on 2 cores from nothing (docs/validation.md): measured 96 and 14 before the gradient index
# steps, which add about 6 and 3 minutes (their measured query passes: 1.7-2.1 s per query).
FULL_MINUTES, QUICK_MINUTES = 101, 17
PROBE_NAME = "probe"  # a file name inside each output folder: check_writable checks its folder


@dataclasses.dataclass(frozen=True)
class RunSize:
    """Everything that makes the full run and `--quick` differ."""

    name: str
    layout: digits.DigitsLayout
    strategies: Sequence[str]  # pairwise scores at full rank, each with its own factors
    normalized_strategies: Sequence[str]  # also relative and cosine (and so the self-influence of every training image)
    training: digits.Training
    factor_examples: int  # training images the covariance and lambda factors are fitted on (analyze.py --factor_examples)
    preprocessing: pipeline.Preprocessing
    low_ranks: Sequence[int]
    self_influence_strategies: Sequence[str]  # listed by top_influences.py --self
    lds_subsets: int  # random halves of the training set, each retrained once (seed SEED)
    lds_ceiling_subsets: int  # the first of them retrained again from seed SEED + 1, for the noise ceiling
    index_dim: Optional[int]  # gradient_index.py's EKFAC-basis index: EKFAC scores from it, beside the exact ones (None: no index)
    index_normalizations: Sequence[str]  # which of them (each is one query pass, about 1.7 s per query on 2 cores)
    arch: str = pipeline.DEFAULT_ARCH  # the torchvision classifier trained and analysed (--arch)


FULL = RunSize(
    name="trained_digits",
    layout=digits.DigitsLayout(seed=SEED, num_images=1000, val_per_class=8),
    strategies=STRATEGIES,
    # KFAC's relative and cosine scores would need its self-influence of every training image too, 40
    # minutes more on 2 cores: not measured yet.
    normalized_strategies=("identity", "diagonal", "ekfac"),
    training=digits.Training(epochs=10),
    factor_examples=300,
    preprocessing=pipeline.Preprocessing(resize_size=54, crop_size=48),
    low_ranks=(32, 8),
    self_influence_strategies=("identity", "diagonal"),
    lds_subsets=32,
    lds_ceiling_subsets=4,
    index_dim=32,
    index_normalizations=(naming.NO_NORMALIZATION, naming.NORMALIZATIONS[1]),
)
QUICK = dataclasses.replace(
    FULL,
    name="trained_digits_quick",
    layout=digits.DigitsLayout(seed=SEED, num_images=600, val_per_class=4),
    strategies=("identity", "diagonal", "ekfac"),
    # EKFAC's self-influence of every training image (what its relative and cosine scores cost) would be
    # half the quick run's time: the full run measures it.
    normalized_strategies=("identity", "diagonal"),
    factor_examples=100,
    low_ranks=(32,),
    lds_subsets=12,
    lds_ceiling_subsets=3,
)
# The test suite's: the smallest run whose numbers still mean something (about 9 minutes on one of the
# suite's two workers, the other busy: its eigendecomposition alone takes nearly 3).
# EKFAC's self-influence of every training image (the normalisations) would take most of it, so only
# identity's. 40 px crops and 6 epochs on 184 training scans still reach 0.83 test accuracy (measured);
# at 32 px ResNet-50's last stage is 1 x 1 and the eigendecomposition of its covariances fails to
# converge on so few images.
# Rank 32 is the seed's second command line (the suite's one end-to-end ResNet-50 EKFAC run).
TEST = dataclasses.replace(
    QUICK,
    name="trained_digits_test",
    layout=digits.DigitsLayout(seed=SEED, num_images=240, val_per_class=1),
    training=digits.Training(epochs=6),
    preprocessing=pipeline.Preprocessing(resize_size=45, crop_size=40),
    factor_examples=50,
    strategies=("identity", "ekfac"),
    normalized_strategies=("identity",),
    low_ranks=(32,),
    self_influence_strategies=(),
    lds_subsets=2,
    lds_ceiling_subsets=1,
    # The index's query pass (about 40 s here) repeats EKFAC's query side; tests/test_gradient_index.py runs
    # its command lines on ResNet-50 and checks its scores against exact ones on small models.
    index_dim=None,
    index_normalizations=(),
)


def checkpoint_path(work_dir: Path, excluded_name: str = "", arch: str = pipeline.DEFAULT_ARCH) -> Path:
    return work_dir / f"{arch}_digits{excluded_name}.pt"


def for_arch(size: RunSize, arch: str) -> RunSize:
    """The run for another architecture: the same sizes, its own name (work folder, analysis, figures)."""
    return size if arch == pipeline.DEFAULT_ARCH else dataclasses.replace(size, name=f"{size.name}_{arch}", arch=arch)


def figure_paths(figure_dir: Path, size: RunSize) -> Dict[str, Path]:
    """The run's figures: the low-rank comparison (the full run's is the suite's headline
    `figure/query_batching.png`), the self-influence grid with the planted mislabels marked, and the LDS
    per strategy and normalisation."""
    suffix = "" if size is FULL else f"_{size.name}"
    return {
        "query_batching": figure_dir / f"query_batching{suffix}.png",
        "self_influence": figure_dir / f"self_influence_{size.name}_planted.png",
        "lds": figure_dir / f"lds_{size.name}.png",
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
    """The model (`size.arch`) trained without `excluded`, from `path` when a run with the same training record
    saved it (the record beside it says how it was trained), else trained now and saved."""
    record = {"layout": dataclasses.asdict(size.layout), "training": dataclasses.asdict(size.training), "seed": SEED,
              "excluded": sorted(int(i) for i in excluded), "preprocessing": dataclasses.asdict(size.preprocessing)}
    record_path = path.with_suffix(".json")
    if path.is_file() and record_path.is_file() and json.loads(record_path.read_text()) == record:
        return pipeline.build_model(weights=None, checkpoint=path, arch=size.arch, image_size=size.preprocessing.crop_size)
    model = digits.train_model(images, labels, size.training, SEED, excluded, size.arch)
    partial = path.with_suffix(".partial")
    torch.save(model.state_dict(), partial)
    partial.replace(path)
    write_json_atomically(record_path, record)
    return model


def same_label_share(scores: torch.Tensor, query_labels: torch.Tensor, train_labels: torch.Tensor) -> float:
    """Mean over queries of the share of its TOP_K most helpful training images that carry its label."""
    top = scores.topk(min(TOP_K, scores.shape[1]), dim=1).indices
    return (train_labels[top] == query_labels[:, None]).double().mean().item()


def pair_order_share(high: np.ndarray, low: np.ndarray) -> float:
    """The share of pairs (one of `high`, one of `low`) in which `high`'s is larger, ties counting half:
    the ROC AUC of `high` against `low`."""
    return float((high[:, None] > low[None, :]).mean() + 0.5 * (high[:, None] == low[None, :]).mean())


def mislabel_detection(self_scores: torch.Tensor, planted: Sequence[int]) -> Dict[str, Any]:
    """How well the self-influence scores tell the planted mislabels from the rest: ROC AUC with a 95%
    percentile bootstrap interval (BOOTSTRAP_RESAMPLES stratified resamples, seeded), the share
    of them among the top 2 x planted, among the top 10% (kronfluence's own measure), and above the median."""
    scores = self_scores.double().numpy()
    is_planted = np.zeros(len(scores), dtype=bool)
    is_planted[list(planted)] = True
    order = np.argsort(-scores, kind="stable")
    # Planted and clean images resampled apart (a stratified bootstrap): every resample keeps the planted
    # count, so none lacks a positive. The AUC of two samples: the share of (planted, clean) pairs in order.
    interval = bootstrap(
        (scores[is_planted], scores[~is_planted]), pair_order_share, vectorized=False,
        n_resamples=BOOTSTRAP_RESAMPLES, method="percentile", random_state=np.random.default_rng(SEED),
    ).confidence_interval
    return {
        "auc": float(roc_auc_score(is_planted, scores)),
        "auc_95": [float(interval.low), float(interval.high)],
        "recall_top2x": float(is_planted[order[: 2 * len(planted)]].sum() / len(planted)),
        "recall_top10pct": float(is_planted[order[: math.ceil(TOP_FRACTION * len(scores))]].sum() / len(planted)),
        "planted_above_median": float((scores[is_planted] > np.median(scores)).mean()),
    }


def model_argv(data_dir: Path, checkpoint: Path, output_dir: Path, size: RunSize) -> List[str]:
    """The flags analyze.py and gradient_index.py share here: the data, the checkpoint and its sizes, the
    analysis folder, one process without DataLoader workers (2 CPU cores)."""
    return [
        "--arch", size.arch, "--dataset_dir", str(data_dir), "--checkpoint", str(checkpoint),
        "--resize_size", str(size.preprocessing.resize_size), "--crop_size", str(size.preprocessing.crop_size),
        "--output_dir", str(output_dir), "--analysis_name", size.name, "--num_workers", "0",
        "--overwrite",  # the analysis is this script's own: results of an earlier checkpoint are replaced, matching ones reused
    ]


def analyze_argv(data_dir: Path, checkpoint: Path, output_dir: Path, size: RunSize) -> List[str]:
    """The flags every analyze.py command of the run shares: `model_argv`'s, the heuristic damping (0.1 x
    the mean eigenvalue; kronfluence's 1e-8 is for ImageNet-sized data) and the factors' sizes."""
    return [
        *model_argv(data_dir, checkpoint, output_dir, size), "--damping_factor", "heuristic",
        "--train_batch_size", str(ANALYSIS_BATCH_SIZE), "--profile", "--factor_examples", str(size.factor_examples),
    ]


def index_label(size: RunSize) -> str:
    """The index's column in the tables and the LDS figure: `index32` (its EKFAC scores)."""
    return f"index{size.index_dim}"


def index_path(output_dir: Path, size: RunSize, normalization: str) -> Path:
    return index_shards.index_scores_dir(output_dir, size.name, "ekfac", size.index_dim, "ekfac", normalization) / naming.PAIRWISE_SCORES_FILE


def run_index(steps: Steps, argv: List[str], size: RunSize, num_queries: int) -> None:
    """gradient_index.py on the trained model: an index of every training image in the EKFAC eigenbasis
    (size.index_dim), then the queries' EKFAC scores from it for each of size.index_normalizations (no
    pass over the training images; the relative scores' self-influence comes from the index itself)."""
    index = [*argv, "--index_dim", str(size.index_dim)]
    steps.run("gradient_index.py", "build", *index, "--train_batch_size", str(ANALYSIS_BATCH_SIZE))
    for normalization in size.index_normalizations:
        steps.run("gradient_index.py", "query", *index, "--damping_factor", "heuristic", "--num_queries", str(num_queries),
                  "--query_batch_size", str(min(num_queries, QUERY_BATCH_SIZE)), "--score_normalization", normalization)


def index_agreement(exact: Dict[str, torch.Tensor], index: Dict[str, torch.Tensor]) -> Dict[str, Dict[str, float]]:
    """Per normalisation the run has exactly, the index's scores against the exact EKFAC ones, query by
    query (means)."""
    result = {}
    for normalization, scores in index.items():
        if normalization not in exact:
            continue
        rows = [row_statistics(full.numpy(), approximate.numpy()) for full, approximate in zip(exact[normalization], scores)]
        result[normalization] = {name: float(np.nanmean([row[name] for row in rows])) for name in (SPEARMAN, overlap_name(TOP_K))}
    return result


def pairwise_path(output_dir: Path, size: RunSize, strategy: str, normalization: str = naming.NO_NORMALIZATION, rank: Optional[int] = None) -> Path:
    return naming.pairwise_scores_path(output_dir, size.name, naming.scores_name(strategy, False, rank, normalization))


def run_suite(steps: Steps, argv: List[str], size: RunSize, num_queries: int, figure_dir: Path) -> Dict[str, Any]:
    """The suite's commands on the trained model: pairwise scores per strategy (full rank, raw and, for
    the normalised strategies, relative and cosine) and per EKFAC rank, the low-rank comparisons, one
    query's top influences (raw and relative EKFAC), and the self-influence listings. Returns the low-rank
    comparison summaries by rank."""
    output_dir = Path(argv[argv.index("--output_dir") + 1])
    data_dir = argv[argv.index("--dataset_dir") + 1]
    queries = ["--num_queries", str(num_queries), "--query_batch_size", str(min(num_queries, QUERY_BATCH_SIZE))]
    for strategy in sorted(size.strategies, key=STRATEGIES.index, reverse=True):  # EKFAC, the answer that matters most, first
        steps.run("analyze.py", *argv, *queries, "--factor_strategy", strategy)
        if strategy in size.normalized_strategies:
            for normalization in NORMALIZED:  # relative first: its self-influence pass is cosine's too
                steps.run("analyze.py", *argv, *queries, "--factor_strategy", strategy, "--score_normalization", normalization)
    comparisons = {}
    for rank in size.low_ranks:
        steps.run("analyze.py", *argv, *queries, "--factor_strategy", "ekfac", "--query_gradient_rank", str(rank))
        full, low = pairwise_path(output_dir, size, "ekfac"), pairwise_path(output_dir, size, "ekfac", rank=rank)
        figure = figure_paths(figure_dir, size)["query_batching"] if rank == max(size.low_ranks) else output_dir / size.name / f"query_batching_rank{rank}.png"
        summary = figure.with_suffix(".json")
        steps.run("query_batching_analysis.py", "--full_scores", str(full), "--low_rank_scores", str(low),
                  "--figure", str(figure), "--summary", str(summary))
        comparisons[rank] = json.loads(summary.read_text())["statistics"]
    shown = ["--dataset_dir", data_dir, "--output_dir", str(output_dir), "--analysis_name", size.name, "--queries", "0", "--figure_dir", str(figure_dir)]
    steps.run("top_influences.py", *shown)
    if "ekfac" in size.normalized_strategies:
        steps.run("top_influences.py", *shown, "--score_normalization", RELATIVE)
    for strategy in size.self_influence_strategies:
        steps.run("analyze.py", *argv, "--factor_strategy", strategy, "--self_influence")
        steps.run("top_influences.py", "--dataset_dir", data_dir, "--output_dir", str(output_dir), "--analysis_name", size.name,
                  "--self", "--factor_strategy", strategy, "--figure_dir", str(output_dir / size.name))
    return comparisons


def lds_margins(size: RunSize, tensors: Dict[str, torch.Tensor], work_dir: Path) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The LDS retrainings, made or reused: the subsets, every query's margin after each subset's
    retraining (subsets x queries), and after the first `lds_ceiling_subsets` retrained from the second seed."""
    train_images, train_labels = tensors["train_images"], tensors["train_labels"]
    masks = lds.draw_subsets(len(train_labels), size.lds_subsets, SEED)

    def train_and_measure(mask: np.ndarray, seed: int) -> torch.Tensor:
        model = digits.train_model(train_images, train_labels, size.training, seed, np.flatnonzero(~mask).tolist(), size.arch)
        return digits.margins(digits.logits_of(model, tensors["val_images"]), tensors["val_labels"])

    record = {"layout": dataclasses.asdict(size.layout), "training": dataclasses.asdict(size.training),
              "preprocessing": dataclasses.asdict(size.preprocessing), "num_queries": len(tensors["val_labels"])}
    retrainings = [lds.Retraining(subset, SEED) for subset in range(size.lds_subsets)]
    retrainings += [lds.Retraining(subset, SEED + 1) for subset in range(size.lds_ceiling_subsets)]
    margins = lds.measured_margins(retrainings, masks, work_dir / "lds", record, train_and_measure)
    return masks, margins[: size.lds_subsets], margins[size.lds_subsets :]


def lds_report(masks: np.ndarray, measured: np.ndarray, second: np.ndarray, pairwise: Dict[str, Dict[str, torch.Tensor]]) -> Dict[str, Any]:
    """Every strategy and normalisation scored against the retrainings, and the noise ceiling."""
    return {
        "lds": {strategy: {normalization: lds.linear_datamodeling_score(scores, masks, measured) for normalization, scores in by_normalization.items()}
                for strategy, by_normalization in pairwise.items()},
        "lds_ceiling": lds.noise_ceiling(measured, measured[: len(second)], second),
        "lds_subsets": len(masks),
        "lds_subset_size": int(masks[0].sum()),
    }


def validate(size: RunSize, work_dir: Path, output_dir: Path, figure_dir: Path) -> Dict[str, Any]:
    start = time.perf_counter()
    data_dir = work_dir / "data"
    record = digits.write_digits_folder(data_dir, size.layout)
    splits = {split: digits.load_split(data_dir, split, size.preprocessing) for split in digits.SPLITS}
    tensors = {f"{split}_{part}": tensor for split, (images, labels, _) in splits.items() for part, tensor in (("images", images), ("labels", labels))}
    train_paths = splits["train"][2]
    planted = digits.planted_positions(record, train_paths)
    checkpoint = checkpoint_path(work_dir, arch=size.arch)
    model = trained_checkpoint(checkpoint, tensors["train_images"], tensors["train_labels"], size, ())
    accuracy = {split: digits.accuracy(digits.logits_of(model, tensors[f"{split}_images"]), tensors[f"{split}_labels"]) for split in digits.SPLITS}
    print(f"{pipeline.display_name(size.arch)} trained: accuracy train {accuracy['train']:.3f}, val {accuracy['val']:.3f}, test {accuracy['test']:.3f}", flush=True)

    # The retrainings first: they need no scores, and once cached a failed step later costs none of them.
    print(f"[--] LDS: {size.lds_subsets} retrainings on random halves of the training set, {size.lds_ceiling_subsets} again from a second seed", flush=True)
    retrained = lds_margins(size, tensors, work_dir)
    num_queries = len(tensors["val_labels"])
    steps = Steps(work_dir)
    comparisons = run_suite(steps, analyze_argv(data_dir, checkpoint, output_dir, size), size, num_queries, figure_dir)
    pairwise = {
        strategy: {normalization: load_scores(pairwise_path(output_dir, size, strategy, normalization))
                   for normalization in naming.NORMALIZATIONS if normalization == naming.NO_NORMALIZATION or strategy in size.normalized_strategies}
        for strategy in sorted(size.strategies, key=STRATEGIES.index)
    }
    index_report = {}
    if size.index_dim is not None:  # the index's steps after every analyze.py step
        run_index(steps, model_argv(data_dir, checkpoint, output_dir, size), size, num_queries)
        index = {normalization: load_scores(index_path(output_dir, size, normalization)) for normalization in size.index_normalizations}
        pairwise[index_label(size)] = index
        index_report = {"gradient_index": {
            "label": index_label(size), "index_dim": size.index_dim,
            "bytes_per_image": json.loads((index_shards.index_dir(output_dir, size.name, "ekfac", size.index_dim) / naming.RUN_CONFIG_FILE).read_text())["resolved"]["bytes_per_image"],
            "against_exact_ekfac": index_agreement(pairwise["ekfac"], index),
        }}
    # Self-influence of every training image, from the normalisations' pass: every strategy on the same images.
    self_scores = {s: load_scores(naming.self_scores_path(output_dir, size.name, naming.self_scores_name(s, False))) for s in size.normalized_strategies}
    grid_strategy = "ekfac" if "ekfac" in self_scores else size.normalized_strategies[-1]
    draw_planted_grid(figure_paths(figure_dir, size)["self_influence"], grid_strategy, self_scores[grid_strategy], train_paths,
                      tensors["train_labels"], record, data_dir, size.preprocessing, min(SELF_GRID_IMAGES, len(train_paths)))
    counterfactual = lds_report(*retrained, pairwise)
    draw_lds_figure(figure_paths(figure_dir, size)["lds"], counterfactual["lds"], counterfactual["lds_ceiling"], size.lds_subsets)
    train_labels, query_labels = tensors["train_labels"], tensors["val_labels"]
    return {
        "run": size.name,
        "arch": size.arch,
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
        "same_label_share_top10": {
            normalization: {s: same_label_share(by[normalization], query_labels, train_labels) for s, by in pairwise.items() if normalization in by}
            for normalization in naming.NORMALIZATIONS
        },
        **counterfactual,
        "mislabel": {s: mislabel_detection(scores, planted) for s, scores in self_scores.items()},
        "chance_recall_top2x": 2 * len(planted) / len(train_labels),
        "low_rank": {
            str(rank): {
                "spearman_mean": stats["Spearman"]["mean"], "spearman_min": stats["Spearman"]["minimum"],
                "top10_overlap_mean": stats["top-10 overlap"]["mean"],
            }
            for rank, stats in comparisons.items()
        },
        **index_report,
        "figures": {name: str(path) for name, path in figure_paths(figure_dir, size).items()},
        "seconds": time.perf_counter() - start,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"A smaller run ({QUICK.layout.num_images} of the 1,797 scans, no KFAC, no relative or cosine EKFAC, rank 32 only, {QUICK.lds_subsets} LDS retrainings instead of {FULL.lds_subsets}): about {QUICK_MINUTES} minutes on 2 cores instead of {FULL_MINUTES}.")
    parser.add_argument("--arch", default=pipeline.DEFAULT_ARCH, metavar="NAME", help="The torchvision classifier trained on the digits and analysed, any of analyze.py's --arch (default: resnet50); another one's work folder, analysis and figures carry its name (trained_digits_resnet18).")
    parser.add_argument("--json", type=Path, help="Also write the report as JSON to this file.")
    parser.add_argument("--work_dir", type=Path, help="Digits folder, checkpoints, LDS retrainings and step logs (default: data/trained_digits, or data/trained_digits_quick).")
    parser.add_argument("--output_dir", type=Path, default=Path(naming.DEFAULT_OUTPUT_DIR), help=f"analyze.py's --output_dir (default: {naming.DEFAULT_OUTPUT_DIR}); the analysis is named trained_digits[_quick].")
    parser.add_argument("--figure_dir", type=Path, default=Path(naming.DEFAULT_FIGURE_DIR), help=f"Where the figures go (default: {naming.DEFAULT_FIGURE_DIR}).")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = pipeline.arch_problem(args.arch)
    if problem:
        parser.error(problem)
    setup_logging()
    size = for_arch(QUICK if args.quick else FULL, args.arch)
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
