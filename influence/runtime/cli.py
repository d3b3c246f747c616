"""Conventions shared by every command-line script of the suite: a user mistake is reported as one
line on stderr with exit code 2 (argparse's own convention), never as a traceback, and library noise
that would bury the progress bars is silenced."""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
import warnings
from typing import Iterator, Optional

USER_ERROR_EXIT_CODE = 2
INTERRUPTED_EXIT_CODE = 130


class UserError(Exception):
    """A problem with the user's input (paths, flags, data) that the user can fix; reported in one line."""

    @property
    def line(self) -> str:
        """The message as reported; subclasses raised in DataLoader workers trim what PyTorch adds."""
        return str(self)


@contextlib.contextmanager
def user_errors(prog: str) -> Iterator[None]:
    """Turns a `UserError` into `prog: error: message` and exit code 2, and Ctrl-C into a short note."""
    try:
        yield
    except UserError as error:
        print(f"{prog}: error: {error.line}", file=sys.stderr)
        raise SystemExit(USER_ERROR_EXIT_CODE) from None
    except KeyboardInterrupt:
        print(
            f"{prog}: interrupted; finished results are kept, run the same command again to resume.",
            file=sys.stderr,
        )
        raise SystemExit(INTERRUPTED_EXIT_CODE) from None


def setup_logging(verbose: bool = False) -> None:
    """Plain `LEVEL message` logging for the suite, and no deprecation noise from kronfluence 1.0.1.

    kronfluence 1.0.1 constructs `torch.cuda.amp.GradScaler` in every phase, which newer torch releases
    deprecate with a FutureWarning each time; it says nothing a user can act on.
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(message)s", force=True)
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.cuda\.amp\..*")


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or a positive integer, not {text}")
    return value


HEURISTIC_DAMPING = "heuristic"


def damping_factor(text: str) -> Optional[float]:
    """--damping_factor: a finite number >= 0, or 'heuristic' (None: kronfluence's 0.1 x mean eigenvalue)."""
    if text == HEURISTIC_DAMPING:
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 or '{HEURISTIC_DAMPING}', not {text}") from None
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 or '{HEURISTIC_DAMPING}', not {text}")
    return value
