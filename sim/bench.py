"""Environment throughput: how many control steps per second a task runs at, and what the adapter costs.

For robosuite tasks the same run also steps a *raw* robosuite environment made with exactly the keyword arguments
the adapter gave ``robosuite.make``. The two are stepped in alternating blocks of 50 steps (alternating which goes
first) so that load from other processes hits both alike; ``overhead_pct`` is the adapter's extra time per step
relative to raw robosuite. The adapter's own work per step (float32 copies, ``_check_success``) measures 5-30 us
against ~10 ms for a robosuite step, so readings of a few percent either way are machine noise.

Both loops send the same uniform random actions and reset when an episode ends (the adapter: terminated or
truncated; raw robosuite: every ``max_episode_steps`` steps). Reset time is included in both.
"""
from __future__ import annotations

import copy
import platform
import time
from typing import Any

import numpy as np

_BLOCK = 50  # small alternating blocks: load from other processes hits both loops alike


def bench_env(task: str, steps: int = 2000, seed: int = 0, **overrides: Any) -> dict[str, Any]:
    """Step ``task`` for ``steps`` random actions; returns ``steps_per_s`` (and raw robosuite numbers if any)."""
    from sim.registry import make

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t0 = time.perf_counter()
    env = make(task, **overrides)
    make_s = time.perf_counter() - t0
    base = env.unwrapped
    rng = np.random.default_rng(seed)
    space = env.action_space
    low, high = np.broadcast_to(space.low, space.shape), np.broadcast_to(space.high, space.shape)
    actions = rng.uniform(low, high, size=(steps, *space.shape)).astype(space.dtype)

    raw_env = None
    kwargs = getattr(base, "robosuite_make_kwargs", None)
    if kwargs is not None:
        from sim.robosuite_env import _import_robosuite

        raw_env = _import_robosuite().make(base.env_name, **copy.deepcopy(kwargs))

    t0 = time.perf_counter()
    env.reset(seed=seed)
    reset_s = time.perf_counter() - t0
    if raw_env is not None:
        np.random.seed(seed)
        raw_env.reset()
    horizon = int(getattr(base, "max_episode_steps", 10**9))
    t_adapter = t_raw = 0.0
    episodes = 0
    raw_t = 0
    def run_adapter(block: np.ndarray) -> float:
        nonlocal episodes
        t0 = time.perf_counter()
        for a in block:
            _, _, term, trunc, _ = env.step(a)
            if term or trunc:
                env.reset()
                episodes += 1
        return time.perf_counter() - t0

    def run_raw(block: np.ndarray) -> float:
        nonlocal raw_t
        t0 = time.perf_counter()
        for a in block:
            raw_env.step(a.astype(np.float64))
            raw_t += 1
            if raw_t >= horizon:
                raw_env.reset()
                raw_t = 0
        return time.perf_counter() - t0

    for i, start in enumerate(range(0, steps, _BLOCK)):
        block = actions[start : start + _BLOCK]
        if raw_env is None:
            t_adapter += run_adapter(block)
        elif i % 2 == 0:  # alternate which loop goes first
            t_adapter += run_adapter(block)
            t_raw += run_raw(block)
        else:
            t_raw += run_raw(block)
            t_adapter += run_adapter(block)
    env.close()
    out: dict[str, Any] = {
        "task": task,
        "steps": steps,
        "steps_per_s": round(steps / t_adapter, 2),
        "episodes": episodes,
        "make_s": round(make_s, 3),
        "reset_s": round(reset_s, 4),
        "fps": getattr(base, "fps", None),
        "overrides": overrides,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }
    if raw_env is not None:
        raw_env.close()
        out["raw_steps_per_s"] = round(steps / t_raw, 2)
        out["overhead_pct"] = round((t_adapter / t_raw - 1.0) * 100.0, 2)
    return out


if __name__ == "__main__":  # python -m sim.bench lift 2000
    import json
    import sys

    print(json.dumps(bench_env(sys.argv[1] if len(sys.argv) > 1 else "lift", int(sys.argv[2]) if len(sys.argv) > 2 else 2000)))
