"""Tests for query_batching_analysis.py on tiny synthetic kronfluence score files: the statistics on
cases whose answer is known, agreement with scipy run on whole rows, independence from the block size,
ranks read from saved arguments and folder names, normalised score files (chosen by --score_normalization,
never compared with raw ones), bfloat16 files, the real command line, each bad input's one-line message,
and the benchmark's streamed safetensors writer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from scipy.stats import pearsonr, spearmanr

import query_batching_analysis as qba
from benchmarks import query_batching_benchmark as bench
from influence.analysis import agreement
from influence.results import naming, score_files
from influence.results.naming import SCORES_KEY, pairwise_scores_path, scores_dir, scores_name

REPO_ROOT = Path(__file__).resolve().parent.parent
NUM_QUERIES = 6
NUM_TRAIN = 2000


def write_scores(
    folder: Path, scores: torch.Tensor, rank: Optional[int] = None, key: str = SCORES_KEY, metadata: bool = True,
    normalization: Optional[str] = None,
) -> Path:
    """A kronfluence-like score folder; metadata mimics ScoreArguments.to_str_dict(), plus the key
    analyze.py --score_normalization adds to its rescaled files when `normalization` is given."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pairwise_scores.safetensors"
    saved: Optional[Dict[str, str]] = {score_files.RANK_METADATA_KEY: str(rank)} if metadata else None
    if normalization is not None:
        saved = {**(saved or {}), naming.NORMALIZATION_METADATA_KEY: normalization}
    save_file({key: scores.contiguous()}, str(path), metadata=saved)
    return path


def random_scores(seed: int, shape=(NUM_QUERIES, NUM_TRAIN)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def run_main(tmp_path: Path, full: Path, low: Path, *extra: str) -> dict:
    return qba.main([
        "--full_scores", str(full), "--low_rank_scores", str(low),
        "--figure", str(tmp_path / "figure" / "qb.png"), *extra,
    ])


def test_identical_files_agree_perfectly(tmp_path):
    scores = random_scores(0)
    full = write_scores(tmp_path / "scores_ekfac", scores)
    low = write_scores(tmp_path / "scores_ekfac_qlr32", scores, rank=32)
    result = run_main(tmp_path, full, low)
    for name in agreement.STATISTICS:
        assert result["statistics"][name]["minimum"] == pytest.approx(1.0, abs=1e-12), name
        assert result["statistics"][name]["queries"] == NUM_QUERIES


def test_monotone_nonlinear_transform_keeps_spearman_not_pearson(tmp_path):
    scores = random_scores(1)
    full = write_scores(tmp_path / "full", scores)
    # In float64 so that exp keeps distinct float32 scores distinct (float32 exp would create ties).
    low = write_scores(tmp_path / "low", torch.exp(2 * scores.double()), rank=8)
    stats = run_main(tmp_path, full, low)["statistics"]
    assert stats["Spearman"]["minimum"] == pytest.approx(1.0, abs=1e-12)
    assert stats["Pearson"]["mean"] < 0.9
    assert stats["top-10 overlap"]["minimum"] == 1.0 and stats["top-100 overlap"]["minimum"] == 1.0


def test_independent_noise_is_near_zero(tmp_path):
    full = write_scores(tmp_path / "full", random_scores(2))
    low = write_scores(tmp_path / "low", random_scores(3), rank=8)
    result = run_main(tmp_path, full, low)
    for name in ("Spearman", "Pearson"):
        assert max(abs(v) for v in result["per_query"][name]) < 0.1, name
    # Expected overlap of two random top-100 sets out of 2000 is 100 / 2000 = 0.05.
    assert result["statistics"]["top-100 overlap"]["mean"] < 0.15


def test_matches_scipy_on_whole_rows_and_ignores_block_size(tmp_path):
    scores = random_scores(4)
    noisy = scores + 0.5 * random_scores(5)
    full = write_scores(tmp_path / "full", scores)
    low = write_scores(tmp_path / "low", noisy, rank=16)
    by_block = [run_main(tmp_path, full, low, "--rows_per_block", str(b))["per_query"] for b in (1, 4, NUM_QUERIES)]
    assert by_block[0] == by_block[1] == by_block[2]
    x, y = scores.double().numpy(), noisy.double().numpy()
    np.testing.assert_allclose(by_block[0]["Spearman"], [spearmanr(a, b).statistic for a, b in zip(x, y)], rtol=1e-12)
    np.testing.assert_allclose(by_block[0]["Pearson"], [pearsonr(a, b).statistic for a, b in zip(x, y)], rtol=1e-6)
    top = lambda row, k: set(np.argsort(-row)[:k])  # noqa: E731
    expected = [len(top(a, 10) & top(b, 10)) / 10 for a, b in zip(x, y)]
    assert by_block[0]["top-10 overlap"] == pytest.approx(expected)
    assert 0.5 < np.mean(by_block[0]["Spearman"]) < 0.99


def test_bfloat16_files_with_ties(tmp_path, capsys):
    scores = random_scores(6).to(torch.bfloat16)
    noisy = (scores.float() + 0.3 * random_scores(7)).to(torch.bfloat16)
    full = write_scores(tmp_path / "scores_ekfac_half", scores)
    low = write_scores(tmp_path / "scores_ekfac_half_qlr32", noisy, rank=32)
    result = run_main(tmp_path, full, low, "--num_queries", "3")
    assert "rank 32 (bfloat16)" in capsys.readouterr().out
    x, y = scores.float().numpy(), noisy.float().numpy()
    # bfloat16 has many tied scores; scipy's average ranks on the same values must agree.
    assert len(np.unique(x[0])) < NUM_TRAIN
    np.testing.assert_allclose(result["per_query"]["Spearman"], [spearmanr(a, b).statistic for a, b in zip(x[:3], y[:3])])
    assert result["num_queries"] == 3 and len(result["per_query"]["Pearson"]) == 3


def test_rank_from_saved_arguments_else_folder_name(tmp_path, capsys):
    scores = random_scores(8)
    full = write_scores(tmp_path / "anything", scores, rank=None)
    low = write_scores(tmp_path / "scores_ekfac_qlr8", scores, metadata=False)
    result = run_main(tmp_path, full, low)
    assert (result["full_scores"]["rank"], result["low_rank_scores"]["rank"]) == (None, 8)
    assert "rank 8 vs full rank" in capsys.readouterr().out
    # Saved arguments win over the folder name.
    low = write_scores(tmp_path / "scores_ekfac_qlr8b", scores, rank=64)
    assert run_main(tmp_path, full, low.parent)["low_rank_scores"]["rank"] == 64


def test_default_paths_come_from_naming(tmp_path):
    full = write_scores(scores_dir(tmp_path, "net", scores_name("ekfac", False, None)), random_scores(9))
    low = write_scores(scores_dir(tmp_path, "net", scores_name("ekfac", False, 32)), random_scores(9), rank=32)
    assert full == pairwise_scores_path(tmp_path, "net", "ekfac")
    result = qba.main(["--output_dir", str(tmp_path), "--analysis_name", "net", "--figure", str(tmp_path / "f.png")])
    assert result["full_scores"]["path"] == str(full) and result["low_rank_scores"]["path"] == str(low)
    assert json.loads((tmp_path / "f.json").read_text())["statistics"]["Spearman"]["minimum"] == pytest.approx(1.0)


def test_command_line_writes_figure_and_summary(tmp_path):
    scores = random_scores(10)
    full = write_scores(tmp_path / "scores_ekfac", scores)
    low = write_scores(tmp_path / "scores_ekfac_qlr32", scores + 0.1 * random_scores(11), rank=32)
    figure, summary = tmp_path / "out" / "qb.png", tmp_path / "elsewhere" / "s.json"
    completed = subprocess.run(
        [sys.executable, "query_batching_analysis.py", "--full_scores", str(full.parent), "--low_rank_scores", str(low),
         "--figure", str(figure), "--summary", str(summary), "--num_points", "300"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    header = next(line for line in lines if line.startswith("statistic"))
    assert header.split()[1:] == ["mean", "median", "minimum", "5th", "percentile", "queries"]
    assert [line.split()[0] for line in lines[lines.index(header) + 1:][:4]] == ["Spearman", "Pearson", "top-10", "top-100"]
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(summary.read_text())
    assert saved["num_points"] == 300 and saved["low_rank_scores"]["rank"] == 32
    assert 0.9 < saved["statistics"]["Spearman"]["median"] < 1.0


def expect_user_error(capsys, argv, *fragments: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        qba.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert "Traceback" not in err and len(errors) == 1
    message = errors[0]
    assert message.startswith("query_batching_analysis.py: error: ")
    for fragment in fragments:
        assert fragment in message


def test_missing_file(tmp_path, capsys):
    low = write_scores(tmp_path / "low", random_scores(12), rank=32)
    missing = tmp_path / "nowhere" / "pairwise_scores.safetensors"
    expect_user_error(capsys, ["--full_scores", str(missing), "--low_rank_scores", str(low)], "--full_scores", "not found", str(missing))


def test_missing_default_files_name_their_path(tmp_path, capsys):
    expected = pairwise_scores_path(tmp_path, "imagenet", "ekfac")
    expect_user_error(capsys, ["--output_dir", str(tmp_path)], "not found", str(expected))


def test_shapes_differ(tmp_path, capsys):
    full = write_scores(tmp_path / "full", random_scores(13))
    low = write_scores(tmp_path / "low", random_scores(13, (NUM_QUERIES, NUM_TRAIN + 1)), rank=32)
    expect_user_error(
        capsys, ["--full_scores", str(full), "--low_rank_scores", str(low)],
        "shapes differ", f"{NUM_QUERIES} x {NUM_TRAIN}", f"{NUM_QUERIES} x {NUM_TRAIN + 1}",
    )


def test_file_without_all_modules_key(tmp_path, capsys):
    full = write_scores(tmp_path / "full", random_scores(14))
    low = write_scores(tmp_path / "low", random_scores(14), rank=32, key="conv1")
    expect_user_error(capsys, ["--full_scores", str(full), "--low_rank_scores", str(low)], str(low), "no 'all_modules'", "conv1")


def test_not_a_safetensors_file(tmp_path, capsys):
    full = write_scores(tmp_path / "full", random_scores(15))
    junk = tmp_path / "junk.safetensors"
    junk.write_text("not scores")
    expect_user_error(capsys, ["--full_scores", str(full), "--low_rank_scores", str(junk)], str(junk), "not a readable safetensors")


def test_nan_in_scores(tmp_path, capsys):
    scores = random_scores(16)
    broken = scores.clone()
    broken[4, 17] = float("nan")
    full = write_scores(tmp_path / "full", scores)
    low = write_scores(tmp_path / "low", broken, rank=32)
    expect_user_error(
        capsys, ["--full_scores", str(full), "--low_rank_scores", str(low), "--figure", str(tmp_path / "f.png"), "--rows_per_block", "2"],
        str(low), "NaN", "query 4", "training example 17",
    )
    assert not (tmp_path / "f.png").exists()


def test_too_many_queries_asked(tmp_path, capsys):
    full = write_scores(tmp_path / "full", random_scores(17))
    low = write_scores(tmp_path / "low", random_scores(17), rank=32)
    expect_user_error(capsys, ["--full_scores", str(full), "--low_rank_scores", str(low), "--num_queries", "7"], "--num_queries 7", "6 queries")


def test_benchmark_writer_makes_readable_files(tmp_path):
    full, low = tmp_path / "a" / "f.safetensors", tmp_path / "b" / "l.safetensors"
    bench.write_score_files(full, low, num_queries=5, num_train=301, dtype="bfloat16", rows_per_write=2)
    with safe_open(str(full), framework="pt") as f_handle, safe_open(str(low), framework="pt") as l_handle:
        f_scores, l_scores = f_handle.get_tensor(SCORES_KEY), l_handle.get_tensor(SCORES_KEY)
        assert l_handle.metadata()[score_files.RANK_METADATA_KEY] == str(bench.LOW_RANK)
    assert f_scores.shape == (5, 301) and f_scores.dtype == torch.bfloat16
    # Rounding to bfloat16 by hand must match torch's rounding of the same float32 values.
    rng = np.random.default_rng(bench.SEED)
    first = rng.standard_normal((2, 301), dtype=np.float32)
    assert torch.equal(f_scores[:2], torch.from_numpy(first).to(torch.bfloat16))
    assert 0.8 < spearmanr(f_scores[0].float(), l_scores[0].float()).statistic < 1.0


def test_unwritable_figure_is_refused_before_any_work(tmp_path, capsys):
    scores = random_scores(10)
    full = write_scores(tmp_path / "scores_ekfac", scores)
    low = write_scores(tmp_path / "scores_ekfac_qlr32", scores, rank=32)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    expect_user_error(
        capsys, ["--full_scores", str(full), "--low_rank_scores", str(low), "--figure", str(blocker / "fig.png")],
        "cannot create the folder of", "a_file/fig.png",
    )


def test_demo_sized_files_report_undefined_top_k_overlap(tmp_path):
    """With no more than k training examples a top-k overlap would be 1 whatever the scores: n/a."""
    generator = torch.Generator().manual_seed(3)
    scores = torch.randn(4, 20, generator=generator)
    full = write_scores(tmp_path / "scores_ekfac", scores)
    low = write_scores(tmp_path / "scores_ekfac_qlr32", -scores, rank=32)
    result = qba.main(["--full_scores", str(full), "--low_rank_scores", str(low), "--figure", str(tmp_path / "f.png")])
    assert result["statistics"]["top-100 overlap"]["queries"] == 0
    assert result["statistics"]["top-10 overlap"]["mean"] == 0.0  # reversed order: the top 10 become the bottom 10
    assert result["statistics"]["Spearman"]["mean"] == -1.0


def test_no_flags_fall_back_to_the_demo_analysis(tmp_path, monkeypatch):
    scores = torch.randn(3, 150, generator=torch.Generator().manual_seed(4))
    write_scores(naming.scores_dir(tmp_path, naming.DEMO_ANALYSIS_NAME, "ekfac"), scores)
    write_scores(naming.scores_dir(tmp_path, naming.DEMO_ANALYSIS_NAME, "ekfac_qlr32"), scores, rank=32)
    result = qba.main(["--output_dir", str(tmp_path), "--figure", str(tmp_path / "f.png")])
    assert f"{naming.DEMO_ANALYSIS_NAME}/scores_ekfac/" in result["full_scores"]["path"]
    assert result["statistics"]["Pearson"]["minimum"] > 1 - 1e-9


def test_score_normalization_picks_the_normalised_default_files(tmp_path, capsys):
    """The raw pair disagrees completely (independent noise), the relative pair agrees perfectly: the
    statistics say which pair was read."""
    relative = naming.NORMALIZATIONS[1]
    scores = random_scores(20)
    raw_full = write_scores(scores_dir(tmp_path, "net", scores_name("ekfac", False, None)), random_scores(21))
    write_scores(scores_dir(tmp_path, "net", scores_name("ekfac", False, 32)), random_scores(22), rank=32)
    full = write_scores(scores_dir(tmp_path, "net", "ekfac_relative"), scores, normalization=relative)
    low = write_scores(scores_dir(tmp_path, "net", "ekfac_qlr32_relative"), scores, rank=32, normalization=relative)
    common = ["--output_dir", str(tmp_path), "--analysis_name", "net", "--figure", str(tmp_path / "f.png")]
    capsys.readouterr()
    result = qba.main([*common, "--score_normalization", relative])
    assert (result["full_scores"]["path"], result["low_rank_scores"]["path"]) == (str(full), str(low))
    assert json.loads((tmp_path / "f.json").read_text())["score_normalization"] == relative
    assert result["statistics"]["Spearman"]["minimum"] == pytest.approx(1.0)
    assert "rank 32, relative vs full rank, relative" in capsys.readouterr().out
    raw = qba.main(common)
    assert raw["full_scores"]["path"] == str(raw_full) and raw["score_normalization"] == naming.NO_NORMALIZATION
    assert raw["statistics"]["Spearman"]["mean"] < 0.1


def test_a_relative_file_against_a_raw_one_is_refused(tmp_path, capsys):
    scores = random_scores(23)
    full = write_scores(tmp_path / "scores_ekfac_relative", scores, normalization="relative")
    low = write_scores(tmp_path / "scores_ekfac_qlr32", scores, rank=32)
    argv = ["--full_scores", str(full), "--low_rank_scores", str(low), "--figure", str(tmp_path / "f.png")]
    expect_user_error(capsys, argv, f"{full} has score_normalization relative but {low} has none")
    assert not (tmp_path / "f.png").exists()
    relative_low = write_scores(tmp_path / "scores_ekfac_qlr32_relative", scores, rank=32, normalization="relative")
    expect_user_error(capsys, [*argv[:2], "--low_rank_scores", str(relative_low), "--score_normalization", "cosine"],
                      "has score_normalization relative (by its metadata), not --score_normalization cosine")


def test_an_unknown_normalization_in_the_metadata_is_one_line(tmp_path, capsys):
    full = write_scores(tmp_path / "full", random_scores(24), normalization="l2")
    low = write_scores(tmp_path / "low", random_scores(24), rank=32)
    expect_user_error(capsys, ["--full_scores", str(full), "--low_rank_scores", str(low)],
                      str(full), "score_normalization='l2' is not one of none, relative, cosine")
