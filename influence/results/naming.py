"""Where results live. Every script that writes or reads factors or scores takes their names and paths
from these pure functions of the configuration, so that `analyze.py` and the analysis scripts always
agree (kronfluence's layout: OUTPUT_DIR/ANALYSIS_NAME/factors_NAME/ and .../scores_NAME/)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

from kronfluence.utils.constants import FACTOR_SAVE_PREFIX, SCORE_SAVE_PREFIX

from influence.model import DEFAULT_ARCH

DEFAULT_OUTPUT_DIR = "influence_results"
DEFAULT_ANALYSIS_NAME = "imagenet"
DEFAULT_FIGURE_DIR = "figure"
DEMO_ANALYSIS_NAME = "demo"  # where `analyze.py --demo` writes, so demo results never mix with real ones
PAIRWISE_SCORES_FILE = "pairwise_scores.safetensors"
SELF_SCORES_FILE = "self_scores.safetensors"
# kronfluence sums the per-module scores under this key unless per-module scores are asked for.
SCORES_KEY = "all_modules"
RUN_CONFIG_FILE = "run_config.json"
# In every analysis folder: the file locked by the run writing there (locking.py), naming that run.
LOCK_FILE = ".lock"
HALF_SUFFIX = "_half"
LOW_RANK_SUFFIX = "_qlr"
# How pairwise scores may be rescaled (analyze.py --score_normalization): "none" is kronfluence's raw
# scores; the others name their own results (`ekfac_relative`, `ekfac_qlr32_cosine`).
NO_NORMALIZATION = "none"
NORMALIZATIONS = (NO_NORMALIZATION, "relative", "cosine")
NORMALIZATION_METADATA_KEY = "score_normalization"  # in a normalised score file's safetensors metadata


def default_analysis_name(demo: bool, arch: str = DEFAULT_ARCH) -> str:
    """`imagenet` / `demo` for ResNet-50 (the seed's), `imagenet_ARCH` / `demo_ARCH` for any other
    architecture, so that two models' results never meet in one folder."""
    name = DEMO_ANALYSIS_NAME if demo else DEFAULT_ANALYSIS_NAME
    return name if arch == DEFAULT_ARCH else f"{name}_{arch}"


def factors_name(strategy: str, use_half_precision: bool) -> str:
    """`ekfac`, `ekfac_half`, `kfac`, ...: the factors depend only on the strategy and the precision."""
    return strategy + (HALF_SUFFIX if use_half_precision else "")


def scores_name(
    strategy: str, use_half_precision: bool, query_gradient_rank: Optional[int], normalization: str = NO_NORMALIZATION
) -> str:
    """`ekfac`, `ekfac_half`, `ekfac_qlr32`, `ekfac_half_qlr32`, `ekfac_qlr32_relative`: `None` rank means
    full rank; the raw scores (normalization "none") carry no normalization suffix."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, not {normalization!r}")
    name = factors_name(strategy, use_half_precision)
    if query_gradient_rank is not None:
        name += f"{LOW_RANK_SUFFIX}{query_gradient_rank}"
    if normalization != NO_NORMALIZATION:
        name += f"_{normalization}"
    return name


def split_normalization(name: str) -> Tuple[str, str]:
    """(raw scores name, normalization) of a pairwise scores name: `ekfac_qlr32_cosine` ->
    (`ekfac_qlr32`, `cosine`), `ekfac` -> (`ekfac`, `none`)."""
    for normalization in NORMALIZATIONS[1:]:
        suffix = f"_{normalization}"
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], normalization
    return name, NO_NORMALIZATION


def rank_from_scores_name(name: str) -> Optional[int]:
    """The query-gradient rank a scores name was made with (`None` for full rank)."""
    head, sep, tail = split_normalization(name)[0].rpartition(LOW_RANK_SUFFIX)
    if sep and head and tail.isdigit():
        return int(tail)
    return None


def analysis_dir(output_dir: str | Path, analysis_name: str) -> Path:
    return Path(output_dir) / analysis_name


def factors_dir(output_dir: str | Path, analysis_name: str, name: str) -> Path:
    return analysis_dir(output_dir, analysis_name) / f"{FACTOR_SAVE_PREFIX}{name}"


def scores_dir(output_dir: str | Path, analysis_name: str, name: str) -> Path:
    return analysis_dir(output_dir, analysis_name) / f"{SCORE_SAVE_PREFIX}{name}"


def pairwise_scores_path(output_dir: str | Path, analysis_name: str, name: str) -> Path:
    return scores_dir(output_dir, analysis_name, name) / PAIRWISE_SCORES_FILE


SELF_SUFFIX = "_self"
QUERY_SELF_SUFFIX = "_query_self"
TOP_INFLUENCES_STEM = "top_influences"
SELF_INFLUENCE_STEM = "self_influence"


def self_scores_name(strategy: str, use_half_precision: bool) -> str:
    """`ekfac_self`, `ekfac_half_self`: self-influence scores have their own folder, since they depend on
    the factors and the training set but not on the queries (and are always full rank)."""
    return factors_name(strategy, use_half_precision) + SELF_SUFFIX


def self_scores_path(output_dir: str | Path, analysis_name: str, name: str) -> Path:
    return scores_dir(output_dir, analysis_name, name) / SELF_SCORES_FILE


def top_influences_tables(results_dir: str | Path, self_influence: bool) -> Tuple[Path, Path]:
    """The CSV and JSON files `top_influences.py` writes (beside the score file by default)."""
    stem = SELF_INFLUENCE_STEM if self_influence else TOP_INFLUENCES_STEM
    return Path(results_dir) / f"{stem}.csv", Path(results_dir) / f"{stem}.json"


def top_influences_figure_path(
    figure_dir: str | Path, analysis_name: str, name: str, query_index: Optional[int] = None
) -> Path:
    """`figure/top_influences_demo_ekfac_query0.png` for one query's influencers, or
    `figure/self_influence_demo_ekfac_self.png` (no query) for the self-influence ranking."""
    if query_index is None:
        return Path(figure_dir) / f"{SELF_INFLUENCE_STEM}_{analysis_name}_{name}.png"
    return Path(figure_dir) / f"{TOP_INFLUENCES_STEM}_{analysis_name}_{name}_query{query_index}.png"


EXPLORER_DIR = "explorer"
EXPLORER_INDEX = "index.html"


def explorer_dir(results_dir: str | Path) -> Path:
    """The static explorer `top_influences.py --html` writes (beside the score file by default)."""
    return Path(results_dir) / EXPLORER_DIR


def explorer_index(results_dir: str | Path) -> Path:
    """The page to open: `influence_results/demo/scores_ekfac/explorer/index.html`."""
    return explorer_dir(results_dir) / EXPLORER_INDEX


def query_self_scores_name(strategy: str, use_half_precision: bool) -> str:
    """`ekfac_query_self`: each query's measurement gradient preconditioned and dotted with itself, the
    query side of `--score_normalization cosine` (full rank, whatever the rank of the pairwise scores)."""
    return factors_name(strategy, use_half_precision) + QUERY_SELF_SUFFIX


def self_scores_name_for(scores_name: str) -> str:
    """The self-influence scores made with the same factors as pairwise scores `scores_name`:
    `ekfac_qlr32` -> `ekfac_self`, `ekfac_relative` -> `ekfac_self` (self-influence is always full rank
    and never normalised)."""
    scores_name = split_normalization(scores_name)[0]
    rank = rank_from_scores_name(scores_name)
    if rank is not None:
        scores_name = scores_name[: -len(f"{LOW_RANK_SUFFIX}{rank}")]
    return scores_name + SELF_SUFFIX
