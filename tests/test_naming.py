"""Output names: one function makes them, for every combination of the flags that changes results."""

import itertools

import pytest

import analyze
from influence.analysis.settings import STRATEGIES, AnalysisSettings
from influence.results import naming


@pytest.mark.parametrize(
    "strategy, half, rank, expected_factors, expected_scores",
    [
        ("ekfac", False, None, "ekfac", "ekfac"),
        ("ekfac", True, None, "ekfac_half", "ekfac_half"),
        ("ekfac", False, 32, "ekfac", "ekfac_qlr32"),
        ("ekfac", True, 32, "ekfac_half", "ekfac_half_qlr32"),
        ("kfac", False, 8, "kfac", "kfac_qlr8"),
        ("identity", True, None, "identity_half", "identity_half"),
    ],
)
def test_seed_names(strategy, half, rank, expected_factors, expected_scores):
    assert naming.factors_name(strategy, half) == expected_factors
    assert naming.scores_name(strategy, half, rank) == expected_scores
    settings = AnalysisSettings(strategy=strategy, use_half_precision=half, query_gradient_rank=rank)
    assert (settings.factors_name, settings.scores_name) == (expected_factors, expected_scores)


def test_every_flag_combination_has_its_own_name_and_rank_round_trips():
    combos = list(itertools.product(STRATEGIES, [False, True], [None, 1, 32, 128]))
    names = {naming.scores_name(*combo) for combo in combos}
    assert len(names) == len(combos)
    for strategy, half, rank in combos:
        assert naming.rank_from_scores_name(naming.scores_name(strategy, half, rank)) == rank


def test_paths_follow_kronfluence_layout(tmp_path):
    path = naming.pairwise_scores_path(tmp_path, "imagenet", "ekfac_qlr32")
    assert path == tmp_path / "imagenet" / "scores_ekfac_qlr32" / "pairwise_scores.safetensors"
    assert naming.factors_dir(tmp_path, "imagenet", "ekfac_half") == tmp_path / "imagenet" / "factors_ekfac_half"


def test_command_line_flags_map_to_names():
    args = analyze.parse_args(["--dataset_dir", "x", "--query_gradient_rank", "32", "--use_half_precision"])
    assert analyze.settings_from_args(args, "cpu").scores_name == "ekfac_half_qlr32"
    args = analyze.parse_args(["--dataset_dir", "x", "--query_gradient_rank", "-1"])
    settings = analyze.settings_from_args(args, "cpu")
    assert settings.query_gradient_rank is None and settings.scores_name == "ekfac"
    assert (settings.query_batch_size, settings.train_batch_size, args.num_queries) == (100, 256, 1000)
    assert settings.damping_factor == 1e-8
    assert analyze.parse_args(["--dataset_dir", "x", "--damping_factor", "heuristic"]).damping_factor is None


def test_pairwise_scores_find_the_self_scores_of_their_factors():
    """The explorer's self-influence page reads the self scores made with the pairwise scores' factors."""
    for strategy, half, rank in itertools.product(STRATEGIES, [False, True], [None, 8, 32]):
        pairwise = naming.scores_name(strategy, half, rank)
        assert naming.self_scores_name_for(pairwise) == naming.self_scores_name(strategy, half)
    assert naming.explorer_index("results/scores_ekfac") == naming.explorer_dir("results/scores_ekfac") / "index.html"
