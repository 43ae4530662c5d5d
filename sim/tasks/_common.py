"""Shared plumbing for the project's own MuJoCo tasks (``push_t``, ``peg_insert``).

Why a base class: both tasks obey the same environment contract (see ``sim/registry.py``) -- typed overrides
with clear errors, an internal time limit, lazy offscreen rendering with shadows and reflections off, and
``env_config()`` -- and writing that once keeps each task file about its physics and its reward.
"""
from __future__ import annotations

import atexit
import dataclasses
import difflib
import os
import weakref
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

# Must be set before mujoco picks an OpenGL backend: EGL renders headless with no extra packages.
os.environ.setdefault("MUJOCO_GL", "egl")

import gymnasium as gym  # noqa: E402
import mujoco  # noqa: E402
import numpy as np  # noqa: E402

ASSETS = Path(__file__).resolve().parent.parent / "assets"

C = TypeVar("C")

# Envs with open renderers, closed at exit: EGL contexts freed during interpreter teardown print spurious errors.
# The hook is registered after mujoco's EGL module (which terminates the display at exit) so that it runs first.
_LIVE_ENVS: "weakref.WeakSet[MujocoTaskEnv]" = weakref.WeakSet()
_EXIT_HOOK = False


def _close_all() -> None:
    for env in list(_LIVE_ENVS):
        try:
            env.close()
        except Exception:
            pass


def build_config(cls: type[C], task: str, overrides: dict[str, Any]) -> C:
    """Make the dataclass ``cls`` from keyword ``overrides``, naming any bad key or value type.

    A mistyped override silently ignored would produce a dataset of the wrong task variant, so unknown keys
    and values of the wrong type fail loudly, listing what is valid.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = get_type_hints(cls)
    clean: dict[str, Any] = {}
    for key, value in overrides.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"unknown override {key!r} for task {task}{hint}; valid: {', '.join(sorted(fields))}"
            )
        clean[key] = _coerce(task, key, value, hints[key])
    return cls(**clean)


def _coerce(task: str, key: str, value: Any, hint: Any) -> Any:
    """Accept ints for floats (JSON round trips), lists for tuples; reject everything else of the wrong type."""
    if hint is float and isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    if hint is bool and isinstance(value, (bool, np.bool_)):
        return bool(value)
    if hint is str and isinstance(value, str):
        return value
    raise TypeError(
        f"override {key!r} for task {task} must be {getattr(hint, '__name__', hint)}, "
        f"got {type(value).__name__} {value!r}"
    )


def check_choice(task: str, key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"override {key!r} for task {task} must be one of {choices}, got {value!r}")


class MujocoTaskEnv(gym.Env):
    """Base for a MuJoCo task: owns the model/data, the time limit, and lazy offscreen renderers.

    Subclasses set ``task_name`` and ``config`` (a dataclass of overrides) and implement ``reset`` and ``step``,
    calling ``_tick()`` once per step.
    The time limit lives inside (``truncated`` at ``max_episode_steps``) so that ``make_env`` can return the raw
    env: gymnasium's wrappers cost a noticeable share of a 100-microsecond step.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}
    task_name: str = ""

    def __init__(
        self,
        model: mujoco.MjModel,
        *,
        fps: float,
        max_episode_steps: int,
        render_mode: str | None,
        render_size: int,
        render_camera: str,
    ) -> None:
        self.model = model
        self.data = mujoco.MjData(model)
        control_dt = 1.0 / fps
        self.n_substeps = int(round(control_dt / model.opt.timestep))
        if abs(self.n_substeps * model.opt.timestep - control_dt) > 1e-9:
            raise ValueError(f"control period {control_dt} is not a multiple of timestep {model.opt.timestep}")
        self.fps = float(fps)
        self.max_episode_steps = int(max_episode_steps)
        self.metadata = {**self.metadata, "render_fps": self.fps}
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be 'rgb_array' or None, got {render_mode!r}")
        self.render_mode = render_mode
        self._render_size = int(render_size)
        self._render_camera = render_camera
        self._renderers: dict[int, mujoco.Renderer] = {}
        self._steps = 0

    # --- the contract ---------------------------------------------------------------------------------
    def env_config(self) -> dict[str, Any]:
        """JSON-able overrides that recreate this environment (stored with every dataset)."""
        return dataclasses.asdict(self.config)  # type: ignore[attr-defined]

    def render(self) -> np.ndarray:  # type: ignore[override]
        """RGB uint8 frame (render_size x render_size) from the task's default camera."""
        return self._render_camera_image(self._render_size, self._render_camera)

    def close(self) -> None:
        for renderer in self._renderers.values():
            renderer.close()
        self._renderers.clear()

    # --- helpers for subclasses -----------------------------------------------------------------------
    def _render_camera_image(self, size: int, camera: str) -> np.ndarray:
        renderer = self._renderers.get(size)
        if renderer is None:  # created lazily: low-dim stepping never pays for an OpenGL context
            renderer = mujoco.Renderer(self.model, height=size, width=size)
            # Shadows and reflections cost ~20x the rest of a small frame and add nothing to learning.
            renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
            renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
            self._renderers[size] = renderer
            _LIVE_ENVS.add(self)
            global _EXIT_HOOK
            if not _EXIT_HOOK:
                atexit.register(_close_all)
                _EXIT_HOOK = True
        renderer.update_scene(self.data, camera=camera)
        return renderer.render()

    def _tick(self) -> bool:
        """Count one control step; True when the time limit is reached."""
        self._steps += 1
        return self._steps >= self.max_episode_steps

    def __del__(self) -> None:  # renderers hold GL contexts; free them deterministically when possible
        try:
            self.close()
        except Exception:
            pass
