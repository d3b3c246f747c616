"""benchmarks/tf32_accuracy.py: TF32 rounding against an independent computation, the dispatch mode that
feeds it to matrix products and convolutions, and the command line on a tiny folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import pipeline
from benchmarks import tf32_accuracy
from benchmarks.tf32_accuracy import EmulatedTF32, round_to_tf32


def numpy_tf32(values: np.ndarray, rounding: str) -> np.ndarray:
    """TF32 by frexp: the mantissa in [0.5, 1) scaled to 11 significant bits (the implicit one and 10 kept)."""
    mantissa, exponent = np.frexp(values.astype(np.float64))
    cut = np.round if rounding == "nearest" else np.trunc  # np.round: ties to even
    return np.ldexp(cut(mantissa * 2**11) / 2**11, exponent).astype(np.float32)


@pytest.mark.parametrize("rounding", tf32_accuracy.ROUNDINGS)
def test_rounding_equals_frexp_arithmetic_over_the_float32_range(rounding):
    generator = torch.Generator().manual_seed(0)
    # Normal numbers only: TF32 subnormals keep 10 stored bits, not 11 significant ones as frexp would.
    values = torch.randn(200_000, generator=generator) * torch.logspace(-30, 30, 200_000)
    ties = torch.tensor([1 + 2**-11, 1 + 3 * 2**-11, -(1 + 2**-11), 1 + 2**-11 + 2**-20], dtype=torch.float32)
    values = torch.cat([values, ties])
    rounded = round_to_tf32(values, rounding)
    assert np.array_equal(rounded.numpy(), numpy_tf32(values.numpy(), rounding))
    if rounding == "nearest":  # ties go to the even neighbour, just above a tie goes up
        assert rounded[-4:].tolist() == [1.0, 1 + 4 * 2**-11, -1.0, 1 + 2 * 2**-11]
    assert (rounded.view(torch.int32) & (2**13 - 1)).eq(0).all()
    relative = ((rounded - values).abs() / values.abs()).max().item()
    assert 0 < relative <= (2**-11 if rounding == "nearest" else 2**-10)


def test_rounding_keeps_tf32_values_infinities_and_nans():
    kept = torch.tensor([0.0, -0.0, 1.0, -1.5, 3 * 2**-10, float("inf"), float("-inf"), 2.0**100])
    assert torch.equal(round_to_tf32(kept, "nearest"), kept)
    assert torch.isnan(round_to_tf32(torch.tensor([float("nan")]), "truncate")).all()
    with pytest.raises(ValueError, match="rounding"):
        round_to_tf32(kept, "up")


def test_mode_rounds_float32_operands_of_products_and_convolutions_only():
    generator = torch.Generator().manual_seed(1)
    a, b, bias = (torch.randn(*shape, generator=generator) for shape in ((5, 7), (7, 3), (3,)))
    with EmulatedTF32("nearest") as mode:
        product = a @ b
        linear = torch.nn.functional.linear(a, b.T, bias)
        exact = a.double() @ b.double()
        added = a + 1  # not a product: untouched
    rounded_a, rounded_b = round_to_tf32(a, "nearest"), round_to_tf32(b, "nearest")
    assert torch.equal(product, rounded_a @ rounded_b)
    assert not torch.equal(product, a @ b)
    assert torch.allclose(linear, rounded_a @ rounded_b + bias, atol=1e-6)  # bias added in float32
    assert torch.equal(exact, a.double() @ b.double())
    assert torch.equal(added, a + 1)
    assert set(mode.counts) == {"aten.mm.default", "aten.addmm.default"}


def test_mode_reaches_convolution_gradients():
    torch.manual_seed(3)
    conv = nn.Conv2d(3, 4, 3)
    images = torch.randn(2, 3, 8, 8)
    with EmulatedTF32("truncate") as mode:
        conv(images).square().sum().backward()
    emulated = conv.weight.grad.clone()
    conv.weight.grad = None
    conv(images).square().sum().backward()
    assert mode.counts == {"aten.convolution.default": 1, "aten.convolution_backward.default": 1}
    assert not torch.equal(emulated, conv.weight.grad)
    # Truncation moves each operand by at most 2^-10 of itself: the gradient, a sum of such products, by a
    # few times that relative to its size.
    assert (emulated - conv.weight.grad).norm() / conv.weight.grad.norm() < 2**-7


def test_command_line_compares_tf32_scores_with_float32_and_reuses_only_its_own_results(tiny_imagenet, resnet50_checkpoint, tmp_path, capsys):
    output = tmp_path / "results"
    summary = tmp_path / "tf32.json"
    argv = [
        "--roundings", "truncate", "--output_dir", str(output), "--json", str(summary),
        "--dataset_dir", str(tiny_imagenet), "--checkpoint", str(resnet50_checkpoint), "--resize_size", "128", "--crop_size", "112",
        "--factor_strategy", "identity", "--num_queries", "2", "--train_batch_size", "3", "--query_batch_size", "2",
    ]
    result = tf32_accuracy.main(argv)
    assert json.loads(summary.read_text()) == json.loads(json.dumps(result))
    compared = result["variants"]["tf32_truncate"]["identity"]
    calls = result["tf32_operand_calls"]["tf32_truncate"]
    # The model's convolutions and gradients, and kronfluence's per-example gradient products in its hooks.
    assert {"aten.convolution.default", "aten.convolution_backward.default", "aten.bmm.default"} <= set(calls)
    assert result["reused"] == {"tf32_truncate": False}
    # Truncating 13 mantissa bits moves every product by up to 2^-10: the scores change, a little.
    assert 0 < compared["max_abs_difference_over_max_abs_score"] < 0.1
    assert len(compared["per_query"]["Spearman"]) == 2
    assert compared["statistics"]["Spearman"]["minimum"] > 0.5
    printed = capsys.readouterr().out
    assert "tf32_truncate vs float32, scores `identity`" in printed and "Spearman" in printed
    # The reference is plain float32 on a GPU too: analyze.py ran with --tf32 off.
    record = json.loads((output / "float32" / "scores_identity" / "run_config.json").read_text())
    assert record["settings"]["tf32"] == "off"

    again = tf32_accuracy.main(argv)
    assert again["reused"] == {"tf32_truncate": True}
    assert again["variants"] == result["variants"]
    marker = output / "tf32_truncate" / tf32_accuracy.EMULATION_FILE
    marker.write_text(marker.read_text().replace('"truncate"', '"nearest"'))  # as if another emulation made it
    third = tf32_accuracy.main(argv)
    assert third["reused"] == {"tf32_truncate": False}
    assert third["variants"] == result["variants"]


def test_batchnorm_statistics_come_from_the_training_images_drawn_by_the_seed(tiny_imagenet, tmp_path):
    parsed = tf32_accuracy.parse_analyze_args(["--dataset_dir", str(tiny_imagenet), "--seed", "3"], True)
    path = tf32_accuracy.batchnorm_calibrated_checkpoint(parsed, tmp_path / "out")
    assert path.name.startswith("resnet50_seed3_batchnorm_from_")
    state = torch.load(path)
    model = pipeline.build_model(weights=None, checkpoint=path)
    train = pipeline.get_imagenet_dataset("train", tiny_imagenet)
    images = torch.stack([train[i][0] for i in range(len(train))])  # 6 images: all drawn
    with torch.no_grad():
        first = model.conv1(images)
    assert torch.allclose(state["bn1.running_mean"], first.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert torch.allclose(state["bn1.running_var"], first.var(dim=(0, 2, 3)), rtol=1e-3, atol=1e-5)
    stamp = path.stat().st_mtime_ns
    assert tf32_accuracy.batchnorm_calibrated_checkpoint(parsed, tmp_path / "out") == path
    assert path.stat().st_mtime_ns == stamp  # reused, so its sha256 and the results that name it stay valid


@pytest.mark.parametrize("flags", [
    ["--analysis_name", "x"], ["--analysis_name=x"], ["--use_half"], ["--self_influence"], ["--tf32", "all"],
    ["--calibrate_batchnorm", "--weights", "none"],
])
def test_flags_it_sets_or_cannot_honour_are_refused(flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tf32_accuracy.main(["--demo", *flags])
    assert exit_info.value.code == 2
    assert "drop it" in capsys.readouterr().err


def test_mode_limited_to_one_kind_of_op_leaves_the_other_in_float32():
    generator = torch.Generator().manual_seed(2)
    a, b = torch.randn(6, 6, generator=generator), torch.randn(6, 6, generator=generator)
    images, weight = torch.randn(1, 2, 5, 5, generator=generator), torch.randn(3, 2, 3, 3, generator=generator)
    with EmulatedTF32("nearest", "convolutions") as convolutions_only:
        product, convolved = a @ b, torch.nn.functional.conv2d(images, weight)
    assert torch.equal(product, a @ b)
    assert not torch.equal(convolved, torch.nn.functional.conv2d(images, weight))
    with EmulatedTF32("nearest", "matmuls") as matmuls_only:
        product, convolved = a @ b, torch.nn.functional.conv2d(images, weight)
    assert not torch.equal(product, a @ b)
    assert torch.equal(convolved, torch.nn.functional.conv2d(images, weight))
    assert set(convolutions_only.counts) == {"aten.convolution.default"}
    assert set(matmuls_only.counts) == {"aten.mm.default"}
    assert tf32_accuracy.variant_name("nearest", "convolutions") == "tf32_nearest_convolutions"
    assert tf32_accuracy.variant_name("truncate", "all") == "tf32_truncate"
    assert tf32_accuracy.variant_name(None, "matmuls") == "float32"
