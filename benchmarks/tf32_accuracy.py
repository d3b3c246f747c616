"""The accuracy cost of TF32, measured without a GPU: runs `analyze.py` (the demo by default) in plain float32
and again with every float32 matrix product and convolution fed TF32 operands (10 of 23 mantissa bits kept,
products summed in float32), as an Ampere-or-newer GPU computes them with TF32 on, and compares the scores
query by query (Spearman, Pearson, top-k overlap, largest difference). How a GPU library turns float32 into
TF32 is not documented, so both ends are measured, round to nearest (even) and truncation; the tensor cores'
summation order is not emulated (its effect is float32 rounding, a thousand times smaller). `--ops` limits
TF32 to convolutions or to matmuls, and `--calibrate_batchnorm` stands in for trained weights where none can
be downloaded. Arguments it does not know go to analyze.py (default `--demo`), with `--tf32 off` so the
reference is float32 on a GPU too; each variant has its own analysis folder under `--output_dir`, reused
by a rerun only if the same emulation made it. Run from the repository root:
`python -m benchmarks.tf32_accuracy [ANALYZE_ARGS...]`."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import io
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import analyze
import pipeline
from influence.analysis import agreement as comparison
from influence.analysis.scoring import load_scores
from influence.data import demo, images
from influence.results import locking, naming
from influence.results.score_files import check_writable
from influence.runtime.cli import UserError, setup_logging, user_errors

PROG = "tf32_accuracy.py"
ROUNDINGS = ("nearest", "truncate")
FLOAT32_NAME = "float32"
DEFAULT_OUTPUT_DIR = Path("influence_results") / "tf32_accuracy"
CALIBRATION_IMAGES = 64  # training images (at most, drawn by --seed) whose statistics become BatchNorm's
EMULATION_FILE = "tf32_emulation.json"  # in each variant's folder: which emulation made its results
TF32_MANTISSA_BITS = 10
FLOAT32_MANTISSA_BITS = 23
DROPPED_BITS = FLOAT32_MANTISSA_BITS - TF32_MANTISSA_BITS
aten = torch.ops.aten
# For each matrix-product or convolution op, the positions of its float32 operands that tensor cores read
# in TF32. Added terms (addmm's `self`, biases) are summed in float32 and keep their bits.
CONVOLUTION_OPERANDS = {
    aten.convolution.default: (0, 1),
    aten.convolution_backward.default: (0, 1, 2),  # grad_output, input, weight
}
MATMUL_OPERANDS = {
    aten.mm.default: (0, 1),
    aten.bmm.default: (0, 1),
    aten.addmm.default: (1, 2),
    aten.addmm_.default: (1, 2),
    aten.baddbmm.default: (1, 2),
    aten.baddbmm_.default: (1, 2),
}
# Which ops get TF32 operands: all, or one kind. On GPUs analyze.py's default is TF32 matmuls (`--tf32
# matmuls`); PyTorch's own defaults, and so the upstream example's, are TF32 convolutions and float32 matmuls.
OPS = {
    "all": {**CONVOLUTION_OPERANDS, **MATMUL_OPERANDS},
    "convolutions": CONVOLUTION_OPERANDS,
    "matmuls": MATMUL_OPERANDS,
}
logger = logging.getLogger(__name__)


def round_to_tf32(tensor: torch.Tensor, rounding: str) -> torch.Tensor:
    """A float32 tensor with its mantissa cut to TF32's 10 bits: to nearest (ties to even) or truncated.
    Infinities and NaNs stay as they are (rounding up into the exponent is float32's own overflow)."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, not {rounding!r}")
    bits = tensor.view(torch.int32)
    if rounding == "nearest":
        # Adding half an ulp of the kept mantissa (minus one when the kept last bit is even) carries into
        # it exactly when rounding up; integer overflow cannot happen below the infinity exponent.
        bits = bits + ((1 << (DROPPED_BITS - 1)) - 1) + ((bits >> DROPPED_BITS) & 1)
    rounded = (bits & ~((1 << DROPPED_BITS) - 1)).view(torch.float32)
    return torch.where(torch.isfinite(tensor), rounded, tensor)


class EmulatedTF32(TorchDispatchMode):
    """While active, float32 operands of matrix products and convolutions are rounded to TF32 first;
    `counts` says how many calls of each op were changed, so a test or a reader can see what was covered."""

    def __init__(self, rounding: str, ops: str = "all") -> None:
        super().__init__()
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, not {rounding!r}")
        self.rounding = rounding
        self.operands = OPS[ops]
        self.counts: Dict[str, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Optional[Dict[str, Any]] = None) -> Any:
        positions = self.operands.get(func)
        if positions is not None:
            args = list(args)
            changed = False
            for position in positions:
                operand = args[position]
                if isinstance(operand, torch.Tensor) and operand.dtype == torch.float32:
                    args[position] = round_to_tf32(operand, self.rounding)
                    changed = True
            if changed:
                self.counts[str(func)] = self.counts.get(str(func), 0) + 1
        return func(*args, **(kwargs or {}))


def variant_name(rounding: Optional[str], ops: str) -> str:
    """The analysis folder and report name of one variant: `float32`, `tf32_nearest`, `tf32_nearest_convolutions`."""
    if rounding is None:
        return FLOAT32_NAME
    return f"tf32_{rounding}" + ("" if ops == "all" else f"_{ops}")


def batchnorm_calibrated_checkpoint(analyze_args: argparse.Namespace, output_dir: Path) -> Path:
    """The random-init model (analyze.py's `--arch`, ResNet-50 by default) of its `--seed` with its BatchNorm running statistics set to the
    batch statistics of CALIBRATION_IMAGES training images drawn by that seed, saved under `output_dir` once
    per seed and training set (named by both, so a rerun reuses it and its sha256 stays the same)."""
    dataset_dir = demo.make_demo_dataset() if analyze_args.demo else analyze_args.dataset_dir
    preprocessing = pipeline.model_preprocessing(None, analyze_args.resize_size, analyze_args.crop_size, analyze_args.arch)
    train = pipeline.get_imagenet_dataset("train", dataset_dir, preprocessing=preprocessing)
    fingerprint = images.samples_fingerprint(train)[:12]
    path = output_dir / f"{analyze_args.arch}_seed{analyze_args.seed}_batchnorm_from_{fingerprint}.pt"
    if path.is_file():
        return path
    rng = np.random.default_rng(analyze_args.seed)
    chosen = np.sort(rng.choice(len(train), size=min(CALIBRATION_IMAGES, len(train)), replace=False))
    calibration = torch.stack([train[int(i)][0] for i in chosen])
    model = pipeline.calibrate_batchnorm(pipeline.random_model(analyze_args.arch, analyze_args.seed, preprocessing.crop_size), calibration)
    partial = path.with_suffix(".partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), partial)
        partial.replace(path)
    except OSError as error:
        raise UserError(f"cannot write {partial} ({error.strerror or error})") from None
    logger.info("random-init ResNet-50 (seed %d), BatchNorm statistics from %d training images: %s", analyze_args.seed, len(chosen), path)
    return path


def emulation_record(rounding: str, ops: str) -> Dict[str, str]:
    """What makes a variant's results: the rounding, the ops, and the code of the emulation itself."""
    code = inspect.getsource(round_to_tf32) + inspect.getsource(EmulatedTF32) + repr(sorted((str(op), p) for op, p in OPS[ops].items()))
    return {"rounding": rounding, "ops": ops, "emulation_sha256": hashlib.sha256(code.encode()).hexdigest()}


def discard_other_emulation(folder: Path, record: Dict[str, str]) -> None:
    """A variant folder made without this emulation's record (another version, or an interrupted first run)
    is removed: on the CPU its results record the same dependencies as this emulation's would, so
    analyze.py would reuse them."""
    marker = folder / EMULATION_FILE
    try:
        same = json.loads(marker.read_text()) == record
    except (OSError, ValueError):
        same = False
    if not same and any(path.name != naming.LOCK_FILE for path in folder.iterdir()):
        logger.info("%s: made by another emulation or unfinished; recomputing", folder)
        locking.clear(folder)  # not the lock file: this process holds it


def run_analysis(analyze_args: List[str], output_dir: Path, rounding: Optional[str], ops: str) -> Tuple[Dict[str, Path], Dict[str, int], bool]:
    """analyze.py with the given arguments, writing into this variant's own analysis folder; returns its score
    files, how many calls of each op got TF32 operands, and whether its finished results were reused (its
    score files left untouched; a reusing run still makes a forward pass or two, e.g. to size query
    batches). Its printed report (the demo's, or the timing table) is left out."""
    variant = variant_name(rounding, ops)
    argv = [*analyze_args, "--output_dir", str(output_dir), "--analysis_name", variant]
    logger.info("%s: analyze.py %s", variant, " ".join(argv))
    if rounding is None:
        with contextlib.redirect_stdout(io.StringIO()):
            return analyze.main(argv), {}, False
    record = emulation_record(rounding, ops)
    folder = output_dir / variant
    # Held from the cleanup to the marker, so that another run of this benchmark cannot remove the folder
    # while analyze.py (which holds the same lock) computes in it.
    with locking.hold(folder):
        discard_other_emulation(folder, record)
        reusable = (folder / EMULATION_FILE).is_file()
        before = {path: path.stat().st_mtime_ns for path in folder.rglob("*.safetensors")}
        mode = EmulatedTF32(rounding, ops)
        with mode, contextlib.redirect_stdout(io.StringIO()):
            results = analyze.main(argv)
        reused = reusable and all(before.get(path) == path.stat().st_mtime_ns for path in results.values())
        if reused:
            logger.info("%s: results reused from %s", variant, folder)
        elif mode.counts:
            logger.info("%s: TF32 operands in %s", variant, ", ".join(f"{n} x {op}" for op, n in sorted(mode.counts.items())))
        else:
            raise RuntimeError(f"{variant}: the emulation reached no float32 product or convolution")
        (folder / EMULATION_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return results, mode.counts, reused


def compare_scores(reference: np.ndarray, other: np.ndarray) -> Dict[str, Any]:
    """Per-query statistics of one variant's scores against the float32 ones, and their summaries."""
    per_query = [comparison.row_statistics(ref_row, row) for ref_row, row in zip(reference, other)]
    summaries = {
        name: comparison.summarize(np.array([stats[name] for stats in per_query])) for name in comparison.STATISTICS
    }
    scale = float(np.abs(reference).max())
    return {
        "statistics": summaries,
        "max_abs_difference_over_max_abs_score": float(np.abs(other - reference).max() / scale) if scale else 0.0,
        "per_query": {
            name: [None if np.isnan(stats[name]) else stats[name] for stats in per_query] for name in comparison.STATISTICS
        },
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Accuracy cost of TF32 matmuls and convolutions, emulated on any device: analyze.py's scores "
        "with TF32 operands against float32 ones. Unknown arguments go to analyze.py (default: --demo).",
    )
    parser.add_argument("--roundings", nargs="+", choices=ROUNDINGS, default=list(ROUNDINGS),
                        help="How float32 operands become TF32: to nearest (even), truncated, or both (default: both).")
    parser.add_argument("--ops", choices=OPS, default="all",
                        help="Which float32 ops get TF32 operands: all, convolutions (as in PyTorch's defaults) or "
                        "matmuls (as in analyze.py's default on GPUs) (default: all).")
    parser.add_argument("--calibrate_batchnorm", action="store_true",
                        help="Analyse a random-init ResNet-50 whose BatchNorm statistics come from the training images "
                        "(saved under --output_dir), a stand-in for trained weights where none can be downloaded.")
    parser.add_argument("--output_dir", type=Path, default=DEFAULT_OUTPUT_DIR,
                        help=f"analyze.py's --output_dir; one analysis folder per variant (default: {DEFAULT_OUTPUT_DIR}).")
    parser.add_argument("--json", type=Path, help="Also write the comparison (summaries and per-query values) here.")
    return parser


def parse_analyze_args(analyze_args: List[str], calibrate_batchnorm: bool) -> argparse.Namespace:
    """analyze.py's own parsing of the forwarded arguments (its usage errors, exit code 2), then the
    arguments this comparison sets itself or cannot honour, refused in one line each."""
    analyze_parser = analyze.build_parser()
    analyze_parser.set_defaults(tf32=None)  # to tell a given --tf32 from the default
    parsed = analyze_parser.parse_args(analyze_args)
    refusals = {
        "--analysis_name": (parsed.analysis_name is not None, f"is chosen by {PROG} (one analysis folder per variant)"),
        "--tf32": (parsed.tf32 is not None, f"is set by {PROG} (off: the emulation replaces it)"),
        "--use_half_precision": (parsed.use_half_precision, "computes in bfloat16, where TF32 does not apply"),
        "--self_influence": (parsed.self_influence, "gives no pairwise scores to compare"),
        "--weights/--checkpoint": (calibrate_batchnorm and (parsed.weights is not None or parsed.checkpoint is not None),
                                   "cannot be used with --calibrate_batchnorm, which makes the model"),
    }
    for flag, (refused, why) in refusals.items():
        if refused:
            build_parser().error(f"{flag} {why}; drop it")
    return parsed


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args, analyze_args = build_parser().parse_known_args(argv)
    analyze_args = analyze_args or ["--demo"]
    parsed = parse_analyze_args(analyze_args, args.calibrate_batchnorm)
    setup_logging()
    with user_errors(PROG):
        if args.json is not None:
            check_writable(args.json)
        analyze_args = [*analyze_args, "--tf32", "off"]  # the reference is float32 on a GPU too
        if args.calibrate_batchnorm:
            checkpoint = batchnorm_calibrated_checkpoint(parsed, args.output_dir)
            analyze_args = [*analyze_args, "--checkpoint", str(checkpoint)]
        reference, _, _ = run_analysis(analyze_args, args.output_dir, None, args.ops)
        result: Dict[str, Any] = {
            "analyze_args": analyze_args, "emulated_on": "cuda" if torch.cuda.is_available() else "cpu",
            "ops": args.ops, "variants": {}, "tf32_operand_calls": {}, "reused": {},
        }
        for rounding in args.roundings:
            variant = variant_name(rounding, args.ops)
            scores, counts, reused = run_analysis(analyze_args, args.output_dir, rounding, args.ops)
            if set(scores) != set(reference):
                raise UserError(f"{variant} produced {sorted(scores)}, float32 {sorted(reference)}")
            result["variants"][variant] = {
                name: compare_scores(load_scores(reference[name]).double().numpy(),
                                     load_scores(scores[name]).double().numpy())
                for name in reference
            }
            result["tf32_operand_calls"][variant] = counts
            result["reused"][variant] = reused
    for variant, by_scores in result["variants"].items():  # printed after all runs, away from their logs
        for name, compared in by_scores.items():
            print(f"\n{variant} vs float32, scores `{name}` (largest |difference| / largest |score|: "
                  f"{compared['max_abs_difference_over_max_abs_score']:.2e}):")
            print(comparison.format_table(compared["statistics"]))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwritten: {args.json}")
    return result


if __name__ == "__main__":
    main()
