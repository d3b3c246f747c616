"""The mathematics of the analysis, checked on a small CNN against independent computations."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import SmallCNN, small_problem
from torch import nn

from influence.analysis import task
from influence.analysis.factors import fit_factors
from influence.analysis.scoring import compute_scores, load_scores
from influence.analysis.settings import AnalysisSettings
from influence.analysis.task import ClassificationTask, make_analyzer, sample_labels


def _tracked_parameters(model: nn.Module):
    return [p for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) for p in m.parameters()]


def _flat_grad(value: torch.Tensor, model: nn.Module) -> torch.Tensor:
    grads = torch.autograd.grad(value, _tracked_parameters(model))
    return torch.cat([g.reshape(-1) for g in grads])


def autograd_identity_scores(model: nn.Module, train, query) -> torch.Tensor:
    """Gradient of each query's margin measurement dotted with each training example's loss gradient."""
    model = copy.deepcopy(model)
    for p in model.parameters():
        p.requires_grad_(True)
    query_grads, train_grads = [], []
    for image, label, _ in query:
        logits = model(image[None])[0]
        others = torch.cat([logits[:label], logits[label + 1 :]])
        query_grads.append(_flat_grad(-(logits[label] - others.logsumexp(0)), model))
    for image, label, _ in train:
        logits = model(image[None])
        train_grads.append(_flat_grad(F.cross_entropy(logits, torch.tensor([label]), reduction="sum"), model))
    return torch.stack(query_grads) @ torch.stack(train_grads).T


def run_scores(model, train, query, tmp_path, **overrides) -> torch.Tensor:
    settings = AnalysisSettings(
        query_batch_size=2, train_batch_size=5, output_dir=str(tmp_path), analysis_name="small", **overrides
    )
    provenance = {"train": {"model": "small", "num_train": len(train)}, "query": {"model": "small", "num_queries": len(query)}}
    analyzer = make_analyzer(model, settings)
    record = fit_factors(analyzer, train, settings, provenance)
    path = compute_scores(analyzer, train, query, settings, provenance, record)
    return load_scores(path)


def test_identity_scores_equal_autograd_gradient_dot_products(tmp_path):
    model, train, query = small_problem()
    expected = autograd_identity_scores(model, train, query)
    scores = run_scores(copy.deepcopy(model), train, query, tmp_path, strategy="identity")
    assert scores.shape == (len(query), len(train))
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)
    assert expected.abs().max() > 1e-2  # the comparison is not between two zero matrices


@pytest.mark.parametrize("strategy", ["diagonal", "kfac", "ekfac"])
def test_huge_damping_scores_approach_identity(tmp_path, strategy):
    model, train, query = small_problem()
    identity = autograd_identity_scores(model, train, query)
    damping = 1e6
    scores = run_scores(copy.deepcopy(model), train, query, tmp_path, strategy=strategy, damping_factor=damping)
    torch.testing.assert_close(scores * damping, identity, rtol=1e-3, atol=1e-4)


def test_ekfac_with_small_damping_differs_from_identity(tmp_path):
    """The preconditioner does something: EKFAC scores are not a rescaled identity at moderate damping."""
    model, train, query = small_problem()
    identity = autograd_identity_scores(model, train, query)
    scores = run_scores(copy.deepcopy(model), train, query, tmp_path, strategy="ekfac", damping_factor=None)
    cosine = F.cosine_similarity(scores.flatten(), identity.flatten(), dim=0)
    assert cosine < 0.999


def test_low_rank_scores_equal_full_rank_when_rank_covers_the_gradient(tmp_path):
    """Rank >= min(layer dims) leaves every query gradient unapproximated, so scores are unchanged."""
    model, train, query = small_problem()
    full = run_scores(copy.deepcopy(model), train, query, tmp_path / "full", strategy="ekfac", damping_factor=None)
    low = run_scores(
        copy.deepcopy(model), train, query, tmp_path / "low", strategy="ekfac", damping_factor=None, query_gradient_rank=64
    )
    torch.testing.assert_close(low, full, rtol=1e-4, atol=1e-6)


def test_sampled_labels_depend_only_on_seed_and_index():
    logits = torch.randn(6, 10)
    indices = torch.tensor([5, 9, 11, 40, 41, 100])
    together = sample_labels(logits, indices, seed=3)
    one_by_one = torch.cat([sample_labels(logits[i : i + 1], indices[i : i + 1], seed=3) for i in range(6)])
    assert torch.equal(together, one_by_one)
    reversed_order = sample_labels(logits.flip(0), indices.flip(0), seed=3).flip(0)
    assert torch.equal(together, reversed_order)
    other_seeds = torch.stack([sample_labels(logits, indices, seed=s) for s in range(4, 24)])
    assert (other_seeds != together).any()


def test_sampled_labels_follow_the_model_distribution():
    probabilities = torch.tensor([0.6, 0.3, 0.1])
    count = 6000
    logits = probabilities.log().expand(count, 3)
    labels = sample_labels(logits, torch.arange(count), seed=0)
    frequencies = torch.bincount(labels, minlength=3).float() / count
    torch.testing.assert_close(frequencies, probabilities, atol=0.025, rtol=0)


def test_measurement_is_negative_margin():
    task = ClassificationTask(seed=0)
    model = nn.Linear(4, 3)
    images = torch.randn(2, 4)
    labels = torch.tensor([0, 2])
    logits = model(images)
    expected = -(
        (logits[0, 0] - torch.logsumexp(logits[0, [1, 2]], 0)) + (logits[1, 2] - torch.logsumexp(logits[1, [0, 1]], 0))
    )
    torch.testing.assert_close(task.compute_measurement((images, labels, torch.arange(2)), model), expected)
    loss = task.compute_train_loss((images, labels, torch.arange(2)), model, sample=False)
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels, reduction="sum"))


def test_same_seed_same_scores_other_seed_other_scores(tmp_path):
    """Reproducibility: true-Fisher labels and the randomised SVD of low-rank query gradients are seeded."""
    model, train, query = small_problem()
    runs = [
        run_scores(copy.deepcopy(model), train, query, tmp_path / name, strategy="ekfac", damping_factor=None,
                   query_gradient_rank=2, seed=seed)
        for name, seed in (("a", 0), ("b", 0), ("c", 1))
    ]
    assert torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2], rtol=1e-4, atol=0)




@pytest.mark.parametrize("device, cpu", [("cpu", True), ("cuda", False)])
def test_kronfluence_computes_on_the_device_decided_for_the_run(monkeypatch, device, cpu):
    """Without cpu=True kronfluence moves everything to a GPU whenever one is visible, whatever the run
    decided (`--device cpu` on a GPU machine)."""
    seen = {}

    class Stop(Exception):
        pass

    def analyzer(**kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(task, "Analyzer", analyzer)
    with pytest.raises(Stop):
        make_analyzer(SmallCNN(), AnalysisSettings(device=device, output_dir="unused"))
    assert seen["cpu"] is cpu
