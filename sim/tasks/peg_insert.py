"""Precision peg insertion (after ResiP's one-leg/peg tasks, Ankile et al. 2024): a square peg into a tight hole.

The peg (20 mm square) hangs from a Cartesian end effector through a compliant two-axis hinge. The hole's
``clearance`` is the TOTAL gap, hole side minus peg side (default 1 mm, i.e. 0.5 mm per side). A peg more than
about the per-side clearance off centre lands on the rim; pushed down further it tilts in its compliant grasp and
wedges -- the failure mode that residual RL is meant to fix.

Action (Box [-1, 1]^4, float32): end-effector delta ``(dx, dy, dz) * max_step`` metres and ``dyaw * max_yaw_step``
radians, applied relative to the CURRENT end-effector pose (as robosuite's delta OSC does), so a blocked peg never
winds up an ever larger force. 10 Hz control, 150-step episodes.

Observations (float32), ``obs_mode="state"``: ``ee_pos`` (3), ``ee_yaw`` (1), ``peg_tip_pos`` (3, centre of the
peg's bottom face), ``peg_quat`` (4, w x y z), ``hole_pos`` (3, centre of the hole's top opening), ``hole_yaw`` (1),
``tip_to_hole`` (3, hole_pos - peg_tip_pos). ``obs_mode="image"`` adds ``image`` (image_size^2 x 3 uint8, camera
``front``).

Success: the peg tip is inside the hole's footprint and at least ``success_depth`` (80%) of the hole depth below its
top. Reward: sparse (1.0 on success) by default; ``reward_type="dense"`` gives a shaped value in [0, 1] (see
``PegInsertEnv._dense_reward``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import gymnasium as gym
import mujoco
import numpy as np

from sim.tasks._common import ASSETS, MujocoTaskEnv, build_config, check_choice

PEG_HALF = 0.01  # half side of the square peg (matches peg_insert.xml)
PEG_LENGTH = 0.08
HOLE_TOP = 0.05  # z of the block's top face
HOLE_DEPTH = 0.04
WALL_HALF_T = 0.01  # half thickness of the walls around the hole


@dataclasses.dataclass
class PegInsertConfig:
    """Overrides accepted by ``make_env`` (all JSON-able)."""

    clearance: float = 0.001  # total: hole side - peg side, metres
    obs_mode: str = "state"  # "state" | "image"
    reward_type: str = "sparse"  # "sparse" | "dense"
    max_episode_steps: int = 150
    terminate_on_success: bool = True
    success_depth: float = 0.8  # fraction of the hole depth the tip must pass
    hole_xy_range: float = 0.1  # hole centre drawn uniformly in [-r, r]^2
    hole_yaw_range: float = 0.5  # hole yaw drawn uniformly in [-r, r] radians
    max_step: float = 0.005  # metres per control step at |action| = 1 (0.05 m/s: a 1 mm miss jams at this speed)
    max_yaw_step: float = 0.1  # radians per control step at |action| = 1
    image_size: int = 96
    render_size: int = 256
    render_mode: str = "rgb_array"


def load_model(clearance: float) -> mujoco.MjModel:
    """The MJCF with the four walls re-sized so the square opening is ``2 * PEG_HALF + clearance`` wide."""
    spec = mujoco.MjSpec.from_file(str(ASSETS / "peg_insert.xml"))
    a = PEG_HALF + clearance / 2  # half side of the opening
    outer = a + 2 * WALL_HALF_T
    zc, hz = HOLE_TOP - HOLE_DEPTH / 2, HOLE_DEPTH / 2
    for name, sign in (("wall_px", 1), ("wall_nx", -1)):
        g = spec.geom(name)
        g.pos = [sign * (a + WALL_HALF_T), 0.0, zc]
        g.size = [WALL_HALF_T, a, hz]
    for name, sign in (("wall_py", 1), ("wall_ny", -1)):
        g = spec.geom(name)
        g.pos = [0.0, sign * (a + WALL_HALF_T), zc]
        g.size = [outer, WALL_HALF_T, hz]
    floor_h = (HOLE_TOP - HOLE_DEPTH) / 2
    floor = spec.geom("hole_floor")
    floor.pos = [0.0, 0.0, floor_h]
    floor.size = [outer, outer, floor_h]
    return spec.compile()


def yaw_error(target: float, yaw: float) -> float:
    """Signed yaw error modulo the square's quarter-turn symmetry, in [-pi/4, pi/4)."""
    return (target - yaw + math.pi / 4) % (math.pi / 2) - math.pi / 4


class PegInsertEnv(MujocoTaskEnv):
    """Peg insertion (see module docstring)."""

    task_name = "peg_insert"

    def __init__(self, **overrides: Any) -> None:
        cfg = build_config(PegInsertConfig, self.task_name, overrides)
        check_choice(self.task_name, "obs_mode", cfg.obs_mode, ("state", "image"))
        check_choice(self.task_name, "reward_type", cfg.reward_type, ("sparse", "dense"))
        if not 0.0 <= cfg.clearance <= 0.01:
            raise ValueError(f"override 'clearance' for task peg_insert must be in [0, 0.01] m, got {cfg.clearance}")
        self.config = cfg
        model = load_model(cfg.clearance)
        super().__init__(model, fps=10.0, max_episode_steps=cfg.max_episode_steps, render_mode=cfg.render_mode,
                         render_size=cfg.render_size, render_camera="front")
        names = ("ee_x", "ee_y", "ee_z", "ee_yaw", "peg_tilt_x", "peg_tilt_y")
        assert [model.jnt_qposadr[model.joint(n).id] for n in names] == list(range(6)), "joint order changed"
        self._tip_site = model.site("peg_tip").id
        self._peg_body = model.body("peg").id
        self._hole_mocap = model.body_mocapid[model.body("hole").id]
        self._ee_low = model.jnt_range[:4, 0].copy()
        self._ee_high = model.jnt_range[:4, 1].copy()
        self._step_scale = np.array([cfg.max_step] * 3 + [cfg.max_yaw_step])
        self.hole_half = PEG_HALF + cfg.clearance / 2
        self._hole_pos = np.zeros(3)
        self._hole_yaw = 0.0

        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(4,), dtype=np.float32)
        f32 = dict(dtype=np.float32)
        # Bounds are loose but finite (positions within the 1 m cube around the table's centre).
        pi = np.float32(math.pi)
        spaces: dict[str, gym.Space] = {
            "ee_pos": gym.spaces.Box(-1.0, 1.0, shape=(3,), **f32),
            "ee_yaw": gym.spaces.Box(-pi, pi, shape=(1,), **f32),
            "peg_tip_pos": gym.spaces.Box(-1.0, 1.0, shape=(3,), **f32),
            "peg_quat": gym.spaces.Box(-1.0, 1.0, shape=(4,), **f32),
            "hole_pos": gym.spaces.Box(-1.0, 1.0, shape=(3,), **f32),
            "hole_yaw": gym.spaces.Box(-pi, pi, shape=(1,), **f32),
            "tip_to_hole": gym.spaces.Box(-1.0, 1.0, shape=(3,), **f32),
        }
        if cfg.obs_mode == "image":
            spaces["image"] = gym.spaces.Box(0, 255, shape=(cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
        self.observation_space = gym.spaces.Dict(spaces)
        self._success = False

    # --- state accessors (used by the expert and tests) ------------------------------------------------------
    @property
    def hole_pose(self) -> tuple[np.ndarray, float]:
        """Centre of the hole's top opening (world) and the hole's yaw."""
        return self._hole_pos.copy(), self._hole_yaw

    @property
    def tip_pos(self) -> np.ndarray:
        return self.data.site_xpos[self._tip_site].copy()

    def set_state(self, ee: np.ndarray, hole_xy: np.ndarray, hole_yaw: float) -> None:
        """Place the end effector (x, y, z, yaw) at rest and the hole (xy, yaw); peg straight in its grasp."""
        mujoco.mj_resetData(self.model, self.data)
        self._hole_pos = np.array([hole_xy[0], hole_xy[1], HOLE_TOP])
        self._hole_yaw = float(hole_yaw)
        self.data.mocap_pos[self._hole_mocap] = [hole_xy[0], hole_xy[1], 0.0]
        self.data.mocap_quat[self._hole_mocap] = [math.cos(hole_yaw / 2), 0.0, 0.0, math.sin(hole_yaw / 2)]
        self.data.qpos[:4] = ee
        self.data.ctrl[:] = ee
        mujoco.mj_forward(self.model, self.data)
        self._success = self._is_success()

    # --- gymnasium API ---------------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        super().reset(seed=seed)
        rng = self.np_random
        r, yr = self.config.hole_xy_range, self.config.hole_yaw_range
        hole_xy = rng.uniform(-r, r, size=2)
        hole_yaw = rng.uniform(-yr, yr)
        ee_xy = rng.uniform(-0.15, 0.15, size=2)
        tip_z = rng.uniform(0.10, 0.15)
        ee = np.array([ee_xy[0], ee_xy[1], tip_z + PEG_LENGTH, rng.uniform(-0.3, 0.3)])
        self.set_state(ee, hole_xy, hole_yaw)
        self._steps = 0
        return self._obs(), {"success": self._success}

    def step(self, action: np.ndarray) -> tuple[dict, float, bool, bool, dict]:
        a = np.clip(np.asarray(action, dtype=np.float64).reshape(4), -1.0, 1.0)
        target = np.clip(self.data.qpos[:4] + a * self._step_scale, self._ee_low, self._ee_high)
        self.data.ctrl[:] = target
        mujoco.mj_step(self.model, self.data, nstep=self.n_substeps)
        # mj_step leaves positions one substep stale; refresh them so observations match qpos.
        mujoco.mj_kinematics(self.model, self.data)
        self._success = self._is_success()
        if self.config.reward_type == "sparse":
            reward = 1.0 if self._success else 0.0
        else:
            reward = self._dense_reward()
        truncated = self._tick()
        terminated = self._success and self.config.terminate_on_success
        return self._obs(), reward, terminated, truncated, {"success": self._success}

    # --- task logic ------------------------------------------------------------------------------------------
    def _tip_in_hole_frame(self) -> np.ndarray:
        d = self.data.site_xpos[self._tip_site] - self._hole_pos
        c, s = math.cos(self._hole_yaw), math.sin(self._hole_yaw)
        return np.array([c * d[0] + s * d[1], -s * d[0] + c * d[1], d[2]])

    def _is_success(self) -> bool:
        local = self._tip_in_hole_frame()
        inside = abs(local[0]) <= self.hole_half and abs(local[1]) <= self.hole_half
        return bool(inside and -local[2] >= self.config.success_depth * HOLE_DEPTH)

    def _dense_reward(self) -> float:
        """Reach a point 1 cm above the hole, align xy and yaw, then go deep; 1.0 on success.

        Weights: 0.3 for reaching, 0.2 for xy+yaw alignment at the opening, 0.5 for the inserted depth fraction.
        Each term is in [0, 1], so the total stays in [0, 1] and success is the unique maximum.
        """
        if self._success:
            return 1.0
        local = self._tip_in_hole_frame()
        reach = 1.0 - math.tanh(10.0 * math.sqrt(local[0] ** 2 + local[1] ** 2 + (local[2] - 0.01) ** 2))
        dxy = math.hypot(local[0], local[1])
        yaw_err = abs(yaw_error(self._hole_yaw, float(self.data.qpos[3])))
        align = (1.0 - math.tanh(200.0 * dxy)) * (1.0 - math.tanh(10.0 * yaw_err))
        depth = min(max(-local[2] / HOLE_DEPTH, 0.0), 1.0) if dxy < self.hole_half else 0.0
        return 0.3 * reach + 0.2 * align + 0.5 * depth

    def _obs(self) -> dict[str, np.ndarray]:
        q = self.data.qpos
        tip = self.data.site_xpos[self._tip_site]
        obs = {
            "ee_pos": np.array(q[:3], dtype=np.float32),
            "ee_yaw": np.array(q[3:4], dtype=np.float32),
            "peg_tip_pos": tip.astype(np.float32),
            "peg_quat": self.data.xquat[self._peg_body].astype(np.float32),
            "hole_pos": self._hole_pos.astype(np.float32),
            "hole_yaw": np.array([self._hole_yaw], dtype=np.float32),
            "tip_to_hole": (self._hole_pos - tip).astype(np.float32),
        }
        if self.config.obs_mode == "image":
            obs["image"] = self._render_camera_image(self.config.image_size, "front")
        return obs


def make_env(**overrides: Any) -> PegInsertEnv:
    """Factory used by ``sim.make("peg_insert", **overrides)``; returns the raw env (time limit inside)."""
    return PegInsertEnv(**overrides)
