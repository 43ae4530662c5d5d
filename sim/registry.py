"""Task registry: one name -> one factory, imported lazily so robosuite loads only when asked for.

Every environment made here follows the same contract (see ``../shared/DESIGN.md``):

- gymnasium API, ``Dict`` observation space of float32 arrays (uint8 HxWx3 for camera images);
- continuous ``Box`` action space;
- ``info["success"]`` (bool) on every ``step`` and ``reset``;
- sparse reward by default (1.0 on success, else 0.0), ``reward_type="dense"`` for shaping;
- a time limit (``max_episode_steps``), ``reset(seed=...)`` reproducible;
- ``render()`` returns an RGB ``uint8`` frame;
- ``env.unwrapped.fps`` (control rate, Hz) and ``env.unwrapped.env_config()`` (a JSON-able dict of the
  overrides that recreate the environment) so that the episode store can record both.
"""
from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable

import gymnasium as gym

# name -> "module:callable". Factories take keyword overrides and return a gymnasium.Env.
_TASKS: dict[str, str] = {
    "push_t": "sim.tasks.push_t:make_env",
    "peg_insert": "sim.tasks.peg_insert:make_env",
    "lift": "sim.robosuite_env:make_lift",
    "can": "sim.robosuite_env:make_can",
    "square": "sim.robosuite_env:make_square",
}
# name -> "module:callable" for scripted experts: callable(noise=..., seed=..., **kw) -> Expert
_EXPERTS: dict[str, str] = {
    "push_t": "sim.experts.push_t:PushTExpert",
    "peg_insert": "sim.experts.peg_insert:PegInsertExpert",
    "lift": "sim.experts.robosuite_experts:LiftExpert",
    "can": "sim.experts.robosuite_experts:CanExpert",
    "square": "sim.experts.robosuite_experts:SquareExpert",
}


def register(name: str, target: str | Callable[..., gym.Env]) -> None:
    """Add a task: ``target`` is a factory or a ``"module:callable"`` string."""
    _TASKS[name] = target  # type: ignore[assignment]


def available_tasks() -> list[str]:
    return sorted(_TASKS) + ["robosuite/<EnvName>"]


def _load(target: str | Callable[..., Any]) -> Callable[..., Any]:
    if callable(target):
        return target
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def _unknown(kind: str, name: str, known: list[str]) -> ValueError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown {kind} {name!r}.{hint} Available: {', '.join(known)}")


def make(name: str, **overrides: Any) -> gym.Env:
    """Make task ``name`` with keyword ``overrides`` (e.g. ``reward_type="dense"``)."""
    if name.startswith("robosuite/"):
        from sim.robosuite_env import make_robosuite

        return make_robosuite(name.split("/", 1)[1], **overrides)
    if name not in _TASKS:
        raise _unknown("task", name, available_tasks())
    return _load(_TASKS[name])(**overrides)


def make_expert(name: str, **kwargs: Any) -> Any:
    """The scripted expert for task ``name``: ``expert.reset(env)``, then ``expert.act(obs) -> action``."""
    if name not in _EXPERTS:
        raise _unknown("expert for task", name, sorted(_EXPERTS))
    return _load(_EXPERTS[name])(**kwargs)


def _register_with_gymnasium() -> None:
    for name in list(_TASKS):
        env_id = f"robolearn/{name}-v0"
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=_TASKS[name])


_register_with_gymnasium()
