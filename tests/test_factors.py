"""factors.py: the training images the factors are fitted on (all, or a seeded subset of --factor_examples),
recorded with the factors so that another number is refused on rerun."""

from __future__ import annotations

import json

import pytest

from conftest import small_problem, tiny_counts, write_image_folder
from factors import factor_examples
from small_model_cli import analyze_in_process


def test_factor_examples_are_all_up_to_the_limit_else_a_seeded_subset():
    _, train, _ = small_problem(num_train=12)
    assert factor_examples(train, seed=0, limit=12) is train
    subset = factor_examples(train, seed=0, limit=5)
    assert len(subset) == 5 and subset.indices == sorted(subset.indices)
    assert factor_examples(train, seed=0, limit=5).indices == subset.indices
    assert factor_examples(train, seed=1, limit=5).indices != subset.indices


def test_factor_examples_flag_is_recorded_and_a_change_refused(monkeypatch, tmp_path, capsys):
    dataset = write_image_folder(tmp_path / "imagenet", tiny_counts(train=4))
    analyze_in_process(monkeypatch, dataset, tmp_path / "out", "--factor_strategy", "diagonal", "--factor_examples", "5")
    record = json.loads((tmp_path / "out" / "imagenet" / "factors_diagonal" / "run_config.json").read_text())
    assert record["depends_on"]["factor_examples"] == 5 and record["depends_on"]["num_train"] == 8
    capsys.readouterr()
    with pytest.raises(SystemExit) as caught:
        analyze_in_process(monkeypatch, dataset, tmp_path / "out", "--factor_strategy", "diagonal", "--factor_examples", "6")
    assert caught.value.code == 2 and "factor_examples 5 -> 6" in capsys.readouterr().err
