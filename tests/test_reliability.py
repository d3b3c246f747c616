"""Interrupted runs, changed inputs and broken files: a run killed in any phase resumes to the same scores,
results computed from other inputs are refused, and a bad image, an unwritable folder or a full disk
each end in one line with nothing left behind that a later run would take as finished.

The interruption tests run `tests/small_model_cli.py`: analyze.py's real command line with a tiny CNN,
so each run takes seconds and can be killed at a chosen step of each phase."""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

import analyze
import naming
import pipeline
import small_model_cli
from conftest import REPO_ROOT, tiny_counts, write_image_folder

WORKER = REPO_ROOT / "tests" / "small_model_cli.py"
PARTITIONS = 3


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
    assert not list(scores_dir.glob(analyze.PAIRWISE.partition_glob))  # joined, then removed


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


def _in_process(monkeypatch, dataset: Path, output_dir: Path, *extra: str):
    monkeypatch.setattr(pipeline, "build_model", small_model_cli.build_tiny_model)
    queries = [] if "--self_influence" in extra else ["--num_queries", "2"]
    return analyze.main([
        "--dataset_dir", str(dataset), "--weights", "none", "--num_workers", "0", "--factor_strategy", "identity",
        "--output_dir", str(output_dir), *queries, *extra,
    ])


def test_image_replaced_under_the_same_name_is_refused(monkeypatch, tmp_path, capsys):
    dataset = write_image_folder(tmp_path / "imagenet", tiny_counts())
    _in_process(monkeypatch, dataset, tmp_path / "out")
    victim = dataset / "train" / "n01" / "n01_001.JPEG"
    before = victim.stat().st_size
    # Another picture of the same dimensions (40 x 40), saved under the same file name.
    Image.new("RGB", Image.open(victim).size, (200, 10, 10)).save(victim, format="JPEG")
    assert victim.stat().st_size != before
    capsys.readouterr()
    with pytest.raises(SystemExit) as caught:
        _in_process(monkeypatch, dataset, tmp_path / "out")
    err = capsys.readouterr().err
    assert caught.value.code == 2
    assert re.search(r"factors in .* were computed with other settings \(train_files_sha256 '\w+' -> '\w+'\)", err), err
    assert "--overwrite" in err


def test_changed_preprocessing_is_refused(monkeypatch, tmp_path, capsys):
    dataset = write_image_folder(tmp_path / "imagenet", tiny_counts())
    _in_process(monkeypatch, dataset, tmp_path / "out")
    monkeypatch.setattr(pipeline, "transform_description", lambda: "Compose(Resize(size=288), ...)")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        _in_process(monkeypatch, dataset, tmp_path / "out")
    assert "transform 'Compose(" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- bad input


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("num_workers", ["0", "2"])
def test_truncated_image_is_named_in_one_line_and_nothing_is_finished(monkeypatch, tmp_path, capsys, num_workers):
    dataset = write_image_folder(tmp_path / "imagenet", tiny_counts())
    bad = dataset / "train" / "n02" / "n02_001.JPEG"
    _truncate(bad)
    capsys.readouterr()
    with pytest.raises(SystemExit) as caught:
        _in_process(monkeypatch, dataset, tmp_path / "out", "--num_workers", num_workers)
    err = capsys.readouterr().err.strip()
    assert caught.value.code == 2
    assert "Traceback" not in err and "Original" not in err, err
    # The last line, after the progress bars: which file, and PIL's reason.
    assert re.fullmatch(rf"analyze\.py: error: cannot read image {re.escape(str(bad))} \(OSError: [^\n]+\)", err.splitlines()[-1]), err
    assert not (naming.scores_dir(tmp_path / "out", "imagenet", "identity") / naming.PAIRWISE_SCORES_FILE).exists()


def test_check_images_lists_every_unreadable_file_before_any_work(monkeypatch, tmp_path, capsys):
    dataset = write_image_folder(tmp_path / "imagenet", tiny_counts())
    _truncate(dataset / "train" / "n02" / "n02_001.JPEG")
    (dataset / "val" / "n01" / "n01_000.JPEG").write_bytes(b"not an image")
    capsys.readouterr()
    with pytest.raises(SystemExit) as caught:
        _in_process(monkeypatch, dataset, tmp_path / "out", "--check_images", "--num_workers", "2")
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert caught.value.code == 2
    assert err.startswith("analyze.py: error: 2 of 8 images cannot be read: ") and err.endswith("; fix or remove them"), err
    assert f"{dataset}/train/n02/n02_001.JPEG (OSError: " in err
    assert f"{dataset}/val/n01/n01_000.JPEG (UnidentifiedImageError: " in err
    assert not naming.factors_dir(tmp_path / "out", "imagenet", "identity").exists()


def test_output_dir_that_cannot_be_created_is_one_line(monkeypatch, tmp_path, capsys):
    dataset = write_image_folder(tmp_path / "imagenet", tiny_counts())
    (tmp_path / "a_file").write_text("")
    capsys.readouterr()
    with pytest.raises(SystemExit) as caught:
        _in_process(monkeypatch, dataset, tmp_path / "a_file" / "out")
    assert caught.value.code == 2
    assert "output directory" in capsys.readouterr().err


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
    assert analyze.discard_torn_files(factors) == []  # nothing half-written is left to be taken as finished
    again = _run(argv)
    assert again.returncode == 0, again.stderr[-3000:]
    assert torch.equal(_scores(naming.pairwise_scores_path(tmp_path, "imagenet", "ekfac")), uninterrupted["ekfac"])


def test_self_influence_in_partitions_equals_one_pass(monkeypatch, tmp_path):
    dataset = write_image_folder(tmp_path / "imagenet", tiny_counts())
    results = {}
    for partitions in ("1", "3"):
        output_dir = tmp_path / f"out{partitions}"
        paths = _in_process(monkeypatch, dataset, output_dir, "--self_influence", "--score_partitions", partitions)
        (path,) = paths.values()
        results[partitions] = _scores(path)
        assert not list(path.parent.glob(analyze.SELF.partition_glob))
    assert results["3"].shape == (6,)
    # Per-example gradients come from batches of other sizes, so equal up to float rounding.
    torch.testing.assert_close(results["3"], results["1"], rtol=1e-5, atol=0)
