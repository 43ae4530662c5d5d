"""The chunk executor: histories, executable slices, batched inference, seeded noise, the correction hook."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import pytest
import torch

from robolearn.policies import ChunkExecutor, ConfigError, ObsHistory, chunk_noise, executable


class EchoPolicy:
    """chunk[b, j] = (newest obs of row b, oldest obs of row b, j, noise[b, 0, 0]); records its calls."""

    def __init__(self, horizon: int = 8, n_obs_steps: int = 2, n_action_steps: int = 4) -> None:
        self.horizon, self.n_obs_steps, self.n_action_steps = horizon, n_obs_steps, n_action_steps
        self.action_dim, self.obs_keys, self.obs_shapes = 4, ["x"], {"x": (1,)}
        self.calls: list[int] = []  # batch size of every call
        self.resets = 0

    def reset(self) -> None:
        self.resets += 1

    def predict_action(self, obs: Mapping[str, torch.Tensor], noise: torch.Tensor | None = None) -> torch.Tensor:
        x = obs["x"]  # (B, n_obs, 1)
        B = x.shape[0]
        self.calls.append(B)
        chunk = torch.zeros(B, self.horizon, 4)
        chunk[:, :, 0] = x[:, -1, 0, None]
        chunk[:, :, 1] = x[:, 0, 0, None]
        chunk[:, :, 2] = torch.arange(self.horizon, dtype=torch.float32)
        chunk[:, :, 3] = noise[:, 0, 0, None]
        return chunk


def obs(*values: float) -> dict[str, np.ndarray]:
    return {"x": np.array(values, dtype=np.float32)[:, None]}


def test_history_repeats_the_first_frame_and_queue_holds_the_executable_slice() -> None:
    pol = EchoPolicy(horizon=8, n_obs_steps=3, n_action_steps=4)
    ex = ChunkExecutor(pol, 1)
    ex.reset(obs(5.0))
    a = ex.act()
    # newest = oldest = 5 (the first frame fills the history); the slice starts at n_obs_steps - 1 = 2
    assert a[0, :3].tolist() == [5.0, 5.0, 2.0]
    assert [q[2] for q in ex.queues[0]] == [3.0, 4.0, 5.0]  # the rest of the slice, in order
    for v in (6.0, 7.0, 8.0):
        ex.observe(obs(v))
        ex.act()
    ex.observe(obs(9.0))
    a = ex.act()  # queue ran out after 4 actions: a new chunk from the history (7, 8, 9)
    assert a[0, :3].tolist() == [9.0, 7.0, 2.0] and pol.calls == [1, 1]


def test_environments_due_together_share_one_call_and_reset_independently() -> None:
    pol = EchoPolicy(n_action_steps=2)
    ex = ChunkExecutor(pol, 3)
    ex.reset(obs(1.0, 2.0, 3.0))
    assert pol.resets == 1  # a reset of every environment resets the policy
    ex.act()
    assert pol.calls == [3]
    ex.observe(obs(1.5, 2.5, 3.5))
    ex.reset_env(1, {"x": np.array([20.0], np.float32)})
    a = ex.act()  # env 1 re-plans at once; envs 0 and 2 still have one queued action
    assert pol.calls == [3, 1] and a[1, 0] == 20.0 and a[0, 0] == 1.0
    ex.observe(obs(1.7, 20.5, 3.7))
    ex.act()
    assert pol.calls == [3, 1, 2]  # envs 0 and 2 together
    with pytest.raises(KeyError, match="missing key"):
        ex.observe({"y": np.zeros((3, 1))})


def test_noise_depends_only_on_seed_episode_and_chunk() -> None:
    def first_noises(num_envs: int, batch_invariant: bool) -> dict[int, list[float]]:
        pol = EchoPolicy(n_action_steps=1)
        ex = ChunkExecutor(pol, num_envs, seed=7, batch_invariant=batch_invariant)
        out: dict[int, list[float]] = {}
        for start in range(0, 4, num_envs):  # episodes 0..3, in groups of num_envs
            ids = list(range(min(num_envs, 4 - start)))
            ex.reset(obs(*[0.0] * len(ids)), env_ids=ids, episodes=[start + i for i in ids])
            for _ in range(3):
                a = ex.act(np.isin(np.arange(num_envs), ids))
                for i in ids:
                    out.setdefault(start + i, []).append(float(a[i, 3]))
                ex.observe(obs(*[0.0] * len(ids)), env_ids=ids)
        return out

    one = first_noises(1, False)
    assert one == first_noises(2, False) == first_noises(4, True)
    want = [float(chunk_noise(7, 2, c, (8, 4))[0, 0]) for c in range(3)]
    assert one[2] == want and len({v for vs in one.values() for v in vs}) == 12


def test_batch_invariant_mode_calls_the_policy_once_per_environment() -> None:
    pol = EchoPolicy()
    ex = ChunkExecutor(pol, 3, batch_invariant=True)
    ex.reset(obs(1.0, 2.0, 3.0))
    a = ex.act()
    assert pol.calls == [1, 1, 1] and a[:, 0].tolist() == [1.0, 2.0, 3.0]


def test_corrector_sees_the_newest_observation_and_base_action() -> None:
    seen: list[Any] = []

    def corrector(newest: dict[str, np.ndarray], base: np.ndarray, ids: np.ndarray) -> np.ndarray:
        seen.append((newest["x"][:, 0].tolist(), base[:, 2].tolist(), ids.tolist()))
        return base + 100.0

    ex = ChunkExecutor(EchoPolicy(), 2, corrector=corrector)
    ex.reset(obs(1.0, 2.0))
    a = ex.act(np.array([True, False]))
    assert seen == [([1.0], [1.0], [0])]
    assert a[0, 2] == 101.0 and a[1].tolist() == [0.0] * 4  # inactive: zeros, no correction


def test_geometry_is_checked_in_one_place() -> None:
    with pytest.raises(ConfigError, match="n_action_steps must be in \\[1, 7\\]"):
        ChunkExecutor(EchoPolicy(horizon=8, n_obs_steps=2), 1, n_action_steps=8)
    with pytest.raises(TypeError, match="not a chunk policy: missing \\['horizon'"):
        ChunkExecutor(object(), 1)
    ex = ChunkExecutor(EchoPolicy(horizon=8, n_obs_steps=2), 1, n_action_steps=7)
    assert executable(np.arange(8)[None], 2, 7).tolist() == [[1, 2, 3, 4, 5, 6, 7]] and ex.n_action_steps == 7


def test_obs_history_checks_frames() -> None:
    h = ObsHistory(["x"], 3, {"x": (2,)})
    with pytest.raises(ValueError, match="shape \\(2,\\)"):
        h.push({"x": np.zeros(3)})
    with pytest.raises(TypeError, match="numeric"):
        h.push({"x": np.array(["a", "b"])})
    with pytest.raises(RuntimeError, match="empty"):
        h.batch()
    h.reset({"x": np.ones(2)})
    h.push({"x": np.full(2, 2.0)})
    assert h.batch()["x"][0, :, 0].tolist() == [1.0, 1.0, 2.0]
