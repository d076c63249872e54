"""The timing lock the benches hold around each timed part (TIMING_LOCK / --lock):
no two timings on one machine overlap. Imports nothing heavy (bench.serve runs without
TensorFlow)."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def locked(path: str | None) -> Iterator[None]:
    """Hold `path` (flock) while inside; nothing when path is None or empty."""
    if not path:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
