"""What the trained-digits validation shows a reader: the grid of the training images of highest
self-influence with the planted mislabels marked, the LDS per strategy and normalisation against the
noise ceiling (both saved as PNG files), and the report as text, one line per number."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from influence.analysis.agreement import SPEARMAN, overlap_name
from influence.data.preprocessing import Preprocessing
from influence.explorer.figures import draw_grid
from influence.model import DEFAULT_ARCH
from influence.model.architectures import display_name
from influence.results import naming

SEED_SPEARMAN = 0.94  # upstream's low-rank (rank 32) against full-rank figure on ImageNet
TOP_K = 10
SELF_GRID_COLUMNS = 8
TOP_FRACTION = 0.1  # kronfluence's mislabel measure: the share of planted mislabels in the top 10% of self-influence


def draw_planted_grid(path: Path, strategy: str, self_scores: torch.Tensor, train_paths: Sequence[str], train_labels: torch.Tensor,
                      record: Dict[str, Any], data_dir: Path, preprocessing: Preprocessing, count: int) -> None:
    """The `count` training images with the highest self-influence by `strategy`, each captioned with its
    rank, training index, folder label and, for a planted mislabel, PLANTED and its true digit."""
    true_label = {entry["path"]: entry["true_label"] for entry in record["mislabels"]}
    top = self_scores.topk(count).indices.tolist()
    cells: List[List[Optional[tuple]]] = []
    for rank, position in enumerate(top, 1):
        if (rank - 1) % SELF_GRID_COLUMNS == 0:
            cells.append([])
        relative = train_paths[position]
        caption = f"rank {rank}: train #{position}\nlabel {int(train_labels[position])}"
        caption += f"\nPLANTED (true {true_label[relative]})" if relative in true_label else "\n"
        cells[-1].append((str(data_dir / relative), caption))
    found = sum(train_paths[position] in true_label for position in top)
    draw_grid(path, cells, f"highest {strategy.upper()} self-influence on the digits: {found} of the top {count} are planted "
              f"mislabels ({len(true_label)} planted among the {len(train_paths)} training images)", preprocessing.view())


def draw_lds_figure(path: Path, lds_result: Dict[str, Dict[str, Dict[str, Any]]], ceiling: Dict[str, Any], num_subsets: int) -> None:
    """LDS per strategy and normalisation as grouped bars, the noise ceiling as a line."""
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel

    strategies = list(lds_result)
    width = 0.8 / len(naming.NORMALIZATIONS)
    figure, axes = plt.subplots(figsize=(7, 3.6))
    for offset, normalization in enumerate(naming.NORMALIZATIONS):
        values = [lds_result[s].get(normalization, {}).get("mean") for s in strategies]
        positions = [i + (offset - (len(naming.NORMALIZATIONS) - 1) / 2) * width for i in range(len(strategies))]
        axes.bar(positions, [np.nan if v is None else v for v in values], width, label=normalization)
    if ceiling["mean"] is not None:
        axes.axhline(ceiling["mean"], color="black", linestyle="--", linewidth=1, label=f"noise ceiling ({ceiling['num_subsets']} subsets, 2 seeds)")
    axes.axhline(0, color="grey", linewidth=0.5)
    axes.set_xticks(range(len(strategies)), strategies)
    axes.set_ylabel("LDS (mean Spearman over queries)")
    axes.set_title(f"Linear datamodeling score: {num_subsets} retrainings on random halves")
    axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def report_table(result: Dict[str, Any]) -> str:
    """The report as text: one line per number, each named by its statistic."""
    lines = [
        f"trained {display_name(result.get('arch', DEFAULT_ARCH))} on {result['num_train']} digit scans ({result['num_planted']} planted mislabels), "
        f"crop {result['crop_size']} px",
        f"  train accuracy (given labels) {result['train_accuracy']:.3f}   val accuracy {result['val_accuracy']:.3f} "
        f"({result['num_queries']} images, the queries)   test accuracy {result['test_accuracy']:.3f}",
        f"  {'strategy':<10}{'normalisation':<14}{'same label, top-10':>20}{'LDS (Spearman)':>16}",
    ]
    for strategy, by_normalization in result["lds"].items():
        for normalization, lds_value in by_normalization.items():
            share = result["same_label_share_top10"][normalization][strategy]
            lines.append(f"  {strategy:<10}{normalization:<14}{share:>20.3f}{lds_value['mean']:>16.3f}")
    ceiling = result["lds_ceiling"]
    lines.append(f"  LDS over {result['lds_subsets']} retrainings on random halves; noise ceiling {ceiling['mean']:.3f} "
                 f"({ceiling['statistic']}, {ceiling['num_subsets']} subsets retrained from a second seed); chance: same label "
                 f"{result['chance_same_label']:.3f}, LDS 0")
    lines.append(f"  {'strategy':<10}{'mislabel ROC AUC (95% bootstrap)':>34}{'top 2x':>9}{'top 10%':>9}   (self-influence of all {result['num_train']})")
    for strategy, value in result["mislabel"].items():
        lines.append(f"  {strategy:<10}{value['auc']:>17.3f} [{value['auc_95'][0]:.3f}, {value['auc_95'][1]:.3f}]"
                     f"{value['recall_top2x']:>11.3f}{value['recall_top10pct']:>9.3f}")
    lines.append(f"  chance: ROC AUC 0.5, top 2x {result['chance_recall_top2x']:.3f}, top 10% {TOP_FRACTION:.3f}")
    if "gradient_index" in result:  # the suite's smallest run builds no index
        index = result["gradient_index"]
        for normalization, stats in index["against_exact_ekfac"].items():
            lines.append(f"  {index['label']} ({normalization}) against exact EKFAC ({normalization}), per query: Spearman mean "
                         f"{stats[SPEARMAN]:.4f}, top-10 overlap mean {stats[overlap_name(TOP_K)]:.3f}; {index['bytes_per_image'] / 1e3:.1f} kB per image")
    for rank, stats in result["low_rank"].items():
        lines.append(
            f"  EKFAC rank {rank} vs full rank, per query: Spearman mean {stats['spearman_mean']:.4f}, minimum "
            f"{stats['spearman_min']:.4f}; top-10 overlap mean {stats['top10_overlap_mean']:.3f} (upstream on ImageNet, rank 32: {SEED_SPEARMAN})"
        )
    lines.append(f"  {result['seconds']:.0f} s in all")
    return "\n".join(lines)
