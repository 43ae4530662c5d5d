"""Actions keyed by the control tick they are due at, with the chunk-blending rules of the runner.

Every executable action of a chunk computed from the observation of tick ``t0`` is due at tick ``t0 + i``. When
the chunk arrives at tick ``now``, actions due before ``now`` are stale (their time passed while the policy was
thinking): they are dropped and counted. The rest wait for their tick.

Blending of a new chunk with what is queued:

- ``"none"`` (also used by ``"warmstart"``): the newest chunk wins; queued actions of older chunks are discarded
  (counted as ``replaced``, not as dropped).
- ``"ensemble"``: temporal ensembling as in ACT (Zhao et al. 2023): every chunk that predicted an action for a
  tick keeps its prediction, and at that tick the executed action is the weighted mean with weights
  ``w_i = exp(-m * i)``, where ``i = 0`` is the OLDEST prediction for that tick and ``i`` grows with newer chunks
  (ACT's ordering: with ``m > 0`` older predictions weigh more, which smooths; ``m = 0`` is a plain mean;
  ``m < 0`` favours the newest). ``m`` defaults to 0.01, ACT's value.
"""
from __future__ import annotations

import math

import numpy as np

BLENDS = ("none", "ensemble", "warmstart")


class ActionQueue:
    def __init__(self, blend: str = "none", ensemble_m: float = 0.01) -> None:
        if blend not in BLENDS:
            raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")
        self.blend = blend
        self.m = float(ensemble_m)
        self._slots: dict[int, list[np.ndarray]] = {}  # tick -> predictions, oldest first

    def clear(self) -> None:
        self._slots.clear()

    def add(self, actions: np.ndarray, first_tick: int, now_tick: int) -> tuple[int, int]:
        """Queue ``actions[i]`` for tick ``first_tick + i``; returns ``(dropped, replaced)``."""
        actions = np.asarray(actions)
        dropped = int(min(max(now_tick - first_tick, 0), len(actions)))
        self._discard_before(now_tick)
        replaced = 0
        if self.blend != "ensemble":
            replaced = sum(len(v) for v in self._slots.values())
            self._slots.clear()
        for i in range(dropped, len(actions)):
            self._slots.setdefault(first_tick + i, []).append(actions[i])
        return dropped, replaced

    def delay(self, from_tick: int, ticks: int = 1) -> None:
        """Postpone every action due at or after ``from_tick`` by ``ticks`` (earlier ones are forgotten).

        Sync mode's stall: while the robot holds for a chunk in flight it does not move, so the plan queued from
        earlier chunks is still the right plan, only later; keeping it keyed to the clock would execute each queued
        action at the wrong step (and ensemble it with predictions for another step)."""
        self._discard_before(from_tick)
        if ticks:
            self._slots = {t + ticks: preds for t, preds in self._slots.items()}

    def _discard_before(self, tick: int) -> None:
        for t in [t for t in self._slots if t < tick]:
            del self._slots[t]

    def weights(self, n: int) -> np.ndarray:
        """Normalized ensemble weights of ``n`` predictions, oldest first."""
        w = np.exp(-self.m * np.arange(n, dtype=np.float64))
        return w / w.sum()

    def pop(self, tick: int) -> np.ndarray | None:
        """The action for ``tick`` (blended), or None when no chunk covers it; forgets earlier ticks."""
        self._discard_before(tick)
        preds = self._slots.pop(tick, None)
        if not preds:
            return None
        if len(preds) == 1:
            return np.array(preds[0])
        stacked = np.stack(preds).astype(np.float64)
        blended = np.tensordot(self.weights(len(preds)), stacked, axes=1)
        return blended.astype(np.asarray(preds[0]).dtype)

    def remaining(self, tick: int) -> int:
        """How many consecutive ticks from ``tick`` on have an action."""
        n = 0
        while (tick + n) in self._slots:
            n += 1
        return n

    def __len__(self) -> int:
        return len(self._slots)


def ticks_for(latency_s: float, period_s: float, round_up: bool = True) -> int:
    """Control periods a computation of ``latency_s`` spans (tolerant to float noise at exact multiples)."""
    x = latency_s / period_s
    return max(0, math.ceil(x - 1e-9) if round_up else math.floor(x + 1e-9))
