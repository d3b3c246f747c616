"""gradient_index.py and analyze.py across two machines, as torchrun runs them: two launches on this
machine (`--nnodes 2 --node_rank 0/1`, a static rendezvous on 127.0.0.1, one gloo process each). A build
killed mid-way (rank 0 SIGKILLed at its third batch) resumes with the same command without rewriting the
finished shards, and its shards equal one process's bit for bit; the query's scores equal one process's
(within 1e-6 of the largest); analyze.py's scores equal one process's; and an --output_dir that is not
shared by the nodes (here: a relative path, from two working directories) is refused in one line by
every rank before any work. One thread per process, as in tests/test_distributed.py."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import pytest
import torch
from conftest import REPO_ROOT, tiny_counts, write_image_folder
from safetensors.torch import load_file
from small_model_cli import analyze_in_process, build_tiny_model

import gradient_index
import pipeline
from influence.index import shards as index_shards
from influence.results import naming

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
INDEX_WORKER = str(REPO_ROOT / "tests" / "test_gradient_index.py")  # gradient_index.py with the tiny CNN
ANALYZE_WORKER = str(REPO_ROOT / "tests" / "small_model_cli.py")  # analyze.py with the tiny CNN
INDEX_DIM = 3  # real projections onto the top eigenvectors
ANALYZE = ["--weights", "none", "--num_workers", "0", "--factor_strategy", "ekfac", "--damping_factor", "heuristic",
           "--num_queries", "3", "--train_batch_size", "2", "--query_batch_size", "1"]
# 8 training images in shards of 3, 3 and 2, batches of 2: two ranks take shards [0, 2] and [1], so
# rank 0's third batch is the first of shard 2, after it wrote shard 0.
BUILD = ["--weights", "none", "--num_workers", "0", "--index_dim", str(INDEX_DIM), "--dtype", "float32", "--shard_size", "3", "--train_batch_size", "2"]
# 3 queries in batches of 1: rank 0 computes one, rank 1 two; relative scores need each side's self-influence.
QUERY = ["--weights", "none", "--num_workers", "0", "--index_dim", str(INDEX_DIM), "--num_queries", "3", "--query_batch_size", "1",
         "--damping_factor", "heuristic", "--score_normalization", "relative"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _two_nodes(script: str, argv: Sequence[str], logs: Path, env: Optional[Dict[str, str]] = None,
               cwds: Tuple[Optional[Path], Optional[Path]] = (None, None)) -> List[Tuple[int, str]]:
    """Two torchrun launches of one process each, as on two machines: (exit code, output) per node."""
    port = _free_port()
    logs.mkdir(parents=True, exist_ok=True)
    launches = []
    for node in (0, 1):
        log = (logs / f"node{node}.log").open("w")
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--node_rank", str(node),
                   "--master_addr", "127.0.0.1", "--master_port", str(port), script, *argv]
        launches.append((subprocess.Popen(command, cwd=cwds[node], env={**ENV, **(env or {})}, stdout=log, stderr=subprocess.STDOUT), log))
    results = []
    for node, (launch, log) in enumerate(launches):
        try:
            code = launch.wait(timeout=240)
        finally:
            if launch.poll() is None:
                launch.kill()
            log.close()
        results.append((code, (logs / f"node{node}.log").read_text()))
    return results


def _tensor(path: Path, key: str = naming.SCORES_KEY) -> torch.Tensor:
    return load_file(str(path))[key]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process: analyze.py's EKFAC factors and scores, then the index built on them and queried."""
    dataset = write_image_folder(tmp_path_factory.mktemp("data") / "imagenet", tiny_counts(train=4, val=2))
    output_dir = tmp_path_factory.mktemp("single")
    torch.set_num_threads(1)  # the launches' one thread: the same float summation order
    with pytest.MonkeyPatch.context() as monkeypatch:
        analyze_in_process(monkeypatch, dataset, output_dir, *ANALYZE)
        monkeypatch.setattr(pipeline, "build_model", build_tiny_model)
        gradient_index.main(["build", "--dataset_dir", str(dataset), "--output_dir", str(output_dir), *BUILD])
        scores = gradient_index.main(["query", "--dataset_dir", str(dataset), "--output_dir", str(output_dir), *QUERY])
    return dataset, output_dir, scores


def test_build_killed_on_two_nodes_resumes_and_equals_one_process_and_so_does_the_query(single, tmp_path):
    dataset, single_dir, single_scores = single
    output_dir = tmp_path / "two_nodes"
    # The same factors (two nodes' eigendecomposition would differ within float rounding): only the index differs.
    shutil.copytree(naming.factors_dir(single_dir, "imagenet", "ekfac"), naming.factors_dir(output_dir, "imagenet", "ekfac"))
    build = [INDEX_WORKER, "build", "--dataset_dir", str(dataset), "--output_dir", str(output_dir), *BUILD]
    killed = _two_nodes(build[0], build[1:], tmp_path / "killed", env={"KILL_AT": "3", "KILL_RANK": "0"})
    assert all(code != 0 for code, _ in killed), killed
    assert "rank 1 lost the other processes" in killed[1][1], killed[1][1][-3000:]
    directory = index_shards.index_dir(output_dir, "imagenet", "ekfac", INDEX_DIM)
    written = {path.name: path.stat() for path in directory.glob("shard_*.safetensors")}
    assert "shard_00000.safetensors" in written and "shard_00002.safetensors" not in written, sorted(written)
    record = json.loads((directory / naming.RUN_CONFIG_FILE).read_text())
    assert index_shards.SHARDS_RECORD_KEY not in record  # written only once every shard exists: a query calls it unfinished

    resumed = _two_nodes(build[0], build[1:], tmp_path / "resumed")
    assert [code for code, _ in resumed] == [0, 0], resumed[0][1][-3000:]
    assert f"reusing {len(written)} finished, 2 processes" in resumed[0][1]
    for name, stat in written.items():  # finished shards are not rewritten
        again = (directory / name).stat()
        assert (again.st_ino, again.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    expected_dir = index_shards.index_dir(single_dir, "imagenet", "ekfac", INDEX_DIM)
    for position in range(3):
        name = index_shards.shard_path(directory, position).name
        assert torch.equal(_tensor(directory / name, index_shards.GRADIENTS_KEY), _tensor(expected_dir / name, index_shards.GRADIENTS_KEY))
    assert json.loads((directory / naming.RUN_CONFIG_FILE).read_text())["shards"] == \
        json.loads((expected_dir / naming.RUN_CONFIG_FILE).read_text())["shards"]

    query = ["query", "--dataset_dir", str(dataset), "--output_dir", str(output_dir), *QUERY]
    queried = _two_nodes(INDEX_WORKER, query, tmp_path / "query")
    assert [code for code, _ in queried] == [0, 0], queried[0][1][-3000:]
    got = _tensor(output_dir / single_scores.relative_to(single_dir))
    expected = _tensor(single_scores)
    assert got.shape == expected.shape == (3, 8)
    assert (got - expected).abs().max() <= 1e-6 * expected.abs().max()


def test_analyze_on_two_nodes_equals_one_process(single, tmp_path):
    dataset, single_dir, _ = single
    runs = _two_nodes(ANALYZE_WORKER, ["--dataset_dir", str(dataset), "--output_dir", str(tmp_path / "two_nodes"), *ANALYZE], tmp_path / "logs")
    assert [code for code, _ in runs] == [0, 0], runs[0][1][-3000:]
    expected = _tensor(naming.pairwise_scores_path(single_dir, "imagenet", "ekfac"))
    got = _tensor(naming.pairwise_scores_path(tmp_path / "two_nodes", "imagenet", "ekfac"))
    assert got.shape == expected.shape == (3, 8)
    # Two nodes fit the covariances in two halves and sum them: float32 rounding, carried through the
    # eigendecomposition (measured: 3e-6 of the largest score).
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_an_output_folder_the_nodes_do_not_share_is_refused_in_one_line(single, tmp_path):
    """A relative --output_dir from two working directories: each node has a folder of its own, as two
    machines with a local disk each. Every rank stops before any work with the same line."""
    dataset, _, _ = single
    nodes = (tmp_path / "node0", tmp_path / "node1")
    for folder in nodes:
        folder.mkdir()
    argv = ["build", "--dataset_dir", str(dataset), "--output_dir", "results", *BUILD, "--basis", "gaussian"]
    runs = _two_nodes(INDEX_WORKER, argv, tmp_path / "logs", cwds=nodes)
    line = ("gradient_index.py: error: results/imagenet is not shared by every node: rank 1 on "
            f"{socket.gethostname()} cannot see the file rank 0 wrote there; put --output_dir on a file system every node mounts at the same path (NFS, Lustre, ...)")
    for code, output in runs:
        assert code != 0 and output.count(line) == 1 and "exitcode  : 2" in output, output[-3000:]
        assert sum("error:" in row for row in output.splitlines()) == 1  # the line, then only torchrun's report
    assert not [path for folder in nodes for path in folder.iterdir()]  # nothing written, the lock's folders removed
