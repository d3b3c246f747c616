"""validation/trained_digits.py: the digits folder and its planted mislabels, the seeded training, the
statistics against independent computations; the whole validation's smallest run is
tests/test_trained_digits_run.py."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy.stats import mannwhitneyu

import pipeline
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


def test_index_agreement_compares_only_normalisations_computed_exactly():
    rng = np.random.default_rng(1)
    exact = torch.from_numpy(rng.normal(size=(3, 40)))
    reversed_order = -exact  # every query's ranking turned upside down
    agreement = trained_digits.index_agreement({"none": exact}, {"none": reversed_order, "relative": exact})
    assert set(agreement) == {"none"}  # no exact relative scores: nothing to compare the index's with
    assert agreement["none"]["Spearman"] == pytest.approx(-1.0)
    assert agreement["none"]["top-10 overlap"] == 0.0
    assert trained_digits.index_agreement({"none": exact}, {"none": exact.clone()})["none"]["Spearman"] == pytest.approx(1.0)
