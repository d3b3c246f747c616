"""benchmarks/gpu_check.sh, the script to run the day a GPU is lent, run end to end on the CPU in its dry
mode: every step runs and writes its JSON, paths given relative to the caller's folder land there, and
nothing is left in the temporary folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

STEPS = ["benchmark_gpu"] + [f"tf32_{tf32}_{phase}" for tf32 in ("matmuls", "all", "off") for phase in ("covariance", "scores")]


@pytest.mark.slow
def test_dry_run_writes_every_json_where_the_caller_said_and_cleans_up(tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        ["bash", str(REPO_ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "results", sys.executable],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "stopped early" not in done.stdout, done.stdout[-3000:]
    out = tmp_path / "results"  # relative to the caller's folder, not to the repository
    for step in STEPS:
        result = json.loads((out / f"{step}.json").read_text())
        assert result["model"] == "small" and result["device"]["name"].startswith("CPU"), step
        assert result["phases"], step
        assert (out / f"{step}.txt").stat().st_size > 0
    main = json.loads((out / "benchmark_gpu.json").read_text())
    assert {p["phase"] for p in main["phases"]} == {"loading", "covariance", "eigendecomposition", "lambda", "scores"}
    assert len([p for p in main["phases"] if p["phase"] == "loading"]) == 1  # the analysis's worker count only
    assert len((out / "loadavg.txt").read_text().split()) == 5
    assert not list(scratch.iterdir())  # generated images removed
