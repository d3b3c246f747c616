"""influence/analysis/settings.py and the speed settings of analyze.py: channels-last layout, TF32 and the DataLoader keyword
arguments; each is on by default, a flag turns it off, and none changes the scores beyond float rounding."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import SmallCNN, small_problem
from test_task import run_scores
from torch import nn

import analyze
from influence.analysis.settings import TF32_CHOICES, AnalysisSettings, dataloader_kwargs, set_tf32, uses_channels_last
from influence.analysis.task import ClassificationTask, make_analyzer
from influence.results.records import precision_record


def test_flags_turn_each_setting_off(tmp_path):
    common = ["--dataset_dir", str(tmp_path)]
    defaults = analyze.settings_from_args(analyze.parse_args(common), "cpu")
    assert (defaults.channels_last, defaults.tf32, defaults.pin_memory, defaults.persistent_workers) == (None, "matmuls", True, True)
    assert not uses_channels_last(defaults)  # measured slower on the CPU
    off = analyze.settings_from_args(analyze.parse_args(
        [*common, "--channels_last", "off", "--tf32", "off", "--no_pin_memory", "--no_persistent_workers", "--num_workers", "3", "--prefetch_factor", "5"]), "cpu")
    assert (off.channels_last, off.tf32, off.pin_memory, off.persistent_workers, off.prefetch_factor) == (False, "off", False, False, 5)


def test_prefetch_without_workers_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        analyze.parse_args(["--dataset_dir", str(tmp_path), "--num_workers", "0", "--prefetch_factor", "2"])
    assert exit_info.value.code == 2 and "--prefetch_factor needs" in capsys.readouterr().err


@pytest.mark.parametrize("half, tf32, expected", [
    (False, "matmuls", False),  # strict float32 convolutions: no tensor cores for NHWC to feed
    (False, "off", False),
    (False, "all", True),  # TF32 convolutions
    (True, "matmuls", True),  # bfloat16
])
def test_channels_last_auto_only_where_tensor_cores_run_the_convolutions(half, tf32, expected):
    settings = AnalysisSettings(device="cuda", use_half_precision=half, tf32=tf32)
    assert uses_channels_last(settings) is expected
    assert not uses_channels_last(AnalysisSettings(device="cpu", use_half_precision=half, tf32=tf32))
    assert uses_channels_last(AnalysisSettings(device="cpu", channels_last=True))  # the flag wins


def test_dataloader_kwargs_follow_the_settings_and_the_device():
    with_workers = dataloader_kwargs(AnalysisSettings(num_workers=2, prefetch_factor=4))
    assert with_workers.persistent_workers and with_workers.prefetch_factor == 4
    assert not with_workers.pin_memory  # pinning only helps copies to a GPU
    assert dataloader_kwargs(AnalysisSettings(device="cuda")).pin_memory
    assert not dataloader_kwargs(AnalysisSettings(device="cuda", pin_memory=False)).pin_memory
    assert not dataloader_kwargs(AnalysisSettings(num_workers=2, persistent_workers=False)).persistent_workers
    without = dataloader_kwargs(AnalysisSettings(num_workers=0, prefetch_factor=4))
    assert not without.persistent_workers and without.prefetch_factor is None  # torch refuses both without workers


def test_channels_last_gives_the_same_scores_as_contiguous(tmp_path):
    model, train, query = small_problem()
    kwargs = dict(strategy="ekfac", damping_factor=None)
    contiguous = run_scores(copy.deepcopy(model), train, query, tmp_path / "nchw", channels_last=False, **kwargs)
    nhwc = run_scores(copy.deepcopy(model), train, query, tmp_path / "nhwc", channels_last=True, **kwargs)
    torch.testing.assert_close(nhwc, contiguous, rtol=1e-4, atol=1e-6)
    assert contiguous.abs().max() > 1e-3
    record = json.loads((tmp_path / "nhwc" / "small" / "scores_ekfac" / "run_config.json").read_text())
    assert record["resolved"]["channels_last"] is True


def test_channels_last_converts_the_model_and_the_images():
    model = make_analyzer(SmallCNN(), AnalysisSettings(channels_last=True, output_dir="unused")).model
    weight = next(m.weight for m in model.modules() if isinstance(m, nn.Conv2d))
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    task = ClassificationTask(seed=0, channels_last=True)
    assert task._layout(torch.randn(2, 3, 8, 8)).is_contiguous(memory_format=torch.channels_last)


def test_tf32_is_off_on_the_cpu_and_is_then_not_recorded(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU in the machine, a CPU run
    for choice in TF32_CHOICES:
        assert set_tf32(choice, "cpu") == "off"
        assert precision_record("cpu") == {}
    with pytest.raises(ValueError, match="tf32"):
        set_tf32("on", "cpu")


@pytest.fixture
def precision_switches():
    """Puts torch's float32 precision switches back as they were after a test sets them."""
    saved = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    yield
    torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved


@pytest.mark.parametrize("capability, choice, record", [
    ((8, 0), "matmuls", {"tf32": "matmuls"}),
    ((8, 0), "all", {"tf32": "matmuls and convolutions"}),
    ((8, 0), "off", {}),
    ((7, 0), "all", {}),  # a V100: no TF32
])
def test_tf32_choice_sets_torch_switches_and_is_recorded_on_a_gpu(monkeypatch, precision_switches, capability, choice, record):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: capability)
    in_force = set_tf32(choice, "cuda")
    assert in_force == (choice if capability[0] >= 8 else "off")
    # Convolutions leave PyTorch's default (TF32) unless asked for: they are what moves the scores.
    assert torch.backends.cudnn.conv.fp32_precision == ("tf32" if in_force == "all" else "ieee")
    assert torch.backends.cuda.matmul.fp32_precision == ("ieee" if in_force == "off" else "tf32")
    assert precision_record("cuda") == record
