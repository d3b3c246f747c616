"""pipeline.py: datasets from ImageNet-layout folders (odd real-world image files included), the
ResNet-50 from weights or checkpoints, and a one-line error for each input a user can get wrong."""

from __future__ import annotations

import argparse
import re
import shutil
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_counts, write_image_folder
from PIL import Image
from small_model_cli import analyze_in_process
from torchvision.models import resnet50

import analyze
import pipeline
from influence.data import images, preprocessing
from influence.model import weights as model_weights
from influence.results import naming
from influence.runtime.cli import UserError


def test_odd_imagenet_files_load_as_rgb_224(tmp_path):
    """Real ImageNet has CMYK JPEGs, grayscale JPEGs and a PNG saved under a .JPEG name."""
    root = write_image_folder(tmp_path / "data", tiny_counts(train=1, val=1))
    class_dir = root / "train" / "n01"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (50, 70, 4), dtype=np.uint8), mode="CMYK").save(class_dir / "cmyk.JPEG", format="JPEG")
    Image.fromarray(rng.integers(0, 255, (300, 260), dtype=np.uint8), mode="L").save(class_dir / "gray.JPEG", format="JPEG")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(class_dir / "png_inside.JPEG", format="PNG")
    dataset = pipeline.get_imagenet_dataset("train", root)
    names = [Path(path).name for path, _ in dataset.samples]
    for name in ("cmyk.JPEG", "gray.JPEG", "png_inside.JPEG"):
        image, label, index = dataset[names.index(name)]
        assert image.shape == (3, pipeline.CROP_SIZE, pipeline.CROP_SIZE)
        assert label == 0 and index == names.index(name)


def test_hidden_folders_and_files_are_neither_classes_nor_images(tmp_path):
    """A notebook's .ipynb_checkpoints/ (in train/ and in a class folder) and macOS's AppleDouble ._x.JPEG
    files change nothing: the same classes, images and fingerprint as the clean folder."""
    root = write_image_folder(tmp_path / "data", tiny_counts())
    clean = {split: pipeline.get_imagenet_dataset(split, root) for split in pipeline.SPLITS}
    expected = {split: (dataset.classes, dataset.samples, images.samples_fingerprint(dataset)) for split, dataset in clean.items()}
    for split in pipeline.SPLITS:
        (root / split / ".ipynb_checkpoints").mkdir()
        shutil.copy(root / split / "n01" / "n01_000.JPEG", root / split / ".ipynb_checkpoints" / "n01_000-checkpoint.JPEG")
        (root / split / "n01" / ".ipynb_checkpoints").mkdir()
        shutil.copy(root / split / "n01" / "n01_000.JPEG", root / split / "n01" / ".ipynb_checkpoints" / "n01_000-checkpoint.JPEG")
        (root / split / "n01" / "._n01_000.JPEG").write_bytes(b"\x00\x05\x16\x07 AppleDouble metadata")
    for split in pipeline.SPLITS:
        dataset = pipeline.get_imagenet_dataset(split, root)
        assert (dataset.classes, dataset.samples, images.samples_fingerprint(dataset)) == expected[split], split
        assert len(dataset) == (6 if split == "train" else 4)


def test_items_carry_their_index_in_the_full_folder(tiny_imagenet):
    subset = pipeline.get_imagenet_dataset("train", tiny_imagenet, indices=[4, 1])
    assert [subset[i][2] for i in range(2)] == [4, 1]
    assert pipeline.example_path(subset, 0) == pipeline.get_imagenet_dataset("train", tiny_imagenet).samples[4]


def test_evaluation_transform_is_resize_256_center_crop_224_normalize():
    image = Image.fromarray(np.full((300, 400, 3), 255, dtype=np.uint8))
    tensor = pipeline.Preprocessing().transform()(image)
    assert tensor.shape == (3, 224, 224)
    expected = (1.0 - torch.tensor(preprocessing.IMAGENET_MEAN)) / torch.tensor(preprocessing.IMAGENET_STD)
    torch.testing.assert_close(tensor[:, 0, 0], expected)


@pytest.mark.parametrize("wrapper", ["plain", "state_dict", "model", "ddp_prefix", "safetensors"])
def test_checkpoint_formats_load_the_same_weights(tmp_path, wrapper):
    torch.manual_seed(1)
    state = resnet50(weights=None, num_classes=7).state_dict()
    if wrapper == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        payload = {
            "plain": state,
            "state_dict": {"state_dict": state, "epoch": 3},
            "model": {"model": state, "optimizer": {}},
            "ddp_prefix": {f"module.{k}": v for k, v in state.items()},
        }[wrapper]
        path = tmp_path / "model.pt"
        torch.save(payload, path)
    model = pipeline.build_model(weights=None, checkpoint=path)
    assert pipeline.num_outputs(model) == 7
    assert not model.training
    torch.testing.assert_close(model.fc.weight, state["fc.weight"])
    torch.testing.assert_close(model.layer4[2].conv3.weight, state["layer4.2.conv3.weight"])


def test_torchvision_reference_train_checkpoint_loads_its_model(tmp_path):
    """references/classification/train.py saves {model, optimizer, lr_scheduler, epoch, args: Namespace};
    an object torch will not unpickle is named in the one line."""
    torch.manual_seed(2)
    model = resnet50(weights=None, num_classes=5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=30)
    args = argparse.Namespace(model="resnet50", lr=0.1, epochs=90, data_path="/data/imagenet", weights=None)
    checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                  "lr_scheduler": scheduler.state_dict(), "epoch": 89, "args": args}
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    loaded = pipeline.build_model(weights=None, checkpoint=tmp_path / "checkpoint.pth")
    assert pipeline.num_outputs(loaded) == 5
    torch.testing.assert_close(loaded.layer4[2].conv3.weight, model.layer4[2].conv3.weight)
    checkpoint["args"].output_dir = Path("/runs/r50")  # a Path in the args: a class torch refuses
    torch.save(checkpoint, tmp_path / "with_path.pth")
    with pytest.raises(UserError) as caught:
        pipeline.build_model(weights=None, checkpoint=tmp_path / "with_path.pth")
    assert "with_path.pth could not be read as a PyTorch state dict (Unsupported global: pathlib." in str(caught.value)
    assert "\n" not in str(caught.value)


def test_checkpoint_with_wrong_keys_or_shapes_is_refused(tmp_path):
    state = resnet50(weights=None).state_dict()
    missing = dict(state)
    del missing["layer1.0.conv1.weight"]
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(UserError, match="does not fit ResNet-50: 1 keys missing.*layer1.0.conv1.weight"):
        pipeline.build_model(weights=None, checkpoint=tmp_path / "missing.pt")
    wrong = dict(state)
    wrong["layer1.0.conv1.weight"] = torch.zeros(3, 3, 1, 1)
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(UserError, match="`layer1.0.conv1.weight` has shape"):
        pipeline.build_model(weights=None, checkpoint=tmp_path / "wrong.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="could not be read"):
        pipeline.build_model(weights=None, checkpoint=tmp_path / "garbage.pt")
    torch.save({"fc.weight": torch.zeros(2, 2048)}, tmp_path / "partial.pt")
    with pytest.raises(UserError, match="keys missing"):
        pipeline.build_model(weights=None, checkpoint=tmp_path / "partial.pt")


def test_unreachable_weights_say_so_in_one_line(monkeypatch, tmp_path):
    """No internet and nothing cached: the message names --checkpoint and the cache path."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    with pytest.raises(UserError) as caught:
        pipeline.build_model(weights="IMAGENET1K_V1")
    message = str(caught.value)
    assert "\n" not in message
    assert "--checkpoint" in message
    assert str(tmp_path / "hub" / "checkpoints" / "resnet50-0676ba61.pth") in message


def test_random_init_warns_loudly_and_is_drawn_from_the_seed(caplog):
    with caplog.at_level("WARNING"):
        first = pipeline.build_model(weights="none", seed=0)
    assert "RANDOMLY INITIALISED" in caplog.text
    torch.rand(3)  # whatever else happened to the global generator in between
    again = pipeline.build_model(weights="none", seed=0)
    other = pipeline.build_model(weights="none", seed=1)
    assert torch.equal(first.conv1.weight, again.conv1.weight)
    assert not torch.equal(first.conv1.weight, other.conv1.weight)


def _run_cli_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as caught:
        analyze.main(argv)
    assert caught.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


def _break(case: str, root: Path, tmp_path: Path) -> list:
    """Applies one bad-input case to a good tiny folder; returns the extra argv."""
    if case == "no_dataset_dir":
        shutil.rmtree(root)
    elif case == "no_train":
        shutil.rmtree(root / "train")
    elif case == "no_val":
        shutil.rmtree(root / "val")
    elif case == "empty_class":
        for file in (root / "train" / "n02").iterdir():
            file.unlink()
    elif case == "class_lists_differ":
        (root / "val" / "n02").rename(root / "val" / "n03")
    elif case == "too_few_val":
        return ["--num_queries", "5"]
    elif case == "too_many_classes":
        state = resnet50(weights=None, num_classes=1).state_dict()
        torch.save(state, tmp_path / "one_class.pt")
        return ["--checkpoint", str(tmp_path / "one_class.pt")]
    elif case == "missing_checkpoint":
        return ["--checkpoint", str(tmp_path / "nowhere.pt")]
    elif case == "class_subset_with_imagenet_weights":
        return ["--weights", "IMAGENET1K_V1"]
    return []


BAD_INPUTS = {
    "no_dataset_dir": "dataset directory .*imagenet does not exist",
    "no_train": "imagenet/train is missing",
    "no_val": "imagenet/val is missing",
    "empty_class": "imagenet/train: .*n02",
    "class_lists_differ": "train and val class folders differ: 1 only in train .*n02.*1 only in val .*n03",
    "too_few_val": "has 4 images, fewer than the 5 queries",
    "too_many_classes": "2 classes but the model has only 1 outputs",
    "missing_checkpoint": "checkpoint .*nowhere.pt does not exist",
    "class_subset_with_imagenet_weights": "ImageNet weights need all 1000 class folders \\(found 2 in .*train\\)",
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_one_line_and_writes_nothing(case, tiny_imagenet, tmp_path, capsys):
    extra = _break(case, tiny_imagenet, tmp_path)
    if "--checkpoint" not in extra and "--weights" not in extra:
        extra += ["--weights", "none"]
    output_dir = tmp_path / "results"
    argv = ["--dataset_dir", str(tiny_imagenet), "--output_dir", str(output_dir), "--factor_strategy", "identity", "--num_queries", "2", *extra]
    err = _run_cli_error(argv, capsys)
    assert err.startswith("analyze.py: error: ")
    import re

    assert re.search(BAD_INPUTS[case], err), err
    assert not output_dir.exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--query_gradient_rank", "0"], "must be a positive rank, or -1"),
        (["--train_batch_size", "-4"], "must be a positive integer"),
        (["--num_queries", "0"], "must be a positive integer"),
        (["--damping_factor", "-1"], "must be a finite number >= 0"),
        (["--factor_strategy", "kfc"], "invalid choice: 'kfc'"),
        (["--weights", "none", "--checkpoint", "x.pt"], "--checkpoint and --weights exclude each other"),
        (["--demo"], "--demo makes its own dataset"),
        (["--crop_size", "80", "--resize_size", "73"], "--crop_size 80 is larger than --resize_size 73"),
        (["--crop_size", "300"], "--crop_size 300 is larger than --resize_size 256 (the default)"),
        (["--factor_examples", "100001"], "--factor_examples 100001 is above kronfluence's cap of 100,000"),
        (["--crop_size", "16"], "--crop_size 16 is below 32 pixels"),
        (["--resize_size", "31", "--crop_size", "31"], "--resize_size 31 is below 32 pixels"),
    ],
)
def test_impossible_flags_are_refused_by_the_parser(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as caught:
        analyze.main(["--dataset_dir", str(tmp_path), *argv])
    assert caught.value.code == 2
    assert message in capsys.readouterr().err


def test_weights_presets_and_checkpoint_sizes():
    assert model_weights.weights_preprocessing("IMAGENET1K_V2") == pipeline.Preprocessing(232, 224, "bilinear")
    assert model_weights.weights_preprocessing("IMAGENET1K_V1") == pipeline.Preprocessing(256, 224, "bilinear")
    assert pipeline.model_preprocessing(None, 73, 64) == pipeline.Preprocessing(73, 64, "bilinear")
    assert pipeline.model_preprocessing(pipeline.NO_WEIGHTS) == pipeline.Preprocessing(256, 224, "bilinear")
    image = Image.fromarray(np.zeros((300, 400, 3), dtype=np.uint8))
    assert pipeline.Preprocessing(73, 64).transform()(image).shape == (3, 64, 64)
    assert pipeline.Preprocessing(73, 64).view()(image).size == (64, 64)


@pytest.mark.parametrize("weights", [[], ["--weights", "IMAGENET1K_V2"]], ids=["default weights", "IMAGENET1K_V2"])
def test_sizes_with_torchvision_weights_are_one_line(weights, tiny_imagenet, tmp_path, capsys):
    err = _run_cli_error(["--dataset_dir", str(tiny_imagenet), *weights, "--crop_size", "64", "--output_dir", str(tmp_path / "out")], capsys)
    assert "--resize_size/--crop_size are for --checkpoint and --weights none: ResNet50_Weights.IMAGENET1K_V" in err
    assert "evaluated with Resize(" in err and not (tmp_path / "out").exists()


def test_dataset_dir_is_required_without_demo(capsys):
    with pytest.raises(SystemExit):
        analyze.main([])
    assert "--dataset_dir is required" in capsys.readouterr().err


def test_out_of_memory_is_one_line_naming_the_batch_sizes(monkeypatch, tmp_path, capsys):
    def exhausted(args, layout):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(analyze, "run", exhausted)
    err = _run_cli_error(["--dataset_dir", str(tmp_path)], capsys)
    assert "out of memory; lower --train_batch_size, --query_batch_size or --factor_batch_size" in err


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("num_workers", ["0", "2"])
def test_truncated_image_is_named_in_one_line_and_nothing_is_finished(monkeypatch, tmp_path, capsys, num_workers):
    dataset = write_image_folder(tmp_path / "imagenet", tiny_counts())
    bad = dataset / "train" / "n02" / "n02_001.JPEG"
    _truncate(bad)
    capsys.readouterr()
    with pytest.raises(SystemExit) as caught:
        analyze_in_process(monkeypatch, dataset, tmp_path / "out", "--num_workers", num_workers)
    err = capsys.readouterr().err.strip()
    assert caught.value.code == 2
    assert "Traceback" not in err and "Original" not in err, err
    # The last line, after the progress bars: which file, and PIL's reason.
    assert re.fullmatch(rf"analyze\.py: error: cannot read image {re.escape(str(bad))} \(OSError: [^\n]+\)", err.splitlines()[-1]), err
    assert not (naming.scores_dir(tmp_path / "out", "imagenet", "identity") / naming.PAIRWISE_SCORES_FILE).exists()


def test_check_images_lists_every_unreadable_file_before_any_work(monkeypatch, tmp_path, capsys):
    dataset = write_image_folder(tmp_path / "imagenet", tiny_counts())
    _truncate(dataset / "train" / "n02" / "n02_001.JPEG")
    (dataset / "val" / "n01" / "n01_000.JPEG").write_bytes(b"not an image")
    capsys.readouterr()
    with pytest.raises(SystemExit) as caught:
        analyze_in_process(monkeypatch, dataset, tmp_path / "out", "--check_images", "--num_workers", "2")
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert caught.value.code == 2
    assert err.startswith("analyze.py: error: 2 of 8 images cannot be read: ") and err.endswith("; fix or remove them"), err
    assert f"{dataset}/train/n02/n02_001.JPEG (OSError: " in err
    assert f"{dataset}/val/n01/n01_000.JPEG (UnidentifiedImageError: " in err
    assert not naming.factors_dir(tmp_path / "out", "imagenet", "identity").exists()


def test_eigendecomposition_that_does_not_converge_is_one_line(monkeypatch, tiny_imagenet, tmp_path, capsys):
    def degenerate(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge because the input matrix is ill-conditioned")

    monkeypatch.setattr(torch.linalg, "eigh", degenerate)
    capsys.readouterr()
    with pytest.raises(SystemExit) as caught:
        analyze_in_process(monkeypatch, tiny_imagenet, tmp_path / "out", "--factor_strategy", "kfac")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert caught.value.code == 2
    assert err.startswith("analyze.py: error: the eigendecomposition of a covariance failed (linalg.eigh: The algorithm"), err
    assert "raise --factor_examples, use more images or a larger --crop_size" in err
