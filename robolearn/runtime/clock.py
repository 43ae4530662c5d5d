"""Clocks for the control loop: a real one on ``perf_counter_ns`` and a virtual one for simulation at full speed.

The loop asks for tick ``k`` at the absolute deadline ``start + k * period`` (never ``last + period``), so a late
tick does not push every later tick back: the schedule cannot drift. The real clock sleeps coarsely until about
``spin_s`` before the deadline (``time.sleep`` overshoots by tens to hundreds of microseconds on Linux) and then
spins for the rest, yielding the GIL on every turn (``time.sleep(0)``) so an inference thread keeps running.
"""
from __future__ import annotations

import time


class RealClock:
    realtime = True

    def __init__(self, period_s: float, spin_s: float = 0.001) -> None:
        if period_s <= 0:
            raise ValueError(f"period must be positive, got {period_s}")
        self.period_ns = int(round(period_s * 1e9))
        self.spin_ns = int(spin_s * 1e9)
        self.t0_ns = time.perf_counter_ns()

    def start(self) -> None:
        """Tick 0 is now."""
        self.t0_ns = time.perf_counter_ns()

    def rebase(self, tick: int) -> None:
        """Tick ``tick`` is due now (after a pause the loop chose, such as an inline replan)."""
        self.t0_ns = time.perf_counter_ns() - tick * self.period_ns

    def now_ns(self) -> int:
        return time.perf_counter_ns()

    def deadline_ns(self, tick: int) -> int:
        return self.t0_ns + tick * self.period_ns

    def wait_tick(self, tick: int) -> float:
        """Block until tick ``tick`` is due; returns how late (seconds, >= 0) the tick starts."""
        deadline = self.deadline_ns(tick)
        remaining = deadline - time.perf_counter_ns()
        if remaining > self.spin_ns:
            time.sleep((remaining - self.spin_ns) / 1e9)
        while time.perf_counter_ns() < deadline:
            time.sleep(0)
        return (time.perf_counter_ns() - deadline) / 1e9

    def elapsed_s(self) -> float:
        return (time.perf_counter_ns() - self.t0_ns) / 1e9


class VirtualClock:
    """Time that moves only when the loop waits for a tick: each tick starts exactly on time, instantly."""

    realtime = False

    def __init__(self, period_s: float) -> None:
        if period_s <= 0:
            raise ValueError(f"period must be positive, got {period_s}")
        self.period_ns = int(round(period_s * 1e9))
        self._now_ns = 0
        self.t0_ns = 0

    def start(self) -> None:
        self.t0_ns = self._now_ns

    def rebase(self, tick: int) -> None:
        """Virtual time does not pass between ticks: nothing to do."""

    def now_ns(self) -> int:
        return self._now_ns

    def deadline_ns(self, tick: int) -> int:
        return self.t0_ns + tick * self.period_ns

    def wait_tick(self, tick: int) -> float:
        self._now_ns = max(self._now_ns, self.deadline_ns(tick))
        return 0.0

    def elapsed_s(self) -> float:
        return (self._now_ns - self.t0_ns) / 1e9
