"""Scripted expert for ``peg_insert``: hover over the hole, align xy and yaw finely, descend, back off if jammed.

It reads only the observation (``tip_to_hole``, ``hole_yaw``, ``ee_yaw``), so the same logic would run from a
perceived hole pose. ``noise`` makes it imperfect on purpose, for flawed datasets: Gaussian action noise with
standard deviation ``0.1 * noise`` (in action units, where 1.0 is a full step: 0.5 mm at the default ``max_step``)
and, with probability ``0.1 * noise`` per step, a hesitation of 1-3 steps during which it outputs only noise.
Measured over 30 seeds: noise 0.5 -> 100% success (51 steps on average), noise 1.0 -> 73% (100 steps).

``bias`` is another kind of flaw, a systematic one that white noise is not: per episode the expert misjudges
where the hole is by an xy offset drawn from N(0, (``bias`` mm)^2) per axis -- against 0.5 mm of clearance per
side -- aligns over that wrong spot and descends; each time it jams it backs off and corrects half of its
misjudgment, so it gets in after a few tries. A policy cannot average such a flaw away: at a given offset from
the hole, the flawed episodes descend where the clean ones keep aligning.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from sim.tasks.peg_insert import HOLE_DEPTH, yaw_error

HOVER = 0.012  # tip height above the opening while aligning, metres
TRAVEL = 0.03  # tip height above the opening while far away (clears the block's top)
XY_TOL = 0.0003  # xy alignment needed before descending (well under the 0.5 mm per-side clearance)
YAW_TOL = 0.01  # radians


class PegInsertExpert:
    """See module docstring. ``act(obs)`` returns a float32 action in [-1, 1]^4."""

    def __init__(self, noise: float = 0.0, seed: int | None = None, bias: float = 0.0, **kw: Any) -> None:
        if kw:
            raise TypeError(f"unknown PegInsertExpert option(s) {sorted(kw)}; valid: noise, seed, bias")
        if noise < 0 or bias < 0:
            raise ValueError(f"noise and bias must be >= 0, got noise={noise}, bias={bias}")
        self.noise = float(noise)
        self.bias = float(bias)
        self.rng = np.random.default_rng(seed)
        self.max_step = 0.005
        self.max_yaw_step = 0.1
        self.reset()

    def reset(self, env: Any = None) -> None:
        """Forget the episode; read the action scaling from ``env`` when given."""
        if env is not None:
            cfg = env.unwrapped.config
            self.max_step, self.max_yaw_step = cfg.max_step, cfg.max_yaw_step
        self._descending = False
        self._stuck = 0
        self._backoff = 0
        self._last_z: float | None = None
        self._hesitate = 0
        # the episode's misjudgment of the hole's xy position (metres); drawn only when asked, so that a
        # bias-free expert's random stream is what it always was
        self._aim = self.rng.normal(0.0, 0.001 * self.bias, 2) if self.bias > 0 else np.zeros(2)

    def act(self, obs: dict[str, np.ndarray], env: Any = None) -> np.ndarray:
        d = np.asarray(obs["tip_to_hole"], dtype=np.float64)  # hole opening centre - peg tip
        if self.bias > 0:
            d = d.copy()
            d[:2] += self._aim  # where the expert believes the hole is
        ye = yaw_error(float(obs["hole_yaw"][0]), float(obs["ee_yaw"][0]))
        dxy = float(np.hypot(d[0], d[1]))
        depth = d[2]  # > 0 once the tip is below the opening
        aligned = dxy < XY_TOL and abs(ye) < YAW_TOL

        if self._backoff > 0:  # jammed: lift straight up to the hover height, then re-align
            self._backoff -= 1
            self._descending = False
            action = np.array([0.0, 0.0, (d[2] + HOVER) / self.max_step, 0.0])
        elif self._descending or (aligned and depth > -HOVER - 0.003):
            if depth < 0 and dxy > 2 * XY_TOL:  # drifted before entering: align again first
                self._descending = False
            else:
                self._descending = True
            tip_z = -d[2]
            progress = None if self._last_z is None else self._last_z - tip_z
            self._last_z = tip_z
            self._stuck = self._stuck + 1 if progress is not None and progress < 0.0005 else 0
            if self._stuck >= 3:
                self._backoff, self._stuck, self._last_z = 3, 0, None
                self._aim *= 0.5  # jammed: the misjudgment is half corrected before the next try
            # Aim at the bottom (the step limit makes it 1 cm per step at most) while still centring xy.
            action = np.array([d[0], d[1], d[2] - HOLE_DEPTH, 0.0]) / self.max_step
            action[3] = ye / self.max_yaw_step
        else:
            self._last_z = None
            height = HOVER if dxy < 0.005 else TRAVEL
            action = np.array([d[0], d[1], d[2] + height, 0.0]) / self.max_step
            action[3] = ye / self.max_yaw_step
            if dxy > 0.005 and d[2] > -TRAVEL + 0.01:
                action[:2] *= 0.3  # far away and low: mostly rise first, so the tip clears the block's top
        return self._perturb(np.clip(action, -1.0, 1.0))

    def _perturb(self, action: np.ndarray) -> np.ndarray:
        if self.noise <= 0:
            return action.astype(np.float32)
        if self._hesitate > 0:
            self._hesitate -= 1
            action = np.zeros_like(action)
        elif self.rng.random() < 0.1 * self.noise:
            self._hesitate = int(self.rng.integers(1, 4))
            action = np.zeros_like(action)
        action = action + 0.1 * self.noise * self.rng.standard_normal(action.shape)
        return np.clip(action, -1.0, 1.0).astype(np.float32)

