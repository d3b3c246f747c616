"""The gradient index past one process, measured on this machine (benchmarks/gradient_index_benchmark.py's
`scaling` and `memory` subcommands).

`scaling`: gradient_index.py's build and query as a user types them, in one process (every core, then
one thread) and under `torchrun --standalone --nproc-per-node 2` (gloo on the CPU, one thread a process),
on a random-init ResNet-50 (saved as a checkpoint) and generated ImageNet-sized JPEGs at 224 pixels, the
EKFAC basis and preconditioning fitted once by analyze.py; training images compressed per second and
query seconds per 1,000 queries, from the phase timings the scripts log (start-up excluded, stated
apart); then the peak host memory of a one-process query at two query batch sizes (the cost of a query
batch), and the projection to ImageNet on 1 and 8 GPUs (every assumption named, marked PROJECTED).

`memory`: a synthetic index of ResNet-50's width at --index_dim 32 (55,296 float16 entries a row) and
--rows rows, scored against --queries random query vectors by the query's own streaming reader at two
shard sizes: the peak memory beyond the query vectors and the score columns is one read chunk, whatever
the shard size, and the file pages a shard maps while it is read, which the kernel reclaims under
pressure (clean page cache)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from safetensors.torch import load_file

import pipeline
from benchmarks import measure, workdir
from influence.index import projection
from influence.index import shards as index_shards
from influence.index.compute import score_shards
from influence.results import naming
from influence.runtime import hardware
from influence.runtime.cli import UserError

REPO = Path(__file__).resolve().parents[1]
CROP = 224
RESIZE = 256
INDEX_DIM = 32
IMAGENET_TRAIN = 1_281_167
QUERIES = 1000
# (processes, torch threads a process): one process with every core (a user's default), one with one thread,
# and two under torchrun (which gives each one thread): on a shared machine the one-thread rows compare
# like with like, since threads that cannot all run spin-wait (docs/tests.md).
VARIANTS = ((1, None), (1, 1), (2, 1))
SHARD_SIZE = 16  # training images per shard here: 2 per rank at 64 images, so both ranks write
# PROJECTED, not measured: upstream's rank-32 scoring pass over ImageNet on one A100 (about 3 hours) runs at
# least the build's work (a forward and backward pass per training image), so it bounds the build's time.
UPSTREAM_A100_PASS_S = 3 * 3600
ASSUMED_READ_BYTES_PER_S = 2e9  # as benchmarks/gradient_index_benchmark.py imagenet: a local NVMe SSD
ASSUMED_GPU_FLOPS = 50e12  # TF32 matrix products actually reached on an A100/H100 (about a third of peak)
QUERY_MACS = 144e9  # one ResNet-50 query's preconditioning (docs/gradient_index.md)
BUILD_LINE = re.compile(r"compressed (\d+) training images in ([\d.]+) s")
QUERY_LINE = re.compile(r"query gradients in ([\d.]+) s, scored against (\d+) shards in ([\d.]+) s")


def _run(command: List[str], env: Dict[str, str]) -> str:
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"{' '.join(command[:4])} ... failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ''}")
    return done.stderr


def _command(processes: int, script: str, argv: List[str]) -> List[str]:
    if processes == 1:
        return [sys.executable, script, *argv]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", str(processes), script, *argv]


def _peak_query(argv: List[str], env: Dict[str, str]) -> float:
    """Peak host memory (MiB) of one gradient_index.py query process."""
    code = "import sys, gradient_index; from benchmarks import measure; gradient_index.main(sys.argv[1:]); print('PEAK', measure.peak_host_mb())"
    done = subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"the peak-memory query failed: {done.stderr.strip().splitlines()[-1]}")
    return float(done.stdout.split("PEAK")[-1])


def run_scaling(args: Any) -> Dict[str, Any]:
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}  # one process: every core
    with workdir.own_workdir(workdir.scratch_folder(args.workdir, "index-scaling-"), args.keep) as root:
        dataset = measure.make_synthetic_imagenet(root / "imagenet", 2, args.train // 2, args.queries // 2)
        from torchvision.models import resnet50  # pylint: disable=import-outside-toplevel

        torch.manual_seed(0)
        checkpoint = root / "resnet50.pt"
        torch.save(pipeline.calibrate_batchnorm(resnet50(weights=None), torch.randn(8, 3, CROP, CROP)).state_dict(), checkpoint)
        model = ["--dataset_dir", str(dataset), "--checkpoint", str(checkpoint), "--resize_size", str(RESIZE), "--crop_size", str(CROP), "--num_workers", "0"]
        factors = root / "factors"
        # Factors of a few images suffice: the query's cost is the preconditioning, not the factors' quality.
        _run([sys.executable, "analyze.py", *model, "--output_dir", str(factors), "--factor_strategy", "ekfac", "--num_queries", "1",
              "--train_batch_size", "8", "--factor_batch_size", "8", "--factor_examples", "8", "--damping_factor", "heuristic"], env)
        runs: Dict[str, Any] = {}
        for processes, threads in VARIANTS:
            name = f"{processes}x{threads or 'all'}"
            run_env = env if threads is None else {**env, "OMP_NUM_THREADS": str(threads)}
            out = root / name
            shutil.copytree(naming.factors_dir(factors, "imagenet", "ekfac"), naming.factors_dir(out, "imagenet", "ekfac"))
            common = [*model, "--output_dir", str(out), "--index_dim", str(INDEX_DIM)]
            started = time.perf_counter()
            log = _run(_command(processes, "gradient_index.py", ["build", *common, "--shard_size", str(SHARD_SIZE), "--train_batch_size", "8"]), run_env)
            build_wall = time.perf_counter() - started
            images, build_s = BUILD_LINE.search(log).groups()
            started = time.perf_counter()
            log = _run(_command(processes, "gradient_index.py", ["query", *common, "--num_queries", str(args.queries), "--query_batch_size", "4",
                                                                 "--damping_factor", "heuristic"]), run_env)
            query_wall = time.perf_counter() - started
            gradients_s, _, scoring_s = QUERY_LINE.search(log).groups()
            runs[name] = {"processes": processes, "threads_per_process": threads or torch.get_num_threads(),
                "build_images": int(images), "build_s": float(build_s), "build_images_per_s": int(images) / float(build_s), "build_command_s": build_wall,
                "queries": args.queries, "query_gradients_s": float(gradients_s), "scoring_s": float(scoring_s), "query_command_s": query_wall,
                "query_s_per_1000": (float(gradients_s) + float(scoring_s)) / args.queries * QUERIES,
            }
            print(f"{name}: build {runs[name]['build_images_per_s']:.2f} images/s, query {runs[name]['query_s_per_1000']:.0f} s per 1,000 queries", flush=True)
        scores = [index_shards.index_scores_dir(root / name, "imagenet", "ekfac", INDEX_DIM, "ekfac") / naming.PAIRWISE_SCORES_FILE for name in ("1x1", "2x1")]
        one, two = (load_file(str(path))[naming.SCORES_KEY] for path in scores)
        peaks = {str(size): _peak_query(["query", *model, "--output_dir", str(root / "1x1"), "--index_dim", str(INDEX_DIM), "--num_queries", str(size),
                                         "--query_batch_size", str(size), "--damping_factor", "heuristic", "--scores_dir", str(root / "1x1" / "imagenet" / f"scores_peak{size}")],
                                        {**env, "OMP_NUM_THREADS": "1"})
                 for size in (1, 4)}
    result = {
        "machine": hardware.describe_device("cpu"), "train_images": args.train, "crop": CROP, "index_dim": INDEX_DIM, "runs": runs,
        "scores_max_relative_difference_2_vs_1_process": float((two - one).abs().max() / one.abs().max()),  # one thread each: expected 0
        "query_peak_host_mib_by_batch_size": peaks, "query_peak_host_mib_per_query": (peaks["4"] - peaks["1"]) / 3,
        "projection": projection_arithmetic(runs),
    }
    return _save(args.json, "scaling", result)


def projection_arithmetic(runs: Dict[str, Any]) -> Dict[str, Any]:
    """PROJECTED times for 1,281,167 training images and 1,000 queries: this CPU from its measured rates;
    GPUs from upstream's A100 pass and the assumptions named in the module's constants."""
    dim = sum(layer.size for layer in projection.layer_plan(pipeline.build_model(weights=pipeline.NO_WEIGHTS), INDEX_DIM))
    index_bytes = IMAGENET_TRAIN * dim * 2
    speedup = runs["2x1"]["build_images_per_s"] / runs["1x1"]["build_images_per_s"]
    read_s = index_bytes / ASSUMED_READ_BYTES_PER_S
    scoring_s = 2 * QUERIES * dim * IMAGENET_TRAIN / ASSUMED_GPU_FLOPS
    precondition_s = 2 * QUERY_MACS * QUERIES / ASSUMED_GPU_FLOPS
    return {
        "label": "PROJECTED: not measured on a GPU",
        "cpu_build_hours": {p: IMAGENET_TRAIN / runs[p]["build_images_per_s"] / 3600 for p in runs},
        "measured_2_process_build_speedup_over_1_process_1_thread": speedup,
        "gpu_build_hours": {"1": UPSTREAM_A100_PASS_S / 3600, "8": UPSTREAM_A100_PASS_S / 8 / 3600},
        "gpu_query_s_per_1000": {
            "1": {"precondition": precondition_s, "scoring": scoring_s, "read": read_s, "total": precondition_s + scoring_s + read_s},
            "8": {"precondition": precondition_s / 8, "scoring": scoring_s / 8, "read": read_s, "total": (precondition_s + scoring_s) / 8 + read_s},
        },
        "index_bytes": index_bytes, "dim": dim,
        "assumptions": {"upstream_a100_pass_s": UPSTREAM_A100_PASS_S, "read_bytes_per_s": ASSUMED_READ_BYTES_PER_S, "gpu_flops": ASSUMED_GPU_FLOPS,
                        "query_macs": QUERY_MACS, "8 GPUs": "the work divides evenly (shards, query batches, shards to score); the index is read once in all at the same rate"},
    }


class _Sampler(threading.Thread):
    """Peak anonymous and file-backed resident memory (RssAnon, RssFile) of this process, sampled."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peaks = {"RssAnon": 0, "RssFile": 0}
        self.running = True

    def run(self) -> None:
        while self.running:
            for field in self.peaks:
                self.peaks[field] = max(self.peaks[field], hardware.proc_kib("/proc/self/status", field) or 0)
            time.sleep(0.002)


def _scored_peak(query_vectors: torch.Tensor, directory: Path, ranges: List[Any], checksums: List[Optional[str]]) -> Dict[str, float]:
    base = {field: hardware.proc_kib("/proc/self/status", field) or 0 for field in ("RssAnon", "RssFile")}
    sampler = _Sampler()
    sampler.start()
    started = time.perf_counter()
    scores = score_shards(query_vectors, directory, ranges, range(len(ranges)), checksums, None, naming.NO_NORMALIZATION, show_progress=False)
    seconds = time.perf_counter() - started
    sampler.running = False
    sampler.join()
    del scores
    return {"seconds": seconds, **{f"{field}_above_start_mib": (sampler.peaks[field] - base[field]) / 1024 for field in base}}


def run_memory(args: Any) -> Dict[str, Any]:
    dim = sum(layer.size for layer in projection.layer_plan(pipeline.build_model(weights=pipeline.NO_WEIGHTS), INDEX_DIM))
    generator = torch.Generator().manual_seed(0)
    query_vectors = torch.randn(args.queries, dim, generator=generator)
    result: Dict[str, Any] = {"dim": dim, "rows": args.rows, "queries": args.queries, "read_chunk_bytes": index_shards.READ_CHUNK_BYTES,
                              "query_vectors_mib": query_vectors.numel() * 4 / measure.MIB, "score_matrix_mib": args.queries * args.rows * 4 / measure.MIB, "shard_sizes": {}}
    with workdir.own_workdir(workdir.scratch_folder(args.workdir, "index-memory-"), args.keep) as root:
        for shard_size in args.shard_sizes:
            directory = root / f"shards{shard_size}"
            directory.mkdir()
            ranges = index_shards.shard_ranges(args.rows, shard_size)
            checksums = []
            for position, (start, stop) in enumerate(ranges):
                rows = torch.randn(stop - start, dim, generator=generator, dtype=torch.float16) * 1e-3
                checksums.append(index_shards.write_shard(index_shards.shard_path(directory, position), rows, start, stop))
                del rows
            os.sync()
            entry = _scored_peak(query_vectors, directory, ranges, checksums)
            entry["shard_mib"] = shard_size * dim * 2 / measure.MIB
            entry["index_gb"] = args.rows * dim * 2 / 1e9
            result["shard_sizes"][str(shard_size)] = entry
            print(f"shards of {shard_size:,} rows ({entry['shard_mib']:.0f} MiB): {args.rows:,} rows x {args.queries} queries scored in {entry['seconds']:.1f} s; "
                  f"peak anonymous memory +{entry['RssAnon_above_start_mib']:.0f} MiB, mapped file pages +{entry['RssFile_above_start_mib']:.0f} MiB")
            shutil.rmtree(directory)
    return _save(args.json, "memory", result)


def _save(path: Path, key: str, result: Dict[str, Any]) -> Dict[str, Any]:
    results = json.loads(path.read_text()) if path.is_file() else {}
    results[key] = result
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return results
