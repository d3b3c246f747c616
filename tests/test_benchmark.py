"""benchmarks/benchmark.py on a tiny run: a small CNN in place of ResNet-50 (the phases, their JSON and the
projection do not depend on the model), a handful of generated ImageNet-sized JPEGs, the CPU."""

from __future__ import annotations

import json

import pytest
import torch

import benchmarks.benchmark as benchmark
from benchmarks import measure

REQUIRED_KEYS = ("phase", "device", "examples_per_s", "peak_host_mb", "flops_per_example", "peak_share")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("benchmark") / "bench.json"
    result = benchmark.main([
        "--model", "small", "--device", "cpu", "--num_classes", "2", "--num_train", "4", "--num_queries", "2",
        "--query_batch_size", "1", "--train_batch_size", "2", "--loading_images", "6",
        "--loading_workers", "0", "1", "--num_workers", "0", "--precisions", "float32", "bfloat16",
        "--json", str(out),
    ])
    return result, json.loads(out.read_text())


def test_json_has_every_phase_with_positive_rates_memory_and_flop_share(tiny_run):
    _, saved = tiny_run
    phases = saved["phases"]
    assert {p["phase"] for p in phases} == set(benchmark.PHASES)
    for phase in phases:
        assert all(key in phase for key in REQUIRED_KEYS), phase
        assert phase["device"].startswith("CPU") and phase["peak_host_mb"] > 0 and phase["seconds"] > 0
        if phase["phase"] == "eigendecomposition":
            assert phase["examples_per_s"] is None  # a per-model cost, not a per-example one
            continue
        assert phase["examples_per_s"] > 0
        if phase["phase"] != "loading":
            assert phase["flops_per_example"] > 0 and 0 < phase["peak_share"]
    assert [p["num_workers"] for p in phases if p["phase"] == "loading"] == [0, 1]
    assert {p["variant"] for p in phases if p["phase"] == "scores"} == {
        "full rank, float32", "rank 32, float32", "full rank, bfloat16", "rank 32, bfloat16"}
    assert {p["variant"] for p in phases if p["phase"] in ("covariance", "lambda")} == {"float32", "bfloat16"}


def test_covariance_flops_are_the_forward_the_output_gradients_and_the_covariance_products(tiny_run):
    """Computed independently: kronfluence's covariance pass needs the forward, the gradients of each
    layer's output (no weight gradients) and, per layer, A^T A of the unfolded inputs (with a bias column)
    and G^T G of the output gradients, over every spatial position."""
    _, saved = tiny_run
    model = benchmark.build_benchmark_model("small", 0)
    images = torch.randn(1, 3, 224, 224, requires_grad=True)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    with measure.FlopCounterMode(display=False) as counter:
        model(images).sum().backward()
    positions = 14 * 14  # the conv's output map: 224 / stride 16
    covariances = 2 * positions * ((3 * 7 * 7 + 1) ** 2 + 4**2) + 2 * ((16 + 1) ** 2 + 4**2)
    # The counted backward also includes the gradient of the input images, which kronfluence does not need.
    input_gradient = 2 * positions * 4 * 3 * 7 * 7
    expected = counter.get_total_flops() - input_gradient + covariances
    covariance = next(p for p in saved["phases"] if p["phase"] == "covariance" and p["variant"] == "float32")
    assert covariance["flops_per_example"] == expected
    # The achieved rate is the counted FLOPs times the measured rate, and the share divides it by the peak.
    assert covariance["peak_share"] == pytest.approx(covariance["flops_per_example"] * covariance["examples_per_s"] / covariance["peak_flops_per_s"])


def test_projection_covers_the_seeds_three_jobs_and_prints_their_tables(tiny_run, capsys):
    result, saved = tiny_run
    assert [job["job"] for job in saved["projection"]] == list(benchmark.SEED_JOBS)
    for job in saved["projection"]:
        assert job["total_seconds"] > 0 and job["passes_over_training_set"] >= 1
        assert job["total_seconds"] == pytest.approx(sum(job["actions_seconds"].values()))
    full = saved["projection"][0]
    assert set(full["actions_seconds"]) == {"Fit Covariance", "Perform Eigendecomposition", "Fit Lambda", "Compute Pairwise Score"}
    table = benchmark.seed_format_table(full)
    assert "Compute Pairwise Score" in table and "Total" in table
    assert result["phases"] == saved["phases"]


@pytest.mark.parametrize("argv, message", [
    (["--phases", "scores"], "need the factors"),
    (["--phases", "covariance", "eigendecomposition", "scores"], "need the lambda"),
    (["--num_workers", "0", "--prefetch_factor", "2"], "--prefetch_factor needs"),
    (["--strategy", "identity", "--phases", "covariance"], "fits no factors"),
])
def test_impossible_combinations_are_refused_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_synthetic_folder_has_imagenet_layout_and_sizes(tmp_path):
    root = measure.make_synthetic_imagenet(tmp_path, num_classes=2, train_per_class=4, val_per_class=1)
    train = sorted((root / "train").glob("n*/*.JPEG"))
    assert len(train) == 8 and len(list((root / "val").glob("n*/*.JPEG"))) == 2
    from PIL import Image

    sizes = {Image.open(path).size for path in train}
    assert len(sizes) > 1 and sizes <= set(measure.IMAGENET_SIZES)
    assert min(path.stat().st_size for path in train) > 20_000  # photo-like JPEGs, not flat colour


@pytest.mark.parametrize("name, expected", [
    ("NVIDIA H100 80GB HBM3", "H100"),
    ("NVIDIA H100 NVL", "H100 NVL"),  # not the SXM part's peaks, 15-20% higher
    ("NVIDIA H200 NVL", "H200 NVL"),
    ("NVIDIA H200", "H200"),
    ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA A100-SXM4-80GB", "A100"),
])
def test_gpu_peaks_match_the_named_part(monkeypatch, name, expected):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: name)
    peaks = measure.device_peaks(torch.device("cuda"), tf32=False)
    assert peaks["source"].startswith(f"NVIDIA data sheet, {expected} dense")
    assert peaks["float32"] == dict(measure.KNOWN_GPU_PEAKS)[expected]["float32"]


def test_timing_waits_for_queued_gpu_work_before_it_starts(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: calls.append("synchronize"))
    measure.time_call(lambda: calls.append("work"), torch.device("cuda"))
    assert calls == ["synchronize", "work", "synchronize"]


@pytest.mark.parametrize("module", ["benchmarks.benchmark", "benchmarks.query_batching_benchmark", "benchmarks.top_influences_benchmark", "benchmarks.explorer_benchmark"])
def test_a_workdir_the_benchmark_did_not_make_is_refused_and_kept(module, tmp_path, capsys):
    """`--workdir influence_results` (or `.`) must never be deleted: refused in one line, untouched."""
    import importlib

    results = tmp_path / "influence_results"
    (results / "imagenet").mkdir(parents=True)
    precious = results / "imagenet" / "pairwise_scores.safetensors"
    precious.write_bytes(b"hours of work")
    with pytest.raises(SystemExit) as stopped:
        importlib.import_module(module).main(["--workdir", str(results)])
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "is not empty and was not made by a benchmark" in error and str(results) in error, error
    assert precious.read_bytes() == b"hours of work"
    assert sorted(p.name for p in results.iterdir()) == ["imagenet"]  # no lock file or marker left behind


def test_a_workdir_made_by_a_benchmark_is_reused_then_removed(tmp_path):
    from benchmarks import workdir

    folder = tmp_path / "scratch"
    with workdir.own_workdir(folder, keep=True):
        (folder / "images").mkdir()
    assert (folder / workdir.MARKER).is_file()
    with workdir.own_workdir(folder, keep=False):  # its own, from before: accepted
        assert (folder / "images").is_dir()
    assert not folder.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with workdir.own_workdir(empty, keep=False):
        pass
    assert not empty.exists()
