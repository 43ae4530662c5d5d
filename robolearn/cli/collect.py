"""``robolearn collect``: scripted-expert rollouts -- or a policy's, with ``policy=CHECKPOINT`` -- appended to an
episode store.

Each rollout runs in a worker (or in-process with ``workers=1``) and comes back whole; the main process is the
only writer and appends each kept episode atomically. Killing the command at any moment therefore loses only
the rollouts in flight. Re-running it appends to the same store, continuing after the last seed used.

``policy=CHECKPOINT`` records any registered policy kind (a residual-corrected one included: distillation of a
fine-tuned policy into a fresh chunk policy trains on these) in the environment config it was trained with (plus
``env.*``), through the same executor as ``robolearn eval`` (its per-step correction included), with the same
schema, atomicity, success filter and resumption. Episode ``seed`` draws its chunks' noise from ``(seed, 0, c)``,
so a rollout depends on its seed only, not on the number of workers; episodes land in seed order. An episode in which the policy returned a
non-finite chunk (held, never executed) counts as a failure.

Every episode records how it was made in its per-episode attributes (``source`` scripted | policy, ``expert`` and
``noise`` (and ``bias`` when set) or the ``policy`` checkpoint with its type and SHA-256, ``seed``, ``success``,
and ``env_config_changes`` where its environment differs from the store's): see :mod:`robolearn.data.provenance`.
Appending with other settings than the store's episodes were made with (``expert.noise``, ``expert.bias``,
``policy=``, an ``env.*`` override, or into a store of teleoperated episodes) is refused before any rollout, naming
each setting with the store's value and the new one, unless ``append_mismatch=allow`` -- demonstrations of
different quality in one store are usually an accident; on purpose, each episode says which it is and the store's
root ``source`` says "mixed".
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
from robolearn.data import EpisodeStore, KeySpec, provenance

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


def _expert_options(cfg: DictConfig) -> dict[str, float]:
    """The scripted expert's options: ``noise`` always, ``bias`` only when set (experts without it refuse it)."""
    opts = {"noise": float(cfg.expert.noise)}
    if float(cfg.expert.bias) != 0.0:
        opts["bias"] = float(cfg.expert.bias)
    return opts


def _worker_init(task: str, env_overrides: dict[str, Any], expert_options: dict[str, float],
                 post_success_steps: int, policy: Any = None) -> None:
    """``policy``: None (the scripted expert), a loaded policy (in-process) or its checkpoint path (a worker
    process loads its own copy, one torch thread: the workers are the parallelism)."""
    import sim

    if isinstance(policy, str):
        import torch

        from robolearn.cli.runtime import load_checkpoint

        torch.set_num_threads(1)
        policy = load_checkpoint(Path(policy))
    _WORKER.update(env=sim.make(task, **env_overrides), task=task, expert=expert_options, post=post_success_steps,
                   policy=policy)


def _worker_run(seed: int) -> tuple[int, dict[str, np.ndarray], bool]:
    import sim

    if _WORKER["policy"] is None:
        expert = sim.make_expert(_WORKER["task"], **_WORKER["expert"], seed=seed)
        episode, success = rollout(_WORKER["env"], expert, seed, _WORKER["post"])
        return seed, episode, success
    from robolearn.evaluation import PolicyActor

    actor = PolicyActor(_WORKER["policy"], noise_seed=seed, episode=0)  # the executor, corrector included
    episode, success = rollout(_WORKER["env"], actor, seed, _WORKER["post"])
    return seed, episode, success and actor.executor.nonfinite_chunks == 0


def _results(cfg: DictConfig, seeds: Iterator[int], env_overrides: dict[str, Any],
             policy: Any = None) -> Iterator[tuple[int, dict, bool]]:
    init_args = (cfg.task, env_overrides, _expert_options(cfg), int(cfg.post_success_steps))
    if cfg.workers <= 1:
        _worker_init(*init_args, policy)
        for s in seeds:
            yield _worker_run(s)
        return
    ctx = mp.get_context("spawn")  # MuJoCo/EGL and torch state do not survive fork reliably
    path = str(cfg.policy) if policy is not None else None
    with ctx.Pool(int(cfg.workers), initializer=_worker_init, initargs=(*init_args, path)) as pool:
        # In seed order (workers still run ahead): the store holds the same episodes in the same order whatever
        # the number of workers, and ``next_seed`` never skips a seed that was still in flight.
        yield from pool.imap(_worker_run, seeds, chunksize=1)


def _policy_source(cfg: DictConfig, env_overrides: dict[str, Any]) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """For ``policy=``: the loaded policy, the environment overrides to record it in (its training env config,
    then ``env.*``), and the store's ``source`` attribute. Refuses a policy of another task, and expert settings."""
    from robolearn.cli.runtime import checkpoint_run_config, load_checkpoint
    from robolearn.policies import checkpoint_digest

    path = Path(cfg.policy)
    given = [f"expert.{k}" for k, v in _expert_options(cfg).items() if v != 0.0]
    if given:
        raise CLIError(f"{' and '.join(given)} {'applies' if len(given) == 1 else 'apply'} to the scripted expert; "
                       "with policy= the policy acts (leave it out)")
    if not path.exists():
        raise CLIError(f"policy checkpoint {path} does not exist")
    policy = load_checkpoint(path)
    run_cfg = checkpoint_run_config(path)
    trained_on = run_cfg.get("task")
    if trained_on and trained_on != cfg.task:
        raise CLIError(f"policy {path} was trained on task {trained_on!r}, not {cfg.task!r} (pass task={trained_on})")
    overrides = {**(run_cfg.get("env_config") or {}), **env_overrides}
    source = {"kind": "policy", "checkpoint": str(path.resolve()), "policy_type": policy.policy_type,
              "sha256": checkpoint_digest(path)}
    return policy, overrides, source


def _check_append(cfg: DictConfig, store: EpisodeStore, source: dict[str, Any],
                  env_config: dict[str, Any]) -> dict[str, Any]:
    """Refuse (closing the store) to mix episodes made otherwise than the store's unless ``append_mismatch=allow``;
    return the provenance attributes every new episode carries."""
    prov = provenance.root_to_provenance(source)
    base_env = store.env_config if store.is_robolearn else None
    differing, mismatches = provenance.append_mismatches(store.all_episode_attrs(), store.attrs.get("source"),
                                                         base_env, prov, env_config)
    if mismatches and cfg.append_mismatch != "allow":
        path, n = store.path, store.n_episodes
        store.close()
        names = {m["setting"] for m in mismatches}
        tag = (f"noise{float(cfg.expert.noise):g}" if "expert.noise" in names
               else f"bias{float(cfg.expert.bias):g}" if "expert.bias" in names
               else prov.get("source", "new") if names & {"source", "policy"} else "env")
        other = path.with_name(f"{path.stem}_{tag}{path.suffix}")
        raise CLIError(provenance.mismatch_message(path, n, differing, mismatches, f"out={other}"))
    changes = provenance.env_changes(env_config, base_env) if base_env is not None else {}
    return {**prov, **({"env_config_changes": changes} if changes else {})}


def run(cfg: DictConfig) -> dict[str, Any]:
    import sim

    from robolearn.progress import progress_bar

    if cfg.episodes < 1:
        raise CLIError(f"episodes must be >= 1, got {cfg.episodes}")
    if cfg.workers < 1:
        raise CLIError(f"workers must be >= 1, got {cfg.workers}")
    if cfg.append_mismatch not in ("refuse", "allow"):
        raise CLIError(f"append_mismatch must be refuse or allow, got {cfg.append_mismatch!r}")
    env_overrides = OmegaConf.to_container(cfg.env, resolve=True) or {}
    policy = None
    source: dict[str, Any] = {"kind": "scripted_expert", **_expert_options(cfg)}
    facts: dict[str, Any] = {}  # per-episode attributes that are not provenance
    if cfg.policy:
        policy, env_overrides, source = _policy_source(cfg, env_overrides)
    try:
        probe = sim.make(cfg.task, **env_overrides)  # fail fast: unknown task, bad override
        if policy is None:
            expert = sim.make_expert(cfg.task, **_expert_options(cfg), seed=0)
            source["expert"] = facts["expert"] = type(expert).__name__
    except (ValueError, TypeError, KeyError) as e:
        raise CLIError(str(e).strip("'\"")) from None
    if policy is not None:
        from robolearn.cli.runtime import check_fit

        try:
            check_fit(cfg.task, probe, policy)  # the policy's observations and action size against the task's
        except CLIError:
            probe.close()
            raise
    unwrapped = probe.unwrapped
    schema = schema_for(probe)
    fps = getattr(unwrapped, "fps", None)
    env_config = unwrapped.env_config() if hasattr(unwrapped, "env_config") else dict(env_overrides)
    probe.close()

    out = Path(cfg.out or f"data/{cfg.task}.zarr")
    store = EpisodeStore.open_or_create(
        out, schema, fps=fps, task=cfg.task, env_config=env_config, env_config_must_match=False,
        attrs={"source": source},
    )
    episode_attrs = {**_check_append(cfg, store, source, env_config), **facts}
    state = dict(store.attrs.get("collect") or {})
    first_seed = max(int(cfg.seed), int(state.get("next_seed", cfg.seed)))
    max_attempts = int(cfg.max_attempts) if cfg.max_attempts is not None else 4 * int(cfg.episodes) + 10
    start_episodes, start_steps = store.n_episodes, store.n_steps

    def seeds() -> Iterator[int]:
        yield from range(first_seed, first_seed + max_attempts)

    kept = attempts = successes = 0
    t0 = time.perf_counter()
    bar = progress_bar(int(cfg.episodes), desc=f"collect {cfg.task}", unit="ep", disable=not cfg.progress)
    interrupted = False
    failure: OSError | None = None
    try:
        for seed, episode, success in _results(cfg, seeds(), env_overrides, policy):
            attempts += 1
            successes += int(success)
            if success or cfg.keep_failures:
                # Record the seed as used before the episode lands: a crash in between skips a seed, never
                # duplicates an episode.
                state["next_seed"] = max(seed + 1, int(state.get("next_seed", 0)))
                store.update_attrs({"collect": dict(state)})
                store.append_episode(episode, attrs={**episode_attrs, "seed": seed, "success": bool(success)})
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
    if cfg.policy:
        summary["policy"] = str(cfg.policy)
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
