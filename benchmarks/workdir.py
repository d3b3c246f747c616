"""The benchmarks' scratch folder: a new temporary one by default, or the user's `--workdir`, which the
benchmark fills and deletes at the end (unless `--keep`). Deleting is only safe for a folder the
benchmark made, so a given `--workdir` must be new, empty, or one a benchmark made before (it carries
MARKER); anything else, such as `--workdir influence_results` or `--workdir .`, is refused in one line
before anything is written or removed. The folder is locked (influence/results/locking.py) while the benchmark runs."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional

from influence.results import locking, naming
from influence.runtime.cli import UserError

MARKER = ".made_by_benchmark"  # in every folder a benchmark made: a later run may fill and delete it


def check(workdir: Path) -> None:
    """Raises a `UserError` if `workdir` holds anything a benchmark did not make."""
    if (workdir / MARKER).is_file():
        return
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"--workdir {workdir} is not a folder")
    foreign = sorted(p.name for p in workdir.iterdir() if p.name != naming.LOCK_FILE) if workdir.is_dir() else []
    if foreign:
        raise UserError(
            f"--workdir {workdir} is not empty and was not made by a benchmark (it holds {', '.join(foreign[:3])}"
            f"{' ...' if len(foreign) > 3 else ''}); the benchmark deletes its folder at the end: give a new or empty folder"
        )


def claim(workdir: Path) -> None:
    """Makes `workdir` the benchmark's own (`check`, then MARKER written). Called with the folder's lock
    held, so that two benchmarks cannot claim it at once."""
    check(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text("made by a benchmark of this suite; deleted at its end unless --keep\n")


def scratch_folder(given: Optional[Path], prefix: str) -> Path:
    """The user's `--workdir`, else a new temporary folder (which `claim` accepts: it is empty)."""
    return given if given is not None else Path(tempfile.mkdtemp(prefix=prefix))


@contextlib.contextmanager
def own_workdir(workdir: Path, keep: bool) -> Iterator[Path]:
    """`workdir` locked and claimed for the benchmark; removed on the way out unless `keep` (a folder
    refused by `claim` is left as it was)."""
    check(workdir)  # before the lock, which would leave its file in a refused folder
    with locking.hold(workdir):
        claim(workdir)  # again, now that no other benchmark can be claiming it
        try:
            yield workdir
        finally:
            if not keep:
                shutil.rmtree(workdir, ignore_errors=True)
