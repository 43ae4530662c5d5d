"""Latency / jitter accounting and the live status line of the runner."""
from __future__ import annotations

import sys
import time
from typing import IO, Iterable

import numpy as np


def percentile_ms(values_s: Iterable[float], q: float) -> float | None:
    """``q``-th percentile of durations given in seconds, in milliseconds (None when there are none)."""
    v = np.asarray(list(values_s), dtype=np.float64)
    if v.size == 0:
        return None
    return round(float(np.percentile(v, q)) * 1e3, 4)


class StatusLine:
    """One line of live progress on stderr (stdout stays clean for the final JSON line).

    On a TTY the line is redrawn in place with a carriage return at most ``tty_every_s``; otherwise a plain line
    is printed at most every ``plain_every_s`` seconds, so logs stay short.
    """

    def __init__(self, enabled: bool = True, stream: IO[str] | None = None, tty_every_s: float = 0.25,
                 plain_every_s: float = 5.0) -> None:
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = tty_every_s if self.tty else plain_every_s
        self._last = 0.0
        self._dirty = False

    def update(self, text: str, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < self.every:
            return
        self._last = now
        if self.tty:
            self.stream.write("\r" + text + "\x1b[K")
            self._dirty = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line that must be seen whether or not the status line is shown (a warning), on its own line: on a
        TTY the status line in progress is ended first, so the two do not run together."""
        if self.tty and self._dirty:
            self.stream.write("\n")
            self._dirty = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty and self._dirty:
            self.stream.write("\n")
            self.stream.flush()
            self._dirty = False
