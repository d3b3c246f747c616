"""One run at a time per results folder: every script that writes into an analysis folder
(OUTPUT_DIR/ANALYSIS_NAME) holds an exclusive OS lock on a file in it for as long as it runs, so that a
second run into the same folder (a resubmitted job, a second GPU's command) stops at once with one line
naming the first, instead of deleting or mixing its results. The lock is the kernel's (POSIX `lockf`),
not the file's presence: it dies with its holder, so a killed run never blocks the next one. The file
only tells who holds it (pid, host, start time, command line). Scripts that only read results take no
lock."""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import ContextManager, Dict, Iterator, List, Tuple

from kronfluence.utils.constants import FACTOR_SAVE_PREFIX, SCORE_SAVE_PREFIX

from influence.results import naming
from influence.runtime.cli import UserError

# How long a refused run waits for the holder's details, which it writes just after taking the lock.
HOLDER_WAIT_S = 1.0
BUSY_ADVICE = "wait for it to finish, or choose another --output_dir/--analysis_name"
# Locks this process holds, by lock file: POSIX locks belong to the process and closing any descriptor of
# the file releases them, so a nested `hold` of the same folder (a benchmark around analyze.main) reuses
# the open descriptor instead of opening the file again.
_held: Dict[Path, List[int]] = {}
# What `lockf` says on a file system without POSIX locks (NFS without lockd, some Lustre mounts, FUSE).
LOCKS_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


def holder_line() -> str:
    """This process as the lock file records it."""
    return json.dumps({
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    })


def describe_holder(lock_path: Path) -> str:
    """`pid 123 on host, started ..., command: ...` from the lock file, or what is known."""
    deadline = time.monotonic() + HOLDER_WAIT_S
    while True:
        try:
            holder = json.loads(lock_path.read_text())
            return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}: {holder['command']}"
        except (OSError, ValueError, KeyError, TypeError):
            if time.monotonic() > deadline:
                return "a process that has not written its details"
            time.sleep(0.05)


def _same_file(descriptor: int, path: Path) -> bool:
    """Whether `path` still names the file open as `descriptor`."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(descriptor)
    return (found.st_dev, found.st_ino) == (opened.st_dev, opened.st_ino)


def _remove_unused(lock_path: Path, created: List[Path]) -> None:
    """The lock file and the folders made for it, when nothing else was written beside it."""
    with contextlib.suppress(OSError):  # the folder may have been removed (a benchmark's own workdir)
        if [path.name for path in lock_path.parent.iterdir()] == [naming.LOCK_FILE]:
            lock_path.unlink()
            for path in created:
                path.rmdir()


def _open_and_lock(folder: Path, lock_path: Path, created: List[Path], busy_advice: str) -> Tuple[int, bool]:
    """A descriptor of `lock_path` holding its lock, and whether this call created the file (in `folder`,
    made with the missing `created` folders). A holder that finishes unlinks the file before it unlocks
    it: a run that opened it just before then locks a file no longer there, so the lock is taken again on
    whatever the path names once it is held."""
    while True:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            try:
                descriptor, new_lock = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
            except FileExistsError:
                descriptor, new_lock = os.open(lock_path, os.O_RDWR), False
        except OSError as error:
            raise UserError(f"output directory {folder} cannot be written ({error.strerror})") from None
        try:
            fcntl.lockf(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(descriptor)
            if error.errno in LOCKS_UNSUPPORTED:
                if new_lock:
                    _remove_unused(lock_path, created)
                raise UserError(
                    f"{folder} cannot be locked ({error.strerror}: its file system, often NFS, Lustre or a FUSE "
                    "mount, lacks POSIX locks); choose an --output_dir on a local disk"
                ) from None
            if error.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            raise UserError(
                f"{folder} is in use by another run ({describe_holder(lock_path)}); {busy_advice}"
            ) from None
        if _same_file(descriptor, lock_path):
            return descriptor, new_lock
        os.close(descriptor)


@contextlib.contextmanager
def hold(folder: Path, busy_advice: str = BUSY_ADVICE, leave_no_file: bool = False) -> Iterator[None]:
    """Holds `folder`'s lock (creating the folder) until the block ends; a `UserError` naming the holder
    (and ending with `busy_advice`) if another process has it, or naming the folder if its file system
    cannot lock. With `leave_no_file`, a lock file this hold created is removed at the end whatever else
    was written (a folder that is not the suite's own, such as the dataset's)."""
    folder = Path(folder)
    lock_path = folder / naming.LOCK_FILE
    created = [parent for parent in [folder, *folder.parents] if not parent.exists()]  # innermost first
    held = _held.get(lock_path.resolve())
    if held is not None:
        held[1] += 1
        try:
            yield
        finally:
            held[1] -= 1
        return
    descriptor, new_lock = _open_and_lock(folder, lock_path, created, busy_advice)
    key = lock_path.resolve()
    _held[key] = [descriptor, 1]
    try:
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, (holder_line() + "\n").encode(), 0)
        yield
    finally:
        del _held[key]
        with contextlib.suppress(OSError):  # the folder may have been removed (a benchmark's own workdir)
            os.ftruncate(descriptor, 0)
        if new_lock and leave_no_file:
            with contextlib.suppress(OSError):
                lock_path.unlink()  # before unlocking: a run that opened it meanwhile relocks what the path names
        elif new_lock:
            # A run that stopped before writing anything leaves nothing: not even the folders it made.
            _remove_unused(lock_path, created)
        os.close(descriptor)


def writing_into(directory: Path) -> ContextManager[None]:
    """The lock a script takes to write into `directory`: its analysis folder's when it is one of
    analyze.py's factors_/scores_ folders (top_influences.py's tables beside the scores), else its own;
    none for a folder that does not exist yet, where no run is writing (and a mistyped path is not made)."""
    directory = Path(directory)
    if directory.name.startswith((FACTOR_SAVE_PREFIX, SCORE_SAVE_PREFIX)):
        directory = directory.parent
    return hold(directory) if directory.is_dir() else contextlib.nullcontext()


def clear(folder: Path) -> None:
    """Removes everything in `folder` but its lock file, which a holder of the lock must keep: another run
    would lock a new file of the same name."""
    for path in Path(folder).iterdir():
        if path.name == naming.LOCK_FILE:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
