"""Evaluation rollouts of a chunk policy in a vectorized gymnasium-style environment.

The policy replans every ``n_action_steps`` steps per environment: it sees that environment's last
``n_obs_steps`` observations (the first one repeated after a reset, as in training) and its executable actions
are ``chunk[n_obs_steps - 1 : n_obs_steps - 1 + n_action_steps]``. Environments that need a new chunk at the same
step are batched into one ``predict_action`` call.

Unbiased counting: each environment runs a fixed quota of episodes (``episodes / num_envs``, the first few one
more). Taking "the first N episodes to finish" instead would favour short episodes, which are mostly successes.

The vector environment must reset finished environments in the same step and put the last observation of the
finished episode in ``infos["final_obs"]`` with mask ``infos["_final_obs"]`` (``sim.vector`` does).
"""
from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable, Protocol

import numpy as np
import torch


class ChunkPolicyLike(Protocol):
    n_obs_steps: int
    n_action_steps: int
    obs_keys: list[str]

    def predict_action(self, obs_history: dict[str, torch.Tensor], noise: torch.Tensor | None = None) -> torch.Tensor: ...

    def reset(self) -> None: ...


def executable(policy: ChunkPolicyLike, chunk: np.ndarray) -> np.ndarray:
    start = policy.n_obs_steps - 1
    return chunk[:, start : start + policy.n_action_steps]


class _History:
    """The last ``n`` observations of one environment, the first repeated after a reset."""

    def __init__(self, n: int, keys: list[str]) -> None:
        self.n, self.keys = n, keys
        self.frames: deque[dict[str, np.ndarray]] = deque(maxlen=n)

    def reset(self, obs: dict[str, np.ndarray]) -> None:
        self.frames.clear()
        for _ in range(self.n):
            self.frames.append({k: obs[k] for k in self.keys})

    def push(self, obs: dict[str, np.ndarray]) -> None:
        self.frames.append({k: obs[k] for k in self.keys})

    def stacked(self) -> dict[str, np.ndarray]:
        return {k: np.stack([f[k] for f in self.frames]) for k in self.keys}


def _row(obs: dict[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    return {k: v[i] for k, v in obs.items()}


@torch.inference_mode()
def evaluate(
    policy: ChunkPolicyLike,
    venv: Any,
    episodes: int,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Run ``episodes`` episodes; returns success rate, mean return and per-episode results."""
    n_envs = int(venv.num_envs)
    quota = [episodes // n_envs + (1 if i < episodes % n_envs else 0) for i in range(n_envs)]
    keys = list(policy.obs_keys)
    policy.reset()
    obs, _ = venv.reset(seed=seed)
    hist = [_History(policy.n_obs_steps, keys) for _ in range(n_envs)]
    for i in range(n_envs):
        hist[i].reset(_row(obs, i))
    queues: list[deque[np.ndarray]] = [deque() for _ in range(n_envs)]
    returns = np.zeros(n_envs)
    best = np.full(n_envs, -np.inf)  # max reward within the episode: Push-T's coverage score
    succeeded = np.zeros(n_envs, dtype=bool)  # success at any step (an env may not end the episode on success)
    lengths = np.zeros(n_envs, dtype=np.int64)
    ep_index = [0] * n_envs
    results: list[dict[str, Any]] = []
    infer_s, infer_calls = 0.0, 0
    t0 = time.perf_counter()
    action_dim = int(np.prod(venv.single_action_space.shape))
    while len(results) < episodes:
        need = [i for i in range(n_envs) if not queues[i] and ep_index[i] < quota[i]]
        if need:
            stacks = [hist[i].stacked() for i in need]
            batch = {k: torch.as_tensor(np.stack([s[k] for s in stacks])).to(device) for k in keys}
            ti = time.perf_counter()
            chunk = policy.predict_action(batch).float().cpu().numpy()
            infer_s += time.perf_counter() - ti
            infer_calls += 1
            for j, i in enumerate(need):
                queues[i].extend(executable(policy, chunk)[j])
        actions = np.zeros((n_envs, action_dim), dtype=np.float32)
        for i in range(n_envs):
            if queues[i]:
                actions[i] = queues[i].popleft()
            # Environments past their quota keep stepping with zero actions; their episodes are not counted.
        obs, rew, term, trunc, infos = venv.step(actions.reshape((n_envs, *venv.single_action_space.shape)))
        done = np.asarray(term) | np.asarray(trunc)
        success = np.asarray(infos.get("success", np.zeros(n_envs, bool)), dtype=bool)
        for i in range(n_envs):
            if ep_index[i] >= quota[i]:
                continue
            returns[i] += float(rew[i])
            best[i] = max(best[i], float(rew[i]))
            succeeded[i] |= success[i]
            lengths[i] += 1
            if done[i]:
                results.append({
                    "env": i, "episode": ep_index[i], "success": bool(succeeded[i]),
                    "return": round(float(returns[i]), 4), "max_reward": round(float(best[i]), 4),
                    "length": int(lengths[i]),
                    "terminated": bool(term[i]),
                })
                ep_index[i] += 1
                returns[i], lengths[i], best[i], succeeded[i] = 0.0, 0, -np.inf, False
                queues[i].clear()
                hist[i].reset(_row(obs, i))
                if progress:
                    progress(len(results), episodes)
            else:
                hist[i].push(_row(obs, i))
    wall = time.perf_counter() - t0
    successes = [r["success"] for r in results]
    return {
        "episodes": len(results),
        "success_rate": round(float(np.mean(successes)), 4) if results else 0.0,
        "mean_return": round(float(np.mean([r["return"] for r in results])), 4) if results else 0.0,
        "mean_max_reward": round(float(np.mean([r["max_reward"] for r in results])), 4) if results else 0.0,
        "mean_length": round(float(np.mean([r["length"] for r in results])), 2) if results else 0.0,
        "inference_ms_mean": round(1000 * infer_s / max(infer_calls, 1), 2),
        "wall_s": round(wall, 2),
        "per_episode": results,
    }


@torch.inference_mode()
def record_video_episode(
    policy: ChunkPolicyLike, env: Any, seed: int, path: str, device: str | torch.device = "cpu", fps: float = 10
) -> dict[str, Any]:
    """One episode in a single environment, every frame rendered, written as mp4 with imageio."""
    import imageio.v2 as imageio

    policy.reset()
    obs, info = env.reset(seed=seed)
    keys = list(policy.obs_keys)
    hist = _History(policy.n_obs_steps, keys)
    hist.reset(obs)
    frames = [env.render()]
    queue: deque[np.ndarray] = deque()
    success, steps, total = False, 0, 0.0
    while True:
        if not queue:
            batch = {k: torch.as_tensor(v[None]).to(device) for k, v in hist.stacked().items()}
            queue.extend(executable(policy, policy.predict_action(batch).float().cpu().numpy())[0])
        obs, r, term, trunc, info = env.step(queue.popleft().reshape(env.action_space.shape))
        hist.push(obs)
        frames.append(env.render())
        steps += 1
        total += float(r)
        success = success or bool(info.get("success", False))
        if term or trunc:
            break
    with imageio.get_writer(path, fps=fps, codec="libx264", macro_block_size=1, pixelformat="yuv420p") as w:
        for f in frames:
            w.append_data(_even(f))
    return {"path": str(path), "success": success, "steps": steps, "return": round(total, 4)}


def _even(frame: np.ndarray) -> np.ndarray:
    """yuv420p needs even width and height."""
    h, w = frame.shape[:2]
    return frame[: h - h % 2, : w - w % 2]
