"""``robolearn collect``: scripted-expert rollouts appended to an episode store.

Each rollout runs in a worker (or in-process with ``workers=1``) and comes back whole; the main process is the
only writer and appends each kept episode atomically. Killing the command at any moment therefore loses only
the rollouts in flight. Re-running it appends to the same store, continuing after the last seed used.
"""
from __future__ import annotations

import contextlib
import errno
import multiprocessing as mp
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from omegaconf import DictConfig, OmegaConf

from robolearn.cli import CLIError, print_json
from robolearn.data import EpisodeStore, KeySpec

# Per-process state of a worker: one environment and the settings to build experts.
_WORKER: dict[str, Any] = {}


def schema_for(env: Any) -> dict[str, KeySpec]:
    """Episode-store schema from an environment's spaces: every observation key, the action, the reward."""
    import gymnasium as gym

    space = env.observation_space
    if not isinstance(space, gym.spaces.Dict):
        raise CLIError(f"collect needs a Dict observation space, the environment has {type(space).__name__}")
    schema = {k: KeySpec(tuple(s.shape), str(s.dtype), "obs") for k, s in space.spaces.items()}
    if "action" in schema or "reward" in schema:
        raise CLIError("the environment has an observation named 'action' or 'reward', which the store reserves")
    schema["action"] = KeySpec(tuple(env.action_space.shape), str(env.action_space.dtype), "action")
    schema["reward"] = KeySpec((), "float32", "reward")
    return schema


def rollout(env: Any, expert: Any, seed: int, post_success_steps: int) -> tuple[dict[str, np.ndarray], bool]:
    """One expert episode: observations before each action, the action, the reward it earned."""
    obs, info = env.reset(seed=seed)
    expert.reset(env)
    rows: dict[str, list[np.ndarray]] = {k: [] for k in obs}
    actions, rewards = [], []
    success, since = bool(info.get("success", False)), 0
    while True:
        action = np.asarray(expert.act(obs), dtype=env.action_space.dtype)
        for k, v in obs.items():
            rows[k].append(np.asarray(v))
        actions.append(action)
        obs, reward, terminated, truncated, info = env.step(action)
        rewards.append(np.float32(reward))
        if info.get("success", False):
            success = True
        if success:
            since += 1
        if terminated or truncated or (success and since > post_success_steps):
            break
    episode = {k: np.stack(v) for k, v in rows.items()}
    episode["action"] = np.stack(actions)
    episode["reward"] = np.asarray(rewards, dtype=np.float32)
    return episode, success


def _worker_init(task: str, env_overrides: dict[str, Any], noise: float, post_success_steps: int) -> None:
    import sim

    _WORKER.update(env=sim.make(task, **env_overrides), task=task, noise=noise, post=post_success_steps)


def _worker_run(seed: int) -> tuple[int, dict[str, np.ndarray], bool]:
    import sim

    expert = sim.make_expert(_WORKER["task"], noise=_WORKER["noise"], seed=seed)
    episode, success = rollout(_WORKER["env"], expert, seed, _WORKER["post"])
    return seed, episode, success


def _results(cfg: DictConfig, seeds: Iterator[int], env_overrides: dict[str, Any]) -> Iterator[tuple[int, dict, bool]]:
    init_args = (cfg.task, env_overrides, float(cfg.expert.noise), int(cfg.post_success_steps))
    if cfg.workers <= 1:
        _worker_init(*init_args)
        for s in seeds:
            yield _worker_run(s)
        return
    ctx = mp.get_context("spawn")  # MuJoCo/EGL and torch state do not survive fork reliably
    with ctx.Pool(int(cfg.workers), initializer=_worker_init, initargs=init_args) as pool:
        yield from pool.imap_unordered(_worker_run, seeds, chunksize=1)


def run(cfg: DictConfig) -> dict[str, Any]:
    import sim
    from tqdm import tqdm

    if cfg.episodes < 1:
        raise CLIError(f"episodes must be >= 1, got {cfg.episodes}")
    if cfg.workers < 1:
        raise CLIError(f"workers must be >= 1, got {cfg.workers}")
    env_overrides = OmegaConf.to_container(cfg.env, resolve=True) or {}
    try:
        probe = sim.make(cfg.task, **env_overrides)  # fail fast: unknown task, bad override
        sim.make_expert(cfg.task, noise=float(cfg.expert.noise), seed=0)
    except (ValueError, TypeError, KeyError) as e:
        raise CLIError(str(e).strip("'\"")) from None
    unwrapped = probe.unwrapped
    schema = schema_for(probe)
    fps = getattr(unwrapped, "fps", None)
    env_config = unwrapped.env_config() if hasattr(unwrapped, "env_config") else dict(env_overrides)
    probe.close()

    out = Path(cfg.out or f"data/{cfg.task}.zarr")
    store = EpisodeStore.open_or_create(
        out, schema, fps=fps, task=cfg.task, env_config=env_config,
        attrs={"source": {"kind": "scripted_expert", "noise": float(cfg.expert.noise)}},
    )
    state = dict(store.attrs.get("collect") or {})
    first_seed = max(int(cfg.seed), int(state.get("next_seed", cfg.seed)))
    max_attempts = int(cfg.max_attempts) if cfg.max_attempts is not None else 4 * int(cfg.episodes) + 10
    start_episodes, start_steps = store.n_episodes, store.n_steps

    def seeds() -> Iterator[int]:
        yield from range(first_seed, first_seed + max_attempts)

    kept = attempts = successes = 0
    t0 = time.perf_counter()
    bar = tqdm(total=int(cfg.episodes), desc=f"collect {cfg.task}", unit="ep", disable=not cfg.progress)
    interrupted = False
    failure: OSError | None = None
    try:
        for seed, episode, success in _results(cfg, seeds(), env_overrides):
            attempts += 1
            successes += int(success)
            if success or cfg.keep_failures:
                # Record the seed as used before the episode lands: a crash in between skips a seed, never
                # duplicates an episode.
                state["next_seed"] = max(seed + 1, int(state.get("next_seed", 0)))
                store.update_attrs({"collect": dict(state)})
                store.append_episode(episode)
                kept += 1
                bar.update(1)
            bar.set_postfix(success=f"{successes / attempts:.2f}", attempts=attempts)
            if kept >= cfg.episodes:
                break
    except KeyboardInterrupt:
        interrupted = True
    except OSError as e:  # a full disk, ...: every episode committed before it is safe, and is reported
        failure = e
    finally:
        bar.close()
        # What the store holds, read back from it: an error after an episode's commit point still counts it.
        with contextlib.suppress(Exception):
            store.refresh()
        total_episodes, total_steps = store.n_episodes, store.n_steps
        store.close()
    added = total_episodes - start_episodes
    summary = {
        "task": cfg.task,
        "out": str(out),
        "episodes": added,
        "store_episodes": total_episodes,
        "previous_episodes": start_episodes,
        "steps": total_steps - start_steps,
        "attempts": attempts,
        "success_rate": round(successes / attempts, 4) if attempts else 0.0,
        "seconds": round(time.perf_counter() - t0, 2),
        "interrupted": interrupted,
    }
    if failure is not None:
        where = f" ({failure.filename})" if failure.filename else ""
        summary["error"] = f"{(failure.strerror or str(failure)).lower()}{where}"
        print(f"{added} episodes ({summary['steps']} steps) added to {out}; it now holds {total_episodes}")
        print_json(summary)
        todo = "free some space, then" if failure.errno in (errno.ENOSPC, errno.EDQUOT) else "fix that, then"
        raise CLIError(
            f"collect stopped: {summary['error']} while writing {out}. The store is valid and holds "
            f"{total_episodes} episodes, {added} of them added by this run; {todo} run the same command again "
            f"to continue")
    if added < cfg.episodes and not interrupted:
        print(
            f"warning: only {added} of {cfg.episodes} episodes kept after {attempts} attempts "
            f"(raise max_attempts=, or keep_failures=true)"
        )
    print(f"{added} episodes ({summary['steps']} steps) added to {out}; it now holds {total_episodes}")
    print_json(summary)
    return summary
