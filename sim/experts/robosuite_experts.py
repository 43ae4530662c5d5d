"""Scripted experts for the robosuite tasks (lift, can, square).

Each expert is a small state machine over Cartesian waypoints. It reads the *true* object poses from the
environment's MuJoCo state (``expert.reset(env)`` keeps a reference), and turns "go to this pose with the gripper
open/closed" into an OSC_POSE delta action with a clipped proportional law:

    a_pos = clip(gain * (target - eef) / 0.05, -1, 1)       # OSC scales +-1 to +-5 cm per step
    a_rot = clip(gain * rotvec(R_target R_eef^T) / 0.5, -1, 1)  # +-1 -> +-0.5 rad, base (= world) frame
    a_grip = -1 (open) or +1 (close)

The gripper always points straight down; only its yaw changes (to square up with the cube, across the nut handle).

``noise`` makes flawed demonstrations on purpose: Gaussian noise of std ``noise`` on the six arm dimensions of
every action, a grasp point offset per episode (std ``0.01 * noise`` m), and now and then (probability
``0.03 * min(noise, 1)`` per step) a hesitation of 2-8 steps holding still. With ``noise=0`` the expert is
deterministic. If the object slips out of the gripper, the expert goes back and grasps it again.
"""
from __future__ import annotations

from typing import Any

import numpy as np

POS_SCALE = 0.05  # OSC_POSE output_max for position (m per action unit), robosuite 1.5 BASIC default
ROT_SCALE = 0.5  # OSC_POSE output_max for rotation (rad per action unit)

# Gripper pointing down, fingers closing along world y: the Panda's grip-site frame at robosuite's home pose.
_R_DOWN = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])


def _rot_z(theta: float) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _rotvec(R: np.ndarray) -> np.ndarray:
    """Axis-angle vector of rotation matrix ``R``."""
    cos = np.clip((np.trace(R) - 1.0) / 2.0, -1.0, 1.0)
    angle = np.arccos(cos)
    if angle < 1e-6:
        return np.zeros(3)
    v = np.array([R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1]])
    if np.pi - angle < 1e-3:  # near pi the antisymmetric part vanishes; use the diagonal
        axis = np.sqrt(np.maximum((np.diag(R) + 1.0) / 2.0, 0.0))
        axis *= np.sign(v + 1e-12)
        return axis / np.linalg.norm(axis) * angle
    return v / (2.0 * np.sin(angle)) * angle


def _wrap(angle: float, period: float) -> float:
    """``angle`` folded into ``[-period/2, period/2)``."""
    return (angle + period / 2.0) % period - period / 2.0


def _yaw(R: np.ndarray) -> float:
    return float(np.arctan2(R[1, 0], R[0, 0]))


class _RobosuiteExpert:
    """Shared machinery: pose control, noise, phase bookkeeping."""

    gain = 1.0

    def __init__(self, noise: float = 0.0, seed: int | None = None, **kw: Any) -> None:
        if kw:
            raise ValueError(f"unknown expert option(s) {sorted(kw)}; valid: noise, seed")
        if noise < 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        self.noise = float(noise)
        self._rng = np.random.default_rng(seed)
        self.env: Any = None

    # -- public API ----------------------------------------------------------------------------------------------
    def reset(self, env: Any) -> None:
        """Start a new episode in ``env`` (call after ``env.reset``)."""
        self.env = env.unwrapped
        self.rs = self.env.rs_env
        self.sim = self.rs.sim
        self._site = self.rs.robots[0].eef_site_id["right"]
        self.phase = "approach"
        self.t_phase = 0
        self._pause = 0
        self.offset = self._rng.normal(0.0, 0.01 * self.noise, 3) * np.array([1.0, 1.0, 0.3])
        self._reset_task()

    def act(self, obs: Any = None, env: Any = None) -> np.ndarray:
        """7-D OSC_POSE action for the current state (``obs`` is accepted for API symmetry; poses come from sim)."""
        if env is not None and (self.env is None or env.unwrapped is not self.env):
            self.reset(env)
        if self.env is None:
            raise RuntimeError("call expert.reset(env) before expert.act(obs)")
        action = self._policy()
        self.t_phase += 1
        if self.noise > 0:
            if self._pause > 0:
                self._pause -= 1
                action[:6] = 0.0
            elif self._rng.random() < 0.03 * min(self.noise, 1.0):
                self._pause = int(self._rng.integers(2, 9))
            action[:6] += self._rng.normal(0.0, self.noise, 6)
        return np.clip(action, -1.0, 1.0).astype(np.float32)

    # -- helpers for subclasses -----------------------------------------------------------------------------------
    @property
    def eef(self) -> np.ndarray:
        return self.sim.data.site_xpos[self._site].copy()

    @property
    def eef_R(self) -> np.ndarray:
        return self.sim.data.site_xmat[self._site].reshape(3, 3).copy()

    def _go(self, phase: str) -> None:
        self.phase = phase
        self.t_phase = 0

    def _move(self, target: np.ndarray, yaw: float, grip: float, gain: float | None = None) -> np.ndarray:
        g = self.gain if gain is None else gain
        a = np.zeros(7)
        a[:3] = np.clip(g * (np.asarray(target) - self.eef) / POS_SCALE, -1.0, 1.0)
        r_err = _rotvec(_rot_z(yaw) @ _R_DOWN @ self.eef_R.T)
        a[3:6] = np.clip(r_err / ROT_SCALE, -1.0, 1.0)
        a[6] = grip
        return a

    def _near(self, target: np.ndarray, xy: float, z: float) -> bool:
        d = np.asarray(target) - self.eef
        return bool(np.linalg.norm(d[:2]) < xy and abs(d[2]) < z)

    def _yaw_err(self, yaw: float) -> float:
        return abs(_wrap(_yaw(self.eef_R) - _yaw(_rot_z(yaw) @ _R_DOWN), 2 * np.pi))

    def _reset_task(self) -> None:
        raise NotImplementedError

    def _policy(self) -> np.ndarray:
        raise NotImplementedError


class _PickExpert(_RobosuiteExpert):
    """Approach above the object, descend, close, lift; subclasses add what follows the lift."""

    hover = 0.10  # approach height above the grasp point
    grasp_dz = 0.0  # grasp point height relative to the object's body origin
    close_steps = 10
    lift_z = 1.0  # absolute z to lift to

    def _grasp_point(self) -> np.ndarray:
        raise NotImplementedError

    def _grasp_yaw(self) -> float:
        return 0.0

    def _object_pos(self) -> np.ndarray:
        raise NotImplementedError

    def _reset_task(self) -> None:
        self._yaw_target = self._grasp_yaw()
        self._last_z = np.inf

    def _holding(self) -> bool:
        return bool(np.linalg.norm(self._grasp_point() - self.eef) < 0.05)

    def _pick(self) -> np.ndarray | None:
        """Action for the picking phases, or None once the object is lifted (phase ``"lifted"``)."""
        p = self._grasp_point() + self.offset
        p[2] += self.grasp_dz
        if self.phase == "approach":
            self._yaw_target = self._grasp_yaw()
            above = p + np.array([0.0, 0.0, self.hover])
            if self._near(above, 0.01, 0.03) and self._yaw_err(self._yaw_target) < 0.1:
                self._go("descend")
            return self._move(above, self._yaw_target, -1.0)
        if self.phase == "descend":
            stalled = self.t_phase > 8 and abs(self.eef[2] - self._last_z) < 5e-4
            self._last_z = self.eef[2]
            if self._near(p, 0.012, 0.008) or self.t_phase > 40 or (stalled and self._near(p, 0.015, 0.02)):
                self._go("close")
            if np.linalg.norm(p[:2] - self.eef[:2]) > 0.03:
                self._go("approach")
            return self._move(p, self._yaw_target, -1.0)
        if self.phase == "close":
            if self.t_phase >= self.close_steps:
                self._go("lift")
            return self._move(p, self._yaw_target, 1.0)
        if self.phase == "lift":
            target = self.eef.copy()
            target[2] = self.lift_z
            if not self._holding():
                self._go("approach")
                return self._move(self.eef + np.array([0, 0, 0.05]), self._yaw_target, -1.0)
            if self.eef[2] > self.lift_z - 0.03:
                self._go("lifted")
            return self._move(target, self._yaw_target, 1.0)
        return None


class LiftExpert(_PickExpert):
    """Lift: square the fingers up with the cube, grasp it, lift it 15 cm."""

    def _reset_task(self) -> None:
        self.lift_z = float(self.rs.model.mujoco_arena.table_offset[2]) + 0.15
        super()._reset_task()

    def _object_pos(self) -> np.ndarray:
        return self.sim.data.body_xpos[self.rs.cube_body_id].copy()

    def _grasp_point(self) -> np.ndarray:
        return self._object_pos()

    def _grasp_yaw(self) -> float:
        # fingers close along the gripper's local x; a cube is symmetric under 90 deg turns
        cube_yaw = _yaw(self.sim.data.body_xmat[self.rs.cube_body_id].reshape(3, 3))
        return _wrap(cube_yaw, np.pi / 2)

    def _policy(self) -> np.ndarray:
        a = self._pick()
        if a is None:  # lifted: hold it up
            if not self._holding():
                self._go("approach")
                return self._move(self.eef, self._yaw_target, -1.0)
            target = self.eef.copy()
            target[2] = self.lift_z
            a = self._move(target, self._yaw_target, 1.0)
        return a


class CanExpert(_PickExpert):
    """PickPlaceCan: grasp the can, carry it over its bin quadrant, lower it, open, back off upwards."""

    grasp_dz = 0.01
    close_steps = 12

    def _reset_task(self) -> None:
        self._body = self.rs.obj_body_id["Can"]
        # aim at the near part of the can's bin quadrant: its centre is at the edge of the Panda's reach
        self.target = np.array(self.rs.target_bin_placements[self.rs.object_to_id["can"]], dtype=float)
        self.target[:2] -= (0.03, 0.05)
        self.lift_z = float(self.rs.bin2_pos[2]) + 0.18
        super()._reset_task()

    def _object_pos(self) -> np.ndarray:
        return self.sim.data.body_xpos[self._body].copy()

    def _grasp_point(self) -> np.ndarray:
        return self._object_pos()

    def _policy(self) -> np.ndarray:
        a = self._pick()
        if a is not None:
            return a
        if self.phase == "lifted":
            self._go("carry")
        if self.phase in ("carry", "lower") and not self._holding():
            self._go("approach")
            return self._move(self.eef + np.array([0, 0, 0.05]), self._yaw_target, -1.0)
        can = self._object_pos()
        eef_to_can = self.eef - can  # keep the can, not the hand, over the target
        if self.phase == "carry":
            goal = np.array([self.target[0], self.target[1], self.lift_z]) + eef_to_can * np.array([1, 1, 0])
            err = np.linalg.norm(can[:2] - self.target[:2])
            if err < 0.015 or (self.t_phase > 60 and err < 0.04):
                self._go("lower")
            return self._move(goal, self._yaw_target, 1.0)
        if self.phase == "lower":
            goal = np.array([self.target[0], self.target[1], self.target[2] + 0.10]) + eef_to_can * np.array([1, 1, 0])
            goal[2] += eef_to_can[2]
            if can[2] < self.target[2] + 0.12 or self.t_phase > 40:
                self._go("release")
            return self._move(goal, self._yaw_target, 1.0)
        if self.phase == "release":
            if self.t_phase >= 8:
                self._go("retreat")
            return self._move(self.eef, self._yaw_target, -1.0)
        # retreat: straight up, open
        goal = self.eef.copy()
        goal[2] = self.lift_z
        return self._move(goal, self._yaw_target, -1.0)


class SquareExpert(_PickExpert):
    """NutAssemblySquare: grasp the nut by its handle, turn it square with the peg, centre it above, drop it."""

    close_steps = 10
    hover = 0.08
    grasp_dz = 0.006

    def _reset_task(self) -> None:
        self.nut = self.rs.nuts[0]
        self._body = self.rs.obj_body_id[self.nut.name]
        self._handle = self.sim.model.site_name2id(self.nut.important_sites["handle"])
        self.peg = self.sim.data.body_xpos[self.rs.peg1_body_id].copy()
        self.table_z = float(self.rs.table_offset[2])
        self.lift_z = self.table_z + 0.28  # nut bottom clears the peg top (table + 0.13)
        super()._reset_task()

    def _object_pos(self) -> np.ndarray:
        return self.sim.data.body_xpos[self._body].copy()

    def _nut_yaw(self) -> float:
        return _yaw(self.sim.data.body_xmat[self._body].reshape(3, 3))

    def _grasp_point(self) -> np.ndarray:
        # a little outboard of the handle's middle, so the fingers clear the nut's ring
        out = self.sim.data.body_xmat[self._body].reshape(3, 3)[:, 0].copy()
        out[2] = 0.0
        return self.sim.data.site_xpos[self._handle] + 0.012 * out / (np.linalg.norm(out) + 1e-9)

    def _grasp_yaw(self) -> float:
        # fingers close along the handle's width (the nut's local y); fingers are symmetric under half turns
        return _wrap(self._nut_yaw(), np.pi)

    def _policy(self) -> np.ndarray:
        a = self._pick()
        if a is not None:
            return a
        if self.phase == "lifted":
            # Turn the gripper so that the nut's sides line up with the (axis-aligned) square peg. Of the four
            # such turns, prefer the ones that leave the handle (the hand) on the robot's side of the peg, which
            # is at the edge of the Panda's reach, then the smallest final wrist yaw (joint 7 has limits).
            grip_yaw, nut_yaw = _yaw(self.eef_R @ _R_DOWN.T), self._nut_yaw()
            best = None
            for c in (0.0, np.pi / 2, np.pi, -np.pi / 2):
                final = grip_yaw + _wrap(c - nut_yaw, 2 * np.pi)
                cost = abs(final) + (10.0 if np.cos(c) > 0.5 else 0.0)
                if best is None or cost < best[0]:
                    best = (cost, final)
            self._yaw_target = best[1]
            self._go("carry")
        if self.phase in ("carry", "align", "lower") and not self._holding():
            self._go("approach")
            return self._move(self.eef + np.array([0, 0, 0.05]), self._yaw_target, -1.0)
        nut = self._object_pos()
        eef_to_nut = self.eef - nut
        over_peg = np.array([self.peg[0], self.peg[1], 0.0]) + eef_to_nut * np.array([1, 1, 0])
        if self.phase == "carry":
            goal = over_peg + np.array([0, 0, self.lift_z])
            err = np.linalg.norm(nut[:2] - self.peg[:2])
            if err < 0.01 and abs(_wrap(self._nut_yaw(), np.pi / 2)) < 0.05:
                self._go("lower")
            elif self.t_phase > 80 and err < 0.02:
                self._go("lower")
            return self._move(goal, self._yaw_target, 1.0)
        if self.phase == "lower":
            goal = over_peg + np.array([0, 0, self.table_z + 0.03 + eef_to_nut[2]])
            if nut[2] < self.table_z + 0.045 or self.t_phase > 60:
                self._go("release")
            return self._move(goal, self._yaw_target, 1.0)
        if self.phase == "release":
            if self.t_phase >= 6:
                self._go("retreat")
            return self._move(self.eef, self._yaw_target, -1.0)
        goal = self.eef.copy()
        goal[2] = self.lift_z
        return self._move(goal, self._yaw_target, -1.0)
