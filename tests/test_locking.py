"""influence/results/locking.py: one run per analysis folder. A second analyze.py into the folder of a running one stops at
once with one line naming the first (whose scores are unharmed), a killed holder blocks nothing (see
test_factors.py), torchrun's ranks share rank 0's lock, and the scripts that write beside the scores
take it too while readers do not.

The runs are `tests/small_model_cli.py` (analyze.py with a tiny CNN), paused in the lambda fit with
PAUSE_AT so that the second command surely meets a run in progress."""

from __future__ import annotations

import errno
import fcntl
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, tiny_counts, write_image_folder
from safetensors.torch import load_file

from influence.results import locking, naming

WORKER = REPO_ROOT / "tests" / "small_model_cli.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc-per-node=2"]
REFUSED = re.compile(
    r"analyze\.py: error: (?P<folder>\S+) is in use by another run \(pid (?P<pid>\d+) on \S+, started [\d-]+ [\d:]+ UTC: "
    r".*small_model_cli\.py .*\); wait for it to finish, or choose another --output_dir/--analysis_name"
)


def _argv(dataset: Path, output_dir: Path) -> list:
    return [
        "--dataset_dir", str(dataset), "--weights", "none", "--num_workers", "0", "--train_batch_size", "2",
        "--query_batch_size", "2", "--num_queries", "2", "--damping_factor", "heuristic", "--output_dir", str(output_dir),
    ]


def _scores(output_dir: Path) -> torch.Tensor:
    return load_file(str(naming.pairwise_scores_path(output_dir, "imagenet", "ekfac")))[naming.SCORES_KEY]


def _wait_for(paths, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not all(path.exists() for path in paths):
        if process.poll() is not None:
            raise AssertionError(f"the first run ended ({process.returncode}) before pausing: {process.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, "the first run did not reach its pause"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("data") / "imagenet", tiny_counts(train=6, val=2))


def test_second_run_into_a_running_folder_is_refused_and_the_first_finishes(dataset, tmp_path):
    reference = subprocess.run([sys.executable, str(WORKER), *_argv(dataset, tmp_path / "reference")], env=ENV, capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr[-3000:]
    pause = tmp_path / "pause"
    pause.mkdir()
    argv = _argv(dataset, tmp_path / "out")
    first = subprocess.Popen([sys.executable, str(WORKER), *argv], env={**ENV, "PAUSE_AT": f"lambda:1:{pause}"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for([pause / "reached-0"], first)
        factors = naming.factors_dir(tmp_path / "out", "imagenet", "ekfac")
        before = {path.name: path.stat().st_mtime_ns for path in factors.iterdir()}
        second = subprocess.run([sys.executable, str(WORKER), *argv, "--overwrite"], env=ENV, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        line = second.stderr.strip().splitlines()[-1]
        match = REFUSED.fullmatch(line)
        assert match and int(match["pid"]) == first.pid, line
        assert match["folder"] == str(tmp_path / "out" / "imagenet")
        # Refused before reading or writing anything there, --overwrite included.
        assert {path.name: path.stat().st_mtime_ns for path in factors.iterdir()} == before
        (pause / "go").touch()
        _, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, err[-3000:]
    assert torch.equal(_scores(tmp_path / "out"), _scores(tmp_path / "reference"))


def test_torchrun_holds_one_lock_for_all_ranks(dataset, tmp_path):
    """Both ranks run (neither refuses the other) while a single process into the same folder is refused
    with rank 0's pid."""
    pause = tmp_path / "pause"
    pause.mkdir()
    argv = _argv(dataset, tmp_path / "out")
    ranks = subprocess.Popen([*TORCHRUN, str(WORKER), *argv], env={**ENV, "PAUSE_AT": f"lambda:1:{pause}"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for([pause / "reached-0", pause / "reached-1"], ranks, timeout=240)
        single = subprocess.run([sys.executable, str(WORKER), *argv], env=ENV, capture_output=True, text=True, timeout=300)
        match = REFUSED.fullmatch(single.stderr.strip().splitlines()[-1])
        assert single.returncode == 2 and match, single.stderr[-3000:]
        assert match["pid"] == (pause / "reached-0").read_text()
        (pause / "go").touch()
        _, err = ranks.communicate(timeout=300)
    finally:
        ranks.kill()
    assert ranks.returncode == 0, err[-3000:]
    assert _scores(tmp_path / "out").shape == (2, 12)


HOLD_AND_REPORT = """
import sys, time
sys.path.insert(0, {root!r})
from influence.results import locking
with locking.hold({folder!r}):
    print("held", flush=True)
    time.sleep(60)
"""


def test_lock_is_the_kernels_and_nested_holds_share_it(tmp_path):
    folder = tmp_path / "analysis"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_AND_REPORT.format(root=str(REPO_ROOT), folder=str(folder))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(locking.UserError, match=rf"in use by another run \(pid {holder.pid} on "):
            with locking.hold(folder):
                pass
    finally:
        holder.kill()
        holder.wait()
    # Killed: the file (naming the dead holder) is still there, and no obstacle.
    assert str(holder.pid) in (folder / naming.LOCK_FILE).read_text()
    with locking.hold(folder):
        with locking.hold(folder):  # a benchmark around analyze.main: the same process, the same lock
            (folder / "scores_x").mkdir()
            locking.clear(folder)
        assert [path.name for path in folder.iterdir()] == [naming.LOCK_FILE]
        assert str(os.getpid()) in (folder / naming.LOCK_FILE).read_text()


@pytest.mark.parametrize("code", ["ENOLCK", "EOPNOTSUPP", "ENOSYS"])
def test_file_system_without_locks_is_one_line_naming_the_folder(monkeypatch, tmp_path, code):
    """NFS without lockd, some Lustre and FUSE mounts: one line with the folder and the way out, and the
    folders made for the lock are gone again."""
    def no_locks(descriptor, operation):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(locking.fcntl, "lockf", no_locks)
    folder = tmp_path / "results" / "imagenet"
    with pytest.raises(locking.UserError) as caught:
        with locking.hold(folder):
            raise AssertionError("held a lock that was never taken")
    assert str(caught.value) == (
        f"{folder} cannot be locked ({os.strerror(getattr(errno, code))}: its file system, often NFS, Lustre or a "
        "FUSE mount, lacks POSIX locks); choose an --output_dir on a local disk"
    )
    assert list(tmp_path.iterdir()) == []


LOCK_PATH_AS_ANOTHER_PROCESS = """
import fcntl, os, sys
descriptor = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
try:
    fcntl.lockf(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
except OSError:
    sys.exit(1)
"""


def test_lock_file_unlinked_by_a_finishing_holder_is_locked_again(monkeypatch, tmp_path):
    """A holder that finishes unlinks the lock file, then unlocks it: a run that opened the file just before
    must not hold a lock on a file no longer there (a third run would lock the new file beside it)."""
    folder = tmp_path / "analysis"
    lockf, calls = fcntl.lockf, []

    def previous_holder_finishes_first(descriptor, operation):
        calls.append(descriptor)
        if len(calls) == 1:
            (folder / naming.LOCK_FILE).unlink()
        return lockf(descriptor, operation)

    monkeypatch.setattr(locking.fcntl, "lockf", previous_holder_finishes_first)
    with locking.hold(folder):
        other = subprocess.run([sys.executable, "-c", LOCK_PATH_AS_ANOTHER_PROCESS, str(folder / naming.LOCK_FILE)], timeout=60)
        assert other.returncode == 1, "another process could lock the file the path names"
        assert len(calls) == 2
    assert not folder.exists()  # nothing was written: the retried lock still cleans up after itself
