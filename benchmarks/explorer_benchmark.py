"""Time and peak memory of `top_influences.py --html` at the scale of a large run's explorer: a generated
ImageNet-layout folder of small JPEGs (default 50,000 training images in 100 classes and 1,000 queries),
synthetic pairwise scores (1,000 x 50,000 float32) and self-influence scores beside them, then the real
command line in a child process, twice: the first run makes every thumbnail, the rerun reuses them. The
child reports its own peak resident memory (ru_maxrss, threads included); wall time is measured around it
(imports included). No model is run (--no_prediction): predictions cost one forward pass per query
whatever the explorer does. Run it from the repository root as `python -m benchmarks.explorer_benchmark`."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image
from safetensors.numpy import save_file

from benchmarks.query_batching_benchmark import in_own_workdir, report
from benchmarks.top_influences_benchmark import write_score_file
from benchmarks.workdir import scratch_folder
from influence.results import naming
from influence.runtime.cli import positive_int

REPO_ROOT = Path(__file__).resolve().parent.parent
PROG = "explorer_benchmark.py"
DEFAULT_NUM_QUERIES = 1000
DEFAULT_NUM_TRAIN = 50_000
DEFAULT_NUM_CLASSES = 100
DEFAULT_IMAGE_PIXELS = 16
SPEC_FILE = "benchmark_spec.json"
SEED = 0
# What the child runs: the command line's main, then its own peak memory as the last line.
CHILD = (
    "import json, resource, sys; import top_influences; top_influences.main(sys.argv[1:]); "
    "print(json.dumps({'peak_rss_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))"
)


def write_images(root: Path, num_train: int, num_queries: int, num_classes: int, pixels: int) -> float:
    """root/{train,val}/cNNN/*.JPEG, each image a flat random colour with noise; written once (a spec file
    marks a complete folder). Returns the seconds spent (0 when reused)."""
    spec = {"num_train": num_train, "num_queries": num_queries, "num_classes": num_classes, "pixels": pixels, "seed": SEED}
    if (root / SPEC_FILE).is_file() and json.loads((root / SPEC_FILE).read_text()) == spec:
        return 0.0
    start = time.perf_counter()
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(SEED)
    for split, count in (("train", num_train), ("val", num_queries)):
        for number in range(count):
            class_dir = root / split / f"c{number % num_classes:03d}"
            class_dir.mkdir(parents=True, exist_ok=True)
            colour = rng.integers(0, 256, size=3)
            pixels_array = np.clip(colour + rng.integers(-30, 30, size=(pixels, pixels, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels_array).save(class_dir / f"{split}_{number:06d}.JPEG", quality=90)
    (root / SPEC_FILE).write_text(json.dumps(spec))
    return time.perf_counter() - start


def run_explorer(dataset_dir: Path, scores_dir: Path, workers: Optional[int]) -> Dict[str, float]:
    argv = ["--dataset_dir", str(dataset_dir), "--scores", str(scores_dir), "--html", "--no_prediction", "--num_figures", "0"]
    if workers is not None:
        argv += ["--thumbnail_workers", str(workers)]
    start = time.perf_counter()
    completed = subprocess.run([sys.executable, "-c", CHILD, *argv], cwd=REPO_ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if completed.returncode != 0:
        raise SystemExit(f"{PROG}: error: top_influences.py --html exited with code {completed.returncode}: {completed.stderr[-500:]}")
    lines: List[str] = completed.stdout.strip().splitlines()
    made = next(line for line in lines if line.startswith("explorer ("))
    return {"seconds": seconds, "summary": made, **json.loads(lines[-1])}


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("--num_queries", type=positive_int, default=DEFAULT_NUM_QUERIES, help=f"Queries (default: {DEFAULT_NUM_QUERIES}).")
    parser.add_argument("--num_train", type=positive_int, default=DEFAULT_NUM_TRAIN, help=f"Training images (default: {DEFAULT_NUM_TRAIN}).")
    parser.add_argument("--num_classes", type=positive_int, default=DEFAULT_NUM_CLASSES, help=f"Class folders (default: {DEFAULT_NUM_CLASSES}).")
    parser.add_argument("--image_pixels", type=positive_int, default=DEFAULT_IMAGE_PIXELS, help=f"Side of each generated image (default: {DEFAULT_IMAGE_PIXELS}).")
    parser.add_argument("--thumbnail_workers", type=positive_int, help="Passed to top_influences.py (default: its own).")
    parser.add_argument("--workdir", type=Path, help="Folder for the images, scores and explorer, removed afterwards unless --keep (default: a new temporary folder). A kept folder's images are reused.")
    parser.add_argument("--keep", action="store_true", help="Keep --workdir.")
    parser.add_argument("--json", type=Path, help="Also write the measurements to this JSON file.")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_queries > args.num_train or args.num_classes > args.num_queries:
        parser.error("needs --num_classes <= --num_queries <= --num_train")
    workdir = scratch_folder(args.workdir, "explorer_benchmark_")
    dataset_dir, scores_dir = workdir / "data", workdir / "results" / "scores_ekfac"
    written: Dict[str, float] = {}

    def write() -> None:
        written["image_seconds"] = write_images(dataset_dir, args.num_train, args.num_queries, args.num_classes, args.image_pixels)
        shutil.rmtree(workdir / "results", ignore_errors=True)
        write_score_file(scores_dir / naming.PAIRWISE_SCORES_FILE, args.num_queries, args.num_train, "float32")
        self_dir = scores_dir.parent / "scores_ekfac_self"
        self_dir.mkdir(parents=True)
        save_file({naming.SCORES_KEY: np.random.default_rng(SEED).random(args.num_train, dtype=np.float32)}, str(self_dir / naming.SELF_SCORES_FILE))

    def measure() -> Dict[str, object]:
        return {
            "first": run_explorer(dataset_dir, scores_dir, args.thumbnail_workers),
            "rerun": run_explorer(dataset_dir, scores_dir, args.thumbnail_workers),
            "explorer_bytes": folder_bytes(naming.explorer_dir(scores_dir)),
            "index_bytes": naming.explorer_index(scores_dir).stat().st_size,
        }

    _, measured = in_own_workdir(workdir, args.keep, PROG, write, measure)
    image_seconds, first, rerun = written["image_seconds"], measured["first"], measured["rerun"]
    explorer_bytes, index_bytes = measured["explorer_bytes"], measured["index_bytes"]
    result = {
        "num_queries": args.num_queries, "num_train": args.num_train, "num_classes": args.num_classes,
        "image_pixels": args.image_pixels, "image_write_seconds": image_seconds, "first_run": first, "rerun": rerun,
        "explorer_bytes": explorer_bytes, "index_html_bytes": index_bytes, "python": sys.version.split()[0],
    }
    rows = [
        ("dataset", f"{args.num_train} training and {args.num_queries} query JPEGs of {args.image_pixels} x {args.image_pixels} "
                    f"in {args.num_classes} classes (written in {image_seconds:.0f} s{'' if image_seconds else ': reused'})"),
        ("first run", f"{first['seconds']:.1f} s, peak RSS {first['peak_rss_bytes'] / 1024**2:.0f} MiB: {first['summary']}"),
        ("rerun", f"{rerun['seconds']:.1f} s, peak RSS {rerun['peak_rss_bytes'] / 1024**2:.0f} MiB: {rerun['summary']}"),
        ("explorer", f"{explorer_bytes / 1e6:.1f} MB on disk (hard links to the images count in full), index.html {index_bytes / 1e3:.0f} kB"),
    ]
    report(rows, result, args.json)
    return result


if __name__ == "__main__":
    main()
