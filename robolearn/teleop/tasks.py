"""From an operator's twist to each task's action, and where the viewer's camera starts.

The twist is in the view frame (right, forward, up; roll, pitch, yaw). Each task's camera is chosen so that
"forward" is up the screen, and the mapping rotates the planar part by the camera's azimuth: the controls match
the picture the operator sees when the viewer opens. The mapping is fixed per task (it does not follow a camera
the operator later drags), so a replayed log gives the same actions with or without a viewer.

Action spaces (see ``sim/``): push_t takes the pusher's absolute target xy in metres; peg_insert a normalized
end-effector delta (dx, dy, dz, dyaw) in [-1, 1]; robosuite tasks (lift, can, square, robosuite/<Env> with one arm)
OSC_POSE deltas (3 position, 3 axis-angle rotation, in [-1, 1]: +-5 cm and +-0.5 rad per step) plus a gripper
(-1 open, +1 closed). ``robolearn`` does not import ``sim``: tasks are recognized by name and action shape.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class View:
    """The viewer's starting camera: a named fixed camera of the model, or a free camera."""

    fixed: str | None = None
    lookat: tuple[float, float, float] = (0.0, 0.0, 0.0)
    distance: float = 1.0
    azimuth: float = 90.0  # degrees; MuJoCo's free camera looks along (cos az, sin az) on the ground
    elevation: float = -45.0
    hidden_groups: tuple[int, ...] = ()  # geom groups not drawn (robosuite: 0, its collision meshes)


@dataclass
class TaskControl:
    """Base: holds the view, the gripper state and the speeds; subclasses turn a twist into an action."""

    task: str
    action_shape: tuple[int, ...]
    low: np.ndarray
    high: np.ndarray
    fps: float
    view: View = field(default_factory=View)
    has_vertical: bool = True
    has_rotation: bool = False  # yaw
    has_tilt: bool = False  # roll and pitch too
    has_gripper: bool = False
    gripper_closed: bool = False

    def reset(self, obs: dict[str, np.ndarray]) -> None:
        """A new episode: the gripper opens, targets start where the robot is."""
        self.gripper_closed = False

    def action(self, twist: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def follow(self, action: np.ndarray) -> None:
        """The policy sent ``action``: track it, so that a takeover starts where the policy left off."""

    def toggle_gripper(self) -> None:
        if self.has_gripper:
            self.gripper_closed = not self.gripper_closed

    def status(self) -> str:
        return "closed" if self.gripper_closed else "open" if self.has_gripper else "-"

    # -- helpers -------------------------------------------------------------------------------------------
    def _planar(self, right: float, forward: float) -> np.ndarray:
        """View-frame (right, forward) -> world (x, y), for a camera at ``view.azimuth``."""
        az = math.radians(self.view.azimuth)
        fwd = np.array([math.cos(az), math.sin(az)])
        rgt = np.array([math.sin(az), -math.cos(az)])
        return right * rgt + forward * fwd

    def _clip(self, a: np.ndarray) -> np.ndarray:
        return np.clip(a, self.low, self.high).astype(np.float32)


@dataclass
class PlanarTarget(TaskControl):
    """push_t: the action is where the pusher should be; the twist moves that target at up to ``speed`` m/s."""

    speed: float = 0.15
    target: np.ndarray = field(default_factory=lambda: np.zeros(2))

    def reset(self, obs: dict[str, np.ndarray]) -> None:
        super().reset(obs)
        self.target = np.asarray(obs.get("agent_pos", np.zeros(2)), dtype=np.float64).copy()

    def action(self, twist: np.ndarray) -> np.ndarray:
        self.target = np.clip(self.target + self._planar(twist[0], twist[1]) * self.speed / self.fps,
                              self.low, self.high)
        return self._clip(self.target)

    def follow(self, action: np.ndarray) -> None:
        self.target = np.clip(np.asarray(action, dtype=np.float64), self.low, self.high)


@dataclass
class DeltaPoseYaw(TaskControl):
    """peg_insert: normalized (dx, dy, dz, dyaw) deltas, already scaled by the task (5 mm, 0.1 rad per step)."""

    gain: float = 1.0
    yaw_gain: float = 0.5

    def action(self, twist: np.ndarray) -> np.ndarray:
        xy = self._planar(twist[0], twist[1])
        return self._clip(np.array([xy[0] * self.gain, xy[1] * self.gain, twist[2] * self.gain,
                                    twist[5] * self.yaw_gain]))


@dataclass
class OscPoseGripper(TaskControl):
    """robosuite OSC_POSE: position and axis-angle deltas (world frame) and a gripper command."""

    # Full deflection asks for the whole OSC range, 5 cm and 0.15 rad per step; the arm follows at about 0.23 m/s
    # (measured on lift at 20 Hz), so the keyboard's three speed steps are about 8, 15 and 23 cm/s.
    pos_gain: float = 1.0
    rot_gain: float = 0.3

    def action(self, twist: np.ndarray) -> np.ndarray:
        right, forward, up, roll, pitch, yaw = (float(v) for v in twist)
        xy = self._planar(right, forward)
        fwd3 = np.array([*self._planar(0.0, 1.0), 0.0])
        rgt3 = np.array([*self._planar(1.0, 0.0), 0.0])
        rot = roll * fwd3 + pitch * rgt3 + yaw * np.array([0.0, 0.0, 1.0])
        a = np.zeros(self.action_shape[0])
        a[:3] = np.array([xy[0], xy[1], up]) * self.pos_gain
        a[3:6] = rot * self.rot_gain
        a[-1] = 1.0 if self.gripper_closed else -1.0
        return self._clip(a)

    def follow(self, action: np.ndarray) -> None:
        self.gripper_closed = bool(np.asarray(action).reshape(-1)[-1] > 0.0)


# From in front of the table, facing the robot (as robosuite's "frontview"): up the screen is -x.
ROBOSUITE_VIEW = View(lookat=(0.0, 0.0, 0.95), distance=1.4, azimuth=180.0, elevation=-30.0, hidden_groups=(0,))


def control_for(task: str, env: Any) -> TaskControl:
    """The mapping for ``task`` (an environment made by ``sim.make(task)``); ValueError for tasks without one."""
    space = env.action_space
    shape = tuple(int(s) for s in space.shape)
    low = np.asarray(space.low, dtype=np.float64)
    high = np.asarray(space.high, dtype=np.float64)
    fps = float(getattr(getattr(env, "unwrapped", env), "fps", 10.0))
    common: dict[str, Any] = dict(task=task, action_shape=shape, low=low, high=high, fps=fps)
    if task == "push_t" and shape == (2,):
        return PlanarTarget(view=View(fixed="top", azimuth=90.0), has_vertical=False, **common)
    if task == "peg_insert" and shape == (4,):
        return DeltaPoseYaw(view=View(lookat=(0.0, 0.0, 0.06), distance=0.75, azimuth=90.0, elevation=-35.0),
                            has_rotation=True, **common)
    if (task in ("lift", "can", "square") or task.startswith("robosuite/")) and shape == (7,):
        return OscPoseGripper(view=ROBOSUITE_VIEW, has_rotation=True, has_tilt=True, has_gripper=True, **common)
    raise ValueError(
        f"teleop has no action mapping for task {task!r} with a {shape} action; supported: push_t, peg_insert, "
        f"lift, can, square and one-arm robosuite/<Env> tasks (7-D OSC_POSE + gripper)")
