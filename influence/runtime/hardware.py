"""The machine a run uses: which device (one decision, made once and passed down in the settings), what that
device is (logged before every run's work starts, so a GPU machine that silently fell back to the CPU
shows at the top of its log), how many CPUs this process may use (sizes the DataLoader workers), and the
cuDNN switches that make GPU runs repeatable."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Optional

import torch

from influence.runtime.cli import UserError

logger = logging.getLogger("hardware")

DEVICE_CHOICES = ("auto", "cuda", "cpu")
# The pinned torch is a CUDA 13 build: NVIDIA driver 580 or newer, GPUs of compute capability 7.5 or newer.
MIN_DRIVER = 580
MIN_CAPABILITY = (7, 5)
# A non-demo run on more training images than this on the CPU gets a loud warning: one ResNet-50 forward
# and backward takes about a second per image on one core, and a run makes three or more passes.
CPU_WARNING_IMAGES = 5_000
CPU_SECONDS_PER_IMAGE_PASS = 1.0
PASSES_AT_LEAST = 3  # covariance, lambda, scores
MAX_DEFAULT_WORKERS = 8
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
GPU_HELP = "README.md#gpus"


def cuda_unavailable_reason() -> str:
    """Why torch sees no usable GPU, in torch's own words (no driver, a driver too old for this build,
    CUDA_VISIBLE_DEVICES hiding every GPU), or that this torch was built without CUDA."""
    if torch.version.cuda is None:
        return f"this torch {torch.__version__} was built without CUDA"
    if "CUDA_VISIBLE_DEVICES" in os.environ and not os.environ["CUDA_VISIBLE_DEVICES"].strip():
        return "CUDA_VISIBLE_DEVICES is empty"
    try:
        torch.cuda.init()
    except Exception as error:  # pylint: disable=broad-except  # torch's reason, whatever its type
        return str(error).splitlines()[0].strip() or type(error).__name__
    return "torch.cuda.is_available() is False"


def resolve_device(choice: str) -> str:
    """'cuda' or 'cpu' for a DEVICE_CHOICES `choice`: auto takes the GPU when torch sees one."""
    if choice not in DEVICE_CHOICES:
        raise ValueError(f"device must be one of {DEVICE_CHOICES}, not {choice!r}")
    if choice == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if choice == "cuda":
        raise UserError(
            f"--device cuda: torch sees no usable GPU ({cuda_unavailable_reason()}); this torch "
            f"{torch.__version__} needs NVIDIA driver >= {MIN_DRIVER} (see {GPU_HELP})"
        )
    return "cpu"


def describe_device(device: str, chosen: str = "auto") -> str:
    """One line naming what the run computes on, and the torch and CUDA it uses."""
    versions = f"torch {torch.__version__}"
    if device == "cuda":
        index = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return (
            f"device: GPU {index} of {torch.cuda.device_count()}, {props.name}, {props.total_memory / 2**30:.1f} GiB, "
            f"compute capability {props.major}.{props.minor}; {versions}, CUDA {torch.version.cuda}, "
            f"cuDNN {torch.backends.cudnn.version()}"
        )
    why = "--device cpu" if chosen == "cpu" else f"no usable GPU: {cuda_unavailable_reason()}"
    return f"device: CPU, {available_cpus()} cores usable, {torch.get_num_threads()} torch threads ({why}); {versions}"


def check_gpu_capability(device: str) -> None:
    """A GPU older than this torch build supports: one line, not a 'no kernel image' error mid-run."""
    if device != "cuda":
        return
    capability = torch.cuda.get_device_capability()
    if capability < MIN_CAPABILITY:
        raise UserError(
            f"{torch.cuda.get_device_name()} has compute capability {capability[0]}.{capability[1]}; this torch "
            f"{torch.__version__} needs {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer (see {GPU_HELP})"
        )


def warn_if_slow_on_cpu(device: str, num_train: int, demo: bool) -> bool:
    """Warns loudly when a real run is about to take days on the CPU; returns whether it warned."""
    if device != "cpu" or demo or num_train <= CPU_WARNING_IMAGES:
        return False
    hours = num_train * PASSES_AT_LEAST * CPU_SECONDS_PER_IMAGE_PASS / available_cpus() / 3600
    logger.warning(
        "RUNNING ON THE CPU: %d training images will take at least ~%.0f hours here (%s). If this machine has "
        "an NVIDIA GPU, this torch %s needs driver >= %d; see %s for a build for older drivers",
        num_train, hours, cuda_unavailable_reason() if torch.version.cuda else "torch without CUDA",
        torch.__version__, MIN_DRIVER, GPU_HELP,
    )
    return True


def proc_kib(path: str, field: str) -> Optional[int]:
    """A `Field:   N kB` line of a Linux /proc file (/proc/meminfo, /proc/self/status), in KiB; None where
    the file or the field is missing."""
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def cgroup_cpu_limit(path: Path = CGROUP_CPU_MAX) -> Optional[int]:
    """CPUs a cgroup v2 quota allows (containers, SLURM), rounded up; None without a quota."""
    try:
        quota, period = path.read_text().split()[:2]
        if quota == "max":
            return None
        return max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        return None


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask (taskset, SLURM cpusets) capped by a cgroup quota;
    os.cpu_count() counts the whole machine."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        count = os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    return min(count, quota) if quota is not None else count


def default_num_workers(local_world_size: int = 1) -> int:
    """DataLoader workers per process: this node's usable CPUs shared among its processes, at most
    MAX_DEFAULT_WORKERS; 0 (loading in the process itself) when there are fewer CPUs than processes."""
    return min(MAX_DEFAULT_WORKERS, available_cpus() // max(1, local_world_size))


def make_repeatable(device: str) -> None:
    """cuDNN picks its convolution algorithms by timing them (benchmark mode) and some backward ones add in
    a nondeterministic order: both off, so that a resumed GPU run scores its remaining partitions with the
    same kernels as an uninterrupted one. No effect on the CPU."""
    if device == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
