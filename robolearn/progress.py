"""Progress bars that suit where the output goes.

On a terminal, a tqdm bar. Anywhere else (a log file, a pipe, CI), tqdm's carriage-return redraws pile up into
one enormous line (the quickstart's log was 167 KB of bars), so :class:`LineProgress` prints a plain line every
``interval`` seconds instead -- ``train 1200/3000 it (40%), 12.3 it/s, eta 2m26s, loss=0.0412`` -- and one at the
end. Both take the calls the project makes: ``update``, ``set_postfix``, ``close``, ``n``.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

__all__ = ["LineProgress", "progress_bar"]

# Seconds between the plain lines (ROBOLEARN_PROGRESS_INTERVAL overrides, e.g. for a quick look in a log).
DEFAULT_INTERVAL = 10.0


def _eta(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class LineProgress:
    """A progress report for output that is not a terminal: one line every ``interval`` seconds, one at close."""

    def __init__(self, total: int | None, desc: str = "", unit: str = "it", initial: int = 0,
                 interval: float | None = None, file: TextIO | None = None, disable: bool = False) -> None:
        self.total, self.desc, self.unit, self.n = total, desc, unit, int(initial)
        self.interval = float(os.environ.get("ROBOLEARN_PROGRESS_INTERVAL", DEFAULT_INTERVAL)
                              if interval is None else interval)
        self.file = file if file is not None else sys.stderr
        self.disable = disable
        self._start_n = self.n
        self._t0 = self._last = time.monotonic()
        self._postfix = ""
        self._closed = False

    def line(self) -> str:
        """The current state as one line (what is printed)."""
        elapsed = max(time.monotonic() - self._t0, 1e-9)
        rate = (self.n - self._start_n) / elapsed
        parts = [f"{self.desc} {self.n:,}" + (f"/{self.total:,}" if self.total else "") + f" {self.unit}"]
        if self.total:
            parts[0] += f" ({100.0 * self.n / self.total:.0f}%)"
        parts.append(f"{rate:.3g} {self.unit}/s" if rate >= 0.01 else f"{elapsed:.0f} s")
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"eta {_eta((self.total - self.n) / rate)}")
        if self._postfix:
            parts.append(self._postfix)
        return ", ".join(parts)

    def _emit(self) -> None:
        if not self.disable:
            print(self.line(), file=self.file, flush=True)
        self._last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += int(n)
        if time.monotonic() - self._last >= self.interval:
            self._emit()

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self._postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.n != self._start_n:
                self._emit()

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress_bar(total: int | None, desc: str = "", unit: str = "it", initial: int = 0, disable: bool = False,
                 leave: bool = True, file: TextIO | None = None) -> Any:
    """A tqdm bar on a terminal, a :class:`LineProgress` elsewhere; ``disable`` silences either."""
    out = file if file is not None else sys.stderr
    isatty = getattr(out, "isatty", None)
    if isatty is not None and isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=disable, leave=leave, file=out)
    return LineProgress(total, desc=desc, unit=unit, initial=initial, file=out, disable=disable)
