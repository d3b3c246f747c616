"""Speed of every phase of an influence analysis, measured one phase at a time on the device at hand (CPU or
GPU) with the suite's own code (`task.make_analyzer`, its factor and score arguments, the ResNet-50 from
`pipeline.py`) on a generated folder of ImageNet-sized JPEGs loaded through the real transform, so decoding
and resizing are counted: data loading (images/s for several DataLoader worker counts), covariance and
lambda fitting (examples/s), eigendecomposition (s), pairwise scoring (training examples/s for a number of
queries; full rank and rank 32; float32 and bfloat16); peak host and GPU memory; FLOPs per example
(PyTorch's FLOP counter) and the share of the device's peak they reach. From the measured rates it projects
the seed's full ImageNet jobs (1,281,167 training images, 100,000 factor examples, 1,000 queries) in the
seed's table format next to the seed's A100 times, and writes everything with `--json PATH`.
Run it from the repository root as `python -m benchmarks.benchmark`."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
from kronfluence.score import pairwise
from torch import nn
from torch.utils import data
from tqdm import tqdm

import analyze
import pipeline
from benchmarks.measure import count_flops, device_peaks, make_synthetic_imagenet, memory_peaks, reset_peak_memory, time_call
from benchmarks.workdir import own_workdir, scratch_folder
from influence.analysis.factors import factor_arguments
from influence.analysis.scoring import accumulation_steps, device_memory_bytes, query_gradient_bytes, score_arguments
from influence.analysis.settings import FACTOR_MAX_EXAMPLES, AnalysisSettings, dataloader_kwargs, set_tf32, uses_channels_last
from influence.analysis.task import make_analyzer
from influence.results import naming
from influence.runtime import hardware
from influence.runtime.cli import UserError, non_negative_int, positive_int, setup_logging, user_errors

PROG = "benchmark.py"
PHASES = ("loading", "covariance", "eigendecomposition", "lambda", "scores")
FACTOR_PHASES = ("covariance", "eigendecomposition", "lambda")
PRECISIONS = ("float32", "bfloat16")
LOW_RANK = 32
FULL_RANK_NAME = "full"
# The seed's full job (its README, one A100 80 GB): sizes and seconds per profiled action.
FULL_NUM_TRAIN = 1_281_167
FULL_NUM_QUERIES = 1000
SEED_JOBS = {
    # name: (rank, precision, query batch size, whether the job fits factors, seed's seconds per action)
    "full rank, float32": (None, "float32", 100, True, {
        "Fit Covariance": 454.05, "Perform Eigendecomposition": 10.589, "Fit Lambda": 1056.7,
        "Compute Pairwise Score": 39136.0, "Total": 40720.0}),
    "rank 32, float32": (LOW_RANK, "float32", 256, False, {"Compute Pairwise Score": 7340.8, "Total": 7352.8}),
    "rank 32, bfloat16": (LOW_RANK, "bfloat16", 500, True, {
        "Fit Covariance": 157.36, "Perform Eigendecomposition": 5.745, "Fit Lambda": 232.3,
        "Compute Pairwise Score": 2621.2, "Total": 3023.7}),
}
SEED_DDP_SECONDS = 3423.3  # four A100s, rank 32, float32
SEED = 0


# ------------------------------------------------------------------------------------ measuring


@dataclasses.dataclass
class Bench:
    """What every phase needs: the analyzer, the data, the settings and the device's peaks."""

    analyzer: Any
    settings: AnalysisSettings
    train: data.Dataset
    queries: data.Dataset
    device: torch.device
    peaks: Dict[str, Any]
    clear_refs: bool
    num_queries: int

    def action_seconds(self, action: str) -> float:
        """kronfluence's own timing of its last `action` (without writing results to disk)."""
        return self.analyzer.profiler.recorded_durations[action][-1]

    def record(self, phase: str, variant: str, precision: Optional[str], seconds: float, examples: Optional[int],
               flops_per_example: Optional[float] = None, memory: Optional[tuple] = None, **extra: Any) -> Dict[str, Any]:
        """One phase's JSON object; `memory`: (host, GPU) peaks taken right after the timed run, before any
        counted run."""
        host, gpu, gpu_reserved = memory or memory_peaks(self.device)
        rate = examples / seconds if examples else None
        achieved = flops_per_example * rate if flops_per_example and rate else None
        peak = self.peaks[precision] if precision else None
        return {
            "phase": phase,
            "variant": variant,
            "device": self.peaks["name"],
            "precision": precision,
            "examples": examples,
            "seconds": seconds,
            "examples_per_s": rate,
            "peak_host_mb": host,
            "peak_host_scope": "this phase" if self.clear_refs else "process lifetime",
            "peak_gpu_mb": gpu,
            "peak_gpu_reserved_mb": gpu_reserved,
            "flops_per_example": flops_per_example,
            "achieved_flops_per_s": achieved,
            "peak_flops_per_s": peak,
            "peak_share": achieved / peak if achieved and peak else None,
            "peak_source": self.peaks["source"] if precision else None,
            **extra,
        }


def factor_args(settings: AnalysisSettings, precision: str) -> Any:
    return factor_arguments(dataclasses.replace(settings, use_half_precision=precision == "bfloat16"))


def subset(dataset: data.Dataset, count: int) -> data.Dataset:
    return data.Subset(dataset, list(range(count)))


# ---------------------------------------------------------------------------------------- phases


def measure_loading(bench: Bench, workers: int, num_images: int, passes: int) -> Dict[str, Any]:
    """Images/s through the real transform into batches, as the analysis's DataLoader delivers them, over
    `passes` passes of one DataLoader (full-rank scoring reads the training set once per pass, so worker
    start-up, which persistent workers pay once, is counted)."""
    settings = dataclasses.replace(bench.settings, num_workers=workers)
    kwargs = {k: v for k, v in dataclasses.asdict(dataloader_kwargs(settings)).items() if v is not None}
    indices = [i % len(bench.train) for i in range(num_images)]  # cycles the folder: decoding is the cost
    bench.clear_refs = reset_peak_memory(bench.device)
    start = time.perf_counter()
    loader = data.DataLoader(data.Subset(bench.train, indices), batch_size=settings.train_batch_size, **kwargs)
    for _ in range(passes):
        for images, _, _ in tqdm(loader, desc=f"loading, {workers} workers", leave=False):
            images.to(bench.device, non_blocking=True)
    if bench.device.type == "cuda":
        torch.cuda.synchronize(bench.device)
    seconds = time.perf_counter() - start
    del loader
    return bench.record("loading", f"{workers} workers", None, seconds, num_images * passes, num_workers=workers, passes=passes)


def measure_factor_phase(bench: Bench, phase: str, precision: str, num_examples: int) -> Dict[str, Any]:
    """Covariance or lambda fitting on `num_examples` training images, then its FLOPs on one image
    (a second, counted run, so the counter does not slow the timed one)."""
    name = naming.factors_name("bench", precision == "bfloat16")
    fit = bench.analyzer.fit_covariance_matrices if phase == "covariance" else bench.analyzer.fit_lambda_matrices
    action = "Fit Covariance" if phase == "covariance" else "Fit Lambda"
    # bfloat16 lambda reuses the float32 eigendecomposition: a bfloat16 run decomposes in float64 as well.
    load_from = "bench" if phase == "lambda" and precision == "bfloat16" else None
    extra = {"load_from_factors_name": load_from} if load_from else {}

    def run(count: int) -> None:
        fit(factors_name=name, dataset=subset(bench.train, count), per_device_batch_size=bench.settings.factor_batch_size
            or bench.settings.train_batch_size, factor_args=factor_args(bench.settings, precision), overwrite_output_dir=True, **extra)

    bench.clear_refs = reset_peak_memory(bench.device)
    run(num_examples)
    seconds, memory = bench.action_seconds(action), memory_peaks(bench.device)
    flops = count_flops(lambda: run(1))
    return bench.record(phase, precision, precision, seconds, num_examples, flops, memory)


def measure_eigendecomposition(bench: Bench) -> Dict[str, Any]:
    bench.clear_refs = reset_peak_memory(bench.device)
    bench.analyzer.perform_eigendecomposition(
        factors_name="bench", factor_args=factor_args(bench.settings, "float32"), overwrite_output_dir=True)
    return bench.record("eigendecomposition", "float64 (kronfluence's default, also for bfloat16 runs)", None,
                        bench.action_seconds("Perform Eigendecomposition"), None)


def score_settings(bench: Bench, rank: Optional[int], precision: str) -> AnalysisSettings:
    return dataclasses.replace(bench.settings, query_gradient_rank=rank, use_half_precision=precision == "bfloat16")


@contextlib.contextmanager
def training_side(device: torch.device, count: bool = False) -> Iterator[Dict[str, float]]:
    """Times (or, with `count`, FLOP-counts) the training side of pairwise scoring alone. kronfluence
    alternates query-side work (computing and preconditioning query gradients) with passes over the
    training set, each one call of `kronfluence.score.pairwise.compute_dot_products_with_loader`; that
    name is looked up when called, so wrapping it here measures exactly the passes."""
    totals = {"seconds": 0.0, "flops": 0}
    original = pairwise.compute_dot_products_with_loader

    def measured(*args: Any, **kwargs: Any) -> Any:
        box: Dict[str, Any] = {}
        if count:
            totals["flops"] += count_flops(lambda: box.setdefault("out", original(*args, **kwargs)))
        else:
            totals["seconds"] += time_call(lambda: box.setdefault("out", original(*args, **kwargs)), device)
        return box["out"]

    pairwise.compute_dot_products_with_loader = measured
    try:
        yield totals
    finally:
        pairwise.compute_dot_products_with_loader = original


def measure_scores(bench: Bench, rank: Optional[int], precision: str, num_train: int) -> Dict[str, Any]:
    """Pairwise scores of `bench.num_queries` queries against `num_train` training images, the training
    side timed apart from the query side (see `training_side`); FLOPs per training image counted on the
    training side of a second run against one training image, its query side running uncounted."""
    settings = score_settings(bench, rank, precision)
    score_args = score_arguments(settings, steps=math.ceil(bench.num_queries / settings.query_batch_size))

    def run(count: int) -> None:
        bench.analyzer.compute_pairwise_scores(
            scores_name=settings.scores_name, factors_name="bench", query_dataset=bench.queries,
            train_dataset=subset(bench.train, count), per_device_query_batch_size=settings.query_batch_size,
            per_device_train_batch_size=settings.train_batch_size, score_args=score_args, overwrite_output_dir=True)

    bench.clear_refs = reset_peak_memory(bench.device)
    with training_side(bench.device) as timed:
        run(num_train)
    total = bench.action_seconds("Compute Pairwise Score")
    memory = memory_peaks(bench.device)
    with training_side(bench.device, count=True) as counted:
        run(1)
    return bench.record("scores", score_variant(rank, precision), precision, timed["seconds"], num_train, counted["flops"], memory,
                        rank=rank, num_queries=bench.num_queries, query_side_seconds=total - timed["seconds"], total_seconds=total)


def score_variant(rank: Optional[int], precision: str) -> str:
    return f"{'full rank' if rank is None else f'rank {rank}'}, {precision}"


# ------------------------------------------------------------------------------------ projection


def project_scores_seconds(bench: Bench, row: Dict[str, Any], query_batch_size: int) -> Dict[str, float]:
    """Seconds for the full job's pairwise scores from a measured scoring row: training side per pass
    (the measured seconds per training image, times FULL_NUM_TRAIN, scaled by FLOPs from the measured
    number of queries to the number gathered per pass) times the passes the analysis's defaults make on
    this device's memory, plus the query side scaled to FULL_NUM_QUERIES."""
    rank, precision = row["rank"], row["precision"]
    settings = dataclasses.replace(score_settings(bench, rank, precision), query_batch_size=query_batch_size)
    itemsize = 2 if precision == "bfloat16" else 4
    query_bytes = query_gradient_bytes(bench.analyzer.model, rank, itemsize)
    steps = accumulation_steps(settings, FULL_NUM_QUERIES, query_bytes, device_memory_bytes(bench.device))
    per_pass = min(FULL_NUM_QUERIES, steps * query_batch_size)
    passes = math.ceil(FULL_NUM_QUERIES / per_pass)
    # FLOPs per training image grow with the queries it is scored against: one dot product per query.
    per_query_flops = 2 * query_bytes / itemsize
    base_flops = max(row["flops_per_example"] - bench.num_queries * per_query_flops, 0.0)
    scale = (base_flops + per_pass * per_query_flops) / row["flops_per_example"] if row["flops_per_example"] else 1.0
    train_seconds = passes * FULL_NUM_TRAIN / row["examples_per_s"] * scale
    query_seconds = row["query_side_seconds"] * FULL_NUM_QUERIES / bench.num_queries
    return {"seconds": train_seconds + query_seconds, "passes": passes, "queries_per_pass": per_pass}


def projection(bench: Bench, phases: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The seed's three single-GPU jobs, projected from this device's measured rates."""
    def find(phase: str, variant: str) -> Optional[Dict[str, Any]]:
        return next((p for p in phases if p["phase"] == phase and p["variant"] == variant), None)

    jobs = []
    for job, (rank, precision, query_batch_size, fits_factors, seed_seconds) in SEED_JOBS.items():
        scores = find("scores", score_variant(rank, precision))
        actions: Dict[str, Optional[float]] = {}
        if fits_factors:
            covariance, lam = find("covariance", precision), find("lambda", precision)
            eigen = next((p for p in phases if p["phase"] == "eigendecomposition"), None)
            factor_examples = FACTOR_MAX_EXAMPLES
            actions["Fit Covariance"] = factor_examples / covariance["examples_per_s"] if covariance else None
            actions["Perform Eigendecomposition"] = eigen["seconds"] if eigen else None
            actions["Fit Lambda"] = factor_examples / lam["examples_per_s"] if lam else None
        detail = project_scores_seconds(bench, scores, query_batch_size) if scores else None
        actions["Compute Pairwise Score"] = detail["seconds"] if detail else None
        known = [v for v in actions.values() if v is not None]
        complete = len(known) == len(actions)
        jobs.append({
            "job": job, "query_batch_size": query_batch_size, "actions_seconds": actions,
            "total_seconds": sum(known) if complete else None, "seed_seconds": seed_seconds,
            "passes_over_training_set": detail["passes"] if detail else None,
            "queries_per_pass": detail["queries_per_pass"] if detail else None,
        })
    return jobs


def seed_format_table(job: Dict[str, Any]) -> str:
    """A projected job in the layout of kronfluence's profiler table, as the seed's README prints it."""
    rows = [(a, s) for a, s in job["actions_seconds"].items() if s is not None]
    total = sum(s for _, s in rows)
    line = "-" * 130
    out = [line, f"|  {'Action':<28}|  {'Mean duration (s)':<21}|  {'Num calls':<21}|  {'Total time (s)':<21}|  {'Percentage %':<21}|", line,
           f"|  {'Total':<28}|  {'-':<21}|  {len(rows):<21}|  {total:<21.5g}|  {'100 %':<21}|", line]
    for action, seconds in sorted(rows, key=lambda r: -r[1]):
        out.append(f"|  {action:<28}|  {seconds:<21.5g}|  {1:<21}|  {seconds:<21.5g}|  {100 * seconds / total:<21.5g}|")
    out.append(line)
    return "\n".join(out)


def phase_table(phases: List[Dict[str, Any]]) -> str:
    def fmt(value: Optional[float], spec: str) -> str:
        return "-" if value is None else format(value, spec)

    header = ("phase", "variant", "examples/s", "seconds", "peak host MiB", "peak GPU MiB", "GFLOP/example", "peak share")
    rows = [header] + [(
        p["phase"], p["variant"], fmt(p["examples_per_s"], ".3g"), fmt(p["seconds"], ".3g"), fmt(p["peak_host_mb"], ".0f"),
        fmt(p["peak_gpu_mb"], ".0f"), fmt(p["flops_per_example"] and p["flops_per_example"] / 1e9, ".3g"),
        fmt(p["peak_share"] and 100 * p["peak_share"], ".1f") + ("%" if p["peak_share"] else ""),
    ) for p in phases]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)


# ------------------------------------------------------------------------------------------- CLI


SMALL_MODEL = "small"


def build_benchmark_model(name: str, seed: int, image_size: Optional[int] = None) -> nn.Module:
    """The analysis's model of architecture `name` (ResNet-50 by default) at random init (weights do not
    change the cost of any phase), or, to check the benchmark's own workings in seconds, a small CNN whose
    numbers mean nothing for ImageNet."""
    if name != SMALL_MODEL:
        return pipeline.build_model(weights=pipeline.NO_WEIGHTS, seed=seed, arch=name, image_size=image_size)
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, kernel_size=7, stride=16, padding=3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 4)
    ).eval()


def benchmark_preprocessing(name: str) -> pipeline.Preprocessing:
    """The evaluation preset of the architecture's first weights (ResNet-50: 256/224), as analyze.py uses
    for a random init; the small CNN takes ResNet-50's."""
    return pipeline.model_preprocessing(None, arch=pipeline.DEFAULT_ARCH if name == SMALL_MODEL else name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="Device to measure (default: cuda when present, else cpu).")
    parser.add_argument("--model", "--arch", dest="model", metavar="NAME", default=pipeline.DEFAULT_ARCH, help="The architecture to measure, any of analyze.py's --arch (default: resnet50), at its weights' crop size; or small: a tiny CNN that checks the benchmark runs end to end in seconds (its numbers mean nothing).")
    parser.add_argument("--strategy", choices=("ekfac", "identity"), default="ekfac", help="ekfac (default), or identity to measure scoring alone without fitting factors: the training side of scoring costs the same, only the query side is preconditioned.")
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES), help="Phases to measure (default: all); lambda and scores need the eigendecomposition, which needs the covariance.")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, help="Precisions of the covariance, lambda and score phases (default: both on a GPU; float32 on the CPU, where bfloat16 without CPU bfloat16 instructions is about 50 times slower).")
    parser.add_argument("--ranks", nargs="+", choices=(FULL_RANK_NAME, str(LOW_RANK)), default=[FULL_RANK_NAME, str(LOW_RANK)], help="Query-gradient ranks scored (default: both).")
    parser.add_argument("--num_classes", type=positive_int, default=4, help="Class folders of the generated dataset (default: 4).")
    parser.add_argument("--num_train", type=positive_int, default=24, help="Training images generated; covariance, lambda and scores run on all of them (default: 24).")
    parser.add_argument("--num_queries", type=positive_int, default=4, help="Queries scored against them (default: 4).")
    parser.add_argument("--loading_images", type=positive_int, default=96, help="Images decoded per pass of a data-loading measurement (the folder is cycled) (default: 96).")
    parser.add_argument("--loading_passes", type=positive_int, default=2, help="Passes of one DataLoader over those images (default: 2).")
    parser.add_argument("--loading_workers", nargs="+", type=non_negative_int, help=f"DataLoader worker counts to measure loading with (default: 0, 1 and the analysis's default, {hardware.default_num_workers()} here).")
    parser.add_argument("--num_workers", type=non_negative_int, default=hardware.default_num_workers(), help=f"DataLoader workers in the compute phases (default: the analysis's, {hardware.default_num_workers()} here).")
    parser.add_argument("--train_batch_size", type=positive_int, default=8, help="Training images per batch in every phase (default: 8).")
    parser.add_argument("--query_batch_size", type=positive_int, default=4, help="Queries per batch (default: 4).")
    analyze.add_speed_arguments(parser)
    parser.add_argument("--workdir", type=Path, help="Folder for the generated images and results, removed afterwards unless --keep (default: a new temporary folder).")
    parser.add_argument("--keep", action="store_true", help="Keep the generated images and the results.")
    parser.add_argument("--json", type=Path, help="Also write every measurement to this JSON file.")
    return parser


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = pipeline.arch_problem(args.model) if args.model != SMALL_MODEL else None
    if problem:
        parser.error(f"{problem}, or small")
    args.device_choice = args.device
    try:
        args.device = hardware.resolve_device(args.device)
    except UserError as error:
        parser.error(str(error))
    if args.precisions is None:
        args.precisions = list(PRECISIONS) if args.device == "cuda" else ["float32"]
    chosen = set(args.phases)
    if args.strategy == "identity":
        if chosen & set(FACTOR_PHASES):
            parser.error("--strategy identity fits no factors: choose --phases among loading and scores")
    elif chosen & {"lambda", "scores"} and not {"covariance", "eigendecomposition"} <= chosen:
        parser.error("lambda and scores need the factors: add covariance and eigendecomposition to --phases")
    elif "scores" in chosen and "lambda" not in chosen:
        parser.error("scores need the lambda factors: add lambda to --phases")
    if args.prefetch_factor is not None and args.num_workers == 0:
        parser.error("--prefetch_factor needs DataLoader workers (--num_workers > 0)")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    setup_logging()
    # The folder is this run's own (it removes it at the end): not shared with another run, and refused
    # if it holds anything a benchmark did not make (benchmarks/workdir.py).
    with user_errors(PROG), own_workdir(scratch_folder(args.workdir, "benchmark_"), args.keep) as workdir:
        return run(args, torch.device(args.device), workdir)


def run(args: argparse.Namespace, device: torch.device, workdir: Path) -> Dict[str, Any]:
    settings = AnalysisSettings(
        strategy=args.strategy, query_batch_size=args.query_batch_size, train_batch_size=args.train_batch_size,
        damping_factor=None, num_workers=args.num_workers, output_dir=str(workdir / "results"), analysis_name="benchmark",
        seed=SEED, profile=True, **analyze.speed_settings(args), device=device.type,
    )
    tf32 = set_tf32(settings.tf32, device.type)
    hardware.make_repeatable(device.type)
    print(hardware.describe_device(device.type, getattr(args, "device_choice", device.type)))
    per_class = math.ceil(args.num_train / args.num_classes)
    dataset_dir = make_synthetic_imagenet(workdir / "imagenet", args.num_classes, per_class, math.ceil(args.num_queries / args.num_classes))
    preprocessing = benchmark_preprocessing(args.model)
    train = subset(pipeline.get_imagenet_dataset("train", dataset_dir, preprocessing=preprocessing), args.num_train)
    queries = subset(pipeline.get_imagenet_dataset("val", dataset_dir, preprocessing=preprocessing), args.num_queries)
    peaks = device_peaks(device, tf32 != "off", args.precisions)
    model = build_benchmark_model(args.model, SEED, preprocessing.crop_size)
    analyzer = make_analyzer(model, settings)
    bench = Bench(analyzer, settings, train, queries, device, peaks, False, args.num_queries)
    phases = measure_all(bench, args)
    jobs = projection(bench, phases) if settings.strategy == "ekfac" else []  # the seed's jobs are EKFAC
    result = {
        "device": peaks, "model": args.model, "tf32": tf32, "channels_last": uses_channels_last(settings), "settings": {k: v for k, v in dataclasses.asdict(settings).items() if k not in ("output_dir",)},
        "sizes": {"num_train": args.num_train, "num_queries": args.num_queries, "loading_images": args.loading_images,
                  "loading_passes": args.loading_passes},
        "load_average": os.getloadavg(), "python": sys.version.split()[0], "torch": torch.__version__,
        "phases": phases, "projection": jobs,
    }
    report(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


def measure_all(bench: Bench, args: argparse.Namespace) -> List[Dict[str, Any]]:
    phases: List[Dict[str, Any]] = []
    chosen = set(args.phases)
    if "loading" in chosen:
        bench.train[0]  # the first decode loads PIL's JPEG plugin; no worker count should pay for it
        workers = args.loading_workers or sorted({0, 1, hardware.default_num_workers()})
        phases += [measure_loading(bench, w, args.loading_images, args.loading_passes) for w in workers]
    if "covariance" in chosen:
        phases += [measure_factor_phase(bench, "covariance", p, args.num_train) for p in args.precisions]
        if "float32" not in args.precisions and "eigendecomposition" in chosen:
            measure_factor_phase(bench, "covariance", "float32", args.num_train)  # the eigendecomposition's input
    if "eigendecomposition" in chosen:
        phases.append(measure_eigendecomposition(bench))
    if "lambda" in chosen:
        # float32 first: the float32 factors are what every score variant loads.
        phases += [measure_factor_phase(bench, "lambda", p, args.num_train) for p in sorted(args.precisions, key=PRECISIONS.index)]
    if "scores" in chosen:
        if bench.settings.strategy == "identity":  # scores still need kronfluence's record of the (empty) factors
            bench.analyzer.fit_all_factors(factors_name="bench", dataset=subset(bench.train, 1), per_device_batch_size=1,
                                           factor_args=factor_args(bench.settings, "float32"), overwrite_output_dir=True)
        ranks = [None if r == FULL_RANK_NAME else int(r) for r in args.ranks]
        phases += [measure_scores(bench, rank, p, args.num_train) for p in args.precisions for rank in ranks]
    return phases


def report(result: Dict[str, Any]) -> None:
    device = result["device"]
    print(f"\ndevice: {device['name']}; load average {', '.join(f'{x:.2f}' for x in result['load_average'])}")
    peaks = ", ".join(f"{precision} {device[precision] / 1e9:.0f} G" for precision in PRECISIONS if precision in device)
    print(f"peak FLOP/s: {peaks} ({device['source']})\n")
    print(phase_table(result["phases"]))
    for job in result["projection"]:
        missing = [action for action, seconds in job["actions_seconds"].items() if seconds is None]
        if missing:
            print(f"\nprojected full ImageNet job, {job['job']}: not projected, unmeasured: {', '.join(missing)}")
            continue
        seed = f"seed (ResNet-50) on one A100: {job['seed_seconds']['Total']:,.0f} s"
        print(f"\nprojected full ImageNet job of {result['model']}, {job['job']} (query batch {job['query_batch_size']}, "
              f"{job['passes_over_training_set']} pass(es) over the training set): {job['total_seconds']:,.0f} s; "
              + (seed if result["model"] == pipeline.DEFAULT_ARCH else f"the {seed} is another model's"))
        print(seed_format_table(job))


if __name__ == "__main__":
    main()
