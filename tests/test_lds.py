"""validation/lds.py: the subsets, the LDS and its noise ceiling against hand computations, and the cache
of retrainings (reused for the same record, retrained for another)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from validation import lds


def test_subsets_keep_half_and_do_not_depend_on_how_many_are_drawn():
    masks = lds.draw_subsets(11, 5, seed=3)
    assert masks.shape == (5, 11) and (masks.sum(axis=1) == 5).all()
    assert np.array_equal(lds.draw_subsets(11, 8, seed=3)[:5], masks)
    assert not np.array_equal(lds.draw_subsets(11, 5, seed=4), masks)
    assert len({row.tobytes() for row in masks}) == 5


def test_lds_matches_a_hand_computation():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    masks = np.array([[1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 1, 0]], dtype=bool)
    # predicted: query 0 sums 3, 7, 4; query 1 sums 7, 3, 6
    assert np.array_equal(lds.predicted_margins(scores, masks), [[3, 7], [7, 3], [4, 6]])
    measured = np.array([[0.1, 0.1], [0.9, 0.9], [0.2, 0.2]])
    # query 0: ranks (1, 3, 2) against (1, 3, 2): 1. Query 1: (3, 1, 2) against (1, 3, 2): d = (2, -2, 0),
    # 1 - 6 * 8 / (3 * (9 - 1)) = -1.
    result = lds.linear_datamodeling_score(scores, masks, measured)
    assert result["per_query"] == pytest.approx([1.0, -1.0])
    assert result["mean"] == pytest.approx(0.0) and result["num_queries"] == 2
    constant = lds.linear_datamodeling_score(scores, masks, np.ones((3, 2)))
    assert constant["num_queries"] == 0 and constant["mean"] is None  # undefined, not 0


def test_noise_ceiling_matches_a_hand_computation():
    measured = np.array([[0.0], [1.0], [2.0], [3.0]])  # variance (ddof 1) 5/3
    first, second = measured[:2], np.array([[0.5], [1.5]])  # noise: half the mean squared difference, 0.125
    ceiling = lds.noise_ceiling(measured, first, second)
    assert ceiling["mean"] == pytest.approx(math.sqrt(1 - 0.125 / (5 / 3)))
    assert ceiling["num_subsets"] == 2
    noisy = lds.noise_ceiling(measured, first, first + 10)  # noise larger than the spread: clipped at 0
    assert noisy["mean"] == 0.0


def test_retrainings_are_cached_and_retrained_for_another_record(tmp_path):
    masks = lds.draw_subsets(6, 2, seed=0)
    calls = []

    def train_and_measure(mask, seed):
        calls.append((int(np.flatnonzero(mask).sum()), seed))
        return torch.tensor([float(np.flatnonzero(mask).sum()), float(seed)])

    jobs = [lds.Retraining(0, 0), lds.Retraining(1, 0), lds.Retraining(0, 1)]
    first = lds.measured_margins(jobs, masks, tmp_path, {"epochs": 10}, train_and_measure)
    assert len(calls) == 3 and first.shape == (3, 2) and first[2, 1] == 1.0
    again = lds.measured_margins(jobs, masks, tmp_path, {"epochs": 10}, train_and_measure)
    assert len(calls) == 3 and np.array_equal(again, first)  # reused
    lds.measured_margins(jobs[:1], masks, tmp_path, {"epochs": 4}, train_and_measure)
    assert len(calls) == 4  # another training record: retrained
    lds.measured_margins(jobs[:1], lds.draw_subsets(6, 2, seed=1), tmp_path, {"epochs": 4}, train_and_measure)
    assert len(calls) == 5  # another subset under the same file name: retrained


def test_cached_margins_read_back_the_seeds_retrainings_and_refuse_other_images_or_queries(tmp_path):
    masks = lds.draw_subsets(6, 3, seed=0)

    def train_and_measure(mask, seed):
        return torch.tensor([float(np.flatnonzero(mask).sum()), float(seed)])

    jobs = [lds.Retraining(0, 0), lds.Retraining(1, 0), lds.Retraining(2, 0), lds.Retraining(0, 1)]
    measured = lds.measured_margins(jobs, masks, tmp_path, {"epochs": 10}, train_and_measure)
    read_masks, margins = lds.cached_margins(tmp_path, 6, 2, seed=0)
    assert np.array_equal(read_masks, masks) and np.array_equal(margins, measured[:3])  # the second seed's is not one of them
    with pytest.raises(ValueError, match="is not a retraining of these 8 training images and 2 queries"):
        lds.cached_margins(tmp_path, 8, 2, seed=0)
    with pytest.raises(ValueError, match="is not a retraining of these 6 training images and 3 queries"):
        lds.cached_margins(tmp_path, 6, 3, seed=0)
    with pytest.raises(ValueError, match="no LDS retrainings in"):
        lds.cached_margins(tmp_path / "empty", 6, 2, seed=0)
    other = lds.Retraining(2, 0).path(tmp_path)
    cached = json.loads(other.read_text())
    cached["record"]["epochs"] = 4
    other.write_text(json.dumps(cached))
    with pytest.raises(ValueError, match="subset002_seed0.json was trained otherwise than .*subset000_seed0.json"):
        lds.cached_margins(tmp_path, 6, 2, seed=0)
    other.write_text("{}")
    with pytest.raises(ValueError, match="subset002_seed0.json is not a cached retraining"):
        lds.cached_margins(tmp_path, 6, 2, seed=0)
