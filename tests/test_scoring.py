"""influence/analysis/scoring.py: scores in resumable partitions (a run killed in any phase, or interrupted with Ctrl-C or a
full disk, resumes to the same scores; partitioning does not change them), self-influence in partitions,
and the number of query batches gathered per pass over the training set.

The interruption tests run `tests/small_model_cli.py`: analyze.py's real command line with a tiny CNN,
so each run takes seconds and can be killed at a chosen step of each phase."""

from __future__ import annotations

import copy
import json
import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, SmallCNN, small_problem, tiny_counts, write_image_folder
from safetensors import safe_open
from small_model_cli import analyze_in_process
from test_task import run_scores

from influence.analysis.scoring import PAIRWISE, SELF, accumulation_steps, query_gradient_bytes, training_side_bytes
from influence.analysis.settings import AnalysisSettings
from influence.results import naming
from influence.results.records import discard_torn_files

WORKER = REPO_ROOT / "tests" / "small_model_cli.py"
PARTITIONS = 3
GIB = 1024**3


def _scores(path: Path) -> torch.Tensor:
    with safe_open(str(path), framework="pt") as handle:
        return handle.get_tensor(naming.SCORES_KEY)


def _command(dataset: Path, output_dir: Path, *extra: str) -> list:
    return [
        "--dataset_dir", str(dataset), "--weights", "none", "--num_workers", "0", "--train_batch_size", "2",
        "--query_batch_size", "2", "--num_queries", "2", "--damping_factor", "heuristic",
        "--score_partitions", str(PARTITIONS), "--output_dir", str(output_dir), *extra,
    ]


def _run(argv, kill_at: str = "", **kwargs) -> subprocess.CompletedProcess:
    # One thread: the same float summation order in every run, so resumed and uninterrupted scores are equal.
    env = {**os.environ, "KILL_AT": kill_at, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(WORKER), *argv], env=env, capture_output=True, text=True, timeout=300, **kwargs)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """2 classes x 6 training images (12: 4 per score partition, 6 batches per factor phase) and 2 x 2
    validation images."""
    return write_image_folder(tmp_path_factory.mktemp("data") / "imagenet", tiny_counts(train=6, val=2))


@pytest.fixture(scope="module")
def uninterrupted(dataset, tmp_path_factory):
    """Full-rank and rank-2 EKFAC scores of runs that were never interrupted (the rank-2 run reuses the
    factors), and rank-2 scores computed in one partition."""
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    for extra in ([], ["--query_gradient_rank", "2"]):
        done = _run(_command(dataset, output_dir, *extra))
        assert done.returncode == 0, done.stderr[-3000:]
    one_partition = tmp_path_factory.mktemp("one_partition")
    done = _run([*_command(dataset, one_partition, "--query_gradient_rank", "2"), "--score_partitions", "1"])
    assert done.returncode == 0, done.stderr[-3000:]
    return {
        "ekfac": _scores(naming.pairwise_scores_path(output_dir, "imagenet", "ekfac")),
        "ekfac_qlr2": _scores(naming.pairwise_scores_path(output_dir, "imagenet", "ekfac_qlr2")),
        "ekfac_qlr2_one_partition": _scores(naming.pairwise_scores_path(one_partition, "imagenet", "ekfac_qlr2")),
    }


def test_partitioning_does_not_change_low_rank_scores(uninterrupted):
    # Every partition draws the randomised SVD of the query gradients from the same seed.
    assert torch.equal(uninterrupted["ekfac_qlr2"], uninterrupted["ekfac_qlr2_one_partition"])
    assert not torch.equal(uninterrupted["ekfac_qlr2"], uninterrupted["ekfac"])


def test_run_killed_in_every_phase_resumes_to_the_same_scores(dataset, uninterrupted, tmp_path):
    """SIGKILL in covariance fitting, then (same command) in the eigendecomposition, then in lambda fitting,
    then in the second of three score partitions; the last rerun finishes with the uninterrupted scores."""
    argv = _command(dataset, tmp_path)
    factors = naming.factors_dir(tmp_path, "imagenet", "ekfac")
    kills = ["covariance:4", "eigendecomposition:2", "lambda:3", "scores:3"]  # 6 batches per phase, 3 layers
    finished_before = {}
    for kill_at in kills:
        killed = _run(argv, kill_at)
        assert killed.returncode == -signal.SIGKILL, (kill_at, killed.stderr[-3000:])
        finished_before[kill_at] = {p.name: p.stat().st_mtime_ns for p in factors.glob("*.safetensors")}
    resumed = _run(argv)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"reusing finished partition 1 of {PARTITIONS}" in resumed.stderr
    assert "partition 2 of 3" in resumed.stderr and "reusing finished partition 2" not in resumed.stderr
    # Finished phases were not redone: the factors written before the score kill are untouched.
    assert {p.name: p.stat().st_mtime_ns for p in factors.glob("*.safetensors")} == finished_before["scores:3"]
    assert "lambda_matrix.safetensors" in finished_before["scores:3"]
    assert "lambda_matrix.safetensors" not in finished_before["lambda:3"]
    assert "activation_eigenvectors.safetensors" in finished_before["lambda:3"]
    assert "activation_eigenvectors.safetensors" not in finished_before["eigendecomposition:2"]
    assert "activation_covariance.safetensors" in finished_before["eigendecomposition:2"]
    assert "activation_covariance.safetensors" not in finished_before["covariance:4"]
    scores_dir = naming.scores_dir(tmp_path, "imagenet", "ekfac")
    assert torch.equal(_scores(scores_dir / naming.PAIRWISE_SCORES_FILE), uninterrupted["ekfac"])
    assert not list(scores_dir.glob(PAIRWISE.partition_glob))  # joined, then removed


def test_low_rank_run_killed_while_scoring_resumes_to_the_same_scores(dataset, uninterrupted, tmp_path):
    argv = _command(dataset, tmp_path, "--query_gradient_rank", "2")
    assert _run(argv, "scores:5").returncode == -signal.SIGKILL  # in the third partition
    # Low-rank scores follow the query batching (the randomised SVD draws one projection per batch), so
    # finished partitions are not mixed with ones computed in other batches.
    rebatched = _run([*argv, "--query_batch_size", "1"])
    assert rebatched.returncode == 2 and "query_batch_size 2 -> 1" in rebatched.stderr, rebatched.stderr[-2000:]
    resumed = _run(argv)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "reusing finished partition 2 of 3" in resumed.stderr
    assert torch.equal(_scores(naming.pairwise_scores_path(tmp_path, "imagenet", "ekfac_qlr2")), uninterrupted["ekfac_qlr2"])


def test_ctrl_c_says_how_to_resume_and_the_rerun_finishes(dataset, uninterrupted, tmp_path):
    argv = _command(dataset, tmp_path)
    interrupted = subprocess.Popen(
        [sys.executable, str(WORKER), *argv], env={**os.environ, "KILL_AT": "lambda:2:SIGINT", "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    _, err = interrupted.communicate(timeout=300)
    assert interrupted.returncode == 130, err[-3000:]
    assert "analyze.py: interrupted; finished results are kept, run the same command again to resume." in err
    assert "Traceback" not in err
    resumed = _run(argv)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.equal(_scores(naming.pairwise_scores_path(tmp_path, "imagenet", "ekfac")), uninterrupted["ekfac"])


def test_rerun_with_other_partitioning_discards_unjoined_partitions(dataset, uninterrupted, tmp_path):
    argv = _command(dataset, tmp_path)
    assert _run(argv, "scores:5").returncode == -signal.SIGKILL
    resumed = _run([*argv, "--score_partitions", "2"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "discarding 2 partial score files" in resumed.stderr
    assert torch.equal(_scores(naming.pairwise_scores_path(tmp_path, "imagenet", "ekfac")), uninterrupted["ekfac"])


def test_rerun_with_other_query_batches_per_pass_keeps_finished_partitions(dataset, uninterrupted, tmp_path):
    """The automatic number of query batches per pass follows the memory free at start, so a resumed run
    may gather them differently; its finished partitions are still the same scores and are kept."""
    argv = _command(dataset, tmp_path, "--query_batch_size", "1", "--query_gradient_accumulation_steps", "1")
    assert _run(argv, "scores:5").returncode == -signal.SIGKILL  # the first batch of the second partition
    resumed = _run([*argv[:-1], "2"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"reusing finished partition 1 of {PARTITIONS}" in resumed.stderr and "discarding" not in resumed.stderr
    scores = _scores(naming.pairwise_scores_path(tmp_path, "imagenet", "ekfac"))
    torch.testing.assert_close(scores, uninterrupted["ekfac"], rtol=1e-5, atol=0)


# ------------------------------------------------------------------------------ changed inputs


# ----------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("argv, message", [
    (["--score_partitions", "0"], "must be a positive integer"),
    (["--score_partitions", "13"], "--score_partitions 13 is more than the 12 training images"),
])
def test_impossible_partitions_are_refused(dataset, tmp_path, argv, message):
    done = _run([*_command(dataset, tmp_path), *argv])
    assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]
    assert not naming.factors_dir(tmp_path, "imagenet", "ekfac").exists()


def _file_size_limit(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    return apply


def test_full_disk_is_one_line_and_the_rerun_finishes(dataset, uninterrupted, tmp_path):
    """A file-size limit stands in for a full disk: the 32 KB covariance file fails part-way through its
    write (EFBIG, where a full disk gives ENOSPC; both are handled alike)."""
    argv = _command(dataset, tmp_path)
    full = _run(argv, preexec_fn=_file_size_limit(8 << 10))
    assert full.returncode == 2, full.stderr[-3000:]
    last = full.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"analyze\.py: error: cannot write results under {re.escape(str(tmp_path))}/imagenet \(File too large\); free "
        r"space or fix the folder, then run the same command again: finished results are kept, the unfinished file was removed",
        last,
    ), last
    factors = naming.factors_dir(tmp_path, "imagenet", "ekfac")
    assert not (factors / "activation_covariance.safetensors").exists()
    assert discard_torn_files(factors) == []  # nothing half-written is left to be taken as finished
    again = _run(argv)
    assert again.returncode == 0, again.stderr[-3000:]
    assert torch.equal(_scores(naming.pairwise_scores_path(tmp_path, "imagenet", "ekfac")), uninterrupted["ekfac"])


def test_self_influence_in_partitions_equals_one_pass(monkeypatch, tmp_path):
    dataset = write_image_folder(tmp_path / "imagenet", tiny_counts())
    results = {}
    for partitions in ("1", "3"):
        output_dir = tmp_path / f"out{partitions}"
        paths = analyze_in_process(monkeypatch, dataset, output_dir, "--self_influence", "--score_partitions", partitions)
        (path,) = paths.values()
        results[partitions] = _scores(path)
        assert not list(path.parent.glob(SELF.partition_glob))
    assert results["3"].shape == (6,)
    # Per-example gradients come from batches of other sizes, so equal up to float rounding.
    torch.testing.assert_close(results["3"], results["1"], rtol=1e-5, atol=0)


def test_query_gradient_bytes_count_every_tracked_weight_and_bias():
    model = SmallCNN()
    # conv1 4 x (3*3*3 + bias), conv2 6 x (4*3*3), fc 3 x (96 + bias)
    assert query_gradient_bytes(model, None, 4) == 4 * (4 * 28 + 6 * 36 + 3 * 97)
    # rank 2: min(full, 2 x (rows + columns)) per layer
    assert query_gradient_bytes(model, 2, 2) == 2 * (2 * (4 + 28) + 2 * (6 + 36) + 2 * (3 + 97))


def test_query_batches_gathered_per_pass_fit_the_memory():
    settings = AnalysisSettings(query_batch_size=100)
    query_bytes = 100 * 1024**2  # ResNet-50, full rank, float32
    assert accumulation_steps(settings, 1000, query_bytes, 1000 * GIB) == 10  # everything: one pass
    assert accumulation_steps(settings, 1000, query_bytes, 80 * GIB) == 3  # 0.4 x 80 GiB = 327 queries
    assert accumulation_steps(settings, 1000, query_bytes, 1 * GIB) == 1  # never fewer than one batch
    assert accumulation_steps(settings, 1000, query_bytes, 80 * GIB, num_processes=4) == 1
    explicit = AnalysisSettings(query_batch_size=100, query_gradient_accumulation_steps=7)
    assert accumulation_steps(explicit, 1000, query_bytes, 1000 * GIB) == 7


def test_query_batches_leave_room_for_the_training_side():
    settings = AnalysisSettings(query_batch_size=100)
    query_bytes = 100 * 1024**2
    # An 80 GiB GPU: training batch 256 (~33 GiB) leaves 0.85 x 80 - 33 = 35 GiB, more than 0.4 x 80 = 32.
    assert accumulation_steps(settings, 1000, query_bytes, 80 * GIB, training_bytes=33 * GIB) == 3
    # Batch 512 (~66 GiB) leaves 2 GiB: 20 queries, less than one batch, so one batch per pass.
    assert accumulation_steps(settings, 1000, query_bytes, 80 * GIB, training_bytes=66 * GIB) == 1
    # A 141 GiB H200 at batch 512: 0.85 x 141 - 66 = 53.85 GiB, capped at 0.4 x 141 = 56.4: 551 queries.
    assert accumulation_steps(settings, 1000, query_bytes, 141 * GIB, training_bytes=66 * GIB) == 5
    # A training side larger than the device: still one batch per pass (kronfluence then runs out of memory).
    assert accumulation_steps(settings, 1000, query_bytes, 80 * GIB, training_bytes=100 * GIB) == 1


def test_training_side_of_resnet50_at_224_px_is_what_a_batch_of_256_needs():
    """One forward of one image: what autograd saves, kronfluence's copies of each layer's input, the
    largest per-example gradient. ResNet-50 training at batch 256 in float32 is known to take 20-30 GB of
    activations alone; the estimate adds kronfluence's input copies."""
    from torchvision.models import resnet50

    model = resnet50().eval()
    one = training_side_bytes(model, torch.zeros(3, 224, 224), 1, 4)
    assert training_side_bytes(model, torch.zeros(3, 224, 224), 256, 4) == 256 * one
    assert 25e9 < 256 * one < 45e9
    assert training_side_bytes(model, torch.zeros(3, 224, 224), 256, 2) == 128 * one  # bfloat16 halves it
    assert training_side_bytes(model, torch.zeros(3, 112, 112), 1, 4) < one / 3  # a quarter of the pixels
    assert all(parameter.grad is None for parameter in model.parameters())  # measured, nothing left behind


def test_gathering_all_queries_gives_the_same_scores_as_one_pass_per_batch(tmp_path):
    model, train, query = small_problem()
    kwargs = dict(strategy="ekfac", damping_factor=None)
    per_batch = run_scores(copy.deepcopy(model), train, query, tmp_path / "a", query_gradient_accumulation_steps=1, **kwargs)
    gathered = run_scores(copy.deepcopy(model), train, query, tmp_path / "b", **kwargs)
    torch.testing.assert_close(gathered, per_batch, rtol=1e-5, atol=1e-7)
    record = json.loads((tmp_path / "b" / "small" / "scores_ekfac" / "run_config.json").read_text())
    assert record["resolved"]["query_gradient_accumulation_steps"] == 2  # 4 queries in batches of 2, one pass
