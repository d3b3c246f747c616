"""The demo's generated folder and its report."""

from __future__ import annotations

import torch

import pipeline
from influence.data import demo
from influence.results import naming


def test_demo_folder_is_imagenet_layout_written_once_and_reproducible(tmp_path):
    root = demo.make_demo_dataset(tmp_path / "demo")
    train = pipeline.get_imagenet_dataset("train", root)
    val = pipeline.get_imagenet_dataset("val", root)
    assert len(train.classes) == len(demo.DEMO_CLASSES)
    assert len(train) == len(demo.DEMO_CLASSES) * demo.DEMO_TRAIN_PER_CLASS
    assert len(val) == len(demo.DEMO_CLASSES) * demo.DEMO_VAL_PER_CLASS
    pipeline.check_datasets(train, val, num_queries=len(val))
    first = sorted(root.rglob("*.JPEG"))
    stamps = [f.stat().st_mtime_ns for f in first]
    assert demo.make_demo_dataset(root) == root
    assert [f.stat().st_mtime_ns for f in first] == stamps  # not rewritten
    again = demo.make_demo_dataset(tmp_path / "again")
    assert [f.read_bytes() for f in first] == [f.read_bytes() for f in sorted(again.rglob("*.JPEG"))]


def test_interrupted_generation_is_redone(tmp_path):
    root = demo.make_demo_dataset(tmp_path / "demo")
    (root / demo.SPEC_FILE).unlink()  # as if the run died before the folder was complete
    victim = next(root.rglob("*.JPEG"))
    victim.write_bytes(b"")
    demo.make_demo_dataset(root)
    assert victim.stat().st_size > 0


def test_classes_differ_in_mean_colour(tmp_path):
    """The images carry their class: per-class mean colours are far apart compared with within-class spread."""
    root = demo.make_demo_dataset(tmp_path / "demo")
    train = pipeline.get_imagenet_dataset("train", root)
    means = torch.stack([train[i][0].mean(dim=(1, 2)) for i in range(len(train))])
    labels = torch.tensor([train[i][1] for i in range(len(train))])
    centres = torch.stack([means[labels == c].mean(0) for c in range(len(train.classes))])
    within = max((means[labels == c] - centres[c]).norm(dim=1).max() for c in range(len(train.classes)))
    between = torch.cdist(centres, centres)[~torch.eye(len(centres), dtype=torch.bool)].min()
    assert between > 2 * within


def test_same_label_share_against_chance():
    query_labels = torch.tensor([0, 1])
    train_labels = torch.tensor([0, 0, 1, 1, 1, 2])
    scores = torch.tensor([[5.0, 4.0, 0.0, 0.0, 3.0, 0.0], [0.0, 0.0, 9.0, 8.0, 0.0, 7.0]])
    share = demo.same_label_share(scores, query_labels, train_labels, k=3)
    assert abs(share["same_label_share"] - 2 / 3) < 1e-6
    assert abs(share["chance"] - (2 / 6 + 3 / 6) / 2) < 1e-6


def test_report_lists_top_influencers_and_same_label_share(tmp_path):
    root = demo.make_demo_dataset(tmp_path / "demo")
    train = pipeline.get_imagenet_dataset("train", root)
    queries = pipeline.get_imagenet_dataset("val", root)
    train_labels = torch.tensor([label for _, label in train.samples])
    query_labels = torch.tensor([label for _, label in queries.samples])
    # Scores that favour the query's class, most of all its training image number 3.
    scores = (query_labels[:, None] == train_labels[None, :]).float()
    scores[:, 3::demo.DEMO_TRAIN_PER_CLASS] += 0.5
    text = demo.report({"ekfac": tmp_path / "s.safetensors"}, {"ekfac": scores}, train, queries, "TABLE")
    assert "shape (4, 20)" in text and "TABLE" in text
    first_query_block = text.split("query 0: ")[1].split("query 1: ")[0]
    assert first_query_block.splitlines()[1].strip().startswith("1. class0_red_horizontal_train_003.JPEG [class0_red_horizontal]")
    assert "with the query's label 1.00 (chance 0.25)" in text
    explorer_lines = text.split("python top_influences.py --demo --html\n")[1].splitlines()
    assert explorer_lines[0].strip() == f"-> open {naming.explorer_index(tmp_path)}"  # the page the command writes
