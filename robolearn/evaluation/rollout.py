"""Evaluation rollouts of any chunk policy in any environment (diffusion_policy's environment-runner role).

:func:`evaluate` runs one episode per seed in a batch of environments, driving the policy through the
:class:`~robolearn.policies.executor.ChunkExecutor` (histories, executable slices, seeded noise per chunk, the
correction hook), and returns success, returns and per-episode results.

Reproducible by construction: episode ``j`` starts from ``env.reset(seed=seeds[j])``, its chunk ``c`` draws the
noise of ``(noise_seed, j, c)``, and each chunk is computed in its own call (``batch_invariant``), so episode ``j``
is the same whatever the number of environments or worker processes, and whichever environment ran it. (An
evaluation that batched chunks would be faster but not repeatable: the U-Net's batched products round differently
with the batch size.) Every environment runs episodes in turn from one shared list, so short episodes do not bias the
count (a fixed quota per environment would do the same; "the first N to finish" would favour short ones).

Environments: any vector environment with gymnasium 1.x's ``VectorEnv`` contract (``sim.vector``'s, or
gymnasium's own ``SyncVectorEnv``/``AsyncVectorEnv``), in same-step or disabled autoreset mode: a finished
environment is reset (``reset(seed=[...], options={"reset_mask": mask})``) with its next episode's seed. A
zero-argument factory of one environment works too (it runs in this process).

Non-finite actions: a chunk holding NaN or inf is never executed (the executor refuses it, see
:mod:`robolearn.policies.executor`); the episode it was drawn for ends there, as a failure, with
``nonfinite_chunks: 1`` in its result (the step it was due at is not counted), and the summary counts such chunks
in ``nonfinite_chunks``. An observation holding NaN or inf raises
:class:`~robolearn.policies.executor.NonFiniteObservationError`, naming the key.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from robolearn.policies.executor import ChunkExecutor, Corrector


def _autoreset_mode(venv: Any) -> str:
    mode = (getattr(venv, "metadata", None) or {}).get("autoreset_mode", "SameStep")
    mode = getattr(mode, "value", mode)
    if mode not in ("SameStep", "Disabled"):
        raise ValueError(f"evaluation needs a vector env with same-step or disabled autoreset, got {mode!r} "
                         "(next-step autoreset spends a step per episode on a reset)")
    return str(mode)


def as_vector_env(envs: Any) -> Any:
    """A vector env as is; a zero-argument factory of one environment as gymnasium's in-process SyncVectorEnv."""
    if hasattr(envs, "num_envs") and hasattr(envs, "step"):
        return envs
    if callable(envs):
        import gymnasium as gym

        return gym.vector.SyncVectorEnv([envs], autoreset_mode=gym.vector.AutoresetMode.DISABLED)
    raise TypeError(f"expected a vector environment or a factory of one environment, got {type(envs).__name__}")


def step_info(infos: Mapping[str, Any], key: str, i: int, finished_here: bool, default: Any = None) -> Any:
    """Env ``i``'s value of ``key`` for the step just taken: from ``final_info`` when the env auto-reset in that
    step (gymnasium's same-step layout), else from the top level; ``_key`` masks respected."""
    src = infos.get("final_info", {}) if finished_here else infos
    if key not in src:
        return default
    mask = src.get(f"_{key}")
    if mask is not None and not bool(np.asarray(mask)[i]):
        return default
    return np.asarray(src[key])[i]


class _Episode:
    def __init__(self, index: int, seed: int, env: int) -> None:
        self.index, self.seed, self.env = index, seed, env
        self.ret, self.best, self.length, self.success = 0.0, -np.inf, 0, False
        self.score: float | None = None  # the best info["score"] seen, for tasks that report one (Push-T)
        self.nonfinite = 0
        self.actions: list[np.ndarray] = []
        self.rewards: list[float] = []

    def result(self, terminated: bool, keep_steps: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"episode": self.index, "seed": self.seed, "env": self.env, "success": self.success,
                               "return": round(self.ret, 4),
                               # an episode ended before its first step (a refused first chunk): 0, as its return
                               "max_reward": round(float(self.best), 4) if self.length else 0.0,
                               "length": self.length, "terminated": terminated, "nonfinite_chunks": self.nonfinite}
        if self.score is not None:
            out["score"] = round(self.score, 4)
        if keep_steps:
            out["actions"] = np.stack(self.actions) if self.actions else np.zeros((0,))
            out["rewards"] = np.asarray(self.rewards)
        return out


class _Schedule:
    """Which episode each environment runs, and what a step did to them: one shared list of seeds, handed out in
    order as environments finish (episode ``j`` always gets ``seeds[j]`` and noise episode ``j``)."""

    def __init__(self, seeds: list[int], n_envs: int, mode: str, keep_steps: bool) -> None:
        self.seeds, self.mode, self.keep_steps = seeds, mode, keep_steps
        first = min(n_envs, len(seeds))
        self.running: list[_Episode | None] = [_Episode(i, seeds[i], i) if i < first else None for i in range(n_envs)]
        self.next = first
        self.results: list[dict[str, Any]] = []

    @property
    def active(self) -> np.ndarray:
        return np.array([ep is not None for ep in self.running])

    def record(self, i: int, action: np.ndarray, reward: float, success: bool) -> _Episode:
        ep = self.running[i]
        assert ep is not None
        ep.ret += reward
        ep.best = max(ep.best, reward)
        ep.length += 1
        ep.success |= success
        if self.keep_steps:
            ep.actions.append(action.copy())
            ep.rewards.append(reward)
        return ep

    def finish(self, i: int, terminated: bool) -> int | None:
        """Close env ``i``'s episode; returns the seed of its next one, or None when the list is used up."""
        ep = self.running[i]
        assert ep is not None
        self.results.append(ep.result(terminated, self.keep_steps))
        if self.next >= len(self.seeds):
            self.running[i] = None
            return None
        self.running[i] = _Episode(self.next, self.seeds[self.next], i)
        self.next += 1
        return self.running[i].seed  # type: ignore[union-attr]


@torch.inference_mode()
def evaluate(
    policy: Any,
    envs: Any,
    seeds: Sequence[int],
    *,
    noise_seed: int | None = None,
    n_action_steps: int | None = None,
    device: str | torch.device | None = None,
    batch_invariant: bool = True,
    corrector: Corrector | None = None,
    progress: Callable[[int, int], None] | None = None,
    keep_steps: bool = False,
) -> dict[str, Any]:
    """Run one episode per seed; returns success rate, mean return and per-episode results.

    ``envs``: a gymnasium-contract vector environment, or a factory of one environment. ``noise_seed``: the
    noise rule's run seed (default ``seeds[0]``). ``n_action_steps``: executed actions per chunk (default the
    policy's). ``keep_steps``: also return each episode's actions and rewards.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("evaluate needs at least one seed")
    venv = as_vector_env(envs)
    try:
        return _evaluate(policy, venv, seeds, noise_seed, n_action_steps, device, batch_invariant, corrector,
                         progress, keep_steps)
    finally:
        if venv is not envs:  # made here from a factory: closed here
            venv.close()


def _evaluate(policy: Any, venv: Any, seeds: list[int], noise_seed: int | None, n_action_steps: int | None,
              device: Any, batch_invariant: bool, corrector: Corrector | None,
              progress: Callable[[int, int], None] | None, keep_steps: bool) -> dict[str, Any]:
    mode = _autoreset_mode(venv)
    n_envs = int(venv.num_envs)
    executor = ChunkExecutor(policy, n_envs, seed=seeds[0] if noise_seed is None else noise_seed,
                             n_action_steps=n_action_steps, corrector=corrector, device=device,
                             batch_invariant=batch_invariant)
    policy.reset()
    plan = _Schedule(seeds, n_envs, mode, keep_steps)
    obs, _ = venv.reset(seed=[ep.seed if ep else None for ep in plan.running])
    _start(executor, plan, obs, range(n_envs))
    shape = venv.single_action_space.shape
    t0 = time.perf_counter()
    while len(plan.results) < len(seeds):
        active = plan.active
        actions = executor.act(active)
        # An episode whose new chunk was refused (NaN/inf) ends before this step, as a failure; its environment
        # steps the held action (finite) like an idle one, and is reset below.
        aborted = set(executor.refused)
        obs, rew, term, trunc, infos = venv.step(actions.reshape((n_envs, *shape)))
        done = np.asarray(term) | np.asarray(trunc)
        restart: dict[int, int | None] = {}
        for i in sorted(aborted):
            ep = plan.running[i]
            assert ep is not None
            ep.nonfinite = int(executor.episode_nonfinite[i])
            seed = plan.finish(i, False)
            if seed is not None or mode == "Disabled":
                restart[i] = seed
            if progress:
                progress(len(plan.results), len(seeds))
        for i in map(int, np.flatnonzero(active)):
            if i in aborted:
                continue
            finished_here = bool(done[i]) and mode == "SameStep"
            success = bool(step_info(infos, "success", i, finished_here, False))
            ep = plan.record(i, actions[i], float(rew[i]), success)
            score = step_info(infos, "score", i, finished_here)
            if score is not None:
                ep.score = max(float(score), ep.score if ep.score is not None else -np.inf)
            if not done[i]:
                executor.observe_env(i, {k: v[i] for k, v in obs.items()})
                continue
            seed = plan.finish(i, bool(term[i]))
            if seed is not None or mode == "Disabled":  # an idle env must be reset to keep stepping too
                restart[i] = seed
            if progress:
                progress(len(plan.results), len(seeds))
        for i in np.flatnonzero(done & ~plan.active):
            if mode == "Disabled":
                restart.setdefault(int(i), None)
        if restart:
            mask = np.zeros(n_envs, dtype=np.bool_)
            mask[list(restart)] = True
            obs, _ = venv.reset(seed=[restart.get(i) for i in range(n_envs)], options={"reset_mask": mask})
            _start(executor, plan, obs, restart)
    results = sorted(plan.results, key=lambda r: r["episode"])
    return summarize(results, time.perf_counter() - t0, executor)


def _start(executor: ChunkExecutor, plan: _Schedule, obs: dict[str, np.ndarray], env_ids: Any) -> None:
    for i in env_ids:
        ep = plan.running[i]
        if ep is not None:
            executor.reset_env(i, {k: v[i] for k, v in obs.items()}, episode=ep.index)


def summarize(results: list[dict[str, Any]], wall_s: float, executor: ChunkExecutor | None = None
              ) -> dict[str, Any]:
    def mean(key: str, nd: int = 4) -> float:
        return round(float(np.mean([r[key] for r in results])), nd) if results else 0.0

    calls = executor.inference_calls if executor is not None else 0
    return {
        "episodes": len(results),
        "success_rate": mean("success"),
        "mean_return": mean("return"),
        "mean_max_reward": mean("max_reward"),
        "mean_length": mean("length", 2),
        # A task's own score where it reports one as info["score"] (Push-T: clip(coverage / 0.95, 0, 1)), as the
        # mean over episodes of each episode's best -- Diffusion Policy's Push-T metric.
        "score": (round(float(np.mean([r["score"] for r in results])), 4)
                  if results and all("score" in r for r in results) else None),
        "inference_ms_mean": round(1000 * executor.inference_s / max(calls, 1), 2) if executor else None,
        "nonfinite_chunks": int(sum(r.get("nonfinite_chunks", 0) for r in results)),
        "wall_s": round(wall_s, 2),
        "per_episode": results,
    }


class PolicyActor:
    """A chunk policy as a per-step actor (``reset(env)``, ``act(obs)``), through a one-environment executor:
    what :func:`robolearn.evaluation.video.record_episode` drives. With the same ``noise_seed`` and ``episode``
    it takes the actions :func:`evaluate` takes in that episode."""

    def __init__(self, policy: Any, *, noise_seed: int, episode: int = 0, n_action_steps: int | None = None,
                 device: str | torch.device | None = None, corrector: Corrector | None = None) -> None:
        self.executor = ChunkExecutor(policy, 1, seed=noise_seed, n_action_steps=n_action_steps, device=device,
                                      corrector=corrector)
        self.episode = episode
        self._fresh = True

    def reset(self, env: Any = None) -> None:
        self._fresh = True
        self.executor.policy.reset()

    @torch.inference_mode()
    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        if self._fresh:
            self.executor.reset_env(0, obs, episode=self.episode)
            self._fresh = False
        else:
            self.executor.observe_env(0, obs)
        return self.executor.act()[0]


def record_video(policy: Any, env: Any, seed: int, path: str, *, episode: int = 0, noise_seed: int | None = None,
                 n_action_steps: int | None = None, device: str | torch.device | None = None,
                 fps: float | None = None) -> dict[str, Any]:
    """Episode ``episode`` of an evaluation (env seed ``seed``, noise seed ``noise_seed``, default ``seed``) in one
    rendering environment, written as mp4."""
    from robolearn.evaluation.video import record_episode

    actor = PolicyActor(policy, noise_seed=seed if noise_seed is None else noise_seed, episode=episode,
                        n_action_steps=n_action_steps, device=device)
    return record_episode(env, actor, path, seed=seed, fps=fps)
