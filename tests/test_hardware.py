"""influence/runtime/hardware.py: the device decided once and described in the log, the CPUs a process may use, and the
GPU-only checks, with a GPU simulated by monkeypatched torch.cuda functions where one is needed."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import types

import pytest
import torch
from conftest import REPO_ROOT

from influence.runtime import hardware
from influence.runtime.cli import UserError


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch.cuda as it answers on a machine with two H100s, without touching CUDA."""
    props = types.SimpleNamespace(name="NVIDIA H100 80GB HBM3", total_memory=80 * 2**30, major=9, minor=0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *args: props)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (props.major, props.minor))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: props.name)
    return props


def test_the_suite_hides_every_gpu_from_itself_and_its_subprocesses():
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "" and not torch.cuda.is_available()
    child = subprocess.run(
        [sys.executable, "-c", "import torch; from influence.runtime import hardware; print(torch.cuda.device_count(), hardware.cuda_unavailable_reason())"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True,
    )
    assert child.stdout.strip() == "0 CUDA_VISIBLE_DEVICES is empty"


def test_auto_takes_the_gpu_when_torch_sees_one_and_cpu_is_always_the_cpu(fake_gpu):
    assert hardware.resolve_device("auto") == "cuda"
    assert hardware.resolve_device("cuda") == "cuda"
    assert hardware.resolve_device("cpu") == "cpu"


def test_cuda_without_a_usable_gpu_is_one_line_naming_the_reason_and_the_driver():
    assert hardware.resolve_device("auto") == "cpu"
    with pytest.raises(UserError) as error:
        hardware.resolve_device("cuda")
    message = str(error.value)
    assert "CUDA_VISIBLE_DEVICES is empty" in message and f"driver >= {hardware.MIN_DRIVER}" in message
    assert "\n" not in message


def test_the_gpu_is_described_by_name_memory_capability_and_versions(fake_gpu):
    line = hardware.describe_device("cuda")
    assert line.startswith("device: GPU 0 of 2, NVIDIA H100 80GB HBM3, 80.0 GiB, compute capability 9.0;")
    assert f"torch {torch.__version__}, CUDA {torch.version.cuda}" in line


def test_a_cpu_run_says_why_it_is_not_on_a_gpu(fake_gpu):
    assert "(--device cpu)" in hardware.describe_device("cpu", "cpu")
    assert "no usable GPU" not in hardware.describe_device("cpu", "cpu")


def test_a_gpu_older_than_the_build_supports_is_one_line(fake_gpu, monkeypatch):
    hardware.check_gpu_capability("cuda")  # 9.0 is fine
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (7, 0))
    with pytest.raises(UserError, match=r"compute capability 7\.0; this torch .* needs 7\.5"):
        hardware.check_gpu_capability("cuda")


def test_a_long_run_on_the_cpu_warns_loudly_and_a_short_one_or_the_demo_does_not(caplog):
    with caplog.at_level(logging.WARNING, logger="hardware"):
        assert not hardware.warn_if_slow_on_cpu("cpu", hardware.CPU_WARNING_IMAGES, demo=False)
        assert not hardware.warn_if_slow_on_cpu("cpu", 10**6, demo=True)
        assert not hardware.warn_if_slow_on_cpu("cuda", 10**6, demo=False)
        assert not caplog.records
        assert hardware.warn_if_slow_on_cpu("cpu", 1_281_167, demo=False)
    (record,) = caplog.records
    assert record.getMessage().startswith("RUNNING ON THE CPU: 1281167 training images will take at least ~")
    assert f"driver >= {hardware.MIN_DRIVER}" in record.getMessage()


def test_usable_cpus_follow_the_affinity_mask_and_the_cgroup_quota(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    monkeypatch.setattr(os, "cpu_count", lambda: 128)  # the whole machine: not what this process may use
    monkeypatch.setattr(hardware, "cgroup_cpu_limit", lambda path=None: None)
    assert hardware.available_cpus() == 6
    monkeypatch.setattr(hardware, "cgroup_cpu_limit", lambda path=None: 4)
    assert hardware.available_cpus() == 4


def test_a_cgroup_quota_is_read_and_rounded_up(tmp_path):
    quota = tmp_path / "cpu.max"
    quota.write_text("250000 100000\n")
    assert hardware.cgroup_cpu_limit(quota) == 3
    quota.write_text("max 100000\n")
    assert hardware.cgroup_cpu_limit(quota) is None
    assert hardware.cgroup_cpu_limit(tmp_path / "missing") is None


@pytest.mark.parametrize("cpus, processes, workers", [
    (2, 1, 2), (64, 1, 8), (64, 8, 8), (32, 8, 4), (16, 8, 2), (4, 8, 0),
])
def test_workers_share_the_node_among_its_processes(monkeypatch, cpus, processes, workers):
    monkeypatch.setattr(hardware, "available_cpus", lambda: cpus)
    assert hardware.default_num_workers(processes) == workers


def test_repeatable_cudnn_only_on_gpu_runs(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    hardware.make_repeatable("cpu")
    assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == (False, True)
    hardware.make_repeatable("cuda")
    assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == (True, False)
