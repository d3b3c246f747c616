"""validation/trained_digits.py: the digits folder and its planted mislabels, the seeded training, the
statistics against independent computations, and the smallest meaningful run of the whole validation
(a few minutes): a trained ResNet-50 beats chance, EKFAC's most helpful images share the query's label
more often than chance, and the planted mislabels rank above the median by EKFAC self-influence."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from safetensors.torch import load_file
from scipy.stats import mannwhitneyu

import pipeline
from influence.results import naming
from validation import digits, trained_digits

SMALL = digits.DigitsLayout(seed=0, num_images=300, val_per_class=2, mislabel_fraction=0.05)


def test_folder_is_imagenet_layout_with_recorded_planted_mislabels_written_once(tmp_path):
    record = digits.write_digits_folder(tmp_path / "digits", SMALL)
    assert sorted(p.name for p in (tmp_path / "digits").iterdir()) == ["digits.json", "test", "train", "val"]
    counts = {split: len(list((tmp_path / "digits" / split).glob("digit_*/*.png"))) for split in digits.SPLITS}
    assert counts == record["counts"] and sum(counts.values()) == 300 and counts["val"] == 20
    assert len(record["mislabels"]) == round(0.05 * counts["train"])
    for entry in record["mislabels"]:
        assert entry["path"].startswith(f"train/digit_{entry['planted_label']}/") and entry["true_label"] != entry["planted_label"]
        assert (tmp_path / "digits" / entry["path"]).is_file()
    before = (tmp_path / "digits" / "digits.json").stat().st_mtime_ns
    assert digits.write_digits_folder(tmp_path / "digits", SMALL) == record  # reused, not rewritten
    assert (tmp_path / "digits" / "digits.json").stat().st_mtime_ns == before
    with pytest.raises(pipeline.UserError, match="written with"):
        digits.write_digits_folder(tmp_path / "digits", dataclasses.replace(SMALL, seed=1))


def test_batches_without_excluded_images_keep_every_other_image_in_place():
    full = digits.epoch_batches(20, 6, torch.Generator().manual_seed(3), torch.tensor([], dtype=torch.long))
    without = digits.epoch_batches(20, 6, torch.Generator().manual_seed(3), torch.tensor([4, 7]))
    assert len(full) == 4 and sorted(torch.cat(full).tolist()) == list(range(20))
    for whole, thinned in zip(full, without):
        assert thinned.tolist() == [i for i in whole.tolist() if i not in (4, 7)]


def test_same_seed_trains_the_same_weights(tmp_path):
    torch.set_num_threads(1)
    images, labels = torch.randn(12, 3, 32, 32), torch.arange(12) % digits.NUM_CLASSES
    training = digits.Training(epochs=1, batch_size=4)
    first, again = (digits.train_model(images, labels, training, seed=0) for _ in range(2))
    other = digits.train_model(images, labels, training, seed=0, excluded=[3])
    assert torch.equal(first.fc.weight, again.fc.weight)
    assert not torch.equal(first.fc.weight, other.fc.weight)


def test_statistics_equal_independent_computations():
    rng = np.random.default_rng(0)
    scores = torch.from_numpy(rng.normal(size=200))
    planted = [3, 50, 51, 120, 199]
    scores[planted[:3]] += 3.0
    detection = trained_digits.mislabel_detection(scores, planted)
    truth = np.zeros(200, dtype=bool)
    truth[planted] = True
    # ROC AUC = the Mann-Whitney U of planted against the rest, over the number of pairs
    u_statistic = mannwhitneyu(scores.numpy()[truth], scores.numpy()[~truth]).statistic
    assert detection["auc"] == pytest.approx(u_statistic / (5 * 195))
    top10 = np.argsort(-scores.numpy())[:10]
    assert detection["recall_top2x"] == pytest.approx(truth[top10].sum() / 5)
    assert detection["planted_above_median"] == (scores.numpy()[planted] > np.median(scores.numpy())).mean()
    assert detection["recall_top10pct"] == pytest.approx(truth[np.argsort(-scores.numpy())[:20]].sum() / 5)
    low, high = detection["auc_95"]
    assert low < detection["auc"] < high and high - low > 0.05  # 5 positives: a wide interval
    pairwise = torch.tensor([[5.0, 4.0, 0.0, 3.0], [0.0, 1.0, 2.0, 3.0]])
    train_labels, query_labels = torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0])
    # top-10 of 4 images is all of them: half carry each query's label
    assert trained_digits.same_label_share(pairwise, query_labels, train_labels) == 0.5
    margins = digits.margins(torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([0]))
    assert margins.item() == pytest.approx(2.0 - np.log(2.0))


def test_report_lists_the_index_lines_of_a_run_that_built_one_and_none_otherwise():
    """On the report the full validation wrote (figure/trained_digits.json: index32, raw and relative)."""
    result = json.loads((REPO_ROOT / "figure" / "trained_digits.json").read_text())
    index = result["gradient_index"]
    lines = [line for line in trained_digits.report_table(result).splitlines() if "against exact EKFAC" in line]
    assert [line.split("(")[1].split(")")[0] for line in lines] == list(index["against_exact_ekfac"]) == ["none", "relative"]
    assert f"Spearman mean {index['against_exact_ekfac']['none']['Spearman']:.4f}" in lines[0]
    without = {key: value for key, value in result.items() if key != "gradient_index"}
    assert "against exact EKFAC" not in trained_digits.report_table(without)


def test_index_agreement_compares_only_normalisations_computed_exactly():
    rng = np.random.default_rng(1)
    exact = torch.from_numpy(rng.normal(size=(3, 40)))
    reversed_order = -exact  # every query's ranking turned upside down
    agreement = trained_digits.index_agreement({"none": exact}, {"none": reversed_order, "relative": exact})
    assert set(agreement) == {"none"}  # no exact relative scores: nothing to compare the index's with
    assert agreement["none"]["Spearman"] == pytest.approx(-1.0)
    assert agreement["none"]["top-10 overlap"] == 0.0
    assert trained_digits.index_agreement({"none": exact}, {"none": exact.clone()})["none"]["Spearman"] == pytest.approx(1.0)


@pytest.mark.slow
def test_smallest_run_finds_labels_planted_mislabels_and_reports_lds(tmp_path):
    """The whole validation at its smallest: a trained model, EKFAC and identity scores (identity also
    relative and cosine, so its self-influence of every training image), 2 + 1 LDS retrainings. Its EKFAC
    steps are the suite's one end-to-end ResNet-50 EKFAC run: the seed's full-rank command line, then its
    rank-32 one, which reuses the factors."""
    result = trained_digits.validate(trained_digits.TEST, tmp_path / "work", tmp_path / "results", tmp_path / "figures")
    json.dumps(result)  # the report is JSON as it stands
    assert result["val_accuracy"] > 0.5 and result["test_accuracy"] > 0.5  # chance: 0.1
    shares = result["same_label_share_top10"]
    assert set(shares) == {"none", "relative", "cosine"} and set(shares["relative"]) == {"identity"}
    assert shares["none"]["ekfac"] > 2 * result["chance_same_label"]
    assert result["mislabel"]["identity"]["planted_above_median"] > 0.5  # most planted mislabels rank above the median
    assert result["mislabel"]["identity"]["auc"] > 0.5
    assert set(result["lds"]) == {"identity", "ekfac"} and set(result["lds"]["identity"]) == {"none", "relative", "cosine"}
    assert "gradient_index" not in result and not list((tmp_path / "results" / trained_digits.TEST.name).glob("gradient_index_*"))
    for by_normalization in result["lds"].values():
        for value in by_normalization.values():
            assert value["num_queries"] == result["num_queries"] and -1 <= value["mean"] <= 1
    assert result["lds_subsets"] == 2 and result["lds_ceiling"]["num_subsets"] == 1
    assert 0 <= result["lds_ceiling"]["mean"] <= 1
    assert len(list((tmp_path / "work" / "lds").glob("*.json"))) == 3
    assert set(result["low_rank"]) == {"32"} and result["low_rank"]["32"]["spearman_mean"] > 0.5
    for name in ("self_influence_trained_digits_test_planted.png", "lds_trained_digits_test.png", "query_batching_trained_digits_test.png"):
        assert (tmp_path / "figures" / name).is_file()
    _assert_seed_command_lines(tmp_path / "work", tmp_path / "results")
    print(trained_digits.report_table(result))


def _assert_seed_command_lines(work_dir, output_dir):
    """The full-rank EKFAC step fitted every factor (its --profile table lists the eigendecomposition),
    the rank-32 step reused them, and rank 32 keeps most of each query's scores."""
    logs = {}
    for log in sorted(work_dir.glob("*_analyze.log")):
        text = log.read_text()
        assert "FutureWarning" not in text, log
        for name in ("ekfac", "ekfac_qlr32"):
            if f"INFO scores `{name}`:" in text:
                logs[name] = text
    assert "Perform Eigendecomposition" in logs["ekfac"]
    assert "Perform Eigendecomposition" not in logs["ekfac_qlr32"] and "Compute Pairwise Score" in logs["ekfac_qlr32"]
    name = trained_digits.TEST.name
    factor_files = sorted(naming.factors_dir(output_dir, name, "ekfac").glob("*.safetensors"))
    assert {"activation_covariance", "gradient_covariance", "activation_eigenvectors", "gradient_eigenvectors",
            "lambda_matrix"} <= {f.stem for f in factor_files}
    full_path, low_path = (naming.pairwise_scores_path(output_dir, name, scores) for scores in ("ekfac", "ekfac_qlr32"))
    assert max(f.stat().st_mtime_ns for f in factor_files) <= full_path.stat().st_mtime_ns  # not refitted for rank 32
    full, low = (load_file(str(path))[naming.SCORES_KEY] for path in (full_path, low_path))
    assert full.shape == low.shape and torch.isfinite(full).all() and torch.isfinite(low).all()
    assert not torch.equal(full, low)
    for q in range(full.shape[0]):  # per query, Pearson correlation over the training images
        assert torch.corrcoef(torch.stack([full[q], low[q]]))[0, 1] > 0.9
