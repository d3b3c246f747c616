"""The linear datamodeling score (LDS; Park et al. 2023, TRAK; as in dattri): do the scores predict what
retraining does? M random subsets of half the training images are drawn; the model is retrained on each
(from the same seed, every kept image in the same batch at the same step); each query's margin is
measured. A score matrix predicts a subset's margin by the sum of the subset's scores for that query; the
LDS is the mean over queries of the Spearman correlation, across the M subsets, between prediction and
measurement. Retraining is chaotic, so no prediction reaches 1: the noise ceiling retrains a few of the
subsets from a second seed and says how much of the margins' spread across subsets is not noise.

Retrainings are cached, one small JSON file of margins per (subset, seed) with the record of what was
trained, and reused on rerun."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch
from scipy.stats import ConstantInputWarning, spearmanr
from tqdm.auto import tqdm

from influence.results.records import write_json_atomically

SUBSET_FRACTION = 0.5  # each subset keeps half the training images, as TRAK's and dattri's LDS
SPEARMAN = "Spearman"


def draw_subsets(num_train: int, num_subsets: int, seed: int) -> np.ndarray:
    """(num_subsets, num_train) booleans, each row keeping floor(num_train / 2) images drawn without
    replacement; row m depends only on (seed, m), so a run with more subsets shares the first ones."""
    keep = int(num_train * SUBSET_FRACTION)
    masks = np.zeros((num_subsets, num_train), dtype=bool)
    for subset in range(num_subsets):
        masks[subset, np.random.default_rng([seed, subset]).choice(num_train, size=keep, replace=False)] = True
    return masks


def predicted_margins(scores: torch.Tensor, masks: np.ndarray) -> np.ndarray:
    """(subsets, queries): for each subset, the sum of its training images' scores for each query."""
    return masks.astype(np.float64) @ scores.double().numpy().T


def per_query_spearman(predicted: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """For each query (column), Spearman's correlation across subsets (rows); NaN where either side is
    constant."""
    values = np.full(predicted.shape[1], np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConstantInputWarning)
        for query in range(predicted.shape[1]):
            values[query] = spearmanr(predicted[:, query], measured[:, query]).statistic
    return values


def linear_datamodeling_score(scores: torch.Tensor, masks: np.ndarray, measured: np.ndarray) -> Dict[str, Any]:
    """The LDS of `scores` (queries x training images) against `measured` margins (subsets x queries)."""
    per_query = per_query_spearman(predicted_margins(scores, masks), measured)
    finite = per_query[np.isfinite(per_query)]
    return {
        "statistic": SPEARMAN,
        "mean": float(finite.mean()) if finite.size else None,
        "sd": float(finite.std(ddof=1)) if finite.size > 1 else None,
        "num_queries": int(finite.size),
        "per_query": [None if not np.isfinite(v) else float(v) for v in per_query],
    }


def noise_ceiling(measured: np.ndarray, first_seed: np.ndarray, second_seed: np.ndarray) -> Dict[str, Any]:
    """How well any function of the subset could predict the margins, given that retraining from another
    seed moves them. Per query: the noise variance is half the mean squared difference between the two
    seeds' margins on the same subsets (`first_seed`, `second_seed`: those subsets x queries), the total
    variance that of `measured` across all subsets (ddof 1); the ceiling is sqrt(1 - noise / total),
    clipped at 0: the Pearson correlation that the seed-averaged margin itself would reach (it is a
    bound for Pearson's statistic; Spearman's is close to it for margins this near to normal)."""
    noise = 0.5 * ((first_seed - second_seed) ** 2).mean(axis=0)
    total = measured.var(axis=0, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ceiling = np.sqrt(np.clip(1.0 - noise / total, 0.0, None))
    finite = ceiling[np.isfinite(ceiling)]
    return {
        "statistic": "Pearson bound",
        "mean": float(finite.mean()) if finite.size else None,
        "num_subsets": int(first_seed.shape[0]),
        "noise_variance_mean": float(noise.mean()),
        "total_variance_mean": float(total.mean()),
        "per_query": [None if not np.isfinite(v) else float(v) for v in ceiling],
    }


def kept_fingerprint(mask: np.ndarray) -> str:
    return hashlib.sha256(np.flatnonzero(mask).astype(np.int64).tobytes()).hexdigest()


@dataclasses.dataclass(frozen=True)
class Retraining:
    """One retraining of the LDS: subset `subset` (a row of `draw_subsets`) trained from `seed`."""

    subset: int
    seed: int

    def path(self, cache_dir: Path) -> Path:
        return cache_dir / f"subset{self.subset:03d}_seed{self.seed}.json"


def measured_margins(
    retrainings: Sequence[Retraining],
    masks: np.ndarray,
    cache_dir: Path,
    record: Dict[str, Any],
    train_and_measure: Callable[[np.ndarray, int], torch.Tensor],
) -> np.ndarray:
    """(retrainings, queries) margins: from `cache_dir` where a file with the same record (`record`, the
    subset's fingerprint and the seed) exists, else `train_and_measure(mask, seed)` (the queries' margins
    of a model trained on the images `mask` keeps), saved as soon as it is done."""
    rows: List[List[float]] = []
    with tqdm(total=len(retrainings), desc="LDS retrainings", unit="model") as progress:
        for retraining in retrainings:
            path = retraining.path(cache_dir)
            wanted = {**record, "subset": retraining.subset, "seed": retraining.seed,
                      "kept_sha256": kept_fingerprint(masks[retraining.subset]), "kept": int(masks[retraining.subset].sum())}
            cached = json.loads(path.read_text()) if path.is_file() else {}
            if cached.get("record") == wanted:
                rows.append(cached["margins"])
                progress.set_postfix(reused=retraining.subset)
            else:
                margins = train_and_measure(masks[retraining.subset], retraining.seed)
                write_json_atomically(path, {"record": wanted, "margins": [float(m) for m in margins.tolist()]})
                rows.append([float(m) for m in margins.tolist()])
            progress.update(1)
    return np.asarray(rows, dtype=np.float64)


def cached_margins(cache_dir: Path, num_train: int, num_queries: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """The subsets and margins (subsets x queries) of every retraining from `seed` that `measured_margins`
    cached in `cache_dir`, subsets 0, 1, ... as long as they exist, for scoring other score files against
    the same retrainings; each file is checked to hold the subset `draw_subsets` gives and `num_queries`
    margins, and all of them to share one training record (layout, training, preprocessing: the caller
    must know they are of the model it scores). One line (ValueError) if there is none or one does not
    match."""
    rows = []
    while Retraining(len(rows), seed).path(cache_dir).is_file():
        path = Retraining(len(rows), seed).path(cache_dir)
        try:
            row = json.loads(path.read_text())
            row["record"], row["margins"]  # noqa: B018 (both must be there)
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path} is not a cached retraining (unreadable); rerun `python -m validation.trained_digits`") from None
        rows.append(row)
    if not rows:
        raise ValueError(f"no LDS retrainings in {cache_dir}: run `python -m validation.trained_digits` first")
    masks = draw_subsets(num_train, len(rows), seed)
    shared = {key: value for key, value in rows[0]["record"].items() if key not in ("subset", "kept_sha256", "kept")}
    for subset, row in enumerate(rows):
        if row["record"].get("kept_sha256") != kept_fingerprint(masks[subset]) or len(row["margins"]) != num_queries:
            raise ValueError(f"{Retraining(subset, seed).path(cache_dir)} is not a retraining of these {num_train} training images and {num_queries} queries")
        if {key: value for key, value in row["record"].items() if key not in ("subset", "kept_sha256", "kept")} != shared:
            raise ValueError(f"{Retraining(subset, seed).path(cache_dir)} was trained otherwise than {Retraining(0, seed).path(cache_dir)}: rerun `python -m validation.trained_digits`")
    return masks, np.asarray([row["margins"] for row in rows], dtype=np.float64)
