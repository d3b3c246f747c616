"""influence/data/queries.py and the query flags of analyze.py: which images are scored. per_class spreads over every
class, random follows --seed, --query_files and --query_dir score exactly the images named (their rows
equal the same images' rows in a run over the whole validation set), an unlabeled --query_dir is labelled
by the model's prediction and the CSV says so, and a changed choice is refused on rerun."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_counts, write_image_folder
from small_model_cli import analyze_in_process, build_tiny_model

import pipeline
import top_influences
from influence.analysis.scoring import load_scores
from influence.data import queries
from influence.runtime.cli import UserError

CLASSES = ("n01", "n02")  # the tiny model has two outputs


@pytest.fixture
def dataset(tmp_path) -> Path:
    """2 classes, 3 training and 4 validation images each."""
    return write_image_folder(tmp_path / "imagenet", tiny_counts(CLASSES, train=3, val=4))


def test_per_class_takes_one_image_of_each_of_1000_classes(tmp_path):
    wnids = [f"n{i:08d}" for i in range(1000)]
    root = write_image_folder(tmp_path / "many", {"train": {w: 1 for w in wnids}, "val": {w: 2 for w in wnids}}, size=8)
    val = pipeline.get_imagenet_dataset("val", root)
    labels = pipeline.base_image_folder(val).targets
    chosen = queries.select_positions(labels, 1000, "per_class", seed=0)
    assert sorted(labels[p] for p in chosen) == list(range(1000))  # one per class
    assert chosen == list(range(0, 2000, 2))  # the first image of each, in folder order
    assert queries.select_positions(labels, 1000, "first", seed=0) == list(range(1000))  # 500 classes only
    spread = queries.select_positions(labels, 1500, "per_class", seed=0)
    counts = torch.bincount(torch.tensor([labels[p] for p in spread]))
    assert counts.min() == 1 and counts.max() == 2 and len(spread) == len(set(spread)) == 1500


def test_random_is_reproducible_from_the_seed():
    labels = [i // 10 for i in range(100)]
    first = queries.select_positions(labels, 20, "random", seed=3)
    assert first == queries.select_positions(labels, 20, "random", seed=3) and first == sorted(set(first))
    assert first != queries.select_positions(labels, 20, "random", seed=4)


def _rows(path: Path) -> torch.Tensor:
    return load_scores(path)


# Rows of a run over other queries come from query batches of another shape, whose products BLAS may
# round differently in the last bit (seen: 4.8e-7 of scores near 4 on one machine, exact on another).
# Another image's row differs by far more than this.
ROW_TOLERANCE = {"rtol": 1e-6, "atol": 1e-6}


def test_query_files_score_exactly_the_images_named(dataset, monkeypatch, tmp_path):
    every = _rows(analyze_in_process(monkeypatch, dataset, tmp_path / "all", "--num_queries", "8")["identity"])
    listing = tmp_path / "queries.txt"
    # An index, a bare file name, a path relative to val/ and an absolute path; comments and blanks skipped.
    listing.write_text(f"7\n# my favourites\n\nn01_002.JPEG\n  # relative to val/:\nn02/n02_000.JPEG\n{dataset / 'val' / 'n02' / 'n02_002.JPEG'}\n")
    path = analyze_in_process(monkeypatch, dataset, tmp_path / "listed", "--query_files", str(listing))["identity"]
    torch.testing.assert_close(_rows(path), every[[7, 2, 4, 6]], **ROW_TOLERANCE)


def test_a_hash_inside_a_listed_file_name_is_part_of_the_name(dataset, tmp_path):
    """Only a line whose first non-blank character is `#` is a comment."""
    (dataset / "val" / "n02" / "n02_001.JPEG").rename(dataset / "val" / "n02" / "a#b.JPEG")
    val = pipeline.get_imagenet_dataset("val", dataset)
    names = [Path(path).name for path, _ in val.samples]
    listing = tmp_path / "queries.txt"
    listing.write_text("# favourites\n   # indented: a comment too\na#b.JPEG\nn01/n01_003.JPEG\n")
    positions = queries.positions_from_file(listing, val)
    assert [names[position] for position in positions] == ["a#b.JPEG", "n01_003.JPEG"]
    listing.write_text("a#b.JPEG\nn02/a#b.JPEG\n")
    with pytest.raises(UserError, match=r"queries.txt:2: n02/a#b.JPEG is listed twice$"):
        queries.positions_from_file(listing, val)


def test_hidden_files_and_folders_in_a_query_dir_are_not_queries(dataset, tmp_path):
    """macOS's AppleDouble `._x.jpg` beside each image, a notebook's .ipynb_checkpoints/ in a class folder."""
    mine = tmp_path / "mine"
    (mine / "n02" / ".ipynb_checkpoints").mkdir(parents=True)
    shutil.copy(dataset / "val" / "n02" / "n02_001.JPEG", mine / "n02" / "a.jpg")
    shutil.copy(dataset / "val" / "n02" / "n02_001.JPEG", mine / "n02" / ".ipynb_checkpoints" / "a-checkpoint.jpg")
    (mine / "n02" / "._a.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    assert queries.folder_samples(mine, CLASSES) == ([(str(mine.resolve() / "n02" / "a.jpg"), 1)], True)
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(dataset / "val" / "n01" / "n01_000.JPEG", photos / "x.jpg")
    (photos / "._x.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    assert queries.folder_samples(photos, CLASSES) == ([(str(photos.resolve() / "x.jpg"), -1)], False)


def test_a_listed_image_that_is_not_there_is_one_line(dataset, monkeypatch, tmp_path, capsys):
    listing = tmp_path / "queries.txt"
    listing.write_text("0\nholiday.jpg\n")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        analyze_in_process(monkeypatch, dataset, tmp_path / "out", "--query_files", str(listing))
    assert capsys.readouterr().err.strip().endswith(f"{listing}:2: holiday.jpg is not a validation image in {dataset / 'val'}")
    assert not (tmp_path / "out").exists()


def test_per_class_and_random_are_recorded_and_a_changed_choice_is_refused(dataset, monkeypatch, tmp_path, capsys):
    every = _rows(analyze_in_process(monkeypatch, dataset, tmp_path / "all", "--num_queries", "8")["identity"])
    out = tmp_path / "out"
    path = analyze_in_process(monkeypatch, dataset, out, "--num_queries", "3", "--query_selection", "per_class")["identity"]
    torch.testing.assert_close(_rows(path), every[[0, 1, 4]], **ROW_TOLERANCE)  # the first of each class, then the second
    capsys.readouterr()
    with pytest.raises(SystemExit):
        analyze_in_process(monkeypatch, dataset, out, "--num_queries", "3", "--query_selection", "random")
    err = capsys.readouterr().err
    assert "query_selection 'per_class' -> 'random'" in err and "--overwrite" in err
    # The seed draws the queries (and here the tiny model's initialisation): recorded, and the same again.
    drawn = analyze_in_process(monkeypatch, dataset, tmp_path / "random", "--num_queries", "3", "--query_selection", "random", "--seed", "5")["identity"]
    chosen = queries.select_positions(pipeline.get_imagenet_dataset("val", dataset).targets, 3, "random", seed=5)
    record = json.loads((drawn.parent / "run_config.json").read_text())
    assert record["resolved"]["queries"] == {"selection": "random", "val_positions": chosen, "label_source": "folder"}
    again = analyze_in_process(monkeypatch, dataset, tmp_path / "random_again", "--num_queries", "3", "--query_selection", "random", "--seed", "5")
    torch.testing.assert_close(_rows(again["identity"]), _rows(drawn), rtol=0, atol=0)


def test_query_dir_with_class_folders_scores_those_images_with_those_labels(dataset, monkeypatch, tmp_path):
    every = _rows(analyze_in_process(monkeypatch, dataset, tmp_path / "all", "--num_queries", "8")["identity"])
    mine = tmp_path / "mine"
    (mine / ".ipynb_checkpoints").mkdir(parents=True)  # never a class
    (mine / "n02").mkdir(parents=True)
    (mine / "0").mkdir()  # a class index names the class too
    shutil.copy(dataset / "val" / "n02" / "n02_001.JPEG", mine / "n02" / "a.jpg")
    shutil.copy(dataset / "val" / "n01" / "n01_003.JPEG", mine / "0" / "b.jpg")
    monkeypatch.chdir(tmp_path)  # a relative --query_dir, as a user types it
    path = analyze_in_process(monkeypatch, dataset, tmp_path / "mine_out", "--query_dir", "mine")["identity"]
    torch.testing.assert_close(_rows(path), every[[3, 5]], **ROW_TOLERANCE)  # folders in name order: 0, then n02
    result = top_influences.main(["--dataset_dir", str(dataset), "--scores", str(path), "--num_figures", "0", "--no_prediction"])
    assert [Path(entry["query_path"]).name for entry in result["queries"]] == ["b.jpg", "a.jpg"]


def test_unlabeled_query_dir_uses_the_models_prediction_and_the_csv_says_so(dataset, monkeypatch, tmp_path):
    mine = tmp_path / "photos"
    mine.mkdir()
    for name in ("n01_000", "n02_002"):
        shutil.copy(dataset / "val" / name[:3] / f"{name}.JPEG", mine / f"{name}.png.jpg")
    out = tmp_path / "out"
    path = analyze_in_process(monkeypatch, dataset, out, "--query_dir", str(mine))["identity"]
    assert _rows(path).shape == (2, 6)
    recorded = json.loads((path.parent / "run_config.json").read_text())["resolved"]["queries"]
    images = pipeline.ImageList(mine, [(str(mine / f), -1) for f in recorded["files"]], CLASSES, pipeline.Preprocessing().transform())
    assert recorded["label_source"] == "predicted" and recorded["files"] == ["n01_000.png.jpg", "n02_002.png.jpg"]
    assert recorded["labels"] == queries.predicted_labels(build_tiny_model(seed=0), images, len(CLASSES))  # the model's own
    result = top_influences.main([
        "--dataset_dir", str(dataset), "--scores", str(path), "--top_k", "2", "--num_figures", "1", "--no_prediction",
        "--figure_dir", str(tmp_path / "figures"),
    ])
    with open(result["csv"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {row["query_label_source"] for row in rows} == {queries.LABEL_PREDICTED}
    assert {Path(row["query_path"]).name for row in rows} == {"n01_000.png.jpg", "n02_002.png.jpg"}
    assert all(entry["label_source"] == queries.LABEL_PREDICTED for entry in result["queries"])
    assert len(result["figures"]) == 1 and Path(result["figures"][0]).is_file()


def test_query_dir_with_an_unknown_class_folder_is_one_line(dataset, monkeypatch, tmp_path, capsys):
    (tmp_path / "mine" / "cats").mkdir(parents=True)
    shutil.copy(dataset / "val" / "n01" / "n01_000.JPEG", tmp_path / "mine" / "cats" / "a.jpg")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        analyze_in_process(monkeypatch, dataset, tmp_path / "out", "--query_dir", str(tmp_path / "mine"))
    assert "cats is not a class: name class folders by wnid (e.g. n01) or class index (0-1)" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--query_files", "q.txt", "--query_dir", "d"], "exclude each other"),
    (["--query_files", "q.txt", "--query_selection", "random"], "drop it with --query_files"),
    (["--query_files", "q.txt", "--num_queries", "3"], "drop --num_queries"),
    (["--self_influence", "--query_dir", "d"], "drop --query_dir"),
])
def test_impossible_query_flags_are_refused(argv, message, capsys, tmp_path):
    import analyze

    with pytest.raises(SystemExit):
        analyze.parse_args(["--dataset_dir", str(tmp_path), *argv])
    assert message in capsys.readouterr().err


def test_query_batching_analysis_refuses_scores_of_different_queries_and_names_them(dataset, monkeypatch, tmp_path, capsys):
    import query_batching_analysis

    out = tmp_path / "out"
    full = analyze_in_process(monkeypatch, dataset, out, "--num_queries", "2", "--query_selection", "per_class")["identity"]
    low = analyze_in_process(monkeypatch, dataset, out, "--num_queries", "2", "--query_selection", "per_class", "--query_gradient_rank", "2")["identity_qlr2"]
    other = analyze_in_process(monkeypatch, dataset, tmp_path / "first", "--num_queries", "2", "--query_gradient_rank", "2")["identity_qlr2"]
    common = ["--figure", str(tmp_path / "qb.png"), "--full_scores", str(full)]
    result = query_batching_analysis.main([*common, "--low_rank_scores", str(low)])
    assert result["queries"] == {"selection": "per_class", "val_positions": [0, 4], "label_source": "folder"}
    capsys.readouterr()
    with pytest.raises(SystemExit):
        query_batching_analysis.main([*common, "--low_rank_scores", str(other)])
    assert "were computed for different query images" in capsys.readouterr().err


def test_predictions_stay_among_the_datasets_classes():
    """A model with more outputs than the folder has classes (1,000-way weights on a 2-class folder)."""
    class Favours(torch.nn.Module):
        def forward(self, images):
            logits = torch.zeros(images.shape[0], 1000)
            logits[:, 999] = 10.0  # an output no class folder maps to
            logits[:, 1] = 1.0
            return logits

    images = torch.utils.data.TensorDataset(torch.zeros(3, 3, 8, 8), torch.zeros(3), torch.arange(3))
    assert queries.predicted_labels(Favours(), images, num_classes=2) == [1, 1, 1]
