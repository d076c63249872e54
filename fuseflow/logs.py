"""How fuseflow talks to the user's logging: the reference's lines shown, TF's noise not.

tensorflow-neuron shows its operator counts and `Successfully converted ...`
at INFO whatever the user's log level, by making INFO visible for the
duration of those lines only. `shown_info()` does the same for the "fuseflow"
logger without taking over: it lowers the level only where the user left it
unset, and adds a stderr handler only while no handler would print at all.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

log = logging.getLogger("fuseflow")


def _has_real_handler(logger: logging.Logger) -> bool:
    """Whether a record of `logger` reaches a handler other than a NullHandler."""
    current: logging.Logger | None = logger
    while current is not None:
        if any(not isinstance(h, logging.NullHandler) for h in current.handlers):
            return True
        current = current.parent if current.propagate else None
    return False


@contextlib.contextmanager
def shown(level: int = logging.INFO) -> Iterator[None]:
    """Lines of the "fuseflow" logger at `level` and above are printed inside this block
    (Python's default, a logger with only a NullHandler, prints nothing at all)."""
    saved_level = log.level
    handler = None
    if log.level == logging.NOTSET and log.getEffectiveLevel() > level:
        log.setLevel(level)
    if not _has_real_handler(log):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s:%(name)s:%(message)s"))
        log.addHandler(handler)
    try:
        yield
    finally:
        if handler is not None:
            log.removeHandler(handler)
        log.setLevel(saved_level)


def shown_info():
    """The reference's way for its count lines: INFO visible for this block only."""
    return shown(logging.INFO)


@contextlib.contextmanager
def tf_quiet() -> Iterator[None]:
    """No TF deprecation warnings for the TF1 APIs fuseflow calls internally
    (freezing, Builder, import_graph_def): they are fuseflow's business, not the user's."""
    from tensorflow.python.util import deprecation

    with deprecation.silence():
        yield
