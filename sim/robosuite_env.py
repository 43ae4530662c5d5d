"""robosuite tasks behind the project's gymnasium contract (see ``sim/registry.py``).

Why an adapter rather than robosuite's own ``GymWrapper``: the learning code wants robomimic-style *dict*
observations (``object``, ``robot0_eef_pos``, ...) as float32, images upright, ``info["success"]`` on every step,
a sparse reward by default, seeded resets that do not disturb the caller's global numpy RNG, and a config that the
episode store can save and replay. ``GymWrapper`` flattens observations and has none of the rest.

Choices worth knowing:

- **Episode length**: ``max_episode_steps`` 400 for lift, can and square (robomimic's evaluation horizon; the
  scripted experts finish in roughly 60 / 150 / 200 steps). robosuite's own horizon is disabled
  (``ignore_done=True``); the adapter raises ``truncated`` itself.
- **Termination**: ``terminated=True`` on success (``terminate_on_success=True``, the robomimic-eval and RL
  convention). Pass ``terminate_on_success=False`` to keep stepping after success.
- **Resets**: ``hard_reset=False`` (robosuite's default, ``True``, rebuilds the MuJoCo model on every reset:
  ~0.3 s instead of a few ms). Initial states are identical either way for a given seed.
- **Seeding**: robosuite samples object placements and joint noise from numpy's *global* RNG. Each adapter keeps
  its own ``RandomState`` and swaps it in around robosuite's reset, so ``reset(seed=s)`` is reproducible, later
  ``reset()`` calls continue a reproducible stream, and the caller's global RNG is left untouched. Model
  construction (which also samples, e.g. Lift's cube size) runs under a fixed seed, so two instances of the same
  config are the same model and give the same initial state for the same seed.
- **Rendering**: shadows and reflections are off (``shadows=False``, ``reflections=False``): with them, an 84x84
  camera costs several times more. ``render()`` uses a lazily created offscreen context (``render_camera``,
  ``render_size``) so environments that never render never create a GL context.
- **Start-up noise**: see :func:`_import_robosuite`.
"""
from __future__ import annotations

import copy
import difflib
import importlib.util
import logging
import os
import sys
import types
from typing import Any, Sequence

import gymnasium as gym
import numpy as np

# task name -> (robosuite env class, default max_episode_steps)
TASKS: dict[str, tuple[str, int]] = {
    "lift": ("Lift", 400),
    "can": ("PickPlaceCan", 400),
    "square": ("NutAssemblySquare", 400),
}
GENERIC_MAX_EPISODE_STEPS = 500

# robomimic's low-dim observation keys (robosuite name -> our name)
DEFAULT_OBS_KEYS: tuple[str, ...] = ("object", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos")
_RENAME = {"object": "object-state"}

# Messages robosuite logs on every import that say nothing about the user's run.
_QUIET_MESSAGES = (
    "No private macro file found",
    "It is recommended to use a private macro file",
    "To setup, run:",
    "Could not import robosuite_models",
    "Could not load the mink-based whole-body IK",
)


class _DropKnownNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(m in msg for m in _QUIET_MESSAGES)


def _import_robosuite() -> types.ModuleType:
    """Import robosuite quietly and return it.

    - The macro-file / robosuite_models / mink warnings are dropped by a filter on robosuite's logger, installed
      *before* the import (the logger keeps its filters when robosuite configures it). Nothing is written to
      site-packages. Other robosuite warnings still show; its per-make INFO lines ("Loading controller
      configuration ...") are hidden by raising the logger to WARNING.
    - numba stays on (robosuite's default, with its on-disk cache ``CACHE_NUMBA=True``): the first step in a fresh
      venv compiles for ~8 s once, later processes load the cache in well under a second, and stepping is faster
      than pure Python. ``ROBOLEARN_ROBOSUITE_NUMBA=0`` turns numba off for this process (no compile at all, slower
      steps) by providing robosuite's ``macros_private`` in memory, unless the user has a real
      ``macros_private.py``, which then wins.
    """
    logger = logging.getLogger("robosuite_logs")
    if "robosuite" in sys.modules:  # imported before us: at least keep make() quiet
        logger.setLevel(max(logger.level, logging.WARNING))
        return sys.modules["robosuite"]
    os.environ.setdefault("MUJOCO_GL", "egl")
    if not any(isinstance(f, _DropKnownNoise) for f in logger.filters):
        logger.addFilter(_DropKnownNoise())
    if os.environ.get("ROBOLEARN_ROBOSUITE_NUMBA", "1").lower() in ("0", "false", "no", "off"):
        spec = importlib.util.find_spec("robosuite")
        has_private = spec is not None and any(
            os.path.exists(os.path.join(p, "macros_private.py")) for p in (spec.submodule_search_locations or [])
        )
        if not has_private:
            private = types.ModuleType("robosuite.macros_private")
            private.ENABLE_NUMBA = False  # type: ignore[attr-defined]
            sys.modules["robosuite.macros_private"] = private
    import robosuite

    logger.setLevel(logging.WARNING)
    return robosuite


def available_robosuite_envs() -> list[str]:
    rs = _import_robosuite()
    return sorted(rs.ALL_ENVIRONMENTS)


def _size2(value: int | Sequence[int], key: str) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)):
        return int(value), int(value)
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[0]), int(value[1])
    raise ValueError(f"{key} must be an int or [height, width], got {value!r}")


# Every override the adapter accepts, with its default. ``None`` defaults are filled per task.
_DEFAULTS: dict[str, Any] = {
    "robots": "Panda",
    "obs_keys": None,  # None -> DEFAULT_OBS_KEYS; else a list of robosuite observation names ("object" allowed)
    "camera_names": [],  # e.g. ["agentview", "robot0_eye_in_hand"] -> keys "<name>_image"
    "camera_size": 84,  # int or [height, width]
    "reward_type": "sparse",  # "sparse" (1.0 on success) or "dense" (robosuite's shaped reward)
    "max_episode_steps": None,
    "terminate_on_success": True,
    "control_freq": 20,
    "hard_reset": False,
    "render_camera": "agentview",
    "render_size": 256,  # int or [height, width]
    "shadows": False,
    "reflections": False,
    "robosuite_kwargs": {},  # passed to robosuite.make as they are (e.g. {"initialization_noise": null})
}


class RobosuiteEnv(gym.Env):
    """One robosuite environment with dict float32 observations, ``info["success"]`` and seeded resets."""

    metadata = {"render_modes": ["rgb_array"]}
    render_mode = "rgb_array"

    def __init__(self, env_name: str, task_name: str | None = None, **overrides: Any) -> None:
        bad = sorted(set(overrides) - set(_DEFAULTS))
        if bad:
            hints = [difflib.get_close_matches(b, list(_DEFAULTS), n=1) for b in bad]
            hint = "".join(f" Did you mean {h[0]!r} for {b!r}?" for b, h in zip(bad, hints) if h)
            raise ValueError(
                f"unknown override(s) {', '.join(map(repr, bad))} for {task_name or env_name}.{hint} "
                f"Valid overrides: {', '.join(sorted(_DEFAULTS))}"
            )
        rs = _import_robosuite()
        if env_name not in rs.ALL_ENVIRONMENTS:
            close = difflib.get_close_matches(env_name, list(rs.ALL_ENVIRONMENTS), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"unknown robosuite environment {env_name!r}.{hint} Available: {', '.join(sorted(rs.ALL_ENVIRONMENTS))}"
            )
        cfg = copy.deepcopy(_DEFAULTS)
        cfg.update(copy.deepcopy(overrides))
        default_steps = next((s for e, s in TASKS.values() if e == env_name), GENERIC_MAX_EPISODE_STEPS)
        if cfg["max_episode_steps"] is None:
            cfg["max_episode_steps"] = default_steps
        if cfg["obs_keys"] is None:
            cfg["obs_keys"] = list(DEFAULT_OBS_KEYS)
        if cfg["reward_type"] not in ("sparse", "dense"):
            raise ValueError(f"reward_type must be 'sparse' or 'dense', got {cfg['reward_type']!r}")
        if isinstance(cfg["camera_names"], str):
            cfg["camera_names"] = [cfg["camera_names"]]
        if int(cfg["max_episode_steps"]) < 1:
            raise ValueError(f"max_episode_steps must be >= 1, got {cfg['max_episode_steps']!r}")
        self._cfg = cfg
        self.task_name = task_name or f"robosuite/{env_name}"
        self.env_name = env_name
        self.max_episode_steps = int(cfg["max_episode_steps"])
        self.fps = int(cfg["control_freq"])
        self._cam_h, self._cam_w = _size2(cfg["camera_size"], "camera_size")
        self._render_h, self._render_w = _size2(cfg["render_size"], "render_size")
        cams = list(cfg["camera_names"])

        kwargs: dict[str, Any] = dict(
            robots=cfg["robots"],
            has_renderer=False,
            has_offscreen_renderer=bool(cams),
            use_camera_obs=bool(cams),
            camera_names=cams if cams else "agentview",
            camera_heights=self._cam_h,
            camera_widths=self._cam_w,
            reward_shaping=cfg["reward_type"] == "dense",
            reward_scale=1.0,
            control_freq=self.fps,
            hard_reset=bool(cfg["hard_reset"]),
            ignore_done=True,
            horizon=10**9,
        )
        kwargs.update(cfg["robosuite_kwargs"])
        self.robosuite_make_kwargs = kwargs  # what robosuite.make got (sim/bench.py makes a raw twin from it)
        # Model construction draws from numpy's global RNG too (Lift's cube size, for one) and robosuite.make
        # resets once; fix that stream so every instance of a config is the same model.
        self._rng = np.random.RandomState(0)
        self.rs_env = self._with_rng(lambda: rs.make(env_name, **copy.deepcopy(kwargs)))
        self._rng = np.random.RandomState()
        self._t = 0
        self._render_ctx = None

        raw = self.rs_env.observation_spec()
        self._keys: list[tuple[str, str]] = []  # (our key, robosuite key)
        for k in cfg["obs_keys"]:
            rk = _RENAME.get(k, k)
            if rk not in raw:
                raise ValueError(
                    f"observation key {k!r} not produced by {env_name}. Available: {', '.join(sorted(raw))}"
                )
            self._keys.append((k, rk))
        self._image_keys = [(f"{c}_image", f"{c}_image") for c in cams]
        spaces: dict[str, gym.spaces.Space] = {}
        for k, rk in self._keys:
            spaces[k] = gym.spaces.Box(-np.inf, np.inf, shape=np.shape(raw[rk]), dtype=np.float32)
        for k, _ in self._image_keys:
            spaces[k] = gym.spaces.Box(0, 255, shape=(self._cam_h, self._cam_w, 3), dtype=np.uint8)
        self.observation_space = gym.spaces.Dict(spaces)
        low, high = self.rs_env.action_spec
        self.action_space = gym.spaces.Box(low.astype(np.float32), high.astype(np.float32), dtype=np.float32)
        self._set_render_flags()

    # -- contract -----------------------------------------------------------------------------------------------
    def env_config(self) -> dict[str, Any]:
        """JSON-able overrides that recreate this environment with ``sim.make(task_name, **env_config())``."""
        cfg = copy.deepcopy(self._cfg)
        for k in ("camera_size", "render_size"):
            if isinstance(cfg[k], tuple):
                cfg[k] = list(cfg[k])
        return cfg

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self._rng = np.random.RandomState(seed)
        raw = self._with_rng(self.rs_env.reset)
        self._t = 0
        self._set_render_flags()
        return self._obs(raw), {"success": bool(self.rs_env._check_success())}

    def step(self, action):
        action = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
        raw, reward, _, _ = self.rs_env.step(action)
        self._t += 1
        success = bool(self.rs_env._check_success())
        if self._cfg["reward_type"] == "sparse":
            reward = 1.0 if success else 0.0
        terminated = success and bool(self._cfg["terminate_on_success"])
        truncated = (not terminated) and self._t >= self.max_episode_steps
        return self._obs(raw), float(reward), terminated, truncated, {"success": success}

    def render(self) -> np.ndarray:
        sim = self.rs_env.sim
        if sim._render_context_offscreen is None:
            from robosuite.utils.binding_utils import MjRenderContextOffscreen

            ctx = MjRenderContextOffscreen(sim, device_id=-1)
            ctx.vopt.geomgroup[0] = 0  # collision geoms hidden, as robosuite does
            ctx.vopt.geomgroup[1] = 1
            self._set_render_flags()
        img = sim.render(width=self._render_w, height=self._render_h, camera_name=self._cfg["render_camera"])
        return np.ascontiguousarray(img[::-1])

    def close(self) -> None:
        env = getattr(self, "rs_env", None)
        if env is not None:
            env.close()
            self.rs_env = None

    # -- helpers ------------------------------------------------------------------------------------------------
    @property
    def sim(self):
        """robosuite's ``MjSim`` (for scripted experts that read true object poses)."""
        return self.rs_env.sim

    def _with_rng(self, fn):
        """Run ``fn`` with this env's RandomState as numpy's global RNG (robosuite samples from the global one)."""
        saved = np.random.get_state()
        np.random.set_state(self._rng.get_state())
        try:
            return fn()
        finally:
            self._rng.set_state(np.random.get_state())
            np.random.set_state(saved)

    def _obs(self, raw: dict[str, Any]) -> dict[str, np.ndarray]:
        out = {k: np.asarray(raw[rk], dtype=np.float32) for k, rk in self._keys}
        for k, rk in self._image_keys:
            out[k] = np.ascontiguousarray(raw[rk][::-1])  # robosuite renders OpenGL-style, bottom row first
        return out

    def _set_render_flags(self) -> None:
        ctx = self.rs_env.sim._render_context_offscreen
        if ctx is None:
            return
        import mujoco

        ctx.scn.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = int(bool(self._cfg["shadows"]))
        ctx.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = int(bool(self._cfg["reflections"]))


def make_robosuite(env_name: str, **overrides: Any) -> RobosuiteEnv:
    """Any robosuite environment (``sim.make("robosuite/Stack")``) with the project's conventions."""
    return RobosuiteEnv(env_name, task_name=f"robosuite/{env_name}", **overrides)


def make_lift(**overrides: Any) -> RobosuiteEnv:
    """Lift a cube 4 cm off the table (robosuite ``Lift``, Panda, OSC_POSE)."""
    return RobosuiteEnv(TASKS["lift"][0], task_name="lift", **overrides)


def make_can(**overrides: Any) -> RobosuiteEnv:
    """Move the can into its bin (robosuite ``PickPlaceCan``)."""
    return RobosuiteEnv(TASKS["can"][0], task_name="can", **overrides)


def make_square(**overrides: Any) -> RobosuiteEnv:
    """Put the square nut on the square peg (robosuite ``NutAssemblySquare``)."""
    return RobosuiteEnv(TASKS["square"][0], task_name="square", **overrides)
