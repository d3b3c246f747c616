"""Lets kronfluence 1.0.1 run under torchrun on the CPU (gloo), for the multi-process tests.

kronfluence's distributed path is written for CUDA only. Under a CPU process group it (1) never joins
the group, so every rank believes it is alone; (2) calls `torch.cuda.synchronize()` whenever it is
distributed; (3) skips the reduction of covariance and lambda factors, which also moves them with
`.cuda()`; (4) skips the gather of preconditioned query gradients, so rank 0 scores only its own share
of the queries; and (5) gathers them with `all_gather_into_tensor` into a stacked (world_size, ...)
tensor, which gloo rejects. `install` lifts exactly these, and nothing else, for the pinned version;
GPU runs (NCCL) never call it and use kronfluence unmodified.
"""

from __future__ import annotations

import time
import warnings
from importlib.metadata import version

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

SUPPORTED_KRONFLUENCE = "1.0.1"


def _check_version() -> None:
    found = version("kronfluence")
    if found != SUPPORTED_KRONFLUENCE:
        raise RuntimeError(
            f"influence.runtime.gloo_shim patches kronfluence {SUPPORTED_KRONFLUENCE}, found {found}: re-check each "
            "patched function against the new release before using CPU process groups"
        )


def _get_time(state) -> float:
    """kronfluence.utils.logger.get_time without the CUDA synchronisation."""
    if not state.use_distributed:
        return time.time()
    now = torch.tensor(time.time(), dtype=torch.float64)
    dist.all_reduce(now, op=dist.ReduceOp.MAX)
    return now.item()


def _reduce_to_main(tracker, factor_names) -> None:
    if dist.is_initialized() and tracker.exist():
        for name in factor_names:
            dist.reduce(tensor=tracker.module.storage[name], op=dist.ReduceOp.SUM, dst=0)


def _gather_stacked(tensor: torch.Tensor, num_processes: int) -> torch.Tensor:
    """(num_processes * batch, ...) with the processes' rows interleaved, as kronfluence's own gather."""
    parts = [torch.empty_like(tensor) for _ in range(num_processes)]
    dist.all_gather(parts, tensor.contiguous())
    stacked = torch.stack(parts, dim=0)
    return stacked.transpose(0, 1).reshape(num_processes * tensor.shape[0], *tensor.shape[1:])


def _precondition_synchronize(tracker, num_processes: int = 1) -> None:
    from kronfluence.utils.constants import PRECONDITIONED_GRADIENT_NAME  # pylint: disable=import-outside-toplevel

    gradient = tracker.module.storage[PRECONDITIONED_GRADIENT_NAME]
    if not dist.is_initialized() or gradient is None:
        return
    if isinstance(gradient, list):  # low rank: the two factors of each query's gradient
        tracker.module.storage[PRECONDITIONED_GRADIENT_NAME] = [_gather_stacked(g, num_processes) for g in gradient]
    else:
        tracker.module.storage[PRECONDITIONED_GRADIENT_NAME] = _gather_stacked(gradient, num_processes)


def install(rank: int, world_size: int, local_rank: int) -> None:
    """Patches kronfluence for the already-initialised CPU process group of this process."""
    _check_version()
    # pylint: disable=import-outside-toplevel
    from kronfluence.computer import factor_computer, score_computer
    from kronfluence.module.tracker import factor, precondition
    from kronfluence.utils import logger
    from kronfluence.utils.constants import COVARIANCE_FACTOR_NAMES, LAMBDA_FACTOR_NAMES
    from kronfluence.utils.state import State

    State._shared_state.clear()  # pylint: disable=protected-access
    State._shared_state.update(  # pylint: disable=protected-access
        cpu=True,
        num_processes=world_size,
        process_index=rank,
        local_process_index=local_rank,
        n_gpus=0,
        device=torch.device("cpu"),
    )
    for module in (logger, factor_computer, score_computer):
        module.get_time = _get_time
    factor.CovarianceTracker.synchronize = lambda self, num_processes: _reduce_to_main(self, COVARIANCE_FACTOR_NAMES)
    factor.LambdaTracker.synchronize = lambda self, num_processes: _reduce_to_main(self, LAMBDA_FACTOR_NAMES)
    precondition.PreconditionTracker.synchronize = _precondition_synchronize


def wrap_model(model: nn.Module) -> nn.Module:
    """DDP for a CPU module: kronfluence would pass `device_ids=[local_rank]`, which DDP refuses on the
    CPU. Buffers are not broadcast: every rank loads the same weights, and ranks run different numbers of
    forward passes over uneven shards."""
    with warnings.catch_warnings():
        # torch 2.14 deprecates the flag in favour of one that still syncs buffers at init; same effect here.
        warnings.simplefilter("ignore", FutureWarning)
        return DistributedDataParallel(model, broadcast_buffers=False)
