"""Logging hygiene for segtwin.

``import paddle`` adds a StreamHandler to the ROOT logger and sets its level to INFO; ``reprod_log`` adds stdout and
file handlers to the root logger on every ``report()`` (so a second report is written into the first log file).
segtwin therefore:

* logs through its own logger (:func:`get_logger`) with one handler and ``propagate=False``;
* wraps imports of paddle/reprod_log and calls into reprod_log in :func:`root_logger_guard`, which restores the root
  logger's handlers and level on exit (closing the handlers added meanwhile, so their files are flushed);
* never calls ``logging.basicConfig``.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
import warnings
from types import ModuleType
from typing import Iterator, List, Optional, TextIO, Tuple

__all__ = ["get_logger", "quiet_imports", "root_logger_guard"]

_FORMAT = "%(asctime)s %(name)s %(levelname)s: %(message)s"


class _StderrHandler(logging.StreamHandler):
    """StreamHandler that writes to the CURRENT ``sys.stderr`` (so pytest's capture and redirections work)."""

    _segtwin_handler = True

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:  # StreamHandler.__init__/setStream assign it; always follow sys.stderr
        pass


def get_logger(name: str = "segtwin", level: Optional[int] = None) -> logging.Logger:
    """A logger with exactly one segtwin stderr handler and ``propagate=False``.

    Idempotent: calling it again for the same name never adds a second handler. ``level`` (default INFO when the
    logger has no level yet) is applied when given.
    """
    logger = logging.getLogger(name)
    if not any(getattr(h, "_segtwin_handler", False) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        logger.addHandler(handler)
    logger.propagate = False
    if level is not None:
        logger.setLevel(level)
    elif logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    return logger


@contextlib.contextmanager
def root_logger_guard() -> Iterator[None]:
    """Snapshot the root logger's handlers and level; restore them on exit (even on error).

    Handlers added inside the block are removed and closed; handlers removed inside the block are put back.
    """
    root = logging.getLogger()
    handlers: List[logging.Handler] = list(root.handlers)
    level = root.level
    try:
        yield
    finally:
        added = [h for h in root.handlers if h not in handlers]
        root.handlers[:] = handlers
        root.setLevel(level)
        for h in added:
            try:
                h.flush()
                h.close()  # FileHandlers close their file; StreamHandlers leave their stream open
            except Exception:  # pragma: no cover - a broken third-party handler must not mask the real error
                pass


def quiet_imports(*modules: str) -> Tuple[ModuleType, ...]:
    """Import modules (default: torch and paddle) under :func:`root_logger_guard`; return them in order.

    Paddle's "No ccache found" UserWarning at import is silenced; other warnings pass through.
    """
    names = modules or ("torch", "paddle")
    out = []
    with root_logger_guard(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*No ccache found.*", category=UserWarning)
        for name in names:
            out.append(importlib.import_module(name))
    return tuple(out)
