"""The smallest meaningful run of the whole validation (validation/trained_digits.py, a few minutes): a
trained ResNet-50 beats chance, EKFAC's most helpful images share the query's label more often than chance,
the planted mislabels rank above the median by self-influence, and the LDS is reported. Alone in its file:
pytest-xdist hands a worker its next file once fewer than three of its tests are left, and that file would
wait behind this one's minutes (tests/conftest.py)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from influence.results import naming
from validation import trained_digits


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
