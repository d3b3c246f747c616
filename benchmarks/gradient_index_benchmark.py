"""How close the gradient index (gradient_index.py) comes to analyze.py's exact scores, and what it costs.

`agreement`: for one --index_dim, builds the index and queries it with exactly the queries, strategy,
damping, model and images of an exact (full-rank) score folder of analyze.py, all read from that folder's
run_config.json, then compares the two score files query by query (Spearman, Pearson, top-10 and top-100
overlap, as query_batching_analysis.py computes them) and adds the numbers, the index's bytes per image
and the build and query seconds to --json. One --index_dim per command, so each run stays short.

`figure`: draws the agreement curve (per-query Spearman and top-10 overlap against --index_dim) from --json.

`imagenet`: the sizes of a ResNet-50 index of ImageNet (exact, from the layer shapes), and, from rates
measured here (training images compressed per second at 224 pixels, training rows scored per second for
1,000 queries), a PROJECTION of the disk, build time and query time for 1,281,167 training images.

`scaling` and `memory` (benchmarks/gradient_index_scaling.py): build images/s and query seconds per 1,000
queries at 1 and 2 processes (torchrun) on this machine with the projection to 1 and 8 GPUs; the peak
memory of a query's streaming pass over a large synthetic index, per shard and per query batch.

Run it from the repository root as `python -m benchmarks.gradient_index_benchmark SUBCOMMAND ...`."""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

import gradient_index
import pipeline
from benchmarks import gradient_index_scaling
from influence.analysis.agreement import SPEARMAN, STATISTICS, overlap_name, row_statistics
from influence.analysis.scoring import load_scores
from influence.analysis.task import ClassificationTask
from influence.index import projection
from influence.index import shards as index_shards
from influence.results import naming, records
from influence.results.score_files import open_score_file, read_rows
from influence.runtime import hardware
from influence.runtime.cli import UserError, positive_int, setup_logging, user_errors
from validation import lds
from validation.trained_digits import SEED as lds_seed

PROG = "gradient_index_benchmark.py"
DEFAULT_JSON = Path("figure/gradient_index.json")
DEFAULT_FIGURE = Path("figure/gradient_index_agreement.png")
IMAGENET_TRAIN = 1_281_167
IMAGENET_CLASSES = 1000
IMAGENET_QUERIES = 1000
IMAGENET_CROP = 224
MEASURE_IMAGES = 4  # ResNet-50 images at 224 px compressed per --index_dim when measuring the build rate
MEASURE_ROWS = 4096  # index rows scored against IMAGENET_QUERIES query vectors when measuring the scoring rate
# Not measured here: how fast the index is read from disk. A local NVMe SSD reads about 2 GB/s; the
# projection states it as an assumption.
ASSUMED_READ_BYTES_PER_S = 2e9
DEFAULT_DIMS = (8, 16, 32, 64)


class _Timings(logging.Handler):
    """Collects the phase timings gradient_index.py logs."""

    def __init__(self) -> None:
        super().__init__()
        self.timings: Dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        self.timings.update(getattr(record, "timings", {}))


def flags_from_record(record: Dict[str, Any]) -> List[str]:
    """gradient_index.py's model, data and folder flags for the run an exact score folder records."""
    resolved, settings = record["resolved"], record["settings"]
    arch, model = records.split_model_source(record["depends_on"]["model"])
    flags = ["--arch", arch, "--dataset_dir", resolved["dataset_dir"], "--output_dir", settings["output_dir"],
             "--analysis_name", settings["analysis_name"], "--seed", str(settings["seed"]), "--num_workers", "0"]
    kind, _, value = model.partition(":")
    if kind == "weights":
        flags += ["--weights", value]
    else:
        flags += ["--checkpoint", resolved["checkpoint"]]
    if kind != "weights" or value == pipeline.NO_WEIGHTS:
        flags += ["--resize_size", str(resolved["preprocessing"]["resize_size"]), "--crop_size", str(resolved["preprocessing"]["crop_size"])]
    return flags


def query_flags(record: Dict[str, Any], folder: Path) -> List[str]:
    """The exact scores' queries, in their order: a --query_dir as recorded, else a --query_files list of
    their validation positions; the strategy and damping of their factors."""
    chosen = record["resolved"].get("queries") or {}
    if "root" in chosen:
        flags = ["--query_dir", chosen["root"]]
    else:
        positions = chosen.get("val_positions", list(range(record["depends_on"]["num_queries"])))
        listing = folder / "queries.txt"
        listing.write_text("".join(f"{position}\n" for position in positions))
        flags = ["--query_files", str(listing)]
    damping = record["depends_on"]["damping_factor"]
    normalization = record["depends_on"].get("score_normalization", naming.NO_NORMALIZATION)
    return [*flags, "--factor_strategy", record["settings"]["strategy"], "--damping_factor", "heuristic" if damping is None else repr(damping),
            "--score_normalization", normalization]


def compare(exact_path: Path, index_path: Path) -> Dict[str, Any]:
    exact, index = open_score_file(exact_path, "--exact"), open_score_file(index_path, "index scores")
    if (exact.num_queries, exact.num_train) != (index.num_queries, index.num_train):
        raise UserError(f"{index_path} is {index.num_queries} x {index.num_train}, {exact_path} {exact.num_queries} x {exact.num_train}")
    per_query = {name: [] for name in STATISTICS}
    for full_row, index_row in zip(read_rows(exact, 0, exact.num_queries), read_rows(index, 0, index.num_queries)):
        for name, value in row_statistics(full_row, index_row).items():
            per_query[name].append(value)
    summary = {}
    for name, values in per_query.items():
        values = np.asarray(values, dtype=np.float64)
        summary[name] = {"mean": float(np.nanmean(values)), "minimum": float(np.nanmin(values)), "per_query": values.tolist()}
    return summary


def _factor_examples(record: Dict[str, Any]) -> Optional[int]:
    factors = naming.factors_dir(record["settings"]["output_dir"], record["settings"]["analysis_name"], record["depends_on"]["factors_name"])
    try:
        return json.loads((factors / naming.RUN_CONFIG_FILE).read_text())["depends_on"]["factor_examples"]
    except (OSError, ValueError, KeyError):
        return None


def run_key(analysis: str, basis: str, strategy: str, normalization: str, dtype: str = index_shards.DEFAULT_DTYPE) -> str:
    """One curve of the figure: `trained_digits: ekfac basis, ekfac scores` (`..., ekfac relative scores`;
    `trained_digits: ekfac_half basis, ...` on half-precision factors; `..., bfloat16 index` for an index
    stored in another --dtype than float16)."""
    key = f"{analysis}: {basis} basis, {strategy}{'' if normalization == naming.NO_NORMALIZATION else ' ' + normalization} scores"
    return key if dtype == index_shards.DEFAULT_DTYPE else f"{key}, {dtype} index"


def run_agreement(args: argparse.Namespace) -> Dict[str, Any]:
    exact_path = args.exact / naming.PAIRWISE_SCORES_FILE if args.exact.is_dir() else args.exact
    record_path = exact_path.parent / naming.RUN_CONFIG_FILE
    if not record_path.is_file():
        raise UserError(f"{record_path} not found: --exact must be an analyze.py score folder")
    record = json.loads(record_path.read_text())
    if record["depends_on"].get("query_gradient_rank") is not None:
        raise UserError(f"{exact_path} holds rank-{record['depends_on']['query_gradient_rank']} scores; compare with full-rank ones")
    half = ["--use_half_precision"] if args.use_half_precision else []
    common = [*flags_from_record(record), "--index_dim", str(args.index_dim), "--basis", args.basis, *half]
    label = index_shards.basis_label(args.basis, args.use_half_precision)
    overwrite = ["--overwrite"] if args.overwrite else []
    strategy = record["settings"]["strategy"]
    normalization = record["depends_on"].get("score_normalization", naming.NO_NORMALIZATION)
    results = json.loads(args.json.read_text()) if args.json.is_file() else {}
    strategy_label = naming.factors_name(strategy, args.use_half_precision)  # ekfac_half: the query preconditions with the half factors too
    run = results.setdefault("runs", {}).setdefault(run_key(record["settings"]["analysis_name"], label, strategy_label, normalization, args.dtype), {})
    entry = run.setdefault("dims", {}).setdefault(str(args.index_dim), {})
    entry.clear()  # nothing of an earlier measurement (another dtype, retrainings, exact folder) is kept beside this one
    handler = _Timings()  # a reused index or score file logs no timings: the earlier ones are kept
    logging.getLogger("gradient_index").addHandler(handler)
    directory = index_shards.index_dir(record["settings"]["output_dir"], record["settings"]["analysis_name"], label, args.index_dim)
    gradient_index.main(["build", *common, *overwrite, "--dtype", args.dtype, "--train_batch_size", str(record["settings"]["train_batch_size"])])
    entry.update(handler.timings)
    handler.timings = {}
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        scores_name = index_shards.index_scores_name(label, args.index_dim, strategy_label, normalization)
        scores_dir = (args.scores_root / scores_name) if args.scores_root else None
        index_path = gradient_index.main([
            "query", *common, *overwrite, *query_flags(record, Path(scratch)), "--query_batch_size", str(args.query_batch_size),
            *(["--scores_dir", str(scores_dir)] if scores_dir else []),
        ])
        query_s = time.perf_counter() - started
    if handler.timings:
        entry.update({"query_s": query_s, **handler.timings})
    index_record = json.loads((directory / naming.RUN_CONFIG_FILE).read_text())
    entry.update({
        "bytes_per_image": index_record["resolved"]["bytes_per_image"], "dtype": index_record["depends_on"]["dtype"],
        "agreement": compare(exact_path, index_path), "index_scores": str(index_path),
    })
    if args.retrainings is not None:  # do the index's scores predict retraining as well as the exact ones?
        try:
            masks, measured = lds.cached_margins(args.retrainings, record["depends_on"]["num_train"], record["depends_on"]["num_queries"], lds_seed)
        except ValueError as error:
            raise UserError(str(error)) from None
        entry["lds"] = lds.linear_datamodeling_score(load_scores(index_path), masks, measured)
        run["exact_lds"] = lds.linear_datamodeling_score(load_scores(exact_path), masks, measured)
        run["lds_subsets"] = len(masks)
    run.update({
        "analysis": record["settings"]["analysis_name"], "arch": records.recorded_arch(record), "basis": label, "strategy": strategy_label, "dtype": args.dtype, "normalization": normalization, "exact": str(exact_path), "num_queries": record["depends_on"]["num_queries"], "num_train": record["depends_on"]["num_train"],
        "damping_factor": record["depends_on"]["damping_factor"], "factor_examples": _factor_examples(record),
    })
    results["machine"] = hardware.describe_device(record["settings"]["device"])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    spearman, overlap = entry["agreement"][SPEARMAN], entry["agreement"][overlap_name(10)]
    if "lds" in entry:
        print(f"LDS over {run['lds_subsets']} retrainings: index {entry['lds']['mean']:.3f}, exact {run['exact_lds']['mean']:.3f}")
    print(
        f"index_dim {args.index_dim}: per-query Spearman mean {spearman['mean']:.4f} (minimum {spearman['minimum']:.4f}), "
        f"top-10 overlap mean {overlap['mean']:.3f}; {entry['bytes_per_image'] / 1e3:.1f} kB per image ({entry['dtype']}); "
        f"build {entry.get('build_s', math.nan):.1f} s, query {entry.get('query_s', math.nan):.1f} s ({strategy_label}, {label} basis)"
    )
    return results


def run_figure(args: argparse.Namespace) -> Path:
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    if not args.json.is_file():
        raise UserError(f"{args.json} not found: run the agreement subcommand first")
    results = json.loads(args.json.read_text())
    runs = {strategy: run for strategy, run in results.get("runs", {}).items() if run.get("dims")}
    if not runs:
        raise UserError(f"{args.json} holds no agreement measurements")
    with_lds = {key: run for key, run in runs.items() if any("lds" in entry for entry in run["dims"].values())}
    figure, axes = plt.subplots(1, 3 if with_lds else 2, figsize=(17 if with_lds else 11.5, 4.8))
    colors = {key: f"C{position}" for position, key in enumerate(sorted(runs))}
    ticks = sorted({int(dim) for run in runs.values() for dim in run["dims"]})
    for axis, name in zip(axes, (SPEARMAN, overlap_name(10))):
        for offset, (key, run) in enumerate(sorted(runs.items())):
            dims = sorted(int(dim) for dim in run["dims"])
            entries = [run["dims"][str(dim)] for dim in dims]
            axis.plot(dims, [entry["agreement"][name]["mean"] for entry in entries], "o-", color=colors[key], label=f"{key} ({run['num_queries']} queries)")
            for dim, entry in zip(dims, entries):  # every query's value, a little apart per curve
                axis.scatter([dim * (1 + 0.04 * offset)] * len(entry["agreement"][name]["per_query"]), entry["agreement"][name]["per_query"],
                             s=5, alpha=0.3, color=colors[key])
        axis.set_ylabel(f"per-query {name} with exact scores (dots: each query)")
        axis.set_ylim(-0.3, 1.02)
    if with_lds:
        axis = axes[2]
        for key, run in sorted(with_lds.items()):
            dims = sorted(int(dim) for dim, entry in run["dims"].items() if "lds" in entry)
            axis.plot(dims, [run["dims"][str(dim)]["lds"]["mean"] for dim in dims], "o-", color=colors[key], label=f"{key}: index")
            axis.axhline(run["exact_lds"]["mean"], color=colors[key], linestyle="--", linewidth=1, label=f"{key}: exact")
        axis.axhline(0, color="grey", linewidth=0.5)
        axis.set_ylabel(f"LDS (mean Spearman over queries, {next(iter(with_lds.values()))['lds_subsets']} retrainings)")
    for axis in axes:
        axis.set_xscale("log", base=2)
        axis.set_xticks(ticks, [f"{dim}" for dim in ticks])
        axis.set_xlabel("--index_dim (each layer stores index_dim x index_dim)")
        axis.grid(alpha=0.3)
        axis.legend(loc="center right" if with_lds and axis is axes[-1] else "upper left", fontsize=7)
    figure.suptitle("gradient index against analyze.py's exact full-rank scores, per --basis (training images: "
                    + ", ".join(sorted({f"{run['analysis']} {run['num_train']}" for run in runs.values()})) + ")")
    figure.tight_layout()
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.figure, dpi=120)
    print(f"figure: {args.figure}")
    return args.figure


def _build_rate(index_dim: int, images: torch.Tensor) -> float:
    """Training images compressed per second by ResNet-50 (forward, backward, hooks; no data loading)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = pipeline.build_model(weights=pipeline.NO_WEIGHTS)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    projections = projection.Projections.draw(projection.layer_plan(model, index_dim), seed=0)
    task = ClassificationTask(seed=0)
    labels = torch.zeros(len(images), dtype=torch.long)
    with projection.CompressedGradientRecorder(model, projections) as recorder:
        task.compute_train_loss((images[:1], labels[:1], labels[:1]), model).backward()  # warm-up
        recorder.take()
        started = time.perf_counter()
        task.compute_train_loss((images, labels, labels), model).backward()
        recorder.take()
    return len(images) / (time.perf_counter() - started)


def _scoring_rate(dim: int) -> float:
    """Index rows (float16 on disk) scored per second against IMAGENET_QUERIES float32 query vectors."""
    queries = torch.randn(IMAGENET_QUERIES, dim)
    rows = torch.randn(MEASURE_ROWS, dim).half()
    started = time.perf_counter()
    _ = queries @ rows.float().t()
    return MEASURE_ROWS / (time.perf_counter() - started)


def run_imagenet(args: argparse.Namespace) -> Dict[str, Any]:
    results = json.loads(args.json.read_text()) if args.json.is_file() else {}
    # ResNet-50's float32 EKFAC queries (runs recorded before --arch carry no architecture: ResNet-50's).
    ekfac = [run for run in results.get("runs", {}).values() if run.get("strategy") == "ekfac" and run.get("arch", pipeline.DEFAULT_ARCH) == pipeline.DEFAULT_ARCH
             and run.get("normalization", naming.NO_NORMALIZATION) == naming.NO_NORMALIZATION]
    measured = [entry for run in ekfac for entry in run.get("dims", {}).values() if "query_gradients_s" in entry]
    # The query side's cost is preconditioning full gradients, which depends on the layer shapes only, not
    # on the image size: the per-query seconds measured on the trained digits model (EKFAC) carry over.
    per_query = [entry["query_gradients_s"] / run["num_queries"] for run in ekfac for entry in run.get("dims", {}).values() if "query_gradients_s" in entry]
    precondition_s = float(np.median(per_query)) if measured else None
    with torch.random.fork_rng():
        torch.manual_seed(0)
        images = torch.randn(args.measure_images, 3, IMAGENET_CROP, IMAGENET_CROP)
    logging.getLogger().setLevel(logging.WARNING)  # the random-init warning, once per model, says nothing here
    projected = {}
    for index_dim in args.index_dims:
        model = pipeline.build_model(weights=pipeline.NO_WEIGHTS)
        plan = projection.layer_plan(model, index_dim)
        per_image = projection.bytes_per_example(plan, torch.finfo(torch.float16).bits // 8)
        dim = sum(layer.size for layer in plan)
        build_rate = _build_rate(index_dim, images)
        scoring_rate = _scoring_rate(dim)
        index_bytes = per_image * IMAGENET_TRAIN
        entry = {
            "bytes_per_image_float16": per_image, "index_bytes": index_bytes, "measured_build_images_per_s": build_rate,
            "projected_build_hours": IMAGENET_TRAIN / build_rate / 3600, "measured_scoring_rows_per_s_1000_queries": scoring_rate,
            "projected_scoring_s_per_1000_queries": IMAGENET_TRAIN / scoring_rate,
            "projected_read_s_at_assumed_2GBps": index_bytes / ASSUMED_READ_BYTES_PER_S,
            "projected_query_gradients_s_per_1000_queries": precondition_s * IMAGENET_QUERIES if precondition_s else None,
            "query_vectors_bytes_1000_queries": dim * 4 * IMAGENET_QUERIES,
            "score_file_bytes_1000_queries": IMAGENET_QUERIES * IMAGENET_TRAIN * 4,
        }
        projected[str(index_dim)] = entry
        print(
            f"index_dim {index_dim}: {per_image / 1e3:.1f} kB/image, ImageNet index {index_bytes / 1e9:.1f} GB; "
            f"PROJECTED from this machine: build {entry['projected_build_hours']:.1f} h ({build_rate:.2f} images/s measured at "
            f"{IMAGENET_CROP} px), scoring 1,000 queries {entry['projected_scoring_s_per_1000_queries']:.0f} s of matmul + "
            f"{entry['projected_read_s_at_assumed_2GBps']:.0f} s to read the index at an assumed 2 GB/s"
            + (f" + {entry['projected_query_gradients_s_per_1000_queries']:.0f} s of query gradients" if precondition_s else "")
        )
    results["imagenet_projection"] = {
        "label": "PROJECTION: rates measured on the machine below, scaled linearly to 1,281,167 training images and 1,000 queries",
        "machine": hardware.describe_device("cuda" if torch.cuda.is_available() else "cpu"),
        "assumed_read_bytes_per_s": ASSUMED_READ_BYTES_PER_S, "measure_images": args.measure_images,
        "query_gradients_s_per_query_measured_on": "the agreement runs above" if precondition_s else None,
        "dims": projected,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    agreement = commands.add_parser("agreement", help="Build and query one --index_dim; compare with exact scores.")
    agreement.add_argument("--exact", type=Path, required=True, help="analyze.py's full-rank score folder (or file) to compare with; its run_config.json says the model, data, queries and damping.")
    agreement.add_argument("--index_dim", type=positive_int, required=True, help="gradient_index.py's --index_dim.")
    agreement.add_argument("--basis", choices=index_shards.BASES, default=index_shards.DEFAULT_BASIS, help=f"gradient_index.py's --basis (default: {index_shards.DEFAULT_BASIS}).")
    agreement.add_argument("--dtype", choices=tuple(index_shards.DTYPES), default=index_shards.DEFAULT_DTYPE, help=f"The index's --dtype (default: {index_shards.DEFAULT_DTYPE}).")
    agreement.add_argument("--use_half_precision", action="store_true", help="Build and query the index on the factors of `analyze.py --use_half_precision` (gradient_index.py's flag), still compared with --exact's float32 scores.")
    agreement.add_argument("--query_batch_size", type=positive_int, default=8, help="gradient_index.py query's --query_batch_size (default: 8).")
    agreement.add_argument("--overwrite", action="store_true", help="Pass --overwrite to gradient_index.py (an index or scores of other settings are replaced).")
    agreement.add_argument("--retrainings", type=Path, help="validation.trained_digits' cached LDS retrainings (data/trained_digits/lds) of the exact scores' model, images and queries: adds the LDS of the index's and the exact scores.")
    agreement.add_argument("--scores_root", type=Path, help="Folder for the index's score folders (default: beside the index, gradient_index.py's own default).")
    figure = commands.add_parser("figure", help="Draw the agreement curve from --json.")
    figure.add_argument("--figure", type=Path, default=DEFAULT_FIGURE, help=f"Where the figure goes (default: {DEFAULT_FIGURE}).")
    imagenet = commands.add_parser("imagenet", help="Sizes and a projection of build and query time for ImageNet.")
    imagenet.add_argument("--index_dims", type=positive_int, nargs="+", default=list(DEFAULT_DIMS), help=f"The --index_dim values (default: {' '.join(map(str, DEFAULT_DIMS))}).")
    imagenet.add_argument("--measure_images", type=positive_int, default=MEASURE_IMAGES, help=f"Images at {IMAGENET_CROP} px per build-rate measurement (default: {MEASURE_IMAGES}).")
    scaling = commands.add_parser("scaling", help="Build and query at 1 and 2 processes (torchrun) here, and the projection to GPUs.")
    scaling.add_argument("--train", type=positive_int, default=64, help="Generated training images at 224 px (default: 64).")
    scaling.add_argument("--queries", type=positive_int, default=8, help="Queries (default: 8).")
    memory = commands.add_parser("memory", help="Peak memory of a query's pass over a large synthetic index, at two shard sizes.")
    memory.add_argument("--rows", type=positive_int, default=40_000, help="Rows of the synthetic index (default: 40,000: 4.4 GB in float16).")
    memory.add_argument("--queries", type=positive_int, default=1000, help="Query vectors scored (default: 1,000).")
    memory.add_argument("--shard_sizes", type=positive_int, nargs="+", default=[2_500, 10_000], help="Rows per shard (default: 2,500 10,000).")
    for command in (scaling, memory):
        command.add_argument("--workdir", type=Path, help="Scratch folder, new or one a benchmark made (default: a temporary one); deleted at the end unless --keep.")
        command.add_argument("--keep", action="store_true", help="Keep --workdir.")
    for command in (agreement, figure, imagenet, scaling, memory):
        command.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"The measurements, read and extended (default: {DEFAULT_JSON}).")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Any:
    args = build_parser().parse_args(argv)
    setup_logging()
    with user_errors(PROG):
        commands = {"agreement": run_agreement, "figure": run_figure, "imagenet": run_imagenet,
                    "scaling": gradient_index_scaling.run_scaling, "memory": gradient_index_scaling.run_memory}
        return commands[args.command](args)


if __name__ == "__main__":
    main()
