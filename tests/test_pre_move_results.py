"""Results written before the machinery moved into the `influence` package are reused after it, not
recomputed. tests/fixtures/pre_move/ holds a tiny ImageNet-layout folder and the results folder the
previous layout (commit a0c47a0, modules flat at the root) wrote for it with the tiny CNN of
tests/small_model_cli.py: EKFAC factors and full-rank scores (analyze.py), and an EKFAC-basis gradient index
at --index_dim 4 with its scores (gradient_index.py). The same commands now must find every phase finished
and leave every file as it was, but for the index's record, which gains its shards' checksums."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Dict

import pytest
import torch
from safetensors.torch import load_file
from small_model_cli import analyze_in_process, build_tiny_model

import gradient_index
import pipeline
from influence.index import shards as index_shards
from influence.results import naming

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "pre_move"
INDEX_DIM = 4


def _digests(root: Path) -> Dict[str, str]:
    """sha256 and modification time of every file under `root` (the lock file aside)."""
    return {
        str(path.relative_to(root)): f"{hashlib.sha256(path.read_bytes()).hexdigest()} {path.stat().st_mtime_ns}"
        for path in sorted(root.rglob("*")) if path.is_file() and path.name != naming.LOCK_FILE
    }


@pytest.fixture
def pre_move(tmp_path: Path) -> Dict[str, Path]:
    """A copy of the fixture elsewhere (the recorded paths are not where it is now, as after a move)."""
    shutil.copytree(FIXTURE, tmp_path / "pre_move", copy_function=shutil.copy2)
    return {"dataset": tmp_path / "pre_move" / "imagenet", "results": tmp_path / "pre_move" / "results"}


def test_the_fixture_holds_finished_results():
    """What the test below reuses is really there: factors, scores, an index and its scores."""
    analysis = FIXTURE / "results" / "imagenet"
    assert (analysis / "factors_ekfac" / "lambda_matrix.safetensors").is_file()
    assert load_file(str(analysis / "scores_ekfac" / naming.PAIRWISE_SCORES_FILE))[naming.SCORES_KEY].shape == (2, 6)
    assert sorted(path.name for path in (analysis / index_shards.index_name("ekfac", INDEX_DIM)).glob("shard_*")) == [
        "shard_00000.safetensors", "shard_00001.safetensors"]
    assert (analysis / "scores_index_ekfac_dim4" / naming.PAIRWISE_SCORES_FILE).is_file()


def test_results_from_before_the_move_are_reused(pre_move, monkeypatch, capfd):
    before = _digests(pre_move["results"])
    old_scores = load_file(str(naming.pairwise_scores_path(pre_move["results"], "imagenet", "ekfac")))[naming.SCORES_KEY]
    analyze_in_process(monkeypatch, pre_move["dataset"], pre_move["results"], "--factor_strategy", "ekfac")
    monkeypatch.setattr(pipeline, "build_model", build_tiny_model)
    common = ["--dataset_dir", str(pre_move["dataset"]), "--num_workers", "0", "--output_dir", str(pre_move["results"]),
              "--index_dim", str(INDEX_DIM), "--weights", "none"]
    gradient_index.main(["build", *common, "--dtype", "float32", "--shard_size", "4", "--train_batch_size", "2"])
    index_scores = gradient_index.main(["query", *common, "--num_queries", "2"])
    log = capfd.readouterr().err
    assert log.count("reusing finished scores") == 2  # analyze.py's EKFAC scores and the index's
    assert "reusing 2 finished" in log  # both shards of the index
    # Not one byte rewritten, not one file touched, but the index's record: it gains its shards' checksums
    # (recorded since), those of the bytes the old build wrote, under the same id.
    index_record = f"imagenet/{index_shards.index_name('ekfac', INDEX_DIM)}/{naming.RUN_CONFIG_FILE}"
    after = _digests(pre_move["results"])
    assert {k: v for k, v in after.items() if k != index_record} == {k: v for k, v in before.items() if k != index_record}
    record = json.loads((pre_move["results"] / index_record).read_text())
    assert record["id"] == json.loads((FIXTURE / "results" / index_record).read_text())["id"]
    shards = sorted((pre_move["results"] / index_record).parent.glob("shard_*"))
    assert [entry["sha256"] for entry in record["shards"]] == [index_shards.tensor_checksum(load_file(str(path))["gradients"]) for path in shards]
    new_scores = load_file(str(naming.pairwise_scores_path(pre_move["results"], "imagenet", "ekfac")))[naming.SCORES_KEY]
    assert torch.equal(new_scores, old_scores)
    assert index_scores == pre_move["results"] / "imagenet" / "scores_index_ekfac_dim4" / naming.PAIRWISE_SCORES_FILE
