"""Progress of `optimize`, for whoever listens (the CLI draws a bar per stage).

`optimize` keeps its signature; a caller that wants progress wraps the call in
``with reporting(callback):``. The callback gets (stage, done, total).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Callable, Iterator

__all__ = ["reporting", "stage"]

logger = logging.getLogger("bnfold.optimizer")
_callback: contextvars.ContextVar[Callable[[str, int, int], None] | None] = contextvars.ContextVar(
    "bnfold_optimize_progress", default=None
)


@contextlib.contextmanager
def reporting(callback: Callable[[str, int, int], None]) -> Iterator[None]:
    token = _callback.set(callback)
    try:
        yield
    finally:
        _callback.reset(token)


class stage:  # noqa: N801 - used like a function: `with stage("timing", 4) as step:`
    """A named stage of `total` steps; ``step()`` marks one done."""

    def __init__(self, name: str, total: int = 1) -> None:
        self.name, self.total, self.done = name, max(total, 1), 0

    def __enter__(self):
        logger.info("%s", self.name)
        self._emit()
        return self.step

    def step(self) -> None:
        self.done = min(self.done + 1, self.total)
        self._emit()

    def __exit__(self, *exc) -> None:
        if exc[0] is None and self.done < self.total:
            self.done = self.total
            self._emit()

    def _emit(self) -> None:
        callback = _callback.get()
        if callback is not None:
            callback(self.name, self.done, self.total)
