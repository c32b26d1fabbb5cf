"""A text progress bar for evaluations, with no dependency beyond the standard library."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from worker.evaluate.train import Progress


class TextBar:
    """A dependency-free progress bar: ``[####......]  40%  run 1/3  epoch 400/1000 ...``."""

    def __init__(self, stream: TextIO = sys.stderr, width: int = 30) -> None:
        self.stream = stream
        self.width = width
        self.interactive = stream.isatty()
        # Redraws are throttled: a 1000-epoch run calls back thousands of times.
        self.every = 0.2 if self.interactive else 30.0
        self.last = -1e9
        # The rate is measured from the first report, so loading time does not skew the ETA.
        self.first: tuple[float, float] | None = None

    def __call__(self, p: Progress) -> None:
        """Report ``p``: redrawn at most every 0.2 s (terminal) or 30 s, and at each run's end."""
        now = time.monotonic()
        done = p.fraction
        if self.first is None:
            self.first = (now, done)
        acc = p.accuracy
        if acc is None and now - self.last < self.every:
            return
        self.last = now
        filled = round(done * self.width)
        t0, f0 = self.first
        eta = (now - t0) / (done - f0) * (1 - done) if done > f0 else 0.0
        line = (
            f"[{'#' * filled}{'.' * (self.width - filled)}] {done * 100:5.1f}%  "
            f"run {p.run}/{p.runs}  epoch {p.epoch}/{p.epochs}  loss {p.loss:.3f}  "
            f"eta {_duration(eta)}"
        )
        if acc is not None:
            line += f"  run {p.run} accuracy {acc * 100:.2f}%"
        if self.interactive:
            self.stream.write("\r" + line + ("\n" if acc is not None else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
