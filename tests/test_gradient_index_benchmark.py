"""benchmarks/gradient_index_benchmark.py's agreement subcommand: the index it builds is of the model, data
and architecture the exact scores record, and each storage dtype and factor precision is its own curve."""

from __future__ import annotations

from benchmarks import gradient_index_benchmark as benchmark


def _record(model: str) -> dict:
    return {
        "resolved": {"dataset_dir": "/data", "checkpoint": "/ckpt.pt", "preprocessing": {"resize_size": 54, "crop_size": 48}},
        "settings": {"output_dir": "/out", "analysis_name": "digits", "seed": 3},
        "depends_on": {"model": model},
    }


def _flag(flags: list, name: str):
    return flags[flags.index(name) + 1] if name in flags else None


def test_flags_name_the_recorded_architecture_and_its_model_source():
    # Another architecture's checkpoint (records say `arch:NAME checkpoint sha256:...`): built as that architecture.
    flags = benchmark.flags_from_record(_record("arch:resnet18 checkpoint sha256:ab12"))
    assert _flag(flags, "--arch") == "resnet18" and _flag(flags, "--checkpoint") == "/ckpt.pt"
    assert (_flag(flags, "--resize_size"), _flag(flags, "--crop_size")) == ("54", "48")
    assert (_flag(flags, "--analysis_name"), _flag(flags, "--seed")) == ("digits", "3")
    # ResNet-50's records carry no architecture: the seed's model, with its recorded weights and their preset.
    flags = benchmark.flags_from_record(_record("weights:IMAGENET1K_V2"))
    assert _flag(flags, "--arch") == "resnet50" and _flag(flags, "--weights") == "IMAGENET1K_V2"
    assert "--checkpoint" not in flags and "--crop_size" not in flags


def test_each_dtype_and_factor_precision_is_its_own_curve():
    keys = {
        benchmark.run_key("digits", "ekfac", "ekfac", "none"),
        benchmark.run_key("digits", "ekfac", "ekfac", "none", "float16"),
        benchmark.run_key("digits", "ekfac", "ekfac", "none", "bfloat16"),
        benchmark.run_key("digits", "ekfac_half", "ekfac_half", "none"),  # factors and preconditioning in half precision
        benchmark.run_key("digits", "ekfac", "ekfac", "relative"),
    }
    assert len(keys) == 4  # float16, the default, keeps the key it always had
    assert benchmark.run_key("digits", "ekfac", "ekfac", "none", "bfloat16") == "digits: ekfac basis, ekfac scores, bfloat16 index"
