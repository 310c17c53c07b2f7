"""Progress of long work, shown one way everywhere: a tqdm bar on a terminal, plain log lines
otherwise (at INFO, so ``-v`` shows them), nothing when quiet.

Every loop that can take more than a second or two (images, perturbed batches, optimisation
steps, evaluation, first-use model preparation) reports through ``progress`` or ``note``; no
other module creates bars. The command line sets ``set_quiet`` once for ``--quiet``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any, Self, TypeVar

log = logging.getLogger("explainrt.progress")

LOG_EVERY_S = 5.0
"""Seconds between two log lines of the same piece of work when the output is not a terminal."""

_settings = {"quiet": False}

T = TypeVar("T")


def set_quiet(quiet: bool) -> None:
    """Show no progress at all (bars, log lines and notes), e.g. for ``--quiet``."""
    _settings["quiet"] = bool(quiet)


def is_quiet() -> bool:
    return _settings["quiet"]


def on_terminal() -> bool:
    """Whether progress goes to a terminal (stderr is a TTY) and so is drawn as a bar."""
    stream = sys.stderr
    return bool(getattr(stream, "isatty", None)) and stream.isatty()


def _unsized_screen() -> dict[str, int]:
    """80 x 24 for a terminal that reports no size (a pseudo-terminal never sized, as under ``script`` or some CI
    runners: tqdm draws nothing there), else nothing: tqdm follows the terminal's size."""
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):
        return {}
    return {"ncols": size.columns or 80, "nrows": size.lines or 24} if 0 in (size.columns, size.lines) else {}


class Progress:
    """One piece of work of ``total`` steps: ``update(n)`` as steps finish; a context manager.

    On a terminal a tqdm bar; elsewhere a log line at the start, at most every ``LOG_EVERY_S``
    seconds, and at the end; nothing when disabled or quiet.
    """

    def __init__(self, total: int | None, desc: str, unit: str = "steps", enabled: bool = True, leave: bool = True) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.done = 0
        self._bar: Any = None
        self._logging = False
        self._start = self._last = time.monotonic()
        if not enabled or is_quiet():
            return
        if on_terminal():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, leave=leave, file=sys.stderr,
                             **_unsized_screen())
        elif log.isEnabledFor(logging.INFO):
            self._logging = True
            log.info("%s: started (%s)", desc, f"{total} {unit}" if total is not None else unit)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._logging and time.monotonic() - self._last >= LOG_EVERY_S:
            self._last = time.monotonic()
            log.info("%s: %s", self.desc, self._count())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._logging:
            self._logging = False
            log.info("%s: done, %s in %.1f s", self.desc, self._count(), time.monotonic() - self._start)

    def _count(self) -> str:
        return f"{self.done}/{self.total} {self.unit}" if self.total is not None else f"{self.done} {self.unit}"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.close()


def progress(total: int | None, desc: str, unit: str = "steps", enabled: bool = True, leave: bool = True) -> Progress:
    """A ``Progress`` of ``total`` steps named ``desc`` (``enabled=False``: shows nothing)."""
    return Progress(total, desc, unit, enabled, leave)


def track(items: Iterable[T], desc: str, total: int | None = None, unit: str = "steps", enabled: bool = True,
          leave: bool = True) -> Iterator[T]:
    """``items``, one progress step each (``total`` defaults to ``len(items)`` where it has one)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with progress(total, desc, unit, enabled, leave) as bar:
        for item in items:
            yield item
            bar.update()


def note(message: str) -> None:
    """A one-off line about slow work that has no steps (first-use model preparation): on stderr on a
    terminal, else a log line; nothing when quiet."""
    if is_quiet():
        return
    if on_terminal():
        print(f"explainrt: {message}", file=sys.stderr, flush=True)
    else:
        log.info("%s", message)
