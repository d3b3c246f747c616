"""Process layout for runs under torchrun: one process per GPU with NCCL, or per CPU slot with gloo
(the multi-process tests), joined with a bounded timeout so that a dead or stalled rank makes the others
fail within that time instead of hanging for hours. Rank 0 alone writes files; `on_main` runs a step
there and hands its result, or its one-line error, to every rank."""

from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Any, Callable, List, Optional

import torch
import torch.distributed as dist

from influence.runtime.cli import UserError

# Long enough for what the other ranks legitimately wait for while rank 0 works alone (eigendecomposition:
# about 10 s on an A100 and 100 s on 2 CPU cores; writing a 5 GB score file: about 50 s).
DEFAULT_TIMEOUT_S = 600
NCCL_BLOCKING_WAIT = "TORCH_NCCL_BLOCKING_WAIT"


@dataclasses.dataclass(frozen=True)
class Layout:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1  # processes on this node

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def layout_from_env() -> Layout:
    """The layout torchrun describes in the environment (a single process when it is not set)."""
    if "WORLD_SIZE" not in os.environ:
        return Layout()
    world_size = int(os.environ["WORLD_SIZE"])
    return Layout(
        int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", 0)),
        int(os.environ.get("LOCAL_WORLD_SIZE", world_size)),
    )


def check_process_layout(layout: Layout, device: str) -> None:
    """One process per GPU: more processes on a node than GPUs visible to them is one line on every rank,
    not CUDA's 'invalid device ordinal' traceback from the ranks that find no GPU of their own. Several CPU
    processes on a machine with GPUs are refused too: kronfluence would put each on a GPU regardless."""
    if not layout.distributed:
        return
    if device == "cpu":
        if torch.cuda.is_available():
            raise UserError(
                "--device cpu under torchrun on a machine with GPUs: kronfluence would still compute on them; "
                "hide them with CUDA_VISIBLE_DEVICES= to run CPU processes"
            )
        return
    visible = torch.cuda.device_count()
    if layout.local_world_size > visible:
        hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise UserError(
            f"torchrun started {layout.local_world_size} processes on this node but only {visible} GPU(s) are "
            f"visible{f' (CUDA_VISIBLE_DEVICES={hidden})' if hidden is not None else ''}: use --nproc-per-node {visible}"
        )


def init(layout: Layout, device: str, timeout_s: int = DEFAULT_TIMEOUT_S) -> None:
    """Joins the process group before kronfluence looks for one. NCCL on GPUs, gloo (plus the kronfluence
    shim) on the CPU.

    NCCL's default on a timed-out collective is a watchdog that aborts the process (SIGABRT and a C++ dump)
    before any Python handler runs; with TORCH_NCCL_BLOCKING_WAIT=1 the waiting rank raises in Python
    instead, so `analyze.main` can say in one line that it lost the other processes. Set only where the
    user has not chosen otherwise; the collectives here are few (factors' all-reduce, scores' gather), so
    waiting on the host costs nothing measurable. Unverified on a GPU so far (docs/reliability.md)."""
    if not layout.distributed or dist.is_initialized():
        return
    timeout = datetime.timedelta(seconds=timeout_s)
    if device == "cuda":
        os.environ.setdefault(NCCL_BLOCKING_WAIT, "1")
        torch.cuda.set_device(layout.local_rank)
        dist.init_process_group(backend="nccl", timeout=timeout)
        return
    from influence.runtime import gloo_shim  # pylint: disable=import-outside-toplevel

    dist.init_process_group(backend="gloo", timeout=timeout)
    gloo_shim.install(layout.rank, layout.world_size, layout.local_rank)


def uses_gloo() -> bool:
    return dist.is_initialized() and dist.get_backend() == "gloo"


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def on_main(layout: Layout, step: Callable[[], Any]) -> Any:
    """Runs `step` on rank 0 only; every rank returns its result, or raises its `UserError`."""
    result: Optional[Any] = None
    error: Optional[str] = None
    failure: Optional[BaseException] = None
    if layout.is_main:
        try:
            result = step()
        except BaseException as caught:  # the other ranks must hear of any failure, not wait for a timeout
            if not layout.distributed:
                raise
            failure = caught
            error = str(caught) if isinstance(caught, UserError) else f"rank 0 failed ({type(caught).__name__}: {caught})"
    if layout.distributed:
        payload = [result, error]
        dist.broadcast_object_list(payload, src=0)
        result, error = payload
    if failure is not None:
        raise failure
    if error is not None:
        raise UserError(error)
    return result


def gather_lists(layout: Layout, items: List[Any]) -> List[Any]:
    """Every rank's `items`, concatenated in rank order, on every rank."""
    if not layout.distributed:
        return list(items)
    gathered: List[Any] = [None] * layout.world_size
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
