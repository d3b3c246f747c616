"""influence/results/preflight.py: the bytes a run will write, counted from layer shapes and dtypes, equal the tensors in the
files kronfluence writes; a disk or host memory too small for the run is refused in one line before any
factor is fitted; what is already on disk is not counted again; ResNet-50's sizes on ImageNet."""

from __future__ import annotations

import re
import shutil

import pytest
from conftest import tiny_counts, write_image_folder
from safetensors import safe_open
from small_model_cli import analyze_in_process, build_tiny_model
from torchvision.models import resnet50

from influence.analysis.settings import AnalysisSettings
from influence.results import naming, preflight

PHASE_FILES = {
    "covariance": ["activation_covariance", "gradient_covariance", "num_activation_covariance_processed", "num_gradient_covariance_processed"],
    "eigendecomposition": ["activation_eigenvectors", "activation_eigenvalues", "gradient_eigenvectors", "gradient_eigenvalues"],
    "lambda": ["lambda_matrix", "num_lambda_processed"],
}
PARTITIONS = ["--factor_strategy", "ekfac", "--factor_partitions", "2", "--score_partitions", "2"]


def _payload(path) -> int:
    """Bytes of the tensors in a safetensors file (without its header)."""
    with safe_open(str(path), framework="pt") as handle:
        return sum(handle.get_tensor(key).numel() * handle.get_tensor(key).element_size() for key in handle.keys())


@pytest.fixture
def dataset(tmp_path):
    return write_image_folder(tmp_path / "imagenet", tiny_counts())  # 6 training images, 4 validation


@pytest.mark.parametrize("half", [False, True], ids=["float32", "bfloat16"])
def test_counted_bytes_equal_the_files_written(monkeypatch, dataset, tmp_path, half):
    extra = [*PARTITIONS, *(["--use_half_precision"] if half else [])]
    settings = AnalysisSettings(strategy="ekfac", use_half_precision=half, output_dir=str(tmp_path / "out"), analysis_name="imagenet",
                                factor_partitions=2, score_partitions=2)
    model = build_tiny_model()
    before = preflight.plan_run(model, settings, num_train=6, num_queries=2, self_influence=False)
    (scores,) = analyze_in_process(monkeypatch, dataset, tmp_path / "out", *extra).values()
    factors = naming.factors_dir(tmp_path / "out", "imagenet", settings.factors_name)
    counted = preflight.factor_bytes(model, settings)
    for phase, names in PHASE_FILES.items():
        assert counted[phase] == sum(_payload(factors / f"{name}.safetensors") for name in names), phase
    assert before.total("factors") == sum(counted.values())
    assert before.total("scores") == _payload(scores) == 2 * 6 * (2 if half else 4)
    # Two full-size covariance partitions are the most on disk at one time; joining takes twice the scores.
    assert before.partitions == 2 * counted["covariance"] and before.join_memory == 2 * before.total("scores")
    after = preflight.plan_run(model, settings, num_train=6, num_queries=2, self_influence=False)
    assert after.disk == 0 and after.join_memory == 0  # nothing left to write


def test_small_disk_is_refused_before_any_factor_is_fitted(monkeypatch, dataset, tmp_path, capsys):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**6, 10**6 - 1000, 1000))
    capsys.readouterr()
    with pytest.raises(SystemExit) as caught:
        analyze_in_process(monkeypatch, dataset, tmp_path / "out", *PARTITIONS)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert caught.value.code == 2
    assert re.fullmatch(
        rf"analyze\.py: error: not enough disk space under {re.escape(str(tmp_path))}/out/imagenet: the run needs up to "
        r"[\d.]+ kB \(factors [\d.]+ kB, scores 48 bytes, and partition files of up to [\d.]+ kB at a time\), 1\.0 kB is free; free space "
        r"or choose another --output_dir, or make the score file smaller with fewer --num_queries or --use_half_precision",
        line,
    ), line
    assert not (tmp_path / "out").exists()  # nothing written, not even the lock or the folders it made


def test_short_host_memory_for_joining_is_refused(monkeypatch, dataset, tmp_path, capsys):
    monkeypatch.setattr(preflight, "available_memory_bytes", lambda: 50)
    capsys.readouterr()
    with pytest.raises(SystemExit) as caught:
        analyze_in_process(monkeypatch, dataset, tmp_path / "out", *PARTITIONS)
    assert caught.value.code == 2
    assert "error: not enough host memory to join the score partitions: it takes about 96 bytes (twice the score file), 50 bytes is available" in capsys.readouterr().err
    assert not naming.factors_dir(tmp_path / "out", "imagenet", "ekfac").exists()
    unpartitioned = AnalysisSettings(output_dir=str(tmp_path / "out"), score_partitions=1)
    assert preflight.plan_run(build_tiny_model(), unpartitioned, 6, 2, self_influence=False).join_memory == 0  # nothing to join


def test_resnet50_on_imagenet(tmp_path):
    """The numbers in the README: 0.6 GB of covariances (and as much for their eigenvectors), 0.1 GB of
    lambda, a 5.1 GB score file with 10 GB to join it, covariance partitions of 0.6 GB each."""
    settings = AnalysisSettings(output_dir=str(tmp_path))
    counted = preflight.factor_bytes(resnet50(), settings)
    assert [round(counted[phase] / 1e6) for phase in PHASE_FILES] == [615, 616, 102]
    diagonal, identity = (preflight.factor_bytes(resnet50(), AnalysisSettings(strategy=name)) for name in ("diagonal", "identity"))
    assert diagonal == {"covariance": 0, "eigendecomposition": 0, "lambda": counted["lambda"]}
    assert not any(identity.values())
    plan = preflight.plan_run(resnet50(), settings, num_train=1_281_167, num_queries=1000, self_influence=False)
    assert plan.total("scores") == 1000 * 1_281_167 * 4 and plan.join_memory == 2 * plan.total("scores")
    assert plan.partitions == 10 * counted["covariance"]  # 10 partitions of 10,000 fitted images
    # At most when the score partitions are joined: the factors, the score file and its partitions.
    assert plan.disk == plan.total("factors") + 2 * plan.total("scores")
    assert round(plan.disk / 1e9, 1) == 11.6
