"""influence/data/layouts.py: ImageNet as downloaded. Tiny versions of each layout are built from one generated folder
(the official archives made with tarfile, a devkit with the fields torchvision reads, a flat val with
Kaggle's CSV, Kaggle's tree): every layout gives the same images in the same order and the same scores,
results computed from one are reused from another, and each incomplete layout is one line with nothing
written."""

from __future__ import annotations

import io
import platform
import shutil
import tarfile
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import scipy.io
import torch
from conftest import tiny_counts, write_image_folder
from small_model_cli import analyze_in_process

import pipeline
from influence.data import layouts
from influence.results import records, top_k
from influence.runtime.cli import UserError

CLASSES = ("n01440764", "n01443537")  # the first two of ImageNet's wnids
NAMES = {"n01440764": "tench", "n01443537": "goldfish"}
IDS = {"n01440764": 449, "n01443537": 1}  # ILSVRC2012_IDs are not in wnid order


def _val_wnids(folders: Path) -> Dict[str, str]:
    return {path.name: path.parent.name for path in sorted((folders / "val").glob("*/*.JPEG"))}


def write_devkit(path: Path, val_wnids: Dict[str, str]) -> Path:
    """ILSVRC2012_devkit_t12.tar.gz with data/meta.mat (the synsets: leaves plus one parent synset) and
    the validation ground truth, one ILSVRC2012_ID per image in file-name order."""
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height", "num_train_images"]
    synsets = np.zeros((len(CLASSES) + 1,), dtype=[(field, object) for field in fields])
    for row, wnid in enumerate(CLASSES):
        synsets[row] = (IDS[wnid], wnid, f"{NAMES[wnid]}, other words", "a fish", 0, np.zeros(0), 0, 3)
    synsets[-1] = (1001, "n00000001", "fish", "a parent synset", 2, np.array([1, 449]), 1, 0)
    meta = io.BytesIO()
    scipy.io.savemat(meta, {"synsets": synsets})
    truth = "".join(f"{IDS[val_wnids[name]]}\n" for name in sorted(val_wnids)).encode()
    with tarfile.open(path, "w:gz") as archive:
        for name, content in (("data/meta.mat", meta.getvalue()), ("data/ILSVRC2012_validation_ground_truth.txt", truth)):
            info = tarfile.TarInfo(f"ILSVRC2012_devkit_t12/{name}")
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    return path


def write_solution_csv(path: Path, val_wnids: Dict[str, str]) -> Path:
    rows = [f"{Path(name).stem},{wnid} 1 2 30 40 {wnid} 5 6 70 80" for name, wnid in sorted(val_wnids.items())]
    path.write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    return path


def flat_val(folders: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for path in sorted((folders / "val").glob("*/*.JPEG")):
        shutil.copy(path, target / path.name)
    return target


def official_val_names(folders: Path) -> None:
    """Renames the validation images as ImageNet names them (ILSVRC2012_val_00000001.JPEG, ...), the
    classes interleaved: file-name order is then not class order, as in the real flat val."""
    by_class = [sorted((folders / "val" / wnid).iterdir()) for wnid in CLASSES]
    number = 0
    for round_ in zip(*by_class):
        for path in reversed(round_):  # the second class first: its images come earlier by name
            number += 1
            path.rename(path.with_name(f"ILSVRC2012_val_{number:08d}.JPEG"))


def make_layouts(root: Path) -> Dict[str, Path]:
    """The same images in every layout this suite reads."""
    folders = write_image_folder(root / "folders", tiny_counts(CLASSES, train=3, val=2))
    official_val_names(folders)
    val_wnids = _val_wnids(folders)
    built = {"folders": folders}

    devkit = root / "devkit"
    shutil.copytree(folders / "train", devkit / "train")
    flat_val(folders, devkit / "val")
    write_devkit(devkit / layouts.DEVKIT_ARCHIVE, val_wnids)
    built["devkit"] = devkit

    csv_flat = root / "csv"
    shutil.copytree(folders / "train", csv_flat / "train")
    flat_val(folders, csv_flat / "val")
    write_solution_csv(csv_flat / layouts.KAGGLE_VAL_CSV, val_wnids)
    built["csv"] = csv_flat

    kaggle = root / "kaggle"
    shutil.copytree(folders / "train", kaggle / layouts.KAGGLE_ROOT / "train")
    flat_val(folders, kaggle / layouts.KAGGLE_ROOT / "val")
    write_solution_csv(kaggle / layouts.KAGGLE_VAL_CSV, val_wnids)
    (kaggle / layouts.KAGGLE_SYNSETS).write_text("".join(f"{w} {NAMES[w]}, other words\n" for w in CLASSES))
    built["kaggle"] = kaggle

    archives = root / "archives"
    archives.mkdir()
    write_archives(folders, archives, val_wnids)
    built["archives"] = archives
    return built


def write_archives(folders: Path, target: Path, val_wnids: Dict[str, str]) -> None:
    """ILSVRC2012_img_train.tar (one <wnid>.tar per class inside), ILSVRC2012_img_val.tar (flat) and the devkit."""
    with tarfile.open(target / layouts.TRAIN_ARCHIVE, "w") as train:
        for class_dir in sorted((folders / "train").iterdir()):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as per_class:
                for image in sorted(class_dir.iterdir()):
                    per_class.add(image, arcname=image.name)
            info = tarfile.TarInfo(f"{class_dir.name}.tar")
            info.size = len(inner.getvalue())
            train.addfile(info, io.BytesIO(inner.getvalue()))
    with tarfile.open(target / layouts.VAL_ARCHIVE, "w") as val:
        for image in sorted((folders / "val").glob("*/*.JPEG")):
            val.add(image, arcname=image.name)
    write_devkit(target / layouts.DEVKIT_ARCHIVE, val_wnids)


@pytest.fixture
def built(tmp_path) -> Dict[str, Path]:
    return make_layouts(tmp_path / "layouts")


def test_every_layout_lists_the_same_images_in_the_same_order(built):
    assert layouts.prepare_archives(built["archives"])
    assert not layouts.prepare_archives(built["archives"])  # once
    assert not (built["archives"] / ".lock").exists()  # the dataset's folder keeps no lock file
    reference = None
    for name, root in built.items():
        train = pipeline.get_imagenet_dataset("train", root)
        val = pipeline.get_imagenet_dataset("val", root)
        listed = [(Path(path).name, label) for path, label in pipeline.base_image_folder(val).samples]
        fingerprints = records.dataset_provenance(train, val, "m")
        if reference is None:
            reference = (listed, fingerprints)
        assert listed == reference[0], name
        assert fingerprints == reference[1], name  # layout-independent: results are reused across layouts
    # By class, then name; by name alone (a flat folder's order) the classes would alternate.
    assert reference[0] == [("ILSVRC2012_val_00000002.JPEG", 0), ("ILSVRC2012_val_00000004.JPEG", 0),
                            ("ILSVRC2012_val_00000001.JPEG", 1), ("ILSVRC2012_val_00000003.JPEG", 1)]
    assert layouts.find_layout(built["devkit"]).kind == "devkit"
    assert layouts.find_layout(built["kaggle"]).kind == "kaggle_csv"
    assert layouts.find_layout(built["archives"]).kind == "devkit"  # unpacked: a flat val beside the devkit


def test_readable_class_names_come_from_the_devkit_or_kaggles_mapping(built):
    for name in ("devkit", "kaggle"):
        assert top_k.class_names(list(CLASSES), built[name]) == ["n01440764 tench", "n01443537 goldfish"]
    assert top_k.class_names(list(CLASSES), built["csv"]) == list(CLASSES)  # nothing to read them from


def test_same_scores_from_every_layout_and_results_reused_across_layouts(built, monkeypatch, tmp_path):
    shared = tmp_path / "shared"
    first = analyze_in_process(monkeypatch, built["folders"], shared)["identity"]
    stamp, scores = first.stat().st_mtime_ns, pipeline_scores(first)
    for name in ("devkit", "csv", "kaggle", "archives"):
        own = analyze_in_process(monkeypatch, built[name], tmp_path / name)["identity"]
        torch.testing.assert_close(pipeline_scores(own), scores, rtol=0, atol=0)
        assert analyze_in_process(monkeypatch, built[name], shared)["identity"] == first
    assert first.stat().st_mtime_ns == stamp  # computed once, reused from every other layout


def pipeline_scores(path: Path) -> torch.Tensor:
    from influence.analysis.scoring import load_scores

    return load_scores(path)


def _break(built: Dict[str, Path], case: str) -> Path:
    if case == "flat_val_without_labels":
        (built["devkit"] / layouts.DEVKIT_ARCHIVE).unlink()
        return built["devkit"]
    if case == "csv_missing_a_file":
        csv_path = built["csv"] / layouts.KAGGLE_VAL_CSV
        csv_path.write_text("\n".join(csv_path.read_text().splitlines()[:-1]) + "\n")
        return built["csv"]
    if case == "devkit_that_is_not_one":
        (built["devkit"] / layouts.DEVKIT_ARCHIVE).write_bytes(b"not a tar archive at all")
        return built["devkit"]
    if case == "archive_that_is_not_one":
        (built["archives"] / layouts.VAL_ARCHIVE).write_bytes(b"<html>rate limited</html>")
        return built["archives"]
    if case == "missing_archive":
        (built["archives"] / layouts.DEVKIT_ARCHIVE).unlink()
        return built["archives"]
    if case == "truncated_download":
        val_tar = built["archives"] / layouts.VAL_ARCHIVE
        val_tar.write_bytes(val_tar.read_bytes()[: val_tar.stat().st_size // 3])
        return built["archives"]
    if case == "devkit_count_differs":
        next((built["devkit"] / "val").iterdir()).unlink()
        return built["devkit"]
    raise ValueError(case)


@pytest.mark.parametrize("case, message", [
    ("flat_val_without_labels", r"holds images but no class folders, and .* has neither ILSVRC2012_devkit_t12.tar.gz nor LOC_val_solution.csv"),
    ("csv_missing_a_file", r"LOC_val_solution.csv has no label for 1 of the 4 images in .*val \(first: ILSVRC2012_val_00000004.JPEG\)"),
    ("devkit_that_is_not_one", r"ILSVRC2012_devkit_t12.tar.gz is not a readable devkit archive"),
    ("archive_that_is_not_one", r"ILSVRC2012_img_val.tar is not a tar archive \(a partial download\?\)"),
    ("missing_archive", r"holds ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar but not ILSVRC2012_devkit_t12.tar.gz"),
    ("devkit_count_differs", r"labels 4 validation images but .*val holds 3"),
    ("truncated_download", r"ILSVRC2012_img_val.tar cannot be unpacked .*; download it again"),
])
def test_an_incomplete_layout_is_one_line_and_nothing_is_written(built, monkeypatch, tmp_path, capsys, case, message):
    root = _break(built, case)
    before = sorted(str(path) for path in root.rglob("*"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as caught:
        analyze_in_process(monkeypatch, root, tmp_path / "out")
    err = capsys.readouterr().err.strip()
    if case == "truncated_download":  # found while unpacking: the progress lines come first
        err = err.splitlines()[-1]
    assert caught.value.code == 2 and len(err.splitlines()) == 1, err
    import re

    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()
    assert sorted(str(path) for path in root.rglob("*")) == before  # nothing unpacked, moved or left behind


def test_unpacking_needs_the_space_and_says_how_much(built, monkeypatch):
    import collections

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(layouts.shutil, "disk_usage", lambda path: usage(10**9, 10**9, 1000))
    with pytest.raises(UserError, match=r"unpacking ImageNet's archives needs .* GB free in .*; 0.0 GB are free"):
        layouts.prepare_archives(built["archives"])
    assert not (built["archives"] / "train").exists()


def test_unprepared_archives_are_named_by_the_readers(built):
    with pytest.raises(UserError, match="not yet unpacked"):
        pipeline.get_imagenet_dataset("train", built["archives"])


def test_unpacking_under_torchrun_is_refused_before_the_ranks_wait_for_it(built, monkeypatch, tmp_path, capsys):
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit):
        analyze_in_process(monkeypatch, built["archives"], tmp_path / "out")
    assert "run analyze.py once without torchrun to unpack them" in capsys.readouterr().err
    assert not (built["archives"] / "train").exists()


def test_python_without_tarfiles_data_filter_is_refused_before_unpacking(built, monkeypatch):
    monkeypatch.delattr(layouts.tarfile, "data_filter")
    monkeypatch.setattr(platform, "python_version", lambda: "3.11.2")
    before = sorted(str(path) for path in built["archives"].rglob("*"))
    with pytest.raises(UserError) as caught:
        layouts.prepare_archives(built["archives"])
    assert str(caught.value) == (
        "unpacking ImageNet's archives needs tarfile's 'data' filter, which Python 3.11.2 lacks: use Python 3.11.4 or "
        "newer, or unpack them by hand into train/<wnid>/ and val/"
    )
    assert sorted(str(path) for path in built["archives"].rglob("*")) == before  # nothing unpacked or staged


def test_hidden_files_in_a_flat_val_or_its_archive_are_not_images(built):
    """macOS's AppleDouble `._x.JPEG` beside each image, copied by hand or packed into the archive."""
    expected = pipeline.base_image_folder(pipeline.get_imagenet_dataset("val", built["folders"])).samples
    expected = [(Path(path).name, label) for path, label in expected]
    for name in ("devkit", "csv"):
        (built[name] / "val" / "._ILSVRC2012_val_00000001.JPEG").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    with tarfile.open(built["archives"] / layouts.VAL_ARCHIVE, "a") as archive:
        info = tarfile.TarInfo("._ILSVRC2012_val_00000001.JPEG")
        info.size = 12
        archive.addfile(info, io.BytesIO(b"AppleDouble!"))
    assert layouts.prepare_archives(built["archives"])
    assert not (built["archives"] / "val" / "._ILSVRC2012_val_00000001.JPEG").exists()
    for name in ("devkit", "csv", "archives"):
        val = pipeline.base_image_folder(pipeline.get_imagenet_dataset("val", built[name]))
        assert [(Path(path).name, label) for path, label in val.samples] == expected, name


def test_a_second_run_does_not_unpack_archives_another_run_is_unpacking(built, tmp_path, capsys):
    """The archive folder is locked while it is unpacked: a second run (another analysis folder) stops in
    one line naming the first, and the first's staging folder is left alone."""
    import subprocess
    import sys
    import time

    from conftest import REPO_ROOT

    archives = built["archives"]
    staging = archives / layouts.STAGING
    (staging / "val").mkdir(parents=True)
    (staging / "val" / "half_written.JPEG").write_bytes(b"the first run's work")
    started = tmp_path / "holding"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from influence.results import locking\n"
        f"with locking.hold(Path({str(archives)!r}), leave_no_file=True):\n"
        f"    Path({str(started)!r}).write_text('x'); time.sleep(60)\n")], cwd=REPO_ROOT)
    try:
        deadline = time.monotonic() + 30
        while not started.exists():
            assert holder.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        with pytest.raises(UserError, match=r"is in use by another run \(pid \d+.*unpacking ImageNet's archives there"):
            layouts.prepare_archives(archives)
        assert (staging / "val" / "half_written.JPEG").read_bytes() == b"the first run's work"
    finally:
        holder.kill()
        holder.wait()
    assert layouts.prepare_archives(archives)  # once the first is gone (its lock died with it), this one unpacks
    assert not staging.exists() and (archives / "val").is_dir()
