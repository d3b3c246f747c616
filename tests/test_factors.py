"""influence/analysis/factors.py: the training images the factors are fitted on (all, or a seeded subset of --factor_examples),
recorded with the factors so that another number is refused on rerun; the covariance and lambda fits in
partitions: the same factors and scores as one pass, and a fit killed in the lambda phase resumes from
its last finished partition to the scores of an uninterrupted run (`tests/small_model_cli.py`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, small_problem, tiny_counts, write_image_folder
from safetensors.torch import load_file
from small_model_cli import analyze_in_process

from influence.analysis.factors import COVARIANCE, LAMBDA, factor_examples
from influence.results import naming


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


# ------------------------------------------------------------------- partitioned covariance and lambda fits

WORKER = REPO_ROOT / "tests" / "small_model_cli.py"
FACTOR_PARTITIONS = 3  # 12 training images: 4 per partition, 2 batches of 2


def _command(dataset: Path, output_dir: Path, *extra: str) -> list:
    return [
        "--dataset_dir", str(dataset), "--weights", "none", "--num_workers", "0", "--train_batch_size", "2",
        "--query_batch_size", "2", "--num_queries", "2", "--damping_factor", "heuristic",
        "--factor_partitions", str(FACTOR_PARTITIONS), "--output_dir", str(output_dir), *extra,
    ]


def _run(argv, kill_at: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "KILL_AT": kill_at, "OMP_NUM_THREADS": "1"}  # one thread: the same float rounding in every run
    return subprocess.run([sys.executable, str(WORKER), *argv], env=env, capture_output=True, text=True, timeout=300)


def _scores(output_dir: Path) -> torch.Tensor:
    return load_file(str(naming.pairwise_scores_path(output_dir, "imagenet", "ekfac")))[naming.SCORES_KEY]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("data") / "imagenet", tiny_counts(train=6, val=2))


@pytest.fixture(scope="module")
def uninterrupted(dataset, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    done = _run(_command(dataset, output_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"lambda fit in {FACTOR_PARTITIONS} partitions" in done.stderr
    return output_dir


def test_partitioned_fit_equals_one_pass(dataset, uninterrupted, tmp_path):
    """A run killed in the second covariance partition and rerun unpartitioned fits everything in one pass
    (the finished partition, of another count, is discarded): the factors and scores of the partitioned
    run within float rounding."""
    assert _run(_command(dataset, tmp_path), "covariance:3").returncode == -signal.SIGKILL
    one_pass = _run([*_command(dataset, tmp_path), "--factor_partitions", "1"])
    assert one_pass.returncode == 0, one_pass.stderr[-3000:]
    assert "discarding 4 covariance partition files" in one_pass.stderr  # 4 files per partition
    factors = {name: naming.factors_dir(folder, "imagenet", "ekfac") for name, folder in (("parts", uninterrupted), ("one", tmp_path))}
    assert not LAMBDA.partition_files(factors["parts"]) and not COVARIANCE.partition_files(factors["parts"])  # summed, then removed
    for name in ("activation_covariance", "gradient_covariance", "num_activation_covariance_processed", "num_lambda_processed"):
        parts, one = (load_file(str(folder / f"{name}.safetensors")) for folder in factors.values())
        for key in one:  # sums over the same images in another order: equal up to float rounding
            torch.testing.assert_close(parts[key], one[key], rtol=1e-5, atol=1e-7)
    scores, one_pass_scores = _scores(uninterrupted), _scores(tmp_path)
    assert (scores - one_pass_scores).abs().max() <= 1e-5 * one_pass_scores.abs().max()  # 9e-7 measured


def test_fit_killed_mid_lambda_resumes_from_its_last_partition(dataset, uninterrupted, tmp_path):
    """SIGKILL in the second lambda partition, then in the third, then while scoring: each rerun keeps the
    partitions finished before (the killed holder's lock blocks nothing); the last rerun, with another
    --factor_partitions, reuses the finished factors and gives the uninterrupted run's scores."""
    argv = _command(dataset, tmp_path)
    factors = naming.factors_dir(tmp_path, "imagenet", "ekfac")
    for finished in (1, 2):
        killed = _run(argv, "lambda:3")  # the first batch of the partition after the finished ones
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
        assert len(LAMBDA.partition_files(factors)) == finished * len(LAMBDA.factor_names)
        assert (tmp_path / "imagenet" / naming.LOCK_FILE).is_file()  # left behind, naming the dead process
    killed = _run(argv, "scores:1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert f"lambda fit in {FACTOR_PARTITIONS} partitions, reusing 2 finished" in killed.stderr
    assert killed.stderr.count("Fitting Lambda matrices [0/") == 1  # only the last partition was fitted
    assert not LAMBDA.partition_files(factors) and (factors / "lambda_matrix.safetensors").is_file()
    # Finished factors are reused as they are (kronfluence compares their arguments with the scores').
    resumed = _run([*argv, "--factor_partitions", "2"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.equal(_scores(tmp_path), _scores(uninterrupted))


def test_more_factor_partitions_than_fitted_images_is_one_line(dataset, tmp_path):
    done = _run([*_command(dataset, tmp_path), "--factor_partitions", "13"])
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == "analyze.py: error: --factor_partitions 13 is more than the 12 fitted images"
