"""The gradient index's shards as a query reads them (influence/index/shards.py, memory.py): streamed in
row chunks with the scores of one whole read; a shard whose bytes changed after it was written (64 bytes
overwritten, same size) named in one line with the command that rebuilds it, and rebuilt by it; a query
or a build that cannot fit in host memory refused before any work; an index built and queried on analyze.py's
half-precision factors (`--use_half_precision`) recorded as such, its scores those of analyze.py's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_counts, write_image_folder
from safetensors.torch import load_file
from small_model_cli import analyze_in_process, build_tiny_model
from test_gradient_index import _main

import gradient_index
import pipeline
from influence.index import shards as index_shards
from influence.results import naming, preflight

WHOLE = 100  # no projection: every side of the tiny CNN kept whole, the index's scores are the exact ones
COMMON = ["--weights", "none", "--num_workers", "0", "--index_dim", str(WHOLE)]
BUILD = ["--dtype", "float32", "--shard_size", "3", "--train_batch_size", "2"]
QUERY = ["--num_queries", "2", "--damping_factor", "heuristic"]


@pytest.fixture
def dataset(tmp_path) -> Path:
    return write_image_folder(tmp_path / "imagenet", tiny_counts(train=4, val=2))


def _scores(path: Path) -> torch.Tensor:
    return load_file(str(path))[naming.SCORES_KEY]


def test_streamed_checked_shards_and_a_changed_shard_named_and_rebuilt(dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pipeline, "build_model", build_tiny_model)
    common = ["--dataset_dir", str(dataset), "--output_dir", str(tmp_path / "out"), *COMMON, "--basis", "gaussian"]
    query = ["query", *common, "--factor_strategy", "identity", "--num_queries", "2"]
    directory = gradient_index.main(["build", *common, *BUILD])
    whole = _scores(gradient_index.main(query))
    # One row per chunk: the same scores (within float32 rounding: a matrix-vector product per row), every
    # chunk fed to the checksum.
    monkeypatch.setattr(index_shards, "READ_CHUNK_BYTES", 1)
    rows = _scores(gradient_index.main([*query, "--scores_dir", str(tmp_path / "out" / "imagenet" / "scores_rows")]))
    assert (rows - whole).abs().max() <= 1e-6 * whole.abs().max()

    shard = index_shards.shard_path(directory, 1)
    size = shard.stat().st_size
    with shard.open("r+b") as handle:  # 64 bytes of the gradients overwritten, as a new user would try
        handle.seek(size - 100)
        handle.write(b"\x7f" * 64)
    assert shard.stat().st_size == size
    code, line = _main([*query, "--scores_dir", str(tmp_path / "out" / "imagenet" / "scores_changed")], capsys)
    assert code == 2
    assert line == (f"gradient_index.py: error: {shard} does not match the checksum recorded when it was written (its bytes changed since); "
                    f"delete it (rm {shard}) and run the same `gradient_index.py build` command again to rebuild it")
    # As the line says: the shard alone is rebuilt (bit for bit), the scores are the same again.
    others = [index_shards.shard_path(directory, position).stat().st_mtime_ns for position in (0, 2)]
    shard.unlink()
    assert _main(["build", *common, *BUILD], capsys)[0] == 0
    assert [index_shards.shard_path(directory, position).stat().st_mtime_ns for position in (0, 2)] == others
    assert torch.equal(_scores(gradient_index.main([*query, "--scores_dir", str(tmp_path / "out" / "imagenet" / "scores_changed")])), rows)

    monkeypatch.setattr(preflight, "available_memory_bytes", lambda: 1000)
    code, line = _main([*query, "--scores_dir", str(tmp_path / "out" / "imagenet" / "scores_small")], capsys)
    assert code == 2 and line.startswith("gradient_index.py: error: not enough host memory for the query on rank 0: it needs about "), line
    assert "(query batch " in line and "1.0 kB is available; lower --query_batch_size" in line, line
    assert not (tmp_path / "out" / "imagenet" / "scores_small" / naming.PAIRWISE_SCORES_FILE).exists()
    other = ["--dataset_dir", str(dataset), "--output_dir", str(tmp_path / "other"), *COMMON, "--basis", "gaussian"]
    code, line = _main(["build", *other, *BUILD], capsys)  # a shard: 3 rows of 576 float32
    assert code == 2 and line.startswith("gradient_index.py: error: not enough host memory to build a shard on rank 0: it takes about 13.8 kB (twice the shard), 1.0 kB is available; lower --shard_size"), line


def test_an_index_on_half_precision_factors_gives_analyze_half_precision_scores(dataset, tmp_path, monkeypatch):
    """analyze.py --use_half_precision's bfloat16 EKFAC factors as the basis and the preconditioner: the
    index (no projection) is named and recorded as theirs, and its scores are analyze.py's half-precision
    scores within bfloat16's rounding (8 bits of mantissa), and not the float32 factors' index's."""
    out = tmp_path / "out"
    analyze_in_process(monkeypatch, dataset, out, "--factor_strategy", "ekfac", "--damping_factor", "heuristic", "--use_half_precision")
    expected = _scores(naming.pairwise_scores_path(out, "imagenet", "ekfac_half")).float()
    common = ["--dataset_dir", str(dataset), "--output_dir", str(out), *COMMON, "--use_half_precision"]
    directory = gradient_index.main(["build", *common, *BUILD])
    assert directory == index_shards.index_dir(out, "imagenet", "ekfac_half", WHOLE)
    record = json.loads((directory / naming.RUN_CONFIG_FILE).read_text())
    factors = json.loads((naming.factors_dir(out, "imagenet", "ekfac_half") / naming.RUN_CONFIG_FILE).read_text())
    assert record["depends_on"]["basis_factors"] == "ekfac_half" and record["depends_on"]["basis_factors_id"] == factors["id"]
    path = gradient_index.main(["query", *common, *QUERY])
    assert path == index_shards.index_scores_dir(out, "imagenet", "ekfac_half", WHOLE, "ekfac_half") / naming.PAIRWISE_SCORES_FILE
    assert json.loads((path.parent / naming.RUN_CONFIG_FILE).read_text())["depends_on"]["factors_name"] == "ekfac_half"
    got = _scores(path)
    assert got.shape == expected.shape == (2, 8)
    assert (got - expected).abs().max() <= 3e-2 * expected.abs().max()
