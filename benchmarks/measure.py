"""The measuring instruments of benchmarks/benchmark.py: a generated folder of ImageNet-sized JPEGs,
peak host and GPU memory, FLOPs counted by PyTorch's FLOP counter, wall-clock timing that waits for queued
GPU work, and the device's peak FLOP/s (NVIDIA's data sheets where the GPU is known, else a measured
matrix multiplication)."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from influence.runtime import hardware

# Dense peak FLOP/s from NVIDIA's data sheets (SXM parts unless named), keyed by a part of the device name;
# the first key found in the name wins, so the PCIe and NVL parts (lower clocks and power) come first.
KNOWN_GPU_PEAKS = (
    ("H100 PCIe", {"float32": 51e12, "tf32": 378e12, "bfloat16": 756e12}),
    ("H100 NVL", {"float32": 60e12, "tf32": 417.5e12, "bfloat16": 835.5e12}),
    ("H200 NVL", {"float32": 60e12, "tf32": 417.5e12, "bfloat16": 835.5e12}),
    ("H100", {"float32": 67e12, "tf32": 494.7e12, "bfloat16": 989.4e12}),
    ("H200", {"float32": 67e12, "tf32": 494.7e12, "bfloat16": 989.4e12}),
    ("A100", {"float32": 19.5e12, "tf32": 156e12, "bfloat16": 312e12}),
)
# ImageNet's commonest image sizes (width, height); the generated images cycle through them.
IMAGENET_SIZES = ((500, 375), (500, 333), (375, 500), (500, 400), (640, 480), (333, 500), (500, 500))
JPEG_QUALITY = 90
MATMUL_START_SIZE = 256
MATMUL_SIZE = 4096
MATMUL_PRODUCT_SECONDS = 0.1  # one product this long is timed precisely enough: the size stops doubling there
MATMUL_MIN_SECONDS = 0.5  # the timed products together
MATMUL_REPEATS = 5
MIB = 1024 * 1024
IMAGE_SEED = 0  # the generated images are the same on every run


def _synthetic_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth random colour fields with fine noise: JPEGs of about the size and decoding cost of photos."""
    coarse = Image.fromarray(rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-20, 21, size=(height, width, 3), dtype=np.int16)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def make_synthetic_imagenet(root: Path, num_classes: int, train_per_class: int, val_per_class: int) -> Path:
    """root/{train,val}/nXXXXXXXX/*.JPEG with ImageNet's layout, image sizes and file names."""
    rng = np.random.default_rng(IMAGE_SEED)
    count = 0
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for class_index in range(num_classes):
            folder = root / split / f"n{class_index:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                width, height = IMAGENET_SIZES[count % len(IMAGENET_SIZES)]
                _synthetic_image(rng, width, height).save(folder / f"n{class_index:08d}_{i}.JPEG", quality=JPEG_QUALITY)
                count += 1
    return root


def reset_peak_memory(device: torch.device) -> bool:
    """Starts a new peak: the kernel's VmHWM is reset by writing 5 to /proc/self/clear_refs (Linux); returns
    False where that is not allowed, and peaks are then the process's since it started."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_host_mb() -> float:
    """Peak resident memory of this process (VmHWM), in MiB; ru_maxrss where /proc is missing."""
    peak = hardware.proc_kib("/proc/self/status", "VmHWM")
    if peak is not None:
        return peak / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_peaks(device: torch.device) -> Tuple[float, Optional[float], Optional[float]]:
    """Peak host memory, and the GPU's peaks of memory allocated to tensors and reserved by PyTorch's caching
    allocator (what the GPU must really have: allocated plus the allocator's fragmentation), in MiB."""
    if device.type != "cuda":
        return peak_host_mb(), None, None
    return peak_host_mb(), torch.cuda.max_memory_allocated(device) / MIB, torch.cuda.max_memory_reserved(device) / MIB


def _inplace_addmm_flops(self_shape: Any, a_shape: Any, b_shape: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def count_flops(function: Callable[[], Any]) -> int:
    """Matmul and convolution FLOPs of `function` (PyTorch's FLOP counter). The counter knows `addmm` but
    not the in-place `addmm_` that kronfluence accumulates its covariance matrices with, so that is added.
    Decompositions (eigh) are not counted."""
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: _inplace_addmm_flops}) as counter:
        function()
    return counter.get_total_flops()


def measured_matmul_peak(device: torch.device, dtype: torch.dtype) -> Tuple[float, int]:
    """(FLOP/s, size) of a large square torch.mm: the device's practical ceiling (no data sheet covers every
    CPU). The size doubles from MATMUL_START_SIZE up to MATMUL_SIZE while one product takes under
    MATMUL_PRODUCT_SECONDS (CPUs without bfloat16 instructions take seconds for a 1024 x 1024 bfloat16
    product; a CPU core does a 2048 x 2048 float32 one in about 0.2 s, where 4096 would take 1.7 s for the
    same rate), then enough products of that size are timed to fill MATMUL_MIN_SECONDS. Every size's first
    product is a warm-up (a GPU library's start-up must not stop the doubling early) and is not timed."""
    size = MATMUL_START_SIZE
    while True:
        a = torch.randn(size, size, device=device).to(dtype)
        time_call(lambda: a @ a, device)
        seconds = time_call(lambda: a @ a, device)
        if seconds >= MATMUL_PRODUCT_SECONDS or size >= MATMUL_SIZE:
            repeats = max(1, min(MATMUL_REPEATS, int(MATMUL_MIN_SECONDS / seconds)))
            return repeats * 2 * size**3 / time_call(lambda: [a @ a for _ in range(repeats)], device), size
        size *= 2


def time_call(function: Callable[[], Any], device: torch.device) -> float:
    """Seconds `function` takes on `device`, kernels included: work queued before it is finished first,
    so that it is not billed to `function`."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def device_peaks(device: torch.device, tf32: bool, precisions: Sequence[str] = ("float32", "bfloat16")) -> Dict[str, Any]:
    """Peak FLOP/s per phase precision, and where each number comes from. With TF32 matmuls (`tf32`) the
    TF32 peak is the float32 phases' ceiling, though float32 convolutions cannot reach it. A measured
    peak is measured for `precisions` only (bfloat16 products take seconds on CPUs without its instructions)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in KNOWN_GPU_PEAKS:
            if key in name:
                float32 = "tf32" if tf32 else "float32"
                return {
                    "name": name,
                    "float32": peaks[float32],
                    "bfloat16": peaks["bfloat16"],
                    "source": f"NVIDIA data sheet, {key} dense ({float32} for float32 phases)",
                }
        why = ", no data sheet entry for this GPU"
    else:
        name = f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
        why = ""
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    measured = {precision: measured_matmul_peak(device, dtypes[precision]) for precision in precisions}
    sizes = ", ".join(f"{precision} {size}x{size}" for precision, (_, size) in measured.items())
    return {"name": name, **{precision: flops for precision, (flops, _) in measured.items()}, "source": f"measured matmul peak (torch.mm, {sizes}{why})"}
