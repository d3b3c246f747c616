"""The accuracy cost of TF32, measured without a GPU: runs `analyze.py` (the demo by default) once in plain
float32 and once per rounding with every float32 matrix product and convolution fed TF32 operands, the way
an Ampere-or-newer GPU computes them when TF32 is on (analyze.py's default there): the operands keep 10 of
their 23 mantissa bits, products are summed in float32. It then compares the scores query by query
(Spearman, Pearson, top-k overlap, largest difference) against the float32 ones. How a GPU library turns
float32 operands into TF32 is not documented, so both ends are measured: round to nearest (even) and
truncation. Accumulation order inside the GPU's tensor cores is not emulated; its effect is float32
rounding, a thousand times smaller than TF32's.

Without downloadable weights, `--calibrate_batchnorm` stands in for a trained model: a random-init ResNet-50
whose BatchNorm statistics are set from the training images, so activations keep their scale through the 50
layers (plain random init in eval mode lets them grow by orders of magnitude).

Run it from the repository root as `python -m benchmarks.tf32_accuracy [ANALYZE_ARGS...]`: arguments it does
not know go to analyze.py (default `--demo`); results go under `--output_dir` in one analysis folder per
variant, so a second run reuses them."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import analyze
import demo
import pipeline
import query_batching_analysis as comparison
from cli import UserError, setup_logging, user_errors

PROG = "tf32_accuracy.py"
ROUNDINGS = ("nearest", "truncate")
FLOAT32_NAME = "float32"
DEFAULT_OUTPUT_DIR = Path("influence_results") / "tf32_accuracy"
CALIBRATION_IMAGES = 64  # training images (at most) whose batch statistics become the BatchNorm statistics
CALIBRATED_CHECKPOINT = "resnet50_random_init_batchnorm_from_data.pt"
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
# Which ops get TF32 operands: all (analyze.py's default on GPUs), or one kind; PyTorch's own default, and so
# the upstream example's, is TF32 convolutions with float32 matmuls.
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
    bits = tensor.contiguous().view(torch.int32)
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


def batchnorm_calibrated_checkpoint(analyze_args: List[str], path: Path) -> Path:
    """Saves the random-init ResNet-50 of analyze.py's `--seed` with its BatchNorm running statistics
    set to the batch statistics of the first CALIBRATION_IMAGES training images."""
    args = analyze.parse_args(analyze_args)
    dataset_dir = demo.make_demo_dataset() if args.demo else args.dataset_dir
    train = pipeline.get_imagenet_dataset("train", dataset_dir)
    images = torch.stack([train[i][0] for i in range(min(CALIBRATION_IMAGES, len(train)))])
    model = pipeline.build_model(weights=pipeline.NO_WEIGHTS, seed=args.seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # running statistics = the plain average over the batches seen: this one
    model.train()
    with torch.no_grad():
        model(images)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(model.state_dict(), partial)
    partial.replace(path)
    logger.info("random-init ResNet-50 (seed %d), BatchNorm statistics from %d training images: %s", args.seed, len(images), path)
    return path


def run_analysis(analyze_args: List[str], output_dir: Path, rounding: Optional[str], ops: str) -> Tuple[Dict[str, Path], Dict[str, int]]:
    """analyze.py with the user's arguments, writing into this variant's own analysis folder; returns its
    score files and how many calls of each op got TF32 operands. Its printed report (the demo's, or the
    timing table) is left out: the comparison is this script's report."""
    variant = variant_name(rounding, ops)
    argv = [*analyze_args, "--output_dir", str(output_dir), "--analysis_name", variant]
    logger.info("%s: analyze.py %s", variant, " ".join(argv))
    mode = contextlib.nullcontext() if rounding is None else EmulatedTF32(rounding, ops)
    with mode, contextlib.redirect_stdout(io.StringIO()):
        results = analyze.main(argv)
    counts = getattr(mode, "counts", {})
    if counts:
        logger.info("%s: TF32 operands in %s", variant, ", ".join(f"{n} x {op}" for op, n in sorted(counts.items())))
    elif rounding is not None:
        logger.info("%s: results reused from %s", variant, output_dir / variant)
    return results, counts


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
    parser.add_argument("--roundings", nargs="+", choices=ROUNDINGS, default=list(ROUNDINGS), help="How float32 operands become TF32: to nearest (even), truncated, or both (default: both).")
    parser.add_argument("--ops", choices=OPS, default="all", help="Which float32 ops get TF32 operands: all (analyze.py's default on GPUs), convolutions (PyTorch's default, and the upstream example's) or matmuls (default: all).")
    parser.add_argument("--calibrate_batchnorm", action="store_true", help="Analyse a random-init ResNet-50 whose BatchNorm statistics come from the training images (saved under --output_dir), a stand-in for trained weights where none can be downloaded.")
    parser.add_argument("--output_dir", type=Path, default=DEFAULT_OUTPUT_DIR, help=f"analyze.py's --output_dir; one analysis folder per variant (default: {DEFAULT_OUTPUT_DIR}).")
    parser.add_argument("--json", type=Path, help="Also write the comparison (summaries and per-query values) here.")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args, analyze_args = build_parser().parse_known_args(argv)
    analyze_args = analyze_args or ["--demo"]
    for flag in ("--output_dir", "--analysis_name"):
        if any(arg == flag or arg.startswith(flag + "=") for arg in analyze_args):
            build_parser().error(f"{flag} is chosen by {PROG} (one analysis folder per variant); drop it")
    if "--use_half_precision" in analyze_args:
        build_parser().error("--use_half_precision computes in bfloat16, where TF32 does not apply; drop it")
    if args.calibrate_batchnorm and any(arg.split("=")[0] in ("--weights", "--checkpoint") for arg in analyze_args):
        build_parser().error("--calibrate_batchnorm makes the model; drop --weights and --checkpoint")
    setup_logging()
    with user_errors(PROG):
        if args.json is not None:
            comparison.check_writable(args.json)
        if args.calibrate_batchnorm:
            checkpoint = batchnorm_calibrated_checkpoint(analyze_args, args.output_dir / CALIBRATED_CHECKPOINT)
            analyze_args = [*analyze_args, "--checkpoint", str(checkpoint)]
        reference, _ = run_analysis(analyze_args, args.output_dir, None, args.ops)
        result: Dict[str, Any] = {"analyze_args": analyze_args, "device": "emulated on " + ("cuda" if torch.cuda.is_available() else "cpu"), "ops": args.ops, "variants": {}, "tf32_operand_calls": {}}
        for rounding in args.roundings:
            variant = variant_name(rounding, args.ops)
            scores, counts = run_analysis(analyze_args, args.output_dir, rounding, args.ops)
            if set(scores) != set(reference):
                raise UserError(f"{variant} produced {sorted(scores)}, float32 {sorted(reference)}")
            result["variants"][variant] = {
                name: compare_scores(analyze.load_scores(reference[name]).double().numpy(), analyze.load_scores(scores[name]).double().numpy())
                for name in reference
            }
            result["tf32_operand_calls"][variant] = counts
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
