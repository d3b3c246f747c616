"""Process layout for runs under torchrun: one process per GPU with NCCL, or per CPU slot with gloo
(the multi-process tests), joined with a bounded timeout so that a dead or stalled rank makes the others
fail within that time instead of hanging for hours. Rank 0 alone writes files; `on_main` runs a step
there and hands its result, or its one-line error, to every rank. Across several machines
(`torchrun --nnodes N`), `check_shared` makes sure before any work that every rank sees the output folder
rank 0 writes (a shared file system) and the same inputs; `Progress` lets ranks that share uneven work
wait for each other for as long as someone is still making progress."""

from __future__ import annotations

import dataclasses
import datetime
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

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

    def share(self, count: int) -> range:
        """This rank's contiguous part of `count` items (the parts differ in size by at most one)."""
        return range(self.rank * count // self.world_size, (self.rank + 1) * count // self.world_size)


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


SHARED_MARKER_PREFIX = ".shared_check_"


def _missing_here(paths: Dict[str, Optional[Path]]) -> List[str]:
    return [f"{flag} {path}" for flag, path in paths.items() if path is not None and not Path(path).exists()]


def check_shared(layout: Layout, output_folder: Path, inputs: Dict[str, Optional[Path]]) -> None:
    """What several processes (and machines) need, checked before work, one line on every rank when it
    is missing: rank 0 writes a marker file into `output_folder` and every rank must see it there (the
    folder is on a file system shared by every node, so rank 0's files and lock are theirs too), and every
    rank must find each of `inputs` (flag: path, the same path on every node)."""
    if not layout.distributed:
        return
    output_folder = Path(output_folder)

    def write_marker() -> str:
        output_folder.mkdir(parents=True, exist_ok=True)
        marker = output_folder / f"{SHARED_MARKER_PREFIX}{uuid.uuid4().hex}"
        marker.write_text(socket.gethostname())
        return marker.name

    marker = on_main(layout, write_marker)
    here = f"rank {layout.rank} on {socket.gethostname()}"
    problems = [] if (output_folder / marker).is_file() else [
        f"{output_folder} is not shared by every node: {here} cannot see the file rank 0 wrote there; put "
        "--output_dir on a file system every node mounts at the same path (NFS, Lustre, ...)"
    ]
    problems += [f"{here} cannot find {missing}: every node needs the same inputs at the same path" for missing in _missing_here(inputs)]
    problems = gather_lists(layout, problems)
    if layout.is_main:
        (output_folder / marker).unlink(missing_ok=True)
    if problems:
        raise UserError(problems[0] + (f" (and {len(problems) - 1} more such problem(s))" if len(problems) > 1 else ""))


def check_same(layout: Layout, what: str, value: Any) -> None:
    """One line on every rank when the ranks disagree on `value` (e.g. how many training images each one
    finds under the same --dataset_dir on its node)."""
    values = gather_lists(layout, [(value, socket.gethostname())])
    differing = [f"rank {rank} on {host}: {found}" for rank, (found, host) in enumerate(values) if found != values[0][0]]
    if differing:
        raise UserError(f"the processes disagree on {what} (rank 0: {values[0][0]}; {differing[0]}): every node needs the same inputs at the same path")


def gather_rows(layout: Layout, rows: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Every rank's `rows` (counts[rank] x ...), concatenated in rank order, on every rank."""
    if not layout.distributed:
        return rows
    padded = rows.new_zeros((max(counts), *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in range(layout.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:count] for part, count in zip(parts, counts)])


def collect_on_main(layout: Layout, block: torch.Tensor, shapes: Sequence[Sequence[int]], place: Callable[[int, torch.Tensor], None]) -> None:
    """Rank 0 receives every other rank's `block` (of shape shapes[rank], on this process's device) one at
    a time and hands it to `place(rank, block)` (its own too); the others send theirs."""
    if layout.is_main:
        place(0, block)
        for rank in range(1, layout.world_size):
            received = block.new_empty(tuple(shapes[rank]))
            if received.numel():
                dist.recv(received, src=rank)
            place(rank, received)
    elif block.numel():
        dist.send(block.contiguous(), dst=0)


PROGRESS_POLL_S = 0.5


class Progress:
    """Lets ranks that share uneven work (the gradient index's shards) wait for each other without a
    collective's fixed timeout: each rank posts a count of work done to the process group's store as it
    goes, and `wait_for_all` returns once every rank has finished, or raises once no unfinished rank has
    posted anything for `timeout_s` (a stalled or lost rank). A single process does nothing."""

    DONE = "done"

    def __init__(self, layout: Layout, name: str) -> None:
        self.layout, self.name = layout, name
        self.store = dist.distributed_c10d._get_default_store() if layout.distributed else None  # pylint: disable=protected-access
        self.last = 0.0
        self.post(0, force=True)

    def _key(self, rank: int) -> str:
        return f"{self.name}/{rank}"

    def post(self, count: int, force: bool = False) -> None:
        now = time.monotonic()
        if self.store is not None and (force or now - self.last >= PROGRESS_POLL_S):
            self.store.set(self._key(self.layout.rank), str(count))
            self.last = now

    def wait_for_all(self, timeout_s: float) -> None:
        if self.store is None:
            return
        self.store.set(self._key(self.layout.rank), self.DONE)
        keys = [self._key(rank) for rank in range(self.layout.world_size)]
        seen: List[Optional[bytes]] = [None] * len(keys)
        changed = time.monotonic()
        while True:
            present = [self.store.check([key]) for key in keys]
            values = [self.store.get(key) if there else None for key, there in zip(keys, present)]
            if all(value == self.DONE.encode() for value in values):
                return
            if values != seen:
                seen, changed = values, time.monotonic()
            elif time.monotonic() - changed > timeout_s:
                stalled = next(rank for rank, value in enumerate(values) if value != self.DONE.encode())
                raise UserError(
                    f"rank {stalled} made no progress for {timeout_s:.0f} s (--dist_timeout); finished shards are kept, "
                    "run the same command again to resume"
                )
            time.sleep(PROGRESS_POLL_S)


COLLECTIVE_FAILURE_MARKERS = ("Timed out", "Connection closed", "Connection reset", "gloo", "NCCL")


def is_collective_failure(layout: Layout, error: BaseException) -> bool:
    """Whether `error` says another rank died or stalled (gloo: a plain RuntimeError, NCCL: DistError)."""
    return layout.distributed and (isinstance(error, dist.DistError) or any(marker in str(error) for marker in COLLECTIVE_FAILURE_MARKERS))


def lost_processes_line(prog: str, layout: Layout, error: BaseException) -> str:
    return (
        f"{prog}: error: rank {layout.rank} lost the other processes ({type(error).__name__}: "
        f"{str(error).splitlines()[0][:200]}); finished results are kept, rerun the same command to resume"
    )
