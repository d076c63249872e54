"""Where compile() spends its time: seconds per pipeline stage, for the log and report."""

from __future__ import annotations

import time


class Stopwatch:
    """lap(stage) charges the time since the previous lap (or the start) to stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + now - self._last, 3)
        self._last = now
