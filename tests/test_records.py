"""What results depend on, and what happens when it changes: a run with other inputs (an image replaced
under the same name, other preprocessing) is refused with the change named, and result files a crash cut
short are recomputed, not reused."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from conftest import small_problem, tiny_counts, write_image_folder
from PIL import Image
from small_model_cli import analyze_in_process, build_tiny_model
from test_task import run_scores

import analyze
import pipeline
from influence.data import images


def test_image_replaced_under_the_same_name_is_refused(monkeypatch, tmp_path, capsys):
    dataset = write_image_folder(tmp_path / "imagenet", tiny_counts())
    analyze_in_process(monkeypatch, dataset, tmp_path / "out")
    victim = dataset / "train" / "n01" / "n01_001.JPEG"
    before = victim.stat().st_size
    # Another picture of the same dimensions (40 x 40), saved under the same file name.
    Image.new("RGB", Image.open(victim).size, (200, 10, 10)).save(victim, format="JPEG")
    assert victim.stat().st_size != before
    capsys.readouterr()
    with pytest.raises(SystemExit) as caught:
        analyze_in_process(monkeypatch, dataset, tmp_path / "out")
    err = capsys.readouterr().err
    assert caught.value.code == 2
    assert re.search(r"factors in .* were computed with other settings \(train_files_sha256 '\w+' -> '\w+'\)", err), err
    assert "--overwrite" in err


def test_changed_preprocessing_is_refused(monkeypatch, tmp_path, capsys):
    dataset = write_image_folder(tmp_path / "imagenet", tiny_counts())
    analyze_in_process(monkeypatch, dataset, tmp_path / "out")
    monkeypatch.setattr(images, "transform_description", lambda dataset: "Compose(Resize(size=288), ...)")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        analyze_in_process(monkeypatch, dataset, tmp_path / "out")
    assert "transform 'Compose(" in capsys.readouterr().err


def test_torn_result_files_are_recomputed_not_reused(tmp_path):
    """A factor file and the score file cut short by a crash are detected on rerun and recomputed."""
    model, train, query = small_problem()
    # A copy: safetensors maps the file into memory, and the file is about to be cut short.
    first = run_scores(copy.deepcopy(model), train, query, tmp_path, strategy="ekfac", damping_factor=None).clone()
    analysis = tmp_path / "small"
    for path in (analysis / "factors_ekfac" / "lambda_matrix.safetensors", analysis / "scores_ekfac" / "pairwise_scores.safetensors"):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    (analysis / "factors_ekfac" / "lambda_dataset_metadata.json").write_text('{"type": "Ind')
    again = run_scores(copy.deepcopy(model), train, query, tmp_path, strategy="ekfac", damping_factor=None)
    torch.testing.assert_close(again, first, rtol=1e-5, atol=0)
    assert len((analysis / "scores_ekfac" / "pairwise_scores.safetensors").read_bytes()) > 100


def test_checkpoint_sizes_are_recorded_and_a_change_of_either_is_refused(monkeypatch, tmp_path, capsys):
    dataset = write_image_folder(tmp_path / "imagenet", tiny_counts())
    analyze_in_process(monkeypatch, dataset, tmp_path / "out", "--crop_size", "64", "--resize_size", "73")
    record = json.loads((tmp_path / "out" / "imagenet" / "factors_identity" / "run_config.json").read_text())
    assert "Resize(size=73, interpolation=bilinear" in record["depends_on"]["transform"]
    assert "CenterCrop(size=(64, 64))" in record["depends_on"]["transform"]
    assert record["resolved"]["preprocessing"] == {"resize_size": 73, "crop_size": 64, "interpolation": "bilinear"}
    analyze_in_process(monkeypatch, dataset, tmp_path / "out", "--crop_size", "64", "--resize_size", "73")  # reused
    for changed in (["--crop_size", "48", "--resize_size", "73"], ["--crop_size", "64", "--resize_size", "80"]):
        capsys.readouterr()
        with pytest.raises(SystemExit) as caught:
            analyze_in_process(monkeypatch, dataset, tmp_path / "out", *changed)
        err = capsys.readouterr().err
        assert caught.value.code == 2 and "were computed with other settings (transform 'Compose(" in err, err


def test_torchvision_weights_bring_their_own_preprocessing_and_record_it(monkeypatch, tmp_path):
    """IMAGENET1K_V2 is evaluated with Resize(232); the run uses and records that (no download: the model is
    replaced by a tiny one and the 1,000-class check by a no-op, the weights' metadata is local)."""
    dataset = write_image_folder(tmp_path / "imagenet", tiny_counts())
    monkeypatch.setattr(pipeline, "check_pretrained_classes", lambda dataset, weights, arch="resnet50": None)
    monkeypatch.setattr(pipeline, "build_model", build_tiny_model)
    analyze.main([
        "--dataset_dir", str(dataset), "--weights", "IMAGENET1K_V2", "--num_workers", "0",
        "--factor_strategy", "identity", "--num_queries", "2", "--output_dir", str(tmp_path / "out"),
    ])
    record = json.loads((tmp_path / "out" / "imagenet" / "scores_identity" / "run_config.json").read_text())
    assert "Resize(size=232, interpolation=bilinear" in record["depends_on"]["transform"]
    assert "CenterCrop(size=(224, 224))" in record["depends_on"]["transform"]
    assert record["resolved"]["preprocessing"] == {"resize_size": 232, "crop_size": 224, "interpolation": "bilinear"}
