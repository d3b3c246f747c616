"""top_influences.py and `analyze.py --self_influence`: top-k lists against a direct sort, self-influence
against the diagonal of pairwise scores, a planted mislabelled image found by self-influence, the figures,
normalised score files (`analyze.py --score_normalization`), and the command line with its one-line errors."""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, IndexedTensors, SmallCNN, small_problem, tiny_counts, write_image_folder
from PIL import Image
from safetensors.torch import load_file, save_file
from small_model_cli import analyze_in_process

import analyze
import top_influences
from influence.analysis.factors import fit_factors
from influence.analysis.scoring import compute_scores, compute_self_scores, load_scores
from influence.analysis.settings import AnalysisSettings
from influence.analysis.task import ClassificationTask, make_analyzer
from influence.explorer import figures
from influence.explorer import page as explorer
from influence.results import naming, top_k
from influence.results.score_files import open_score_file
from influence.runtime.cli import UserError


@pytest.fixture
def one_thread():
    """Tiny models on one thread: on a busy 2-core machine two threads of tiny operations spin-wait on
    each other (measured: 150 training steps of the small CNN take 27 s on two threads, 0.3 s on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _read_csv(path: Path):
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _expected_png_size(rows: int, columns: int):
    t = figures
    width = columns * (t.IMAGE_INCHES + t.GAP_INCHES)
    return round(width * t.DPI), round((rows * (t.IMAGE_INCHES + t.CAPTION_INCHES) + t.TITLE_INCHES) * t.DPI)


# ------------------------------------------------------------------------------------------ top-k


def test_streamed_top_k_equals_a_direct_argsort(tmp_path):
    scores = torch.randn(7, 50, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "pairwise_scores.safetensors"
    save_file({naming.SCORES_KEY: scores}, str(path))
    queries = [6, 0, 3, 5]  # blocks of 3 rows: the block holding rows 0-2 is read for query 0 alone
    found = top_k.stream_top_k(open_score_file(path, "--scores"), queries, k=4, rows_per_block=3)
    assert sorted(found) == sorted(queries)
    for query in queries:
        descending = torch.argsort(scores[query], descending=True)
        helpful_values, helpful_indices = found[query][top_k.HELPFUL]
        harmful_values, harmful_indices = found[query][top_k.HARMFUL]
        assert helpful_indices == descending[:4].tolist()
        assert harmful_indices == descending.flip(0)[:4].tolist()
        torch.testing.assert_close(torch.tensor(helpful_values), scores[query, descending[:4]])
        assert helpful_values[0] == scores[query].max().item() and harmful_values[0] == scores[query].min().item()


def test_readable_names_only_for_the_full_imagenet_class_list():
    wnids = [f"n{i:08d}" for i in range(1000)]
    names = top_k.class_names(wnids)
    assert names[0] == "n00000000 tench" and names[-1].startswith("n00000999 ") and len(names) == 1000
    assert top_k.class_names(["n01", "n02"]) == ["n01", "n02"]


# ------------------------------------------------------------------------------- self-influence maths


class LossMeasurementTask(ClassificationTask):
    """Measurement = the training loss (cross-entropy with the true label), as self-influence uses."""

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model, sample=False)


def _self_scores(model, train, settings, provenance, name="ekfac_self") -> torch.Tensor:
    analyzer = make_analyzer(copy.deepcopy(model), settings)
    record = fit_factors(analyzer, train, settings, provenance)
    path = compute_self_scores(analyzer, train, settings, provenance, record)
    assert path == naming.self_scores_path(settings.output_dir, settings.analysis_name, name)
    return load_file(str(path))[naming.SCORES_KEY].clone()  # a copy: the file may be replaced


def test_self_scores_equal_the_diagonal_of_pairwise_scores_with_the_training_loss_as_measurement(tmp_path, monkeypatch, one_thread):
    """Self-influence of example i is g_i' P g_i (g_i: gradient of its training loss, P: the damped EKFAC
    inverse); pairwise scores with the training set as queries and the training loss as measurement are
    g_q' P g_i, whose diagonal is the same number. Same factors, full rank."""
    model, train, _ = small_problem(num_train=10)
    settings = AnalysisSettings(
        strategy="ekfac", damping_factor=None, query_batch_size=4, train_batch_size=3,
        output_dir=str(tmp_path), analysis_name="small",
    )
    provenance = {"train": {"model": "small", "num_train": len(train)}, "query": {"model": "small", "num_queries": len(train)}}
    self_scores = _self_scores(model, train, settings, provenance)
    assert self_scores.shape == (len(train),)

    monkeypatch.setattr("influence.analysis.task.ClassificationTask", LossMeasurementTask)
    analyzer = make_analyzer(copy.deepcopy(model), settings)
    record = fit_factors(analyzer, train, settings, provenance)  # reuses the factors on disk
    pairwise = load_scores(compute_scores(analyzer, train, train, settings, provenance, record))
    torch.testing.assert_close(self_scores, pairwise.diagonal(), rtol=1e-4, atol=1e-6)
    assert (self_scores > 0).all()  # g' P g with P positive definite
    off_diagonal = pairwise[~torch.eye(len(train), dtype=torch.bool)]
    assert off_diagonal.abs().max() > 1e-3 * self_scores.max()  # not a diagonal matrix by construction


def test_self_scores_are_reused_and_other_settings_refused(tmp_path, one_thread):
    model, train, _ = small_problem()
    settings = AnalysisSettings(strategy="identity", train_batch_size=5, output_dir=str(tmp_path), analysis_name="small")
    provenance = {"train": {"model": "small", "num_train": len(train)}}
    _self_scores(model, train, settings, provenance, "identity_self")
    path = naming.self_scores_path(tmp_path, "small", "identity_self")
    stamp = path.stat().st_mtime_ns
    _self_scores(model, train, settings, provenance, "identity_self")
    assert path.stat().st_mtime_ns == stamp  # reused, not recomputed
    with pytest.raises(UserError, match=r"damping_factor 1e-08 -> 0.5.*--overwrite"):
        _self_scores(model, train, dataclasses.replace(settings, damping_factor=0.5), provenance, "identity_self")
    changed = _self_scores(model, train, dataclasses.replace(settings, damping_factor=0.5, overwrite=True), provenance, "identity_self")
    assert path.stat().st_mtime_ns != stamp and changed.shape == (len(train),)


def test_a_planted_mislabelled_image_ranks_at_the_top_of_self_influence(tmp_path, one_thread):
    """A small CNN trained until it fits 40 images of 4 well-separated classes, one of them relabelled.
    It fits the wrong label too (memorises it), and that takes a direction in weight space the other
    images hardly use: the relabelled image's self-influence stands out (measured: rank 1, thousands of
    times the median, for data seeds 0-3)."""
    generator = torch.Generator().manual_seed(0)
    num_classes, per_class, planted = 4, 10, 17
    centres = torch.randn(num_classes, 3, 8, 8, generator=generator)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    images = centres[labels] + 0.5 * torch.randn(len(labels), 3, 8, 8, generator=generator)
    true_label = int(labels[planted])
    labels[planted] = (true_label + 1) % num_classes

    torch.manual_seed(0)
    model = SmallCNN(num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02, weight_decay=1e-3)
    for _ in range(150):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        predicted = model(images).argmax(dim=1)
    assert torch.equal(predicted, labels)  # the model fits the data, the planted label included
    assert true_label != int(labels[planted])

    settings = AnalysisSettings(
        strategy="ekfac", damping_factor=None, train_batch_size=8, output_dir=str(tmp_path), analysis_name="planted"
    )
    provenance = {"train": {"model": "trained", "num_train": len(labels)}}
    scores = _self_scores(model, IndexedTensors(images, labels), settings, provenance)
    ranking = torch.argsort(scores, descending=True).tolist()
    assert ranking.index(planted) < 3, f"planted example ranks {ranking.index(planted) + 1} of {len(labels)}"


# --------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def analysed(resnet50_checkpoint, tmp_path_factory):
    """A tiny folder (2 classes, 3 training and 2 validation images each), identity pairwise scores of all
    4 queries and self-influence scores, computed by analyze.py with a saved random-init ResNet-50."""
    root = tmp_path_factory.mktemp("top")
    dataset_dir = write_image_folder(root / "imagenet", tiny_counts())
    output_dir = root / "results"
    common = [
        "--dataset_dir", str(dataset_dir), "--checkpoint", str(resnet50_checkpoint), "--factor_strategy", "identity",
        "--train_batch_size", "3", "--num_workers", "0", "--output_dir", str(output_dir),
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # measured on the shared 2-core machine: 16 s on one thread, 88 s on two
    try:
        pairwise = analyze.main([*common, "--query_batch_size", "2", "--num_queries", "4"])["identity"]
        self_path = analyze.main([*common, "--self_influence"])["identity_self"]
    finally:
        torch.set_num_threads(threads)
    assert self_path == naming.self_scores_path(output_dir, "imagenet", "identity_self")
    return {"dataset_dir": dataset_dir, "output_dir": output_dir, "pairwise": pairwise, "self": self_path, "root": root}


def test_command_line_writes_top_influences_matching_the_scores_and_figures(analysed, tmp_path):
    figure_dir = tmp_path / "figures"
    command = [
        sys.executable, str(REPO_ROOT / "top_influences.py"), "--dataset_dir", str(analysed["dataset_dir"]),
        "--output_dir", str(analysed["output_dir"]), "--factor_strategy", "identity", "--top_k", "3",
        "--queries", "3,0", "--figure_dir", str(figure_dir),
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}  # see `one_thread`
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=environment)
    assert completed.returncode == 0, completed.stderr

    scores = load_file(str(analysed["pairwise"]))[naming.SCORES_KEY]
    table, summary = naming.top_influences_tables(analysed["pairwise"].parent, self_influence=False)
    rows = _read_csv(table)
    assert tuple(rows[0]) == top_k.CSV_COLUMNS
    assert len(rows) == 2 * 2 * 3  # 2 queries x (helpful, harmful) x top 3
    train_files = sorted((analysed["dataset_dir"] / "train").rglob("*.JPEG"))  # ImageFolder order
    for row in rows:
        query, rank, index = int(row["query_index"]), int(row["rank"]), int(row["train_index"])
        order = torch.argsort(scores[query], descending=row["kind"] == "helpful")
        assert index == order[rank - 1].item()
        assert float(row["score"]) == pytest.approx(scores[query, index].item(), rel=1e-6)
        assert Path(row["train_path"]) == train_files[index] and row["label"] == train_files[index].parent.name
    assert [int(r["query_index"]) for r in rows if r["rank"] == "1" and r["kind"] == "helpful"] == [3, 0]

    result = json.loads(summary.read_text())
    assert [q["query_index"] for q in result["queries"]] == [3, 0]
    assert result["queries"][0]["label"] == "n02" and "prediction" in result["queries"][0]  # model rebuilt from the record
    for query in (0, 3):
        figure = naming.top_influences_figure_path(figure_dir, "imagenet", "identity", query)
        with Image.open(figure) as image:
            assert image.format == "PNG"
            assert image.size == _expected_png_size(rows=2, columns=1 + 3)  # the query, then 3 per kind


def test_self_ranking_is_sorted_self_scores_with_a_grid(analysed, tmp_path):
    result = top_influences.main([
        "--dataset_dir", str(analysed["dataset_dir"]), "--output_dir", str(analysed["output_dir"]),
        "--factor_strategy", "identity", "--self", "--top_k", "4", "--figure_top_k", "4",
        "--figure_dir", str(tmp_path), "--results_dir", str(tmp_path / "tables"), "--no_prediction",
    ])
    scores = load_file(str(analysed["self"]))[naming.SCORES_KEY]
    assert scores.shape == (6,)
    rows = _read_csv(tmp_path / "tables" / "self_influence.csv")
    assert [int(r["train_index"]) for r in rows] == torch.argsort(scores, descending=True)[:4].tolist()
    assert [int(r["rank"]) for r in rows] == [1, 2, 3, 4]
    assert result["figures"] == [str(naming.top_influences_figure_path(tmp_path, "imagenet", "identity_self"))]
    with Image.open(result["figures"][0]) as image:
        assert image.size == _expected_png_size(rows=1, columns=4)


def _user_error(argv, capsys, prog=top_influences):
    with pytest.raises(SystemExit) as caught:
        prog.main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert caught.value.code == 2
    return lines[-1]


def test_another_model_for_the_predictions_is_refused(analysed, tmp_path, capsys):
    """The scores were computed with a checkpoint: --weights (a torchvision name, or none) is not that model."""
    base = ["--dataset_dir", str(analysed["dataset_dir"]), "--output_dir", str(analysed["output_dir"]),
            "--factor_strategy", "identity", "--figure_dir", str(tmp_path)]
    line = _user_error([*base, "--weights", "none"], capsys)
    assert line.startswith("top_influences.py: error: --weights none is not the model the scores were computed with (checkpoint sha256:"), line


def test_other_images_or_other_shapes_are_refused_in_one_line(analysed, tmp_path, capsys):
    base = ["--output_dir", str(analysed["output_dir"]), "--factor_strategy", "identity", "--no_prediction",
            "--figure_dir", str(tmp_path)]
    renamed = shutil.copytree(analysed["dataset_dir"], tmp_path / "renamed")
    victim = next((renamed / "train" / "n01").glob("*.JPEG"))
    victim.rename(victim.with_name("zz_" + victim.name))
    line = _user_error(["--dataset_dir", str(renamed), *base], capsys)
    assert "train_files_sha256" in line and str(renamed) in line

    bigger = write_image_folder(tmp_path / "bigger", tiny_counts(train=4))
    line = _user_error(["--dataset_dir", str(bigger), *base], capsys)
    assert "4 x 6 scores" in line and "8 training images" in line
    line = _user_error(["--dataset_dir", str(bigger), "--self", *base], capsys)
    assert "6 self-influence scores" in line

    line = _user_error(["--dataset_dir", str(analysed["dataset_dir"]), "--queries", "1,4", *base], capsys)
    assert "--queries 4" in line
    line = _user_error(["--dataset_dir", str(analysed["dataset_dir"]), *base, "--factor_strategy", "ekfac"], capsys)
    assert "not found" in line and "scores_ekfac" in line


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--demo", "--self", "--queries", "0"], "drop --query_gradient_rank and --queries"),
        (["--demo", "--top_k", "3", "--figure_top_k", "4"], "more than --top_k"),
        (["--demo", "--no_prediction", "--weights", "none"], "--no_prediction builds no model"),
        (["--queries", "1,1", "--demo"], "lists a query twice"),
        (["--demo", "--self", "--score_normalization", "relative"], "never normalised: drop --score_normalization"),
    ],
)
def test_impossible_flag_combinations(argv, message, capsys):
    line = _user_error(argv, capsys)
    assert message in line and line.startswith("usage:") is False


def test_analyze_self_influence_refuses_query_flags(tiny_imagenet, capsys):
    line = _user_error(["--dataset_dir", str(tiny_imagenet), "--self_influence", "--num_queries", "2"], capsys, analyze)
    assert "drop --num_queries" in line


def test_relative_scores_are_listed_from_their_own_file_and_another_normalization_refused(tiny_imagenet, tmp_path, monkeypatch, capsys, one_thread):
    """analyze.py --score_normalization relative (tiny model) writes scores_identity_relative beside the raw
    scores and the self-influence it divided by; --score_normalization relative lists that file's top
    scores, its explorer says so and finds scores_identity_self, and --score_normalization cosine is refused."""
    output = tmp_path / "out"
    path = analyze_in_process(monkeypatch, tiny_imagenet, output, "--score_normalization", "relative")["identity_relative"]
    common = ["--dataset_dir", str(tiny_imagenet), "--no_prediction", "--num_figures", "0", "--top_k", "3"]
    result = top_influences.main([*common, "--output_dir", str(output), "--factor_strategy", "identity",
                                  "--score_normalization", "relative", "--html"])
    assert result["scores"] == str(path) and result["score_normalization"] == "relative"
    relative, raw = load_file(str(path))[naming.SCORES_KEY], load_scores(naming.pairwise_scores_path(output, naming.DEFAULT_ANALYSIS_NAME, "identity"))
    for entry in result["queries"]:
        row = relative[entry["query_index"]]
        assert [item["train_index"] for item in entry["helpful"]] == torch.argsort(row, descending=True)[:3].tolist()
        assert [item["score"] for item in entry["helpful"]] == pytest.approx(row.sort(descending=True).values[:3].tolist())
        assert entry["helpful"][0]["score"] != pytest.approx(raw[entry["query_index"]].max().item())  # not the raw file's
    explorer_dir = naming.explorer_dir(path.parent)
    assert "relative influence: each score divided by" in (explorer_dir / naming.EXPLORER_INDEX).read_text()
    assert "relative influence" in (explorer_dir / explorer.SELF_PAGE).read_text()  # scores_identity_self was found
    copies = sorted((explorer_dir / explorer.IMAGES).rglob("*.JPEG"))
    sources = sorted(tiny_imagenet.rglob("*.JPEG"))
    assert copies and not any(os.path.samefile(made, source) for made in copies for source in sources)  # copies, not links

    capsys.readouterr()
    with pytest.raises(SystemExit) as caught:
        top_influences.main([*common, "--scores", str(path.parent), "--score_normalization", "cosine"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert caught.value.code == 2 and "Traceback" not in err and len(errors) == 1
    assert errors[0] == (f"top_influences.py: error: {path} has score_normalization relative (by its metadata), "
                         "not --score_normalization cosine")
