"""gradient_index.py and influence/index/projection.py: the compressed gradients equal float64 autograd gradients projected
explicitly; the projected score is unbiased with exactly the predicted variance; without projection the
index's scores equal analyze.py's exact identity and EKFAC scores; a killed build resumes to the same
shards bit for bit without redoing finished ones; stale or missing indexes and factors are refused in one
line; the command line as a user runs it ends in a file top_influences.py reads.

Run as a script (`python tests/test_gradient_index.py build ...`) this file is gradient_index.py's command
line with the tiny CNN of small_model_cli.py in place of the ResNet-50; `KILL_AT=N` SIGKILLs it at its
N-th training batch (under torchrun, only rank `KILL_RANK` if set) and `COUNT_FILE=PATH` writes how many
training batches it computed."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import REPO_ROOT, SmallCNN, tiny_counts, write_image_folder  # noqa: E402
from small_model_cli import analyze_in_process, build_tiny_model  # noqa: E402

import gradient_index  # noqa: E402
import pipeline  # noqa: E402
from influence.analysis.task import ClassificationTask  # noqa: E402
from influence.index import projection  # noqa: E402
from influence.index import shards as index_shards
from influence.results import naming  # noqa: E402
from influence.results.score_files import open_score_file  # noqa: E402
from influence.runtime.cli import UserError  # noqa: E402

WORKER = Path(__file__).resolve()
TINY_SHARD_SIZE = 3  # 8 training images: shards of 3, 3 and 2
TINY_BATCH_SIZE = 2  # shard 0 is batches 1-2 of the build, shard 1 batches 3-4
WHOLE = 100  # at least every side of the tiny CNN (76 inputs at most): no projection
PROJECTED = 3  # below every side but the 2 outputs of fc: real projections


def _scores(path: Path) -> torch.Tensor:
    with safe_open(str(path), framework="pt") as handle:
        return handle.get_tensor(naming.SCORES_KEY)


def _shards(directory: Path) -> List[torch.Tensor]:
    paths = sorted(directory.glob(f"{index_shards.SHARD_STEM}*{index_shards.SHARD_SUFFIX}"))
    return [index_shards.read_shard(path, *_shape(path)) for path in paths]


def _shape(path: Path):
    with safe_open(str(path), framework="pt") as handle:
        return tuple(handle.get_slice(index_shards.GRADIENTS_KEY).get_shape())


def _common(dataset: Path, output_dir: Path, index_dim: int = WHOLE, *extra: str) -> List[str]:
    return ["--dataset_dir", str(dataset), "--num_workers", "0", "--output_dir", str(output_dir), "--index_dim", str(index_dim), *extra]


def _build(dataset: Path, output_dir: Path, index_dim: int = WHOLE, *extra: str) -> List[str]:
    return ["build", *_common(dataset, output_dir, index_dim, "--weights", "none", *extra), "--dtype", "float32",
            "--shard_size", str(TINY_SHARD_SIZE), "--train_batch_size", str(TINY_BATCH_SIZE)]


def _query(dataset: Path, output_dir: Path, index_dim: int = WHOLE, *extra: str) -> List[str]:
    return ["query", *_common(dataset, output_dir, index_dim, "--weights", "none", *extra), "--damping_factor", "heuristic"]


def _run(argv: List[str], kill_at: str = "", count_file: str = "") -> subprocess.CompletedProcess:
    # One thread: the same float summation order in every run, so resumed and uninterrupted shards are equal.
    env = {**os.environ, "KILL_AT": kill_at, "COUNT_FILE": count_file, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(WORKER), *argv], env=env, capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """2 classes x 4 training images and 2 x 2 validation images."""
    return write_image_folder(tmp_path_factory.mktemp("data") / "imagenet", tiny_counts(train=4, val=2))


@pytest.fixture(scope="module")
def exact(dataset, tmp_path_factory):
    """analyze.py's exact (full-rank) identity and EKFAC scores of the first 2 queries, with the tiny CNN;
    the index is built in the same analysis folder, where the query finds the factors."""
    output_dir = tmp_path_factory.mktemp("results")
    scores = {}
    with pytest.MonkeyPatch.context() as monkeypatch:
        for strategy in ("identity", "ekfac"):
            analyze_in_process(monkeypatch, dataset, output_dir, "--factor_strategy", strategy, "--damping_factor", "heuristic")
            scores[strategy] = _scores(naming.pairwise_scores_path(output_dir, "imagenet", strategy))
        for strategy, normalization in (("ekfac", "relative"), ("ekfac", "cosine"), ("kfac", "relative")):
            analyze_in_process(monkeypatch, dataset, output_dir, "--factor_strategy", strategy, "--damping_factor", "heuristic", "--score_normalization", normalization)
            scores[f"{strategy}_{normalization}"] = _scores(naming.pairwise_scores_path(output_dir, "imagenet", f"{strategy}_{normalization}"))
    return output_dir, scores


@pytest.fixture
def tiny_model(monkeypatch):
    monkeypatch.setattr(pipeline, "build_model", build_tiny_model)


# ------------------------------------------------------------------------------ the mathematics


def _per_example_gradients(model: torch.nn.Module, losses) -> List[torch.Tensor]:
    """Each tracked layer's gradient (examples x outputs x inputs, a bias as the last input) of each loss,
    by plain autograd."""
    layers = [module for _, module in projection.tracked_named_layers(model)]
    per_layer: List[List[torch.Tensor]] = [[] for _ in layers]
    for loss in losses:
        parameters = [p for layer in layers for p in ([layer.weight] + ([layer.bias] if layer.bias is not None else []))]
        grads = iter(torch.autograd.grad(loss, parameters))
        for position, layer in enumerate(layers):
            gradient = next(grads).reshape(layer.weight.shape[0], -1)
            if layer.bias is not None:
                gradient = torch.cat([gradient, next(grads)[:, None]], dim=1)
            per_layer[position].append(gradient)
    return [torch.stack(gradients) for gradients in per_layer]


def _train_losses(model, images, labels):
    return [F.cross_entropy(model(images[i : i + 1]), labels[i : i + 1], reduction="sum") for i in range(len(labels))]


def _margins(model, images, labels):
    task = ClassificationTask(seed=0)
    return [task.compute_measurement((images[i : i + 1], labels[i : i + 1], None), model) for i in range(len(labels))]


@pytest.mark.parametrize("index_dim", [PROJECTED, WHOLE])
@pytest.mark.parametrize("name, make_model, size", [
    ("tiny CNN (strided convolutions with bias)", lambda: build_tiny_model(num_classes=3), 64),
    ("small CNN (padding, a convolution without bias)", lambda: SmallCNN(3).eval(), 8),
])
def test_recorded_gradients_equal_projected_float64_autograd_gradients(name, make_model, size, index_dim):
    model = make_model()
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(5, 3, size, size, generator=generator), torch.randint(0, 3, (5,), generator=generator)
    plan = projection.layer_plan(model, index_dim)
    projections = projection.Projections.draw(plan, seed=1)
    assert all(p is None for p in projections.inputs + projections.outputs) == (index_dim == WHOLE)
    reference_model = copy.deepcopy(model).double()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    with projection.CompressedGradientRecorder(model, projections) as recorder:
        F.cross_entropy(model(images), labels, reduction="sum").backward()
        recorded = recorder.take()
    gradients = _per_example_gradients(reference_model, _train_losses(reference_model, images.double(), labels))
    expected = projections.to("cpu", torch.float64).compress(gradients)
    assert recorded.shape == (5, projections.dim)
    torch.testing.assert_close(recorded.double(), expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item())


SEEDS = 400  # projections drawn: the mean's standard error is 5% of the per-draw standard deviation


@pytest.mark.parametrize("index_dim", [PROJECTED, 8])
def test_projected_scores_are_unbiased_with_the_predicted_variance(index_dim):
    """Over SEEDS independent draws of the projections, the mean projected score is within 4 standard
    errors of the exact <A, B> (a z-score that fails by chance with probability 6e-5), and the sample
    variance is within 20% of `projected_score_variance`'s exact value (measured: within 3%; dropping its
    cross term or a factor of two in it would move it by more). At index_dim 8 every output side is kept
    whole, so the variance is the plain Johnson-Lindenstrauss one of the input side."""
    model = build_tiny_model(num_classes=3).double()
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(2, 3, 64, 64, generator=generator, dtype=torch.float64), torch.tensor([0, 2])
    query = _per_example_gradients(model, _margins(model, images[:1], labels[:1]))
    train = _per_example_gradients(model, _train_losses(model, images[1:], labels[1:]))
    exact = sum((q * t).sum() for q, t in zip(query, train)).item()
    plan = projection.layer_plan(model, index_dim)
    variance = sum(projection.projected_score_variance(q[0], t[0], layer) for q, t, layer in zip(query, train, plan)).item()
    samples = []
    for seed in range(SEEDS):
        projections = projection.Projections.draw(plan, seed).to("cpu", torch.float64)
        samples.append((projections.compress(query) * projections.compress(train)).sum().item())
    samples = torch.tensor(samples, dtype=torch.float64)
    z = (samples.mean().item() - exact) / (variance / SEEDS) ** 0.5
    assert abs(z) < 4, (samples.mean().item(), exact, z)
    assert 0.8 < samples.var().item() / variance < 1.25, (samples.var().item(), variance)
    assert variance > 0.01 * exact**2  # a real projection: the per-draw error is not negligible


def test_float16_overflow_names_bfloat16():
    with pytest.raises(UserError, match=r"from 6 on reach 7e\+04, beyond float16's range; rebuild with --dtype bfloat16"):
        index_shards.check_range(torch.tensor([[7e4, 1.0]]), torch.float16, 6)
    index_shards.check_range(torch.tensor([[7e4, 1.0]]), torch.bfloat16, 6)


# ------------------------------------------------------------------------------ against analyze.py


@pytest.mark.parametrize("basis, strategy, normalization", [
    ("ekfac", "identity", "none"), ("ekfac", "ekfac", "none"), ("ekfac", "ekfac", "relative"), ("ekfac", "ekfac", "cosine"), ("kfac", "kfac", "relative"),
])
def test_index_scores_equal_analyze_scores_without_projection(exact, dataset, tiny_model, basis, strategy, normalization):
    """index_dim above every layer side: the compressed gradients are the full gradients rotated into the
    EKFAC (or KFAC) eigenbasis, stored in float32 in 3 shards, and the query side's preconditioning is
    kronfluence's own, so the scores are analyze.py's within float32 summation order; so are the relative
    and cosine scores, whose self-influences the index computes from its shards and kronfluence's lambda
    (EKFAC's fitted one, KFAC's products of eigenvalues) alone."""
    output_dir, scores = exact
    directory = gradient_index.main([*_build(dataset, output_dir), "--basis", basis])
    assert directory == index_shards.index_dir(output_dir, "imagenet", basis, WHOLE)
    assert [_shape(path)[0] for path in sorted(directory.glob("shard_*.safetensors"))] == [3, 3, 2]
    path = gradient_index.main([*_query(dataset, output_dir), "--basis", basis, "--factor_strategy", strategy, "--num_queries", "2", "--score_normalization", normalization])
    assert path == index_shards.index_scores_dir(output_dir, "imagenet", basis, WHOLE, strategy, normalization) / naming.PAIRWISE_SCORES_FILE
    got = _scores(path)
    expected = scores[strategy if normalization == "none" else f"{strategy}_{normalization}"]
    assert got.dtype == torch.float32 and got.shape == expected.shape == (2, 8)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
    assert open_score_file(path, "index scores").normalization == normalization
    record = json.loads((path.parent / naming.RUN_CONFIG_FILE).read_text())
    assert record["resolved"]["queries"]["val_positions"] == [0, 1]


def test_projected_index_scores_equal_an_explicit_float64_projection(exact, dataset, tiny_model):
    """With real projections (index_dim 3) the command line's scores equal autograd's float64 query and
    training gradients projected explicitly with the same seed's matrices (identity strategy: no factors)."""
    output_dir, _ = exact
    seeded = ("--seed", "3", "--analysis_name", "seeded", "--basis", "gaussian")  # no factors there: identity needs none
    gradient_index.main(_build(dataset, output_dir, PROJECTED, *seeded))
    path = gradient_index.main([*_query(dataset, output_dir, PROJECTED, *seeded), "--factor_strategy", "identity", "--num_queries", "2"])
    model = build_tiny_model(seed=3).double()
    train = pipeline.get_imagenet_dataset("train", dataset)
    val = pipeline.get_imagenet_dataset("val", dataset)
    train_images = torch.stack([train[i][0] for i in range(len(train))]).double()
    train_labels = torch.tensor([train[i][1] for i in range(len(train))])
    query_images = torch.stack([val[i][0] for i in range(2)]).double()
    query_labels = torch.tensor([val[i][1] for i in range(2)])
    projections = projection.Projections.draw(projection.layer_plan(model, PROJECTED), seed=3).to("cpu", torch.float64)
    query = projections.compress(_per_example_gradients(model, _margins(model, query_images, query_labels)))
    training = projections.compress(_per_example_gradients(model, _train_losses(model, train_images, train_labels)))
    expected = query @ training.T
    torch.testing.assert_close(_scores(path).double(), expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def _float64_gradients(model, dataset: Path, num_queries: int):
    """Autograd's float64 per-layer gradients of the training losses and of the first queries' margins."""
    train = pipeline.get_imagenet_dataset("train", dataset)
    val = pipeline.get_imagenet_dataset("val", dataset)
    train_images = torch.stack([train[i][0] for i in range(len(train))]).double()
    train_labels = torch.tensor([train[i][1] for i in range(len(train))])
    query_images = torch.stack([val[i][0] for i in range(num_queries)]).double()
    query_labels = torch.tensor([val[i][1] for i in range(num_queries)])
    return (_per_example_gradients(model, _margins(model, query_images, query_labels)),
            _per_example_gradients(model, _train_losses(model, train_images, train_labels)))


def test_ekfac_basis_index_scores_equal_float64_ekfac_restricted_to_the_top_eigenvectors(exact, dataset, tiny_model):
    """The default basis at index_dim 3: the command line's scores equal an independent float64 EKFAC
    computed from the factor files (each layer's gradients rotated into the KFAC eigenbasis, divided by
    lambda / count + 0.1 x its mean, the heuristic damping), summed over only the top-3 x top-3
    eigen-directions of every layer; summed over all of them the same computation gives analyze.py's
    exact scores, which the truncated index does not."""
    output_dir, scores = exact
    directory = gradient_index.main(_build(dataset, output_dir, PROJECTED))
    assert directory == index_shards.index_dir(output_dir, "imagenet", "ekfac", PROJECTED)
    path = gradient_index.main([*_query(dataset, output_dir, PROJECTED), "--num_queries", "2"])
    factors = naming.factors_dir(output_dir, "imagenet", "ekfac")
    read = {name: load_file(str(factors / f"{name}.safetensors")) for name in (
        "activation_eigenvectors", "activation_eigenvalues", "gradient_eigenvectors", "gradient_eigenvalues", "lambda_matrix", "num_lambda_processed")}
    model = build_tiny_model(seed=0).double()
    query, train = _float64_gradients(model, dataset, 2)
    full = truncated = truncated_self = 0
    for (name, _), q, t in zip(projection.tracked_named_layers(model), query, train):
        in_order = read["activation_eigenvalues"][name].double().argsort(descending=True)
        out_order = read["gradient_eigenvalues"][name].double().argsort(descending=True)
        in_basis = read["activation_eigenvectors"][name].double()[:, in_order]
        out_basis = read["gradient_eigenvectors"][name].double()[:, out_order]
        lambdas = (read["lambda_matrix"][name].double() / read["num_lambda_processed"][name].double())[out_order][:, in_order]
        rotated_query = out_basis.T @ q @ in_basis / (lambdas + 0.1 * lambdas.mean())
        rotated_train = out_basis.T @ t @ in_basis
        full = full + torch.einsum("qoi,toi->qt", rotated_query, rotated_train)
        k_out, k_in = min(PROJECTED, q.shape[1]), min(PROJECTED, q.shape[2])
        truncated = truncated + torch.einsum("qoi,toi->qt", rotated_query[:, :k_out, :k_in], rotated_train[:, :k_out, :k_in])
        block = rotated_train[:, :k_out, :k_in]
        truncated_self = truncated_self + (block.square() / (lambdas + 0.1 * lambdas.mean())[:k_out, :k_in]).sum((1, 2))
    torch.testing.assert_close(full.float(), scores["ekfac"], rtol=1e-3, atol=1e-4 * scores["ekfac"].abs().max().item())
    got = _scores(path).double()
    torch.testing.assert_close(got, truncated, rtol=1e-4, atol=1e-5 * truncated.abs().max().item())
    assert (got - full).abs().max() > 0.01 * full.abs().max()
    relative = gradient_index.main([*_query(dataset, output_dir, PROJECTED), "--num_queries", "2", "--score_normalization", "relative"])
    expected = truncated / truncated_self.sqrt()[None, :]
    torch.testing.assert_close(_scores(relative).double(), expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
    record = json.loads((directory / naming.RUN_CONFIG_FILE).read_text())
    assert record["depends_on"]["basis_factors_id"] == json.loads((factors / naming.RUN_CONFIG_FILE).read_text())["id"]


def test_query_dir_scores_equal_analyze_query_dir_scores(exact, dataset, tiny_model, monkeypatch, tmp_path):
    """An unlabeled folder of the user's own images: each label is the model's prediction, as analyze.py
    takes it, and the scores are analyze.py's."""
    output_dir, _ = exact
    photos = tmp_path / "photos"
    photos.mkdir()
    val_dir = dataset / "val"
    for number, image in enumerate(sorted(val_dir.glob("*/*.JPEG"))[:3]):
        (photos / f"photo{number}.jpg").write_bytes(image.read_bytes())
    analyze_in_process(monkeypatch, dataset, output_dir, "--query_dir", str(photos), "--analysis_name", "imagenet", "--overwrite")
    expected = _scores(naming.pairwise_scores_path(output_dir, "imagenet", "identity"))
    gradient_index.main(_build(dataset, output_dir))
    path = gradient_index.main([*_query(dataset, output_dir), "--factor_strategy", "identity", "--query_dir", str(photos),
                                "--scores_dir", str(tmp_path / "answers" / "scores_photos")])
    torch.testing.assert_close(_scores(path), expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
    record = json.loads((path.parent / naming.RUN_CONFIG_FILE).read_text())
    assert record["resolved"]["queries"]["label_source"] == "predicted"
    assert record["depends_on"]["query_labels"] == "predicted"


# ------------------------------------------------------------------------------ resuming, refusing


def test_killed_build_resumes_to_the_same_shards_without_redoing_finished_ones(dataset, tmp_path):
    gaussian = ("--basis", "gaussian")
    uninterrupted = _run(_build(dataset, tmp_path / "uninterrupted", PROJECTED, *gaussian))
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    output_dir = tmp_path / "killed"
    killed = _run(_build(dataset, output_dir, PROJECTED, *gaussian), kill_at="3")  # the first batch of shard 1
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    directory = index_shards.index_dir(output_dir, "imagenet", "gaussian", PROJECTED)
    assert sorted(path.name for path in directory.glob("shard_*")) == ["shard_00000.safetensors"]
    first = (directory / "shard_00000.safetensors").stat()
    (directory / ".shard_00001.safetensors.99999.tmp").write_bytes(b"cut short")  # a write a kill interrupted
    counted = tmp_path / "count"
    resumed = _run(_build(dataset, output_dir, PROJECTED, *gaussian), count_file=str(counted))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "reusing 1 finished" in resumed.stderr
    assert int(counted.read_text()) == 3  # shards 1 and 2 only: batches [3, 4], [5], [6, 7]
    again = (directory / "shard_00000.safetensors").stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    assert not list(directory.glob(".*.tmp"))
    expected = _shards(index_shards.index_dir(tmp_path / "uninterrupted", "imagenet", "gaussian", PROJECTED))
    got = _shards(directory)
    assert len(got) == len(expected) == 3 and all(torch.equal(a, b) for a, b in zip(got, expected))
    # A finished index is reused as it is.
    _run(_build(dataset, output_dir, PROJECTED, *gaussian), count_file=str(counted))
    assert int(counted.read_text()) == 0


def _main(argv: List[str], capsys) -> Tuple[int, str]:
    """gradient_index.py's main in this process (the tiny CNN patched in): its exit code and the last
    line it wrote to stderr."""
    capsys.readouterr()
    try:
        gradient_index.main(argv)
        code = 0
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def test_stale_or_missing_index_and_factors_are_refused_in_one_line(dataset, tiny_model, tmp_path, capsys):
    first, second = tmp_path / "first.pt", tmp_path / "second.pt"
    first.write_bytes(b"model one")  # the tiny model ignores the file; its sha256 is the model's identity
    second.write_bytes(b"model two")
    out = tmp_path / "results"

    def common(checkpoint: Path, index_dim: int = PROJECTED) -> List[str]:
        return _common(dataset, out, index_dim, "--checkpoint", str(checkpoint), "--basis", "gaussian")

    assert _main(["build", *common(first), "--shard_size", "3"], capsys)[0] == 0
    directory = index_shards.index_dir(out, "imagenet", "gaussian", PROJECTED)
    cases = [
        (["build", *common(second), "--shard_size", "3"],
         rf"gradient index in {re.escape(str(directory))} were computed with other settings \(model 'checkpoint sha256:\w+' -> 'checkpoint sha256:\w+'\); pass --overwrite"),
        (["build", *common(first), "--shard_size", "4"], r"other settings \(shard_size 3 -> 4\)"),
        (["query", *common(second), "--factor_strategy", "identity", "--num_queries", "1"],
         rf"the gradient index in {re.escape(str(directory))} was built with other settings \(model 'checkpoint sha256:\w+' -> 'checkpoint sha256:\w+'\); rebuild it with `gradient_index.py build`"),
        (["query", *common(first), "--factor_strategy", "identity", "--num_queries", "1", "--seed", "1"], r"was built with other settings \(seed 0 -> 1\)"),
        (["query", *common(first, 8), "--factor_strategy", "identity", "--num_queries", "1"],
         rf"no gradient index at {re.escape(str(index_shards.index_dir(out, 'imagenet', 'gaussian', 8)))}: build it first with `gradient_index.py build` with the same --dataset_dir, model, --basis gaussian, --index_dim 8"),
        (["query", *common(first), "--factor_strategy", "identity", "--num_queries", "1", "--score_normalization", "relative"],
         r"--score_normalization relative takes the self-influence from the index, which needs an eigenvector basis queried with its own strategy \(--basis ekfac --factor_strategy ekfac, or kfac\); got --basis gaussian --factor_strategy identity$"),
        (["query", *common(first), "--factor_strategy", "ekfac", "--num_queries", "1"],
         rf"no ekfac factors in {re.escape(str(naming.factors_dir(out, 'imagenet', 'ekfac')))}: run `analyze.py --factor_strategy ekfac`"),
    ]
    for argv, message in cases:
        code, line = _main(argv, capsys)
        assert code == 2, line
        assert line.startswith("gradient_index.py: error: ") and re.search(message, line), line
    # An unfinished index is named as such; --overwrite replaces a stale one.
    (directory / "shard_00001.safetensors").unlink()
    code, line = _main(["query", *common(first), "--factor_strategy", "identity", "--num_queries", "1"], capsys)
    assert code == 2 and "is unfinished (2 of 3 shards); run the same `gradient_index.py build` command again" in line
    assert _main(["build", *common(second), "--shard_size", "3", "--overwrite"], capsys)[0] == 0
    assert _main(["query", *common(second), "--factor_strategy", "identity", "--num_queries", "1"], capsys)[0] == 0


def test_eigen_basis_needs_fitted_factors_and_refitted_factors_make_the_index_stale(dataset, tiny_model, monkeypatch, tmp_path, capsys):
    """--basis ekfac (the default) without factors is refused in one line naming analyze.py and --basis
    gaussian; after the factors are refitted (on 6 images instead of 8) a query refuses the index built
    on the old eigenvectors, naming the factors' id, and --overwrite rebuilds it."""

    def refused(argv: List[str]) -> str:
        code, line = _main(argv, capsys)
        assert code == 2, line
        return line

    factors = naming.factors_dir(tmp_path, "imagenet", "ekfac")
    line = refused(_build(dataset, tmp_path, PROJECTED))
    assert line == (f"gradient_index.py: error: no ekfac factors in {factors}: --basis ekfac projects onto their eigenvectors: run "
                    "`analyze.py --factor_strategy ekfac` with the same --dataset_dir, model and --output_dir/--analysis_name first, or pass --basis gaussian")
    analyze_in_process(monkeypatch, dataset, tmp_path, "--factor_strategy", "ekfac", "--damping_factor", "heuristic")
    gradient_index.main(_build(dataset, tmp_path, PROJECTED))
    gradient_index.main([*_query(dataset, tmp_path, PROJECTED), "--num_queries", "1"])
    analyze_in_process(monkeypatch, dataset, tmp_path, "--factor_strategy", "ekfac", "--damping_factor", "heuristic", "--factor_examples", "6", "--overwrite")
    line = refused([*_query(dataset, tmp_path, PROJECTED), "--num_queries", "1"])
    assert re.search(r"was built with other settings \(basis_factors_id '\w+' -> '\w+'\); rebuild it with `gradient_index.py build` .* --overwrite$", line), line
    gradient_index.main([*_build(dataset, tmp_path, PROJECTED), "--overwrite"])
    path = gradient_index.main([*_query(dataset, tmp_path, PROJECTED), "--num_queries", "1", "--overwrite"])
    assert torch.isfinite(_scores(path)).all()


def test_small_disk_is_refused_before_any_shard(dataset, tiny_model, monkeypatch, tmp_path, capsys):
    usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(path)._replace(free=1000))  # 1.0 kB
    with pytest.raises(SystemExit) as caught:
        gradient_index.main(_build(dataset, tmp_path, WHOLE, "--basis", "gaussian"))
    assert caught.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(r"gradient_index\.py: error: not enough disk space under .*gradient_index_gaussian_dim100: the index needs 18\.4 kB, 1\.0 kB is free; .*", line), line
    assert not list(index_shards.index_dir(tmp_path, "imagenet", "gaussian", WHOLE).glob("shard_*"))


# ------------------------------------------------------------------------------ as a user runs it


def test_command_line_of_resnet50_ends_in_a_file_top_influences_reads(tiny_imagenet, resnet50_checkpoint, tmp_path):
    """The real scripts in subprocesses, on a random-init ResNet-50 at 32 pixels: build, query an
    unlabeled folder of photos, then top_influences.py on the score folder, which names the photos and
    the most helpful training image of each by the index's scores."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for number, image in enumerate(sorted((tiny_imagenet / "val").glob("*/*.JPEG"))[:2]):
        (photos / f"photo{number}.jpg").write_bytes(image.read_bytes())
    common = ["--dataset_dir", str(tiny_imagenet), "--checkpoint", str(resnet50_checkpoint), "--resize_size", "32",
              "--crop_size", "32", "--num_workers", "0", "--output_dir", str(tmp_path / "results"), "--index_dim", "8", "--basis", "gaussian"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for argv in (["build", *common, "--train_batch_size", "4"], ["query", *common, "--factor_strategy", "identity", "--query_dir", str(photos)]):
        done = subprocess.run([sys.executable, str(REPO_ROOT / "gradient_index.py"), *argv], env=env, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
    scores_dir = index_shards.index_scores_dir(tmp_path / "results", "imagenet", "gaussian", 8, "identity")
    scores = _scores(scores_dir / naming.PAIRWISE_SCORES_FILE)
    assert scores.shape == (2, 6) and torch.isfinite(scores).all()
    shown = subprocess.run(
        [sys.executable, str(REPO_ROOT / "top_influences.py"), "--scores", str(scores_dir), "--dataset_dir", str(tiny_imagenet),
         "--top_k", "3", "--figure_dir", str(tmp_path / "figure")],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert shown.returncode == 0, shown.stderr[-3000:]
    summary = json.loads((scores_dir / "top_influences.json").read_text())
    assert [Path(entry["query_path"]).name for entry in summary["queries"]] == ["photo0.jpg", "photo1.jpg"]
    for row, entry in zip(scores, summary["queries"]):
        assert entry["label_source"] == "predicted"
        assert entry["helpful"][0]["train_index"] == int(row.argmax())
    assert len(list((tmp_path / "figure").glob("top_influences_imagenet_index_gaussian_dim8_identity_query*.png"))) == 2


# ------------------------------------------------------------------------------ the worker


def _worker() -> None:
    """gradient_index.py's main with the tiny CNN (see the module docstring)."""
    pipeline.build_model = build_tiny_model
    calls = {"n": 0}
    kill_at = int(os.environ.get("KILL_AT") or 0) if os.environ.get("KILL_RANK", os.environ.get("RANK", "0")) == os.environ.get("RANK", "0") else 0
    count_file = os.environ.get("COUNT_FILE")
    loss = ClassificationTask.compute_train_loss

    def counted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return loss(self, *args, **kwargs)

    ClassificationTask.compute_train_loss = counted
    try:
        gradient_index.main(sys.argv[1:])
    finally:
        if count_file:
            Path(count_file).write_text(str(calls["n"]))


if __name__ == "__main__":
    _worker()
