"""`analyze.py`'s command line with a tiny CNN in place of the ResNet-50, for the interruption tests: every
line of the driver runs as a user runs it (datasets, run records, partitions, reuse), but each phase
takes a fraction of a second, so a run can be killed and resumed many times in a test.

`KILL_AT=PHASE:N` makes the process SIGKILL itself (no cleanup, no exception handling: what a
preempted job or the OOM killer does) at the N-th step of a phase: the N-th training-loss batch of
`covariance`, `lambda` or `scores`, or the N-th eigendecomposition of `eigendecomposition`.
`KILL_AT=PHASE:N:SIGINT` sends another signal instead (SIGINT is what Ctrl-C sends).
`PAUSE_AT=PHASE:N:FOLDER` makes it write its pid to FOLDER/reached-RANK at that step instead and wait
there until FOLDER/go exists, so that a test can act while a run is surely in the middle of a phase.

Usage: python tests/small_model_cli.py ANALYZE_ARGS...
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import time
from pathlib import Path

import torch
from kronfluence.analyzer import Analyzer
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import analyze  # noqa: E402
import pipeline  # noqa: E402
from influence.analysis.task import ClassificationTask  # noqa: E402

PHASE_METHODS = {
    "covariance": "fit_covariance_matrices",
    "eigendecomposition": "perform_eigendecomposition",
    "lambda": "fit_lambda_matrices",
    "scores": "compute_pairwise_scores",
}


class TinyNet(nn.Module):
    """Two convolutions and a linear layer for 224 x 224 inputs; `fc` like the ResNet-50's."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 5, stride=8)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(6 * 2 * 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


def build_tiny_model(weights=None, checkpoint=None, seed: int = 0, num_classes: int = 2, arch: str = "resnet50", image_size=None) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return TinyNet(num_classes).eval()


def install_step_hook(phase: str, count: int, action) -> None:
    """Calls `action()` at the `count`-th step of `phase` (see the module docstring)."""
    steps = {"n": 0}
    current = {"phase": None}

    def step() -> None:
        if current["phase"] == phase:
            steps["n"] += 1
            if steps["n"] == count:
                action()

    for name, method in PHASE_METHODS.items():
        original = getattr(Analyzer, method)

        @functools.wraps(original)
        def tracked(self, *args, _original=original, _name=name, **kwargs):
            current["phase"] = _name
            try:
                return _original(self, *args, **kwargs)
            finally:
                current["phase"] = None

        setattr(Analyzer, method, tracked)

    loss = ClassificationTask.compute_train_loss
    eigh = torch.linalg.eigh

    def counted_loss(self, *args, **kwargs):
        step()
        return loss(self, *args, **kwargs)

    def counted_eigh(*args, **kwargs):
        step()
        return eigh(*args, **kwargs)

    ClassificationTask.compute_train_loss = counted_loss
    torch.linalg.eigh = counted_eigh


def install_kill(spec: str) -> None:
    phase, count, *signal_name = spec.split(":")
    signal_number = getattr(signal, signal_name[0]) if signal_name else signal.SIGKILL
    if signal_number == signal.SIGINT:
        # Python turns SIGINT into KeyboardInterrupt only if its parent left SIGINT handled at start; a test
        # runner's worker may ignore it (seen once: the run ignored its Ctrl-C and finished). A terminal does not.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    install_step_hook(phase, int(count), lambda: os.kill(os.getpid(), signal_number))


def install_pause(spec: str) -> None:
    phase, count, folder = spec.split(":", 2)

    def pause() -> None:
        (Path(folder) / f"reached-{os.environ.get('RANK', '0')}").write_text(str(os.getpid()))
        while not (Path(folder) / "go").exists():
            time.sleep(0.05)

    install_step_hook(phase, int(count), pause)


def analyze_in_process(monkeypatch, dataset: Path, output_dir: Path, *extra: str):
    """analyze.py's `main` in this process with the tiny model (identity strategy, 2 queries unless
    `--self_influence`), for tests that read what it prints or raises."""
    monkeypatch.setattr(pipeline, "build_model", build_tiny_model)
    chosen = {"--self_influence", "--num_queries", "--query_files", "--query_dir"} & set(extra)
    queries = [] if chosen else ["--num_queries", "2"]
    return analyze.main([
        "--dataset_dir", str(dataset), "--weights", "none", "--num_workers", "0", "--factor_strategy", "identity",
        "--output_dir", str(output_dir), *queries, *extra,
    ])


def main() -> None:
    pipeline.build_model = build_tiny_model
    if os.environ.get("KILL_AT"):
        install_kill(os.environ["KILL_AT"])
    if os.environ.get("PAUSE_AT"):
        install_pause(os.environ["PAUSE_AT"])
    analyze.main(sys.argv[1:])


if __name__ == "__main__":
    main()

