"""`analyze.py --score_normalization`: relative and cosine scores are the raw scores divided by norms
computed independently here (per-example gradients by autograd, for the identity strategy, whose
preconditioner is the identity), they reuse `--self_influence` results, and results made from other raw
scores are refused on rerun."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from small_model_cli import analyze_in_process, build_tiny_model

import pipeline
from influence.analysis.normalization import normalize
from influence.analysis.scoring import load_scores
from influence.results import naming

ANALYSIS = naming.DEFAULT_ANALYSIS_NAME


def _flat_gradient(model: torch.nn.Module, value: torch.Tensor) -> torch.Tensor:
    return torch.cat([g.flatten() for g in torch.autograd.grad(value, list(model.parameters()))]).double()


def _gradients(dataset_dir, split: str, count: int, measurement: bool) -> torch.Tensor:
    """Each image's gradient, from scratch: the summed cross-entropy of its folder label (training side)
    or minus its margin (query side), as influence/analysis/task.py defines them."""
    model = build_tiny_model(num_classes=2)
    dataset = pipeline.get_imagenet_dataset(split, dataset_dir, preprocessing=pipeline.Preprocessing())
    rows = []
    for index in range(count):
        image, label, _ = dataset[index]
        logits = model(image[None])[0]
        if measurement:
            others = logits.clone()
            others[label] = -torch.inf
            value = -(logits[label] - others.logsumexp(dim=0))
        else:
            value = F.cross_entropy(logits[None], torch.tensor([label]), reduction="sum")
        rows.append(_flat_gradient(model, value))
    return torch.stack(rows)


def test_relative_and_cosine_are_raw_over_independent_norms(tiny_imagenet, tmp_path, monkeypatch):
    output = tmp_path / "out"
    results = analyze_in_process(monkeypatch, tiny_imagenet, output, "--score_normalization", "cosine")
    relative = analyze_in_process(monkeypatch, tiny_imagenet, output, "--score_normalization", "relative")
    assert list(results) == ["identity_cosine"] and list(relative) == ["identity_relative"]
    raw = load_scores(naming.pairwise_scores_path(output, ANALYSIS, "identity")).double()
    train = _gradients(tiny_imagenet, "train", 6, measurement=False)
    queries = _gradients(tiny_imagenet, "val", 2, measurement=True)
    assert torch.allclose(raw, queries @ train.T, rtol=1e-4, atol=1e-6)  # the identity strategy: plain dot products
    train_norms, query_norms = train.norm(dim=1), queries.norm(dim=1)
    expected_relative = raw / train_norms[None, :]
    expected_cosine = raw / train_norms[None, :] / query_norms[:, None]
    assert torch.allclose(load_scores(relative["identity_relative"]).double(), expected_relative, rtol=1e-4)
    cosine = load_scores(results["identity_cosine"]).double()
    assert torch.allclose(cosine, expected_cosine, rtol=1e-4)
    assert cosine.abs().max() <= 1 + 1e-5  # Cauchy-Schwarz
    # The rescaling changes who comes first: not a constant factor per query.
    assert not torch.allclose(expected_relative / expected_relative[:, :1], raw / raw[:, :1])


def test_normalize_divides_columns_and_rows():
    raw = torch.tensor([[4.0, -9.0], [1.0, 3.0]])
    assert torch.equal(normalize(raw, torch.tensor([4.0, 9.0])), torch.tensor([[2.0, -3.0], [0.5, 1.0]]))
    assert torch.equal(normalize(raw, torch.tensor([4.0, 9.0]), torch.tensor([4.0, 1.0])), torch.tensor([[1.0, -1.5], [0.5, 1.0]]))
    assert torch.isfinite(normalize(raw, torch.tensor([0.0, 9.0]))).all()  # no gradient: large, not infinite


def test_relative_reuses_self_influence_and_matches_it_for_ekfac(tiny_imagenet, tmp_path, monkeypatch):
    output = tmp_path / "out"
    ekfac = ("--factor_strategy", "ekfac", "--damping_factor", "heuristic")
    analyze_in_process(monkeypatch, tiny_imagenet, output, "--self_influence", *ekfac)
    self_path = naming.self_scores_path(output, ANALYSIS, "ekfac_self")
    before = (self_path.stat().st_mtime_ns, json.loads((self_path.parent / naming.RUN_CONFIG_FILE).read_text())["id"])
    results = analyze_in_process(monkeypatch, tiny_imagenet, output, "--score_normalization", "relative", *ekfac)
    after = (self_path.stat().st_mtime_ns, json.loads((self_path.parent / naming.RUN_CONFIG_FILE).read_text())["id"])
    assert before == after  # the self-influence pass was not made again
    raw = load_scores(naming.pairwise_scores_path(output, ANALYSIS, "ekfac")).double()
    self_scores = load_scores(self_path).double()
    assert (self_scores > 0).all()
    assert torch.allclose(load_scores(results["ekfac_relative"]).double(), raw / self_scores.sqrt()[None, :], rtol=1e-5)
    record = json.loads((results["ekfac_relative"].parent / naming.RUN_CONFIG_FILE).read_text())
    assert record["depends_on"]["score_normalization"] == "relative"
    assert record["depends_on"]["train_self_scores_id"] == before[1]


def test_scores_from_other_raw_scores_are_refused(tiny_imagenet, tmp_path, monkeypatch, capsys):
    output = tmp_path / "out"
    analyze_in_process(monkeypatch, tiny_imagenet, output, "--score_normalization", "relative")
    # The raw scores are replaced (other queries); the relative ones made from the old ones must not be reused.
    analyze_in_process(monkeypatch, tiny_imagenet, output, "--num_queries", "1", "--overwrite")
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        analyze_in_process(monkeypatch, tiny_imagenet, output, "--num_queries", "1", "--score_normalization", "relative")
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # the log lines before it are INFO
    assert error.startswith("analyze.py: error: normalised scores") and "raw_scores_id" in error, error
    results = analyze_in_process(monkeypatch, tiny_imagenet, output, "--num_queries", "1", "--score_normalization", "relative", "--overwrite")
    assert load_scores(results["identity_relative"]).shape == (1, 6)


def test_refused_with_self_influence(tiny_imagenet, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        analyze_in_process(monkeypatch, tiny_imagenet, tmp_path / "out", "--self_influence", "--score_normalization", "cosine")
    assert "drop --score_normalization" in capsys.readouterr().err
