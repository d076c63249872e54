"""Progress of compiling many segments: a bar on a terminal, plain log lines otherwise.

compile.py reports each finished segment through `update()`; its own log
lines are the plain output. The bar is drawn only where `enable()` was
called with a terminal (the command line does so), because only then do we
own the log handler and can keep log lines from running into the bar.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from typing import TextIO

_MIN_SEGMENTS = 2  # one segment needs no bar


class _Bar:
    stream: TextIO | None = None  # None: no bar
    line = ""  # what is drawn now
    start = 0.0

    def draw(self, line: str) -> None:
        self.stream.write("\r\x1b[K" + line)
        self.stream.flush()
        self.line = line

    def clear(self) -> None:
        if self.stream is not None and self.line:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


_bar = _Bar()


def enable(stream: TextIO = sys.stderr) -> logging.Handler:
    """A log handler for `stream`; on a terminal it also turns the bar on."""
    _bar.stream = stream if stream.isatty() else None
    return _BarAwareHandler(stream)


def disable() -> None:
    _bar.clear()
    _bar.stream, _bar.line = None, ""


def update(done: int, total: int, name: str) -> None:
    """done of total segments finished, the latest being `name`."""
    if _bar.stream is None or total < _MIN_SEGMENTS:
        return
    if done == 0:
        _bar.start = time.monotonic()
    columns = shutil.get_terminal_size().columns
    width = max(10, min(40, columns - 50))
    filled = width * done // total
    elapsed = time.monotonic() - _bar.start
    line = (f"compiling [{'#' * filled}{'.' * (width - filled)}] {done}/{total} "
            f"{elapsed:.0f} s {name}")
    _bar.draw(line[:columns - 1])
    if done == total:
        _bar.stream.write("\n")
        _bar.stream.flush()
        _bar.line = ""


class _BarAwareHandler(logging.StreamHandler):
    """Writes each record above the bar: clear the bar's line, write, redraw the bar."""

    def emit(self, record: logging.LogRecord) -> None:
        _bar.clear()
        super().emit(record)
        if _bar.stream is not None and _bar.line:
            _bar.draw(_bar.line)
