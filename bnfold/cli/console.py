"""What every command shares: exit codes, the one-line user error, progress on stderr, and
checks of the command-line arguments made before any work."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

__all__ = [
    "ARCHITECTURE_PREFIXES",
    "EXIT_BAD_INPUT",
    "EXIT_INTERNAL",
    "EXIT_OK",
    "EXIT_VERIFY_FAILED",
    "BadInput",
    "Progress",
    "check_writable",
    "parse_shapes",
]

EXIT_OK, EXIT_VERIFY_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3
ARCHITECTURE_PREFIXES = ("zoo:", "torchvision:", "timm:")


class BadInput(Exception):
    """A user mistake: reported in one line, exit code 2."""


class Progress:
    """Stage lines on stderr with the time since start; a bar for many verification cases."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def stage(self, message: str) -> None:
        print(f"[{time.monotonic() - self.start:6.1f}s] {message}", file=sys.stderr, flush=True)

    def cases(self, what: str):
        bar = None

        def update(done: int, total: int) -> None:
            nonlocal bar
            if bar is None:
                from tqdm import tqdm

                bar = tqdm(total=total, desc=what, unit="input set", file=sys.stderr, leave=False)
            bar.update(done - bar.n)
            if done == total:
                bar.close()

        return update


def parse_shapes(items: list[str]) -> dict[str, list[int]]:
    shapes = {}
    for item in items:
        name, sep, dims = item.partition("=")
        try:
            shape = [int(d) for d in dims.split(",")]
        except ValueError:
            shape = []
        if not sep or not name or not shape or any(d <= 0 for d in shape):
            raise BadInput(f"bad --input-shape {item!r}; expected NAME=D1,D2,... (positive ints)")
        shapes[name] = shape
    return shapes


def check_writable(flag: str, path: str | None) -> None:
    """Refuse an output path that cannot be written before the work, not after it."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise BadInput(f"{flag} {path}: is a directory; give a file name")
    parent = target.parent
    if not parent.is_dir():
        raise BadInput(f"{flag} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise BadInput(f"{flag} {path}: directory {parent} is not writable")
